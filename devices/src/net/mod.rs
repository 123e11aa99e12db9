//! Network devices (`type: network`): the board's subnets reached from the client's machine.
//!
//! Two ways in, chosen on the client:
//! - a TUN tunnel (needs CAP_NET_ADMIN): an interface named after the exporter ([`ifname`]),
//!   an address the exporter assigns, routes for the exported subnets only; the exporter's TUN
//!   forwards into the subnets with source NAT ([`nat`]). Packets travel as QUIC datagrams, one
//!   IP packet each; the kernel's super-packets are split into segments on the way in and
//!   coalesced again on the way out ([`pump`]), packets that fit no datagram take the tunnel's
//!   fallback stream;
//! - SOCKS5 (`--socks`, no privileges): CONNECTs made by the exporter, names resolved there
//!   ([`socks`]).
//!
//! The exporter forwards only to the configured subnets: anything else is dropped and counted.

pub mod bridge;
pub mod driver;
pub mod ifname;
pub(crate) mod nat;
pub(crate) mod packet;
pub(crate) mod pump;
pub mod socks;
pub mod spec;
pub(crate) mod sys;
pub(crate) mod tun;

pub use bridge::{NetArgs, NetBridge};
pub use driver::NetDriver;
pub use spec::NetSpec;

use crate::kind::{
    BridgeError, InvalidSpec, OptionError,
    BuildCtx, ClientNeeds, DeviceKind, NoRequest, NoVerb, Sandbox, Spec,
};
use crate::{BoxFuture, Bridge, BridgeCtx};
use jmp_protocol::codec::Codec;
use jmp_protocol::kinds::net as wire;
use jmp_protocol::{DeviceInfo, Kind};
use std::sync::Arc;

/// The network kind: a TUN tunnel (or SOCKS5) into the board's subnets.
pub struct Network;

crate::config_types! {
    /// `type: network`.
    pub enum NetConfig {
        Subnets(NetSpec) = "network" => "{subnets: [192.168.10.0/24], via: lo}",
    }
}

impl DeviceKind for Network {
    const KIND: Kind = Kind::Network;
    type Config = NetConfig;
    type Options = NetArgs;
    type Verb = NoVerb;
    type Request = NoRequest;
    type Response = NoRequest;

    fn parse_options(opts: &NetArgs) -> Result<(), OptionError> {
        opts.parse().map(|_| ()).map_err(OptionError)
    }

    fn check_options(
        opts: &NetArgs,
        exporter: &str,
        devices: &[DeviceInfo],
    ) -> Result<(), OptionError> {
        opts.check(exporter, devices).map_err(OptionError)
    }

    fn bridge<'a>(
        info: &'a DeviceInfo,
        ctx: &'a BridgeCtx,
        opts: &'a NetArgs,
    ) -> BoxFuture<'a, Result<Box<dyn Bridge>, BridgeError>> {
        Box::pin(async move {
            Ok(Box::new(bridge::create(info, ctx, opts).await?) as Box<dyn Bridge>)
        })
    }

    fn summary(params: &[u8]) -> Option<String> {
        wire::DeviceParams::decode_exact(params).ok().map(|p| {
            p.subnets
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        })
    }

    /// A TUN needs CAP_NET_ADMIN; SOCKS (`--socks`) needs nothing.
    fn client_needs(_info: &DeviceInfo, opts: &NetArgs) -> ClientNeeds {
        if opts.socks.is_some() {
            return ClientNeeds::default();
        }
        ClientNeeds {
            capabilities: vec!["CAP_NET_ADMIN"],
            why: "the tunnel's TUN needs CAP_NET_ADMIN (run jmp attach as root), or add --socks [ADDR:]PORT to reach the subnets through SOCKS5 without privileges".into(),
        }
    }
}

impl Spec for NetSpec {
    fn validate(&self) -> Result<(), InvalidSpec> {
        NetSpec::validate(self).map_err(InvalidSpec)
    }

    fn start(&self, name: &str, ctx: &BuildCtx) -> Arc<dyn crate::Driver> {
        NetSpec::start(self, name, ctx.exporter)
    }

    /// The tunnel: its TUN (/dev/net/tun, CAP_NET_ADMIN), the NAT table (nft over netlink)
    /// and IPv4 forwarding on the TUN and on `via` (/proc/sys, which ProcSubset=pid hides and
    /// ProtectKernelTunables= makes read-only).
    fn sandbox(&self, name: &str) -> Sandbox {
        let mut s = Sandbox::default();
        s.note(format!(
            "{name}: a network tunnel (TUN, nftables NAT, IPv4 forwarding)"
        ));
        s.cap("CAP_NET_ADMIN");
        s.family("AF_NETLINK");
        s.set("DeviceAllow=/dev/net/tun rw".into());
        s.set("ProcSubset=all".into());
        s.set("ReadWritePaths=/proc/sys/net/ipv4/conf".into());
        s
    }
}
