//! `MultiHeadAttention`, `Embedding`, `PositionEmbedding`, `ClassToken` and `SequencePooling`
//! under every policy, against float64: forward and every gradient (the input's and each
//! variable's), with a padding mask (a fully masked sample included) and the causal mask; the
//! float16 attention with all but one key masked; bad inputs; and a token model trained through
//! `fit` from float32 token ids.
//!
//! The gradient references are central differences of a float64 forward written from the
//! definition, on the layer's own weights and on inputs already rounded to the compute dtype.
//! Bounds, against the largest magnitude of each result: float32 1e-4, float16 1e-2, bfloat16
//! 6e-2 (the projections, scores, probabilities and outputs are each rounded once to the
//! compute dtype, unit roundoff 2^-11 and 2^-8).

use mp_core::{DType, DTypeKind, Element, F32, Float32, MixedBFloat16, MixedFloat16};
use mp_core::{PolicyKind, Rng, Tensor, Variable};
use mp_layers::{
    ClassToken, Dense, Embedding, FitOptions, Layer, Loss, MultiHeadAttention, PositionEmbedding,
    SequencePooling, Softmax, SparseCategoricalCrossentropy, Trainer, Verbose, model,
};
use mp_optim::Adam;
use ndarray::{Array1, Array2};

type Compute<P> = <P as PolicyKind>::Compute;

fn bound(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        DType::BF16 => 6e-2,
    }
}

fn values<D: DTypeKind>(t: &Tensor<D>) -> Vec<f64> {
    t.as_slice().unwrap().iter().map(|v| v.to_f64()).collect()
}

fn rand<D: DTypeKind>(rng: &mut Rng, shape: &[usize], lo: f32, hi: f32) -> Tensor<D> {
    let n = shape.iter().product();
    Tensor::<D>::from_f32(shape, &rng.uniform_vec(n, lo, hi)).unwrap()
}

/// `max |got - want| <= bound * max |want|`.
fn close(what: &str, got: &[f64], want: &[f64], bound: f64) {
    close_floor(what, got, want, bound, 1e-6);
}

/// [`close`] against at least `floor`: for a gradient that is zero in exact arithmetic (the key
/// bias: a softmax does not change when a row's scores shift together), rounding leaves a
/// residue that is small against the layer's other gradients, not against zero.
fn close_floor(what: &str, got: &[f64], want: &[f64], bound: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
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
}

/// Every variable's (path, value, gradient) in float64.
fn variables<L: Layer>(layer: &mut L) -> Vec<(String, Vec<f64>, Vec<f64>)> {
    let mut out = vec![];
    layer
        .visit_variables("", &mut |path: &str, v: &mut Variable| {
            out.push((path.to_string(), values(v.value()), values(v.grad())));
            Ok(())
        })
        .unwrap();
    out
}

/// Self-attention in float64: `params` in visit order (query, key, value, attention_output;
/// kernel then bias each), `x` `[batch, seq, features]`.
fn mha_f64(
    params: &[Vec<f64>],
    x: &[f64],
    (batch, seq, features): (usize, usize, usize),
    (heads, key_dim): (usize, usize),
    mask: Option<&[f32]>,
    causal: bool,
) -> Vec<f64> {
    let width = heads * key_dim;
    let project = |x: &[f64], k: &[f64], b: &[f64], cin: usize, cout: usize| -> Vec<f64> {
        let rows = x.len() / cin;
        let mut y = vec![0.0; rows * cout];
        for r in 0..rows {
            for o in 0..cout {
                y[r * cout + o] = b[o]
                    + (0..cin)
                        .map(|i| x[r * cin + i] * k[i * cout + o])
                        .sum::<f64>();
            }
        }
        y
    };
    let q = project(x, &params[0], &params[1], features, width);
    let k = project(x, &params[2], &params[3], features, width);
    let v = project(x, &params[4], &params[5], features, width);
    let scale = 1.0 / (key_dim as f64).sqrt();
    let mut o = vec![0.0; batch * seq * width];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..seq {
                let at = |t: usize, c: usize| (b * seq + t) * width + h * key_dim + c;
                let ok =
                    |j: usize| !(causal && j > i) && mask.is_none_or(|m| m[b * seq + j] != 0.0);
                let s: Vec<f64> = (0..seq)
                    .map(|j| (0..key_dim).map(|c| q[at(i, c)] * k[at(j, c)]).sum::<f64>() * scale)
                    .collect();
                let max = (0..seq)
                    .filter(|&j| ok(j))
                    .map(|j| s[j])
                    .fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = (0..seq)
                    .map(|j| if ok(j) { (s[j] - max).exp() } else { 0.0 })
                    .collect();
                let sum: f64 = e.iter().sum();
                for j in 0..seq {
                    let p = if sum > 0.0 { e[j] / sum } else { 0.0 };
                    for c in 0..key_dim {
                        o[at(i, c)] += p * v[at(j, c)];
                    }
                }
            }
        }
    }
    project(&o, &params[6], &params[7], width, features)
}

