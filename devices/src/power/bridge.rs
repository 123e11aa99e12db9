//! Client side of a power switch: nothing local to create (it is used through `jmp power`),
//! so the bridge only keeps the device in the attachment's list.

use crate::{BoxFuture, Bridge, BridgeExit, Endpoint};
use jmp_protocol::{DeviceInfo, Kind};
use jmp_transport::Channels;
use std::sync::Arc;

pub struct PowerBridge {
    device: String,
}

impl PowerBridge {
    pub fn new(info: &DeviceInfo) -> Self {
        PowerBridge {
            device: info.name.clone(),
        }
    }
}

impl Bridge for PowerBridge {
    fn device(&self) -> &str {
        &self.device
    }

    fn kind(&self) -> Kind {
        Kind::Power
    }

    fn endpoints(&self) -> Vec<Endpoint> {
        Vec::new()
    }

    fn run<'a>(&'a mut self, link: Arc<dyn Channels>) -> BoxFuture<'a, BridgeExit> {
        Box::pin(async move {
            link.closed().await;
            BridgeExit::LinkLost
        })
    }
}
