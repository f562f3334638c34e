//! The first frames of every connection: both ends prove they hold the cluster secret.
//!
//! ```text
//! initiator                                     acceptor
//!    ── Hello{magic, versions, cluster, node, incarnation, addr, nonce, to} ──▶  check magic/
//!                                                  version/cluster; refuse our own id, or a
//!                                                  `to` naming another node
//!    ◀── Welcome{Hello, proof = HMAC(key, "acceptor" | hello_i | hello_a)} ──
//!  verify                                                             
//!    ── Proof(HMAC(key, "initiator" | hello_i | hello_a)) ──▶  verify
//! ```
//!
//! Nonces from both ends go into both proofs, so a recorded handshake cannot be replayed. Either
//! end sends `Refused(reason)` before closing, so the other can log what to fix.

use crate::error::{Result, SupervisorError};
use crate::frame::{FrameCodec, MIN_VERSION, VERSION};
use crate::secret::{ClusterId, ClusterSecret};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use gobelins_adaptation::codec;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

/// First bytes of every Hello: tells a gobelins peer from anything else on the port.
pub const MAGIC: [u8; 8] = *b"GOBELINS";

/// What a node says about itself when it connects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`].
    pub magic: [u8; 8],
    /// Oldest protocol version the sender reads.
    pub min_version: u8,
    /// Newest protocol version the sender reads.
    pub max_version: u8,
    /// The cluster the sender belongs to.
    pub cluster: ClusterId,
    /// The sender's node id.
    pub node: u64,
    /// How many times the sender has (re)joined; a fenced node comes back with a higher one.
    pub incarnation: u64,
    /// Where the sender listens, so the acceptor can dial back.
    pub addr: String,
    /// Fresh random bytes, bound into both proofs.
    pub nonce: [u8; 32],
    /// From a dialer, the node it means to reach, when it knows it (`None` for an address
    /// alone, a seed's). Bound into both proofs with the rest: a relay that hands this Hello to
    /// another node of the cluster gets it refused there, where that node, proving itself,
    /// had the dialer prove the secret to it, and admitted the relay as the dialer.
    pub to: Option<u64>,
}

impl Hello {
    /// This node's Hello, with a fresh nonce.
    pub fn new(cluster: ClusterId, node: u64, incarnation: u64, addr: String) -> Self {
        let mut nonce = [0u8; 32];
        rand::rng().fill_bytes(&mut nonce);
        Hello {
            magic: MAGIC,
            min_version: MIN_VERSION,
            max_version: VERSION,
            cluster,
            node,
            incarnation,
            addr,
            nonce,
            to: None,
        }
    }
}

/// The handshake's messages.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum HandshakeMessage {
    /// The initiator introduces itself.
    Hello(Hello),
    /// The acceptor introduces itself and proves it holds the key.
    Welcome {
        /// The acceptor's Hello.
        hello: Hello,
        /// HMAC over both Hellos.
        proof: [u8; 32],
    },
    /// The initiator proves it holds the key.
    Proof([u8; 32]),
    /// The acceptor admits the initiator, which has proved itself.
    Admitted,
    /// The sender gives up, and says why.
    Refused(String),
    /// The sender gives up because the other side holds another secret (another cluster's, or
    /// another key), and says so: a restarted node that every member tells this stops.
    RefusedSecret(String),
}

/// Checks that a peer's Hello is for our cluster and speaks a version we read.
pub fn check_hello(ours: ClusterId, theirs: &Hello) -> std::result::Result<(), String> {
    if theirs.magic != MAGIC {
        return Err("not a gobelins peer (bad magic)".into());
    }
    if theirs.max_version < MIN_VERSION || theirs.min_version > VERSION {
        return Err(format!(
            "protocol versions {}..={} do not overlap ours {MIN_VERSION}..={VERSION}; upgrade the older node",
            theirs.min_version, theirs.max_version
        ));
    }
    if theirs.cluster != ours {
        return Err(format!(
            "peer belongs to cluster {}, this node to {ours}; check --secret-file",
            theirs.cluster
        ));
    }
    Ok(())
}

type HmacSha256 = Hmac<Sha256>;

