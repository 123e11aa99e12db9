//! The lab dashboard (`jmp-controller --web ADDR`, off by default): a page of the exporters
//! (labels, online, cleaning, devices, who holds each and until when), the leases, the queue
//! (each waiter's position and its wait so far), and for admins the usage per team over a
//! chosen month, as a chart. The page polls `state` every [`POLL_MS`] ms: live without a
//! reload. Its only action is "release my lease".
//!
//! Sign-in: `jmp web --lab` asks the controller (`web-sign-in`, as its client) for a link
//! `/signin/LINK` that works once and for [`LINK_SECS`] s ([`SignIns`]); opening it gives the
//! browser a random session id in a `SameSite=Strict`, `HttpOnly` cookie (a cookie goes to
//! every port of the host, and over plain HTTP to anyone on the path, so it must not be the
//! credential), valid [`SESSION_SECS`] and while the credential is. The credential itself
//! never reaches the browser, and no person pastes it anywhere.
//!
//! Who sees what: every answer is the controller's own answer to that client's calls
//! (`Api::call_as`: `whoami`, `get-exporters`, `get-leases --all`, `usage`, and
//! `delete-lease` of the viewer's own lease), so a client sees what its policy allows and an
//! admin everything.
//!
//! What a browser may make the controller do is bounded: each signed-in session, and each
//! address for requests without one, has a request budget ([`RequestBudget`], 429 beyond it),
//! links are capped per client and in all, sessions per client ([`MAX_SESSIONS_PER_CLIENT`])
//! and in all.
//!
//! The release needs more than the cookie. A cookie is not isolated by port: any other server
//! on the same host (another local user's, on 127.0.0.1) can collect it from the browser and
//! replay it with curl and a forged `Origin`. So each session has a second secret, handed out
//! once, in the fragment of the redirect that sets the cookie (`/#csrf=...`: a fragment is
//! never sent to a server, nor in a `Referer`), kept by the page in its tab's
//! `sessionStorage` (readable by pages of the dashboard's own origin, port included, only)
//! and sent as the [`CSRF_HEADER`] header with every release; no answer that the cookie
//! alone can get contains it. A release must also come from a page of the dashboard's own
//! origin. A sign-in link is redeemed only by a navigation no other site's page made
//! (`Sec-Fetch-Site`: login CSRF). The page itself (`web/src/dashboard.*`) is built into the
//! binary.

use crate::api::Api;
use axum::extract::{ConnectInfo, Path, Query, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use jmp_protocol::api::{Reply, Request};
use jmp_protocol::usage::{UsageBy, UsageQuery};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use subtle::ConstantTimeEq;

/// How often the page asks for the lab's state.
pub const POLL_MS: u64 = 2000;
const COOKIE: &str = "jmp-lab";
/// How long a sign-in lasts.
pub const SESSION_SECS: u64 = 12 * 3600;
/// Signed-in sessions one client may have (its oldest is dropped first): one client signing
/// in again and again drops only its own sessions, never another client's.
pub const MAX_SESSIONS_PER_CLIENT: usize = 8;
/// Signed-in sessions kept at most. One client fills at most [`MAX_SESSIONS_PER_CLIENT`] of
/// them; when full, the client holding the most loses its oldest.
const MAX_SESSIONS: usize = 1024;
/// The header a release carries the session's second secret in (see the module's doc).
pub const CSRF_HEADER: &str = "x-jmp-csrf";
/// How long a sign-in link works.
pub const LINK_SECS: u64 = 60;
/// Unused sign-in links one client may have at once (a new one beyond is refused until one is
/// used or expires).
pub const MAX_LINKS_PER_CLIENT: usize = 4;
/// Unused sign-in links kept at most, over all clients.
const MAX_LINKS: usize = 4096;
/// Requests one session (or one address, without a session) may make in a burst, and per
/// second after it.
const BURST: f64 = 100.0;
const PER_SEC: f64 = 20.0;
/// Sessions and addresses whose budget is tracked at most (the full buckets are forgotten
/// first: a payer with a full bucket loses nothing by it).
const MAX_PAYERS: usize = 4096 + MAX_SESSIONS;
/// The only content the HTML may load: its own files; no frames of it elsewhere.
const CSP: &str = "default-src 'self'; style-src 'self'; frame-ancestors 'none'";

/// Equal without telling by its timing where the first difference is.
fn same(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

fn random_id() -> Option<String> {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).ok()?;
    Some(hex::encode(b))
}

/// Sign-in links: link id → (client, credential, expiry in Unix seconds). Issued by the API's
/// `web-sign-in` to a client that presented `credential`, redeemed once by the dashboard.
pub struct SignIns {
    /// `http://ADDR/`: where the dashboard is served (what the link starts with).
    base: String,
    links: Mutex<HashMap<String, (String, String, u64)>>,
}

impl SignIns {
    pub fn new(base: String) -> Arc<SignIns> {
        Arc::new(SignIns {
            base,
            links: Mutex::default(),
        })
    }

    /// A new link for `client` (who presented `credential`): its URL and expiry, or why not.
    pub fn issue(&self, client: &str, credential: &str) -> Result<(String, u64), String> {
        let now = jmp_transport::unix_now();
        let mut m = self.links.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, (_, _, exp)| *exp > now);
        let mine = m.values().filter(|(c, _, _)| c == client).count();
        if mine >= MAX_LINKS_PER_CLIENT {
            return Err(format!(
                "client {client} already has {mine} unused sign-in links (at most {MAX_LINKS_PER_CLIENT}); use one or wait {LINK_SECS} s"
            ));
        }
        if m.len() >= MAX_LINKS {
            return Err(
                "too many unused sign-in links on this controller; try again in a minute".into(),
            );
        }
        let id = random_id().ok_or("no random link could be made; try again")?;
        let expires = now + LINK_SECS;
        m.insert(
            id.clone(),
            (client.to_string(), credential.to_string(), expires),
        );
        Ok((format!("{}signin/{id}", self.base), expires))
    }

    /// The credential of link `id`, once: a used, expired or unknown link gives `None`.
    pub(crate) fn redeem(&self, id: &str) -> Option<String> {
        let now = jmp_transport::unix_now();
        let mut m = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let key = m.keys().find(|k| same(k, id))?.clone();
        let (_, cred, exp) = m.remove(&key)?;
        (exp > now).then_some(cred)
    }
}

