//! Optimizers against steps computed by hand, and the loss-scale optimizer's guarantees.

use mp_core::{LossScale, Rng, Tensor, Variable};
use mp_optim::{Adam, Error, LossScaleOptimizer, Optimizer, RmsProp, Sgd, VariableSet};

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
