//! Optimizers against steps computed by hand, and the loss-scale optimizer's guarantees.

use mp_core::{LossScale, Rng, Tensor, Variable};
use mp_optim::{Adam, AdamW, Error, LossScaleOptimizer, Optimizer, RmsProp, Sgd, VariableSet};

fn vars(values: &[&[f32]]) -> Vec<Variable> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            Variable::new(
                format!("layer_{i}/kernel"),
                Tensor::from_vec(&[v.len()], v.to_vec()).unwrap(),
            )
            .unwrap()
        })
        .collect()
}

fn set_grads(vars: &mut [Variable], grads: &[&[f32]]) {
    for (v, g) in vars.iter_mut().zip(grads) {
        v.grad_mut().copy_from_slice(g).unwrap();
    }
}

fn value(v: &Variable) -> Vec<f32> {
    v.value().as_slice().unwrap().to_vec()
}

fn close(a: f32, b: f64, rel: f64) {
    let err = (a as f64 - b).abs() / b.abs().max(1e-30);
    assert!(err <= rel, "{a} vs {b}: relative error {err:e} > {rel:e}");
}

#[test]
fn sgd_by_hand() {
    let mut v = vars(&[&[1.0, -2.0]]);
    let mut opt = Sgd::new(0.1).unwrap();
    set_grads(&mut v, &[&[0.5, -1.0]]);
    opt.apply_gradients(&mut v).unwrap();
    assert_eq!(value(&v[0]), vec![1.0 - 0.1 * 0.5, -2.0 + 0.1]);
    assert_eq!(opt.iterations(), 1);

    // Momentum 0.9: m1 = -0.05, w1 = 0.95; m2 = 0.9 m1 - 0.05 = -0.095, w2 = 0.855.
    let mut v = vars(&[&[1.0]]);
    let mut opt = Sgd::new(0.1).unwrap().with_momentum(0.9).unwrap();
    set_grads(&mut v, &[&[0.5]]);
    opt.apply_gradients(&mut v).unwrap();
    close(value(&v[0])[0], 0.95, 1e-7);
    opt.apply_gradients(&mut v).unwrap();
    close(value(&v[0])[0], 0.855, 1e-6);

    // Nesterov: m1 = -0.05, w1 = 1 + 0.9 m1 - 0.05 = 0.905.
    let mut v = vars(&[&[1.0]]);
    let mut opt = Sgd::new(0.1)
        .unwrap()
        .with_momentum(0.9)
        .unwrap()
        .with_nesterov(true);
    set_grads(&mut v, &[&[0.5]]);
    opt.apply_gradients(&mut v).unwrap();
    close(value(&v[0])[0], 0.905, 1e-6);
}

#[test]
fn rmsprop_by_hand_with_keras_defaults() {
    let mut v = vars(&[&[1.0, 2.0]]);
    let mut opt = RmsProp::default();
    assert_eq!(opt.learning_rate(), 0.001);
    let (g0, g1) = (0.5f64, -3.0f64);
    set_grads(&mut v, &[&[g0 as f32, g1 as f32]]);
    opt.apply_gradients(&mut v).unwrap();
    // v = (1 - rho) g²; w -= lr g / sqrt(v + eps) (epsilon inside the square root, as Keras).
    let step = |g: f64, vel: f64| 0.001 * g / (vel + 1e-7).sqrt();
    let (v0, v1) = (0.1 * g0 * g0, 0.1 * g1 * g1);
    close(value(&v[0])[0], 1.0 - step(g0, v0), 1e-6);
    close(value(&v[0])[1], 2.0 - step(g1, v1), 1e-6);
    // Second step with the same gradient: v = 0.9 v + 0.1 g².
    opt.apply_gradients(&mut v).unwrap();
    let v0b = 0.9 * v0 + 0.1 * g0 * g0;
    close(value(&v[0])[0], 1.0 - step(g0, v0) - step(g0, v0b), 1e-6);
    let state = opt.state();
    assert_eq!(state[0].0, "layer_0/kernel");
    assert_eq!(state[0].1, "velocity");
    close(state[0].2.as_slice().unwrap()[0], v0b, 1e-6);
}

