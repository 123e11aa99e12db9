//! The controller's QUIC endpoint: accepts connections, reads one call per stream, checks the
//! credential's signature, and hands the call to the core task. Replies flow back on the same
//! stream. Nothing here decides anything; malformed input ends only its own stream.

use crate::cluster::Role;
use crate::core::{Caller, Cmd};
use jmp_protocol::api::{CtlError, CtlErrorCode, Reply, Request};
use jmp_protocol::token::TokenKind;
use jmp_transport::controller::{read_call, ReplyTx};
use jmp_transport::token::{TokenError, Verifier};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, Instrument};

/// How long a caller may take to send its request after opening a stream.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may exist without one call that presented a valid credential.
const AUTH_DEADLINE: Duration = Duration::from_secs(10);
/// Calls read at once on a connection that has not authenticated yet (each may buffer up to
/// `MAX_CALL_FRAME` before its credential can be checked).
const PRE_AUTH_STREAMS: usize = 4;

pub struct Api {
    /// Where calls go: the core while this controller leads (always, with one controller).
    role: tokio::sync::watch::Receiver<Role>,
    /// Keeps `role` open when nobody else holds its sender (one controller).
    _fixed: Option<tokio::sync::watch::Sender<Role>>,
    pub verifier: Verifier,
    /// Seconds after its expiry a credential is still accepted (`--credential-skew`).
    skew: AtomicU64,
    next_stream: AtomicU64,
    gate: Arc<jmp_transport::gate::Gate>,
    /// The lab dashboard's sign-in links (`web-sign-in`), when `--web` serves one.
    web_links: std::sync::OnceLock<Arc<crate::web::SignIns>>,
}

/// One connection's authentication: closed after [`AUTH_DEADLINE`] unless a call on it
/// presents a valid credential; until then few of its streams are read at once.
struct ConnAuth {
    authenticated: tokio::sync::watch::Sender<bool>,
    pre_auth: tokio::sync::Semaphore,
    ticket: std::sync::Mutex<Option<jmp_transport::gate::Ticket>>,
}

impl ConnAuth {
    fn authenticated(&self) {
        self.authenticated.send_replace(true);
        if let Some(t) = self.ticket.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.release();
        }
    }

    fn is_authenticated(&self) -> bool {
        *self.authenticated.borrow()
    }
}

impl Api {
    /// One controller: every call goes to `core`.
    pub fn new(core: mpsc::Sender<Cmd>, verifier: Verifier) -> Arc<Api> {
        let (tx, rx) = tokio::sync::watch::channel(Role::Leader(core));
        Self::build(rx, Some(tx), verifier)
    }

    /// A controller of a cluster: calls go to the core while it leads; otherwise they are
    /// answered with where the leader is (or why there is none).
    pub fn with_role(role: tokio::sync::watch::Receiver<Role>, verifier: Verifier) -> Arc<Api> {
        Self::build(role, None, verifier)
    }

    fn build(
        role: tokio::sync::watch::Receiver<Role>,
        fixed: Option<tokio::sync::watch::Sender<Role>>,
        verifier: Verifier,
    ) -> Arc<Api> {
        Arc::new(Api {
            role,
            _fixed: fixed,
            verifier,
            skew: AtomicU64::new(300),
            next_stream: AtomicU64::new(1),
            gate: jmp_transport::gate::Gate::new(jmp_transport::gate::Limits::default()),
            web_links: std::sync::OnceLock::new(),
        })
    }

    /// `--web` serves a dashboard: `web-sign-in` issues links for it from now on.
    pub fn set_web_links(&self, links: Arc<crate::web::SignIns>) {
        let _ = self.web_links.set(links);
    }

    /// `web-sign-in`: a sign-in link for the dashboard, for a client whose credential is live
    /// (the core checks that it is not revoked, as for any call).
    async fn web_sign_in(&self, caller: &Caller, credential: &str) -> Reply {
        let Some(links) = self.web_links.get() else {
            return Reply::Error(CtlError::new(
                CtlErrorCode::NotFound,
                "this controller serves no lab dashboard (it runs without --web ADDR)",
            ));
        };
        if caller.kind != TokenKind::Client {
            return Reply::Error(CtlError::new(
                CtlErrorCode::Forbidden,
                "only clients sign in to the lab dashboard",
            ));
        }
        match self.call_as(credential, Request::Whoami).await {
            Ok(Reply::Identity { .. }) => {}
            Ok(Reply::Error(e)) => return Reply::Error(e),
            Ok(other) => {
                return Reply::Error(CtlError::new(
                    CtlErrorCode::Internal,
                    format!("unexpected answer {other:?}"),
                ))
            }
            Err(e) => return Reply::Error(CtlError::new(CtlErrorCode::Unavailable, e)),
        }
        match links.issue(&caller.name, credential) {
            Ok((url, expires)) => {
                info!(client = %caller.name, "issued a dashboard sign-in link");
                Reply::SignInLink { url, expires }
            }
            Err(why) => Reply::Error(CtlError::new(CtlErrorCode::Forbidden, why)),
        }
    }

