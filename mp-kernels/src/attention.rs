//! Scaled dot-product attention over heads, the core of a multi-head attention layer:
//! `out = dropout(softmax(mask(q · kᵀ · scale))) · v` for every sample and head.
//!
//! Layout: `q`, `k`, `v` and `out` are `[batch, seq, heads, head_dim]` row-major, which is what
//! a `Dense` projection to `heads × head_dim` units writes, so no transpose is needed. The
//! probabilities are `[batch, heads, seq, seq]` float32.
//!
//! Precision: inputs and outputs are any [`Element`] (float32, bfloat16, float16); the dot
//! products accumulate in float32 from the widened inputs, the softmax is float32, and the
//! probabilities are rounded once to the compute dtype for the value product (as a GEMM in the
//! compute dtype would take them), which accumulates in float32 and rounds once.
//!
//! Masks select, they do not add: a masked key (key padding `0`, or a later position under the
//! causal mask) is left out of the softmax, so its probability is exactly `+0` whatever the
//! dtype; there is no large negative constant to overflow float16 (keras-team/keras#17571). A
//! query whose every key is masked gets all-zero probabilities and a zero output, not NaN, and
//! passes no gradient.
//!
//! Backward, with `P` the probabilities, `P̃ = dropout(P)` and `dO` the output gradient:
//! `dV = P̃ᵀ dO`, `dP̃ = dO Vᵀ`, `dP = dropout(dP̃)` (the same mask), `dS = P ∘ (dP − rowsum(P ∘
//! dP))`, `dQ = scale · dS K`, `dK = scale · dSᵀ Q`, all in float32, each rounded once.
//!
//! Samples run on [`crate::threads::pool`], one task per sample; every sum is in a fixed order,
//! so results are bit-identical whatever the thread count.
//!
//! ```
//! use mp_kernels::attention::{Attention, attention};
//!
//! // One sample, 2 tokens, 1 head of width 2; the causal mask hides token 1 from token 0.
//! let shape = Attention::new(1, 2, 1, 2).causal();
//! let q = [1.0f32, 0.0, 1.0, 0.0];
//! let k = [1.0f32, 0.0, 1.0, 0.0];
//! let v = [1.0f32, 2.0, 3.0, 4.0];
//! let (mut out, mut probs) = ([0.0f32; 4], [0.0f32; 4]);
//! attention(&shape, &q, &k, &v, None, &mut out, &mut probs)?;
//! assert_eq!(probs, [1.0, 0.0, 0.5, 0.5]);
//! assert_eq!(out, [1.0, 2.0, 2.0, 3.0]);
//! # Ok::<(), mp_kernels::Error>(())
//! ```

use mp_core::Element;
use rayon::prelude::*;

use crate::dropout::keep;
use crate::error::{Error, Result, check_len};
use crate::isa::Isa;
use crate::threads;

const OP: &str = "attention";
const OP_BACKWARD: &str = "attention_backward";

/// The geometry and options of one attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attention {
    /// Samples.
    pub batch: usize,
    /// Tokens per sample (queries and keys alike: self-attention).
    pub seq: usize,
    /// Heads.
    pub heads: usize,
    /// Width of each head's query, key and value.
    pub head_dim: usize,
    /// The factor on `q · k` (`1 / sqrt(head_dim)` by default).
    pub scale: f32,
    /// Whether query `i` attends to keys `j <= i` only.
    pub causal: bool,
    /// Dropout on the probabilities: the rate and the seed of the counter-based mask
    /// ([`crate::dropout::keep`] on the probability's flat index).
    pub dropout: Option<(f32, u64)>,
}

impl Attention {
    /// `batch` samples of `seq` tokens, `heads` heads of width `head_dim`, scale
    /// `1 / sqrt(head_dim)`, no causal mask, no dropout.
    pub fn new(batch: usize, seq: usize, heads: usize, head_dim: usize) -> Self {
        Attention {
            batch,
            seq,
            heads,
            head_dim,
            scale: 1.0 / (head_dim.max(1) as f32).sqrt(),
            causal: false,
            dropout: None,
        }
    }

