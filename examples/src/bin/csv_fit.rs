//! Your own table: train a classifier on a CSV file with `fit`, logging every step.
//!
//! ```sh
//! cargo run --release -p examples --bin csv_fit -- [--csv data.csv] [--label species]
//!     [--policy mixed_bfloat16] [--epochs 20] [--batch-size 64] [--steps-log steps.csv]
//! ```
//!
//! Without `--csv` it writes a synthetic table first (to the system's temp directory), a task
//! the model has to learn: 2,000 points of 8 features around three random centres, labelled
//! `red`, `green` and `blue` by their nearest centre, with half the features noise. The table is
//! read with `mp_data::tabular::read_csv` (the label column named, or the last; text labels
//! become class ids in sorted order), each feature standardised with the training split's mean
//! and deviation, and a two-layer MLP is trained under the policy. `StepLogger` writes one row
//! per step to `--steps-log`: loss, loss scale, skipped steps and why, gradient norm.

use examples::Args;
use mp_core::{PolicyKind, PolicyVisitor, Rng};
use mp_data::tabular::{CsvOptions, read_csv};
use mp_layers::{
    Dense, FitOptions, Layer, Model, Softmax, SparseCategoricalCrossentropy, StepLogger, Trainer,
    Verbose, model,
};
use mp_optim::Adam;
use ndarray::{Array1, Array2, Axis};

const OPTIONS: &[&str] = &[
    "csv",
    "label",
    "policy",
    "epochs",
    "batch-size",
    "steps-log",
    "seed",
];

/// A two-layer MLP for `classes` classes.
#[model]
struct TableNet {
    hidden: Dense,
    logits: Dense,
    /// In float32 whatever the policy.
    #[dtype = "float32"]
    probs: Softmax,
}

/// The synthetic table: `rows` points around three centres in the first four of eight
/// features (the other four noise), labelled by the nearest centre.
fn synthetic(path: &std::path::Path, rows: usize, seed: u64) -> anyhow::Result<()> {
    let mut rng = Rng::new(seed);
    let names = ["red", "green", "blue"];
    let centres: Vec<Vec<f32>> = (0..3)
        .map(|_| (0..4).map(|_| rng.uniform(-2.0, 2.0)).collect())
        .collect();
    let mut text = String::from("f1,f2,f3,f4,n1,n2,n3,n4,colour\n");
    for _ in 0..rows {
        let c = rng.below(3) as usize;
        let x: Vec<f32> = (0..8)
            .map(|j| {
                let noise = rng.uniform(-1.5, 1.5);
                if j < 4 {
                    centres[c][j] + noise
                } else {
                    3.0 * noise
                }
            })
            .collect();
        // The label is the nearest centre (not always the one drawn from).
        let dist = |k: usize| -> f32 { (0..4).map(|j| (x[j] - centres[k][j]).powi(2)).sum() };
        let nearest = (0..3)
            .min_by(|&a, &b| dist(a).total_cmp(&dist(b)))
            .unwrap_or(0);
        let cells: Vec<String> = x.iter().map(|v| format!("{v:.4}")).collect();
        text.push_str(&format!("{},{}\n", cells.join(","), names[nearest]));
    }
    std::fs::write(path, text)?;
    Ok(())
}

struct Run {
    features: Array2<f32>,
    labels: Array1<u32>,
    classes: usize,
    options: FitOptions,
    steps_log: String,
}

impl PolicyVisitor for Run {
    type Output = anyhow::Result<()>;

    fn visit<P: PolicyKind>(self) -> anyhow::Result<()> {
        let mut model = TableNet::<P> {
            hidden: Dense::new(64).relu(),
            logits: Dense::new(self.classes),
            probs: Softmax::new(),
        };
        model.build(&[self.features.ncols()])?;
        println!("{}", model.summary());
        let mut trainer = Trainer::compile(
            model,
            Adam::new(1e-3)?,
            SparseCategoricalCrossentropy::new(),
        )
        .with_callback(StepLogger::csv(&self.steps_log));
        let history = trainer.fit(self.features.view(), self.labels.view(), &self.options)?;
        let last = history.epochs.last().expect("at least one epoch");
        let skipped: u64 = history.epochs.iter().map(|e| e.skipped_steps).sum();
        println!(
            "policy {}: validation accuracy {:.4} after {} epochs, {skipped} skipped steps; \
             one row per step in {}",
            P::POLICY,
            last.val_metrics
                .iter()
                .find(|(n, _)| *n == "accuracy")
                .map_or(f32::NAN, |(_, v)| *v),
            history.epochs.len(),
            self.steps_log
        );
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::from_env(&[])?;
    args.check_known(OPTIONS)?;
    let seed: u64 = args.get("seed", 0)?;
    let path: String = args.get("csv", String::new())?;
    let path = if path.is_empty() {
        let p = std::env::temp_dir().join("mp_csv_fit_synthetic.csv");
        synthetic(&p, 2000, seed)?;
        println!("wrote a synthetic table to {}", p.display());
        p
    } else {
        path.into()
    };
    let mut options = CsvOptions::default();
    let label: String = args.get("label", String::new())?;
    if !label.is_empty() {
        options = options.label_column(label);
    }
    let table = read_csv(&path, &options)?;
    println!(
        "{}: {} rows, features {:?}, label {:?}, classes {}",
        path.display(),
        table.labels.len(),
        table.feature_names,
        table.label_name,
        table
            .class_names
            .as_ref()
            .map_or(format!("0..{}", table.num_classes()), |c| format!("{c:?}"))
    );
    let fit = FitOptions {
        batch_size: args.get("batch-size", 64)?,
        epochs: args.get("epochs", 20)?,
        validation_split: 0.2,
        seed,
        shuffle: true,
        verbose: Verbose::Lines,
        gradient_accumulation_steps: 1,
    };
    // Standardise with the training rows' statistics (fit holds out the last 20%).
    let classes = table.num_classes();
    let mut features = table.features;
    let train_rows = features.nrows() - (features.nrows() as f64 * fit.validation_split) as usize;
    let train = features.slice(ndarray::s![..train_rows, ..]);
    let mean = train.mean_axis(Axis(0)).unwrap_or_default();
    let std = train
        .std_axis(Axis(0), 0.0)
        .mapv(|s| if s > 0.0 { s } else { 1.0 });
    features -= &mean;
    features /= &std;
    args.policy()?.dispatch(Run {
        features,
        labels: table.labels,
        classes,
        options: fit,
        steps_log: args.get("steps-log", "steps.csv".to_string())?,
    })
}
