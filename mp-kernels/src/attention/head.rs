//! The per-sample kernels of [`super`]: for every head, the six products of attention
//! (`S = Q Kᵀ`, `O = P̃ V`, `dP̃ = dO Vᵀ`, `dV = P̃ᵀ dO`, `dQ = dS K`, `dK = dSᵀ Q`) as
//! register-tiled float32 FMA loops over 16-lane arrays, with the masked softmax and the
//! backward's row terms between them, on a thread-local scratch buffer (no allocation per call).
//!
//! The code is portable Rust written once and compiled three times behind run-time dispatch
//! ([`forward_samples`], [`backward_samples`]): with AVX-512, with AVX2 + FMA, and for the baseline
//! target. Its results do not depend on which: every output element is one `mul_add` chain over
//! its contraction index in ascending order (a fused multiply-add everywhere: an instruction
//! with FMA, a libm call without), whatever the row tiling; every row reduction (max, sum) runs
//! lane-wise over chunks in ascending order and then through a fixed pairwise tree over the 16
//! lanes; `exp` is one polynomial in plain float32 arithmetic. So the three builds are
//! bit-identical, and so is any split of the samples over threads.
//!
//! Masked pairs are left out, not multiplied by zero: a padded key's rows of `K` and `V` are
//! zero in the scratch copies, a query with no key to attend to has zero rows of `Q` and `dO`
//! there, and the causal mask bounds each contraction (`j <= i`), so a non-finite value at a
//! masked position reaches nothing.
//!
//! The lane loops use wrapping integer arithmetic: the branch of an overflow check (on in the
//! test profile) stops LLVM from vectorising them.

// Lane loops index several arrays by the same lane: `for l in 0..L` says so best.
#![allow(clippy::needless_range_loop)]

use mp_core::{DType, Element};

use super::Attention;
use crate::cast::cast_chunk;
use crate::dropout;
use crate::isa::Isa;
use crate::norm::{as_f32, as_f32_mut};

/// Lanes per chunk: one AVX-512 register of float32.
const L: usize = 16;
type Lanes = [f32; L];

/// Each lane's index, as a float (lane masks from float compares stay vectorised).
const LANE: Lanes = [
    0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
];

/// One attention call's sizes and options, as the kernels use them.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    /// Tokens.
    n: usize,
    /// Heads.
    h: usize,
    /// Head width.
    d: usize,
    /// `n` rounded up to whole chunks: the row stride of every `seq × seq` scratch matrix.
    np: usize,
    /// `d` rounded up to whole chunks: the row stride of every `seq × head_dim` scratch matrix.
    dp: usize,
    causal: bool,
    scale: f32,
    drop: Option<Dropout>,
}

/// The dropout mask's constants ([`dropout::keep`] with its key and threshold computed once).
#[derive(Clone, Copy, Debug)]
struct Dropout {
    key: u64,
    threshold: u64,
    /// `1 / (1 - rate)`.
    factor: f32,
}

impl Geometry {
    pub(super) fn new(a: &Attention) -> Geometry {
        let round = |x: usize| x.div_ceil(L) * L;
        Geometry {
            n: a.seq,
            h: a.heads,
            d: a.head_dim,
            np: round(a.seq),
            dp: round(a.head_dim),
            causal: a.causal,
            scale: a.scale,
            drop: a.dropout.map(|(rate, seed)| Dropout {
                key: dropout::key(seed),
                threshold: dropout::threshold(rate),
                factor: 1.0 / (1.0 - rate),
            }),
        }
    }

    /// Elements of one sample of `q` (`seq × heads × head_dim`).
    pub(super) fn sample(&self) -> usize {
        self.n * self.h * self.d
    }

    /// Elements of one sample's probabilities (`heads × seq × seq`).
    pub(super) fn sample_probs(&self) -> usize {
        self.h * self.n * self.n
    }

    /// The scratch [`forward_samples`] needs (float32 elements).
    pub(super) fn forward_scratch(&self) -> usize {
        self.forward_parts().iter().sum()
    }

    /// The scratch [`backward_samples`] needs (float32 elements).
    pub(super) fn backward_scratch(&self) -> usize {
        self.backward_parts().iter().sum()
    }

    /// q, k, v and out widened; the key mask; `Kᵀ`, `V`, the scores then weights, `O`; the
    /// softmax's row statistics.
    fn forward_parts(&self) -> [usize; 10] {
        let (s, n, d, np, dp) = (self.sample(), self.n, self.d, self.np, self.dp);
        [s, s, s, s, np, d * np, n * dp, n * np, n * dp, 2 * n]
    }

