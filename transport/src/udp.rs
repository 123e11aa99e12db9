//! The UDP socket under quinn, registered with the reactor for readability only.
//!
//! quinn's own tokio socket registers for readability and writability. On loopback (and any
//! path where the kernel frees a sent datagram at once) every send then produces a "writable
//! again" event, which costs the process an extra trip through `epoll_wait` on every console
//! round trip, with nothing to do. Here a send is tried directly; only when the socket buffer is
//! full does a temporary registration of a duplicate descriptor wait for room. Receiving also
//! clears readiness when `recvmmsg` returns fewer datagrams than it had room for (the queue was
//! drained), saving the call that would only return EAGAIN.

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

#[derive(Debug)]
pub struct QuietUdp {
    io: AsyncFd<UdpSocket>,
    state: UdpSocketState,
    /// Set when a send found the socket full; until then the socket counts as writable (quinn
    /// asks before every send).
    full: AtomicBool,
}

impl QuietUdp {
    /// Needs a tokio runtime.
    pub fn new(socket: UdpSocket) -> io::Result<Arc<QuietUdp>> {
        let state = UdpSocketState::new((&socket).into())?;
        socket.set_nonblocking(true)?;
        // SAFETY: the socket is owned by the AsyncFd and closed only when it is dropped, which
        // deregisters it first.
        let io = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }?;
        Ok(Arc::new(QuietUdp {
            io,
            state,
            full: AtomicBool::new(false),
        }))
    }
}

impl QuietUdp {
    /// Asks the kernel for larger socket buffers (a relay moving a whole connection's packets
    /// through one socket); best effort, as the kernel caps them.
    pub fn set_buffer_sizes(&self, bytes: usize) {
        let _ = self
            .state
            .set_recv_buffer_size(self.io.get_ref().into(), bytes);
        let _ = self
            .state
            .set_send_buffer_size(self.io.get_ref().into(), bytes);
    }

    /// Waits until a send that found the socket full may be tried again.
    pub async fn writable(self: &Arc<Self>) -> io::Result<()> {
        let r = room(self.clone()).await;
        self.full.store(false, Ordering::Release);
        r
    }
}

/// Waits until the socket has room, through a registration that exists only while waiting.
async fn room(socket: Arc<QuietUdp>) -> io::Result<()> {
    let dup = socket.io.get_ref().try_clone()?;
    // SAFETY: `dup` is owned by the AsyncFd and closed only when it is dropped.
    let w = unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) }?;
    // Registering a descriptor that is already writable reports it at once: no lost wake-up.
    let _ready = w.writable().await?;
    Ok(())
}

type RoomFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>;

struct Poller {
    socket: Arc<QuietUdp>,
    fut: Option<RoomFuture>,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller").finish_non_exhaustive()
    }
}

impl UdpPoller for Poller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        if self.fut.is_none() && !self.socket.full.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        let socket = self.socket.clone();
        let fut = self.fut.get_or_insert_with(|| Box::pin(room(socket)));
        let r = fut.as_mut().poll(cx);
        if r.is_ready() {
            self.fut = None;
            self.socket.full.store(false, Ordering::Release);
        }
        r
    }
}

impl AsyncUdpSocket for QuietUdp {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller {
            socket: self,
            fut: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let r = self.state.send(self.io.get_ref().into(), transmit);
        if r.as_ref()
            .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)
        {
            self.full.store(true, Ordering::Release);
        }
        r
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            let room = bufs.len().min(meta.len());
            match guard.try_io(|io| self.state.recv(io.get_ref().into(), bufs, meta)) {
                Ok(Ok(n)) => {
                    if n < room {
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}
