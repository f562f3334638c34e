//! The replicated state as older builds laid it out. A raft store keeps the cluster's state in
//! its snapshot, encoded with bincode, which carries no field names: a field added to the state
//! makes every snapshot an older build wrote unreadable, and a cluster upgraded whole would
//! have lost its state. A field added since is marked with one of the modules here; while
//! [`older`] runs on a thread, such fields are neither read nor written there, so that an
//! older snapshot is read as it was laid out, then written again in the current layout.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cell::Cell;

std::thread_local! {
    /// The protocol version whose layout this thread reads and writes, if an older one.
    static OLDER: Cell<Option<u8>> = const { Cell::new(None) };
}

/// Runs `work` reading and writing the state as protocol `version` laid it out.
pub(crate) fn older<T>(version: u8, work: impl FnOnce() -> T) -> T {
    /// Puts the thread's layout back however `work` ends: a panic in it is caught (the store
    /// is opened under `catch_unwind`), and the thread must not go on in the older layout.
    struct Restore(Option<u8>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OLDER.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OLDER.with(|o| o.replace(Some(version))));
    work()
}

/// Whether a field added at protocol `since` is absent from the layout this thread uses.
fn absent(since: u8) -> bool {
    OLDER.with(Cell::get).is_some_and(|version| version < since)
}

fn serialize<T: Serialize, S: Serializer>(
    since: u8,
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    // A unit is no bytes at all in bincode, the only format older layouts are written in.
    match absent(since) {
        true => serializer.serialize_unit(),
        false => value.serialize(serializer),
    }
}

fn deserialize<'de, T: Deserialize<'de> + Default, D: Deserializer<'de>>(
    since: u8,
    deserializer: D,
) -> Result<T, D::Error> {
    match absent(since) {
        true => Ok(T::default()),
        false => T::deserialize(deserializer),
    }
}

/// A module for `#[serde(with = ...)]` on the fields added at protocol `$version`.
macro_rules! added_at {
    ($(#[$doc:meta])* $name:ident, $version:literal) => {
        $(#[$doc])*
        pub(crate) mod $name {
            use serde::{Deserialize, Deserializer, Serialize, Serializer};

            pub(crate) fn serialize<T: Serialize, S: Serializer>(
                v: &T,
                s: S,
            ) -> Result<S::Ok, S::Error> {
                super::serialize($version, v, s)
            }

            pub(crate) fn deserialize<'de, T: Deserialize<'de> + Default, D: Deserializer<'de>>(
                d: D,
            ) -> Result<T, D::Error> {
                super::deserialize($version, d)
            }
        }
    };
}

added_at!(
    /// A field added at protocol 28: [`crate::state::NodeRecord::kept_out`],
    /// [`crate::state::ClusterState::rules`].
    since_28,
    28
);
added_at!(
    /// A field added at protocol 29: [`crate::state::ClusterState::kept_since`],
    /// [`crate::state::InProgress::failed_kept_since`].
    since_29,
    29
);
added_at!(
    /// A field added at protocol 30: [`crate::state::NodeRecord::removed_by`].
    since_30,
    30
);

#[cfg(test)]
mod tests {
    use crate::codec;
    use crate::state::{ClusterState, Command, NodeRecord, NodeStatus, RemovedBy};
    use gobelins_locator::{KeptSince, Labels, NodeId, ServiceId, ServiceSpec};

    fn record(kept_out: bool) -> NodeRecord {
        let labels = Labels::new();
        NodeRecord {
            addr: "a".into(),
            labels,
            status: NodeStatus::Failed,
            incarnation: 3,
            kept_out,
            removed_by: None,
        }
    }

    #[test]
    fn a_state_in_the_layout_of_protocol_27_reads_back_without_the_fields_added_since() {
        let mut state = ClusterState::default();
        state.nodes.insert(4, record(true));
        state.epoch = 9;
        state.rules = crate::state::RULES;
        let now = codec::encode(&state).expect("encode");
        let before = super::older(27, || codec::encode(&state)).expect("encode as 27");
        // Four bytes: the record's flag and its `removed_by` (none), the state's rules and its
        // (empty) `kept_since`.
        assert_eq!(now.len(), before.len() + 4);
        assert!(codec::decode::<ClusterState>(&before).is_err(), "27's layout is not today's");
        let read: ClusterState = super::older(27, || codec::decode(&before)).expect("read as 27");
        let mut expected = state.clone();
        expected.nodes.insert(4, record(false));
        expected.rules = 0;
        assert_eq!(read, expected);
        let read: ClusterState = codec::decode(&now).expect("today's layout");
        assert_eq!(read, state);
    }

    /// A change in progress as 28 laid it out too: its `failed_kept_since` is new.
    #[test]
    fn a_state_in_the_layout_of_protocol_28_reads_back_without_what_29_records() {
        let mut state = ClusterState::default();
        state.nodes.insert(4, record(true));
        let join = |node: u64| Command::Join {
            node,
            addr: format!("a:{node}"),
            labels: Labels::new(),
            incarnation: 1,
        };
        state.apply(&Command::Rules { version: crate::state::RULES }).expect("ruled");
        state.apply(&Command::Register(ServiceSpec::new(ServiceId(1), "s"))).expect("registered");
        state.apply(&join(1)).expect("joins");
        state.apply(&Command::MigrationDone { node: 1, epoch: state.epoch }).expect("done");
        state.apply(&join(2)).expect("joins");
        assert!(state.kept_since.of(NodeId(2)).is_some(), "recorded");
        let progress = state.in_progress.as_mut().expect("a join in progress");
        progress.failed_kept_since = Some(1);
        let now = codec::encode(&state).expect("encode");
        let before = super::older(28, || codec::encode(&state)).expect("encode as 28");
        assert!(now.len() > before.len());
        assert!(codec::decode::<ClusterState>(&before).is_err(), "28's layout is not today's");
        let read: ClusterState = super::older(28, || codec::decode(&before)).expect("read as 28");
        let mut expected = state.clone();
        expected.kept_since = KeptSince::default();
        expected.in_progress.as_mut().expect("in progress").failed_kept_since = None;
        assert_eq!(read, expected);
        let read: ClusterState = codec::decode(&now).expect("today's layout");
        assert_eq!(read, state);
    }

    /// A record as 29 laid it out: who asked its node out is new.
    #[test]
    fn a_state_in_the_layout_of_protocol_29_reads_back_without_who_asked_a_node_out() {
        let mut state = ClusterState::default();
        let mut left = record(false);
        (left.status, left.removed_by) = (NodeStatus::Left, Some(RemovedBy::Leave));
        state.nodes.insert(4, left);
        let now = codec::encode(&state).expect("encode");
        let before = super::older(29, || codec::encode(&state)).expect("encode as 29");
        // Two bytes: the option's tag and the variant's.
        assert_eq!(now.len(), before.len() + 2);
        let read: ClusterState = super::older(29, || codec::decode(&before)).expect("read as 29");
        let mut expected = state.clone();
        expected.nodes.get_mut(&4).expect("node 4").removed_by = None;
        assert_eq!(read, expected);
        let read: ClusterState = codec::decode(&now).expect("today's layout");
        assert_eq!(read, state);
    }

    #[test]
    fn a_panic_in_the_older_layout_leaves_the_thread_in_today_s() {
        let caught = std::panic::catch_unwind(|| super::older(27, || panic!("a damaged page")));
        assert!(caught.is_err());
        assert!(!super::absent(28), "back in today's layout");
    }
}
