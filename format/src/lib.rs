//! The FaaSNet block image format, shared by the writer (image-converter) and the reader
//! (snapshotter). docs/format.md is the specification; this crate is its only implementation.
//!
//! A converted layer blob is a valid LZ4 frame stream:
//!
//! ```text
//! [block 0: one LZ4 frame] [block 1] ... [block n-1] [TOC: skippable frame] [footer: skippable frame]
//! ```
//!
//! Each block holds `block_size` bytes of the layer's *uncompressed tar stream* (the last one
//! may be shorter), compressed on its own, with its sha256 recorded in the block table. Because
//! the tar stream is cut verbatim, decompressing every block in order gives back the original
//! tar byte for byte, so the layer's diffID does not change. Standard `lz4 -dc` skips the two
//! metadata frames and prints the original tar too.

pub mod block;
pub mod error;
pub mod footer;
pub mod reader;
pub mod tar_index;
pub mod toc;
pub mod writer;

pub use block::{decode_block, decode_frame, encode_block, EncodedBlock};
pub use error::{FormatError, Result};
pub use footer::{Footer, FOOTER_SIZE};
pub use reader::{
    decode_stream, parse_tail, parse_toc_frame, parse_toc_parts, toc_head_range, TailParse,
    DEFAULT_TAIL_FETCH,
};
pub use toc::{BlockEntry, EntryChecker, EntryKind, OriginalLayer, Toc, TocEntry};
pub use writer::{convert_layer, encode_tail, ConvertOptions, ConvertedLayer};

/// Default block size: 512 KiB, as in the paper's evaluation.
pub const DEFAULT_BLOCK_SIZE: u32 = 512 * 1024;
/// Smallest block size accepted.
pub const MIN_BLOCK_SIZE: u32 = 64 * 1024;
/// Largest block size accepted (the largest LZ4 frame block).
pub const MAX_BLOCK_SIZE: u32 = 4 * 1024 * 1024;

/// Media type of a converted layer. It keeps the `application/vnd.oci.image.layer.` prefix so
/// that containerd treats it as a layer, and a suffix no stock tool decompresses, so that a
/// stock containerd hands it to our stream processor.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+faasnet.lz4block";

/// Annotations written on each converted layer descriptor in the manifest.
pub mod annotations {
    /// Digest of the original (e.g. gzip) layer blob this layer was converted from.
    pub const ORIGINAL_DIGEST: &str = "io.faasnet.layer.original-digest";
    /// Media type of the original layer blob.
    pub const ORIGINAL_MEDIA_TYPE: &str = "io.faasnet.layer.original-media-type";
    /// diffID (sha256 of the uncompressed tar the blob decodes to): the original layer's,
    /// unless a start profile reordered the layer (then see [`ORIGINAL_DIFF_ID`]).
    pub const DIFF_ID: &str = "io.faasnet.layer.diff-id";
    /// On a layer reordered by a start profile: the diffID of the original tar stream.
    pub const ORIGINAL_DIFF_ID: &str = "io.faasnet.layer.original-diff-id";
    /// On a layer reordered by a start profile: `sha256:` of the paths of the entries moved
    /// to the start of the layer, one per line (each ending in `\n`), in their new order. Together with
    /// the original digest and block size it determines the converted blob.
    pub const START_PROFILE: &str = "io.faasnet.layer.start-profile";
    /// Block size in bytes.
    pub const BLOCK_SIZE: &str = "io.faasnet.layer.block-size";
    /// Offset of the TOC frame in the blob, so a reader can skip the footer request.
    pub const TOC_OFFSET: &str = "io.faasnet.layer.toc-offset";
    /// Length of the TOC frame (header included).
    pub const TOC_LENGTH: &str = "io.faasnet.layer.toc-length";
    /// Digest of the TOC frame's payload.
    pub const TOC_DIGEST: &str = "io.faasnet.layer.toc-digest";
    /// Marks a manifest produced by the converter.
    pub const CONVERTED: &str = "io.faasnet.image.converted";
}

/// Checks that `block_size` is a power of two between 64 KiB and 4 MiB.
pub fn validate_block_size(block_size: u32) -> Result<()> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(FormatError::BadBlockSize(block_size));
    }
    Ok(())
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}
