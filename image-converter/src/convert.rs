//! Image conversion: every layer of an image (or of every platform image of an index) is
//! streamed from the source, decompressed, cut into blocks by `faasnet_format::convert_layer`
//! into a temporary file, verified (source digest, size, diffID) and pushed; then the config,
//! the new manifests and last the tag, so a tag never points at something half-pushed and a
//! bad input leaves the destination tag untouched.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Write};
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
}

#[derive(Default)]
struct Stats {
    converted: AtomicUsize,
    reused: AtomicUsize,
    kept: AtomicUsize,
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
    let layers: Vec<Descriptor> = futures::stream::iter(
        m.layers
            .iter()
            .zip(diff_ids)
            .enumerate()
            .map(|(i, (l, d))| convert_one(ctx, l, d, format!("layer {}/{n}", i + 1))),
    )
    .buffered(ctx.cfg.layer_jobs.max(1))
    .try_collect()
    .await?;
    // The config is unchanged: the tar streams, hence the diffIDs, are preserved.
    ctx.dst
        .push_blob_bytes(config_bytes, &m.config.digest)
        .await?;
    let mut out = m.clone();
    out.media_type = Some(media_types::OCI_MANIFEST.to_string());
    out.layers = layers;
    out.annotations
        .insert(annotations::CONVERTED.to_string(), "true".to_string());
    Ok(crate::manifest::to_bytes(&out))
}

/// Produces the converted descriptor of one layer: kept, reused or freshly converted.
async fn convert_one(
    ctx: &Ctx<'_>,
    desc: &Descriptor,
    diff_id: &str,
    label: String,
) -> Result<Descriptor> {
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
        progress.message(format!("{label} {short}: already in FaaSNet format, kept"));
        return Ok(desc.clone());
    }

    let key = cache::key(&desc.digest, ctx.cfg.block_size);
    if !ctx.cfg.force {
        let candidate = ctx
            .known
            .get(&key)
            .cloned()
            .or_else(|| ctx.cfg.cache.get(&key));
        if let Some(c) = candidate {
            let usable = c.media_type == faasnet_format::LAYER_MEDIA_TYPE
                && c.annotations.get(annotations::DIFF_ID).map(String::as_str) == Some(diff_id)
                && ctx.dst.blob_size(&c.digest).await? == Some(c.size);
            if usable {
                ctx.stats.reused.fetch_add(1, Ordering::Relaxed);
                progress.message(format!(
                    "{label} {short}: already converted ({}), skipped",
                    short_digest(&c.digest)
                ));
                return Ok(c);
            }
        }
    }

    let started = Instant::now();
    let stream = ctx.src.open_blob(&desc.digest).await?;
    let tmp = tempfile::NamedTempFile::new()?;
    let file = tmp.as_file().try_clone()?;
    let bar = progress.layer(&label, desc.size);
    bar.set_message("converting");
    let opts = ConvertOptions {
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
        opts,
        cancelled: Arc::clone(&cancel.0),
    };
    let reader = stream_reader(stream);
    let bar2 = bar.clone();
    let converted = tokio::task::spawn_blocking(move || job.run(reader, file, bar2))
        .await
        .map_err(|e| Error::layer(&desc.digest, format!("conversion thread failed: {e}")))??;
    drop(cancel);
    if converted.toc.diff_id != diff_id {
        bar.abandon_with_message("diffID mismatch");
        return Err(Error::layer(
            &desc.digest,
            format!(
                "uncompressed content has diffID {}, the image config says {diff_id}",
                converted.toc.diff_id
            ),
        ));
    }
    bar.set_message("pushing");
    ctx.dst
        .push_blob_file(tmp.path(), &converted.blob_digest, converted.blob_size)
        .await?;
    bar.finish_and_clear();
    let out = converted_descriptor(desc, &converted);
    ctx.cfg.cache.insert(key, out.clone());
    ctx.stats.converted.fetch_add(1, Ordering::Relaxed);
    progress.message(format!(
        "{label} {short}: converted {} {} -> {} ({} blocks) in {:.1}s",
        human_size(desc.size),
        compression_name(&desc.media_type),
        human_size(converted.blob_size),
        converted.toc.blocks.len(),
        started.elapsed().as_secs_f64()
    ));
    Ok(out)
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

/// The blocking part of a layer conversion.
struct LayerJob {
    desc: Descriptor,
    compression: LayerCompression,
    opts: ConvertOptions,
    cancelled: Arc<AtomicBool>,
}

impl LayerJob {
    fn run(
        self,
        reader: crate::stream_io::ChannelReader,
        file: std::fs::File,
        bar: indicatif::ProgressBar,
    ) -> Result<ConvertedLayer> {
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
            let mut out = BufWriter::with_capacity(1 << 20, file);
            let res = faasnet_format::convert_layer(&mut decoded, &mut out, &self.opts, &|_| {})
                .and_then(|c| {
                    out.flush()?;
                    Ok(c)
                });
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
            known.insert(cache::key(orig, bs), l.clone());
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