fn mha_matches<P: PolicyKind>() {
    let mut rng = Rng::new(mp_core::rng::test_seed(&format!("mha {}", P::POLICY)));
    let b = bound(<Compute<P>>::DTYPE);
    for case in 0..3 {
        let (batch, seq, heads, key_dim) = (
            2 + rng.below(2) as usize,
            2 + rng.below(6) as usize,
            1 + rng.below(3) as usize,
            1 + rng.below(4) as usize,
        );
        let features = 3 + rng.below(5) as usize;
        let causal = case == 1;
        let mut mha = MultiHeadAttention::<P>::new(heads)
            .with_key_dim(key_dim)
            .with_seed(case);
        if causal {
            mha = mha.causal();
        }
        assert_eq!(mha.build(&[seq, features]).unwrap(), vec![seq, features]);
        // The padding mask of case 2: the last sample fully masked, the others partly.
        let mask: Option<Vec<f32>> = (case == 2).then(|| {
            (0..batch * seq)
                .map(|i| f32::from(i / seq != batch - 1 && (i % seq == 0 || rng.below(2) == 0)))
                .collect()
        });
        let mask_t = mask
            .as_ref()
            .map(|m| Tensor::<F32>::from_vec(&[batch, seq], m.clone()).unwrap());
        let x: Tensor<Compute<P>> = rand(&mut rng, &[batch, seq, features], -1.5, 1.5);
        let dy: Tensor<Compute<P>> = rand(&mut rng, &[batch, seq, features], -1.0, 1.0);
        mha.zero_grad_all();
        let y = mha.forward_train_masked(&x, mask_t.as_ref()).unwrap();
        let dx = mha.backward(&dy, true).unwrap().unwrap();
        let vars = variables(&mut mha);
        let params: Vec<Vec<f64>> = vars.iter().map(|(_, v, _)| v.clone()).collect();
        let names: Vec<&str> = vars.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names[0], "query/kernel");
        assert_eq!(names[7], "attention_output/bias");
        let dims = (batch, seq, features);
        let xf = values(&x);
        let r = values(&dy);
        let f = |p: &[Vec<f64>], x: &[f64]| {
            mha_f64(p, x, dims, (heads, key_dim), mask.as_deref(), causal)
        };
        let ctx = format!(
            "{} case {case} b{batch} s{seq} h{heads} k{key_dim} f{features}",
            P::POLICY
        );
        close(&format!("{ctx} forward"), &values(&y), &f(&params, &xf), b);
        let loss =
            |p: &[Vec<f64>], x: &[f64]| f(p, x).iter().zip(&r).map(|(a, b)| a * b).sum::<f64>();
        let h = 1e-5;
        let dx_want: Vec<f64> = (0..xf.len())
            .map(|i| {
                let (mut xp, mut xm) = (xf.clone(), xf.clone());
                xp[i] += h;
                xm[i] -= h;
                (loss(&params, &xp) - loss(&params, &xm)) / (2.0 * h)
            })
            .collect();
        close(&format!("{ctx} dx"), &values(&dx), &dx_want, b);
        for (vi, (name, _, grad)) in vars.iter().enumerate() {
            let want: Vec<f64> = (0..params[vi].len())
                .map(|i| {
                    let (mut pp, mut pm) = (params.clone(), params.clone());
                    pp[vi][i] += h;
                    pm[vi][i] -= h;
                    (loss(&pp, &xf) - loss(&pm, &xf)) / (2.0 * h)
                })
                .collect();
            let floor = dx_want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            close_floor(&format!("{ctx} d{name}"), grad, &want, b, floor);
        }
        assert!(
            values(&y).iter().all(|v| v.is_finite()),
            "{ctx}: finite output"
        );
    }
}

