//! How a client uses CAN devices: the `jmp attach` options (`--can-as`, `--can-name`,
//! `--can-filter`, `--can-port`, `--can-transport`), parsed into one [`DeviceOptions`] per
//! device. A CAN bus has no device requests: everything happens on its channel.

use jmp_protocol::kinds::can::{Filter, MAX_EXTENDED_ID, MAX_FILTERS, MAX_STANDARD_ID};
use jmp_protocol::{DeviceInfo, Kind};
use std::collections::HashMap;

/// How a CAN device appears on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fronts {
    pub vcan: bool,
    pub slcan: bool,
    pub socketcand: bool,
}

/// How frames travel between jmp and jmpd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// One QUIC stream: ordered, nothing lost in transit, flow-controlled (the default; see
    /// docs/benchmarks.md for why).
    #[default]
    Stream,
    /// QUIC datagrams: losses are counted from sequence numbers.
    Datagram,
}

/// One device's options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceOptions {
    /// `None`: the default (vcan where possible, else slcan and socketcand).
    pub fronts: Option<Fronts>,
    pub ifname: Option<String>,
    pub filters: Vec<Filter>,
    pub port: Option<u16>,
    pub transport: Transport,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct CanArgs {
    /// How CAN devices appear: vcan, slcan, socketcand, or a list (slcan,socketcand); DEV=MODE
    /// for one device. Default: a vcan interface where the kernel has CAN and jmp may create
    /// interfaces, else an slcan pty and a socketcand port.
    #[arg(long = "can-as", value_name = "[DEV=]MODE")]
    pub can_as: Vec<String>,
    /// The vcan interface's name for a device (default jmp0, jmp1, ...).
    #[arg(long = "can-name", value_name = "DEV=IFNAME")]
    pub can_name: Vec<String>,
    /// Receive filters applied on the exporter: hex ID:MASK pairs (an id of more than three
    /// digits is extended), e.g. can0=7E8:7FF,18DAF100:1FFFFF00.
    #[arg(long = "can-filter", value_name = "DEV=ID:MASK,...")]
    pub can_filter: Vec<String>,
    /// The socketcand port on 127.0.0.1 for a device (default: a free port).
    #[arg(long = "can-port", value_name = "DEV=PORT")]
    pub can_port: Vec<String>,
    /// stream (default) or datagram.
    #[arg(long = "can-transport", value_name = "stream|datagram")]
    pub can_transport: Option<String>,
}

fn parse_fronts(s: &str) -> Result<Fronts, String> {
    let mut f = Fronts {
        vcan: false,
        slcan: false,
        socketcand: false,
    };
    for m in s.split(',') {
        match m.trim() {
            "vcan" => f.vcan = true,
            "slcan" => f.slcan = true,
            "socketcand" => f.socketcand = true,
            other => {
                return Err(format!(
                    "--can-as {s:?}: {other:?} is not vcan, slcan or socketcand"
                ))
            }
        }
    }
    Ok(f)
}

/// Parses `ID:MASK,...` (hex).
pub fn parse_filters(s: &str) -> Result<Vec<Filter>, String> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (id, mask) = part
            .split_once(':')
            .ok_or_else(|| format!("filter {part:?}: expected ID:MASK in hex, e.g. 7E8:7FF"))?;
        let extended = id.len() > 3;
        let id = u32::from_str_radix(id, 16)
            .map_err(|_| format!("filter {part:?}: {id:?} is not hex"))?;
        let mask = u32::from_str_radix(mask, 16)
            .map_err(|_| format!("filter {part:?}: {mask:?} is not hex"))?;
        let max = if extended {
            MAX_EXTENDED_ID
        } else {
            MAX_STANDARD_ID
        };
        if id > max {
            return Err(format!(
                "filter {part:?}: id 0x{id:x} is larger than 0x{max:x}"
            ));
        }
        out.push(Filter {
            id,
            mask: mask & max,
            extended,
        });
    }
    if out.len() > MAX_FILTERS {
        return Err(format!("at most {MAX_FILTERS} filters per device"));
    }
    Ok(out)
}

fn split_dev<'a>(opt: &str, v: &'a str) -> Result<(&'a str, &'a str), String> {
    v.split_once('=')
        .ok_or_else(|| format!("{opt} {v:?}: expected DEV=VALUE"))
}

