//! Counts of the bytes held by tensors, for the benchmark's memory figures.
//!
//! Every CPU tensor buffer is allocated through this module, which keeps the bytes currently held
//! and the peak since the last [`reset_peak`]. The counters are process-wide atomics; reading them
//! costs nothing on the hot path beyond two atomic adds per allocation.

use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Bytes currently held by tensors.
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The most bytes held by tensors at once since the last [`reset_peak`] (or process start).
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Restarts peak tracking from the bytes held now.
pub fn reset_peak() {
    PEAK.store(live_bytes(), Ordering::Relaxed);
}

pub(crate) fn on_alloc(bytes: usize) {
    let now = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

pub(crate) fn on_free(bytes: usize) {
    LIVE.fetch_sub(bytes, Ordering::Relaxed);
}
