//! Storage end to end: a simulated card mounted by `jmp attach` (real FUSE, real kernel) and
//! used with dd, cmp, fdisk/sfdisk, fio, a loop mount of the ext4 partition (checked with
//! e2fsck on the exporter's side), bmaptool and qemu-img; `jmp storage flash` of .zst images
//! with and without bmap onto an image file, and the bad inputs (corrupt and truncated images,
//! a bmap whose checksums lie, an image larger than the medium, a read-only medium, a full disk
//! on the lab host reported with exactly what was written); kill -9 of the mount's process and
//! of jmpd mid-read.

use jmp_e2e::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(120);
const SIM: u64 = 128 << 20;

/// Tools the tests run; all are installed by scripts/install-test-deps.sh.
const TOOLS: &[&str] = &[
    "dd", "cmp", "fdisk", "sfdisk", "fio", "losetup", "e2fsck", "bmaptool", "qemu-img", "zstd",
    "mount", "umount",
];

/// `Ok` if FUSE and every tool of [`TOOLS`] are here (for `require!`).
fn tools() -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("no /dev/fuse (the fuse3 package, and a kernel with FUSE)".into());
    }
    TOOLS.iter().try_for_each(|t| skips::tool(t).map(drop))
}

/// Runs a shell command line; its output, asserting success.
fn sh(env: &TestEnv, label: &str, script: &str) -> RunOutput {
    let mut c = command("bash");
    c.args(["-euo", "pipefail", "-c", script]);
    let out = run(label, c, &env.logs, T);
    assert!(
        out.status.success(),
        "{label}: {script}\n{}\n{}",
        out.stdout,
        out.stderr
    );
    out
}

/// Unmounts on drop (a test that fails halfway leaves no mount behind).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = command("umount").arg(&self.0).status();
    }
}

/// Detaches a loop device on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = command("losetup").args(["-d", &self.0]).status();
    }
}

/// Lazily unmounts whatever is left at `path` on drop (a killed mount's dead FUSE mount).
struct MountPoint(PathBuf);

