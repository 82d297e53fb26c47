//! Prometheus metrics owned by the discovery layer: gossip packets, bytes and members.
//!
//! Every counter is resolved to its label values once, at construction, so the packet path
//! only increments atomics.

use crate::signed::Rejection;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// What happened to one gossip datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketOutcome {
    /// Authenticated, fresh and handed to chitchat (inbound) or sent (outbound).
    Ok,
    /// No key of the keyring opened it: wrong key, tampered, or forged.
    BadAuth,
    /// Too short, unknown version byte, or inconsistent fragment header.
    Malformed,
    /// Larger than the configured maximum datagram or reassembled message.
    Oversized,
    /// Authenticated but its timestamp is outside the freshness window.
    Stale,
    /// Authenticated but its nonce was already seen inside the freshness window.
    Replayed,
    /// Plaintext reached chitchat's loopback codec socket from an address that is not ours.
    Stray,
    /// The operating system refused to send it.
    SendError,
}

impl PacketOutcome {
    /// The `outcome` label value.
    pub fn as_label(self) -> &'static str {
        match self {
            PacketOutcome::Ok => "ok",
            PacketOutcome::BadAuth => "bad_auth",
            PacketOutcome::Malformed => "malformed",
            PacketOutcome::Oversized => "oversized",
            PacketOutcome::Stale => "stale",
            PacketOutcome::Replayed => "replayed",
            PacketOutcome::Stray => "stray",
            PacketOutcome::SendError => "send_error",
        }
    }

    const INBOUND: [PacketOutcome; 7] = [
        PacketOutcome::Ok,
        PacketOutcome::BadAuth,
        PacketOutcome::Malformed,
        PacketOutcome::Oversized,
        PacketOutcome::Stale,
        PacketOutcome::Replayed,
        PacketOutcome::Stray,
    ];
}

/// Member states as shown by `weft members` and the `weft_gossip_members` gauge.
pub const MEMBER_STATES: [&str; 4] = ["alive", "suspect", "dead", "left"];

/// Gossip metrics, registered once per agent.
#[derive(Clone)]
pub struct GossipMetrics {
    packets_in: Vec<(PacketOutcome, IntCounter)>,
    packets_out_ok: IntCounter,
    packets_out_error: IntCounter,
    bytes_in: IntCounter,
    bytes_out: IntCounter,
    secondary_key_opens: IntCounter,
    members: IntGaugeVec,
    keyring_keys: IntGauge,
    rejected: Vec<(Rejection, IntCounter)>,
    impersonations: IntCounter,
}

impl GossipMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let packets = IntCounterVec::new(
            Opts::new(
                "weft_gossip_packets_total",
                "Gossip datagrams by direction and outcome.",
            ),
            &["direction", "outcome"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "weft_gossip_bytes_total",
                "Gossip bytes on the wire (sealed frames) by direction.",
            ),
            &["direction"],
        )?;
        let secondary_key_opens = IntCounter::new(
            "weft_gossip_secondary_key_opens_total",
            "Gossip datagrams opened with a key other than the primary (a rotation is in progress).",
        )?;
        let members = IntGaugeVec::new(
            Opts::new("weft_gossip_members", "Gossip members by state."),
            &["state"],
        )?;
        let keyring_keys = IntGauge::new(
            "weft_gossip_keyring_keys",
            "Number of keys in this agent's gossip keyring.",
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "weft_gossip_records_rejected_total",
                "Gossip records refused before the catalog, by reason (not signed by the node they are about, out of its scope, replayed, ...).",
            ),
            &["reason"],
        )?;
        let impersonations = IntCounter::new(
            "weft_gossip_impersonations_total",
            "Records about this agent, or incarnations under its name, that it did not sign.",
        )?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(impersonations.clone()))?;
        registry.register(Box::new(packets.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(secondary_key_opens.clone()))?;
        registry.register(Box::new(members.clone()))?;
        registry.register(Box::new(keyring_keys.clone()))?;
        for state in MEMBER_STATES {
            members.with_label_values(&[state]).set(0);
        }
        Ok(GossipMetrics {
            packets_in: PacketOutcome::INBOUND
                .iter()
                .map(|o| (*o, packets.with_label_values(&["in", o.as_label()])))
                .collect(),
            packets_out_ok: packets.with_label_values(&["out", "ok"]),
            packets_out_error: packets.with_label_values(&["out", "send_error"]),
            bytes_in: bytes.with_label_values(&["in"]),
            bytes_out: bytes.with_label_values(&["out"]),
            secondary_key_opens,
            members,
            keyring_keys,
            rejected: Rejection::ALL
                .iter()
                .map(|r| (*r, rejected.with_label_values(&[r.as_label()])))
                .collect(),
            impersonations,
        })
    }

    /// Metrics registered in a private registry, for tests and simulations.
    pub fn unregistered() -> Self {
        Self::new(&Registry::new()).expect("fresh registry accepts every metric")
    }

    /// Counts one received datagram of `wire_bytes` bytes and what became of it.
    pub fn packet_in(&self, outcome: PacketOutcome, wire_bytes: usize) {
        self.bytes_in.inc_by(wire_bytes as u64);
        if let Some((_, counter)) = self.packets_in.iter().find(|(o, _)| *o == outcome) {
            counter.inc();
        }
    }

    /// Counts one datagram sent (or failed to send) of `wire_bytes` bytes.
    pub fn packet_out(&self, sent: bool, wire_bytes: usize) {
        if sent {
            self.packets_out_ok.inc();
            self.bytes_out.inc_by(wire_bytes as u64);
        } else {
            self.packets_out_error.inc();
        }
    }

    /// Counts a datagram opened with a secondary key.
    pub fn secondary_key_open(&self) {
        self.secondary_key_opens.inc();
    }

    /// Number of inbound datagrams counted with `outcome` so far.
    pub fn inbound_count(&self, outcome: PacketOutcome) -> u64 {
        self.packets_in
            .iter()
            .find(|(o, _)| *o == outcome)
            .map(|(_, c)| c.get())
            .unwrap_or(0)
    }

    /// Sealed bytes sent so far.
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.get()
    }

    /// Sets the member gauges from counts per state, in [`MEMBER_STATES`] order.
    pub fn set_members(&self, counts: [usize; 4]) {
        for (state, count) in MEMBER_STATES.iter().zip(counts) {
            self.members.with_label_values(&[state]).set(count as i64);
        }
    }

    /// Counts a gossip record refused for `reason`; `about_self` when it claims to be this
    /// agent's own.
    pub fn record_rejected(&self, reason: Rejection, about_self: bool) {
        if let Some((_, counter)) = self.rejected.iter().find(|(r, _)| *r == reason) {
            counter.inc();
        }
        if about_self {
            self.impersonations.inc();
        }
    }

    /// Counts an incarnation under this agent's name that it did not publish.
    pub fn impersonation(&self) {
        self.impersonations.inc();
    }

    /// Records refused for `reason` so far.
    pub fn rejected_count(&self, reason: Rejection) -> u64 {
        self.rejected
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, c)| c.get())
    }

    /// Impersonations counted so far.
    pub fn impersonations(&self) -> u64 {
        self.impersonations.get()
    }

    /// Sets the keyring size gauge.
    pub fn set_keyring_keys(&self, keys: usize) {
        self.keyring_keys.set(keys as i64);
    }
}