trait ZeroGrad {
    fn zero_grad_all(&mut self);
}

impl<L: Layer> ZeroGrad for L {
    fn zero_grad_all(&mut self) {
        self.visit_variables("", &mut |_, v| Ok(v.zero_grad()?))
            .unwrap();
    }
}

#[test]
fn multi_head_attention_matches_float64_under_every_policy() {
    mha_matches::<Float32>();
    mha_matches::<MixedFloat16>();
    mha_matches::<MixedBFloat16>();
}

/// Large inputs (float16 scores would overflow) with all but one key masked: the float16
/// layer's probabilities are float32's within the float16 bound (here: equal, one 1 per query
/// and exact zeros), and nothing is NaN.
#[test]
fn float16_attention_with_all_but_one_key_masked_matches_float32() {
    let (batch, seq, features) = (3, 7, 8);
    let mut rng = Rng::new(mp_core::rng::test_seed("mha f16 mask"));
    let mut m16 = MultiHeadAttention::<MixedFloat16>::new(2).with_seed(5);
    let mut m32 = MultiHeadAttention::<Float32>::new(2).with_seed(5);
    m16.build(&[seq, features]).unwrap();
    m32.build(&[seq, features]).unwrap();
    let x32: Tensor<F32> = rand(&mut rng, &[batch, seq, features], 30.0, 60.0);
    let x16 = mp_layers::convert::<F32, mp_core::F16>(x32.clone()).unwrap();
    let x32 = mp_layers::convert::<mp_core::F16, F32>(x16.clone()).unwrap();
    let keep = [4usize, 0, 6];
    let mask: Vec<f32> = (0..batch * seq)
        .map(|i| f32::from(i % seq == keep[i / seq]))
        .collect();
    let mask = Tensor::<F32>::from_vec(&[batch, seq], mask).unwrap();
    let (y16, p16) = m16.forward_with_scores(&x16, Some(&mask)).unwrap();
    let (y32, p32) = m32.forward_with_scores(&x32, Some(&mask)).unwrap();
    let (p16, p32) = (values(&p16), values(&p32));
    close("probabilities", &p16, &p32, 1.0 / 2048.0);
    for (i, p) in p16.iter().enumerate() {
        let (b, j) = (i / (2 * seq * seq), i % seq);
        assert_eq!(*p, if j == keep[b] { 1.0 } else { 0.0 }, "probability {i}");
    }
    assert!(
        values(&y16).iter().all(|v| v.is_finite()),
        "float16 output has NaN or inf"
    );
    close("output", &values(&y16), &values(&y32), bound(DType::F16));
}

