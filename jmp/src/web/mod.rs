//! `jmp web`: the board page. A small HTTP server (axum) on a local address that serves one
//! page for a running attachment: its console in a terminal emulator (xterm.js), its devices
//! and their endpoints, power buttons, a live view of CAN frames and flashing by upload. The
//! board is driven through the kinds' agent tools on `jmp`'s own verb host ([`board`]), the
//! status comes from the attachment's control socket: the CLI's paths, not new ones.
//!
//! Who may use it: whoever has the token of the URL printed on the first line. The token is
//! the first segment of every path (`/TOKEN/`, `/TOKEN/assets/...`, `/TOKEN/ws`,
//! `/TOKEN/flash`), so every request carries it and no cookie is ever set: a cookie would be
//! sent to any other server on the same host whatever its port, so another local user's page
//! could collect it. The WebSocket and the upload also need an `Origin` that is this server's
//! own (the `Host` the browser asked for): a page of another origin is refused.
//! The page uses relative URLs and a same-origin WebSocket, so it works through an IDE's port
//! forwarding.
//!
//! Flashing by a path on this machine reads only the images under `--image-dir DIR` (off
//! without it): the token must not be a way to read any file the user can read (its content
//! written to the board's card, read back through the mount). The image is opened once, its
//! last component not followed, and what is flashed is that open file ([`open_image`]).
//!
//! The assets are built into the binary (`build.rs`: the project's files from `web/src/`, the
//! third-party ones from `web/node_modules`, installed by `npm ci` from the lockfile), served
//! gzipped when the browser accepts it; nothing comes from the internet.

mod board;

use crate::cli::WebArgs;
use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use board::Board;
use futures::StreamExt;
use serde::Deserialize;
use std::io::Write;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

