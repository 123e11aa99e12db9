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

/// The most entries a GPT's partition array may declare. The table comes from the exporter,
/// which is not trusted: the `gpt` crate allocates the whole array at once and reads it an
/// entry at a time, so an absurd count would take the client's memory or days of round trips.
/// UEFI reserves 128 entries; partitioning tools make a few hundred at most.
pub const MAX_GPT_ENTRIES: u32 = 1024;

/// The only entry size the `gpt` crate reads (it asserts on any other).
const GPT_ENTRY_SIZE: u32 = 128;

/// The medium is read in chunks of this size (the table crates read a field at a time, and
/// each read is a round trip to the exporter).
const CHUNK: u64 = 16 << 10;

/// The most chunks one table read may fetch (16 MiB): bounds the time a lying table (a long
/// chain of extended boot records) can take. A real table needs a handful.
const MAX_FETCHES: u32 = 1024;

/// What the table crates read through: bounded, cached and counted.
struct Medium<'a> {
    read_at: ReadAt<'a>,
    size: u64,
    cache_at: u64,
    cache: Vec<u8>,
    fetches: u32,
}

impl Medium<'_> {
    /// Copies bytes at `pos` into `buf` (as many as the medium has, up to `buf.len()`).
    fn read(&mut self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.size.saturating_sub(pos).min(buf.len() as u64) as usize;
        let mut done = 0;
        while done < n {
            let at = pos + done as u64;
            let cached = at >= self.cache_at && at < self.cache_at + self.cache.len() as u64;
            if !cached {
                if self.fetches >= MAX_FETCHES {
                    return Err(io::Error::other(format!(
                        "the partition table takes more than {MAX_FETCHES} reads of the medium"
                    )));
                }
                self.fetches += 1;
                let start = at - at % CHUNK;
                let len = (self.size - start).min(CHUNK) as usize;
                self.cache.resize(len, 0);
                self.cache_at = start;
                if let Err(e) = (self.read_at)(start, &mut self.cache) {
                    self.cache.clear();
                    return Err(e);
                }
            }
            let off = (at - self.cache_at) as usize;
            let k = (n - done).min(self.cache.len() - off);
            buf[done..done + k].copy_from_slice(&self.cache[off..off + k]);
            done += k;
        }
        Ok(n)
    }
}

/// A read-only `Read + Seek` view of the medium for the partition table crates, starting
/// `base` bytes into it (to read the GPT's backup header with the crate's reader of LBA 1).
struct View<'m, 'a> {
    medium: &'m mut Medium<'a>,
    base: u64,
    pos: u64,
}

impl std::fmt::Debug for View<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "View({} bytes at {})", self.medium.size, self.pos)
    }
}

impl Read for View<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(at) = self.base.checked_add(self.pos) else {
            return Ok(0);
        };
        let n = self.medium.read(at, buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for View<'_, '_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let end = self.medium.size.saturating_sub(self.base);
        let p = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => end.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = p.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before 0"))?;
        Ok(self.pos)
    }
}

