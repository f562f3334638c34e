//! Sequential consistency of the DSM under concurrent access from several nodes, while nodes
//! are added, evicted and fail: in-memory clusters of hosts under a paused clock.
//!
//! Every write stores a counter one above the one it found in the page, with who wrote it.
//! Under a single writer per page the counters of a page's writes are 1, 2, 3…: the write
//! order. The checker then asks of each node's history, page by page, what sequential
//! consistency asks: every read returns a value that was written, no node reads a value older
//! than one it already saw or wrote, and a node's write follows everything it read.

mod barriers;
mod changes;
mod checker;
mod failures;
mod grants;
mod harness;
mod leases;
mod leaves;
mod lives;
mod locks;
mod losses;
mod owners;
mod restores;
mod segments;
mod silences;
mod words;
mod zones;