impl Drop for MountPoint {
    fn drop(&mut self) {
        if jmp_devices_is_mounted(&self.0) || std::fs::metadata(&self.0).is_err() {
            let _ = command("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn mount_of(v: &serde_json::Value, dev: &str) -> PathBuf {
    let d = device(v, dev);
    assert_eq!(d["endpoints"][0]["type"], "mount", "{v}");
    PathBuf::from(local_of(v, dev))
}

fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .read_exact_at(&mut b, off)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    b
}

/// The sim's layout (devices/src/storage/sim.rs): p1 at 1 MiB (32 MiB), p2 after it.
fn layout(size: u64) -> [(u64, u64); 2] {
    let p2 = (1 << 20) + (32 << 20);
    [(1 << 20, 32 << 20), (p2, size - p2 - (1 << 20))]
}

#[test]
fn the_mounted_card_works_with_real_tools() {
    require!(tools());
    let env = TestEnv::new("storage-tools");
    let img = env.root.join("sd.img");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "sboard",
        "127.0.0.1:0",
        &format!(
            "sd: {{type: storage-sim, size: 128MiB, path: {}}}",
            img.display()
        ),
    ));
    let (attach, v) = env.attach(&jmpd, &[]);
    let m = mount_of(&v, "sd");
    let _guard = MountPoint(m.clone());
    assert_eq!(device(&v, "sd")["summary"], "128 MiB rw", "{v}");
    let mut names: Vec<String> = std::fs::read_dir(&m)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["disk", "p1", "p2"]);
    let [(p1_off, p1_len), (p2_off, p2_len)] = layout(SIM);
    assert_eq!(std::fs::metadata(m.join("disk")).expect("stat").len(), SIM);
    assert_eq!(std::fs::metadata(m.join("p1")).expect("stat").len(), p1_len);
    assert_eq!(std::fs::metadata(m.join("p2")).expect("stat").len(), p2_len);

    // fdisk and sfdisk read the table through the mount.
    let disk = m.join("disk");
    let out = sh(&env, "fdisk", &format!("fdisk -l {}", disk.display()));
    assert!(
        out.stdout.contains("134217728 bytes") && out.stdout.contains("W95 FAT32"),
        "{}",
        out.stdout
    );
    let out = sh(&env, "sfdisk", &format!("sfdisk -d {}", disk.display()));
    assert!(
        out.stdout.contains(&format!(
            "start=        {}, size=       {}",
            p1_off / 512,
            p1_len / 512
        )),
        "{}",
        out.stdout
    );

    // Two readers of different partitions at once; each copy is the exporter's bytes.
    let out = sh(
        &env,
        "dd-two",
        &format!(
            "dd if={m}/p1 of={r}/p1.bin bs=1M status=none & a=$!; dd if={m}/p2 of={r}/p2.bin bs=256k status=none & b=$!; wait $a; wait $b;\
             cmp {r}/p1.bin <(dd if={img} bs=1M skip=1 count=32 status=none);\
             cmp {r}/p2.bin <(dd if={img} bs=1M skip=33 count={p2m} status=none); echo same",
            m = m.display(),
            r = env.root.path().display(),
            img = img.display(),
            p2m = p2_len >> 20
        ),
    );
    assert!(out.stdout.contains("same"));

    // Loop-mount the ext4 partition: read the sim's file, write one, unmount, and the
    // exporter's image passes e2fsck and holds the new file.
    let mnt = env.root.join("rootfs");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    sh(
        &env,
        "mount",
        &format!("mount -o loop {} {}", m.join("p2").display(), mnt.display()),
    );
    {
        let _m = Mounted(mnt.clone());
        assert_eq!(
            std::fs::read_to_string(mnt.join("hello.txt")).expect("hello.txt"),
            "hello from the simulated board\n"
        );
        std::fs::write(mnt.join("written.txt"), "written through jmp\n").expect("write");
    }
    assert!(!jmp_devices_is_mounted(&mnt), "the loop mount is gone");
    let out = sh(
        &env,
        "e2fsck",
        &format!(
            "losetup --find --show --read-only -o {p2_off} --sizelimit {p2_len} {}",
            img.display()
        ),
    );
    let lo = Loop(out.stdout.trim().to_string());
    sh(&env, "e2fsck", &format!("e2fsck -n -f {}", lo.0));
    let out = sh(
        &env,
        "debugfs",
        &format!("debugfs -R 'cat /written.txt' {} 2>/dev/null", lo.0),
    );
    assert_eq!(out.stdout.trim(), "written through jmp");
    drop(lo);

    // fio: random writes with verification (read back through the mount), then random reads.
    let fio = |rw: &str, extra: &str| {
        sh(
            &env,
            "fio",
            &format!(
                "fio --name={rw} --filename={} --rw={rw} --bs=4k --size=16M --direct=1 --ioengine=libaio --iodepth=16 {extra} --output-format=terse --warnings-fatal",
                m.join("p1").display()
            ),
        )
    };
    fio("randwrite", "--verify=crc32c --do_verify=1");
    fio("randread", "--runtime=2 --time_based");
    // What the mount reads is what the exporter holds.
    sh(
        &env,
        "cmp-p1",
        &format!(
            "cmp {}/p1 <(dd if={} bs=1M skip=1 count=32 status=none)",
            m.display(),
            img.display()
        ),
    );

    // bmaptool copy onto the mounted disk: the mapped ranges land on the exporter.
    let b = env.root.join("b.img");
    sh(
        &env,
        "bmaptool",
        &format!(
            "truncate -s 128M {b}; dd if=/dev/urandom of={b} bs=1M count=3 seek=70 conv=notrunc status=none;\
             bmaptool -q create -o {b}.bmap {b}; bmaptool -q copy --bmap {b}.bmap {b} {disk}",
            b = b.display(),
            disk = disk.display()
        ),
    );
    assert_eq!(
        read_at(&img, 70 << 20, 3 << 20),
        read_at(&b, 70 << 20, 3 << 20)
    );

    // qemu-img sees a raw disk of the right size and converts it faithfully.
    let out = sh(
        &env,
        "qemu-img",
        &format!("qemu-img info {}", disk.display()),
    );
    assert!(
        out.stdout.contains("file format: raw") && out.stdout.contains("134217728 bytes"),
        "{}",
        out.stdout
    );
    let q = env.root.join("q.qcow2");
    let out = sh(
        &env,
        "qemu-img",
        &format!(
            "qemu-img convert -O qcow2 {d} {q}; qemu-img compare {d} {q}",
            d = disk.display(),
            q = q.display()
        ),
    );
    assert!(out.stdout.contains("identical"), "{}", out.stdout);

    // Ending the attachment unmounts.
    let mut attach = attach;
    attach.stop();
    assert!(
        poll_until(T, || !jmp_devices_is_mounted(&m)),
        "{} still mounted",
        m.display()
    );
}

