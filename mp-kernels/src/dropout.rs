//! Inverted dropout with a counter-based mask: whether element `i` is kept is a pure function
//! of `(seed, offset + i, rate)` ([`keep`]), so the backward pass regenerates the mask instead
//! of storing it, and any slice of a tensor can be processed on its own with the matching
//! `offset`.
//!
//! Kept elements are scaled by `1 / (1 - rate)` (so the expectation is unchanged and inference
//! needs no rescaling, as Keras's `Dropout`); dropped elements are exactly `+0`, whatever they
//! held (NaN and infinities too), as PyTorch and Keras write them.
//!
//! Large slices run in fixed contiguous chunks on [`crate::threads::pool`]; since the mask
//! depends only on the index, results are bit-identical whatever the thread count.
//!
//! ```
//! use mp_kernels::dropout::{dropout, dropout_backward, keep};
//!
//! let x = [1.0f32; 8];
//! let mut y = [0.0f32; 8];
//! dropout(&x, 0.5, 42, 0, &mut y)?;
//! for (i, y) in y.iter().enumerate() {
//!     assert_eq!(*y, if keep(42, i as u64, 0.5) { 2.0 } else { 0.0 });
//! }
//! let mut dx = [0.0f32; 8];
//! dropout_backward(&x, 0.5, 42, 0, &mut dx)?; // the same mask
//! assert_eq!(dx, y);
//! # Ok::<(), mp_kernels::Error>(())
//! ```

use mp_core::Element;

use crate::cast::exec::PAR_MIN;
use crate::error::{Error, Result, check_len};
use crate::isa::Isa;
use crate::norm::convert;
use crate::threads;

/// SplitMix64's increment, the golden ratio in 64-bit fixed point.
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
/// Elements per task when a slice runs on the pool (a multiple of [`TILE`]).
const CHUNK: usize = 1 << 14;
/// Elements of a float32 tile.
const TILE: usize = 1024;

/// The SplitMix64 output function (Stafford's "Mix13"): a bijection of `u64` whose every output
/// bit depends on every input bit.
#[inline]
fn mix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The per-seed key: SplitMix64's first output for `seed` (`mp_core::Rng::new(seed).next_u64()`).
#[inline]
pub(crate) fn key(seed: u64) -> u64 {
    mix64(seed.wrapping_add(GOLDEN_GAMMA))
}

/// `ceil(rate * 2^32)`: the smallest kept 32-bit draw (0 for NaN or `rate <= 0`, `2^32` and
/// above, which no draw reaches, for `rate >= 1`). Exact: a float32 times a power of two is a
/// float64 without rounding.
#[inline]
pub(crate) fn threshold(rate: f32) -> u64 {
    (f64::from(rate) * 4_294_967_296.0).ceil() as u64
}

/// [`keep`] with the key and threshold already computed.
#[inline]
pub(crate) fn kept(key: u64, index: u64, threshold: u64) -> bool {
    mix64(key ^ index.wrapping_mul(GOLDEN_GAMMA)) >> 32 >= threshold
}

/// Whether element `index` survives dropout at `rate` under `seed`.
///
/// The exact rule (fixed: masks are reproducible across versions of mp): with `φ =
/// 0x9e3779b97f4a7c15`, `mix64` SplitMix64's output function, `key = mix64(seed + φ)` and
/// `r = mix64(key ^ index·φ) >> 32` (arithmetic modulo 2^64, 32 random bits), the element is kept
/// iff `r >= rate · 2^32`, compared exactly. So it is kept with probability
/// `1 - ceil(rate · 2^32) / 2^32`, within `2^-32` of `1 - rate`.
///
/// `rate` is not checked here: NaN or `rate <= 0` keeps everything, `rate >= 1` nothing
/// ([`dropout`] rejects all of these but 0).
pub fn keep(seed: u64, index: u64, rate: f32) -> bool {
    kept(key(seed), index, threshold(rate))
}

