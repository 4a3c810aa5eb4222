//! Reading converted layers back: the TOC (from a local blob or from a store, with range
//! reads of the blob's tail), summaries for `inspect`, and full verification for `verify`.

use std::fmt::Write as _;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use faasnet_format::{
    decode_block, parse_tail, parse_toc_parts, toc_head_range, EntryKind, FormatError, TailParse,
    Toc, DEFAULT_TAIL_FETCH,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::convert::human_size;
use crate::error::{Error, Result};
use crate::manifest::{media_types, Descriptor, Manifest};
use crate::store::Store;

/// Reads the TOC of a converted blob stored in a local file.
pub fn read_toc_file(path: &Path) -> Result<(Toc, u64)> {
    let mut f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    let tail_len = size.min(DEFAULT_TAIL_FETCH);
    let mut tail = vec![0u8; tail_len as usize];
    f.seek(SeekFrom::End(-(tail_len as i64)))?;
    f.read_exact(&mut tail)?;
    let toc = match parse_tail(&tail, size)? {
        TailParse::Complete(toc, _) => *toc,
        TailParse::NeedToc(footer) => {
            let (offset, len) = toc_head_range(&footer, size, tail_len);
            let mut head = vec![0u8; len as usize];
            f.seek(SeekFrom::Start(offset))?;
            f.read_exact(&mut head)?;
            parse_toc_parts(&head, &tail, &footer, size)?
        }
    };
    Ok((toc, size))
}

/// Reads the TOC of converted layer `desc` from `store` with one or two range reads.
pub async fn read_toc_remote(store: &Store, desc: &Descriptor) -> Result<Toc> {
    let size = desc.size;
    let tail_len = size.min(DEFAULT_TAIL_FETCH);
    let tail = store
        .read_range(&desc.digest, size - tail_len, tail_len)
        .await?;
    let toc = match parse_tail(&tail, size).map_err(|e| layer_err(desc, e))? {
        TailParse::Complete(toc, _) => *toc,
        TailParse::NeedToc(footer) => {
            // Only the part of the TOC frame the tail does not hold.
            let (offset, len) = toc_head_range(&footer, size, tail_len);
            let head = store.read_range(&desc.digest, offset, len).await?;
            parse_toc_parts(&head, &tail, &footer, size).map_err(|e| layer_err(desc, e))?
        }
    };
    Ok(toc)
}

fn layer_err(desc: &Descriptor, e: FormatError) -> Error {
    Error::layer(&desc.digest, e.to_string())
}

/// Counts and sizes of a converted layer.
#[derive(Debug, Clone, Serialize)]
pub struct TocSummary {
    pub entries: usize,
    pub files: usize,
    pub dirs: usize,
    pub symlinks: usize,
    pub hardlinks: usize,
    pub other: usize,
    /// Bytes of regular-file data.
    pub file_bytes: u64,
    /// Uncompressed tar stream size.
    pub tar_size: u64,
    pub block_size: u32,
    pub blocks: usize,
    /// Blocks `0..start_blocks` hold the start profile's files (0: no profile).
    #[serde(skip_serializing_if = "is_zero")]
    pub start_blocks: u32,
    /// Bytes of all blocks as stored.
    pub stored_size: u64,
    /// Whole blob (blocks + TOC + footer).
    pub blob_size: u64,
    /// tar size / blob size.
    pub compression_ratio: f64,
    pub diff_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_media_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_size: Option<u64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Summarizes a TOC of a blob of `blob_size` bytes.
pub fn summarize(toc: &Toc, blob_size: u64) -> TocSummary {
    let count = |k: EntryKind| toc.entries.iter().filter(|e| e.kind == k).count();
    let files = count(EntryKind::File);
    let dirs = count(EntryKind::Dir);
    let symlinks = count(EntryKind::Symlink);
    let hardlinks = count(EntryKind::Hardlink);
    TocSummary {
        entries: toc.entries.len(),
        files,
        dirs,
        symlinks,
        hardlinks,
        other: toc.entries.len() - files - dirs - symlinks - hardlinks,
        file_bytes: toc.entries.iter().map(|e| e.size).sum(),
        tar_size: toc.tar_size,
        block_size: toc.block_size,
        blocks: toc.blocks.len(),
        start_blocks: toc.start_blocks,
        stored_size: toc.stored_size(),
        blob_size,
        compression_ratio: if blob_size == 0 {
            0.0
        } else {
            toc.tar_size as f64 / blob_size as f64
        },
        diff_id: toc.diff_id.clone(),
        original_digest: toc.original.as_ref().map(|o| o.digest.clone()),
        original_media_type: toc.original.as_ref().map(|o| o.media_type.clone()),
        original_size: toc.original.as_ref().map(|o| o.size),
    }
}

/// One layer as `inspect` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    /// Layer digest (none for a local blob file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Local path for a blob file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Platform of the image the layer belongs to (indexes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    pub media_type: String,
    pub size: u64,
    /// False for layers not in the FaaSNet format (nothing more is reported for them).
    pub converted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<TocSummary>,
    /// The TOC itself, for `--entries` / `--blocks`.
    #[serde(skip)]
    pub toc: Option<Toc>,
}

/// The layers of every image `store` names (each platform of an index).
pub async fn image_layers(store: &Store) -> Result<Vec<(Option<String>, Descriptor)>> {
    let top = store.resolve().await?;
    let mut out = Vec::new();
    match Manifest::parse(&top.bytes, &top.media_type)
        .map_err(|r| Error::manifest(store.name(), r))?
    {
        Manifest::Image(m) => out.extend(m.layers.into_iter().map(|l| (None, l))),
        Manifest::Index(idx) => {
            for child in idx.manifests {
                if !media_types::is_image_manifest(&child.media_type)
                    || crate::oci_layout::is_unknown_platform(&child)
                {
                    continue;
                }
                let f = store.fetch_manifest(&child).await?;
                if let Manifest::Image(m) = Manifest::parse(&f.bytes, &f.media_type)
                    .map_err(|r| Error::manifest(store.name(), r))?
                {
                    let p = child.platform_name();
                    out.extend(m.layers.into_iter().map(|l| (Some(p.clone()), l)));
                }
            }
        }
    }
    Ok(out)
}

/// Inspects every layer of the image `store` names.
pub async fn inspect_image(store: &Store) -> Result<Vec<LayerInfo>> {
    let mut out = Vec::new();
    for (platform, desc) in image_layers(store).await? {
        let converted = desc.media_type == faasnet_format::LAYER_MEDIA_TYPE;
        let toc = if converted {
            Some(read_toc_remote(store, &desc).await?)
        } else {
            None
        };
        out.push(LayerInfo {
            digest: Some(desc.digest.clone()),
            path: None,
            platform,
            media_type: desc.media_type.clone(),
            size: desc.size,
            converted,
            summary: toc.as_ref().map(|t| summarize(t, desc.size)),
            toc,
        });
    }
    Ok(out)
}

/// Inspects a local blob file.
pub fn inspect_file(path: &Path) -> Result<LayerInfo> {
    let (toc, size) = read_toc_file(path)?;
    Ok(LayerInfo {
        digest: None,
        path: Some(path.display().to_string()),
        platform: None,
        media_type: faasnet_format::LAYER_MEDIA_TYPE.to_string(),
        size,
        converted: true,
        summary: Some(summarize(&toc, size)),
        toc: Some(toc),
    })
}

/// What to print besides the summaries.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShowOptions {
    pub entries: bool,
    pub blocks: bool,
}

