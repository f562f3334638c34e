//! Handshakes in progress, per source address and in all. One host that opens connections and
//! says nothing must not take every handshake slot, and with them every join and reconnection;
//! nor must a few hosts that each take their share. When every slot is taken, a newcomer from
//! a quieter address takes the oldest slot of the busiest one, if that handshake has already
//! lasted a while: a peer that holds the secret ends its own in a few round trips, so only
//! ones that stall are ever ended.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Counts the handshakes in progress from each source address and in all, up to a limit each.
pub(crate) struct Sources {
    per_source: usize,
    all: usize,
    /// How long a handshake must have lasted before a newcomer may end it.
    floor: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next: u64,
    /// Per source; `None` for peers on another kind of network, which share one count.
    counts: HashMap<Option<IpAddr>, usize>,
    /// In progress, oldest first: the source, what ends the handshake when it is evicted, and
    /// when it began.
    pending: BTreeMap<u64, (Option<IpAddr>, CancellationToken, Instant)>,
}

/// Why a connection got no handshake slot.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Busy {
    /// Its address has its share in progress already.
    Source,
    /// Every slot is taken, by addresses with no more in progress than this one would have,
    /// or by handshakes too young to end.
    All,
}

/// One handshake counted against its source; uncounted when dropped.
pub(crate) struct Counted {
    sources: Arc<Sources>,
    seq: u64,
    evicted: CancellationToken,
}

/// A slot given, and the source whose oldest handshake was ended to make room for it.
pub(crate) struct Admitted {
    /// The slot, held for the handshake.
    pub(crate) counted: Counted,
    /// The address whose handshake was evicted, if one was.
    pub(crate) evicted: Option<String>,
}

impl Sources {
    pub(crate) fn new(per_source: usize, all: usize, floor: Duration) -> Arc<Sources> {
        Arc::new(Sources { per_source, all, floor, state: Mutex::default() })
    }

    /// Counts a handshake from `peer` (an `ip:port`). A peer whose address does not parse
    /// (another kind of network) is not limited on its own, only in all.
    pub(crate) fn admit(self: &Arc<Self>, peer: &str) -> Result<Admitted, Busy> {
        let ip = peer.parse::<SocketAddr>().ok().map(|addr| source(addr.ip()));
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mine = state.counts.get(&ip).copied().unwrap_or(0);
        if ip.is_some() && mine >= self.per_source {
            return Err(Busy::Source);
        }
        let mut evicted = None;
        let now = Instant::now();
        if state.pending.len() >= self.all {
            let busiest = state.counts.values().copied().max().unwrap_or(0);
            // Only from an address with at least as many as the newcomer's would have: not
            // from its own, nor from a quieter one.
            if busiest <= mine {
                return Err(Busy::All);
            }
            let old_enough = |began: Instant| now.saturating_duration_since(began) >= self.floor;
            let victim = state
                .pending
                .iter()
                .find(|(_, (from, _, began))| {
                    state.counts.get(from) == Some(&busiest) && old_enough(*began)
                })
                .map(|(&seq, _)| seq)
                .ok_or(Busy::All)?;
            let (from, ends, _) = state.pending.remove(&victim).expect("found just now");
            ends.cancel();
            state.uncount(from);
            evicted =
                Some(from.map_or_else(|| "another kind of network".into(), |ip| ip.to_string()));
        }
        let seq = state.next;
        state.next += 1;
        let ends = CancellationToken::new();
        state.pending.insert(seq, (ip, ends.clone(), now));
        *state.counts.entry(ip).or_default() += 1;
        let counted = Counted { sources: Arc::clone(self), seq, evicted: ends };
        Ok(Admitted { counted, evicted })
    }
}

impl State {
    fn uncount(&mut self, from: Option<IpAddr>) {
        if let Some(count) = self.counts.get_mut(&from) {
            *count -= 1;
            if *count == 0 {
                self.counts.remove(&from);
            }
        }
    }
}

impl Counted {
    /// Resolves when this handshake's slot was given to a newcomer: the handshake must end.
    pub(crate) async fn evicted(&self) {
        self.evicted.cancelled().await
    }
}

