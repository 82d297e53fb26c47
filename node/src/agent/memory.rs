//! Hands memory freed after a burst back to the system.
//!
//! glibc's allocator keeps freed blocks for reuse and returns little of it by itself, so an
//! agent that carried a bulk transfer (quinn's stream buffers grow up to the flow-control
//! windows) would stay at its peak RSS long after the traffic stopped. Every
//! [`TRIM_INTERVAL`] the free pages of every arena are returned with `malloc_trim`.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

/// How often freed memory is returned.
const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Returns freed memory every [`TRIM_INTERVAL`] until `stop` turns true.
pub async fn return_freed_memory(mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            _ = tick.tick() => trim(),
        }
    }
}

#[cfg(target_env = "gnu")]
fn trim() {
    // SAFETY: malloc_trim takes no pointers and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(target_env = "gnu"))]
fn trim() {}