    pub fn set_credential_skew(&self, secs: u64) {
        self.skew.store(secs, Ordering::Relaxed);
    }

    pub async fn serve(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                inc = endpoint.accept() => match inc {
                    Some(i) => {
                        let Some((i, ticket)) = jmp_transport::gate::admit(&self.gate, i) else {
                            continue;
                        };
                        let me = self.clone();
                        let peer = i.remote_address();
                        tokio::spawn(me.connection(i, ticket).instrument(info_span!("conn", %peer)));
                    }
                    None => break,
                },
            }
        }
        endpoint.close(0u32.into(), b"controller shutting down");
        let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    }

    async fn connection(
        self: Arc<Self>,
        incoming: quinn::Incoming,
        ticket: jmp_transport::gate::Ticket,
    ) {
        let peer = incoming.remote_address();
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                info!("handshake from {peer} failed: {e}");
                return;
            }
        };
        let auth = Arc::new(ConnAuth {
            authenticated: tokio::sync::watch::Sender::new(false),
            pre_auth: tokio::sync::Semaphore::new(PRE_AUTH_STREAMS),
            ticket: std::sync::Mutex::new(Some(ticket)),
        });
        // A connection that never authenticates does not live on, and one displaced by newer
        // unauthenticated connections goes at once (see jmp_transport::gate).
        {
            let conn = conn.clone();
            let auth = auth.clone();
            let mut ok = auth.authenticated.subscribe();
            tokio::spawn(async move {
                let deadline = tokio::time::timeout(AUTH_DEADLINE, ok.wait_for(|a| *a));
                let displaced = async {
                    let t = auth
                        .ticket
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .map(|t| t.go_handle());
                    match t {
                        Some(go) => go.notified().await,
                        None => std::future::pending().await,
                    }
                };
                let why: &[u8] = tokio::select! {
                    r = deadline => match r {
                        Ok(Ok(_)) => return,
                        _ => b"no valid credential within 10 s",
                    },
                    _ = displaced => b"displaced by newer connections before it authenticated",
                };
                if !auth.is_authenticated() {
                    conn.close(
                        quinn::VarInt::from_u64(jmp_protocol::ErrorCode::Unauthorized.to_wire())
                            .unwrap_or(quinn::VarInt::from_u32(2)),
                        why,
                    );
                }
            });
        }
        loop {
            match conn.accept_bi().await {
                Ok((send, recv)) => {
                    let me = self.clone();
                    let conn = conn.clone();
                    let auth = auth.clone();
                    tokio::spawn(async move { me.stream(conn, auth, send, recv).await });
                }
                Err(e) => {
                    debug!("connection from {peer} ended: {e}");
                    return;
                }
            }
        }
    }

    fn authenticate(&self, credential: &str) -> Result<Caller, String> {
        if credential.trim().is_empty() {
            return Err("no credential presented".into());
        }
        // One decode: the signature is checked, then the kind.
        let now = jmp_transport::unix_now();
        let c = self
            .verifier
            .verify_any_within(credential, now, self.skew.load(Ordering::Relaxed))
            .map_err(|e| match e {
                TokenError::Expired(ago) => {
                    // Who it was, for the message only (the signature was not the problem
                    // checked here, and nothing is granted on it).
                    let who = jmp_transport::token::peek(credential)
                        .map(|c| format!("{} {:?}", c.kind.as_str(), c.sub))
                        .unwrap_or_else(|_| "this identity".into());
                    format!(
                        "the credential of {who} expired {ago}s ago; jmp and jmpd renew a credential in use before it expires, so this one was not used in time: ask an admin for a new one (jmp admin create client NAME --replace, or jmp admin create exporter NAME)"
                    )
                }
                other => other.to_string(),
            })?;
        if c.kind == TokenKind::Lease {
            return Err("a lease token is not a credential for the controller".into());
        }
        Ok(Caller {
            kind: c.kind,
            name: c.sub,
            jti: c.jti,
        })
    }

    /// One call on behalf of `credential`, answered with its final reply as a QUIC caller
    /// would get it: the lab dashboard's (`crate::web`, read-only calls only), so a page sees
    /// exactly what the credential's own client sees.
    pub async fn call_as(&self, credential: &str, request: Request) -> Result<Reply, String> {
        let caller = self.authenticate(credential)?;
        let core = match self.role.borrow().clone() {
            Role::Leader(core) => core,
            Role::Follower(leader) => {
                return Err(format!(
                    "this controller is not the leader; the leader is {leader}"
                ))
            }
            Role::Electing => return Err("no controller is the leader yet".into()),
            Role::Unavailable(why) => return Err(why),
        };
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (reply, mut replies) = mpsc::unbounded_channel::<Reply>();
        core.send(Cmd::Call {
            caller,
            request,
            reply,
            stream,
        })
        .await
        .map_err(|_| "the controller is shutting down".to_string())?;
        while let Some(r) = replies.recv().await {
            if r.is_final() {
                return Ok(r);
            }
        }
        Err("the controller did not answer".into())
    }

    async fn stream(
        self: Arc<Self>,
        conn: quinn::Connection,
        auth: Arc<ConnAuth>,
        send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let mut tx = ReplyTx(send);
        // Until the connection has authenticated, only a few of its calls are read at once.
        let permit = if auth.is_authenticated() {
            None
        } else {
            match auth.pre_auth.try_acquire() {
                Ok(p) => Some(p),
                Err(_) => {
                    tx.error(
                        CtlErrorCode::Unauthorized,
                        "too many calls before a credential was accepted",
                    )
                    .await;
                    return;
                }
            }
        };
        let call = match tokio::time::timeout(CALL_TIMEOUT, read_call(&mut recv)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                info!("bad call from {}: {e}", conn.remote_address());
                tx.error(CtlErrorCode::Invalid, e.to_string()).await;
                return;
            }
            Err(_) => {
                tx.error(CtlErrorCode::Invalid, "no request within 10s")
                    .await;
                return;
            }
        };
        let caller = match self.authenticate(&call.credential) {
            Ok(c) => {
                auth.authenticated();
                drop(permit);
                c
            }
            Err(why) => {
                info!("refused a call from {}: {why}", conn.remote_address());
                tx.error(
                    CtlErrorCode::Unauthorized,
                    format!("credential refused: {why}"),
                )
                .await;
                return;
            }
        };
        let mut call = call;
        if let Request::Register(reg) = &mut call.request {
            // The registration binds the exporter to a TLS fingerprint (clients pin it and are
            // sent to the address registered with it): only a process holding that identity's
            // key may register it, not just anyone holding the exporter's credential.
            if let Err(why) = Self::check_possession(&conn, &caller.name, reg) {
                info!(exporter = %caller.name, "registration refused from {}: {why}", conn.remote_address());
                tx.error(
                    CtlErrorCode::Unauthorized,
                    format!("registration of exporter {} refused: {why}", caller.name),
                )
                .await;
                return;
            }
            if let Some(seen) = seen_address(&reg.address, conn.remote_address()) {
                debug!(exporter = %caller.name, "listens on {}; clients are sent to {seen}, where its registration came from", reg.address);
                reg.address = seen;
            }
        }
        let register = matches!(call.request, Request::Register(_));
        let create = matches!(call.request, Request::CreateLease(_));
        // Only the leader's core decides anything; another controller says where it is.
        let role = self.role.borrow().clone();
        let core = match role {
            Role::Leader(core) => core,
            Role::Follower(leader) => {
                let msg = format!("this controller is not the leader; the leader is {leader}");
                let _ = tx
                    .finish(&Reply::Error(CtlError::not_leader(Some(leader), msg)))
                    .await;
                return;
            }
            Role::Electing => {
                let msg =
                    "no controller is the leader yet (an election is under way); retry in a moment";
                let _ = tx
                    .finish(&Reply::Error(CtlError::not_leader(None, msg)))
                    .await;
                return;
            }
            Role::Unavailable(why) => {
                tx.error(CtlErrorCode::Unavailable, why).await;
                return;
            }
        };
        // The API keeps the dashboard's links, on the leader (a follower's dashboard could not
        // answer as the client anyway): the core never sees this call.
        if matches!(call.request, Request::WebSignIn) {
            let r = self.web_sign_in(&caller, &call.credential).await;
            let _ = tx.finish(&r).await;
            return;
        }
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (rtx, mut rrx) = mpsc::unbounded_channel::<Reply>();
        if core
            .send(Cmd::Call {
                caller,
                request: call.request,
                reply: rtx,
                stream,
            })
            .await
            .is_err()
        {
            tx.error(CtlErrorCode::Internal, "controller is shutting down")
                .await;
            return;
        }
        // Forward replies until the final one. Meanwhile watch for the caller going away: a
        // waiting lease request or a registration must not outlive its caller unnoticed. An
        // exporter keeps its request side open while it is online, so its end is the signal.
        let stopped = tx.0.stopped();
        let gone = async {
            if register {
                let mut buf = [0u8; 256];
                while let Ok(Some(_)) = recv.read(&mut buf).await {}
            } else {
                // The caller stopped reading (gave up) before its answer.
                let _ = stopped.await;
            }
        };
        tokio::pin!(gone);
        let closed = conn.closed();
        tokio::pin!(closed);
        loop {
            tokio::select! {
                r = rrx.recv() => match r {
                    Some(r) => {
                        let fin = r.is_final();
                        if tx.send(&r).await.is_err() {
                            break;
                        }
                        if fin {
                            let _ = tx.0.finish();
                            if register {
                                break;
                            }
                            if create {
                                Self::confirm(&core, &tx, stream).await;
                            }
                            return;
                        }
                    }
                    None => break,
                },
                _ = &mut gone => break,
                _ = &mut closed => break,
            }
        }
        let _ = core.send(Cmd::Gone { stream }).await;
        let _ = tx.0.finish();
    }

    /// Whether the registration `reg` of exporter `name`, arriving on `conn`, proves that its
    /// sender holds the key of the TLS identity whose fingerprint it registers.
    fn check_possession(
        conn: &quinn::Connection,
        name: &str,
        reg: &mut jmp_protocol::api::Registration,
    ) -> Result<(), String> {
        let proof = reg.proof.as_ref().ok_or(
            "it carries no proof of its TLS identity (a jmpd older than this controller: upgrade it)",
        )?;
        let proven = jmp_transport::possession::check_registration(conn, name, proof)
            .map_err(|e| format!("its proof of its TLS identity does not hold: {e}"))?;
        let claimed: jmp_transport::Fingerprint = reg
            .fingerprint
            .parse()
            .map_err(|e| format!("fingerprint: {e}"))?;
        if claimed != proven {
            return Err(format!(
                "it registers fingerprint {claimed} but proves the key of {proven}"
            ));
        }
        reg.fingerprint = proven.to_string();
        Ok(())
    }

    /// Tells the core whether a lease reply reached its caller: the peer acknowledged the whole
    /// stream, stopped it after reading, or closed its connection on purpose. A lease granted
    /// from the queue to a caller that died meanwhile is otherwise held for nobody.
    async fn confirm(core: &mpsc::Sender<Cmd>, tx: &ReplyTx, stream: u64) {
        use quinn::{ConnectionError, StoppedError};
        let delivered = matches!(
            tokio::time::timeout(Duration::from_secs(20), tx.0.stopped()).await,
            Ok(Ok(_))
                | Ok(Err(StoppedError::ConnectionLost(
                    ConnectionError::ApplicationClosed(_)
                )))
        );
        let cmd = if delivered {
            Cmd::Delivered { stream }
        } else {
            Cmd::Gone { stream }
        };
        let _ = core.send(cmd).await;
    }
}