/// The dashboard's state: the API it calls as each signed-in client, the sign-ins, and the
/// request budgets.
pub struct Web {
    api: Arc<Api>,
    links: Arc<SignIns>,
    sessions: Sessions,
    budget: RequestBudget,
}

/// One signed-in browser: whose, with which credential, until when, and the second secret its
/// releases must carry.
struct Session {
    client: String,
    credential: String,
    expires: u64,
    csrf: String,
    /// The order of the sign-ins (many are made in one second): the oldest goes first.
    made: u64,
}

/// A signed-in session as a request presents it: its id (what its budget is charged to), its
/// credential and its second secret.
struct Signed {
    id: String,
    credential: String,
    csrf: String,
}

/// Signed-in sessions by id, and the number of sign-ins so far.
#[derive(Default)]
struct Sessions(
    Mutex<HashMap<String, Session>>,
    std::sync::atomic::AtomicU64,
);

impl Sessions {
    /// A new session of `client` for `credential`: its id and its second secret; `None` if no
    /// random id could be had (never a guessable one).
    fn sign_in(&self, client: &str, credential: &str) -> Option<(String, String)> {
        let id = random_id()?;
        let csrf = random_id()?;
        let now = jmp_transport::unix_now();
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, s| s.expires > now);
        let oldest_of = |m: &HashMap<String, Session>, who: &str| {
            m.iter()
                .filter(|(_, s)| s.client == who)
                .min_by_key(|(_, s)| s.made)
                .map(|(k, _)| k.clone())
        };
        if m.values().filter(|s| s.client == client).count() >= MAX_SESSIONS_PER_CLIENT {
            if let Some(k) = oldest_of(&m, client) {
                m.remove(&k);
            }
        }
        if m.len() >= MAX_SESSIONS {
            let mut per: HashMap<&str, usize> = HashMap::new();
            for s in m.values() {
                *per.entry(s.client.as_str()).or_default() += 1;
            }
            let most = per
                .into_iter()
                .max_by_key(|(_, n)| *n)
                .map(|(c, _)| c.to_string());
            if let Some(k) = most.and_then(|c| oldest_of(&m, &c)) {
                m.remove(&k);
            }
        }
        m.insert(
            id.clone(),
            Session {
                client: client.to_string(),
                credential: credential.to_string(),
                expires: now + SESSION_SECS,
                csrf: csrf.clone(),
                made: self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            },
        );
        Some((id, csrf))
    }

    /// The request's session (by its cookie), if it is signed in and not expired.
    fn find(&self, headers: &HeaderMap) -> Option<Signed> {
        let id = cookie(headers)?;
        let now = jmp_transport::unix_now();
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .find(|(k, _)| same(k, id))
            .filter(|(_, s)| s.expires > now)
            .map(|(k, s)| Signed {
                id: k.clone(),
                credential: s.credential.clone(),
                csrf: s.csrf.clone(),
            })
    }

    /// The credential of the request's session cookie, if it is signed in and not expired.
    #[cfg(test)]
    fn credential(&self, headers: &HeaderMap) -> Option<String> {
        self.find(headers).map(|s| s.credential)
    }
}