    /// q, k, v, dout, dq, dk and dv widened; the key mask; `K`, `Q`, `dO`, `Vᵀ`, one row of
    /// probabilities, the weights, `dP̃` then `dS`, and the three gradients of one head.
    fn backward_parts(&self) -> [usize; 18] {
        let (s, n, d, np, dp) = (self.sample(), self.n, self.d, self.np, self.dp);
        [
            s,
            s,
            s,
            s,
            s,
            s,
            s,
            np,
            n * dp,
            n * dp,
            n * dp,
            d * np,
            np,
            n * np,
            n * np,
            n * dp,
            n * dp,
            n * dp,
        ]
    }

    /// Whether the rows of one head can be read and written in place in a sample
    /// `[seq, heads, head_dim]`: heads of whole chunks (each row one or more full chunks) and no
    /// key mask (no row to leave out as zeros).
    #[inline(always)]
    fn in_place(&self, mask: Option<&[f32]>) -> bool {
        self.d == self.dp && mask.is_none()
    }

    /// The end of query `i`'s keys: it attends to the allowed keys below this.
    #[inline(always)]
    fn limit(&self, i: usize) -> usize {
        if self.causal { i + 1 } else { self.n }
    }

    /// The dropout factors of keys `c0..c0 + L` of the query whose first probability has the
    /// flat index `base` (lanes past the last key are garbage, masked by the caller).
    #[inline(always)]
    fn drop_lanes(&self, base: u64, c0: usize) -> Lanes {
        let mut f = [1.0f32; L];
        if let Some(dr) = self.drop {
            let base = base.wrapping_add(c0 as u64);
            for (l, f) in f.iter_mut().enumerate() {
                let kept = dropout::kept(dr.key, base.wrapping_add(l as u64), dr.threshold);
                *f = if kept { dr.factor } else { 0.0 };
            }
        }
        f
    }
}

/// Splits `buf` into consecutive parts of the given sizes.
fn carve<const N: usize>(buf: &mut [f32], sizes: [usize; N]) -> [&mut [f32]; N] {
    let mut rest = buf;
    sizes.map(|n| {
        let (part, tail) = std::mem::take(&mut rest).split_at_mut(n);
        rest = tail;
        part
    })
}

#[inline(always)]
fn chunk(x: &[f32], at: usize) -> &Lanes {
    x[at..at + L].try_into().unwrap()
}

#[inline(always)]
fn chunk_mut(x: &mut [f32], at: usize) -> &mut Lanes {
    (&mut x[at..at + L]).try_into().unwrap()
}

/// Lanes `c0..c0 + L` of `x`, zero past its end: short rows move as whole chunks, not through a
/// `memmove` call.
#[inline(always)]
fn load_partial(x: &[f32], c0: usize) -> Lanes {
    let x = &x[c0.min(x.len())..];
    if x.len() >= L {
        return *chunk(x, 0);
    }
    let mut v = [0.0f32; L];
    for (v, &x) in v.iter_mut().zip(x) {
        *v = x;
    }
    v
}

/// Writes `v` to lanes `c0..c0 + L` of `x`, those before its end.
#[inline(always)]
fn store_partial(x: &mut [f32], c0: usize, v: &Lanes) {
    let at = c0.min(x.len());
    let x = &mut x[at..];
    if x.len() >= L {
        *chunk_mut(x, 0) = *v;
        return;
    }
    for (x, &v) in x.iter_mut().zip(v) {
        *x = v;
    }
}

/// The sum of the lanes, in a fixed pairwise order.
#[inline(always)]
fn hsum(v: Lanes) -> f32 {
    let h8: [f32; 8] = std::array::from_fn(|l| v[l] + v[l + 8]);
    let h4: [f32; 4] = std::array::from_fn(|l| h8[l] + h8[l + 4]);
    (h4[0] + h4[2]) + (h4[1] + h4[3])
}

/// The larger of `a` and `b`, `a` when they compare equal or `b` is NaN: one compare and
/// select, which vectorises (`f32::max` must also handle a NaN `a`, and LLVM left it scalar).
#[inline(always)]
fn max_or_first(a: f32, b: f32) -> f32 {
    if b > a { b } else { a }
}

/// The largest lane of lanes that are never NaN, in a fixed pairwise order.
#[inline(always)]
fn hmax(v: Lanes) -> f32 {
    let h8: [f32; 8] = std::array::from_fn(|l| max_or_first(v[l], v[l + 8]));
    let h4: [f32; 4] = std::array::from_fn(|l| max_or_first(h8[l], h8[l + 4]));
    max_or_first(max_or_first(h4[0], h4[2]), max_or_first(h4[1], h4[3]))
}

