//! What an exporter config says about a TCP forward.

use serde::Deserialize;
use std::sync::Arc;

/// `type: tcp`: a TCP port as seen from the exporter (the board's SSH, a debug server).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpSpec {
    pub host: String,
    pub port: u16,
}

impl TcpSpec {
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
        Arc::new(super::TcpDriver::new(
            name.to_string(),
            self.host.clone(),
            self.port,
        ))
    }
}
