//! Connections to peers: reused, or dialled once by every caller that needs one, and calls
//! made on them.

use super::conn::{Conn, PendingGuard};
use super::{lock, TcpTransport};
use crate::error::{Result, SupervisorError};
use crate::frame::{FrameCodec, Wire, HANDSHAKE_MAX_FRAME};
use crate::handshake::{self, Hello};
use crate::net::Net;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

/// What a transport's caller sees of a dial's error: a handshake refused, whatever its cause.
/// That the peer holds another secret is kept per peer (`Peer::secret_differs`).
pub(super) fn refused(error: SupervisorError) -> SupervisorError {
    match error {
        SupervisorError::SecretDiffers { peer, reason } => {
            SupervisorError::Handshake { peer, reason }
        }
        other => other,
    }
}

/// The dials to one peer: one at a time, and ended, waiters included, once the peer is
/// forgotten. A dial to a stopped agent connects (the kernel accepts into the backlog) and
/// then waits out its handshake: a call to a node the cluster had just declared failed held
/// its request for the call's whole deadline (2 s) where closing connections ended the rest.
#[derive(Default)]
pub(super) struct Dialing {
    gate: tokio::sync::Mutex<()>,
    pub(super) forgotten: CancellationToken,
}

impl<N: Net> TcpTransport<N> {
    pub(super) fn live_conn(&self, node: u64) -> Option<Conn> {
        lock(&self.inner.peers)
            .get(&node)
            .and_then(|p| p.conn.clone())
            .filter(|c| !c.closer.is_closed())
    }

    pub(super) async fn connection(&self, node: u64) -> Result<Conn> {
        if let Some(conn) = self.live_conn(node) {
            return Ok(conn);
        }
        let dialing = Arc::clone(lock(&self.inner.dialing).entry(node).or_default());
        tokio::select! {
            biased;
            () = dialing.forgotten.cancelled() => Err(SupervisorError::Unreachable(node)),
            conn = self.dial_through(node, &dialing) => conn,
        }
    }

    /// The rest of [`TcpTransport::connection`], through `dialing`'s gate.
    async fn dial_through(&self, node: u64, dialing: &Dialing) -> Result<Conn> {
        let _dialing = dialing.gate.lock().await;
        if let Some(conn) = self.live_conn(node) {
            return Ok(conn);
        }
        let addr = {
            let peers = lock(&self.inner.peers);
            let peer = peers.get(&node).ok_or(SupervisorError::Unreachable(node))?;
            if peer.retry_at.is_some_and(|at| Instant::now() < at) {
                return Err(match &peer.refused {
                    Some(reason) => SupervisorError::Handshake {
                        peer: peer.addr.clone().unwrap_or_default(),
                        reason: reason.clone(),
                    },
                    None => SupervisorError::Unreachable(node),
                });
            }
            peer.addr.clone().ok_or(SupervisorError::Unreachable(node))?
        };
        match self.dial(&addr, Some(node)).await {
            Ok((theirs, framed)) if theirs.node == node => {
                Ok(self.register(node, self.node(), framed))
            }
            Ok((theirs, _)) => {
                self.failed_dial(node);
                let reason = format!("expected node {node}, found node {}", theirs.node);
                let mut peers = lock(&self.inner.peers);
                let peer = peers.entry(node).or_default();
                peer.refused = Some(reason.clone());
                // It proved our secret: some other node of ours took the address. (A peer refuses
                // a Hello meant for another node before this, since protocol 27; kept should
                // one answer anyway.)
                peer.secret_differs = false;
                drop(peers);
                Err(SupervisorError::Handshake { peer: addr, reason })
            }
            Err(error) => {
                self.failed_dial(node);
                tracing::debug!(node, %addr, %error, "dial failed");
                let differs = matches!(error, SupervisorError::SecretDiffers { .. });
                let error = refused(error);
                let refused = match &error {
                    SupervisorError::Handshake { reason, .. } => Some(reason.clone()),
                    _ => None,
                };
                let mut peers = lock(&self.inner.peers);
                let peer = peers.entry(node).or_default();
                peer.refused = refused;
                peer.secret_differs = differs;
                drop(peers);
                Err(match error {
                    SupervisorError::Handshake { .. } => error,
                    _ => SupervisorError::Unreachable(node),
                })
            }
        }
    }