impl Write for View<'_, '_> {
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

/// Why a GPT header is not read further.
fn gpt_header_fault(h: &gpt::header::Header, sector: u64, size: u64) -> Option<String> {
    if h.part_size != GPT_ENTRY_SIZE {
        return Some(format!(
            "partition entries of {} bytes (only {GPT_ENTRY_SIZE} are read)",
            h.part_size
        ));
    }
    if h.num_parts > MAX_GPT_ENTRIES {
        return Some(format!(
            "{} partition entries (at most {MAX_GPT_ENTRIES})",
            h.num_parts
        ));
    }
    let array = u64::from(h.num_parts) * u64::from(GPT_ENTRY_SIZE);
    let end = h
        .part_start
        .checked_mul(sector)
        .and_then(|s| s.checked_add(array));
    if end.is_none_or(|e| e > size) {
        return Some(format!(
            "a partition array at LBA {} past the end of the medium",
            h.part_start
        ));
    }
    None
}

/// The medium's partitions, in order; empty when it has no table (a bare file system, a blank
/// card) or when the table is absurd (too many entries, past the end: the exporter is not
/// trusted). Entries that do not fit on the medium are left out (the table lies).
pub fn read(read_at: ReadAt<'_>, size: u64, sector: u32) -> Vec<Partition> {
    let sector = if sector == 4096 { 4096 } else { 512 };
    let mut medium = Medium {
        read_at,
        size,
        cache_at: 0,
        cache: Vec::new(),
        fetches: 0,
    };
    match read_table(&mut medium, sector) {
        Ok(parts) => parts,
        Err(why) => {
            tracing::warn!("partition table not read: {why}");
            Vec::new()
        }
    }
}

fn read_table(medium: &mut Medium<'_>, sector: u32) -> Result<Vec<Partition>, String> {
    let size = medium.size;
    let lb_bytes = u64::from(sector);
    let mut v = View {
        medium,
        base: 0,
        pos: 0,
    };
    let mbr = match mbrman::MBR::read_from(&mut v, sector) {
        Ok(mbr) => mbr,
        // No table at all is the common case of a bare medium, not a fault.
        Err(mbrman::Error::InvalidSignature) => return Ok(Vec::new()),
        Err(e) => return Err(format!("MBR: {e}")),
    };
    let gpt = mbr.iter().any(|(_, p)| p.sys == 0xee);
    let mut out = Vec::new();
    if gpt {
        let lb = if sector == 4096 {
            gpt::disk::LogicalBlockSize::Lb4096
        } else {
            gpt::disk::LogicalBlockSize::Lb512
        };
        // The crate reads the primary header and, when that is bad, the backup in the last
        // block; it then trusts the header's array. Check the header it will use first.
        v.pos = 0;
        let header = match gpt::header::read_header_from_arbitrary_device(&mut v, lb) {
            Ok(h) => Some(h),
            Err(_) if size >= 3 * lb_bytes => {
                let backup_lba = (size - lb_bytes) / lb_bytes;
                let mut b = View {
                    medium: v.medium,
                    base: (backup_lba - 1) * lb_bytes,
                    pos: 0,
                };
                let h = gpt::header::read_header_from_arbitrary_device(&mut b, lb).ok();
                v = View {
                    medium: b.medium,
                    base: 0,
                    pos: 0,
                };
                h
            }
            Err(_) => None,
        };
        let Some(header) = header else {
            return Ok(Vec::new());
        };
        if let Some(fault) = gpt_header_fault(&header, lb_bytes, size) {
            return Err(format!("GPT: {fault}"));
        }
        v.pos = 0;
        let disk = gpt::GptConfig::new()
            .writable(false)
            .logical_block_size(lb)
            .open_from_device(v)
            .map_err(|e| format!("GPT: {e}"))?;
        for (id, p) in disk.partitions() {
            if !p.is_used() {
                continue;
            }
            let offset = p.first_lba.checked_mul(lb_bytes);
            let len = p
                .last_lba
                .checked_add(1)
                .map(|end| end.saturating_sub(p.first_lba))
                .and_then(|n| n.checked_mul(lb_bytes));
            if let (Some(offset), Some(len)) = (offset, len) {
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
                offset: u64::from(p.starting_lba) * lb_bytes,
                len: u64::from(p.sectors) * lb_bytes,
            });
        }
    }
    out.retain(|p| p.len > 0 && p.offset.checked_add(p.len).is_some_and(|e| e <= size));
    out.sort_by_key(|p| p.number);
    Ok(out)
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

