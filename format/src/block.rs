//! One block: `block_size` bytes of the tar stream stored as a single LZ4 frame.
//!
//! The frame carries its content size and one data block; LZ4 marks the data block
//! "uncompressed" when compression would not make it smaller, so incompressible data costs
//! only the ~19 bytes of frame framing.

use std::io::{Read, Write};

use lz4_flex::frame::{BlockMode, BlockSize, FrameDecoder, FrameEncoder, FrameInfo};

use crate::error::{FormatError, Result};
use crate::sha256_digest;
use crate::toc::BlockEntry;

/// A block ready to be written into a blob.
#[derive(Debug, Clone)]
pub struct EncodedBlock {
    /// The stored bytes: one complete LZ4 frame.
    pub stored: Vec<u8>,
    /// Number of tar-stream bytes the frame decodes to.
    pub raw_len: u32,
    /// `sha256:<hex>` of `stored`.
    pub digest: String,
}

/// The smallest LZ4 frame block size that holds `len` bytes in one data block.
fn frame_block_size(len: usize) -> BlockSize {
    match len {
        0..=65_536 => BlockSize::Max64KB,
        65_537..=262_144 => BlockSize::Max256KB,
        262_145..=1_048_576 => BlockSize::Max1MB,
        _ => BlockSize::Max4MB,
    }
}

/// Compresses one block of raw tar bytes into a standalone LZ4 frame.
pub fn encode_block(raw: &[u8]) -> EncodedBlock {
    debug_assert!(raw.len() <= crate::MAX_BLOCK_SIZE as usize);
    let info = FrameInfo::new()
        .block_size(frame_block_size(raw.len()))
        .block_mode(BlockMode::Independent)
        .content_size(Some(raw.len() as u64));
    let mut enc = FrameEncoder::with_frame_info(info, Vec::with_capacity(raw.len() / 2 + 64));
    // Writing to a Vec cannot fail.
    enc.write_all(raw).expect("write to Vec");
    let stored = enc.finish().expect("finish to Vec");
    let digest = sha256_digest(&stored);
    EncodedBlock {
        stored,
        raw_len: raw.len() as u32,
        digest,
    }
}

/// Checks `stored` against the block table entry and decompresses it.
///
/// The digest is checked before any decompression, so a corrupt or malicious block is
/// rejected without being interpreted.
pub fn decode_block(index: usize, entry: &BlockEntry, stored: &[u8]) -> Result<Vec<u8>> {
    // A block table that lies about sizes must not make us allocate for its claim.
    if entry.raw_len > crate::MAX_BLOCK_SIZE {
        return Err(FormatError::block(
            index,
            format!(
                "block table claims {} tar bytes, more than the largest block ({})",
                entry.raw_len,
                crate::MAX_BLOCK_SIZE
            ),
        ));
    }
    if stored.len() as u64 != entry.stored_len {
        return Err(FormatError::block(
            index,
            format!(
                "stored length is {} bytes, block table says {}",
                stored.len(),
                entry.stored_len
            ),
        ));
    }
    let actual = sha256_digest(stored);
    if actual != entry.digest {
        return Err(FormatError::BlockDigestMismatch {
            index,
            expected: entry.digest.clone(),
            actual,
        });
    }
    decode_frame(index, stored, entry.raw_len)
}

/// Decompresses one LZ4 frame that must decode to exactly `raw_len` bytes, with nothing after
/// the frame; for bytes already checked against their digest (else use [`decode_block`]).
pub fn decode_frame(index: usize, stored: &[u8], raw_len: u32) -> Result<Vec<u8>> {
    if raw_len > crate::MAX_BLOCK_SIZE {
        return Err(FormatError::block(index, "claims more than 4 MiB of data"));
    }
    match lz4_frame_len(stored) {
        Ok(n) if n == stored.len() => {}
        Ok(n) => {
            return Err(FormatError::block(
                index,
                format!(
                    "the LZ4 frame is {n} bytes, the stored block {} (bytes outside the frame)",
                    stored.len()
                ),
            ))
        }
        Err(why) => return Err(FormatError::block(index, format!("bad LZ4 frame: {why}"))),
    }
    let mut out = Vec::with_capacity(raw_len as usize);
    // Read one byte past the expected size to detect a frame that decodes to more.
    FrameDecoder::new(stored)
        .take(raw_len as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| FormatError::block(index, format!("bad LZ4 frame: {e}")))?;
    if out.len() != raw_len as usize {
        return Err(FormatError::block(
            index,
            format!("decodes to {} bytes, block table says {raw_len}", out.len()),
        ));
    }
    Ok(out)
}

