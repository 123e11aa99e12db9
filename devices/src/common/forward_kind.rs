//! The kind-seam code of a port-forward kind: a kind whose device is a host:port as the
//! exporter sees it, reached through a local port (`LISTENS`), with no options, verb or
//! requests. Such kinds differ only in their types, their bridge and a word in their summary,
//! so their [`DeviceKind`](crate::kind::DeviceKind) and [`Spec`](crate::kind::Spec)
//! implementations are written once here.

/// Implements [`DeviceKind`](crate::kind::DeviceKind) for a port-forward kind's unit struct and
/// [`Spec`](crate::kind::Spec) for its one spec, from the kind folder:
///
/// ```ignore
/// crate::common::forward_kind! {
///     impl DeviceKind for Relay {
///         kind: Kind::Relay,
///         config: RelayConfig,
///         spec: RelaySpec,
///         params: wire::DeviceParams,
///         bridge: bridge::create,
///         summary: "to relay",
///     }
/// }
/// ```
///
/// What must hold: `params` decodes the device parameters and has `host` and `port` fields (the
/// summary reads "`summary` host:port"); `bridge` is an `async fn(&DeviceInfo, &BridgeCtx) ->
/// Result<B, String>` whose error says why the local endpoint could not be made; `spec` has
/// inherent `validate(&self) -> Result<(), String>` and `start(&self, &str) -> Arc<dyn
/// Driver>`.
macro_rules! forward_kind {
    (
        impl DeviceKind for $kind:ty {
            kind: $variant:expr,
            config: $config:ty,
            spec: $spec:ty,
            params: $params:ty,
            bridge: $create:path,
            summary: $summary:literal $(,)?
        }
    ) => {
        impl $crate::kind::DeviceKind for $kind {
            const KIND: jmp_protocol::Kind = $variant;
            const LISTENS: bool = true;
            type Config = $config;
            type Options = $crate::kind::NoOptions;
            type Verb = $crate::kind::NoVerb;
            type Request = $crate::kind::NoRequest;
            type Response = $crate::kind::NoRequest;

            fn bridge<'a>(
                info: &'a jmp_protocol::DeviceInfo,
                ctx: &'a $crate::BridgeCtx,
                _opts: &'a $crate::kind::NoOptions,
            ) -> $crate::BoxFuture<'a, Result<Box<dyn $crate::Bridge>, $crate::kind::BridgeError>>
            {
                Box::pin(async move {
                    let b = $create(info, ctx)
                        .await
                        .map_err($crate::kind::BridgeError::Local)?;
                    Ok(Box::new(b) as Box<dyn $crate::Bridge>)
                })
            }

            fn summary(params: &[u8]) -> Option<String> {
                <$params as jmp_protocol::codec::Codec>::decode_exact(params)
                    .ok()
                    .map(|p| format!(concat!($summary, " {}:{}"), p.host, p.port))
            }
        }

        impl $crate::kind::Spec for $spec {
            fn validate(&self) -> Result<(), $crate::kind::InvalidSpec> {
                <$spec>::validate(self).map_err($crate::kind::InvalidSpec)
            }

            fn start(
                &self,
                name: &str,
                _ctx: &$crate::kind::BuildCtx,
            ) -> std::sync::Arc<dyn $crate::Driver> {
                <$spec>::start(self, name)
            }
        }
    };
}
pub(crate) use forward_kind;