    /// CRC-32 (IEEE, as GPT uses), bit by bit: tests only.
    fn crc32(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0xedb8_8320 } else { c >> 1 };
            }
        }
        !c
    }

    /// A crafted GPT: what the header says, and what the array holds.
    struct Gpt {
        sectors: u64,
        num_parts: u32,
        part_size: u32,
        part_start: u64,
        entries: Vec<(u64, u64)>,
    }

    impl Gpt {
        fn sane(entries: Vec<(u64, u64)>) -> Gpt {
            Gpt {
                sectors: 2048,
                num_parts: 128,
                part_size: 128,
                part_start: 2,
                entries,
            }
        }

        /// The image, with a protective MBR, the header at `header_lba`, and the array at
        /// LBA 2 (whatever the header says), its CRC in the header.
        fn image(&self, header_lba: u64) -> Vec<u8> {
            let mut img = vec![0u8; (self.sectors * 512) as usize];
            img[446 + 4] = 0xee;
            img[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
            let n = (self.sectors - 1).min(u64::from(u32::MAX)) as u32;
            img[446 + 12..446 + 16].copy_from_slice(&n.to_le_bytes());
            img[510] = 0x55;
            img[511] = 0xaa;
            let mut array = vec![0u8; 128 * 128];
            for (i, (first, last)) in self.entries.iter().enumerate() {
                let e = &mut array[i * 128..(i + 1) * 128];
                e[0..16].copy_from_slice(&[0x83; 16]);
                e[16..32].copy_from_slice(&[i as u8 + 1; 16]);
                e[32..40].copy_from_slice(&first.to_le_bytes());
                e[40..48].copy_from_slice(&last.to_le_bytes());
            }
            img[1024..1024 + array.len()].copy_from_slice(&array);
            let counted = (u64::from(self.num_parts) * u64::from(self.part_size))
                .min(array.len() as u64) as usize;
            let mut h = [0u8; 92];
            h[0..8].copy_from_slice(b"EFI PART");
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&header_lba.to_le_bytes());
            h[32..40].copy_from_slice(&(self.sectors - 1).to_le_bytes());
            h[40..48].copy_from_slice(&34u64.to_le_bytes());
            h[48..56].copy_from_slice(&(self.sectors - 34).to_le_bytes());
            h[56..72].copy_from_slice(&[7; 16]);
            h[72..80].copy_from_slice(&self.part_start.to_le_bytes());
            h[80..84].copy_from_slice(&self.num_parts.to_le_bytes());
            h[84..88].copy_from_slice(&self.part_size.to_le_bytes());
            h[88..92].copy_from_slice(&crc32(&array[..counted]).to_le_bytes());
            let c = crc32(&h);
            h[16..20].copy_from_slice(&c.to_le_bytes());
            let at = (header_lba * 512) as usize;
            img[at..at + 92].copy_from_slice(&h);
            img
        }
    }

    /// Reads `img` as the medium, counting the reads that reach it.
    fn read_counted(img: &[u8]) -> (Vec<Partition>, u32) {
        let reads = std::sync::atomic::AtomicU32::new(0);
        let read_at = |off: u64, buf: &mut [u8]| {
            reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let off = off as usize;
            buf.copy_from_slice(&img[off..off + buf.len()]);
            Ok(())
        };
        let parts = read(&read_at, img.len() as u64, 512);
        (parts, reads.into_inner())
    }

    #[test]
    fn a_crafted_gpt_reads_back() {
        // The crafted tables below differ from this one in one field each.
        let (parts, _) = read_counted(&Gpt::sane(vec![(34, 1033), (1034, 2000)]).image(1));
        let want = vec![
            Partition {
                number: 1,
                offset: 34 * 512,
                len: 1000 * 512,
            },
            Partition {
                number: 2,
                offset: 1034 * 512,
                len: 967 * 512,
            },
        ];
        assert_eq!(parts, want);
    }

    #[test]
    fn a_gpt_with_absurd_entry_counts_or_sizes_is_refused_in_a_few_reads() {
        let absurd = [
            // 512 GiB of entries: the crate would allocate it at once and read it 128 bytes a
            // time.
            Gpt {
                num_parts: u32::MAX,
                ..Gpt::sane(vec![(34, 1033)])
            },
            Gpt {
                num_parts: MAX_GPT_ENTRIES + 1,
                ..Gpt::sane(vec![(34, 1033)])
            },
            // The crate asserts on any entry size but 128.
            Gpt {
                part_size: 256,
                ..Gpt::sane(vec![(34, 1033)])
            },
            Gpt {
                part_size: u32::MAX,
                ..Gpt::sane(vec![(34, 1033)])
            },
            // The array past the end of the medium, and where the byte offset overflows.
            Gpt {
                part_start: 2040,
                ..Gpt::sane(vec![(34, 1033)])
            },
            Gpt {
                part_start: u64::MAX / 256,
                ..Gpt::sane(vec![(34, 1033)])
            },
        ];
        for gpt in absurd {
            let (parts, reads) = read_counted(&gpt.image(1));
            assert_eq!(parts, vec![], "{}x{} at {}", gpt.num_parts, gpt.part_size, gpt.part_start);
            assert!(reads <= 4, "{reads} reads of the medium");
        }
    }

    #[test]
    fn a_bad_primary_gpt_header_does_not_let_an_absurd_backup_through() {
        let gpt = Gpt {
            num_parts: u32::MAX,
            ..Gpt::sane(vec![(34, 1033)])
        };
        // The header only in the last block, where the crate looks for the backup.
        let img = gpt.image(gpt.sectors - 1);
        let (parts, reads) = read_counted(&img);
        assert_eq!(parts, vec![]);
        assert!(reads <= 4, "{reads} reads of the medium");
        // The same backup with a sane count is read.
        let (parts, _) = read_counted(&Gpt::sane(vec![(34, 1033)]).image(2047));
        assert_eq!(parts.len(), 1);
    }

    #[test]
    fn gpt_entries_past_the_end_or_overflowing_are_left_out() {
        let gpt = Gpt::sane(vec![
            (34, 1033),
            (1034, 4000),
            (u64::MAX / 2, u64::MAX / 2 + 10),
            (100, u64::MAX),
            (u64::MAX, u64::MAX),
            (500, 400),
        ]);
        let (parts, _) = read_counted(&gpt.image(1));
        assert_eq!(
            parts,
            vec![Partition {
                number: 1,
                offset: 34 * 512,
                len: 1000 * 512
            }]
        );
    }

    #[test]
    fn a_long_chain_of_extended_boot_records_is_cut_short() {
        // 64 GiB of medium where every sector after the first is a boot record with one
        // logical partition and a link to the next sector: 2^27 records, each a round trip.
        let size: u64 = 64 << 30;
        let reads = std::sync::atomic::AtomicU32::new(0);
        let sector = |lba: u64, buf: &mut [u8; 512]| {
            buf.fill(0);
            buf[510] = 0x55;
            buf[511] = 0xaa;
            let e = |buf: &mut [u8; 512], i: usize, sys: u8, start: u32, n: u32| {
                let at = 446 + 16 * i;
                buf[at + 4] = sys;
                buf[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
                buf[at + 12..at + 16].copy_from_slice(&n.to_le_bytes());
            };
            let last = (size / 512 - 1) as u32;
            if lba == 0 {
                e(buf, 0, 0x05, 1, last);
            } else {
                let rel = lba as u32 - 1;
                e(buf, 0, 0x83, 1, 1);
                if rel + 2 < last {
                    e(buf, 1, 0x05, rel + 1, 1);
                }
            }
        };
        let read_at = |off: u64, buf: &mut [u8]| {
            reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut s = [0u8; 512];
            for (i, chunk) in buf.chunks_mut(512).enumerate() {
                sector(off / 512 + i as u64, &mut s);
                chunk.copy_from_slice(&s[..chunk.len()]);
            }
            Ok(())
        };
        let parts = read(&read_at, size, 512);
        assert_eq!(parts, vec![]);
        assert_eq!(reads.into_inner(), MAX_FETCHES);
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