/// `e^x` within about 2 ulps, NaN kept, in float32 arithmetic any build vectorises the same
/// way (the polynomial of [`crate::softmax`]'s SIMD `exp`).
#[inline(always)]
#[allow(clippy::excessive_precision)]
fn exp(x: f32) -> f32 {
    // `clamp` keeps NaN (`min`/`max` would drop it).
    let x = x.clamp(-104.0, 89.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (-n).mul_add(0.693_359_4, x);
    let r = (-n).mul_add(-2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_2e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let p = p.mul_add(r * r, r) + 1.0;
    // n is in [-150, 128]: two normal powers of two. Its integer from the bits of n + 1.5·2^23
    // (exact), not a saturating cast, which does not vectorise; for NaN it is garbage, and p is
    // NaN.
    let n = ((n + 12_582_912.0).to_bits() as i32).wrapping_sub(0x4b40_0000);
    let (n1, n2) = (n >> 1, n.wrapping_sub(n >> 1));
    p * pow2(n1) * pow2(n2)
}

/// `2^k` for `k` in float32's normal range.
#[inline(always)]
fn pow2(k: i32) -> f32 {
    f32::from_bits((k.wrapping_add(127) as u32) << 23)
}

/// `T::from_f32(x).to_f32()` in float32 arithmetic that vectorises (round to nearest even,
/// subnormals kept, overflow to infinity; NaN stays NaN).
#[inline(always)]
fn round_to<T: Element>(x: f32) -> f32 {
    let b = x.to_bits();
    let r = match T::DTYPE {
        DType::F32 => return x,
        DType::BF16 => {
            f32::from_bits(b.wrapping_add(0x7fff).wrapping_add((b >> 16) & 1) & 0xffff_0000)
        }
        DType::F16 => {
            if x.abs() < 6.103_515_6e-5 {
                // Below float16's smallest normal: multiples of 2^-24.
                (x * 16_777_216.0).round_ties_even() * 5.960_464_5e-8
            } else {
                let r =
                    f32::from_bits(b.wrapping_add(0xfff).wrapping_add((b >> 13) & 1) & 0xffff_e000);
                if r.abs() > 65_504.0 {
                    f32::INFINITY.copysign(x)
                } else {
                    r
                }
            }
        }
    };
    if x.is_nan() { x } else { r }
}

/// How far row `r`'s contraction runs: over `lo(r)..hi(r)`.
#[derive(Clone, Copy, Debug)]
enum Span {
    /// `0..n`, every row.
    All(usize),
    /// `0..=r`: a query's keys under the causal mask.
    Causal,
    /// `r..n`: a key's queries under the causal mask.
    AntiCausal(usize),
}

impl Span {
    #[inline(always)]
    fn lo(self, r: usize) -> usize {
        match self {
            Span::AntiCausal(_) => r,
            Span::All(_) | Span::Causal => 0,
        }
    }

    #[inline(always)]
    fn hi(self, r: usize) -> usize {
        match self {
            Span::All(n) | Span::AntiCausal(n) => n,
            Span::Causal => r + 1,
        }
    }
}

/// A float32 matrix in a slice: element `(r, k)` at `r * rs + k * ks`.
#[derive(Clone, Copy, Debug)]
struct Mat<'a> {
    x: &'a [f32],
    rs: usize,
    ks: usize,
}

/// One step of [`tile`]: `acc[r][c] += coef(r0 + r, k) · s[c]` for its rows whose span holds
/// `k` (all of them when `check` is `None`); `rows[r]` is where row `r0 + r` of `coef` starts. A
/// function, not a closure: closures do not get the caller's target features, and `mul_add`
/// would become a libm call. Index sums wrap instead of being overflow-checked (indexing still
/// checks bounds): a checked sum per row per step costs more than the FMA.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn step<const R: usize, const C: usize>(
    acc: &mut [[Lanes; C]; R],
    coef: Mat<'_>,
    rows: &[usize; R],
    s: &[Lanes; C],
    r0: usize,
    k: usize,
    check: Option<Span>,
) {
    let kk = k.wrapping_mul(coef.ks);
    for (r, acc) in acc.iter_mut().enumerate() {
        if let Some(span) = check
            && !(span.lo(r0 + r) <= k && k < span.hi(r0 + r))
        {
            continue;
        }
        let w = coef.x[rows[r].wrapping_add(kk)];
        for (acc, s) in acc.iter_mut().zip(s) {
            for l in 0..L {
                acc[l] = w.mul_add(s[l], acc[l]);
            }
        }
    }
}

/// Chunks `c0..c0 + C` of row `k` of `src` (row stride `ss`).
#[inline(always)]
fn chunks<const C: usize>(src: &[f32], ss: usize, k: usize, c0: usize) -> [Lanes; C] {
    std::array::from_fn(|c| *chunk(src, k * ss + c0 + c * L))
}

