//! `gobelins dsm`: the DSM's pages reported lost, listed and started afresh.

use super::{ask, DirArgs};
use anyhow::{bail, Context};
use clap::Args;
use gobelins_supervisor::control::{self, ControlRequest};
use serde_json::Value;
use std::io::Write as _;

/// Options of `gobelins dsm`.
#[derive(Args, Debug)]
pub(crate) struct DsmArgs {
    #[command(subcommand)]
    op: DsmOp,
}

#[derive(clap::Subcommand, Debug)]
pub(super) enum DsmOp {
    /// Print bytes of a segment to standard output, as they are, through this node's DSM.
    /// Each 4 KiB page is read whole, as one write left it; a range over several pages is
    /// not read at once, so writers racing on it can leave a read with parts of each.
    Read {
        #[command(flatten)]
        dir: DirArgs,
        /// The segment id.
        segment: u32,
        /// Where to start, in bytes.
        offset: u64,
        /// How many bytes (at most 512 KiB).
        len: u64,
    },
    /// Write bytes into a segment through this node's DSM: the text given, or standard input
    /// with `-`. Each 4 KiB page is written whole; a range over several pages is written page
    /// by page, not at once (a program that needs that takes a DSM lock).
    Write {
        #[command(flatten)]
        dir: DirArgs,
        /// The segment id.
        segment: u32,
        /// Where to start, in bytes.
        offset: u64,
        /// The bytes, as text; `-` reads them from standard input (at most 512 KiB).
        data: String,
    },
    /// Give a segment back: every node drops its copies and directory entries of it, and it
    /// reads as zeros afterwards. For a segment no program uses any more.
    Free {
        #[command(flatten)]
        dir: DirArgs,
        /// The segment id.
        segment: u32,
        /// Its length in bytes, as the program made it. The whole segment is freed, whatever
        /// the length: every page of it reads as zeros afterwards, even where a node that
        /// managed it failed.
        len: u64,
    },
    /// Start a page reported lost afresh, zero-filled, once what it held is dealt with (the
    /// page of byte `offset` is `offset / 4096`).
    Discard {
        #[command(flatten)]
        dir: DirArgs,
        /// The segment id.
        segment: u32,
        /// The page within the segment.
        page: u32,
    },
    /// Accept what a failed manager took with it: in the slot of the page given, or in every
    /// slot, pages no node reported after the failure read as zeros again, as never written,
    /// instead of as lost (tainted slots, which `dsm lost` counts). Use it once what mattered
    /// is restored. So do pages first asked for while their slot was tainted; a page lost
    /// after it was written (its copies died) stays lost: discard it.
    Forgive {
        #[command(flatten)]
        dir: DirArgs,
        /// The segment id of a page of the slot.
        #[arg(required_unless_present = "all")]
        segment: Option<u32>,
        /// The page within the segment.
        #[arg(required_unless_present = "all")]
        page: Option<u32>,
        /// Every slot (after every node of the cluster stopped at once, every slot is
        /// tainted).
        #[arg(long, conflicts_with_all = ["segment", "page"])]
        all: bool,
    },
    /// List the pages reported lost, with their managers, asking every node, and the slots
    /// where pages nobody reported after a failure read as lost (tainted). Exits non-zero when
    /// the list may be incomplete: a node did not answer, requests held entries, or the
    /// cluster changed meanwhile, for the few seconds it asks again.
    Lost {
        #[command(flatten)]
        dir: DirArgs,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn dsm(args: DsmArgs) -> anyhow::Result<()> {
    use gobelins::builtin::{DsmCommand, DSM_CONSOLE_MAX};
    use std::io::Read as _;
    let (dir, command) = match args.op {
        DsmOp::Read { dir, segment, offset, len } => {
            (dir, DsmCommand::Read { segment, offset, len })
        }
        DsmOp::Write { dir, segment, offset, data } => {
            let data = if data == "-" {
                let mut bytes = Vec::new();
                std::io::stdin()
                    .take(DSM_CONSOLE_MAX + 1)
                    .read_to_end(&mut bytes)
                    .context("reading standard input")?;
                bytes
            } else {
                data.into_bytes()
            };
            if data.len() as u64 > DSM_CONSOLE_MAX {
                bail!("more than {DSM_CONSOLE_MAX} bytes to write; split the write");
            }
            (dir, DsmCommand::Write { segment, offset, data })
        }
        // The whole segment goes, whatever the length: a 0 typed for it (a helper's did) is
        // more likely a slip than a wish to wipe the segment.
        DsmOp::Free { len: 0, segment, .. } => bail!(
            "a length of 0: give segment {segment}'s length as the program made it; every page \
             of it is freed, whatever the length (nothing freed)"
        ),
        DsmOp::Free { dir, segment, len } => (dir, DsmCommand::Free { segment, len }),
        DsmOp::Discard { dir, segment, page } => (dir, DsmCommand::Discard { segment, page }),
        DsmOp::Lost { dir, json } => return dsm_lost(&dir, json),
        DsmOp::Forgive { dir, segment, page, .. } => {
            return dsm_forgive(&dir, segment.zip(page));
        }
    };
    let freed = match command {
        DsmCommand::Free { segment, .. } => Some(segment),
        _ => None,
    };
    let reading = matches!(command, DsmCommand::Read { .. });
    let body = gobelins::adaptation::codec::encode(&command)?;
    let answer = ask(&dir, ControlRequest::Local { service: gobelins::dsm::DSM.0, body })?;
    if reading {
        let bytes = control::answer_body(&answer)?;
        std::io::stdout().lock().write_all(&bytes)?;
    }
    if let Some(segment) = freed {
        eprintln!("segment {segment} freed on every node");
    }
    if let DsmCommand::Discard { segment, page } = command {
        if control::answer_body(&answer)? == [1] {
            eprintln!("page {page} of segment {segment} starts afresh from zeros");
        } else {
            eprintln!(
                "page {page} of segment {segment} is not lost (or was started afresh already): \
                 nothing discarded"
            );
        }
    }
    Ok(())
}

/// `gobelins dsm forgive`: of the slot of `page` (segment, page), or of every slot.
fn dsm_forgive(dir: &DirArgs, page: Option<(u32, u32)>) -> anyhow::Result<()> {
    use gobelins::adaptation::codec;
    use gobelins::builtin::DsmCommand;
    let command = DsmCommand::Forgive {
        segment: page.map_or(0, |(segment, _)| segment),
        page: page.map(|(_, page)| page),
    };
    let body = codec::encode(&command)?;
    let answer = ask(dir, ControlRequest::Local { service: gobelins::dsm::DSM.0, body })?;
    let (forgiven, reset): (u32, u64) = codec::decode(&control::answer_body(&answer)?)?;
    match page {
        Some((segment, page)) if forgiven == 0 => eprintln!(
            "the slot of page {page} of segment {segment} is not tainted: nothing to forgive"
        ),
        Some(_) => eprintln!(
            "the slot's taint is lifted: pages nobody reported read as zeros ({reset} reported \
             lost meanwhile are new again)"
        ),
        None if forgiven == 0 => eprintln!("no slot is tainted: nothing to forgive"),
        None => eprintln!(
            "{forgiven} tainted slots forgiven: pages nobody reported read as zeros ({reset} \
             reported lost meanwhile are new again)"
        ),
    }
    Ok(())
}

/// `gobelins dsm lost`: asks every node through the local agent, and says what it found.
fn dsm_lost(dir: &DirArgs, json: bool) -> anyhow::Result<()> {
    use gobelins::adaptation::codec;
    use gobelins::builtin::DsmCommand;
    let body = codec::encode(&DsmCommand::Losses)?;
    let answer = ask(dir, ControlRequest::Local { service: gobelins::dsm::DSM.0, body })?;
    let losses: gobelins::dsm::Losses = codec::decode(&control::answer_body(&answer)?)?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", losses_json(&losses))?;
    } else {
        write_losses(&mut out, &losses)?;
    }
    if !losses.settled {
        bail!("not every node answered, or the cluster changed meanwhile: the list may be incomplete; ask again");
    }
    Ok(())
}

/// Lines of pages `gobelins dsm lost` prints before it says how many more `--json` lists.
const LOST_LINES: usize = 200;

pub(super) fn write_losses(
    out: &mut impl std::io::Write,
    losses: &gobelins::dsm::Losses,
) -> anyhow::Result<()> {
    let pages = losses.pages();
    let lost = losses.lost();
    let tainted = losses.tainted();
    if lost == 0 && tainted > 0 {
        // Not a clean bill: a tainted slot's pages are found lost only as they are asked for.
        writeln!(out, "no page is reported lost yet, but slots are tainted (below)")?;
    } else if lost == 0 {
        writeln!(out, "no page is reported lost")?;
    } else {
        writeln!(
            out,
            "{lost} pages reported lost (each answers `lost` until discarded or freed, or, if \
             its slot is tainted, forgiven):"
        )?;
        for (page, manager) in pages.iter().take(LOST_LINES) {
            writeln!(
                out,
                "  segment {} page {} (manager: node {})",
                page.segment, page.page, manager.0
            )?;
        }
        let unlisted = lost - pages.len().min(LOST_LINES) as u64;
        if unlisted > 0 {
            writeln!(out, "  ... and {unlisted} more (`--json` lists up to 65,536 a node)")?;
        }
    }
    if tainted > 0 {
        let by_node: Vec<String> = losses
            .nodes
            .iter()
            .filter(|(_, held)| !held.tainted.is_empty())
            .map(|(node, held)| format!("node {}: {}", node.0, held.tainted.len()))
            .collect();
        writeln!(
            out,
            "{tainted} of {} slots tainted ({}): their manager failed, and a page of theirs that \
             no node reported then reads as lost when first asked for, unless its segment was \
             freed since (which pages, nobody can tell until they are asked for)",
            gobelins::dsm::DSM_SLOTS,
            by_node.join(", ")
        )?;
    }
    if lost > 0 || tainted > 0 {
        // The forgive only where there is a taint to lift: it does nothing else.
        let forgive = if tainted > 0 {
            "; for the tainted slots, `gobelins dsm forgive --all` (or `SEGMENT PAGE`, for one \
             page's slot)"
        } else {
            ""
        };
        writeln!(
            out,
            "what to do: restore what mattered, then `gobelins dsm discard SEGMENT PAGE` for each \
             page, or `gobelins dsm free SEGMENT LEN` for a segment no program uses{forgive}"
        )?;
    }
    let unlooked = losses.unlooked();
    if unlooked > 0 {
        writeln!(out, "{unlooked} entries were held by requests and not looked at: ask again")?;
    }
    for (node, why) in &losses.unanswered {
        writeln!(out, "node {} did not answer: {why}", node.0)?;
    }
    writeln!(out, "epoch {}: {} nodes answered", losses.epoch, losses.nodes.len())?;
    Ok(())
}

pub(super) fn losses_json(losses: &gobelins::dsm::Losses) -> Value {
    let pages: Vec<Value> = losses
        .pages()
        .into_iter()
        .map(|(p, m)| serde_json::json!({ "segment": p.segment, "page": p.page, "manager": m.0 }))
        .collect();
    let nodes: Vec<Value> = losses
        .nodes
        .iter()
        .map(|(node, held)| {
            serde_json::json!({ "node": node.0, "lost_pages": held.pages.len() as u64 + held.unlisted,
                "tainted_slots": held.tainted.len(), "unlooked": held.unlooked })
        })
        .collect();
    let unanswered: Vec<Value> = losses
        .unanswered
        .iter()
        .map(|(node, why)| serde_json::json!({ "node": node.0, "why": why }))
        .collect();
    serde_json::json!({ "epoch": losses.epoch, "settled": losses.settled, "lost": losses.lost(),
        "pages": pages, "tainted": losses.tainted(), "unlooked": losses.unlooked(),
        "nodes": nodes, "unanswered": unanswered })
}
