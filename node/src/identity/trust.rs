//! The signal that the trust in force changed: the trust bundle's roots were reloaded, or a
//! revocation list was installed in it. Whatever verified a peer once (open tunnels) listens
//! to it and verifies the peer again.

use std::sync::Arc;

use tokio::sync::watch;

/// Signals every change of the trust in force.
#[derive(Clone)]
pub struct TrustSignal(Arc<watch::Sender<u64>>);

impl Default for TrustSignal {
    fn default() -> Self {
        TrustSignal(Arc::new(watch::channel(0).0))
    }
}

impl TrustSignal {
    /// Tells every subscriber the trust bundle changed.
    pub fn changed(&self) {
        self.0.send_modify(|n| *n += 1);
    }

    /// A receiver woken on each later change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}