/// One embedded asset.
pub(crate) struct Asset {
    pub name: &'static str,
    pub content_type: &'static str,
    pub raw: &'static [u8],
    pub gzip: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// The largest WebSocket message a tab may send (typing, a power button).
const MAX_WS_MESSAGE: usize = 256 * 1024;
/// The longest path the page may name for flashing.
const MAX_PATH_BODY: usize = 4096;
/// Uploads at once (one flashing, one waiting for it: flashes run one at a time).
const MAX_UPLOADS: usize = 2;

struct App {
    board: Arc<Board>,
    token: String,
    /// The most bytes all uploads at once may write (`--max-upload-mib`).
    max_upload: u64,
    uploads: std::path::PathBuf,
    /// Uploads under way, at most [`MAX_UPLOADS`].
    uploading: tokio::sync::Semaphore,
    /// Bytes the uploads under way have written; at most `max_upload` together.
    upload_bytes: std::sync::atomic::AtomicU64,
    /// Where images flashed by their path must be (`--image-dir`, canonical); `None`: flashing
    /// by path is off.
    image_dir: Option<std::path::PathBuf>,
}

/// Equal without telling by its timing where the first difference is.
fn same(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// What every HTML answer may load: its own files and WebSocket; no frames of it elsewhere
/// (clickjacking the power buttons). xterm.js sets inline styles on its elements.
const CSP: &str = "default-src 'self'; connect-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'";

impl App {
    /// Whether the path's token is this server's.
    fn allowed(&self, token: &str) -> bool {
        same(token, &self.token)
    }
}

/// Whether the request comes from a page of this server's own origin
/// ([`jmp_protocol::web::same_origin`]).
fn same_origin(headers: &HeaderMap) -> bool {
    let h = |n| headers.get(n).and_then(|v: &HeaderValue| v.to_str().ok());
    jmp_protocol::web::same_origin(h(header::ORIGIN), h(header::HOST))
}

fn refused(why: &str) -> Response {
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("jmp web: {why}\n"),
    )
        .into_response()
}

const NO_TOKEN: &str =
    "this page needs the token of the URL that `jmp web` printed (open that URL once)";

fn asset(name: &str, headers: &HeaderMap) -> Response {
    let Some(a) = ASSETS.iter().find(|a| a.name == name) else {
        return (StatusCode::NOT_FOUND, "jmp web: no such asset\n").into_response();
    };
    let gzip = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    let mut r = Response::new(Body::from(if gzip { a.gzip } else { a.raw }));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    // Every HTML answer, the page itself or the same file as an asset, has the policy.
    if a.content_type.starts_with("text/html") {
        h.insert("content-security-policy", HeaderValue::from_static(CSP));
    }
    r
}

async fn page(
    State(app): State<Arc<App>>,
    Path(token): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !app.allowed(&token) {
        return refused(NO_TOKEN);
    }
    asset("board.html", &headers)
}

/// `/TOKEN` without its slash: the page's relative URLs need it.
async fn slash(State(app): State<Arc<App>>, Path(token): Path<String>) -> Response {
    if !app.allowed(&token) {
        return refused(NO_TOKEN);
    }
    axum::response::Redirect::permanent(&format!("/{token}/")).into_response()
}

/// Anything else: the same answer as a wrong token, so nothing tells what exists.
async fn anything_else() -> Response {
    refused(NO_TOKEN)
}

async fn assets(
    State(app): State<Arc<App>>,
    Path((token, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !app.allowed(&token) {
        return refused(NO_TOKEN);
    }
    asset(&name, &headers)
}

async fn ws(
    State(app): State<Arc<App>>,
    Path(token): Path<String>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // Who asks is checked before what is asked (a refusal says 403, whatever the request).
    if !app.allowed(&token) {
        return refused(NO_TOKEN);
    }
    if !same_origin(&headers) {
        return refused("the WebSocket is for pages of this server's own origin only");
    }
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let board = app.board.clone();
    upgrade
        .max_message_size(MAX_WS_MESSAGE)
        .on_upgrade(move |s| tab(s, board))
}

/// What a tab sends.
#[derive(Deserialize)]
#[serde(tag = "t", rename_all = "kebab-case", deny_unknown_fields)]
enum FromTab {
    Input { data: String },
    Power { action: String },
}

/// One tab: what a new tab is told first, then the board's events; its typing and buttons go
/// to the board.
async fn tab(socket: WebSocket, board: Arc<Board>) {
    let (mut tx, mut rx) = socket.split();
    let (first, mut events) = board.subscribe();
    use futures::SinkExt;
    for m in first {
        if tx.send(Message::Text(m.into())).await.is_err() {
            return;
        }
    }
    let down = async {
        loop {
            match events.recv().await {
                Ok(ev) => {
                    if tx.send(Message::Text(ev.as_ref().into())).await.is_err() {
                        break;
                    }
                }
                // Too far behind: the page reconnects and starts again from the history.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!("web: a tab fell {n} events behind; disconnecting it");
                    break;
                }
                Err(_) => break,
            }
        }
        let _ = tx.close().await;
    };
    let up = async {
        while let Some(Ok(m)) = rx.next().await {
            let text = match m {
                Message::Text(t) => t,
                Message::Close(_) => break,
                _ => continue,
            };
            match serde_json::from_str::<FromTab>(text.as_str()) {
                Ok(FromTab::Input { data }) => board.input(data).await,
                Ok(FromTab::Power { action }) => {
                    if matches!(action.as_str(), "on" | "off" | "cycle" | "status") {
                        let b = board.clone();
                        tokio::spawn(async move { b.power(&action).await });
                    }
                }
                Err(e) => {
                    warn!("web: a tab sent a bad message ({e}); closing it");
                    break;
                }
            }
        }
    };
    tokio::select! {
        _ = down => {}
        _ = up => {}
    }
}

/// The page's answer to a flash (by upload or by path): `{ok, text}`.
fn flash_reply(ok: bool, text: String) -> Response {
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({"ok": ok, "text": text}).to_string(),
    )
        .into_response()
}

/// Flashes the image at `path` and answers the page with the result; the result names the
/// image as `shown` (what the person named, not the path jmp read it by).
async fn flash_and_reply(app: &App, path: &std::path::Path, shown: &str) -> Response {
    let read_as = path.to_string_lossy();
    match app.board.flash(path).await {
        Ok(text) => flash_reply(true, text.trim().replace(read_as.as_ref(), shown)),
        Err(e) => flash_reply(false, e.replace(read_as.as_ref(), shown)),
    }
}

#[derive(Deserialize)]
struct FlashQuery {
    name: Option<String>,
}

/// An image uploaded by the page is written to a private file, then flashed as `jmp storage
/// flash FILE` would (the file's name keeps its extension: the compression is told by it).
async fn flash(
    State(app): State<Arc<App>>,
    Path(token): Path<String>,
    headers: HeaderMap,
    Query(q): Query<FlashQuery>,
    body: Body,
) -> Response {
    if !app.allowed(&token) {
        return refused(NO_TOKEN);
    }
    if !same_origin(&headers) {
        return refused("uploads are for pages of this server's own origin only");
    }
    let ext = q
        .name
        .as_deref()
        .and_then(|n| n.rsplit_once('.'))
        .map(|(_, e)| e.to_ascii_lowercase())
        .filter(|e| {
            matches!(
                e.as_str(),
                "gz" | "xz" | "zst" | "bz2" | "img" | "raw" | "bin"
            )
        })
        .unwrap_or_else(|| "img".into());
    let Ok(_one) = app.uploading.try_acquire() else {
        return flash_reply(
            false,
            format!("{MAX_UPLOADS} uploads are under way already; flash again when one is done"),
        );
    };
    let path = app.uploads.join(format!(
        "upload-{}.{ext}",
        hex::encode(rand::random::<[u8; 8]>())
    ));
    // Removed however this ends, and its bytes no longer counted.
    struct Gone<'a>(std::path::PathBuf, &'a std::sync::atomic::AtomicU64, u64);
    impl Drop for Gone<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
            self.1
                .fetch_sub(self.2, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let mut gone = Gone(path.clone(), &app.upload_bytes, 0);
    let written = async {
        let mut f = tokio::fs::File::create(&path).await?;
        let mut n = 0u64;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(std::io::Error::other)?;
            let len = chunk.len() as u64;
            n += len;
            // Counted before it is written, so uploads at once never write more together.
            let before = app
                .upload_bytes
                .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
            gone.2 += len;
            if before + len > app.max_upload {
                return Err(std::io::Error::other(format!(
                    "the uploads at once would write more than --max-upload-mib ({} MiB; this image reached {n} bytes)",
                    app.max_upload >> 20
                )));
            }
            f.write_all(&chunk).await?;
        }
        f.flush().await?;
        Ok::<u64, std::io::Error>(n)
    }
    .await;
    let n = match written {
        Ok(n) => n,
        Err(e) => return flash_reply(false, format!("upload: {e}")),
    };
    info!("web: flashing an uploaded image of {n} bytes");
    let shown = q.name.as_deref().unwrap_or("the upload");
    flash_and_reply(&app, &path, shown).await
}

