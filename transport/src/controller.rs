//! Calls on the controller API ([`jmp_protocol::api`]) over a QUIC connection: one call per
//! bidirectional stream, a request frame out, reply frames back.
//!
//! Used by `jmp` and `jmpd` (the calling side, [`call`], and [`Controllers`] for a cluster of
//! controllers whose leader may move) and by the controller (the answering side, [`read_call`]
//! and [`ReplyTx`]).

use crate::identity::Fingerprint;
use jmp_protocol::api::{self, Call, CtlDecodeError, CtlError, CtlErrorCode, Reply};
use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("connection to the controller lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("controller stream failed: {0}")]
    Stream(String),
    #[error("controller sent a bad frame: {0}")]
    Decode(#[from] CtlDecodeError),
    #[error("the controller closed the call without an answer")]
    NoAnswer,
    #[error("{0}")]
    Refused(CtlError),
    /// No controller could be reached (the message names each address and why).
    #[error("{0}")]
    Connect(String),
}

impl CallError {
    /// Whether retrying on a new connection may help (the controller restarting, a network
    /// blip), as opposed to a definite answer.
    pub fn is_transient(&self) -> bool {
        match self {
            CallError::Connection(_)
            | CallError::Stream(_)
            | CallError::NoAnswer
            | CallError::Connect(_) => true,
            CallError::Refused(e) => e.is_transient(),
            CallError::Decode(_) => false,
        }
    }
}

/// The reply side of one call, as the caller reads it.
pub struct ReplyStream {
    recv: quinn::RecvStream,
    buf: Vec<u8>,
    done: bool,
    /// A reply already read ([`Controllers::call`] reads the first to see whether it is a
    /// redirect), returned by the next `next`.
    pending: Option<Reply>,
}

impl ReplyStream {
    /// The next reply; `Reply::Error` is turned into `CallError::Refused`. After a final reply
    /// this returns `Ok(None)`.
    pub async fn next(&mut self) -> Result<Option<Reply>, CallError> {
        if let Some(r) = self.pending.take() {
            return Ok(Some(r));
        }
        if self.done {
            return Ok(None);
        }
        loop {
            if let Some(r) = api::decode::<Reply>(&mut self.buf)? {
                if r.is_final() {
                    self.done = true;
                }
                return match r {
                    Reply::Error(e) => Err(CallError::Refused(e)),
                    r => Ok(Some(r)),
                };
            }
            match self.recv.read_chunk(64 * 1024, true).await {
                Ok(Some(c)) => self.buf.extend_from_slice(&c.bytes),
                Ok(None) => return Err(CallError::NoAnswer),
                Err(quinn::ReadError::ConnectionLost(e)) => return Err(e.into()),
                Err(e) => return Err(CallError::Stream(e.to_string())),
            }
        }
    }

    /// Waits for the final reply, skipping progress.
    pub async fn last(mut self) -> Result<Reply, CallError> {
        loop {
            match self.next().await? {
                Some(r) if r.is_final() => return Ok(r),
                Some(_) => continue,
                None => return Err(CallError::NoAnswer),
            }
        }
    }
}

/// Starts a call. The request side is finished at once unless `keep_open` (a Register stream,
/// whose open request side tells the controller the exporter is still there).
pub async fn call(
    conn: &quinn::Connection,
    call: &Call,
    keep_open: bool,
) -> Result<(ReplyStream, Option<quinn::SendStream>), CallError> {
    let (mut send, recv) = conn.open_bi().await?;
    let mut out = Vec::new();
    api::encode(call, &mut out);
    send.write_all(&out)
        .await
        .map_err(|e| CallError::Stream(e.to_string()))?;
    let send = if keep_open {
        Some(send)
    } else {
        let _ = send.finish();
        None
    };
    Ok((
        ReplyStream {
            recv,
            buf: Vec::new(),
            done: false,
            pending: None,
        },
        send,
    ))
}

/// One call and its final answer.
pub async fn call_once(conn: &quinn::Connection, c: &Call) -> Result<Reply, CallError> {
    call(conn, c, false).await?.0.last().await
}

/// How long a call keeps looking for the leader of a controller cluster: an election after a
/// leader died takes the leader lease's TTL (2 s by default) plus loading the store, and a
/// connection to the dead leader is given up after [`crate::endpoint::CONTROLLER_IDLE_TIMEOUT`].
pub const LEADER_WAIT: Duration = Duration::from_secs(15);
/// Pause before asking again while no leader is elected.
const ELECTION_POLL: Duration = Duration::from_millis(200);
/// How long a controller named as leader may take to answer a handshake before it counts as
/// dead (it may have just been killed) and the others are asked again.
const REDIRECT_CONNECT: Duration = Duration::from_secs(1);

struct Current {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    addr: String,
}

/// The controllers a credential names (one, or the several of a cluster) and a connection to
/// the one that answers calls: the leader. A call that reaches a non-leader is answered with
/// where the leader is ([`CtlErrorCode::NotLeader`]) and repeated there; nothing was done by
/// the non-leader, so repeating is safe. While no leader is elected the call is repeated for up
/// to [`LEADER_WAIT`].
pub struct Controllers {
    endpoints: Vec<String>,
    pin: Fingerprint,
    current: std::sync::Mutex<Option<Current>>,
}

async fn connect_to(addr: &str, pin: Fingerprint) -> Result<Current, String> {
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve controller {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("controller {addr:?} resolves to nothing"))?;
    let ep = crate::client_endpoint(sock).map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    let (conn, _) = crate::connect(&ep, sock, jmp_protocol::ALPN_CONTROLLER, Some(pin))
        .await
        .map_err(|e| format!("controller {addr}: {e}"))?;
    Ok(Current {
        _endpoint: ep,
        conn,
        addr: addr.to_string(),
    })
}

impl Controllers {
    /// `endpoints`: one `host:port` or a comma-separated list ([`api::endpoints`]).
    pub fn new(endpoints: &str, pin: Fingerprint) -> Result<Controllers, String> {
        let endpoints = api::endpoints(endpoints);
        if endpoints.is_empty() {
            return Err("no controller endpoint given".into());
        }
        Ok(Controllers {
            endpoints,
            pin,
            current: std::sync::Mutex::new(None),
        })
    }

    fn cur(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The controller currently connected to (or the list, before any connection).
    pub fn current(&self) -> String {
        match &*self.cur() {
            Some(c) => c.addr.clone(),
            None => self.endpoints.join(","),
        }
    }

    /// The live connection, if any.
    pub fn connection(&self) -> Option<quinn::Connection> {
        self.cur()
            .as_ref()
            .filter(|c| c.conn.close_reason().is_none())
            .map(|c| c.conn.clone())
    }

    /// Connects to one of the controllers: all are tried at once and the first to answer is
    /// kept (a dead one costs nothing but its handshake attempt). Returns its address.
    pub async fn connect(&self) -> Result<String, CallError> {
        let c = if self.endpoints.len() == 1 {
            connect_to(&self.endpoints[0], self.pin)
                .await
                .map_err(CallError::Connect)?
        } else {
            let mut set = tokio::task::JoinSet::new();
            for e in &self.endpoints {
                let (e, pin) = (e.clone(), self.pin);
                set.spawn(async move { connect_to(&e, pin).await });
            }
            let mut errors = Vec::new();
            loop {
                match set.join_next().await {
                    Some(Ok(Ok(c))) => {
                        set.abort_all();
                        break c;
                    }
                    Some(Ok(Err(e))) => errors.push(e),
                    Some(Err(e)) => errors.push(e.to_string()),
                    None => {
                        return Err(CallError::Connect(format!(
                            "no controller answered: {}",
                            errors.join("; ")
                        )))
                    }
                }
            }
        };
        let addr = c.addr.clone();
        *self.cur() = Some(c);
        Ok(addr)
    }

    async fn connect_addr(&self, addr: &str) -> Result<(), CallError> {
        let c = connect_to(addr, self.pin)
            .await
            .map_err(CallError::Connect)?;
        *self.cur() = Some(c);
        Ok(())
    }

    /// Closes the connection (the controller takes a deliberate close after a lease reply as
    /// proof that the reply arrived) and waits briefly until the close has left.
    pub async fn finish(&self) {
        let c = self.cur().take();
        if let Some(c) = c {
            c.conn.close(0u32.into(), b"done");
            let _ = tokio::time::timeout(Duration::from_millis(500), c._endpoint.wait_idle()).await;
        }
    }

    pub fn close(&self) {
        if let Some(c) = self.cur().take() {
            c.conn.close(0u32.into(), b"");
        }
    }

    /// Starts a call on the leader, following redirects. The first reply has been read (to see
    /// whether it was a redirect) and is the first the returned stream gives.
    pub async fn call(
        &self,
        c: &Call,
        keep_open: bool,
    ) -> Result<(ReplyStream, Option<quinn::SendStream>), CallError> {
        self.call_on(|_| Ok(c.clone()), keep_open).await
    }

    /// [`Controllers::call`] with the call made for the connection it goes out on (a call
    /// that proves something about that connection, see [`crate::possession`]); `make`'s
    /// error ends the call.
    pub async fn call_on(
        &self,
        make: impl Fn(&quinn::Connection) -> Result<Call, String>,
        keep_open: bool,
    ) -> Result<(ReplyStream, Option<quinn::SendStream>), CallError> {
        let deadline = Instant::now() + LEADER_WAIT;
        // Where the last non-leader said the leader is.
        let mut redirect: Option<String> = None;
        // A leader we were sent to that did not answer, and when: a killed leader's key
        // outlives it by its lease's TTL, and the others keep naming it until then.
        let mut dead: Option<(String, Instant)> = None;
        let mut retried_stale = false;
        loop {
            let reused = match redirect.take() {
                Some(addr)
                    if dead
                        .as_ref()
                        .is_some_and(|(d, t)| *d == addr && t.elapsed() < REDIRECT_CONNECT) =>
                {
                    // Ask the controller we are connected to again, shortly.
                    tokio::time::sleep(ELECTION_POLL).await;
                    if self.connection().is_none() {
                        self.connect().await?;
                    }
                    false
                }
                Some(addr) => {
                    match tokio::time::timeout(REDIRECT_CONNECT, self.connect_addr(&addr)).await {
                        Ok(Ok(())) => {}
                        failed => {
                            if Instant::now() >= deadline {
                                return Err(match failed {
                                    Ok(Err(e)) => e,
                                    _ => CallError::Connect(format!(
                                        "controller {addr} (named leader) did not answer within {}s",
                                        REDIRECT_CONNECT.as_secs()
                                    )),
                                });
                            }
                            dead = Some((addr, Instant::now()));
                            tokio::time::sleep(ELECTION_POLL).await;
                            if self.connection().is_none() {
                                self.connect().await?;
                            }
                        }
                    }
                    false
                }
                None if self.connection().is_some() => true,
                None => {
                    self.connect().await?;
                    false
                }
            };
            let Some(conn) = self.connection() else {
                return Err(CallError::NoAnswer);
            };
            let here = self.current();
            let c = make(&conn).map_err(CallError::Stream)?;
            let failed = match call(&conn, &c, keep_open).await {
                Ok((mut rs, send)) => match rs.next().await {
                    Ok(Some(r)) => {
                        rs.pending = Some(r);
                        return Ok((rs, send));
                    }
                    Ok(None) => CallError::NoAnswer,
                    Err(e) => e,
                },
                Err(e) => e,
            };
            match failed {
                CallError::Refused(e) if e.code == CtlErrorCode::NotLeader => {
                    if Instant::now() >= deadline {
                        return Err(CallError::Refused(e));
                    }
                    match e.leader.filter(|l| *l != here) {
                        Some(l) => redirect = Some(l),
                        // An election is under way: ask again shortly.
                        None => tokio::time::sleep(ELECTION_POLL).await,
                    }
                }
                // A kept connection that died since its last use: once more on a new one.
                e @ (CallError::Connection(_) | CallError::Stream(_) | CallError::NoAnswer)
                    if reused && !retried_stale =>
                {
                    retried_stale = true;
                    tracing::debug!("controller connection was stale ({e}); reconnecting");
                    self.close();
                }
                e => return Err(e),
            }
        }
    }

    /// One call and its final answer, on the leader.
    pub async fn call_once(&self, c: &Call) -> Result<Reply, CallError> {
        self.call(c, false).await?.0.last().await
    }
}

/// Controller side: reads the request frame of a newly accepted stream (at most
/// [`api::MAX_CALL_FRAME`] bytes: the caller is not authenticated yet).
pub async fn read_call(recv: &mut quinn::RecvStream) -> Result<Call, CallError> {
    let mut buf = Vec::new();
    loop {
        if let Some(c) = api::decode_limited::<Call>(&mut buf, api::MAX_CALL_FRAME)? {
            return Ok(c);
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
            Ok(None) => return Err(CallError::NoAnswer),
            Err(quinn::ReadError::ConnectionLost(e)) => return Err(e.into()),
            Err(e) => return Err(CallError::Stream(e.to_string())),
        }
    }
}

/// Controller side: writes replies on a stream.
pub struct ReplyTx(pub quinn::SendStream);

impl ReplyTx {
    pub async fn send(&mut self, r: &Reply) -> Result<(), CallError> {
        let mut out = Vec::new();
        api::encode(r, &mut out);
        self.0
            .write_all(&out)
            .await
            .map_err(|e| CallError::Stream(e.to_string()))
    }

    /// Sends the final reply and finishes the stream.
    pub async fn finish(mut self, r: &Reply) -> Result<(), CallError> {
        self.send(r).await?;
        let _ = self.0.finish();
        Ok(())
    }

    pub async fn error(self, code: CtlErrorCode, message: impl Into<String>) {
        let _ = self
            .finish(&Reply::Error(CtlError::new(code, message)))
            .await;
    }
}
