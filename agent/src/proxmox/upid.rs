//! Proxmox task ids (UPIDs): `UPID:node:PID:PSTART:STARTTIME:type:id:user:`.

use std::fmt;

/// A parsed UPID. The original text is kept: Proxmox wants it back verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upid {
    raw: String,
    pub node: String,
    pub pid: u32,
    pub pstart: u64,
    pub starttime: u64,
    pub kind: String,
    pub id: String,
    pub user: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a Proxmox task id (UPID): {0:?}")]
pub struct UpidError(pub String);

impl Upid {
    pub fn parse(s: &str) -> Result<Self, UpidError> {
        let err = || UpidError(s.chars().take(200).collect());
        let body = s
            .strip_prefix("UPID:")
            .and_then(|b| b.strip_suffix(':'))
            .ok_or_else(err)?;
        // node:pid:pstart:starttime:type:id:user — `user` never contains ':', but be
        // lenient and give it whatever remains.
        let mut parts = body.splitn(7, ':');
        let mut next = || parts.next().ok_or_else(err);
        let node = next()?;
        let pid = next()?;
        let pstart = next()?;
        let starttime = next()?;
        let kind = next()?;
        let id = next()?;
        let user = next()?;
        let hex = |v: &str, min: usize, max: usize| -> Result<u64, UpidError> {
            if v.len() < min || v.len() > max {
                return Err(err());
            }
            u64::from_str_radix(v, 16).map_err(|_| err())
        };
        if node.is_empty() || kind.is_empty() || user.is_empty() {
            return Err(err());
        }
        Ok(Self {
            raw: s.to_string(),
            node: node.to_string(),
            pid: u32::try_from(hex(pid, 8, 8)?).map_err(|_| err())?,
            pstart: hex(pstart, 8, 9)?,
            starttime: hex(starttime, 8, 8)?,
            kind: kind.to_string(),
            id: id.to_string(),
            user: user.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

impl fmt::Display for Upid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_clone_upid_with_token_user() {
        let s = "UPID:pve1:0001A2B7:0254A1C3:6745ABCD:qmclone:9000:root@pam!trellis:";
        let u = Upid::parse(s).unwrap();
        assert_eq!(u.node, "pve1");
        assert_eq!(u.pid, 0x0001_a2b7);
        assert_eq!(u.pstart, 0x0254_a1c3);
        assert_eq!(u.starttime, 0x6745_abcd);
        assert_eq!(u.kind, "qmclone");
        assert_eq!(u.id, "9000");
        assert_eq!(u.user, "root@pam!trellis");
        assert_eq!(u.as_str(), s);
    }

    #[test]
    fn nine_digit_pstart_and_empty_id() {
        let u = Upid::parse("UPID:n:00000001:1A2B3C4D5:6745ABCD:vzdump::root@pam:").unwrap();
        assert_eq!(u.pstart, 0x1_a2b3_c4d5);
        assert_eq!(u.id, "");
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "UPID:",
            "pve1:0001A2B7:0254A1C3:6745ABCD:qmclone:9000:root@pam:",
            "UPID:pve1:0001A2B7:0254A1C3:6745ABCD:qmclone:9000:root@pam", // no trailing colon
            "UPID:pve1:XYZ:0254A1C3:6745ABCD:qmclone:9000:root@pam:",
            "UPID:pve1:0001A2B7:0254A1C3:6745ABCD:qmclone:9000:",
            "UPID:pve1:0001A2B7:0254A1C3:6745ABCD",
        ] {
            assert!(Upid::parse(s).is_err(), "{s:?}");
        }
    }
}