/// `out[r, c0..c0 + C L] = Σ_{k ∈ span(r)} coef(r, k) · src[k, c0..c0 + C L]` for the `R` rows
/// from `r0`, `R x C` chains of `L` lanes in registers, each in ascending `k` (one coefficient
/// per row and step serves all `C` chunks).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile<const R: usize, const C: usize>(
    out: &mut [f32],
    os: usize,
    coef: Mat<'_>,
    src: &[f32],
    ss: usize,
    c0: usize,
    r0: usize,
    span: Span,
) {
    let mut acc = [[[0.0f32; L]; C]; R];
    let rows: [usize; R] = std::array::from_fn(|r| (r0 + r) * coef.rs);
    // Rows start and end their spans in order: the shared middle runs unchecked.
    let (lo_min, lo_max) = (span.lo(r0), span.lo(r0 + R - 1));
    let (hi_min, hi_max) = (span.hi(r0), span.hi(r0 + R - 1));
    for k in lo_min..lo_max {
        let s = chunks::<C>(src, ss, k, c0);
        step(&mut acc, coef, &rows, &s, r0, k, Some(span));
    }
    for k in lo_max..hi_min {
        let s = chunks::<C>(src, ss, k, c0);
        step(&mut acc, coef, &rows, &s, r0, k, None);
    }
    for k in hi_min.max(lo_max)..hi_max {
        let s = chunks::<C>(src, ss, k, c0);
        step(&mut acc, coef, &rows, &s, r0, k, Some(span));
    }
    for (r, acc) in acc.iter().enumerate() {
        for (c, acc) in acc.iter().enumerate() {
            *chunk_mut(out, (r0 + r) * os + c0 + c * L) = *acc;
        }
    }
}

/// `out[r, ..width] = Σ_{k ∈ span(r)} coef(r, k) · src[k, ..width]` for rows `0..rows`, with
/// row strides `os` and `ss` (multiples of [`L`], as `width` is). With `causal`, chunks of
/// columns entirely right of the diagonal are skipped (left as they were: masked later).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn product(
    out: &mut [f32],
    os: usize,
    coef: Mat<'_>,
    src: &[f32],
    ss: usize,
    width: usize,
    rows: usize,
    span: Span,
    causal: bool,
) {
    let mut c0 = 0;
    while c0 < width {
        // Two chunks at a time where there are two: one broadcast of a coefficient feeds both.
        let pair = width - c0 >= 2 * L;
        let mut r0 = 0;
        while r0 < rows {
            let r = match (pair, rows - r0) {
                (true, 4..) => 4,
                (false, 8..) => 8,
                (false, 4..) => 4,
                _ => 1,
            };
            if !(causal && c0 >= r0 + r) {
                match (pair, r) {
                    (true, 4) => tile::<4, 2>(out, os, coef, src, ss, c0, r0, span),
                    (true, _) => tile::<1, 2>(out, os, coef, src, ss, c0, r0, span),
                    (false, 8) => tile::<8, 1>(out, os, coef, src, ss, c0, r0, span),
                    (false, 4) => tile::<4, 1>(out, os, coef, src, ss, c0, r0, span),
                    _ => tile::<1, 1>(out, os, coef, src, ss, c0, r0, span),
                }
            }
            r0 += r;
        }
        c0 += if pair { 2 * L } else { L };
    }
}

/// The key mask of one sample as 1 and 0 over `np` lanes (0 past the last token); returns the
/// first allowed key (`n` when none).
#[inline(always)]
fn key_mask(g: &Geometry, mask: Option<&[f32]>, ok: &mut [f32]) -> usize {
    ok.fill(0.0);
    for (j, o) in ok[..g.n].iter_mut().enumerate() {
        *o = if mask.is_none_or(|m| m[j] != 0.0) {
            1.0
        } else {
            0.0
        };
    }
    ok[..g.n].iter().position(|&o| o != 0.0).unwrap_or(g.n)
}

/// Row `r` of head `head` in a sample `[seq, heads, head_dim]` into `row` (`dp` lanes, zero
/// padded), or zeros when `keep` is false.
#[inline(always)]
fn gather_row(g: &Geometry, x: &[f32], r: usize, head: usize, keep: bool, row: &mut [f32]) {
    let src = &x[(r * g.h + head) * g.d..][..g.d];
    for c0 in (0..g.dp).step_by(L) {
        *chunk_mut(row, c0) = if keep {
            load_partial(src, c0)
        } else {
            [0.0; L]
        };
    }
}

/// Column-major copy of head `head`: `t[c * np + j] = x[j, head, c]`, zero for the keys that
/// `ok` masks and past the last token.
#[inline(always)]
fn gather_transposed(g: &Geometry, x: &[f32], head: usize, ok: &[f32], t: &mut [f32]) {
    t.fill(0.0);
    for j in 0..g.n {
        if ok[j] != 0.0 {
            let row = &x[(j * g.h + head) * g.d..][..g.d];
            for (c, &v) in row.iter().enumerate() {
                t[c.wrapping_mul(g.np).wrapping_add(j)] = v;
            }
        }
    }
}

