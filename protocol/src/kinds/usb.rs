//! USB devices on the wire, and the USB/IP stream each imported device carries.
//!
//! A `usb` device of an exporter is a set of matching USB devices plugged into the lab host
//! (its config names them by `VID:PID`, serial and port). The client imports each through its
//! kernel's `vhci-hcd`; the exporter's `usbip-host` serves it; both kernels speak USB/IP on a
//! Unix socket whose other end jmp carries on one QUIC stream.
//!
//! - `DeviceInfo.params`, `Status.params`: [`DeviceParams`]: the ids the exporter matches and
//!   every device it matched, each with its state (present, exported, imported, gone).
//! - `Open.params`: [`OpenParams`]: `Watch` (a stream channel that carries no payload: the
//!   exporter sends the device list again as a [`Control::Changed`] whenever it changes, so the
//!   client imports a device that came back without being asked), or `Import { id }` of a
//!   device the exporter listed. The client names a device only by the number the exporter
//!   gave it: it never says a bus id, so it cannot make the exporter bind anything it did not
//!   match.
//! - `Opened.params`: for `Watch` the [`DeviceParams`] of the moment; for `Import` an
//!   [`Imported`]: the device id the kernel's USB/IP headers carry and the speed, for
//!   `vhci-hcd`'s attach.
//! - `Control.body` (exporter to client): [`Control`]: `Changed` on a watch channel, `Gone` on
//!   an import channel whose device left the lab host's bus (the stream ends after it).
//! - Payload of an import channel: USB/IP, both ways, unchanged. Each side parses it on the
//!   way into its kernel ([`Framer`]): every 48-byte header and the length of the payload it
//!   announces is checked against what is possible (a command the device could take, an
//!   answer to a command that was sent, lengths within what was asked), so a hostile peer
//!   cannot feed the kernel's USB/IP parser bytes it would read as something else.

use crate::codec::*;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::collections::HashMap;

/// Most devices one `usb` device lists (matched and recently gone).
pub const MAX_DEVICES: usize = 16;
/// Most `VID:PID` pairs a config matches.
pub const MAX_IDS: usize = 32;
/// Longest descriptor string on the wire (bytes of UTF-8); the exporter cuts longer ones.
pub const MAX_TEXT: usize = 128;
/// Longest bus id (`3-1.4.2.1`, at most 7 hub tiers).
pub const MAX_BUSID: usize = 32;

/// A device's speed, numbered as the kernel's `enum usb_device_speed` (what `vhci-hcd`'s
/// attach takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Speed {
    Low,
    Full,
    High,
    Wireless,
    Super,
    SuperPlus,
}

impl Speed {
    pub fn wire(self) -> u8 {
        match self {
            Speed::Low => 1,
            Speed::Full => 2,
            Speed::High => 3,
            Speed::Wireless => 4,
            Speed::Super => 5,
            Speed::SuperPlus => 6,
        }
    }

    pub fn from_wire(v: u8) -> Result<Speed, DecodeError> {
        Ok(match v {
            1 => Speed::Low,
            2 => Speed::Full,
            3 => Speed::High,
            4 => Speed::Wireless,
            5 => Speed::Super,
            6 => Speed::SuperPlus,
            v => {
                return Err(DecodeError::Invalid {
                    field: "usb speed",
                    value: v.into(),
                })
            }
        })
    }

    /// From sysfs's `speed` file (Mbit/s: `1.5`, `12`, `480`, `5000`, `10000`, `20000`).
    pub fn from_sysfs(s: &str) -> Option<Speed> {
        Some(match s.trim() {
            "1.5" => Speed::Low,
            "12" => Speed::Full,
            "480" => Speed::High,
            "53.3-480" => Speed::Wireless,
            "5000" => Speed::Super,
            "10000" | "20000" => Speed::SuperPlus,
            _ => return None,
        })
    }

    /// Whether the device needs one of vhci-hcd's SuperSpeed ports (else a high-speed one).
    pub fn superspeed(self) -> bool {
        matches!(self, Speed::Super | Speed::SuperPlus)
    }
}

impl std::fmt::Display for Speed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Speed::Low => "1.5 Mbit/s",
            Speed::Full => "12 Mbit/s",
            Speed::High => "480 Mbit/s",
            Speed::Wireless => "wireless",
            Speed::Super => "5 Gbit/s",
            Speed::SuperPlus => "10 Gbit/s",
        })
    }
}

/// Where a matched device is in its life on the exporter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DevState {
    /// Plugged in, on its own driver: a client may import it.
    Present,
    /// Bound to `usbip-host`, being handed to a client.
    Exported,
    /// A client uses it through USB/IP.
    Imported,
    /// It left the bus (unplugged, reset, switched mode); kept in the list until it comes back
    /// (at the same port) or newer devices need the place.
    Gone,
}

impl DevState {
    fn wire(self) -> u8 {
        match self {
            DevState::Present => 0,
            DevState::Exported => 1,
            DevState::Imported => 2,
            DevState::Gone => 3,
        }
    }

    fn from_wire(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            0 => DevState::Present,
            1 => DevState::Exported,
            2 => DevState::Imported,
            3 => DevState::Gone,
            v => {
                return Err(DecodeError::Invalid {
                    field: "usb device state",
                    value: v.into(),
                })
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DevState::Present => "present",
            DevState::Exported => "exported",
            DevState::Imported => "imported",
            DevState::Gone => "gone",
        }
    }
}

impl std::fmt::Display for DevState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One USB device the exporter matched. The strings are the device's own descriptors, as the
/// lab host's kernel read them: untrusted text, escaped wherever it is printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbDevice {
    /// The exporter's number for this appearance of the device: a device that leaves and
    /// comes back gets a new one. Never reused within one exporter run.
    pub id: u64,
    /// Where it is on the lab host (`1-1.4`): for people; a client never sends it back.
    pub busid: String,
    pub vendor: u16,
    pub product: u16,
    /// `bDeviceClass` (0: per interface, 0xef: miscellaneous, 0xff: vendor specific).
    pub class: u8,
    pub manufacturer: String,
    pub name: String,
    pub serial: String,
    pub speed: Speed,
    pub busnum: u32,
    pub devnum: u32,
    pub state: DevState,
    /// The id of the device that was at this port before it left (a board that reset or
    /// switched mode): it is back.
    pub was: Option<u64>,
}

impl UsbDevice {
    /// `VID:PID` as lsusb spells it.
    pub fn ids(&self) -> String {
        format!("{:04x}:{:04x}", self.vendor, self.product)
    }

    /// The kernel's device id in USB/IP headers (`busnum << 16 | devnum`).
    pub fn devid(&self) -> u32 {
        (self.busnum << 16) | (self.devnum & 0xffff)
    }

    /// `0483:3748 STMicroelectronics STM32 STLink (12 Mbit/s, serial 066D...) at 1-1.4,
    /// imported`, descriptor strings escaped.
    pub fn describe(&self) -> String {
        let esc = |s: &str| crate::name::escape(s).into_owned();
        let mut s = self.ids();
        let words: Vec<String> = [&self.manufacturer, &self.name]
            .iter()
            .filter(|t| !t.is_empty())
            .map(|t| esc(t))
            .collect();
        if !words.is_empty() {
            s.push(' ');
            s.push_str(&words.join(" "));
        }
        s.push_str(&format!(" ({}", self.speed));
        if !self.serial.is_empty() {
            s.push_str(&format!(", serial {}", esc(&self.serial)));
        }
        s.push_str(&format!(") at {}, {}", esc(&self.busid), self.state));
        s
    }
}

fn put_text(buf: &mut BytesMut, s: &str) {
    put_str(buf, s);
}

fn get_text(buf: &mut &[u8], what: &'static str, max: usize) -> Result<String, DecodeError> {
    let s = get_str(buf, what)?;
    if s.len() > max {
        return Err(DecodeError::Invalid {
            field: what,
            value: s.len() as u64,
        });
    }
    Ok(s)
}

