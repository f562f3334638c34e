//! What an agent is doing while it enters the cluster, for its control socket to say.

use std::sync::{Arc, Mutex};
use tokio::time::Instant;

/// Shared between the agent that enters the cluster and the control socket that answers
/// meanwhile: what it is doing and since when, until [`Entering::done`].
#[derive(Clone, Debug)]
pub struct Entering(Arc<Mutex<Option<(String, Instant)>>>);

impl Entering {
    /// Entering the cluster, doing `what` ("joining the cluster through 10.0.0.1:7401").
    pub fn new(what: String) -> Entering {
        Entering(Arc::new(Mutex::new(Some((what, Instant::now())))))
    }

    /// Now doing `what`, still entering; the time it has taken runs on.
    pub fn now_doing(&self, what: String) {
        if let Some((doing, _)) = self.0.lock().expect("entering").as_mut() {
            *doing = what;
        }
    }

    /// The node has entered the cluster.
    pub fn done(&self) {
        *self.0.lock().expect("entering") = None;
    }

    /// What the node is doing and for how long, while it enters; `None` once it has.
    pub fn now(&self) -> Option<String> {
        let entering = self.0.lock().expect("entering");
        entering.as_ref().map(|(what, since)| format!("{what} ({} s)", since.elapsed().as_secs()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn says_what_it_does_and_since_when_until_done() {
        let entering = Entering::new("joining the cluster through a:1".into());
        tokio::time::advance(std::time::Duration::from_secs(12)).await;
        assert_eq!(
            entering.clone().now().as_deref(),
            Some("joining the cluster through a:1 (12 s)")
        );
        entering.now_doing("waiting to be admitted".into());
        tokio::time::advance(std::time::Duration::from_secs(3)).await;
        assert_eq!(entering.now().as_deref(), Some("waiting to be admitted (15 s)"));
        entering.done();
        assert_eq!(entering.now(), None);
        entering.now_doing("too late".into());
        assert_eq!(entering.now(), None);
    }
}
