//! The live and peak tensor byte counters. A file of its own: the counters are process-wide, and
//! the library's other tests allocate and free tensors on other threads at the same time (in the
//! library's test binary this check raced with them).

use mp_core::{F32, Tensor, memory};

#[test]
fn memory_is_counted() {
    let before = memory::live_bytes();
    let t = Tensor::<F32>::zeros(&[1000]).unwrap();
    assert!(memory::live_bytes() >= before + 4000);
    assert!(memory::peak_bytes() >= 4000);
    drop(t);
    assert_eq!(memory::live_bytes(), before);
}