/// Who a request's budget is charged to: its session when it presents one (behind a tunnel or
/// a proxy every viewer has the same address, and one page must not use up everyone's
/// budget), its address otherwise.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Payer {
    Session(String),
    Address(IpAddr),
}

/// A token bucket per [`Payer`]: [`BURST`] requests at once, [`PER_SEC`] a second after
/// that. Every request to the dashboard makes the controller check a credential or a session,
/// so nobody who can reach it may make it do so without bound.
#[derive(Default)]
struct RequestBudget(Mutex<HashMap<Payer, (f64, Instant)>>);

impl RequestBudget {
    /// Whether `who` may make one more request at `now` (and it is counted).
    fn take(&self, who: Payer, now: Instant) -> bool {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !m.contains_key(&who) && m.len() >= MAX_PAYERS {
            // Forget the payers that have been quiet long enough to be full again.
            m.retain(|_, (t, at)| {
                *t + now.saturating_duration_since(*at).as_secs_f64() * PER_SEC < BURST
            });
            if m.len() >= MAX_PAYERS {
                return false;
            }
        }
        let (tokens, at) = m.entry(who).or_insert((BURST, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * PER_SEC).min(BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Sessions {
    /// Who pays for a request from `peer`: its session if it presents a live one (an unknown
    /// or expired cookie is charged to its address, so made-up cookies buy nothing).
    fn payer(&self, headers: &HeaderMap, peer: IpAddr) -> Payer {
        match self.find(headers) {
            Some(s) => Payer::Session(s.id),
            None => Payer::Address(peer.to_canonical()),
        }
    }
}

async fn budget(
    State(web): State<Arc<Web>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: HttpRequest,
    next: Next,
) -> Response {
    let payer = web.sessions.payer(req.headers(), peer.ip());
    if !web.budget.take(payer, Instant::now()) {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::RETRY_AFTER, "1"),
            ],
            "jmp-controller: too many requests from this session or address; slow down\n",
        )
            .into_response();
    }
    next.run(req).await
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

/// Whether the request comes from a page of the dashboard's own origin
/// ([`jmp_protocol::web::same_origin`]).
fn same_origin(headers: &HeaderMap) -> bool {
    let h = |n| headers.get(n).and_then(|v: &HeaderValue| v.to_str().ok());
    jmp_protocol::web::same_origin(h(header::ORIGIN), h(header::HOST))
}

const PAGE: &str = include_str!("../../web/src/dashboard.html");
const SCRIPT: &str = include_str!("../../web/src/dashboard.js");
const STYLE: &str = include_str!("../../web/src/style.css");

fn text(code: StatusCode, why: impl std::fmt::Display) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("jmp-controller: {why}\n"),
    )
        .into_response()
}

fn refused(why: impl std::fmt::Display) -> Response {
    text(StatusCode::FORBIDDEN, why)
}

const SIGN_IN: &str =
    "not signed in: open a sign-in link from `jmp web --lab` (it works once, for a minute)";

