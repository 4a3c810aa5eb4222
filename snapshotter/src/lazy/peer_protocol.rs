//! The peer protocol: how a node asks its upstream peer for one block of a layer.
//!
//! One TCP connection carries any number of request/response exchanges, one at a time.
//! All integers are little-endian.
//!
//! ```text
//! request:  "FNBQ" | version u8 (1) | op u8 | digest_len u16 | digest | index u32
//! response: "FNBR" | version u8 (1) | status u8 | length u32 | payload (length bytes)
//! ```
//!
//! The op says what is asked and how urgent it is:
//! - 1 = get block (someone waits: a container read or a read-ahead);
//! - 2 = get block for prefetch: a peer sends prefetch blocks only while it sends no urgent
//!   one, so on its uplink a child's start never queues behind a sibling's prefetch;
//! - 3 = get block, asked by a sibling (urgent): answered only for the half of the blocks the
//!   asked node fetches from the common parent itself, so requests never go round in circles;
//! - 4 = hello from a child: the "digest" field carries the child's peer address, the answer
//!   (status ok) is `side=<0|1> sibling=<addr>` or `side=-`: which half of the blocks the
//!   child fetches from this parent, and from which sibling it gets the other half
//!   (docs/lazy.md, "Sibling exchange");
//! - 5 = start order: a child subscribes to the order in which this node wants the blocks
//!   of a layer for the start (its container's reads, read-ahead, what it follows itself),
//!   from position `index` of that order on. The answer never ends: each [`Status::Ok`]
//!   response carries a batch of block indices (u32 each, [`encode_order_batch`]),
//!   keep-alives fill the pauses. The connection carries nothing else (docs/lazy.md, "Start
//!   order");
//! - 6 = get block the start order named (nobody waits yet, but soon will): served after
//!   every urgent block and before any prefetch block;
//! - 7 = the same, asked by a sibling (answered only for the asked node's half, as 3).
//!
//! A node's uplink sends one block at a time, by class: urgent (1, 3), then followed (6, 7),
//! then prefetch (2); first come first served within a class.
//!
//! A response with status [`Status::KeepAlive`] (length 0) says "still fetching that block
//! from my own upstream": the peer sends one every [`KEEPALIVE_INTERVAL_MS`] so that the
//! requester's stall timeout measures real lack of progress, not the depth of the tree.
//! With [`Status::Ok`] the payload is the block's stored LZ4 frame; with an error status it is
//! a UTF-8 message.
//!
//! The decoders here are pure functions on byte buffers: they never panic and never allocate
//! more than [`MAX_PAYLOAD`] (plus a bounded digest), whatever the input. They are meant for a
//! fuzz target.

/// Magic of a request.
pub const REQUEST_MAGIC: &[u8; 4] = b"FNBQ";
/// Magic of a response.
pub const RESPONSE_MAGIC: &[u8; 4] = b"FNBR";
/// Protocol version.
pub const VERSION: u8 = 1;
/// Operation: get one block that someone waits for.
pub const OP_GET_BLOCK: u8 = 1;
/// Operation: get one block for prefetch (served after every [`OP_GET_BLOCK`]).
pub const OP_PREFETCH_BLOCK: u8 = 2;
/// Operation: get one block, asked by a sibling.
pub const OP_SIBLING_BLOCK: u8 = 3;
/// Operation: a child says hello to its parent.
pub const OP_HELLO: u8 = 4;
/// Operation: a child subscribes to its parent's start order of a layer.
pub const OP_START_ORDER: u8 = 5;
/// Operation: get one block the start order named.
pub const OP_FOLLOWED_BLOCK: u8 = 6;
/// Operation: get one block the start order named, asked by a sibling.
pub const OP_FOLLOWED_SIBLING_BLOCK: u8 = 7;
/// Most block indices in one batch of a start-order stream.
pub const MAX_ORDER_BATCH: usize = 4096;
/// Largest digest string accepted in a request.
pub const MAX_DIGEST_LEN: usize = 128;
/// Largest payload accepted: the largest stored block (4 MiB of raw data plus LZ4's worst
/// case growth) with some slack.
pub const MAX_PAYLOAD: u32 = 4 * 1024 * 1024 + 64 * 1024;
/// Fixed part of a request before the digest.
pub const REQUEST_HEADER_LEN: usize = 8;
/// Length of a response header.
pub const RESPONSE_HEADER_LEN: usize = 10;
/// How often a peer that is still fetching a block says so.
pub const KEEPALIVE_INTERVAL_MS: u64 = 500;

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(msg.into()))
}

