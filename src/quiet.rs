//! Raft's unanswered calls for votes, left out of the default log.
//!
//! A voter cut off from the others calls an election every timeout and logs an error for each
//! voter that did not answer (`while requesting vote`) or answered too late (`timeout`): two
//! lines per election per silent voter, for as long as the cut lasts, and neither says what it
//! means for the node. The supervisor says that once, and every half minute while it lasts
//! ("this voter has heard from no leader"). Raft's other errors go through.

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Where raft logs its calls for votes.
const RAFT_CORE: &str = "openraft::core::raft_core";

/// The messages raft gives an unanswered call for votes.
const UNANSWERED_VOTE: [&str; 2] = ["while requesting vote", "timeout"];

/// Turns raft's unanswered calls for votes off, and nothing else.
pub(crate) struct UnansweredVotes;

impl<S: Subscriber> Layer<S> for UnansweredVotes {
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        let meta = event.metadata();
        if meta.target() != RAFT_CORE || *meta.level() != Level::ERROR {
            return true;
        }
        let mut message = Message(None);
        event.record(&mut message);
        !message.0.is_some_and(|m| UNANSWERED_VOTE.contains(&m.as_str()))
    }
}

/// Whether a `RUST_LOG` filter asks for raft's calls for votes: the directive that decides
/// for raft's core (the most specific one naming it or a module above it, else the default
/// level) names raft's core itself, or sets `debug` or `trace`. A directive with no `=` is a
/// default level if it is a level's name, else a target at `trace`, as `EnvFilter` reads it.
pub(crate) fn asks_for_votes(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let mut deciding: Option<(&str, String)> = None;
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target, level) = match directive.split_once('=') {
            Some((target, level)) => (target, level.to_ascii_lowercase()),
            None if LEVELS.contains(&directive.to_ascii_lowercase().as_str()) => {
                ("", directive.to_ascii_lowercase())
            }
            None => (directive, "trace".to_string()),
        };
        let covers = target.is_empty()
            || RAFT_CORE == target
            || RAFT_CORE.strip_prefix(target).is_some_and(|rest| rest.starts_with("::"));
        if covers && deciding.as_ref().is_none_or(|(best, _)| target.len() >= best.len()) {
            deciding = Some((target, level));
        }
    }
    deciding.is_some_and(|(target, level)| {
        target.starts_with("openraft::core") || matches!(level.as_str(), "debug" | "trace")
    })
}

/// An event's message.
struct Message(Option<String>);

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    /// Keeps the messages of the events that reach it.
    struct Seen(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber> Layer<S> for Seen {
        fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
            let mut message = Message(None);
            event.record(&mut message);
            self.0.lock().unwrap().push(message.0.unwrap_or_default());
        }
    }

    #[test]
    fn a_filter_asks_for_raft_s_votes_only_by_naming_its_core_or_asking_for_everything() {
        let quiet = [
            "",
            "warn,openraft=error,openraft::replication=off",
            "info",
            "gobelins=debug",
            "debug,openraft=error",
            "openraft::replication=trace",
        ];
        for filter in quiet {
            assert!(!asks_for_votes(filter), "{filter}");
        }
        let loud = [
            "debug",
            "TRACE",
            "warn,openraft=debug",
            "openraft::core=error",
            "openraft::core::raft_core=error",
            "warn,openraft",
        ];
        for filter in loud {
            assert!(asks_for_votes(filter), "{filter}");
        }
    }

    #[test]
    fn only_raft_s_unanswered_calls_for_votes_are_left_out() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let subscriber =
            tracing_subscriber::registry().with(UnansweredVotes).with(Seen(Arc::clone(&seen)));
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "openraft::core::raft_core", error = "node 1 is unreachable", target = 1, "while requesting vote");
            tracing::error!(target: "openraft::core::raft_core", error = "vote timeout", "timeout");
            tracing::error!(target: "openraft::core::raft_core", error = "disk", "quit RaftCore::main on error");
            tracing::warn!(target: "openraft::core::raft_core", "while requesting vote");
            tracing::error!(target: "gobelins_supervisor", "while requesting vote");
        });
        assert_eq!(
            *seen.lock().unwrap(),
            ["quit RaftCore::main on error", "while requesting vote", "while requesting vote"]
        );
    }
}