#[test]
fn adam_by_hand_with_keras_defaults() {
    let mut v = vars(&[&[1.0]]);
    let mut opt = Adam::default();
    let g = 0.5f64;
    set_grads(&mut v, &[&[g as f32]]);
    let (mut m, mut s, mut w) = (0.0f64, 0.0f64, 1.0f64);
    for t in 1..=3 {
        opt.apply_gradients(&mut v).unwrap();
        m += (g - m) * (1.0 - 0.9);
        s += (g * g - s) * (1.0 - 0.999);
        let alpha = 0.001 * (1.0 - 0.999f64.powi(t)).sqrt() / (1.0 - 0.9f64.powi(t));
        w -= alpha * m / (s.sqrt() + 1e-7);
        close(value(&v[0])[0], w, 1e-6);
    }
    assert_eq!(opt.iterations(), 3);
}

#[test]
fn adamw_decays_the_included_variables_with_each_steps_rate() {
    // One decayed kernel and one excluded bias, a learning rate changed between steps (as a
    // schedule does), against float64: w -= w * wd * lr, then Adam's step.
    let mut v = vec![
        Variable::new(
            "dense/kernel",
            Tensor::from_vec(&[3], vec![1.5, -2.0, 0.25]).unwrap(),
        )
        .unwrap(),
        Variable::new(
            "dense/bias",
            Tensor::from_vec(&[2], vec![0.75, -0.5]).unwrap(),
        )
        .unwrap(),
    ];
    let wd = 0.1f64;
    let mut opt = AdamW::new(0.01)
        .unwrap()
        .with_weight_decay(wd as f32)
        .unwrap()
        .exclude_from_weight_decay(&["bias"]);
    assert_eq!(opt.name(), "AdamW");
    let grads: [&[f32]; 2] = [&[0.5, -0.25, 0.125], &[1.0, -2.0]];
    let mut want: Vec<Vec<f64>> = v
        .iter()
        .map(|v| value(v).iter().map(|&x| f64::from(x)).collect())
        .collect();
    let mut m = [vec![0.0f64; 3], vec![0.0; 2]];
    let mut s = [vec![0.0f64; 3], vec![0.0; 2]];
    for (t, lr) in [(1, 0.01f32), (2, 0.005), (3, 0.0025)] {
        opt.set_learning_rate(lr).unwrap();
        set_grads(&mut v, &grads);
        opt.apply_gradients(&mut v).unwrap();
        let lr = f64::from(lr);
        let alpha = lr * (1.0 - 0.999f64.powi(t)).sqrt() / (1.0 - 0.9f64.powi(t));
        for k in 0..2 {
            for i in 0..want[k].len() {
                if k == 0 {
                    want[k][i] -= want[k][i] * wd * lr;
                }
                let g = f64::from(grads[k][i]);
                m[k][i] += (g - m[k][i]) * 0.1;
                s[k][i] += (g * g - s[k][i]) * 0.001;
                want[k][i] -= alpha * m[k][i] / (s[k][i].sqrt() + 1e-7);
            }
        }
        for k in 0..2 {
            for (got, want) in value(&v[k]).iter().zip(&want[k]) {
                close(*got, *want, 1e-6);
            }
        }
    }
    // The bias moved by Adam's steps only: the same as plain Adam on it.
    let mut plain = vec![
        Variable::new(
            "dense/bias",
            Tensor::from_vec(&[2], vec![0.75, -0.5]).unwrap(),
        )
        .unwrap(),
    ];
    let mut adam = Adam::new(0.01).unwrap();
    for lr in [0.01, 0.005, 0.0025] {
        adam.set_learning_rate(lr).unwrap();
        set_grads(&mut plain, &[grads[1]]);
        adam.apply_gradients(&mut plain).unwrap();
    }
    assert_eq!(value(&plain[0]), value(&v[1]));
    assert_eq!(
        opt.config().last(),
        Some(&("weight_decay", f64::from(0.1f32)))
    );
    assert!(AdamW::default().with_weight_decay(f32::NAN).is_err());
    assert!(AdamW::default().with_weight_decay(-0.01).is_err());
}

#[test]
fn a_skipped_adamw_step_decays_nothing() {
    let mut v = vars(&[&[1.0, -1.0]]);
    let mut opt = LossScaleOptimizer::new(AdamW::new(0.1).unwrap().with_weight_decay(0.5).unwrap());
    let before = value(&v[0]);
    set_grads(&mut v, &[&[f32::NAN, opt.loss_scale()]]);
    opt.get_unscaled_gradients(&mut v).unwrap();
    assert!(!opt.apply_gradients(&mut v).unwrap().applied);
    assert_eq!(value(&v[0]), before);
    set_grads(&mut v, &[&[0.0, 0.0]]);
    opt.get_unscaled_gradients(&mut v).unwrap();
    assert!(opt.apply_gradients(&mut v).unwrap().applied);
    // A zero gradient leaves Adam's step at 0: only the decay moved the weights.
    assert_eq!(value(&v[0]), vec![1.0 - 1.0 * 0.5 * 0.1, -1.0 + 0.5 * 0.1]);
}

