//! USB devices: any USB device plugged into the lab host (a debug probe, a board in DFU or
//! fastboot mode, a USB serial or CAN adapter, a disk, a capture dongle) appears on the
//! client as a real local USB device. The kernels do the USB work: `usbip-host` on the
//! exporter, `vhci-hcd` on the client, each speaking USB/IP on one end of a Unix socket pair
//! whose other end jmp carries on a stream channel (`jmp_protocol::kinds::usb`), parsed and
//! checked on the way into each kernel.

pub mod bridge;
pub mod driver;
pub mod pump;
pub mod record;
pub mod spec;
pub mod sysfs;
pub mod uevent;
pub mod vhci;

pub use bridge::UsbBridge;
pub use driver::UsbDriver;
pub use spec::UsbSpec;

use crate::kind::{
    BridgeError, BuildCtx, ClientNeeds, DeviceKind, InvalidSpec, NoOptions, NoRequest, NoVerb,
    Sandbox, Spec,
};
use crate::{BoxFuture, Bridge, BridgeCtx};
use jmp_protocol::codec::Codec;
use jmp_protocol::kinds::usb as wire;
use jmp_protocol::{DeviceInfo, Kind};
use std::sync::Arc;

/// The USB kind.
pub struct Usb;

crate::config_types! {
    /// `type: usb`.
    pub enum UsbConfig {
        Devices(UsbSpec) = "usb" => "{ids: ['0483:3748', '0483:df11'], serial: 066DFF555654725187232837}",
    }
}

impl DeviceKind for Usb {
    const KIND: Kind = Kind::Usb;
    type Config = UsbConfig;
    type Options = NoOptions;
    type Verb = NoVerb;
    type Request = NoRequest;
    type Response = NoRequest;

    fn bridge<'a>(
        info: &'a DeviceInfo,
        ctx: &'a BridgeCtx,
        _opts: &'a NoOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Bridge>, BridgeError>> {
        Box::pin(async move {
            let vhci = Arc::new(vhci::SysVhci::default());
            Ok(Box::new(UsbBridge::new(info, &ctx.dev_dir, vhci)) as Box<dyn Bridge>)
        })
    }

    fn summary(params: &[u8]) -> Option<String> {
        wire::DeviceParams::decode_exact(params)
            .ok()
            .map(|p| p.to_string())
    }

    /// vhci-hcd's attach and detach files are root's (mode 0200), and loading the module
    /// takes CAP_SYS_MODULE.
    fn client_needs(_info: &DeviceInfo, _opts: &NoOptions) -> ClientNeeds {
        let mut capabilities = vec!["CAP_DAC_OVERRIDE"];
        if !vhci::SysVhci::default().loaded() {
            capabilities.push("CAP_SYS_MODULE");
        }
        ClientNeeds {
            capabilities,
            why: "importing USB devices writes vhci-hcd's root-only attach file (and loads vhci-hcd if needed): run jmp attach as root (sudo jmp attach ...); the other devices work without it".into(),
        }
    }
}

impl Spec for UsbSpec {
    fn validate(&self) -> Result<(), InvalidSpec> {
        UsbSpec::validate(self).map_err(InvalidSpec)
    }

    fn start(&self, name: &str, ctx: &BuildCtx) -> Arc<dyn crate::Driver> {
        Arc::new(UsbDriver::start(
            name,
            self,
            Arc::new(sysfs::Sysfs::new("/sys")),
            ctx.state_dir,
        ))
    }

    /// usbip-host's files in sysfs (bind, unbind, match_busid under /sys/bus/usb; each
    /// device's usbip_sockfd under /sys/devices, which ProtectKernelTunables makes read-only)
    /// and the kernel's device events (AF_NETLINK). The module cannot be loaded from inside
    /// the unit (ProtectKernelModules): it is loaded at boot.
    fn sandbox(&self, name: &str) -> Sandbox {
        let mut s = Sandbox::default();
        s.note(format!(
            "{name}: USB devices {} exported through usbip-host (load it at boot: echo usbip-host > /etc/modules-load.d/jmp-usb.conf)",
            self.ids.join(" ")
        ));
        s.family("AF_NETLINK");
        s.set("ReadWritePaths=/sys/bus/usb /sys/devices".into());
        s
    }
}