/// Renders `inspect` output for people.
pub fn render_text(layers: &[LayerInfo], show: ShowOptions) -> String {
    let mut s = String::new();
    let n = layers.len();
    let (mut tar, mut blob, mut entries, mut blocks) = (0u64, 0u64, 0usize, 0usize);
    for (i, l) in layers.iter().enumerate() {
        let name = l.digest.clone().or(l.path.clone()).unwrap_or_default();
        let platform = l
            .platform
            .as_deref()
            .map(|p| format!(" [{p}]"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "layer {}/{n}{platform} {name} ({}, {})",
            i + 1,
            l.media_type,
            human_size(l.size)
        );
        let (Some(sum), Some(toc)) = (&l.summary, &l.toc) else {
            let _ = writeln!(s, "  not converted");
            continue;
        };
        tar += sum.tar_size;
        blob += sum.blob_size;
        entries += sum.entries;
        blocks += sum.blocks;
        let _ = writeln!(
            s,
            "  entries: {} ({} files, {} dirs, {} symlinks, {} hardlinks, {} other); file data {}",
            sum.entries,
            sum.files,
            sum.dirs,
            sum.symlinks,
            sum.hardlinks,
            sum.other,
            human_size(sum.file_bytes)
        );
        let _ = writeln!(
            s,
            "  tar {} in {} blocks of {}; stored {}; blob {}; ratio {:.2}x",
            human_size(sum.tar_size),
            sum.blocks,
            human_size(sum.block_size as u64),
            human_size(sum.stored_size),
            human_size(sum.blob_size),
            sum.compression_ratio
        );
        if sum.start_blocks > 0 {
            let stored: u64 = toc
                .blocks
                .iter()
                .take(sum.start_blocks as usize)
                .map(|b| b.stored_len)
                .sum();
            let _ = writeln!(
                s,
                "  start profile: blocks 0..{} ({} stored) hold the files a start reads first",
                sum.start_blocks,
                human_size(stored)
            );
        }
        let _ = writeln!(s, "  diffID {}", sum.diff_id);
        if let (Some(d), Some(m)) = (&sum.original_digest, &sum.original_media_type) {
            let _ = writeln!(
                s,
                "  original {d} ({m}, {})",
                human_size(sum.original_size.unwrap_or(0))
            );
        }
        if show.entries {
            let _ = writeln!(s, "  {:<10} {:>11} {:>12}  path", "mode", "uid/gid", "size");
            for e in &toc.entries {
                let link = match (&e.kind, &e.link) {
                    (EntryKind::Hardlink, Some(l)) => format!(" link to {l}"),
                    (_, Some(l)) => format!(" -> {l}"),
                    _ => String::new(),
                };
                let _ = writeln!(
                    s,
                    "  {:<10} {:>11} {:>12}  {}{}{link}",
                    mode_string(e.kind, e.mode),
                    format!("{}/{}", e.uid, e.gid),
                    e.size,
                    if e.path.is_empty() { "." } else { &e.path },
                    if e.kind == EntryKind::Dir { "/" } else { "" },
                );
            }
        }
        if show.blocks {
            let _ = writeln!(
                s,
                "  {:>6} {:>12} {:>9} {:>9}  digest",
                "block", "offset", "stored", "raw"
            );
            for (i, b) in toc.blocks.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "  {i:>6} {:>12} {:>9} {:>9}  {}",
                    b.offset, b.stored_len, b.raw_len, b.digest
                );
            }
        }
    }
    if layers.iter().filter(|l| l.converted).count() > 1 {
        let _ = writeln!(
            s,
            "total: {entries} entries, {blocks} blocks, tar {}, blobs {}, ratio {:.2}x",
            human_size(tar),
            human_size(blob),
            if blob == 0 {
                0.0
            } else {
                tar as f64 / blob as f64
            }
        );
    }
    s
}