/// The rows of one head (`dp` lanes each) back into a sample `[seq, heads, head_dim]`; rows
/// with `ok[r] == 0` (when given) as zeros.
#[inline(always)]
fn scatter(g: &Geometry, rows: &[f32], head: usize, ok: Option<&[f32]>, x: &mut [f32]) {
    for r in 0..g.n {
        let dst = &mut x[(r * g.h + head) * g.d..][..g.d];
        let zero = ok.is_some_and(|ok| ok[r] == 0.0);
        for c0 in (0..g.dp).step_by(L) {
            let v = if zero {
                [0.0; L]
            } else {
                *chunk(rows, r * g.dp + c0)
            };
            store_partial(dst, c0, &v);
        }
    }
}

/// `x` when `keep`, else `+0`: a bit mask, which LLVM keeps vectorised where an `if` around the
/// computation of `x` became a branch per lane.
#[inline(always)]
fn keep_if(keep: bool, x: f32) -> f32 {
    f32::from_bits(x.to_bits() & (keep as u32).wrapping_neg())
}

/// Whether lane `l` of a chunk is an allowed key, with `rem` the query's keys left from the
/// chunk's first (`lim.saturating_sub(c0)`).
#[inline(always)]
fn allowed(ok: &Lanes, l: usize, rem: usize) -> bool {
    // `&`, not `&&`: no branch per lane, so the lane loops stay vectorised.
    (ok[l] != 0.0) & (l < rem)
}

/// One head's softmax: row `i` of `st` (`np` lanes per row) holds query `i`'s raw scores and
/// gets the value product's weights, the probabilities after dropout rounded once to `T`; row
/// `i` of `p` (`n` per row) gets the float32 probabilities. `base` is the flat index of the
/// head's first probability (the dropout counter). `stats` holds two floats per query.
///
/// Three passes over all the rows (the maxima, then the exponentials and their sums, then the
/// scaling), not one row at a time: each row's work is a chain of reductions, and rows side by
/// side let the core overlap them. Every row's arithmetic is the same as alone.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn softmax_rows<T: Element>(
    g: &Geometry,
    first_ok: usize,
    ok: &[f32],
    st: &mut [f32],
    p: &mut [f32],
    base: u64,
    stats: &mut [f32],
) {
    let (n, np) = (g.n, g.np);
    let (maxes, sums) = stats[..2 * n].split_at_mut(n);
    for i in 0..n {
        let lim = g.limit(i);
        let s = &st[i * np..][..np];
        let mut m = [f32::NEG_INFINITY; L];
        for c0 in (0..np).step_by(L) {
            let rem = lim.saturating_sub(c0);
            let (x, o) = (chunk(s, c0), chunk(ok, c0));
            for l in 0..L {
                // A NaN score is skipped (the lanes of `m` are never NaN); it then propagates
                // through `exp`.
                let sc = x[l] * g.scale;
                let sc = if allowed(o, l, rem) {
                    sc
                } else {
                    f32::NEG_INFINITY
                };
                m[l] = max_or_first(m[l], sc);
            }
        }
        maxes[i] = hmax(m);
    }
    for i in 0..n {
        let lim = g.limit(i);
        let max = maxes[i];
        let s = &mut st[i * np..][..np];
        let mut sum = [0.0f32; L];
        for c0 in (0..np).step_by(L) {
            let rem = lim.saturating_sub(c0);
            let o = *chunk(ok, c0);
            let x = chunk_mut(s, c0);
            for l in 0..L {
                let e = keep_if(allowed(&o, l, rem), exp(x[l] * g.scale - max));
                x[l] = e;
                sum[l] += e;
            }
        }
        sums[i] = 1.0 / hsum(sum);
    }
    for i in 0..n {
        let lim = g.limit(i);
        let (s, p) = (&mut st[i * np..][..np], &mut p[i * n..][..n]);
        if first_ok >= lim {
            // No key to attend to: zero probabilities, zero output.
            p.fill(0.0);
            s.fill(0.0);
            continue;
        }
        let inv = sums[i];
        let base = base + (i * n) as u64;
        for c0 in (0..np).step_by(L) {
            let rem = lim.saturating_sub(c0);
            let o = *chunk(ok, c0);
            let x = chunk_mut(s, c0);
            for l in 0..L {
                // Masked keys are exactly +0 even when the sum is NaN.
                x[l] = keep_if(allowed(&o, l, rem), x[l] * inv);
            }
            store_partial(p, c0, x);
        }
        // The value product's weights, in a pass of their own: in the pass above, LLVM reloaded
        // each chunk through a masked load behind the store for 16-bit types (a stall a chunk).
        for c0 in (0..np).step_by(L) {
            let f = g.drop_lanes(base, c0);
            let x = chunk_mut(s, c0);
            for l in 0..L {
                x[l] = round_to::<T>(x[l] * f[l]);
            }
        }
    }
}