impl CanArgs {
    /// Options per device name; `""` holds the ones given for every device.
    pub fn parse(&self) -> Result<HashMap<String, DeviceOptions>, String> {
        let mut m: HashMap<String, DeviceOptions> = HashMap::new();
        let transport = match self.can_transport.as_deref() {
            None | Some("stream") => Transport::Stream,
            Some("datagram") => Transport::Datagram,
            Some(o) => {
                return Err(format!(
                    "--can-transport {o:?}: expected stream or datagram"
                ))
            }
        };
        m.entry(String::new()).or_default().transport = transport;
        for a in &self.can_as {
            let (dev, mode) = match a.split_once('=') {
                Some((d, m)) => (d, m),
                None => ("", a.as_str()),
            };
            m.entry(dev.to_string()).or_default().fronts = Some(parse_fronts(mode)?);
        }
        for a in &self.can_name {
            let (dev, name) = split_dev("--can-name", a)?;
            super::spec::check_ifname("--can-name", name)?;
            m.entry(dev.to_string()).or_default().ifname = Some(name.to_string());
        }
        for a in &self.can_filter {
            let (dev, f) = split_dev("--can-filter", a)?;
            m.entry(dev.to_string()).or_default().filters = parse_filters(f)?;
        }
        for a in &self.can_port {
            let (dev, p) = split_dev("--can-port", a)?;
            let p: u16 = p
                .parse()
                .map_err(|_| format!("--can-port {a:?}: {p:?} is not a port"))?;
            m.entry(dev.to_string()).or_default().port = Some(p);
        }
        Ok(m)
    }

    /// The options for `device`: its own over the ones for every device.
    pub fn for_device(&self, device: &str) -> Result<DeviceOptions, String> {
        let m = self.parse()?;
        let all = m.get("").cloned().unwrap_or_default();
        let mut d = m.get(device).cloned().unwrap_or_default();
        d.fronts = d.fronts.or(all.fronts);
        d.transport = all.transport;
        Ok(d)
    }

    /// Every DEV= must name a CAN device of the exporter.
    pub fn check(&self, exporter: &str, devices: &[DeviceInfo]) -> Result<(), String> {
        let m = self.parse()?;
        for name in m.keys().filter(|k| !k.is_empty()) {
            if !devices
                .iter()
                .any(|d| &d.name == name && d.kind == Kind::Can)
            {
                let cans: Vec<&str> = devices
                    .iter()
                    .filter(|d| d.kind == Kind::Can)
                    .map(|d| d.name.as_str())
                    .collect();
                return Err(format!(
                    "{exporter} has no CAN device {name:?} (its CAN devices: {})",
                    if cans.is_empty() {
                        "none".to_string()
                    } else {
                        cans.join(", ")
                    }
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_per_device_and_for_all() {
        let a = CanArgs {
            can_as: vec!["slcan".into(), "ecu=socketcand,slcan".into()],
            can_name: vec!["can0=body0".into()],
            can_filter: vec!["ecu=7E8:7FF,18DAF100:1FFFFF00".into()],
            can_port: vec!["ecu=29536".into()],
            can_transport: Some("datagram".into()),
        };
        let ecu = a.for_device("ecu").expect("valid");
        assert_eq!(
            ecu.fronts,
            Some(Fronts {
                vcan: false,
                slcan: true,
                socketcand: true
            })
        );
        assert_eq!(ecu.filters.len(), 2);
        assert!(ecu.filters[1].extended && !ecu.filters[0].extended);
        assert_eq!(ecu.port, Some(29536));
        assert_eq!(ecu.transport, Transport::Datagram);
        let can0 = a.for_device("can0").expect("valid");
        assert_eq!(can0.ifname.as_deref(), Some("body0"));
        assert_eq!(can0.fronts.map(|f| f.slcan), Some(true));
        let bad = CanArgs {
            can_filter: vec!["x=800:7FF".into()],
            ..CanArgs::default()
        };
        assert!(bad.parse().is_err_and(|e| e.contains("larger than")));
        let bad = CanArgs {
            can_as: vec!["tun".into()],
            ..CanArgs::default()
        };
        assert!(bad.parse().is_err());
    }
}
