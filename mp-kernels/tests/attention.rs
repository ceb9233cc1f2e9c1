//! Attention and the sequence kernels against float64 references, per dtype, on shapes that are
//! not multiples of any block: forward and every gradient (dq, dk, dv; table, token and input
//! gradients), with padding masks (a fully masked sample included), the causal mask and
//! dropout, and the bounds stated and asserted.

use half::{bf16, f16};
use mp_core::rng::test_seed;
use mp_core::{Element, Rng};
use mp_kernels::attention::{Attention, attention, attention_backward};
use mp_kernels::dropout::keep;
use mp_kernels::sequence::{
    Pool, add_table, add_table_backward, embedding, embedding_backward, pool, pool_backward,
    prepend_token, prepend_token_backward,
};
use mp_kernels::threads;

fn values<T: Element>(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> (Vec<T>, Vec<f64>) {
    let t: Vec<T> = rng
        .uniform_vec(n, lo, hi)
        .into_iter()
        .map(T::from_f32)
        .collect();
    let f = t.iter().map(|v| f64::from(v.to_f32())).collect();
    (t, f)
}

fn widen<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|v| f64::from(v.to_f32())).collect()
}

/// `max |got - want| <= bound * max(max |want|, floor)`; returns that relative error.
fn close(what: &str, got: &[f64], want: &[f64], bound: f64, floor: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(floor, |m, v| m.max(v.abs()));
    let (worst, at) = got
        .iter()
        .zip(want)
        .enumerate()
        .fold((0.0f64, 0), |(m, a), (i, (g, w))| {
            let e = (g - w).abs();
            if e > m || e.is_nan() { (e, i) } else { (m, a) }
        });
    assert!(
        worst <= bound * scale,
        "{what}: max error {worst:e} at {at} (got {}, want {}) > {bound:e} x {scale:e}",
        got[at],
        want[at]
    );
    worst / scale
}

