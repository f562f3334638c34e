//! The supervisor's one error type.
//!
//! Variants are grouped by what the caller should do: `Frame`, `Codec` and `Handshake` errors end
//! one connection and leave the agent running; `Io` and `Storage` are environmental; `Config`
//! errors stop a command before it changes anything. [`SupervisorError::is_retryable`] tells the
//! transient ones apart.

use std::path::PathBuf;

/// Why a supervisor operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A frame announced more bytes than the configured maximum; nothing was allocated for it.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Length the peer announced.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A frame spoke a protocol version this node does not know.
    #[error("frame version {0} is not supported (this node speaks {min}..={max}): the peer is a gobelins agent of a build whose protocol does not overlap this one's (upgrade the older node), or no gobelins agent", min = crate::frame::MIN_VERSION, max = crate::frame::VERSION)]
    UnsupportedVersion(u8),
    /// A frame was empty: no version byte.
    #[error("empty frame: a frame begins with its protocol version; the peer is no gobelins agent, or what it sends was cut or corrupted on the way")]
    EmptyFrame,
    /// The payload could not be decoded or encoded.
    #[error("codec: {0}")]
    Codec(String),
    /// The peer failed the handshake; the connection was closed.
    #[error("handshake with {peer}: {reason}")]
    Handshake {
        /// Address or node of the peer.
        peer: String,
        /// What was wrong, in words an operator can act on.
        reason: String,
    },
    /// The peer proved it holds another secret than this node's: another cluster's, or
    /// another key of this cluster. The dialer finds it out, as the peer proves itself first.
    #[error("handshake with {peer}: {reason}")]
    SecretDiffers {
        /// Address or node of the peer.
        peer: String,
        /// What was wrong, in words an operator can act on.
        reason: String,
    },
    /// The local agent read nothing back over its control socket for this long: stopped,
    /// hung or overloaded.
    #[error("the agent at {path} answered nothing for {after_s} s: it may be stopped (`ps -o stat= -p PID` shows T; `kill -CONT PID` resumes it), hung, overloaded, or serving as many control connections as it takes at once (64: its log says so, and `ss -xp | grep control.sock` names the processes that hold them); its log says what it does. This command gave up; should the agent resume, it does not carry out a request whose client went away, unless it had begun it")]
    AgentSilent {
        /// The control socket.
        path: String,
        /// How long nothing came.
        after_s: u64,
    },
    /// The local agent closed its control connection without an answer: it stopped, or its
    /// node left the cluster, as the request came.
    #[error("the agent at {path} closed the connection {} (it stopped, or its node left the cluster)", if *.taken { "before it answered: the request may or may not have been carried out. Check (`gobelins status`, or read back what was written) before asking again through a running agent" } else { "before it took the request: nothing was done. Ask again through a running agent (`gobelins status` on another node lists them)" })]
    AgentGone {
        /// The control socket.
        path: String,
        /// Whether the whole request was sent before the connection closed.
        taken: bool,
    },
    /// The peer did not answer in time.
    #[error("{what} timed out after {after_ms} ms")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        after_ms: u64,
    },
    /// No connection to the node could be made or kept.
    #[error("node {0} is unreachable")]
    Unreachable(u64),
    /// The connection closed while a request was in flight.
    #[error("connection closed")]
    Closed,
    /// Too much waits for the peer: it is stuck, or reads too slowly or not at all while it
    /// goes on sending requests.
    #[error("{bytes} bytes wait for the peer, which reads too slowly or not at all (stuck, or not reading what it asked for); closing the connection, whose callers retry on a new one")]
    Unread {
        /// Bytes queued.
        bytes: usize,
    },
    /// Reading or writing a socket or file failed.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error: said in the message, and not given as its source as well,
        /// which made a report of the whole chain say it twice ("No such file or directory
        /// (os error 2): No such file or directory (os error 2)").
        cause: std::io::Error,
    },
    /// The embedded store failed.
    #[error("storage: {0}")]
    Storage(String),
    /// The data directory or command line asks for something impossible.
    #[error("{0}")]
    Config(String),
    /// The data directory already holds a cluster.
    #[error(
        "{} already holds cluster {cluster}: to restart this node, start the agent without \
         --bootstrap (a unit that restarts it must not pass --bootstrap). Only for a second, \
         separate cluster: an empty --data-dir",
        dir.display()
    )]
    AlreadyBootstrapped {
        /// The data directory.
        dir: PathBuf,
        /// The cluster it belongs to.
        cluster: String,
    },
    /// Consensus refused or failed an operation.
    #[error("consensus: {0}")]
    Raft(String),
    /// The peer stopped on a fatal error (its message says which), and answers every request
    /// so until it is restarted.
    #[error("{0}; the cluster declares it failed, and elects another leader if it led")]
    PeerStopped(String),
    /// The cluster refused a configuration change.
    #[error("refused: {0}")]
    Refused(String),
    /// What an agent answered on its control socket when a command failed, as it said it: a
    /// timeout or an unknown service is no refusal.
    #[error("{0}")]
    Agent(String),
}

impl SupervisorError {
    /// Whether trying again later may succeed without changing anything.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SupervisorError::Timeout { .. }
                | SupervisorError::Unreachable(_)
                | SupervisorError::Closed
                | SupervisorError::Unread { .. }
                | SupervisorError::Raft(_)
        )
    }

    /// Whether this is the peer closing or dying under an open connection (a reset, a broken
    /// pipe, the stream ending), not a fault on this side: the failure detector says so if the
    /// peer stays away, and a new connection is dialed if it is back.
    pub fn is_peer_gone(&self) -> bool {
        use std::io::ErrorKind::*;
        matches!(
            self,
            SupervisorError::Io { cause, .. }
                if matches!(cause.kind(), ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof)
        )
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, cause: std::io::Error) -> Self {
        SupervisorError::Io { context: context.into(), cause }
    }
}

impl From<gobelins_adaptation::AdaptationError> for SupervisorError {
    fn from(error: gobelins_adaptation::AdaptationError) -> Self {
        match error {
            gobelins_adaptation::AdaptationError::Codec(message) => SupervisorError::Codec(message),
            other => SupervisorError::Raft(other.to_string()),
        }
    }
}

impl From<std::io::Error> for SupervisorError {
    fn from(source: std::io::Error) -> Self {
        SupervisorError::io("socket", source)
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = SupervisorError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Reported with its chain (`{:#}`, as `gobelins` prints its errors), an I/O error says its
    /// cause once.
    #[test]
    fn an_io_error_says_its_cause_once() {
        let error = SupervisorError::io(
            "connecting to the agent",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        let mut said = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            said.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        let cause = std::io::Error::from(std::io::ErrorKind::NotFound).to_string();
        assert_eq!(said.matches(&cause).count(), 1, "{said}");
    }
}
