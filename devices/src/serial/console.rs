//! `jmp console`: a terminal on the board's console for people who do not want to configure
//! picocom, and a script typist for bootloaders (`--send`).
//!
//! - **Escape commands** (as ssh and conmux): the escape character (`~` by default) at the
//!   start of a line, then `.` quit, `p` power cycle, `o` power on, `f` power off, `b` break,
//!   `r` start or stop a recording, `d` show the board's devices and their local endpoints (as
//!   `jmp status`), `?` help, the escape character again for itself. A control character as escape (`--escape '^]'`) works anywhere in a line,
//!   since nobody types it as text.
//! - **Pacing** is done by the exporter (`OpenParams.pacing`), between its writes to the port:
//!   pauses made here would be squeezed together again by the network and the exporter's
//!   scheduling, and a slow bootloader loses whatever arrives in a burst.
//! - **Recording** is an asciicast v2 file: every line a JSON value, output (`"o"`), markers
//!   (`"m"`) and, only with `--record-input`, what was typed (`"i"`), seconds since the start;
//!   `asciinema play` replays it. The file is created new and private (0600). The board's
//!   output is timed by the exporter (a timed channel: each chunk with when jmpd read it from
//!   the board), so a replayed boot log keeps its rhythm and the network's bunching does not
//!   show; times count from the first exporter time recorded. What happens here (typing,
//!   markers) is placed on that clock from the latest output's time.

use crate::kind::{PowerAction, Target, VerbChannel, VerbError, VerbHost, VerbStream};
use crate::registry::{DeviceRequest, DeviceResponse};
use crate::BoxFuture;
use bytes::{Bytes, BytesMut};
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::exit as code;
use jmp_protocol::kinds::serial::{
    OpenParams, OpenedParams, Pacing, Request, TimedDecoder, MAX_CHAR_DELAY_US,
    MAX_LINE_DELAY_US,
};
use jmp_protocol::Kind;
use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Largest script `--send` types (a bootloader script, not an image).
pub const MAX_SEND: u64 = 16 * 1024 * 1024;
/// How long a break the break key sends.
const BREAK_MS: u32 = 250;

#[derive(clap::Args, Debug)]
pub struct ConsoleArgs {
    /// The serial device (default: the only one).
    pub device: Option<String>,
    /// The escape character: one character, or `^X` for a control character (`^]`).
    #[arg(long, default_value = "~", value_parser = parse_escape)]
    pub escape: u8,
    /// Pause the exporter makes after each character it writes to the port (e.g. 2ms), for a
    /// bootloader that reads slowly.
    #[arg(long, value_parser = parse_char_delay)]
    pub char_delay: Option<Duration>,
    /// Further pause after each line end (e.g. 50ms), for a prompt that needs time per command.
    #[arg(long, value_parser = parse_line_delay)]
    pub line_delay: Option<Duration>,
    /// Type FILE (`-`: standard input) with pacing and exit once the exporter has written all
    /// of it to the port (showing what the board prints meanwhile); no terminal is needed.
    #[arg(long, value_name = "FILE")]
    pub send: Option<PathBuf>,
    /// Write the session to FILE as an asciicast v2 recording (what the board printed, at the
    /// times the exporter read it). The file is created new, readable by you alone (0600); an
    /// existing FILE is never written over.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Also record what was typed. Off by default: the board's echo already records visible
    /// typing, and what it does not echo (a password at a login prompt) must not end up in a
    /// file that is attached to bug reports or uploaded as a CI artifact.
    #[arg(long)]
    pub record_input: bool,
    /// Prefix each line on screen with the time it started (UTC, HH:MM:SS.mmm).
    #[arg(long)]
    pub timestamps: bool,
    #[command(flatten)]
    pub target: Target,
}

fn parse_escape(s: &str) -> Result<u8, String> {
    let b = s.as_bytes();
    match b {
        [c] if c.is_ascii() && *c != b'\r' && *c != b'\n' => Ok(*c),
        [b'^', c] if (b'@'..=b'_').contains(&c.to_ascii_uppercase()) => {
            Ok(c.to_ascii_uppercase() - b'@')
        }
        _ => Err(format!(
            "{s:?} is not one ASCII character or ^X (examples: ~, ^])"
        )),
    }
}

fn parse_delay(s: &str, max_us: u32, what: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?}: {e} (examples: 2ms, 500us)"))?;
    if d.as_micros() > u128::from(max_us) {
        return Err(format!(
            "{s:?} is longer than the {} the exporter allows {what}",
            humantime::format_duration(Duration::from_micros(max_us.into()))
        ));
    }
    Ok(d)
}

pub(crate) fn parse_char_delay(s: &str) -> Result<Duration, String> {
    parse_delay(s, MAX_CHAR_DELAY_US, "per character")
}

pub(crate) fn parse_line_delay(s: &str) -> Result<Duration, String> {
    parse_delay(s, MAX_LINE_DELAY_US, "per line")
}

/// The pacing asked for by `--char-delay`/`--line-delay`, `None` to leave the device's own
/// (the exporter config's `txDelay`/`lineDelay`).
pub(crate) fn pacing_of(char_delay: Option<Duration>, line_delay: Option<Duration>) -> Option<Pacing> {
    if char_delay.is_none() && line_delay.is_none() {
        return None;
    }
    // Both were checked against the protocol's maxima when parsed, so they fit in u32.
    let us = |d: Option<Duration>| d.map_or(0, |d| d.as_micros() as u32);
    Some(Pacing {
        char_us: us(char_delay),
        line_us: us(line_delay),
    })
}

