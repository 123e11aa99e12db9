//! The one place that lists the device kinds: one line per kind in [`registry!`] below, naming
//! the kind's variant, its folder and its [`DeviceKind`] implementation. Every list of kinds
//! in the workspace is generated here from those implementations (the config's `type:` names,
//! drivers, bridges, `jmp attach` options, `jmp` verbs, device requests and their answers,
//! status summaries, the systemd sandbox), so none can drift and nothing else names a kind.
//! A kind's wire module is listed the same way in `jmp_protocol::kinds`.

use crate::kind::{
    BridgeError, BuildCtx, ClientNeeds, DeviceKind, FieldError, InvalidSpec, KindConfig, KindVerb,
    OptionError, Sandbox, Target, VerbError, VerbHost,
};
use crate::{common, Bridge, BridgeCtx, Driver};
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::{DeviceInfo, ErrorCode, Kind, Refusal};
use jmp_transport::{BoxFuture, Channels};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

macro_rules! registry {
    ($($variant:ident => $module:ident::$kind:ident in $path:literal),* $(,)?) => {
        $(#[path = $path] pub mod $module;)*

        /// A device in an exporter config: `type:` picks the kind, and the kind's config its
        /// spec.
        #[derive(Debug, Clone)]
        pub enum DeviceSpec {
            $($variant(<$module::$kind as DeviceKind>::Config),)*
        }

        impl DeviceSpec {
            /// Every `type:` name, with the kind it belongs to and an example table.
            pub fn types() -> Vec<(Kind, &'static str, &'static str)> {
                let mut v = Vec::new();
                $(for (ty, example) in <<$module::$kind as DeviceKind>::Config as KindConfig>::TYPES {
                    v.push((<$module::$kind as DeviceKind>::KIND, *ty, *example));
                })*
                v
            }

            /// Reads a device's table whose `type:` was `ty` (the rest of the table in `v`).
            pub fn from_yaml(ty: &str, v: serde_norway::Value) -> Result<DeviceSpec, FieldError> {
                $(if <<$module::$kind as DeviceKind>::Config as KindConfig>::TYPES.iter().any(|(t, _)| *t == ty) {
                    return Ok(DeviceSpec::$variant(KindConfig::from_yaml(ty, v)?));
                })*
                let known: Vec<&str> = Self::types().iter().map(|(_, t, _)| *t).collect();
                Err(FieldError {
                    path: "type".into(),
                    message: format!(
                        "unknown device type {:?} (known: {})",
                        jmp_protocol::name::escape(ty),
                        known.join(", ")
                    ),
                })
            }

            pub fn kind(&self) -> Kind {
                match self {
                    $(DeviceSpec::$variant(_) => <$module::$kind as DeviceKind>::KIND,)*
                }
            }

            fn config(&self) -> &dyn ConfigDyn {
                match self {
                    $(DeviceSpec::$variant(c) => c,)*
                }
            }
        }

        /// `jmp attach` options: `--forward` for every kind whose bridge listens, and each
        /// kind's own, flattened into the command line.
        #[derive(clap::Args, Debug, Clone, Default)]
        pub struct ClientOptions {
            #[command(flatten)]
            pub forward: common::listen::ForwardArgs,
            $(
                #[command(flatten)]
                pub $module: <$module::$kind as DeviceKind>::Options,
            )*
        }

        impl ClientOptions {
            /// Checks what can be checked before connecting (syntax).
            pub fn parse_check(&self) -> Result<(), OptionError> {
                self.forward.parse()?;
                $(<$module::$kind as DeviceKind>::parse_options(&self.$module)?;)*
                Ok(())
            }

            /// Checks the options against what the exporter offers (a `--forward` naming a
            /// device that does not listen, a CAN option naming no CAN device, ...).
            pub fn check(&self, exporter: &str, devices: &[DeviceInfo]) -> Result<(), OptionError> {
                for name in self.forward.parse()?.keys() {
                    if !devices.iter().any(|d| &d.name == name && listens(&d.kind)) {
                        let kinds: Vec<&str> = Kind::ALL.iter().filter(|k| listens(k)).map(|k| k.as_str()).collect();
                        return Err(OptionError(format!(
                            "--forward names {name:?}, which is not a device of {exporter} that listens on a local port (kinds: {})",
                            kinds.join(", ")
                        )));
                    }
                }
                $(<$module::$kind as DeviceKind>::check_options(&self.$module, exporter, devices)?;)*
                Ok(())
            }
        }

        /// Whether `kind`'s bridge listens on a local address (`--forward` may choose it).
        pub fn listens(kind: &Kind) -> bool {
            match kind {
                $(Kind::$variant => <$module::$kind as DeviceKind>::LISTENS,)*
                Kind::Other(_) => false,
            }
        }

        /// Whether `kind`'s channels carry bulk data (see [`DeviceKind::BULK`]).
        pub fn bulk(kind: &Kind) -> bool {
            match kind {
                $(Kind::$variant => <$module::$kind as DeviceKind>::BULK,)*
                Kind::Other(_) => false,
            }
        }

        /// The kinds' `jmp` verbs (`jmp power`, `jmp serial`, `jmp storage`), flattened into
        /// `jmp`'s commands.
        #[derive(clap::Subcommand, Debug)]
        pub enum Verbs {
            $(
                #[command(flatten)]
                $variant(<$module::$kind as DeviceKind>::Verb),
            )*
        }

        impl Verbs {
            pub fn run(self, host: &dyn VerbHost) -> BoxFuture<'_, Result<(), VerbError>> {
                match self {
                    $(Verbs::$variant(v) => KindVerb::run(v, host),)*
                }
            }
        }

        /// An operation on a device, as the kinds' verbs ask for it (through an attachment's
        /// control socket or on their own connection). On the control socket it is JSON:
        /// `{"kind":"power","request":{"cycle":{"off_ms":500}}}`.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(tag = "kind", content = "request", rename_all = "kebab-case")]
        pub enum DeviceRequest {
            $($variant(<$module::$kind as DeviceKind>::Request),)*
        }

        /// Its typed answer.
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(tag = "kind", content = "response", rename_all = "kebab-case")]
        pub enum DeviceResponse {
            $($variant(<$module::$kind as DeviceKind>::Response),)*
        }

        impl DeviceRequest {
            /// The request that switches the board's power as `action` says (the first kind
            /// that has one), for a verb that must not name the power's kind.
            pub fn power(action: $crate::kind::PowerAction) -> Option<DeviceRequest> {
                $(if let Some(r) = <$module::$kind as DeviceKind>::power(action) {
                    return Some(DeviceRequest::$variant(r));
                })*
                None
            }

            pub fn kind(&self) -> Kind {
                match self {
                    $(DeviceRequest::$variant(_) => <$module::$kind as DeviceKind>::KIND,)*
                }
            }

            /// Performs it over `link`; the answer and one line for people.
            pub async fn run(
                &self,
                link: &dyn Channels,
                device: &str,
            ) -> Result<(DeviceResponse, String), Refusal> {
                match self {
                    $(DeviceRequest::$variant(r) => {
                        let resp = request::<$module::$kind>(link, device, r).await?;
                        let line = <$module::$kind as DeviceKind>::describe(device, r, &resp);
                        Ok((DeviceResponse::$variant(resp), line))
                    })*
                }
            }
        }

        /// The client side of a device, or `None` for a kind this build does not know (it is
        /// listed, not bridged).
        pub async fn bridge(
            info: &DeviceInfo,
            ctx: &BridgeCtx,
            opts: &ClientOptions,
        ) -> Result<Option<Box<dyn Bridge>>, BridgeError> {
            let mut ctx = ctx.clone();
            if listens(&info.kind) {
                ctx.listen = opts.forward.parse()?.get(&info.name).copied();
            }
            match &info.kind {
                $(Kind::$variant => <$module::$kind as DeviceKind>::bridge(info, &ctx, &opts.$module).await.map(Some),)*
                Kind::Other(_) => Ok(None),
            }
        }

        /// What the bridge of `info` needs on this machine (checked before it is made).
        pub fn client_needs(info: &DeviceInfo, opts: &ClientOptions) -> ClientNeeds {
            match &info.kind {
                $(Kind::$variant => <$module::$kind as DeviceKind>::client_needs(info, &opts.$module),)*
                Kind::Other(_) => ClientNeeds::default(),
            }
        }

        /// Every kind's tools for coding agents (`jmp mcp`), fresh for one session: a tool
        /// may keep state between calls (a console's reading position).
        pub fn agent_tools() -> Vec<Box<dyn crate::agent::AgentTool>> {
            let mut v = Vec::new();
            $(v.extend(<$module::$kind as DeviceKind>::agent_tools());)*
            v
        }

        /// A device request's body for the exporter's log (`Cycle { off_ms: None }`), or why
        /// it does not decode.
        pub fn request_text(kind: &Kind, body: &[u8]) -> String {
            match kind {
                $(Kind::$variant => match <<$module::$kind as DeviceKind>::Request as Codec>::decode_exact(body) {
                    Ok(r) => format!("{r:?}"),
                    Err(e) => format!("a request that does not decode ({e})"),
                },)*
                Kind::Other(k) => format!("a request of a kind this build does not know ({})", jmp_protocol::name::escape(k)),
            }
        }

        /// A short state for people (`jmp status`): a console's line settings, a switch's
        /// power.
        pub fn summary(kind: &Kind, params: &[u8]) -> Option<String> {
            match kind {
                $(Kind::$variant => <$module::$kind as DeviceKind>::summary(params),)*
                Kind::Other(_) => None,
            }
        }
    };
}

