//! The sealed socket chitchat drives: the inline loopback relay.
//!
//! Three kinds of socket: the real one on the gossip address (the only one on the network),
//! chitchat's own `UdpSocket` on 127.0.0.1 used purely as the envelope codec, and one
//! relay per peer (see [`super::peers`]). All relaying happens inside `send` and `recv`,
//! with no background task, so dropping the socket closes every descriptor at once and the
//! gossip port is free again as soon as chitchat shuts down.
//!
//! - `send(P, envelope)`: the codec serializes the envelope to relay_P over loopback, the
//!   plaintext is read straight back from relay_P, sealed, and sent to P from the real
//!   socket.
//! - `recv()`: a datagram from P on the real socket is opened, checked for freshness and
//!   replay, reassembled, and written from relay_P to the codec, which decodes it and
//!   reports relay_P as the source; the table turns that back into P.
//!
//! It must never forward an unauthenticated byte to the codec, never return an error for
//! anything one peer or one local process does, and never await between taking a datagram
//! off a socket and finishing with it, because chitchat cancels `recv` on every tick.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, UdpSocket as CodecSocket};
use socket2::{Domain, Protocol, SockRef, Type};
use tracing::{debug, warn};

use super::SealConfig;
use super::frame::{self, REPLAY_CAPACITY, Reassembler, ReplayGuard};
use super::peers::{MAX_RELAYS, RELAY_IDLE, RelayTable};
use crate::keyring::SharedKeyring;
use crate::metrics::{GossipMetrics, PacketOutcome};

/// Receive buffer for one datagram: above any UDP payload, so nothing is silently cut.
const DATAGRAM_BUF: usize = 65_536;
/// How long `send` waits for the codec's plaintext on a relay before giving up on the
/// message. Loopback delivery completes inside the codec's `send_to`, so this only bounds
/// a case that should not happen.
const RELAY_READ_TIMEOUT: Duration = Duration::from_millis(200);

/// The `Socket` handed to chitchat by [`super::SealedTransport`].
pub(crate) struct SealedSocket {
    real: tokio::net::UdpSocket,
    local_addr: SocketAddr,
    codec: CodecSocket,
    relays: RelayTable,
    keyring: SharedKeyring,
    metrics: GossipMetrics,
    config: SealConfig,
    reassembler: Reassembler,
    replay: ReplayGuard,
    /// Datagrams written to the codec and not yet read back. The codec is polled only while
    /// this is above zero, so tokio never sees it empty and never has to wait a reactor turn
    /// to notice the next one. It can only drift upwards (a forwarded datagram the codec
    /// cannot decode, or one the kernel dropped), which costs a reactor turn, never a message.
    forwarded_unread: usize,
    next_msg_id: u32,
    recv_buf: Vec<u8>,
    send_buf: Vec<u8>,
}