fn jmp_devices_is_mounted(p: &Path) -> bool {
    let want = p.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// A source image: 64 MiB, random data in two places, zeros elsewhere.
fn source(env: &TestEnv) -> PathBuf {
    let src = env.root.join("src.img");
    sh(
        env,
        "src",
        &format!(
            "truncate -s 64M {s}; dd if=/dev/urandom of={s} bs=1M count=6 seek=1 conv=notrunc status=none;\
             dd if=/dev/urandom of={s} bs=1M count=3 seek=40 conv=notrunc status=none; zstd -q -f {s} -o {s}.zst",
            s = src.display()
        ),
    );
    src
}

fn flash(env: &TestEnv, jmpd: &Jmpd, dev: &str, args: &[&str]) -> RunOutput {
    let mut c = env.jmp();
    c.args(["storage", "flash", dev])
        .args(args)
        .arg("--exporter")
        .arg(jmpd.addr.to_string())
        .arg("--token-file")
        .arg(&env.token_file)
        .arg("--fingerprint")
        .arg(&jmpd.fingerprint);
    run("jmp-storage-flash", c, &env.logs, T)
}

#[test]
fn flash_zst_with_and_without_bmap_and_bad_input_fails_clearly() {
    require!(tools());
    let env = TestEnv::new("storage-flash");
    let card = env.root.join("card.img");
    let ro = env.root.join("ro.img");
    // A small tmpfs as the lab host's disk: the image file there cannot grow past 16 MiB.
    let small = env.root.join("small");
    std::fs::create_dir_all(&small).expect("mkdir");
    sh(
        &env,
        "tmpfs",
        &format!(
            "mount -t tmpfs -o size=16m jmp-e2e-small {}",
            small.display()
        ),
    );
    let _small = Mounted(small.clone());
    let full = small.join("full.img");
    sh(
        &env,
        "images",
        &format!(
            "truncate -s 64M {}; truncate -s 64M {}; truncate -s 64M {}",
            card.display(),
            ro.display(),
            full.display()
        ),
    );
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "fboard",
        "127.0.0.1:0",
        &format!(
            "card: {{type: storage, path: {}, writable: true}}\nro: {{type: storage, path: {}}}\nfull: {{type: storage, path: {}, writable: true}}",
            card.display(),
            ro.display(),
            full.display()
        ),
    ));
    let src = source(&env);
    let zst = format!("{}.zst", src.display());

    // Without bmap: zero runs are zeroed on the exporter, the rest written; byte-identical.
    let out = flash(&env, &jmpd, "card", &[&zst, "--verify"]);
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("verified on the exporter") && out.stdout.contains("flushed"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("flashing 100%"),
        "a line per 10% when not on a terminal: {}",
        out.stderr
    );
    sh(
        &env,
        "cmp",
        &format!("cmp {} {}", src.display(), card.display()),
    );

    // With bmap, onto a blank card: only mapped ranges are written; byte-identical again.
    sh(
        &env,
        "blank",
        &format!("truncate -s 0 {c}; truncate -s 64M {c}", c = card.display()),
    );
    sh(
        &env,
        "bmap",
        &format!("bmaptool -q create -o {s}.bmap {s}", s = src.display()),
    );
    let bmap = format!("{}.bmap", src.display());
    let out = flash(&env, &jmpd, "card", &[&zst, "--bmap", &bmap, "--verify"]);
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("left out by the bmap"),
        "{}",
        out.stdout
    );
    sh(
        &env,
        "cmp",
        &format!("cmp {} {}", src.display(), card.display()),
    );

    // The raw image (holes found with SEEK_DATA, never read), with and without its bmap.
    for extra in [vec![], vec!["--bmap", bmap.as_str()]] {
        sh(
            &env,
            "blank",
            &format!("truncate -s 0 {c}; truncate -s 64M {c}", c = card.display()),
        );
        let mut args = vec![src.to_str().unwrap(), "--verify"];
        args.extend(extra.iter().copied());
        let out = flash(&env, &jmpd, "card", &args);
        assert!(
            out.status.success(),
            "{:?}: {}\n{}",
            args,
            out.stdout,
            out.stderr
        );
        sh(
            &env,
            "cmp",
            &format!("cmp {} {}", src.display(), card.display()),
        );
    }

    // A bmap whose checksum does not match the image.
    let lying = env.root.join("lying.bmap");
    let text = std::fs::read_to_string(&bmap).expect("bmap");
    let i = text.find("chksum=\"").expect("a range checksum") + 8;
    let mut t = text.into_bytes();
    t[i] = if t[i] == b'0' { b'1' } else { b'0' };
    std::fs::write(&lying, t).expect("write");
    let out = flash(
        &env,
        &jmpd,
        "card",
        &[&zst, "--bmap", lying.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("bmap checksum mismatch"),
        "{}",
        out.stderr
    );

    // A corrupt and a truncated .zst.
    let bad = env.root.join("bad.img.zst");
    let mut z = std::fs::read(&zst).expect("zst");
    let mid = z.len() / 2;
    for b in &mut z[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&bad, &z).expect("write");
    let out = flash(&env, &jmpd, "card", &[bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("truncated or corrupt"),
        "{}",
        out.stderr
    );
    let cut = env.root.join("cut.img.zst");
    std::fs::write(&cut, &z[..mid]).expect("write");
    let out = flash(&env, &jmpd, "card", &[cut.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("truncated or corrupt"),
        "{}",
        out.stderr
    );

    // An image larger than the medium: refused before anything is written.
    let big = env.root.join("big.img");
    sh(&env, "big", &format!("truncate -s 80M {}", big.display()));
    let out = flash(&env, &jmpd, "card", &[big.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("larger than the medium") && out.stderr.contains("nothing was written"),
        "{}",
        out.stderr
    );

    // A read-only medium.
    let out = flash(&env, &jmpd, "ro", &[&zst]);
    assert_eq!(out.status.code(), Some(8), "{}", out.stderr);
    assert!(out.stderr.contains("read-only"), "{}", out.stderr);

    // The lab host's disk fills up midway: the error says so, and the ranges it reports as
    // acknowledged are on the exporter's image exactly.
    let rnd = env.root.join("rnd.img");
    sh(
        &env,
        "rnd",
        &format!(
            "dd if=/dev/urandom of={} bs=1M count=40 status=none",
            rnd.display()
        ),
    );
    let out = flash(
        &env,
        &jmpd,
        "full",
        &[rnd.to_str().unwrap(), "--no-compress"],
    );
    assert_eq!(out.status.code(), Some(8), "{}", out.stderr);
    assert!(
        out.stderr.contains("the lab host's disk is full"),
        "{}",
        out.stderr
    );
    let ranges = out
        .stderr
        .split("byte ranges ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("no ranges in {}", out.stderr));
    let mut acked = 0;
    for r in ranges.split(", ") {
        let (s, e) = r.split_once("..").unwrap_or_else(|| panic!("range {r:?}"));
        let (s, e): (u64, u64) = (s.parse().expect("start"), e.parse().expect("end"));
        assert_eq!(
            read_at(&full, s, (e - s) as usize),
            read_at(&rnd, s, (e - s) as usize),
            "range {s}..{e}"
        );
        acked += e - s;
    }
    assert!(
        acked > 0 && acked < 40 << 20,
        "{acked} bytes acknowledged: {}",
        out.stderr
    );
}

#[test]
fn a_killed_mount_is_cleaned_up_by_the_next_one() {
    require!(tools());
    let env = TestEnv::new("storage-kill");
    let img = env.root.join("sd.img");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "kboard",
        "127.0.0.1:0",
        &format!(
            "sd: {{type: storage-sim, size: 64MiB, path: {}}}",
            img.display()
        ),
    ));
    let want = read_at(&img, 0, 4096);

    // jmp-mount on its own, killed: a dead mount; the next jmp-mount cleans it and serves.
    let mnt = env.root.join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let _guard = MountPoint(mnt.clone());
    let start = || {
        let mut c = command(bin("jmp-mount"));
        c.arg("--exporter")
            .arg(jmpd.addr.to_string())
            .arg("--token-file")
            .arg(&env.token_file)
            .arg("--fingerprint")
            .arg(&jmpd.fingerprint)
            .arg(&mnt);
        let mut p = Proc::spawn("jmp-mount", c, &env.logs);
        p.expect_line(READY, "jmp-mount's ready line", |l| {
            l.contains("mounted at")
        });
        p
    };
    let mut first = start();
    assert_eq!(read_at(&mnt.join("disk"), 0, 4096), want);
    first.kill9();
    let e = std::fs::metadata(mnt.join("disk")).expect_err("a dead mount");
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    let mut second = start();
    assert_eq!(read_at(&mnt.join("disk"), 0, 4096), want);
    second.stop();
    assert!(
        poll_until(T, || !jmp_devices_is_mounted(&mnt)),
        "jmp-mount unmounts on SIGTERM"
    );

    // The same with jmp attach, which serves the mount in-process.
    let (mut a, v) = env.attach(&jmpd, &[]);
    let m = mount_of(&v, "sd");
    let _g2 = MountPoint(m.clone());
    assert_eq!(read_at(&m.join("disk"), 0, 4096), want);
    a.kill9();
    // Its state files name a dead process; the next attach replaces them.
    let (mut b, v) = env.attach(&jmpd, &[]);
    assert_eq!(mount_of(&v, "sd"), m);
    assert_eq!(read_at(&m.join("disk"), 0, 4096), want);
    b.stop();
}

#[test]
fn killing_jmpd_mid_read_gives_an_error_or_the_right_data() {
    require!(tools());
    let env = TestEnv::new("storage-jmpd-kill");
    let img = env.root.join("sd.img");
    let port = free_udp_port();
    let yaml = env.exporter_yaml(
        "jboard",
        &format!("127.0.0.1:{port}"),
        &format!(
            "sd: {{type: storage-sim, size: 128MiB, path: {}}}",
            img.display()
        ),
    );
    let mut jmpd = env.start_jmpd(&yaml);
    let (_attach, v) = env.attach(&jmpd, &[]);
    let m = mount_of(&v, "sd");
    let _g = MountPoint(m.clone());
    // Small direct reads make the copy take long enough to be cut in the middle.
    let out = env.root.join("copy.bin");
    let mut c = command("dd");
    c.arg(format!("if={}", m.join("disk").display()))
        .arg(format!("of={}", out.display()))
        .args(["bs=16k", "iflag=direct", "status=none"]);
    let mut dd = Proc::spawn("dd", c, &env.logs);
    assert!(
        poll_until(T, || std::fs::metadata(&out)
            .is_ok_and(|m| m.len() >= 4 << 20)),
        "dd makes progress"
    );
    jmpd.proc.kill9();
    // The exporter comes back on the same port; the mount's requests are sent again.
    let _jmpd2 = env.start_jmpd(&yaml);
    let status = dd.expect_exit(T);
    raw_stderr(&format!(
        "storage: dd across a jmpd kill -9 ended with {status}"
    ));
    if status.success() {
        sh(
            &env,
            "cmp",
            &format!("cmp {} {}", out.display(), img.display()),
        );
    } else {
        // An error is fine; what was copied before it is still the card's.
        let got = std::fs::read(&out).expect("copy");
        assert_eq!(
            got,
            read_at(&img, 0, got.len()),
            "the partial copy is the card's data"
        );
    }
}

#[test]
fn a_card_shared_with_the_board_takes_writes_only_while_it_is_off() {
    require!(tools());
    let env = TestEnv::new("storage-shared");
    let img = env.root.join("sd.img");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "mux",
        "127.0.0.1:0",
        &format!(
            "sd: {{type: storage-sim, size: 64MiB, path: {}, sharedWithBoard: true}}\npower: {{type: power-sim}}",
            img.display()
        ),
    ));
    let src = source(&env);
    let zst = format!("{}.zst", src.display());
    // The simulated board starts powered: the card is the board's.
    let out = flash(&env, &jmpd, "sd", &[&zst]);
    assert_eq!(out.status.code(), Some(8), "{}", out.stderr);
    assert!(out.stderr.contains("power is on"), "{}", out.stderr);
    let mut c = env.jmp();
    c.args(["power", "off", "--exporter"])
        .arg(jmpd.addr.to_string())
        .arg("--token-file")
        .arg(&env.token_file)
        .arg("--fingerprint")
        .arg(&jmpd.fingerprint);
    let off = run("jmp-power-off", c, &env.logs, T);
    assert!(off.status.success(), "{}", off.stderr);
    let out = flash(&env, &jmpd, "sd", &[&zst, "--verify"]);
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    sh(
        &env,
        "cmp",
        &format!("cmp {} {}", src.display(), img.display()),
    );
}

