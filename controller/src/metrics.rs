//! Prometheus metrics for chargeback and operations, and the small HTTP server that exposes
//! them (`/metrics` in the Prometheus text format, `/healthz`).
//!
//! Labelled by the requesting client's `team` label (empty when it has none) so that a lab can
//! bill wait and hold time per team.

use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::net::SocketAddr;
use std::sync::Arc;

pub struct Metrics {
    pub registry: Registry,
    /// Lease requests by how they were answered at once: granted, queued, or the refusal.
    pub requests: IntCounterVec,
    /// Leases granted, immediately or from the queue.
    pub grants: IntCounterVec,
    /// Time from request to grant.
    pub wait: HistogramVec,
    /// Time a lease was held, by why it ended.
    pub held: HistogramVec,
    /// Waiting requests that gave up.
    pub wait_timeouts: IntCounterVec,
    pub exporters: IntGaugeVec,
    pub leases_active: IntGauge,
    pub queue_length: IntGauge,
    pub store_commit: HistogramVec,
    /// Per exporter: 1 while it is registered and connected, 0 while it is offline (the
    /// "exporter offline" alert of deploy/).
    pub exporter_up: IntGaugeVec,
    /// How long the oldest request now waiting has waited (0 with an empty queue).
    pub queue_oldest: Gauge,
    /// Per leased exporter: the share of its client's longest allowed lease that the lease
    /// has used so far (1.0: it reaches the policy limit now).
    pub policy_used: GaugeVec,
    /// Relay sessions open now.
    pub relay_sessions: IntGauge,
    /// Bytes the relay moved, by direction (to_exporter, to_client).
    pub relay_bytes: IntCounterVec,
    /// Relay sessions that ended, by why (lease_ended, idle, no_punch, unclaimed, replaced).
    pub relay_ended: IntCounterVec,
    /// Seconds exporters were held, by the holder's team and the exporter; grows while a lease
    /// lasts (at least every [`crate::core::ACCRUE_EVERY`]), so `increase(...[30d])` bills a
    /// month even for leases that span its end.
    pub leased_seconds: CounterVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str], b: Vec<f64>) -> HistogramVec {
    let h =
        HistogramVec::new(HistogramOpts::new(name, help).buckets(b), labels).expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let secs = vec![
            0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0,
            86400.0,
        ];
        let exporters = IntGaugeVec::new(
            Opts::new(
                "jmp_exporters",
                "Exporters by state: registered, online, leased, disabled.",
            ),
            &["state"],
        )
        .expect("valid metric");
        r.register(Box::new(exporters.clone())).expect("unique");
        let leases_active =
            IntGauge::new("jmp_leases_active", "Leases currently held.").expect("valid metric");
        r.register(Box::new(leases_active.clone())).expect("unique");
        let queue_length = IntGauge::new(
            "jmp_lease_queue_length",
            "Lease requests waiting in the queue.",
        )
        .expect("valid metric");
        r.register(Box::new(queue_length.clone())).expect("unique");
        let exporter_up = IntGaugeVec::new(
            Opts::new(
                "jmp_exporter_up",
                "Per exporter: 1 while registered and connected, 0 while offline.",
            ),
            &["exporter"],
        )
        .expect("valid metric");
        r.register(Box::new(exporter_up.clone())).expect("unique");
        let queue_oldest = Gauge::new(
            "jmp_lease_queue_oldest_wait_seconds",
            "How long the oldest waiting lease request has waited.",
        )
        .expect("valid metric");
        r.register(Box::new(queue_oldest.clone())).expect("unique");
        let policy_used = GaugeVec::new(
            Opts::new(
                "jmp_lease_policy_used_ratio",
                "Per leased exporter: time held / the client's longest allowed lease.",
            ),
            &["exporter", "client", "team"],
        )
        .expect("valid metric");
        r.register(Box::new(policy_used.clone())).expect("unique");
        let relay_sessions =
            IntGauge::new("jmp_relay_sessions", "Relay sessions open now.").expect("valid metric");
        r.register(Box::new(relay_sessions.clone()))
            .expect("unique");
        let leased_seconds = CounterVec::new(
            Opts::new(
                "jmp_leased_seconds_total",
                "Seconds exporters were leased, by the holder's team and the exporter.",
            ),
            &["team", "exporter"],
        )
        .expect("valid metric");
        r.register(Box::new(leased_seconds.clone()))
            .expect("unique");
        Metrics {
            leased_seconds,
            relay_bytes: counter(
                &r,
                "jmp_relay_bytes_total",
                "Bytes the relay moved between clients and exporters, by direction.",
                &["direction"],
            ),
            relay_ended: counter(
                &r,
                "jmp_relay_sessions_ended_total",
                "Relay sessions that ended, by why.",
                &["reason"],
            ),
            exporter_up,
            queue_oldest,
            policy_used,
            relay_sessions,
            requests: counter(
                &r,
                "jmp_lease_requests_total",
                "Lease requests, by the immediate answer (granted, queued, no_match, outside_policy, all_offline, all_busy, invalid, forbidden).",
                &["result", "team"],
            ),
            grants: counter(
                &r,
                "jmp_lease_grants_total",
                "Leases granted, by how (immediate or queued).",
                &["how", "team"],
            ),
            wait: histogram(
                &r,
                "jmp_lease_wait_seconds",
                "Time from a lease request to its grant.",
                &["team"],
                secs.clone(),
            ),
            held: histogram(
                &r,
                "jmp_lease_held_seconds",
                "Time a lease was held, by why it ended.",
                &["reason", "team"],
                secs,
            ),
            wait_timeouts: counter(
                &r,
                "jmp_lease_wait_timeouts_total",
                "Waiting lease requests that gave up.",
                &["team"],
            ),
            store_commit: histogram(
                &r,
                "jmp_store_commit_seconds",
                "Time to commit a batch of changes to the store.",
                &["backend"],
                vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5],
            ),
            exporters,
            leases_active,
            queue_length,
            registry: r,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown`.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Parses `--metrics` (an address, or empty to disable).
pub fn parse_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e| format!("--metrics {s:?}: {e}"))
}
