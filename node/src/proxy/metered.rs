//! A byte-counting wrapper for streams whose bytes are not copied by [`super::splice`] (HTTP
//! exchanges), so they feed the same byte metrics.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::outbound::Duplex;

/// A mesh stream that counts the bytes it carries, for the per-request byte metrics.
pub struct Metered {
    inner: Pin<Box<dyn Duplex>>,
    /// Bytes read so far.
    pub read: Arc<AtomicU64>,
    /// Bytes written so far.
    pub written: Arc<AtomicU64>,
}

impl Metered {
    /// Wraps `inner`.
    pub fn new(inner: Pin<Box<dyn Duplex>>) -> Metered {
        Metered {
            inner,
            read: Arc::default(),
            written: Arc::default(),
        }
    }
}

impl AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = self.inner.as_mut().poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        self.read.fetch_add(read, Ordering::Relaxed);
        result
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = self.inner.as_mut().poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.as_mut().poll_shutdown(cx)
    }
}