    fn failed_dial(&self, node: u64) {
        let config = &self.inner.config;
        let mut peers = lock(&self.inner.peers);
        let peer = peers.entry(node).or_default();
        peer.backoff = (peer.backoff * 2).clamp(config.backoff_min, config.backoff_max);
        peer.retry_at = Some(Instant::now() + peer.backoff);
    }

    /// Connects to `addr` and runs the handshake, naming `to` as the node meant, if known.
    pub(super) async fn dial(
        &self,
        addr: &str,
        to: Option<u64>,
    ) -> Result<(Hello, Framed<N::Stream, FrameCodec>)> {
        let config = &self.inner.config;
        let stream = tokio::time::timeout(config.connect_timeout, self.inner.net.connect(addr))
            .await
            .map_err(|_| SupervisorError::Timeout {
                what: format!("connecting to {addr}"),
                after_ms: config.connect_timeout.as_millis() as u64,
            })?
            .map_err(|e| SupervisorError::io(format!("connecting to {addr}"), e))?;
        // Small until the peer has proven it holds the secret, as on the accepting side: a
        // server that is not ours at a mistyped address must not make this node buffer 16 MiB.
        let mut framed = Framed::new(stream, FrameCodec::new(HANDSHAKE_MAX_FRAME));
        let theirs = handshake::initiate(
            &mut framed,
            &self.inner.identity.secret,
            Hello { to, ..self.hello() },
            addr,
            config.handshake_timeout,
        )
        .await?;
        framed.codec_mut().set_max_frame(config.max_frame);
        Ok((theirs, framed))
    }

    /// The connection to `to`, dialed if there is none live, by `until`. A live connection
    /// needs no timer to wait for it. Dialing is boxed: its future runs to kilobytes, and
    /// inline it would make every call's future (allocated once per call) that large.
    async fn conn_until(&self, to: u64, until: Instant) -> Result<Conn> {
        match self.live_conn(to) {
            Some(conn) => Ok(conn),
            None => tokio::time::timeout_at(until, Box::pin(self.connection(to)))
                .await
                .map_err(|_| SupervisorError::Unreachable(to))?,
        }
    }

    /// A call that began at `started` and ends `deadline` after it. Not through
    /// [`Transport::call_at`](crate::transport::Transport::call_at) from `call`: each trait call
    /// boxes its future.
    pub(super) async fn call_from(
        &self,
        to: u64,
        request: Bytes,
        started: Instant,
        deadline: Duration,
    ) -> Result<Bytes> {
        let until = started + deadline;
        // Named only if the call times out: a string per call costs more than the lookup.
        let what = || format!("request to node {to}");
        let conn = self.conn_until(to, until).await?;
        self.call_on(&conn, request, until, deadline, what).await
    }

    pub(super) async fn call_on(
        &self,
        conn: &Conn,
        request: Bytes,
        deadline: Instant,
        budget: Duration,
        what: impl FnOnce() -> String,
    ) -> Result<Bytes> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        // Fails at `deadline` (the connection's expiring task drops it) or when the
        // connection ends: no timer of its own.
        let mut rx = conn.pending.wait(id, deadline);
        let mut guard = PendingGuard { pending: &conn.pending, id, answered: false };
        let sent = conn.writer.send(Wire::Request { id, body: request });
        // The answer may come while this caller still writes frames other callers queued:
        // it is taken then, and the writing left to a task (see `Outbox`).
        tokio::pin!(sent);
        let mut written = false;
        let answer = loop {
            tokio::select! {
                // In order: a random start costs a random number per poll.
                biased;
                answer = &mut rx => break answer,
                result = &mut sent, if !written => {
                    result?;
                    written = true;
                }
            }
        };
        match answer {
            Ok(answer) => {
                guard.answered = true;
                Ok(answer)
            }
            Err(_) if Instant::now() < deadline => Err(SupervisorError::Closed),
            Err(_) => {
                // Nothing at all came back while we waited: the link is wedged, not busy.
                let what = what();
                // The call began a budget before its deadline: no clock read per call.
                if conn.silent_through(deadline.elapsed() + budget) {
                    tracing::debug!(%what, "connection silent past the deadline; closing it");
                    conn.closer.close();
                }
                Err(SupervisorError::Timeout { what, after_ms: budget.as_millis() as u64 })
            }
        }
    }
}