#[test]
fn bad_hyperparameters_are_errors() {
    for lr in [f32::NAN, f32::INFINITY, -1.0] {
        let e = Sgd::new(lr).unwrap_err().to_string();
        assert!(e.contains("learning_rate") && e.contains("SGD"), "{e}");
        assert!(RmsProp::new(lr).is_err());
        assert!(Adam::new(lr).is_err());
    }
    assert!(Sgd::default().with_momentum(1.0).is_err());
    assert!(Sgd::default().with_momentum(f32::NAN).is_err());
    assert!(RmsProp::default().with_rho(f64::NAN).is_err());
    assert!(RmsProp::default().with_rho(-0.1).is_err());
    assert!(RmsProp::default().with_epsilon(0.0).is_err());
    assert!(Adam::default().with_betas(0.9, 1.0).is_err());
    assert!(Adam::default().with_epsilon(f64::NAN).is_err());
    let mut opt = Adam::default();
    assert!(opt.set_learning_rate(f32::NAN).is_err());
    assert_eq!(opt.learning_rate(), 0.001);
    assert!(
        LossScaleOptimizer::new(Sgd::default())
            .with_max_skips_at_floor(0)
            .is_err()
    );
    let e = LossScale::fixed(f32::NAN).unwrap_err().to_string();
    assert!(e.contains("NaN"), "{e}");
}

#[test]
fn changed_variables_are_refused_without_touching_anything() {
    let mut v = vars(&[&[1.0, 2.0]]);
    let mut opt = Adam::default();
    set_grads(&mut v, &[&[0.1, 0.1]]);
    opt.apply_gradients(&mut v).unwrap();
    let before = value(&v[0]);
    let mut other = vars(&[&[1.0, 2.0, 3.0]]);
    let e = opt.apply_gradients(&mut other).unwrap_err();
    assert!(matches!(e, Error::StateMismatch { .. }), "{e}");
    assert_eq!(value(&other[0]), vec![1.0, 2.0, 3.0]);
    assert_eq!(opt.iterations(), 1);
    assert_eq!(value(&v[0]), before);
}

fn snapshot(v: &[Variable], opt: &LossScaleOptimizer<Adam>) -> (Vec<u32>, Vec<u32>) {
    let w = v.iter().flat_map(value).map(f32::to_bits).collect();
    let s = opt
        .state()
        .iter()
        .flat_map(|(_, _, t)| t.as_slice().unwrap().to_vec())
        .map(f32::to_bits)
        .collect();
    (w, s)
}

/// A skipped step changes nothing, bit for bit, and the scale follows the expected trajectory.
#[test]
fn skipped_steps_change_nothing_and_the_scale_backs_off() {
    let mut rng = Rng::new(mp_core::rng::test_seed("skipped_steps_change_nothing"));
    let mut v = vars(&[
        &rng.uniform_vec(37, -1.0, 1.0),
        &rng.uniform_vec(5, -1.0, 1.0),
    ]);
    let mut opt = LossScaleOptimizer::with_loss_scale(
        Adam::default(),
        LossScale::Dynamic(mp_core::DynamicLossScale::new(1024.0, 3, 2.0).unwrap()),
    );
    let mut expected_scale = 1024.0f32;
    let mut good = 0;
    // F = finite, N = NaN somewhere, I = +inf, J = -inf in the second variable.
    for (step, kind) in "FFNFFFIFJFFF".chars().enumerate() {
        let scale = opt.loss_scale();
        assert_eq!(scale, expected_scale, "step {step}");
        let mut g0: Vec<f32> = rng
            .uniform_vec(37, -1.0, 1.0)
            .iter()
            .map(|g| g * scale)
            .collect();
        let mut g1: Vec<f32> = rng
            .uniform_vec(5, -1.0, 1.0)
            .iter()
            .map(|g| g * scale)
            .collect();
        match kind {
            'N' => g0[step % 37] = f32::NAN,
            'I' => g1[4] = f32::INFINITY,
            'J' => g1[0] = f32::NEG_INFINITY,
            _ => {}
        }
        set_grads(&mut v, &[&g0, &g1]);
        let before = snapshot(&v, &opt);
        let iterations = opt.inner().iterations();
        let check = opt.get_unscaled_gradients(&mut v).unwrap();
        let outcome = opt.apply_gradients(&mut v).unwrap();
        assert_eq!(outcome.scale_before, scale);
        if kind == 'F' {
            assert!(check.all_finite && outcome.applied);
            assert_ne!(snapshot(&v, &opt), before);
            assert_eq!(opt.inner().iterations(), iterations + 1);
            good += 1;
            if good == 3 {
                expected_scale *= 2.0;
                good = 0;
            }
        } else {
            assert!(!outcome.applied);
            let culprit = if kind == 'N' {
                "layer_0/kernel"
            } else {
                "layer_1/kernel"
            };
            assert_eq!(outcome.first_nonfinite.as_deref(), Some(culprit));
            assert_eq!(snapshot(&v, &opt), before, "a skipped step changed state");
            assert_eq!(
                opt.inner().iterations(),
                iterations,
                "skips do not advance iterations"
            );
            expected_scale /= 2.0;
            good = 0;
        }
        assert_eq!(outcome.scale_after, expected_scale);
    }
    assert_eq!(opt.skipped_steps(), 3);
    assert_eq!(opt.applied_steps(), 9);
}

