//! What one peer may cost the endpoint before and after it proves who it is: the admission
//! rules for incoming QUIC connections and the budget each protocol gets once its ALPN is
//! known. Pure decisions; `endpoint::serve` applies them.
//!
//! Every connection starts with a small budget (the server's initial QUIC transport
//! parameters: [`INITIAL_STREAMS`] streams, [`INITIAL_WINDOW`] bytes of flow-control credit),
//! because credit once granted cannot be taken back. A tunnel from a verified node is raised
//! to the tunnel budget right after the handshake; the other protocols keep a small one. A
//! connection without a client certificate (only a joining agent's CA request needs one) is
//! admitted only within [`MAX_UNAUTHENTICATED_PER_SOURCE`] per source address and
//! [`MAX_UNAUTHENTICATED`] in all, so a flood of them has a memory bound:
//! [`MAX_UNAUTHENTICATED`] × ([`INITIAL_WINDOW`] + about 40 KiB of connection state).

use std::collections::HashMap;
use std::net::IpAddr;

use weft_ca::tls::ALPN_CA;

use crate::agent::policy::ALPN_POLICY;
use crate::agent::revocation::ALPN_REVOCATIONS;
use crate::agent::stats::ALPN_STATS;
use crate::proxy::tunnel::ALPN_TUNNEL;

/// Concurrent bidirectional streams every connection may open before its ALPN is known.
pub const INITIAL_STREAMS: u32 = 4;
/// Flow-control credit (bytes, whole connection) every connection gets before its ALPN is
/// known.
pub const INITIAL_WINDOW: u32 = 128 * 1024;
/// Connections without a client certificate held at once from one source address.
pub const MAX_UNAUTHENTICATED_PER_SOURCE: u32 = 16;
/// Connections without a client certificate held at once in all.
pub const MAX_UNAUTHENTICATED: u32 = 512;
/// Handshakes in progress from one source address.
pub const MAX_HANDSHAKES_PER_SOURCE: u32 = 64;
/// Handshakes in progress above which clients whose address QUIC has not validated are
/// asked to prove it first (a Retry round trip), so spoofed sources cost no handshake.
pub const RETRY_ABOVE_HANDSHAKES: u32 = 64;
/// Handshakes in progress above which new ones are refused outright.
pub const MAX_HANDSHAKES: u32 = 1024;

/// What a connection may use once its protocol is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Concurrent bidirectional streams the peer may open.
    pub streams: u32,
    /// Flow-control credit for the whole connection, bytes.
    pub window: u32,
}

/// The budget of a connection speaking `alpn`.
pub fn budget(alpn: &[u8]) -> Budget {
    match alpn {
        // Many concurrent streams, windows sized to a LAN's bandwidth-delay product.
        ALPN_TUNNEL => Budget {
            streams: 16_384,
            window: 16 * 1024 * 1024,
        },
        // One request per stream, each at most weft_ca::protocol::MAX_MESSAGE bytes.
        ALPN_CA => Budget {
            streams: INITIAL_STREAMS,
            window: INITIAL_WINDOW,
        },
        // The fetching side sends nothing.
        ALPN_POLICY | ALPN_REVOCATIONS | ALPN_STATS => Budget {
            streams: 1,
            window: 1024,
        },
        _ => Budget {
            streams: 0,
            window: 0,
        },
    }
}

/// What to do with an incoming connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Handshake.
    Accept,
    /// Ask the client to prove its address first.
    Retry,
    /// Refuse: too many handshakes from this source.
    RefuseSource,
    /// Refuse: too many handshakes in all.
    RefuseLoad,
}

impl Admit {
    /// The `result` label of `weft_quic_admission_total`.
    pub fn as_label(self) -> &'static str {
        match self {
            Admit::Accept => "accepted",
            Admit::Retry => "retry",
            Admit::RefuseSource => "refused_source",
            Admit::RefuseLoad => "refused_load",
        }
    }
}

/// Counts per source address, for handshakes in progress and unauthenticated connections.
#[derive(Debug, Default)]
struct Counts {
    by_source: HashMap<IpAddr, u32>,
    total: u32,
}

impl Counts {
    fn of(&self, source: IpAddr) -> u32 {
        self.by_source.get(&source).copied().unwrap_or(0)
    }

    fn add(&mut self, source: IpAddr) {
        *self.by_source.entry(source).or_default() += 1;
        self.total += 1;
    }