fn mac(
    secret: &ClusterSecret,
    role: &[u8],
    initiator: &Hello,
    acceptor: &Hello,
) -> Result<HmacSha256> {
    let mut mac = HmacSha256::new_from_slice(&secret.key)
        .map_err(|e| SupervisorError::Config(format!("cluster key: {e}")))?;
    mac.update(role);
    mac.update(&codec::encode(initiator)?);
    mac.update(&codec::encode(acceptor)?);
    Ok(mac)
}

/// The proof that the sender in `role` holds the key, bound to both Hellos.
pub fn proof(
    secret: &ClusterSecret,
    role: &[u8],
    initiator: &Hello,
    acceptor: &Hello,
) -> Result<[u8; 32]> {
    Ok(mac(secret, role, initiator, acceptor)?.finalize().into_bytes().into())
}

/// Checks a proof in constant time.
pub fn verify(
    secret: &ClusterSecret,
    role: &[u8],
    initiator: &Hello,
    acceptor: &Hello,
    proof: &[u8; 32],
) -> Result<bool> {
    Ok(mac(secret, role, initiator, acceptor)?.verify_slice(proof).is_ok())
}

const INITIATOR: &[u8] = b"gobelins initiator";
const ACCEPTOR: &[u8] = b"gobelins acceptor";

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, FrameCodec>,
    message: &HandshakeMessage,
) -> Result<()> {
    framed.send(Bytes::from(codec::encode(message)?)).await
}

/// The next handshake message from `peer`, which this node dialed (`dialed`) or which dialed
/// it.
async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, FrameCodec>,
    peer: &str,
    dialed: bool,
) -> Result<HandshakeMessage> {
    // Not a refusal, which says so before it closes: a busy peer (at its limit of handshakes)
    // closes without a word, and asking again later may get in. A node that dialed this one
    // and hung up is only gone.
    let why = if dialed {
        format!(
            "the peer closed the connection before the handshake ended (busy with other \
             handshakes, a gobelins build of another protocol than this one's {VERSION}, which \
             the peer's log then names, or not a gobelins agent)"
        )
    } else {
        "the peer closed the connection before the handshake ended (it gave up, or is not a \
         gobelins agent)"
            .to_string()
    };
    // What another program sends first (an SSH banner, say) reads as a huge frame: said as
    // what it is, not as a frame's size.
    let stranger = |what: String| SupervisorError::Handshake {
        peer: peer.into(),
        reason: format!(
            "not a gobelins agent: {what}. Is this the address a gobelins agent listens on \
             (its --listen or --advertise)?"
        ),
    };
    match framed.next().await {
        Some(Err(SupervisorError::FrameTooLarge { len, max })) => Err(stranger(format!(
            "its first bytes announce a message of {len} bytes, where a handshake's is at most {max}"
        ))),
        // A frame of a handshake's size that is no handshake message: random bytes, another
        // program, or a build whose messages differ. The decoder's own words ("invalid value:
        // integer `155`, expected variant index") said none of that.
        Some(frame) => codec::decode(&frame?).map_err(|e| SupervisorError::Handshake {
            peer: peer.into(),
            reason: format!(
                "it sent a message that is no handshake this build reads ({e}): not a gobelins \
                 agent, or a build of another protocol (this one speaks protocol {})",
                crate::frame::VERSION
            ),
        }),
        None => Err(SupervisorError::io(
            format!("handshake with {peer}"),
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, why),
        )),
    }
}

/// What a refused peer is told: enough to fix its own configuration, nothing about ours (a
/// stranger must not learn our cluster id).
const TOLD: &str =
    "not admitted: this node belongs to another cluster or the secret differs; check --secret-file";

/// What a connecting node tells the node it dialed whose Hello or proof it refused: the
/// fault is likelier the dialer's (a joiner given another cluster's secret file).
const TOLD_BY_DIALER: &str = "the node that connected holds another cluster's secret (or a changed one), and refused this node's proof; check the secret file it was given";