registry! {
    Serial => serial::Serial in "serial/mod.rs",
    Tcp => tcp::Tcp in "tcp/mod.rs",
    Power => power::Power in "power/mod.rs",
    Network => net::Network in "net/mod.rs",
    Udp => udp::Udp in "udp/mod.rs",
    Can => can::Can in "can/mod.rs",
    Storage => storage::Storage in "storage/mod.rs",
    Usb => usb::Usb in "usb/mod.rs",
}

/// A kind's config seen without its type, for the methods every kind has.
trait ConfigDyn {
    fn validate(&self) -> Result<(), InvalidSpec>;
    fn start(&self, name: &str, ctx: &BuildCtx) -> Arc<dyn Driver>;
    fn sandbox(&self, name: &str) -> Sandbox;
    fn switches_power(&self) -> bool;
}

impl<C: KindConfig> ConfigDyn for C {
    fn validate(&self) -> Result<(), InvalidSpec> {
        KindConfig::validate(self)
    }
    fn start(&self, name: &str, ctx: &BuildCtx) -> Arc<dyn Driver> {
        KindConfig::start(self, name, ctx)
    }
    fn sandbox(&self, name: &str) -> Sandbox {
        KindConfig::sandbox(self, name)
    }
    fn switches_power(&self) -> bool {
        KindConfig::switches_power(self)
    }
}

