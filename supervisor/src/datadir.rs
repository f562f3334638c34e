//! What an agent keeps in its data directory.
//!
//! ```text
//! <data-dir>/            mode 0700
//!   cluster.secret       cluster id and key (0600), from --bootstrap or --secret-file
//!   node.id              this node's id
//!   incarnation          this node's current life; raised when it rejoins after a failure
//!   unadmitted           present until a cluster first admits this directory's node
//!   bootstrapping        present while this directory's node bootstraps a cluster
//!   older-copy           present from when this directory was found an older copy of its
//!                        node's until the cluster admits the node again
//!   raft.redb            raft log, vote and snapshots, each value checksummed; the
//!                        cluster and node it is of
//!   control.sock         the CLI's Unix socket (0600)
//! ```

use crate::error::{Result, SupervisorError};
use crate::secret::ClusterSecret;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// An agent's data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

/// What to say of `root`, owned by `owner`, for an agent running as `me`: `None` when it is
/// its own.
fn another_owner(root: &Path, owner: u32, me: u32) -> Option<String> {
    (owner != me).then(|| {
        format!(
            "data directory {} belongs to user {owner}, and this agent runs as user {me}: that \
             user can replace what the agent keeps there (its cluster secret, raft log and \
             control socket). Unless the filesystem reports another owner for every file \
             (NFS with root_squash, a uid= mount, a user namespace), run the agent as user \
             {owner}, or give it a directory of its own (`sudo chown {me} {}`)",
            root.display(),
            root.display()
        )
    })
}

/// What an operator can do when `root` cannot be made this agent's private directory: the
/// bare error ("File exists", "Permission denied") named no way out (a helper's black-box run).
fn preparing_advice(root: &Path, kind: std::io::ErrorKind) -> String {
    use std::io::ErrorKind::{AlreadyExists, NotADirectory, PermissionDenied, ReadOnlyFilesystem};
    let root = root.display();
    match kind {
        AlreadyExists | NotADirectory => " (a file is in the way of that directory: give \
                                           --data-dir the path of a directory, or of one to \
                                           create)"
            .to_string(),
        PermissionDenied => format!(
            " (this user may not create it, or may not make it private, not owning it: give \
             --data-dir a path this user may write, or make it theirs first, `sudo install -d \
             -o \"$(id -un)\" -m 700 {root}`)"
        ),
        ReadOnlyFilesystem => " (its filesystem is mounted read-only: give --data-dir a path \
                                on a writable one)"
            .to_string(),
        _ => String::new(),
    }
}

