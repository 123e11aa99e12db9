//! Storage bridge-to-driver over an in-memory session: requests in flight at once, a slow one
//! not holding up the others, writes refused while a shared board is powered, the generation
//! moving on power-on and on another writer, and the FUSE mount (real kernel) over memory.

use bytes::Bytes;
use jmp_devices::board::Board;
use jmp_devices::serve::DeviceSet;
use jmp_devices::storage::client::{self, Client, Reply, Retry};
use jmp_devices::storage::spec::Table;
use jmp_devices::storage::{sim, SlowRange, StorageDriver};
use jmp_devices::testing::bridge_ctx;
use jmp_devices::testing::mem_session;
use jmp_devices::{Bridge, Driver};
use jmp_protocol::kinds::storage::{Op, StorageError};
use jmp_transport::Channels;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const SIZE: u64 = 64 << 20;
const GUARD: Duration = Duration::from_secs(30);

struct Img(PathBuf);

impl Img {
    fn new(tag: &str) -> Img {
        let p = std::env::temp_dir().join(format!("jmp-storage-{tag}-{}.img", std::process::id()));
        let _ = std::fs::remove_file(&p);
        sim::ensure_image(&p, SIZE, Table::Mbr).expect("sim image");
        Img(p)
    }
}

impl Drop for Img {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn driver(
    img: &Img,
    writable: bool,
    board: Option<Board>,
    slow: Option<SlowRange>,
) -> Arc<dyn Driver> {
    Arc::new(StorageDriver::start(
        "sd",
        img.0.clone(),
        writable,
        board,
        slow,
    ))
}

/// A client serving one channel of `link` in a task.
async fn connect(link: Arc<dyn Channels>) -> (Client, tokio::task::JoinHandle<()>) {
    let c = Client::new("sd", Retry::Fail);
    let (tx, rx, p) = client::open(link.as_ref(), "sd").await.expect("open");
    assert_eq!(p.size, SIZE);
    c.set_params(p);
    let c2 = c.clone();
    let t = tokio::spawn(async move {
        let _ = c2.serve(tx, rx).await;
    });
    (c, t)
}

async fn read(
    c: &Client,
    offset: u64,
    len: u64,
) -> Result<Bytes, jmp_devices::storage::medium::Failure> {
    match c
        .call(
            Op::Read {
                offset,
                len,
                compress: false,
            },
            None,
        )
        .await?
    {
        Reply::Data(d) => Ok(d),
        other => panic!("read answered {other:?}"),
    }
}

#[tokio::test]
async fn reads_writes_flush_zero_and_hash_over_memory() {
    let img = Img::new("rw");
    let (link, _srv) = mem_session(DeviceSet::new("b", vec![driver(&img, true, None, None)]));
    let (c, _t) = connect(link).await;
    let data = Bytes::from((0..300_000u32).map(|i| (i * 7) as u8).collect::<Vec<u8>>());
    // Many writes in flight at once, then reads of all of them.
    let mut calls = Vec::new();
    for i in 0..16u64 {
        let c = c.clone();
        let d = data.clone();
        calls.push(tokio::spawn(async move {
            c.call(
                Op::Write {
                    offset: i << 20,
                    len: d.len() as u64,
                },
                Some(d),
            )
            .await
        }));
    }
    for t in calls {
        assert_eq!(t.await.expect("task").expect("write"), Reply::Done);
    }
    assert_eq!(c.call(Op::Flush, None).await.expect("flush"), Reply::Done);
    let f = std::fs::File::open(&img.0).expect("image");
    for i in 0..16u64 {
        assert_eq!(
            read(&c, i << 20, data.len() as u64).await.expect("read"),
            data
        );
        let mut on_disk = vec![0u8; data.len()];
        f.read_exact_at(&mut on_disk, i << 20).expect("pread");
        assert_eq!(
            on_disk, data,
            "the exporter's image holds the write at {i} MiB"
        );
    }
    // A compressed read of zeros comes back as zeros.
    c.call(
        Op::Zero {
            offset: 0,
            len: 1 << 20,
        },
        None,
    )
    .await
    .expect("zero");
    match c
        .call(
            Op::Read {
                offset: 0,
                len: 1 << 20,
                compress: true,
            },
            None,
        )
        .await
        .expect("read")
    {
        Reply::Data(d) => assert!(d.len() == 1 << 20 && d.iter().all(|b| *b == 0)),
        other => panic!("{other:?}"),
    }
    let want = ring::digest::digest(&ring::digest::SHA256, &data);
    match c
        .call(
            Op::Hash {
                offset: 1 << 20,
                len: data.len() as u64,
            },
            None,
        )
        .await
        .expect("hash")
    {
        Reply::Hash(h) => assert_eq!(&h[..], want.as_ref()),
        other => panic!("{other:?}"),
    }
    let e = read(&c, SIZE - 10, 20).await.expect_err("past the end");
    assert_eq!(e.error, StorageError::OutOfRange);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_read_does_not_hold_up_the_others() {
    let img = Img::new("slow");
    let slow = SlowRange {
        offset: 0,
        len: 4096,
        delay: Duration::from_secs(3),
    };
    let (link, _srv) = mem_session(DeviceSet::new(
        "b",
        vec![driver(&img, true, None, Some(slow))],
    ));
    let (c, _t) = connect(link).await;
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    let c2 = c.clone();
    tokio::spawn(async move {
        let r = read(&c2, 0, 4096).await;
        let _ = done_tx.send(r.is_ok());
    });
    // The slow read is on the wire first; twenty others finish while it is still running.
    for i in 1..=20u64 {
        tokio::time::timeout(GUARD, read(&c, i << 20, 65536))
            .await
            .expect("hang guard")
            .expect("read");
    }
    assert!(
        matches!(
            done_rx.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        ),
        "the slow read should still be running"
    );
    assert_eq!(
        tokio::time::timeout(GUARD, done_rx)
            .await
            .expect("hang guard")
            .ok(),
        Some(true)
    );
}

#[tokio::test]
async fn a_shared_medium_refuses_writes_while_the_board_is_on_and_moves_its_generation() {
    let img = Img::new("shared");
    let board = Board::new(); // starts powered
    let (link, _srv) = mem_session(DeviceSet::new(
        "b",
        vec![driver(&img, true, Some(board.clone()), None)],
    ));
    let (c, _t) = connect(link).await;
    let p0 = c.params().expect("params");
    assert!(p0.shared && p0.board_on && !p0.accepts_writes(), "{p0:?}");
    let w = |c: Client| async move {
        c.call(
            Op::Write { offset: 0, len: 3 },
            Some(Bytes::from_static(b"abc")),
        )
        .await
    };
    let e = w(c.clone()).await.expect_err("refused while on");
    assert_eq!(e.error, StorageError::BoardHolds);
    assert!(e.message.contains("power is on"), "{e}");
    let mut watch = c.watch_params();
    board.set_power(false);
    tokio::time::timeout(GUARD, watch.wait_for(|p| p.is_some_and(|p| !p.board_on)))
        .await
        .expect("changed pushed")
        .expect("watch");
    assert_eq!(w(c.clone()).await.expect("accepted while off"), Reply::Done);
    // A first write by a channel moves the generation too (see the next test), and the
    // change reaches the writer before the write's answer.
    let g1 = c.params().expect("params").generation;
    assert_eq!(g1, p0.generation + 1, "a new writer moves the generation");
    board.set_power(true);
    let p = *tokio::time::timeout(GUARD, watch.wait_for(|p| p.is_some_and(|p| p.board_on)))
        .await
        .expect("changed")
        .expect("watch");
    assert_eq!(
        p.map(|p| p.generation),
        Some(g1 + 1),
        "power-on moves the generation"
    );
}

#[tokio::test]
async fn a_read_only_medium_says_so() {
    let img = Img::new("ro");
    let (link, _srv) = mem_session(DeviceSet::new("b", vec![driver(&img, false, None, None)]));
    let (c, _t) = connect(link).await;
    let e = c
        .call(
            Op::Write { offset: 0, len: 1 },
            Some(Bytes::from_static(b"x")),
        )
        .await
        .expect_err("ro");
    assert_eq!(e.error, StorageError::ReadOnly, "{e}");
    assert!(e.message.contains("writable: true"), "{e}");
}

#[tokio::test]
async fn another_writer_moves_the_generation_so_caches_drop() {
    let img = Img::new("writers");
    let (link, _srv) = mem_session(DeviceSet::new("b", vec![driver(&img, true, None, None)]));
    let (a, _ta) = connect(link.clone()).await;
    let (b, _tb) = connect(link).await;
    let g0 = a.params().expect("p").generation;
    a.call(
        Op::Write { offset: 0, len: 1 },
        Some(Bytes::from_static(b"a")),
    )
    .await
    .expect("a writes");
    let mut wa = a.watch_params();
    b.call(
        Op::Write { offset: 0, len: 1 },
        Some(Bytes::from_static(b"b")),
    )
    .await
    .expect("b writes");
    let p = *tokio::time::timeout(GUARD, wa.wait_for(|p| p.is_some_and(|p| p.generation > g0)))
        .await
        .expect("a hears")
        .expect("watch");
    assert!(p.is_some());
}

/// The rules a flash beside a mount relies on: a foreign writer's flush moves the generation
/// again after its writes (pages another channel read meanwhile may be old), the writer hears
/// each change before the answer that follows it (so it knows the generation its flush
/// made), its end without a flush moves it too, and a lone writer's flush leaves everyone's
/// cache alone (a mount's own fsyncs must not drop its cache).
#[tokio::test]
async fn a_writers_flush_and_end_move_the_generation_after_its_writes() {
    let img = Img::new("flushgen");
    let (link, _srv) = mem_session(DeviceSet::new("b", vec![driver(&img, true, None, None)]));
    let write = |c: Client, at: u64| async move {
        c.call(
            Op::Write { offset: at, len: 1 },
            Some(Bytes::from_static(b"w")),
        )
        .await
        .expect("write")
    };
    let gen = |c: &Client| c.params().expect("params").generation;

    // Alone: the first write moves the generation (a mount whose link is down must find out),
    // its flush does not.
    let (a, _ta) = connect(link.clone()).await;
    write(a.clone(), 0).await;
    let g_a = gen(&a);
    a.call(Op::Flush, None).await.expect("flush");
    assert_eq!(gen(&a), g_a, "a lone writer's flush keeps the generation");

    // Beside a: b's first write moves it, and b hears that before the write's answer.
    let (b, tb) = connect(link.clone()).await;
    write(b.clone(), 4096).await;
    let g1 = gen(&b);
    assert!(g1 > g_a, "{g1} after {g_a}");
    b.call(Op::Flush, None).await.expect("flush");
    let g2 = gen(&b);
    assert!(
        g2 > g1,
        "the flush moved it again ({g2} after {g1}), heard before its answer"
    );
    let mut wa = a.watch_params();
    tokio::time::timeout(
        GUARD,
        wa.wait_for(|p| p.is_some_and(|p| p.generation >= g2)),
    )
    .await
    .expect("a hears the flush's generation")
    .expect("watch");

    // A flush with nothing written since the last one keeps it.
    b.call(Op::Flush, None).await.expect("flush");
    assert_eq!(gen(&b), g2);

    // b writes again and ends without a flush: the end moves it.
    write(b.clone(), 8192).await;
    let g3 = gen(&b);
    tb.abort();
    drop(b);
    tokio::time::timeout(GUARD, wa.wait_for(|p| p.is_some_and(|p| p.generation > g3)))
        .await
        .expect("a hears the end of b's writes")
        .expect("watch");
}

/// The real kernel: the bridge mounts FUSE over the in-memory session; the files are the disk
/// and its partitions, sized exactly, and what is written through them lands in the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mount_shows_the_disk_and_its_partitions() {
    let img = Img::new("mount");
    let d = driver(&img, true, None, None);
    let info = jmp_devices::info(d.as_ref());
    let (link, _srv) = mem_session(DeviceSet::new("b", vec![d]));
    let ctx = bridge_ctx("b", "storage-mnt");
    let dir = ctx.dev_dir.clone();
    std::fs::create_dir_all(&dir).expect("dir");
    let mut bridge = jmp_devices::storage::StorageBridge::create(&info, &ctx).expect("mount");
    let mnt = bridge.path().to_path_buf();
    let run = tokio::spawn(async move {
        let exit = bridge.run(link).await;
        (bridge, exit)
    });
    let m = mnt.clone();
    let img_path = img.0.clone();
    tokio::task::spawn_blocking(move || {
        let mut names: Vec<String> = std::fs::read_dir(&m)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["disk", "p1", "p2"]);
        let layout = sim::layout(SIZE, Table::Mbr);
        assert_eq!(std::fs::metadata(m.join("disk")).expect("stat").len(), SIZE);
        assert_eq!(
            std::fs::metadata(m.join("p1")).expect("stat").len(),
            layout[0].1
        );
        assert_eq!(
            std::fs::metadata(m.join("p2")).expect("stat").len(),
            layout[1].1
        );
        // p2 at offset 0 is the disk at the partition's offset.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.join("p2"))
            .expect("open p2");
        f.write_all_at(b"through the mount", 8192).expect("write");
        f.sync_all().expect("fsync");
        let mut back = [0u8; 17];
        std::fs::File::open(m.join("disk"))
            .expect("disk")
            .read_exact_at(&mut back, layout[1].0 + 8192)
            .expect("read");
        assert_eq!(&back, b"through the mount");
        std::fs::File::open(&img_path)
            .expect("img")
            .read_exact_at(&mut back, layout[1].0 + 8192)
            .expect("read");
        assert_eq!(&back, b"through the mount", "the exporter's image has it");
        // Unimplemented operations answer ENOSYS / EPERM, never pretend.
        let e = std::fs::File::create(m.join("new")).expect_err("no new files");
        assert!(
            matches!(
                e.raw_os_error(),
                Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EACCES)
            ),
            "{e}"
        );
    })
    .await
    .expect("checks");
    run.abort();
    let _ = run.await;
    assert!(
        !jmp_devices::places::is_mount_point(&mnt),
        "unmounted when the bridge is dropped"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every image format flashes to the same bytes, and a dump reads them back (zstd and sparse
/// raw), over memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_flashes_and_dumps_back_identically() {
    use jmp_devices::storage::{flash, image};
    use std::io::Write;
    use std::sync::atomic::AtomicBool;
    let img = Img::new("formats");
    let (link, _srv) = mem_session(DeviceSet::new("b", vec![driver(&img, true, None, None)]));
    let (c, _t) = connect(link).await;
    let dir = std::env::temp_dir().join(format!("jmp-storage-formats-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    // 8 MiB: text that compresses, random-looking bytes that do not, and zeros.
    let mut raw = vec![0u8; 8 << 20];
    for (i, b) in raw[..1 << 20].iter_mut().enumerate() {
        *b = b"jmp storage "[i % 12];
    }
    let mut x = 0x9e37_79b9_u32;
    for b in raw[3 << 20..5 << 20].iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let write = |name: &str, bytes: Vec<u8>| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).expect("write");
        p
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).expect("gz");
    let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
    xz.write_all(&raw).expect("xz");
    let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
    bz.write_all(&raw).expect("bz2");
    let files = [
        (write("a.img", raw.clone()), image::Format::Raw),
        (
            write("a.img.gz", gz.finish().expect("gz")),
            image::Format::Gzip,
        ),
        (
            write("a.img.xz", xz.finish().expect("xz")),
            image::Format::Xz,
        ),
        (
            write("a.img.zst", zstd::bulk::compress(&raw, 3).expect("zst")),
            image::Format::Zstd,
        ),
        (
            write("a.img.bz2", bz.finish().expect("bz2")),
            image::Format::Bzip2,
        ),
    ];
    for (path, format) in &files {
        // Scribble over the card first so a format that wrote nothing would show.
        c.call(
            Op::Write { offset: 0, len: 4 },
            Some(Bytes::from_static(b"junk")),
        )
        .await
        .expect("scribble");
        let im = image::open(path).expect("open");
        assert_eq!(im.format, *format, "{}", path.display());
        let rep = flash::flash(
            &c,
            c.params().expect("params"),
            im,
            flash::Options {
                bmap: None,
                verify: true,
                compress: true,
            },
            Arc::new(AtomicBool::new(false)),
            |_| {},
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(rep.verified && rep.image == raw.len() as u64, "{rep:?}");
        assert!(
            rep.zeroed >= 3 << 20 && rep.wire < rep.written,
            "zeros are not sent, text is compressed: {rep:?}"
        );
        assert_eq!(read_image(&img.0, raw.len()), raw, "{}", path.display());
    }
    for out in ["dump.img.zst", "dump.img"] {
        let p = dir.join(out);
        flash::dump(
            &c,
            c.params().expect("params"),
            &p,
            Arc::new(AtomicBool::new(false)),
            |_| {},
        )
        .await
        .expect("dump");
        let mut back = Vec::new();
        let mut im = image::open(&p).expect("open dump");
        std::io::Read::read_to_end(&mut im.reader, &mut back).expect("read dump");
        assert_eq!(back.len() as u64, SIZE);
        assert_eq!(&back[..raw.len()], &raw[..], "{out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Flash progress counts what the exporter acknowledged as written, never what is only queued
/// (issue 20 item 6): on a slow card, at every report the medium already holds at least as
/// many of the image's bytes as the report says; reports never go back, and the last one is
/// the image's length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_progress_never_runs_ahead_of_acknowledged_writes() {
    use jmp_devices::storage::{flash, image};
    use std::sync::atomic::AtomicBool;
    const LEN: usize = 4 << 20;
    let img = Img::new("progress");
    let slow = SlowRange {
        offset: 0,
        len: LEN as u64,
        delay: Duration::from_millis(20),
    };
    let (link, _srv) = mem_session(DeviceSet::new(
        "b",
        vec![driver(&img, true, None, Some(slow))],
    ));
    let (c, _t) = connect(link).await;
    // An image without zeros (every piece is a data write) and a card holding its complement,
    // so that each byte on the card tells whether it was written.
    let mut raw = vec![0u8; LEN];
    let mut x = 0x2545_f491_u32;
    for b in raw.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = (x as u8) | 1;
    }
    let not: Vec<u8> = raw.iter().map(|b| !b).collect();
    let card = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img.0)
        .expect("card");
    card.write_all_at(&not, 0).expect("prefill");
    let path = std::env::temp_dir().join(format!("jmp-progress-{}.img", std::process::id()));
    std::fs::write(&path, &raw).expect("image");
    let mut seen: Vec<u64> = Vec::new();
    let mut on_card = vec![0u8; LEN];
    let rep = tokio::time::timeout(
        GUARD,
        flash::flash(
            &c,
            c.params().expect("params"),
            image::open(&path).expect("open"),
            flash::Options {
                bmap: None,
                verify: false,
                compress: false,
            },
            Arc::new(AtomicBool::new(false)),
            |p| {
                card.read_exact_at(&mut on_card, 0).expect("read card");
                let written = on_card.iter().zip(&raw).filter(|(a, b)| a == b).count() as u64;
                assert!(
                    p.done <= written,
                    "progress says {} bytes written, the card holds {written}",
                    p.done
                );
                seen.push(p.done);
            },
        ),
    )
    .await
    .expect("hang guard")
    .expect("flash");
    let _ = std::fs::remove_file(&path);
    assert_eq!(rep.written, LEN as u64, "{rep:?}");
    assert_eq!(seen.last(), Some(&(LEN as u64)), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(
        seen.iter().filter(|d| **d < LEN as u64).count() >= 2,
        "progress along the way, not only at the end: {seen:?}"
    );
}

fn read_image(p: &std::path::Path, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    std::fs::File::open(p)
        .expect("image")
        .read_exact_at(&mut b, 0)
        .expect("pread");
    b
}

// ---------------------------------------------------------------------------------------------
// Another mount namespace holding a copy of the mount (`unshare -m`, `ip netns exec`, a
// container): unmounting must not wait for it.

/// A process in a mount namespace of its own, made while our mount existed, so it holds a
/// copy of it; killed by PID and reaped on drop.
struct Holder(std::process::Child);

impl Holder {
    fn start() -> Holder {
        use std::io::BufRead;
        let mut c = std::process::Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg("echo ready; exec sleep 600")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) must run here");
        let mut line = String::new();
        std::io::BufReader::new(c.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        assert_eq!(line.trim(), "ready", "unshare -m did not start");
        Holder(c)
    }

    /// `path` as this namespace sees it.
    fn sees(&self, path: &std::path::Path) -> PathBuf {
        let rel = path.strip_prefix("/").expect("absolute");
        PathBuf::from(format!("/proc/{}/root", self.0.id())).join(rel)
    }

    fn has_mount(&self, path: &std::path::Path) -> bool {
        let table = std::fs::read_to_string(format!("/proc/{}/mountinfo", self.0.id()))
            .expect("the holder's mountinfo");
        let want = path.to_string_lossy();
        table
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(want.as_ref()))
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A FUSE mount of an unserved client at a fresh directory (nothing here reads the medium);
/// the directory is removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if jmp_devices::places::is_mount_point(&self.0) {
            let _ = jmp_devices::places::detach(&self.0);
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch_mount(tag: &str) -> (Scratch, Arc<jmp_devices::storage::mount::Mounted>) {
    assert!(
        std::path::Path::new("/dev/fuse").exists(),
        "/dev/fuse is needed"
    );
    let dir = std::env::temp_dir().join(format!("jmp-storage-ns-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let m = jmp_devices::storage::mount::Mounted::mount(
        &dir,
        Client::new("sd", Retry::Fail),
        (0, 0),
        false,
    )
    .expect("mount");
    (Scratch(dir), Arc::new(m))
}

/// Runs `f` on a blocking thread; a hang guard turns a hang into a failure naming `what`.
async fn finishes(what: &str, f: impl FnOnce() + Send + 'static) {
    tokio::time::timeout(GUARD, tokio::task::spawn_blocking(f))
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
        .expect("no panic");
}

/// The bridge is dropped (the attachment ends) while a private mount namespace holds a copy
/// of its mount: the drop finishes, and the mount is gone here and there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_in_another_mount_namespace_does_not_hold_up_the_unmount() {
    let img = Img::new("ns");
    let d = driver(&img, true, None, None);
    let info = jmp_devices::info(d.as_ref());
    let (link, _srv) = mem_session(DeviceSet::new("b", vec![d]));
    let ctx = bridge_ctx("b", "storage-ns");
    std::fs::create_dir_all(&ctx.dev_dir).expect("dir");
    let _clean = Scratch(ctx.dev_dir.clone());
    let mut bridge = jmp_devices::storage::StorageBridge::create(&info, &ctx).expect("mount");
    let mnt = bridge.path().to_path_buf();
    let run = tokio::spawn(async move {
        let exit = bridge.run(link).await;
        (bridge, exit)
    });
    let m = mnt.clone();
    finishes("listing the mount", move || {
        assert!(std::fs::read_dir(&m).expect("ls").count() > 0);
    })
    .await;
    let holder = Holder::start();
    assert!(holder.has_mount(&mnt), "the new namespace holds a copy");
    // Dropping the bridge (the task's abort) unmounts, on a runtime thread.
    run.abort();
    let joined = tokio::time::timeout(GUARD, run)
        .await
        .expect("the bridge's drop hung on the other namespace's copy");
    assert!(joined.is_err_and(|e| e.is_cancelled()), "aborted");
    assert!(!jmp_devices::places::is_mount_point(&mnt), "unmounted here");
    assert!(
        !holder.has_mount(&mnt) || jmp_devices::places::is_dead_mount(&holder.sees(&mnt)),
        "the copy in the other namespace is gone or dead"
    );
}

/// Unmounting ends the connection: the other namespace's copy answers ENOTCONN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmounting_ends_the_connection_for_every_namespace() {
    let (dir, m) = scratch_mount("unmount");
    let holder = Holder::start();
    let there = holder.sees(&dir.0);
    let t = there.clone();
    finishes("listing the copy", move || {
        assert!(!jmp_devices::places::is_dead_mount(&t), "alive before");
    })
    .await;
    let m2 = m.clone();
    finishes("unmounting", move || m2.unmount()).await;
    assert!(
        !jmp_devices::places::is_mount_point(&dir.0),
        "unmounted here"
    );
    assert!(holder.has_mount(&dir.0), "the copy stays listed there");
    finishes("looking at the copy", move || {
        assert!(
            jmp_devices::places::is_dead_mount(&there),
            "the copy's connection is aborted"
        );
    })
    .await;
}

/// Both ways of ending a connection work on this kernel: through fusectl (mounted by the
/// test, as systemd mounts it) and by a forced unmount in a private namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_ends_through_fusectl_or_by_force() {
    use jmp_devices::storage::mount::{abort_by_force, abort_through_fusectl};
    // fusectl, mounted in a private mount namespace of a thread of its own: no mount of it
    // here, where tests running meanwhile copy our mounts into namespaces of their own (and
    // its unmount could find those busy); it goes with that namespace when the thread ends.
    let (dir, m) = scratch_mount("fusectl");
    let conn = m.connection().expect("a connection number");
    let ctl = Scratch(dir.0.with_extension("ctl"));
    std::fs::create_dir_all(&ctl.0).expect("dir");
    let (d, c) = (dir.0.clone(), ctl.0.clone());
    finishes("aborting through fusectl", move || {
        std::thread::spawn(move || {
            use nix::mount::MsFlags;
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare");
            nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .expect("make / private");
            nix::mount::mount(
                Some("fusectl"),
                &c,
                Some("fusectl"),
                MsFlags::empty(),
                None::<&str>,
            )
            .expect("mount fusectl");
            assert!(
                c.join(conn.to_string()).is_dir(),
                "fusectl lists connection {conn}"
            );
            abort_through_fusectl(&c, conn).expect("abort");
            assert!(jmp_devices::places::is_dead_mount(&d), "aborted");
        })
        .join()
        .expect("no panic");
    })
    .await;
    assert!(
        jmp_devices::places::is_dead_mount(&dir.0),
        "aborted here too: one connection"
    );
    finishes("unmounting", move || m.unmount()).await;
    assert!(!jmp_devices::places::is_mount_point(&dir.0));

    // By force, from a private namespace: our mount stays, dead.
    let (dir, m) = scratch_mount("force");
    let d = dir.0.clone();
    finishes("aborting by force", move || {
        abort_by_force(&d).expect("abort");
        assert!(
            jmp_devices::places::is_mount_point(&d),
            "the forced unmount was in the other namespace only"
        );
        assert!(jmp_devices::places::is_dead_mount(&d), "aborted");
    })
    .await;
    finishes("unmounting", move || m.unmount()).await;
    assert!(!jmp_devices::places::is_mount_point(&dir.0));
}

/// Polls `f` until it holds; the budgets signal nothing a test could await, so their
/// counters are looked at every few milliseconds (at most `GUARD`).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(t0.elapsed() < GUARD, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn load(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_answers_holds_at_most_its_budget() {
    use jmp_devices::budget::Limits;
    use jmp_protocol::kinds::storage::{frame, Request};
    let img = Img::new("budget");
    let devices = DeviceSet::new("b", vec![driver(&img, false, None, None)]);
    let usage = devices.usage().clone();
    let limits = Limits {
        session_bytes: 8 << 20,
        channel_bytes: 4 << 20,
        session_jobs: 4,
        channel_jobs: 4,
        session_heavy: 1,
        channels: 8,
    };
    let (link, srv) = jmp_devices::testing::mem_session_with(devices, limits);
    const READS: u64 = 100;
    const LEN: u64 = 1 << 20;
    let mut pipes = Vec::new();
    for _ in 0..3 {
        let (mut p, _) = link.open_stream("sd", Bytes::new()).await.expect("open");
        // All requests in one chunk: the pipe's buffer (like QUIC's window) counts chunks,
        // and the exporter stops taking them once its budget is used up.
        let mut all = Vec::new();
        for i in 0..READS {
            let r = Request {
                id: i + 1,
                op: Op::Read {
                    offset: (i * LEN) % (SIZE - LEN),
                    len: LEN,
                    compress: false,
                },
            };
            all.extend_from_slice(&frame(&r));
        }
        p.tx.send(Bytes::from(all)).await.expect("send");
        pipes.push(p);
    }
    // Stuck: no job runs, and the session's budget has no room for another read.
    let cost = jmp_devices::storage::driver::cost(&Op::Read {
        offset: 0,
        len: LEN,
        compress: false,
    }) as u64;
    until("the exporter stops reading requests", || {
        load(&usage.jobs) == 0 && load(&usage.bytes) + cost > limits.session_bytes as u64
    })
    .await;
    let read = load(&usage.job_bytes);
    // What the exporter read from the medium is what its budget holds plus what the pipes
    // buffer (16 chunks each: 8 answers of a frame and its data), not the 300 MiB asked for.
    let bound = limits.session_bytes as u64 + 3 * 8 * LEN;
    assert!(
        read <= bound,
        "read {read} bytes for a client that reads nothing; its budget allows {bound}"
    );
    assert!(load(&usage.bytes) <= limits.session_bytes as u64);
    // Back-pressure, not failure: once the client reads, every answer comes.
    for p in &mut pipes {
        let mut r = jmp_protocol::kinds::storage::FrameReader::<
            jmp_protocol::kinds::storage::Response,
        >::new();
        let mut answers = 0;
        while answers < READS {
            let c = tokio::time::timeout(GUARD, p.rx.recv())
                .await
                .expect("answers keep coming")
                .expect("pipe")
                .expect("not finished");
            r.push(c);
            while let Some((resp, payload)) = r.next_frame().expect("frame") {
                assert!(
                    matches!(
                        resp,
                        jmp_protocol::kinds::storage::Response::Data { len: LEN, .. }
                    ),
                    "{resp:?}"
                );
                assert_eq!(payload.iter().map(|b| b.len() as u64).sum::<u64>(), LEN);
                answers += 1;
            }
        }
    }
    drop(pipes);
    srv.abort();
    until("the budget is given back", || load(&usage.bytes) == 0).await;
}

/// A sparse image large enough that hashing it takes seconds.
struct Sparse(PathBuf);

impl Sparse {
    fn new(tag: &str, size: u64) -> Sparse {
        let p = std::env::temp_dir().join(format!("jmp-sparse-{tag}-{}.img", std::process::id()));
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(size))
            .expect("sparse image");
        Sparse(p)
    }
}

