//! The IDX parser's fuzz harness: shared by the fuzz target `idx` and by the stable test
//! `mp-data/tests/fuzz_corpus.rs`, which replays the kept corpus through it.
//!
//! Any input may be refused, but nothing may panic, and what is accepted must be consistent:
//! a raw file that parses re-encodes to exactly its bytes, `gunzip` never exceeds its limit and
//! passes raw bytes through unchanged, and a gzip'd file parses as its decompressed bytes do.

use mp_data::idx;

/// The decompression limit the harness gives `gunzip`.
pub const LIMIT: u64 = 1 << 22;

/// Runs every IDX entry point on `data` and checks the properties above.
pub fn run(data: &[u8]) {
    let raw = !idx::is_gzip(data);
    let images = idx::parse_images("fuzz", data);
    if let (true, Ok(images)) = (raw, &images) {
        let again = idx::encode_images(images).expect("parsed images re-encode");
        assert_eq!(again, data, "images do not re-encode to their file");
    }
    let labels = idx::parse_labels("fuzz", data);
    if let (true, Ok(labels)) = (raw, &labels) {
        let again = idx::encode_labels(labels).expect("parsed labels re-encode");
        assert_eq!(again, data, "labels do not re-encode to their file");
    }
    match idx::gunzip("fuzz", data, LIMIT) {
        Ok(out) => {
            assert!(out.len() as u64 <= LIMIT, "gunzip exceeded its limit");
            if raw {
                assert_eq!(out, data, "gunzip changed raw bytes");
            } else if !idx::is_gzip(&out) {
                // Gzip is transparent: the same answer as parsing the decompressed bytes.
                let plain = idx::parse_images("fuzz", &out);
                assert_eq!(
                    images.as_ref().ok(),
                    plain.as_ref().ok(),
                    "gzip changed images"
                );
                let plain = idx::parse_labels("fuzz", &out);
                assert_eq!(
                    labels.as_ref().ok(),
                    plain.as_ref().ok(),
                    "gzip changed labels"
                );
            }
        }
        Err(_) => assert!(!raw, "gunzip refused raw bytes"),
    }
}
