//! Running a power command: an argv list (no shell), its own process group, a timeout after
//! which the whole group is killed, and the output kept (bounded) to tell the user why it
//! failed.

use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Output kept per stream; more is read and dropped (a chatty command must not fill memory, or
/// block on a full pipe).
const KEEP: usize = 16 * 1024;

#[derive(Debug)]
pub struct Output {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot run {program:?}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program:?} did not finish within {}s and was killed", timeout.as_secs_f64())]
    Timeout { program: String, timeout: Duration },
    #[error("waiting for {program:?}: {source}")]
    Wait {
        program: String,
        source: std::io::Error,
    },
}

async fn keep(mut r: impl AsyncRead + Unpin) -> String {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = KEEP.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// Runs `argv` with `env` added, waiting at most `timeout`.
pub async fn run(
    argv: &[String],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Output, RunError> {
    let program = argv.first().cloned().unwrap_or_default();
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&argv[1..])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so that a timeout kills what it started too (a shell script's
        // children), by the group's id, never by name.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| RunError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pid = child.id();
    let out = child.stdout.take();
    let err = child.stderr.take();
    let reading = async {
        let o = async {
            match out {
                Some(o) => keep(o).await,
                None => String::new(),
            }
        };
        let e = async {
            match err {
                Some(e) => keep(e).await,
                None => String::new(),
            }
        };
        let (stdout, stderr, status) = tokio::join!(o, e, child.wait());
        (stdout, stderr, status)
    };
    match tokio::time::timeout(timeout, reading).await {
        Ok((stdout, stderr, status)) => {
            let status = status.map_err(|source| RunError::Wait {
                program: program.clone(),
                source,
            })?;
            Ok(Output {
                status,
                stdout,
                stderr,
            })
        }
        Err(_) => {
            if let Some(pid) = pid {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Err(RunError::Timeout { program, timeout })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn output_status_timeout_and_missing_program() {
        let o = run(
            &argv(&["sh", "-c", "echo out; echo \"err $JMP_X\" >&2; exit 3"]),
            &[("JMP_X", "y")],
            Duration::from_secs(10),
        )
        .await
        .expect("ran");
        assert_eq!(o.status.code(), Some(3));
        assert_eq!(o.stdout, "out\n");
        assert_eq!(o.stderr, "err y\n");

        let e = run(&argv(&["sleep", "30"]), &[], Duration::from_millis(200))
            .await
            .expect_err("times out");
        assert!(matches!(e, RunError::Timeout { .. }), "{e}");

        let e = run(&argv(&["/nonexistent/relay"]), &[], Duration::from_secs(1))
            .await
            .expect_err("no such program");
        assert!(e.to_string().contains("/nonexistent/relay"), "{e}");
    }
}
