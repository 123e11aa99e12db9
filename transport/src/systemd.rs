//! systemd's notify protocol for the daemons (`Type=notify` units): `READY=1` once the daemon
//! serves, and the watchdog keep-alive. Outside systemd (`NOTIFY_SOCKET` unset) both do
//! nothing.

use std::time::Duration;

/// Tells systemd the daemon serves now (its clients can connect).
pub fn ready(status: &str) {
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ],
    );
}

/// If the unit sets `WatchdogSec=`, pings systemd at half that interval from a task on the
/// current runtime. The ping proves that the runtime still runs tasks: a daemon whose event
/// loop is stuck stops pinging, and systemd restarts it.
pub fn spawn_watchdog() {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
    });
}
