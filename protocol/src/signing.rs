//! Signed dispatch: the control plane signs every `dispatch` and `cancel` frame with an
//! Ed25519 key; an agent that pinned the key's public half refuses frames that are
//! unsigned or signed by another key. A tampered database row, a man in the middle or a
//! frame replayed to another agent cannot make an agent run a command.
//!
//! The signature covers **canonical bytes**, not a JSON rendering: a concatenation of
//! fields, each written as its length (u32, big-endian) followed by its bytes:
//!
//! * `dispatch`: `"trellis-signed-frame-v1"`, `"dispatch"`, key id, agent id (16 bytes),
//!   command id (16), root command id (16; the command id when absent), attempt (u32 BE,
//!   4 bytes), deadline (empty when absent, else i64 BE, 8 bytes), command type (UTF-8),
//!   and the **exact bytes of the `params` value as they appear in the frame**.
//! * `cancel`: `"trellis-signed-frame-v1"`, `"cancel"`, key id, agent id (16), command
//!   id (16), reason (`"cancelled"` or `"timed_out"`).
//!
//! The key id is the first 8 bytes of the SHA-256 of the 32-byte public key, in lower-case
//! hex; public keys and signatures travel in standard base64 (with padding).

use base64::Engine;
use ring::signature::{self as sig, KeyPair};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{CancelReason, Dispatch, ServerMessage};

/// `welcome.features` entry: the server signs `dispatch` and `cancel` frames with the key
/// in `welcome.signing_key`.
pub const FEATURE_SIGNED_DISPATCH: &str = "signed_dispatch";

/// The error code of a command refused for its signature (and of the non-fatal protocol
/// error for a refused `cancel`).
pub const SIGNATURE_INVALID: &str = "signature_invalid";

const CONTEXT: &[u8] = b"trellis-signed-frame-v1";

/// The signature of one `dispatch` or `cancel` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FrameSignature {
    /// Which key signed it (see `welcome.signing_key.key_id`).
    pub key_id: String,
    /// The 64-byte Ed25519 signature over the frame's canonical bytes, base64.
    pub sig: String,
}

impl FrameSignature {
    /// The stored form, `<key id>:<signature>` (neither contains a colon).
    pub fn to_stored(&self) -> String {
        format!("{}:{}", self.key_id, self.sig)
    }

    /// Parses [`FrameSignature::to_stored`]'s form.
    pub fn from_stored(text: &str) -> Option<Self> {
        let (key_id, sig) = text.split_once(':')?;
        (!key_id.is_empty() && !sig.is_empty()).then(|| Self {
            key_id: key_id.to_string(),
            sig: sig.to_string(),
        })
    }
}

/// The control plane's signing key as `welcome` advertises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ServerSigningKey {
    /// First 8 bytes of SHA-256(public key), lower-case hex.
    pub key_id: String,
    /// The 32-byte Ed25519 public key, base64.
    pub public_key: String,
}

/// Why a frame's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the frame is not signed, but this agent requires signed frames")]
    Unsigned,
    #[error("the frame is signed by key {0}, which this agent has not pinned")]
    UnknownKey(String),
    #[error("the frame's signature does not verify (it was altered, or signed for another agent)")]
    Mismatch,
    #[error("the frame's signature is malformed: {0}")]
    Malformed(String),
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// The key id of a 32-byte public key.
pub fn key_id(public_key: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, public_key);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    // Frames are at most 1 MiB, so every field fits.
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The canonical bytes of a `dispatch` frame; `params` is the exact JSON text of its
/// `params` value as sent.
pub fn dispatch_bytes(key_id: &str, agent_id: Uuid, d: &Dispatch, params: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + params.len());
    field(&mut out, CONTEXT);
    field(&mut out, b"dispatch");
    field(&mut out, key_id.as_bytes());
    field(&mut out, agent_id.as_bytes());
    field(&mut out, d.command_id.as_bytes());
    field(
        &mut out,
        d.root_command_id.unwrap_or(d.command_id).as_bytes(),
    );
    field(&mut out, &d.attempt.to_be_bytes());
    match d.deadline_ms {
        Some(ms) => field(&mut out, &ms.to_be_bytes()),
        None => field(&mut out, b""),
    }
    field(&mut out, d.command_type.as_bytes());
    field(&mut out, params);
    out
}

