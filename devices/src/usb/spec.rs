//! What an exporter config says about USB devices: `type: usb` with the `VID:PID` pairs to
//! match (several, because a board in DFU or fastboot mode comes back with another product
//! id), and optionally the serial number and the port (for two identical probes).

use jmp_protocol::kinds::usb::{MAX_BUSID, MAX_IDS, MAX_TEXT};
use serde::Deserialize;

/// `type: usb`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UsbSpec {
    /// `VID:PID` pairs as lsusb spells them (`0483:3748`); a device matching any is exported.
    pub ids: Vec<String>,
    /// Only the device with this serial number (`iSerial`, as sysfs's `serial` shows it).
    #[serde(default)]
    pub serial: Option<String>,
    /// Only the device at this port of the lab host (its sysfs name, `1-1.4`: bus 1, port 1 of
    /// the root hub, port 4 of the hub there).
    #[serde(default)]
    pub port: Option<String>,
}

/// `VID:PID` (four hex digits each).
pub fn parse_id(s: &str) -> Result<(u16, u16), String> {
    let bad = || {
        format!(
            "{:?} is not VID:PID (four hex digits each, as lsusb shows them: 0483:3748)",
            jmp_protocol::name::escape(s)
        )
    };
    let (v, p) = s.split_once(':').ok_or_else(bad)?;
    let hex4 = |x: &str| {
        (x.len() == 4 && x.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u16::from_str_radix(x, 16).ok())
            .flatten()
    };
    Ok((hex4(v).ok_or_else(bad)?, hex4(p).ok_or_else(bad)?))
}

/// A USB device's sysfs name: `BUS-PORT[.PORT]...` (not a root hub `usbN`, not an interface
/// `1-1:1.0`).
pub fn check_port(s: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "port {:?} is not a USB port path such as 1-1.4 (bus-port.port..., see /sys/bus/usb/devices)",
            jmp_protocol::name::escape(s)
        )
    };
    let (bus, ports) = s.split_once('-').ok_or_else(bad)?;
    let num = |x: &str| !x.is_empty() && x.len() <= 3 && x.bytes().all(|b| b.is_ascii_digit());
    if s.len() > MAX_BUSID || !num(bus) || ports.split('.').any(|p| !num(p)) {
        return Err(bad());
    }
    Ok(())
}

impl UsbSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.ids.is_empty() {
            return Err("ids is empty: list the devices' VID:PID (lsusb shows them)".into());
        }
        if self.ids.len() > MAX_IDS {
            return Err(format!("ids lists {} pairs; at most {MAX_IDS}", self.ids.len()));
        }
        for id in &self.ids {
            parse_id(id).map_err(|e| format!("ids: {e}"))?;
        }
        if let Some(s) = &self.serial {
            if s.is_empty() || s.len() > MAX_TEXT || s.chars().any(char::is_control) {
                return Err(format!(
                    "serial {:?} must be 1-{MAX_TEXT} bytes without control characters",
                    jmp_protocol::name::escape(s)
                ));
            }
        }
        if let Some(p) = &self.port {
            check_port(p)?;
        }
        Ok(())
    }

    /// The pairs, parsed (after `validate`).
    pub fn pairs(&self) -> Vec<(u16, u16)> {
        self.ids.iter().filter_map(|s| parse_id(s).ok()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> Result<UsbSpec, String> {
        let s: UsbSpec = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        s.validate().map(|_| s)
    }

    #[test]
    fn ids_serials_and_ports_are_checked() {
        let s = spec("{ids: ['0483:3748', '0483:DF11'], serial: 066DFF, port: 1-1.4}").expect("ok");
        assert_eq!(s.pairs(), vec![(0x0483, 0x3748), (0x0483, 0xdf11)]);
        for (yaml, want) in [
            ("{ids: []}", "ids is empty"),
            ("{ids: ['483:3748']}", "\"483:3748\" is not VID:PID"),
            ("{ids: ['0483-3748']}", "is not VID:PID"),
            ("{ids: ['0483:37g8']}", "is not VID:PID"),
            ("{ids: ['0483:3748'], port: usb1}", "port \"usb1\" is not a USB port path"),
            ("{ids: ['0483:3748'], port: '1-1:1.0'}", "is not a USB port path"),
            ("{ids: ['0483:3748'], port: '1-'}", "is not a USB port path"),
            ("{ids: ['0483:3748'], serial: ''}", "serial \"\" must be"),
            ("{ids: ['0483:3748'], serial: \"a\\nb\"}", "must be 1-128 bytes"),
            ("{ids: ['0483:3748'], vid: 1}", "unknown field `vid`"),
        ] {
            let e = spec(yaml).expect_err(yaml);
            assert!(e.contains(want), "{yaml}: {e}");
        }
        let many = format!("{{ids: [{}]}}", vec!["'0483:3748'"; 33].join(", "));
        assert!(spec(&many).expect_err("33").contains("at most 32"));
    }
}