/// Renders `inspect --json` output.
pub fn render_json(source: &str, layers: &[LayerInfo], show: ShowOptions) -> serde_json::Value {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            let mut v = serde_json::to_value(l).expect("serializes");
            if let Some(toc) = &l.toc {
                if show.entries {
                    v["entries"] = serde_json::to_value(&toc.entries).expect("serializes");
                }
                if show.blocks {
                    v["blocks"] = serde_json::to_value(&toc.blocks).expect("serializes");
                }
            }
            v
        })
        .collect();
    serde_json::json!({ "source": source, "layers": layers })
}

/// `drwxr-xr-x` style mode.
fn mode_string(kind: EntryKind, mode: u32) -> String {
    let t = match kind {
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        EntryKind::Hardlink => 'h',
        EntryKind::Char => 'c',
        EntryKind::Block => 'b',
        EntryKind::Fifo => 'p',
        EntryKind::File => '-',
    };
    let mut s = String::from(t);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// The result of verifying one blob.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub blocks: usize,
    pub entries: usize,
    pub tar_size: u64,
    pub blob_size: u64,
    pub diff_id: String,
    pub blob_digest: String,
}

/// Reads a whole blob in order, checking every block against the TOC (digest before
/// decompression, then the decoded length) and the decoded stream against the diffID.
/// The first bad block is named in the error.
pub fn verify_blob<R: Read>(input: R, toc: &Toc) -> Result<VerifyReport, FormatError> {
    let mut input = io::BufReader::with_capacity(1 << 20, input);
    let mut blob = Sha256::new();
    let mut diff = Sha256::new();
    let mut buf = Vec::new();
    let mut offset = 0u64;
    for (i, b) in toc.blocks.iter().enumerate() {
        buf.clear();
        (&mut input).take(b.stored_len).read_to_end(&mut buf)?;
        if buf.len() as u64 != b.stored_len {
            return Err(FormatError::BadBlock {
                index: i,
                reason: format!(
                    "blob ends inside this block (at offset {})",
                    offset + buf.len() as u64
                ),
            });
        }
        blob.update(&buf);
        let raw = decode_block(i, b, &buf)?;
        diff.update(&raw);
        offset += b.stored_len;
    }
    let mut rest = 0u64;
    loop {
        buf.resize(1 << 16, 0);
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        blob.update(&buf[..n]);
        rest += n as u64;
    }
    let actual = format!("sha256:{}", hex::encode(diff.finalize()));
    if actual != toc.diff_id {
        return Err(FormatError::DiffIdMismatch {
            expected: toc.diff_id.clone(),
            actual,
        });
    }
    Ok(VerifyReport {
        blocks: toc.blocks.len(),
        entries: toc.entries.len(),
        tar_size: toc.tar_size,
        blob_size: offset + rest,
        diff_id: toc.diff_id.clone(),
        blob_digest: format!("sha256:{}", hex::encode(blob.finalize())),
    })
}