/// `jmp web --lab`: a single-use sign-in link to the lab dashboard, asked of the controller as
/// the client, so the client's credential never goes into a browser.
fn lab_link(args: &WebArgs) -> Result<()> {
    use jmp_protocol::api::{Reply, Request};
    let (cfg, _) = crate::controller::load_client(args.client.client.as_deref())?;
    crate::runtime()?.block_on(async {
        let ctl = crate::controller::Ctl::connect(&cfg).await?;
        let r = ctl.call(Request::WebSignIn).await;
        ctl.close();
        match r? {
            Reply::SignInLink { url, expires } => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{url}")?;
                writeln!(
                    out,
                    "jmp web: open it within {} s, once: it signs the browser in to the lab dashboard as {}",
                    expires.saturating_sub(jmp_transport::unix_now()),
                    cfg.metadata.name
                )?;
                out.flush()?;
                Ok(())
            }
            other => Err(crate::controller::unexpected(other)),
        }
    })
}

/// Opens `rel` for reading, resolved beneath `dir` only (openat2's `RESOLVE_BENEATH`: no `..`
/// above it, no link leading out, no /proc magic link: `EXDEV` or `ELOOP` instead), the last
/// component not followed, without blocking on a pipe or taking a terminal.
fn open_beneath(dir: &std::path::Path, rel: &std::path::Path) -> nix::Result<std::fs::File> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    use std::os::fd::{AsRawFd, FromRawFd};
    let base = std::fs::File::open(dir)
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let how = OpenHow::new()
        .flags(
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC,
        )
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = openat2(base.as_raw_fd(), rel, how)?;
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Why flashing by path is refused without `--image-dir`.
const NO_IMAGE_DIR: &str = "flashing by a path is off: start jmp web with --image-dir DIR to flash the images under DIR (the page must not read any file you can read)";