/// What a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Op {
    /// A block someone waits for (a container read, a read-ahead, a child's urgent request).
    #[default]
    Urgent,
    /// A block for background prefetch: sent only when no urgent block is being sent.
    Prefetch,
    /// A block a sibling waits for; served only from the asked node's own half.
    FromSibling,
    /// A child's hello; `digest` holds its peer address.
    Hello,
    /// A child subscribes to the start order of layer `digest` from position `index` on.
    StartOrder,
    /// A block the start order named: served after urgent blocks, before prefetch.
    Followed,
    /// A block the start order named, asked by a sibling; served only from the asked node's
    /// own half.
    FollowedFromSibling,
}

/// In which order a node's uplink sends the blocks it was asked for (lowest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Someone waits for the block.
    Urgent = 0,
    /// The start order named it: someone will wait for it soon.
    Followed = 1,
    /// Background prefetch.
    Prefetch = 2,
}

impl Op {
    fn wire(self) -> u8 {
        match self {
            Op::Urgent => OP_GET_BLOCK,
            Op::Prefetch => OP_PREFETCH_BLOCK,
            Op::FromSibling => OP_SIBLING_BLOCK,
            Op::Hello => OP_HELLO,
            Op::StartOrder => OP_START_ORDER,
            Op::Followed => OP_FOLLOWED_BLOCK,
            Op::FollowedFromSibling => OP_FOLLOWED_SIBLING_BLOCK,
        }
    }

    /// The op that asks for a block of `class`, of a sibling or not.
    pub fn get_block(class: Class, from_sibling: bool) -> Op {
        match (class, from_sibling) {
            (Class::Urgent, false) => Op::Urgent,
            (Class::Urgent, true) => Op::FromSibling,
            (Class::Followed, false) => Op::Followed,
            (Class::Followed, true) => Op::FollowedFromSibling,
            // A sibling is never asked for prefetch (docs/lazy.md); the parent is.
            (Class::Prefetch, _) => Op::Prefetch,
        }
    }

    /// The class of a block request; `None` for the other ops.
    pub fn class(self) -> Option<Class> {
        match self {
            Op::Urgent | Op::FromSibling => Some(Class::Urgent),
            Op::Followed | Op::FollowedFromSibling => Some(Class::Followed),
            Op::Prefetch => Some(Class::Prefetch),
            Op::Hello | Op::StartOrder => None,
        }
    }

    /// Whether a sibling asks (answered only for the asked node's half).
    pub fn is_from_sibling(self) -> bool {
        matches!(self, Op::FromSibling | Op::FollowedFromSibling)
    }

    fn from_wire(b: u8) -> Option<Op> {
        Some(match b {
            OP_GET_BLOCK => Op::Urgent,
            OP_PREFETCH_BLOCK => Op::Prefetch,
            OP_SIBLING_BLOCK => Op::FromSibling,
            OP_HELLO => Op::Hello,
            OP_START_ORDER => Op::StartOrder,
            OP_FOLLOWED_BLOCK => Op::Followed,
            OP_FOLLOWED_SIBLING_BLOCK => Op::FollowedFromSibling,
            _ => return None,
        })
    }
}

/// A request for block `index` of the layer whose blob digest is `digest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRequest {
    /// `sha256:<hex>` of the layer blob (for [`Op::Hello`]: the sender's peer address).
    pub digest: String,
    /// Block index in the layer's block table (0 for [`Op::Hello`]).
    pub index: u32,
    /// What is asked.
    pub op: Op,
}

/// Status of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// The payload is the stored block.
    Ok = 0,
    /// Still working on it; another response follows.
    KeepAlive = 1,
    /// This node does not serve that layer.
    UnknownLayer = 2,
    /// The index is past the layer's last block.
    BadIndex = 3,
    /// The node could not get the block (its own sources failed).
    Unavailable = 4,
    /// The request was malformed.
    BadRequest = 5,
}

impl Status {
    /// The status for a wire byte, if known.
    pub fn from_u8(b: u8) -> Option<Status> {
        Some(match b {
            0 => Status::Ok,
            1 => Status::KeepAlive,
            2 => Status::UnknownLayer,
            3 => Status::BadIndex,
            4 => Status::Unavailable,
            5 => Status::BadRequest,
            _ => return None,
        })
    }
}