/// `x` as float32: itself when `T` is float32 (no copy), else widened into `buf`.
#[inline(always)]
fn widened<'a, T: Element>(isa: Isa, x: &'a [T], buf: &'a mut [f32]) -> &'a [f32] {
    match as_f32(x) {
        Some(x) => x,
        None => {
            cast_chunk(isa, x, buf);
            buf
        }
    }
}

/// Where a sample's float32 result is written: the output itself when `T` is float32, else a
/// buffer rounded into the output by [`Sink::finish`].
enum Sink<'a, T> {
    Direct(&'a mut [f32]),
    Via(&'a mut [f32], &'a mut [T]),
}

impl<'a, T: Element> Sink<'a, T> {
    #[inline(always)]
    fn new(out: &'a mut [T], buf: &'a mut [f32]) -> Self {
        if T::DTYPE == DType::F32 {
            Sink::Direct(as_f32_mut(out).expect("T is float32"))
        } else {
            Sink::Via(buf, out)
        }
    }

    #[inline(always)]
    fn buf(&mut self) -> &mut [f32] {
        match self {
            Sink::Direct(x) | Sink::Via(x, _) => x,
        }
    }

    #[inline(always)]
    fn finish(self, isa: Isa) {
        if let Sink::Via(buf, out) = self {
            cast_chunk(isa, buf, out);
        }
    }
}

/// The forward pass of the samples from `b0` (`out` and `probs` hold whole samples).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_samples<T: Element>(
    isa: Isa,
    g: &Geometry,
    b0: usize,
    (q, k, v): (&[T], &[T], &[T]),
    mask: Option<&[f32]>,
    out: &mut [T],
    probs: &mut [f32],
    scratch: &mut [f32],
) {
    let (sl, n, np, dp) = (g.sample(), g.n, g.np, g.dp);
    let [qf, kf, vf, of, ok, kt, vr, st, orow, stats] = carve(scratch, g.forward_parts());
    for (bi, (out, probs)) in out
        .chunks_mut(sl)
        .zip(probs.chunks_mut(g.sample_probs()))
        .enumerate()
    {
        let b = b0 + bi;
        let at = b * sl..(b + 1) * sl;
        let qf = widened(isa, &q[at.clone()], qf);
        let kf = widened(isa, &k[at.clone()], kf);
        let vf = widened(isa, &v[at], vf);
        let first_ok = key_mask(g, mask.map(|m| &m[b * n..][..n]), ok);
        let mut sink = Sink::new(out, of);
        let of = sink.buf();
        // Without a mask and with heads of whole chunks, V is read and O written in place.
        let direct = g.in_place(mask);
        for head in 0..g.h {
            gather_transposed(g, kf, head, ok, kt);
            let (vs, vss) = if direct {
                (&vf[head * g.d..], g.h * g.d)
            } else {
                for j in 0..n {
                    gather_row(g, vf, j, head, ok[j] != 0.0, &mut vr[j * dp..][..dp]);
                }
                (&vr[..], dp)
            };
            let qm = Mat {
                x: &qf[head * g.d..],
                rs: g.h * g.d,
                ks: 1,
            };
            product(st, np, qm, kt, np, np, n, Span::All(g.d), g.causal);
            let base = ((b * g.h + head) * n * n) as u64;
            let p = &mut probs[head * n * n..][..n * n];
            softmax_rows::<T>(g, first_ok, ok, st, p, base, stats);
            let span = if g.causal { Span::Causal } else { Span::All(n) };
            let wm = Mat {
                x: st,
                rs: np,
                ks: 1,
            };
            if direct {
                product(
                    &mut of[head * g.d..],
                    g.h * g.d,
                    wm,
                    vs,
                    vss,
                    dp,
                    n,
                    span,
                    false,
                );
            } else {
                product(orow, dp, wm, vs, vss, dp, n, span, false);
                scatter(g, orow, head, None, of);
            }
        }
        sink.finish(isa);
    }
}

