//! The simulated card of `storage-sim`: a sparse image file with a partition table (MBR by
//! mbrman, or GPT by gpt), a FAT boot partition and an ext4 root partition holding a
//! `hello.txt`. The file systems are made by `mkfs.vfat` and `mkfs.ext4` (dosfstools,
//! e2fsprogs) when installed, written straight into the image at the partitions' offsets;
//! without them the partitions stay empty and a warning says so. Made once, at first start:
//! an existing image of the right size is used as it is.

use super::spec::Table;
use std::io;
use std::path::Path;
use std::process::Command;

/// Where the boot partition starts (the usual 1 MiB alignment gap) and its size.
pub const BOOT_START: u64 = 1 << 20;
pub const BOOT_SIZE: u64 = 32 << 20;
/// What the root partition's `hello.txt` says.
pub const HELLO: &str = "hello from the simulated board\n";

const SECTOR: u64 = 512;

/// The partitions the sim lays out on a card of `size` bytes: (offset, length).
pub fn layout(size: u64, table: Table) -> [(u64, u64); 2] {
    // GPT keeps its backup table in the last 33 sectors; leave the last MiB free either way.
    let _ = table;
    let root_start = BOOT_START + BOOT_SIZE;
    let root_len = size - root_start - (1 << 20);
    [(BOOT_START, BOOT_SIZE), (root_start, root_len)]
}

/// Makes the image at `path` unless an image of `size` bytes is there already.
pub fn ensure_image(path: &Path, size: u64, table: Table) -> io::Result<()> {
    if let Ok(m) = std::fs::metadata(path) {
        if m.len() == size {
            return Ok(());
        }
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists with {} bytes, not the {size} configured; remove it to make a new card",
                path.display(),
                m.len()
            ),
        ));
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    // Made under a temporary name and renamed: a crash midway leaves no half card, and two
    // exporters starting at once both end with a whole one.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let r = make(&tmp, size, table);
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return r;
    }
    std::fs::rename(&tmp, path)
}

fn make(path: &Path, size: u64, table: Table) -> io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    f.set_len(size)?;
    let parts = layout(size, table);
    match table {
        Table::Mbr => write_mbr(&f, &parts)?,
        Table::Gpt => write_gpt(&f, size, &parts)?,
    }
    f.sync_all()?;
    drop(f);
    format(path, &parts);
    Ok(())
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn write_mbr(f: &std::fs::File, parts: &[(u64, u64); 2]) -> io::Result<()> {
    let mut dev = f;
    let sig: [u8; 4] = rand_sig();
    let mut mbr = mbrman::MBR::new_from(&mut dev, SECTOR as u32, sig).map_err(other)?;
    let types = [0x0c_u8, 0x83];
    for (i, ((off, len), sys)) in parts.iter().zip(types).enumerate() {
        mbr[i + 1] = mbrman::MBRPartitionEntry {
            boot: if i == 0 {
                mbrman::BOOT_ACTIVE
            } else {
                mbrman::BOOT_INACTIVE
            },
            first_chs: mbrman::CHS::empty(),
            sys,
            last_chs: mbrman::CHS::empty(),
            starting_lba: (off / SECTOR) as u32,
            sectors: (len / SECTOR) as u32,
        };
    }
    mbr.write_into(&mut dev).map_err(other)
}

fn write_gpt(f: &std::fs::File, size: u64, parts: &[(u64, u64); 2]) -> io::Result<()> {
    let mut dev = f.try_clone()?;
    let pmbr =
        gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(size / SECTOR - 1).unwrap_or(u32::MAX));
    pmbr.overwrite_lba0(&mut dev).map_err(other)?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .create_from_device(dev, None)
        .map_err(other)?;
    let names = ["boot", "rootfs"];
    let types = [gpt::partition_types::EFI, gpt::partition_types::LINUX_FS];
    for (i, ((off, len), ty)) in parts.iter().zip(types).enumerate() {
        disk.add_partition_at(names[i], i as u32 + 1, off / SECTOR, len / SECTOR, ty, 0)
            .map_err(other)?;
    }
    disk.write().map_err(other)?;
    Ok(())
}

fn rand_sig() -> [u8; 4] {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
        .unwrap_or(0x6a6d_7021);
    (t ^ std::process::id()).to_le_bytes()
}

fn tool(name: &str) -> Option<std::path::PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// Makes FAT on the boot partition and ext4 (with `hello.txt`) on the root, in place.
fn format(path: &Path, parts: &[(u64, u64); 2]) {
    let (boot_off, boot_len) = parts[0];
    let (root_off, root_len) = parts[1];
    match tool("mkfs.vfat") {
        Some(mkfs) => {
            let out = Command::new(mkfs)
                .arg("--offset")
                .arg((boot_off / SECTOR).to_string())
                .args(["-n", "BOOT"])
                .arg(path)
                .arg((boot_len / 1024).to_string())
                .output();
            report("mkfs.vfat", out);
        }
        None => tracing::warn!(
            "mkfs.vfat not installed (dosfstools): the simulated card's boot partition stays empty"
        ),
    }
    match tool("mkfs.ext4") {
        Some(mkfs) => {
            let content = std::env::temp_dir().join(format!("jmp-sim-root-{}", std::process::id()));
            let _ = std::fs::create_dir_all(&content);
            let _ = std::fs::write(content.join("hello.txt"), HELLO);
            let out = Command::new(mkfs)
                .args(["-q", "-F", "-L", "rootfs"])
                .arg("-E")
                .arg(format!("offset={root_off}"))
                .arg("-d")
                .arg(&content)
                .arg(path)
                .arg(format!("{}k", root_len / 1024))
                .output();
            let _ = std::fs::remove_dir_all(&content);
            report("mkfs.ext4", out);
        }
        None => tracing::warn!(
            "mkfs.ext4 not installed (e2fsprogs): the simulated card's root partition stays empty"
        ),
    }
}

fn report(what: &str, out: io::Result<std::process::Output>) {
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => tracing::warn!(
            "{what} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => tracing::warn!("{what}: {e}"),
    }
}