async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, FrameCodec>,
    peer: &str,
    reason: String,
    secret: bool,
) -> SupervisorError {
    // A Hello refused for its versions or its magic says nothing of a secret: the dialer is
    // told the reason itself (say, which node to upgrade).
    let told = match secret {
        true => HandshakeMessage::RefusedSecret(TOLD.into()),
        false => HandshakeMessage::Refused(reason.clone()),
    };
    // Best effort: the peer may already be gone, and the error we return matters more.
    let _ = send(framed, &told).await;
    SupervisorError::Handshake { peer: peer.into(), reason }
}

async fn refuse_telling<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, FrameCodec>,
    peer: &str,
    reason: String,
    told: &str,
) -> SupervisorError {
    // Best effort: the peer may already be gone, and the error we return matters more.
    let _ = send(framed, &HandshakeMessage::RefusedSecret(told.into())).await;
    SupervisorError::Handshake { peer: peer.into(), reason }
}

/// A refusal made because the peer holds another secret.
fn differs(error: SupervisorError) -> SupervisorError {
    match error {
        SupervisorError::Handshake { peer, reason } => {
            SupervisorError::SecretDiffers { peer, reason }
        }
        other => other,
    }
}

fn refused_by_peer(peer: &str, reason: String) -> SupervisorError {
    SupervisorError::Handshake { peer: peer.into(), reason: format!("refused by peer: {reason}") }
}

fn unexpected(peer: &str, got: &HandshakeMessage) -> SupervisorError {
    let what = match got {
        HandshakeMessage::Hello(_) => "Hello",
        HandshakeMessage::Welcome { .. } => "Welcome",
        HandshakeMessage::Proof(_) => "Proof",
        HandshakeMessage::Admitted => "Admitted",
        HandshakeMessage::Refused(_) => "Refused",
        HandshakeMessage::RefusedSecret(_) => "RefusedSecret",
    };
    SupervisorError::Handshake { peer: peer.into(), reason: format!("unexpected {what} message at this step of the handshake: the peer is no gobelins agent of a build this one speaks with, or it replays messages of another connection") }
}

/// Whether a peer's Hello is this node's own: its id at its address. A relayed Hello is
/// relayed whole (the proofs cover both), so it keeps the address. Another process given this
/// node's id elsewhere goes on to the admission, which refuses it while the id is a live
/// member's, telling it to pick another.
fn is_ourselves(ours: &Hello, theirs: &Hello) -> bool {
    theirs.node == ours.node && theirs.addr == ours.addr
}

/// Why a peer that gives this node's own id at its address is refused, on either side.
fn ourselves(node: u64) -> String {
    format!(
        "the peer gives this node's own id ({node}): this node reached itself (a --join or a \
         member's address that leads back to this node's own --listen), or its connection was \
         relayed back to it; refused"
    )
}

/// Runs the initiator's side; returns the acceptor's Hello.
pub async fn initiate<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, FrameCodec>,
    secret: &ClusterSecret,
    ours: Hello,
    peer: &str,
    deadline: Duration,
) -> Result<Hello> {
    let run = async {
        send(framed, &HandshakeMessage::Hello(ours.clone())).await?;
        let (theirs, their_proof) = match receive(framed, peer, true).await? {
            HandshakeMessage::Welcome { hello, proof } => (hello, proof),
            HandshakeMessage::Refused(reason) => return Err(refused_by_peer(peer, reason)),
            HandshakeMessage::RefusedSecret(reason) => {
                return Err(differs(refused_by_peer(peer, reason)))
            }
            other => return Err(unexpected(peer, &other)),
        };
        if let Err(reason) = check_hello(secret.cluster, &theirs) {
            let another = theirs.magic == MAGIC && theirs.cluster != secret.cluster;
            let error = refuse_telling(framed, peer, reason, TOLD_BY_DIALER).await;
            return Err(if another { differs(error) } else { error });
        }
        if is_ourselves(&ours, &theirs) {
            // Not our proof: see `accept`.
            let reason = ourselves(ours.node);
            let _ = send(framed, &HandshakeMessage::Refused(reason.clone())).await;
            return Err(SupervisorError::Handshake { peer: peer.into(), reason });
        }
        if !verify(secret, ACCEPTOR, &ours, &theirs, &their_proof)? {
            let reason = "the peer's proof does not match our cluster secret: the secret files differ; check --secret-file (or this data directory's cluster.secret)".to_string();
            return Err(differs(refuse_telling(framed, peer, reason, TOLD_BY_DIALER).await));
        }
        send(framed, &HandshakeMessage::Proof(proof(secret, INITIATOR, &ours, &theirs)?)).await?;
        match receive(framed, peer, true).await? {
            HandshakeMessage::Admitted => Ok(theirs),
            HandshakeMessage::Refused(reason) => Err(refused_by_peer(peer, reason)),
            HandshakeMessage::RefusedSecret(reason) => Err(differs(refused_by_peer(peer, reason))),
            other => Err(unexpected(peer, &other)),
        }
    };
    with_deadline(run, peer, deadline).await
}