/// Embedding, positions, a class token and pooling under each policy against float64: the
/// table rows, the sums per id, the positions' and the token's gradients.
fn sequence_layers_match<P: PolicyKind>() {
    let mut rng = Rng::new(mp_core::rng::test_seed(&format!(
        "sequence layers {}",
        P::POLICY
    )));
    let b = bound(<Compute<P>>::DTYPE);
    let (batch, seq, vocab, dim) = (3, 5 + rng.below(4) as usize, 11, 6);
    let mut embed = Embedding::<P>::new(vocab, dim);
    let mut pos = PositionEmbedding::<P>::new(seq + 2);
    let mut cls = ClassToken::<P>::new();
    let mut pool = SequencePooling::<P>::class_token();
    let mut mean = SequencePooling::<P>::mean();
    assert_eq!(embed.build(&[seq]).unwrap(), vec![seq, dim]);
    assert_eq!(cls.build(&[seq, dim]).unwrap(), vec![seq + 1, dim]);
    assert_eq!(pos.build(&[seq + 1, dim]).unwrap(), vec![seq + 1, dim]);
    assert_eq!(pool.build(&[seq + 1, dim]).unwrap(), vec![dim]);
    assert_eq!(mean.build(&[seq + 1, dim]).unwrap(), vec![dim]);
    // A non-zero class token, to see it travel.
    cls.visit_variables("", &mut |_, v| {
        v.assign(&rng.uniform_vec(dim, -1.0, 1.0))?;
        Ok(())
    })
    .unwrap();
    let ids: Vec<f32> = (0..batch * seq)
        .map(|_| rng.below(vocab as u64) as f32)
        .collect();
    let ids = Tensor::<F32>::from_vec(&[batch, seq], ids).unwrap();
    let e = embed.forward_train(&ids).unwrap();
    let c = cls.forward_train(&e).unwrap();
    let p = pos.forward_train(&c).unwrap();
    let first = pool.forward_train(&p).unwrap();
    let avg = mean.forward_train(&p).unwrap();
    let table = variables(&mut embed)[0].1.clone();
    let positions = variables(&mut pos)[0].1.clone();
    let token = variables(&mut cls)[0].1.clone();
    // Forward in float64.
    let idsf = values(&ids);
    let mut want = vec![0.0f64; batch * (seq + 1) * dim];
    for bi in 0..batch {
        for t in 0..=seq {
            for d in 0..dim {
                let v = if t == 0 {
                    token[d]
                } else {
                    table[idsf[bi * seq + t - 1] as usize * dim + d]
                };
                want[(bi * (seq + 1) + t) * dim + d] = v + positions[t * dim + d];
            }
        }
    }
    close("sequence forward", &values(&p), &want, 2.0 * b);
    let want_first: Vec<f64> = (0..batch * dim)
        .map(|i| want[(i / dim) * (seq + 1) * dim + i % dim])
        .collect();
    close("class-token pooling", &values(&first), &want_first, 2.0 * b);
    let want_mean: Vec<f64> = (0..batch * dim)
        .map(|i| {
            (0..=seq)
                .map(|t| want[((i / dim) * (seq + 1) + t) * dim + i % dim])
                .sum::<f64>()
                / (seq + 1) as f64
        })
        .collect();
    close("mean pooling", &values(&avg), &want_mean, 3.0 * b);
    // Backward from the class-token pooling: only token 0 of each sample gets a gradient.
    let dy: Tensor<Compute<P>> = rand(&mut rng, &[batch, dim], -1.0, 1.0);
    let dyf = values(&dy);
    mean.backward(&dy, true).unwrap();
    let g = pool.backward(&dy, true).unwrap().unwrap();
    let g = pos.backward(&g, true).unwrap().unwrap();
    let g = cls.backward(&g, true).unwrap().unwrap();
    assert!(embed.backward(&g, false).unwrap().is_none());
    let dtoken = variables(&mut cls)[0].2.clone();
    let dpos = variables(&mut pos)[0].2.clone();
    let dtable = variables(&mut embed)[0].2.clone();
    let want_token: Vec<f64> = (0..dim)
        .map(|d| (0..batch).map(|bi| dyf[bi * dim + d]).sum())
        .collect();
    close("class token gradient", &dtoken, &want_token, 1e-6);
    let mut want_pos = vec![0.0; (seq + 2) * dim];
    want_pos[..dim].copy_from_slice(&want_token);
    close("position gradient", &dpos, &want_pos, 1e-6);
    assert!(
        dtable.iter().all(|&v| v == 0.0),
        "no gradient reaches the tokens through the class token"
    );
}

#[test]
fn sequence_layers_match_float64_under_every_policy() {
    sequence_layers_match::<Float32>();
    sequence_layers_match::<MixedFloat16>();
    sequence_layers_match::<MixedBFloat16>();
}

