//! `gobelins plan`: what a change would move, shown before anyone asks for it, as operators of
//! Riak Core expect (DESIGN.md, "Locator", plans). Nothing is carried out.

use super::{ask, labels, DirArgs};
use clap::{Args, Subcommand};
use gobelins_locator::{Change, NodeId};
use gobelins_supervisor::control::{ControlRequest, PlanAsk};
use gobelins_supervisor::preview::{Preview, Previewed};
use std::fmt::Write as _;

/// Options of `gobelins plan`.
#[derive(Args, Debug)]
pub(crate) struct PlanArgs {
    #[command(subcommand)]
    change: PlanOf,
}

/// The change to plan.
#[derive(Subcommand, Debug)]
enum PlanOf {
    /// A new node joining with these labels (`gobelins agent --join`)
    Join {
        /// A label of the new node, such as zone=a (repeatable), as its agent would be given.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// The new node's id, as its agent would be given (`--node-id`): which node keeps
        /// another's replicas follows the order of ids. Without it, the id after the highest.
        #[arg(long)]
        node_id: Option<u64>,
        #[command(flatten)]
        out: Out,
    },
    /// The node this agent runs on leaving (`gobelins leave`)
    Leave {
        #[command(flatten)]
        out: Out,
    },
    /// Another node evicted (`gobelins evict NODE`)
    Evict {
        /// The node.
        node: u64,
        #[command(flatten)]
        out: Out,
    },
    /// A node failing now: what the others would rebuild, and from what
    Fail {
        /// The node.
        node: u64,
        #[command(flatten)]
        out: Out,
    },
}

/// Where to ask, and how to answer.
#[derive(Args, Debug)]
struct Out {
    #[command(flatten)]
    dir: DirArgs,
    /// The plan as one JSON object: `preview` (its `outcome`: `begins`, with the plan;
    /// `nothing`; or `unknown`, with the change ahead that could not be played out) and
    /// `own_view` (no leader answered, or the leader hears from no majority: the view may be
    /// stale).
    #[arg(long)]
    json: bool,
}

pub(crate) fn plan(args: PlanArgs) -> anyhow::Result<()> {
    let (ask_for, out) = match args.change {
        PlanOf::Join { labels: texts, node_id, out } => {
            (PlanAsk::Join { labels: labels(&texts)?, node: node_id }, out)
        }
        PlanOf::Leave { out } => (PlanAsk::Leave, out),
        PlanOf::Evict { node, out } => (PlanAsk::Evict { node }, out),
        PlanOf::Fail { node, out } => (PlanAsk::Fail { node }, out),
    };
    let answer = ask(&out.dir, ControlRequest::Plan { change: ask_for.clone() })?;
    if out.json {
        println!("{answer}");
        return Ok(());
    }
    if answer["own_view"] == true {
        println!(
            "no leader answered, or the leader hears from no majority: this view of the cluster may be stale"
        );
    }
    match serde_json::from_value(answer["preview"].clone())? {
        Previewed::Begins(preview) => print!("{}", plan_text(&preview, &ask_for)),
        Previewed::Nothing => println!(
            "it would begin no change now: nothing would move (a change may wait its turn: \
             `gobelins status` shows what is queued)"
        ),
        Previewed::Unknown { stuck } => println!(
            "cannot tell: the change ahead of it, {stuck}, could not be played out to its end; \
             ask again once `gobelins status` shows the cluster stable"
        ),
    }
    Ok(())
}

/// What `gobelins plan` prints of the preview of the change `asked` for.
fn plan_text(preview: &Preview, asked: &PlanAsk) -> String {
    let mut out = String::new();
    let change = match (&preview.change, asked) {
        // The cluster records a leave as the eviction of the leaver.
        (Change::Evict(node), PlanAsk::Leave) => {
            format!("{node} leaving (the cluster's change: evict {node})")
        }
        (change, _) => change.to_string(),
    };
    let _ = writeln!(
        out,
        "{change}: the cluster is at epoch {}; this would be epoch {}",
        preview.epoch_now, preview.epoch
    );
    if let (Change::Add { node, .. }, PlanAsk::Join { node: None, .. }) = (&preview.change, asked) {
        let _ = writeln!(
            out,
            "  ({node} stands for the new node: who keeps replicas follows the ids; --node-id gives the real one)"
        );
    }
    if !preview.ahead.is_empty() {
        let ahead: Vec<String> = preview.ahead.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "  after: {} (each change's plan is made as it begins, against what those before it left)",
            ahead.join(", ")
        );
    }
    let senders = preview.plan.senders();
    let receivers = preview.plan.receivers();
    if let Change::Fail(dead) | Change::Recover(dead) = preview.change {
        let _ = writeln!(
            out,
            "  rebuild: {} ({dead} sends nothing: each slot's new manager rebuilds it from what the survivors hold)",
            names(receivers.iter().copied())
        );
    } else {
        let _ = writeln!(out, "  send: {}", names(senders.iter().copied()));
        let _ = writeln!(out, "  receive: {}", names(receivers.iter().copied()));
    }
    let besides: Vec<NodeId> = (preview.participants.iter().map(|&n| NodeId(n)))
        .filter(|n| !senders.contains(n) && !receivers.contains(n))
        .collect();
    if !besides.is_empty() {
        let besides = names(besides);
        let _ = writeln!(out, "  also taking part: {besides} (for the replicas they keep or hold)");
    }
    let _ = writeln!(out, "  {} slots change manager", preview.plan.moved_slots());
    // The locator's own account, but for its first line, which the lines above say better.
    let plan = preview.plan.to_string();
    for line in plan.lines().skip(1) {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "nothing was carried out");
    out
}