impl DeviceSpec {
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        self.config().validate()
    }

    /// Starts the device's driver (background tasks need a tokio runtime).
    pub fn start(&self, name: &str, ctx: &BuildCtx) -> Arc<dyn Driver> {
        self.config().start(name, ctx)
    }

    /// What the device needs from the exporter host's sandbox (`jmpd --print-systemd`).
    pub fn sandbox(&self, name: &str) -> Sandbox {
        self.config().sandbox(name)
    }

    /// The device switches the board's power.
    pub fn switches_power(&self) -> bool {
        self.config().switches_power()
    }
}

/// One device request of kind `K` over `link`, its answer decoded.
async fn request<K: DeviceKind>(
    link: &dyn Channels,
    device: &str,
    req: &K::Request,
) -> Result<K::Response, Refusal> {
    let body = link
        .request(device, to_bytes(req), K::REQUEST_TIMEOUT)
        .await?;
    K::Response::decode_exact(&body).map_err(|e| {
        Refusal::new(
            ErrorCode::Protocol,
            format!("{device}: bad answer from the exporter: {e}"),
        )
    })
}

/// What the kinds' request verbs (`jmp power on`, `jmp serial break`) share: the request sent
/// where `target` says, the answer printed as the user asked.
pub async fn run_request(
    host: &dyn VerbHost,
    target: &Target,
    device: Option<String>,
    req: DeviceRequest,
) -> Result<(), VerbError> {
    let (device, response, message) = host.request(target, device, req).await?;
    if target.output == crate::kind::Format::Json {
        let v = serde_json::json!({"device": device, "response": response, "message": message});
        host.print(&format!("{v}\n"))
    } else {
        host.print(&format!("{}\n", jmp_protocol::name::escape(&message)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lists generated here agree with the protocol's: every kind is registered once, in
    /// the protocol's order, and its request's JSON tag is its wire name.
    #[test]
    fn every_wire_kind_is_registered_and_named_alike() {
        let types = DeviceSpec::types();
        for k in Kind::ALL {
            assert!(
                types.iter().any(|(kind, _, _)| kind == k),
                "{k}: no config type"
            );
        }
        for (kind, ty, example) in &types {
            let v: serde_norway::Value = serde_norway::from_str(example)
                .unwrap_or_else(|e| panic!("{ty}: example {example:?}: {e}"));
            let spec = DeviceSpec::from_yaml(ty, v)
                .unwrap_or_else(|e| panic!("{ty}: example {example:?}: {e}"));
            assert_eq!(&spec.kind(), kind, "{ty}");
            spec.validate()
                .unwrap_or_else(|e| panic!("{ty}: example {example:?}: {e}"));
        }
        let mut names: Vec<&str> = types.iter().map(|(_, t, _)| *t).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), types.len(), "a type: name used twice");
    }

    #[test]
    fn every_kind_summarises_its_wire_example() {
        for w in jmp_protocol::kinds::WIRE {
            let params = w.params_example().expect("tested in the protocol crate");
            let s = summary(&w.kind, &params);
            assert!(
                s.as_deref().is_some_and(|s| !s.is_empty()),
                "{}: no summary of its params example",
                w.kind
            );
        }
    }

    #[test]
    fn an_unknown_type_lists_the_known_ones() {
        let e = DeviceSpec::from_yaml("hologram", serde_norway::Value::Null).expect_err("unknown");
        assert_eq!(e.path, "type");
        for (_, ty, _) in DeviceSpec::types() {
            assert!(e.message.contains(ty), "{e}");
        }
    }
}
