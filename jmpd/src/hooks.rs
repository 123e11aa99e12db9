//! Lease hooks: commands jmpd runs before a lease's client may use the board (beforeLease: a
//! reflash, a known image) and after a lease ends (afterLease, then powering off with
//! `powerOffAfterLease`).
//!
//! What must hold:
//! - A client of a new lease never uses the board before its beforeLease hook is done: its
//!   connection waits ("preparing board", the hook's output as notices) and is admitted once
//!   the hook succeeded; a failure with `onFailure: endLease` ends the lease with the hook's
//!   output as the reason (jmpd tells waiting clients at once, and the controller ends it).
//! - Nobody else is granted the board while afterLease runs: the controller starts the
//!   cleanup in the same step as the lease's end (the exporter declared `cleanup_secs` at
//!   registration) and waits for this exporter's report (`lease-hook`).
//! - A restart never re-runs a beforeLease for the lease already prepared, and never forgets an
//!   afterLease it owes: both are kept in `lease-hooks.json` in the state dir, and the owed
//!   cleanup is declared at the next registration.
//!
//! Hooks run without a shell, in their own process group (a timeout kills the whole group),
//! with `JMP_EXPORTER`, `JMP_LEASE`, `JMP_CLIENT` and `JMP_HOOK` set. Their output goes to
//! jmpd's log line by line and to the waiting or attached user.

use jmp_exporter::config::{Hook, Hooks as HookConfig, OnFailure};
use jmp_exporter::Exporter;
use jmp_protocol::api::{ActiveLease, HookPhase, HookReport};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Output kept for the report (the tail is what explains a failure).
const KEEP_LINES: usize = 40;
const KEEP_BYTES: usize = 4096;
/// Room for powering off after the afterLease hook (a power command's own timeout is 30 s).
const POWER_OFF_ALLOWANCE: Duration = Duration::from_secs(40);

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
struct Persisted {
    /// The lease whose beforeLease has run (not to be run again after a restart).
    #[serde(default)]
    prepared: Option<String>,
    /// A lease that began here and whose afterLease has not run yet.
    #[serde(default)]
    owed: Option<String>,
    /// The client that held `owed` (its afterLease hook gets it as `JMP_CLIENT`, also after a
    /// restart of jmpd).
    #[serde(default)]
    owed_client: Option<String>,
    /// The last lease cleaned up after (its report may not have reached the controller: a
    /// second request to clean up after it is answered, not run again).
    #[serde(default)]
    cleaned: Option<String>,
}

pub struct LeaseHooks {
    exporter_name: String,
    before: Option<Hook>,
    after: Option<Hook>,
    power_off: bool,
    exporter: Arc<Exporter>,
    file: PathBuf,
    state: Mutex<State>,
    /// Reports for the controller; the registrar sends them (again after a reconnect).
    reports: mpsc::UnboundedSender<HookReport>,
    /// Signalled when a beforeLease hook ends (a cleanup of its lease waits for it).
    prepared: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    kept: Persisted,
    /// The lease whose afterLease runs now.
    cleaning: Option<String>,
    /// The lease whose beforeLease runs now.
    preparing: Option<String>,
}

/// What a hook's run came to.
struct Ran {
    ok: bool,
    /// The exit status or the timeout, and the output's tail.
    summary: String,
}

impl LeaseHooks {
    /// `None` when the config has nothing to do around leases.
    pub fn new(
        cfg: &jmp_exporter::ExporterConfig,
        exporter: Arc<Exporter>,
        state_dir: &std::path::Path,
    ) -> Option<(Arc<LeaseHooks>, mpsc::UnboundedReceiver<HookReport>)> {
        let h: HookConfig = cfg.hooks.clone().unwrap_or_default();
        if h.before_lease.is_none() && h.after_lease.is_none() && !cfg.power_off_after_lease {
            return None;
        }
        let file = state_dir.join("lease-hooks.json");
        let kept: Persisted = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let (tx, rx) = mpsc::unbounded_channel();
        Some((
            Arc::new(LeaseHooks {
                exporter_name: cfg.metadata.name.clone(),
                before: h.before_lease,
                after: h.after_lease,
                power_off: cfg.power_off_after_lease,
                exporter,
                file,
                state: Mutex::new(State {
                    kept,
                    ..Default::default()
                }),
                reports: tx,
                prepared: tokio::sync::Notify::new(),
            }),
            rx,
        ))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, kept: &Persisted) {
        let text = serde_json::to_vec(kept).unwrap_or_default();
        if let Err(e) = jmp_transport::write_secret_file(&self.file, &text) {
            warn!(
                "cannot record the lease hooks' state in {}: {e}",
                self.file.display()
            );
        }
    }

