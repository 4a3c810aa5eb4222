//! Image conversion: every layer of an image (or of every platform image of an index) is
//! streamed from the source, decompressed, cut into blocks by `faasnet_format::convert_layer`
//! into a temporary file, verified (source digest, size, diffID) and pushed; then the config,
//! the new manifests and last the tag, so a tag never points at something half-pushed and a
//! bad input leaves the destination tag untouched.
//!
//! With a start profile ([`crate::start_profile`]) a layer is first decompressed into a
//! temporary file, checked, then converted from a reordered tar stream (the profile's files
//! first); a reordered layer has a new diffID, so the image gets a new config.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use faasnet_format::{annotations, ConvertOptions, ConvertedLayer, FormatError, OriginalLayer};
use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;

use crate::cache::{self, LayerCache};
use crate::error::{Error, Result};
use crate::manifest::{
    media_types, Descriptor, ImageConfig, ImageIndex, ImageManifest, LayerCompression, Manifest,
};
use crate::progress::Progress;
use crate::registry::RegistryError;
use crate::start_profile::{self, EntryFacts, RangesReader, Reorder, StartProfile};
use crate::store::Store;
use crate::stream_io::{decompressor, stream_reader, DigestReader, Recorded};

/// Largest image config accepted.
const MAX_CONFIG_SIZE: usize = 64 * 1024 * 1024;

/// How to convert.
pub struct ConvertConfig {
    /// Block size of converted layers.
    pub block_size: u32,
    /// Compression threads per layer.
    pub threads: usize,
    /// Layers converted at the same time.
    pub layer_jobs: usize,
    /// Convert every layer again, ignoring the cache and earlier conversions.
    pub force: bool,
    /// Earlier conversions (original digest → converted descriptor).
    pub cache: Arc<LayerCache>,
    /// Where progress goes.
    pub progress: Progress,
    /// Files to put first in each layer, in this order (`--start-profile`).
    pub start_profile: Option<Arc<StartProfile>>,
}

impl ConvertConfig {
    /// Defaults: 512 KiB blocks, all cores, no persistent cache, no display.
    pub fn new() -> ConvertConfig {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        ConvertConfig {
            block_size: faasnet_format::DEFAULT_BLOCK_SIZE,
            threads: cores,
            // Downloads overlap with compression, so a few more layers than cores pays off;
            // memory per layer is bounded by the format pipeline.
            layer_jobs: (cores + 1).clamp(2, 8),
            force: false,
            cache: Arc::new(LayerCache::in_memory()),
            progress: Progress::hidden(),
            start_profile: None,
        }
    }
}

impl Default for ConvertConfig {
    fn default() -> Self {
        ConvertConfig::new()
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Default)]
pub struct ConvertOutcome {
    /// Digest of the manifest (or index) the destination tag now points at.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Layers converted in this run.
    pub converted: usize,
    /// Layers whose earlier conversion was reused.
    pub reused: usize,
    /// Layers that were already in the FaaSNet format.
    pub kept: usize,
    /// Layers (converted or reused) reordered by the start profile.
    pub reordered: usize,
}

#[derive(Default)]
struct Stats {
    converted: AtomicUsize,
    reused: AtomicUsize,
    kept: AtomicUsize,
    reordered: AtomicUsize,
}

struct Ctx<'a> {
    src: &'a Store,
    dst: &'a Store,
    cfg: &'a ConvertConfig,
    /// Conversions found in the destination's current manifest(s), by cache key.
    known: HashMap<String, Descriptor>,
    stats: Stats,
}