impl ConsoleArgs {
    /// The pacing asked for, `None` to leave the device's own.
    fn pacing(&self) -> Option<Pacing> {
        pacing_of(self.char_delay, self.line_delay)
    }
}

// ---------------------------------------------------------------------------------------------
// Escape commands

/// What a keystroke (or a run of them) asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Bytes for the board.
    Send(Vec<u8>),
    Quit,
    Power(PowerAction),
    Break,
    /// Start a recording, or stop the one running.
    Record,
    /// Show the board's devices and where they are on this machine.
    Devices,
    Help,
}

/// Recognises escape commands in what is typed. Pure: bytes in, actions out.
#[derive(Debug, Clone)]
pub struct Escapes {
    escape: u8,
    /// Nothing but line ends typed since the last line end (or since the start).
    line_start: bool,
    /// The escape character was just typed where it counts.
    pending: bool,
}

impl Escapes {
    pub fn new(escape: u8) -> Escapes {
        Escapes {
            escape,
            line_start: true,
            pending: false,
        }
    }

    /// Whether the escape character counts here: a printable one only at the start of a line
    /// (so `~` inside a command is typed), a control character anywhere.
    fn counts(&self) -> bool {
        self.line_start || self.escape.is_ascii_control()
    }

    pub fn feed(&mut self, data: &[u8]) -> Vec<Action> {
        let mut out = Vec::new();
        let mut send = Vec::new();
        let flush = |send: &mut Vec<u8>, out: &mut Vec<Action>| {
            if !send.is_empty() {
                out.push(Action::Send(std::mem::take(send)));
            }
        };
        for &b in data {
            if self.pending {
                self.pending = false;
                let action = match b {
                    b'.' => Some(Action::Quit),
                    b'p' | b'P' => Some(Action::Power(PowerAction::Cycle)),
                    b'o' | b'O' => Some(Action::Power(PowerAction::On)),
                    b'f' | b'F' => Some(Action::Power(PowerAction::Off)),
                    b'b' | b'B' => Some(Action::Break),
                    b'r' | b'R' => Some(Action::Record),
                    b'd' | b'D' => Some(Action::Devices),
                    b'?' => Some(Action::Help),
                    _ => None,
                };
                if let Some(a) = action {
                    flush(&mut send, &mut out);
                    out.push(a);
                    // The line is still at its start: nothing was typed into it.
                    continue;
                }
                // Anything else goes out as typed, the escape first unless it was doubled.
                if b != self.escape {
                    send.push(self.escape);
                }
                send.push(b);
                self.line_start = b == b'\r' || b == b'\n';
                continue;
            }
            if b == self.escape && self.counts() {
                self.pending = true;
                continue;
            }
            send.push(b);
            self.line_start = b == b'\r' || b == b'\n';
        }
        flush(&mut send, &mut out);
        out
    }
}

fn escape_name(e: u8) -> String {
    if e.is_ascii_control() {
        format!("^{}", char::from(e + b'@'))
    } else {
        char::from(e).to_string()
    }
}

fn help(escape: u8) -> String {
    let e = escape_name(escape);
    let at = if escape.is_ascii_control() {
        "anywhere"
    } else {
        "at the start of a line"
    };
    format!(
        "\r\n[jmp console: escape {e} {at}, then:\r\n  {e}.  quit\r\n  {e}p  power cycle the board\r\n  {e}o  power on\r\n  {e}f  power off\r\n  {e}b  send a break\r\n  {e}r  start or stop recording\r\n  {e}d  show the board's devices\r\n  {e}?  this help\r\n  {e}{e}  send {e} itself]\r\n"
    )
}

/// The devices key's answer for a raw terminal: framed like the console's other messages,
/// every line end a CR LF, control characters from the far side escaped.
fn devices_text(text: &str) -> String {
    let mut out = String::from("\r\n[jmp console: devices]\r\n");
    for line in text.lines() {
        out.push_str(&jmp_protocol::name::escape(line));
        out.push_str("\r\n");
    }
    out.push_str("[jmp console: end of devices]\r\n");
    out
}

// ---------------------------------------------------------------------------------------------
// Recording and timestamps

/// Turns byte chunks into text without breaking a character split across chunks (JSON
/// strings must be UTF-8; invalid bytes become U+FFFD).
#[derive(Debug, Default)]
pub struct Utf8Carry(Vec<u8>);