/// Runs the acceptor's side; returns the initiator's Hello. Once the initiator has proved it
/// holds the key, `admit` may still refuse it, with a reason the initiator is told in full.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, FrameCodec>,
    secret: &ClusterSecret,
    ours: Hello,
    peer: &str,
    deadline: Duration,
    admit: impl FnOnce(&Hello) -> std::result::Result<(), String>,
) -> Result<Hello> {
    let run = async {
        let theirs = match receive(framed, peer, false).await? {
            HandshakeMessage::Hello(hello) => hello,
            other => return Err(unexpected(peer, &other)),
        };
        // Named as it names itself from here on: on one host every dial comes from the same
        // address, and a refusal said only that, not which node to mend. As a claim until it
        // proves the secret: a stranger's hello may give a member's id and address, and a line
        // naming that member as refused sent its operator to mend a node with nothing wrong.
        let claimed = format!("{peer} (says it is node {} at {})", theirs.node, theirs.addr);
        let proved = format!("{peer} (node {} at {})", theirs.node, theirs.addr);
        let peer = claimed.as_str();
        if let Err(reason) = check_hello(secret.cluster, &theirs) {
            let another = theirs.magic == MAGIC && theirs.cluster != secret.cluster;
            return Err(refuse(framed, peer, reason, another).await);
        }
        if is_ourselves(&ours, &theirs) {
            // Before our Welcome: what it would prove is ours to ourselves. Relayed back to our
            // own dialing side, it made this node prove the secret to its own listener through
            // a peer that holds none, and that peer was then admitted as this node.
            return Err(refuse(framed, peer, ourselves(ours.node), false).await);
        }
        if let Some(to) = theirs.to.filter(|&to| to != ours.node) {
            let reason = format!(
                "this is node {}, not node {to}: the address the dialer holds for node {to} \
                 leads here (node {to} moved, or this node took its address), or a peer \
                 relayed the dialer's handshake; refused",
                ours.node
            );
            return Err(refuse(framed, peer, reason, false).await);
        }
        let welcome = HandshakeMessage::Welcome {
            proof: proof(secret, ACCEPTOR, &theirs, &ours)?,
            hello: ours.clone(),
        };
        send(framed, &welcome).await?;
        match receive(framed, peer, false).await? {
            HandshakeMessage::Proof(p) if verify(secret, INITIATOR, &theirs, &ours, &p)? => {
                let peer = proved.as_str();
                match admit(&theirs) {
                    Ok(()) => {
                        send(framed, &HandshakeMessage::Admitted).await?;
                        Ok(theirs)
                    }
                    Err(reason) => {
                        // Best effort, as in `refuse`; this peer proved it is one of ours, so it
                        // may know why.
                        let _ = send(framed, &HandshakeMessage::Refused(reason.clone())).await;
                        Err(SupervisorError::Handshake { peer: peer.into(), reason })
                    }
                }
            }
            HandshakeMessage::Proof(_) => Err(refuse(
                framed,
                peer,
                "wrong cluster secret: the peer could not prove it holds the key".into(),
                true,
            )
            .await),
            HandshakeMessage::Refused(reason) | HandshakeMessage::RefusedSecret(reason) => {
                Err(refused_by_peer(peer, reason))
            }
            other => Err(unexpected(peer, &other)),
        }
    };
    with_deadline(run, peer, deadline).await
}

