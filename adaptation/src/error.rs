//! The adaptation layer's one error type.

/// Why the adaptation layer refused something. A refused event or change leaves the period's
/// state machine unchanged; a request that ends in [`AdaptationError::Deadline`] or
/// [`AdaptationError::Stopped`] may have run at its manager all the same (see each).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdaptationError {
    /// A value could not be encoded, or bytes could not be decoded: a peer speaks another
    /// format, or sent garbage or more than the codec's limit.
    #[error("codec: {0}")]
    Codec(String),
    /// A change began while another was still being carried out; the supervisor starts one
    /// change at a time, so this means the node missed the end of the last one.
    #[error("epoch {new} began while epoch {current} is still being carried out")]
    Overlap {
        /// The epoch in progress.
        current: u64,
        /// The epoch that tried to begin.
        new: u64,
    },
    /// A service could not be registered.
    #[error("registration: {0}")]
    Registration(String),
    /// A change that is not newer than the last one this node carried out: a redelivery.
    #[error("epoch {got} began again, but this node is already past epoch {last}")]
    Stale {
        /// The last epoch begun or finished here.
        last: u64,
        /// The epoch offered.
        got: u64,
    },
    /// An event that belongs to no change in progress.
    #[error("{event} arrived with no change in progress")]
    Idle {
        /// What arrived.
        event: &'static str,
    },
    /// A service callback finished that was not asked for, or finished twice.
    #[error("service {service} finished {phase} without being asked to")]
    Unexpected {
        /// The service.
        service: u16,
        /// The phase it claimed to finish.
        phase: &'static str,
    },
    /// No service with this id is registered in the cluster's configuration.
    #[error("no service {0} is registered in this cluster")]
    UnknownService(u16),
    /// A peer could not be reached, or did not answer in time.
    #[error("node {node} unreachable: {reason}")]
    Unreachable {
        /// The peer.
        node: u64,
        /// What the transport said.
        reason: String,
    },
    /// A message larger than the link carries (the transport's largest frame): sending it
    /// again cannot help.
    #[error("a message of {bytes} bytes is larger than the link carries ({max} bytes)")]
    TooLarge {
        /// The message's size.
        bytes: u64,
        /// The largest the link carries.
        max: u64,
    },
    /// A request could not complete before its deadline: its manager stayed unreachable, or the
    /// change it waited for did not end. It may or may not have run: sending it again is a
    /// new request, with a new id, which may run it a second time. Send again only what is
    /// safe to run twice, or read the key first to learn whether the first one took effect.
    #[error("request for key {key} of service {service} did not complete within {waited_ms} ms: {}", manager_said(.manager, *.here))]
    Deadline {
        /// The service.
        service: u16,
        /// The key.
        key: u64,
        /// How long it waited.
        waited_ms: u64,
        /// The key's manager by the sender's table as it gave up, if it had one.
        manager: Option<u64>,
        /// Whether that manager is the sender's own node.
        here: bool,
    },
    /// The manager's service could not complete the request now and asked for it to be tried
    /// again ([`crate::Service::must_retry`]); the requester retries until its deadline.
    #[error("the manager of key {key} of service {service} asked for the request to be retried")]
    Retry {
        /// The service.
        service: u16,
        /// The key.
        key: u64,
    },
    /// This node's own services stopped while the request was under way: the cluster declared
    /// the node failed and it starts afresh as a new life, or the node is shutting down. Not
    /// the manager's doing. The request may have reached its manager and run there (a helper's
    /// audit saw a write through a node starved of CPU take effect so), as after a deadline.
    #[error("this node's services stopped while the request was under way: the cluster declared this node failed (it starts afresh as a new life), or it is shutting down. The request may or may not have taken effect at its manager: sending it again (through the new life, once `gobelins status` shows the node active, or through another node) is a new request, which may run it a second time. Send again only what is safe to run twice, or read the key first")]
    Stopped,
    /// The manager's service failed the request (it could not decode it, say).
    #[error("the manager refused the request: {0}")]
    Refused(String),
    /// A context made for a test, with no cluster behind it, was asked to send.
    #[error("this context is detached from any cluster")]
    Detached,
}

/// What a request that ran out of time can tell its sender about where it waited.
fn manager_said(manager: &Option<u64>, here: bool) -> String {
    let look = "(`gobelins status` says whether the cluster is changing, or has lost its majority)";
    match manager {
        Some(node) if here => format!(
            "this node, node {node}, manages the key, and could not serve it in time: a change \
             it waited for did not end, or its lease ran out {look}"
        ),
        Some(node) => format!(
            "its manager, node {node}, did not answer in time, or a change it waited for did \
             not end {look}"
        ),
        None => "this node has no configuration: it has not joined a cluster yet, or is joining \
                 again as a new life (the cluster declared its last one failed)"
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_out_of_time_names_its_manager_and_where_to_look() {
        let late = |manager, here| AdaptationError::Deadline {
            service: 10,
            key: 7,
            waited_ms: 10_001,
            manager,
            here,
        };
        let said = late(Some(2), false).to_string();
        assert!(said.contains("its manager, node 2,"), "{said}");
        assert!(said.contains("gobelins status"), "{said}");
        let here = late(Some(1), true).to_string();
        assert!(here.contains("this node, node 1, manages the key"), "{here}");
        let alone = late(None, false).to_string();
        assert!(alone.contains("has not joined a cluster"), "{alone}");
    }
}
