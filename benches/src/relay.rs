//! Reference relays for the serial benchmark: the least work a two-process tty relay can do on
//! this machine, to show where the floor of *any* design like jmp's (or ser2net + socat's) lies.
//!
//! - `udp`: a blocking `poll()` loop per side moving bytes between a tty and a connected UDP
//!   socket. No encryption, no reliability, no async runtime: one `poll`, one `read` and one
//!   `send` (or `recv` and `write`) per direction, which is the syscall floor of a relay. It is
//!   not usable as a product (UDP drops bytes under load), so the benchmark measures only its
//!   round trip.
//! - `quic`: the leanest relay over jmp's own QUIC endpoints (same TLS, same socket wrapper,
//!   same transport settings, same tokio runtime): one stream, no jmp protocol, no history, no
//!   line settings. The difference to jmp is what jmp's own protocol and features cost; the
//!   difference to `udp` is what QUIC and the async runtime cost.
//!
//! - `udp` with a spin time: the same loop, but after moving bytes it keeps polling without
//!   sleeping for that long (busy-polling, as DPDK or the kernel's `busy_read` do), so the next
//!   byte finds it awake. This is the only way found to go below the `udp` bound, at the price
//!   of a CPU kept busy by each relay while traffic flows.
//!
//! All run as child processes of `jmp-bench` (`jmp-bench relay ...`), so each side pays its own
//! wake-ups like the real relays do.

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use jmp_transport::{client_endpoint, connect, server_endpoint, Identity};
use std::fs::File;
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

const ALPN: &[u8] = b"jmp-bench-relay/1";

/// Entry point of `jmp-bench relay <mode> ...` (the child processes).
pub fn main(args: &[String]) -> Result<()> {
    let arg = |i: usize| {
        args.get(i)
            .map(String::as_str)
            .ok_or_else(|| anyhow!("relay: missing argument {i}"))
    };
    match arg(0)? {
        // The connection flood of the flood benchmark: `flood ADDR FINGERPRINT N`.
        "flood" => crate::flood::flood_main(&args[1..]),
        // Board side: `udp-tty PATH [SPIN_US]` binds an ephemeral port, prints it, and serves the first
        // peer that sends a datagram.
        "udp-tty" => {
            let tty = open_tty(Path::new(arg(1)?))?;
            let spin = spin_arg(args.get(2))?;
            let sock = UdpSocket::bind("127.0.0.1:0")?;
            println!("{} {}", sock.local_addr()?.port(), spin.as_micros());
            std::io::stdout().flush()?;
            let mut hello = [0u8; 1];
            let (_, peer) = sock.recv_from(&mut hello)?;
            sock.connect(peer)?;
            udp_loop(&tty, &sock, spin)
        }
        // Client side: `udp-pty PORT [SPIN_US]` creates a pty, prints its slave path, greets the board side.
        "udp-pty" => {
            let port: u16 = arg(1)?.parse().context("port")?;
            let spin = spin_arg(args.get(2))?;
            let (master, slave_path, _slave) = open_pty()?;
            let sock = UdpSocket::bind("127.0.0.1:0")?;
            sock.connect(("127.0.0.1", port))?;
            sock.send(b"h")?;
            println!("{slave_path}");
            std::io::stdout().flush()?;
            udp_loop(&master, &sock, spin)
        }
        "quic-server" => {
            let tty = open_tty(Path::new(arg(1)?))?;
            jmp_transport::runtime()?.block_on(quic_server(tty))
        }
        "quic-client" => {
            let addr = arg(1)?.parse().context("address")?;
            let fp = arg(2)?.parse().map_err(|e| anyhow!("fingerprint: {e}"))?;
            jmp_transport::runtime()?.block_on(quic_client(addr, fp))
        }
        other => bail!("relay: unknown mode {other:?}"),
    }
}

fn open_tty(path: &Path) -> Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    crate::serial::set_raw(f.as_raw_fd())?;
    Ok(f)
}

/// A raw pty: (master, slave path, an open slave fd so the master never sees a hangup).
fn open_pty() -> Result<(File, String, OwnedFd)> {
    let pty = nix::pty::openpty(None, None).context("openpty")?;
    crate::serial::set_raw(pty.slave.as_raw_fd())?;
    crate::serial::set_raw(pty.master.as_raw_fd())?;
    let path = nix::unistd::ttyname(&pty.slave).context("ttyname")?;
    Ok((
        File::from(pty.master),
        path.display().to_string(),
        pty.slave,
    ))
}

fn spin_arg(a: Option<&String>) -> Result<Duration> {
    Ok(Duration::from_micros(match a {
        Some(s) => s.parse().context("spin time (µs)")?,
        None => 0,
    }))
}

fn udp_loop(tty: &File, sock: &UdpSocket, spin: Duration) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut last = Instant::now();
    loop {
        let mut fds = [
            libc::pollfd {
                fd: tty.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout = if last.elapsed() < spin { 0 } else { -1 };
        // SAFETY: two valid pollfds.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return Ok(());
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let n = (&*tty).read(&mut buf)?;
            sock.send(&buf[..n])?;
            last = Instant::now();
        }
        if fds[1].revents & libc::POLLIN != 0 {
            let n = sock.recv(&mut buf)?;
            (&*tty).write_all(&buf[..n])?;
            last = Instant::now();
        }
    }
}

async fn quic_server(tty: File) -> Result<()> {
    let id = Identity::generate()?;
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    let addr = sock.local_addr()?;
    let ep = server_endpoint(sock, &id, ALPN)?;
    println!("{addr} {}", id.fingerprint());
    std::io::stdout().flush()?;
    let conn = ep
        .accept()
        .await
        .ok_or_else(|| anyhow!("endpoint closed"))?
        .await?;
    let (send, mut recv) = conn.accept_bi().await?;
    // The client's stream opens with one byte (QUIC announces a stream with its first data).
    let mut hello = [0u8; 1];
    recv.read_exact(&mut hello).await?;
    quic_relay(tty, send, recv).await
}

async fn quic_client(addr: std::net::SocketAddr, fp: jmp_transport::Fingerprint) -> Result<()> {
    let ep = client_endpoint(addr)?;
    let (conn, _) = connect(&ep, addr, ALPN, Some(fp)).await?;
    let (mut send, recv) = conn.open_bi().await?;
    send.write_all(b"h").await?;
    let (master, slave_path, _slave) = open_pty()?;
    println!("{slave_path}");
    std::io::stdout().flush()?;
    quic_relay(master, send, recv).await
}

/// tty → stream in one task, stream → tty in this one; the tty is registered for readability
/// only, and written directly (a 1-byte echo never fills a tty buffer).
async fn quic_relay(
    tty: File,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<()> {
    crate::serial::set_nonblocking(tty.as_raw_fd());
    // SAFETY: the AsyncFd owns the File, so the fd stays open and unchanged while registered.
    let afd = std::sync::Arc::new(unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(tty, tokio::io::Interest::READABLE)
    }?);
    let reader = afd.clone();
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let Ok(mut g) = reader.readable().await else {
                return;
            };
            match g.get_inner().read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if n < buf.len() {
                        g.clear_ready();
                    }
                    if send
                        .write_chunk(Bytes::copy_from_slice(&buf[..n]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => g.clear_ready(),
                Err(_) => return,
            }
        }
    });
    while let Some(c) = recv.read_chunk(64 * 1024, true).await? {
        let mut d = &c.bytes[..];
        while !d.is_empty() {
            match afd.get_ref().write(d) {
                Ok(n) => d = &d[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(std::time::Duration::from_micros(100)).await
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    up.abort();
    Ok(())
}