/// Header of a response: what follows and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    /// Status.
    pub status: Status,
    /// Payload length (at most [`MAX_PAYLOAD`]).
    pub length: u32,
}

/// Serializes a request.
pub fn encode_request(req: &BlockRequest) -> Vec<u8> {
    let digest = req.digest.as_bytes();
    let mut v = Vec::with_capacity(REQUEST_HEADER_LEN + digest.len() + 4);
    v.extend_from_slice(REQUEST_MAGIC);
    v.push(VERSION);
    v.push(req.op.wire());
    v.extend_from_slice(&(digest.len() as u16).to_le_bytes());
    v.extend_from_slice(digest);
    v.extend_from_slice(&req.index.to_le_bytes());
    v
}

/// Checks the fixed request header and returns how many more bytes (digest + index) follow.
pub fn decode_request_header(buf: &[u8]) -> Result<usize, ProtocolError> {
    if buf.len() < REQUEST_HEADER_LEN {
        return err("request header is truncated");
    }
    if &buf[0..4] != REQUEST_MAGIC {
        return err("bad request magic");
    }
    if buf[4] != VERSION {
        return err(format!("unsupported protocol version {}", buf[4]));
    }
    if Op::from_wire(buf[5]).is_none() {
        return err(format!("unknown operation {}", buf[5]));
    }
    let len = u16::from_le_bytes([buf[6], buf[7]]) as usize;
    if len == 0 || len > MAX_DIGEST_LEN {
        return err(format!("digest length {len} out of range"));
    }
    Ok(len + 4)
}

/// Decodes a request from the start of `buf`: `Ok(None)` when more bytes are needed, else the
/// request and the number of bytes it took.
pub fn decode_request(buf: &[u8]) -> Result<Option<(BlockRequest, usize)>, ProtocolError> {
    if buf.len() < REQUEST_HEADER_LEN {
        // Reject garbage early, without waiting for a whole header.
        let n = buf.len().min(4);
        if buf[..n] != REQUEST_MAGIC[..n] {
            return err("bad request magic");
        }
        return Ok(None);
    }
    let rest = decode_request_header(buf)?;
    let total = REQUEST_HEADER_LEN + rest;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[REQUEST_HEADER_LEN..total];
    let (digest, index) = body.split_at(rest - 4);
    let digest = match std::str::from_utf8(digest) {
        Ok(d) => d.to_string(),
        Err(_) => return err("digest is not UTF-8"),
    };
    let index = u32::from_le_bytes([index[0], index[1], index[2], index[3]]);
    // The header decoder admitted only known ops.
    let op = Op::from_wire(buf[5]).unwrap_or_default();
    Ok(Some((BlockRequest { digest, index, op }, total)))
}

/// What a parent answers to a child's hello: which half of the blocks the child fetches
/// from it (blocks whose index is even for side 0, odd for side 1) and the sibling that
/// fetches the other half. `None`: fetch everything from the parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAnswer {
    /// The child's side and its sibling's peer address.
    pub split: Option<(u8, String)>,
}

impl HelloAnswer {
    /// The answer's payload.
    pub fn encode(&self) -> Vec<u8> {
        match &self.split {
            Some((side, sibling)) => format!("side={side} sibling={sibling}").into_bytes(),
            None => b"side=-".to_vec(),
        }
    }

    /// Parses a payload.
    pub fn decode(payload: &[u8]) -> Result<HelloAnswer, ProtocolError> {
        let text = std::str::from_utf8(payload)
            .map_err(|_| ProtocolError("hello answer is not UTF-8".into()))?;
        if text == "side=-" {
            return Ok(HelloAnswer { split: None });
        }
        let mut side = None;
        let mut sibling = None;
        for part in text.split(' ') {
            match part.split_once('=') {
                Some(("side", v)) => side = v.parse::<u8>().ok().filter(|s| *s < 2),
                Some(("sibling", v)) if !v.is_empty() && v.len() <= MAX_DIGEST_LEN => {
                    sibling = Some(v.to_string())
                }
                _ => {}
            }
        }
        match (side, sibling) {
            (Some(s), Some(a)) => Ok(HelloAnswer {
                split: Some((s, a)),
            }),
            _ => err(format!("malformed hello answer {text:?}")),
        }
    }
}

