//! Start profiles: profile-guided layer layout (`image-converter convert --start-profile`).
//!
//! A start profile lists the files a recorded start of the image read, in the order it first
//! read them. The converter moves those files (each after its directories' entries) to the
//! start of each layer, in that order, so that they fill whole, dense blocks
//! `0..start_blocks` a reader can fetch first
//! (docs/image-converter.md, "Start profile"). The layer's tar stream is cut into *entry
//! spans* (the raw bytes of one entry, its PAX/GNU extension headers included) and the
//! spans are put back in a new order; no header or data byte is changed, so the new tar
//! holds exactly the entries of the original.
//!
//! What may move is decided by [`select`], from facts about every entry that do not depend
//! on the entries' order. So the same decision can be made again from the TOC of an earlier,
//! reordered conversion, which lets a re-conversion tell whether it may reuse it.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::Path;

use faasnet_format::toc::normalize_path;
use faasnet_format::{EntryKind, TocEntry};
use sha2::{Digest, Sha256};

/// Size of a tar record (headers and data padding).
const RECORD: u64 = 512;
/// Name of the OCI opaque-directory marker.
const OPAQUE: &str = ".wh..wh..opq";
/// Prefix of OCI whiteouts.
const WHITEOUT: &str = ".wh.";

/// The paths of a start profile, normalized, in first-read order, each once.
#[derive(Debug, Clone, Default)]
pub struct StartProfile {
    source: String,
    paths: Vec<String>,
    rank: HashMap<String, usize>,
}

impl StartProfile {
    /// Reads and parses the profile file `path`.
    pub fn load(path: &Path) -> Result<StartProfile, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("start profile {}: cannot read it: {e}", path.display()))?;
        StartProfile::parse(&path.display().to_string(), &bytes)
    }

    /// Parses profile text: one path per line (a leading `/` is stripped), blank lines and
    /// lines starting with `#` ignored. `source` names the file in errors. A path listed
    /// twice keeps its first position. Refuses a line that is not UTF-8, escapes the root
    /// (`..`), holds a NUL or names the root itself, with the line number.
    pub fn parse(source: &str, bytes: &[u8]) -> Result<StartProfile, String> {
        let mut profile = StartProfile {
            source: source.to_string(),
            ..StartProfile::default()
        };
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let n = i + 1;
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let line = std::str::from_utf8(raw).map_err(|e| {
                format!(
                    "start profile {source} line {n}: not valid UTF-8 (bad byte at column {})",
                    e.valid_up_to() + 1
                )
            })?;
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let path = normalize_path(line.trim_start_matches('/'))
                .map_err(|why| format!("start profile {source} line {n}: {line:?}: {why}"))?;
            if path.is_empty() {
                return Err(format!(
                    "start profile {source} line {n}: {line:?} names the root directory, not a \
                     file"
                ));
            }
            if !profile.rank.contains_key(&path) {
                profile.rank.insert(path.clone(), profile.paths.len());
                profile.paths.push(path);
            }
        }
        Ok(profile)
    }

    /// The file the profile was read from, for messages.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The paths, in profile order.
    pub fn paths(&self) -> &[String] {
        &self.paths
    }

    /// True when the profile lists no path.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Position of `path` in the profile.
    pub fn rank(&self, path: &str) -> Option<usize> {
        self.rank.get(path).copied()
    }
}

/// What the reorder rules look at in one tar entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryFacts {
    /// Normalized path.
    pub path: String,
    /// Kind, `None` for a tar entry type the format does not record.
    pub kind: Option<EntryKind>,
    /// A hardlink's (normalized) target.
    pub link: Option<String>,
}

impl EntryFacts {
    /// The facts of a TOC entry.
    pub fn of_toc(e: &TocEntry) -> EntryFacts {
        EntryFacts {
            path: e.path.clone(),
            kind: Some(e.kind),
            link: (e.kind == EntryKind::Hardlink)
                .then(|| e.link.clone())
                .flatten(),
        }
    }
}

