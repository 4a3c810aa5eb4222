//! The peer protocol decoders (snapshotter/src/lazy/peer_protocol.rs) on arbitrary bytes:
//! never panic, never take more bytes than given, and what they accept re-encodes to the
//! same bytes.
//!
//! The module is pure (it only needs thiserror), so it is compiled here straight from the
//! snapshotter's source instead of building the whole snapshotter (tonic, fuser, sled...)
//! with sanitizer instrumentation.
#![no_main]

#[allow(dead_code)]
#[path = "../../snapshotter/src/lazy/peer_protocol.rs"]
mod peer_protocol;

use libfuzzer_sys::fuzz_target;
use peer_protocol::*;

fuzz_target!(|data: &[u8]| {
    if let Ok(rest) = decode_request_header(data) {
        assert!(rest > 4 && rest <= MAX_DIGEST_LEN + 4);
    }
    match decode_request(data) {
        Ok(Some((req, n))) => {
            assert!(n <= data.len());
            assert_eq!(encode_request(&req), &data[..n]);
            assert!(!req.digest.is_empty() && req.digest.len() <= MAX_DIGEST_LEN);
        }
        Ok(None) => assert!(data.len() < REQUEST_HEADER_LEN + MAX_DIGEST_LEN + 4),
        Err(e) => assert!(!e.0.is_empty()),
    }
    if let Ok(indices) = decode_order_batch(data, 1 << 20) {
        assert!(!indices.is_empty() && indices.len() <= MAX_ORDER_BATCH);
        assert_eq!(encode_order_batch(&indices), data);
    }
    if let Ok(h) = decode_response_header(data) {
        assert!(h.length <= MAX_PAYLOAD);
        assert_eq!(
            encode_response_header(h.status, h.length),
            data[..RESPONSE_HEADER_LEN]
        );
    }
    match decode_response(data) {
        Ok(Some((h, payload, n))) => {
            assert!(n <= data.len());
            assert_eq!(payload.len(), h.length as usize);
            assert_eq!(encode_response(h.status, payload), &data[..n]);
        }
        Ok(None) => assert!(data.len() < RESPONSE_HEADER_LEN + MAX_PAYLOAD as usize),
        Err(e) => assert!(!e.0.is_empty()),
    }
});