#[test]
fn unscaled_gradients_are_divided_by_the_scale() {
    let mut v = vars(&[&[0.0, 0.0, 0.0]]);
    let mut opt = LossScaleOptimizer::new(Sgd::new(1.0).unwrap());
    assert_eq!(opt.get_scaled_loss(2.0), 65536.0);
    set_grads(&mut v, &[&[32768.0, -16384.0, 1.0]]);
    let check = opt.get_unscaled_gradients(&mut v).unwrap();
    assert!(check.all_finite);
    assert_eq!(v[0].grad().as_slice().unwrap(), &[1.0, -0.5, 1.0 / 32768.0]);
    let out = opt.apply_gradients(&mut v).unwrap();
    assert!(out.applied);
    assert_eq!(value(&v[0]), vec![-1.0, 0.5, -1.0 / 32768.0]);
}

/// No silent death: a model whose gradients are always NaN stops training with a clear error.
#[test]
fn collapse_guard_fires() {
    let mut v = vars(&[&[1.0]]);
    let mut opt = LossScaleOptimizer::new(Sgd::default())
        .with_max_skips_at_floor(5)
        .unwrap();
    let mut steps = 0;
    let err = loop {
        set_grads(&mut v, &[&[f32::NAN]]);
        let _ = opt.get_unscaled_gradients(&mut v).unwrap();
        match opt.apply_gradients(&mut v) {
            Ok(out) => assert!(!out.applied),
            Err(e) => break e,
        }
        steps += 1;
        assert!(steps < 100, "the guard never fired");
    };
    // 2^15 reaches the floor of 1 after 15 skips; then 5 more at the floor.
    assert_eq!(opt.loss_scale(), 1.0);
    assert_eq!(steps + 1, 15 + 5);
    let msg = err.to_string();
    assert!(matches!(err, Error::LossScaleCollapsed { skipped: 5, .. }));
    assert!(
        msg.contains("forward pass") && msg.contains("layer_0/kernel"),
        "{msg}"
    );
    assert_eq!(value(&v[0]), vec![1.0]);
}

#[test]
fn a_fixed_scale_skips_and_guards_too() {
    let mut v = vars(&[&[1.0]]);
    let mut opt =
        LossScaleOptimizer::with_loss_scale(Sgd::default(), LossScale::fixed(128.0).unwrap())
            .with_max_skips_at_floor(3)
            .unwrap();
    for i in 0..3 {
        set_grads(&mut v, &[&[f32::INFINITY]]);
        let r = opt.apply_gradients(&mut v);
        if i < 2 {
            assert!(!r.unwrap().applied);
        } else {
            assert!(r.is_err());
        }
        assert_eq!(opt.loss_scale(), 128.0);
    }
}

#[test]
fn variable_sets_visit_in_order() {
    let mut v = vars(&[&[1.0], &[2.0]]);
    let mut names = vec![];
    v.for_each_variable(&mut |n, _| {
        names.push(n.to_string());
        Ok(())
    })
    .unwrap();
    assert_eq!(names, vec!["layer_0/kernel", "layer_1/kernel"]);
}

fn sgd_with(clip: mp_optim::Clip) -> Sgd {
    Sgd::new(1.0).unwrap().with_clip(clip).unwrap()
}

