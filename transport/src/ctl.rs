//! Calls on the controller API ([`jmp_protocol::ctl`]) over a QUIC connection: one call per
//! bidirectional stream, a request frame out, reply frames back.
//!
//! Used by `jmp` and `jmpd` (the calling side, [`call`]) and by the controller (the answering
//! side, [`read_call`] and [`ReplyTx`]).

use jmp_protocol::ctl::{self, Call, CtlDecodeError, CtlError, CtlErrorCode, Reply};

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
}

impl CallError {
    /// Whether retrying on a new connection may help (the controller restarting, a network
    /// blip), as opposed to a definite answer.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CallError::Connection(_) | CallError::Stream(_) | CallError::NoAnswer
        )
    }
}

/// The reply side of one call, as the caller reads it.
pub struct ReplyStream {
    recv: quinn::RecvStream,
    buf: Vec<u8>,
    done: bool,
}

impl ReplyStream {
    /// The next reply; `Reply::Error` is turned into `CallError::Refused`. After a final reply
    /// this returns `Ok(None)`.
    pub async fn next(&mut self) -> Result<Option<Reply>, CallError> {
        if self.done {
            return Ok(None);
        }
        loop {
            if let Some(r) = ctl::decode::<Reply>(&mut self.buf)? {
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
    ctl::encode(call, &mut out);
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
        },
        send,
    ))
}

/// One call and its final answer.
pub async fn call_once(conn: &quinn::Connection, c: &Call) -> Result<Reply, CallError> {
    call(conn, c, false).await?.0.last().await
}

/// Controller side: reads the request frame of a newly accepted stream (at most
/// [`ctl::MAX_CALL_FRAME`] bytes: the caller is not authenticated yet).
pub async fn read_call(recv: &mut quinn::RecvStream) -> Result<Call, CallError> {
    let mut buf = Vec::new();
    loop {
        if let Some(c) = ctl::decode_limited::<Call>(&mut buf, ctl::MAX_CALL_FRAME)? {
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
        ctl::encode(r, &mut out);
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
