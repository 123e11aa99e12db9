//! Client side of a storage device in `jmp attach`: the FUSE mount at
//! `<mount dir>/<exporter>/<device>/`, served in-process on the attachment's connection. The
//! mount outlives links: requests made while the link is down wait for the next one (and are
//! sent again if they were in flight), and fail with EIO after [`PATIENCE`]. Dropping the
//! bridge unmounts.

use super::client::{self, Client, Retry};
use super::mount::{self, Mounted};
use crate::{places, BoxFuture, Bridge, BridgeCtx, BridgeExit, CacheState, Endpoint, Local};
use jmp_protocol::codec::Codec;
use jmp_protocol::kinds::storage::DeviceParams;
use jmp_protocol::{DeviceInfo, ErrorCode, Kind};
use jmp_transport::Channels;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// How long a program's read or write waits for a lost link to come back before it fails
/// with EIO. Long enough for a reconnect after a blip or an exporter restart, short enough
/// that a program does not hang for good.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub struct StorageBridge {
    device: String,
    path: PathBuf,
    client: Client,
    mounted: Option<Arc<Mounted>>,
    follow: Option<tokio::task::JoinHandle<()>>,
    /// What the mount's cache has caught up with (published by [`mount::follow`]).
    cache: tokio::sync::watch::Receiver<CacheState>,
    /// The exporter instance of the current link (from its Welcome).
    instance: u64,
    /// The mount point is ours (made under the mount dir): removed after unmounting.
    remove_dir: bool,
}

impl StorageBridge {
    /// Mounts the device at `<mount dir>/<exporter>/<device>/` (call inside the runtime that
    /// will run the bridge).
    pub fn create(info: &DeviceInfo, ctx: &BridgeCtx) -> std::io::Result<StorageBridge> {
        let dir = places::exporter_dir(&ctx.mount_dir, &ctx.exporter)?;
        let path = places::mount_point(&dir, &info.name)?;
        let owner = ctx.owner.unwrap_or_else(|| {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        });
        // No chown of the mount point afterwards: the mounted root reports `owner` itself,
        // and a chown would be a FUSE request answered on the thread this runs on.
        Self::mount(info, path, owner)
    }

    /// Mounts the device at a path the user chose (`jmp-mount`): an empty directory, or a
    /// dead mount of a killed process, which is cleaned first.
    pub fn at(
        info: &DeviceInfo,
        path: &std::path::Path,
        owner: (u32, u32),
    ) -> std::io::Result<StorageBridge> {
        if places::is_dead_mount(path) {
            warn!(
                "{}: a dead mount of an earlier run; unmounting it",
                path.display()
            );
            places::detach(path)?;
        }
        // The mount table lists absolute, resolved paths.
        let path = &std::fs::canonicalize(path)?;
        if places::is_mount_point(path) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} is mounted already", path.display()),
            ));
        }
        let mut b = Self::mount(info, path.to_path_buf(), owner)?;
        // Not ours to remove afterwards.
        b.remove_dir = false;
        Ok(b)
    }

    fn mount(
        info: &DeviceInfo,
        path: PathBuf,
        owner: (u32, u32),
    ) -> std::io::Result<StorageBridge> {
        let p = DeviceParams::decode_exact(&info.params).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad storage parameters from the exporter: {e}"),
            )
        })?;
        let client = Client::new(&info.name, Retry::Resend);
        let mounted = Arc::new(Mounted::mount(&path, client.clone(), owner, p.writable)?);
        let (settled, cache) = tokio::sync::watch::channel(CacheState::default());
        let follow = tokio::spawn(mount::follow(
            client.clone(),
            Arc::downgrade(&mounted),
            settled,
        ));
        Ok(StorageBridge {
            device: info.name.clone(),
            path,
            client,
            mounted: Some(mounted),
            follow: Some(follow),
            cache,
            instance: 0,
            remove_dir: true,
        })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for StorageBridge {
    fn drop(&mut self) {
        if let Some(f) = self.follow.take() {
            f.abort();
        }
        self.client.close(super::medium::Failure::new(
            jmp_protocol::kinds::storage::StorageError::Gone,
            format!("{}: the attachment is ending", self.device),
        ));
        // Unmounted here, not by whichever holder drops the last reference: the follow task
        // may still hold one in a blocking invalidation after its abort.
        if let Some(m) = self.mounted.take() {
            m.unmount();
        }
        if self.remove_dir {
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

impl Bridge for StorageBridge {
    fn device(&self) -> &str {
        &self.device
    }

    fn kind(&self) -> Kind {
        Kind::Storage
    }

    fn endpoints(&self) -> Vec<Endpoint> {
        vec![Endpoint::new(Local::Mount(self.path.clone()))]
    }

    fn on_welcome(&mut self, _info: &DeviceInfo, instance: u64) {
        self.instance = instance;
    }

    fn cache(&self) -> Option<tokio::sync::watch::Receiver<CacheState>> {
        Some(self.cache.clone())
    }

    fn run<'a>(&'a mut self, link: Arc<dyn Channels>) -> BoxFuture<'a, BridgeExit> {
        Box::pin(async move {
            loop {
                match client::open(link.as_ref(), &self.device).await {
                    Ok((tx, rx, p)) => {
                        // Every new channel is a change for the mount: a restarted exporter
                        // (another instance) may have had its medium rewritten.
                        self.client.set_origin(self.instance, p);
                        if let Err(e) = self.client.serve(tx, rx).await {
                            if link.is_closed() {
                                return BridgeExit::LinkLost;
                            }
                            warn!(device = %self.device, "storage channel ended: {e}; opening another");
                        }
                    }
                    Err(r) if r.code == ErrorCode::NoSuchDevice => return BridgeExit::Refused(r),
                    Err(r) => {
                        if link.is_closed() {
                            return BridgeExit::LinkLost;
                        }
                        warn!(device = %self.device, "cannot open the medium: {}; trying again", r.reason);
                        self.client.expire(PATIENCE);
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                            _ = link.closed() => return BridgeExit::LinkLost,
                        }
                    }
                }
            }
        })
    }

    fn idle(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            loop {
                // A hang guard for programs, not a synchronisation: what waits too long fails.
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.client.expire(PATIENCE);
            }
        })
    }
}