/// Converts the image `src` names and pushes it to `dst`. Returns the new top-level digest.
pub async fn convert_image(
    src: &Store,
    dst: &Store,
    cfg: &ConvertConfig,
) -> Result<ConvertOutcome> {
    faasnet_format::validate_block_size(cfg.block_size)?;
    let top = src.resolve().await?;
    let manifest =
        Manifest::parse(&top.bytes, &top.media_type).map_err(|r| Error::manifest(src.name(), r))?;
    let known = if cfg.force {
        HashMap::new()
    } else {
        existing_conversions(dst).await?
    };
    let ctx = Ctx {
        src,
        dst,
        cfg,
        known,
        stats: Stats::default(),
    };
    let (digest, media_type) = match manifest {
        Manifest::Image(m) => {
            let bytes = convert_manifest(&ctx, &m, &src.name()).await?;
            let digest = dst
                .push_manifest_tagged(&bytes, media_types::OCI_MANIFEST)
                .await?;
            (digest, media_types::OCI_MANIFEST)
        }
        Manifest::Index(index) => {
            let bytes = convert_index(&ctx, &index).await?;
            let digest = dst
                .push_manifest_tagged(&bytes, media_types::OCI_INDEX)
                .await?;
            (digest, media_types::OCI_INDEX)
        }
    };
    if let Err(e) = cfg.cache.save() {
        tracing::warn!("cannot save the conversion cache: {e}");
    }
    Ok(ConvertOutcome {
        digest,
        media_type: media_type.to_string(),
        converted: ctx.stats.converted.load(Ordering::Relaxed),
        reused: ctx.stats.reused.load(Ordering::Relaxed),
        kept: ctx.stats.kept.load(Ordering::Relaxed),
        reordered: ctx.stats.reordered.load(Ordering::Relaxed),
    })
}

/// Converts every platform image of an index and pushes each by digest; returns the new
/// index's bytes (not pushed: the caller tags it last).
async fn convert_index(ctx: &Ctx<'_>, index: &ImageIndex) -> Result<Vec<u8>> {
    let mut out = index.clone();
    out.media_type = Some(media_types::OCI_INDEX.to_string());
    out.manifests.clear();
    for child in &index.manifests {
        let platform = child.platform_name();
        if crate::oci_layout::is_unknown_platform(child) {
            // BuildKit attestations describe the original image's layers; they would be
            // wrong for the converted one.
            ctx.cfg
                .progress
                .message(format!("dropping attestation manifest {}", child.digest));
            continue;
        }
        if !media_types::is_image_manifest(&child.media_type) {
            return Err(Error::manifest(
                ctx.src.name(),
                format!(
                    "index entry {} has media type {:?}; only image manifests are supported \
                     inside an index",
                    child.digest, child.media_type
                ),
            ));
        }
        let fetched = ctx.src.fetch_manifest(child).await?;
        let name = format!("{} ({platform})", ctx.src.name());
        let m = match Manifest::parse(&fetched.bytes, &fetched.media_type)
            .map_err(|r| Error::manifest(&name, r))?
        {
            Manifest::Image(m) => m,
            Manifest::Index(_) => {
                return Err(Error::manifest(&name, "nested indexes are not supported"))
            }
        };
        ctx.cfg.progress.message(format!("converting {platform}"));
        let bytes = convert_manifest(ctx, &m, &name).await?;
        let mut desc = ctx
            .dst
            .push_manifest_untagged(&bytes, media_types::OCI_MANIFEST)
            .await?;
        desc.platform = child.platform.clone();
        desc.annotations = child.annotations.clone();
        out.manifests.push(desc);
    }
    if out.manifests.is_empty() {
        return Err(Error::manifest(
            ctx.src.name(),
            "index holds no image manifest",
        ));
    }
    out.annotations
        .insert(annotations::CONVERTED.to_string(), "true".to_string());
    Ok(crate::manifest::to_bytes(&out))
}

