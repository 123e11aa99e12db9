//! Noticing a peer that stopped answering before the connection gives up on it.
//!
//! A session's QUIC idle timeout ([`crate::endpoint::IDLE_TIMEOUT`], 10 s) decides when a
//! silent exporter is given up and the attachment reconnects; it is that long so that a busy
//! host or a short network blip does not cost a reconnect. Meanwhile the user must not think
//! the board is there: the client sends keep-alives every [`CLIENT_KEEP_ALIVE`] on its
//! sessions, which an exporter that is alive acknowledges at once, so a connection from which
//! nothing at all arrived for [`STALL_AFTER`] is *stalled*. `jmp status` shows it, and the
//! console's pty says so (typed bytes are still queued, and arrive if it answers again). The cost at
//! rest is measured in docs/benchmarks.md.

use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The client's keep-alive on sessions with an exporter.
pub const CLIENT_KEEP_ALIVE: Duration = Duration::from_millis(500);
/// Nothing received for this long although keep-alives went out: the peer is not answering.
/// Three keep-alives, so one lost packet (or ACK) alone does not raise it.
pub const STALL_AFTER: Duration = Duration::from_millis(1500);
/// Datagrams we must have sent since the last one received before silence means a stall.
const STALL_PROBES: u64 = 3;
/// How often the received-packet count is looked at.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Watches `conn` until it closes: the receiver says whether it is stalled now. The watcher
/// task ends with the connection (the receiver then keeps its last value).
pub fn watch(conn: quinn::Connection) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut seen = conn.stats().udp_rx.datagrams;
        let mut sent_since = conn.stats().udp_tx.datagrams;
        let mut last = Instant::now();
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = conn.closed() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let stats = conn.stats();
            let rx_now = stats.udp_rx.datagrams;
            if rx_now != seen {
                seen = rx_now;
                sent_since = stats.udp_tx.datagrams;
                last = now;
            }
            // Silence counts only if we kept asking: a process (or a whole test guest) that
            // was not scheduled for a while sent nothing either, and must not call its
            // peer dead for its own pause.
            let asked = stats.udp_tx.datagrams.saturating_sub(sent_since) >= STALL_PROBES;
            let stalled = asked && now.duration_since(last) >= STALL_AFTER;
            tx.send_if_modified(|s| std::mem::replace(s, stalled) != stalled);
        }
    });
    rx
}
