//! Layers: gradients against central finite differences, mixed-policy gradients against
//! float32 ones, and proof that mixed precision really runs in 16 bits.

use mp_core::{
    BF16, DType, DTypeKind, F16, F32, Float32, MixedBFloat16, MixedFloat16, PolicyKind, Rng, Tensor,
};
use mp_layers::{Activation, Dense, Flatten, Layer, Softmax};

/// `L = sum(y * r)` for a fixed random `r`: its gradient with respect to `y` is `r`.
fn weighted_sum(y: &Tensor<F32>, r: &[f32]) -> f64 {
    y.as_slice()
        .unwrap()
        .iter()
        .zip(r)
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum()
}

fn rand_tensor(rng: &mut Rng, shape: &[usize], lo: f32, hi: f32) -> Tensor<F32> {
    let n = shape.iter().product();
    Tensor::from_vec(shape, rng.uniform_vec(n, lo, hi)).unwrap()
}

/// Checks a float32 layer's input and variable gradients against central differences of
/// `L = sum(forward(x) * r)`. Returns the largest error relative to the gradient's scale.
fn gradcheck<L: Layer<Policy = Float32, Input = F32, Output = F32>>(
    layer: &mut L,
    x: Tensor<F32>,
    eps: f32,
    tol: f64,
    seed: u64,
) {
    // Which outputs are exactly 0 (ReLU units off): a difference step that changes this
    // crosses a kink and has no central difference to compare with.
    let off = |y: &Tensor<F32>| -> Vec<bool> {
        y.as_slice().unwrap().iter().map(|&v| v == 0.0).collect()
    };
    let mut rng = Rng::new(seed);
    let y = layer.forward_train(&x).unwrap();
    let r = rng.uniform_vec(y.len(), -1.0, 1.0);
    let dy = Tensor::<F32>::from_vec(y.shape(), r.clone()).unwrap();
    layer
        .visit_variables("", &mut |_, v| Ok(v.zero_grad()?))
        .unwrap();
    let dx = layer.backward(&dy, true).unwrap().expect("dx requested");

    // Input gradient.
    let scale = dx
        .as_slice()
        .unwrap()
        .iter()
        .fold(1e-3f64, |m, &g| m.max(g.abs() as f64));
    for i in (0..x.len()).step_by((x.len() / 23).max(1)) {
        let mut xp = x.clone();
        xp.as_mut_slice().unwrap()[i] += eps;
        let mut xm = x.clone();
        xm.as_mut_slice().unwrap()[i] -= eps;
        let (yp, ym) = (layer.forward(&xp).unwrap(), layer.forward(&xm).unwrap());
        // A step that moves a ReLU unit across its kink has no central difference to compare
        // with: skip that coordinate (the units off in one output and on in the other).
        if off(&yp) != off(&ym) {
            continue;
        }
        let num = (weighted_sum(&yp, &r) - weighted_sum(&ym, &r)) / (2.0 * eps as f64);
        let ana = dx.as_slice().unwrap()[i] as f64;
        assert!(
            (num - ana).abs() <= tol * scale,
            "dx[{i}]: numeric {num}, analytic {ana} (scale {scale})"
        );
    }

    // Variable gradients.
    let mut grads = vec![];
    layer
        .visit_variables("", &mut |name, v| {
            grads.push((
                name.to_string(),
                v.grad().as_slice()?.to_vec(),
                v.value().len(),
            ));
            Ok(())
        })
        .unwrap();
    for (name, grad, len) in grads {
        let scale = grad.iter().fold(1e-3f64, |m, &g| m.max(g.abs() as f64));
        for i in (0..len).step_by((len / 17).max(1)) {
            let eval = |layer: &mut L, delta: f32| {
                layer
                    .visit_variables("", &mut |n, v| {
                        if n == name {
                            v.value_mut().as_mut_slice()?[i] += delta;
                        }
                        Ok(())
                    })
                    .unwrap();
                let l = layer.forward(&x).unwrap();
                layer
                    .visit_variables("", &mut |n, v| {
                        if n == name {
                            v.value_mut().as_mut_slice()?[i] -= delta;
                        }
                        Ok(())
                    })
                    .unwrap();
                l
            };
            let (yp, ym) = (eval(layer, eps), eval(layer, -eps));
            if off(&yp) != off(&ym) {
                continue; // across a ReLU kink, as above
            }
            let num = (weighted_sum(&yp, &r) - weighted_sum(&ym, &r)) / (2.0 * eps as f64);
            let ana = grad[i] as f64;
            assert!(
                (num - ana).abs() <= tol * scale,
                "{name}[{i}]: numeric {num}, analytic {ana}"
            );
        }
    }
}