/// Verifies a local blob file.
pub fn verify_file(path: &Path) -> Result<VerifyReport> {
    let (toc, _) = read_toc_file(path)?;
    Ok(verify_blob(std::fs::File::open(path)?, &toc)?)
}

/// Verifies converted layer `desc` of `store`: TOC, every block, the diffID (against the
/// TOC, the layer's annotation and `config_diff_id` when given) and the blob digest.
pub async fn verify_remote(
    store: &Store,
    desc: &Descriptor,
    config_diff_id: Option<&str>,
) -> Result<VerifyReport> {
    let toc = read_toc_remote(store, desc).await?;
    let stream = store.open_blob(&desc.digest).await?;
    let reader = crate::stream_io::stream_reader(stream);
    let toc2 = toc.clone();
    let report = tokio::task::spawn_blocking(move || verify_blob(reader, &toc2))
        .await
        .map_err(|e| Error::layer(&desc.digest, e.to_string()))?
        .map_err(|e| layer_err(desc, e))?;
    if report.blob_digest != desc.digest {
        return Err(Error::layer(
            &desc.digest,
            format!("blob content has digest {}", report.blob_digest),
        ));
    }
    let annotated = desc.annotations.get(faasnet_format::annotations::DIFF_ID);
    for (what, expected) in [
        ("layer annotation", annotated.map(String::as_str)),
        ("image config", config_diff_id),
    ] {
        if let Some(expected) = expected {
            if expected != toc.diff_id {
                return Err(Error::layer(
                    &desc.digest,
                    format!(
                        "diffID {} differs from the {what}'s {expected}",
                        toc.diff_id
                    ),
                ));
            }
        }
    }
    Ok(report)
}

/// The diffIDs of the image config of the manifest a layer belongs to, by layer digest.
pub async fn config_diff_ids(store: &Store) -> Result<std::collections::HashMap<String, String>> {
    let mut out = std::collections::HashMap::new();
    let top = store.resolve().await?;
    let mut manifests = Vec::new();
    match Manifest::parse(&top.bytes, &top.media_type)
        .map_err(|r| Error::manifest(store.name(), r))?
    {
        Manifest::Image(m) => manifests.push(m),
        Manifest::Index(idx) => {
            for child in idx.manifests {
                if !media_types::is_image_manifest(&child.media_type)
                    || crate::oci_layout::is_unknown_platform(&child)
                {
                    continue;
                }
                let f = store.fetch_manifest(&child).await?;
                if let Ok(Manifest::Image(m)) = Manifest::parse(&f.bytes, &f.media_type) {
                    manifests.push(m);
                }
            }
        }
    }
    for m in manifests {
        let bytes = store.read_blob(&m.config.digest, 64 << 20).await?;
        let config: crate::manifest::ImageConfig = serde_json::from_slice(&bytes)
            .map_err(|e| Error::manifest(store.name(), format!("image config: {e}")))?;
        for (l, d) in m.layers.iter().zip(config.rootfs.diff_ids) {
            out.insert(l.digest.clone(), d);
        }
    }
    Ok(out)
}
