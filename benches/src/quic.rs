//! One jmp stream channel vs a plain quinn stream, in process on loopback, with the same
//! endpoints and TLS setup (jmp_transport::server_endpoint / client_endpoint / connect).

use crate::stats::{cell, json, median, Target};
use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use jmp_protocol::{
    features, DeviceInfo, DeviceState, ErrorCode, Hello, Kind, Welcome, ALPN_EXPORTER,
};
use jmp_transport::{
    client_endpoint, connect, server_endpoint, ChannelIo, Channels, Fingerprint, Identity, Link,
    LinkEvent,
};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub const CHUNK: usize = 64 * 1024;
pub const TOTAL: usize = 1 << 30;

struct Server {
    addr: SocketAddr,
    fingerprint: Fingerprint,
    /// Byte counts of finished streams.
    done: mpsc::UnboundedReceiver<usize>,
    _endpoint: quinn::Endpoint,
}

/// A server on an ephemeral loopback port with jmp's endpoint setup; `serve` runs for each
/// accepted connection and reports each finished stream's byte count.
fn server<F, Fut>(serve: F) -> Result<Server>
where
    F: Fn(quinn::Connection, mpsc::UnboundedSender<usize>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let id = Identity::generate()?;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let addr = sock.local_addr()?;
    let endpoint = server_endpoint(sock, &id, ALPN_EXPORTER)?;
    let (tx, done) = mpsc::unbounded_channel();
    let ep = endpoint.clone();
    let serve = std::sync::Arc::new(serve);
    tokio::spawn(async move {
        while let Some(inc) = ep.accept().await {
            let (serve, tx) = (serve.clone(), tx.clone());
            tokio::spawn(async move {
                let Ok(conn) = inc.await else { return };
                serve(conn, tx).await
            });
        }
    });
    Ok(Server {
        addr,
        fingerprint: id.fingerprint(),
        done,
        _endpoint: endpoint,
    })
}

/// A plain quinn server: counts the bytes of every bidi stream.
fn plain_server() -> Result<Server> {
    server(|conn, tx| async move {
        while let Ok((_send, mut recv)) = conn.accept_bi().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut n = 0usize;
                while let Ok(Some(c)) = recv.read_chunk(CHUNK, true).await {
                    n += c.bytes.len();
                }
                let _ = tx.send(n);
            });
        }
    })
}

/// A jmp exporter Link server: welcomes everyone, accepts stream channels on "sink" and counts
/// their bytes.
fn jmp_server() -> Result<Server> {
    server(|conn, tx| async move {
        let Ok(mut link) = Link::exporter(conn).await else {
            return;
        };
        while let Some(ev) = link.events.recv().await {
            match ev {
                LinkEvent::Hello(_) => link.handle.welcome(Welcome {
                    exporter: "bench".into(),
                    features: features::ALL,
                    instance: 1,
                    devices: vec![DeviceInfo {
                        name: "sink".into(),
                        kind: Kind::from_wire("bench"),
                        state: DeviceState::Available,
                        params: Bytes::new(),
                        detail: String::new(),
                    }],
                }),
                LinkEvent::Incoming(inc) => {
                    let Some(ChannelIo::Stream(mut pipe)) = inc.accept(Bytes::new()) else {
                        continue;
                    };
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let mut n = 0usize;
                        while let Ok(Some(b)) = pipe.rx.recv().await {
                            n += b.len();
                        }
                        let _ = tx.send(n);
                    });
                }
                LinkEvent::Ended { .. } => break,
                _ => {}
            }
        }
    })
}

fn chunk() -> Bytes {
    Bytes::from((0..CHUNK).map(|i| i as u8).collect::<Vec<u8>>())
}

/// MB/s through one plain quinn bidi stream (handshake not timed).
async fn plain_round(s: &mut Server, total: usize) -> Result<f64> {
    let ep = client_endpoint(s.addr)?;
    let (conn, _) = connect(&ep, s.addr, ALPN_EXPORTER, Some(s.fingerprint)).await?;
    let data = chunk();
    let t0 = Instant::now();
    let (mut send, _recv) = conn.open_bi().await?;
    for _ in 0..total / CHUNK {
        send.write_chunk(data.clone()).await?;
    }
    send.finish()?;
    let n = tokio::time::timeout(Duration::from_secs(120), s.done.recv())
        .await
        .context("server count")?
        .ok_or_else(|| anyhow!("server gone"))?;
    let dt = t0.elapsed();
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
    anyhow::ensure!(n == total, "server counted {n} of {total} bytes");
    Ok(total as f64 / dt.as_secs_f64() / 1e6)
}