impl SealedSocket {
    /// Binds the real socket on `listen_addr` and the codec on loopback.
    pub(crate) async fn open(
        listen_addr: SocketAddr,
        keyring: SharedKeyring,
        metrics: GossipMetrics,
        config: SealConfig,
    ) -> anyhow::Result<SealedSocket> {
        let real = bind_real(listen_addr, config.recv_buffer)
            .with_context(|| format!("failed to bind to {listen_addr}/UDP for gossip"))?;
        let local_addr = real.local_addr()?;
        let codec = CodecSocket::open(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("failed to open the loopback gossip codec socket")?;
        let codec_addr = codec.local_addr()?;
        Ok(SealedSocket {
            real,
            local_addr,
            codec,
            relays: RelayTable::new(codec_addr, MAX_RELAYS, RELAY_IDLE),
            keyring,
            metrics,
            reassembler: Reassembler::default(),
            replay: ReplayGuard::new(config.freshness, REPLAY_CAPACITY),
            config,
            forwarded_unread: 0,
            next_msg_id: rand::random(),
            recv_buf: vec![0; DATAGRAM_BUF],
            send_buf: vec![0; DATAGRAM_BUF],
        })
    }

    /// Gets chitchat's serialized plaintext for `to` into `send_buf`; `None` when the
    /// message is lost (the caller counts it).
    async fn serialize(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> Option<(usize, usize)> {
        let relay = match self.relays.get_or_create(to, Instant::now()) {
            Ok(relay) => relay,
            Err(error) => {
                warn!(peer = %to, %error, "cannot open a gossip relay socket");
                return None;
            }
        };
        // The envelope is consumed here (it is not Clone), hence the relay is made first.
        let num_bytes = match self.codec.send(relay.local_addr, envelope).await {
            Ok(outcome) => outcome.num_bytes_sent,
            Err(error) => {
                debug!(peer = %to, %error, "gossip codec send failed");
                return None;
            }
        };
        // Loopback delivery is synchronous, so a direct non-blocking read almost always
        // finds the datagram; going through tokio would first cost a reactor turn whenever
        // tokio last saw this relay empty.
        let direct = (&*SockRef::from(&relay.socket)).read(&mut self.send_buf);
        let read = match direct {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::time::timeout(RELAY_READ_TIMEOUT, relay.socket.recv(&mut self.send_buf))
                    .await
                    .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
            }
            other => other,
        };
        match read {
            Ok(len) => Some((len, num_bytes)),
            Err(error) => {
                // A late datagram on this relay would be sent with the next message; closing
                // the relay discards it.
                warn!(peer = %to, %error, "gossip relay did not return the serialized message");
                self.relays.remove(to);
                None
            }
        }
    }

    /// Seals `send_buf[..len]` and sends the frames to `to`; true when every frame left.
    async fn seal_and_send(&mut self, to: SocketAddr, len: usize) -> bool {
        let msg_id = self.next_msg_id;
        self.next_msg_id = self.next_msg_id.wrapping_add(1);
        let now_ms = frame::unix_ms(SystemTime::now());
        let sealed = frame::seal(
            &self.keyring.load(),
            msg_id,
            now_ms,
            &self.send_buf[..len],
            self.config.max_datagram,
        );
        let frames = match sealed {
            Ok(frames) => frames,
            Err(error) => {
                warn!(peer = %to, %error, "cannot seal gossip message");
                return false;
            }
        };
        let mut all_sent = true;
        for frame in &frames {
            match self.real.send_to(frame, to).await {
                Ok(_) => self.metrics.packet_out(true, frame.len()),
                Err(error) => {
                    debug!(peer = %to, %error, bytes = frame.len(), "gossip send failed");
                    self.metrics.packet_out(false, frame.len());
                    all_sent = false;
                }
            }
        }
        all_sent
    }

    /// Handles one datagram from the network, synchronously: count it, and forward the
    /// message to the codec if it completes one.
    fn accept_datagram(&mut self, len: usize, from: SocketAddr) {
        let datagram = &self.recv_buf[..len];
        let now_ms = frame::unix_ms(SystemTime::now());
        let opened = frame::open(
            &self.keyring.load(),
            datagram,
            now_ms,
            self.config.freshness,
        )
        .and_then(|frame| {
            self.replay.check(&frame, now_ms)?;
            Ok(frame)
        });
        let frame = match opened {
            Ok(frame) => frame,
            Err(outcome) => {
                debug!(peer = %from, bytes = len, outcome = outcome.as_label(), "gossip datagram dropped");
                self.metrics.packet_in(outcome, len);
                return;
            }
        };
        if frame.opened_with_secondary_key() {
            self.metrics.secondary_key_open();
        }
        let message = match self.reassembler.accept(from, frame, Instant::now()) {
            Ok(message) => {
                self.metrics.packet_in(PacketOutcome::Ok, len);
                message
            }
            Err(outcome) => {
                debug!(peer = %from, outcome = outcome.as_label(), "gossip fragment dropped");
                self.metrics.packet_in(outcome, len);
                return;
            }
        };
        if let Some(message) = message {
            self.forward(from, &message);
        }
    }

    /// Writes an authenticated message from `from` to the codec through `from`'s relay.
    fn forward(&mut self, from: SocketAddr, message: &[u8]) {
        let relay = match self.relays.get_or_create(from, Instant::now()) {
            Ok(relay) => relay,
            Err(error) => {
                warn!(peer = %from, %error, "cannot open a gossip relay socket");
                return;
            }
        };
        // Direct syscall for the same reason as the read in `serialize`; UDP on loopback
        // does not block, and if the codec's buffer is full the message is lost like any
        // UDP datagram and chitchat recovers on a later round.
        match SockRef::from(&relay.socket).send(message) {
            Ok(_) => self.forwarded_unread += 1,
            Err(error) => debug!(peer = %from, %error, "gossip relay forward failed"),
        }
    }
}

/// Binds the real gossip socket with a larger receive buffer than the system default, which
/// holds only a few maximum-size datagrams.
fn bind_real(addr: SocketAddr, recv_buffer: usize) -> io::Result<tokio::net::UdpSocket> {
    let socket = socket2::Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(error) = socket.set_recv_buffer_size(recv_buffer) {
        warn!(%error, recv_buffer, "cannot set the gossip socket receive buffer");
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// Errors a UDP `recv_from` may return that say nothing about the socket's health.
fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::OutOfMemory
    )
}

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.local_addr)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        // Per-peer failures are counted and reported as zero bytes, never as an error:
        // chitchat would only log it, once per round.
        let Some((len, num_bytes)) = self.serialize(to, envelope).await else {
            self.metrics.packet_out(false, 0);
            return Ok(SendOutcome { num_bytes_sent: 0 });
        };
        let sent = self.seal_and_send(to, len).await;
        Ok(SendOutcome {
            num_bytes_sent: if sent { num_bytes } else { 0 },
        })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            tokio::select! {
                biased;
                decoded = self.codec.recv(), if self.forwarded_unread > 0 => {
                    let outcome = decoded.context("gossip codec socket failed")?;
                    match self.relays.peer_of(outcome.from_addr) {
                        Some(peer) => {
                            self.forwarded_unread -= 1;
                            return Ok(RecvOutcome { from_addr: peer, ..outcome });
                        }
                        None => {
                            debug!(from = %outcome.from_addr, "plaintext gossip on the codec socket dropped");
                            self.metrics.packet_in(PacketOutcome::Stray, outcome.num_bytes_received);
                        }
                    }
                }
                received = self.real.recv_from(&mut self.recv_buf) => match received {
                    Ok((len, from)) => self.accept_datagram(len, from),
                    Err(error) if is_transient(&error) => {
                        debug!(%error, "transient gossip receive error");
                    }
                    Err(error) => return Err(error).context("gossip socket failed"),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::{GossipKey, Keyring};
    use chitchat::transport::Transport;
    use chitchat::{ChitchatMessage, ProtocolVersion};

    const LONG: Duration = Duration::from_secs(5);

    fn bad_cluster() -> ChitchatEnvelope {
        ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::BadCluster,
        }
    }

    async fn open_pair(keyring: SharedKeyring) -> (SealedSocket, SealedSocket, GossipMetrics) {
        let metrics = GossipMetrics::unregistered();
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let a = SealedSocket::open(
            any,
            keyring.clone(),
            GossipMetrics::unregistered(),
            SealConfig::default(),
        )
        .await
        .unwrap();
        let b = SealedSocket::open(any, keyring, metrics.clone(), SealConfig::default())
            .await
            .unwrap();
        (a, b, metrics)
    }

    #[tokio::test]
    async fn envelope_crosses_and_reports_the_real_sender() {
        let (mut a, mut b, metrics) =
            open_pair(Keyring::single(GossipKey::generate()).into_shared()).await;
        let sent = a.send(b.local_addr, bad_cluster()).await.unwrap();
        assert!(sent.num_bytes_sent > 0);
        let got = tokio::time::timeout(LONG, b.recv()).await.unwrap().unwrap();
        assert_eq!(got.from_addr, a.local_addr);
        assert_eq!(got.envelope, bad_cluster());
        assert_eq!(got.num_bytes_received, sent.num_bytes_sent);
        assert_eq!(metrics.inbound_count(PacketOutcome::Ok), 1);
        // The reply goes back through the relay b made for a.
        b.send(got.from_addr, bad_cluster()).await.unwrap();
        let back = tokio::time::timeout(LONG, a.recv()).await.unwrap().unwrap();
        assert_eq!(back.from_addr, b.local_addr);
    }

    #[tokio::test]
    async fn stray_plaintext_on_the_codec_socket_is_dropped() {
        let (mut a, mut b, metrics) =
            open_pair(Keyring::single(GossipKey::generate()).into_shared()).await;
        // A local process writes a valid plaintext envelope straight to b's codec socket.
        let mut intruder = CodecSocket::open(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        intruder
            .send(b.codec.local_addr().unwrap(), bad_cluster())
            .await
            .unwrap();
        a.send(b.local_addr, bad_cluster()).await.unwrap();
        let got = tokio::time::timeout(LONG, b.recv()).await.unwrap().unwrap();
        assert_eq!(
            got.from_addr, a.local_addr,
            "only the sealed message is delivered"
        );
        assert_eq!(metrics.inbound_count(PacketOutcome::Stray), 1);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), b.recv())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn forged_datagram_opens_no_relay_and_reaches_nobody() {
        let (_a, mut b, metrics) =
            open_pair(Keyring::single(GossipKey::generate()).into_shared()).await;
        let stranger = Keyring::single(GossipKey::generate());
        let forged =
            frame::seal(&stranger, 1, frame::unix_ms(SystemTime::now()), b"x", 1_400).unwrap();
        let raw = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        raw.send_to(&forged[0], b.local_addr).unwrap();
        raw.send_to(b"\x53junk", b.local_addr).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), b.recv())
                .await
                .is_err()
        );
        assert_eq!(metrics.inbound_count(PacketOutcome::BadAuth), 1);
        assert_eq!(metrics.inbound_count(PacketOutcome::Malformed), 1);
        assert_eq!(b.relays.len(), 0, "no relay for an unauthenticated source");
    }

    #[tokio::test]
    async fn replayed_datagram_is_dropped() {
        let keyring = Keyring::single(GossipKey::generate()).into_shared();
        let (_a, mut b, metrics) = open_pair(keyring.clone()).await;
        // Build a valid sealed envelope by capturing what a sealed socket sends.
        let capture = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut sender = SealedSocket::open(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            keyring,
            GossipMetrics::unregistered(),
            SealConfig::default(),
        )
        .await
        .unwrap();
        sender
            .send(capture.local_addr().unwrap(), bad_cluster())
            .await
            .unwrap();
        let mut frame = vec![0u8; DATAGRAM_BUF];
        let n = capture.recv(&mut frame).unwrap();
        capture.send_to(&frame[..n], b.local_addr).unwrap();
        capture.send_to(&frame[..n], b.local_addr).unwrap();
        let got = tokio::time::timeout(LONG, b.recv()).await.unwrap().unwrap();
        assert_eq!(got.from_addr, capture.local_addr().unwrap());
        assert!(
            tokio::time::timeout(Duration::from_millis(300), b.recv())
                .await
                .is_err()
        );
        assert_eq!(metrics.inbound_count(PacketOutcome::Replayed), 1);
    }

    #[tokio::test]
    async fn recv_cancelled_at_any_point_loses_nothing() {
        let (mut a, mut b, _) =
            open_pair(Keyring::single(GossipKey::generate()).into_shared()).await;
        const MESSAGES: usize = 200;
        for _ in 0..MESSAGES {
            a.send(b.local_addr, bad_cluster()).await.unwrap();
        }
        let mut received = 0;
        let deadline = Instant::now() + LONG;
        while received < MESSAGES && Instant::now() < deadline {
            // Dropping the future mid-way is what chitchat does on every gossip tick.
            let mut cancelled = std::pin::pin!(b.recv());
            match futures_poll_once(&mut cancelled).await {
                Some(result) => {
                    result.unwrap();
                    received += 1;
                }
                None => tokio::task::yield_now().await,
            }
        }
        assert_eq!(received, MESSAGES);
    }

    /// Polls a future exactly once; `None` when it was not ready (and is then dropped).
    async fn futures_poll_once<F: std::future::Future + Unpin>(fut: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *fut).poll(cx) {
                std::task::Poll::Ready(out) => Some(out),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    #[tokio::test]
    async fn chitchat_transport_contract() {
        let transport = crate::transport::SealedTransport::new(
            Keyring::single(GossipKey::generate()).into_shared(),
            GossipMetrics::unregistered(),
            SealConfig::default(),
        );
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        // Opening the same address twice fails.
        let socket = transport.open(any).await.unwrap();
        let addr = socket.local_addr().unwrap();
        assert!(transport.open(addr).await.is_err());
        // The port is released on drop.
        drop(socket);
        let mut socket = transport.open(addr).await.unwrap();
        // recv waits when nothing comes.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), socket.recv())
                .await
                .is_err()
        );
        // Sending to an address nobody listens on is Ok.
        let mut nobody = addr;
        nobody.set_ip([127, 0, 0, 2].into());
        socket.send(nobody, bad_cluster()).await.unwrap();
        // A bad configuration is refused at open.
        let bad = crate::transport::SealedTransport::new(
            Keyring::single(GossipKey::generate()).into_shared(),
            GossipMetrics::unregistered(),
            SealConfig {
                max_datagram: 100,
                ..SealConfig::default()
            },
        );
        assert!(bad.open(any).await.is_err());
    }

    /// A Syn whose serialized size is exactly `size` bytes (V0: fixed overhead plus the id).
    async fn syn_of_size(size: usize) -> ChitchatEnvelope {
        let syn = |len: usize| ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::Syn {
                cluster_id: "c".repeat(len),
                digest: Default::default(),
            },
        };
        let mut probe = CodecSocket::open(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let overhead = probe
            .send(sink.local_addr().unwrap(), syn(10))
            .await
            .unwrap()
            .num_bytes_sent
            - 10;
        syn(size - overhead)
    }

    #[tokio::test]
    async fn message_just_under_chitchats_limit_crosses_in_two_frames() {
        // chitchat fills datagrams to within a few bytes of 65,507; 55 bytes of sealing
        // overhead do not fit, so such a message must be split even at the default size.
        let (mut a, mut b, metrics) =
            open_pair(Keyring::single(GossipKey::generate()).into_shared()).await;
        let size = frame::MAX_DATAGRAM - 20;
        let sent = a.send(b.local_addr, syn_of_size(size).await).await.unwrap();
        assert_eq!(sent.num_bytes_sent, size);
        let got = tokio::time::timeout(LONG, b.recv()).await.unwrap().unwrap();
        assert_eq!(got.envelope, syn_of_size(size).await);
        assert_eq!(got.num_bytes_received, size);
        assert_eq!(metrics.inbound_count(PacketOutcome::Ok), 2, "two frames");
    }

    #[tokio::test]
    async fn fragmented_message_crosses_at_small_datagram_size() {
        let keyring = Keyring::single(GossipKey::generate()).into_shared();
        let small = SealConfig {
            max_datagram: 600,
            ..SealConfig::default()
        };
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut a = SealedSocket::open(
            any,
            keyring.clone(),
            GossipMetrics::unregistered(),
            small.clone(),
        )
        .await
        .unwrap();
        let metrics = GossipMetrics::unregistered();
        let mut b = SealedSocket::open(any, keyring, metrics.clone(), small)
            .await
            .unwrap();
        let cluster_id: String = std::iter::repeat_n('c', 3_000).collect();
        let syn = || ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::Syn {
                cluster_id: cluster_id.clone(),
                digest: Default::default(),
            },
        };
        a.send(b.local_addr, syn()).await.unwrap();
        let got = tokio::time::timeout(LONG, b.recv()).await.unwrap().unwrap();
        assert_eq!(got.envelope, syn());
        assert!(
            metrics.inbound_count(PacketOutcome::Ok) >= 6,
            "3 KB in 545-byte pieces"
        );
    }
}