    /// With the causal mask.
    pub fn causal(self) -> Self {
        self.with_causal(true)
    }

    /// With the causal mask or without it.
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// With dropout `rate` on the probabilities, drawn from `seed`.
    pub fn with_dropout(mut self, rate: f32, seed: u64) -> Self {
        self.dropout = (rate > 0.0).then_some((rate, seed));
        self
    }

    /// Elements of `q` (and `k`, `v`, `out`).
    pub fn len(&self) -> usize {
        self.batch * self.seq * self.heads * self.head_dim
    }

    /// Whether there is nothing to compute.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements of the probabilities, `batch × heads × seq × seq`.
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.seq * self.seq
    }

    fn check(&self, op: &'static str) -> Result<()> {
        if !self.scale.is_finite() {
            return Err(Error::InvalidArgument {
                op,
                what: format!("the score scale must be finite, got {}", self.scale),
            });
        }
        if let Some((rate, _)) = self.dropout
            && !(0.0..1.0).contains(&rate)
        {
            return Err(Error::InvalidArgument {
                op,
                what: format!("the dropout rate must be in [0, 1), got {rate}"),
            });
        }
        Ok(())
    }

    /// Whether query `i` of sample `b` may attend to key `j`.
    #[inline]
    fn allowed(&self, mask: Option<&[f32]>, b: usize, i: usize, j: usize) -> bool {
        !(self.causal && j > i) && mask.is_none_or(|m| m[b * self.seq + j] != 0.0)
    }

    /// The dropout factor of probability `(b, h, i, j)`: `1 / (1 - rate)` kept, 0 dropped.
    #[inline]
    fn drop_factor(&self, b: usize, h: usize, i: usize, j: usize) -> f32 {
        match self.dropout {
            None => 1.0,
            Some((rate, seed)) => {
                let index = (((b * self.heads + h) * self.seq + i) * self.seq + j) as u64;
                if keep(seed, index, rate) {
                    1.0 / (1.0 - rate)
                } else {
                    0.0
                }
            }
        }
    }
}

/// A key padding mask is `[batch, seq]` of 1 (attend) and 0 (padding).
fn check_mask(op: &'static str, a: &Attention, mask: Option<&[f32]>) -> Result<()> {
    let Some(m) = mask else { return Ok(()) };
    check_len(op, "mask", m.len(), a.batch * a.seq)?;
    match m.iter().position(|&v| v != 0.0 && v != 1.0) {
        None => Ok(()),
        Some(p) => Err(Error::InvalidArgument {
            op,
            what: format!(
                "the padding mask must hold 1 (attend) or 0 (padding); element {p} (sample {}, \
                 token {}) is {}",
                p / a.seq.max(1),
                p % a.seq.max(1),
                m[p]
            ),
        }),
    }
}

/// `x` widened to float32 once per sample, so that the loops over every pair of tokens read
/// float32 instead of converting each 16-bit value again for every pair (the vectorised cast
/// of [`crate::cast`], F16C where the CPU has it).
fn widen<T: Element>(isa: Isa, x: &[T]) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    crate::cast::cast_chunk(isa, x, &mut out);
    out
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 4];
    let mut ca = a.chunks_exact(4);
    let mut cb = b.chunks_exact(4);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    (acc[0] + acc[2]) + (acc[1] + acc[3]) + tail
}