/// MB/s through one jmp stream channel (handshake and Hello/Welcome not timed).
async fn jmp_round(s: &mut Server, total: usize) -> Result<f64> {
    let ep = client_endpoint(s.addr)?;
    let (conn, _) = connect(&ep, s.addr, ALPN_EXPORTER, Some(s.fingerprint)).await?;
    let hello = Hello {
        features: features::ALL,
        client: "bench".into(),
        session: 1,
        token: "bench".into(),
    };
    let (link, _welcome) = Link::client(conn, hello).await?;
    let data = chunk();
    let t0 = Instant::now();
    let (pipe, _offset) = link
        .handle
        .open_stream("sink", Bytes::new())
        .await
        .map_err(|e| anyhow!("open_stream: {e}"))?;
    let (mut tx, _rx) = pipe.split();
    for _ in 0..total / CHUNK {
        tx.send(data.clone()).await?;
    }
    tx.finish()?;
    let n = tokio::time::timeout(Duration::from_secs(120), s.done.recv())
        .await
        .context("server count")?
        .ok_or_else(|| anyhow!("server gone"))?;
    let dt = t0.elapsed();
    link.handle.bye(ErrorCode::Ok, "done");
    ep.wait_idle().await;
    anyhow::ensure!(n == total, "server counted {n} of {total} bytes");
    Ok(total as f64 / dt.as_secs_f64() / 1e6)
}

/// Runs the quinn-vs-jmp-stream benchmark; returns (markdown, json).
pub fn run(rounds: usize) -> Result<(String, serde_json::Value)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut plain = plain_server()?;
        let mut jmp = jmp_server()?;
        let mut rp = Vec::new();
        let mut rj = Vec::new();
        for r in 0..rounds {
            let p = plain_round(&mut plain, TOTAL).await.unwrap_or_else(|e| {
                eprintln!("  round {}: plain quinn: {e:#}", r + 1);
                f64::NAN
            });
            let j = jmp_round(&mut jmp, TOTAL).await.unwrap_or_else(|e| {
                eprintln!("  round {}: jmp stream: {e:#}", r + 1);
                f64::NAN
            });
            eprintln!(
                "  quinn round {}: plain {:>7.1} MB/s  jmp {:>7.1} MB/s",
                r + 1,
                p,
                j
            );
            rp.push(p);
            rj.push(j);
        }
        let (mp, mj) = (median(&rp), median(&rj));
        let ratio = mj / mp;
        let t = Target::AtLeast(0.9);
        let md = format!(
            "### One jmp stream channel vs a plain quinn stream\n\n{} MiB per round as {} KiB \
             `Bytes` chunks, one stream, loopback, same endpoints and TLS; MB/s = 10^6 bytes/s \
             until the receiver has counted every byte. Medians over {rounds} interleaved \
             rounds.\n\n| path | MB/s | × plain quinn |\n|---|---:|---:|\n\
             | plain quinn stream | {} | 1.00 |\n| jmp stream channel | {} | {} |\n\n\
             - jmp stream / plain quinn = {} (target {}): **{}**\n",
            TOTAL >> 20,
            CHUNK >> 10,
            cell(mp, 0),
            cell(mj, 0),
            cell(ratio, 2),
            cell(ratio, 2),
            t.describe(),
            t.verdict(ratio)
        );
        let js = serde_json::json!({
            "bytes_per_round": TOTAL,
            "chunk": CHUNK,
            "rounds": rounds,
            "paths": [
                {"name": "plain quinn stream", "mb_s": json(mp), "rounds_mb_s": rp.iter().map(|v| json(*v)).collect::<Vec<_>>()},
                {"name": "jmp stream channel", "mb_s": json(mj), "rounds_mb_s": rj.iter().map(|v| json(*v)).collect::<Vec<_>>()},
            ],
            "targets": [{"what": "jmp stream / plain quinn", "value": json(ratio), "target": t.describe(), "verdict": t.verdict(ratio)}],
        });
        Ok((md, js))
    })
}
