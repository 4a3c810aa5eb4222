//! The fixed-size footer at the very end of a blob, and the TOC frame it points to.
//!
//! Both are LZ4 *skippable frames* (magic `0x184D2A5?` + u32 length + payload), so standard
//! LZ4 tools ignore them when decompressing the blob.

use sha2::{Digest, Sha256};

use crate::error::{FormatError, Result};

/// Magic number of the skippable frame that holds the TOC.
pub const TOC_FRAME_MAGIC: u32 = 0x184D_2A5A;
/// Magic number of the skippable frame that holds the footer.
pub const FOOTER_FRAME_MAGIC: u32 = 0x184D_2A5F;
/// Magic bytes at the start of the footer payload.
pub const FOOTER_MAGIC: &[u8; 8] = b"FAASNETF";
/// Current format version.
pub const FORMAT_VERSION: u32 = 1;
/// Length of a skippable frame header (magic + length).
pub const FRAME_HEADER_SIZE: usize = 8;
const FOOTER_PAYLOAD_SIZE: usize = 64;
/// Total size of the footer frame at the end of every blob.
pub const FOOTER_SIZE: usize = FRAME_HEADER_SIZE + FOOTER_PAYLOAD_SIZE;
/// Largest TOC frame a reader accepts; protects against absurd lengths in a hostile footer.
pub const MAX_TOC_FRAME: u64 = 256 * 1024 * 1024;

/// Where the TOC lies in the blob, and how to check it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    /// Format version the blob was written with.
    pub version: u32,
    /// Block size in bytes.
    pub block_size: u32,
    /// Offset of the TOC frame (its skippable-frame header) in the blob.
    pub toc_offset: u64,
    /// Length of the whole TOC frame, header included.
    pub toc_length: u64,
    /// sha256 of the TOC frame's payload.
    pub toc_sha256: [u8; 32],
}

impl Footer {
    /// Serializes the footer frame (exactly [`FOOTER_SIZE`] bytes).
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[0..4].copy_from_slice(&FOOTER_FRAME_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&(FOOTER_PAYLOAD_SIZE as u32).to_le_bytes());
        let p = &mut b[8..];
        p[0..8].copy_from_slice(FOOTER_MAGIC);
        p[8..12].copy_from_slice(&self.version.to_le_bytes());
        p[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        p[16..24].copy_from_slice(&self.toc_offset.to_le_bytes());
        p[24..32].copy_from_slice(&self.toc_length.to_le_bytes());
        p[32..64].copy_from_slice(&self.toc_sha256);
        b
    }

    /// Parses the last [`FOOTER_SIZE`] bytes of a blob of `blob_size` bytes.
    pub fn parse(bytes: &[u8], blob_size: u64) -> Result<Footer> {
        let bad = |m: &str| FormatError::BadFooter(m.to_string());
        if bytes.len() != FOOTER_SIZE {
            return Err(bad(&format!(
                "expected {FOOTER_SIZE} bytes, got {}",
                bytes.len()
            )));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        if u32_at(0) != FOOTER_FRAME_MAGIC || &bytes[8..16] != FOOTER_MAGIC {
            return Err(bad(
                "no FaaSNet footer at the end of the blob (not a converted layer?)",
            ));
        }
        if u32_at(4) as usize != FOOTER_PAYLOAD_SIZE {
            return Err(bad("footer frame has the wrong length"));
        }
        let f = Footer {
            version: u32_at(16),
            block_size: u32_at(20),
            toc_offset: u64_at(24),
            toc_length: u64_at(32),
            toc_sha256: bytes[40..72].try_into().unwrap(),
        };
        if f.version != FORMAT_VERSION {
            return Err(bad(&format!(
                "format version {} is not supported (this build reads {FORMAT_VERSION})",
                f.version
            )));
        }
        crate::validate_block_size(f.block_size)?;
        if f.toc_length < FRAME_HEADER_SIZE as u64 || f.toc_length > MAX_TOC_FRAME {
            return Err(bad(&format!("TOC length {} is out of range", f.toc_length)));
        }
        let end = f
            .toc_offset
            .checked_add(f.toc_length)
            .ok_or_else(|| bad("TOC offset overflows"))?;
        if blob_size < FOOTER_SIZE as u64 || end != blob_size - FOOTER_SIZE as u64 {
            return Err(bad(&format!(
                "TOC at {}+{} does not end where the footer starts (blob is {blob_size} bytes)",
                f.toc_offset, f.toc_length
            )));
        }
        Ok(f)
    }
}

/// Wraps a TOC payload in its skippable frame.
pub fn toc_frame(payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(FRAME_HEADER_SIZE + payload.len());
    v.extend_from_slice(&TOC_FRAME_MAGIC.to_le_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// Checks a TOC frame against the footer and returns its payload.
pub fn toc_payload<'a>(frame: &'a [u8], footer: &Footer) -> Result<&'a [u8]> {
    if frame.len() as u64 != footer.toc_length {
        return Err(FormatError::toc(format!(
            "frame is {} bytes, footer says {}",
            frame.len(),
            footer.toc_length
        )));
    }
    if frame.len() < FRAME_HEADER_SIZE {
        return Err(FormatError::toc("frame is shorter than its header"));
    }
    let magic = u32::from_le_bytes(frame[0..4].try_into().unwrap());
    let len = u32::from_le_bytes(frame[4..8].try_into().unwrap()) as usize;
    if magic != TOC_FRAME_MAGIC || len != frame.len() - FRAME_HEADER_SIZE {
        return Err(FormatError::toc("bad TOC frame header"));
    }
    let payload = &frame[FRAME_HEADER_SIZE..];
    let actual: [u8; 32] = Sha256::digest(payload).into();
    if actual != footer.toc_sha256 {
        return Err(FormatError::toc(
            "digest does not match the footer (corrupt TOC)",
        ));
    }
    Ok(payload)
}