/// Checks the configuration, every `[batch, seq, heads, head_dim]` slice's length (`lens`),
/// the probabilities' and the mask, for `op`.
fn check_args(
    op: &'static str,
    a: &Attention,
    lens: &[(&'static str, usize)],
    probs: usize,
    mask: Option<&[f32]>,
) -> Result<()> {
    a.check(op)?;
    for &(what, len) in lens {
        check_len(op, what, len, a.len())?;
    }
    check_len(op, "probs", probs, a.probs_len())?;
    check_mask(op, a, mask)
}

/// Runs `run` on every sample's item of `work`, on the kernel threads when there is enough.
fn per_sample<W: Send>(
    a: &Attention,
    work: impl Iterator<Item = W> + Send,
    run: impl Fn(W) + Sync + Send,
) {
    if a.batch > 1 && a.len() * a.seq >= 1 << 15 && threads::num_threads() > 1 {
        threads::pool().install(|| work.par_bridge().for_each(run));
    } else {
        work.for_each(run);
    }
}

/// The forward pass: writes `out` (`q`'s layout) and the float32 probabilities (before dropout)
/// `probs`. `mask` is an optional key padding mask `[batch, seq]` of 1 and 0.
///
/// # Errors
/// Slices of the wrong length, a mask value other than 0 and 1, a non-finite scale, a dropout
/// rate outside `[0, 1)`.
pub fn attention<T: Element>(
    a: &Attention,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[f32]>,
    out: &mut [T],
    probs: &mut [f32],
) -> Result<()> {
    let lens = [
        ("q", q.len()),
        ("k", k.len()),
        ("v", v.len()),
        ("out", out.len()),
    ];
    check_args(OP, a, &lens, probs.len(), mask)?;
    if a.is_empty() {
        return Ok(());
    }
    let (s, h, d) = (a.seq, a.heads, a.head_dim);
    let sample = s * h * d;
    let isa = Isa::detect();
    let run = |(b, (out, probs)): (usize, (&mut [T], &mut [f32]))| {
        let row = |tok: usize, head: usize| -> usize { (tok * h + head) * d };
        let range = b * sample..(b + 1) * sample;
        let (qb, kb, vb) = (
            widen(isa, &q[range.clone()]),
            widen(isa, &k[range.clone()]),
            widen(isa, &v[range]),
        );
        let mut acc = vec![0.0f32; d];
        for head in 0..h {
            for i in 0..s {
                let p = &mut probs[(head * s + i) * s..(head * s + i + 1) * s];
                let qi = &qb[row(i, head)..][..d];
                let mut max = f32::NEG_INFINITY;
                let mut any = false;
                for (j, pj) in p.iter_mut().enumerate() {
                    if a.allowed(mask, b, i, j) {
                        let sc = dot(qi, &kb[row(j, head)..][..d]) * a.scale;
                        *pj = sc;
                        max = max.max(sc);
                        any = true;
                    }
                }
                if !any {
                    p.fill(0.0);
                } else {
                    // A NaN score makes `max` skip it; it then propagates through `exp`.
                    let mut sum = 0.0f32;
                    for (j, pj) in p.iter_mut().enumerate() {
                        if a.allowed(mask, b, i, j) {
                            *pj = (*pj - max).exp();
                            sum += *pj;
                        } else {
                            *pj = 0.0;
                        }
                    }
                    let inv = 1.0 / sum;
                    p.iter_mut().for_each(|pj| *pj *= inv);
                }
                acc.fill(0.0);
                for (j, &pj) in p.iter().enumerate() {
                    if !a.allowed(mask, b, i, j) {
                        continue;
                    }
                    let w = T::from_f32(pj * a.drop_factor(b, head, i, j)).to_f32();
                    let vj = &vb[row(j, head)..][..d];
                    for (o, x) in acc.iter_mut().zip(vj) {
                        *o += w * x;
                    }
                }
                let o = &mut out[row(i, head)..][..d];
                for (o, &x) in o.iter_mut().zip(&acc) {
                    *o = T::from_f32(x);
                }
            }
        }
    };
    let work = out
        .chunks_mut(sample)
        .zip(probs.chunks_mut(h * s * s))
        .enumerate();
    per_sample(a, work, run);
    Ok(())
}

/// The gradients of [`attention`]: given `dout` (the output gradient) and the forward's `probs`,
/// writes `dq`, `dk`, `dv` (`q`'s layout and dtype).
///
/// # Errors
/// As [`attention`].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Element>(
    a: &Attention,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: Option<&[f32]>,
    probs: &[f32],
    dout: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) -> Result<()> {
    let lens = [
        ("q", q.len()),
        ("k", k.len()),
        ("v", v.len()),
        ("dout", dout.len()),
        ("dq", dq.len()),
        ("dk", dk.len()),
        ("dv", dv.len()),
    ];
    check_args(OP_BACKWARD, a, &lens, probs.len(), mask)?;
    if a.is_empty() {
        return Ok(());
    }
    let (s, h, d) = (a.seq, a.heads, a.head_dim);
    let sample = s * h * d;
    let isa = Isa::detect();
    type Grads<'a, T> = ((&'a mut [T], &'a mut [T]), &'a mut [T]);
    let run = |(b, ((dq, dk), dv)): (usize, Grads<'_, T>)| {
        let row = |tok: usize, head: usize| -> usize { (tok * h + head) * d };
        let range = b * sample..(b + 1) * sample;
        let (qb, kb, vb, gb) = (
            widen(isa, &q[range.clone()]),
            widen(isa, &k[range.clone()]),
            widen(isa, &v[range.clone()]),
            widen(isa, &dout[range]),
        );
        let pb = &probs[b * h * s * s..(b + 1) * h * s * s];
        let (mut gq, mut gk, mut gv) = (
            vec![0.0f32; sample],
            vec![0.0f32; sample],
            vec![0.0f32; sample],
        );
        let mut ds = vec![0.0f32; s];
        for head in 0..h {
            for i in 0..s {
                let p = &pb[(head * s + i) * s..(head * s + i + 1) * s];
                let go = &gb[row(i, head)..][..d];
                // dP, then its probability-weighted mean.
                let mut weighted = 0.0f32;
                for (j, dsj) in ds.iter_mut().enumerate() {
                    *dsj = 0.0;
                    if !a.allowed(mask, b, i, j) {
                        continue;
                    }
                    let drop = a.drop_factor(b, head, i, j);
                    // dV += P̃ᵀ dO, with P̃ rounded as the forward used it.
                    let w = T::from_f32(p[j] * drop).to_f32();
                    let gvj = &mut gv[row(j, head)..][..d];
                    for (g, x) in gvj.iter_mut().zip(go) {
                        *g += w * x;
                    }
                    let dp = dot(go, &vb[row(j, head)..][..d]) * drop;
                    *dsj = dp;
                    weighted += p[j] * dp;
                }
                let qi = &qb[row(i, head)..][..d];
                for (j, dsj) in ds.iter_mut().enumerate() {
                    if !a.allowed(mask, b, i, j) {
                        continue;
                    }
                    let g = p[j] * (*dsj - weighted) * a.scale;
                    if g == 0.0 {
                        continue;
                    }
                    let kj = &kb[row(j, head)..][..d];
                    let gqi = &mut gq[row(i, head)..][..d];
                    for (o, x) in gqi.iter_mut().zip(kj) {
                        *o += g * x;
                    }
                    let gkj = &mut gk[row(j, head)..][..d];
                    for (o, x) in gkj.iter_mut().zip(qi) {
                        *o += g * x;
                    }
                }
            }
        }
        for (o, x) in dq.iter_mut().zip(&gq) {
            *o = T::from_f32(*x);
        }
        for (o, x) in dk.iter_mut().zip(&gk) {
            *o = T::from_f32(*x);
        }
        for (o, x) in dv.iter_mut().zip(&gv) {
            *o = T::from_f32(*x);
        }
    };
    let work = dq
        .chunks_mut(sample)
        .zip(dk.chunks_mut(sample))
        .zip(dv.chunks_mut(sample))
        .enumerate();
    per_sample(a, work, run);
    Ok(())
}