/// Cuts `s` to at most [`MAX_TEXT`] bytes at a character boundary (the exporter's side of the
/// rule the decoder enforces).
pub fn cut_text(s: &str) -> String {
    if s.len() <= MAX_TEXT {
        return s.to_string();
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn get_u16(buf: &mut &[u8], what: &'static str) -> Result<u16, DecodeError> {
    if buf.len() < 2 {
        return Err(DecodeError::Truncated(what));
    }
    Ok(buf.get_u16())
}

fn get_u32(buf: &mut &[u8], what: &'static str) -> Result<u32, DecodeError> {
    if buf.len() < 4 {
        return Err(DecodeError::Truncated(what));
    }
    Ok(buf.get_u32())
}

impl Codec for UsbDevice {
    fn encode(&self, buf: &mut BytesMut) {
        put_varint(buf, self.id);
        put_text(buf, &self.busid);
        buf.put_u16(self.vendor);
        buf.put_u16(self.product);
        buf.put_u8(self.class);
        put_text(buf, &self.manufacturer);
        put_text(buf, &self.name);
        put_text(buf, &self.serial);
        buf.put_u8(self.speed.wire());
        put_varint(buf, self.busnum.into());
        put_varint(buf, self.devnum.into());
        buf.put_u8(self.state.wire());
        put_opt_varint(buf, self.was);
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let id = get_varint(buf, "usb device id")?;
        let busid = get_text(buf, "usb busid", MAX_BUSID)?;
        let vendor = get_u16(buf, "usb vendor")?;
        let product = get_u16(buf, "usb product")?;
        let class = get_u8(buf, "usb class")?;
        let manufacturer = get_text(buf, "usb manufacturer", MAX_TEXT)?;
        let name = get_text(buf, "usb product name", MAX_TEXT)?;
        let serial = get_text(buf, "usb serial", MAX_TEXT)?;
        let speed = Speed::from_wire(get_u8(buf, "usb speed")?)?;
        let busnum = get_u32_varint(buf, "usb busnum")?;
        let devnum = get_u32_varint(buf, "usb devnum")?;
        if busnum > 0xffff || devnum > 0xffff {
            return Err(DecodeError::Invalid {
                field: "usb busnum/devnum",
                value: busnum.max(devnum).into(),
            });
        }
        let state = DevState::from_wire(get_u8(buf, "usb device state")?)?;
        let was = get_opt_varint(buf, "usb was")?;
        Ok(UsbDevice {
            id,
            busid,
            vendor,
            product,
            class,
            manufacturer,
            name,
            serial,
            speed,
            busnum,
            devnum,
            state,
            was,
        })
    }
    fn encoded_len(&self) -> usize {
        varint_len(self.id)
            + str_len(&self.busid)
            + 5
            + str_len(&self.manufacturer)
            + str_len(&self.name)
            + str_len(&self.serial)
            + 1
            + varint_len(self.busnum.into())
            + varint_len(self.devnum.into())
            + 1
            + opt_varint_len(self.was)
    }
}

/// What a `usb` device of the exporter is now: the `VID:PID` pairs it matches, and the devices
/// it matched.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceParams {
    pub ids: Vec<(u16, u16)>,
    pub devices: Vec<UsbDevice>,
}

impl Codec for DeviceParams {
    fn encode(&self, buf: &mut BytesMut) {
        put_varint(buf, self.ids.len() as u64);
        for (v, p) in &self.ids {
            buf.put_u16(*v);
            buf.put_u16(*p);
        }
        put_varint(buf, self.devices.len() as u64);
        for d in &self.devices {
            d.encode(buf);
        }
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let n = get_count(buf, "usb id count", 4)?;
        if n > MAX_IDS {
            return Err(DecodeError::Invalid {
                field: "usb id count",
                value: n as u64,
            });
        }
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push((get_u16(buf, "usb vendor")?, get_u16(buf, "usb product")?));
        }
        // A device takes at least 15 bytes (empty strings); the count is checked before
        // anything is allocated.
        let n = get_count(buf, "usb device count", 15)?;
        if n > MAX_DEVICES {
            return Err(DecodeError::Invalid {
                field: "usb device count",
                value: n as u64,
            });
        }
        let mut devices = Vec::with_capacity(n);
        for _ in 0..n {
            devices.push(UsbDevice::decode(buf)?);
        }
        Ok(DeviceParams { ids, devices })
    }
    fn encoded_len(&self) -> usize {
        varint_len(self.ids.len() as u64)
            + 4 * self.ids.len()
            + varint_len(self.devices.len() as u64)
            + self.devices.iter().map(Codec::encoded_len).sum::<usize>()
    }
}

impl std::fmt::Display for DeviceParams {
    /// `2 devices: 1209:0001 jmp ACM (480 Mbit/s) at 1-1, imported; ...`, or what it waits
    /// for.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let live: Vec<&UsbDevice> = self
            .devices
            .iter()
            .filter(|d| d.state != DevState::Gone)
            .collect();
        let gone = self.devices.len() - live.len();
        if live.is_empty() {
            let ids: Vec<String> = self
                .ids
                .iter()
                .map(|(v, p)| format!("{v:04x}:{p:04x}"))
                .collect();
            write!(f, "no device plugged in (waiting for {})", ids.join(", "))?;
        } else {
            let parts: Vec<String> = live.iter().map(|d| d.describe()).collect();
            write!(f, "{}", parts.join("; "))?;
        }
        if gone > 0 {
            write!(f, "; {gone} gone")?;
        }
        Ok(())
    }
}

/// What a channel of a `usb` device is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenParams {
    /// Follow the device list (no payload; `Control::Changed` on every change).
    Watch,
    /// Import the device the exporter listed with this id; the stream then carries USB/IP.
    Import { id: u64 },
}

impl Codec for OpenParams {
    fn encode(&self, buf: &mut BytesMut) {
        match self {
            OpenParams::Watch => buf.put_u8(0),
            OpenParams::Import { id } => {
                buf.put_u8(1);
                put_varint(buf, *id);
            }
        }
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        match get_u8(buf, "usb open")? {
            0 => Ok(OpenParams::Watch),
            1 => Ok(OpenParams::Import {
                id: get_varint(buf, "usb device id")?,
            }),
            v => Err(DecodeError::Invalid {
                field: "usb open",
                value: v.into(),
            }),
        }
    }
    fn encoded_len(&self) -> usize {
        match self {
            OpenParams::Watch => 1,
            OpenParams::Import { id } => 1 + varint_len(*id),
        }
    }
}

/// The exporter's answer to an import: the device is bound to `usbip-host` and serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    pub id: u64,
    /// The kernel's device id in every USB/IP header (`busnum << 16 | devnum`).
    pub devid: u32,
    pub speed: Speed,
}

impl Codec for Imported {
    fn encode(&self, buf: &mut BytesMut) {
        put_varint(buf, self.id);
        buf.put_u32(self.devid);
        buf.put_u8(self.speed.wire());
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        Ok(Imported {
            id: get_varint(buf, "usb device id")?,
            devid: get_u32(buf, "usb devid")?,
            speed: Speed::from_wire(get_u8(buf, "usb speed")?)?,
        })
    }
    fn encoded_len(&self) -> usize {
        varint_len(self.id) + 5
    }
}

/// The exporter's out-of-band messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// On a watch channel: the device list now.
    Changed(DeviceParams),
    /// On an import channel: the device left the lab host's bus; the stream ends next.
    Gone { reason: String },
}