    fn remove(&mut self, source: IpAddr) {
        if let Some(n) = self.by_source.get_mut(&source) {
            *n -= 1;
            self.total -= 1;
            if *n == 0 {
                self.by_source.remove(&source);
            }
        }
    }
}

/// The admission state of one endpoint.
#[derive(Debug, Default)]
pub struct Admission {
    handshakes: Counts,
    unauthenticated: Counts,
}

impl Admission {
    /// Decides an incoming attempt from `source` (`validated`: QUIC has proved the address,
    /// by a Retry or a token); an accepted one counts as a handshake in progress until
    /// [`Admission::handshake_done`].
    pub fn incoming(&mut self, source: IpAddr, validated: bool) -> Admit {
        let verdict = if self.handshakes.total >= MAX_HANDSHAKES {
            Admit::RefuseLoad
        } else if self.handshakes.of(source) >= MAX_HANDSHAKES_PER_SOURCE {
            Admit::RefuseSource
        } else if !validated && self.handshakes.total >= RETRY_ABOVE_HANDSHAKES {
            Admit::Retry
        } else {
            Admit::Accept
        };
        if verdict == Admit::Accept {
            self.handshakes.add(source);
        }
        verdict
    }

    /// A handshake from `source` ended (done or failed).
    pub fn handshake_done(&mut self, source: IpAddr) {
        self.handshakes.remove(source);
    }

    /// Admits a connection from `source` without a client certificate, or refuses it when
    /// its source or the endpoint holds as many as allowed; an admitted one counts until
    /// [`Admission::unauthenticated_closed`].
    pub fn unauthenticated(&mut self, source: IpAddr) -> bool {
        if self.unauthenticated.total >= MAX_UNAUTHENTICATED
            || self.unauthenticated.of(source) >= MAX_UNAUTHENTICATED_PER_SOURCE
        {
            return false;
        }
        self.unauthenticated.add(source);
        true
    }

    /// An admitted unauthenticated connection from `source` closed.
    pub fn unauthenticated_closed(&mut self, source: IpAddr) {
        self.unauthenticated.remove(source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn handshakes_are_bounded_per_source_and_in_all_with_retry_under_load() {
        let mut admission = Admission::default();
        for _ in 0..MAX_HANDSHAKES_PER_SOURCE {
            assert_eq!(admission.incoming(ip(1), true), Admit::Accept);
        }
        assert_eq!(admission.incoming(ip(1), true), Admit::RefuseSource);
        // Past the retry threshold, unvalidated sources prove their address first.
        assert_eq!(admission.incoming(ip(2), false), Admit::Retry);
        assert_eq!(admission.incoming(ip(2), true), Admit::Accept);
        admission.handshake_done(ip(1));
        assert_eq!(admission.incoming(ip(1), true), Admit::Accept);
        for i in admission.handshakes.total..MAX_HANDSHAKES {
            let source = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert_eq!(admission.incoming(source, true), Admit::Accept);
        }
        assert_eq!(admission.incoming(ip(250), true), Admit::RefuseLoad);
    }

    #[test]
    fn unauthenticated_connections_are_bounded_and_released() {
        let mut admission = Admission::default();
        for _ in 0..MAX_UNAUTHENTICATED_PER_SOURCE {
            assert!(admission.unauthenticated(ip(1)));
        }
        assert!(!admission.unauthenticated(ip(1)));
        assert!(admission.unauthenticated(ip(2)));
        admission.unauthenticated_closed(ip(1));
        assert!(admission.unauthenticated(ip(1)));
        // Releasing what was never admitted changes nothing.
        admission.unauthenticated_closed(ip(9));
        assert_eq!(
            admission.unauthenticated.total,
            MAX_UNAUTHENTICATED_PER_SOURCE + 1
        );
    }

    #[test]
    fn only_tunnels_get_the_large_budget() {
        assert_eq!(budget(ALPN_TUNNEL).streams, 16_384);
        for alpn in [
            ALPN_CA,
            ALPN_POLICY,
            ALPN_REVOCATIONS,
            ALPN_STATS,
            b"other".as_slice(),
        ] {
            let b = budget(alpn);
            assert!(
                b.streams <= INITIAL_STREAMS && b.window <= INITIAL_WINDOW,
                "{alpn:?}"
            );
        }
    }
}
