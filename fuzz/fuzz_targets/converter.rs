//! The converter on arbitrary bytes taken as an uncompressed tar stream. Whenever conversion
//! succeeds, the blob must decode back to exactly the input (the diffID is unchanged) and its
//! tail must parse to the same TOC; and the converter must never write a TOC its own reader
//! refuses.
#![no_main]

use faasnet_format::{
    convert_layer, decode_stream, parse_tail, ConvertOptions, FormatError, TailParse,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let opts = ConvertOptions {
        block_size: 64 * 1024,
        threads: 1,
        original: None,
        start_bytes: 0,
    };
    let mut blob = Vec::new();
    match convert_layer(data, &mut blob, &opts, &|_| {}) {
        Ok(layer) => {
            assert_eq!(blob.len() as u64, layer.blob_size);
            assert_eq!(faasnet_format::sha256_digest(&blob), layer.blob_digest);
            let mut out = Vec::new();
            let toc = decode_stream(&blob[..], &mut out).expect("a converted blob decodes");
            assert!(out == data, "decoded stream differs from the input tar");
            assert_eq!(toc, layer.toc);
            match parse_tail(&blob, blob.len() as u64).expect("tail parses") {
                TailParse::Complete(t, f) => {
                    assert_eq!(*t, layer.toc);
                    assert_eq!(f, layer.footer);
                }
                TailParse::NeedToc(_) => panic!("the whole blob holds the TOC"),
            }
            for e in &toc.entries {
                assert!(e.offset + e.size <= data.len() as u64);
            }
        }
        Err(FormatError::BadToc(why)) => {
            panic!("the converter built a TOC its reader refuses: {why}")
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
