//! Data-plane metrics: TCP connections and bytes by direction, source and destination service,
//! failures by reason, and QUIC tunnel handshakes, count, stream errors, round-trip time and
//! path events (packets sent and lost, congestion events, MTU black holes).
//! Labels are bounded: service names from config and gossip, fixed reason strings.

use prometheus::{
    Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, exponential_buckets,
};

/// Metrics of the proxy.
#[derive(Clone)]
pub struct ProxyMetrics {
    opened: IntCounterVec,
    closed: IntCounterVec,
    read_bytes: IntCounterVec,
    write_bytes: IntCounterVec,
    failures: IntCounterVec,
    handshakes: IntCounterVec,
    open_tunnels: IntGauge,
    stream_errors: IntCounterVec,
    rtt: Histogram,
    path_events: IntCounterVec,
    reverified: IntCounterVec,
    admission: IntCounterVec,
    unauthenticated: IntGauge,
}

/// Which way a connection goes, seen from this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a local app into the mesh.
    Outbound,
    /// From the mesh to a local service.
    Inbound,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

impl ProxyMetrics {
    /// Registers the proxy metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<ProxyMetrics> {
        let labels = &["direction", "source", "destination"];
        let opened = IntCounterVec::new(
            Opts::new(
                "weft_tcp_open_total",
                "TCP connections opened through the mesh.",
            ),
            labels,
        )?;
        let closed = IntCounterVec::new(
            Opts::new(
                "weft_tcp_close_total",
                "TCP connections through the mesh that ended.",
            ),
            labels,
        )?;
        let read_bytes = IntCounterVec::new(
            Opts::new(
                "weft_tcp_read_bytes_total",
                "Bytes read from the app-facing socket (outbound: from the local app; inbound: from the local service).",
            ),
            labels,
        )?;
        let write_bytes = IntCounterVec::new(
            Opts::new(
                "weft_tcp_write_bytes_total",
                "Bytes written to the app-facing socket (outbound: to the local app; inbound: to the local service).",
            ),
            labels,
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "weft_tcp_connection_failures_total",
                "Connections the mesh could not carry, by direction and reason.",
            ),
            &["direction", "reason"],
        )?;
        let handshakes = IntCounterVec::new(
            Opts::new(
                "weft_tunnel_handshakes_total",
                "QUIC tunnel handshakes by role (client, server) and result.",
            ),
            &["role", "result"],
        )?;
        let open_tunnels = IntGauge::new(
            "weft_tunnels_open",
            "Open QUIC tunnel connections (both roles).",
        )?;
        let stream_errors = IntCounterVec::new(
            Opts::new(
                "weft_tunnel_stream_errors_total",
                "Tunnel streams that failed, by reason.",
            ),
            &["reason"],
        )?;
        let rtt = Histogram::with_opts(
            HistogramOpts::new(
                "weft_tunnel_rtt_seconds",
                "Round-trip time of tunnels as estimated by QUIC, sampled every 5 s.",
            )
            .buckets(exponential_buckets(0.000_05, 2.0, 16)?),
        )?;
        registry.register(Box::new(opened.clone()))?;
        registry.register(Box::new(closed.clone()))?;
        registry.register(Box::new(read_bytes.clone()))?;
        registry.register(Box::new(write_bytes.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(handshakes.clone()))?;
        registry.register(Box::new(open_tunnels.clone()))?;
        registry.register(Box::new(stream_errors.clone()))?;
        let path_events = IntCounterVec::new(
            Opts::new(
                "weft_tunnel_path_events_total",
                "What QUIC saw on tunnel paths (both roles): packets sent and declared lost, \
                 congestion events, and MTU black holes (the path MTU fell back to 1200 bytes).",
            ),
            &["event"],
        )?;
        registry.register(Box::new(rtt.clone()))?;
        registry.register(Box::new(path_events.clone()))?;
        let reverified = IntCounterVec::new(
            Opts::new(
                "weft_tunnel_reverified_total",
                "Open tunnels verified again after the trust in force changed (roots reloaded, revocations installed), by result (kept, closed) and, when closed, the reason the peer no longer verifies.",
            ),
            &["result", "reason"],
        )?;
        registry.register(Box::new(reverified.clone()))?;
        let admission = IntCounterVec::new(
            Opts::new(
                "weft_quic_admission_total",
                "Incoming QUIC connection attempts on the tunnel port, by result: accepted, retry (asked to prove its address), refused_source (too many handshakes from one address), refused_load (too many in all), refused_unauthenticated (too many connections without a client certificate).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(admission.clone()))?;
        let unauthenticated = IntGauge::new(
            "weft_quic_unauthenticated_connections",
            "Open QUIC connections on the tunnel port whose peer presented no client certificate (joining agents' CA requests; bounded, see docs/identity.md).",
        )?;
        registry.register(Box::new(unauthenticated.clone()))?;
        for result in [
            "accepted",
            "retry",
            "refused_source",
            "refused_load",
            "refused_unauthenticated",
        ] {
            admission.with_label_values(&[result]);
        }
        Ok(ProxyMetrics {
            opened,
            closed,
            read_bytes,
            write_bytes,
            failures,
            handshakes,
            open_tunnels,
            stream_errors,
            rtt,
            path_events,
            reverified,
            admission,
            unauthenticated,
        })
    }

    /// Counts a connection that started carrying bytes.
    pub fn opened(&self, direction: Direction, source: &str, destination: &str) {
        self.opened
            .with_label_values(&[direction.label(), source, destination])
            .inc();
    }

    /// Counts a connection that ended, with the bytes it carried.
    pub fn closed(
        &self,
        direction: Direction,
        source: &str,
        destination: &str,
        read: u64,
        written: u64,
    ) {
        let labels = [direction.label(), source, destination];
        self.closed.with_label_values(&labels).inc();
        self.read_bytes.with_label_values(&labels).inc_by(read);
        self.write_bytes.with_label_values(&labels).inc_by(written);
    }

    /// Counts a connection the mesh could not carry.
    pub fn failure(&self, direction: Direction, reason: &str) {
        self.failures
            .with_label_values(&[direction.label(), reason])
            .inc();
    }

    /// Counts a handshake.
    pub fn handshake(&self, role: &str, result: &str) {
        self.handshakes.with_label_values(&[role, result]).inc();
    }

    /// Counts an open tunnel verified again after a trust change: `kept`, or `closed` with
    /// the reason its peer no longer verifies.
    pub fn reverified(&self, result: &str, reason: &str) {
        self.reverified.with_label_values(&[result, reason]).inc();
    }

    /// Counts an incoming QUIC connection attempt by admission `result`.
    pub fn admission(&self, result: &str) {
        self.admission.with_label_values(&[result]).inc();
    }

    /// The gauge of open connections without a client certificate.
    pub fn unauthenticated(&self) -> &IntGauge {
        &self.unauthenticated
    }

    /// Tracks the number of open tunnels.
    pub fn tunnel_opened(&self) {
        self.open_tunnels.inc();
    }

    /// Tracks the number of open tunnels.
    pub fn tunnel_closed(&self) {
        self.open_tunnels.dec();
    }

    /// Counts a failed stream.
    pub fn stream_error(&self, reason: &str) {
        self.stream_errors.with_label_values(&[reason]).inc();
    }

    /// Records one RTT sample.
    pub fn rtt(&self, rtt: std::time::Duration) {
        self.rtt.observe(rtt.as_secs_f64());
    }

    /// Counts what a tunnel's path saw since `before`, as told by quinn's statistics.
    pub fn path(&self, before: &quinn::PathStats, now: &quinn::PathStats) {
        for (event, count) in [
            (
                "packet_sent",
                now.sent_packets.saturating_sub(before.sent_packets),
            ),
            (
                "packet_lost",
                now.lost_packets.saturating_sub(before.lost_packets),
            ),
            (
                "congestion",
                now.congestion_events
                    .saturating_sub(before.congestion_events),
            ),
            (
                "mtu_black_hole",
                now.black_holes_detected
                    .saturating_sub(before.black_holes_detected),
            ),
        ] {
            self.path_events.with_label_values(&[event]).inc_by(count);
        }
    }
}