/// What a handshake counts against: an IPv4 address, or the /64 of an IPv6 one, since one
/// host commonly holds a whole /64: counted address by address, it took every slot, eight at
/// a time. An IPv4 address mapped into IPv6 counts as itself.
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut state = self.sources.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((from, _, _)) = state.pending.remove(&self.seq) {
            state.uncount(from);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(sources: &Arc<Sources>, peer: &str) -> Option<Counted> {
        sources.admit(peer).ok().map(|a| a.counted)
    }

    #[test]
    fn a_source_gets_its_limit_and_no_more_and_others_are_not_counted_against_it() {
        let sources = Sources::new(2, 64, Duration::ZERO);
        let first = admit(&sources, "10.0.0.1:4000").expect("first");
        let _second = admit(&sources, "10.0.0.1:4001").expect("second");
        assert_eq!(sources.admit("10.0.0.1:4002").err(), Some(Busy::Source), "a third");
        assert!(admit(&sources, "10.0.0.2:4000").is_some(), "another host");
        drop(first);
        assert!(admit(&sources, "10.0.0.1:4003").is_some(), "a slot freed");
        assert!(admit(&sources, "not an address").is_some(), "another kind of network");
    }

    #[test]
    fn a_source_with_nothing_in_progress_is_forgotten() {
        let sources = Sources::new(1, 64, Duration::ZERO);
        drop(admit(&sources, "10.0.0.1:4000"));
        let state = sources.state.lock().unwrap();
        assert!(state.counts.is_empty() && state.pending.is_empty());
    }

    #[test]
    fn the_addresses_of_one_ipv6_64_count_as_one_source() {
        let sources = Sources::new(2, 64, Duration::ZERO);
        let _a = admit(&sources, "[2001:db8:1:2::1]:4000").expect("first");
        let _b = admit(&sources, "[2001:db8:1:2:ffff::9]:4000").expect("second, same /64");
        assert!(admit(&sources, "[2001:db8:1:2::3]:4000").is_none(), "a third from that /64");
        assert!(admit(&sources, "[2001:db8:1:3::1]:4000").is_some(), "another /64");
        let _c = admit(&sources, "10.0.0.1:4000").expect("an IPv4 host");
        let _d = admit(&sources, "[::ffff:10.0.0.1]:4000").expect("the same host, mapped");
        assert!(admit(&sources, "10.0.0.1:4001").is_none(), "counted as one");
    }

    /// A handshake that began a moment ago is not ended for a newcomer: a peer that holds the
    /// secret ends its own in a few round trips, and must not lose it to a flood.
    #[tokio::test(start_paused = true)]
    async fn a_young_handshake_is_not_ended_for_a_newcomer() {
        let sources = Sources::new(2, 2, Duration::from_millis(500));
        let _a = admit(&sources, "10.0.0.1:1").expect("a slot");
        let _b = admit(&sources, "10.0.0.1:2").expect("a slot");
        assert_eq!(sources.admit("10.0.0.2:1").err(), Some(Busy::All), "both too young");
        tokio::time::advance(Duration::from_millis(500)).await;
        let admitted = sources.admit("10.0.0.2:1").expect("the oldest may go now");
        assert_eq!(admitted.evicted.as_deref(), Some("10.0.0.1"));
    }

    /// Hosts that each take their share of the slots and say nothing do not keep out a peer
    /// from another address: it takes the oldest slot of the busiest host.
    #[tokio::test]
    async fn with_every_slot_taken_a_newcomer_evicts_the_oldest_of_the_busiest_source() {
        let sources = Sources::new(2, 4, Duration::ZERO);
        let held: Vec<Counted> = ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.1:2", "10.0.0.2:2"]
            .iter()
            .map(|peer| admit(&sources, peer).expect("a slot"))
            .collect();
        let admitted = sources.admit("10.0.0.3:1").expect("the newcomer gets in");
        assert_eq!(admitted.evicted.as_deref(), Some("10.0.0.1"));
        held[0].evicted().await;
        for other in &held[1..] {
            assert!(!other.evicted.is_cancelled(), "one eviction for one newcomer");
        }
        // 10.0.0.2 is now the busiest, with two against one each for the others.
        let next = sources.admit("10.0.0.4:1").expect("another newcomer");
        assert_eq!(next.evicted.as_deref(), Some("10.0.0.2"));
        assert!(held[1].evicted.is_cancelled(), "10.0.0.2's oldest");
        // Every address has one: a new address takes the oldest slot of all, 10.0.0.1's.
        let fifth = sources.admit("10.0.0.5:1").expect("a fifth address");
        assert_eq!(fifth.evicted.as_deref(), Some("10.0.0.1"));
        assert!(held[2].evicted.is_cancelled());
        // An address with one already would evict one as busy as itself: it waits its turn.
        assert_eq!(sources.admit("10.0.0.2:3").err(), Some(Busy::All), "no busier than its own");
        drop(admitted);
        assert!(admit(&sources, "10.0.0.2:3").is_some(), "a slot freed");
        // An evicted handshake's slot is counted once: dropping it later frees nothing more.
        drop(held);
        let state = sources.state.lock().unwrap();
        assert_eq!(state.pending.len(), 2, "the two newcomers still held");
        assert_eq!(state.counts.values().sum::<usize>(), 2);
    }
}
