//! The Keras mixed precision guide, first half: train the guide's model on MNIST with `fit`.
//!
//! ```sh
//! cargo run --release -p examples --bin mnist_fit -- [--policy mixed_bfloat16] [--units 4096]
//!     [--batch-size 8192] [--epochs 5] [--validation-split 0.2] [--seed 0]
//! ```
//!
//! The policy defaults to the one the compatibility check recommends for this machine. MNIST is
//! fetched and verified on first use (into `$MP_DATA_DIR` or `~/.cache/mp/mnist`).
//!
//! Data-parallel on N processes (built with `--features mpi`; Open MPI's `mpirun` on one
//! machine, or with `--hostfile` on several): `mpirun -np 2 target/release/mnist_fit ...`. The
//! ranks split every global batch of `--batch-size` and print from rank 0.

use std::sync::Arc;
use std::time::Instant;

use examples::{Args, Digits};
use mp_core::dist::Communicator;
use mp_core::{DTypeKind, PolicyKind, PolicyVisitor};
use mp_layers::{FitOptions, Layer, Model, SparseCategoricalCrossentropy, Trainer, Verbose};
use mp_optim::RmsProp;

const OPTIONS: &[&str] = &[
    "policy",
    "units",
    "batch-size",
    "epochs",
    "validation-split",
    "seed",
];

struct Run {
    units: usize,
    options: FitOptions,
    comm: Arc<dyn Communicator>,
}

impl PolicyVisitor for Run {
    type Output = anyhow::Result<()>;

    fn visit<P: PolicyKind>(self) -> anyhow::Result<()> {
        let lead = self.comm.rank() == 0;
        macro_rules! println {
            ($($t:tt)*) => { if lead { std::println!($($t)*) } };
        }
        let ((x_train, y_train), (x_test, y_test)) = mp_data::mnist::load_data()?;
        let x_train = mp_data::mnist::to_features(&x_train);
        let x_test = mp_data::mnist::to_features(&x_test);
        println!(
            "x_train: {:?} float32, y_train: {:?}, x_test: {:?}, y_test: {:?}",
            x_train.dim(),
            y_train.len(),
            x_test.dim(),
            y_test.len()
        );

        let mut model = Digits::<P>::guide(self.units);
        model.build(&[784])?;
        // The dtypes the guide prints.
        let compute = <P::Compute as DTypeKind>::DTYPE;
        println!("{}", model.summary());
        println!("dense_1 dtype policy: {:#}", P::POLICY);
        println!("x.dtype (the output of dense_1): {compute}");
        println!(
            "dense_1.kernel.dtype: {}",
            model.dense_1.kernel().expect("built").dtype()
        );
        println!("outputs.dtype: {}", mp_core::DType::F32);

        let mut trainer = Trainer::compile(
            model,
            RmsProp::default(),
            SparseCategoricalCrossentropy::new(),
        )
        .with_communicator(self.comm.clone());
        if self.comm.size() > 1 {
            println!(
                "data parallel: {} ranks over {}, {} samples of each global batch per rank",
                self.comm.size(),
                self.comm.name(),
                self.options.batch_size / self.comm.size()
            );
        }
        if let mp_layers::TrainOptimizer::Scaled(s) = trainer.optimizer() {
            println!("loss scaling: {}", s.loss_scale_state());
        }
        let started = Instant::now();
        let history = trainer.fit(x_train.view(), y_train.view(), &self.options)?;
        let train_seconds = started.elapsed().as_secs_f64();
        let scores = trainer.evaluate(
            x_test.view(),
            y_test.view(),
            self.options.batch_size,
            if lead {
                Verbose::Lines
            } else {
                Verbose::Silent
            },
        )?;
        println!("Test loss: {:.4}", scores.loss);
        println!("Test accuracy: {:.4}", scores.accuracy());
        let per_epoch: Vec<String> = history
            .epochs
            .iter()
            .map(|e| format!("{:.1}", e.seconds))
            .collect();
        println!(
            "policy {}: {:.1}s training, seconds per epoch [{}], test accuracy {:.4}",
            P::POLICY,
            train_seconds,
            per_epoch.join(", "),
            scores.accuracy()
        );
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::from_env(&[])?;
    args.check_known(OPTIONS)?;
    // `mpirun` started this process as one of several ranks: train data-parallel.
    let comm = mp_core::dist::from_env()?;
    let lead = comm.rank() == 0;
    macro_rules! println {
        ($($t:tt)*) => { if lead { std::println!($($t)*) } };
    }
    let policy = args.policy()?;
    println!("Policy: {policy:#}");
    println!("{}", mp_kernels::calibrate::check(policy)?);
    println!("CPU: {}", mp_kernels::peak::describe_cpu());
    let options = FitOptions {
        batch_size: args.get("batch-size", 8192)?,
        epochs: args.get("epochs", 5)?,
        validation_split: args.get("validation-split", 0.2)?,
        seed: args.get("seed", 0)?,
        shuffle: true,
        verbose: Verbose::Auto,
        gradient_accumulation_steps: 1,
    };
    policy.dispatch(Run {
        units: args.get("units", 4096)?,
        options,
        comm,
    })
}
