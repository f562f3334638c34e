//! The CLI's side of the control socket: a request sent, and the agent's answer read.

use super::session::too_long;
use super::{ControlRequest, MAX_REQUEST_LINE};
use crate::error::{Result, SupervisorError};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long the CLI waits for the agent's first answer line: for `status` and `stats`, which
/// ask the leader at most, and for the others, whose requests answer within the adaptation
/// layer's request deadline (10 s by default) or say at once that a change is being asked
/// for. Silence this long is an agent stopped (`SIGSTOP`), hung or overloaded, and a command
/// that hangs without a word helps no operator.
pub(super) const FIRST_LINE_PATIENCE: (Duration, Duration) =
    (Duration::from_secs(30), Duration::from_secs(60));

/// How long the CLI waits for the agent's first line before it says it is still waiting: a
/// command that sits silent for its whole patience looks hung to whoever typed it, when the
/// agent may only be serving other control connections (64 at a time) or a slow leader.
pub(super) const SLOW_NOTICE: Duration = Duration::from_secs(5);

/// How long the CLI waits between two later lines: a change's progress comes as it moves, and
/// again every 30 s while it does not, and the agent gives up on a change once nothing has
/// carried it on for [`CHANGE_DEADLINE`](super::membership::CHANGE_DEADLINE).
pub(super) const NEXT_LINE_PATIENCE: Duration = Duration::from_secs(90);

/// Sends `request` to the agent whose socket is `path` and calls `on_line` for each line of the
/// answer; returns the final `ok` value.
pub async fn request(
    path: &Path,
    request: &ControlRequest,
    on_line: impl FnMut(&str),
) -> Result<Value> {
    let mut stream = UnixStream::connect(path).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            "the agent runs as another user: run this command as that user, or as root"
        } else {
            "is `gobelins agent` running with this --data-dir? An agent whose node left, or \
             was evicted, has stopped: `gobelins status` through another member says so"
        };
        SupervisorError::io(format!("connecting to the agent at {} ({hint})", path.display()), e)
    })?;
    let mut body =
        serde_json::to_string(request).map_err(|e| SupervisorError::Codec(e.to_string()))?;
    if body.len() > MAX_REQUEST_LINE {
        return Err(SupervisorError::Agent(too_long(body.len())));
    }
    body.push('\n');
    let written = stream.write_all(body.as_bytes()).await;
    let first = match request {
        ControlRequest::Status { .. } | ControlRequest::Stats => FIRST_LINE_PATIENCE.0,
        _ => FIRST_LINE_PATIENCE.1,
    };
    let answer = read_answer(BufReader::new(stream), (first, NEXT_LINE_PATIENCE), on_line).await;
    let path = path.display().to_string();
    let answer = answer.map_err(|e| match e {
        SupervisorError::AgentSilent { after_s, .. } => {
            SupervisorError::AgentSilent { path, after_s }
        }
        SupervisorError::Closed => SupervisorError::AgentGone { path, taken: written.is_ok() },
        // Reset: it went away with the request unread (a socket closed with bytes still to
        // read resets its peer), so nothing was done.
        SupervisorError::Io { cause, .. } if gone(&cause) => {
            SupervisorError::AgentGone { path, taken: false }
        }
        other => other,
    });
    match written {
        Ok(()) => answer,
        // An agent that refused the request may have closed the socket before it was all
        // written: its answer, if it gave one, says why better than the broken pipe does.
        Err(error) => match answer {
            Err(refused @ (SupervisorError::Agent(_) | SupervisorError::AgentGone { .. })) => {
                Err(refused)
            }
            _ => Err(error.into()),
        },
    }
}

/// Whether `error` on the control socket means the agent closed it: it stopped, or left.
pub(super) fn gone(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    matches!(error.kind(), BrokenPipe | ConnectionReset | ConnectionAborted)
}

/// Reads the agent's answer: progress lines to `on_line`, then its result or its error.
/// Gives up after `(first, next)` of silence before the first line, or between two; tells
/// `on_line` after [`SLOW_NOTICE`] of silence before the first that it still waits.
pub(super) async fn read_answer(
    read: impl AsyncBufRead + Unpin,
    (first, next): (Duration, Duration),
    mut on_line: impl FnMut(&str),
) -> Result<Value> {
    let mut lines = read.lines();
    let mut patience = first;
    let mut notice = (SLOW_NOTICE < first).then_some(SLOW_NOTICE);
    let mut waited = Duration::ZERO;
    loop {
        // `next_line` is cancel safe: a wait cut short for the notice loses nothing read.
        let wait = notice.unwrap_or(patience - waited);
        let Ok(line) = tokio::time::timeout(wait, lines.next_line()).await else {
            if let Some(notice) = notice.take() {
                on_line(&format!(
                    "the agent has not answered in {} s: it may be serving other control \
                     connections or waiting on the leader, or be stopped or hung; waiting up \
                     to {} s in all",
                    notice.as_secs(),
                    patience.as_secs()
                ));
                waited = notice;
                continue;
            }
            let after_s = patience.as_secs();
            return Err(SupervisorError::AgentSilent { path: String::new(), after_s });
        };
        (notice, waited) = (None, Duration::ZERO);
        let Some(line) = line? else { break };
        patience = next;
        let value: Value =
            serde_json::from_str(&line).map_err(|e| SupervisorError::Codec(e.to_string()))?;
        if let Some(progress) = value.get("progress").and_then(Value::as_str) {
            on_line(progress);
        } else if let Some(error) = value.get("error").and_then(Value::as_str) {
            return Err(SupervisorError::Agent(error.to_string()));
        } else if let Some(ok) = value.get("ok") {
            return Ok(ok.clone());
        }
    }
    Err(SupervisorError::Closed)
}
