//! Handshakes in progress per source address: one host that opens connections and says
//! nothing must not take every handshake slot, and with them every join and reconnection.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

/// Counts the handshakes in progress from each source address, up to a limit each.
pub(crate) struct Sources {
    limit: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One handshake counted against its source; uncounted when dropped.
pub(crate) struct Counted {
    sources: Arc<Sources>,
    ip: Option<IpAddr>,
}

impl Sources {
    pub(crate) fn new(limit: usize) -> Arc<Sources> {
        Arc::new(Sources { limit, counts: Mutex::default() })
    }

    /// Counts a handshake from `peer` (an `ip:port`), or `None` if its address has `limit` in
    /// progress already. A peer whose address does not parse (another kind of network) is
    /// not limited.
    pub(crate) fn admit(self: &Arc<Self>, peer: &str) -> Option<Counted> {
        let Ok(addr) = peer.parse::<SocketAddr>() else {
            return Some(Counted { sources: Arc::clone(self), ip: None });
        };
        let ip = source(addr.ip());
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(ip).or_default();
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(Counted { sources: Arc::clone(self), ip: Some(ip) })
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
        let Some(ip) = self.ip else { return };
        let mut counts = self.sources.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_limit_and_no_more_and_others_are_not_counted_against_it() {
        let sources = Sources::new(2);
        let first = sources.admit("10.0.0.1:4000").expect("first");
        let _second = sources.admit("10.0.0.1:4001").expect("second");
        assert!(sources.admit("10.0.0.1:4002").is_none(), "a third from the same host");
        assert!(sources.admit("10.0.0.2:4000").is_some(), "another host");
        drop(first);
        assert!(sources.admit("10.0.0.1:4003").is_some(), "a slot freed");
        assert!(sources.admit("not an address").is_some(), "another kind of network");
    }

    #[test]
    fn a_source_with_nothing_in_progress_is_forgotten() {
        let sources = Sources::new(1);
        drop(sources.admit("10.0.0.1:4000"));
        assert!(sources.counts.lock().unwrap().is_empty());
    }

    #[test]
    fn the_addresses_of_one_ipv6_64_count_as_one_source() {
        let sources = Sources::new(2);
        let _a = sources.admit("[2001:db8:1:2::1]:4000").expect("first");
        let _b = sources.admit("[2001:db8:1:2:ffff::9]:4000").expect("second, same /64");
        assert!(sources.admit("[2001:db8:1:2::3]:4000").is_none(), "a third from that /64");
        assert!(sources.admit("[2001:db8:1:3::1]:4000").is_some(), "another /64");
        let _c = sources.admit("10.0.0.1:4000").expect("an IPv4 host");
        let _d = sources.admit("[::ffff:10.0.0.1]:4000").expect("the same host, mapped");
        assert!(sources.admit("10.0.0.1:4001").is_none(), "counted as one");
    }
}