#[test]
fn bad_inputs_name_the_layer_and_the_values() {
    let mut embed = Embedding::<MixedBFloat16>::new(32, 4);
    embed.set_name("tokens");
    embed.build(&[3]).unwrap();
    let ids = Tensor::<F32>::from_vec(&[1, 3], vec![1.0, 40.0, 2.0]).unwrap();
    let err = embed.forward(&ids).unwrap_err().to_string();
    assert!(
        err.contains("tokens") && err.contains("token id 40 at position 1"),
        "{err}"
    );
    assert!(err.contains("vocabulary size is 32"), "{err}");
    let err = embed
        .forward_train(&Tensor::<F32>::zeros(&[1, 4]).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokens") && err.contains("[1, 4]"), "{err}");
    let err = PositionEmbedding::<Float32>::new(16)
        .build(&[17, 8])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("17 tokens") && err.contains("16 positions"),
        "{err}"
    );
    let err = MultiHeadAttention::<MixedFloat16>::new(5)
        .build(&[4, 64])
        .unwrap_err()
        .to_string();
    assert!(err.contains("5 heads") && err.contains("64"), "{err}");
    let mut mha = MultiHeadAttention::<MixedFloat16>::new(4);
    mha.build(&[6, 8]).unwrap();
    let x = Tensor::<mp_core::F16>::zeros(&[2, 6, 8]).unwrap();
    let bad_mask = Tensor::<F32>::zeros(&[2, 5]).unwrap();
    let err = mha
        .forward_masked(&x, Some(&bad_mask))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("multi_head_attention") && err.contains("(2, 6)") && err.contains("[2, 5]"),
        "{err}"
    );
    let half = Tensor::<F32>::from_vec(&[2, 6], vec![0.5; 12]).unwrap();
    let err = mha.forward_masked(&x, Some(&half)).unwrap_err().to_string();
    assert!(err.contains("0.5"), "{err}");
    let err = mha.backward(&x, true).unwrap_err().to_string();
    assert!(err.contains("without a preceding forward_train"), "{err}");
}

#[model]
struct TokenClassifier {
    embed: Embedding,
    positions: PositionEmbedding,
    attention: MultiHeadAttention,
    pool: SequencePooling,
    logits: Dense,
    #[dtype = "float32"]
    predictions: Softmax,
}