#[test]
fn gradient_clipping_matches_float64() {
    use mp_optim::Clip;
    let mut rng = Rng::new(mp_core::rng::test_seed("gradient_clipping"));
    // Lengths that are not multiples of any block: one gradient with norm well above the
    // threshold, one well below.
    let g0: Vec<f32> = rng.uniform_vec(4099, -1.0, 1.0);
    let g1: Vec<f32> = rng.uniform_vec(7, -0.01, 0.01);
    let norm = |g: &[f32]| g.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let (n0, n1) = (norm(&g0), norm(&g1));
    let global = (n0 * n0 + n1 * n1).sqrt();
    let c = 2.5f32;
    assert!(n0 > 2.5 && n1 < 2.5);
    // With SGD at rate 1 from zero weights, the weights are minus the clipped gradients.
    let run = |clip: Clip| {
        let mut v = vars(&[&vec![0.0; g0.len()], &[0.0; 7]]);
        set_grads(&mut v, &[&g0, &g1]);
        let mut opt = sgd_with(clip);
        opt.apply_gradients(&mut v).unwrap();
        (value(&v[0]), value(&v[1]), opt.gradient_norm())
    };
    let check = |got: &[f32], g: &[f32], factor: f64| {
        for (w, g) in got.iter().zip(g) {
            let want = -f64::from(*g) * factor;
            assert!(
                (f64::from(*w) - want).abs() <= 1e-6 * want.abs() + 1e-12,
                "{w} vs {want}"
            );
        }
    };
    let (w0, w1, n) = run(Clip::GlobalNorm(c));
    let f = f64::from(c) / global;
    check(&w0, &g0, f);
    check(&w1, &g1, f);
    assert!((n.unwrap() - global).abs() <= 1e-12 * global);
    let clipped = w0
        .iter()
        .chain(&w1)
        .map(|&x| f64::from(x).powi(2))
        .sum::<f64>();
    assert!(
        (clipped.sqrt() - f64::from(c)).abs() < 1e-5,
        "{}",
        clipped.sqrt()
    );
    let (w0, w1, _) = run(Clip::Norm(c));
    check(&w0, &g0, f64::from(c) / n0);
    assert_eq!(
        w1,
        g1.iter().map(|g| -g).collect::<Vec<_>>(),
        "below the norm: unchanged"
    );
    let (w0, _, n) = run(Clip::Value(0.5));
    assert!(n.is_none());
    for (w, g) in w0.iter().zip(&g0) {
        assert_eq!(*w, -g.clamp(-0.5, 0.5));
    }
    // A threshold above the norm leaves the gradients bit-identical.
    let (w0, _, _) = run(Clip::GlobalNorm(1e6));
    assert_eq!(w0, g0.iter().map(|g| -g).collect::<Vec<_>>());
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        for clip in [Clip::Value(bad), Clip::Norm(bad), Clip::GlobalNorm(bad)] {
            let e = Sgd::default().with_clip(clip).unwrap_err().to_string();
            assert!(e.contains("must be finite and positive"), "{e}");
        }
    }
}

#[test]
fn clipping_under_loss_scaling_sees_unscaled_finite_gradients() {
    use mp_optim::Clip;
    let g = [3.0f32, -4.0]; // norm 5
    // The same clipped step with loss scale 1 and 2^15: the threshold is in real units.
    let mut results = vec![];
    for scale in [1.0f32, 32768.0] {
        let mut v = vars(&[&[0.0, 0.0]]);
        let mut opt = LossScaleOptimizer::with_loss_scale(
            sgd_with(Clip::GlobalNorm(1.0)),
            LossScale::fixed(scale).unwrap(),
        );
        set_grads(&mut v, &[&[g[0] * scale, g[1] * scale]]);
        opt.get_unscaled_gradients(&mut v).unwrap();
        assert!(opt.apply_gradients(&mut v).unwrap().applied);
        assert_eq!(opt.inner().gradient_norm(), Some(5.0));
        results.push(value(&v[0]));
    }
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0], vec![-0.6, 0.8]);
    // An infinite gradient is skipped, not clipped into a finite step.
    let mut v = vars(&[&[0.0, 0.0]]);
    let mut opt = LossScaleOptimizer::new(sgd_with(Clip::GlobalNorm(1.0)));
    set_grads(&mut v, &[&[f32::INFINITY, 1.0]]);
    opt.get_unscaled_gradients(&mut v).unwrap();
    assert!(!opt.apply_gradients(&mut v).unwrap().applied);
    assert_eq!(value(&v[0]), vec![0.0, 0.0]);
    assert_eq!(opt.inner().gradient_norm(), None);
}

