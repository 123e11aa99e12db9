//! Creating a TUN with the kernel's offload on (IFF_VNET_HDR, TSO/GSO: reads may return
//! super-packets of up to 64 KiB, writes may hand the kernel coalesced ones), after dealing
//! with whatever has its name: a leftover persistent TUN is removed, anything else is an error
//! naming it. The interface goes away with its descriptor (the TUN is not persistent), and
//! its routes and addresses with it, whichever way the process ends.

use super::sys::{self, Existing};
use std::sync::Arc;
use tracing::info;
use tun_rs::AsyncDevice;

/// Why a TUN could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TunError {
    #[error("creating the TUN {name} needs CAP_NET_ADMIN ({why})")]
    NoPermission { name: String, why: String },
    #[error("the interface {name} exists and another process holds it (a second jmp for the same exporter?)")]
    InUse { name: String },
    #[error("the interface {name} exists and is not a TUN; not touching it")]
    NotTun { name: String },
    #[error("cannot create the TUN {name}: {why}")]
    Other { name: String, why: String },
}

pub(crate) struct Tun {
    pub dev: Arc<AsyncDevice>,
    pub name: String,
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun").field("name", &self.name).finish()
    }
}

/// Creates the TUN `name` (up, no address yet), IPv6 off on it so that the kernel's own
/// router solicitations do not wander into the tunnel. Needs a tokio runtime.
pub(crate) fn create(name: &str, mtu: u16) -> Result<Tun, TunError> {
    let other = |why: String| TunError::Other {
        name: name.to_string(),
        why,
    };
    match sys::existing(name) {
        Existing::None => {}
        Existing::PersistentTun => {
            sys::ip(&["link", "del", "dev", name]).map_err(|e| other(e.to_string()))?;
            info!("removed {name}, a TUN left behind by an earlier run");
        }
        Existing::HeldTun => {
            return Err(TunError::InUse {
                name: name.to_string(),
            })
        }
        Existing::Other => {
            return Err(TunError::NotTun {
                name: name.to_string(),
            })
        }
    }
    let dev = tun_rs::DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .offload(true)
        .tx_queue_len(1000)
        .build_async()
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => TunError::NoPermission {
                name: name.to_string(),
                why: e.to_string(),
            },
            Some(libc::EBUSY) => TunError::InUse {
                name: name.to_string(),
            },
            _ => other(e.to_string()),
        })?;
    let _ = sys::set_sysctl(&format!("net/ipv6/conf/{name}/disable_ipv6"), "1");
    sys::ip(&["link", "set", "dev", name, "up"]).map_err(|e| other(e.to_string()))?;
    Ok(Tun {
        dev: Arc::new(dev),
        name: name.to_string(),
    })
}