struct Grads {
    out: Vec<f64>,
    probs: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

/// Attention in float64, straight from the definition, with the same mask and dropout draws.
fn reference(
    a: &Attention,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    mask: Option<&[f32]>,
    dout: &[f64],
) -> Grads {
    let (b_, s, h, d) = (a.batch, a.seq, a.heads, a.head_dim);
    let idx = |b: usize, t: usize, hh: usize, c: usize| ((b * s + t) * h + hh) * d + c;
    let n = a.len();
    let mut g = Grads {
        out: vec![0.0; n],
        probs: vec![0.0; a.probs_len()],
        dq: vec![0.0; n],
        dk: vec![0.0; n],
        dv: vec![0.0; n],
    };
    let scale = f64::from(a.scale);
    for b in 0..b_ {
        for hh in 0..h {
            for i in 0..s {
                let ok =
                    |j: usize| !(a.causal && j > i) && mask.is_none_or(|m| m[b * s + j] != 0.0);
                let drop = |j: usize| match a.dropout {
                    None => 1.0,
                    Some((rate, seed)) => {
                        let index = (((b * h + hh) * s + i) * s + j) as u64;
                        if keep(seed, index, rate) {
                            1.0 / (1.0 - f64::from(rate))
                        } else {
                            0.0
                        }
                    }
                };
                let scores: Vec<f64> = (0..s)
                    .map(|j| {
                        (0..d)
                            .map(|c| q[idx(b, i, hh, c)] * k[idx(b, j, hh, c)])
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = (0..s)
                    .filter(|&j| ok(j))
                    .map(|j| scores[j])
                    .fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = (0..s)
                    .map(|j| if ok(j) { (scores[j] - max).exp() } else { 0.0 })
                    .collect();
                let sum: f64 = e.iter().sum();
                let p: Vec<f64> = e
                    .iter()
                    .map(|x| if sum > 0.0 { x / sum } else { 0.0 })
                    .collect();
                for j in 0..s {
                    g.probs[((b * h + hh) * s + i) * s + j] = p[j];
                    for c in 0..d {
                        g.out[idx(b, i, hh, c)] += p[j] * drop(j) * v[idx(b, j, hh, c)];
                        g.dv[idx(b, j, hh, c)] += p[j] * drop(j) * dout[idx(b, i, hh, c)];
                    }
                }
                let dp: Vec<f64> = (0..s)
                    .map(|j| {
                        (0..d)
                            .map(|c| dout[idx(b, i, hh, c)] * v[idx(b, j, hh, c)])
                            .sum::<f64>()
                            * drop(j)
                    })
                    .collect();
                let w: f64 = (0..s).map(|j| p[j] * dp[j]).sum();
                for j in 0..s {
                    let ds = p[j] * (dp[j] - w) * scale;
                    for c in 0..d {
                        g.dq[idx(b, i, hh, c)] += ds * k[idx(b, j, hh, c)];
                        g.dk[idx(b, j, hh, c)] += ds * q[idx(b, i, hh, c)];
                    }
                }
            }
        }
    }
    g
}

/// Shapes `(batch, seq, heads, head_dim)` that are not multiples of any tile or lane count
/// (and the examples' ViT shape), each run with every combination of causal mask, padding mask
/// and dropout.
const SHAPES: [(usize, usize, usize, usize); 9] = [
    (1, 1, 1, 1),
    (2, 7, 3, 5),
    (3, 50, 2, 16),
    (2, 65, 4, 24),
    (5, 7, 1, 16),
    (1, 50, 4, 1),
    (4, 65, 1, 5),
    (3, 17, 4, 16),
    (2, 1, 2, 24),
];

/// A padding mask `[batch, seq]`: the last sample fully masked (when there are several), the
/// first token of sample 0 masked (so that under the causal mask its first queries have no
/// key), the rest random.
fn padding(rng: &mut Rng, batch: usize, seq: usize) -> Vec<f32> {
    (0..batch * seq)
        .map(|i| {
            if (batch > 1 && i / seq == batch - 1) || (i == 0 && seq > 1) {
                0.0
            } else {
                f32::from(rng.below(3) != 0)
            }
        })
        .collect()
}

/// `bound` per dtype: float32 rounds the float32 sums; the 16-bit dtypes round the
/// probabilities and each output once. Returns the largest relative error seen.
fn attention_matches<T: Element>(bound: f64) -> f64 {
    let mut rng = Rng::new(test_seed(&format!("attention {:?}", T::DTYPE)));
    let mut worst = 0.0f64;
    for (shape, &(batch, seq, heads, head_dim)) in SHAPES.iter().enumerate() {
        for options in 0..8 {
            let mut a = Attention::new(batch, seq, heads, head_dim).with_causal(options & 1 != 0);
            if options & 4 != 0 {
                a = a.with_dropout(0.3, 7 + shape as u64);
            }
            let mask = (options & 2 != 0).then(|| padding(&mut rng, batch, seq));
            worst = worst.max(attention_case::<T>(&mut rng, &a, mask.as_deref(), bound));
        }
    }
    worst
}

/// One case of [`attention_matches`]: forward and every gradient against float64.
fn attention_case<T: Element>(
    rng: &mut Rng,
    a: &Attention,
    mask: Option<&[f32]>,
    bound: f64,
) -> f64 {
    let (heads, seq) = (a.heads, a.seq);
    let n = a.len();
    let (q, qf) = values::<T>(rng, n, -2.0, 2.0);
    let (k, kf) = values::<T>(rng, n, -2.0, 2.0);
    let (v, vf) = values::<T>(rng, n, -1.0, 1.0);
    let (dout, df) = values::<T>(rng, n, -1.0, 1.0);
    let want = reference(a, &qf, &kf, &vf, mask, &df);
    let zero = T::from_f32(0.0);
    let (mut out, mut probs) = (vec![zero; n], vec![0.0f32; a.probs_len()]);
    attention(a, &q, &k, &v, mask, &mut out, &mut probs).unwrap();
    let ctx = format!(
        "{} {a:?} mask {}",
        std::any::type_name::<T>(),
        mask.is_some()
    );
    close(
        &format!("{ctx} probs"),
        &widen(&probs),
        &want.probs,
        1e-5,
        1.0,
    );
    let mut worst = close(&format!("{ctx} out"), &widen(&out), &want.out, bound, 1e-3);
    let (mut dq, mut dk, mut dv) = (vec![zero; n], vec![zero; n], vec![zero; n]);
    attention_backward(
        a, &q, &k, &v, mask, &probs, &dout, &mut dq, &mut dk, &mut dv,
    )
    .unwrap();
    for (what, got, want) in [
        ("dq", &dq, &want.dq),
        ("dk", &dk, &want.dk),
        ("dv", &dv, &want.dv),
    ] {
        worst = worst.max(close(
            &format!("{ctx} {what}"),
            &widen(got),
            want,
            bound,
            1e-3,
        ));
    }
    // Masked keys have exactly zero probability; fully masked queries are all zero.
    if let Some(m) = mask {
        for (pi, p) in probs.iter().enumerate() {
            let (b, j) = (pi / (heads * seq * seq), pi % seq);
            if m[b * seq + j] == 0.0 {
                assert_eq!(p.to_bits(), 0, "{ctx}: masked probability {pi} is {p}");
            }
        }
    }
    if a.causal {
        for (pi, p) in probs.iter().enumerate() {
            let (i, j) = ((pi / seq) % seq, pi % seq);
            if j > i {
                assert_eq!(p.to_bits(), 0, "{ctx}: future probability {pi} is {p}");
            }
        }
    }
    assert!(
        out.iter().all(|x| x.to_f32().is_finite()),
        "{ctx}: non-finite output"
    );
    worst
}

#[test]
fn attention_matches_float64_per_dtype() {
    let f32_err = attention_matches::<f32>(2e-5);
    let bf16_err = attention_matches::<bf16>(2e-2);
    let f16_err = attention_matches::<f16>(3e-3);
    println!("max relative error: f32 {f32_err:.2e}, bf16 {bf16_err:.2e}, f16 {f16_err:.2e}");
}

/// Forward and backward outputs of one call on `inputs` (`q`, `k`, `v`, `dout`), as bits.
fn run_bits<T: Element>(a: &Attention, mask: Option<&[f32]>, inputs: &[Vec<T>; 4]) -> Vec<u32> {
    let [q, k, v, dout] = inputs;
    let n = a.len();
    let zero = T::from_f32(0.0);
    let (mut out, mut probs) = (vec![zero; n], vec![0.0f32; a.probs_len()]);
    attention(a, q, k, v, mask, &mut out, &mut probs).unwrap();
    let (mut dq, mut dk, mut dv) = (vec![zero; n], vec![zero; n], vec![zero; n]);
    attention_backward(a, q, k, v, mask, &probs, dout, &mut dq, &mut dk, &mut dv).unwrap();
    let bits = |x: &[T]| x.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>();
    [
        bits(&out),
        probs.iter().map(|p| p.to_bits()).collect(),
        bits(&dq),
        bits(&dk),
        bits(&dv),
    ]
    .concat()
}

/// Large enough to split over the kernel threads: two runs give the same bits, and so does a
/// run on the calling thread alone (the samples are independent and each sum has a fixed order,
/// so the thread count cannot matter).
fn attention_is_deterministic<T: Element>() {
    let mut rng = Rng::new(test_seed(&format!("attention determinism {:?}", T::DTYPE)));
    for a in [
        Attention::new(9, 33, 2, 16).with_dropout(0.2, 3),
        Attention::new(7, 50, 3, 24).causal(),
    ] {
        let mask = padding(&mut rng, a.batch, a.seq);
        let inputs = [(); 4].map(|_| values::<T>(&mut rng, a.len(), -2.0, 2.0).0);
        let what = format!("{} {a:?}", std::any::type_name::<T>());
        // A mask that allows every key gives the bits of no mask (which reads and writes heads
        // of 16 in place instead of through per-head copies).
        let ones = vec![1.0f32; a.batch * a.seq];
        assert!(
            run_bits(&a, Some(&ones), &inputs) == run_bits(&a, None, &inputs),
            "{what}: an all-ones mask differs from none"
        );
        for mask in [Some(&mask[..]), None] {
            let what = format!("{what} mask {}", mask.is_some());
            let first = run_bits(&a, mask, &inputs);
            assert!(
                first == run_bits(&a, mask, &inputs),
                "{what}: rerun differs"
            );
            let serial = threads::serial(|| run_bits(&a, mask, &inputs));
            assert!(first == serial, "{what}: one thread differs");
        }
    }
}

#[test]
fn attention_is_bit_identical_whatever_the_thread_count() {
    attention_is_deterministic::<f32>();
    attention_is_deterministic::<bf16>();
    attention_is_deterministic::<f16>();
}

/// Masks select: a non-finite key or value at a padded position, or at a later position under
/// the causal mask, reaches no output and no gradient of the positions that do not see it.
#[test]
fn masked_positions_do_not_leak_non_finite_values() {
    let (batch, seq, heads, d) = (2, 9, 2, 5);
    let mut rng = Rng::new(test_seed("attention masked nan"));
    let n = batch * seq * heads * d;
    let q = rng.uniform_vec(n, -1.0, 1.0);
    let dout = rng.uniform_vec(n, -1.0, 1.0);
    let at = |b: usize, t: usize| (b * seq + t) * heads * d..(b * seq + t + 1) * heads * d;
    // Token 4 of each sample is padding and holds NaN in k and v; the last token holds inf.
    let mut mask = vec![1.0f32; batch * seq];
    let (mut k, mut v) = (rng.uniform_vec(n, -1.0, 1.0), rng.uniform_vec(n, -1.0, 1.0));
    for b in 0..batch {
        mask[b * seq + 4] = 0.0;
        k[at(b, 4)].fill(f32::NAN);
        v[at(b, 4)].fill(f32::NAN);
    }
    for causal in [false, true] {
        let a = Attention::new(batch, seq, heads, d).with_causal(causal);
        let (mut k, mut v) = (k.clone(), v.clone());
        if causal {
            for b in 0..batch {
                k[at(b, seq - 1)].fill(f32::INFINITY);
                v[at(b, seq - 1)].fill(f32::INFINITY);
            }
        }
        let (mut out, mut probs) = (vec![0.0f32; n], vec![0.0f32; a.probs_len()]);
        attention(&a, &q, &k, &v, Some(&mask), &mut out, &mut probs).unwrap();
        let (mut dq, mut dk, mut dv) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
        attention_backward(
            &a,
            &q,
            &k,
            &v,
            Some(&mask),
            &probs,
            &dout,
            &mut dq,
            &mut dk,
            &mut dv,
        )
        .unwrap();
        for b in 0..batch {
            // Under the causal mask the last query sees the inf key: its row is NaN, and so
            // are the key gradients it reaches; the earlier queries must stay finite.
            let rows = if causal { seq - 1 } else { seq };
            for t in 0..rows {
                let what = format!("causal {causal} sample {b} token {t}");
                assert!(out[at(b, t)].iter().all(|x| x.is_finite()), "{what}: out");
                assert!(dq[at(b, t)].iter().all(|x| x.is_finite()), "{what}: dq");
                if t != 4 && !causal {
                    assert!(dk[at(b, t)].iter().all(|x| x.is_finite()), "{what}: dk");
                    assert!(dv[at(b, t)].iter().all(|x| x.is_finite()), "{what}: dv");
                }
            }
            assert!(dk[at(b, 4)].iter().chain(&dv[at(b, 4)]).all(|&x| x == 0.0));
        }
    }
}

/// Scores far beyond float16's range (|q · k| near 4e4 × scale) and all but one key masked: the
/// float16 probabilities are exactly float32's (one 1, the rest exact zeros), with no NaN.
#[test]
fn float16_attention_with_all_but_one_key_masked() {
    let a = Attention::new(2, 6, 2, 8);
    let n = a.len();
    let mut rng = Rng::new(test_seed("attention f16 masked"));
    let big: Vec<f32> = rng.uniform_vec(n, 60.0, 70.0);
    let mask: Vec<f32> = (0..12).map(|i| f32::from(i % 6 == 3)).collect();
    let q16: Vec<f16> = big.iter().map(|&x| f16::from_f32(x)).collect();
    let q32: Vec<f32> = q16.iter().map(|x| x.to_f32()).collect();
    let (mut o16, mut p16) = (vec![f16::ZERO; n], vec![0.0f32; a.probs_len()]);
    let (mut o32, mut p32) = (vec![0.0f32; n], vec![0.0f32; a.probs_len()]);
    attention(&a, &q16, &q16, &q16, Some(&mask), &mut o16, &mut p16).unwrap();
    attention(&a, &q32, &q32, &q32, Some(&mask), &mut o32, &mut p32).unwrap();
    assert_eq!(p16, p32);
    for (i, p) in p16.iter().enumerate() {
        assert_eq!(*p, if i % 6 == 3 { 1.0 } else { 0.0 }, "probability {i}");
    }
    close("f16 output", &widen(&o16), &widen(&o32), 1e-3, 1.0);
    assert!(o16.iter().all(|x| x.is_finite()));
    let (mut dq, mut dk, mut dv) = (vec![f16::ZERO; n], vec![f16::ZERO; n], vec![f16::ZERO; n]);
    attention_backward(
        &a,
        &q16,
        &q16,
        &q16,
        Some(&mask),
        &p16,
        &q16,
        &mut dq,
        &mut dk,
        &mut dv,
    )
    .unwrap();
    assert!(dq.iter().chain(&dk).chain(&dv).all(|x| x.is_finite()));
    // One key per query: the probabilities do not depend on q or k.
    assert!(dq.iter().chain(&dk).all(|x| x.to_f32() == 0.0));
}

#[test]
fn attention_refuses_bad_arguments_and_propagates_nan() {
    let a = Attention::new(1, 3, 1, 2);
    let x = [0.5f32; 6];
    let (mut out, mut probs) = ([0.0f32; 6], [0.0f32; 9]);
    let err = attention(&a, &x, &x, &x, Some(&[1.0, 0.5, 1.0]), &mut out, &mut probs).unwrap_err();
    assert!(
        err.to_string().contains("element 1") && err.to_string().contains("0.5"),
        "{err}"
    );
    let err = attention(&a, &x[..4], &x, &x, None, &mut out, &mut probs).unwrap_err();
    assert!(err.to_string().contains("attention"), "{err}");
    let err = attention(
        &a.with_dropout(1.5, 0),
        &x,
        &x,
        &x,
        None,
        &mut out,
        &mut probs,
    )
    .unwrap_err();
    assert!(err.to_string().contains("dropout"), "{err}");
    assert_eq!(out, [0.0; 6], "nothing written on error");
    let mut q = x;
    q[0] = f32::NAN;
    attention(&a, &q, &x, &x, None, &mut out, &mut probs).unwrap();
    assert!(out[..2].iter().all(|v| v.is_nan()), "{out:?}");
    assert!(out[2..].iter().all(|v| v.is_finite()), "{out:?}");
}

fn sequence_kernels_match<T: Element>(bound: f64) {
    let mut rng = Rng::new(test_seed(&format!("sequence {:?}", T::DTYPE)));
    let (batch, seq, dim, vocab) = (
        1 + rng.below(5) as usize,
        1 + rng.below(9) as usize,
        1 + rng.below(13) as usize,
        1 + rng.below(40) as usize,
    );
    let what = std::any::type_name::<T>();
    // Embedding: every row is the table's, rounded once; the gradient sums rows per id.
    let ids: Vec<f32> = (0..batch * seq)
        .map(|_| rng.below(vocab as u64) as f32)
        .collect();
    let (table, tf) = values::<f32>(&mut rng, vocab * dim, -0.05, 0.05);
    let mut y = vec![T::from_f32(0.0); batch * seq * dim];
    embedding(&ids, &table, vocab, dim, &mut y).unwrap();
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&i| tf[i as usize * dim..][..dim].to_vec())
        .collect();
    close(&format!("{what} embedding"), &widen(&y), &want, bound, 0.0);
    let (dy, dyf) = values::<T>(&mut rng, batch * seq * dim, -1.0, 1.0);
    let mut grad = vec![0.0f32; vocab * dim];
    embedding_backward(&ids, &dy, vocab, dim, &mut grad).unwrap();
    let mut want = vec![0.0f64; vocab * dim];
    for (r, &i) in ids.iter().enumerate() {
        for c in 0..dim {
            want[i as usize * dim + c] += dyf[r * dim + c];
        }
    }
    close(
        &format!("{what} embedding grad"),
        &widen(&grad),
        &want,
        1e-6,
        1.0,
    );
    // A table added per sample, and its gradient.
    let (x, xf) = values::<T>(&mut rng, batch * seq * dim, -1.0, 1.0);
    let (pos, pf) = values::<f32>(&mut rng, seq * dim, -1.0, 1.0);
    let mut y = vec![T::from_f32(0.0); x.len()];
    add_table(&x, &pos, &mut y).unwrap();
    let want: Vec<f64> = xf
        .iter()
        .enumerate()
        .map(|(i, v)| v + pf[i % (seq * dim)])
        .collect();
    close(&format!("{what} add_table"), &widen(&y), &want, bound, 1.0);
    let mut grad = vec![0.0f32; seq * dim];
    add_table_backward(&dy, &mut grad).unwrap();
    let mut want = vec![0.0f64; seq * dim];
    dyf.iter()
        .enumerate()
        .for_each(|(i, v)| want[i % (seq * dim)] += v);
    close(
        &format!("{what} add_table grad"),
        &widen(&grad),
        &want,
        1e-6,
        1.0,
    );
    // A class token first, and its gradient.
    let (token, tokf) = values::<f32>(&mut rng, dim, -1.0, 1.0);
    let mut y = vec![T::from_f32(0.0); batch * (seq + 1) * dim];
    prepend_token(&x, &token, batch, &mut y).unwrap();
    let mut want = vec![];
    for b in 0..batch {
        want.extend_from_slice(&tokf);
        want.extend_from_slice(&xf[b * seq * dim..(b + 1) * seq * dim]);
    }
    close(
        &format!("{what} prepend_token"),
        &widen(&y),
        &want,
        bound,
        1.0,
    );
    let (dy1, dy1f) = values::<T>(&mut rng, batch * (seq + 1) * dim, -1.0, 1.0);
    let mut grad = vec![0.0f32; dim];
    let mut dx = vec![T::from_f32(0.0); batch * seq * dim];
    prepend_token_backward(&dy1, batch, &mut grad, &mut dx).unwrap();
    let mut want_g = vec![0.0f64; dim];
    let mut want_dx = vec![];
    for b in 0..batch {
        let s = &dy1f[b * (seq + 1) * dim..(b + 1) * (seq + 1) * dim];
        want_g.iter_mut().zip(&s[..dim]).for_each(|(g, v)| *g += v);
        want_dx.extend_from_slice(&s[dim..]);
    }
    close(
        &format!("{what} token grad"),
        &widen(&grad),
        &want_g,
        1e-6,
        1.0,
    );
    assert_eq!(
        widen(&dx),
        want_dx,
        "{what}: the input gradient is passed through"
    );
    // Pooling: first token and mean, and their gradients.
    for how in [Pool::First, Pool::Mean] {
        let mut y = vec![T::from_f32(0.0); batch * dim];
        pool(how, &x, batch, seq, dim, &mut y).unwrap();
        let (g, gf) = values::<T>(&mut rng, batch * dim, -1.0, 1.0);
        let mut dx = vec![T::from_f32(0.0); batch * seq * dim];
        pool_backward(how, &g, batch, seq, dim, &mut dx).unwrap();
        let mut want = vec![0.0f64; batch * dim];
        let mut want_dx = vec![0.0f64; batch * seq * dim];
        for b in 0..batch {
            for c in 0..dim {
                for t in 0..seq {
                    let at = (b * seq + t) * dim + c;
                    match how {
                        Pool::First if t == 0 => {
                            want[b * dim + c] = xf[at];
                            want_dx[at] = gf[b * dim + c];
                        }
                        Pool::First => {}
                        Pool::Mean => {
                            want[b * dim + c] += xf[at] / seq as f64;
                            want_dx[at] = gf[b * dim + c] / seq as f64;
                        }
                    }
                }
            }
        }
        close(
            &format!("{what} {how:?} pool"),
            &widen(&y),
            &want,
            bound,
            1.0,
        );
        close(
            &format!("{what} {how:?} pool grad"),
            &widen(&dx),
            &want_dx,
            bound,
            1.0,
        );
    }
}

#[test]
fn sequence_kernels_match_float64_per_dtype() {
    sequence_kernels_match::<f32>(1e-6);
    sequence_kernels_match::<bf16>(8e-3);
    sequence_kernels_match::<f16>(1e-3);
}

#[test]
fn embedding_names_a_bad_token_id() {
    let table = [0.0f32; 6];
    let mut y = [0.0f32; 4];
    for (bad, shown) in [(3.0, "3"), (-1.0, "-1"), (1.5, "1.5"), (f32::NAN, "NaN")] {
        let err = embedding(&[0.0, bad], &table, 3, 2, &mut y)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("token id {shown} at position 1")),
            "{err}"
        );
        assert!(err.contains("vocabulary size is 3"), "{err}");
    }
    assert_eq!(y, [0.0; 4], "nothing written on error");
}