/// The coherence promise of `jmp storage flash`: once it exits 0, a read through the mount of
/// `jmp attach` sees the new bytes, although the kernel keeps the mount's pages across opens.
/// Each round caches the region (a read before), flashes different bytes while a second
/// reader keeps reading it (pages cached during the flash must not survive it), and reads
/// again at once. The flash goes through the attachment, the one way beside a running one (a
/// flash on a connection of its own would replace the attachment, as any newer session of
/// the same client does); half the rounds name it (`--exporter cboard`, as jmp-testing does),
/// half let `jmp` find the only one.
#[test]
fn a_read_through_the_mount_right_after_a_flash_sees_the_new_bytes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    require!(tools());
    const ROUNDS: usize = 20;
    // The card's first sector (its partition table) is kept, so the mount's files stay the
    // same; the rest of the region is new in every round.
    const REGION: usize = 4 << 20;
    let env = TestEnv::new("storage-coherence");
    let img = env.root.join("sd.img");
    let jmpd = env.start_jmpd(&env.exporter_yaml(
        "cboard",
        "127.0.0.1:0",
        &format!(
            "sd: {{type: storage-sim, size: 64MiB, path: {}}}",
            img.display()
        ),
    ));
    let (mut attach, v) = env.attach(&jmpd, &[]);
    let m = mount_of(&v, "sd");
    let _guard = MountPoint(m.clone());
    let disk = m.join("disk");
    let mbr = read_at(&img, 0, 512);
    let image = env.root.join("round.raw");
    for round in 0..ROUNDS {
        let before = read_at(&disk, 0, REGION);
        let mut data = vec![0u8; REGION];
        data[..512].copy_from_slice(&mbr);
        let mut f = std::fs::File::open("/dev/urandom").expect("urandom");
        std::io::Read::read_exact(&mut f, &mut data[512..]).expect("random bytes");
        assert_ne!(before, data, "round {round}: new bytes differ from the old");
        std::fs::write(&image, &data).expect("image");

        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (stop, disk) = (stop.clone(), disk.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let _ = read_at(&disk, 0, REGION);
                    reads += 1;
                }
                reads
            })
        };
        let mut c = env.jmp();
        c.args(["storage", "flash", "sd"]).arg(&image);
        if round % 2 == 1 {
            c.args(["--exporter", "cboard"]);
        }
        let out = run("jmp-storage-flash-attached", c, &env.logs, T);
        stop.store(true, Ordering::Relaxed);
        let reads = reader.join().expect("the reader");
        assert!(
            out.status.success(),
            "round {round}: {}\n{}",
            out.stdout,
            out.stderr
        );
        assert!(reads > 0, "round {round}: the reader read");
        assert_eq!(
            read_at(&img, 0, REGION),
            data,
            "round {round}: the exporter's card has the image"
        );
        let after = read_at(&disk, 0, REGION);
        let stale = after
            .chunks(4096)
            .zip(data.chunks(4096))
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            stale,
            0,
            "round {round}: {stale} of {} pages read through the mount right after the flash are not the flashed bytes",
            REGION / 4096
        );
    }
    attach.stop();
}