/// Opens the image named in the page (`path`, absolute or relative to `dir`) once, for
/// reading, and only if it is a regular file inside `dir` (canonical): the open file, and the
/// path it was named by. Nothing outside `dir` is opened (a device's open can do something), the
/// last component is not followed (`O_NOFOLLOW`), and the open file's own path (its
/// `/proc/self/fd` link, after every link of the way) must be inside `dir`: no symbolic link
/// leads out, and no swap of the file after the check changes what is flashed.
fn open_image(
    dir: Option<&std::path::Path>,
    path: &str,
) -> Result<(std::fs::File, std::path::PathBuf), String> {
    use std::path::Path;
    let dir = dir.ok_or(NO_IMAGE_DIR)?;
    let path = path.trim();
    if path.is_empty() {
        return Err(format!(
            "give the path of an image file under {}",
            dir.display()
        ));
    }
    let named = dir.join(Path::new(path));
    let outside = || {
        format!(
            "{path} is outside --image-dir {}: only the images under it are flashed from the page",
            dir.display()
        )
    };
    // Nothing outside is opened (where every link of the way leads; the open file's own path
    // below is what counts).
    let ahead = std::fs::canonicalize(&named).map_err(|e| format!("{path}: {e}"))?;
    if !ahead.starts_with(dir) {
        return Err(outside());
    }
    // The open resolves beneath the directory (openat2's RESOLVE_BENEATH): a directory on the
    // way swapped for a link out after the check above makes the open fail rather than open a
    // device elsewhere (opening a tty toggles its DTR line, which resets many boards).
    let rel = named.strip_prefix(dir).map_err(|_| outside())?;
    let f = open_beneath(dir, rel).map_err(|e| match e {
        nix::errno::Errno::ELOOP => format!("{path} is a symbolic link: name the image itself"),
        nix::errno::Errno::EXDEV => outside(),
        e => format!("{path}: {}", std::io::Error::from(e)),
    })?;
    let real = std::fs::read_link(format!("/proc/self/fd/{}", {
        use std::os::fd::AsRawFd;
        f.as_raw_fd()
    }))
    .map_err(|e| format!("{path}: where it is cannot be told: {e}"))?;
    if !real.starts_with(dir) {
        return Err(outside());
    }
    let ft = f
        .metadata()
        .map_err(|e| format!("{path}: {e}"))?
        .file_type();
    if !ft.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_fifo() {
            "a pipe"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(format!(
            "{path} is {what}: only a regular image file is flashed from the page"
        ));
    }
    Ok((f, named))
}

/// Flashes an image file named by its path on this machine: jmp reads it, the browser sends
/// only the path (the body, as text).
async fn flash_path(
    State(app): State<Arc<App>>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if !app.allowed(&token) {
        return refused(NO_TOKEN);
    }
    if !same_origin(&headers) {
        return refused("flashing is for pages of this server's own origin only");
    }
    let (file, named) = match open_image(app.image_dir.as_deref(), &body) {
        Ok(f) => f,
        Err(e) => return flash_reply(false, e),
    };
    info!("web: flashing {}", named.display());
    // The flash reads the file opened and checked above, by its descriptor (the same open
    // file, whatever happens to the path meanwhile); `file` stays open until it is done.
    let by_fd = std::path::PathBuf::from(format!("/proc/self/fd/{}", {
        use std::os::fd::AsRawFd;
        file.as_raw_fd()
    }));
    let r = flash_and_reply(&app, &by_fd, &named.to_string_lossy()).await;
    drop(file);
    r
}

