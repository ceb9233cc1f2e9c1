//! [`Dataset`]: host features and labels, shuffled, batched and split with mp-core's one RNG
//! and splitter (`mp_core::Rng`, `mp_core::rng::{batch_ranges, validation_split}`).

use std::ops::Range;

use mp_core::Rng;
use mp_core::rng::{batch_ranges, num_batches, validation_split};
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis, s};

use crate::error::{Error, Result};

/// Features `(n, d)` in `f32` and integer class labels `(n,)` on the host.
///
/// Methods that reorder or cut the data return a new `Dataset` (`shuffle`, `take`, `skip`,
/// `split_validation`); batches are views into it, so iterating an epoch copies nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    features: Array2<f32>,
    labels: Array1<u32>,
}

impl Dataset {
    /// A dataset owning `features` `(n, d)` and `labels` `(n,)`; their `n` must agree.
    pub fn new(features: Array2<f32>, labels: Array1<u32>) -> Result<Self> {
        if features.nrows() != labels.len() {
            return Err(Error::InvalidArgument {
                what: format!(
                    "dataset features have {} rows but there are {} labels",
                    features.nrows(),
                    labels.len()
                ),
            });
        }
        Ok(Dataset { features, labels })
    }

    /// A dataset copied from views; labels may be any unsigned type up to `u32` (`u8` MNIST
    /// labels included).
    pub fn from_views<L: Copy + Into<u32>>(
        features: ArrayView2<'_, f32>,
        labels: ArrayView1<'_, L>,
    ) -> Result<Self> {
        Dataset::new(features.to_owned(), labels.mapv(Into::into))
    }

    /// A dataset copied from a flat row-major slice of `n * d` features and `n` labels.
    pub fn from_slices<L: Copy + Into<u32>>(
        features: &[f32],
        num_features: usize,
        labels: &[L],
    ) -> Result<Self> {
        let n = labels.len();
        let expected = n.checked_mul(num_features);
        if expected != Some(features.len()) {
            return Err(Error::InvalidArgument {
                what: format!(
                    "{} features do not form {n} rows of {num_features} (one row per label)",
                    features.len()
                ),
            });
        }
        let features =
            Array2::from_shape_vec((n, num_features), features.to_vec()).map_err(|e| {
                Error::InvalidArgument {
                    what: format!("dataset features: {e}"),
                }
            })?;
        Dataset::new(features, labels.iter().map(|&l| l.into()).collect())
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Features per sample (`d`).
    pub fn num_features(&self) -> usize {
        self.features.ncols()
    }

    /// The features, `(n, d)`.
    pub fn features(&self) -> ArrayView2<'_, f32> {
        self.features.view()
    }

    /// The labels, `(n,)`.
    pub fn labels(&self) -> ArrayView1<'_, u32> {
        self.labels.view()
    }

    /// Takes the arrays back.
    pub fn into_parts(self) -> (Array2<f32>, Array1<u32>) {
        (self.features, self.labels)
    }

    /// The samples in a random order drawn from `Rng::new(seed)`: the same seed gives the same
    /// order on every platform.
    pub fn shuffle(&self, seed: u64) -> Dataset {
        let order = Rng::new(seed).permutation(self.len());
        self.select(&order)
    }

    /// The samples at `indices`, in that order (indices may repeat). Out-of-range indices are an
    /// error.
    pub fn gather(&self, indices: &[usize]) -> Result<Dataset> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(Error::InvalidArgument {
                what: format!("sample index {bad} out of range for {} samples", self.len()),
            });
        }
        Ok(self.select(indices))
    }

    fn select(&self, indices: &[usize]) -> Dataset {
        Dataset {
            features: self.features.select(Axis(0), indices),
            labels: self.labels.select(Axis(0), indices),
        }
    }

    fn range(&self, r: Range<usize>) -> Dataset {
        Dataset {
            features: self.features.slice(s![r.clone(), ..]).to_owned(),
            labels: self.labels.slice(s![r]).to_owned(),
        }
    }

    /// The first `n` samples (all of them if there are fewer).
    pub fn take(&self, n: usize) -> Dataset {
        self.range(0..n.min(self.len()))
    }

    /// All but the first `n` samples (none if there are fewer).
    pub fn skip(&self, n: usize) -> Dataset {
        self.range(n.min(self.len())..self.len())
    }

    /// Splits off the validation set as Keras's `validation_split` does: the *last* `fraction`
    /// of the samples, in their current order. Returns `(train, validation)`; `fraction` must be
    /// in `[0, 1)`.
    pub fn split_validation(&self, fraction: f64) -> Result<(Dataset, Dataset)> {
        let (train, val) = validation_split(self.len(), fraction)?;
        Ok((self.range(train), self.range(val)))
    }

    /// Consecutive batches of `batch_size` samples (the last one possibly shorter) as views.
    /// A batch size of 0 is taken as 1.
    pub fn batches(&self, batch_size: usize) -> Batches<'_> {
        Batches {
            features: self.features.view(),
            labels: self.labels.view(),
            ranges: Box::new(batch_ranges(self.len(), batch_size)),
            remaining: num_batches(self.len(), batch_size),
        }
    }

    /// One epoch in a random order drawn from `Rng::new(seed)`: batches of `batch_size` samples
    /// gathered into owned arrays, without reordering the whole dataset first.
    pub fn shuffled_batches(
        &self,
        batch_size: usize,
        seed: u64,
    ) -> impl ExactSizeIterator<Item = (Array2<f32>, Array1<u32>)> + '_ {
        let order = Rng::new(seed).permutation(self.len());
        let ranges: Vec<Range<usize>> = batch_ranges(self.len(), batch_size).collect();
        ranges.into_iter().map(move |r| {
            let idx = &order[r];
            (
                self.features.select(Axis(0), idx),
                self.labels.select(Axis(0), idx),
            )
        })
    }
}

/// The batches of a [`Dataset`], as `(features, labels)` views.
pub struct Batches<'a> {
    features: ArrayView2<'a, f32>,
    labels: ArrayView1<'a, u32>,
    ranges: Box<dyn Iterator<Item = Range<usize>> + 'a>,
    remaining: usize,
}

impl std::fmt::Debug for Batches<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batches")
            .field("samples", &self.labels.len())
            .field("remaining", &self.remaining)
            .finish()
    }
}

impl<'a> Iterator for Batches<'a> {
    type Item = (ArrayView2<'a, f32>, ArrayView1<'a, u32>);

    fn next(&mut self) -> Option<Self::Item> {
        let r = self.ranges.next()?;
        self.remaining -= 1;
        Some((
            self.features.slice_move(s![r.clone(), ..]),
            self.labels.slice_move(s![r]),
        ))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Batches<'_> {}