fn reason_str(r: CancelReason) -> &'static str {
    match r {
        CancelReason::Cancelled => "cancelled",
        CancelReason::TimedOut => "timed_out",
        CancelReason::AgentShutdown => "agent_shutdown",
    }
}

/// The canonical bytes of a `cancel` frame.
pub fn cancel_bytes(
    key_id: &str,
    agent_id: Uuid,
    command_id: Uuid,
    reason: CancelReason,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    field(&mut out, CONTEXT);
    field(&mut out, b"cancel");
    field(&mut out, key_id.as_bytes());
    field(&mut out, agent_id.as_bytes());
    field(&mut out, command_id.as_bytes());
    field(&mut out, reason_str(reason).as_bytes());
    out
}

/// The control plane's private signing key.
pub struct SigningKey {
    pair: sig::Ed25519KeyPair,
    key_id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new random key and its PKCS#8 (v2) document, to be stored.
    pub fn generate() -> Result<(Self, Vec<u8>), String> {
        let doc = sig::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map_err(|_| "cannot generate an Ed25519 key".to_string())?;
        let key = Self::from_pkcs8(doc.as_ref())?;
        Ok((key, doc.as_ref().to_vec()))
    }

    /// A key from its PKCS#8 document (DER).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        let pair = sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))?;
        let key_id = key_id(pair.public_key().as_ref());
        Ok(Self { pair, key_id })
    }

    /// A key from the text form of its PKCS#8 document (base64, surrounding whitespace
    /// ignored): the `signing.key` file and `TRELLIS_SIGNING_KEY`.
    pub fn from_base64(text: &str) -> Result<Self, String> {
        let der = b64()
            .decode(text.trim())
            .map_err(|e| format!("not base64: {e}"))?;
        Self::from_pkcs8(&der)
    }

    /// The text form of a PKCS#8 document.
    pub fn pkcs8_to_base64(der: &[u8]) -> String {
        b64().encode(der)
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public key, base64 (what `tendril --server-public-key` takes).
    pub fn public_key_base64(&self) -> String {
        b64().encode(self.pair.public_key().as_ref())
    }

    /// How `welcome` advertises this key.
    pub fn advertised(&self) -> ServerSigningKey {
        ServerSigningKey {
            key_id: self.key_id.clone(),
            public_key: self.public_key_base64(),
        }
    }

    fn signature(&self, bytes: &[u8]) -> FrameSignature {
        FrameSignature {
            key_id: self.key_id.clone(),
            sig: b64().encode(self.pair.sign(bytes).as_ref()),
        }
    }

    /// The signature of a `dispatch` for `agent_id` (its own `signature` is ignored), over
    /// the params bytes `ServerMessage::encode` writes. The control plane computes it when
    /// the command is created and stores it with the row, so a row altered later no longer
    /// matches what the agent verifies.
    pub fn sign_dispatch(&self, agent_id: Uuid, d: &Dispatch) -> FrameSignature {
        let params = serde_json::to_vec(&d.params).expect("JSON values serialize");
        self.signature(&dispatch_bytes(&self.key_id, agent_id, d, &params))
    }

    /// Checks `d.signature` against this key as an agent that pinned it would: made by
    /// this key, for `agent_id`, over exactly these fields and params.
    pub fn verify_own_dispatch(&self, agent_id: Uuid, d: &Dispatch) -> Result<(), SignatureError> {
        let s = d.signature.as_ref().ok_or(SignatureError::Unsigned)?;
        if s.key_id != self.key_id {
            return Err(SignatureError::UnknownKey(s.key_id.clone()));
        }
        let own = PublicKey {
            bytes: self
                .pair
                .public_key()
                .as_ref()
                .try_into()
                .expect("Ed25519 public keys have 32 bytes"),
            key_id: self.key_id.clone(),
        };
        let params = serde_json::to_vec(&d.params).expect("JSON values serialize");
        own.verify(&dispatch_bytes(&s.key_id, agent_id, d, &params), &s.sig)
    }

    /// Signs a `dispatch` or `cancel` frame meant for `agent_id` (other frames are left
    /// alone). The params bytes signed are those `ServerMessage::encode` writes.
    pub fn sign(&self, agent_id: Uuid, msg: &mut ServerMessage) {
        match msg {
            ServerMessage::Dispatch(d) => {
                d.signature = None;
                let params = serde_json::to_vec(&d.params).expect("JSON values serialize");
                d.signature =
                    Some(self.signature(&dispatch_bytes(&self.key_id, agent_id, d, &params)));
            }
            ServerMessage::Cancel {
                command_id,
                reason,
                signature,
            } => {
                *signature = Some(self.signature(&cancel_bytes(
                    &self.key_id,
                    agent_id,
                    *command_id,
                    *reason,
                )));
            }
            _ => {}
        }
    }
}