/// Converts the layers of one image, pushes them and the config; returns the new manifest's
/// bytes (not pushed).
async fn convert_manifest(ctx: &Ctx<'_>, m: &ImageManifest, name: &str) -> Result<Vec<u8>> {
    // Check every layer's media type first, so that an unknown one fails before any work.
    for l in &m.layers {
        if LayerCompression::from_media_type(&l.media_type).is_none() {
            return Err(Error::UnknownMediaType {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
            });
        }
    }
    let config_bytes = ctx.src.read_blob(&m.config.digest, MAX_CONFIG_SIZE).await?;
    let config: ImageConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| Error::manifest(name, format!("image config {}: {e}", m.config.digest)))?;
    let diff_ids = &config.rootfs.diff_ids;
    if diff_ids.len() != m.layers.len() {
        return Err(Error::manifest(
            name,
            format!(
                "the config lists {} diffIDs for {} layers",
                diff_ids.len(),
                m.layers.len()
            ),
        ));
    }
    let n = m.layers.len();
    let converted: Vec<(Descriptor, String)> = futures::stream::iter(
        m.layers
            .iter()
            .zip(diff_ids)
            .enumerate()
            .map(|(i, (l, d))| convert_one(ctx, l, d, format!("layer {}/{n}", i + 1))),
    )
    .buffered(ctx.cfg.layer_jobs.max(1))
    .try_collect()
    .await?;
    let (layers, new_diff_ids): (Vec<Descriptor>, Vec<String>) = converted.into_iter().unzip();
    let mut out = m.clone();
    if &new_diff_ids == diff_ids {
        // The config is unchanged: the tar streams, hence the diffIDs, are preserved.
        ctx.dst
            .push_blob_bytes(config_bytes, &m.config.digest)
            .await?;
    } else {
        // A start profile reordered some layers: same config, new diffIDs.
        let new = crate::manifest::replace_diff_ids(&config_bytes, &new_diff_ids)
            .map_err(|r| Error::manifest(name, format!("image config {}: {r}", m.config.digest)))?;
        let digest = faasnet_format::sha256_digest(&new);
        out.config.size = new.len() as u64;
        out.config.digest = digest.clone();
        ctx.cfg.progress.message(format!(
            "new image config {} (diffIDs of the reordered layers)",
            short_digest(&digest)
        ));
        ctx.dst.push_blob_bytes(new, &digest).await?;
    }
    out.media_type = Some(media_types::OCI_MANIFEST.to_string());
    out.layers = layers;
    out.annotations
        .insert(annotations::CONVERTED.to_string(), "true".to_string());
    Ok(crate::manifest::to_bytes(&out))
}