impl Codec for Control {
    fn encode(&self, buf: &mut BytesMut) {
        match self {
            Control::Changed(p) => {
                buf.put_u8(1);
                p.encode(buf);
            }
            Control::Gone { reason } => {
                buf.put_u8(2);
                put_str(buf, reason);
            }
        }
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        match get_u8(buf, "usb control")? {
            1 => Ok(Control::Changed(DeviceParams::decode(buf)?)),
            2 => Ok(Control::Gone {
                reason: get_text(buf, "usb gone reason", 1024)?,
            }),
            v => Err(DecodeError::Invalid {
                field: "usb control",
                value: v.into(),
            }),
        }
    }
    fn encoded_len(&self) -> usize {
        1 + match self {
            Control::Changed(p) => p.encoded_len(),
            Control::Gone { reason } => str_len(reason),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// USB/IP framing
// ---------------------------------------------------------------------------------------------

/// Bytes of every USB/IP header.
pub const HEADER: usize = 48;
/// Bytes of one isochronous packet descriptor after a submit's data.
pub const ISO_DESC: usize = 16;
/// Most isochronous packets one transfer may have (the kernel's `USBIP_MAX_ISO_PACKETS`).
pub const MAX_ISO_PACKETS: u32 = 1024;

pub const CMD_SUBMIT: u32 = 1;
pub const CMD_UNLINK: u32 = 2;
pub const RET_SUBMIT: u32 = 3;
pub const RET_UNLINK: u32 = 4;

const DIR_OUT: u32 = 0;
const DIR_IN: u32 = 1;
/// The most negative errno a status may carry (`-MAX_ERRNO`).
const MAX_ERRNO: i32 = 4095;

/// What the other side may make this side hold: commands outstanding at once, the bytes their
/// transfers ask the kernel to allocate, and the largest one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub outstanding: usize,
    pub transfer: u32,
    pub bytes: u64,
}

impl Limits {
    /// An exporter facing a client: generous for every class driver (mass storage asks at most
    /// 1 MiB at a time, a network adapter keeps tens of small reads queued), small enough that
    /// `usbip-host`'s allocations stay bounded.
    pub const EXPORTER: Limits = Limits {
        outstanding: 1024,
        transfer: 16 << 20,
        bytes: 64 << 20,
    };
    /// A client recording its own kernel's commands (bounded only against a runaway).
    pub const CLIENT: Limits = Limits {
        outstanding: 16384,
        transfer: i32::MAX as u32,
        bytes: u64::MAX,
    };
}

/// An endpoint's transfer type, as the device describes it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpType {
    Control,
    Isoc,
    Bulk,
    Interrupt,
}

/// The endpoints a device has in its current configuration and alternate settings, by number
/// and direction: what `usbip-host` looks a command's endpoint up in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoints {
    /// Index 0: OUT, 1: IN; then the endpoint number.
    types: [[Option<EpType>; 16]; 2],
}

impl Endpoints {
    /// A device's default control endpoint only.
    pub fn control_only() -> Self {
        let mut e = Endpoints::default();
        e.set(0, true, EpType::Control);
        e.set(0, false, EpType::Control);
        e
    }

    pub fn set(&mut self, number: u8, dir_in: bool, t: EpType) {
        if let Some(slot) = self.types[usize::from(dir_in)].get_mut(usize::from(number)) {
            *slot = Some(t);
        }
    }

    pub fn get(&self, number: u32, dir_in: bool) -> Option<EpType> {
        self.types[usize::from(dir_in)]
            .get(number as usize)
            .copied()
            .flatten()
    }
}

/// Why a USB/IP stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsbipError {
    #[error("command 0x{0:x} is not a USB/IP command that may travel this way")]
    Command(u32),
    #[error("device id 0x{got:08x} is not the imported device's 0x{want:08x}")]
    Devid { got: u32, want: u32 },
    #[error("direction {0} is neither in nor out")]
    Direction(u32),
    #[error("endpoint {number} {dir} is not an endpoint of the device now")]
    Endpoint { number: u32, dir: &'static str },
    #[error("sequence number {0} is already in use")]
    Seqnum(u32),
    #[error("more than {0} commands outstanding")]
    Outstanding(usize),
    #[error("a transfer of {got} bytes is larger than the {max} allowed")]
    Transfer { got: i64, max: u32 },
    #[error("more than {0} bytes of transfers outstanding")]
    Bytes(u64),
    #[error("{0} isochronous packets (1 to 1024 allowed)")]
    IsoCount(i32),
    #[error("isochronous packet {index}: {what}")]
    IsoPacket { index: usize, what: String },
    #[error("an answer for sequence number {0}, which no command waits for")]
    NoSuchCommand(u32),
    #[error("{field} {got} is out of range ({what})")]
    Field {
        field: &'static str,
        got: i64,
        what: &'static str,
    },
}

/// An isochronous packet as a command laid it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IsoSlot {
    offset: u32,
    length: u32,
}

#[derive(Debug, Clone)]
struct Pending {
    dir_in: bool,
    length: u32,
    /// Isochronous packets (0: not isochronous).
    packets: u32,
    /// The packets as the command laid them out (recorded on the client, whose answers must
    /// keep them).
    slots: Option<Box<[IsoSlot]>>,
}

/// The commands in flight on one imported device, shared by the two directions of one side:
/// commands are recorded on their way to the device, and answers must match them.
#[derive(Debug)]
pub struct Ledger {
    devid: u32,
    limits: Limits,
    submits: HashMap<u32, Pending>,
    unlinks: HashMap<u32, u32>,
    bytes: u64,
    /// The exporter checks each command's endpoint against these; `None` on the client (its
    /// own kernel's commands say what they are).
    endpoints: Option<Endpoints>,
    /// A command that changes the endpoints (set configuration, set interface, port reset) is
    /// in flight: no further command goes to the kernel until it is answered and the table
    /// has been read again.
    stall: Option<u32>,
}

impl Ledger {
    /// The exporter's: commands from the client are checked against `endpoints`.
    pub fn exporter(devid: u32, endpoints: Endpoints) -> Self {
        Self::new(devid, Limits::EXPORTER, Some(endpoints))
    }

    /// The client's: its kernel's commands are recorded, the exporter's answers checked.
    pub fn client(devid: u32) -> Self {
        Self::new(devid, Limits::CLIENT, None)
    }

    pub fn new(devid: u32, limits: Limits, endpoints: Option<Endpoints>) -> Self {
        Ledger {
            devid,
            limits,
            submits: HashMap::new(),
            unlinks: HashMap::new(),
            bytes: 0,
            endpoints,
            stall: None,
        }
    }

    /// Commands sent and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.submits.len() + self.unlinks.len()
    }

    /// The command that stalls the stream into the exporter's kernel, if any.
    pub fn stalled(&self) -> Option<u32> {
        self.stall
    }

    /// The endpoints as they are after a stalling command was answered.
    pub fn set_endpoints(&mut self, e: Endpoints) {
        self.endpoints = Some(e);
    }

    fn take_submit(&mut self, seq: u32) -> Option<Pending> {
        let p = self.submits.remove(&seq)?;
        self.bytes = self.bytes.saturating_sub(p.length.into());
        if self.stall == Some(seq) {
            self.stall = None;
        }
        Some(p)
    }
}

/// Which stream a framer reads, and so how much it trusts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// The client's own `vhci-hcd` sending commands: recorded.
    LocalCommands,
    /// The client's commands on their way into the exporter's `usbip-host`: checked.
    PeerCommands,
    /// The exporter's `usbip-host` answering: releases the recorded commands.
    LocalReturns,
    /// The exporter's answers on their way into the client's `vhci-hcd`: checked.
    PeerReturns,
}

impl Flow {
    fn commands(self) -> bool {
        matches!(self, Flow::LocalCommands | Flow::PeerCommands)
    }
}

/// How far a [`Framer::feed`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Everything fed was taken.
    Done,
    /// A command that changes the device's endpoints went out: feed the rest once it is
    /// answered (see [`Ledger::stalled`]).
    Stalled,
}

#[derive(Debug, Clone)]
enum State {
    Header,
    /// Payload bytes passed through unread.
    Data(u64),
    /// Isochronous packet descriptors, held until checked.
    Iso { want: usize, buf: Vec<u8> },
}


