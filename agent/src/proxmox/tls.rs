//! TLS for the Proxmox API. A Proxmox node's certificate is signed by a per-cluster CA
//! nobody's trust store knows, so the admin either pins the node certificate's SHA-256
//! fingerprint (what Proxmox's own tools do) or gives the cluster CA file
//! (`/etc/pve/pve-root-ca.pem`). Skipping verification needs an explicit
//! `PROXMOX_INSECURE_TLS=1`. With none of them, the web PKI roots apply (a node with an
//! ACME certificate).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest;

use super::ProxmoxSettings;

/// Parses `AA:BB:…` (or plain hex, any case, optionally prefixed `sha256:` /
/// `SHA256 Fingerprint=`) into 32 bytes.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    let t = s.trim();
    let t = t
        .strip_prefix("SHA256 Fingerprint=")
        .or_else(|| t.strip_prefix("sha256 Fingerprint="))
        .or_else(|| t.strip_prefix("sha256:"))
        .or_else(|| t.strip_prefix("SHA256:"))
        .unwrap_or(t);
    let hex_str: String = t
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    let bytes = hex::decode(&hex_str).map_err(|_| {
        format!("PROXMOX_TLS_FINGERPRINT {s:?} is not a SHA-256 fingerprint (expected 32 hex bytes like AA:BB:…)")
    })?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        format!(
            "PROXMOX_TLS_FINGERPRINT has {} bytes; a SHA-256 fingerprint has 32 (AA:BB:… with 32 pairs)",
            bytes.len()
        )
    })
}

pub fn format_fingerprint(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Accepts exactly the server whose leaf certificate has the pinned SHA-256 fingerprint
/// (host name and chain are not checked: the pin is the trust), and still verifies that
/// the server holds the certificate's key.
#[derive(Debug)]
pub struct PinnedFingerprint {
    expected: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedFingerprint {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = sha2::Sha256::digest(end_entity.as_ref());
        if actual.as_slice() == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate fingerprint {} does not match PROXMOX_TLS_FINGERPRINT {}",
                format_fingerprint(&actual),
                format_fingerprint(&self.expected)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Accepts any certificate. Only with `PROXMOX_INSECURE_TLS=1`.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How the client verifies the server, for logs and error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Fingerprint,
    CaFile,
    Insecure,
    WebPki,
}

/// Builds the rustls config the settings ask for.
pub fn client_config(s: &ProxmoxSettings) -> Result<(rustls::ClientConfig, TlsMode), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    if let Some(fp) = s
        .tls_fingerprint
        .as_deref()
        .filter(|f| !f.trim().is_empty())
    {
        let expected = parse_fingerprint(fp)?;
        if s.ca_file.is_some() {
            tracing::warn!("both PROXMOX_TLS_FINGERPRINT and PROXMOX_CA_FILE are set; the fingerprint pin is used");
        }
        let cfg = builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedFingerprint { expected, provider }))
            .with_no_client_auth();
        return Ok((cfg, TlsMode::Fingerprint));
    }
    if let Some(path) = &s.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read PROXMOX_CA_FILE {}: {e}", path.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert =
                cert.map_err(|e| format!("PROXMOX_CA_FILE {}: bad PEM: {e}", path.display()))?;
            roots.add(cert).map_err(|e| {
                format!(
                    "PROXMOX_CA_FILE {}: unusable certificate: {e}",
                    path.display()
                )
            })?;
        }
        if roots.is_empty() {
            return Err(format!(
                "PROXMOX_CA_FILE {} holds no PEM certificate",
                path.display()
            ));
        }
        return Ok((
            builder.with_root_certificates(roots).with_no_client_auth(),
            TlsMode::CaFile,
        ));
    }
    if s.insecure_tls {
        tracing::warn!(url = %s.url, "PROXMOX_INSECURE_TLS=1: the Proxmox server certificate is NOT verified");
        let cfg = builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth();
        return Ok((cfg, TlsMode::Insecure));
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    Ok((
        builder.with_root_certificates(roots).with_no_client_auth(),
        TlsMode::WebPki,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_forms() {
        let colon = "AB:".repeat(31) + "CD";
        let a = parse_fingerprint(&colon).unwrap();
        assert_eq!(a[0], 0xab);
        assert_eq!(a[31], 0xcd);
        assert_eq!(
            parse_fingerprint(&colon.to_lowercase().replace(':', "")).unwrap(),
            a
        );
        assert_eq!(parse_fingerprint(&format!("sha256:{colon}")).unwrap(), a);
        assert_eq!(format_fingerprint(&a), colon);
        assert!(parse_fingerprint("AB:CD").unwrap_err().contains("32"));
        assert!(parse_fingerprint("zz").is_err());
    }
}
