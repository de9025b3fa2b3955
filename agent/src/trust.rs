//! Which control plane keys this agent trusts to sign `dispatch` and `cancel` frames (see
//! `trellis_protocol::signing`), pinned in `<work dir>/server-keys` (0600).
//!
//! * `--server-public-key KEY[,KEY…]` (`TENDRIL_SERVER_PUBLIC_KEY`) pins the given keys,
//!   replacing the file (re-pinning; the recorded agent id is forgotten and learnt again).
//! * Without it, an existing file is used; with no file, the first `welcome` that
//!   advertises a signing key is trusted and recorded (trust on first use).
//! * Once a key is pinned, every `dispatch` and `cancel` must be signed by a pinned key for
//!   this agent's id (recorded from the first `welcome` after pinning).
//!
//! The file has one entry per line: `key <base64 Ed25519 public key>` (several during a
//! key rotation) and `agent <uuid>`; `#` starts a comment.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use trellis_protocol::signing::PublicKey;
use trellis_protocol::ServerSigningKey;
use uuid::Uuid;

/// The pin file in the work dir.
pub const PIN_FILE: &str = "server-keys";

#[derive(Debug)]
pub struct Trust {
    path: PathBuf,
    keys: Vec<PublicKey>,
    agent_id: Option<Uuid>,
}

impl Trust {
    /// Loads the pins of `work_dir`, or replaces them with `configured` when it is not
    /// empty.
    pub fn open(work_dir: &Path, configured: &[PublicKey]) -> anyhow::Result<Self> {
        let path = work_dir.join(PIN_FILE);
        if !configured.is_empty() {
            let t = Self {
                path,
                keys: configured.to_vec(),
                agent_id: None,
            };
            t.save()?;
            tracing::info!(keys = ?t.key_ids(), "pinned the control plane's signing keys given on the command line");
            return Ok(t);
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    path,
                    keys: Vec::new(),
                    agent_id: None,
                })
            }
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        };
        let mut t = Self {
            path,
            keys: Vec::new(),
            agent_id: None,
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: String| anyhow::anyhow!("{} line {}: {why}", t.path.display(), n + 1);
            match line.split_once(char::is_whitespace) {
                Some(("key", k)) => t.keys.push(PublicKey::from_base64(k).map_err(bad)?),
                Some(("agent", a)) => {
                    t.agent_id = Some(a.trim().parse().map_err(|e| bad(format!("{e}")))?)
                }
                _ => return Err(bad("expected `key <base64>` or `agent <uuid>`".into())),
            }
        }
        Ok(t)
    }

    /// Whether frames must be signed (a key is pinned).
    pub fn required(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// The agent id frames must be signed for (`None` until the first welcome).
    pub fn agent_id(&self) -> Option<Uuid> {
        self.agent_id
    }

    fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(PublicKey::key_id).collect()
    }

    /// Takes note of a `welcome`: pins its key when nothing is pinned yet (trust on first
    /// use) and the agent id when none is recorded.
    pub fn welcome(
        &mut self,
        agent_id: Uuid,
        advertised: Option<&ServerSigningKey>,
    ) -> anyhow::Result<()> {
        let mut changed = false;
        if self.keys.is_empty() {
            let Some(adv) = advertised else {
                return Ok(());
            };
            let key = PublicKey::from_base64(&adv.public_key)
                .map_err(|e| anyhow::anyhow!("the control plane's signing key: {e}"))?;
            tracing::info!(key_id = key.key_id(), path = %self.path.display(),
                "pinned the control plane's signing key (trust on first use)");
            self.keys.push(key);
            changed = true;
        } else if let Some(adv) = advertised {
            if !self.keys.iter().any(|k| k.key_id() == adv.key_id) {
                tracing::error!(
                    advertised = %adv.key_id,
                    pinned = ?self.key_ids(),
                    "the control plane signs with a key this agent has not pinned: its \
                     commands will be refused (signature_invalid). After a deliberate key \
                     rotation, restart with --server-public-key <new key>"
                );
            }
        }
        match self.agent_id {
            None => {
                self.agent_id = Some(agent_id);
                changed = true;
            }
            Some(pinned) if pinned != agent_id => tracing::error!(
                %pinned, welcome = %agent_id,
                "the control plane names another agent id than the one pinned: its commands \
                 will be refused (signature_invalid)"
            ),
            Some(_) => {}
        }
        if changed {
            self.save()?;
        }
        Ok(())
    }

    /// Writes the pins (0600, replaced atomically).
    fn save(&self) -> anyhow::Result<()> {
        let mut text = String::from(
            "# tendril: control plane signing keys this agent trusts (see protocol/README.md)\n",
        );
        for k in &self.keys {
            text.push_str(&format!("key {}\n", k.to_base64()));
        }
        if let Some(a) = self.agent_id {
            text.push_str(&format!("agent {a}\n"));
        }
        let tmp = self.path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| anyhow::anyhow!("cannot write {}: {e}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_protocol::signing::SigningKey;

    #[test]
    fn first_use_pins_then_the_file_is_used_and_a_flag_replaces_it() {
        let dir = std::env::temp_dir().join(format!("tendril-trust-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, _) = SigningKey::generate().unwrap();
        let (b, _) = SigningKey::generate().unwrap();
        let agent = Uuid::new_v4();

        let mut t = Trust::open(&dir, &[]).unwrap();
        assert!(!t.required());
        t.welcome(agent, None).unwrap();
        assert!(!t.required(), "no key advertised: nothing pinned");
        assert!(!dir.join(PIN_FILE).exists());
        t.welcome(agent, Some(&a.advertised())).unwrap();
        assert!(t.required());
        let mode = std::fs::metadata(dir.join(PIN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // Reloaded; another advertised key is not pinned.
        let mut t = Trust::open(&dir, &[]).unwrap();
        assert_eq!(t.agent_id(), Some(agent));
        t.welcome(agent, Some(&b.advertised())).unwrap();
        let ids: Vec<_> = t.keys().iter().map(|k| k.key_id().to_string()).collect();
        assert_eq!(ids, vec![a.key_id().to_string()]);

        // The flag re-pins (two keys for a rotation) and forgets the agent id.
        let both = [a.public_key_base64(), b.public_key_base64()]
            .map(|k| PublicKey::from_base64(&k).unwrap());
        let t = Trust::open(&dir, &both).unwrap();
        assert_eq!(t.keys().len(), 2);
        assert_eq!(t.agent_id(), None);
        assert_eq!(Trust::open(&dir, &[]).unwrap().keys().len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
