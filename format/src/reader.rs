//! Reading converted blobs: the TOC from the blob's tail (random access), or the whole blob
//! as a stream (decompression back to the original tar).

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

use crate::block::decode_frame;
use crate::error::{FormatError, Result};
use crate::footer::{toc_payload, Footer, FOOTER_FRAME_MAGIC, FOOTER_SIZE, TOC_FRAME_MAGIC};
use crate::sha256_digest;
use crate::toc::Toc;

/// How many bytes at the end of a blob a reader should fetch first: the footer and, for a
/// small layer, the whole TOC. A larger TOC's head is fetched in a second request, exactly
/// ([`toc_head_range`]): a first request sized for large TOCs carried, for every layer with a
/// smaller one, block data nobody asked for, and every VM of a start pays it at the registry
/// (256 KiB here cost 48% more registry bytes per VM than the TOCs themselves).
pub const DEFAULT_TAIL_FETCH: u64 = 64 * 1024;

/// Outcome of [`parse_tail`].
#[derive(Debug)]
pub enum TailParse {
    /// The tail held the whole TOC.
    Complete(Box<Toc>, Footer),
    /// The TOC starts before the tail: fetch `footer.toc_length` bytes at `footer.toc_offset`
    /// and pass them to [`parse_toc_frame`].
    NeedToc(Footer),
}

/// Parses the last `tail.len()` bytes of a blob of `blob_size` bytes.
pub fn parse_tail(tail: &[u8], blob_size: u64) -> Result<TailParse> {
    if tail.len() < FOOTER_SIZE || tail.len() as u64 > blob_size {
        return Err(FormatError::BadFooter(format!(
            "blob of {blob_size} bytes is too small to hold a footer"
        )));
    }
    let footer = Footer::parse(&tail[tail.len() - FOOTER_SIZE..], blob_size)?;
    let tail_start = blob_size - tail.len() as u64;
    if footer.toc_offset < tail_start {
        return Ok(TailParse::NeedToc(footer));
    }
    let start = (footer.toc_offset - tail_start) as usize;
    let frame = &tail[start..start + footer.toc_length as usize];
    Ok(TailParse::Complete(
        Box::new(parse_toc_frame(frame, &footer)?),
        footer,
    ))
}

/// After [`parse_tail`] answered [`TailParse::NeedToc`] for a tail of `tail_len` bytes: the
/// part of the TOC frame before the tail, as (offset, length). The rest is in the tail;
/// [`parse_toc_parts`] joins them.
pub fn toc_head_range(footer: &Footer, blob_size: u64, tail_len: u64) -> (u64, u64) {
    let tail_start = blob_size.saturating_sub(tail_len);
    let len = tail_start
        .saturating_sub(footer.toc_offset)
        .min(footer.toc_length);
    (footer.toc_offset, len)
}

/// Parses the TOC frame from its head (fetched at [`toc_head_range`]) and the blob's last
/// `tail.len()` bytes (those given to [`parse_tail`]).
pub fn parse_toc_parts(head: &[u8], tail: &[u8], footer: &Footer, blob_size: u64) -> Result<Toc> {
    let tail_start = blob_size.checked_sub(tail.len() as u64);
    let frame_end = footer.toc_offset.checked_add(footer.toc_length);
    let (Some(tail_start), Some(frame_end)) = (tail_start, frame_end) else {
        return Err(FormatError::toc("TOC frame out of the blob"));
    };
    if footer.toc_offset + head.len() as u64 != tail_start
        || frame_end < tail_start
        || frame_end > blob_size
    {
        return Err(FormatError::toc(format!(
            "TOC frame {}+{} does not join a head of {} bytes and a tail from {tail_start}",
            footer.toc_offset,
            footer.toc_length,
            head.len()
        )));
    }
    let mut frame = Vec::with_capacity(footer.toc_length as usize);
    frame.extend_from_slice(head);
    frame.extend_from_slice(&tail[..(frame_end - tail_start) as usize]);
    parse_toc_frame(&frame, footer)
}

/// Checks and parses a TOC frame fetched at `footer.toc_offset`.
pub fn parse_toc_frame(frame: &[u8], footer: &Footer) -> Result<Toc> {
    let toc = Toc::from_payload(toc_payload(frame, footer)?, footer.toc_offset)?;
    if toc.block_size != footer.block_size {
        return Err(FormatError::toc("block size differs from the footer's"));
    }
    Ok(toc)
}