/// Query `i`'s backward row terms: from its probabilities (`n` of them from `p[at..]`) and
/// `dP̃` in `ds` (`np` lanes), the value product's weights (as the forward rounded them) into
/// `w` and `dS = P ∘ (dP − rowsum(P ∘ dP)) · scale` over `ds`, with `dP = dP̃ ∘ dropout`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_row<T: Element>(
    g: &Geometry,
    i: usize,
    first_ok: usize,
    ok: &[f32],
    (p, at): (&[f32], usize),
    prow: &mut [f32],
    w: &mut [f32],
    ds: &mut [f32],
    base: u64,
) {
    let lim = g.limit(i);
    if first_ok >= lim {
        w.fill(0.0);
        ds.fill(0.0);
        return;
    }
    let row = &p[at..][..g.n];
    for c0 in (0..g.np).step_by(L) {
        // A whole chunk where `p` has one (it runs on into the next row: those lanes are
        // cleared), so a short row costs no element-by-element copy.
        *chunk_mut(prow, c0) = if at + c0 + L <= p.len() {
            let v = chunk(p, at + c0);
            let have = g.n.saturating_sub(c0).min(L) as f32;
            std::array::from_fn(|l| keep_if(LANE[l] < have, v[l]))
        } else {
            load_partial(row, c0)
        };
    }
    let mut acc = [0.0f32; L];
    for c0 in (0..g.np).step_by(L) {
        let rem = lim.saturating_sub(c0);
        let (o, p, f) = (*chunk(ok, c0), *chunk(prow, c0), g.drop_lanes(base, c0));
        let (w, ds) = (chunk_mut(w, c0), chunk_mut(ds, c0));
        for l in 0..L {
            let keep = allowed(&o, l, rem);
            let dp = ds[l] * f[l];
            w[l] = keep_if(keep, round_to::<T>(p[l] * f[l]));
            ds[l] = dp;
            let a = p[l].mul_add(dp, acc[l]);
            acc[l] = if keep { a } else { acc[l] };
        }
    }
    let weighted = hsum(acc);
    for c0 in (0..g.np).step_by(L) {
        let rem = lim.saturating_sub(c0);
        let (o, p) = (*chunk(ok, c0), *chunk(prow, c0));
        let ds = chunk_mut(ds, c0);
        for l in 0..L {
            let keep = allowed(&o, l, rem);
            ds[l] = keep_if(keep, p[l] * (ds[l] - weighted) * g.scale);
        }
    }
}

/// The backward pass of the samples from `b0` (`dq`, `dk`, `dv` hold whole samples).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_samples<T: Element>(
    isa: Isa,
    g: &Geometry,
    b0: usize,
    (q, k, v, dout): (&[T], &[T], &[T], &[T]),
    mask: Option<&[f32]>,
    probs: &[f32],
    (dq, dk, dv): (&mut [T], &mut [T], &mut [T]),
    scratch: &mut [f32],
) {
    let (sl, n, np, dp) = (g.sample(), g.n, g.np, g.dp);
    let [
        qf,
        kf,
        vf,
        gf,
        dqf,
        dkf,
        dvf,
        ok,
        kr,
        qr,
        gr,
        vt,
        prow,
        w,
        ds,
        dq_r,
        dk_r,
        dv_r,
    ] = carve(scratch, g.backward_parts());
    let samples = dq
        .chunks_mut(sl)
        .zip(dk.chunks_mut(sl))
        .zip(dv.chunks_mut(sl));
    for (bi, ((dq, dk), dv)) in samples.enumerate() {
        let b = b0 + bi;
        let at = b * sl..(b + 1) * sl;
        let qf = widened(isa, &q[at.clone()], qf);
        let kf = widened(isa, &k[at.clone()], kf);
        let vf = widened(isa, &v[at.clone()], vf);
        let gf = widened(isa, &dout[at], gf);
        let (mut dq, mut dk, mut dv) = (Sink::new(dq, dqf), Sink::new(dk, dkf), Sink::new(dv, dvf));
        let (dqf, dkf, dvf) = (dq.buf(), dk.buf(), dv.buf());
        let first_ok = key_mask(g, mask.map(|m| &m[b * n..][..n]), ok);
        let pb = &probs[b * g.sample_probs()..][..g.sample_probs()];
        // Without a mask (every key allowed, every query attending) and with heads of whole
        // chunks, K, Q and dO are read and dQ, dK, dV written in place.
        let direct = g.in_place(mask);
        let hd = g.h * g.d;
        for head in 0..g.h {
            let (krs, qrs, grs, rs) = if direct {
                let at = head * g.d;
                (&kf[at..], &qf[at..], &gf[at..], hd)
            } else {
                for r in 0..n {
                    let row = r * dp..(r + 1) * dp;
                    let attends = first_ok < g.limit(r);
                    gather_row(g, kf, r, head, ok[r] != 0.0, &mut kr[row.clone()]);
                    gather_row(g, qf, r, head, attends, &mut qr[row.clone()]);
                    gather_row(g, gf, r, head, attends, &mut gr[row]);
                }
                (&kr[..], &qr[..], &gr[..], dp)
            };
            gather_transposed(g, vf, head, ok, vt);
            let gm = Mat { x: grs, rs, ks: 1 };
            product(ds, np, gm, vt, np, np, n, Span::All(g.d), g.causal);
            for i in 0..n {
                let base = (((b * g.h + head) * n + i) * n) as u64;
                let row = i * np..(i + 1) * np;
                backward_row::<T>(
                    g,
                    i,
                    first_ok,
                    ok,
                    (pb, (head * n + i) * n),
                    prow,
                    &mut w[row.clone()],
                    &mut ds[row],
                    base,
                );
            }
            let (rows, cols) = if g.causal {
                (Span::Causal, Span::AntiCausal(n))
            } else {
                (Span::All(n), Span::All(n))
            };
            let by_col = |x| Mat { x, rs: 1, ks: np };
            let by_row = |x| Mat { x, rs: np, ks: 1 };
            if direct {
                let at = head * g.d;
                product(&mut dvf[at..], hd, by_col(w), grs, rs, dp, n, cols, false);
                product(&mut dqf[at..], hd, by_row(ds), krs, rs, dp, n, rows, false);
                product(&mut dkf[at..], hd, by_col(ds), qrs, rs, dp, n, cols, false);
            } else {
                product(dv_r, dp, by_col(w), grs, rs, dp, n, cols, false);
                product(dq_r, dp, by_row(ds), krs, rs, dp, n, rows, false);
                product(dk_r, dp, by_col(ds), qrs, rs, dp, n, cols, false);
                scatter(g, dv_r, head, Some(ok), dvf);
                scatter(g, dq_r, head, None, dqf);
                scatter(g, dk_r, head, Some(ok), dkf);
            }
        }
        dq.finish(isa);
        dk.finish(isa);
        dv.finish(isa);
    }
}

