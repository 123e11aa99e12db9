//! Images to flash: raw or compressed (gzip, xz, zstd, bzip2), recognised by their first bytes
//! rather than their names, and decompressed as a stream by the crates (flate2, liblzma, zstd,
//! bzip2). Bmap files (bmaptool's XML: block size, mapped ranges, their SHA-256 or SHA-1) say
//! which ranges of an image hold data.

use std::io::{self, BufReader, Read};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Gzip,
    Xz,
    Zstd,
    Bzip2,
}

impl Format {
    /// What `head` (the file's first bytes) says the file is.
    pub fn detect(head: &[u8]) -> Format {
        if head.starts_with(&[0x1f, 0x8b]) {
            Format::Gzip
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Format::Xz
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Format::Zstd
        } else if head.starts_with(b"BZh") && head.get(3).is_some_and(|c| (b'1'..=b'9').contains(c))
        {
            Format::Bzip2
        } else {
            Format::Raw
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Gzip => "gzip",
            Format::Xz => "xz",
            Format::Zstd => "zstd",
            Format::Bzip2 => "bzip2",
        }
    }

    /// The format an output file's name asks for (`.zst`, `.gz`, ...), for a dump.
    pub fn for_output(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("gz") => Format::Gzip,
            Some("xz") => Format::Xz,
            Some("zst") | Some("zstd") => Format::Zstd,
            Some("bz2") => Format::Bzip2,
            _ => Format::Raw,
        }
    }
}

/// An image opened for reading, decompressed as it is read.
pub struct Image {
    pub format: Format,
    pub reader: Box<dyn Read + Send>,
    /// The decompressed size, when the file says it up front (a raw file's length, a zstd
    /// frame's content size).
    pub size: Option<u64>,
    /// A raw file, for finding its holes.
    pub raw: Option<std::fs::File>,
}

pub fn open(path: &Path) -> io::Result<Image> {
    let mut f = std::fs::File::open(path)?;
    let mut head = [0u8; 18];
    let n = read_up_to(&mut f, &mut head)?;
    let format = Format::detect(&head[..n]);
    let f2 = std::fs::File::open(path)?;
    let (reader, size, raw): (Box<dyn Read + Send>, Option<u64>, Option<std::fs::File>) =
        match format {
            Format::Raw => (
                Box::new(BufReader::with_capacity(1 << 20, f2.try_clone()?)),
                Some(f2.metadata()?.len()),
                Some(f2),
            ),
            Format::Gzip => (
                Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(f2))),
                None,
                None,
            ),
            Format::Xz => (
                Box::new(liblzma::read::XzDecoder::new_multi_decoder(BufReader::new(
                    f2,
                ))),
                None,
                None,
            ),
            Format::Zstd => {
                let size = zstd::zstd_safe::get_frame_content_size(&head[..n])
                    .ok()
                    .flatten();
                (Box::new(zstd::stream::read::Decoder::new(f2)?), size, None)
            }
            Format::Bzip2 => (
                Box::new(bzip2::read::MultiBzDecoder::new(BufReader::new(f2))),
                None,
                None,
            ),
        };
    Ok(Image {
        format,
        reader,
        size,
        raw,
    })
}

/// Reads until `buf` is full or the stream ends; the count read.
pub fn read_up_to(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// How a bmap's checksums are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    Sha256,
    Sha1,
}

impl Checksum {
    pub fn algorithm(self) -> &'static ring::digest::Algorithm {
        match self {
            Checksum::Sha256 => &ring::digest::SHA256,
            Checksum::Sha1 => &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        }
    }
}

/// One mapped range of a bmap, in bytes: `[start, end)` and its checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedRange {
    pub start: u64,
    pub end: u64,
    pub checksum: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    pub image_size: u64,
    pub block_size: u64,
    pub checksum: Checksum,
    pub ranges: Vec<MappedRange>,
}

