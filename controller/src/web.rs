//! The lab dashboard (`jmp-controller --web ADDR`, off by default): a read-only page of the
//! exporters (labels, online, devices, who holds each and until when), the leases and the
//! queue, and for admins the usage per team over the last 30 days. The page polls
//! `state` every [`POLL_MS`] ms: live without a reload.
//!
//! Who sees what: the page signs in with a client credential (`?token=CREDENTIAL` once, then
//! a `SameSite=Strict`, `HttpOnly` cookie), and every answer is the controller's own answer
//! to that client's calls (`Api::call_as`: `whoami`, `get-exporters`, `get-leases`, `usage`),
//! so a client sees what its policy allows and an admin everything. Only those read-only
//! calls are made. The page itself (`web/src/dashboard.*`) is built into the binary.

use crate::api::Api;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use jmp_protocol::api::{Reply, Request};
use jmp_protocol::usage::{UsageBy, UsageQuery};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// How often the page asks for the lab's state.
pub const POLL_MS: u64 = 2000;
/// The longest credential accepted (a credential is a few hundred bytes).
const MAX_CREDENTIAL: usize = 8 * 1024;
const COOKIE: &str = "jmp-lab";

const PAGE: &str = include_str!("../../web/src/dashboard.html");
const SCRIPT: &str = include_str!("../../web/src/dashboard.js");
const STYLE: &str = include_str!("../../web/src/style.css");

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

fn credential<'a>(headers: &'a HeaderMap, q: &'a TokenQuery) -> Option<&'a str> {
    q.token
        .as_deref()
        .or_else(|| {
            headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().split_once('='))
                .find(|(k, _)| *k == COOKIE)
                .map(|(_, v)| v)
        })
        .filter(|c| !c.is_empty() && c.len() <= MAX_CREDENTIAL)
}

fn refused(why: impl std::fmt::Display) -> Response {
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("jmp-controller: {why}\n"),
    )
        .into_response()
}

/// Who the credential is, or why it is refused.
async fn whoami(api: &Api, credential: &str) -> Result<(String, bool), String> {
    match api.call_as(credential, Request::Whoami).await? {
        Reply::Identity { name, admin, .. } => Ok((name, admin)),
        Reply::Error(e) => Err(e.message),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

async fn page(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
) -> Response {
    let Some(cred) = credential(&headers, &q) else {
        return refused("the lab dashboard needs a client credential: open it once as /?token=CREDENTIAL (the token of your client config)");
    };
    if let Err(why) = whoami(&api, cred).await {
        return refused(format!("credential refused: {why}"));
    }
    let mut r = (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response();
    let h = r.headers_mut();
    h.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'self'; style-src 'self'; frame-ancestors 'none'"),
    );
    if q.token.is_some() {
        if let Ok(v) = HeaderValue::from_str(&format!(
            "{COOKIE}={cred}; Path=/; HttpOnly; SameSite=Strict"
        )) {
            h.insert(header::SET_COOKIE, v);
        }
    }
    r
}

async fn asset(name: &str, headers: &HeaderMap, api: &Api) -> Response {
    let q = TokenQuery { token: None };
    let Some(cred) = credential(headers, &q) else {
        return refused("no credential");
    };
    if let Err(why) = whoami(api, cred).await {
        return refused(format!("credential refused: {why}"));
    }
    let (ty, body) = match name {
        "dashboard.js" => ("text/javascript; charset=utf-8", SCRIPT),
        _ => ("text/css; charset=utf-8", STYLE),
    };
    (
        [
            (header::CONTENT_TYPE, ty),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn script(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    asset("dashboard.js", &headers, &api).await
}

async fn style(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    asset("style.css", &headers, &api).await
}

/// The lab as the credential's client sees it.
async fn state(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    let q = TokenQuery { token: None };
    let Some(cred) = credential(&headers, &q) else {
        return refused("no credential");
    };
    let (name, admin) = match whoami(&api, cred).await {
        Ok(w) => w,
        Err(why) => return refused(format!("credential refused: {why}")),
    };
    let answer = |r: Result<Reply, String>| match r {
        Ok(Reply::Error(e)) => json!({"error": e.message}),
        Ok(r) => serde_json::to_value(&r).unwrap_or(Value::Null),
        Err(e) => json!({"error": e}),
    };
    let exporters = answer(
        api.call_as(cred, Request::GetExporters { selector: None })
            .await,
    );
    let leases = answer(api.call_as(cred, Request::GetLeases { all: admin }).await);
    let now_ms = jmp_transport::unix_now().saturating_mul(1000);
    let usage = if admin {
        answer(
            api.call_as(
                cred,
                Request::Usage(UsageQuery {
                    since: now_ms.saturating_sub(30 * 86_400_000),
                    until: None,
                    by: UsageBy::Team,
                }),
            )
            .await,
        )
    } else {
        Value::Null
    };
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        json!({
            "me": {"name": name, "admin": admin},
            "now": jmp_transport::unix_now(),
            "poll_ms": POLL_MS,
            "exporters": exporters,
            "leases": leases,
            "usage": usage,
        })
        .to_string(),
    )
        .into_response()
}

/// Serves the dashboard on `listener` until the controller ends.
pub async fn serve(listener: tokio::net::TcpListener, api: Arc<Api>) -> std::io::Result<()> {
    let router = Router::new()
        .route("/", get(page))
        .route("/dashboard.js", get(script))
        .route("/style.css", get(style))
        .route("/state", get(state))
        .with_state(api);
    axum::serve(listener, router).await
}
