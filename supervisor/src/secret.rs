//! The cluster's identity and shared secret, created once by `--bootstrap` and copied by the
//! operator to every node that joins.

use crate::error::{Result, SupervisorError};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

const HEADER: &str = "gobelins-cluster-v1";

/// A cluster's id: random, so two clusters never mistake each other's nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClusterId(pub [u8; 16]);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// The cluster id and the key every member proves it holds.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret {
    /// Which cluster.
    pub cluster: ClusterId,
    /// 256-bit key for HMAC-SHA256 proofs.
    pub key: [u8; 32],
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key never reaches a log.
        write!(f, "ClusterSecret({}, key hidden)", self.cluster)
    }
}

impl ClusterSecret {
    /// A new cluster with a fresh id and key from the OS's random source.
    pub fn generate() -> Self {
        // ThreadRng is a CSPRNG seeded from the OS.
        let mut rng = rand::rng();
        let mut cluster = [0u8; 16];
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut cluster);
        rng.fill_bytes(&mut key);
        ClusterSecret { cluster: ClusterId(cluster), key }
    }

    /// The file's text: one line, `gobelins-cluster-v1 <id> <key>` in hex.
    pub fn to_text(&self) -> String {
        format!("{HEADER} {} {}\n", self.cluster, hex::encode(self.key))
    }

    /// Parses what [`ClusterSecret::to_text`] wrote.
    pub fn from_text(text: &str) -> Result<Self> {
        let bad = || {
            SupervisorError::Config(
                "secret file is not a gobelins cluster secret (expected `gobelins-cluster-v1 <id> \
                 <key>`); copy it unchanged from the bootstrap node's data directory"
                    .into(),
            )
        };
        let mut parts = text.split_whitespace();
        if parts.next() != Some(HEADER) {
            return Err(bad());
        }
        let cluster = parts.next().and_then(|h| hex::decode(h).ok()).ok_or_else(bad)?;
        let key = parts.next().and_then(|h| hex::decode(h).ok()).ok_or_else(bad)?;
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(ClusterSecret {
            cluster: ClusterId(cluster.try_into().map_err(|_| bad())?),
            key: key.try_into().map_err(|_| bad())?,
        })
    }

    /// Reads a secret file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let what = if e.kind() == std::io::ErrorKind::InvalidData {
                format!(
                    "reading secret file {} (not text: is it the cluster.secret of the \
                     bootstrap node's data directory?)",
                    path.display()
                )
            } else {
                format!("reading secret file {}", path.display())
            };
            SupervisorError::io(what, e)
        })?;
        let text_of = |error: SupervisorError| match error {
            SupervisorError::Config(why) => {
                SupervisorError::Config(format!("{}: {why}", path.display()))
            }
            other => other,
        };
        if let Some(mode) = exposed(path) {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{mode:o}"),
                "the cluster secret file can be read by other users: whoever reads it can join the cluster, and serve or read its data. `chmod 600` it (the agent keeps its own copy in its data directory, readable by its user only)"
            );
        }
        Self::from_text(&text).map_err(text_of)
    }

    /// Writes a secret file readable by its owner only, once: an existing file is never
    /// replaced. The file appears whole or not at all (written aside, then linked into place),
    /// so that a crash while writing cannot leave a truncated secret behind.
    pub fn save(&self, path: &Path) -> Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let aside = path.with_extension("new");
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let written = (|| {
            // A file left by a crash while writing holds nothing anyone relies on.
            let _ = std::fs::remove_file(&aside);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&aside)?;
            file.write_all(self.to_text().as_bytes())?;
            file.sync_all()?;
            // Unlike a rename, a link fails on an existing file.
            std::fs::hard_link(&aside, path)?;
            std::fs::remove_file(&aside)?;
            crate::datadir::sync_dir(dir)
        })();
        if written.is_err() {
            // Left behind, half a secret said nothing and misled whoever looked (a full disk).
            let _ = std::fs::remove_file(&aside);
        }
        written.map_err(|e| {
            SupervisorError::io(
                format!(
                    "writing {} (is the disk full or read-only? free space, then start the \
                     agent again with the same command line)",
                    path.display()
                ),
                e,
            )
        })
    }
}

/// The mode of the file at `path` when users other than its owner may read it.
fn exposed(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o044 != 0).then_some(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_written_once_whole_and_private_whatever_a_crash_left() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.secret");
        // A crash while writing an earlier attempt left half a file aside.
        std::fs::write(dir.path().join("cluster.new"), b"half").unwrap();
        let secret = ClusterSecret::generate();
        secret.save(&path).unwrap();
        assert_eq!(ClusterSecret::load(&path).unwrap(), secret);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(exposed(&path), None);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "nothing left aside");
        // Never replaced.
        assert!(ClusterSecret::generate().save(&path).is_err());
        assert_eq!(ClusterSecret::load(&path).unwrap(), secret);
    }

    #[test]
    fn a_secret_file_others_may_read_is_named() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copied.secret");
        std::fs::write(&path, ClusterSecret::generate().to_text()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(exposed(&path), Some(0o644));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(exposed(&path), Some(0o640), "its group");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(exposed(&path), None);
    }

    #[test]
    fn a_secret_file_that_is_no_secret_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.secret");
        std::fs::write(&path, "gobelins-cluster-v1 half").unwrap();
        let said = ClusterSecret::load(&path).unwrap_err().to_string();
        assert!(said.contains(&path.display().to_string()), "{said}");
        assert!(said.contains("is not a gobelins cluster secret"), "{said}");
    }

    #[test]
    fn a_secret_survives_its_file_format() {
        let secret = ClusterSecret::generate();
        assert_eq!(ClusterSecret::from_text(&secret.to_text()).unwrap(), secret);
        assert_ne!(ClusterSecret::generate().key, secret.key);
    }

    #[test]
    fn a_mangled_secret_file_is_refused_with_advice() {
        let text = ClusterSecret::generate().to_text();
        for bad in [&text[1..], &text[..text.len() - 3], "", "gobelins-cluster-v1 zz zz"] {
            let err = ClusterSecret::from_text(bad).unwrap_err().to_string();
            assert!(err.contains("copy it unchanged"), "{err}");
        }
    }

    #[test]
    fn debug_output_hides_the_key() {
        let secret = ClusterSecret::generate();
        assert!(!format!("{secret:?}").contains(&hex::encode(secret.key)));
    }
}