/// The payload of one batch of a start-order stream ([`Op::StartOrder`]): the indices, u32
/// little-endian each. At most [`MAX_ORDER_BATCH`] indices; callers split longer runs.
pub fn encode_order_batch(indices: &[u32]) -> Vec<u8> {
    debug_assert!(!indices.is_empty() && indices.len() <= MAX_ORDER_BATCH);
    indices.iter().flat_map(|i| i.to_le_bytes()).collect()
}

/// Decodes a start-order batch of a layer of `block_count` blocks: a non-empty whole number
/// of u32 indices, at most [`MAX_ORDER_BATCH`], each below `block_count`.
pub fn decode_order_batch(payload: &[u8], block_count: usize) -> Result<Vec<u32>, ProtocolError> {
    if payload.is_empty() || !payload.len().is_multiple_of(4) || payload.len() / 4 > MAX_ORDER_BATCH
    {
        return err(format!(
            "start-order batch of {} bytes (want 4..={} in steps of 4)",
            payload.len(),
            MAX_ORDER_BATCH * 4
        ));
    }
    let indices: Vec<u32> = payload
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    match indices.iter().find(|&&i| i as usize >= block_count) {
        Some(bad) => err(format!(
            "start order names block {bad} of a layer of {block_count} blocks"
        )),
        None => Ok(indices),
    }
}

/// Serializes a response header.
pub fn encode_response_header(status: Status, length: u32) -> [u8; RESPONSE_HEADER_LEN] {
    let mut h = [0u8; RESPONSE_HEADER_LEN];
    h[0..4].copy_from_slice(RESPONSE_MAGIC);
    h[4] = VERSION;
    h[5] = status as u8;
    h[6..10].copy_from_slice(&length.to_le_bytes());
    h
}

/// Serializes a whole response.
pub fn encode_response(status: Status, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(RESPONSE_HEADER_LEN + payload.len());
    v.extend_from_slice(&encode_response_header(status, payload.len() as u32));
    v.extend_from_slice(payload);
    v
}

/// Decodes a response header (exactly the first [`RESPONSE_HEADER_LEN`] bytes of `buf`).
pub fn decode_response_header(buf: &[u8]) -> Result<ResponseHeader, ProtocolError> {
    if buf.len() < RESPONSE_HEADER_LEN {
        return err("response header is truncated");
    }
    if &buf[0..4] != RESPONSE_MAGIC {
        return err("bad response magic");
    }
    if buf[4] != VERSION {
        return err(format!("unsupported protocol version {}", buf[4]));
    }
    let Some(status) = Status::from_u8(buf[5]) else {
        return err(format!("unknown status {}", buf[5]));
    };
    let length = u32::from_le_bytes([buf[6], buf[7], buf[8], buf[9]]);
    if length > MAX_PAYLOAD {
        return err(format!(
            "payload of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit"
        ));
    }
    if status == Status::KeepAlive && length != 0 {
        return err("keep-alive with a payload");
    }
    Ok(ResponseHeader { status, length })
}

/// A response decoded from a buffer: header, payload, bytes taken.
pub type DecodedResponse<'a> = (ResponseHeader, &'a [u8], usize);

