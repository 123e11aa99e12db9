//! What an exporter config says about a UDP forward.

use serde::Deserialize;
use std::sync::Arc;

/// `type: udp`: a UDP port as seen from the exporter (the board's TFTP, a debug agent).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpSpec {
    pub host: String,
    pub port: u16,
}

impl UdpSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.host.trim().is_empty() {
            return Err("host is empty".into());
        }
        if self.port == 0 {
            return Err("port 0 is not a port".into());
        }
        Ok(())
    }

    pub fn start(&self, name: &str) -> Arc<dyn crate::Driver> {
        Arc::new(super::UdpDriver::new(
            name.to_string(),
            self.host.clone(),
            self.port,
        ))
    }
}