/// A control plane public key an agent trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    bytes: [u8; 32],
    key_id: String,
}

impl PublicKey {
    /// A key from its base64 form (32 bytes).
    pub fn from_base64(text: &str) -> Result<Self, String> {
        let raw = b64()
            .decode(text.trim())
            .map_err(|e| format!("a server public key must be base64: {e}"))?;
        let bytes: [u8; 32] = raw
            .try_into()
            .map_err(|v: Vec<u8>| format!("an Ed25519 public key has 32 bytes, not {}", v.len()))?;
        Ok(Self {
            key_id: key_id(&bytes),
            bytes,
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn to_base64(&self) -> String {
        b64().encode(self.bytes)
    }

    fn verify(&self, bytes: &[u8], signature: &str) -> Result<(), SignatureError> {
        let raw = b64()
            .decode(signature)
            .map_err(|e| SignatureError::Malformed(e.to_string()))?;
        sig::UnparsedPublicKey::new(&sig::ED25519, &self.bytes)
            .verify(bytes, &raw)
            .map_err(|_| SignatureError::Mismatch)
    }
}

fn find<'a>(trusted: &'a [PublicKey], s: &FrameSignature) -> Result<&'a PublicKey, SignatureError> {
    trusted
        .iter()
        .find(|k| k.key_id == s.key_id)
        .ok_or_else(|| SignatureError::UnknownKey(s.key_id.clone()))
}

/// Checks a `dispatch` decoded from `frame` (its text as received) against the trusted
/// keys. On success returns the params parsed from exactly the signed bytes: run those.
pub fn verify_dispatch(
    frame: &str,
    d: &Dispatch,
    agent_id: Uuid,
    trusted: &[PublicKey],
) -> Result<serde_json::Value, SignatureError> {
    #[derive(Deserialize)]
    struct Raw<'a> {
        #[serde(borrow)]
        params: &'a serde_json::value::RawValue,
    }
    let s = d.signature.as_ref().ok_or(SignatureError::Unsigned)?;
    let key = find(trusted, s)?;
    let raw: Raw<'_> = serde_json::from_str(frame)
        .map_err(|e| SignatureError::Malformed(format!("params: {e}")))?;
    let params = raw.params.get().as_bytes();
    key.verify(&dispatch_bytes(&s.key_id, agent_id, d, params), &s.sig)?;
    serde_json::from_slice(params).map_err(|e| SignatureError::Malformed(format!("params: {e}")))
}