/// Parses one direction of a USB/IP stream as it passes, in chunks split anywhere: headers and
/// the payload lengths they announce. What it emits is exactly what it was fed, in order;
/// nothing reaches a kernel before the header announcing it was checked, and isochronous
/// packet descriptors only once they were checked too. Payload is passed on as slices of the
/// chunks fed (no copy).
#[derive(Debug)]
pub struct Framer {
    flow: Flow,
    hdr: [u8; HEADER],
    have: usize,
    state: State,
    /// The sequence number of the frame being passed.
    current: u32,
    /// How many isochronous packet descriptors follow its data.
    iso: u32,
    /// For an answer: the command it answers (taken off the ledger at its header) and the
    /// actual length it reports.
    answer: Option<(Pending, u32)>,
    /// Headers passed so far (for the stream's figures: crossings per message).
    frames: u64,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn field(field: &'static str, got: i64, what: &'static str) -> UsbipError {
    UsbipError::Field { field, got, what }
}

fn status_ok(status: i32) -> Result<(), UsbipError> {
    if (-MAX_ERRNO..=0).contains(&status) {
        Ok(())
    } else {
        Err(field("status", status.into(), "0 or a negative errno"))
    }
}

impl Framer {
    pub fn new(flow: Flow) -> Self {
        Framer {
            flow,
            hdr: [0; HEADER],
            have: 0,
            state: State::Header,
            current: 0,
            iso: 0,
            answer: None,
            frames: 0,
        }
    }

