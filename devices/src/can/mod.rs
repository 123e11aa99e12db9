//! CAN buses: a SocketCAN interface, an slcan adapter or the simulated ECU on the exporter; a
//! vcan interface, or an slcan pty and a socketcand port, on the client. One channel per
//! attachment carries frames both ways as numbered, time-stamped records
//! (`jmp_protocol::kinds::can`).

pub mod backend;
pub mod bridge;
pub mod driver;
pub mod ops;
pub mod sim;
pub mod slcan;
pub mod socketcand;
pub mod spec;
pub mod vcan;

pub use bridge::CanBridge;
pub use driver::CanDriver;
pub use ops::CanArgs;
pub use spec::{CanSimSpec, CanSpec};

use crate::board::Board;
use crate::kind::{
    BridgeError, InvalidSpec, OptionError, BuildCtx, DeviceKind, NoRequest, NoVerb, Sandbox, Spec};
use crate::{BoxFuture, Bridge, BridgeCtx};
use jmp_protocol::codec::Codec;
use jmp_protocol::kinds::can as wire;
use jmp_protocol::{DeviceInfo, Kind};
use std::sync::Arc;

/// The CAN bus kind.
pub struct Can;

crate::config_types! {
    /// `type: can` (a SocketCAN interface or an slcan adapter) or `type: can-sim` (the
    /// simulated ECU).
    pub enum CanConfig {
        Bus(CanSpec) = "can" => "{interface: can0, bitrate: 500000}",
        Sim(CanSimSpec) = "can-sim" => "{period: 100ms}",
    }
}

impl DeviceKind for Can {
    const KIND: Kind = Kind::Can;
    type Config = CanConfig;
    type Options = CanArgs;
    type Verb = NoVerb;
    type Request = NoRequest;
    type Response = NoRequest;

    fn parse_options(opts: &CanArgs) -> Result<(), OptionError> {
        opts.parse().map(|_| ()).map_err(OptionError)
    }

    fn check_options(
        opts: &CanArgs,
        exporter: &str,
        devices: &[DeviceInfo],
    ) -> Result<(), OptionError> {
        opts.check(exporter, devices).map_err(OptionError)
    }

    fn bridge<'a>(
        info: &'a DeviceInfo,
        ctx: &'a BridgeCtx,
        opts: &'a CanArgs,
    ) -> BoxFuture<'a, Result<Box<dyn Bridge>, BridgeError>> {
        Box::pin(async move {
            let for_device = opts.for_device(&info.name).map_err(OptionError)?;
            let b = CanBridge::create(info, ctx, for_device)
                .await
                .map_err(BridgeError::Local)?;
            Ok(Box::new(b) as Box<dyn Bridge>)
        })
    }

    fn summary(params: &[u8]) -> Option<String> {
        wire::DeviceParams::decode_exact(params)
            .ok()
            .map(|p| p.to_string())
    }
}

impl Spec for CanSpec {
    fn validate(&self) -> Result<(), InvalidSpec> {
        CanSpec::validate(self).map_err(InvalidSpec)
    }

    fn start(&self, name: &str, _ctx: &BuildCtx) -> Arc<dyn crate::Driver> {
        CanSpec::start(self, name)
    }

    /// SocketCAN: a raw CAN socket, the bus state over netlink, and the writer thread pinned
    /// to one CPU (frames stay in order, see `vcan.rs`); setting a real controller's bit rate
    /// also needs CAP_NET_ADMIN. slcan: the adapter's tty.
    fn sandbox(&self, name: &str) -> Sandbox {
        match (&self.interface, &self.slcan) {
            (Some(i), _) => {
                let mut s = Sandbox::default();
                s.note(format!("{name}: SocketCAN interface {i}"));
                s.family("AF_CAN");
                s.family("AF_NETLINK");
                s.syscall("sched_setaffinity");
                if self.bitrate.is_some() {
                    s.note(format!(
                        "{name}: sets {i}'s bit rate (netlink, CAP_NET_ADMIN)"
                    ));
                    s.cap("CAP_NET_ADMIN");
                }
                s
            }
            (None, Some(s)) => Sandbox::tty(name, std::path::Path::new(&s.path), "slcan adapter"),
            (None, None) => Sandbox::default(),
        }
    }
}

impl Spec for CanSimSpec {
    fn validate(&self) -> Result<(), InvalidSpec> {
        CanSimSpec::validate(self).map_err(InvalidSpec)
    }

    fn start(&self, name: &str, ctx: &BuildCtx) -> Arc<dyn crate::Driver> {
        CanSimSpec::start(self, name, ctx.board)
    }
}

impl CanSpec {
    pub fn start(&self, name: &str) -> Arc<dyn crate::Driver> {
        let source = match (&self.interface, &self.slcan) {
            (Some(i), _) => driver::Source::SocketCan {
                interface: i.clone(),
                bitrate: self.bitrate,
                data_bitrate: self.data_bitrate,
                // A vcan interface can be told apart only once it exists; FD is assumed
                // unless the config says otherwise (frames the bus cannot carry are refused
                // by the kernel and counted).
                fd: self.fd(true),
            },
            (None, Some(s)) => driver::Source::Slcan {
                path: s.path.clone(),
                tty_baud: s.baudrate,
                bitrate: self.bitrate.unwrap_or(500_000),
                data_bitrate: self.data_bitrate,
                fd: self.fd(false),
            },
            (None, None) => unreachable!("validated: interface or slcan"),
        };
        Arc::new(CanDriver::start(name, source))
    }
}

impl CanSimSpec {
    /// `board`: the simulated board whose power the ECU follows.
    pub fn start(&self, name: &str, board: &Board) -> Arc<dyn crate::Driver> {
        Arc::new(CanDriver::start(
            name,
            driver::Source::Sim(backend::SimConfig {
                bitrate: self.bitrate,
                period: self.period(),
                counter_id: self.counter_id,
                request_id: self.request_id,
                response_id: self.response_id,
                load: self.load,
                board: board.clone(),
            }),
        ))
    }
}
