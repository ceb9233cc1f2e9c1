//! Fuzzes the IDX parser: `parse_images`, `parse_labels` and `gunzip` on every input.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness/idx.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::run(data));
