//! A small Vision Transformer on MNIST under any policy.
//!
//! ```sh
//! cargo run --release -p examples --bin mnist_vit -- [--policy mixed_bfloat16] [--epochs 5]
//!     [--batch-size 128] [--seed 0] [--validation-split 0.1] [--train-samples N]
//! ```
//!
//! The network is [`examples::MnistVit`]: each image as 16 patches of 7x7, Dense(64), a class
//! token and learned positions, 4 pre-LN encoder blocks (4 heads, MLP 128, GELU), LayerNorm, the
//! class token to Dense(10) and a float32 softmax. AdamW (weight decay 0.004 on the kernels, none
//! on biases, normalization, positions and the class token) at
//! [`examples::transformer::VIT_LEARNING_RATE`] with a linear warmup over the first tenth of
//! the updates and a cosine to 0. The test accuracy comes from `evaluate`.

use examples::MnistVit;
use examples::mnist_run::ImageArgs;
use examples::transformer::{
    VIT_LEARNING_RATE, VIT_NO_DECAY, to_patches, vit_learning_rate_schedule,
};
use mp_core::{PolicyKind, PolicyVisitor};
use mp_layers::{Layer, Model, SparseCategoricalCrossentropy, Trainer};
use mp_optim::AdamW;
use ndarray::Axis;

struct Run(ImageArgs);

impl PolicyVisitor for Run {
    type Output = anyhow::Result<()>;

    fn visit<P: PolicyKind>(self) -> anyhow::Result<()> {
        let lead = self.0.lead();
        // Rank 0 alone prints under mpirun.
        macro_rules! println {
            ($($t:tt)*) => { if lead { std::println!($($t)*) } };
        }
        let ((x_train, y_train), (x_test, y_test)) = mp_data::mnist::load_data()?;
        let images = |x: &ndarray::Array3<u8>| {
            let x = mp_data::mnist::to_images(x);
            to_patches(x.index_axis(Axis(3), 0))
        };
        let (x_train, y_train) = self
            .0
            .limit(images(&x_train), mp_data::mnist::to_labels(&y_train));
        let x_test = images(&x_test);
        let y_test = mp_data::mnist::to_labels(&y_test);
        println!(
            "x_train: {:?} patches, x_test: {:?}",
            x_train.dim(),
            x_test.dim()
        );
        let mut model = MnistVit::<P>::issue();
        model.build(&[16, 49])?;
        println!("{}", model.summary());
        let options = &self.0.options;
        let total = options.updates_per_epoch(y_train.len())? * options.epochs;
        let optimizer = AdamW::new(VIT_LEARNING_RATE)?.exclude_from_weight_decay(VIT_NO_DECAY);
        let mut trainer = Trainer::compile(model, optimizer, SparseCategoricalCrossentropy::new())
            .with_communicator(self.0.comm.clone())
            .with_learning_rate_schedule(vit_learning_rate_schedule(total / 10, total)?)?;
        self.0.fit_and_report(
            &mut trainer,
            (x_train.view(), y_train.view()),
            (x_test.view(), y_test.view()),
        )
    }
}

fn main() -> anyhow::Result<()> {
    let args = ImageArgs::from_env()?;
    args.policy.dispatch(Run(args))
}