/// Checks a `cancel` frame against the trusted keys.
pub fn verify_cancel(
    command_id: Uuid,
    reason: CancelReason,
    signature: Option<&FrameSignature>,
    agent_id: Uuid,
    trusted: &[PublicKey],
) -> Result<(), SignatureError> {
    let s = signature.ok_or(SignatureError::Unsigned)?;
    let key = find(trusted, s)?;
    key.verify(
        &cancel_bytes(&s.key_id, agent_id, command_id, reason),
        &s.sig,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dispatch(params: serde_json::Value) -> ServerMessage {
        ServerMessage::Dispatch(Dispatch {
            command_id: Uuid::new_v4(),
            command_type: "terraform_apply".into(),
            params,
            deadline_ms: Some(1_795_599_672_722),
            attempt: 2,
            root_command_id: Some(Uuid::new_v4()),
            signature: None,
            terraform_state: None,
        })
    }

    fn check(
        frame: &str,
        agent: Uuid,
        trusted: &[PublicKey],
    ) -> Result<serde_json::Value, SignatureError> {
        match ServerMessage::decode(frame).unwrap() {
            ServerMessage::Dispatch(d) => verify_dispatch(frame, &d, agent, trusted),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn signed_frames_verify_and_any_change_is_refused() {
        let (key, der) = SigningKey::generate().unwrap();
        let again = SigningKey::from_base64(&SigningKey::pkcs8_to_base64(&der)).unwrap();
        assert_eq!(again.public_key_base64(), key.public_key_base64());
        let trusted = [PublicKey::from_base64(&key.public_key_base64()).unwrap()];
        assert_eq!(trusted[0].key_id(), key.key_id());
        let agent = Uuid::new_v4();
        let params = json!({"terraform_vars":{"a":0.1,"b":1e300,"c":"x\u{0}\"y"},"z":[1,2]});
        let mut msg = dispatch(params.clone());
        key.sign(agent, &mut msg);
        let frame = msg.encode();
        assert_eq!(check(&frame, agent, &trusted).unwrap(), params);
        // Another agent, another params byte, another attempt: refused.
        assert_eq!(
            check(&frame, Uuid::new_v4(), &trusted),
            Err(SignatureError::Mismatch)
        );
        let tampered = frame.replace("\"z\":[1,2]", "\"z\":[1,3]");
        assert_ne!(tampered, frame);
        assert_eq!(
            check(&tampered, agent, &trusted),
            Err(SignatureError::Mismatch)
        );
        let tampered = frame.replace("\"attempt\":2", "\"attempt\":3");
        assert_eq!(
            check(&tampered, agent, &trusted),
            Err(SignatureError::Mismatch)
        );
        // Whitespace inside params is a different byte string too.
        let spaced = frame.replace("\"z\":[1,2]", "\"z\":[1, 2]");
        assert_eq!(
            check(&spaced, agent, &trusted),
            Err(SignatureError::Mismatch)
        );
        // Unsigned, or signed by another key.
        let unsigned = dispatch(params.clone()).encode();
        assert_eq!(
            check(&unsigned, agent, &trusted),
            Err(SignatureError::Unsigned)
        );
        let (other, _) = SigningKey::generate().unwrap();
        let mut msg = dispatch(params);
        other.sign(agent, &mut msg);
        assert!(matches!(
            check(&msg.encode(), agent, &trusted),
            Err(SignatureError::UnknownKey(_))
        ));
        // A forged signature under the pinned key id.
        let mut msg = dispatch(json!({}));
        other.sign(agent, &mut msg);
        let forged = msg.encode().replace(other.key_id(), key.key_id());
        assert_eq!(
            check(&forged, agent, &trusted),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn a_stored_signature_verifies_at_the_agent_and_against_its_own_key() {
        let (key, _) = SigningKey::generate().unwrap();
        let trusted = [PublicKey::from_base64(&key.public_key_base64()).unwrap()];
        let agent = Uuid::new_v4();
        let ServerMessage::Dispatch(mut d) = dispatch(json!({"b": [1, 2.5], "a": "x"})) else {
            panic!()
        };
        // Signed apart from the frame (at creation), stored as text, attached at dispatch.
        let stored = key.sign_dispatch(agent, &d).to_stored();
        d.signature = FrameSignature::from_stored(&stored);
        assert_eq!(key.verify_own_dispatch(agent, &d), Ok(()));
        let frame = ServerMessage::Dispatch(d.clone()).encode();
        assert!(check(&frame, agent, &trusted).is_ok());
        // Any stored field changed afterwards no longer matches.
        let mut altered = d.clone();
        altered.params = json!({"b": [1, 2.5], "a": "y"});
        assert_eq!(
            key.verify_own_dispatch(agent, &altered),
            Err(SignatureError::Mismatch)
        );
        let frame = ServerMessage::Dispatch(altered).encode();
        assert_eq!(
            check(&frame, agent, &trusted),
            Err(SignatureError::Mismatch)
        );
        let mut later = d.clone();
        later.deadline_ms = Some(later.deadline_ms.unwrap() + 1);
        assert_eq!(
            key.verify_own_dispatch(agent, &later),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            key.verify_own_dispatch(Uuid::new_v4(), &d),
            Err(SignatureError::Mismatch)
        );
        let (other, _) = SigningKey::generate().unwrap();
        assert!(matches!(
            other.verify_own_dispatch(agent, &d),
            Err(SignatureError::UnknownKey(_))
        ));
        // The stored form round-trips and rejects junk.
        assert_eq!(
            FrameSignature::from_stored(&stored).unwrap().to_stored(),
            stored
        );
        for junk in ["", ":", "abc", "abc:", ":sig"] {
            assert_eq!(FrameSignature::from_stored(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn cancel_signature_binds_command_reason_and_agent() {
        let (key, _) = SigningKey::generate().unwrap();
        let trusted = [PublicKey::from_base64(&key.public_key_base64()).unwrap()];
        let (agent, id) = (Uuid::new_v4(), Uuid::new_v4());
        let mut msg = ServerMessage::Cancel {
            command_id: id,
            reason: CancelReason::Cancelled,
            signature: None,
        };
        key.sign(agent, &mut msg);
        let ServerMessage::Cancel { signature, .. } = ServerMessage::decode(&msg.encode()).unwrap()
        else {
            panic!()
        };
        let s = signature.as_ref();
        assert_eq!(
            verify_cancel(id, CancelReason::Cancelled, s, agent, &trusted),
            Ok(())
        );
        assert!(verify_cancel(id, CancelReason::TimedOut, s, agent, &trusted).is_err());
        assert!(
            verify_cancel(Uuid::new_v4(), CancelReason::Cancelled, s, agent, &trusted).is_err()
        );
        assert!(verify_cancel(id, CancelReason::Cancelled, s, Uuid::new_v4(), &trusted).is_err());
        assert_eq!(
            verify_cancel(id, CancelReason::Cancelled, None, agent, &trusted),
            Err(SignatureError::Unsigned)
        );
    }

    #[test]
    fn canonical_bytes_are_length_prefixed() {
        let d = Dispatch {
            command_id: Uuid::nil(),
            command_type: "ping".into(),
            params: json!({}),
            deadline_ms: None,
            attempt: 1,
            root_command_id: None,
            signature: None,
            terraform_state: None,
        };
        let b = dispatch_bytes("k", Uuid::nil(), &d, b"{}");
        let mut want = Vec::new();
        for f in [
            &b"trellis-signed-frame-v1"[..],
            b"dispatch",
            b"k",
            &[0; 16],
            &[0; 16],
            &[0; 16],
            &1u32.to_be_bytes(),
            b"",
            b"ping",
            b"{}",
        ] {
            want.extend_from_slice(&(f.len() as u32).to_be_bytes());
            want.extend_from_slice(f);
        }
        assert_eq!(b, want);
    }
}