/// Every slot of an optimizer as `(variable, slot, bits)`.
type SlotBits = Vec<(String, &'static str, Vec<u32>)>;

/// Every variable's value and every slot, as bits: what a skipped update must leave as it was.
fn bits_of(v: &[Variable], opt: &dyn Optimizer) -> (Vec<u32>, SlotBits) {
    let w = v.iter().flat_map(value).map(f32::to_bits).collect();
    let s = opt
        .state()
        .into_iter()
        .map(|(n, s, t)| {
            (
                n,
                s,
                t.as_slice().unwrap().iter().map(|x| x.to_bits()).collect(),
            )
        })
        .collect();
    (w, s)
}

/// A finite state and finite gradients whose update would overflow: the whole step is skipped,
/// every variable and slot bit-identical, `iterations` unchanged, and the outcome names the
/// first variable and what would have been non-finite. The next finite step applies.
#[test]
fn an_update_that_would_be_non_finite_is_skipped_and_changes_nothing() {
    use mp_optim::Update;
    // (optimizer, how to make it, gradients of the second variable, whether its value and
    // which of its slots the skip names)
    type Case = (
        &'static str,
        fn() -> Box<dyn Optimizer>,
        [f32; 2],
        bool,
        &'static [&'static str],
    );
    let cases: [Case; 6] = [
        // Adam: g = 1e30 is finite, g * g is not: v overflows (the step itself is m / inf = 0).
        (
            "Adam",
            || Box::new(Adam::default()),
            [0.1, 1e30],
            false,
            &["v"],
        ),
        (
            "AdamW",
            || Box::new(AdamW::default()),
            [-1e30, 0.1],
            false,
            &["v"],
        ),
        // RMSprop: the mean square overflows the same way.
        (
            "RMSprop",
            || Box::new(RmsProp::default()),
            [1e30, 0.1],
            false,
            &["velocity"],
        ),
        (
            "RMSprop",
            || Box::new(RmsProp::default().with_momentum(0.5).unwrap()),
            [1e30, 0.1],
            false,
            &["velocity"],
        ),
        // SGD: -0.9 MAX - 1.0 * MAX overflows the variable itself (the momentum, -MAX, does
        // not).
        (
            "SGD",
            || Box::new(Sgd::new(1.0).unwrap()),
            [f32::MAX, 0.1],
            true,
            &[],
        ),
        (
            "SGD",
            || Box::new(Sgd::new(1.0).unwrap().with_momentum(0.5).unwrap()),
            [f32::MAX, 0.1],
            true,
            &[],
        ),
    ];
    for (name, make, bad, value_bad, slots_bad) in cases {
        let mut opt = make();
        let mut v = vars(&[&[0.5, -0.25, 2.0], &[-f32::MAX * 0.9, 1.0]]);
        // A good step first, so the slots hold state.
        set_grads(&mut v, &[&[0.1, 0.2, -0.3], &[-0.5, 0.5]]);
        assert_eq!(opt.apply_gradients(&mut v).unwrap(), Update::Applied);
        let before = bits_of(&v, opt.as_ref());
        set_grads(&mut v, &[&[0.1, 0.2, -0.3], &bad]);
        let out = opt.apply_gradients(&mut v).unwrap();
        let Update::Skipped(skip) = &out else {
            panic!("{name}: {out:?}")
        };
        assert!(!out.applied());
        assert_eq!(skip.optimizer, name);
        assert_eq!(
            skip.variable, "layer_1/kernel",
            "{name}: the first such variable"
        );
        assert_eq!(skip.value, value_bad, "{name}: {skip}");
        assert_eq!(skip.slots, slots_bad, "{name}: {skip}");
        assert_eq!(bits_of(&v, opt.as_ref()), before, "{name}: {skip}");
        assert_eq!(opt.iterations(), 1, "{name}");
        // The next finite step applies as if the skipped one had never been.
        set_grads(&mut v, &[&[0.1, 0.2, -0.3], &[0.5, 0.5]]);
        assert!(opt.apply_gradients(&mut v).unwrap().applied(), "{name}");
        assert_eq!(opt.iterations(), 2);
    }
    let skip = mp_optim::NonFiniteUpdate {
        optimizer: "Adam",
        variable: "dense_1/kernel".into(),
        value: true,
        slots: vec!["m", "v"],
    };
    assert_eq!(
        skip.to_string(),
        "the update of dense_1/kernel would make its value and Adam's m and Adam's v non-finite"
    );
}

