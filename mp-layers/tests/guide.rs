//! The guide's model at the guide's size: forward on a batch of 8192 under the mixed policies.

use mp_core::{DTypeKind, F32, MixedBFloat16, MixedFloat16, PolicyKind, Rng, Tensor};
use mp_layers::{Dense, Layer, Model, Softmax, convert, model};

#[model]
struct Digits {
    dense_1: Dense,
    dense_2: Dense,
    dense_logits: Dense,
    #[dtype = "float32"]
    predictions: Softmax,
}

fn guide_forward<P: PolicyKind>() {
    let seed = mp_core::rng::test_seed("guide_forward");
    let mut model = Digits::<P> {
        dense_1: Dense::new(4096).relu(),
        dense_2: Dense::new(4096).relu(),
        dense_logits: Dense::new(10),
        predictions: Softmax::new(),
    };
    model.build(&[784]).unwrap();
    // The guide's observations: dense_1 outputs the compute dtype, its kernel is float32.
    assert_eq!(model.dense_1.kernel().unwrap().dtype(), mp_core::DType::F32);
    let batch = 8192;
    let x = Tensor::<F32>::from_vec(
        &[batch, 784],
        Rng::new(seed).uniform_vec(batch * 784, 0.0, 1.0),
    )
    .unwrap();
    let xc: Tensor<P::Compute> = convert(x).unwrap();
    let h = model.dense_1.forward(&xc).unwrap();
    assert_eq!(h.dtype(), <P::Compute as DTypeKind>::DTYPE);
    let probs = model.forward_f32(&xc).unwrap();
    assert_eq!(probs.shape(), &[batch, 10]);
    for (r, row) in probs.as_slice().unwrap().chunks(10).enumerate() {
        assert!(
            row.iter().all(|p| p.is_finite() && *p >= 0.0),
            "row {r}: {row:?}"
        );
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "row {r} sums to {sum}");
    }
}

#[test]
fn guide_model_forward_mixed_float16() {
    guide_forward::<MixedFloat16>();
}

#[test]
fn guide_model_forward_mixed_bfloat16() {
    guide_forward::<MixedBFloat16>();
}