/// Decodes one response from the start of `buf`: `Ok(None)` when more bytes are needed, else
/// the header, the payload and the number of bytes taken.
pub fn decode_response(buf: &[u8]) -> Result<Option<DecodedResponse<'_>>, ProtocolError> {
    if buf.len() < RESPONSE_HEADER_LEN {
        let n = buf.len().min(4);
        if buf[..n] != RESPONSE_MAGIC[..n] {
            return err("bad response magic");
        }
        return Ok(None);
    }
    let header = decode_response_header(buf)?;
    let total = RESPONSE_HEADER_LEN + header.length as usize;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((header, &buf[RESPONSE_HEADER_LEN..total], total)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_roundtrip_and_partial() {
        let req = BlockRequest {
            digest: format!("sha256:{}", "ab".repeat(32)),
            index: 77,
            op: Op::Prefetch,
        };
        let bytes = encode_request(&req);
        for cut in 0..bytes.len() {
            assert_eq!(decode_request(&bytes[..cut]).unwrap(), None, "cut {cut}");
        }
        let mut more = bytes.clone();
        more.extend_from_slice(b"FNBQ");
        assert_eq!(decode_request(&more).unwrap(), Some((req, bytes.len())));
    }

    #[test]
    fn response_roundtrip_and_limits() {
        let bytes = encode_response(Status::Ok, b"frame");
        let (h, payload, n) = decode_response(&bytes).unwrap().unwrap();
        assert_eq!(
            (h.status, payload, n),
            (Status::Ok, &b"frame"[..], bytes.len())
        );
        assert_eq!(decode_response(&bytes[..12]).unwrap(), None);
        let huge = encode_response_header(Status::Ok, MAX_PAYLOAD + 1);
        assert!(decode_response(&huge).unwrap_err().0.contains("limit"));
        let mut bad = bytes.clone();
        bad[5] = 99;
        assert!(decode_response(&bad).is_err());
        assert!(decode_request(b"GET / HTTP/1.1\r\n").is_err());
        assert!(decode_response(b"XX").is_err());
    }

    #[test]
    fn ops_and_hello_answers_roundtrip() {
        for op in [
            Op::Urgent,
            Op::Prefetch,
            Op::FromSibling,
            Op::Hello,
            Op::StartOrder,
            Op::Followed,
            Op::FollowedFromSibling,
        ] {
            let req = BlockRequest {
                digest: "10.0.0.1:9112".into(),
                index: 3,
                op,
            };
            let bytes = encode_request(&req);
            assert_eq!(decode_request(&bytes).unwrap(), Some((req, bytes.len())));
        }
        let mut bad = encode_request(&BlockRequest {
            digest: "x".into(),
            index: 0,
            op: Op::Hello,
        });
        bad[5] = 9;
        assert!(decode_request(&bad)
            .unwrap_err()
            .0
            .contains("unknown operation"));
        for answer in [
            HelloAnswer { split: None },
            HelloAnswer {
                split: Some((1, "10.0.0.2:9112".into())),
            },
        ] {
            assert_eq!(HelloAnswer::decode(&answer.encode()).unwrap(), answer);
        }
        assert!(HelloAnswer::decode(b"side=7 sibling=a").is_err());
        assert!(HelloAnswer::decode(b"\xff").is_err());
    }

    #[test]
    fn block_ops_map_to_classes_and_back() {
        for class in [Class::Urgent, Class::Followed] {
            for sibling in [false, true] {
                let op = Op::get_block(class, sibling);
                assert_eq!((op.class(), op.is_from_sibling()), (Some(class), sibling));
            }
        }
        assert_eq!(Op::get_block(Class::Prefetch, true), Op::Prefetch);
        assert_eq!(Op::Hello.class(), None);
        assert!(Class::Urgent < Class::Followed && Class::Followed < Class::Prefetch);
    }

    #[test]
    fn order_batches_roundtrip_and_are_bounded() {
        let batch = [0u32, 7, 3, 41];
        assert_eq!(
            decode_order_batch(&encode_order_batch(&batch), 42).unwrap(),
            batch
        );
        let past = decode_order_batch(&encode_order_batch(&batch), 41).unwrap_err();
        assert!(past.0.contains("block 41 of a layer of 41"), "{past}");
        assert!(decode_order_batch(&[], 10).is_err());
        assert!(decode_order_batch(&[1, 0, 0], 10).is_err());
        let too_long = vec![0u8; (MAX_ORDER_BATCH + 1) * 4];
        assert!(decode_order_batch(&too_long, 10).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_order_batch(&bytes, 16);
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
            let _ = decode_response_header(&bytes);
            let _ = decode_request_header(&bytes);
        }

        #[test]
        fn mutated_messages_never_panic(
            index in any::<u32>(),
            flips in proptest::collection::vec((0usize..96, any::<u8>()), 0..6),
        ) {
            let mut req = encode_request(&BlockRequest {
                digest: "sha256:00".into(),
                index,
                op: Op::Urgent,
            });
            let mut resp = encode_response(Status::Unavailable, b"no upstream");
            for (pos, val) in flips {
                if let Some(b) = req.get_mut(pos) { *b = val; }
                if let Some(b) = resp.get_mut(pos) { *b = val; }
            }
            if let Ok(Some((_, n))) = decode_request(&req) { prop_assert!(n <= req.len()); }
            if let Ok(Some((h, p, n))) = decode_response(&resp) {
                prop_assert!(n <= resp.len());
                prop_assert_eq!(p.len(), h.length as usize);
            }
        }
    }
}