impl DataDir {
    /// Opens `root`, creating it private to its user if missing. Warns of a directory another
    /// user owns: made private to them, they can still replace what it keeps (the secret, the
    /// raft log, the control socket the CLI talks to). A warning, not a refusal: some
    /// filesystems report another owner for what the agent itself made.
    pub fn open(root: &Path) -> Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let preparing = |e: std::io::Error| {
            let advice = preparing_advice(root, e.kind());
            SupervisorError::io(format!("preparing data directory {}{advice}", root.display()), e)
        };
        // Made private as it is made, not after: with a loose umask another user could put
        // files in it meanwhile (a secret of their choosing, say).
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(root).map_err(preparing)?;
        let owner = std::fs::metadata(root).map_err(preparing)?.uid();
        // The process's effective user owns its `/proc/self` (Linux; without `/proc`, no
        // warning).
        let me = std::fs::metadata("/proc/self").map(|m| m.uid());
        if let Some(warning) = me.ok().and_then(|me| another_owner(root, owner, me)) {
            tracing::warn!("{warning}");
        }
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(preparing)?;
        Ok(DataDir { root: root.to_path_buf() })
    }

    /// Takes the directory's lock (`flock` on the directory itself) for as long as the file
    /// returned is open: a second agent started on it at the same moment is refused before
    /// it writes anything. Held until the raft store's own lock is taken: two agents started
    /// together on a fresh directory each wrote their node id, and one ran as a node whose id
    /// the other then replaced, which no restart could bring back.
    pub fn lock(&self) -> Result<std::fs::File> {
        let opening =
            |e| SupervisorError::io(format!("opening data directory {}", self.root.display()), e);
        let file = std::fs::File::open(&self.root).map_err(opening)?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => Err(SupervisorError::Config(format!(
                "another agent is starting with --data-dir {}: stop it first, or give this one \
                 another --data-dir",
                self.root.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(opening(e)),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Path of the secret file.
    pub fn secret_path(&self) -> PathBuf {
        self.root.join("cluster.secret")
    }

    /// Path of the raft store.
    pub fn store_path(&self) -> PathBuf {
        self.root.join("raft.redb")
    }

    /// Path of the control socket.
    pub fn socket_path(&self) -> PathBuf {
        self.root.join("control.sock")
    }

    /// The cluster secret, if this directory belongs to a cluster.
    pub fn secret(&self) -> Result<Option<ClusterSecret>> {
        let path = self.secret_path();
        if !path.exists() {
            return Ok(None);
        }
        ClusterSecret::load(&path).map(Some)
    }

    /// Stores the secret (once).
    pub fn save_secret(&self, secret: &ClusterSecret) -> Result<()> {
        secret.save(&self.secret_path())
    }

    fn read_number(&self, name: &str) -> Result<Option<u64>> {
        let path = self.root.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map(Some).map_err(|_| {
                // Written whole by a rename: damaged, or edited by hand.
                SupervisorError::Config(format!(
                    "{} does not hold a number: the data directory is damaged or was edited. \
                     Put back what it held (a number on one line) if you know it; otherwise \
                     move this data directory aside and start the agent on an empty one with \
                     --join ADDR and the cluster's --secret-file: it joins as a new node",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SupervisorError::io(format!("reading {}", path.display()), e)),
        }
    }

    fn write_number(&self, name: &str, value: u64) -> Result<()> {
        // Write then rename, so that a crash leaves the old or the new number, never half.
        let path = self.root.join(name);
        let temporary = self.root.join(format!("{name}.new"));
        let written = std::fs::write(&temporary, format!("{value}\n"))
            .and_then(|()| std::fs::File::open(&temporary)?.sync_all())
            .and_then(|()| std::fs::rename(&temporary, &path));
        if written.is_err() {
            // Left behind, an empty `.new` said nothing and misled whoever looked (a full disk).
            let _ = std::fs::remove_file(&temporary);
        }
        written.and_then(|()| sync_dir(&self.root)).map_err(|e| {
            SupervisorError::io(
                format!(
                    "writing {} (is the disk full or read-only? free space, then start the agent \
                     again with the same --data-dir)",
                    path.display()
                ),
                e,
            )
        })
    }

    /// This node's id, if set.
    pub fn node_id(&self) -> Result<Option<u64>> {
        self.read_number("node.id")
    }

    /// Records this node's id.
    pub fn save_node_id(&self, id: u64) -> Result<()> {
        self.write_number("node.id", id)
    }

    /// This node's incarnation, if set.
    pub fn incarnation(&self) -> Result<Option<u64>> {
        self.read_number("incarnation")
    }

    /// Records this node's incarnation.
    pub fn save_incarnation(&self, incarnation: u64) -> Result<()> {
        self.write_number("incarnation", incarnation)
    }

    /// Marks the directory as never admitted to a cluster: written at its first start, before
    /// the incarnation, and kept through restarts until the node is first admitted. Such a
    /// node grants no raft vote, for its raft store may be a wiped voter's.
    pub fn mark_unadmitted(&self) -> Result<()> {
        self.write_number(UNADMITTED, 1)
    }

    /// Whether the directory's node was never admitted to a cluster (see
    /// [`DataDir::mark_unadmitted`]). A directory older than the mark counts as admitted.
    pub fn unadmitted(&self) -> Result<bool> {
        Ok(self.read_number(UNADMITTED)?.is_some())
    }

    /// Marks the directory as an older copy of its node's (restored from a backup, say): a
    /// later life of the node ran on a newer one, and voted and acknowledged entries this raft
    /// store does not hold. Kept through restarts until the cluster admits the node again, so
    /// that no start grants a raft vote on that store before it has caught up.
    pub fn mark_older_copy(&self) -> Result<()> {
        self.write_number(OLDER_COPY, 1)
    }

    /// Whether the directory was found an older copy (see [`DataDir::mark_older_copy`]) and its
    /// node not admitted since.
    pub fn older_copy(&self) -> Result<bool> {
        Ok(self.read_number(OLDER_COPY)?.is_some())
    }

    /// Removes the marks a node keeps until it is admitted ([`DataDir::mark_unadmitted`],
    /// [`DataDir::mark_older_copy`]): it was.
    pub fn clear_until_admitted(&self) -> Result<()> {
        self.remove(UNADMITTED)?;
        self.remove(OLDER_COPY)
    }

    /// Marks the directory's node as bootstrapping a cluster: written before the secret is
    /// kept, removed once the node is the cluster's first member. A directory that holds the
    /// secret and this mark stopped in its bootstrap, perhaps before raft kept anything, and
    /// its next start finishes the bootstrap (a joiner's directory may hold the secret and an
    /// empty raft store too, and must not start a cluster of its own).
    pub fn mark_bootstrapping(&self) -> Result<()> {
        self.write_number(BOOTSTRAPPING, 1)
    }

    /// Whether the directory's node stopped in its bootstrap (see
    /// [`DataDir::mark_bootstrapping`]).
    pub fn bootstrapping(&self) -> Result<bool> {
        Ok(self.read_number(BOOTSTRAPPING)?.is_some())
    }

    /// Removes the mark: the bootstrap is done.
    pub fn clear_bootstrapping(&self) -> Result<()> {
        self.remove(BOOTSTRAPPING)
    }

    /// Records that life `incarnation` of this node ended as left though the cluster counts it
    /// failed: it was leaving when it stopped, or was declared failed. The cluster's record
    /// then says only "failed", and a later start, its own log showing that end, would rejoin.
    pub fn mark_left(&self, incarnation: u64) -> Result<()> {
        self.write_number(ENDED_LEFT, incarnation)
    }

    /// The life [`DataDir::mark_left`] recorded, if any.
    pub fn ended_left(&self) -> Result<Option<u64>> {
        self.read_number(ENDED_LEFT)
    }

    /// Removes the file `name`, durably; one already gone is fine.
    fn remove(&self, name: &str) -> Result<()> {
        let path = self.root.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.root),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
        .map_err(|e| SupervisorError::io(format!("removing {}", path.display()), e))
    }
}

const UNADMITTED: &str = "unadmitted";
const BOOTSTRAPPING: &str = "bootstrapping";
const OLDER_COPY: &str = "older-copy";
const ENDED_LEFT: &str = "ended-left";

/// Makes the names created or renamed in `dir` durable: without it, a power cut after a rename
/// can bring the old file back (an incarnation already used, say).
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A helper's black-box run: `--data-dir` naming a file said only "File exists".
    #[test]
    fn a_file_in_the_way_of_the_data_directory_is_refused_with_the_way_out() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("afile");
        std::fs::write(&file, b"not a directory").unwrap();
        for path in [file.clone(), file.join("below")] {
            let Err(refused) = DataDir::open(&path) else { panic!("{path:?} opened") };
            let refused = refused.to_string();
            assert!(refused.contains("give --data-dir the path of a directory"), "{refused}");
        }
    }

    #[test]
    fn a_directory_locked_by_one_start_refuses_another_until_it_is_let_go() {
        let root = tempfile::tempdir().unwrap();
        let dir = DataDir::open(root.path()).unwrap();
        let held = dir.lock().expect("the first start takes the lock");
        let refused = DataDir::open(root.path()).unwrap().lock().unwrap_err().to_string();
        assert!(refused.contains("another agent is starting"), "{refused}");
        drop(held);
        assert!(dir.lock().is_ok(), "let go with its file");
    }

    #[test]
    fn a_directory_of_another_user_is_warned_of_saying_whose_and_what_to_do() {
        let path = Path::new("/srv/g1");
        assert_eq!(another_owner(path, 1000, 1000), None);
        let warning = another_owner(path, 1000, 0).expect("a warning");
        assert!(warning.contains("belongs to user 1000"), "{warning}");
        assert!(warning.contains("runs as user 0"), "{warning}");
        assert!(warning.contains("sudo chown 0 /srv/g1"), "{warning}");
        // The directory this process makes is its own.
        let root = tempfile::tempdir().unwrap();
        assert!(DataDir::open(&root.path().join("made")).is_ok());
    }

    /// A number that cannot be written says what to check and leaves no `.new` file behind.
    #[test]
    fn a_number_that_cannot_be_written_leaves_nothing_behind_and_says_what_to_check() {
        let root = tempfile::tempdir().unwrap();
        let dir = DataDir::open(root.path()).unwrap();
        dir.save_incarnation(3).unwrap();
        assert_eq!(dir.incarnation().unwrap(), Some(3));
        // A rename onto a directory that holds something fails, as a full disk's write does.
        std::fs::remove_file(root.path().join("incarnation")).unwrap();
        std::fs::create_dir_all(root.path().join("incarnation").join("in-the-way")).unwrap();
        let error = dir.save_incarnation(4).expect_err("cannot replace a directory").to_string();
        assert!(error.contains("is the disk full"), "{error}");
        assert!(!root.path().join("incarnation.new").exists(), "the temporary file is gone");
    }

    #[test]
    fn the_marks_kept_until_admitted_stay_through_restarts_and_go_together() {
        let root = tempfile::tempdir().unwrap();
        let dir = DataDir::open(root.path()).unwrap();
        assert!(!dir.older_copy().unwrap() && !dir.unadmitted().unwrap());
        dir.mark_older_copy().unwrap();
        dir.mark_unadmitted().unwrap();
        drop(dir);
        let again = DataDir::open(root.path()).unwrap();
        assert!(again.older_copy().unwrap(), "kept for the next start");
        again.clear_until_admitted().unwrap();
        assert!(!again.older_copy().unwrap() && !again.unadmitted().unwrap());
        again.clear_until_admitted().expect("cleared twice: nothing to remove");
    }

    /// A number file that holds something else says what to do, not only what is wrong; and
    /// the directory is made private as it is made, whatever the umask.
    #[test]
    fn a_garbled_number_says_how_to_come_back() {
        use std::os::unix::fs::PermissionsExt as _;
        let root = tempfile::tempdir().unwrap();
        let dir = DataDir::open(&root.path().join("a").join("b")).unwrap();
        // The parent it made too: made private as it was made, not after.
        let mode = std::fs::metadata(root.path().join("a")).unwrap().permissions();
        assert_eq!(mode.mode() & 0o777, 0o700);
        std::fs::write(root.path().join("a").join("b").join("node.id"), "x7\n").unwrap();
        let said = dir.node_id().expect_err("no number").to_string();
        assert!(said.contains("does not hold a number") && said.contains("--join ADDR"), "{said}");
    }
}
