//! Gradient accumulation: k micro-batches give the update of one batch made of them all (per
//! policy, with uneven micro-batches), with one loss scale, one finiteness decision and one
//! scale update per window; BatchNormalization's moving statistics take every micro-batch in
//! order, and none of a skipped window; a custom loop built from the loss-scale optimizer's
//! pieces does the same as `Trainer::train_window`.

use mp_core::{F32, Float32, MixedBFloat16, MixedFloat16, PolicyKind, Rng, Tensor};
use mp_layers::{
    BatchNormalization, Compute, Dense, FitOptions, Layer, MicroBatch, Model, ModelVars, Softmax,
    SparseCategoricalCrossentropy, Trainer, Verbose, convert, model,
};
use mp_optim::{LossScaleOptimizer, Optimizer, Sgd};
use ndarray::{Array1, Array2, s};

#[model]
struct Net {
    hidden: Dense,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

#[model]
struct BnNet {
    bn: BatchNormalization,
    logits: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

fn net<P: PolicyKind>() -> Trainer<Net<P>, Sgd> {
    let mut t = Trainer::compile(
        Net {
            hidden: Dense::new(24).relu(),
            logits: Dense::new(3),
            probs: Softmax::new(),
        },
        Sgd::new(0.1).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    t.model_mut().build(&[5]).unwrap();
    t
}

fn data(n: usize, seed: u64) -> (Array2<f32>, Array1<u32>) {
    let mut rng = Rng::new(seed);
    let x = Array2::from_shape_vec((n, 5), rng.uniform_vec(n * 5, -1.0, 1.0)).unwrap();
    let y = x
        .rows()
        .into_iter()
        .map(|r| u32::from(r[0] > 0.0) + u32::from(r[1] > 0.3))
        .collect();
    (x, y)
}

fn flat<M: Model, O: Optimizer>(t: &mut Trainer<M, O>) -> Vec<f64> {
    let mut v = vec![];
    for (_, w) in t.model_mut().get_weights().unwrap() {
        v.extend(w.to_f32_vec().unwrap().into_iter().map(f64::from));
    }
    v
}

fn options(batch_size: usize, k: usize) -> FitOptions {
    FitOptions {
        batch_size,
        epochs: 1,
        shuffle: false,
        verbose: Verbose::Silent,
        gradient_accumulation_steps: k,
        ..Default::default()
    }
}

/// One update from 30 samples as one batch, and as micro-batches of 8, 8, 8 and 6: the same
/// change of every weight within `tol` of the largest change.
fn same_update_as_one_batch<P: PolicyKind>(tol: f64) {
    let (x, y) = data(30, 7);
    let mut whole = net::<P>();
    let mut accumulated = net::<P>();
    let w0 = flat(&mut whole);
    assert_eq!(
        w0,
        flat(&mut accumulated),
        "both start from the same weights"
    );
    let a = whole.fit(x.view(), y.view(), &options(30, 1)).unwrap();
    let b = accumulated.fit(x.view(), y.view(), &options(8, 4)).unwrap();
    assert_eq!(whole.optimizer().inner().iterations(), 1);
    assert_eq!(
        accumulated.optimizer().inner().iterations(),
        1,
        "one update"
    );
    assert_eq!(a.epochs[0].steps, 1);
    assert_eq!(b.epochs[0].steps, 4, "four batches");
    let (wa, wb) = (flat(&mut whole), flat(&mut accumulated));
    let da: Vec<f64> = wa.iter().zip(&w0).map(|(a, w)| a - w).collect();
    let db: Vec<f64> = wb.iter().zip(&w0).map(|(b, w)| b - w).collect();
    let largest = da.iter().fold(0.0f64, |m, d| m.max(d.abs()));
    assert!(largest > 1e-3, "the update is not trivial: {largest}");
    let worst = da
        .iter()
        .zip(&db)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst <= tol * largest,
        "{}: worst difference {worst:e} > {tol:e} x {largest:e}",
        P::POLICY
    );
    eprintln!("{}: worst {worst:e} of largest {largest:e}", P::POLICY);
    let (la, lb) = (a.epochs[0].loss, b.epochs[0].loss);
    assert!((la - lb).abs() <= 1e-2 * la.abs(), "losses {la} vs {lb}");
}

#[test]
fn an_accumulated_window_is_the_update_of_one_batch_under_every_policy() {
    same_update_as_one_batch::<Float32>(1e-5);
    same_update_as_one_batch::<MixedBFloat16>(1e-2);
    same_update_as_one_batch::<MixedFloat16>(1e-3);
}

fn input<P: PolicyKind>(x: ndarray::ArrayView2<'_, f32>) -> Tensor<Compute<Net<P>>> {
    convert(Tensor::<F32>::from_ndarray(&x).unwrap()).unwrap()
}

#[test]
fn a_non_finite_micro_batch_skips_the_whole_window_and_the_scale_halves_once() {
    let (mut x, y) = data(24, 11);
    let mut t = net::<MixedFloat16>();
    let w0 = flat(&mut t);
    let scale = t.optimizer().loss_scale();
    x[[13, 2]] = f32::NAN; // the second micro-batch of three
    let xs: Vec<_> = (0..3)
        .map(|i| input::<MixedFloat16>(x.slice(s![i * 8..(i + 1) * 8, ..])))
        .collect();
    let ys: Vec<Vec<u32>> = (0..3)
        .map(|i| y.slice(s![i * 8..(i + 1) * 8]).to_vec())
        .collect();
    let micro: Vec<_> = xs.iter().zip(&ys).map(|(x, y)| (x, &y[..])).collect();
    let (r, probs) = t.train_window(&micro).unwrap();
    assert!(!r.applied);
    assert!(r.loss.is_nan(), "the window's loss carries the NaN");
    assert_eq!(r.loss_scale, scale);
    assert_eq!(probs.len(), 3);
    assert_eq!(flat(&mut t), w0, "nothing applied");
    assert_eq!(t.optimizer().inner().iterations(), 0);
    assert_eq!(
        t.optimizer().loss_scale(),
        scale / 2.0,
        "one scale update per window"
    );
    assert_eq!(t.progress().step, 3, "three batches run");
    // The same three micro-batches without the NaN are applied, as one update.
    let clean: Vec<_> = (0..3)
        .map(|i| {
            let mut xi = x.slice(s![i * 8..(i + 1) * 8, ..]).to_owned();
            xi.mapv_inplace(|v| if v.is_nan() { 0.0 } else { v });
            input::<MixedFloat16>(xi.view())
        })
        .collect();
    let micro: Vec<_> = clean.iter().zip(&ys).map(|(x, y)| (x, &y[..])).collect();
    let (r, _) = t.train_window(&micro).unwrap();
    assert!(r.applied && r.loss.is_finite());
    assert_eq!(t.optimizer().inner().iterations(), 1);
    let empty: Vec<MicroBatch<'_, Net<MixedFloat16>, u32>> = vec![];
    let e = t.train_window(&empty).unwrap_err().to_string();
    assert!(e.contains("at least one micro-batch"), "{e}");
    let e = net::<Float32>()
        .fit(x.view(), y.view(), &options(8, 0))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("gradient_accumulation_steps must be at least 1"),
        "{e}"
    );
}

fn moving(t: &mut Trainer<BnNet<Float32>, Sgd>) -> (Vec<f64>, Vec<f64>) {
    let w = t.model_mut().get_weights().unwrap();
    let get = |name: &str| -> Vec<f64> {
        let (_, v) = w.iter().find(|(n, _)| n.ends_with(name)).unwrap();
        v.to_f32_vec().unwrap().into_iter().map(f64::from).collect()
    };
    (get("bn/moving_mean"), get("bn/moving_variance"))
}

#[test]
fn moving_statistics_take_every_micro_batch_of_an_applied_window_only() {
    let (x, y) = data(20, 3);
    let mut t = Trainer::compile(
        BnNet {
            bn: BatchNormalization::new().momentum(0.8),
            logits: Dense::new(3),
            probs: Softmax::new(),
        },
        Sgd::new(0.1).unwrap(),
        SparseCategoricalCrossentropy::new(),
    );
    t.model_mut().build(&[5]).unwrap();
    let parts = [0..12, 12..20];
    let xs: Vec<Tensor<F32>> = parts
        .iter()
        .map(|r| Tensor::from_ndarray(&x.slice(s![r.clone(), ..])).unwrap())
        .collect();
    let ys: Vec<Vec<u32>> = parts
        .iter()
        .map(|r| y.slice(s![r.clone()]).to_vec())
        .collect();
    let micro: Vec<_> = xs.iter().zip(&ys).map(|(x, y)| (x, &y[..])).collect();
    assert!(t.train_window(&micro).unwrap().0.applied);
    // Float64: two moving-average updates, in order, each with its micro-batch's statistics.
    let (mut mean, mut var) = (vec![0.0f64; 5], vec![1.0f64; 5]);
    for r in &parts {
        for c in 0..5 {
            let col: Vec<f64> = x
                .slice(s![r.clone(), c])
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let m = col.iter().sum::<f64>() / col.len() as f64;
            let v = col.iter().map(|a| (a - m).powi(2)).sum::<f64>() / col.len() as f64;
            mean[c] = mean[c] * 0.8 + m * 0.2;
            var[c] = var[c] * 0.8 + v * 0.2;
        }
    }
    let (got_mean, got_var) = moving(&mut t);
    for c in 0..5 {
        assert!(
            (got_mean[c] - mean[c]).abs() <= 1e-6,
            "{got_mean:?} vs {mean:?}"
        );
        assert!(
            (got_var[c] - var[c]).abs() <= 1e-6 * var[c],
            "{got_var:?} vs {var:?}"
        );
    }
    // A window with a non-finite micro-batch leaves them as they were.
    let before = moving(&mut t);
    let mut bad = x.slice(s![12..20, ..]).to_owned();
    bad[[0, 0]] = f32::INFINITY;
    let bad = Tensor::from_ndarray(&bad).unwrap();
    let micro = [(&xs[0], &ys[0][..]), (&bad, &ys[1][..])];
    assert!(!t.train_window(&micro).unwrap().0.applied);
    assert_eq!(moving(&mut t), before);
}

#[test]
fn a_custom_loop_accumulates_exactly_as_train_window() {
    // The custom-loop recipe: zero the gradients once, run each micro-batch's backward with
    // the window's one loss scale times the micro-batch's share of the samples, then unscale,
    // check and apply once.
    let (x, y) = data(21, 5);
    let parts = [0..8, 8..16, 16..21];
    let xs: Vec<_> = parts
        .iter()
        .map(|r| input::<MixedFloat16>(x.slice(s![r.clone(), ..])))
        .collect();
    let ys: Vec<Vec<u32>> = parts
        .iter()
        .map(|r| y.slice(s![r.clone()]).to_vec())
        .collect();
    let mut t = net::<MixedFloat16>();
    let mut model = Net::<MixedFloat16> {
        hidden: Dense::new(24).relu(),
        logits: Dense::new(3),
        probs: Softmax::new(),
    };
    model.build(&[5]).unwrap();
    let loss = SparseCategoricalCrossentropy::new();
    let mut opt = LossScaleOptimizer::new(Sgd::new(0.1).unwrap());
    let scale = opt.loss_scale();
    model.zero_grad().unwrap();
    for (j, (x, y)) in xs.iter().zip(&ys).enumerate() {
        model.begin_step(j as u64);
        let p = model.forward_train_f32(x).unwrap();
        let share = (f64::from(scale) * y.len() as f64 / 21.0) as f32;
        let dz = loss.softmax_input_gradient(&p, y, share).unwrap();
        model.backward_from_softmax_input_f32(&dz).unwrap();
    }
    opt.get_unscaled_gradients(&mut ModelVars(&mut model))
        .unwrap();
    assert!(
        opt.apply_gradients(&mut ModelVars(&mut model))
            .unwrap()
            .applied
    );
    model.end_step(true).unwrap();
    let micro: Vec<_> = xs.iter().zip(&ys).map(|(x, y)| (x, &y[..])).collect();
    assert!(t.train_window(&micro).unwrap().0.applied);
    let custom: Vec<u32> = model
        .get_weights()
        .unwrap()
        .into_iter()
        .flat_map(|(_, w)| w.to_f32_vec().unwrap())
        .map(f32::to_bits)
        .collect();
    let trained: Vec<u32> = flat(&mut t)
        .into_iter()
        .map(|v| (v as f32).to_bits())
        .collect();
    assert_eq!(custom, trained, "bit-identical");
}

#[test]
fn a_schedule_spans_the_updates_not_the_batches() {
    let (x, y) = data(50, 9);
    let o = FitOptions {
        epochs: 2,
        ..options(8, 3)
    };
    // 50 samples: 7 batches of 8 (the last of 2), windows of 3, 3 and 1 per epoch.
    assert_eq!(o.updates_per_epoch(50).unwrap(), 3);
    let mut t = net::<Float32>();
    let h = t.fit(x.view(), y.view(), &o).unwrap();
    assert_eq!(t.optimizer().inner().iterations(), 6);
    assert_eq!(h.epochs[1].steps, 7);
    assert_eq!(t.progress().step, 14);
}