/// A non-finite gradient given straight to an optimizer (a custom loop without loss scaling)
/// makes a non-finite update, which is skipped too; a skipped first step leaves no slots.
#[test]
fn a_non_finite_gradient_without_loss_scaling_is_skipped_by_the_optimizer() {
    let mut v = vars(&[&[1.0, 2.0]]);
    let mut opt = Adam::default();
    set_grads(&mut v, &[&[f32::NAN, 1.0]]);
    let out = opt.apply_gradients(&mut v).unwrap();
    assert!(!out.applied(), "{out:?}");
    assert_eq!(value(&v[0]), vec![1.0, 2.0]);
    assert_eq!(opt.iterations(), 0);
    assert!(
        opt.state().is_empty(),
        "a skipped first step builds no state"
    );
    set_grads(&mut v, &[&[1.0, 1.0]]);
    assert!(opt.apply_gradients(&mut v).unwrap().applied());
    assert_eq!(opt.state().len(), 2);
}

/// Under loss scaling, finite gradients whose update would overflow skip the step without
/// touching the loss scale: not halved, its good-step count neither advanced nor reset, no
/// skipped (gradient) step counted, nothing applied; the outcome names the update.
#[test]
fn a_non_finite_update_under_loss_scaling_leaves_the_scale_alone() {
    let dynamic = mp_core::DynamicLossScale::new(1024.0, 5, 2.0).unwrap();
    let mut opt = LossScaleOptimizer::with_loss_scale(Adam::default(), LossScale::Dynamic(dynamic));
    let mut v = vars(&[&[1.0, 2.0]]);
    for _ in 0..2 {
        set_grads(&mut v, &[&[1024.0, -1024.0]]);
        opt.get_unscaled_gradients(&mut v).unwrap();
        assert!(opt.apply_gradients(&mut v).unwrap().applied);
    }
    let scaling = opt.scaling_state();
    let weights = snapshot(&v, &opt);
    // 1e30 after unscaling: finite, but Adam's v = 1e-3 * 1e60 overflows.
    set_grads(&mut v, &[&[1e30 * 1024.0, 1.0]]);
    let check = opt.get_unscaled_gradients(&mut v).unwrap();
    assert!(check.all_finite);
    let out = opt.apply_gradients(&mut v).unwrap();
    assert!(!out.applied);
    assert_eq!((out.scale_before, out.scale_after), (1024.0, 1024.0));
    assert_eq!(out.first_nonfinite, None);
    let skip = out.nonfinite_update.expect("the update is named");
    assert_eq!(
        skip.to_string(),
        "the update of layer_0/kernel would make Adam's v non-finite"
    );
    assert_eq!(
        opt.scaling_state(),
        scaling,
        "scale, good steps and counts unchanged"
    );
    assert_eq!(snapshot(&v, &opt), weights);
    // The run of good steps continues where it was: 3 more make 5, and the scale grows.
    for _ in 0..3 {
        set_grads(&mut v, &[&[1024.0, -1024.0]]);
        opt.get_unscaled_gradients(&mut v).unwrap();
        assert!(opt.apply_gradients(&mut v).unwrap().applied);
    }
    assert_eq!(opt.loss_scale(), 2048.0);
    assert_eq!(opt.applied_steps(), 5);
    assert_eq!(opt.skipped_steps(), 0);
}

/// A rule of one's own gets the check without writing one: the trait's default runs its update
/// on copies and checks them.
#[test]
fn a_custom_rule_is_checked_by_the_default_out_of_place_update() {
    use mp_core::{F32, Tensor};
    use mp_optim::{Optim, UpdateRule};

    /// `w *= g`, a rule that overflows on large gradients.
    #[derive(Clone, Debug)]
    struct Scale;
    impl UpdateRule for Scale {
        const NAME: &'static str = "Scale";
        fn slots(&self) -> &'static [&'static str] {
            &["last"]
        }
        fn config(&self) -> Vec<(&'static str, f64)> {
            vec![]
        }
        fn update(
            &self,
            _: &str,
            _: f32,
            _: u64,
            var: &mut Tensor<F32>,
            grad: &Tensor<F32>,
            slots: &mut [Tensor<F32>],
        ) -> mp_optim::Result<()> {
            let g = grad.as_slice()?.to_vec();
            for (w, g) in var.as_mut_slice()?.iter_mut().zip(&g) {
                *w *= g;
            }
            slots[0].copy_from_slice(&g)?;
            Ok(())
        }
    }
    let mut opt = Optim::with_rule(Scale, 0.1).unwrap();
    let mut v = vars(&[&[1e30, 1.0]]);
    set_grads(&mut v, &[&[2.0, 3.0]]);
    assert!(opt.apply_gradients(&mut v).unwrap().applied());
    assert_eq!(value(&v[0]), vec![2e30, 3.0]);
    set_grads(&mut v, &[&[1e9, 3.0]]);
    let out = opt.apply_gradients(&mut v).unwrap();
    assert_eq!(
        out,
        mp_optim::Update::Skipped(mp_optim::NonFiniteUpdate {
            optimizer: "Scale",
            variable: "layer_0/kernel".into(),
            value: true,
            slots: vec![],
        })
    );
    assert_eq!(value(&v[0]), vec![2e30, 3.0]);
    assert_eq!(opt.state()[0].2.as_slice().unwrap(), &[2.0, 3.0]);
}