    /// How long the cleanup after a lease may take at most (declared to the controller).
    pub fn cleanup_secs(&self) -> Option<u64> {
        if self.after.is_none() && !self.power_off {
            return None;
        }
        let hook = self.after.as_ref().map_or(Duration::ZERO, |h| h.timeout());
        let power = if self.power_off {
            POWER_OFF_ALLOWANCE
        } else {
            Duration::ZERO
        };
        Some((hook + power + Duration::from_secs(10)).as_secs())
    }

    /// The lease whose cleanup this exporter still owes (for the registration).
    pub fn owed(&self) -> Option<String> {
        let st = self.state();
        st.kept
            .owed
            .clone()
            .filter(|_| self.cleanup_secs().is_some())
    }

    /// A push from the controller: the current lease, and the ended lease it waits for us to
    /// clean up after. Called before the push is made known to waiting connections, so that a
    /// client of a new lease already finds the board "preparing".
    pub fn on_push(self: &Arc<Self>, lease: Option<&ActiveLease>, cleaning: Option<&str>) {
        let mut st = self.state();
        if let Some(x) = cleaning.filter(|x| st.kept.cleaned.as_deref() == Some(*x)) {
            // Done already; the report was lost on the way.
            let _ = self.reports.send(HookReport {
                lease: x.to_string(),
                phase: HookPhase::After,
                ok: true,
                output: "cleaned up already".into(),
                end_lease: false,
                disable: false,
            });
        } else if let Some(x) = cleaning {
            if st.cleaning.as_deref() != Some(x) {
                st.cleaning = Some(x.to_string());
                drop(st);
                let me = self.clone();
                let lease = x.to_string();
                tokio::spawn(async move { me.clean_up(lease).await });
                st = self.state();
            }
        } else if let (None, Some(owed)) = (lease, st.kept.owed.clone()) {
            // The controller does not wait for a cleanup (it restarted and lost track, or is
            // older): clean up anyway, while nobody holds the board.
            if st.cleaning.is_none() && self.cleanup_secs().is_some() {
                st.cleaning = Some(owed.clone());
                drop(st);
                let me = self.clone();
                tokio::spawn(async move { me.clean_up(owed).await });
                st = self.state();
            }
        }
        let Some(l) = lease else { return };
        if st.kept.prepared.as_deref() == Some(l.name.as_str())
            || st.preparing.as_deref() == Some(l.name.as_str())
        {
            return;
        }
        // A new lease on this board: from now on its cleanup is owed.
        st.kept.owed = Some(l.name.clone());
        st.kept.owed_client = Some(l.client.clone());
        let kept = st.kept.clone();
        let Some(hook) = self.before.clone() else {
            st.kept.prepared = Some(l.name.clone());
            let kept = st.kept.clone();
            drop(st);
            self.save(&kept);
            return;
        };
        st.preparing = Some(l.name.clone());
        drop(st);
        self.save(&kept);
        self.exporter.preparing(
            &l.name,
            &format!(
                "beforeLease hook {} (up to {})",
                hook.run.join(" "),
                fmt_duration(hook.timeout())
            ),
        );
        let me = self.clone();
        let lease = l.clone();
        tokio::spawn(async move { me.prepare(lease, hook).await });
    }

    async fn prepare(self: Arc<Self>, lease: ActiveLease, hook: Hook) {
        info!(lease = %lease.name, client = %lease.client, "beforeLease hook: {}", hook.run.join(" "));
        let ran = self
            .run(&hook, "beforeLease", &lease.name, &lease.client)
            .await;
        let end = !ran.ok && hook.on_failure.unwrap_or(OnFailure::EndLease) == OnFailure::EndLease;
        let why = format!("beforeLease hook failed: {}", ran.summary);
        if ran.ok {
            info!(lease = %lease.name, "beforeLease hook done: the board is ready");
        } else {
            warn!(lease = %lease.name, end_lease = end, "{why}");
        }
        {
            let mut st = self.state();
            st.preparing = None;
            st.kept.prepared = Some(lease.name.clone());
            let kept = st.kept.clone();
            drop(st);
            self.save(&kept);
        }
        self.prepared.notify_waiters();
        self.exporter.prepared(
            &lease.name,
            end.then(|| format!("lease {} ended: {why}", lease.name)),
        );
        if end {
            // Ends the attached or waiting session at once; the controller ends the lease.
            self.exporter
                .end_lease(&lease.name, &format!("lease {} ended: {why}", lease.name));
        }
        let _ = self.reports.send(HookReport {
            lease: lease.name,
            phase: HookPhase::Before,
            ok: ran.ok,
            output: ran.summary,
            end_lease: end,
            disable: false,
        });
    }