impl Utf8Carry {
    pub fn take(&mut self, data: &[u8]) -> String {
        let mut buf = std::mem::take(&mut self.0);
        buf.extend_from_slice(data);
        let mut out = String::new();
        let mut rest: &[u8] = &buf;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    break;
                }
                Err(e) => {
                    let (ok, bad) = rest.split_at(e.valid_up_to());
                    // SAFETY-free: `ok` is valid UTF-8 by the error's own account.
                    out.push_str(std::str::from_utf8(ok).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{fffd}');
                            rest = &bad[n..];
                        }
                        None => {
                            // An incomplete character at the end: keep it for the next chunk.
                            self.0 = bad.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        out
    }
}

/// An asciicast v2 recording being written.
pub struct Recorder {
    file: std::io::BufWriter<std::fs::File>,
    start: Instant,
    last: f64,
    /// The first exporter time recorded (µs): the recording's zero.
    origin: Option<u64>,
    /// The latest exporter time recorded, and when its output arrived here.
    anchor: Option<(u64, Instant)>,
    out: Utf8Carry,
    inp: Utf8Carry,
    /// Whether what was typed is recorded (`--record-input`).
    input: bool,
}

/// Creates a recording's file: new (never an existing file or a symlink planted at the name:
/// `O_CREAT|O_EXCL`), and readable by its owner alone from the first byte, since a session
/// can show secrets the board prints.
pub fn create_private(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::AlreadyExists {
                " (a recording never writes over an existing file)"
            } else {
                ""
            };
            std::io::Error::new(e.kind(), format!("{}: {e}{hint}", path.display()))
        })
}

impl Recorder {
    /// Creates `path` (see [`create_private`]) and writes the header. `input`: also record
    /// what is typed.
    pub fn create(
        path: &std::path::Path,
        size: (u16, u16),
        title: &str,
        input: bool,
    ) -> std::io::Result<Recorder> {
        let file = create_private(path)?;
        let mut r = Recorder {
            file: std::io::BufWriter::new(file),
            start: Instant::now(),
            last: 0.0,
            origin: None,
            anchor: None,
            out: Utf8Carry::default(),
            inp: Utf8Carry::default(),
            input,
        };
        let header = serde_json::json!({
            "version": 2,
            "width": size.0,
            "height": size.1,
            "timestamp": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "title": title,
            "env": {"TERM": std::env::var("TERM").unwrap_or_default()},
        });
        writeln!(r.file, "{header}")?;
        r.file.flush()?;
        Ok(r)
    }

    /// Seconds since the recording's zero for output the exporter read at `exporter_us` (`None`:
    /// an exporter without timed channels, so when it arrived here), or for something that
    /// happens here now; never less than the previous event's (the format wants them in order).
    fn time(&mut self, exporter_us: Option<u64>) -> f64 {
        let t = match (exporter_us, self.origin, self.anchor) {
            (Some(us), _, _) => {
                let origin = *self.origin.get_or_insert(us);
                self.anchor = Some((us, Instant::now()));
                us.saturating_sub(origin) as f64 / 1e6
            }
            // Here and now: the latest output's exporter time, plus what passed here since.
            (None, Some(origin), Some((us, at))) => {
                us.saturating_sub(origin) as f64 / 1e6 + at.elapsed().as_secs_f64()
            }
            _ => self.start.elapsed().as_secs_f64(),
        };
        let t = t.max(self.last);
        self.last = t;
        t
    }

    fn event(&mut self, kind: &str, text: &str, exporter_us: Option<u64>) -> std::io::Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let t = self.time(exporter_us);
        let line = serde_json::json!([(t * 1e6).round() / 1e6, kind, text]);
        writeln!(self.file, "{line}")?;
        // Flushed at once: a session that ends badly still leaves its record.
        self.file.flush()
    }

    /// What the board printed, and when the exporter read it (µs on its clock; `None`: not
    /// known, so now).
    pub fn output(&mut self, data: &[u8], exporter_us: Option<u64>) -> std::io::Result<()> {
        let s = self.out.take(data);
        self.event("o", &s, exporter_us)
    }

    /// What was sent to the board (nothing unless the recording was created to hold input).
    pub fn input(&mut self, data: &[u8]) -> std::io::Result<()> {
        if !self.input {
            return Ok(());
        }
        let s = self.inp.take(data);
        self.event("i", &s, None)
    }

    /// A marker (an escape command: a power cycle, a break).
    pub fn marker(&mut self, label: &str) -> std::io::Result<()> {
        self.event("m", label, None)
    }
}

/// Prefixes each output line with the wall-clock time its first byte arrived.
#[derive(Debug)]
pub struct Stamper {
    line_start: bool,
}

impl Default for Stamper {
    fn default() -> Self {
        Stamper { line_start: true }
    }
}

impl Stamper {
    pub fn stamp(&mut self, data: &[u8], now: SystemTime) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + 16);
        for &b in data {
            if self.line_start && b != b'\r' && b != b'\n' {
                out.extend_from_slice(clock(now).as_bytes());
                self.line_start = false;
            }
            out.push(b);
            if b == b'\n' {
                self.line_start = true;
            }
        }
        out
    }
}

