//! Weights out and back in, then fine-tuning with a frozen body: train `mnist_cnn` on the ten
//! digits, export it in PyTorch's layout as bfloat16, load its body into the same network with a
//! two-class head (even or odd), train the head alone with the body frozen, then unfreeze and
//! train everything one more epoch.
//!
//! ```sh
//! cargo run --release -p examples --bin fine_tune -- [--policy mixed_bfloat16] [--epochs 1]
//!     [--batch-size 128] [--seed 0] [--train-samples N] [--out DIR]
//! ```
//!
//! Prints the test accuracy of each phase, the exported files' sizes (float32 and bfloat16),
//! and the trainable and frozen parameter counts. The bfloat16 file is what PyTorch, Hugging
//! Face tools and candle read (the README has the PyTorch code that loads it).

use std::path::PathBuf;

use examples::mnist_run::ImageArgs;
use examples::{Args, CNN_LEARNING_RATE, MnistCnn};
use mp_core::{PolicyKind, PolicyVisitor};
use mp_layers::checkpoint::{Layout, LoadOptions, WeightDtype, load_weights_with, save_weights_as};
use mp_layers::{Dense, Layer, Model, SparseCategoricalCrossentropy, Trainer, Verbose};
use mp_optim::{Adam, Optimizer};
use ndarray::Array1;

struct Run {
    args: ImageArgs,
    out: PathBuf,
}

/// Trainable and frozen parameters, as `summary` counts them.
fn counts<M: Model>(model: &M) -> (usize, usize) {
    let mut rows = vec![];
    model.summary_rows("", &mut rows);
    let frozen: usize = rows.iter().map(|r| r.frozen).sum();
    let trainable: usize = rows
        .iter()
        .map(|r| r.params - r.non_trainable - r.frozen)
        .sum();
    (trainable, frozen)
}

impl PolicyVisitor for Run {
    type Output = anyhow::Result<()>;

    fn visit<P: PolicyKind>(self) -> anyhow::Result<()> {
        let Run { args, out } = self;
        let ((x_train, y_train), (x_test, y_test)) = mp_data::mnist::load_data()?;
        let (x_train, digits) = args.limit(
            mp_data::mnist::to_images(&x_train),
            mp_data::mnist::to_labels(&y_train),
        );
        let x_test = mp_data::mnist::to_images(&x_test);
        let test_digits = mp_data::mnist::to_labels(&y_test);
        let parity = |y: &Array1<u32>| y.mapv(|d| d % 2);
        let (train_parity, test_parity) = (parity(&digits), parity(&test_digits));
        let options = &args.options;
        let batch = options.batch_size;

        // 1. The ten digits.
        let mut digit_model = MnistCnn::<P>::issue();
        digit_model.build(&[28, 28, 1])?;
        let mut trainer = Trainer::compile(
            digit_model,
            Adam::new(CNN_LEARNING_RATE)?,
            SparseCategoricalCrossentropy::new(),
        );
        trainer.fit(x_train.view(), digits.view(), options)?;
        let digits_acc = trainer
            .evaluate(x_test.view(), test_digits.view(), batch, Verbose::Silent)?
            .accuracy();
        println!(
            "1. digits, {} epoch(s): test accuracy {digits_acc:.4}",
            options.epochs
        );

        // 2. Out: PyTorch's layout, float32 and the bfloat16 serving copy.
        std::fs::create_dir_all(&out)?;
        let f32_file = out.join("mnist_cnn.f32.safetensors");
        let bf16_file = out.join("mnist_cnn.bf16.safetensors");
        save_weights_as(
            trainer.model_mut(),
            &f32_file,
            Layout::PyTorch,
            WeightDtype::F32,
        )?;
        save_weights_as(
            trainer.model_mut(),
            &bf16_file,
            Layout::PyTorch,
            WeightDtype::BF16,
        )?;
        let size = |p: &PathBuf| std::fs::metadata(p).map(|m| m.len());
        let (f32_bytes, bf16_bytes) = (size(&f32_file)?, size(&bf16_file)?);
        println!(
            "2. exported in PyTorch's layout: {} ({f32_bytes} bytes), {} ({bf16_bytes} bytes, \
             {:.2}x)",
            f32_file.display(),
            bf16_file.display(),
            bf16_bytes as f64 / f32_bytes as f64
        );

        // 3. In: the body into the same network with a two-class head. The file's ten-class head
        //    is renamed out of the way (a mis-shaped tensor is refused even when not strict).
        let mut parity_model = MnistCnn::<P>::issue();
        parity_model.logits = Dense::new(2);
        parity_model.build(&[28, 28, 1])?;
        let options_in = LoadOptions::new()
            .non_strict()
            .rename(|n| n.starts_with("logits.").then(|| format!("digit_{n}")));
        let report = load_weights_with(&mut parity_model, &bf16_file, &options_in)?;
        println!(
            "3. loaded the body from the bfloat16 file ({} layout); kept the new head {:?}, \
             skipped {:?}",
            report.layout, report.missing, report.unexpected
        );

        // 4. The head alone: everything frozen but `logits`.
        parity_model.freeze("")?;
        parity_model.unfreeze("logits")?;
        let (trainable, frozen) = counts(&parity_model);
        println!("4. frozen body: {trainable} trainable parameters, {frozen} frozen");
        let mut trainer = Trainer::compile(
            parity_model,
            Adam::new(1e-3)?,
            SparseCategoricalCrossentropy::new(),
        );
        trainer.fit(x_train.view(), train_parity.view(), options)?;
        let head_acc = trainer
            .evaluate(x_test.view(), test_parity.view(), batch, Verbose::Silent)?
            .accuracy();
        println!("   even/odd, head only: test accuracy {head_acc:.4}");

        // 5. Everything, one more epoch, at a lower rate.
        trainer.model_mut().unfreeze("")?;
        let (trainable, frozen) = counts(trainer.model());
        println!("5. unfrozen: {trainable} trainable parameters, {frozen} frozen");
        trainer
            .optimizer_mut()
            .inner_mut()
            .set_learning_rate(1e-4)?;
        let one_more = mp_layers::FitOptions {
            epochs: 1,
            ..options.clone()
        };
        trainer.fit(x_train.view(), train_parity.view(), &one_more)?;
        let all_acc = trainer
            .evaluate(x_test.view(), test_parity.view(), batch, Verbose::Silent)?
            .accuracy();
        println!("   even/odd, whole network: test accuracy {all_acc:.4}");
        println!(
            "policy {}: digits {digits_acc:.4}, parity head-only {head_acc:.4}, parity \
             fine-tuned {all_acc:.4}; files {f32_bytes} B float32, {bf16_bytes} B bfloat16",
            P::POLICY
        );
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let raw = Args::from_env(&[])?;
    let out = PathBuf::from(raw.get("out", "target/fine_tune".to_string())?);
    let mut args = ImageArgs::from_env_allowing(&["out"])?;
    if raw.raw("epochs").is_none() {
        args.options.epochs = 1;
    }
    args.policy.dispatch(Run { args, out })
}
