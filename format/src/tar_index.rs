//! Builds TOC entries from a tar stream as it flows past.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;

use tar::EntryType;

use crate::error::{FormatError, Result};
use crate::toc::{encode_xattr, normalize_path, EntryChecker, EntryKind, TocEntry};

/// Parses every entry of the tar stream read from `reader` into TOC entries.
///
/// Reads only up to the end-of-archive marker; the caller drains whatever follows (padding)
/// so that it too lands in the blocks and the stream round-trips byte for byte.
pub fn index_tar<R: Read>(reader: R) -> Result<Vec<TocEntry>> {
    let mut archive = tar::Archive::new(reader);
    let mut entries: Vec<TocEntry> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    // The reader's rules (Toc::validate), applied here so that the entry is named.
    let mut checker = EntryChecker::default();
    let iter = archive
        .entries()
        .map_err(|e| FormatError::NotTar(e.to_string()))?;
    for entry in iter {
        // Reaching the next header means skipping the previous entry's data: an error here
        // is most often a size field that runs past the end of the stream, so name it.
        let mut entry = entry.map_err(|e| match entries.last() {
            Some(prev) => FormatError::BadEntry {
                path: prev.path.clone(),
                reason: format!("data or the next header is unreadable ({e}); does its size run past the end of the layer?"),
            },
            None => FormatError::NotTar(e.to_string()),
        })?;
        let raw_path = String::from_utf8(entry.path_bytes().into_owned()).map_err(|_| {
            FormatError::BadEntry {
                path: String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
                reason: "path is not valid UTF-8".into(),
            }
        })?;
        let bad = |reason: String| FormatError::BadEntry {
            path: raw_path.clone(),
            reason,
        };
        let path = normalize_path(&raw_path).map_err(bad)?;
        let header = entry.header();
        let kind = match header.entry_type() {
            EntryType::Regular | EntryType::Continuous => EntryKind::File,
            EntryType::Directory => EntryKind::Dir,
            EntryType::Symlink => EntryKind::Symlink,
            EntryType::Link => EntryKind::Hardlink,
            EntryType::Char => EntryKind::Char,
            EntryType::Block => EntryKind::Block,
            EntryType::Fifo => EntryKind::Fifo,
            other => return Err(bad(format!("unsupported tar entry type {other:?}"))),
        };
        let num = |r: std::io::Result<u64>, what: &str| {
            r.map_err(|e| bad(format!("bad {what} field: {e}")))
        };
        let mode = num(header.mode().map(u64::from), "mode")? as u32 & 0o7777;
        let mut uid = num(header.uid(), "uid")?;
        let mut gid = num(header.gid(), "gid")?;
        let mut mtime = num(header.mtime(), "mtime")? as i64;
        let mut mtime_nsec = 0u32;
        let (devmajor, devminor) = match kind {
            EntryKind::Char | EntryKind::Block => (
                header.device_major().ok().flatten().unwrap_or(0),
                header.device_minor().ok().flatten().unwrap_or(0),
            ),
            _ => (0, 0),
        };
        let link = match entry
            .link_name_bytes()
            .map(|l| String::from_utf8(l.into_owned()))
        {
            None => None,
            // A stray link name on another kind of entry means nothing: drop it.
            Some(_) if !matches!(kind, EntryKind::Symlink | EntryKind::Hardlink) => None,
            Some(Err(_)) => return Err(bad("link target is not valid UTF-8".into())),
            Some(Ok(l)) if kind == EntryKind::Hardlink => {
                let target =
                    normalize_path(&l).map_err(|w| bad(format!("hardlink target: {w}")))?;
                if !seen.contains(&target) {
                    return Err(bad(format!(
                        "hardlink target {target:?} is not an earlier entry"
                    )));
                }
                Some(target)
            }
            Some(Ok(l)) => Some(l),
        };
        if kind == EntryKind::Symlink && link.is_none() {
            return Err(bad("symlink without a target".into()));
        }

        let mut xattrs = BTreeMap::new();
        if let Some(exts) = entry
            .pax_extensions()
            .map_err(|e| bad(format!("bad PAX header: {e}")))?
        {
            for ext in exts {
                let ext = ext.map_err(|e| bad(format!("bad PAX record: {e}")))?;
                let key = ext.key().map_err(|_| bad("PAX key is not UTF-8".into()))?;
                let value = ext.value_bytes();
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(name.to_string(), encode_xattr(value));
                } else if key == "mtime" {
                    (mtime, mtime_nsec) =
                        parse_pax_time(value).ok_or_else(|| bad("bad PAX mtime".into()))?;
                } else if key == "uid" {
                    uid = parse_pax_u64(value).ok_or_else(|| bad("bad PAX uid".into()))?;
                } else if key == "gid" {
                    gid = parse_pax_u64(value).ok_or_else(|| bad("bad PAX gid".into()))?;
                }
            }
        }

        let size = if kind == EntryKind::File {
            entry.size()
        } else {
            0
        };
        let offset = entry.raw_file_position();
        seen.insert(path.clone());
        let toc_entry = TocEntry {
            path,
            kind,
            mode,
            uid,
            gid,
            size,
            mtime,
            mtime_nsec,
            link,
            xattrs,
            devmajor,
            devminor,
            offset,
        };
        checker.check(&toc_entry).map_err(bad)?;
        entries.push(toc_entry);
        // Unread data is skipped by the tar crate when the next entry is requested; a size
        // that runs past the end of the stream surfaces there as an I/O error.
    }
    Ok(entries)
}

fn parse_pax_u64(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// Parses a PAX time such as `1700000000.123456789` (or a negative one).
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (secs, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    let secs: i64 = secs.parse().ok()?;
    let mut nsec = 0u32;
    if !frac.is_empty() {
        if !frac.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        nsec = digits.parse().ok()?;
    }
    Some((secs, nsec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
