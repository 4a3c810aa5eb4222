//! The table of contents: every tar entry with its metadata and where its data lies in the
//! uncompressed tar stream, plus the block table.
//!
//! Serialized as JSON (easy to inspect, stable across versions) and compressed with LZ4.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::{FormatError, Result};

/// Largest uncompressed TOC accepted: bounds the allocation a hostile blob can cause.
pub const MAX_TOC_RAW: usize = 1024 * 1024 * 1024;

/// The table of contents of one converted layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Toc {
    /// Format version (see [`crate::footer::FORMAT_VERSION`]).
    pub version: u32,
    /// Block size in bytes; every block but the last holds exactly this many tar bytes.
    pub block_size: u32,
    /// Length of the uncompressed tar stream.
    pub tar_size: u64,
    /// sha256 of the uncompressed tar stream (the layer's diffID).
    pub diff_id: String,
    /// The layer this one was converted from, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<OriginalLayer>,
    /// Block table, in stream order.
    pub blocks: Vec<BlockEntry>,
    /// Tar entries, in archive order.
    pub entries: Vec<TocEntry>,
}

/// The original layer blob a converted layer came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginalLayer {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

/// Where one block lies in the blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockEntry {
    /// Offset of the block's LZ4 frame in the blob.
    pub offset: u64,
    /// Length of the frame in the blob.
    pub stored_len: u64,
    /// Number of tar bytes the frame decodes to.
    pub raw_len: u32,
    /// `sha256:<hex>` of the stored frame.
    pub digest: String,
}

/// Tar entry types we record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

/// One tar entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TocEntry {
    /// Normalized path: relative, `/`-separated, no `.` or `..` components, no trailing `/`.
    /// The root directory itself is `""`. OCI whiteouts (`.wh.*`) are kept verbatim.
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits, including setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Size of the entry's data in the tar stream (0 for all but regular files).
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Sub-second part of the modification time, when the archive carried one (PAX).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mtime_nsec: u32,
    /// Symlink target, or for a hardlink the (normalized) path it links to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Extended attributes (PAX `SCHILY.xattr.*`), values base64-encoded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub devmajor: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub devminor: u32,
    /// Offset of the entry's data in the uncompressed tar stream.
    pub offset: u64,
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl TocEntry {
    /// The decoded value of one extended attribute.
    pub fn xattr(&self, name: &str) -> Option<Vec<u8>> {
        self.xattrs.get(name).and_then(|v| decode_xattr(v))
    }

    /// All extended attributes, decoded.
    pub fn xattrs_decoded(&self) -> impl Iterator<Item = (&str, Vec<u8>)> {
        self.xattrs
            .iter()
            .filter_map(|(k, v)| decode_xattr(v).map(|d| (k.as_str(), d)))
    }

    /// The name of the entry (last path component).
    pub fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or("")
    }
}

/// Encodes an xattr value for the TOC.
pub fn encode_xattr(value: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(value)
}

fn decode_xattr(v: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(v).ok()
}