/// Length of the LZ4 frame at the start of `b`, from its header and block sizes (nothing
/// decoded): a stored block must be exactly one frame.
fn lz4_frame_len(b: &[u8]) -> std::result::Result<usize, &'static str> {
    const LZ4_FRAME_MAGIC: u32 = 0x184D_2204;
    let u32_at = |o: usize| -> std::result::Result<u32, &'static str> {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
            .ok_or("truncated")
    };
    if u32_at(0)? != LZ4_FRAME_MAGIC {
        return Err("not an LZ4 frame");
    }
    let flg = *b.get(4).ok_or("truncated")?;
    let mut pos = 4 + 2 + 1; // magic, FLG, BD, header checksum
    if flg & 0x08 != 0 {
        pos += 8; // content size
    }
    if flg & 0x01 != 0 {
        pos += 4; // dictionary id
    }
    loop {
        let size = u32_at(pos)?;
        pos += 4;
        if size == 0 {
            break;
        }
        pos = pos
            .checked_add((size & 0x7FFF_FFFF) as usize)
            .ok_or("truncated")?;
        if flg & 0x10 != 0 {
            pos += 4; // block checksum
        }
        if pos > b.len() {
            return Err("truncated");
        }
    }
    if flg & 0x04 != 0 {
        pos += 4; // content checksum
    }
    if pos > b.len() {
        return Err("truncated");
    }
    Ok(pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_for(b: &EncodedBlock) -> BlockEntry {
        BlockEntry {
            offset: 0,
            stored_len: b.stored.len() as u64,
            raw_len: b.raw_len,
            digest: b.digest.clone(),
        }
    }

    #[test]
    fn roundtrip_compressible_and_random() {
        let text = b"hello world ".repeat(40_000);
        let noise: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for raw in [&text[..], &noise[..], &[][..]] {
            let b = encode_block(raw);
            assert_eq!(decode_block(0, &entry_for(&b), &b.stored).unwrap(), raw);
        }
        // Compressible data really is compressed; noise costs at most the framing.
        assert!(encode_block(&text).stored.len() < text.len() / 10);
        assert!(encode_block(&noise).stored.len() <= noise.len() + 32);
    }

    #[test]
    fn corrupt_block_is_rejected_before_decoding() {
        let b = encode_block(&b"abc".repeat(1000));
        let mut bad = b.stored.clone();
        let last = bad.len() - 6;
        bad[last] ^= 0xff;
        let err = decode_block(3, &entry_for(&b), &bad).unwrap_err();
        assert!(
            matches!(err, FormatError::BlockDigestMismatch { index: 3, .. }),
            "{err}"
        );
        let err = decode_block(3, &entry_for(&b), &b.stored[..10]).unwrap_err();
        assert!(err.to_string().contains("stored length"), "{err}");
    }

    #[test]
    fn bytes_after_the_frame_are_refused() {
        // Found by integration/tests/malicious_images.rs (frames-lie): a block table whose
        // block holds its frame plus the next frame's first byte decoded fine.
        let b = encode_block(&b"abc".repeat(1000));
        let mut stored = b.stored.clone();
        stored.push(0x04);
        let entry = BlockEntry {
            stored_len: stored.len() as u64,
            digest: sha256_digest(&stored),
            ..entry_for(&b)
        };
        let err = decode_block(0, &entry, &stored).unwrap_err();
        assert!(err.to_string().contains("bytes outside the frame"), "{err}");
        assert_eq!(lz4_frame_len(&b.stored), Ok(b.stored.len()));
        assert!(lz4_frame_len(&b.stored[..b.stored.len() - 1]).is_err());
    }
}