/// The three builds of [`forward_samples`] and [`backward_samples`].
macro_rules! builds {
    ($($(#[$cfg:meta])* $fwd:ident, $bwd:ident, $features:literal;)*) => {$(
        $(#[$cfg])*
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        pub(super) fn $fwd<T: Element>(
            isa: Isa,
            g: &Geometry,
            b0: usize,
            qkv: (&[T], &[T], &[T]),
            mask: Option<&[f32]>,
            out: &mut [T],
            probs: &mut [f32],
            scratch: &mut [f32],
        ) {
            forward_samples(isa, g, b0, qkv, mask, out, probs, scratch)
        }

        $(#[$cfg])*
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        pub(super) fn $bwd<T: Element>(
            isa: Isa,
            g: &Geometry,
            b0: usize,
            inputs: (&[T], &[T], &[T], &[T]),
            mask: Option<&[f32]>,
            probs: &[f32],
            grads: (&mut [T], &mut [T], &mut [T]),
            scratch: &mut [f32],
        ) {
            backward_samples(isa, g, b0, inputs, mask, probs, grads, scratch)
        }
    )*};
}

builds! {
    #[cfg(target_arch = "x86_64")]
    forward_avx512, backward_avx512, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c";
    #[cfg(target_arch = "x86_64")]
    forward_avx2, backward_avx2, "avx2,fma,f16c";
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;

    fn same_as_half<T: Element>(x: f32) {
        let want = T::from_f32(x).to_f32();
        let got = round_to::<T>(x);
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "{:?} {x:e} ({:#x}): {got:e}, half {want:e}",
            T::DTYPE,
            x.to_bits()
        );
    }

    #[test]
    fn rounding_matches_half() {
        let mut rng = mp_core::Rng::new(5);
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            65_504.0,
            65_519.99,
            65_520.0,
            -65_520.0,
            6.103_515_6e-5,
            6.1e-5,
            2.98e-8,
            2.980_232_2e-8,
            -3.0e-8,
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001),
        ];
        let random = (0..200_000).map(|_| f32::from_bits(rng.next_u64() as u32));
        for x in specials.into_iter().chain(random) {
            same_as_half::<f32>(x);
            same_as_half::<bf16>(x);
            same_as_half::<f16>(x);
        }
        // Every float16 value and the midpoints between neighbours (ties to even).
        for bits in 0..=u16::MAX {
            let x = f16::from_bits(bits).to_f32();
            let next = f16::from_bits(bits.wrapping_add(1)).to_f32();
            same_as_half::<f16>(x);
            if x.is_finite() && next.is_finite() {
                same_as_half::<f16>((x + next) / 2.0);
            }
        }
    }

    #[test]
    fn exp_is_close_and_keeps_nan() {
        for i in -110_000..=1000 {
            let x = i as f32 * 1e-3;
            let (got, want) = (f64::from(exp(x)), f64::from(x).exp());
            assert!(
                (got - want).abs() <= 3e-7 * want + 1e-44,
                "exp({x}) = {got:e}, want {want:e}"
            );
        }
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }
}