    async fn clean_up(self: Arc<Self>, lease: String) {
        // A lease that ended while its beforeLease hook still ran: that hook finishes first,
        // the two never run at once.
        loop {
            let done = self.prepared.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.state().preparing.as_deref() != Some(lease.as_str()) {
                break;
            }
            done.await;
        }
        let mut ok = true;
        let mut summary = String::new();
        let mut disable = false;
        if let Some(hook) = self.after.clone() {
            // The lease's holder, as recorded when it began here ("" for a lease this exporter
            // never saw begin).
            let client = {
                let st = self.state();
                st.kept
                    .owed_client
                    .clone()
                    .filter(|_| st.kept.owed.as_deref() == Some(lease.as_str()))
                    .unwrap_or_default()
            };
            info!(lease = %lease, client = %client, "afterLease hook: {}", hook.run.join(" "));
            let ran = self.run(&hook, "afterLease", &lease, &client).await;
            if ran.ok {
                info!(lease = %lease, "afterLease hook done");
            } else {
                disable = hook.on_failure == Some(OnFailure::Disable);
                warn!(lease = %lease, disable, "afterLease hook failed: {}", ran.summary);
            }
            ok = ran.ok;
            summary = ran.summary;
        }
        if self.power_off {
            for d in self.exporter.devices().iter() {
                let Some(switch) = d.power_switch() else {
                    continue;
                };
                match switch.switch_off().await {
                    Ok(_) => {
                        info!(lease = %lease, device = d.name(), "powered off after the lease")
                    }
                    Err(r) => {
                        ok = false;
                        let line = format!("power off of {} failed: {}", d.name(), r.reason);
                        warn!(lease = %lease, "{line}");
                        summary.push_str(&line);
                    }
                }
            }
        }
        {
            let mut st = self.state();
            st.cleaning = None;
            if st.kept.owed.as_deref() == Some(lease.as_str()) {
                st.kept.owed = None;
                st.kept.owed_client = None;
            }
            st.kept.cleaned = Some(lease.clone());
            let kept = st.kept.clone();
            drop(st);
            self.save(&kept);
        }
        let _ = self.reports.send(HookReport {
            lease,
            phase: HookPhase::After,
            ok,
            output: summary,
            end_lease: false,
            disable: disable && !ok,
        });
    }

    /// Runs one hook to its end or its timeout, streaming its output.
    async fn run(&self, hook: &Hook, what: &str, lease: &str, client: &str) -> Ran {
        let timeout = hook.timeout();
        let mut cmd = tokio::process::Command::new(&hook.run[0]);
        cmd.args(&hook.run[1..])
            .env("JMP_EXPORTER", &self.exporter_name)
            .env("JMP_LEASE", lease)
            .env("JMP_CLIENT", client)
            .env("JMP_HOOK", what)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return Ran {
                    ok: false,
                    summary: format!("cannot run {:?}: {e}", hook.run[0]),
                }
            }
        };
        let pid = child.id();
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        for r in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|e| Box::new(e) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut tail: VecDeque<String> = VecDeque::new();
        let keep = |tail: &mut VecDeque<String>, line: String| {
            let line: String = line.chars().take(512).collect();
            info!(hook = what, lease, "| {line}");
            self.exporter.hook_output(&format!("{what}: {line}"));
            tail.push_back(line);
            while tail.len() > KEEP_LINES
                || tail.iter().map(|l| l.len() + 1).sum::<usize>() > KEEP_BYTES
            {
                tail.pop_front();
            }
        };
        let work = async {
            while let Some(l) = rx.recv().await {
                keep(&mut tail, l);
            }
            child.wait().await
        };
        let status = tokio::time::timeout(timeout, work).await;
        // One line: it becomes a lease's end reason and a client's error message.
        let out = tail.iter().cloned().collect::<Vec<_>>().join(" | ");
        let with_output = |head: String| {
            if out.is_empty() {
                head
            } else {
                format!("{head}; output: {out}")
            }
        };
        match status {
            Ok(Ok(st)) if st.success() => Ran {
                ok: true,
                summary: out,
            },
            Ok(Ok(st)) => Ran {
                ok: false,
                summary: with_output(match st.code() {
                    Some(c) => format!("{} exited with status {c}", hook.run[0]),
                    None => format!("{} was killed by a signal", hook.run[0]),
                }),
            },
            Ok(Err(e)) => Ran {
                ok: false,
                summary: format!("waiting for {}: {e}", hook.run[0]),
            },
            Err(_) => {
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                Ran {
                    ok: false,
                    summary: with_output(format!(
                        "{} did not finish within {} and was killed",
                        hook.run[0],
                        fmt_duration(timeout)
                    )),
                }
            }
        }
    }
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else if s > 0 {
        format!("{s}s")
    } else {
        format!("{}ms", d.as_millis())
    }
}