/// Saved optimizer state is checked value by value: NaN or infinity in any slot, or a second
/// moment below 0, is refused naming the variable, the slot and the value, and the optimizer is
/// unchanged. A negative first moment is a valid state.
#[test]
fn saved_slots_outside_their_domain_are_refused_by_name() {
    let mut v = vars(&[&[1.0, 2.0], &[3.0]]);
    let mut opt = Adam::default();
    set_grads(&mut v, &[&[0.5, -0.5], &[1.0]]);
    opt.apply_gradients(&mut v).unwrap();
    let good: Vec<(String, String, Tensor)> = opt
        .state()
        .into_iter()
        .map(|(n, s, t)| (n, s.to_string(), t.clone()))
        .collect();
    let before = bits_of(&v, &opt);
    type Tensor = mp_core::Tensor<mp_core::F32>;
    let with = |entry: usize, index: usize, x: f32| {
        let mut g = good.clone();
        let mut values = g[entry].2.as_slice().unwrap().to_vec();
        values[index] = x;
        g[entry].2 = Tensor::from_vec(g[entry].2.shape(), values).unwrap();
        g
    };
    // Entries: layer_0 m, layer_0 v, layer_1 m, layer_1 v.
    let cases = [
        (
            with(1, 1, f32::NAN),
            r#"Adam slot "v" of "layer_0/kernel" holds NaN at index 1, which is not finite"#,
        ),
        (
            with(3, 0, -1.0),
            r#"Adam slot "v" of "layer_1/kernel" holds -1.0 at index 0, which is below 0"#,
        ),
        (
            with(0, 0, f32::INFINITY),
            r#"Adam slot "m" of "layer_0/kernel" holds inf at index 0, which is not finite"#,
        ),
        (
            with(2, 0, f32::NEG_INFINITY),
            r#"Adam slot "m" of "layer_1/kernel" holds -inf at index 0"#,
        ),
    ];
    for (bad, want) in cases {
        let e = opt.load_state(1, bad).unwrap_err();
        assert!(matches!(e, Error::InvalidSlot { .. }), "{e:?}");
        assert!(e.to_string().starts_with(want), "{e}");
        assert_eq!(bits_of(&v, &opt), before);
        assert_eq!(opt.iterations(), 1);
    }
    opt.load_state(1, with(0, 0, -3.0)).unwrap();
    assert_eq!(opt.state()[0].2.as_slice().unwrap()[0], -3.0);
    // RMSprop's velocity is a mean square too; its momentum may be negative.
    let mut rms = RmsProp::default().with_momentum(0.5).unwrap();
    let state = |v: f32, m: f32| {
        vec![
            (
                "w".to_string(),
                "velocity".to_string(),
                Tensor::from_vec(&[1], vec![v]).unwrap(),
            ),
            (
                "w".to_string(),
                "momentum".to_string(),
                Tensor::from_vec(&[1], vec![m]).unwrap(),
            ),
        ]
    };
    let e = rms.load_state(1, state(-1.0, 0.0)).unwrap_err().to_string();
    assert!(
        e.contains(r#"slot "velocity" of "w" holds -1.0 at index 0, which is below 0"#),
        "{e}"
    );
    rms.load_state(1, state(0.5, -0.5)).unwrap();
    assert_eq!(
        Adam::default().slot_domain("v"),
        mp_core::Domain::NonNegative
    );
    assert_eq!(Adam::default().slot_domain("m"), mp_core::Domain::Finite);
    assert_eq!(
        Sgd::default().slot_domain("momentum"),
        mp_core::Domain::Finite
    );
}
