//! `gobelins kv`: the example directory's keys, read, written and forgiven their losses.

use super::{ask, runtime, DirArgs};
use anyhow::{bail, Context};
use clap::Args;
use gobelins_supervisor::control::{self, ControlRequest};
use std::io::Write as _;

/// Options of `gobelins kv`.
#[derive(Args, Debug)]
pub(crate) struct KvArgs {
    #[command(subcommand)]
    op: KvOp,
}

#[derive(clap::Subcommand, Debug)]
pub(super) enum KvOp {
    /// Print a key's value to standard output, as it is, from the key's manager.
    Get {
        #[command(flatten)]
        dir: DirArgs,
        /// The key: a whole number below 2^63 (kvdir keeps the keys from 2^63 up for itself).
        key: u64,
    },
    /// Store a value under a key: the text given, or standard input with `-`.
    Put {
        #[command(flatten)]
        dir: DirArgs,
        /// The key: a whole number below 2^63 (kvdir keeps the keys from 2^63 up for itself).
        key: u64,
        /// The value, as text; `-` reads it from standard input (at most 4 MiB).
        value: String,
    },
    /// Accept that the entries of the key's slot that kvdir reported lost are gone: the keys
    /// the slot lacks read as absent again, not as lost. Use it once what mattered is restored
    /// (the agents' log names the slots; `gobelins stats` counts them).
    Forgive {
        #[command(flatten)]
        dir: DirArgs,
        /// Any key of the slot.
        #[arg(required_unless_present = "all")]
        key: Option<u64>,
        /// Every slot, a few at a time: after every node of the cluster stopped at once (a
        /// power cut), when every key reads as lost. Slots that lost nothing are left as they
        /// are.
        #[arg(long, conflicts_with = "key")]
        all: bool,
    },
}

/// `kv get` of a key that surely has no value: exit status 1, as `grep` says it found nothing,
/// so that a script tells it from an error or a reported loss (status 2).
#[derive(Debug)]
pub(crate) struct NoValue(u64);

impl std::fmt::Display for NoValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key {} has no value", self.0)
    }
}

impl std::error::Error for NoValue {}

impl KvArgs {
    /// Whether this is `kv get`, whose errors exit with status 2 (1 says "no value").
    pub(crate) fn is_get(&self) -> bool {
        matches!(self.op, KvOp::Get { .. })
    }
}

/// Forgives every slot of kvdir through the agent of `dir`, with a key of each, found by
/// walking the keys from 0: a slot's keys are spread by a hash.
fn forgive_all(dir: &DirArgs) -> anyhow::Result<()> {
    use gobelins::kvdir::{KvDir, Request, Response, KVDIR};
    use gobelins::locator::Key;
    let spec = KvDir::declaration();
    let mut of_slot: Vec<Option<u64>> = vec![None; spec.slots as usize];
    let mut missing = of_slot.len();
    for key in 0u64.. {
        let slot = &mut of_slot[spec.slot_of(Key(key)) as usize];
        if slot.is_none() {
            *slot = Some(key);
            missing -= 1;
            if missing == 0 {
                break;
            }
        }
    }
    let body = gobelins::adaptation::codec::encode(&Request::Forgive)?;
    let socket = dir.data_dir.join("control.sock");
    let forgive = |key: u64| {
        let (socket, body) = (socket.clone(), body.clone());
        async move {
            let call = ControlRequest::Call { service: KVDIR.0, key, body };
            let answer = control::request(&socket, &call, |_| {}).await?;
            let bytes = control::answer_body(&answer)?;
            match gobelins::adaptation::codec::decode::<Response>(&bytes)? {
                Response::Forgiven => Ok(()),
                other => bail!("key {key}: unexpected answer {other:?}"),
            }
        }
    };
    let mut keys = of_slot.into_iter().flatten();
    let first = keys.next().context("kvdir has slots")?;
    let failed = runtime()?.block_on(async {
        // One alone first: an agent not running, or a cluster not there yet, says so once.
        forgive(first).await?;
        let mut asked = tokio::task::JoinSet::new();
        let mut failed: Vec<anyhow::Error> = Vec::new();
        let mut note = |done: Result<anyhow::Result<()>, tokio::task::JoinError>| match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(e),
            Err(e) => failed.push(e.into()),
        };
        for key in keys {
            if asked.len() >= 16 {
                if let Some(done) = asked.join_next().await {
                    note(done);
                }
            }
            asked.spawn(forgive(key));
        }
        while let Some(done) = asked.join_next().await {
            note(done);
        }
        anyhow::Ok(failed)
    })?;
    if let Some(first) = failed.first() {
        bail!(
            "{} of {} slots were not forgiven (the first: {first:#}); run it again once the \
             cluster is stable",
            failed.len(),
            spec.slots
        );
    }
    eprintln!("every one of kvdir's {} slots reads the keys it lacks as absent", spec.slots);
    Ok(())
}

pub(crate) fn kv(args: KvArgs) -> anyhow::Result<()> {
    use gobelins::kvdir::{Request, Response, KVDIR, MAX_VALUE, RESERVED};
    use std::io::Read as _;
    if let KvOp::Forgive { dir, key: None, .. } = &args.op {
        return forgive_all(dir);
    }
    let (dir, key, request) = match args.op {
        KvOp::Get { dir, key } => (dir, key, Request::Get),
        KvOp::Put { dir, key, value } => {
            let value = if value == "-" {
                let mut bytes = Vec::new();
                std::io::stdin()
                    .take(MAX_VALUE as u64 + 1)
                    .read_to_end(&mut bytes)
                    .context("reading standard input")?;
                bytes
            } else {
                value.into_bytes()
            };
            if value.len() > MAX_VALUE {
                bail!(
                    "the value is larger than kvdir's limit of {MAX_VALUE} bytes; nothing stored"
                );
            }
            (dir, key, Request::Put(value))
        }
        KvOp::Forgive { dir, key, .. } => {
            (dir, key.context("a key to forgive the slot of, or --all")?, Request::Forgive)
        }
    };
    let body = gobelins::adaptation::codec::encode(&request)?;
    let answer = ask(&dir, ControlRequest::Call { service: KVDIR.0, key, body })?;
    let bytes = control::answer_body(&answer)?;
    match gobelins::adaptation::codec::decode::<Response>(&bytes)? {
        Response::Value(Some(entry)) => std::io::stdout().lock().write_all(&entry.value)?,
        Response::Value(None) => return Err(NoValue(key).into()),
        Response::Lost => bail!(
            "key {key} has no value, and its slot lost entries in a failure: it may have had one. \
             Write it again, or `gobelins kv forgive {key}` once what mattered is restored"
        ),
        Response::Stored { version } => eprintln!("key {key} stored at version {version}"),
        Response::Forgiven => {
            eprintln!("key {key}'s slot reads the keys it lacks as absent (none is lost)")
        }
        Response::TooLarge { max } => bail!("the value is larger than {max} bytes; nothing stored"),
        Response::Reserved => bail!("keys from {RESERVED} up are kvdir's own"),
        other => bail!("unexpected answer from key {key}'s manager: {other:?}"),
    }
    Ok(())
}