/// Reads a whole converted blob from `input` and writes the original tar stream to `output`.
///
/// Memory stays bounded by one block. Every block is checked against the block table and the
/// output against the recorded diffID once the TOC (at the end) has been read; a mismatch is
/// an error, so a consumer such as containerd's stream processor sees a failure, never
/// silently wrong bytes.
pub fn decode_stream<R: Read, W: Write>(input: R, mut output: W) -> Result<Toc> {
    let mut input = io::BufReader::with_capacity(1 << 20, input);
    let mut offset = 0u64;
    let mut seen: Vec<(u64, u64, String)> = Vec::new(); // (offset, len, digest) per block
    let mut diff = Sha256::new();
    loop {
        let magic = match read_u32(&mut input) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(FormatError::BadFooter(
                    "blob ends without a TOC and footer (truncated?)".into(),
                ))
            }
            Err(e) => return Err(e.into()),
        };
        if magic == TOC_FRAME_MAGIC {
            let len = read_u32(&mut input)? as u64;
            let mut frame = Vec::new();
            frame.extend_from_slice(&TOC_FRAME_MAGIC.to_le_bytes());
            frame.extend_from_slice(&(len as u32).to_le_bytes());
            read_exact_bounded(&mut input, &mut frame, len, crate::footer::MAX_TOC_FRAME)?;
            let mut footer_bytes = vec![0u8; FOOTER_SIZE];
            input.read_exact(&mut footer_bytes).map_err(|_| {
                FormatError::BadFooter("blob ends inside the footer (truncated?)".into())
            })?;
            let blob_size = offset + frame.len() as u64 + FOOTER_SIZE as u64;
            let footer = Footer::parse(&footer_bytes, blob_size)?;
            if input.read(&mut [0u8; 1])? != 0 {
                return Err(FormatError::BadFooter("data after the footer".into()));
            }
            let toc = parse_toc_frame(&frame, &footer)?;
            check_blocks(&toc, &seen)?;
            let actual = format!("sha256:{}", hex::encode(diff.finalize()));
            if actual != toc.diff_id {
                return Err(FormatError::DiffIdMismatch {
                    expected: toc.diff_id.clone(),
                    actual,
                });
            }
            output.flush()?;
            return Ok(toc);
        }
        if magic == FOOTER_FRAME_MAGIC {
            return Err(FormatError::toc(
                "footer found where the TOC frame should be",
            ));
        }
        let index = seen.len();
        let frame = read_lz4_frame(&mut input, magic, index)?;
        let raw_len = frame_content_size(&frame)
            .ok_or_else(|| FormatError::block(index, "LZ4 frame carries no content size"))?;
        if raw_len > crate::MAX_BLOCK_SIZE as u64 {
            return Err(FormatError::block(index, "frame claims more than 4 MiB"));
        }
        let raw = decode_frame(index, &frame, raw_len as u32)?;
        diff.update(&raw);
        output.write_all(&raw)?;
        seen.push((offset, frame.len() as u64, sha256_digest(&frame)));
        offset += frame.len() as u64;
    }
}

fn check_blocks(toc: &Toc, seen: &[(u64, u64, String)]) -> Result<()> {
    if toc.blocks.len() != seen.len() {
        return Err(FormatError::toc(format!(
            "lists {} blocks, the blob holds {}",
            toc.blocks.len(),
            seen.len()
        )));
    }
    for (i, (b, (off, len, digest))) in toc.blocks.iter().zip(seen).enumerate() {
        if b.offset != *off || b.stored_len != *len {
            return Err(FormatError::block(
                i,
                "position differs from the block table",
            ));
        }
        if &b.digest != digest {
            return Err(FormatError::BlockDigestMismatch {
                index: i,
                expected: b.digest.clone(),
                actual: digest.clone(),
            });
        }
    }
    Ok(())
}

const LZ4_FRAME_MAGIC: u32 = 0x184D_2204;

/// Reads one LZ4 frame (magic already consumed) and returns all its bytes, magic included.
fn read_lz4_frame<R: Read>(input: &mut R, magic: u32, index: usize) -> Result<Vec<u8>> {
    if magic != LZ4_FRAME_MAGIC {
        return Err(FormatError::block(
            index,
            format!("expected an LZ4 frame, found magic {magic:#010x} (not a converted layer?)"),
        ));
    }
    let trunc =
        |_: io::Error| FormatError::block(index, "blob ends inside this block (truncated?)");
    let mut frame = Vec::with_capacity(crate::DEFAULT_BLOCK_SIZE as usize);
    frame.extend_from_slice(&magic.to_le_bytes());
    let mut desc = [0u8; 2];
    input.read_exact(&mut desc).map_err(trunc)?;
    frame.extend_from_slice(&desc);
    let flg = desc[0];
    let has_content_size = flg & 0x08 != 0;
    let block_checksums = flg & 0x10 != 0;
    let content_checksum = flg & 0x04 != 0;
    let has_dict = flg & 0x01 != 0;
    let rest = 1 + if has_content_size { 8 } else { 0 } + if has_dict { 4 } else { 0 };
    let mut buf = [0u8; 13];
    input.read_exact(&mut buf[..rest]).map_err(trunc)?;
    frame.extend_from_slice(&buf[..rest]);
    let max_block = 4 * 1024 * 1024 + 64;
    loop {
        let size = read_u32(input).map_err(trunc)?;
        frame.extend_from_slice(&size.to_le_bytes());
        if size == 0 {
            break;
        }
        let len = (size & 0x7FFF_FFFF) as u64;
        read_exact_bounded(input, &mut frame, len, max_block).map_err(|e| match e {
            FormatError::Io(e) => trunc(e),
            other => other,
        })?;
        if block_checksums {
            read_exact_bounded(input, &mut frame, 4, 4)?;
        }
        if frame.len() > 2 * max_block as usize {
            return Err(FormatError::block(
                index,
                "frame holds more than one block of data",
            ));
        }
    }
    if content_checksum {
        read_exact_bounded(input, &mut frame, 4, 4)?;
    }
    Ok(frame)
}

/// The content size recorded in an LZ4 frame header, if any.
fn frame_content_size(frame: &[u8]) -> Option<u64> {
    if frame.len() < 15 || frame[4] & 0x08 == 0 {
        return None;
    }
    Some(u64::from_le_bytes(frame[6..14].try_into().ok()?))
}

fn read_u32<R: Read>(r: &mut R) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Appends exactly `len` bytes from `r` to `out`, refusing lengths above `max`.
fn read_exact_bounded<R: Read>(r: &mut R, out: &mut Vec<u8>, len: u64, max: u64) -> Result<()> {
    if len > max {
        return Err(FormatError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame length {len} exceeds the {max}-byte limit"),
        )));
    }
    let start = out.len();
    r.take(len).read_to_end(out)?;
    if (out.len() - start) as u64 != len {
        return Err(FormatError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}