/// Which entries move to the start of the layer, as indices into `entries`, in their new
/// order: each listed file in profile order, preceded by those of its parent directories'
/// entries in the layer that have not moved yet, outermost first.
///
/// A file moves when it is a regular file (not a whiteout) that the profile names — by its
/// own path, or by the path of a hardlink to it — and nothing else in the layer could make
/// its position matter:
/// - its path occurs exactly once in the layer (several entries for one path rely on tar's
///   "later wins"), and no entry of the layer lies under it;
/// - no whiteout of the layer names it or one of its parent directories, and no parent
///   directory (the root included) has an opaque marker in the layer (some appliers process
///   whiteouts in archive order);
/// - each parent directory the layer has an entry for has exactly one, a directory. That
///   entry moves with the file, just before it: a directory's entry may replace a file or
///   a symlink of a lower layer, and must do so before anything is created inside it.
///
/// The decision depends only on the set of entries, not on their order, so it is the same
/// on the original archive and on the reordered one. The kept entries keep their relative
/// order; a hardlink's target can only move earlier, so it stays before the hardlink.
pub fn select(profile: &StartProfile, entries: &[EntryFacts]) -> Vec<usize> {
    if profile.is_empty() {
        return Vec::new();
    }
    let mut count: HashMap<&str, usize> = HashMap::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut has_children: HashSet<&str> = HashSet::new();
    let mut hidden: HashSet<String> = HashSet::new();
    let mut opaque: HashSet<&str> = HashSet::new();
    for (i, e) in entries.iter().enumerate() {
        *count.entry(&e.path).or_default() += 1;
        index.insert(&e.path, i);
        has_children.extend(parents(&e.path));
        let (dir, name) = split(&e.path);
        if name == OPAQUE {
            opaque.insert(dir);
        } else if let Some(h) = name.strip_prefix(WHITEOUT) {
            hidden.insert(join(dir, h));
        }
    }
    let unique = |p: &str| count.get(p) == Some(&1);
    // The entry of each parent directory (root excluded) the layer has one for.
    let parent_entries = |path: &'_ str| -> Vec<usize> {
        parents(path)
            .filter(|p| !p.is_empty())
            .filter_map(|p| index.get(p).copied())
            .collect()
    };
    let movable = |i: usize| {
        let e = &entries[i];
        let (_, name) = split(&e.path);
        e.kind == Some(EntryKind::File)
            && !name.starts_with(WHITEOUT)
            && unique(&e.path)
            && !has_children.contains(e.path.as_str())
            && !hidden.contains(&e.path)
            && parents(&e.path).all(|p| {
                !opaque.contains(p)
                    && !hidden.contains(p)
                    && (p.is_empty()
                        || match count.get(p) {
                            None => true,
                            Some(1) => entries[index[p]].kind == Some(EntryKind::Dir),
                            Some(_) => false,
                        })
            })
    };
    // The earliest profile position naming each movable file.
    let mut best: HashMap<usize, usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        let Some(rank) = profile.rank(&e.path) else {
            continue;
        };
        if !unique(&e.path) {
            continue;
        }
        // Follow hardlinks to the file holding the data (each target a unique path).
        let mut target = i;
        for _ in 0..entries.len().min(64) {
            let t = &entries[target];
            if t.kind != Some(EntryKind::Hardlink) {
                break;
            }
            match t
                .link
                .as_deref()
                .filter(|l| unique(l))
                .and_then(|l| index.get(l))
            {
                Some(&next) => target = next,
                None => break,
            }
        }
        if movable(target) {
            let r = best.entry(target).or_insert(rank);
            *r = (*r).min(rank);
        }
    }
    let mut files: Vec<(usize, usize)> = best.into_iter().map(|(i, r)| (r, i)).collect();
    files.sort_unstable();
    let mut moved = vec![false; entries.len()];
    let mut order = Vec::new();
    for (_, f) in files {
        for d in parent_entries(&entries[f].path).into_iter().chain([f]) {
            if !moved[d] {
                moved[d] = true;
                order.push(d);
            }
        }
    }
    order
}

