//! A causal decoder that learns to reverse sequences of random tokens, under any policy.
//!
//! ```sh
//! cargo run --release -p examples --bin reverse_lm -- [--policy mixed_float16] [--steps 1000]
//!     [--batch-size 64] [--vocab 32] [--length 16] [--seed 0]
//! ```
//!
//! Each sequence is `length` tokens drawn from `1..vocab`, the separator 0 and the tokens
//! reversed ([`examples::ReverseTask`]); the model ([`examples::ReverseLm`]: Embedding, learned
//! positions, 2 pre-LN blocks of causal self-attention, LayerNorm, Dense(vocab), float32
//! softmax) reads the first `2 * length` tokens and predicts the next one at every position.
//! Only the `length` reversed tokens are scored (the loss's `ignore_class`): the tokens before
//! the separator are random. Training uses the custom-loop API (`Trainer::train_step`) on fresh
//! sequences every step, AdamW with warmup and cosine decay; the token accuracy is measured on
//! 2000 held-out sequences from another seed.

use std::time::Instant;

use examples::transformer::{IGNORE, flatten_labels};
use examples::{Args, ReverseLm, ReverseTask};
use mp_core::{F32, PolicyKind, PolicyVisitor, Tensor};
use mp_layers::{Layer, Model, SparseCategoricalCrossentropy, Trainer};
use mp_optim::{AdamW, LearningRateSchedule};
use ndarray::s;

const OPTIONS: &[&str] = &["policy", "steps", "batch-size", "vocab", "length", "seed"];

/// The decoder's width and heads.
const WIDTH: usize = 64;
const HEADS: usize = 4;

struct Run {
    task: ReverseTask,
    steps: usize,
    batch_size: usize,
    seed: u64,
}

/// Token accuracy of `model` on the scored positions of `(x, y)`.
fn token_accuracy<M: Model<Input = F32>>(
    model: &M,
    x: &ndarray::Array2<f32>,
    y: &ndarray::Array2<i32>,
) -> anyhow::Result<f64> {
    let (mut right, mut total) = (0usize, 0usize);
    let n = x.nrows();
    for start in (0..n).step_by(256) {
        let end = (start + 256).min(n);
        let xb = x.slice(s![start..end, ..]);
        let ids = Tensor::<F32>::from_f32(
            &[end - start, x.ncols()],
            &xb.iter().copied().collect::<Vec<_>>(),
        )?;
        let probs = model.forward_f32(&ids)?;
        let predicted = mp_kernels::ops::argmax_rows(&probs)?;
        let labels = y.slice(s![start..end, ..]);
        for (p, &l) in predicted.iter().zip(labels.iter()) {
            if l != IGNORE {
                total += 1;
                right += usize::from(p.map(|p| p as i32) == Some(l));
            }
        }
    }
    Ok(right as f64 / total.max(1) as f64)
}

impl PolicyVisitor for Run {
    type Output = anyhow::Result<()>;

    fn visit<P: PolicyKind>(self) -> anyhow::Result<()> {
        let task = self.task;
        let mut model = ReverseLm::<P>::for_task(&task, WIDTH, HEADS);
        model.build(&[task.context()])?;
        println!("{}", model.summary());
        let schedule =
            LearningRateSchedule::warmup_cosine(1e-3, (self.steps / 20) as u64, self.steps as u64)?;
        let optimizer = AdamW::new(1e-3)?.exclude_from_weight_decay(&[
            "bias",
            "gamma",
            "beta",
            "positions",
            "embed",
        ]);
        let loss = SparseCategoricalCrossentropy::new().ignore_class(i64::from(IGNORE));
        let mut trainer =
            Trainer::compile(model, optimizer, loss).with_learning_rate_schedule(schedule)?;
        let (x_test, y_test) = task.data(2000, self.seed + 1_000_003);
        let started = Instant::now();
        let (mut loss_sum, mut skipped) = (0.0f64, 0u64);
        for step in 0..self.steps {
            let (x, y) = task.data(self.batch_size, self.seed * 1_000_000 + step as u64);
            let ids = Tensor::<F32>::from_f32(
                &[self.batch_size, task.context()],
                &x.iter().copied().collect::<Vec<_>>(),
            )?;
            let labels = flatten_labels(&y);
            let (result, _) = trainer.train_step(&ids, labels.as_slice().unwrap_or(&[]))?;
            loss_sum += f64::from(result.loss);
            skipped += u64::from(!result.applied);
            if (step + 1) % 250 == 0 {
                println!(
                    "step {:>5}: loss {:.4} (mean of the last 250), loss scale {}, {} skipped, {:.0}s",
                    step + 1,
                    loss_sum / 250.0,
                    result.loss_scale,
                    skipped,
                    started.elapsed().as_secs_f64()
                );
                loss_sum = 0.0;
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let accuracy = token_accuracy(trainer.model(), &x_test, &y_test)?;
        println!(
            "policy {} seed {}: {} steps in {seconds:.0}s, {skipped} skipped; held-out token \
             accuracy {accuracy:.4} (vocabulary {}, length {})",
            P::POLICY,
            self.seed,
            self.steps,
            task.vocab,
            task.length
        );
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::from_env(&[])?;
    args.check_known(OPTIONS)?;
    mp_core::dist::single_process(
        "reverse_lm (a custom loop of train_step on one process's batches)",
        "run mnist_fit, mnist_cnn or mnist_vit, which train data-parallel under mpirun",
    )?;
    let policy = args.policy()?;
    println!("Policy: {policy:#}");
    println!("CPU: {}", mp_kernels::peak::describe_cpu());
    let task = ReverseTask {
        vocab: args.get("vocab", 32)?,
        length: args.get("length", 16)?,
    };
    anyhow::ensure!(
        task.vocab >= 2,
        "--vocab must be at least 2 (the separator and a token)"
    );
    anyhow::ensure!(task.length >= 1, "--length must be at least 1");
    let run = Run {
        task,
        steps: args.get("steps", 1000)?,
        batch_size: args.get("batch-size", 64)?,
        seed: args.get("seed", 0)?,
    };
    // Checked before the model is built: a step needs a sample, and the learning-rate schedule
    // a step to decay over.
    anyhow::ensure!(
        run.batch_size >= 1,
        "--batch-size must be at least 1, got 0"
    );
    anyhow::ensure!(run.steps >= 1, "--steps must be at least 1, got 0");
    policy.dispatch(run)
}
