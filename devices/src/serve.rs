//! Handing channel requests and device requests to the device they name: shared by the
//! exporter's QUIC sessions and the in-memory sessions of tests, so both dispatch the same way.

use crate::{check_mode, info, Driver};
use jmp_protocol::{DeviceInfo, ErrorCode, Refusal};
use jmp_transport::{Incoming, IncomingRequest};
use std::sync::Arc;
use tracing::{info, info_span, Instrument};

/// Bytes a device's channels moved, each way (stream bytes, datagram payloads; for the
/// exporter's metrics).
#[derive(Debug, Default)]
pub struct DeviceBytes {
    /// From the client to the board.
    pub to_board: Arc<std::sync::atomic::AtomicU64>,
    /// From the board to the client.
    pub from_board: Arc<std::sync::atomic::AtomicU64>,
}

/// An exporter's devices, in config order.
#[derive(Clone, Default)]
pub struct DeviceSet {
    exporter: String,
    devices: Vec<Arc<dyn Driver>>,
    bytes: Arc<Vec<DeviceBytes>>,
}

impl DeviceSet {
    pub fn new(exporter: &str, devices: Vec<Arc<dyn Driver>>) -> Self {
        let bytes = Arc::new(devices.iter().map(|_| DeviceBytes::default()).collect());
        DeviceSet {
            exporter: exporter.to_string(),
            devices,
            bytes,
        }
    }

    /// The byte counters of each device, in config order (as [`DeviceSet::iter`]).
    pub fn bytes(&self) -> impl Iterator<Item = (&str, &DeviceBytes)> {
        self.devices.iter().map(|d| d.name()).zip(self.bytes.iter())
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
        let Some(at) = self.devices.iter().position(|d| d.name() == device) else {
            let r = self.no_such(&device);
            return inc.reject(r.code, r.reason);
        };
        let driver = self.devices[at].clone();
        let counters = self
            .bytes
            .get(at)
            .map(|b| (b.from_board.clone(), b.to_board.clone()));
        if let Err(r) = check_mode(driver.as_ref(), inc.mode()) {
            return inc.reject(r.code, r.reason);
        }
        let span = info_span!("channel", id = inc.open.channel, device = %driver.name());
        tokio::spawn(
            async move {
                match driver.open(&inc.open).await {
                    Ok(ch) => {
                        if let Some(mut io) = inc.accept(ch.params()) {
                            match (&mut io, counters) {
                                (jmp_transport::ChannelIo::Stream(p), Some((sent, got))) => {
                                    p.count(sent, got)
                                }
                                (jmp_transport::ChannelIo::Datagram(d), Some((sent, got))) => {
                                    d.count(sent, got)
                                }
                                _ => {}
                            }
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