/// Produces the converted descriptor of one layer (kept, reused or freshly converted) and
/// the diffID of the tar stream it decodes to.
async fn convert_one(
    ctx: &Ctx<'_>,
    desc: &Descriptor,
    diff_id: &str,
    label: String,
) -> Result<(Descriptor, String)> {
    let progress = &ctx.cfg.progress;
    let short = short_digest(&desc.digest);
    let compression =
        LayerCompression::from_media_type(&desc.media_type).expect("checked by the caller");
    if compression == LayerCompression::Converted {
        if let Some(recorded) = desc.annotations.get(annotations::DIFF_ID) {
            if recorded != diff_id {
                return Err(Error::layer(
                    &desc.digest,
                    format!("annotated diffID {recorded} differs from the config's {diff_id}"),
                ));
            }
        }
        if ctx.dst.blob_size(&desc.digest).await? != Some(desc.size) {
            copy_blob(ctx.src, ctx.dst, desc).await?;
        }
        ctx.stats.kept.fetch_add(1, Ordering::Relaxed);
        let note = if ctx.cfg.start_profile.is_some() {
            " (the start profile is not applied to it)"
        } else {
            ""
        };
        progress.message(format!(
            "{label} {short}: already in FaaSNet format, kept{note}"
        ));
        return Ok((desc.clone(), diff_id.to_string()));
    }

    let profile = ctx.cfg.start_profile.as_deref();
    if !ctx.cfg.force {
        if let Some((c, new_diff_id)) = reusable(ctx, desc, diff_id, profile).await? {
            ctx.stats.reused.fetch_add(1, Ordering::Relaxed);
            let reordered = c.annotations.contains_key(annotations::START_PROFILE);
            if reordered {
                ctx.stats.reordered.fetch_add(1, Ordering::Relaxed);
            }
            progress.message(format!(
                "{label} {short}: already converted ({}{}), skipped",
                short_digest(&c.digest),
                if reordered {
                    ", start profile applied"
                } else {
                    ""
                }
            ));
            return Ok((c, new_diff_id));
        }
    }

    let started = Instant::now();
    let stream = ctx.src.open_blob(&desc.digest).await?;
    let tmp = tempfile::NamedTempFile::new()?;
    let file = tmp.as_file().try_clone()?;
    let bar = progress.layer(&label, desc.size);
    let mut opts = ConvertOptions {
        block_size: ctx.cfg.block_size,
        threads: ctx.cfg.threads.max(1),
        original: Some(OriginalLayer {
            digest: desc.digest.clone(),
            media_type: desc.media_type.clone(),
            size: desc.size,
        }),
        start_bytes: 0,
    };
    let cancel = CancelOnDrop::default();
    let job = LayerJob {
        desc: desc.clone(),
        compression,
        cancelled: Arc::clone(&cancel.0),
    };
    let reader = stream_reader(stream);
    let bar2 = bar.clone();
    let joined = |e: tokio::task::JoinError| {
        Error::layer(&desc.digest, format!("conversion thread failed: {e}"))
    };
    let (converted, layout) = match profile {
        None => {
            bar.set_message("converting");
            let converted = tokio::task::spawn_blocking(move || {
                job.run(reader, bar2, move |input| {
                    let mut out = BufWriter::with_capacity(1 << 20, file);
                    let c = faasnet_format::convert_layer(input, &mut out, &opts, &|_| {})?;
                    out.flush()?;
                    Ok(c)
                })
            })
            .await
            .map_err(joined)??;
            (converted, Layout::Unprofiled)
        }
        Some(_) => {
            // 1. Decompress into a spool file, with the checks of an unprofiled conversion.
            bar.set_message("decompressing");
            let spool = tempfile::tempfile()?;
            let spool2 = spool.try_clone()?;
            let tar_digest = tokio::task::spawn_blocking(move || {
                job.run(reader, bar2, move |input| spool_into(input, spool2))
            })
            .await
            .map_err(joined)??;
            if tar_digest != diff_id {
                bar.abandon_with_message("diffID mismatch");
                return Err(mismatch(desc, &tar_digest, diff_id));
            }
            // 2. Cut it into entry spans and convert the reordered stream.
            bar.set_message("converting");
            let profile = Arc::clone(ctx.cfg.start_profile.as_ref().expect("profile given"));
            let cancelled = Arc::clone(&cancel.0);
            let digest = desc.digest.clone();
            tokio::task::spawn_blocking(move || -> Result<(ConvertedLayer, Layout)> {
                let fail = |reason: String| Error::layer(&digest, reason);
                let layout = match start_profile::cut_tar(BufReader::new(&spool)) {
                    Ok(cut) => Layout::Planned(start_profile::plan(&cut, &profile)),
                    Err(why) => Layout::NotApplied(why),
                };
                let ranges = match &layout {
                    Layout::Planned(r) => r.ranges.clone(),
                    _ => std::iter::once(0..spool.metadata()?.len()).collect(),
                };
                if let Layout::Planned(r) = &layout {
                    opts.start_bytes = r.start_bytes;
                }
                let input = BufReader::with_capacity(
                    1 << 20,
                    CancellableReader {
                        inner: RangesReader::new(&spool, ranges),
                        cancelled: Arc::clone(&cancelled),
                    },
                );
                let mut out = BufWriter::with_capacity(1 << 20, file);
                let c =
                    faasnet_format::convert_layer(input, &mut out, &opts, &|_| {}).and_then(|c| {
                        out.flush()?;
                        Ok(c)
                    });
                if cancelled.load(Ordering::Relaxed) {
                    return Err(fail("cancelled".into()));
                }
                let c = c.map_err(|e| fail(describe_format_error(e)))?;
                Ok((c, layout))
            })
            .await
            .map_err(joined)??
        }
    };
    drop(cancel);
    let reordered = layout.reorder().filter(|r| r.is_reordered());
    if reordered.is_none() && converted.toc.diff_id != diff_id {
        bar.abandon_with_message("diffID mismatch");
        return Err(mismatch(desc, &converted.toc.diff_id, diff_id));
    }
    bar.set_message("pushing");
    ctx.dst
        .push_blob_file(tmp.path(), &converted.blob_digest, converted.blob_size)
        .await?;
    bar.finish_and_clear();
    let mut out = converted_descriptor(desc, &converted);
    let profile_digest = reordered.and_then(Reorder::digest);
    if let Some(d) = &profile_digest {
        out.annotations
            .insert(annotations::START_PROFILE.to_string(), d.clone());
        out.annotations.insert(
            annotations::ORIGINAL_DIFF_ID.to_string(),
            diff_id.to_string(),
        );
        ctx.stats.reordered.fetch_add(1, Ordering::Relaxed);
    }
    ctx.cfg.cache.insert(
        cache::profiled_key(&desc.digest, ctx.cfg.block_size, profile_digest.as_deref()),
        out.clone(),
    );
    ctx.stats.converted.fetch_add(1, Ordering::Relaxed);
    progress.message(format!(
        "{label} {short}: converted {} {} -> {} ({} blocks) in {:.1}s{}",
        human_size(desc.size),
        compression_name(&desc.media_type),
        human_size(converted.blob_size),
        converted.toc.blocks.len(),
        started.elapsed().as_secs_f64(),
        layout.describe(&converted)
    ));
    Ok((out, converted.toc.diff_id.clone()))
}

