//! Distributed shared memory for gobelins (DESIGN.md, "Services", DSM).
//!
//! Segments of 4 KiB pages, kept sequentially consistent by write-invalidate: one writer or
//! many readers per page. Each page has a directory entry (owner, copyset, version) kept by
//! its manager, which the locator names ([`Placement::Locator`]) or, for the report's baseline,
//! `page % n` ([`Placement::Static`]).
//!
//! ```text
//!   read fault   reader ──ReadFault──▶ manager ──Fetch(keep)──▶ owner      (the manager then
//!                reader ◀──Copy─────── manager ◀──Page─────────  owner       keeps a copy too)
//!   write fault  writer ──WriteFault─▶ manager ──Invalidate──▶ every reader
//!                                              ──Fetch(drop)──▶ owner (which first
//!                writer ◀──Grant────── manager                  invalidates its readers)
//!   hinted read  reader ──Serve──────▶ probable owner           (one round trip; `Missing`
//!                reader ◀──Copy─────── owner                     sends it to the manager)
//! ```
//!
//! Every node keeps a probable owner per page (Li and Hudak): the owner a manager's answer
//! named, or the writer an invalidation announced. A read fault goes there first. The owner
//! records the readers it served this way, which the manager does not know, and invalidates
//! them itself before it writes or gives the page up. When an owner dies with that list, the
//! entry is marked as having strays and the next write invalidates every node.
//!
//! The plug-in ([`DsmService`]) moves directory entries when managers change; an evicted node
//! first hands the pages it owns to their managers. After a failure, survivors report the copies
//! they hold (`scan`) and the new managers rebuild the entries; a page whose every copy died is
//! reported [`DsmError::Lost`], never zero-filled, and never rolled back either: the copy an
//! owner gave up to a writer is not offered as the page once that writer died too, since it
//! may have written since. With [`DsmConfig::backups`], every page
//! written also lives on a second node (of another zone, under label levels, when one has a
//! live node other than the one the page is taken from: a zone lost whole then loses none of
//! those pages), so that one failure loses nothing; before a change ends,
//! each manager gives a new backup to its pages whose backup is gone, so that the next failure,
//! once the cluster has recovered, loses nothing either. A page nobody reports after a failure
//! was then never written, and reads as zeros, as long as its dead manager had vouched for it
//! to its replica holder and every node reported (see `cover.rs`); otherwise it reads as lost.
//!
//! A segment no program uses any more is given back with [`Dsm::free`]: every node drops its
//! copies and entries of it, and it reads as zeros afterwards.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod client;
mod cover;
mod directory;
mod error;
mod failed;
mod frames;
mod freed;
mod held;
mod leave;
mod losses;
mod node;
mod page;
mod protocol;
mod service;

pub use client::{Dsm, LockGuard, Placement, ReadGuard, Segment, WriteGuard};
pub use error::DsmError;
pub use losses::{Losses, NodeLosses};
pub use node::{DsmConfig, DsmNode, FaultStats, DSM, DSM_SLOTS};
pub use page::{barrier_key, lock_key, PageId, MAX_SEGMENT, MAX_SEGMENT_LEN, PAGE_SIZE};
pub use protocol::{PageBytes, Request, Response, Token};
pub use service::DsmService;