impl Drop for Sparse {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashes_stop_when_their_channel_or_session_ends() {
    use jmp_protocol::kinds::storage::{frame, DeviceRequest, Request};
    const BIG: u64 = 64 << 30;
    let img = Sparse::new("hash", BIG);
    let drv: Arc<dyn Driver> =
        Arc::new(StorageDriver::start("sd", img.0.clone(), false, None, None));
    let devices = DeviceSet::new("b", vec![drv]);
    let usage = devices.usage().clone();
    let (link, srv) = mem_session(devices.clone());
    // A hash on a channel that the client then resets.
    let (mut p, _) = link.open_stream("sd", Bytes::new()).await.expect("open");
    let hash = Request {
        id: 1,
        op: Op::Hash {
            offset: 0,
            len: BIG,
        },
    };
    p.tx.send(frame(&hash)).await.expect("send");
    until("the hash runs", || {
        load(&usage.jobs) == 1 && load(&usage.job_bytes) > 0
    })
    .await;
    p.tx.reset(0);
    until("the hash stops", || load(&usage.jobs) == 0).await;
    let after_reset = load(&usage.job_bytes);
    assert!(
        after_reset < BIG,
        "the hash ran to its end ({after_reset} bytes) although its channel was reset"
    );
    // Two hashes (one on a channel, one as a device request) stop when the session ends.
    let (mut p, _) = link.open_stream("sd", Bytes::new()).await.expect("open");
    p.tx.send(frame(&hash)).await.expect("send");
    let l2 = link.clone();
    let req = tokio::spawn(async move {
        let body = jmp_protocol::codec::to_bytes(&DeviceRequest::Hash {
            offset: 0,
            len: BIG,
        });
        l2.request("sd", body, Duration::from_secs(3600)).await
    });
    until("both hashes run", || load(&usage.jobs) == 2).await;
    let started = load(&usage.job_bytes);
    srv.abort();
    until("both hashes stop", || load(&usage.jobs) == 0).await;
    let done = load(&usage.job_bytes) - started;
    assert!(
        done < BIG,
        "a hash ran to its end ({done} bytes in all) although its session ended"
    );
    assert!(req.await.expect("task").is_err(), "no answer after the end");
    assert_eq!(load(&usage.bytes), 0, "everything given back");
}