/// How a layer was laid out.
enum Layout {
    /// No start profile.
    Unprofiled,
    /// The profile's plan for the layer (possibly: nothing to move).
    Planned(Reorder),
    /// The layer could not be cut into entry spans; converted as it is.
    NotApplied(String),
}

impl Layout {
    fn reorder(&self) -> Option<&Reorder> {
        match self {
            Layout::Planned(r) => Some(r),
            _ => None,
        }
    }

    /// The end of the progress line.
    fn describe(&self, c: &ConvertedLayer) -> String {
        match self {
            Layout::Unprofiled => String::new(),
            Layout::Planned(r) if !r.is_reordered() => {
                "; start profile: no file of this layer listed, layout unchanged".into()
            }
            Layout::Planned(r) => format!(
                "; start profile: {} file{} moved first{}, start region {} ({} of {} block{}), \
                 new diffID {}",
                r.moved_files,
                if r.moved_files == 1 { "" } else { "s" },
                match r.moved.len() - r.moved_files {
                    0 => String::new(),
                    1 => " (with 1 parent directory entry)".to_string(),
                    n => format!(" (with {n} parent directory entries)"),
                },
                human_size(r.start_bytes),
                c.toc.start_blocks,
                c.toc.blocks.len(),
                if c.toc.blocks.len() == 1 { "" } else { "s" },
                short_digest(&c.toc.diff_id)
            ),
            Layout::NotApplied(why) => {
                format!("; start profile NOT applied (the layer cannot be reordered: {why})")
            }
        }
    }
}

fn mismatch(desc: &Descriptor, actual: &str, expected: &str) -> Error {
    Error::layer(
        &desc.digest,
        format!("uncompressed content has diffID {actual}, the image config says {expected}"),
    )
}

/// Copies the decompressed layer into `file`; returns its diffID.
fn spool_into(
    input: &mut dyn Read,
    file: std::fs::File,
) -> std::result::Result<String, FormatError> {
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut buf = vec![0u8; 1 << 20];
    let written = |e: std::io::Error| {
        FormatError::Io(std::io::Error::other(format!(
            "writing the layer's temporary copy: {e}"
        )))
    };
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        sha2::Digest::update(&mut hasher, &buf[..n]);
        out.write_all(&buf[..n]).map_err(written)?;
    }
    out.flush().map_err(written)?;
    Ok(format!(
        "sha256:{}",
        hex::encode(sha2::Digest::finalize(hasher))
    ))
}