/// The address clients are sent to for an exporter that listens on all addresses
/// (`0.0.0.0:PORT` or `[::]:PORT`): its port at the address its registration came from. The
/// exporter's own host name is no good (on many hosts it resolves to a loopback address, which
/// on the client's machine is the client itself). `None`: the address names a host, keep it.
fn seen_address(advertised: &str, peer: std::net::SocketAddr) -> Option<String> {
    let a: std::net::SocketAddr = advertised.parse().ok()?;
    if !a.ip().is_unspecified() {
        return None;
    }
    Some(std::net::SocketAddr::new(peer.ip().to_canonical(), a.port()).to_string())
}

#[cfg(test)]
mod seen_address_tests {
    use super::seen_address;

    #[test]
    fn an_exporter_on_all_addresses_is_reached_where_it_registered_from() {
        let peer = "192.0.2.7:40000".parse().unwrap();
        assert_eq!(
            seen_address("0.0.0.0:7700", peer).as_deref(),
            Some("192.0.2.7:7700")
        );
        assert_eq!(
            seen_address("[::]:7701", "[2001:db8::5]:1".parse().unwrap()).as_deref(),
            Some("[2001:db8::5]:7701")
        );
        // A v4 peer on a dual-stack socket shows as ::ffff:a.b.c.d: the address is v4.
        assert_eq!(
            seen_address("[::]:7700", "[::ffff:192.0.2.7]:1".parse().unwrap()).as_deref(),
            Some("192.0.2.7:7700")
        );
        // Named addresses are the exporter's (or its admin's) choice.
        assert_eq!(seen_address("10.1.2.3:7700", peer), None);
        assert_eq!(seen_address("lab-host.example:7700", peer), None);
    }
}