/// Checks that `rate` is finite and in `[0, 1)`.
fn check_rate(op: &'static str, rate: f32) -> Result<()> {
    if rate.is_finite() && (0.0..1.0).contains(&rate) {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            op,
            what: format!("rate {rate} must be finite and in [0, 1)"),
        })
    }
}

/// The shared body of [`dropout`] and [`dropout_backward`]: `y[i] = x[i] * (1 / (1 - rate))`
/// where [`keep`]`(seed, offset + i, rate)`, else `+0`.
fn apply<T: Element>(
    op: &'static str,
    out: &'static str,
    x: &[T],
    rate: f32,
    seed: u64,
    offset: u64,
    y: &mut [T],
) -> Result<()> {
    check_len(op, out, y.len(), x.len())?;
    check_rate(op, rate)?;
    if rate == 0.0 {
        y.copy_from_slice(x);
        return Ok(());
    }
    let key = key(seed);
    let t = threshold(rate);
    let scale = 1.0 / (1.0 - rate);
    let isa = Isa::detect();
    // Float32 tiles, widened from and rounded to `T` by the crate's SIMD casts (bit-identical
    // to `half`); the mask is applied with a bitwise and, so the loop has no branches.
    let run = |start: usize, x: &[T], y: &mut [T]| {
        let (mut xb, mut yb) = ([0.0f32; TILE], [0.0f32; TILE]);
        for (j, (x, y)) in x.chunks(TILE).zip(y.chunks_mut(TILE)).enumerate() {
            let n = x.len();
            convert(isa, x, &mut xb[..n]);
            let first = offset.wrapping_add((start + j * TILE) as u64);
            for (i, (o, v)) in yb[..n].iter_mut().zip(&xb[..n]).enumerate() {
                // All ones where kept, zero where dropped: `+0` whatever `v` is.
                let mask = u32::from(kept(key, first.wrapping_add(i as u64), t)).wrapping_neg();
                *o = f32::from_bits((v * scale).to_bits() & mask);
            }
            convert(isa, &yb[..n], y);
        }
    };
    if x.len() >= PAR_MIN && threads::num_threads() > 1 {
        threads::pool().chunks_mut(y, CHUNK, |j, y| {
            run(j * CHUNK, &x[j * CHUNK..][..y.len()], y)
        });
    } else {
        run(0, x, y);
    }
    Ok(())
}

/// Inverted dropout of `x` into `y`: `y[i] = x[i] * (1 / (1 - rate))` (float32 math, rounded
/// once to `T`) where [`keep`]`(seed, offset + i, rate)` (the index wrapping modulo 2^64), else
/// exactly `+0`. `offset` is the index of `x[0]` in the whole tensor, so a slice processed with
/// its offset gets the slice of the whole tensor's result. `rate == 0` copies `x` exactly (NaN
/// payloads included).
///
/// # Errors
/// [`Error::LengthMismatch`] naming `y`; [`Error::InvalidArgument`] naming `rate` and its value
/// when it is not finite or not in `[0, 1)`. Nothing is written on error.
pub fn dropout<T: Element>(x: &[T], rate: f32, seed: u64, offset: u64, y: &mut [T]) -> Result<()> {
    apply("dropout", "y", x, rate, seed, offset, y)
}

/// The gradient of [`dropout`] with the same `rate`, `seed` and `offset`: the same mask and
/// scale applied to `dy` (`dx[i] = dy[i] * (1 / (1 - rate))` where kept, else `+0`).
///
/// # Errors
/// [`Error::LengthMismatch`] naming `dx`; [`Error::InvalidArgument`] naming `rate` as
/// [`dropout`]. Nothing is written on error.
pub fn dropout_backward<T: Element>(
    dy: &[T],
    rate: f32,
    seed: u64,
    offset: u64,
    dx: &mut [T],
) -> Result<()> {
    apply("dropout_backward", "dx", dy, rate, seed, offset, dx)
}