/// Normalizes a tar path: strips leading `./` and `/`... but refuses `..` and absolute
/// escapes. Returns the error reason on refusal.
pub fn normalize_path(raw: &str) -> std::result::Result<String, String> {
    if raw.starts_with('/') {
        return Err("absolute path escapes the layer root".into());
    }
    let mut parts = Vec::new();
    for comp in raw.split('/') {
        match comp {
            "" | "." => {}
            ".." => return Err("path with `..` escapes the layer root".into()),
            c if c.contains('\0') => return Err("path contains a NUL byte".into()),
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

impl Toc {
    /// Serializes and compresses the TOC (the payload of the TOC frame).
    pub fn to_payload(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("TOC serializes");
        lz4_flex::block::compress_prepend_size(&json)
    }

    /// Decompresses and parses a TOC payload, then validates it against a blob of
    /// `blocks_end` bytes of block data (the TOC frame's offset).
    pub fn from_payload(payload: &[u8], blocks_end: u64) -> Result<Toc> {
        if payload.len() < 4 {
            return Err(FormatError::toc("payload is truncated"));
        }
        let raw_len = u32::from_le_bytes(payload[0..4].try_into().unwrap()) as usize;
        if raw_len > MAX_TOC_RAW {
            return Err(FormatError::toc(format!(
                "claims {raw_len} bytes uncompressed, more than the {MAX_TOC_RAW} allowed"
            )));
        }
        let json = lz4_flex::block::decompress_size_prepended(payload)
            .map_err(|e| FormatError::toc(format!("cannot decompress: {e}")))?;
        let toc: Toc = serde_json::from_slice(&json)
            .map_err(|e| FormatError::toc(format!("invalid JSON: {e}")))?;
        toc.validate(blocks_end)?;
        Ok(toc)
    }

    /// Checks every internal invariant a reader relies on, so that a hostile TOC is rejected
    /// before anything is mounted: blocks tile the stream and lie inside the blob, entries
    /// lie inside the stream, paths stay inside the root, hardlinks point at earlier entries.
    pub fn validate(&self, blocks_end: u64) -> Result<()> {
        let bad = FormatError::toc;
        if self.version != crate::footer::FORMAT_VERSION {
            return Err(bad(format!("unsupported version {}", self.version)));
        }
        crate::validate_block_size(self.block_size)?;
        let mut next_offset = 0u64;
        let mut raw_total = 0u64;
        let n = self.blocks.len();
        for (i, b) in self.blocks.iter().enumerate() {
            if b.offset != next_offset {
                return Err(bad(format!(
                    "block {i} starts at {} but the previous block ends at {next_offset}",
                    b.offset
                )));
            }
            if b.raw_len > self.block_size || (i + 1 < n && b.raw_len != self.block_size) {
                return Err(bad(format!("block {i} holds {} tar bytes", b.raw_len)));
            }
            // An LZ4 frame never grows data by more than a small margin.
            if b.stored_len == 0 || b.stored_len > b.raw_len as u64 + b.raw_len as u64 / 128 + 64 {
                return Err(bad(format!("block {i} has stored length {}", b.stored_len)));
            }
            if !is_sha256_digest(&b.digest) {
                return Err(bad(format!(
                    "block {i} has a malformed digest {:?}",
                    b.digest
                )));
            }
            next_offset = b.offset + b.stored_len;
            raw_total += b.raw_len as u64;
        }
        if next_offset != blocks_end {
            return Err(bad(format!(
                "blocks end at {next_offset} but the TOC starts at {blocks_end}"
            )));
        }
        if raw_total != self.tar_size {
            return Err(bad(format!(
                "blocks hold {raw_total} tar bytes, TOC says {}",
                self.tar_size
            )));
        }
        if !is_sha256_digest(&self.diff_id) {
            return Err(bad(format!("malformed diffID {:?}", self.diff_id)));
        }
        let mut seen = std::collections::HashSet::new();
        for e in &self.entries {
            match normalize_path(&e.path) {
                Ok(p) if p == e.path => {}
                Ok(_) => return Err(bad(format!("entry path {:?} is not normalized", e.path))),
                Err(why) => return Err(bad(format!("entry {:?}: {why}", e.path))),
            }
            let end = e.offset.checked_add(e.size);
            if end.is_none_or(|end| end > self.tar_size) {
                return Err(bad(format!(
                    "entry {:?} data at {}+{} lies outside the {}-byte tar stream",
                    e.path, e.offset, e.size, self.tar_size
                )));
            }
            if e.kind != EntryKind::File && e.size != 0 {
                return Err(bad(format!(
                    "entry {:?} is not a file but has data",
                    e.path
                )));
            }
            match e.kind {
                EntryKind::Symlink if e.link.is_none() => {
                    return Err(bad(format!("symlink {:?} has no target", e.path)))
                }
                EntryKind::Hardlink => {
                    let target = e.link.as_deref().unwrap_or("");
                    if !seen.contains(target) {
                        return Err(bad(format!(
                            "hardlink {:?} points at {target:?}, which is not an earlier entry",
                            e.path
                        )));
                    }
                }
                _ => {}
            }
            seen.insert(e.path.as_str());
        }
        Ok(())
    }

    /// Index of the block holding tar-stream byte `offset`.
    pub fn block_index(&self, offset: u64) -> usize {
        (offset / self.block_size as u64) as usize
    }

    /// Range of block indices covering `len` bytes of tar stream from `offset`.
    pub fn blocks_for_range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        if len == 0 {
            return 0..0;
        }
        let first = self.block_index(offset);
        let last = self.block_index(offset + len - 1);
        first..(last + 1).min(self.blocks.len())
    }

    /// Total stored size of all blocks.
    pub fn stored_size(&self) -> u64 {
        self.blocks.iter().map(|b| b.stored_len).sum()
    }
}

fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_refuses_escapes() {
        assert_eq!(normalize_path("./a//b/./c/").unwrap(), "a/b/c");
        assert_eq!(normalize_path("./").unwrap(), "");
        assert!(normalize_path("/etc/passwd").is_err());
        assert!(normalize_path("a/../../b").is_err());
        assert!(normalize_path("..").is_err());
    }
}
