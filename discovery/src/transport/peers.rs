//! The per-peer loopback relay sockets and the two maps that pair them with peers.
//!
//! Each remote peer address gets one socket bound on 127.0.0.1 and `connect()`ed to the
//! codec socket. The kernel then drops anything sent to it by anyone else, so no local
//! process can use a relay to get plaintext sealed (an encryption oracle), and a datagram
//! the codec socket receives from a relay's address names its peer exactly.
//!
//! Owns relay lifetime: created on first use, at most `max_relays`, idle ones closed. It
//! never creates a relay for a source that has not authenticated; the caller guarantees it.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Relays kept at most; past this the least recently used is closed.
pub(crate) const MAX_RELAYS: usize = 4_096;
/// A relay unused this long is closed. chitchat keeps gossiping to dead nodes for the
/// dead-node grace period, so this only reclaims peers gone from chitchat's state.
pub(crate) const RELAY_IDLE: Duration = Duration::from_secs(300);

/// One peer's relay socket.
pub(crate) struct Relay {
    pub(crate) socket: tokio::net::UdpSocket,
    pub(crate) local_addr: SocketAddr,
    last_used: Instant,
}

/// Peer address ↔ relay socket, both ways.
pub(crate) struct RelayTable {
    codec_addr: SocketAddr,
    max_relays: usize,
    idle: Duration,
    by_peer: HashMap<SocketAddr, Relay>,
    by_relay: HashMap<SocketAddr, SocketAddr>,
    last_sweep: Instant,
}

impl RelayTable {
    /// An empty table whose relays talk to the codec socket at `codec_addr`.
    pub(crate) fn new(codec_addr: SocketAddr, max_relays: usize, idle: Duration) -> Self {
        RelayTable {
            codec_addr,
            max_relays: max_relays.max(1),
            idle,
            by_peer: HashMap::new(),
            by_relay: HashMap::new(),
            last_sweep: Instant::now(),
        }
    }

    /// The relay for `peer`, created if needed (needs a tokio runtime). Marks it used.
    pub(crate) fn get_or_create(&mut self, peer: SocketAddr, now: Instant) -> io::Result<&Relay> {
        self.sweep(now);
        if !self.by_peer.contains_key(&peer) {
            if self.by_peer.len() >= self.max_relays {
                self.evict_least_recent();
            }
            let relay = self.bind_relay(now)?;
            self.by_relay.insert(relay.local_addr, peer);
            self.by_peer.insert(peer, relay);
        }
        let relay = self
            .by_peer
            .get_mut(&peer)
            .ok_or_else(|| io::Error::other("relay vanished from the table"))?;
        relay.last_used = now;
        Ok(relay)
    }

    /// The peer whose relay has local address `relay_addr`, if it is one of ours.
    pub(crate) fn peer_of(&self, relay_addr: SocketAddr) -> Option<SocketAddr> {
        self.by_relay.get(&relay_addr).copied()
    }

    /// Closes `peer`'s relay, for instance after it misbehaved.
    pub(crate) fn remove(&mut self, peer: SocketAddr) {
        if let Some(relay) = self.by_peer.remove(&peer) {
            self.by_relay.remove(&relay.local_addr);
        }
    }

    /// Number of open relays.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_peer.len()
    }

    fn bind_relay(&self, now: Instant) -> io::Result<Relay> {
        let std_socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        std_socket.connect(self.codec_addr)?;
        std_socket.set_nonblocking(true)?;
        let local_addr = std_socket.local_addr()?;
        Ok(Relay {
            socket: tokio::net::UdpSocket::from_std(std_socket)?,
            local_addr,
            last_used: now,
        })
    }

    fn evict_least_recent(&mut self) {
        let oldest = self
            .by_peer
            .iter()
            .min_by_key(|(_, relay)| relay.last_used)
            .map(|(peer, _)| *peer);
        if let Some(peer) = oldest {
            self.remove(peer);
        }
    }

    /// Closes idle relays, at most ten times per idle period so the packet path stays cheap.
    fn sweep(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_sweep) < self.idle / 10 {
            return;
        }
        self.last_sweep = now;
        let idle = self.idle;
        let by_relay = &mut self.by_relay;
        self.by_peer.retain(|_, relay| {
            let keep = now.saturating_duration_since(relay.last_used) < idle;
            if !keep {
                by_relay.remove(&relay.local_addr);
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[tokio::test]
    async fn relay_is_reused_and_maps_back_to_its_peer() {
        let codec = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut table = RelayTable::new(codec.local_addr().unwrap(), 8, RELAY_IDLE);
        let now = Instant::now();
        let a = table.get_or_create(peer(1), now).unwrap().local_addr;
        let b = table.get_or_create(peer(2), now).unwrap().local_addr;
        assert_ne!(a, b);
        assert_eq!(table.get_or_create(peer(1), now).unwrap().local_addr, a);
        assert_eq!(table.peer_of(a), Some(peer(1)));
        assert_eq!(table.peer_of(b), Some(peer(2)));
        assert_eq!(table.peer_of(codec.local_addr().unwrap()), None);
        table.remove(peer(1));
        assert_eq!(table.peer_of(a), None);
        assert_eq!(table.len(), 1);
    }

    #[tokio::test]
    async fn relay_accepts_only_the_codec_socket() {
        let codec = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut table = RelayTable::new(codec.local_addr().unwrap(), 8, RELAY_IDLE);
        let relay_addr = table
            .get_or_create(peer(1), Instant::now())
            .unwrap()
            .local_addr;
        let intruder = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        intruder.send_to(b"seal me", relay_addr).unwrap();
        codec.send_to(b"from codec", relay_addr).unwrap();
        let relay = table.get_or_create(peer(1), Instant::now()).unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), relay.socket.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            &buf[..n],
            b"from codec",
            "the kernel must drop the intruder's datagram"
        );
    }

    #[tokio::test]
    async fn table_is_capped_and_evicts_the_least_recently_used() {
        let codec = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut table = RelayTable::new(codec.local_addr().unwrap(), 3, RELAY_IDLE);
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let first = table.get_or_create(peer(1), at(1)).unwrap().local_addr;
        table.get_or_create(peer(2), at(2)).unwrap();
        table.get_or_create(peer(3), at(3)).unwrap();
        table.get_or_create(peer(1), at(4)).unwrap();
        table.get_or_create(peer(4), at(5)).unwrap();
        assert_eq!(table.len(), 3);
        assert_eq!(
            table.peer_of(first),
            Some(peer(1)),
            "recently used survives"
        );
        assert!(table.by_peer.contains_key(&peer(4)));
        assert!(
            !table.by_peer.contains_key(&peer(2)),
            "least recently used goes"
        );
        assert_eq!(table.by_relay.len(), 3);
    }

    #[tokio::test]
    async fn idle_relays_are_closed() {
        let codec = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let idle = Duration::from_secs(10);
        let mut table = RelayTable::new(codec.local_addr().unwrap(), 8, idle);
        let start = Instant::now();
        let old = table.get_or_create(peer(1), start).unwrap().local_addr;
        table
            .get_or_create(peer(2), start + Duration::from_secs(8))
            .unwrap();
        table
            .get_or_create(peer(3), start + Duration::from_secs(11))
            .unwrap();
        assert_eq!(table.peer_of(old), None);
        assert_eq!(table.len(), 2);
    }
}