/// `sha256:` of the moved entries' paths, one per line, in their new order: what the
/// `io.faasnet.layer.start-profile` annotation records. With the original layer and the
/// block size it determines the converted blob.
pub fn moved_digest<'a>(paths: impl IntoIterator<Item = &'a str>) -> String {
    let mut h = Sha256::new();
    for p in paths {
        h.update(p.as_bytes());
        h.update(b"\n");
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// A tar archive cut into entry spans.
#[derive(Debug, Clone)]
pub struct TarCut {
    /// `spans[i]` holds the raw bytes of entry `i`: from the end of the previous entry (so
    /// its extension headers are included) to the end of its padded data. The spans tile
    /// `0..entries_end`.
    pub spans: Vec<Range<u64>>,
    /// What the reorder rules look at in each entry.
    pub entries: Vec<EntryFacts>,
    /// Where the last entry ends: the trailer (end-of-archive records and whatever follows)
    /// runs from here to `len`.
    pub entries_end: u64,
    /// Length of the archive.
    pub len: u64,
}

/// Cuts the tar archive `r` into entry spans. Fails, with the reason, when it cannot be cut
/// so that moving spans keeps every entry's meaning: a global PAX header (it applies to
/// every entry after it), a GNU sparse entry, an unreadable archive or entry path.
pub fn cut_tar<R: Read + Seek>(mut r: R) -> Result<TarCut, String> {
    let len = r
        .seek(SeekFrom::End(0))
        .and_then(|n| r.seek(SeekFrom::Start(0)).map(|_| n))
        .map_err(|e| format!("cannot read the layer: {e}"))?;
    let mut archive = tar::Archive::new(r);
    let mut spans = Vec::new();
    let mut entries = Vec::new();
    let mut prev_end = 0u64;
    let iter = archive
        .entries_with_seek()
        .map_err(|e| format!("not a readable tar archive: {e}"))?;
    for entry in iter {
        let entry = entry.map_err(|e| format!("not a readable tar archive: {e}"))?;
        let at = entry.raw_header_position();
        let t = entry.header().entry_type();
        if t.is_pax_global_extensions() {
            return Err(format!(
                "a global PAX header at offset {at} applies to every entry after it"
            ));
        }
        if t.is_gnu_sparse() {
            return Err(format!("GNU sparse entry at offset {at}"));
        }
        let data = entry.raw_file_position();
        if at < prev_end || data != at + RECORD {
            return Err(format!("entry at offset {at} has an unexpected layout"));
        }
        let end = entry
            .size()
            .checked_next_multiple_of(RECORD)
            .and_then(|n| n.checked_add(data))
            .filter(|&end| end <= len)
            .ok_or_else(|| {
                format!("entry at offset {at} claims more data than the archive holds")
            })?;
        let raw_path = String::from_utf8(entry.path_bytes().into_owned())
            .map_err(|_| format!("entry at offset {at}: path is not valid UTF-8"))?;
        let path =
            normalize_path(&raw_path).map_err(|why| format!("tar entry {raw_path:?}: {why}"))?;
        let kind = entry_kind(t);
        let link = match (kind, entry.link_name_bytes()) {
            (Some(EntryKind::Hardlink), Some(l)) => String::from_utf8(l.into_owned())
                .ok()
                .and_then(|l| normalize_path(&l).ok()),
            _ => None,
        };
        spans.push(prev_end..end);
        entries.push(EntryFacts { path, kind, link });
        prev_end = end;
    }
    Ok(TarCut {
        spans,
        entries,
        entries_end: prev_end,
        len,
    })
}

/// The kind `faasnet_format::tar_index` records for a tar entry type.
fn entry_kind(t: tar::EntryType) -> Option<EntryKind> {
    use tar::EntryType as T;
    Some(match t {
        T::Regular | T::Continuous => EntryKind::File,
        T::Directory => EntryKind::Dir,
        T::Symlink => EntryKind::Symlink,
        T::Link => EntryKind::Hardlink,
        T::Char => EntryKind::Char,
        T::Block => EntryKind::Block,
        T::Fifo => EntryKind::Fifo,
        _ => return None,
    })
}

/// How to lay out a layer: byte ranges of the original archive, in their new order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reorder {
    /// Ranges of the original archive to concatenate (adjacent ones merged).
    pub ranges: Vec<Range<u64>>,
    /// Bytes at the start of the new stream holding the moved entries
    /// ([`faasnet_format::ConvertOptions::start_bytes`]).
    pub start_bytes: u64,
    /// Paths of the moved entries (the profile's files and their parent directories'
    /// entries), in their new order.
    pub moved: Vec<String>,
    /// How many of them are files.
    pub moved_files: usize,
}

impl Reorder {
    /// The layout that changes nothing.
    pub fn identity(len: u64) -> Reorder {
        Reorder {
            ranges: std::iter::once(0..len).collect(),
            start_bytes: 0,
            moved: Vec::new(),
            moved_files: 0,
        }
    }

    /// True when the layout changes the archive.
    pub fn is_reordered(&self) -> bool {
        !self.moved.is_empty()
    }

    /// [`moved_digest`] of the moved paths, `None` when nothing moved.
    pub fn digest(&self) -> Option<String> {
        self.is_reordered()
            .then(|| moved_digest(self.moved.iter().map(String::as_str)))
    }
}

/// The layout of `cut` for `profile`: the entries [`select`] picks first, in its order,
/// then every other entry in its original order, then the trailer. Without any entry to move
/// the layout is the archive itself.
pub fn plan(cut: &TarCut, profile: &StartProfile) -> Reorder {
    let order = select(profile, &cut.entries);
    if order.is_empty() {
        return Reorder::identity(cut.len);
    }
    let mut ranges: Vec<Range<u64>> = Vec::new();
    let mut push = |r: Range<u64>| match ranges.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ if r.is_empty() => {}
        _ => ranges.push(r),
    };
    let mut moved = vec![false; cut.spans.len()];
    let mut start_bytes = 0;
    for &i in &order {
        moved[i] = true;
        start_bytes += cut.spans[i].end - cut.spans[i].start;
        push(cut.spans[i].clone());
    }
    for (i, span) in cut.spans.iter().enumerate() {
        if !moved[i] {
            push(span.clone());
        }
    }
    push(cut.entries_end..cut.len);
    Reorder {
        ranges,
        start_bytes,
        moved: order.iter().map(|&i| cut.entries[i].path.clone()).collect(),
        moved_files: order
            .iter()
            .filter(|&&i| cut.entries[i].kind == Some(EntryKind::File))
            .count(),
    }
}

/// Reads the concatenation of byte ranges of `inner`, in the given order.
pub struct RangesReader<R> {
    inner: R,
    ranges: Vec<Range<u64>>,
    /// Current range.
    idx: usize,
    /// Bytes of the current range already read.
    done: u64,
    /// The inner reader is not positioned at `ranges[idx].start + done`.
    seek: bool,
}

impl<R: Read + Seek> RangesReader<R> {
    pub fn new(inner: R, ranges: Vec<Range<u64>>) -> RangesReader<R> {
        RangesReader {
            inner,
            ranges,
            idx: 0,
            done: 0,
            seek: true,
        }
    }
}

impl<R: Read + Seek> Read for RangesReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(r) = self.ranges.get(self.idx) else {
                return Ok(0);
            };
            let left = r.end - r.start - self.done;
            if left == 0 {
                self.idx += 1;
                self.done = 0;
                self.seek = true;
                continue;
            }
            if out.is_empty() {
                return Ok(0);
            }
            if self.seek {
                self.inner.seek(SeekFrom::Start(r.start + self.done))?;
                self.seek = false;
            }
            let want = out.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = self.inner.read(&mut out[..want])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the layer's temporary copy ended early",
                ));
            }
            self.done += n as u64;
            return Ok(n);
        }
    }
}

