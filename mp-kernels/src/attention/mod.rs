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
//! How it is computed ([`head`]): per sample, 16-bit q, k, v (and dout) are widened to float32
//! once into a reused thread-local scratch buffer (float32 ones are read in place, and float32
//! results written in place); per head, the six products (`q·kᵀ`, `P̃·v`,
//! `dO·vᵀ`, `P̃ᵀ·dO`, `dS·k`, `dSᵀ·q`) run as register-tiled float32 FMA loops over 16 lanes,
//! with the masked softmax between them, compiled for AVX-512, for AVX2 + FMA and portably,
//! chosen at run time. At these sizes (tens of tokens, heads of 16) every operand of a head
//! fits in L1 and the products run straight from it, with no packing. Without a key mask and
//! with heads a multiple of 16 wide, a head's rows are read and its results written in place in
//! the `[seq, heads, head_dim]` sample; otherwise they go through per-head copies that are zero
//! at masked positions. Where a product is 32 or more lanes wide, each coefficient feeds two
//! chunks of 16; the softmax runs over all of a head's rows pass by pass.
//!
//! Determinism: the samples are split statically over [`crate::threads::pool`] in one parallel
//! region per call; every output element is one fused multiply-add chain in ascending index
//! order and every row reduction has a fixed tree, so results are bit-identical whatever the
//! thread count, and the same on every instruction set (the tests check both).
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

use crate::error::{Error, Result, check_len};
use crate::isa::Isa;
use crate::threads;

mod head;

use head::Geometry;

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

/// Samples per task: every sample in one task on the calling thread when the call is small or
/// there is one kernel thread, else about four tasks per thread (so that a thread slowed by
/// other work does not hold up the rest; the split never changes a result).
fn samples_per_task(a: &Attention) -> usize {
    let threads = threads::num_threads();
    if a.batch > 1 && a.len() * a.seq >= 1 << 15 && threads > 1 {
        a.batch.div_ceil(4 * threads)
    } else {
        a.batch
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
    attention_on(Isa::detect(), a, (q, k, v), mask, out, probs)
}

/// [`attention`] on instruction set `isa` (one this CPU supports).
fn attention_on<T: Element>(
    isa: Isa,
    a: &Attention,
    (q, k, v): (&[T], &[T], &[T]),
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
    let g = Geometry::new(a);
    let per = samples_per_task(a);
    let task = |(t, (out, probs)): (usize, (&mut [T], &mut [f32]))| {
        threads::with_scratch(g.forward_scratch(), |scratch| {
            let b0 = t * per;
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported by this CPU (`Isa::detect`, or checked by the test
                // that forces it).
                Isa::Avx512 | Isa::Avx512Bf16 => unsafe {
                    head::forward_avx512(isa, &g, b0, (q, k, v), mask, out, probs, scratch)
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Isa::Avx2 => unsafe {
                    head::forward_avx2(isa, &g, b0, (q, k, v), mask, out, probs, scratch)
                },
                _ => head::forward_samples(isa, &g, b0, (q, k, v), mask, out, probs, scratch),
            }
        });
    };
    if per >= a.batch {
        task((0, (out, probs)));
    } else {
        threads::pool().chunks_mut2(
            (out, per * g.sample()),
            (probs, per * g.sample_probs()),
            |i, o, p| task((i, (o, p))),
        );
    }
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
    attention_backward_on(Isa::detect(), a, (q, k, v, dout), mask, probs, (dq, dk, dv))
}

/// [`attention_backward`] on instruction set `isa` (one this CPU supports).
fn attention_backward_on<T: Element>(
    isa: Isa,
    a: &Attention,
    (q, k, v, dout): (&[T], &[T], &[T], &[T]),
    mask: Option<&[f32]>,
    probs: &[f32],
    (dq, dk, dv): (&mut [T], &mut [T], &mut [T]),
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
    let g = Geometry::new(a);
    let per = samples_per_task(a);
    let inputs = (q, k, v, dout);
    type Grads<'a, T> = ((&'a mut [T], &'a mut [T]), &'a mut [T]);
    let task = |(t, ((dq, dk), dv)): (usize, Grads<'_, T>)| {
        threads::with_scratch(g.backward_scratch(), |scratch| {
            let (b0, grads) = (t * per, (dq, dk, dv));
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is supported by this CPU (`Isa::detect`, or checked by the test
                // that forces it).
                Isa::Avx512 | Isa::Avx512Bf16 => unsafe {
                    head::backward_avx512(isa, &g, b0, inputs, mask, probs, grads, scratch)
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Isa::Avx2 => unsafe {
                    head::backward_avx2(isa, &g, b0, inputs, mask, probs, grads, scratch)
                },
                _ => head::backward_samples(isa, &g, b0, inputs, mask, probs, grads, scratch),
            }
        });
    };
    if per >= a.batch {
        task((0, ((dq, dk), dv)));
    } else {
        let chunk = per * g.sample();
        threads::pool().chunks_mut3((dq, chunk), (dk, chunk), (dv, chunk), |i, dq, dk, dv| {
            task((i, ((dq, dk), dv)))
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};
    use mp_core::Rng;

    use super::*;

    /// Every build the CPU supports (the portable one included) gives the same bits: each sum
    /// is one fused chain in a fixed order whatever the vector width.
    fn builds_agree<T: Element>() {
        let mut rng = Rng::new(11);
        for (i, a) in [
            Attention::new(3, 17, 2, 16).with_dropout(0.25, 9),
            Attention::new(2, 33, 3, 24).causal(),
            Attention::new(2, 7, 1, 5).causal().with_dropout(0.5, 1),
        ]
        .iter()
        .enumerate()
        {
            let n = a.len();
            let mut x = || -> Vec<T> {
                rng.uniform_vec(n, -2.0, 2.0)
                    .into_iter()
                    .map(T::from_f32)
                    .collect()
            };
            let (q, k, v, dout) = (x(), x(), x(), x());
            let mask: Vec<f32> = (0..a.batch * a.seq)
                .map(|t| f32::from((t + i) % 5 != 1))
                .collect();
            // With the mask, and without it (heads of 16 are then read and written in place).
            for mask in [Some(&mask[..]), None] {
                let run = |isa: Isa| {
                    let zero = T::from_f32(0.0);
                    let (mut out, mut probs) = (vec![zero; n], vec![0.0f32; a.probs_len()]);
                    attention_on(isa, a, (&q, &k, &v), mask, &mut out, &mut probs).unwrap();
                    let (mut dq, mut dk, mut dv) = (vec![zero; n], vec![zero; n], vec![zero; n]);
                    let grads = (&mut dq[..], &mut dk[..], &mut dv[..]);
                    let inputs = (&q[..], &k[..], &v[..], &dout[..]);
                    attention_backward_on(isa, a, inputs, mask, &probs, grads).unwrap();
                    let bits = |x: &[T]| x.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>();
                    let probs = probs.iter().map(|p| p.to_bits()).collect();
                    [bits(&out), probs, bits(&dq), bits(&dk), bits(&dv)].concat()
                };
                let want = run(Isa::Scalar);
                for isa in Isa::supported() {
                    let masked = mask.is_some();
                    assert!(
                        run(isa) == want,
                        "{a:?} {:?} mask {masked}: {isa:?} differs",
                        T::DTYPE
                    );
                }
            }
        }
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        builds_agree::<f32>();
        builds_agree::<bf16>();
        builds_agree::<f16>();
    }
}