impl Bmap {
    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BmapError {
    #[error("{0}")]
    Xml(String),
    #[error("missing <{0}>")]
    Missing(&'static str),
    #[error("invalid {what}: {value:?}")]
    Invalid { what: &'static str, value: String },
}

/// Parses bmaptool's format (versions 1.x with SHA-1, 2.x with `ChecksumType`).
pub fn parse_bmap(text: &str) -> Result<Bmap, BmapError> {
    use quick_xml::events::Event;
    let mut r = quick_xml::Reader::from_str(text);
    let mut path: Vec<String> = Vec::new();
    let mut image_size = None;
    let mut block_size = None;
    let mut ctype = None;
    let mut ranges: Vec<(String, Option<String>)> = Vec::new();
    let mut cur_chk: Option<String> = None;
    loop {
        match r.read_event().map_err(|e| BmapError::Xml(e.to_string()))? {
            Event::Start(e) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                if name == "Range" {
                    cur_chk = None;
                    for a in e.attributes().flatten() {
                        if a.key.as_ref() == b"chksum" || a.key.as_ref() == b"sha1" {
                            cur_chk = Some(String::from_utf8_lossy(&a.value).into_owned());
                        }
                    }
                }
                path.push(name);
            }
            Event::End(_) => {
                path.pop();
            }
            Event::Text(t) => {
                let v = t
                    .unescape()
                    .map_err(|e| BmapError::Xml(e.to_string()))?
                    .trim()
                    .to_string();
                if v.is_empty() {
                    continue;
                }
                match path.last().map(String::as_str) {
                    Some("ImageSize") => image_size = Some(v),
                    Some("BlockSize") => block_size = Some(v),
                    Some("ChecksumType") => ctype = Some(v),
                    Some("Range") => ranges.push((v, cur_chk.take())),
                    _ => {}
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    let num = |what: &'static str, v: Option<String>| -> Result<u64, BmapError> {
        let v = v.ok_or(BmapError::Missing(what))?;
        v.parse().map_err(|_| BmapError::Invalid { what, value: v })
    };
    let image_size = num("ImageSize", image_size)?;
    let block_size = num("BlockSize", block_size)?;
    if block_size == 0 {
        return Err(BmapError::Invalid {
            what: "BlockSize",
            value: "0".into(),
        });
    }
    let checksum = match ctype.as_deref() {
        None | Some("sha1") => Checksum::Sha1,
        Some("sha256") => Checksum::Sha256,
        Some(other) => {
            return Err(BmapError::Invalid {
                what: "ChecksumType",
                value: other.into(),
            })
        }
    };
    let mut out = Vec::new();
    for (text, chk) in ranges {
        let (a, b) = match text.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (text.as_str(), text.as_str()),
        };
        let bad = || BmapError::Invalid {
            what: "Range",
            value: text.clone(),
        };
        let first: u64 = a.parse().map_err(|_| bad())?;
        let last: u64 = b.parse().map_err(|_| bad())?;
        if last < first {
            return Err(bad());
        }
        let start = first.checked_mul(block_size).ok_or_else(bad)?;
        let end = (last + 1)
            .checked_mul(block_size)
            .ok_or_else(bad)?
            .min(image_size);
        if start >= end {
            return Err(bad());
        }
        let checksum = match chk {
            Some(h) => Some(hex::decode(&h).map_err(|_| BmapError::Invalid {
                what: "chksum",
                value: h,
            })?),
            None => None,
        };
        out.push(MappedRange {
            start,
            end,
            checksum,
        });
    }
    out.sort_by_key(|r| r.start);
    if out.windows(2).any(|w| w[0].end > w[1].start) {
        return Err(BmapError::Invalid {
            what: "BlockMap",
            value: "overlapping ranges".into(),
        });
    }
    Ok(Bmap {
        image_size,
        block_size,
        checksum,
        ranges: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_by_content() {
        assert_eq!(Format::detect(&[0x1f, 0x8b, 8]), Format::Gzip);
        assert_eq!(Format::detect(b"\xfd7zXZ\x00\x00"), Format::Xz);
        assert_eq!(Format::detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]), Format::Zstd);
        assert_eq!(Format::detect(b"BZh91AY"), Format::Bzip2);
        assert_eq!(Format::detect(b"BZhx"), Format::Raw);
        assert_eq!(Format::detect(&[0u8; 16]), Format::Raw);
    }

    #[test]
    fn bmap_v2_parses_and_bad_ones_are_named() {
        let x = r#"<?xml version="1.0" ?>
<bmap version="2.0">
    <ImageSize> 10000 </ImageSize>
    <BlockSize> 4096 </BlockSize>
    <BlocksCount> 3 </BlocksCount>
    <MappedBlocksCount> 2 </MappedBlocksCount>
    <ChecksumType> sha256 </ChecksumType>
    <BmapFileChecksum> 00 </BmapFileChecksum>
    <BlockMap>
        <Range chksum="abcd"> 0 </Range>
        <Range chksum="ef01"> 2 </Range>
    </BlockMap>
</bmap>"#;
        let b = parse_bmap(x).expect("bmap");
        assert_eq!(b.checksum, Checksum::Sha256);
        assert_eq!(
            b.ranges,
            vec![
                MappedRange {
                    start: 0,
                    end: 4096,
                    checksum: Some(vec![0xab, 0xcd])
                },
                MappedRange {
                    start: 8192,
                    end: 10000,
                    checksum: Some(vec![0xef, 0x01])
                },
            ]
        );
        let bad = x.replace("> 2 <", "> 2-x <");
        assert!(matches!(
            parse_bmap(&bad),
            Err(BmapError::Invalid { what: "Range", .. })
        ));
        let bad = x.replace("<BlockSize> 4096 </BlockSize>", "");
        assert!(matches!(
            parse_bmap(&bad),
            Err(BmapError::Missing("BlockSize"))
        ));
    }
}