/// An earlier conversion of `desc` the destination still has and that this run would
/// produce again, with the diffID its tar stream has.
///
/// Without a profile: one recorded under the plain cache key, not reordered, with the
/// config's diffID. With a profile: any conversion of the same layer and block size whose
/// TOC (read from the destination) shows that the profile moves exactly the files it moved
/// (same `start-profile` digest, or none moved and none recorded), and whose original
/// diffID is the config's.
async fn reusable(
    ctx: &Ctx<'_>,
    desc: &Descriptor,
    diff_id: &str,
    profile: Option<&StartProfile>,
) -> Result<Option<(Descriptor, String)>> {
    let bs = ctx.cfg.block_size;
    let candidates: Vec<Descriptor> = match profile {
        None => {
            let key = cache::key(&desc.digest, bs);
            ctx.known
                .get(&key)
                .cloned()
                .into_iter()
                .chain(ctx.cfg.cache.get(&key))
                .collect()
        }
        Some(_) => {
            let mut known: Vec<(&String, &Descriptor)> = ctx
                .known
                .iter()
                .filter(|(k, _)| cache::key_matches(k, &desc.digest, bs))
                .collect();
            known.sort_by(|a, b| a.0.cmp(b.0));
            known
                .into_iter()
                .map(|(_, d)| d.clone())
                .chain(
                    ctx.cfg
                        .cache
                        .candidates(&desc.digest, bs)
                        .into_iter()
                        .map(|(_, d)| d),
                )
                .collect()
        }
    };
    let mut tried = std::collections::HashSet::new();
    for c in candidates {
        if !tried.insert(c.digest.clone())
            || c.media_type != faasnet_format::LAYER_MEDIA_TYPE
            || ctx.dst.blob_size(&c.digest).await? != Some(c.size)
        {
            continue;
        }
        let ann = |k: &str| c.annotations.get(k).map(String::as_str);
        let Some(profile) = profile else {
            if ann(annotations::START_PROFILE).is_none()
                && ann(annotations::DIFF_ID) == Some(diff_id)
            {
                return Ok(Some((c.clone(), diff_id.to_string())));
            }
            continue;
        };
        let toc = match crate::inspect::read_toc_remote(ctx.dst, &c).await {
            Ok(toc) => toc,
            Err(e) => {
                tracing::debug!("not reusing {}: reading its TOC: {e}", c.digest);
                continue;
            }
        };
        if toc.original.as_ref().map(|o| o.digest.as_str()) != Some(desc.digest.as_str())
            || toc.block_size != bs
            || ann(annotations::DIFF_ID) != Some(toc.diff_id.as_str())
        {
            continue;
        }
        let facts: Vec<EntryFacts> = toc.entries.iter().map(EntryFacts::of_toc).collect();
        let moved = start_profile::select(profile, &facts);
        let want = (!moved.is_empty())
            .then(|| start_profile::moved_digest(moved.iter().map(|&i| facts[i].path.as_str())));
        if ann(annotations::START_PROFILE) != want.as_deref() {
            continue;
        }
        let original = if want.is_some() {
            ann(annotations::ORIGINAL_DIFF_ID)
        } else {
            ann(annotations::DIFF_ID)
        };
        if original == Some(diff_id) {
            return Ok(Some((c.clone(), toc.diff_id)));
        }
    }
    Ok(None)
}

fn compression_name(media_type: &str) -> &'static str {
    LayerCompression::from_media_type(media_type).map_or("?", LayerCompression::name)
}

