//! Handing channel requests and device requests to the device they name: shared by the
//! exporter's QUIC sessions and the in-memory sessions of tests, so both dispatch the same way.

use crate::{check_mode, info, Driver};
use jmp_protocol::{DeviceInfo, ErrorCode, Refusal};
use jmp_transport::{Incoming, IncomingRequest};
use std::sync::Arc;
use tracing::{info, info_span, Instrument};

/// An exporter's devices, in config order.
#[derive(Clone, Default)]
pub struct DeviceSet {
    exporter: String,
    devices: Vec<Arc<dyn Driver>>,
}

impl DeviceSet {
    pub fn new(exporter: &str, devices: Vec<Arc<dyn Driver>>) -> Self {
        DeviceSet {
            exporter: exporter.to_string(),
            devices,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Driver>> {
        self.devices.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Driver>> {
        self.devices.iter().find(|d| d.name() == name)
    }

    /// What a Welcome lists, as of now.
    pub fn infos(&self) -> Vec<DeviceInfo> {
        self.devices.iter().map(|d| info(d.as_ref())).collect()
    }

    fn no_such(&self, device: &str) -> Refusal {
        let have: Vec<&str> = self.devices.iter().map(|d| d.name()).collect();
        Refusal::new(
            ErrorCode::NoSuchDevice,
            format!(
                "{} has no device {:?} (it has: {})",
                self.exporter,
                jmp_protocol::name::escape(device),
                have.join(", ")
            ),
        )
    }

    /// Decides on a channel request in its own task and serves the channel if accepted.
    pub fn serve_incoming(&self, inc: Incoming) {
        let device = inc.open.device.clone();
        let Some(driver) = self.get(&device).cloned() else {
            let r = self.no_such(&device);
            return inc.reject(r.code, r.reason);
        };
        if let Err(r) = check_mode(driver.as_ref(), inc.mode()) {
            return inc.reject(r.code, r.reason);
        }
        let span = info_span!("channel", id = inc.open.channel, device = %driver.name());
        tokio::spawn(
            async move {
                match driver.open(&inc.open).await {
                    Ok(ch) => {
                        if let Some(io) = inc.accept(ch.params()) {
                            ch.serve(io).await;
                        }
                    }
                    Err(r) => {
                        info!("refused: {}", r.reason);
                        inc.reject(r.code, r.reason);
                    }
                }
            }
            .instrument(span),
        );
    }

    /// Performs a device request in its own task (a power cycle takes seconds; others go on).
    pub fn serve_request(&self, req: IncomingRequest) {
        let Some(driver) = self.get(&req.device).cloned() else {
            let r = self.no_such(&req.device);
            return req.answer(Err(r));
        };
        let span = info_span!("request", id = req.id, device = %driver.name());
        tokio::spawn(
            async move {
                let body = req.body.clone();
                let r = driver.request(body).await;
                if let Err(e) = &r {
                    info!("failed: {}", e.reason);
                }
                req.answer(r);
            }
            .instrument(span),
        );
    }
}
