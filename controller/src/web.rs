//! The lab dashboard (`jmp-controller --web ADDR`, off by default): a read-only page of the
//! exporters (labels, online, devices, who holds each and until when), the leases and the
//! queue, and for admins the usage per team over the last 30 days. The page polls
//! `state` every [`POLL_MS`] ms: live without a reload.
//!
//! Who sees what: the page signs in with a client credential (`?token=CREDENTIAL` once), which
//! stays on the server: the browser gets a random session id in a `SameSite=Strict`,
//! `HttpOnly` cookie (a cookie goes to every port of the host, and over plain HTTP to anyone on
//! the path, so it must not be the credential), valid [`SESSION_SECS`] and while the
//! credential is. Every answer is the controller's own answer to that client's calls (`Api::call_as`: `whoami`, `get-exporters`, `get-leases`, `usage`),
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
/// How long a sign-in lasts.
pub const SESSION_SECS: u64 = 12 * 3600;
/// Signed-in sessions kept at most (the oldest is dropped first): sign-ins need a valid
/// credential, so this bounds what its holders can make the controller keep.
const MAX_SESSIONS: usize = 1024;

/// The dashboard's state: the API it calls as each signed-in client, and the sign-ins.
pub struct Web {
    api: Arc<Api>,
    sessions: Sessions,
}

/// Signed-in sessions: session id → (credential, expiry in Unix seconds).
#[derive(Default)]
struct Sessions(std::sync::Mutex<std::collections::HashMap<String, (String, u64)>>);

impl Sessions {
    /// A new session for `credential`; `None` if no random id could be had (never a guessable
    /// one).
    fn sign_in(&self, credential: &str) -> Option<String> {
        let mut b = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).ok()?;
        let id = hex::encode(b);
        let now = jmp_transport::unix_now();
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, (_, exp)| *exp > now);
        if m.len() >= MAX_SESSIONS {
            if let Some(oldest) = m
                .iter()
                .min_by_key(|(_, (_, exp))| *exp)
                .map(|(k, _)| k.clone())
            {
                m.remove(&oldest);
            }
        }
        m.insert(id.clone(), (credential.to_string(), now + SESSION_SECS));
        Some(id)
    }

    /// The credential of the request's session cookie, if it is signed in and not expired.
    fn credential(&self, headers: &HeaderMap) -> Option<String> {
        let id = cookie(headers)?;
        let now = jmp_transport::unix_now();
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .find(|(k, _)| same(k, id))
            .and_then(|(_, (cred, exp))| (*exp > now).then(|| cred.clone()))
    }
}

/// Equal without telling by its timing where the first difference is.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

const PAGE: &str = include_str!("../../web/src/dashboard.html");
const SCRIPT: &str = include_str!("../../web/src/dashboard.js");
const STYLE: &str = include_str!("../../web/src/style.css");

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
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
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
) -> Response {
    // A sign-in (`?token=`) makes a session; otherwise the session cookie must be live.
    let given = q
        .token
        .as_deref()
        .filter(|c| !c.is_empty() && c.len() <= MAX_CREDENTIAL);
    let cred = match (given, web.sessions.credential(&headers)) {
        (Some(c), _) => c.to_string(),
        (None, Some(c)) => c,
        (None, None) => return refused("the lab dashboard needs a client credential: open it once as /?token=CREDENTIAL (the token of your client config)"),
    };
    if let Err(why) = whoami(&web.api, &cred).await {
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
    if given.is_some() {
        let Some(id) = web.sessions.sign_in(&cred) else {
            return refused("no random session id could be made; try again");
        };
        if let Ok(v) = HeaderValue::from_str(&format!(
            "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_SECS}"
        )) {
            h.insert(header::SET_COOKIE, v);
        }
    }
    r
}

async fn asset(name: &str, headers: &HeaderMap, web: &Web) -> Response {
    let Some(cred) = web.sessions.credential(headers) else {
        return refused("not signed in");
    };
    if let Err(why) = whoami(&web.api, &cred).await {
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

async fn script(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    asset("dashboard.js", &headers, &web).await
}

async fn style(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    asset("style.css", &headers, &web).await
}

/// The lab as the credential's client sees it.
async fn state(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    let Some(cred) = web.sessions.credential(&headers) else {
        return refused("not signed in");
    };
    let cred = cred.as_str();
    let api = &web.api;
    let (name, admin) = match whoami(api, cred).await {
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
        .with_state(Arc::new(Web {
            api,
            sessions: Default::default(),
        }));
    axum::serve(listener, router).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn a_session_id_stands_for_its_credential_until_it_expires() {
        let web = Sessions::default();
        let id = web.sign_in("CRED").expect("an id");
        assert_ne!(id, "CRED");
        assert_eq!(id.len(), 32);
        let h = with_cookie(&format!("a=b; {COOKIE}={id}"));
        assert_eq!(web.credential(&h).as_deref(), Some("CRED"));
        assert_eq!(
            web.credential(&with_cookie(&format!("{COOKIE}=x{id}"))),
            None
        );
        assert_eq!(
            web.credential(&with_cookie(&format!("{COOKIE}=CRED"))),
            None
        );
        assert_eq!(web.credential(&HeaderMap::new()), None);
        // Expired: gone.
        web.0.lock().unwrap().get_mut(&id).unwrap().1 = 0;
        assert_eq!(web.credential(&h), None);
        // Bounded: the oldest goes first.
        for _ in 0..MAX_SESSIONS + 10 {
            web.sign_in("C").expect("an id");
        }
        assert!(web.0.lock().unwrap().len() <= MAX_SESSIONS);
    }
}
