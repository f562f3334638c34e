//! Connections from peers: accepted, shaken hands with, and admitted or refused.

use super::{Inner, TcpTransport};
use crate::error::{Result, SupervisorError};
use crate::frame::{FrameCodec, HANDSHAKE_MAX_FRAME};
use crate::handshake;
use crate::net::Net;
use crate::sources::{Admitted, Busy};
use crate::transport::Transport;
use gobelins_adaptation::log_budget;
use std::time::Duration;
use tokio_util::codec::Framed;

/// Says, once a window of refusals ends, how many its budget left out: counted only at the
/// next refusal, the last window of a flood that stopped went unsaid, or was said minutes
/// later beside an unrelated line.
pub(super) async fn say_refusals_left_out<N: Net>(inner: std::sync::Weak<Inner<N>>) {
    loop {
        tokio::time::sleep(REFUSALS_WINDOW).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.shutdown.is_cancelled() {
            return;
        }
        log_budget::say_ended(&inner.refusals, REFUSALS);
    }
}

/// Connections refused before their handshake ended: lines logged per window, and the window.
pub(super) const REFUSALS_LOGGED: u32 = 5;
pub(super) const REFUSALS_WINDOW: Duration = Duration::from_secs(10);

/// What the lines the refusals' budget leaves out are about.
const REFUSALS: &str = "connections refused or dropped before their handshake ended (a flood, or a peer retrying with the wrong secret or a build of another protocol)";

impl<N: Net> TcpTransport<N> {
    pub(super) async fn accept_loop(self, listener: N::Listener) {
        // Out of descriptors, a failure repeats every 50 ms: 40 lines a second, unbudgeted.
        let failures = log_budget::noisy();
        loop {
            let accepted = tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                accepted = self.inner.net.accept(&listener) => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let counted = match self.inner.sources.admit(&peer) {
                        Ok(Admitted { counted, evicted: None }) => counted,
                        Ok(Admitted { counted, evicted: Some(from) }) => {
                            self.refused(|| tracing::warn!(%peer, evicted_from = %from, "every handshake slot was taken: ended the oldest handshake from the address with the most in progress to let this connection in (hosts that connect and say nothing?)"));
                            counted
                        }
                        Err(Busy::Source) => {
                            self.refused(|| tracing::warn!(%peer, "too many handshakes in progress from this address; dropped a connection (a host that connects and says nothing? or several agents dialing from this one address, reconnecting at once after a pause: they retry, and get in)"));
                            continue;
                        }
                        Err(Busy::All) => {
                            self.refused(|| tracing::warn!(%peer, "every handshake slot is taken, and none can be ended for this connection (none held by an address busier than its own, or none for long enough); dropped a connection (many hosts that connect and say nothing?)"));
                            continue;
                        }
                    };
                    let me = self.clone();
                    tokio::spawn(async move {
                        let admitted = tokio::select! {
                            admitted = me.admit_incoming(stream, &peer) => admitted,
                            _ = counted.evicted() => Err(SupervisorError::Handshake {
                                peer: peer.clone(),
                                reason: "its slot went to a newer connection: every handshake slot was taken, and its address had the most in progress".into(),
                            }),
                        };
                        drop(counted);
                        if let Err(error) = admitted {
                            me.refused(
                                || tracing::warn!(%peer, %error, "refused an incoming connection"),
                            );
                        }
                    });
                }
                Err(error) => {
                    // Out of descriptors, usually: back off rather than spin.
                    log_budget::budgeted(
                        &failures,
                        "failures to accept a connection",
                        || tracing::warn!(%error, "accept failed: peers cannot connect to this node; if it says too many open files, raise the agent's limit (LimitNOFILE= in its unit, or ulimit -n), or find what holds descriptors open (ls /proc/<agent's pid>/fd)"),
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Logs a connection refused or dropped before it proved the secret with `log`, while the
    /// budget of such lines lasts: anyone who reaches the port can cause them.
    pub(super) fn refused(&self, log: impl FnOnce()) {
        log_budget::budgeted(&self.inner.refusals, REFUSALS, log);
    }

    async fn admit_incoming(&self, stream: N::Stream, peer: &str) -> Result<()> {
        let mut framed = Framed::new(stream, FrameCodec::new(HANDSHAKE_MAX_FRAME));
        let config = &self.inner.config;
        let admission = &self.inner.admission;
        let theirs = handshake::accept(
            &mut framed,
            &self.inner.identity.secret,
            self.hello(),
            peer,
            config.handshake_timeout,
            |theirs| admission.admit(theirs.node, theirs.incarnation, &theirs.addr),
        )
        .await?;
        tracing::debug!(node = theirs.node, %peer, "peer connected");
        framed.codec_mut().set_max_frame(self.inner.config.max_frame);
        self.set_peer(theirs.node, theirs.addr.clone());
        self.register(theirs.node, theirs.node, framed);
        Ok(())
    }
}