    /// How many USB/IP messages (headers) it has passed.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Whether the stream is between frames (a clean place for it to end).
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Header) && self.have == 0
    }

    /// Takes bytes from the front of `chunk` and appends what may go on to `out`. Stops early
    /// (with `chunk` holding the rest) when a command that changes the endpoints was passed on
    /// the exporter; an error means the stream must end.
    pub fn feed(
        &mut self,
        ledger: &mut Ledger,
        chunk: &mut Bytes,
        out: &mut Vec<Bytes>,
    ) -> Result<Progress, UsbipError> {
        let len = chunk.len();
        let mut pos = 0usize;
        // Start of the bytes of this chunk checked but not yet emitted.
        let mut from = 0usize;
        let mut stalled = false;
        while pos < len && !stalled {
            match &mut self.state {
                State::Header => {
                    if self.have == 0 && len - pos >= HEADER {
                        let mut h = [0u8; HEADER];
                        h.copy_from_slice(&chunk[pos..pos + HEADER]);
                        stalled = self.on_header(ledger, &h)?;
                        pos += HEADER;
                    } else {
                        // A header split across chunks is held (copied) until it is whole.
                        if pos > from {
                            out.push(chunk.slice(from..pos));
                        }
                        let n = (HEADER - self.have).min(len - pos);
                        self.hdr[self.have..self.have + n].copy_from_slice(&chunk[pos..pos + n]);
                        self.have += n;
                        pos += n;
                        from = pos;
                        if self.have == HEADER {
                            self.have = 0;
                            let h = self.hdr;
                            stalled = self.on_header(ledger, &h)?;
                            out.push(Bytes::copy_from_slice(&h));
                        }
                    }
                }
                State::Data(left) => {
                    let n = (*left).min((len - pos) as u64) as usize;
                    pos += n;
                    *left -= n as u64;
                    if *left == 0 {
                        stalled = self.end_data(ledger);
                    }
                }
                State::Iso { want, buf } => {
                    if pos > from {
                        out.push(chunk.slice(from..pos));
                    }
                    let n = (*want - buf.len()).min(len - pos);
                    buf.extend_from_slice(&chunk[pos..pos + n]);
                    pos += n;
                    from = pos;
                    if buf.len() == *want {
                        let buf = std::mem::take(buf);
                        self.check_iso(ledger, &buf)?;
                        out.push(Bytes::from(buf));
                        self.state = State::Header;
                        self.answer = None;
                        stalled = self.stalls(ledger);
                    }
                }
            }
        }
        if pos > from {
            out.push(chunk.slice(from..pos));
        }
        chunk.advance(pos);
        Ok(if stalled {
            Progress::Stalled
        } else {
            Progress::Done
        })
    }

    /// Whether the frame just passed stalls the stream.
    fn stalls(&self, ledger: &Ledger) -> bool {
        self.flow == Flow::PeerCommands && ledger.stall == Some(self.current)
    }

    /// The current frame's data passed: its isochronous descriptors follow, or it is complete.
    fn end_data(&mut self, ledger: &Ledger) -> bool {
        if self.iso > 0 {
            let want = self.iso as usize * ISO_DESC;
            self.state = State::Iso {
                want,
                buf: Vec::with_capacity(want),
            };
            return false;
        }
        self.state = State::Header;
        self.answer = None;
        self.stalls(ledger)
    }

    /// Checks a header and sets up its payload; whether the frame is complete and stalls.
    fn on_header(&mut self, ledger: &mut Ledger, h: &[u8; HEADER]) -> Result<bool, UsbipError> {
        let command = be32(h, 0);
        let seq = be32(h, 4);
        self.current = seq;
        self.frames += 1;
        let (data, iso) = match (self.flow.commands(), command) {
            (true, CMD_SUBMIT) => self.submit(ledger, h, seq)?,
            (true, CMD_UNLINK) => {
                self.unlink(ledger, h, seq)?;
                (0, 0)
            }
            (false, RET_SUBMIT) => self.ret_submit(ledger, h, seq)?,
            (false, RET_UNLINK) => {
                self.ret_unlink(ledger, h, seq)?;
                (0, 0)
            }
            (_, c) => return Err(UsbipError::Command(c)),
        };
        self.iso = iso;
        if data > 0 {
            self.state = State::Data(data);
            return Ok(false);
        }
        Ok(self.end_data(ledger))
    }

    fn fresh(&self, ledger: &Ledger, h: &[u8; HEADER], seq: u32) -> Result<(), UsbipError> {
        let devid = be32(h, 8);
        if devid != ledger.devid {
            return Err(UsbipError::Devid {
                got: devid,
                want: ledger.devid,
            });
        }
        if ledger.submits.contains_key(&seq) || ledger.unlinks.contains_key(&seq) {
            return Err(UsbipError::Seqnum(seq));
        }
        if ledger.outstanding() >= ledger.limits.outstanding {
            return Err(UsbipError::Outstanding(ledger.limits.outstanding));
        }
        Ok(())
    }

    fn submit(
        &mut self,
        ledger: &mut Ledger,
        h: &[u8; HEADER],
        seq: u32,
    ) -> Result<(u64, u32), UsbipError> {
        self.fresh(ledger, h, seq)?;
        let dir_in = match be32(h, 12) {
            DIR_OUT => false,
            DIR_IN => true,
            d => return Err(UsbipError::Direction(d)),
        };
        let number = be32(h, 16);
        let no_endpoint = || UsbipError::Endpoint {
            number,
            dir: if dir_in { "in" } else { "out" },
        };
        if number > 15 {
            return Err(no_endpoint());
        }
        let length = be32(h, 24) as i32;
        if length < 0 || length as u32 > ledger.limits.transfer {
            return Err(UsbipError::Transfer {
                got: length.into(),
                max: ledger.limits.transfer,
            });
        }
        let length = length as u32;
        let np = be32(h, 32) as i32;
        // usbip-host decides by the endpoint's type in the device's descriptors (and ignores
        // the count for other endpoints); vhci-hcd counts packets only for isochronous ones.
        let (iso, control) = match &ledger.endpoints {
            Some(eps) => match eps.get(number, dir_in) {
                None => return Err(no_endpoint()),
                Some(t) => (t == EpType::Isoc, t == EpType::Control),
            },
            None => (np > 0, number == 0),
        };
        let packets = if iso {
            if !(1..=MAX_ISO_PACKETS as i32).contains(&np) {
                return Err(UsbipError::IsoCount(np));
            }
            np as u32
        } else {
            0
        };
        if ledger.bytes + u64::from(length) > ledger.limits.bytes {
            return Err(UsbipError::Bytes(ledger.limits.bytes));
        }
        if self.flow == Flow::PeerCommands && control {
            // What usbip-host carries out itself (set configuration, set interface, a port
            // reset): the endpoints change under the commands that follow.
            let (rtype, req) = (h[40], h[41]);
            let value = u16::from_le_bytes([h[42], h[43]]);
            if (req == 0x09 && rtype == 0x00)
                || (req == 0x0b && rtype == 0x01)
                || (req == 0x03 && rtype == 0x23 && value == 4)
            {
                ledger.stall = Some(seq);
            }
        }
        ledger.bytes += u64::from(length);
        ledger.submits.insert(
            seq,
            Pending {
                dir_in,
                length,
                packets,
                slots: None,
            },
        );
        let data = if dir_in { 0 } else { u64::from(length) };
        Ok((data, packets))
    }

    fn unlink(&mut self, ledger: &mut Ledger, h: &[u8; HEADER], seq: u32) -> Result<(), UsbipError> {
        self.fresh(ledger, h, seq)?;
        ledger.unlinks.insert(seq, be32(h, 20));
        Ok(())
    }

    fn ret_submit(
        &mut self,
        ledger: &mut Ledger,
        h: &[u8; HEADER],
        seq: u32,
    ) -> Result<(u64, u32), UsbipError> {
        let p = ledger
            .take_submit(seq)
            .ok_or(UsbipError::NoSuchCommand(seq))?;
        let status = be32(h, 20) as i32;
        let actual = be32(h, 24) as i32;
        let np = be32(h, 32) as i32;
        let errors = be32(h, 36) as i32;
        status_ok(status)?;
        if actual < 0 || actual as u32 > p.length {
            return Err(field(
                "actual length",
                actual.into(),
                "0 to the length asked",
            ));
        }
        if np != p.packets as i32 && !(p.packets == 0 && self.flow == Flow::LocalReturns) {
            return Err(field(
                "isochronous packet count",
                np.into(),
                "the command's count",
            ));
        }
        if p.packets > 0 && !(0..=np).contains(&errors) {
            return Err(field(
                "error count",
                errors.into(),
                "at most the packet count",
            ));
        }
        let data = if p.dir_in { actual as u64 } else { 0 };
        let iso = p.packets;
        self.answer = Some((p, actual as u32));
        Ok((data, iso))
    }

    fn ret_unlink(
        &mut self,
        ledger: &mut Ledger,
        h: &[u8; HEADER],
        seq: u32,
    ) -> Result<(), UsbipError> {
        let target = ledger
            .unlinks
            .remove(&seq)
            .ok_or(UsbipError::NoSuchCommand(seq))?;
        status_ok(be32(h, 20) as i32)?;
        // Unlinked in time, the command gets no answer of its own.
        ledger.take_submit(target);
        Ok(())
    }

    /// The current frame's isochronous packet descriptors, whole.
    fn check_iso(&mut self, ledger: &mut Ledger, buf: &[u8]) -> Result<(), UsbipError> {
        let packets = buf.chunks_exact(ISO_DESC).map(|d| {
            (
                be32(d, 0),
                be32(d, 4),
                be32(d, 8),
                be32(d, 12) as i32,
            )
        });
        let bad = |index: usize, what: String| UsbipError::IsoPacket { index, what };
        match self.flow {
            Flow::LocalCommands | Flow::PeerCommands => {
                let Some(p) = ledger.submits.get_mut(&self.current) else {
                    return Ok(());
                };
                let mut slots = Vec::with_capacity(p.packets as usize);
                for (i, (offset, length, _, _)) in packets.enumerate() {
                    if u64::from(offset) + u64::from(length) > u64::from(p.length) {
                        return Err(bad(
                            i,
                            format!(
                                "offset {offset} + length {length} is outside the {} bytes of the transfer",
                                p.length
                            ),
                        ));
                    }
                    slots.push(IsoSlot { offset, length });
                }
                if self.flow == Flow::LocalCommands {
                    p.slots = Some(slots.into_boxed_slice());
                }
            }
            Flow::LocalReturns => {}
            Flow::PeerReturns => {
                let Some((p, actual)) = &self.answer else {
                    return Err(UsbipError::NoSuchCommand(self.current));
                };
                let Some(slots) = &p.slots else {
                    return Err(bad(0, "the command had no packets recorded".into()));
                };
                let mut total = 0u64;
                for (i, ((offset, length, got, status), slot)) in
                    packets.zip(slots.iter()).enumerate()
                {
                    if offset != slot.offset || length != slot.length {
                        return Err(bad(
                            i,
                            format!(
                                "offset {offset} length {length} differ from the command's {} {}",
                                slot.offset, slot.length
                            ),
                        ));
                    }
                    if got > length {
                        return Err(bad(
                            i,
                            format!("actual length {got} is more than its length {length}"),
                        ));
                    }
                    status_ok(status).map_err(|e| bad(i, e.to_string()))?;
                    total += u64::from(got);
                }
                if total != u64::from(*actual) {
                    return Err(bad(
                        0,
                        format!(
                            "the packets' actual lengths add up to {total}, not the answer's {actual}"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Builds USB/IP headers (for tests, examples and fuzzing).
pub mod build {
    use super::*;

    fn header(command: u32, seq: u32, devid: u32, dir: u32, ep: u32, rest: [u32; 5], setup: [u8; 8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER);
        for v in [command, seq, devid, dir, ep] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        for v in rest {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(&setup);
        b
    }

    /// `CMD_SUBMIT` on endpoint `ep`, `dir_in`, asking `length` bytes (`packets` > 0:
    /// isochronous), with `setup` for a control transfer.
    pub fn submit(seq: u32, devid: u32, ep: u32, dir_in: bool, length: u32, packets: i32, setup: [u8; 8]) -> Vec<u8> {
        header(CMD_SUBMIT, seq, devid, u32::from(dir_in), ep, [0, length, 0, packets as u32, 0], setup)
    }

    pub fn unlink(seq: u32, devid: u32, target: u32) -> Vec<u8> {
        header(CMD_UNLINK, seq, devid, 0, 0, [target, 0, 0, 0, 0], [0; 8])
    }

    pub fn ret_submit(seq: u32, status: i32, actual: u32, packets: i32, errors: i32) -> Vec<u8> {
        header(RET_SUBMIT, seq, 0, 0, 0, [status as u32, actual, 0, packets as u32, errors as u32], [0; 8])
    }

    pub fn ret_unlink(seq: u32, status: i32) -> Vec<u8> {
        header(RET_UNLINK, seq, 0, 0, 0, [status as u32, 0, 0, 0, 0], [0; 8])
    }

    /// One isochronous packet descriptor.
    pub fn iso(offset: u32, length: u32, actual: u32, status: i32) -> Vec<u8> {
        [offset, length, actual, status as u32]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect()
    }
}

/// Decodes `data` as every body of this kind and runs the checking framers over it (the fuzz
/// target `kind_bodies` runs it for every kind): whatever the bytes, nothing panics and
/// nothing grows without bound.
pub fn fuzz(data: &[u8]) {
    let _ = DeviceParams::decode_exact(data);
    let _ = OpenParams::decode_exact(data);
    let _ = Imported::decode_exact(data);
    let _ = Control::decode_exact(data);
    let mut eps = Endpoints::control_only();
    eps.set(1, true, EpType::Bulk);
    eps.set(2, false, EpType::Bulk);
    eps.set(3, true, EpType::Isoc);
    for flow in [Flow::PeerCommands, Flow::PeerReturns] {
        let mut ledger = match flow {
            Flow::PeerCommands => Ledger::exporter(0x10002, eps.clone()),
            _ => Ledger::client(0x10002),
        };
        if flow == Flow::PeerReturns {
            // Some commands the answers may refer to.
            let mut f = Framer::new(Flow::LocalCommands);
            let mut cmds = Vec::new();
            cmds.extend(build::submit(1, 0x10002, 1, true, 512, 0, [0; 8]));
            cmds.extend(build::submit(2, 0x10002, 3, true, 64, 2, [0; 8]));
            cmds.extend(build::iso(0, 32, 0, 0));
            cmds.extend(build::iso(32, 32, 0, 0));
            cmds.extend(build::unlink(3, 0x10002, 1));
            let _ = f.feed(&mut ledger, &mut Bytes::from(cmds), &mut Vec::new());
        }
        let mut f = Framer::new(flow);
        let mut out = Vec::new();
        // Fed in two pieces, split where the data says: framing must not depend on chunking.
        let cut = data.first().map_or(0, |b| usize::from(*b) % (data.len() + 1));
        for part in [&data[..cut], &data[cut..]] {
            let mut chunk = Bytes::copy_from_slice(part);
            loop {
                match f.feed(&mut ledger, &mut chunk, &mut out) {
                    Ok(Progress::Stalled) if !chunk.is_empty() => {
                        // The kernel would answer; pretend it did.
                        if let Some(seq) = ledger.stalled() {
                            ledger.take_submit(seq);
                        }
                    }
                    _ => break,
                }
            }
        }
    }
}

fn example_device() -> UsbDevice {
    UsbDevice {
        id: 3,
        busid: "1-1.4".into(),
        vendor: 0x0483,
        product: 0x3748,
        class: 0,
        manufacturer: "STMicro".into(),
        name: "STLink".into(),
        serial: "066D".into(),
        speed: Speed::Full,
        busnum: 1,
        devnum: 5,
        state: DevState::Present,
        was: None,
    }
}

pub fn examples() -> Vec<(&'static str, Vec<u8>)> {
    let params = DeviceParams {
        ids: vec![(0x0483, 0x3748), (0x0483, 0xdf11)],
        devices: vec![example_device()],
    };
    vec![
        ("usb-params", to_bytes(&params).to_vec()),
        ("usb-open-watch", to_bytes(&OpenParams::Watch).to_vec()),
        ("usb-open-import", to_bytes(&OpenParams::Import { id: 3 }).to_vec()),
        (
            "usb-imported",
            to_bytes(&Imported {
                id: 3,
                devid: 0x10005,
                speed: Speed::Full,
            })
            .to_vec(),
        ),
        (
            "usb-changed",
            to_bytes(&Control::Changed(DeviceParams {
                ids: vec![(0x0483, 0x3748), (0x0483, 0xdf11)],
                devices: vec![
                    UsbDevice {
                        state: DevState::Gone,
                        ..example_device()
                    },
                    UsbDevice {
                        id: 4,
                        product: 0xdf11,
                        name: "DFU".into(),
                        devnum: 6,
                        was: Some(3),
                        ..example_device()
                    },
                ],
            }))
            .to_vec(),
        ),
        (
            "usb-gone",
            to_bytes(&Control::Gone {
                reason: "unplugged".into(),
            })
            .to_vec(),
        ),
    ]
}

pub fn decode_example(name: &str, bytes: &[u8]) -> bool {
    match name {
        "usb-params" => DeviceParams::decode_exact(bytes).is_ok(),
        "usb-open-watch" | "usb-open-import" => OpenParams::decode_exact(bytes).is_ok(),
        "usb-imported" => Imported::decode_exact(bytes).is_ok(),
        "usb-changed" | "usb-gone" => Control::decode_exact(bytes).is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;
    use crate::kinds::testing::*;
    use proptest::prelude::*;

    const DEV: u32 = 0x10002;

    fn device() -> impl Strategy<Value = UsbDevice> {
        (
            any::<u64>(),
            "[0-9.-]{0,32}",
            any::<(u16, u16, u8)>(),
            ".{0,20}",
            ".{0,20}",
            ".{0,20}",
            1u8..=6,
            (0u32..=0xffff, 0u32..=0xffff),
            0u8..4,
            proptest::option::of(any::<u64>()),
        )
            .prop_map(
                |(id, busid, (vendor, product, class), m, n, s, speed, (busnum, devnum), st, was)| {
                    UsbDevice {
                        id: id & VARINT_MAX,
                        busid,
                        vendor,
                        product,
                        class,
                        manufacturer: cut_text(&m),
                        name: cut_text(&n),
                        serial: cut_text(&s),
                        speed: Speed::from_wire(speed).expect("speed"),
                        busnum,
                        devnum,
                        state: DevState::from_wire(st).expect("state"),
                        was: was.map(|w| w & VARINT_MAX),
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn bodies_round_trip_and_survive_corruption(
            devs in proptest::collection::vec(device(), 0..4),
            ids in proptest::collection::vec(any::<(u16, u16)>(), 0..4),
            id in 0u64..(1 << 40),
            devid in any::<u32>(),
            reason in ".{0,40}",
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            let params = DeviceParams { ids, devices: devs };
            round_trip(&params);
            corrupt::<DeviceParams>(&to_bytes(&params), &flips, cut);
            let c = Control::Changed(params);
            round_trip(&c);
            corrupt::<Control>(&to_bytes(&c), &flips, cut);
            round_trip(&Control::Gone { reason });
            for o in [OpenParams::Watch, OpenParams::Import { id }] {
                round_trip(&o);
                corrupt::<OpenParams>(&to_bytes(&o), &flips, cut);
            }
            let i = Imported { id, devid, speed: Speed::High };
            round_trip(&i);
            corrupt::<Imported>(&to_bytes(&i), &flips, cut);
        }
    }

    #[test]
    fn decoders_refuse_what_is_out_of_bounds() {
        let long = UsbDevice {
            name: "x".repeat(MAX_TEXT + 1),
            ..example_device()
        };
        assert!(matches!(
            UsbDevice::decode_exact(&to_bytes(&long)),
            Err(DecodeError::Invalid { field: "usb product name", .. })
        ));
        let many = DeviceParams {
            ids: vec![],
            devices: vec![example_device(); MAX_DEVICES + 1],
        };
        assert!(matches!(
            DeviceParams::decode_exact(&to_bytes(&many)),
            Err(DecodeError::Invalid { field: "usb device count", .. })
        ));
        // The smallest device (empty strings) decodes: the count's bound is not above it.
        let small = DeviceParams {
            ids: vec![],
            devices: vec![UsbDevice {
                busid: String::new(),
                manufacturer: String::new(),
                name: String::new(),
                serial: String::new(),
                ..example_device()
            }],
        };
        round_trip(&small);
        // A count larger than the bytes present is refused before allocating.
        assert!(DeviceParams::decode_exact(&[0x00, 0x8f, 0xff, 0xff, 0xff]).is_err());
        assert_eq!(cut_text(&"é".repeat(100)).len(), MAX_TEXT);
    }

    #[test]
    fn a_device_is_described_with_its_strings_escaped() {
        let d = UsbDevice {
            name: "evil\u{1b}[31m".into(),
            ..example_device()
        };
        let s = d.describe();
        assert!(s.starts_with("0483:3748 STMicro evil\\u{1b}[31m (12 Mbit/s, serial 066D) at 1-1.4, present"), "{s}");
        assert!(!s.contains('\u{1b}'));
        let p = DeviceParams {
            ids: vec![(0x0483, 0x3748)],
            devices: vec![],
        };
        assert_eq!(p.to_string(), "no device plugged in (waiting for 0483:3748)");
    }

    /// An exporter's endpoints: control, bulk 1 in, bulk 2 out, isochronous 3 in.
    fn eps() -> Endpoints {
        let mut e = Endpoints::control_only();
        e.set(1, true, EpType::Bulk);
        e.set(2, false, EpType::Bulk);
        e.set(3, true, EpType::Isoc);
        e
    }

    /// Feeds `bytes` in chunks of `step`, returning what came out (and stopping at a stall).
    fn feed_all(
        f: &mut Framer,
        l: &mut Ledger,
        bytes: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Progress), UsbipError> {
        let mut out = Vec::new();
        for part in bytes.chunks(step.max(1)) {
            let mut chunk = Bytes::copy_from_slice(part);
            let p = f.feed(l, &mut chunk, &mut out)?;
            if p == Progress::Stalled {
                let mut v: Vec<u8> = out.concat();
                v.extend_from_slice(&chunk);
                return Ok((v, p));
            }
        }
        Ok((out.concat(), Progress::Done))
    }

    /// A client's conversation: the commands its vhci-hcd sends and the exporter's answers.
    fn conversation() -> (Vec<u8>, Vec<u8>) {
        let mut cmds = Vec::new();
        // GET_DESCRIPTOR on the control endpoint, 18 bytes in.
        cmds.extend(submit(1, DEV, 0, true, 18, 0, [0x80, 6, 0, 1, 0, 0, 18, 0]));
        // Bulk out with 5 bytes of data.
        cmds.extend(submit(2, DEV, 2, false, 5, 0, [0; 8]));
        cmds.extend(b"hello");
        // Bulk in, 512 asked.
        cmds.extend(submit(3, DEV, 1, true, 512, 0, [0; 8]));
        // Isochronous in: two packets of 32.
        cmds.extend(submit(4, DEV, 3, true, 64, 2, [0; 8]));
        cmds.extend(iso(0, 32, 0, 0));
        cmds.extend(iso(32, 32, 0, 0));
        // Unlink the bulk in.
        cmds.extend(unlink(5, DEV, 3));
        let mut rets = Vec::new();
        rets.extend(ret_submit(1, 0, 18, 0, 0));
        rets.extend([0x12u8; 18]);
        rets.extend(ret_submit(2, 0, 5, 0, 0));
        rets.extend(ret_submit(4, 0, 40, 2, 0));
        rets.extend([7u8; 40]);
        rets.extend(iso(0, 32, 32, 0));
        rets.extend(iso(32, 32, 8, 0));
        rets.extend(ret_unlink(5, -104));
        (cmds, rets)
    }

    #[test]
    fn a_conversation_passes_unchanged_however_it_is_cut() {
        let (cmds, rets) = conversation();
        for step in [1, 2, 7, 47, 48, 49, 100, 4096] {
            // The client records its kernel's commands and checks the answers ...
            let mut client = Ledger::client(DEV);
            let (mut commands, mut answers) = (
                Framer::new(Flow::LocalCommands),
                Framer::new(Flow::PeerReturns),
            );
            let (out, p) = feed_all(&mut commands, &mut client, &cmds, step).expect("commands");
            assert_eq!((out.as_slice(), p), (cmds.as_slice(), Progress::Done), "step {step}");
            assert_eq!(client.outstanding(), 5);
            let (out, _) = feed_all(&mut answers, &mut client, &rets, step).expect("answers");
            assert_eq!(out, rets, "step {step}");
            // Five commands (one an unlink) and four answers (the unlinked one has none).
            assert_eq!((commands.frames(), answers.frames()), (5, 4), "step {step}");
            assert_eq!(client.outstanding(), 0, "every command answered (step {step})");
            // ... the exporter checks the commands and releases them with its kernel's answers.
            let mut exp = Ledger::exporter(DEV, eps());
            let (out, _) = feed_all(&mut Framer::new(Flow::PeerCommands), &mut exp, &cmds, step)
                .expect("commands into usbip-host");
            assert_eq!(out, cmds, "step {step}");
            let (out, _) = feed_all(&mut Framer::new(Flow::LocalReturns), &mut exp, &rets, step)
                .expect("answers from usbip-host");
            assert_eq!(out, rets);
            assert_eq!((exp.outstanding(), exp.bytes), (0, 0));
        }
    }

    #[test]
    fn payload_passes_as_slices_and_unchecked_bytes_are_held() {
        let mut l = Ledger::client(DEV);
        let mut f = Framer::new(Flow::LocalCommands);
        let mut cmd = submit(1, DEV, 3, false, 64, 2, [0; 8]);
        cmd.extend([1u8; 64]);
        cmd.extend(iso(0, 32, 0, 0));
        cmd.extend(iso(32, 32, 0, 0));
        // All but the last descriptor byte: the descriptors are not emitted yet.
        let mut out = Vec::new();
        let mut chunk = Bytes::copy_from_slice(&cmd[..cmd.len() - 1]);
        f.feed(&mut l, &mut chunk, &mut out).expect("feed");
        assert_eq!(out.concat().len(), HEADER + 64, "the descriptors wait");
        let mut last = Bytes::copy_from_slice(&cmd[cmd.len() - 1..]);
        f.feed(&mut l, &mut last, &mut out).expect("feed");
        assert_eq!(out.concat(), cmd);
        assert!(f.at_boundary());
    }

    fn refused(flow: Flow, ledger: &mut Ledger, bytes: &[u8]) -> UsbipError {
        feed_all(&mut Framer::new(flow), ledger, bytes, 4096).expect_err("refused")
    }

    #[test]
    fn the_exporter_refuses_commands_its_kernel_must_not_see() {
        let ex = || Ledger::exporter(DEV, eps());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (ret_submit(1, 0, 0, 0, 0), "not a USB/IP command that may travel this way"),
            ([9u32.to_be_bytes().to_vec(), vec![0; 44]].concat(), "command 0x9"),
            (submit(1, DEV + 1, 1, true, 8, 0, [0; 8]), "device id 0x00010003"),
            ([submit(1, DEV, 1, true, 8, 0, [0; 8])[..12].to_vec(), 7u32.to_be_bytes().to_vec(), vec![0; 32]].concat(), "direction 7"),
            (submit(1, DEV, 4, true, 8, 0, [0; 8]), "endpoint 4 in is not an endpoint"),
            (submit(1, DEV, 1, false, 8, 0, [0; 8]), "endpoint 1 out is not an endpoint"),
            (submit(1, DEV, 16, true, 8, 0, [0; 8]), "endpoint 16 in"),
            (submit(1, DEV, 1, true, 0x8000_0000, 0, [0; 8]), "transfer of -2147483648 bytes"),
            (submit(1, DEV, 1, true, (16 << 20) + 1, 0, [0; 8]), "larger than the 16777216 allowed"),
            (submit(1, DEV, 3, true, 64, 0, [0; 8]), "0 isochronous packets"),
            (submit(1, DEV, 3, true, 64, 1025, [0; 8]), "1025 isochronous packets"),
            (
                [submit(1, DEV, 3, true, 64, 1, [0; 8]), iso(60, 8, 0, 0)].concat(),
                "offset 60 + length 8 is outside the 64 bytes",
            ),
            (
                [submit(1, DEV, 1, true, 8, 0, [0; 8]), submit(1, DEV, 1, true, 8, 0, [0; 8])].concat(),
                "sequence number 1 is already in use",
            ),
        ];
        for (bytes, want) in cases {
            let e = refused(Flow::PeerCommands, &mut ex(), &bytes);
            assert!(e.to_string().contains(want), "{e} (wanted {want:?})");
        }
        // Budgets: commands outstanding, and bytes the kernel would allocate for them.
        let mut l = ex();
        let many: Vec<u8> = (0..Limits::EXPORTER.outstanding as u32 + 1)
            .flat_map(|s| submit(s, DEV, 1, true, 8, 0, [0; 8]))
            .collect();
        assert_eq!(refused(Flow::PeerCommands, &mut l, &many), UsbipError::Outstanding(1024));
        let mut l = ex();
        let big: Vec<u8> = (0..5).flat_map(|s| submit(s, DEV, 1, true, 16 << 20, 0, [0; 8])).collect();
        assert_eq!(refused(Flow::PeerCommands, &mut l, &big), UsbipError::Bytes(64 << 20));
        // Nothing of a refused frame was emitted: the header is checked before it is passed.
        let mut out = Vec::new();
        let mut chunk = Bytes::from(submit(1, DEV, 9, true, 8, 0, [0; 8]));
        assert!(Framer::new(Flow::PeerCommands).feed(&mut ex(), &mut chunk, &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn the_client_refuses_answers_nothing_asked_for() {
        let setup = |l: &mut Ledger| {
            let (cmds, _) = conversation();
            feed_all(&mut Framer::new(Flow::LocalCommands), l, &cmds, 4096).expect("commands");
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (ret_submit(9, 0, 0, 0, 0), "sequence number 9, which no command waits for"),
            (submit(1, DEV, 0, true, 0, 0, [0; 8]), "command 0x1"),
            (ret_submit(1, 0, 19, 0, 0), "actual length 19 is out of range"),
            (ret_submit(1, 5, 0, 0, 0), "status 5 is out of range"),
            (ret_submit(1, -5000, 0, 0, 0), "status -5000"),
            (ret_submit(1, 0, 0, 3, 0), "isochronous packet count 3"),
            (ret_submit(4, 0, 0, 1, 0), "isochronous packet count 1"),
            (ret_submit(4, 0, 0, 2, 3), "error count 3"),
            (
                [ret_submit(4, 0, 40, 2, 0), vec![0; 40], iso(0, 32, 32, 0), iso(16, 32, 8, 0)].concat(),
                "offset 16 length 32 differ from the command's 32 32",
            ),
            (
                [ret_submit(4, 0, 40, 2, 0), vec![0; 40], iso(0, 32, 33, 0), iso(32, 32, 7, 0)].concat(),
                "actual length 33 is more than its length 32",
            ),
            (
                [ret_submit(4, 0, 40, 2, 0), vec![0; 40], iso(0, 32, 30, 0), iso(32, 32, 8, 0)].concat(),
                "add up to 38, not the answer's 40",
            ),
            (ret_unlink(4, 0), "sequence number 4, which no command waits for"),
            (ret_unlink(5, 1), "status 1"),
            (
                [ret_submit(1, 0, 18, 0, 0), vec![0; 18], ret_submit(1, 0, 18, 0, 0)].concat(),
                "sequence number 1, which no command waits for",
            ),
        ];
        for (bytes, want) in cases {
            let mut l = Ledger::client(DEV);
            setup(&mut l);
            let e = refused(Flow::PeerReturns, &mut l, &bytes);
            assert!(e.to_string().contains(want), "{e} (wanted {want:?})");
        }
        // An unlinked command gets no answer of its own after the unlink's.
        let mut l = Ledger::client(DEV);
        setup(&mut l);
        let e = refused(
            Flow::PeerReturns,
            &mut l,
            &[ret_unlink(5, -104), ret_submit(3, 0, 0, 0, 0)].concat(),
        );
        assert_eq!(e, UsbipError::NoSuchCommand(3));
    }

    #[test]
    fn commands_that_change_the_endpoints_stall_until_answered() {
        let mut l = Ledger::exporter(DEV, Endpoints::control_only());
        let mut f = Framer::new(Flow::PeerCommands);
        let set_interface = submit(1, DEV, 0, false, 0, 0, [0x01, 0x0b, 1, 0, 0, 0, 0, 0]);
        let next = submit(2, DEV, 1, true, 8, 0, [0; 8]);
        let mut chunk = Bytes::from([set_interface.clone(), next.clone()].concat());
        let mut out = Vec::new();
        assert_eq!(f.feed(&mut l, &mut chunk, &mut out), Ok(Progress::Stalled));
        assert_eq!(out.concat(), set_interface, "only the set interface went");
        assert_eq!(chunk.len(), HEADER, "the next command waits");
        assert_eq!(l.stalled(), Some(1));
        // usbip-host answers; the endpoints are read again (alternate setting 1 has bulk 1 in).
        feed_all(&mut Framer::new(Flow::LocalReturns), &mut l, &ret_submit(1, 0, 0, 0, 0), 48)
            .expect("answer");
        assert_eq!(l.stalled(), None);
        let mut e = Endpoints::control_only();
        e.set(1, true, EpType::Bulk);
        l.set_endpoints(e);
        assert_eq!(f.feed(&mut l, &mut chunk, &mut out), Ok(Progress::Done));
        assert_eq!(out.concat(), [set_interface, next].concat());
        // Set configuration and a port reset stall too; other control requests do not.
        for setup in [[0, 9, 1, 0, 0, 0, 0, 0], [0x23, 3, 4, 0, 1, 0, 0, 0]] {
            let mut l = Ledger::exporter(DEV, Endpoints::control_only());
            let (_, p) = feed_all(&mut Framer::new(Flow::PeerCommands), &mut l, &submit(7, DEV, 0, false, 0, 0, setup), 48)
                .expect("feed");
            assert_eq!(p, Progress::Stalled, "{setup:?}");
        }
        let mut l = Ledger::exporter(DEV, Endpoints::control_only());
        let (_, p) = feed_all(&mut Framer::new(Flow::PeerCommands), &mut l, &submit(7, DEV, 0, true, 18, 0, [0x80, 6, 0, 1, 0, 0, 18, 0]), 48)
            .expect("feed");
        assert_eq!(p, Progress::Done);
    }

    proptest! {
        /// Random bulk traffic, cut anywhere: both sides pass it unchanged and end with nothing
        /// outstanding.
        #[test]
        fn random_traffic_passes_and_balances(
            xfers in proptest::collection::vec((any::<bool>(), 0u32..3000, any::<bool>()), 1..40),
            cuts in proptest::collection::vec(1usize..300, 1..20),
        ) {
            let mut cmds = Vec::new();
            let mut rets = Vec::new();
            for (i, (dir_in, len, short)) in xfers.iter().enumerate() {
                let seq = i as u32 + 1;
                let ep = if *dir_in { 1 } else { 2 };
                cmds.extend(submit(seq, DEV, ep, *dir_in, *len, 0, [0; 8]));
                if !dir_in {
                    cmds.extend(vec![0xaa; *len as usize]);
                }
                let actual = if *short { len / 2 } else { *len };
                rets.extend(ret_submit(seq, 0, actual, 0, 0));
                if *dir_in {
                    rets.extend(vec![0x55; actual as usize]);
                }
            }
            let chunked = |bytes: &[u8]| -> Vec<Bytes> {
                let mut v = Vec::new();
                let mut rest = bytes;
                let mut i = 0;
                while !rest.is_empty() {
                    let n = cuts[i % cuts.len()].min(rest.len());
                    v.push(Bytes::copy_from_slice(&rest[..n]));
                    rest = &rest[n..];
                    i += 1;
                }
                v
            };
            for (flow_c, flow_r, mut l) in [
                (Flow::LocalCommands, Flow::PeerReturns, Ledger::client(DEV)),
                (Flow::PeerCommands, Flow::LocalReturns, Ledger::exporter(DEV, eps())),
            ] {
                let (mut fc, mut fr) = (Framer::new(flow_c), Framer::new(flow_r));
                let mut out = Vec::new();
                for mut c in chunked(&cmds) {
                    prop_assert_eq!(fc.feed(&mut l, &mut c, &mut out), Ok(Progress::Done));
                }
                prop_assert_eq!(out.concat(), cmds.clone());
                let mut out = Vec::new();
                for mut c in chunked(&rets) {
                    prop_assert_eq!(fr.feed(&mut l, &mut c, &mut out), Ok(Progress::Done));
                }
                prop_assert_eq!(out.concat(), rets.clone());
                prop_assert_eq!(l.outstanding(), 0);
                prop_assert!(fc.at_boundary() && fr.at_boundary());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            fuzz(&data);
        }
    }
}
