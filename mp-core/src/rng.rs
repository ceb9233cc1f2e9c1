//! The project's one random number generator, and the host-side shuffling, batching and
//! validation splitting built on it.
//!
//! [`Rng`] is SplitMix64: a counter-based generator whose state is one `u64` that advances by a
//! fixed odd constant, with each output a bijective hash of the counter. It is explicit (no global
//! state), seeded by the caller, stable across versions of mp (the algorithm is fixed here, not
//! borrowed from a crate whose streams may change), and its state is a plain value a checkpoint
//! can save and restore exactly.

use std::ops::Range;

/// SplitMix64 (Steele, Lea and Flood, 2014): the seeded generator every part of mp uses.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rng {
    state: u64,
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

impl Rng {
    /// A generator seeded with `seed`. Equal seeds give equal streams, on every platform.
    pub const fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// The whole state, for a checkpoint. `Rng::from_state(r.state())` continues `r`'s stream.
    pub const fn state(&self) -> u64 {
        self.state
    }

    /// Restores a state saved with [`Rng::state`].
    pub const fn from_state(state: u64) -> Self {
        Rng { state }
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A new generator whose stream is independent of this one's (for a sub-task).
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }

    /// Uniform in `[0, 1)` with 24 random bits.
    #[inline]
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    #[inline]
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.next_f32()
    }

    /// Standard normal (Box–Muller, one value per call).
    pub fn normal(&mut self) -> f32 {
        // 1 - u is in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// Uniform in `0..n` without modulo bias (Lemire's method). `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below needs a positive bound");
        let mut m = (self.next_u64() as u128) * (n as u128);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = (self.next_u64() as u128) * (n as u128);
            }
        }
        (m >> 64) as u64
    }

    /// Shuffles `items` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// `0..n` in a random order.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        self.shuffle(&mut idx);
        idx
    }

    /// A vector of `n` values uniform in `[lo, hi)`.
    pub fn uniform_vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// The seed for a randomised test: `MP_TEST_SEED` when set (to replay a failure), else a fresh one
/// from the clock. Prints `name: seed = N (replay with MP_TEST_SEED=N)` so every run can be replayed.
pub fn test_seed(name: &str) -> u64 {
    let seed = match std::env::var("MP_TEST_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        Some(seed) => seed,
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            Rng::new(nanos ^ (name.len() as u64).rotate_left(17)).next_u64()
        }
    };
    eprintln!("{name}: seed = {seed} (replay with MP_TEST_SEED={seed})");
    seed
}

/// Consecutive batches of `0..n`: `[0, b), [b, 2b), ...`, the last one possibly shorter.
/// `batch_size` is raised to 1 if it is 0.
pub fn batch_ranges(n: usize, batch_size: usize) -> impl Iterator<Item = Range<usize>> {
    let b = batch_size.max(1);
    (0..n.div_ceil(b)).map(move |i| i * b..((i + 1) * b).min(n))
}

/// The number of batches `batch_ranges(n, batch_size)` yields.
pub fn num_batches(n: usize, batch_size: usize) -> usize {
    n.div_ceil(batch_size.max(1))
}

/// Splits `0..n` as Keras's `validation_split` does: the validation set is the *last* `fraction`
/// of the samples (taken before any shuffling), the training set the rest.
/// Returns `(train, validation)`; `fraction` must be in `[0, 1)`.
pub fn validation_split(n: usize, fraction: f64) -> crate::Result<(Range<usize>, Range<usize>)> {
    if !(fraction.is_finite() && (0.0..1.0).contains(&fraction)) {
        return Err(crate::Error::InvalidArgument {
            what: format!("validation_split must be in [0, 1), got {fraction}"),
        });
    }
    let split_at = ((n as f64) * (1.0 - fraction)).floor() as usize;
    Ok((0..split_at, split_at..n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_stable() {
        // Reference values of SplitMix64 seeded with 0 (from the published algorithm).
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(r.next_u64(), 0x06c4_5d18_8009_454f);
    }

    #[test]
    fn state_round_trips() {
        let mut a = Rng::new(42);
        a.next_u64();
        let mut b = Rng::from_state(a.state());
        for _ in 0..10 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn floats_in_range_and_shuffle_is_permutation() {
        let mut r = Rng::new(test_seed("floats_in_range_and_shuffle_is_permutation"));
        for _ in 0..10_000 {
            let x = r.next_f32();
            assert!((0.0..1.0).contains(&x));
            let y = r.uniform(-3.0, 5.0);
            assert!((-3.0..5.0).contains(&y));
            assert!(r.below(7) < 7);
            assert!(r.normal().is_finite());
        }
        let mut p = r.permutation(1000);
        p.sort_unstable();
        assert_eq!(p, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn batches_and_split() {
        let b: Vec<_> = batch_ranges(10, 4).collect();
        assert_eq!(b, vec![0..4, 4..8, 8..10]);
        assert_eq!(num_batches(10, 4), 3);
        assert_eq!(batch_ranges(0, 4).count(), 0);
        assert_eq!(validation_split(100, 0.2).unwrap(), (0..80, 80..100));
        assert_eq!(validation_split(10, 0.0).unwrap(), (0..10, 10..10));
        assert!(validation_split(10, 1.0).is_err());
        assert!(validation_split(10, f64::NAN).is_err());
    }
}