/// Timings on the examples' shapes: `MnistVit` (batch 128, 17 tokens, 4 heads of 16) and
/// `reverse_lm` (batch 64, 32 tokens, 4 heads of 16, causal), forward and backward per dtype,
/// with GFLOP/s counting `2·seq²·head_dim` per (sample, head) and product (2 forward, 4
/// backward). Run it with `MP_NUM_THREADS` set to compare thread counts:
/// `cargo test -p mp-kernels --test attention -- --ignored --nocapture attention_timings`.
#[test]
#[ignore = "timings, not a check"]
fn attention_timings() {
    fn time<T: Element>(name: &str, a: Attention) {
        let n = a.len();
        let mut rng = Rng::new(test_seed("attention timings"));
        let (q, _) = values::<T>(&mut rng, n, -2.0, 2.0);
        let (k, _) = values::<T>(&mut rng, n, -2.0, 2.0);
        let (v, _) = values::<T>(&mut rng, n, -1.0, 1.0);
        let (dout, _) = values::<T>(&mut rng, n, -1.0, 1.0);
        let zero = T::from_f32(0.0);
        let (mut out, mut probs) = (vec![zero; n], vec![0.0f32; a.probs_len()]);
        let (mut dq, mut dk, mut dv) = (vec![zero; n], vec![zero; n], vec![zero; n]);
        let best = |f: &mut dyn FnMut()| {
            f();
            let mut times: Vec<f64> = (0..30)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            times[times.len() / 2]
        };
        let fwd = best(&mut || {
            attention(&a, &q, &k, &v, None, &mut out, &mut probs).unwrap();
        });
        let bwd = best(&mut || {
            attention_backward(
                &a, &q, &k, &v, None, &probs, &dout, &mut dq, &mut dk, &mut dv,
            )
            .unwrap();
        });
        let product = 2.0 * (a.batch * a.heads * a.seq * a.seq * a.head_dim) as f64;
        println!(
            "{name:>10} {:>4}: forward {:7.3} ms {:6.1} GFLOP/s, backward {:7.3} ms {:6.1} GFLOP/s",
            format!("{:?}", T::DTYPE),
            fwd * 1e3,
            2.0 * product / fwd / 1e9,
            bwd * 1e3,
            4.0 * product / bwd / 1e9,
        );
    }
    println!("threads: {}", mp_kernels::threads::num_threads());
    let vit = Attention::new(128, 17, 4, 16);
    let lm = Attention::new(64, 32, 4, 16).causal();
    for (name, a) in [("mnist_vit", vit), ("reverse_lm", lm)] {
        time::<f32>(name, a);
        time::<bf16>(name, a);
        time::<f16>(name, a);
    }
}
