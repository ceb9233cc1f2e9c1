//! `bench vit`: the `mnist_vit` network's training step per policy.
//!
//! The step of [`MnistVit`] (AdamW, as `mnist_vit` trains it) on a random batch of `16x49`
//! patches (default batch 128, `mnist_vit`'s) under `float32`, `mixed_bfloat16` and
//! `mixed_float16`, interleaved per round as `bench cnn` does: the median step, its ratio to
//! float32's in the same round, its GFLOP/s from the GEMMs of a step ([`vit_flop`]) against the
//! measured peak of the policy's GEMM path, and the activation memory (peak tensor bytes during
//! a step minus what was held before).

use anyhow::Result;
use mp_core::{Float32, MixedBFloat16, MixedFloat16, Policy, PolicyKind, Rng};
use mp_layers::{Layer, SparseCategoricalCrossentropy, Trainer};
use mp_optim::AdamW;
use ndarray::{Array1, Array3, Ix3};

use crate::MnistVit;
use crate::bench_util::{
    Bounds, FitStep, Variant, activation_bytes, op_table, parse, step_rows, step_table_header,
    time, write_report,
};
use crate::transformer::{
    VIT_BLOCKS, VIT_CLASSES, VIT_HEADS, VIT_LEARNING_RATE, VIT_MLP, VIT_NO_DECAY, VIT_PATCH_VALUES,
    VIT_PATCHES, VIT_WIDTH,
};

/// The GEMM FLOPs (multiply-adds × 2) of one training step of [`MnistVit`] at `batch`.
///
/// A GEMM of `m x k` by `k x n` is `2·m·n·k` forward; backward computes the gradients of both
/// operands, twice that, except that the first layer computes no input gradient (the model's
/// input needs none). With `t = VIT_PATCHES + 1` tokens (the class token first), width `d`,
/// `h` heads of `d / h`, and MLP width `f`, per sample:
///
/// - the patch embedding, `Dense(VIT_PATCH_VALUES -> d)` over the `VIT_PATCHES` patches:
///   `2·VIT_PATCHES·VIT_PATCH_VALUES·d`, forward and kernel gradient only;
/// - per encoder block (`VIT_BLOCKS` of them), three times its forward:
///   - the query, key, value and output projections, `Dense(d -> d)` over `t` tokens:
///     `4 · 2·t·d·d`;
///   - per head, the scores `Q Kᵀ` (`t x d/h` by `d/h x t`) and the value product `P V`
///     (`t x t` by `t x d/h`): `2 · h · 2·t·t·(d/h)`;
///   - the MLP, `Dense(d -> f)` and `Dense(f -> d)` over `t` tokens: `2 · 2·t·d·f`;
/// - the logits, `Dense(d -> VIT_CLASSES)` on the class token alone: three times
///   `2·d·VIT_CLASSES`.
///
/// Layer normalization, GELU, the softmaxes, the residual additions and the optimizer are not
/// GEMMs and are not counted.
pub fn vit_flop(batch: usize) -> f64 {
    let (t, d, h, f) = (VIT_PATCHES + 1, VIT_WIDTH, VIT_HEADS, VIT_MLP);
    let gemm = |m: usize, n: usize, k: usize| 2.0 * (m * n * k) as f64;
    let patches = 2.0 * gemm(VIT_PATCHES, d, VIT_PATCH_VALUES);
    let projections = 4.0 * gemm(t, d, d);
    let attention = h as f64 * (gemm(t, t, d / h) + gemm(t, d / h, t));
    let mlp = gemm(t, f, d) + gemm(t, d, f);
    let blocks = VIT_BLOCKS as f64 * 3.0 * (projections + attention + mlp);
    let logits = 3.0 * gemm(1, VIT_CLASSES, d);
    batch as f64 * (patches + blocks + logits)
}