/// Reorders an in-memory archive (tests, tools): the new archive and its layout.
pub fn reorder_bytes(tar: &[u8], profile: &StartProfile) -> Result<(Vec<u8>, Reorder), String> {
    let cut = cut_tar(io::Cursor::new(tar))?;
    let reorder = plan(&cut, profile);
    let mut out = Vec::with_capacity(tar.len());
    RangesReader::new(io::Cursor::new(tar), reorder.ranges.clone())
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    Ok((out, reorder))
}

/// (parent directory, name) of a normalized path; the root's children have parent `""`.
fn split(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", path),
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Every parent directory of a normalized path, the root `""` included.
fn parents(path: &str) -> impl Iterator<Item = &str> {
    std::iter::once("").chain(path.match_indices('/').map(move |(i, _)| &path[..i]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One entry of a test archive.
    #[derive(Debug, Clone)]
    enum T {
        Dir(String),
        File(String, Vec<u8>),
        /// A file behind a PAX header: long path (`path` record), an xattr, a sub-second
        /// mtime.
        PaxFile(String, Vec<u8>),
        Hardlink(String, String),
        Symlink(String, String),
    }

    fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_uid(1000);
        h.set_gid(100);
        h
    }

    /// A tar of `entries` (GNU headers: long names get `L` records), the end-of-archive
    /// records and `trailer` extra zero records.
    fn build(entries: &[T], trailer: usize) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            match e {
                T::Dir(p) => {
                    let mut h = header(tar::EntryType::Directory, 0, 0o755);
                    b.append_data(&mut h, p, &[][..]).unwrap();
                }
                T::File(p, d) => {
                    let mut h = header(tar::EntryType::Regular, d.len() as u64, 0o644);
                    b.append_data(&mut h, p, &d[..]).unwrap();
                }
                T::PaxFile(p, d) => {
                    b.append_pax_extensions([
                        ("path", p.as_bytes()),
                        ("SCHILY.xattr.user.origin", &b"pax\x00\xff"[..]),
                        ("mtime", &b"1700000000.25"[..]),
                    ])
                    .unwrap();
                    let mut h = header(tar::EntryType::Regular, d.len() as u64, 0o600);
                    h.set_path("pax-placeholder").unwrap();
                    h.set_cksum();
                    b.append(&h, &d[..]).unwrap();
                }
                T::Hardlink(p, t) => {
                    let mut h = header(tar::EntryType::Link, 0, 0o644);
                    b.append_link(&mut h, p, t).unwrap();
                }
                T::Symlink(p, t) => {
                    let mut h = header(tar::EntryType::Symlink, 0, 0o777);
                    b.append_link(&mut h, p, t).unwrap();
                }
            }
        }
        let mut out = b.into_inner().unwrap();
        out.extend(std::iter::repeat_n(0u8, 512 * trailer));
        out
    }

    fn profile(lines: &str) -> StartProfile {
        StartProfile::parse("test.txt", lines.as_bytes()).unwrap()
    }

    /// The raw bytes of each entry span and the trailer.
    fn spans(tar: &[u8]) -> (Vec<Vec<u8>>, Vec<String>, Vec<u8>) {
        let cut = cut_tar(io::Cursor::new(tar)).unwrap();
        let bytes = cut
            .spans
            .iter()
            .map(|r| tar[r.start as usize..r.end as usize].to_vec())
            .collect();
        let paths = cut.entries.iter().map(|e| e.path.clone()).collect();
        (bytes, paths, tar[cut.entries_end as usize..].to_vec())
    }

    /// (path, header bytes, PAX records, data) of one entry.
    type Parsed = (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>);

    /// Every entry as the tar crate reads it.
    fn parsed(tar: &[u8]) -> Vec<Parsed> {
        let mut a = tar::Archive::new(tar);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let pax = e
                    .pax_extensions()
                    .unwrap()
                    .map(|x| {
                        x.flat_map(|r| {
                            let r = r.unwrap();
                            [r.key_bytes(), b"=", r.value_bytes(), b"\n"].concat()
                        })
                        .collect()
                    })
                    .unwrap_or_default();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (
                    e.path_bytes().into_owned(),
                    e.header().as_bytes().to_vec(),
                    pax,
                    data,
                )
            })
            .collect()
    }

    /// Checks every invariant of a reorder of `tar` by `p`; returns the moved paths.
    fn check(tar: &[u8], p: &StartProfile) -> Vec<String> {
        let (out, r) = reorder_bytes(tar, p).unwrap();
        assert_eq!(out.len(), tar.len());
        let (before, _, trailer) = spans(tar);
        let (after, after_paths, trailer2) = spans(&out);
        assert_eq!(trailer, trailer2, "trailer copied verbatim");
        // Same entries, headers and data byte for byte, as a multiset.
        let (mut a, mut b) = (before.clone(), after.clone());
        a.sort();
        b.sort();
        assert_eq!(a, b, "the same entry spans");
        let (mut pa, mut pb) = (parsed(tar), parsed(&out));
        pa.sort();
        pb.sort();
        assert_eq!(pa, pb, "the same entries as the tar crate reads them");
        // What an extraction ends with ("later wins" per path) is the same.
        let state = |t: &[u8]| -> std::collections::BTreeMap<Vec<u8>, _> {
            parsed(t).into_iter().map(|e| (e.0.clone(), e)).collect()
        };
        assert_eq!(state(tar), state(&out), "the same final state");
        // Moved first, in profile order; then the rest in the original order.
        let k = r.moved.len();
        assert_eq!(after_paths[..k], r.moved[..]);
        let mut rest = before.clone();
        for m in &after[..k] {
            let i = rest.iter().position(|s| s == m).unwrap();
            rest.remove(i);
        }
        assert_eq!(after[k..], rest[..], "unmoved entries keep their order");
        // start_bytes is where the last moved span ends.
        let moved_len: usize = after[..k].iter().map(Vec::len).sum();
        assert_eq!(r.start_bytes, moved_len as u64);
        if k == 0 {
            assert_eq!(out, tar, "nothing listed: the archive unchanged");
            assert_eq!(r.start_bytes, 0);
        }
        // The format indexes and converts it, start_blocks from start_bytes.
        faasnet_format::tar_index::index_tar(&out[..]).unwrap();
        let opts = faasnet_format::ConvertOptions {
            block_size: faasnet_format::MIN_BLOCK_SIZE,
            threads: 2,
            original: None,
            start_bytes: r.start_bytes,
        };
        let mut blob = Vec::new();
        let c = faasnet_format::convert_layer(&out[..], &mut blob, &opts, &|_| {}).unwrap();
        assert_eq!(c.toc.diff_id, faasnet_format::sha256_digest(&out));
        assert_eq!(
            c.toc.start_blocks as u64,
            r.start_bytes
                .div_ceil(faasnet_format::MIN_BLOCK_SIZE as u64)
        );
        // Moved files' data lie in the start blocks, in profile order.
        let mut last = 0;
        for m in &r.moved {
            let e = c.toc.entries.iter().find(|e| &e.path == m).unwrap();
            assert!(e.offset >= last);
            assert!(e.offset + e.size <= r.start_bytes);
            last = e.offset;
        }
        // The decision is the same on the reordered archive: reordering again changes
        // nothing (what lets a re-conversion recognize its earlier result from the TOC).
        let (again, r2) = reorder_bytes(&out, p).unwrap();
        assert_eq!(r2.moved, r.moved);
        assert_eq!(again, out);
        let facts: Vec<EntryFacts> = c.toc.entries.iter().map(EntryFacts::of_toc).collect();
        let from_toc: Vec<&str> = select(p, &facts)
            .into_iter()
            .map(|i| facts[i].path.as_str())
            .collect();
        assert_eq!(from_toc, r.moved);
        r.moved
    }

    #[test]
    fn parses_profiles() {
        let p = profile(
            "# recorded by the snapshotter\n/usr/bin/python3.11\n\n  \nusr/lib//x.so\r\n\
             ./etc/hosts\n/usr/bin/python3.11\n   # indented comment\netc/hosts\n",
        );
        assert_eq!(
            p.paths(),
            ["usr/bin/python3.11", "usr/lib/x.so", "etc/hosts"]
        );
        assert_eq!(p.rank("etc/hosts"), Some(2));
        assert!(profile("").is_empty());
        let err = StartProfile::parse("p.txt", b"ok\n\nbad/../../x\n").unwrap_err();
        assert!(
            err.contains("p.txt line 3") && err.contains("escapes"),
            "{err}"
        );
        let err = StartProfile::parse("p.txt", b"a\nb\xff\xfe\n").unwrap_err();
        assert!(
            err.contains("p.txt line 2") && err.contains("not valid UTF-8"),
            "{err}"
        );
        let err = StartProfile::parse("p.txt", b"/\n").unwrap_err();
        assert!(err.contains("line 1") && err.contains("root"), "{err}");
        let err = StartProfile::parse("p.txt", b"a\0b\n").unwrap_err();
        assert!(err.contains("line 1") && err.contains("NUL"), "{err}");
        let err = StartProfile::load(Path::new("/nonexistent/profile")).unwrap_err();
        assert!(err.contains("/nonexistent/profile"), "{err}");
    }

    #[test]
    fn moves_listed_files_first_in_profile_order() {
        let long = format!("usr/lib/{}/libpax.so", "long-directory-name-".repeat(8));
        let gnu_long = format!("usr/share/{}/data.bin", "gnu-long-name-".repeat(9));
        let tar = build(
            &[
                T::Dir("usr".into()),
                T::Dir("usr/bin".into()),
                T::File("usr/bin/python3.11".into(), vec![1; 3000]),
                T::Hardlink("usr/bin/python3".into(), "usr/bin/python3.11".into()),
                T::Symlink("usr/bin/py".into(), "python3".into()),
                T::File("usr/lib/late.so".into(), vec![2; 700]),
                T::PaxFile(long.clone(), vec![3; 1500]),
                T::File(gnu_long.clone(), vec![4; 10]),
                T::File("etc/twice".into(), b"first".to_vec()),
                T::File("etc/.wh.gone".into(), Vec::new()),
                T::File("etc/twice".into(), b"second".to_vec()),
                // The directory entry after its file.
                T::Dir("usr/lib".into()),
                T::File("unlisted".into(), vec![5; 100]),
            ],
            3,
        );
        let p = profile(&format!(
            "{long}\n/usr/lib/late.so\netc/twice\netc/.wh.gone\nusr/bin/py\nmissing/file\n\
             usr/bin/python3.11\n{gnu_long}\nusr/bin\n"
        ));
        let moved = check(&tar, &p);
        assert_eq!(
            moved,
            [
                "usr",
                "usr/lib",
                long.as_str(),
                "usr/lib/late.so",
                "usr/bin",
                "usr/bin/python3.11",
                gnu_long.as_str()
            ],
            "each file after its parent directories' entries; a path listed twice in the \
             layer, a whiteout, a symlink, a directory and a missing path stay"
        );
        // The hardlink to a moved file still follows its target; the PAX records and the
        // GNU long name travelled with their entries.
        let (out, r) = reorder_bytes(&tar, &p).unwrap();
        let toc = faasnet_format::tar_index::index_tar(&out[..]).unwrap();
        let pos = |p: &str| toc.iter().position(|e| e.path == p).unwrap();
        assert!(pos("usr/bin/python3.11") < pos("usr/bin/python3"));
        assert!(
            pos("usr/lib") < pos(&long),
            "a directory entry that came after its files moves before them"
        );
        let pax = &toc[pos(&long)];
        assert_eq!(pax.xattr("user.origin").unwrap(), b"pax\x00\xff");
        assert_eq!((pax.mtime_nsec, pax.mode), (250_000_000, 0o600));
        // "later wins" for the path listed twice is untouched.
        let twice: Vec<_> = toc.iter().filter(|e| e.path == "etc/twice").collect();
        assert_eq!(twice.len(), 2);
        assert_eq!(&out[twice[1].offset as usize..][..6], b"second");
        assert_eq!(r.moved_files, 4);
        assert_eq!(
            r.start_bytes,
            toc[7].offset - 512,
            "up to the 8th entry's header"
        );
    }

    #[test]
    fn a_hardlink_in_the_profile_moves_its_target() {
        let tar = build(
            &[
                T::File("bin/real".into(), vec![9; 600]),
                T::File("bin/other".into(), vec![8; 600]),
                T::Hardlink("bin/alias".into(), "bin/real".into()),
            ],
            0,
        );
        assert_eq!(
            check(&tar, &profile("bin/other\nbin/alias\n")),
            ["bin/other", "bin/real"]
        );
        // The target named later than the hardlink takes the hardlink's (earlier) place.
        assert_eq!(
            check(&tar, &profile("bin/alias\nbin/other\nbin/real\n")),
            ["bin/real", "bin/other"]
        );
    }

    #[test]
    fn whiteouts_opaque_dirs_and_non_dir_parents_keep_files_in_place() {
        let tar = build(
            &[
                T::Dir("a".into()),
                T::File("a/.wh..wh..opq".into(), Vec::new()),
                T::File("a/x".into(), vec![1; 10]),
                T::File("b/.wh.y".into(), Vec::new()),
                T::File("b/y".into(), vec![2; 10]),
                T::File("c/.wh.d".into(), Vec::new()),
                T::File("c/d/z".into(), vec![3; 10]),
                T::Symlink("e".into(), "a".into()),
                T::File("e/w".into(), vec![4; 10]),
                T::File("f/ok".into(), vec![5; 10]),
            ],
            0,
        );
        let p = profile("a/x\nb/y\nc/d/z\ne/w\nf/ok\na/.wh..wh..opq\n");
        assert_eq!(check(&tar, &p), ["f/ok"]);
    }

    #[test]
    fn a_file_with_entries_under_its_path_stays() {
        // x as a file and entries under x: whichever order an applier sees decides.
        let tar = build(
            &[
                T::File("x/y".into(), vec![1; 10]),
                T::File("x".into(), vec![2; 10]),
                T::File("z".into(), vec![3; 10]),
            ],
            0,
        );
        assert_eq!(check(&tar, &profile("x\nz\n")), ["z"]);
    }

    #[test]
    fn a_directory_that_replaces_a_lower_file_moves_with_its_files() {
        // Over a lower layer where d is a file, extracting d/f before the entry of d fails
        // (or goes through a lower symlink): the entry of d moves first.
        let tar = build(
            &[
                T::File("other".into(), vec![1; 700]),
                T::Dir("d".into()),
                T::Dir("d/e".into()),
                T::File("d/e/f".into(), vec![2; 10]),
                T::File("d/g".into(), vec![3; 10]),
            ],
            0,
        );
        let p = profile("d/g\nd/e/f\n");
        assert_eq!(check(&tar, &p), ["d", "d/g", "d/e", "d/e/f"]);
        let lower: Tree = [("d".to_string(), Node::Other(b"lower file".to_vec()))].into();
        let (out, _) = reorder_bytes(&tar, &p).unwrap();
        let before = apply(&lower, &model(&tar)).unwrap();
        assert_eq!(apply(&lower, &model(&out)), Some(before));
    }

    #[test]
    fn a_layer_without_listed_files_is_unchanged() {
        let tar = build(&[T::Dir("d".into()), T::File("d/f".into(), vec![1; 5])], 2);
        let (out, r) = reorder_bytes(&tar, &profile("other\n")).unwrap();
        assert_eq!((out, r), (tar.clone(), Reorder::identity(tar.len() as u64)));
        assert_eq!(check(&tar, &profile("")), Vec::<String>::new());
    }

    #[test]
    fn archives_that_cannot_be_cut_are_refused_with_the_reason() {
        // A global PAX header.
        let mut b = tar::Builder::new(Vec::new());
        let data = b"30 comment=global for everyone\n";
        let mut g = header(tar::EntryType::XGlobalHeader, data.len() as u64, 0o644);
        g.set_path("pax_global_header").unwrap();
        g.set_cksum();
        b.append(&g, &data[..]).unwrap();
        let mut h = header(tar::EntryType::Regular, 1, 0o644);
        b.append_data(&mut h, "f", &b"x"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let err = cut_tar(io::Cursor::new(&tar)).unwrap_err();
        assert!(err.contains("global PAX header at offset 0"), "{err}");
        // A last entry whose data runs past the end.
        let full = build(&[T::File("f".into(), vec![1; 2000])], 0);
        let err = cut_tar(io::Cursor::new(&full[..1024])).unwrap_err();
        assert!(err.contains("more data than the archive holds"), "{err}");
        // An escaping path.
        let mut h = header(tar::EntryType::Regular, 0, 0o644);
        h.as_old_mut().name[..8].copy_from_slice(b"../evil\0");
        h.set_cksum();
        let mut bad = h.as_bytes().to_vec();
        bad.extend_from_slice(&[0; 1024]);
        let err = cut_tar(io::Cursor::new(&bad)).unwrap_err();
        assert!(err.contains("escapes"), "{err}");
    }

    #[test]
    fn moved_digest_is_over_the_moved_paths() {
        assert_eq!(
            moved_digest(["a", "b/c"]),
            faasnet_format::sha256_digest(b"a\nb/c\n")
        );
        assert_ne!(moved_digest(["a", "b"]), moved_digest(["b", "a"]));
    }

    /// Random archives over a small set of paths (so that duplicates, hardlinks to earlier
    /// files, whiteouts and directories around files all occur) and random profiles.
    fn arb_archive() -> impl Strategy<Value = (Vec<T>, usize)> {
        let names = prop_oneof![
            8 => prop::sample::select(vec![
                "a", "a/x", "a/y", "a/b", "a/b/z", "a/b/w", "c", "c/x", "d/e", "f", "g", "h/i/j",
            ]),
            1 => prop::sample::select(vec!["c/.wh.x", "a/.wh..wh..opq", ".wh.g", "a/b/.wh.w"]),
        ];
        let long = "l/".to_string() + &"n".repeat(120);
        let entry =
            (0u8..10, names, 0usize..1200, any::<u8>()).prop_map(move |(k, name, len, fill)| {
                let name = name.to_string();
                match k {
                    0 | 1 => T::Dir(name),
                    2..=5 => T::File(name, vec![fill; len]),
                    6 | 7 => T::PaxFile(format!("{long}/{name}"), vec![fill; len]),
                    8 => T::Symlink(name, "a".into()),
                    _ => T::Hardlink(name, String::new()),
                }
            });
        (prop::collection::vec(entry, 0..16), 0usize..3)
    }

    /// Makes hardlinks point at an earlier file (or drops them), as real archives do.
    fn fix_links(entries: Vec<T>) -> Vec<T> {
        let mut files: Vec<String> = Vec::new();
        let mut out = Vec::new();
        for e in entries {
            match e {
                T::Hardlink(p, _) => {
                    if let Some(t) = files.last() {
                        if *t != p {
                            out.push(T::Hardlink(p.clone(), t.clone()));
                        }
                    }
                }
                T::File(ref p, _) | T::PaxFile(ref p, _) => {
                    files.push(p.clone());
                    out.push(e);
                }
                e => out.push(e),
            }
        }
        out
    }

    /// A node of an extracted tree: a directory (with the bytes of the entry that last set
    /// it, `None` when created implicitly) or anything else (the bytes of its entry, or of
    /// the hardlink target's).
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Node {
        Dir(Option<Vec<u8>>),
        Other(Vec<u8>),
    }

    type Tree = std::collections::BTreeMap<String, Node>;

    /// The entries of an archive with their raw bytes (what identifies them).
    fn model(tar: &[u8]) -> Vec<(EntryFacts, Vec<u8>)> {
        let cut = cut_tar(io::Cursor::new(tar)).unwrap();
        cut.entries
            .into_iter()
            .zip(cut.spans)
            .map(|(e, r)| (e, tar[r.start as usize..r.end as usize].to_vec()))
            .collect()
    }

    fn remove(tree: &mut Tree, path: &str) {
        let below = format!("{path}/");
        tree.retain(|k, _| k != path && !k.starts_with(&below));
    }

    /// A naive, order-dependent applier (as simple extractors are): applies one layer's
    /// entries in archive order over `lower`, whiteouts and opaque markers when met (an
    /// opaque marker empties its directory, this layer's entries included). `None`
    /// when extraction fails (a parent that is not a directory, a hardlink to nothing).
    fn apply(lower: &Tree, layer: &[(EntryFacts, Vec<u8>)]) -> Option<Tree> {
        let mut tree = lower.clone();
        for (e, id) in layer {
            if e.path.is_empty() {
                continue;
            }
            for p in parents(&e.path).filter(|p| !p.is_empty()) {
                match tree.get(p) {
                    Some(Node::Dir(_)) => {}
                    Some(Node::Other(_)) => return None,
                    None => {
                        tree.insert(p.to_string(), Node::Dir(None));
                    }
                }
            }
            let (dir, name) = split(&e.path);
            if name == OPAQUE {
                let below = if dir.is_empty() {
                    String::new()
                } else {
                    format!("{dir}/")
                };
                // The harshest reading: everything below, this layer's own entries too.
                tree.retain(|k, _| !k.starts_with(&below) || k == dir);
                continue;
            }
            if let Some(h) = name.strip_prefix(WHITEOUT) {
                remove(&mut tree, &join(dir, h));
                continue;
            }
            let node = match e.kind {
                Some(EntryKind::Dir) => Node::Dir(Some(id.clone())),
                Some(EntryKind::Hardlink) => match tree.get(e.link.as_deref()?) {
                    Some(Node::Other(t)) => Node::Other(t.clone()),
                    _ => return None,
                },
                _ => Node::Other(id.clone()),
            };
            let both_dirs = matches!(
                (tree.get(&e.path), &node),
                (Some(Node::Dir(_)), Node::Dir(_))
            );
            if !both_dirs {
                remove(&mut tree, &e.path);
            }
            tree.insert(e.path.clone(), node);
        }
        Some(tree)
    }

    /// A lower layer's tree over the same names: files, symlinks and directories, so that
    /// the layer's directories may replace files of it and the other way round.
    fn arb_lower() -> impl Strategy<Value = Tree> {
        let names = prop::sample::select(vec![
            "a", "a/x", "a/b", "a/b/z", "c", "c/x", "d", "d/e", "f", "g", "h", "h/i",
        ]);
        prop::collection::vec((names, 0u8..3), 0..8).prop_map(|items| {
            let mut tree = Tree::new();
            'items: for (name, k) in items {
                for p in parents(name).filter(|p| !p.is_empty()) {
                    match tree.get(p) {
                        Some(Node::Other(_)) => continue 'items,
                        Some(Node::Dir(_)) => {}
                        None => {
                            tree.insert(p.to_string(), Node::Dir(None));
                        }
                    }
                }
                if tree.contains_key(name) {
                    continue;
                }
                let node = match k {
                    0 => Node::Dir(Some(b"lower dir".to_vec())),
                    _ => Node::Other(format!("lower {name} {k}").into_bytes()),
                };
                tree.insert(name.to_string(), node);
            }
            tree
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        #[test]
        fn reorder_keeps_every_entry(
            (entries, trailer) in arb_archive(),
            mut lower in arb_lower(),
            flips in any::<u16>(),
            picks in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let entries = fix_links(entries);
            let tar = build(&entries, trailer);
            // Only archives the converter accepts (e.g. no hardlink to what became a
            // directory).
            prop_assume!(faasnet_format::tar_index::index_tar(&tar[..]).is_ok());
            let paths: Vec<String> = entries
                .iter()
                .map(|e| match e {
                    T::Dir(p) | T::File(p, _) | T::PaxFile(p, _) | T::Hardlink(p, _)
                    | T::Symlink(p, _) => p.clone(),
                })
                .collect();
            let lines: Vec<String> = picks
                .iter()
                .map(|i| {
                    let i = i.index(paths.len() + 2);
                    paths.get(i).cloned().unwrap_or_else(|| format!("absent/{i}"))
                })
                .collect();
            let p = profile(&lines.join("\n"));
            let moved = check(&tar, &p);
            // Moved entries are named once in the layer; without hardlinks (which lend
            // their position) the files are in profile order.
            for m in &moved {
                prop_assert_eq!(paths.iter().filter(|q| *q == m).count(), 1);
            }
            if !entries.iter().any(|e| matches!(e, T::Hardlink(..))) {
                let files: Vec<&String> = moved
                    .iter()
                    .filter(|m| entries.iter().any(|e| matches!(e, T::File(q, _) | T::PaxFile(q, _) if q == *m)))
                    .collect();
                let file_ranks: Vec<usize> = files.iter().filter_map(|m| p.rank(m)).collect();
                let mut sorted = file_ranks.clone();
                sorted.sort_unstable();
                prop_assert_eq!(file_ranks, sorted);
            }
            // Applied over a lower layer by an order-dependent applier, the reordered layer
            // gives the same tree (when the original applies at all). Some of the layer's
            // directories are files or symlinks in the lower layer.
            for (i, e) in entries.iter().enumerate() {
                if let T::Dir(d) = e {
                    if flips & (1 << (i % 16)) != 0 {
                        remove(&mut lower, d);
                        if parents(d).all(|p| !matches!(lower.get(p), Some(Node::Other(_)))) {
                            lower.insert(d.clone(), Node::Other(b"lower non-dir".to_vec()));
                        }
                    }
                }
            }
            let (out, _) = reorder_bytes(&tar, &p).unwrap();
            if let Some(before) = apply(&lower, &model(&tar)) {
                prop_assert_eq!(apply(&lower, &model(&out)), Some(before));
            }
        }
    }
}
