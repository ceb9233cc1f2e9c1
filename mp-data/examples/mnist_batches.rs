//! Loads MNIST (fetching it on first use), prepares it as the Keras mixed precision guide does
//! (pixels to `f32` / 255, flattened to 784 features), splits off the last 20% for validation,
//! and walks one shuffled epoch of batches.
//!
//! ```text
//! cargo run --release -p mp-data --example mnist_batches [-- SEED]
//! ```

use std::process::ExitCode;

use mp_data::{Dataset, mnist};

fn main() -> ExitCode {
    let seed = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(42u64);
    match run(seed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mnist_batches: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(seed: u64) -> mp_data::Result<()> {
    let ((x_train, y_train), (x_test, y_test)) = mnist::load_data()?;
    println!(
        "train {:?} / {:?}, test {:?} / {:?}",
        x_train.shape(),
        y_train.shape(),
        x_test.shape(),
        y_test.shape()
    );
    let ds = Dataset::new(mnist::to_features(&x_train), mnist::to_labels(&y_train))?;
    let (train, val) = ds.split_validation(0.2)?;
    println!(
        "{} training and {} validation samples",
        train.len(),
        val.len()
    );

    let mut counts = [0usize; 10];
    let mut pixel_sum = 0.0f64;
    let batches = train.shuffled_batches(128, seed);
    let n = batches.len();
    for (x, y) in batches {
        pixel_sum += x.iter().map(|&p| f64::from(p)).sum::<f64>();
        for &label in &y {
            counts[label as usize] += 1;
        }
    }
    println!("one epoch (seed {seed}): {n} batches of up to 128");
    println!("label counts: {counts:?}");
    println!(
        "mean pixel value: {:.4}",
        pixel_sum / (train.len() * train.num_features()) as f64
    );
    Ok(())
}