async fn with_deadline<T>(
    run: impl std::future::Future<Output = Result<T>>,
    peer: &str,
    deadline: Duration,
) -> Result<T> {
    tokio::time::timeout(deadline, run).await.map_err(|_| SupervisorError::Timeout {
        what: format!("handshake with {peer}"),
        after_ms: deadline.as_millis() as u64,
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(
        initiator_secret: ClusterSecret,
        acceptor_secret: ClusterSecret,
    ) -> (Result<Hello>, Result<Hello>) {
        run_admitting(initiator_secret, acceptor_secret, Ok(())).await
    }

    /// Node 1 dials node 2, which answers `admitted` to a peer that proved the secret.
    async fn run_admitting(
        initiator_secret: ClusterSecret,
        acceptor_secret: ClusterSecret,
        admitted: std::result::Result<(), String>,
    ) -> (Result<Hello>, Result<Hello>) {
        let (a, b) = tokio::io::duplex(4096);
        let mut a = Framed::new(a, FrameCodec::default());
        let mut b = Framed::new(b, FrameCodec::default());
        let ours_a = Hello::new(initiator_secret.cluster, 1, 1, "127.0.0.1:1".into());
        let ours_b = Hello::new(acceptor_secret.cluster, 2, 1, "127.0.0.1:2".into());
        let deadline = Duration::from_secs(5);
        tokio::join!(
            initiate(&mut a, &initiator_secret, ours_a, "n2", deadline),
            accept(&mut b, &acceptor_secret, ours_b, "n1", deadline, |_| admitted)
        )
    }

    #[tokio::test]
    async fn peers_with_the_same_secret_learn_each_other() {
        let secret = ClusterSecret::generate();
        let (a, b) = run(secret.clone(), secret).await;
        assert_eq!(a.unwrap().node, 2);
        assert_eq!(b.unwrap().node, 1);
    }

    #[tokio::test]
    async fn a_wrong_key_is_refused_by_both_ends() {
        let right = ClusterSecret::generate();
        let wrong = ClusterSecret { cluster: right.cluster, key: [7; 32] };
        let (a, b) = run(wrong, right).await;
        let (a, b) = (a.unwrap_err(), b.unwrap_err());
        assert!(matches!(a, SupervisorError::SecretDiffers { .. }), "{a}");
        let (a, b) = (a.to_string(), b.to_string());
        assert!(a.contains("secret files differ"), "{a}");
        // The acceptor, dialed by a node with a changed key, is not told to check its own.
        assert!(b.contains("refused by peer: the node that connected holds"), "{b}");
        assert!(!b.contains("check --secret-file"), "{b}");
        // The acceptor names the node that connected, not only the address it came from: as
        // what it says it is, since it did not prove it.
        assert!(b.contains("n1 (says it is node 1 at 127.0.0.1:1)"), "{b}");
    }

    /// A peer that proved the secret is named as the node it is, in what `admit` refuses.
    #[tokio::test]
    async fn a_proved_peer_refused_at_admission_is_named_as_the_node_it_is() {
        let secret = ClusterSecret::generate();
        let (_, b) = run_admitting(secret.clone(), secret, Err("held out".into())).await;
        let b = b.unwrap_err().to_string();
        assert!(b.contains("n1 (node 1 at 127.0.0.1:1)") && b.contains("held out"), "{b}");
    }

    #[tokio::test]
    async fn another_cluster_is_refused_with_advice() {
        let (a, b) = run(ClusterSecret::generate(), ClusterSecret::generate()).await;
        let (a, b) = (a.unwrap_err(), b.unwrap_err());
        // The dialer hears that the secret differs, which a restarted node acts on.
        assert!(matches!(a, SupervisorError::SecretDiffers { .. }), "{a}");
        let (a, b) = (a.to_string(), b.to_string());
        assert!(b.contains("check --secret-file"), "{b}");
        assert!(a.contains("refused by peer"), "{a}");
    }

    /// A dialer of another protocol version is told which versions do not overlap, not that
    /// its secret differs.
    #[tokio::test]
    async fn a_dialer_of_another_protocol_version_is_told_so() {
        let secret = ClusterSecret::generate();
        let (a, b) = tokio::io::duplex(4096);
        let mut a = Framed::new(a, FrameCodec::default());
        let mut b = Framed::new(b, FrameCodec::default());
        let mut old = Hello::new(secret.cluster, 1, 1, "127.0.0.1:1".into());
        (old.min_version, old.max_version) = (MIN_VERSION - 1, MIN_VERSION - 1);
        let ours = Hello::new(secret.cluster, 2, 1, "127.0.0.1:2".into());
        let deadline = Duration::from_secs(5);
        let (a, b) = tokio::join!(
            initiate(&mut a, &secret, old, "n2", deadline),
            accept(&mut b, &secret, ours, "n1", deadline, |_| Ok(()))
        );
        let (a, b) = (a.unwrap_err(), b.unwrap_err());
        assert!(!matches!(a, SupervisorError::SecretDiffers { .. }), "{a}");
        let (a, b) = (a.to_string(), b.to_string());
        assert!(a.contains("do not overlap") && a.contains("upgrade the older node"), "{a}");
        assert!(!a.contains("secret"), "{a}");
        assert!(b.contains("do not overlap"), "{b}");
    }

    /// Another program that speaks first (an SSH banner) is said to be no gobelins agent, not
    /// a frame too large.
    #[tokio::test]
    async fn a_peer_that_speaks_another_protocol_is_said_to_be_no_gobelins_agent() {
        use tokio::io::AsyncWriteExt as _;
        let (a, mut b) = tokio::io::duplex(4096);
        let mut a = Framed::new(a, FrameCodec::new(crate::frame::HANDSHAKE_MAX_FRAME));
        b.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n").await.unwrap();
        let secret = ClusterSecret::generate();
        let hello = Hello::new(secret.cluster, 1, 1, String::new());
        let err = initiate(&mut a, &secret, hello, "n2", Duration::from_secs(3)).await.unwrap_err();
        let said = err.to_string();
        assert!(said.contains("not a gobelins agent") && said.contains("--listen"), "{said}");
    }

    /// A frame of a handshake's size whose bytes are no handshake message is said to be that,
    /// not in the decoder's words alone.
    #[tokio::test]
    async fn a_frame_that_is_no_handshake_message_is_said_to_be_one() {
        use crate::frame::VERSION;
        use futures::SinkExt as _;
        let (a, b) = tokio::io::duplex(4096);
        let mut a = Framed::new(a, FrameCodec::new(crate::frame::HANDSHAKE_MAX_FRAME));
        let mut b = Framed::new(b, FrameCodec::new(crate::frame::HANDSHAKE_MAX_FRAME));
        b.send(Bytes::from(vec![155u8; 40])).await.unwrap();
        let secret = ClusterSecret::generate();
        let hello = Hello::new(secret.cluster, 1, 1, String::new());
        let err = initiate(&mut a, &secret, hello, "n2", Duration::from_secs(3)).await.unwrap_err();
        let said = err.to_string();
        assert!(said.contains("no handshake this build reads"), "{said}");
        let ours = format!("a build of another protocol (this one speaks protocol {VERSION})");
        assert!(said.contains(&ours), "{said}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_times_out() {
        let (a, _b) = tokio::io::duplex(4096);
        let mut a = Framed::new(a, FrameCodec::default());
        let secret = ClusterSecret::generate();
        let hello = Hello::new(secret.cluster, 1, 1, String::new());
        let err = initiate(&mut a, &secret, hello, "n2", Duration::from_secs(3)).await.unwrap_err();
        assert!(matches!(err, SupervisorError::Timeout { after_ms: 3000, .. }), "{err}");
    }

    /// A node's own Hello, relayed back to its listener, and the listener's Welcome to its
    /// dialing side: neither side proves anything to itself, so a peer without the secret is
    /// not admitted as the node.
    #[tokio::test]
    async fn a_node_s_own_hello_relayed_back_to_it_is_refused_on_both_sides() {
        let secret = ClusterSecret::generate();
        let deadline = Duration::from_secs(5);
        let (a, b) = tokio::io::duplex(4096);
        let mut a = Framed::new(a, FrameCodec::default());
        let mut b = Framed::new(b, FrameCodec::default());
        let dialing = Hello::new(secret.cluster, 1, 1, "127.0.0.1:1".into());
        let listening = Hello::new(secret.cluster, 1, 1, "127.0.0.1:1".into());
        let (a, b) = tokio::join!(
            initiate(&mut a, &secret, dialing.clone(), "relay", deadline),
            accept(&mut b, &secret, listening.clone(), "relay", deadline, |_| Ok(()))
        );
        let (a, b) = (a.unwrap_err().to_string(), b.unwrap_err().to_string());
        assert!(b.contains("the peer gives this node's own id (1)"), "{b}");
        assert!(a.contains("refused by peer") && a.contains("own id (1)"), "{a}");
        // The dialing side, handed its listener's Welcome, refuses it before any proof.
        let (c, d) = tokio::io::duplex(4096);
        let mut c = Framed::new(c, FrameCodec::default());
        let mut d = Framed::new(d, FrameCodec::default());
        let relay = async {
            let HandshakeMessage::Hello(_) = receive(&mut d, "n1", false).await.unwrap() else {
                panic!("a Hello first")
            };
            let welcome = HandshakeMessage::Welcome {
                proof: proof(&secret, ACCEPTOR, &dialing, &listening).unwrap(),
                hello: listening.clone(),
            };
            send(&mut d, &welcome).await.unwrap();
            receive(&mut d, "n1", false).await
        };
        let (c, relayed) =
            tokio::join!(initiate(&mut c, &secret, dialing.clone(), "relay", deadline), relay);
        assert!(c.unwrap_err().to_string().contains("own id (1)"));
        assert!(matches!(relayed, Ok(HandshakeMessage::Refused(_))), "no proof: {relayed:?}");
    }

    /// A dialer's Hello that names another node, handed to this one by a relay (or sent to an
    /// address this node took over), is refused before any proof: proving itself here, this
    /// node had the dialer prove the secret to it, and admitted the relay as the dialer.
    #[tokio::test]
    async fn a_hello_meant_for_another_node_is_refused_before_any_proof() {
        let secret = ClusterSecret::generate();
        let (a, b) = tokio::io::duplex(4096);
        let mut a = Framed::new(a, FrameCodec::default());
        let mut b = Framed::new(b, FrameCodec::default());
        let meant_for_3 =
            Hello { to: Some(3), ..Hello::new(secret.cluster, 1, 1, "127.0.0.1:1".into()) };
        let ours = Hello::new(secret.cluster, 2, 1, "127.0.0.1:2".into());
        let deadline = Duration::from_secs(5);
        let (a, b) = tokio::join!(
            initiate(&mut a, &secret, meant_for_3.clone(), "n3", deadline),
            accept(&mut b, &secret, ours.clone(), "n1", deadline, |_| Ok(()))
        );
        let (a, b) = (a.unwrap_err().to_string(), b.unwrap_err().to_string());
        assert!(b.contains("this is node 2, not node 3"), "{b}");
        assert!(a.contains("refused by peer") && a.contains("not node 3"), "{a}");
        // Meant for the node it reaches, it is admitted.
        let (a, b) = tokio::io::duplex(4096);
        let (mut a, mut b) =
            (Framed::new(a, FrameCodec::default()), Framed::new(b, FrameCodec::default()));
        let meant_for_2 = Hello { to: Some(2), ..meant_for_3 };
        let (a, b) = tokio::join!(
            initiate(&mut a, &secret, meant_for_2, "n2", deadline),
            accept(&mut b, &secret, ours, "n1", deadline, |_| Ok(()))
        );
        assert_eq!((a.unwrap().node, b.unwrap().to), (2, Some(2)));
    }

    #[test]
    fn a_replayed_proof_does_not_verify_against_new_nonces() {
        let secret = ClusterSecret::generate();
        let a = Hello::new(secret.cluster, 1, 1, String::new());
        let b = Hello::new(secret.cluster, 2, 1, String::new());
        let old = proof(&secret, INITIATOR, &a, &b).unwrap();
        let b2 = Hello::new(secret.cluster, 2, 1, String::new());
        assert!(verify(&secret, INITIATOR, &a, &b, &old).unwrap());
        assert!(!verify(&secret, INITIATOR, &a, &b2, &old).unwrap());
        assert!(!verify(&secret, ACCEPTOR, &a, &b, &old).unwrap(), "roles are not interchangeable");
    }
}