/// A preview in one line, for the demo: who sends and who receives (or rebuilds), and how
/// many slots change manager.
pub(crate) fn one_line(preview: &Preview) -> String {
    let who = match preview.change {
        Change::Fail(_) | Change::Recover(_) => {
            format!("rebuild {}", names(preview.plan.receivers()))
        }
        _ => format!(
            "send {}, receive {}",
            names(preview.plan.senders()),
            names(preview.plan.receivers())
        ),
    };
    let services = preview.plan.services.iter().filter(|s| !s.moves.is_empty()).count();
    let of = if services == 1 { "1 service".to_string() } else { format!("{services} services") };
    format!("{who}: {} slots of {of} change manager", preview.plan.moved_slots())
}

/// Nodes as `n1 n2`, or `none`.
fn names(nodes: impl IntoIterator<Item = NodeId>) -> String {
    let names: Vec<String> = nodes.into_iter().map(|n| n.to_string()).collect();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gobelins_locator::{Epoch, MigrationPlan, ServiceId, ServicePlan, SlotMove};
    use std::collections::BTreeSet;

    #[test]
    fn a_plan_says_the_change_what_runs_before_it_who_sends_and_receives_and_what_moves() {
        let preview = Preview {
            epoch_now: 7,
            ahead: vec![Change::Fail(NodeId(5))],
            change: Change::Evict(NodeId(3)),
            epoch: 9,
            participants: BTreeSet::from([1, 2, 3]),
            plan: MigrationPlan {
                from: Epoch(8),
                to: Epoch(9),
                services: vec![ServicePlan {
                    service: ServiceId(1),
                    name: "kvdir".into(),
                    moves: vec![SlotMove { slots: 10..20, from: NodeId(3), to: NodeId(1) }],
                }],
                participants: BTreeSet::from([NodeId(1), NodeId(3)]),
            },
        };
        let text = plan_text(&preview, &PlanAsk::Evict { node: 3 });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0], "evict n3: the cluster is at epoch 7; this would be epoch 9",
            "{text}"
        );
        assert!(lines[1].contains("after: fail n5"), "{text}");
        assert_eq!(lines[2], "  send: n3", "{text}");
        assert_eq!(lines[3], "  receive: n1", "{text}");
        assert_eq!(
            lines[4], "  also taking part: n2 (for the replicas they keep or hold)",
            "{text}"
        );
        assert_eq!(lines[5], "  10 slots change manager", "{text}");
        assert!(lines[6].contains("kvdir: 10 slots"), "{text}");
        assert!(lines[7].contains("n3 -> n1: 10 slots in 10..20"), "{text}");
        assert_eq!(lines.last(), Some(&"nothing was carried out"));
        assert_eq!(one_line(&preview), "send n3, receive n1: 10 slots of 1 service change manager");
        // Asked through the leaver, and of a failure.
        let text = plan_text(&preview, &PlanAsk::Leave);
        assert!(text.starts_with("n3 leaving (the cluster's change: evict n3): "), "{text}");
        let joining = Change::Add { node: NodeId(9), labels: Default::default() };
        let joined = Preview { change: joining, ..preview.clone() };
        let text = plan_text(&joined, &PlanAsk::Join { labels: Default::default(), node: None });
        assert!(text.contains("\n  (n9 stands for the new node"), "{text}");
        let failed = Preview { change: Change::Fail(NodeId(3)), ..preview };
        let text = plan_text(&failed, &PlanAsk::Fail { node: 3 });
        assert!(text.contains("  rebuild: n1 (n3 sends nothing"), "{text}");
        assert!(!text.contains("  send:"), "{text}");
        assert_eq!(one_line(&failed), "rebuild n1: 10 slots of 1 service change manager");
    }
}
