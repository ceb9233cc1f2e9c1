//! What the MNIST image examples (`mnist_cnn`, `mnist_vit`) share: their command line, the
//! data limited to the first `--train-samples`, and the report after `fit` (the test scores
//! from `evaluate` and one summary line).

use std::sync::Arc;
use std::time::Instant;

use mp_core::dist::Communicator;
use mp_core::{Policy, PolicyKind};
use mp_layers::{FitOptions, Loss, Model, Trainer, Verbose};
use mp_optim::Optimizer;
use ndarray::{Array, Array1, ArrayView, Axis, Dimension, RemoveAxis};

use crate::Args;

/// The options of the image examples.
pub const OPTIONS: &[&str] = &[
    "policy",
    "batch-size",
    "epochs",
    "validation-split",
    "seed",
    "train-samples",
];

/// An image example's command line: the policy (the measured recommendation unless given),
/// `fit`'s options (batch 128, 5 epochs, 10% validation, seed 0 by default) and how many
/// training samples to keep.
#[derive(Clone, Debug)]
pub struct ImageArgs {
    /// The policy to train under.
    pub policy: Policy,
    /// `fit`'s options.
    pub options: FitOptions,
    /// Train on the first this many samples only (all by default).
    pub train_samples: Option<usize>,
    /// The ranks `mpirun` started (one process alone otherwise): the examples train
    /// data-parallel over them, and only rank 0 prints.
    pub comm: Arc<dyn Communicator>,
}

impl ImageArgs {
    /// Parses the process's arguments, joins the ranks `mpirun` started (if any) and prints
    /// the policy and the CPU.
    ///
    /// # Errors
    /// An unknown option or a value that does not parse, named; a launcher environment that
    /// MPI cannot join.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_env_allowing(&[])
    }

    /// [`ImageArgs::from_env`] for a binary that also takes the options `extra` (which it
    /// reads itself).
    ///
    /// # Errors
    /// As [`ImageArgs::from_env`].
    pub fn from_env_allowing(extra: &[&str]) -> anyhow::Result<Self> {
        let args = Args::from_env(&[])?;
        let known: Vec<&str> = OPTIONS.iter().chain(extra).copied().collect();
        args.check_known(&known)?;
        let comm = mp_core::dist::from_env()?;
        let policy = args.policy()?;
        if comm.rank() == 0 {
            println!("Policy: {policy:#}");
            println!("CPU: {}", mp_kernels::peak::describe_cpu());
            if comm.size() > 1 {
                println!("data parallel: {} ranks over {}", comm.size(), comm.name());
            }
        }
        let options = FitOptions {
            batch_size: args.get("batch-size", 128)?,
            epochs: args.get("epochs", 5)?,
            validation_split: args.get("validation-split", 0.1)?,
            seed: args.get("seed", 0)?,
            shuffle: true,
            verbose: Verbose::Auto,
            gradient_accumulation_steps: 1,
        };
        let train_samples = match args.raw("train-samples") {
            Some(_) => Some(args.get("train-samples", 0usize)?),
            None => None,
        };
        Ok(ImageArgs {
            policy,
            options,
            train_samples,
            comm,
        })
    }

    /// Whether this process prints (rank 0, or the only process).
    pub fn lead(&self) -> bool {
        self.comm.rank() == 0
    }

    /// `x` and `y` cut to the first [`ImageArgs::train_samples`] samples.
    pub fn limit<D: RemoveAxis>(
        &self,
        x: Array<f32, D>,
        y: Array1<u32>,
    ) -> (Array<f32, D>, Array1<u32>) {
        match self.train_samples {
            Some(n) if n < y.len() => {
                let keep: Vec<usize> = (0..n).collect();
                (x.select(Axis(0), &keep), y.select(Axis(0), &keep))
            }
            _ => (x, y),
        }
    }

    /// Runs `fit` on the training data (data-parallel over [`ImageArgs::comm`]), `evaluate` on
    /// the test data, and prints (on rank 0) the test scores and one line with the training
    /// time and the validation accuracy per epoch.
    ///
    /// # Errors
    /// What `fit` or `evaluate` returns.
    pub fn fit_and_report<M, O, Lo, D1, D2>(
        &self,
        trainer: &mut Trainer<M, O, Lo>,
        train: (ArrayView<'_, f32, D1>, ArrayView<'_, u32, ndarray::Ix1>),
        test: (ArrayView<'_, f32, D2>, ArrayView<'_, u32, ndarray::Ix1>),
    ) -> anyhow::Result<()>
    where
        M: Model,
        O: Optimizer,
        Lo: Loss<u32>,
        D1: Dimension,
        D2: Dimension,
    {
        let started = Instant::now();
        let history = trainer.fit(train.0, train.1, &self.options)?;
        let seconds = started.elapsed().as_secs_f64();
        let verbose = if self.lead() {
            Verbose::Lines
        } else {
            Verbose::Silent
        };
        let scores = trainer.evaluate(test.0, test.1, self.options.batch_size, verbose)?;
        if !self.lead() {
            return Ok(());
        }
        let val: Vec<String> = history
            .epochs
            .iter()
            .map(|e| {
                e.get("val_accuracy")
                    .map_or("-".into(), |a| format!("{a:.4}"))
            })
            .collect();
        println!("Test loss: {:.4}", scores.loss);
        println!("Test accuracy: {:.4}", scores.accuracy());
        println!(
            "policy {} seed {}: {:.0}s training, validation accuracy per epoch [{}], test \
             accuracy {:.4}",
            <M::Policy as PolicyKind>::POLICY,
            self.options.seed,
            seconds,
            val.join(", "),
            scores.accuracy()
        );
        Ok(())
    }
}