/// `[HH:MM:SS.mmm] ` in UTC.
fn clock(now: SystemTime) -> String {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let s = d.as_secs() % 86_400;
    format!(
        "[{:02}:{:02}:{:02}.{:03}] ",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

// ---------------------------------------------------------------------------------------------
// The terminal

/// Standard input in raw mode and non-blocking; both undone on drop, which every way out of
/// the console passes through (return, error, a signal turned into a return, a panic's unwind).
struct Terminal {
    saved: Option<nix::sys::termios::Termios>,
    saved_flags: Option<libc::c_int>,
}

impl Terminal {
    fn raw(raw: bool) -> std::io::Result<Terminal> {
        use nix::sys::termios;
        let stdin = std::io::stdin();
        let mut t = Terminal {
            saved: None,
            saved_flags: None,
        };
        if raw {
            let saved = termios::tcgetattr(stdin.as_fd()).map_err(std::io::Error::from)?;
            let mut r = saved.clone();
            termios::cfmakeraw(&mut r);
            termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSAFLUSH, &r)
                .map_err(std::io::Error::from)?;
            t.saved = Some(saved);
        }
        // SAFETY: fcntl on standard input, which stays open for the life of the process.
        let flags = unsafe { libc::fcntl(0, libc::F_GETFL) };
        if flags >= 0 {
            // The file status flags belong to the open file description, shared with the
            // shell: restored on drop so the shell does not find its terminal non-blocking.
            unsafe { libc::fcntl(0, libc::F_SETFL, flags | libc::O_NONBLOCK) };
            t.saved_flags = Some(flags);
        }
        Ok(t)
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Some(f) = self.saved_flags {
            // SAFETY: as above.
            unsafe { libc::fcntl(0, libc::F_SETFL, f) };
        }
        if let Some(s) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin().as_fd(),
                nix::sys::termios::SetArg::TCSADRAIN,
                s,
            );
        }
    }
}

fn window_size() -> (u16, u16) {
    // SAFETY: TIOCGWINSZ fills a winsize; on failure it is left zeroed.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 && ws.ws_row > 0 {
        (ws.ws_col, ws.ws_row)
    } else {
        (80, 24)
    }
}