/// Serves the page until SIGTERM/SIGINT.
pub(crate) fn run(args: WebArgs) -> Result<()> {
    if args.lab {
        return lab_link(&args);
    }
    if let Some(m) = MISSING_ASSETS {
        return Err(crate::exit(
            jmp_protocol::exit::UNAVAILABLE,
            format!(
                "this jmp was built without the board page's browser code ({m} was missing): \
                 run `npm ci` in web/ (scripts/install-test-deps.sh does) and build jmp again"
            ),
        ));
    }
    let st = match &args.lease {
        Some(l) => crate::state::all()
            .into_iter()
            .find(|s| s.ready.lease.as_deref() == Some(l.as_str()))
            .ok_or_else(|| {
                crate::exit(
                    jmp_protocol::exit::UNAVAILABLE,
                    format!("no attachment of lease {l:?} is running"),
                )
            })?,
        None => crate::state::find(args.exporter.as_deref())
            .context("jmp web serves a running attachment (start one with `jmp attach -d`)")?,
    };
    crate::runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let bound = listener.local_addr()?;
        if !bound.ip().is_loopback() {
            warn!("web: serving on {bound}, not a loopback address: the token is all that guards the board");
        }
        let image_dir = match &args.image_dir {
            Some(d) => Some(std::fs::canonicalize(d).with_context(|| {
                format!("--image-dir {}", d.display())
            })?),
            None => None,
        };
        if let Some(d) = &image_dir {
            if !std::fs::metadata(d)?.is_dir() {
                anyhow::bail!("--image-dir {}: not a directory", d.display());
            }
        }
        let token = hex::encode(rand::random::<[u8; 16]>());
        let uploads = std::env::temp_dir().join(format!("jmp-web-{}", std::process::id()));
        {
            use std::os::unix::fs::DirBuilderExt;
            let _ = std::fs::remove_dir_all(&uploads);
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&uploads)
                .with_context(|| format!("cannot create {}", uploads.display()))?;
        }
        let board = Board::new(st.ready.exporter.clone());
        tokio::spawn(board.clone().status_reader());
        tokio::spawn(board.clone().console_reader());
        tokio::spawn(board.clone().can_reader());
        let app = Arc::new(App {
            board,
            token: token.clone(),
            max_upload: args.max_upload_mib.saturating_mul(1 << 20),
            uploads: uploads.clone(),
            uploading: tokio::sync::Semaphore::new(MAX_UPLOADS),
            upload_bytes: Default::default(),
            image_dir,
        });
        let router = Router::new()
            .route("/{token}", get(slash))
            .route("/{token}/", get(page))
            .route("/{token}/assets/{name}", get(assets))
            .route("/{token}/ws", get(ws))
            .route("/{token}/flash", put(flash))
            .route(
                "/{token}/flash-path",
                post(flash_path).layer(axum::extract::DefaultBodyLimit::max(MAX_PATH_BODY)),
            )
            .fallback(anything_else)
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(app);
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "http://{bound}/{token}/")?;
            writeln!(out, "jmp web: the board page of {}; Ctrl-C ends it", st.ready.exporter)?;
            out.flush()?;
        }
        // Not a graceful shutdown: open WebSockets would hold it forever.
        let stop = jmp_transport::shutdown_signal("jmp web ending");
        let served = tokio::select! {
            r = axum::serve(listener, router) => r.context("serving the page"),
            _ = stop => Ok(()),
        };
        let _ = std::fs::remove_dir_all(&uploads);
        served
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn the_origin_check_reads_the_requests_origin_and_host() {
        let ok = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
        ]);
        assert!(same_origin(&ok));
        for bad in [
            headers(&[
                ("host", "127.0.0.1:8080"),
                ("origin", "http://127.0.0.1:8081"),
            ]),
            headers(&[("host", "127.0.0.1:8080")]),
            headers(&[("origin", "http://127.0.0.1:8080")]),
        ] {
            assert!(!same_origin(&bad), "{bad:?}");
        }
    }

    /// A scratch directory, removed on drop even when the test fails.
    struct Scratch(std::path::PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn scratch(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("jmp-web-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(std::fs::canonicalize(&d).unwrap())
    }

    fn read(mut f: std::fs::File) -> Vec<u8> {
        use std::io::Read;
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn only_a_regular_file_under_the_image_dir_is_opened_for_flashing() {
        let s = scratch("path");
        let dir = s.0.join("images");
        let out = s.0.join("elsewhere");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(dir.join("a.img"), b"image").unwrap();
        std::fs::write(out.join("secret"), b"secret").unwrap();
        let d = Some(dir.as_path());
        let why = |p: &str| open_image(d, p).map(|_| ()).expect_err(p);

        // Absolute, or relative to the directory: the same file.
        let (f, named) = open_image(d, dir.join("a.img").to_str().unwrap()).unwrap();
        assert_eq!(
            (read(f), named.clone()),
            (b"image".to_vec(), dir.join("a.img"))
        );
        let (f, named) = open_image(d, " a.img\n").unwrap();
        assert_eq!((read(f), named), (b"image".to_vec(), dir.join("a.img")));

        // Without --image-dir, nothing.
        let e = open_image(None, dir.join("a.img").to_str().unwrap())
            .map(|_| ())
            .unwrap_err();
        assert!(e.contains("--image-dir"), "{e}");
        // Any other file the user can read, however it is named.
        for p in [
            "/proc/self/environ".to_string(),
            out.join("secret").display().to_string(),
            "../elsewhere/secret".into(),
            format!("{}/../elsewhere/secret", dir.display()),
        ] {
            assert!(why(&p).contains("outside --image-dir"), "{p}: {}", why(&p));
        }
        // A link inside to a file outside; a directory inside linked to one outside.
        std::os::unix::fs::symlink(out.join("secret"), dir.join("link.img")).unwrap();
        std::os::unix::fs::symlink(&out, dir.join("sub")).unwrap();
        assert!(why("link.img").contains("outside --image-dir"));
        assert!(why("sub/secret").contains("outside --image-dir"));
        // A link inside to a file inside: not followed, the image is named itself.
        std::os::unix::fs::symlink(dir.join("a.img"), dir.join("same.img")).unwrap();
        assert!(why("same.img").contains("is a symbolic link"));
        // Not regular files; a pipe does not block the open.
        std::fs::create_dir(dir.join("d")).unwrap();
        assert!(why("d").contains("is a directory"));
        nix::unistd::mkfifo(&dir.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(why("fifo").contains("is a pipe"));
        assert!(why("").contains("give the path"));
        assert!(why("none.img").contains("No such file"));
    }

    #[test]
    fn the_open_itself_stays_beneath_the_image_dir() {
        // What the check before the open cannot see (a directory on the way swapped for a
        // link out in between), the open refuses by itself.
        let s = scratch("beneath");
        let dir = s.0.join("images");
        let out = s.0.join("elsewhere");
        std::fs::create_dir_all(dir.join("real")).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(dir.join("real/a.img"), b"image").unwrap();
        std::fs::write(out.join("secret"), b"secret").unwrap();
        std::os::unix::fs::symlink(&out, dir.join("sub")).unwrap();
        let rel = |p: &str| std::path::PathBuf::from(p);
        assert_eq!(
            read(open_beneath(&dir, &rel("real/a.img")).unwrap()),
            b"image"
        );
        for p in ["sub/secret", "../elsewhere/secret"] {
            assert_eq!(
                open_beneath(&dir, &rel(p)).map(|_| ()),
                Err(nix::errno::Errno::EXDEV),
                "{p}"
            );
        }
        assert_eq!(
            open_beneath(&dir, &rel("/proc/self/environ")).map(|_| ()),
            Err(nix::errno::Errno::EXDEV)
        );
    }

    #[test]
    fn what_is_flashed_is_the_file_opened_and_checked_whatever_becomes_of_its_path() {
        let s = scratch("swap");
        let dir = s.0.join("images");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.img"), b"image").unwrap();
        std::fs::write(s.0.join("secret"), b"secret").unwrap();
        let (f, _) = open_image(Some(&dir), "a.img").unwrap();
        // Swapped for a link out after the check: the flash (which reads the descriptor's
        // path, as flash_path does) still reads the image.
        std::fs::remove_file(dir.join("a.img")).unwrap();
        std::os::unix::fs::symlink(s.0.join("secret"), dir.join("a.img")).unwrap();
        let by_fd = format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            f.as_raw_fd()
        });
        assert_eq!(std::fs::read(&by_fd).unwrap(), b"image");
    }

    #[test]
    fn only_this_servers_token_in_the_path_is_let_in() {
        let app = App {
            board: Board::new("x".into()),
            token: "ab12".into(),
            max_upload: 0,
            uploads: std::path::PathBuf::new(),
            uploading: tokio::sync::Semaphore::new(MAX_UPLOADS),
            upload_bytes: Default::default(),
            image_dir: None,
        };
        assert!(app.allowed("ab12"));
        assert!(!app.allowed("ab13"));
        assert!(!app.allowed("ab1"));
        assert!(!app.allowed(""));
        assert!(!app.allowed("ab12x"));
    }
}