/// Who the credential is, or why it is refused.
async fn whoami(api: &Api, credential: &str) -> Result<(String, bool), String> {
    match api.call_as(credential, Request::Whoami).await? {
        Reply::Identity { name, admin, .. } => Ok((name, admin)),
        Reply::Error(e) => Err(e.message),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// The signed-in client's credential and who it is, or the refusal to answer with.
async fn signed_in(web: &Web, headers: &HeaderMap) -> Result<(Signed, String, bool), Response> {
    let s = web.sessions.find(headers).ok_or_else(|| refused(SIGN_IN))?;
    let (name, admin) = whoami(&web.api, &s.credential)
        .await
        .map_err(|why| refused(format!("credential refused: {why}")))?;
    Ok((s, name, admin))
}

async fn page(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    if let Err(r) = signed_in(&web, &headers).await {
        return r;
    }
    let mut r = (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response();
    r.headers_mut()
        .insert("content-security-policy", HeaderValue::from_static(CSP));
    r
}

/// A sign-in link: a session for its client, then the page (the link leaves the address bar).
/// The session's second secret goes in the redirect's fragment, the only time it is told.
async fn sign_in(
    State(web): State<Arc<Web>>,
    Path(link): Path<String>,
    headers: HeaderMap,
) -> Response {
    let site = headers
        .get("sec-fetch-site")
        .map(|v| v.to_str().unwrap_or("?"));
    if !jmp_protocol::web::sign_in_navigation_allowed(site) {
        return refused(format!(
            "a sign-in link opened from another site's page ({}) is refused: paste it in the address bar",
            site.unwrap_or_default()
        ));
    }
    let Some(cred) = web.links.redeem(&link) else {
        return refused("this sign-in link was used already, has expired or is unknown (a link works once, for a minute): run `jmp web --lab` again");
    };
    let name = match whoami(&web.api, &cred).await {
        Ok((name, _)) => name,
        Err(why) => return refused(format!("credential refused: {why}")),
    };
    let Some((id, csrf)) = web.sessions.sign_in(&name, &cred) else {
        return refused("no random session id could be made; try again");
    };
    let mut r = (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, format!("../#csrf={csrf}")),
            (header::CACHE_CONTROL, "no-store".to_string()),
            (header::REFERRER_POLICY, "no-referrer".to_string()),
        ],
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_SECS}"
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn asset(name: &str, headers: &HeaderMap, web: &Web) -> Response {
    if let Err(r) = signed_in(web, headers).await {
        return r;
    }
    let (ty, body) = match name {
        "dashboard.js" => ("text/javascript; charset=utf-8", SCRIPT),
        _ => ("text/css; charset=utf-8", STYLE),
    };
    (
        [
            (header::CONTENT_TYPE, ty),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
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

/// The usage window the page asks for (Unix milliseconds, the chosen month's); absent: the
/// last 30 days.
#[derive(Deserialize)]
struct Window {
    since: Option<u64>,
    until: Option<u64>,
}

/// The lab as the credential's client sees it.
async fn state(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Query(w): Query<Window>,
) -> Response {
    let (session, name, admin) = match signed_in(&web, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let now_ms = jmp_transport::unix_now().saturating_mul(1000);
    let (since, until) = match (w.since, w.until) {
        (None, None) => (now_ms.saturating_sub(30 * 86_400_000), None),
        (Some(s), Some(u)) if s < u => (s, Some(u)),
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                "the usage window needs both since and until (Unix ms), since before until",
            )
        }
    };
    let cred = session.credential.as_str();
    let api = &web.api;
    let answer = |r: Result<Reply, String>| match r {
        Ok(Reply::Error(e)) => json!({"error": e.message}),
        Ok(r) => serde_json::to_value(&r).unwrap_or(Value::Null),
        Err(e) => json!({"error": e}),
    };
    let exporters = answer(
        api.call_as(cred, Request::GetExporters { selector: None })
            .await,
    );
    // Everything the client's policy lets it see (the queue for its boards included), as
    // `jmp get leases --all` shows it.
    let leases = answer(api.call_as(cred, Request::GetLeases { all: true }).await);
    let usage = if admin {
        answer(
            api.call_as(
                cred,
                Request::Usage(UsageQuery {
                    since,
                    until,
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
            "window": {"since": since, "until": until},
        })
        .to_string(),
    )
        .into_response()
}

#[derive(Deserialize)]
struct ReleaseQuery {
    lease: String,
}

/// "Release my lease": only the viewer's own lease (an admin's page releases no one else's),
/// only from a page of this origin, only with the session's second secret.
async fn release(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Query(q): Query<ReleaseQuery>,
) -> Response {
    if !same_origin(&headers) {
        return refused("a release must come from the dashboard's own page");
    }
    let (session, me, _) = match signed_in(&web, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let secret = headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !same(secret, &session.csrf) {
        return refused(format!(
            "a release needs the session's second secret in {CSRF_HEADER}, which only the tab that opened the sign-in link holds (the cookie alone is not enough): release from that tab, or sign in again with `jmp web --lab`"
        ));
    }
    let cred = session.credential;
    let reply = |ok: bool, text: String| {
        let code = if ok {
            StatusCode::OK
        } else {
            StatusCode::FORBIDDEN
        };
        (
            code,
            [(header::CONTENT_TYPE, "application/json")],
            json!({"ok": ok, "text": text}).to_string(),
        )
            .into_response()
    };
    let mine = match web
        .api
        .call_as(&cred, Request::GetLeases { all: false })
        .await
    {
        Ok(Reply::Leases { leases }) => leases.iter().any(|l| l.name == q.lease && l.client == me),
        Ok(Reply::Error(e)) => return reply(false, e.message),
        Ok(other) => return reply(false, format!("unexpected answer {other:?}")),
        Err(e) => return reply(false, e),
    };
    if !mine {
        return reply(
            false,
            format!(
                "{me} holds no lease named {:?}: a page releases only its viewer's own leases",
                q.lease
            ),
        );
    }
    match web
        .api
        .call_as(
            &cred,
            Request::DeleteLease {
                names: vec![q.lease.clone()],
                all: false,
            },
        )
        .await
    {
        Ok(Reply::Deleted { names }) => reply(true, format!("released {}", names.join(", "))),
        Ok(Reply::Error(e)) => reply(false, e.message),
        Ok(other) => reply(false, format!("unexpected answer {other:?}")),
        Err(e) => reply(false, e),
    }
}

/// Serves the dashboard on `listener` until the controller ends; `links` are the sign-in
/// links the API issues for it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    links: Arc<SignIns>,
) -> std::io::Result<()> {
    let web = Arc::new(Web {
        api,
        links,
        sessions: Default::default(),
        budget: Default::default(),
    });
    let router = Router::new()
        .route("/", get(page))
        .route("/signin/{link}", get(sign_in))
        .route("/dashboard.js", get(script))
        .route("/style.css", get(style))
        .route("/state", get(state))
        .route("/release", post(release))
        .layer(axum::middleware::from_fn_with_state(web.clone(), budget))
        .with_state(web);
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
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
        let (id, csrf) = web.sign_in("alice", "CRED").expect("an id");
        assert_ne!(csrf, id);
        assert_eq!(csrf.len(), 32);
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
        // The second secret is the session's, kept with it.
        assert_eq!(web.find(&h).map(|s| s.csrf), Some(csrf));
        // Expired: gone.
        web.0.lock().unwrap().get_mut(&id).unwrap().expires = 0;
        assert_eq!(web.credential(&h), None);
    }

    #[test]
    fn one_client_signing_in_again_and_again_drops_only_its_own_sessions() {
        let web = Sessions::default();
        let (bob, _) = web.sign_in("bob", "CRED-B").expect("an id");
        let bob = with_cookie(&format!("{COOKIE}={bob}"));
        let mallory: Vec<String> = (0..MAX_SESSIONS * 2)
            .map(|_| web.sign_in("mallory", "CRED-M").expect("an id").0)
            .collect();
        assert_eq!(
            web.credential(&bob).as_deref(),
            Some("CRED-B"),
            "bob kept his"
        );
        let count = |who: &str| {
            let m = web.0.lock().unwrap();
            m.values().filter(|s| s.client == who).count()
        };
        assert_eq!(count("mallory"), MAX_SESSIONS_PER_CLIENT);
        // The newest are kept, the oldest dropped.
        let alive = |id: &String| {
            web.credential(&with_cookie(&format!("{COOKIE}={id}")))
                .is_some()
        };
        assert!(mallory
            .iter()
            .rev()
            .take(MAX_SESSIONS_PER_CLIENT)
            .all(alive));
        assert!(!mallory
            .iter()
            .take(mallory.len() - MAX_SESSIONS_PER_CLIENT)
            .any(alive));
        // Full over all clients: the client holding the most loses its oldest, never bob.
        let many = MAX_SESSIONS / MAX_SESSIONS_PER_CLIENT + 5;
        for c in 0..many {
            for _ in 0..MAX_SESSIONS_PER_CLIENT {
                web.sign_in(&format!("c{c}"), "C").expect("an id");
            }
        }
        assert!(web.0.lock().unwrap().len() <= MAX_SESSIONS);
        assert_eq!(
            web.credential(&bob).as_deref(),
            Some("CRED-B"),
            "bob kept his"
        );
    }

    #[test]
    fn a_sign_in_link_works_once_before_it_expires_and_each_client_has_few() {
        let links = SignIns::new("http://127.0.0.1:9/".into());
        let (url, exp) = links.issue("alice", "CRED-A").expect("a link");
        let id = url
            .strip_prefix("http://127.0.0.1:9/signin/")
            .expect("the dashboard's sign-in path");
        assert_eq!(id.len(), 32);
        assert!(!url.contains("CRED"), "{url}");
        assert!(exp > jmp_transport::unix_now() && exp <= jmp_transport::unix_now() + LINK_SECS);
        // A wrong or longer id does nothing (and does not use the link up).
        assert_eq!(links.redeem(&format!("{id}0")), None);
        assert_eq!(links.redeem(""), None);
        assert_eq!(links.redeem(id).as_deref(), Some("CRED-A"));
        // Used: refused.
        assert_eq!(links.redeem(id), None);
        // Expired: refused.
        let (url, _) = links.issue("alice", "CRED-A").expect("a link");
        let id = url.rsplit('/').next().unwrap().to_string();
        links.links.lock().unwrap().get_mut(&id).unwrap().2 = 0;
        assert_eq!(links.redeem(&id), None);
        // At most MAX_LINKS_PER_CLIENT unused links per client; others are not held back.
        for _ in 0..MAX_LINKS_PER_CLIENT {
            links.issue("bob", "CRED-B").expect("a link");
        }
        let e = links.issue("bob", "CRED-B").expect_err("over the budget");
        assert!(
            e.contains("bob") && e.contains("unused sign-in links"),
            "{e}"
        );
        links
            .issue("alice", "CRED-A")
            .expect("another client's link");
    }

    #[test]
    fn each_address_has_a_request_budget_that_refills() {
        let b = RequestBudget::default();
        let t0 = Instant::now();
        let a = Payer::Address("127.0.0.1".parse().unwrap());
        let other = Payer::Address("127.0.0.2".parse().unwrap());
        let burst = (0..1000).take_while(|_| b.take(a.clone(), t0)).count();
        assert_eq!(burst, BURST as usize);
        assert!(!b.take(a.clone(), t0), "an empty bucket refuses");
        assert!(b.take(other, t0), "another address has its own budget");
        // A second later, PER_SEC more.
        let t1 = t0 + std::time::Duration::from_secs(1);
        let refilled = (0..1000).take_while(|_| b.take(a.clone(), t1)).count();
        assert_eq!(refilled, PER_SEC as usize);
    }

    #[test]
    fn a_signed_in_request_is_charged_to_its_session_not_to_the_shared_address() {
        // Behind a tunnel every viewer comes from one address.
        let tunnel: IpAddr = "127.0.0.1".parse().unwrap();
        let sessions = Sessions::default();
        let (alice, _) = sessions.sign_in("alice", "CRED-A").expect("an id");
        let (bob, _) = sessions.sign_in("bob", "CRED-B").expect("an id");
        let alice = with_cookie(&format!("{COOKIE}={alice}"));
        let bob = with_cookie(&format!("{COOKIE}={bob}"));
        let b = RequestBudget::default();
        let t0 = Instant::now();
        let take = |h: &HeaderMap| b.take(sessions.payer(h, tunnel), t0);
        // Alice's page uses up her budget...
        assert_eq!(
            (0..1000).take_while(|_| take(&alice)).count(),
            BURST as usize
        );
        assert!(!take(&alice));
        // ...and neither bob's nor the address's unauthenticated one.
        assert!(take(&bob));
        assert!(take(&HeaderMap::new()));
        // A made-up or unknown cookie is charged to the address: it buys nothing.
        let anon = (0..1000)
            .take_while(|i| take(&with_cookie(&format!("{COOKIE}={i:032x}"))))
            .count();
        assert_eq!(anon, BURST as usize - 1);
        assert!(!take(&HeaderMap::new()));
        assert!(take(&bob), "the address's budget is not bob's");
        // An IPv4-mapped IPv6 address is the same payer as the IPv4 one.
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(
            sessions.payer(&HeaderMap::new(), mapped),
            Payer::Address(tunnel)
        );
    }

    #[test]
    fn only_a_page_of_the_dashboards_own_origin_may_release() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_static(v));
            }
            h
        };
        assert!(same_origin(&h(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080")
        ])));
        for bad in [
            h(&[
                ("host", "127.0.0.1:8080"),
                ("origin", "http://evil.example"),
            ]),
            h(&[("host", "127.0.0.1:8080"), ("origin", "null")]),
            h(&[("host", "127.0.0.1:8080")]),
        ] {
            assert!(!same_origin(&bad), "{bad:?}");
        }
    }
}