/// The manifest descriptor of a converted layer, with the annotations readers use.
fn converted_descriptor(original: &Descriptor, c: &ConvertedLayer) -> Descriptor {
    let mut ann: BTreeMap<String, String> = original.annotations.clone();
    let mut put = |k: &str, v: String| {
        ann.insert(k.to_string(), v);
    };
    put(annotations::ORIGINAL_DIGEST, original.digest.clone());
    put(
        annotations::ORIGINAL_MEDIA_TYPE,
        original.media_type.clone(),
    );
    put(annotations::DIFF_ID, c.toc.diff_id.clone());
    put(annotations::BLOCK_SIZE, c.toc.block_size.to_string());
    put(annotations::TOC_OFFSET, c.footer.toc_offset.to_string());
    put(annotations::TOC_LENGTH, c.footer.toc_length.to_string());
    put(
        annotations::TOC_DIGEST,
        format!("sha256:{}", hex::encode(c.footer.toc_sha256)),
    );
    Descriptor {
        media_type: faasnet_format::LAYER_MEDIA_TYPE.to_string(),
        digest: c.blob_digest.clone(),
        size: c.blob_size,
        annotations: ann,
        platform: None,
        extra: Default::default(),
    }
}

/// Sets a flag when dropped: tells the blocking conversion that nobody waits for it any
/// more (another layer failed), so that it stops instead of converting to the end.
#[derive(Default)]
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The blocking part of a layer conversion: download, check and decompress the layer, and
/// hand the tar stream to `consume` (the converter, or a copy into a spool file).
struct LayerJob {
    desc: Descriptor,
    compression: LayerCompression,
    cancelled: Arc<AtomicBool>,
}

impl LayerJob {
    fn run<T>(
        self,
        reader: crate::stream_io::ChannelReader,
        bar: indicatif::ProgressBar,
        consume: impl FnOnce(&mut dyn Read) -> std::result::Result<T, FormatError>,
    ) -> Result<T> {
        let digest = self.desc.digest.clone();
        let fail = |reason: String| Error::layer(&digest, reason);
        let cancelled = Arc::clone(&self.cancelled);
        let reader = CancellableReader {
            inner: reader,
            cancelled,
        };
        let (net, net_err) = Recorded::new(reader);
        let mut counted = DigestReader::new(net, Box::new(move |n| bar.set_position(n)));
        let result = {
            let (decoded, actual) = decompressor(&mut counted, self.compression)
                .map_err(|e| fail(format!("reading the blob: {e}")))?;
            let (mut decoded, dec_err) = Recorded::new(decoded);
            let res = consume(&mut decoded);
            if res.is_err() && dec_err.lock().expect("slot").is_none() {
                // Corrupt compressed data often decodes to garbage that the tar parser trips
                // on before the decoder notices (at the checksum). Finish decoding so the
                // real cause is reported.
                let _ = std::io::copy(&mut decoded, &mut std::io::sink());
            }
            res.map_err(|e| {
                if let Some(n) = net_err.lock().expect("slot").clone() {
                    fail(format!("downloading: {n}"))
                } else if let (Some(d), true) = (
                    dec_err.lock().expect("slot").clone(),
                    actual != LayerCompression::None,
                ) {
                    fail(format!(
                        "the {} stream is corrupt or truncated: {d}",
                        actual.name()
                    ))
                } else {
                    fail(describe_format_error(e))
                }
            })
        };
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(fail("cancelled".into()));
        }
        if let Some(n) = net_err.lock().expect("slot").clone() {
            return Err(fail(format!("downloading: {n}")));
        }
        // Read what the decoder left (trailing bytes belong to the blob too), then check the
        // blob against its descriptor. A digest mismatch explains any decoding error above,
        // so it is reported first.
        let finished = counted.finish();
        if let Ok((actual, size)) = &finished {
            if *actual != self.desc.digest {
                return Err(fail(format!(
                    "content has digest {actual} ({size} bytes), the manifest says {} \
                     ({} bytes): corrupt or tampered blob",
                    self.desc.digest, self.desc.size
                )));
            }
            if *size != self.desc.size {
                return Err(fail(format!(
                    "blob is {size} bytes, the manifest says {}",
                    self.desc.size
                )));
            }
        }
        let converted = result?;
        finished.map_err(|e| fail(format!("downloading: {e}")))?;
        Ok(converted)
    }
}

