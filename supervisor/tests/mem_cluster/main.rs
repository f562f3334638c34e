//! In-process clusters over the in-memory transport, with paused time: partitions, delays and
//! lost messages, and what the supervisors make of them.

mod control;
mod harness;
mod holds;
mod joins;
mod leaves;
mod partitions;
mod rejoins;
mod storage;
mod suspicions;
mod voters;