#[test]
fn dense_gradients_match_finite_differences() {
    let seed = mp_core::rng::test_seed("dense_gradients_match_finite_differences");
    let mut rng = Rng::new(seed);
    // Linear in the weights, so central differences are exact up to float32 rounding.
    let mut dense = Dense::<Float32>::new(7).with_seed(seed);
    dense.set_name("dense_1");
    dense.build(&[13]).unwrap();
    gradcheck(
        &mut dense,
        rand_tensor(&mut rng, &[5, 13], -1.0, 1.0),
        1e-2,
        1e-3,
        seed,
    );
    // With ReLU: keep pre-activations away from the kink by using a small step.
    let mut dense = Dense::<Float32>::new(9).relu().with_seed(seed ^ 1);
    dense.build(&[6]).unwrap();
    gradcheck(
        &mut dense,
        rand_tensor(&mut rng, &[4, 6], -1.0, 1.0),
        1e-3,
        1e-2,
        seed,
    );
}

#[test]
fn activation_gradients_match_finite_differences() {
    let seed = mp_core::rng::test_seed("activation_gradients_match_finite_differences");
    let mut rng = Rng::new(seed);
    for mut layer in [
        Activation::<Float32>::sigmoid(),
        Activation::tanh(),
        Activation::linear(),
        Activation::softmax(),
    ] {
        gradcheck(
            &mut layer,
            rand_tensor(&mut rng, &[3, 11], -2.0, 2.0),
            1e-3,
            5e-3,
            seed,
        );
    }
    let mut softmax = Softmax::<Float32>::new();
    softmax.build(&[11]).unwrap();
    gradcheck(
        &mut softmax,
        rand_tensor(&mut rng, &[3, 11], -2.0, 2.0),
        1e-3,
        5e-3,
        seed,
    );
    // ReLU away from 0.
    let mut relu = Activation::<Float32>::relu();
    let x: Vec<f32> = rng
        .uniform_vec(40, 0.1, 1.0)
        .iter()
        .enumerate()
        .map(|(i, v)| if i % 2 == 0 { *v } else { -v })
        .collect();
    gradcheck(
        &mut relu,
        Tensor::from_vec(&[4, 10], x).unwrap(),
        1e-3,
        1e-3,
        seed,
    );
}

#[test]
fn flatten_reshapes_both_ways() {
    let mut f = Flatten::<Float32>::new();
    assert_eq!(f.build(&[2, 3]).unwrap(), vec![6]);
    let x = Tensor::<F32>::from_vec(&[2, 2, 3], (0..12).map(|i| i as f32).collect()).unwrap();
    let y = f.forward_train(&x).unwrap();
    assert_eq!(y.shape(), &[2, 6]);
    let dx = f.backward(&y, true).unwrap().unwrap();
    assert_eq!(dx.shape(), &[2, 2, 3]);
    assert!(
        f.forward(&Tensor::<F32>::zeros(&[2, 3, 2]).unwrap())
            .is_err()
    );
}

/// Dense under a mixed policy: the gradients agree with float32 within what rounding the
/// inputs, the weights and the incoming gradient to the 16-bit dtype implies. Each product
/// carries at most three roundings (x, w or dy, and the 16-bit output of the previous step),
/// so the relative Frobenius error is bounded by about 4u, u = 2^-(mantissa bits + 1).
/// Without ReLU: a pre-activation near zero can change sign when rounded, which flips the
/// mask and is not a rounding error of the gradient (ReLU's backward is exact and tested on
/// its own).
fn mixed_matches_float32<P: PolicyKind>() {
    let seed = mp_core::rng::test_seed("mixed_matches_float32");
    let mut rng = Rng::new(seed);
    let u = <P::Compute as DTypeKind>::DTYPE.unit_roundoff();
    let (rows, inp, units) = (33, 70, 19);
    let x = rand_tensor(&mut rng, &[rows, inp], -1.0, 1.0);
    let dy = rand_tensor(&mut rng, &[rows, units], -1.0, 1.0);
    let mut reference = Dense::<Float32>::new(units).with_seed(seed);
    reference.build(&[inp]).unwrap();
    let mut mixed = Dense::<P>::new(units).with_seed(seed);
    mixed.build(&[inp]).unwrap();
    reference.forward_train(&x).unwrap();
    let dx_ref = reference.backward(&dy, true).unwrap().unwrap();
    let xc: Tensor<P::Compute> = mp_kernels::ops::cast(&x).unwrap();
    mixed.forward_train(&xc).unwrap();
    let dx_mixed = mixed
        .backward(&mp_kernels::ops::cast(&dy).unwrap(), true)
        .unwrap()
        .unwrap();
    let rel = |a: &[f32], b: &[f32]| {
        let num: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den).sqrt()
    };
    let e = rel(&dx_mixed.to_f32_vec().unwrap(), dx_ref.as_slice().unwrap());
    assert!(
        e <= 4.0 * u,
        "{:?} dx relative error {e:e} > 4u = {:e}",
        P::POLICY,
        4.0 * u
    );
    let kr = reference
        .kernel()
        .unwrap()
        .grad()
        .as_slice()
        .unwrap()
        .to_vec();
    let km = mixed.kernel().unwrap().grad().as_slice().unwrap().to_vec();
    let e = rel(&km, &kr);
    assert!(
        e <= 4.0 * u,
        "{:?} kernel gradient relative error {e:e} > 4u",
        P::POLICY
    );
    let br = reference
        .bias()
        .unwrap()
        .grad()
        .as_slice()
        .unwrap()
        .to_vec();
    let bm = mixed.bias().unwrap().grad().as_slice().unwrap().to_vec();
    assert!(rel(&bm, &br) <= 4.0 * u);
}

