//! Per-dtype call counters, so tests can prove which kernel a layer really called.

use std::sync::atomic::{AtomicU64, Ordering};

use mp_core::DType;

static GEMM_CALLS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

fn slot(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// Records one GEMM call whose inputs have `dtype`.
pub(crate) fn record_gemm(dtype: DType) {
    GEMM_CALLS[slot(dtype)].fetch_add(1, Ordering::Relaxed);
}

static CASTS: AtomicU64 = AtomicU64::new(0);

/// Records one cast between dtypes.
pub(crate) fn record_cast() {
    CASTS.fetch_add(1, Ordering::Relaxed);
}

/// How many casts between dtypes (`ops::cast`, `ops::cast_into`) this process has run
/// (monotonic; compare before/after).
pub fn casts() -> u64 {
    CASTS.load(Ordering::Relaxed)
}

/// How many GEMMs with inputs of `dtype` this process has run (monotonic; compare before/after).
pub fn gemm_calls(dtype: DType) -> u64 {
    GEMM_CALLS[slot(dtype)].load(Ordering::Relaxed)
}
