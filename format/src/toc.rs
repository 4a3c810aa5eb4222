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
/// LZ4's largest expansion: a sequence's length bytes add at most 255 bytes each.
const MAX_LZ4_RATIO: usize = 256;
/// Every tar entry takes at least one 512-byte header in the stream.
pub const TAR_HEADER_SIZE: u64 = 512;
/// Longest path component Linux accepts (NAME_MAX).
const NAME_MAX: usize = 255;
/// Longest symlink target Linux accepts (PATH_MAX without the NUL).
const LINK_MAX: usize = 4095;
/// Longest xattr name (XATTR_NAME_MAX) and value (XATTR_SIZE_MAX) Linux accepts.
const XATTR_NAME_MAX: usize = 255;
const XATTR_SIZE_MAX: usize = 65536;

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
    /// Blocks `0..start_blocks` hold the files a recorded start of the image read, in the
    /// order it read them (the converter's start profile): a reader fetches them first, in
    /// order. 0: no profile.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_blocks: u32,
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
        // The decompressor allocates the claimed size up front: refuse a claim the compressed
        // bytes cannot back (LZ4 expands at most ~255x), so a few bytes cannot cost a GiB.
        let max_raw = (payload.len() - 4).saturating_mul(MAX_LZ4_RATIO) + 64;
        if raw_len > max_raw {
            return Err(FormatError::toc(format!(
                "claims {raw_len} bytes uncompressed from {} compressed bytes, more than LZ4 \
                 can expand to",
                payload.len() - 4
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
    /// before anything is mounted: blocks tile the blob up to the TOC and hold exactly the
    /// tar bytes they claim to (within what LZ4 can produce); entries lie inside the tar
    /// stream in archive order without overlapping; paths stay inside the root; hardlinks
    /// point at earlier non-directories; names, link targets, times, ids and xattrs are
    /// things a Linux filesystem can present. Every error names the block or entry at fault.
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
                let how = if b.offset < next_offset {
                    "overlaps the previous block, which ends at"
                } else {
                    "leaves a gap after the previous block, which ends at"
                };
                return Err(bad(format!(
                    "block {i} starts at {} and {how} {next_offset}",
                    b.offset
                )));
            }
            if b.raw_len == 0
                || b.raw_len > self.block_size
                || (i + 1 < n && b.raw_len != self.block_size)
            {
                return Err(bad(format!(
                    "block {i} claims to hold {} tar bytes (block size {}, only the last block \
                     may be shorter)",
                    b.raw_len, self.block_size
                )));
            }
            // An LZ4 frame never grows data by more than a small margin.
            if b.stored_len == 0 || b.stored_len > b.raw_len as u64 + b.raw_len as u64 / 128 + 64 {
                return Err(bad(format!(
                    "block {i} claims a stored length of {} bytes for {} tar bytes, more than \
                     an LZ4 frame can take",
                    b.stored_len, b.raw_len
                )));
            }
            if !is_sha256_digest(&b.digest) {
                return Err(bad(format!(
                    "block {i} has a malformed digest {:?}",
                    b.digest
                )));
            }
            next_offset = b.offset + b.stored_len;
            if next_offset > blocks_end {
                return Err(bad(format!(
                    "block {i} at {}+{} runs past the end of the block data at {blocks_end} \
                     (outside the blob, or into the TOC)",
                    b.offset, b.stored_len
                )));
            }
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
        if self.start_blocks as usize > n {
            return Err(bad(format!(
                "start_blocks is {}, the layer has {n} blocks",
                self.start_blocks
            )));
        }
        if self.entries.len() as u64 > self.tar_size / TAR_HEADER_SIZE {
            return Err(bad(format!(
                "lists {} entries, more than a {}-byte tar stream can hold",
                self.entries.len(),
                self.tar_size
            )));
        }
        let mut checker = EntryChecker::default();
        for e in &self.entries {
            checker
                .check(e)
                .map_err(|why| bad(format!("entry {:?}: {why}", e.path)))?;
            let end = e.offset.checked_add(e.size);
            if end.is_none_or(|end| end > self.tar_size) {
                return Err(bad(format!(
                    "entry {:?} data at {}+{} lies outside the {}-byte tar stream",
                    e.path, e.offset, e.size, self.tar_size
                )));
            }
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
        let n = self.blocks.len();
        let first = self.block_index(offset).min(n);
        let last = self.block_index(offset.saturating_add(len - 1));
        first..last.saturating_add(1).clamp(first, n)
    }

    /// Total stored size of all blocks.
    pub fn stored_size(&self) -> u64 {
        self.blocks.iter().map(|b| b.stored_len).sum()
    }
}

/// The per-entry rules shared by [`Toc::validate`] and the converter (so that the converter
/// refuses, with the tar entry named, exactly what a reader would refuse).
///
/// Entries are checked in archive order: each one's data must start after the previous
/// one's data and its own header (tar offsets only grow, and data never overlaps).
#[derive(Debug, Default)]
pub struct EntryChecker {
    /// Kind of every path seen so far (a later entry with the same path replaces it).
    seen: std::collections::HashMap<String, EntryKind>,
    /// Where the previous entry's data (rounded up to whole tar records) ends.
    data_end: u64,
}

impl EntryChecker {
    /// Checks one entry, in archive order; returns why it is refused.
    pub fn check(&mut self, e: &TocEntry) -> std::result::Result<(), String> {
        match normalize_path(&e.path) {
            Ok(p) if p == e.path => {}
            Ok(p) => return Err(format!("path is not normalized (should be {p:?})")),
            Err(why) => return Err(why),
        }
        if let Some(c) = e.path.split('/').find(|c| c.len() > NAME_MAX) {
            return Err(format!(
                "path component of {} bytes is longer than {NAME_MAX}",
                c.len()
            ));
        }
        if e.path.is_empty() && e.kind != EntryKind::Dir {
            return Err("the layer root is not a directory".into());
        }
        let name = e.path.rsplit('/').next().unwrap_or("");
        if let Some(hidden) = name.strip_prefix(".wh.") {
            if hidden != ".wh..opq" && (hidden.is_empty() || hidden == "." || hidden == "..") {
                return Err(format!("whiteout {name:?} does not name an entry"));
            }
        }
        let first = self.data_end.saturating_add(TAR_HEADER_SIZE);
        if !e.offset.is_multiple_of(TAR_HEADER_SIZE) || e.offset < first {
            return Err(format!(
                "data offset {} overlaps the previous entry or this entry's header (expected \
                 a multiple of 512 from {})",
                e.offset, first
            ));
        }
        if e.kind != EntryKind::File && e.size != 0 {
            return Err("not a regular file but has data".into());
        }
        if e.mode > 0o7777 {
            return Err(format!(
                "mode {:#o} has bits beyond the permissions",
                e.mode
            ));
        }
        if e.uid > u32::MAX as u64 || e.gid > u32::MAX as u64 {
            return Err(format!("owner {}:{} is out of range", e.uid, e.gid));
        }
        if e.mtime_nsec >= 1_000_000_000 {
            return Err(format!(
                "mtime_nsec {} is not below one second",
                e.mtime_nsec
            ));
        }
        for (k, v) in &e.xattrs {
            if k.is_empty() || k.len() > XATTR_NAME_MAX || k.contains('\0') {
                return Err(format!("xattr name {k:?} is empty, too long or has a NUL"));
            }
            match decode_xattr(v) {
                Some(v) if v.len() <= XATTR_SIZE_MAX => {}
                Some(_) => return Err(format!("xattr {k:?} is longer than {XATTR_SIZE_MAX}")),
                None => return Err(format!("xattr {k:?} is not base64")),
            }
        }
        match (e.kind, e.link.as_deref()) {
            (EntryKind::Symlink, None) => return Err("symlink has no target".into()),
            (EntryKind::Symlink, Some(l))
                if l.is_empty() || l.len() > LINK_MAX || l.contains('\0') =>
            {
                return Err(format!(
                    "symlink target of {} bytes is empty, too long or has a NUL",
                    l.len()
                ));
            }
            (EntryKind::Symlink, Some(_)) => {}
            (EntryKind::Hardlink, target) => {
                let target = target.unwrap_or("");
                match self.seen.get(target) {
                    Some(EntryKind::Dir) => {
                        return Err(format!("hardlink to the directory {target:?}"))
                    }
                    Some(_) if !target.is_empty() => {}
                    _ => {
                        let why = match normalize_path(target) {
                            Err(why) => format!(" ({why})"),
                            Ok(_) => String::new(),
                        };
                        return Err(format!(
                            "hardlink target {target:?} is not an earlier entry{why}"
                        ));
                    }
                }
            }
            (_, Some(_)) => return Err("only links have a link target".into()),
            _ => {}
        }
        self.data_end = e.offset.saturating_add(
            e.size
                .div_ceil(TAR_HEADER_SIZE)
                .saturating_mul(TAR_HEADER_SIZE),
        );
        self.seen.insert(e.path.clone(), e.kind);
        Ok(())
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