/// Fails reads once the conversion was cancelled.
struct CancellableReader<R> {
    inner: R,
    cancelled: Arc<AtomicBool>,
}

impl<R: std::io::Read> std::io::Read for CancellableReader<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("cancelled"));
        }
        self.inner.read(out)
    }
}

/// Words a format error about a source layer for people.
fn describe_format_error(e: FormatError) -> String {
    match e {
        FormatError::NotTar(why) if why.contains("unexpected EOF") => format!(
            "not a valid tar archive: {why} (an entry's header claims more data than the layer \
             holds, or the layer is truncated)"
        ),
        FormatError::NotTar(why) => format!("not a valid tar archive: {why}"),
        FormatError::BadEntry { path, reason } => format!("tar entry {path:?}: {reason}"),
        FormatError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => format!(
            "the tar stream ends early (truncated layer, or a header claiming more data than \
             there is): {io}"
        ),
        other => other.to_string(),
    }
}

/// Copies a blob (already in the FaaSNet format) from `src` to `dst` through a temp file,
/// checking its digest.
async fn copy_blob(src: &Store, dst: &Store, desc: &Descriptor) -> Result<()> {
    let mut stream = src.open_blob(&desc.digest).await?;
    let tmp = tempfile::NamedTempFile::new()?;
    let mut file = tokio::fs::File::from_std(tmp.as_file().try_clone()?);
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::layer(&desc.digest, format!("downloading: {e}")))?;
        sha2::Digest::update(&mut hasher, &chunk);
        size += chunk.len() as u64;
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    let actual = format!("sha256:{}", hex::encode(sha2::Digest::finalize(hasher)));
    if actual != desc.digest || size != desc.size {
        return Err(Error::layer(
            &desc.digest,
            format!("content has digest {actual} ({size} bytes): corrupt blob"),
        ));
    }
    dst.push_blob_file(tmp.path(), &desc.digest, desc.size)
        .await
}

/// Conversions recorded in the destination's current image(s): lets a re-conversion skip
/// layers even without the local cache. An unreachable destination fails here, early.
async fn existing_conversions(dst: &Store) -> Result<HashMap<String, Descriptor>> {
    let mut known = HashMap::new();
    let top = match dst.resolve_existing().await {
        Ok(Some(top)) => top,
        Ok(None) => return Ok(known),
        Err(e @ Error::Registry(RegistryError::Unreachable { .. })) => return Err(e),
        Err(e) => {
            tracing::debug!("ignoring the destination's current image: {e}");
            return Ok(known);
        }
    };
    let mut manifests = Vec::new();
    match Manifest::parse(&top.bytes, &top.media_type) {
        Ok(Manifest::Image(m)) => manifests.push(m),
        Ok(Manifest::Index(i)) => {
            for child in i.manifests.iter().take(64) {
                if let Ok(f) = dst.fetch_manifest(child).await {
                    if let Ok(Manifest::Image(m)) = Manifest::parse(&f.bytes, &f.media_type) {
                        manifests.push(m);
                    }
                }
            }
        }
        Err(_) => {}
    }
    for m in manifests {
        for l in m.layers {
            if l.media_type != faasnet_format::LAYER_MEDIA_TYPE {
                continue;
            }
            let (Some(orig), Some(bs)) = (
                l.annotations.get(annotations::ORIGINAL_DIGEST),
                l.annotations
                    .get(annotations::BLOCK_SIZE)
                    .and_then(|b| b.parse::<u32>().ok()),
            ) else {
                continue;
            };
            let profile = l
                .annotations
                .get(annotations::START_PROFILE)
                .map(String::as_str);
            known.insert(cache::profiled_key(orig, bs, profile), l.clone());
        }
    }
    Ok(known)
}

/// `sha256:0123456789ab` for messages.
pub fn short_digest(d: &str) -> &str {
    &d[..d.len().min(19)]
}

/// `12.3 MiB`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
