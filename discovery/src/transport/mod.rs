//! The sealed gossip transport: chitchat's `Transport`, with every datagram on the network
//! encrypted and authenticated with the gossip keyring.
//!
//! chitchat's envelope codec is crate-private, so this module keeps chitchat unmodified and
//! uses chitchat's own public `UdpSocket` as the codec, bound on loopback, with one
//! `connect()`ed relay socket per peer between it and the real socket (see
//! `docs/design.md` and `research/chitchat-encryption.md`). It owns the sockets, the wire
//! format ([`frame`]) and the per-packet metrics.
//!
//! It must never hand chitchat a byte that did not authenticate, never crash or stall on
//! what a peer sends, and never return an error for a single peer's failure: chitchat stops
//! gossiping when `recv` fails.

pub mod frame;
mod peers;
mod relay;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};

use crate::keyring::SharedKeyring;
use crate::metrics::GossipMetrics;

/// Tuning of the sealed transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealConfig {
    /// Largest datagram sent; larger messages are fragmented. 65,507 (the default) matches
    /// stock chitchat; 1,400 avoids IP fragmentation on the wire.
    pub max_datagram: usize,
    /// How far a frame's timestamp may be from our clock, either way, to be accepted.
    pub freshness: Duration,
    /// `SO_RCVBUF` asked for on the gossip socket (best effort: the kernel caps it).
    pub recv_buffer: usize,
}

impl Default for SealConfig {
    fn default() -> Self {
        SealConfig {
            max_datagram: frame::MAX_DATAGRAM,
            freshness: Duration::from_secs(60),
            recv_buffer: 4 << 20,
        }
    }
}

/// chitchat `Transport` that seals gossip with the current keyring.
#[derive(Clone)]
pub struct SealedTransport {
    keyring: SharedKeyring,
    metrics: GossipMetrics,
    config: SealConfig,
}

impl SealedTransport {
    /// A transport reading `keyring` on every packet, so a swapped keyring applies at once.
    pub fn new(keyring: SharedKeyring, metrics: GossipMetrics, config: SealConfig) -> Self {
        SealedTransport {
            keyring,
            metrics,
            config,
        }
    }
}

#[async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        frame::check_max_datagram(self.config.max_datagram)
            .context("invalid gossip transport configuration")?;
        anyhow::ensure!(
            !self.config.freshness.is_zero(),
            "invalid gossip transport configuration: freshness must be positive"
        );
        let socket = relay::SealedSocket::open(
            listen_addr,
            self.keyring.clone(),
            self.metrics.clone(),
            self.config.clone(),
        )
        .await?;
        Ok(Box::new(socket))
    }
}