fn stdin_fd() -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: dup returns a new descriptor we own, or -1 (checked).
    let fd = unsafe { libc::dup(std::io::stdin().as_raw_fd()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    crate::async_fd(fd)
}

fn show(data: &[u8]) -> Result<(), VerbError> {
    let mut o = std::io::stdout().lock();
    o.write_all(data)
        .and_then(|_| o.flush())
        .map_err(|e| VerbError::new(code::FAILURE, format!("cannot write to the terminal: {e}")))
}

// ---------------------------------------------------------------------------------------------
// The channel

/// The sending half of the console's channel, however it is carried.
enum Tx {
    Pipe(jmp_transport::PipeTx),
    Socket(tokio::net::unix::OwnedWriteHalf),
}

/// The receiving half.
enum Rx {
    Pipe(jmp_transport::PipeRx),
    Socket(tokio::net::unix::OwnedReadHalf),
}

impl Tx {
    async fn send(&mut self, data: &[u8]) -> Result<(), String> {
        match self {
            Tx::Pipe(tx) => tx
                .send(Bytes::copy_from_slice(data))
                .await
                .map_err(|e| e.to_string()),
            Tx::Socket(w) => {
                use tokio::io::AsyncWriteExt;
                w.write_all(data).await.map_err(|e| e.to_string())
            }
        }
    }

    async fn finish(&mut self) {
        match self {
            Tx::Pipe(tx) => {
                let _ = tx.finish();
            }
            Tx::Socket(w) => {
                use tokio::io::AsyncWriteExt;
                let _ = w.shutdown().await;
            }
        }
    }
}

impl Rx {
    /// The board's next output; `Ok(None)` when the exporter ended the channel.
    async fn recv(&mut self) -> Result<Option<Bytes>, String> {
        match self {
            Rx::Pipe(rx) => rx.recv().await.map_err(|e| e.to_string()),
            Rx::Socket(r) => {
                use tokio::io::AsyncReadExt;
                let mut b = BytesMut::with_capacity(16 * 1024);
                match r.read_buf(&mut b).await {
                    Ok(0) => Ok(None),
                    Ok(_) => Ok(Some(b.freeze())),
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    }
}

struct Opened {
    device: String,
    title: String,
    tx: Tx,
    rx: Rx,
    /// The output comes as timed frames (the exporter knows them).
    timed: Option<TimedDecoder>,
    close: Option<Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>>,
}

/// Output as it came: chunks, each with the exporter's time when the channel is timed.
type Chunks = Vec<(Bytes, Option<u64>)>;

/// The board's next output (an [`Opened`]'s `rx` and `timed`, borrowed apart from its `tx`);
/// `Ok(None)` when the exporter ended the channel. A timed stream that breaks its rules ends
/// the console with the reason.
async fn recv_chunks(rx: &mut Rx, timed: &mut Option<TimedDecoder>) -> Result<Option<Chunks>, String> {
    loop {
        let Some(b) = rx.recv().await? else {
            return match timed.as_ref().map_or(0, |d| d.pending()) {
                0 => Ok(None),
                n => Err(format!("the exporter ended the channel inside a frame ({n} bytes of it)")),
            };
        };
        let Some(d) = timed.as_mut() else {
            return Ok(Some(vec![(b, None)]));
        };
        let chunks = d.feed(&b).map_err(|e| e.to_string())?;
        if !chunks.is_empty() {
            return Ok(Some(
                chunks.into_iter().map(|c| (c.data, Some(c.time_us))).collect(),
            ));
        }
    }
}

/// Whether a refusal is an exporter's that does not know timed channels: it names the open
/// option it cannot parse, or (after a pacing option it knows) the byte it did not expect.
fn refuses_timed(e: &VerbError) -> bool {
    e.message.contains("bad open parameters")
        && (e.message.contains("open option") || e.message.contains("trailing bytes"))
}

/// Opens the console's channel, timed: the recording (and only it) needs the exporter's
/// times, and asking costs an exporter that knows them nothing. One that does not gets a plain
/// open after its refusal.
async fn open(
    host: &dyn VerbHost,
    args: &ConsoleArgs,
    resume_from: Option<u64>,
) -> Result<Opened, VerbError> {
    let ask = |timed: bool| {
        to_bytes(&OpenParams {
            resume_from,
            pacing: args.pacing(),
            timed,
        })
    };
    let channel = match host
        .channel_with(&args.target, Kind::Serial, args.device.clone(), ask(true))
        .await
    {
        Err(e) if refuses_timed(&e) => {
            tracing::info!("the exporter does not time console output; recordings use the times it arrives here");
            host.channel_with(&args.target, Kind::Serial, args.device.clone(), ask(false))
                .await?
        }
        r => r?,
    };
    let opened = OpenedParams::decode_exact(&channel.params).map_err(|e| {
        VerbError::new(
            code::FAILURE,
            format!("{}: bad answer from the exporter: {e}", channel.origin.device),
        )
    })?;
    let VerbChannel {
        origin,
        stream,
        close,
        ..
    } = channel;
    let (tx, rx) = match stream {
        VerbStream::Pipe(tx, rx) => (Tx::Pipe(tx), Rx::Pipe(rx)),
        VerbStream::Socket(w, r) => (Tx::Socket(w), Rx::Socket(r)),
    };
    Ok(Opened {
        title: format!("jmp console {} on {}", origin.device, origin.exporter),
        device: origin.device,
        tx,
        rx,
        timed: opened.timed.then(TimedDecoder::new),
        close,
    })
}

/// The board's output: recorded (at the exporter's times when the channel is timed), then
/// shown, stamped with the local time when asked.
fn show_output(
    chunks: Chunks,
    rec: &mut Option<Recorder>,
    stamp: &mut Option<Stamper>,
) -> Result<(), VerbError> {
    for (b, at) in chunks {
        if let Some(r) = rec.as_mut() {
            r.output(&b, at).map_err(record_error)?;
        }
        match stamp.as_mut() {
            Some(s) => show(&s.stamp(&b, SystemTime::now()))?,
            None => show(&b)?,
        }
    }
    Ok(())
}

fn record_error(e: std::io::Error) -> VerbError {
    VerbError::new(code::FAILURE, format!("cannot write the recording: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Running

type Pending<'a> = BoxFuture<'a, Result<(String, DeviceResponse, String), VerbError>>;

pub fn run<'a>(host: &'a dyn VerbHost, args: ConsoleArgs) -> BoxFuture<'a, Result<(), VerbError>> {
    Box::pin(async move {
        match args.send.clone() {
            Some(path) => send(host, &args, &path).await,
            None => interactive(host, &args).await,
        }
    })
}

/// `--send`: types the script and returns once the exporter has written all of it.
async fn send(
    host: &dyn VerbHost,
    args: &ConsoleArgs,
    path: &std::path::Path,
) -> Result<(), VerbError> {
    let usage = |m: String| VerbError::new(code::USAGE, m);
    let script = if path.as_os_str() == "-" {
        let mut v = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(std::io::stdin().lock(), MAX_SEND + 1),
            &mut v,
        )
        .map_err(|e| usage(format!("cannot read standard input: {e}")))?;
        v
    } else {
        let len = std::fs::metadata(path)
            .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?
            .len();
        if len > MAX_SEND {
            return Err(usage(format!(
                "{} is {len} bytes; --send types at most {MAX_SEND}",
                path.display()
            )));
        }
        std::fs::read(path).map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?
    };
    if script.len() as u64 > MAX_SEND {
        return Err(usage(format!(
            "standard input holds more than the {MAX_SEND} bytes --send types"
        )));
    }
    // Only what the board prints from now on: the history is not this script's doing.
    let mut ch = open(host, args, Some(u64::MAX)).await?;
    let mut rec = match &args.record {
        Some(p) => Some(Recorder::create(p, window_size(), &ch.title, args.record_input).map_err(record_error)?),
        None => None,
    };
    let mut stamp = args.timestamps.then(Stamper::default);
    let mut pending: &[u8] = &script;
    let lost = |e: String| VerbError::new(code::FAILURE, format!("{}: the console closed: {e}", ch.device));
    let mut result = Ok(());
    // Output is read while typing: the board's echo must not back up behind the script.
    loop {
        tokio::select! {
            r = ch.tx.send(&pending[..pending.len().min(16 * 1024)]), if !pending.is_empty() => {
                if let Err(e) = r {
                    result = Err(lost(e));
                    break;
                }
                let n = pending.len().min(16 * 1024);
                if let Some(r) = rec.as_mut() {
                    r.input(&pending[..n]).map_err(record_error)?;
                }
                pending = &pending[n..];
                if pending.is_empty() {
                    // The exporter ends the channel once it has written all we sent.
                    ch.tx.finish().await;
                }
            }
            r = recv_chunks(&mut ch.rx, &mut ch.timed) => match r {
                Ok(Some(chunks)) => show_output(chunks, &mut rec, &mut stamp)?,
                Ok(None) => {
                    if !pending.is_empty() {
                        result = Err(lost("before the script was sent".into()));
                    }
                    break;
                }
                Err(e) => {
                    result = Err(lost(e));
                    break;
                }
            }
        }
    }
    if let Some(close) = ch.close.take() {
        close().await;
    }
    result
}

/// Where the next recording started with the record key goes: `--record FILE` first, then
/// FILE-2, FILE-3... beside it (the extension kept); without `--record`,
/// `jmp-console-DEVICE-UNIXTIME.cast` in the current directory. Never one already used in this
/// session.
fn next_recording(
    record: Option<&std::path::Path>,
    device: &str,
    used: &[PathBuf],
) -> PathBuf {
    let base = match record {
        Some(p) => p.to_path_buf(),
        None => {
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            // The device name comes from the exporter: only its safe characters make a name.
            let dev: String = device
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
                .collect();
            PathBuf::from(format!("jmp-console-{dev}-{secs}.cast"))
        }
    };
    if !used.contains(&base) {
        return base;
    }
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = base
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    (2..)
        .map(|n| base.with_file_name(format!("{stem}-{n}{ext}")))
        .find(|p| !used.contains(p))
        .expect("an unused name")
}

/// The interactive terminal.
async fn interactive(host: &dyn VerbHost, args: &ConsoleArgs) -> Result<(), VerbError> {
    use tokio::signal::unix::{signal, SignalKind};
    let fail = |m: String| VerbError::new(code::FAILURE, m);
    let tty = std::io::stdin().is_terminal();
    let mut ch = open(host, args, None).await?;
    let mut rec = match &args.record {
        Some(p) => Some(Recorder::create(p, window_size(), &ch.title, args.record_input).map_err(record_error)?),
        None => None,
    };
    // The files recorded in this session, in order: `~r` starts the next one beside them.
    let mut recordings: Vec<PathBuf> = args.record.iter().cloned().collect();
    let sig = |k: SignalKind| signal(k).map_err(|e| fail(format!("cannot watch signals: {e}")));
    let (mut term, mut hup, mut int) = (
        sig(SignalKind::terminate())?,
        sig(SignalKind::hangup())?,
        sig(SignalKind::interrupt())?,
    );
    let input = stdin_fd().map_err(|e| fail(format!("cannot read standard input: {e}")))?;
    // From here on the terminal is raw until `_raw` drops, whichever way this returns.
    let _raw = Terminal::raw(tty).map_err(|e| fail(format!("cannot set the terminal up: {e}")))?;
    let esc = escape_name(args.escape);
    let what = if args.escape.is_ascii_control() {
        format!("{esc}?")
    } else {
        format!("{esc}? at the start of a line")
    };
    let on = ch.title.trim_start_matches("jmp console ");
    show(format!("[jmp console: {on}; {what} for help, {esc}. to quit]\r\n").as_bytes())?;
    let mut escapes = Escapes::new(args.escape);
    let mut stamp = args.timestamps.then(Stamper::default);
    let mut pending: Option<(&'static str, Pending<'_>)> = None;
    let mut buf = BytesMut::new();
    let result = loop {
        tokio::select! {
            r = crate::common::fdio::read(&input, &mut buf, 4096, false) => {
                let n = match r {
                    Ok(n) => n,
                    Err(e) => break Err(fail(format!("cannot read standard input: {e}"))),
                };
                if n == 0 {
                    break Ok(());
                }
                let mut quit = false;
                for a in escapes.feed(&buf) {
                    match a {
                        Action::Send(b) => {
                            if let Some(r) = rec.as_mut() {
                                r.input(&b).map_err(record_error)?;
                            }
                            if let Err(e) = ch.tx.send(&b).await {
                                return Err(fail(format!("{}: the console closed: {e}", ch.device)));
                            }
                        }
                        Action::Quit => quit = true,
                        Action::Help => show(help(args.escape).as_bytes())?,
                        Action::Devices => {
                            // Asked of the attachment's control socket (a local call, answered
                            // at once): the board's output waits meanwhile, never lost.
                            let text = match host.local_devices(&args.target).await {
                                Ok(t) => t,
                                Err(e) => e.message,
                            };
                            show(devices_text(&text).as_bytes())?;
                        }
                        Action::Power(_) | Action::Break if pending.is_some() => {
                            show(b"\r\n[jmp console: the last command is still running]\r\n")?;
                        }
                        Action::Power(action) => {
                            let Some(req) = DeviceRequest::power(action) else {
                                show(b"\r\n[jmp console: no kind of device switches power]\r\n")?;
                                continue;
                            };
                            let what = match action {
                                PowerAction::Cycle => "power cycle",
                                PowerAction::On => "power on",
                                PowerAction::Off => "power off",
                            };
                            show(format!("\r\n[jmp console: {what}]\r\n").as_bytes())?;
                            if let Some(r) = rec.as_mut() {
                                r.marker(what).map_err(record_error)?;
                            }
                            pending = Some((what, host.request(&args.target, None, req)));
                        }
                        Action::Record => match rec.take() {
                            Some(r) => {
                                drop(r);
                                let at = recordings.last().map(|p| p.display().to_string()).unwrap_or_default();
                                show(format!("\r\n[jmp console: recording stopped: {at}]\r\n").as_bytes())?;
                            }
                            None => {
                                let path = next_recording(args.record.as_deref(), &ch.device, &recordings);
                                match Recorder::create(&path, window_size(), &ch.title, args.record_input) {
                                    Ok(r) => {
                                        rec = Some(r);
                                        show(format!("\r\n[jmp console: recording to {}]\r\n", path.display()).as_bytes())?;
                                        recordings.push(path);
                                    }
                                    Err(e) => show(format!("\r\n[jmp console: cannot record to {}: {e}]\r\n", path.display()).as_bytes())?,
                                }
                            }
                        },
                        Action::Break => {
                            show(b"\r\n[jmp console: break]\r\n")?;
                            if let Some(r) = rec.as_mut() {
                                r.marker("break").map_err(record_error)?;
                            }
                            let req = DeviceRequest::Serial(Request::Break { millis: BREAK_MS });
                            pending = Some(("break", host.request(&args.target, Some(ch.device.clone()), req)));
                        }
                    }
                    if quit {
                        break;
                    }
                }
                if quit {
                    break Ok(());
                }
            }
            r = recv_chunks(&mut ch.rx, &mut ch.timed) => match r {
                Ok(Some(chunks)) => show_output(chunks, &mut rec, &mut stamp)?,
                Ok(None) => break Err(fail(format!("{}: the exporter ended the console", ch.device))),
                Err(e) => break Err(fail(format!("{}: the console closed: {e}", ch.device))),
            },
            r = async { pending.as_mut().expect("guarded").1.as_mut().await }, if pending.is_some() => {
                let what = pending.take().map_or("", |p| p.0);
                let line = match r {
                    Ok((_, _, line)) => line,
                    Err(e) => format!("{what} failed: {}", e.message),
                };
                show(format!("\r\n[jmp console: {}]\r\n", jmp_protocol::name::escape(&line)).as_bytes())?;
            }
            _ = term.recv() => break Err(fail("terminated".into())),
            _ = hup.recv() => break Err(fail("the terminal hung up".into())),
            // Only when the terminal is not raw (raw mode sends Ctrl-C to the board).
            _ = int.recv() => break Err(fail("interrupted".into())),
        }
    };
    drop(_raw);
    if result.is_ok() {
        show(b"\r\n")?;
    }
    if let Some(close) = ch.close.take() {
        close().await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(s: &str) -> Action {
        Action::Send(s.as_bytes().to_vec())
    }

    #[test]
    fn escapes_count_only_at_the_start_of_a_line() {
        let mut e = Escapes::new(b'~');
        assert_eq!(e.feed(b"~."), vec![Action::Quit]);
        let mut e = Escapes::new(b'~');
        assert_eq!(e.feed(b"ls ~.\r"), vec![send("ls ~.\r")]);
        assert_eq!(e.feed(b"~p"), vec![Action::Power(PowerAction::Cycle)]);
        // Still at the start of the line after a command.
        assert_eq!(e.feed(b"~b~?"), vec![Action::Break, Action::Help]);
        assert_eq!(e.feed(b"x\n~."), vec![send("x\n"), Action::Quit]);
    }

    #[test]
    fn power_and_record_keys() {
        let mut e = Escapes::new(b'~');
        assert_eq!(
            e.feed(b"~o~f\r~r"),
            vec![
                Action::Power(PowerAction::On),
                Action::Power(PowerAction::Off),
                send("\r"),
                Action::Record
            ]
        );
    }

    #[test]
    fn the_devices_key_is_listed_and_framed_for_a_raw_terminal() {
        let mut e = Escapes::new(b'~');
        assert_eq!(e.feed(b"~d"), vec![Action::Devices]);
        assert_eq!(e.feed(b"x~d"), vec![send("x~d")], "inside a line it is text");
        assert!(help(b'~').contains("~d  show the board's devices"));
        let t = devices_text("console  serial  /dev/jmp/b/console\nevil\x1b[2J\n");
        assert_eq!(
            t,
            "\r\n[jmp console: devices]\r\nconsole  serial  /dev/jmp/b/console\r\nevil\\u{1b}[2J\r\n[jmp console: end of devices]\r\n"
        );
    }

    #[test]
    fn each_recording_of_a_session_gets_its_own_file() {
        let base = std::path::Path::new("/tmp/s.cast");
        let first = next_recording(Some(base), "console", &[]);
        assert_eq!(first, base);
        let used = vec![first];
        let second = next_recording(Some(base), "console", &used);
        assert_eq!(second, std::path::Path::new("/tmp/s-2.cast"));
        let used = vec![base.to_path_buf(), second];
        assert_eq!(
            next_recording(Some(base), "console", &used),
            std::path::Path::new("/tmp/s-3.cast")
        );
        // Without --record: named after the device, whose unsafe characters are replaced.
        let p = next_recording(None, "../evil dev", &[]);
        let name = p.to_string_lossy().into_owned();
        assert!(name.starts_with("jmp-console-___evil_dev-"), "{name}");
        assert!(!name.contains('/'), "{name}");
    }

    #[test]
    fn a_doubled_escape_is_typed_once_and_others_pass_through() {
        let mut e = Escapes::new(b'~');
        assert_eq!(e.feed(b"~~/x"), vec![send("~/x")]);
        let mut e = Escapes::new(b'~');
        assert_eq!(e.feed(b"~x"), vec![send("~x")]);
        // After `~x` the line has begun: a later `~.` is text.
        assert_eq!(e.feed(b"~."), vec![send("~.")]);
    }

    #[test]
    fn an_escape_split_across_reads_still_counts() {
        let mut e = Escapes::new(b'~');
        assert_eq!(e.feed(b"echo\r~"), vec![send("echo\r")]);
        assert_eq!(e.feed(b"."), vec![Action::Quit]);
    }

    #[test]
    fn a_control_escape_counts_anywhere() {
        let esc = parse_escape("^]").expect("parses");
        assert_eq!(esc, 0x1d);
        let mut e = Escapes::new(esc);
        assert_eq!(e.feed(b"abc\x1d."), vec![send("abc"), Action::Quit]);
        assert!(parse_escape("ab").is_err());
        assert!(parse_escape("^1").is_err());
        assert!(help(esc).contains("^]."));
    }

    #[test]
    fn utf8_split_across_chunks_is_kept_whole() {
        let mut c = Utf8Carry::default();
        let s = "é✓".as_bytes();
        assert_eq!(c.take(&s[..1]), "");
        assert_eq!(c.take(&s[1..3]), "é");
        assert_eq!(c.take(&s[3..]), "✓");
        assert_eq!(c.take(b"a\xffb"), "a\u{fffd}b");
    }

    #[test]
    fn timestamps_prefix_each_line_once() {
        let mut s = Stamper::default();
        let t = UNIX_EPOCH + Duration::from_millis(3_723_004);
        let out = s.stamp(b"ab\r\ncd", t);
        assert_eq!(out, b"[01:02:03.004] ab\r\n[01:02:03.004] cd");
        // The line goes on in the next chunk: no second stamp.
        assert_eq!(s.stamp(b"ef\r\n", t), b"ef\r\n");
    }

    #[test]
    fn a_recording_is_asciicast_v2_in_order() {
        let dir = std::env::temp_dir().join(format!("jmp-rec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s.cast");
        let mut r = Recorder::create(&path, (100, 30), "t", true).expect("create");
        r.output(b"boot\r\n", Some(5_000_000)).expect("o");
        r.input(b"ls\r").expect("i");
        r.marker("power cycle").expect("m");
        r.output(b"\xc3", Some(5_500_000)).expect("o");
        r.output(b"\xa9", Some(5_600_000)).expect("o");
        drop(r);
        let text = std::fs::read_to_string(&path).expect("read");
        let _ = std::fs::remove_dir_all(&dir);
        let mut lines = text.lines();
        let h: serde_json::Value = serde_json::from_str(lines.next().expect("header")).expect("json");
        assert_eq!((h["version"].as_u64(), h["width"].as_u64()), (Some(2), Some(100)));
        let ev: Vec<serde_json::Value> = lines.map(|l| serde_json::from_str(l).expect("json")).collect();
        let kinds: Vec<&str> = ev.iter().map(|e| e[1].as_str().expect("kind")).collect();
        assert_eq!(kinds, ["o", "i", "m", "o"]);
        assert_eq!(ev[3][2], "é");
        // Output at the exporter's times, from the first one: "boot" at 5.0 s is the zero, the
        // character completed by the chunk read at 5.6 s is at 0.6 s, though all of it arrived
        // here within microseconds.
        assert_eq!(ev[0][0].as_f64(), Some(0.0));
        assert_eq!(ev[3][0].as_f64(), Some(0.6));
        // Typing and markers fall on the same clock, after the output before them.
        assert!(ev[1][0].as_f64().is_some_and(|t| t < 0.6), "{:?}", ev[1]);
        let times: Vec<f64> = ev.iter().map(|e| e[0].as_f64().expect("time")).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    }

    #[test]
    fn an_exporter_without_timed_channels_is_recognised_by_its_refusal() {
        // What an older jmpd says to `02` timed: its driver's refusal of the open parameters.
        let e = jmp_protocol::codec::DecodeError::Invalid {
            field: "open option",
            value: 2,
        };
        let old = VerbError::new(code::FAILURE, format!("console: bad open parameters: {e}"));
        assert!(refuses_timed(&old), "{}", old.message);
        // After a pacing option it knows, the timed option is a byte too many.
        let e = jmp_protocol::codec::DecodeError::Trailing(1);
        let old = VerbError::new(code::FAILURE, format!("console: bad open parameters: {e}"));
        assert!(refuses_timed(&old), "{}", old.message);
        let other = VerbError::new(code::FAILURE, "console: unavailable (retrying every second)");
        assert!(!refuses_timed(&other));
    }

    #[test]
    fn a_recording_is_private_new_and_without_typing_unless_asked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("jmp-rec-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s.cast");
        let mut r = Recorder::create(&path, (80, 24), "t", false).expect("create");
        r.output(b"Password: ", None).expect("o");
        r.input(b"hunter2\r").expect("i");
        r.output(b"\r\n$ ", None).expect("o");
        drop(r);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("Password: "), "{text}");
        // An existing file (or a link planted at the name) is never written over.
        let err = Recorder::create(&path, (80, 24), "t", false).err().expect("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert!(err.to_string().contains("never writes over"), "{err}");
        let link = dir.join("link.cast");
        std::os::unix::fs::symlink(dir.join("target"), &link).expect("symlink");
        let followed = Recorder::create(&link, (80, 24), "t", false).is_ok()
            || dir.join("target").exists();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!followed, "followed a link planted at the name");
    }
}