/// The step of [`MnistVit`] (AdamW with `mnist_vit`'s weight-decay exclusions) on `batch`
/// random patches and labels.
fn vit_step<P: PolicyKind>(batch: usize) -> Result<Box<dyn Variant>> {
    let mut model = MnistVit::<P>::issue();
    model.build(&[VIT_PATCHES, VIT_PATCH_VALUES])?;
    let optimizer = AdamW::new(VIT_LEARNING_RATE)?.exclude_from_weight_decay(VIT_NO_DECAY);
    let trainer = Trainer::compile(model, optimizer, SparseCategoricalCrossentropy::new());
    let mut rng = Rng::new(1);
    let n = batch * VIT_PATCHES * VIT_PATCH_VALUES;
    let x = Array3::from_shape_vec(
        (batch, VIT_PATCHES, VIT_PATCH_VALUES),
        rng.uniform_vec(n, 0.0, 1.0),
    )?;
    let y = Array1::from_shape_fn(batch, |_| rng.below(VIT_CLASSES as u64) as u32);
    Ok(Box::new(FitStep::<_, _, Ix3>::new(trainer, x, y)))
}

/// One step of the network under `policy` at `batch` (for `bench repeat`).
pub(crate) fn step_for(policy: Policy, batch: usize) -> Result<Box<dyn Variant>> {
    match policy {
        Policy::Float32 => vit_step::<Float32>(batch),
        Policy::MixedBFloat16 => vit_step::<MixedBFloat16>(batch),
        Policy::MixedFloat16 => vit_step::<MixedFloat16>(batch),
    }
}

/// Runs `bench vit` and writes its JSON (with the report's markdown section in `markdown`).
pub fn vit_cmd(args: &[String]) -> Result<()> {
    let o = parse(args, "vit", 128)?;
    let batch = o.batch;

    // Memory of one step per policy, from a clean start each.
    let mut steps = vec![
        vit_step::<Float32>(batch)?,
        vit_step::<MixedBFloat16>(batch)?,
        vit_step::<MixedFloat16>(batch)?,
    ];
    let activation = activation_bytes(&mut steps)?;
    let flop = vit_flop(batch);
    let timed = time(&mut steps, o.rounds, flop)?;

    let mut md = step_table_header(&format!(
        "The mnist_vit network (AdamW), batch {batch}, median of {} interleaved rounds (each a run of 1 to 8 steps, about 100 ms)",
        o.rounds
    ));
    let (rows, records) = step_rows(&steps, &timed, &activation, flop, batch)?;
    md.push_str(&rows);
    md.push_str(&format!(
        "\nFLOP per step: {:.3} GFLOP (the GEMMs' multiply-adds × 2: the patch embedding, per \
         block the Q, K, V and output projections, the scores and value products per head and \
         the MLP, and the logits; forward, and twice that backward but the first layer's input \
         gradient); \"of peak\" pairs each step with the peak of its GEMM path measured right \
         before and after it.\n",
        flop / 1e9
    ));
    let bounds = Bounds::measure()?;
    let (ops, op_records) = op_table(
        &format!("Where the mnist_vit step's time goes, batch {batch}"),
        &mut steps,
        o.rounds.max(3),
        &bounds,
    )?;
    md.push('\n');
    md.push_str(&ops);
    let mut records = records;
    records.extend(op_records);
    write_report(&o, records, &md)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The constants [`vit_flop`] counts from describe the model: its parameters, recounted
    /// from them, are the built model's.
    #[test]
    fn constants_describe_the_model() {
        let (t, d, f) = (VIT_PATCHES + 1, VIT_WIDTH, VIT_MLP);
        let dense = |i: usize, o: usize| i * o + o;
        let norm = 2 * d;
        let block = norm + 4 * dense(d, d) + norm + dense(d, f) + dense(f, d);
        let params = dense(VIT_PATCH_VALUES, d)
            + d // class token
            + t * d // positions
            + VIT_BLOCKS * block
            + norm
            + dense(d, VIT_CLASSES);
        let mut model = MnistVit::<Float32>::issue();
        let out = model.build(&[VIT_PATCHES, VIT_PATCH_VALUES]).unwrap();
        assert_eq!(out, vec![VIT_CLASSES]);
        assert_eq!(model.param_count(), params);
    }

    #[test]
    fn flop_is_linear_in_the_batch() {
        // Per sample: patches 2·(2·16·49·64), blocks 4·3·(4·2·17·64·64 + 4·2·(2·17·17·16) +
        // 2·2·17·64·128), logits 3·2·64·10.
        assert_eq!(vit_flop(1), 14_461_696.0);
        assert_eq!(vit_flop(128), 128.0 * vit_flop(1));
    }
}