/// Float32 token ids through `fit`, `evaluate` and `predict`: "is token 0 in the sequence",
/// learned under each policy.
fn token_model_learns<P: PolicyKind>() {
    let (n, seq, vocab) = (600usize, 6usize, 8u64);
    let mut rng = Rng::new(11);
    let mut ids = vec![];
    let mut labels = vec![];
    for i in 0..n {
        let with = i % 2 == 0;
        let row: Vec<f32> = (0..seq)
            .map(|t| {
                if with && t == (i / 2) % seq {
                    0.0
                } else {
                    (1 + rng.below(vocab - 1)) as f32
                }
            })
            .collect();
        ids.extend(row);
        labels.push(u8::from(with));
    }
    let x = Array2::from_shape_vec((n, seq), ids).unwrap();
    let y = Array1::from_vec(labels);
    let model = TokenClassifier::<P>::new(
        Embedding::new(vocab as usize, 16).with_seed(1),
        PositionEmbedding::new(seq).with_seed(2),
        MultiHeadAttention::new(2).with_seed(3),
        SequencePooling::mean(),
        Dense::new(2).with_seed(4),
        Softmax::new(),
    );
    let mut trainer = Trainer::compile(
        model,
        Adam::new(1e-2).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    let options = FitOptions {
        epochs: 8,
        batch_size: 32,
        verbose: Verbose::Silent,
        ..Default::default()
    };
    trainer.fit(x.view(), y.view(), &options).unwrap();
    let scores = trainer
        .evaluate(x.view(), y.view(), 64, Verbose::Silent)
        .unwrap();
    assert!(
        scores.accuracy() > 0.95,
        "{}: accuracy {}",
        P::POLICY,
        scores.accuracy()
    );
    let probs = trainer.predict(x.view(), 64).unwrap();
    assert_eq!(probs.shape(), &[n, 2]);
    let mut bad = x.clone();
    bad[[3, 2]] = 8.0;
    let err = trainer
        .evaluate(bad.view(), y.view(), 64, Verbose::Silent)
        .unwrap_err()
        .to_string();
    assert!(err.contains("embed") && err.contains("token id 8"), "{err}");
}

#[test]
fn a_token_model_learns_from_integer_ids_under_every_policy() {
    token_model_learns::<Float32>();
    token_model_learns::<MixedFloat16>();
    token_model_learns::<MixedBFloat16>();
}

/// The causal mask: changing the tokens after position `i` leaves the outputs up to `i` bit
/// for bit the same, under every policy.
#[test]
fn causal_attention_does_not_look_ahead() {
    fn run<P: PolicyKind>() {
        let (batch, seq, features) = (2, 9, 8);
        let mut rng = Rng::new(mp_core::rng::test_seed(&format!("causal {}", P::POLICY)));
        let mut mha = MultiHeadAttention::<P>::new(2).causal().with_seed(3);
        mha.build(&[seq, features]).unwrap();
        let x: Tensor<Compute<P>> = rand(&mut rng, &[batch, seq, features], -1.0, 1.0);
        let cut = 1 + rng.below(seq as u64 - 1) as usize;
        let mut changed = values(&x);
        for b in 0..batch {
            for v in &mut changed[(b * seq + cut) * features..(b + 1) * seq * features] {
                *v = -*v + 0.5;
            }
        }
        let changed: Vec<f32> = changed.iter().map(|&v| v as f32).collect();
        let x2 = Tensor::<Compute<P>>::from_f32(&[batch, seq, features], &changed).unwrap();
        let (y1, y2) = (
            values(&mha.forward(&x).unwrap()),
            values(&mha.forward(&x2).unwrap()),
        );
        for b in 0..batch {
            let prefix = (b * seq) * features..(b * seq + cut) * features;
            assert_eq!(
                y1[prefix.clone()],
                y2[prefix],
                "{}: sample {b} saw past {cut}",
                P::POLICY
            );
            assert_ne!(
                y1[(b * seq + cut) * features..(b + 1) * seq * features],
                y2[(b * seq + cut) * features..(b + 1) * seq * features]
            );
        }
    }
    run::<Float32>();
    run::<MixedFloat16>();
    run::<MixedBFloat16>();
}

/// `ignore_class`: predictions `[batch, tokens, classes]` with one label per token; ignored
/// tokens add no loss and get a zero gradient, and the mean is over the others (float64).
#[test]
fn sparse_crossentropy_over_tokens_ignores_a_class() {
    let mut rng = Rng::new(mp_core::rng::test_seed("ignore_class"));
    let (batch, tokens, classes) = (3, 5, 7);
    let logits = rng.uniform_vec(batch * tokens * classes, -2.0, 2.0);
    let probs: Vec<f32> = logits
        .chunks(classes)
        .flat_map(|r| {
            let m = r.iter().fold(f32::MIN, |a, &b| a.max(b));
            let e: Vec<f32> = r.iter().map(|v| (v - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.into_iter().map(move |v| v / s)
        })
        .collect();
    let labels: Vec<i32> = (0..batch * tokens)
        .map(|i| {
            if i % 3 == 0 {
                -1
            } else {
                rng.below(classes as u64) as i32
            }
        })
        .collect();
    let p = Tensor::<F32>::from_vec(&[batch, tokens, classes], probs.clone()).unwrap();
    let loss = SparseCategoricalCrossentropy::new().ignore_class(-1);
    let kept: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] != -1).collect();
    let want = kept
        .iter()
        .map(|&i| -f64::from(probs[i * classes + labels[i] as usize]).ln())
        .sum::<f64>()
        / kept.len() as f64;
    let got = f64::from(loss.loss(&p, &labels).unwrap());
    assert!((got - want).abs() <= 1e-5 * want, "loss {got} vs {want}");
    let g = values(&loss.softmax_input_gradient(&p, &labels, 2.0).unwrap());
    for (i, &l) in labels.iter().enumerate() {
        for c in 0..classes {
            let want = if l == -1 {
                0.0
            } else {
                2.0 * (f64::from(probs[i * classes + c]) - f64::from(u8::from(c as i32 == l)))
                    / kept.len() as f64
            };
            assert!(
                (g[i * classes + c] - want).abs() <= 1e-6,
                "row {i} class {c}: {} vs {want}",
                g[i * classes + c]
            );
        }
    }
    // Without ignore_class, -1 is an out-of-range label: an error, not a panic.
    assert!(
        SparseCategoricalCrossentropy::new()
            .loss(&p, &labels)
            .is_err()
    );
    // Every label ignored: no loss, no gradient.
    let none = vec![-1i32; batch * tokens];
    assert_eq!(loss.loss(&p, &none).unwrap(), 0.0);
    assert!(
        values(&loss.gradient(&p, &none, 1.0).unwrap())
            .iter()
            .all(|&v| v == 0.0)
    );
}
