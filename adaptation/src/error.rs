//! The adaptation layer's one error type.

/// Why the adaptation layer refused something. The machine's state is unchanged in every case.
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
}
