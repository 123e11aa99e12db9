//! Local listening addresses chosen on the command line (`--forward LOCAL=DEVICE`), for every
//! kind whose bridge listens.

use std::collections::HashMap;
use std::net::SocketAddr;

/// `--forward LOCAL=DEVICE`: where the bridge of a device that listens (a kind with
/// `DeviceKind::LISTENS`: TCP and UDP forwards) listens.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ForwardArgs {
    /// Local address of a forward: LOCAL=DEVICE, LOCAL a port or ADDR:PORT (default: an
    /// ephemeral port on 127.0.0.1).
    #[arg(long = "forward", value_name = "LOCAL=DEVICE")]
    pub forwards: Vec<String>,
}

impl ForwardArgs {
    /// device name → local address.
    pub fn parse(&self) -> Result<HashMap<String, SocketAddr>, crate::kind::OptionError> {
        let mut out = HashMap::new();
        for f in &self.forwards {
            let (local, device) = f
                .split_once('=')
                .ok_or_else(|| format!("--forward {f:?}: expected LOCAL=DEVICE, e.g. 2222=ssh"))?;
            let addr = if let Ok(port) = local.parse::<u16>() {
                SocketAddr::from(([127, 0, 0, 1], port))
            } else {
                local
                    .parse()
                    .map_err(|_| format!("--forward {f:?}: {local:?} is not a port or ADDR:PORT"))?
            };
            out.insert(device.to_string(), addr);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse_ports_and_addresses_and_name_bad_ones() {
        let a = ForwardArgs {
            forwards: vec!["2222=ssh".into(), "127.0.0.2:8080=web".into()],
        };
        let f = a.parse().expect("valid");
        assert_eq!(f["ssh"], SocketAddr::from(([127, 0, 0, 1], 2222)));
        assert_eq!(
            f["web"],
            "127.0.0.2:8080".parse::<SocketAddr>().expect("addr")
        );
        for bad in ["ssh", "x=ssh", "99999=ssh"] {
            let e = ForwardArgs {
                forwards: vec![bad.into()],
            }
            .parse()
            .expect_err(bad);
            assert!(e.0.contains(bad), "{e}");
        }
    }
}
