//! The partitions of a medium, read from its MBR (mbrman) or GPT (gpt) through any
//! positioned reader (over the link, the client's storage channel). A protective MBR (type
//! 0xee) means GPT. Extended-partition containers are not files of their own; logical
//! partitions are numbered from 5, as Linux does.

use std::io::{self, Read, Seek, SeekFrom, Write};

/// One partition: its number (`p1` is 1) and where it lies on the medium, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub offset: u64,
    pub len: u64,
}

/// Reads `buf.len()` bytes at an offset of the medium.
pub type ReadAt<'a> = &'a (dyn Fn(u64, &mut [u8]) -> io::Result<()> + Send + Sync);

/// A read-only `Read + Seek` view of the medium for the partition table crates.
struct View<'a> {
    read_at: ReadAt<'a>,
    size: u64,
    pos: u64,
}

impl std::fmt::Debug for View<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "View({} bytes at {})", self.size, self.pos)
    }
}

impl Read for View<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.size.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        (self.read_at)(self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for View<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let p = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = p.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before 0"))?;
        Ok(self.pos)
    }
}

impl Write for View<'_> {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "partition tables are only read",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The medium's partitions, in order; empty when it has no table (a bare file system, a blank
/// card). Entries that do not fit on the medium are left out (the table lies).
pub fn read(read_at: ReadAt<'_>, size: u64, sector: u32) -> Vec<Partition> {
    let sector = if sector == 4096 { 4096 } else { 512 };
    let mut v = View {
        read_at,
        size,
        pos: 0,
    };
    let Ok(mbr) = mbrman::MBR::read_from(&mut v, sector) else {
        return Vec::new();
    };
    let gpt = mbr.iter().any(|(_, p)| p.sys == 0xee);
    let mut out = Vec::new();
    if gpt {
        let lb = if sector == 4096 {
            gpt::disk::LogicalBlockSize::Lb4096
        } else {
            gpt::disk::LogicalBlockSize::Lb512
        };
        v.pos = 0;
        let disk = gpt::GptConfig::new()
            .writable(false)
            .logical_block_size(lb)
            .open_from_device(v);
        if let Ok(disk) = disk {
            for (id, p) in disk.partitions() {
                if !p.is_used() {
                    continue;
                }
                let offset = p.first_lba * u64::from(sector);
                let len = (p.last_lba + 1).saturating_sub(p.first_lba) * u64::from(sector);
                out.push(Partition {
                    number: *id,
                    offset,
                    len,
                });
            }
        }
    } else {
        for (i, p) in mbr.iter() {
            // Extended containers (DOS, Windows LBA, Linux) hold logical partitions.
            if !p.is_used() || matches!(p.sys, 0x05 | 0x0f | 0x85) {
                continue;
            }
            out.push(Partition {
                number: i as u32,
                offset: u64::from(p.starting_lba) * u64::from(sector),
                len: u64::from(p.sectors) * u64::from(sector),
            });
        }
    }
    out.retain(|p| p.len > 0 && p.offset.checked_add(p.len).is_some_and(|e| e <= size));
    out.sort_by_key(|p| p.number);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::sim;
    use crate::storage::spec::Table;
    use std::os::unix::fs::FileExt;

    fn parts_of(table: Table) -> Vec<Partition> {
        let p =
            std::env::temp_dir().join(format!("jmp-parts-{table:?}-{}.img", std::process::id()));
        let _ = std::fs::remove_file(&p);
        sim::ensure_image(&p, 64 << 20, table).expect("image");
        let f = std::fs::File::open(&p).expect("open");
        let read_at = |off: u64, buf: &mut [u8]| f.read_exact_at(buf, off);
        let parts = super::read(&read_at, 64 << 20, 512);
        let _ = std::fs::remove_file(&p);
        parts
    }

    #[test]
    fn the_sim_layout_reads_back_from_mbr_and_gpt() {
        let want: Vec<Partition> = sim::layout(64 << 20, Table::Mbr)
            .iter()
            .enumerate()
            .map(|(i, (offset, len))| Partition {
                number: i as u32 + 1,
                offset: *offset,
                len: *len,
            })
            .collect();
        assert_eq!(parts_of(Table::Mbr), want);
        assert_eq!(parts_of(Table::Gpt), want);
    }

    #[test]
    fn a_blank_medium_has_no_partitions() {
        let zeros = |_: u64, buf: &mut [u8]| {
            buf.fill(0);
            Ok(())
        };
        assert!(read(&zeros, 1 << 20, 512).is_empty());
    }
}
