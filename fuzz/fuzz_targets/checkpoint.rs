//! Fuzzes the checkpoint reader and loaders, and checks the safetensors reader against the
//! reference implementation: every file mp accepts, Hugging Face's `safetensors` accepts, with
//! the same tensors and metadata.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use mp_layers::checkpoint::safetensors::SafeTensors;

#[path = "../harness/checkpoint.rs"]
mod harness;

/// `MP_FUZZ_NO_REFERENCE=1` leaves the reference check out: `cargo fuzz cmin` then keeps only
/// the inputs mp's own code needs (what the stable corpus replay runs).
static REFERENCE: LazyLock<bool> =
    LazyLock::new(|| std::env::var_os("MP_FUZZ_NO_REFERENCE").is_none());

fuzz_target!(|data: &[u8]| {
    if !*REFERENCE {
        harness::run(data);
        return;
    }
    if let Ok(ours) = SafeTensors::parse("fuzz", data) {
        let reference = safetensors::SafeTensors::deserialize(data)
            .unwrap_or_else(|e| panic!("mp accepts a file the reference refuses: {e}"));
        assert_eq!(reference.len(), ours.tensors.len());
        for t in &ours.tensors {
            let r = reference
                .tensor(&t.name)
                .expect("the reference has the tensor");
            assert_eq!(format!("{:?}", r.dtype()), t.dtype, "{}", t.name);
            assert_eq!(r.shape(), t.shape.as_slice(), "{}", t.name);
            assert_eq!(r.data(), ours.data(t), "{}", t.name);
        }
        let (_, meta) = safetensors::SafeTensors::read_metadata(data).expect("read above");
        let theirs = meta.metadata().clone().unwrap_or_default();
        assert_eq!(theirs.len(), ours.metadata.len());
        for (k, v) in &ours.metadata {
            assert_eq!(theirs.get(k), Some(v), "metadata {k}");
        }
    }
    harness::run(data);
});
