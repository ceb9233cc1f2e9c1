//! End to end on the real MNIST, read from the cache directory (`$MP_DATA_DIR`, or the default
//! cache) without fetching. Skipped when the files are absent, except under `CI=true`, where
//! their absence is a failure: CI must run `cargo xtask data` first.

use mp_data::mnist::{self, Loader};
use mp_data::{Dataset, Error};

#[test]
fn real_mnist_loads_with_known_facts() {
    let loader = Loader::new().fetch(false);
    let dir = match loader.dir() {
        Ok(d) => d,
        Err(e) => return skip_or_fail(&format!("{e}")),
    };
    let ((x_train, y_train), (x_test, y_test)) = match loader.load() {
        Ok(data) => data,
        Err(e @ Error::NotCached { .. }) => return skip_or_fail(&format!("{e}")),
        Err(e) => panic!("loading MNIST from {}: {e}", dir.display()),
    };
    assert_eq!(x_train.shape(), &[60000, 28, 28]);
    assert_eq!(y_train.len(), 60000);
    assert_eq!(x_test.shape(), &[10000, 28, 28]);
    assert_eq!(y_test.len(), 10000);

    // Known facts about MNIST.
    assert_eq!(&y_train.as_slice().unwrap()[..5], &[5, 0, 4, 1, 9]);
    assert_eq!(&y_test.as_slice().unwrap()[..3], &[7, 2, 1]);
    let counts = |y: &ndarray::Array1<u8>| {
        let mut c = [0usize; 10];
        for &l in y {
            c[usize::from(l)] += 1;
        }
        c
    };
    assert_eq!(
        counts(&y_train),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    assert_eq!(
        counts(&y_test),
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    assert_eq!(x_train.iter().copied().max(), Some(255));
    assert_eq!(x_train[[0, 0, 0]], 0);

    // The guide's preprocessing and the Keras validation split.
    let ds = Dataset::new(mnist::to_features(&x_train), mnist::to_labels(&y_train)).unwrap();
    assert_eq!(ds.num_features(), 784);
    let (train, val) = ds.split_validation(0.2).unwrap();
    assert_eq!((train.len(), val.len()), (48000, 12000));
    assert_eq!(train.batches(128).len(), 375);
    let max = ds.features().iter().copied().fold(0.0f32, f32::max);
    assert_eq!(max, 1.0);
}

fn skip_or_fail(why: &str) {
    let mut msg = format!("real MNIST not available: {why}");
    if !msg.contains("cargo xtask data") {
        msg.push_str("; run `cargo xtask data` to fetch it");
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: this test must not be skipped)");
    }
    eprintln!("skipped: {msg}");
}
