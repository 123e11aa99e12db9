//! jmpd's own Prometheus endpoint (`metrics: HOST:PORT` in the config): sessions, bytes per
//! device and direction, power-on time, the current holder, what sessions' budgets hold and
//! the progress of their blocking work, and the process's CPU and memory.
//! Values are read from the exporter when scraped, so nothing on the data path waits for them.

use jmp_exporter::Exporter;
use prometheus::{
    Encoder, GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Who holds the board as the controller last said: (lease, client, team).
pub type Holder = Arc<Mutex<Option<(String, String, String)>>>;

/// A power device's clock: since when it is on (if it is), and how long it was on before.
type PowerClock = Arc<Mutex<(Option<Instant>, Duration)>>;

pub struct JmpdMetrics {
    registry: Registry,
    exporter: Arc<Exporter>,
    holder: Holder,
    sessions: IntGauge,
    sessions_total: IntCounter,
    bytes: IntCounterVec,
    power_on: prometheus::CounterVec,
    holder_info: GaugeVec,
    budget_bytes: IntGauge,
    jobs: IntGauge,
    job_bytes: IntCounter,
    channels: IntGauge,
    waiting_channels: IntGauge,
    /// Per power device: (on since, total on before that).
    power: Vec<(String, PowerClock)>,
}

impl JmpdMetrics {
    /// Registers the metrics and starts following the power devices' state.
    pub fn new(exporter: Arc<Exporter>, holder: Holder) -> Arc<JmpdMetrics> {
        let r = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            r.register(c).expect("metric names are unique");
        };
        let sessions = IntGauge::new(
            "jmpd_sessions",
            "Sessions admitted now (attachments and one-shot requests).",
        )
        .expect("valid metric");
        reg(Box::new(sessions.clone()));
        let sessions_total =
            IntCounter::new("jmpd_sessions_total", "Sessions admitted.").expect("valid metric");
        reg(Box::new(sessions_total.clone()));
        let bytes = IntCounterVec::new(
            Opts::new(
                "jmpd_device_bytes_total",
                "Bytes through each device's channels, by direction (to_board, from_board).",
            ),
            &["device", "direction"],
        )
        .expect("valid metric");
        reg(Box::new(bytes.clone()));
        let power_on = prometheus::CounterVec::new(
            Opts::new(
                "jmpd_power_on_seconds_total",
                "Time each power device has been on since jmpd started.",
            ),
            &["device"],
        )
        .expect("valid metric");
        reg(Box::new(power_on.clone()));
        let holder_info = GaugeVec::new(
            Opts::new(
                "jmpd_holder_info",
                "1 for the lease holding the board (client and its team label); absent when free.",
            ),
            &["lease", "client", "team"],
        )
        .expect("valid metric");
        reg(Box::new(holder_info.clone()));
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            reg(Box::new(g.clone()));
            g
        };
        let budget_bytes = gauge(
            "jmpd_budget_bytes",
            "Bytes sessions hold under their budgets now (payloads, read buffers, answers not yet sent).",
        );
        let jobs = gauge(
            "jmpd_blocking_jobs",
            "Blocking jobs (storage reads, writes, hashes) running now.",
        );
        let channels = gauge("jmpd_channels", "Channels served now, all sessions.");
        let waiting_channels = gauge(
            "jmpd_channels_waiting",
            "Channel opens waiting for their session's channel budget now.",
        );
        let job_bytes = IntCounter::new(
            "jmpd_blocking_job_bytes_total",
            "Bytes blocking jobs have read, written or hashed (their progress).",
        )
        .expect("valid metric");
        reg(Box::new(job_bytes.clone()));
        reg(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        let mut power = Vec::new();
        for d in exporter.devices().iter() {
            if d.power_switch().is_none() {
                continue;
            }
            let dev = d.clone();
            let clock: PowerClock = Arc::new(Mutex::new((None, Duration::ZERO)));
            power.push((d.name().to_string(), clock.clone()));
            let mut rx = d.status();
            tokio::spawn(async move {
                loop {
                    let on = {
                        let st = rx.borrow_and_update();
                        dev.power_switch().is_some_and(|s| s.is_on(&st))
                    };
                    {
                        let mut c = clock.lock().unwrap_or_else(|e| e.into_inner());
                        match (on, c.0) {
                            (true, None) => c.0 = Some(Instant::now()),
                            (false, Some(since)) => {
                                c.1 += since.elapsed();
                                c.0 = None;
                            }
                            _ => {}
                        }
                    }
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
            });
        }
        Arc::new(JmpdMetrics {
            registry: r,
            exporter,
            holder,
            sessions,
            sessions_total,
            bytes,
            power_on,
            holder_info,
            budget_bytes,
            jobs,
            job_bytes,
            channels,
            waiting_channels,
            power,
        })
    }

    /// The text exposition, with every value read now.
    pub fn render(&self) -> String {
        let st = self.exporter.stats();
        use std::sync::atomic::Ordering::Relaxed;
        self.sessions.set(st.sessions.load(Relaxed));
        let total = st.sessions_total.load(Relaxed);
        self.sessions_total
            .inc_by(total.saturating_sub(self.sessions_total.get()));
        for (dev, b) in self.exporter.devices().bytes() {
            for (dir, n) in [("to_board", &b.to_board), ("from_board", &b.from_board)] {
                let c = self.bytes.with_label_values(&[dev, dir]);
                c.inc_by(n.load(Relaxed).saturating_sub(c.get()));
            }
        }
        let u = self.exporter.devices().usage();
        let gauge = |g: &IntGauge, v: &std::sync::atomic::AtomicU64| {
            g.set(i64::try_from(v.load(Relaxed)).unwrap_or(i64::MAX))
        };
        gauge(&self.budget_bytes, &u.bytes);
        gauge(&self.jobs, &u.jobs);
        gauge(&self.channels, &u.channels);
        gauge(&self.waiting_channels, &u.waiting_channels);
        self.job_bytes.inc_by(
            u.job_bytes
                .load(Relaxed)
                .saturating_sub(self.job_bytes.get()),
        );
        for (dev, clock) in &self.power {
            let c = clock.lock().unwrap_or_else(|e| e.into_inner());
            let secs = (c.1 + c.0.map_or(Duration::ZERO, |s| s.elapsed())).as_secs_f64();
            let m = self.power_on.with_label_values(&[dev]);
            let d = secs - m.get();
            if d > 0.0 {
                m.inc_by(d);
            }
        }
        self.holder_info.reset();
        let holder = self
            .holder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .or_else(|| {
                self.exporter
                    .holder()
                    .map(|c| (String::new(), c, String::new()))
            });
        if let Some((lease, client, team)) = holder {
            self.holder_info
                .with_label_values(&[&lease, &client, &team])
                .set(1.0);
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Serves `/metrics` and `/healthz` on `listener` for the life of the process.
pub async fn serve(listener: tokio::net::TcpListener, m: Arc<JmpdMetrics>) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
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
    axum::serve(listener, app).await
}