#[test]
fn mixed_bfloat16_gradients_match_float32() {
    mixed_matches_float32::<MixedBFloat16>();
}

#[test]
fn mixed_float16_gradients_match_float32() {
    mixed_matches_float32::<MixedFloat16>();
}

/// Mixed precision is real: the 16-bit GEMM runs, and what Dense keeps for backward is 16-bit.
fn really_16_bit<P: PolicyKind>() {
    let dtype = <P::Compute as DTypeKind>::DTYPE;
    let mut dense = Dense::<P>::new(64).relu();
    dense.build(&[32]).unwrap();
    assert_eq!(
        dense.kernel().unwrap().dtype(),
        DType::F32,
        "variables stay float32"
    );
    let x = Tensor::<P::Compute>::zeros(&[8, 32]).unwrap();
    let before = mp_kernels::counters::gemm_calls(dtype);
    let y = dense.forward_train(&x).unwrap();
    assert_eq!(y.dtype(), dtype, "the output is in the compute dtype");
    assert!(
        mp_kernels::counters::gemm_calls(dtype) > before,
        "no {dtype} GEMM ran"
    );
    // Kept for backward: the input (8x32) and the ReLU output (8x64), at 2 bytes each.
    assert_eq!(dense.saved_bytes(), (8 * 32 + 8 * 64) * 2);
    let _ = dense.backward(&y, true).unwrap();
    assert_eq!(dense.saved_bytes(), 0, "backward releases what it kept");
}

#[test]
fn mixed_precision_is_real() {
    really_16_bit::<MixedBFloat16>();
    really_16_bit::<MixedFloat16>();
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let mut d = Dense::<Float32>::new(4);
    assert!(
        d.forward(&Tensor::zeros(&[2, 3]).unwrap())
            .unwrap_err()
            .to_string()
            .contains("not built")
    );
    d.set_name("dense_1");
    d.build(&[3]).unwrap();
    let e = d
        .forward(&Tensor::zeros(&[2, 5]).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("dense_1") && e.contains("(batch, 3)") && e.contains("[2, 5]"),
        "{e}"
    );
    let e = d.build(&[5]).unwrap_err().to_string();
    assert!(e.contains("[3]") && e.contains("[5]"), "{e}");
    assert!(
        d.backward(&Tensor::zeros(&[2, 4]).unwrap(), true).is_err(),
        "backward before forward_train"
    );
    assert!(Dense::<Float32>::new(0).build(&[3]).is_err());
    assert!(
        Activation::<Float32>::from_name("swish")
            .unwrap_err()
            .to_string()
            .contains("relu")
    );
    let _: Tensor<BF16> = Tensor::zeros(&[1]).unwrap();
    let _: Tensor<F16> = Tensor::zeros(&[1]).unwrap();
}

#[test]
fn nan_propagates_through_dense() {
    let mut d = Dense::<MixedBFloat16>::new(3).relu();
    d.build(&[2]).unwrap();
    let x = Tensor::<BF16>::from_f32(&[1, 2], &[f32::NAN, 1.0]).unwrap();
    let y = d.forward(&x).unwrap().to_f32_vec().unwrap();
    assert!(y.iter().all(|v| v.is_nan()), "{y:?}");
}
