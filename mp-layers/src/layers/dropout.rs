//! `Dropout`: inverted dropout in training, the identity in inference.

use std::marker::PhantomData;

use mp_core::{PolicyKind, Tensor, Variable};
use mp_kernels::ops;

use super::util::name_seed;
use crate::error::{Error, Result};
use crate::layer::Layer;

/// Dropout, like Keras's `Dropout(rate)`: in training each element is zeroed with probability
/// `rate` and the others scaled by `1 / (1 - rate)`; in inference (`evaluate`, `predict`) the
/// input passes unchanged.
///
/// The mask is drawn from mp's counter-based generator (see `mp_kernels::dropout`), seeded by
/// the layer's seed (default: a hash of its name) and the training step number, so a run is
/// reproducible for a seed and a resumed run draws the masks an uninterrupted one would.
pub struct Dropout<P: PolicyKind> {
    rate: f32,
    seed: Option<u64>,
    name: String,
    output_shape: Option<Vec<usize>>,
    /// The step number given by [`Layer::begin_step`] (advanced by each `forward_train` when a
    /// custom loop does not call it).
    step: u64,
    /// The mask seed of the last `forward_train`, for backward.
    saved_seed: Option<u64>,
    _policy: PhantomData<P>,
}

impl<P: PolicyKind> std::fmt::Debug for Dropout<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dropout")
            .field("name", &self.name)
            .field("rate", &self.rate)
            .finish()
    }
}

impl<P: PolicyKind> Dropout<P> {
    /// Dropout of `rate` (in `[0, 1)`; checked at `build`).
    pub fn new(rate: f32) -> Self {
        Dropout {
            rate,
            seed: None,
            name: "dropout".to_string(),
            output_shape: None,
            step: 0,
            saved_seed: None,
            _policy: PhantomData,
        }
    }

    /// Seeds the masks (default: a hash of the layer's name).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The rate.
    pub fn rate(&self) -> f32 {
        self.rate
    }

    /// The mask seed of training step `step`.
    fn mask_seed(&self, step: u64) -> u64 {
        let base = self.seed.unwrap_or_else(|| name_seed(&self.name));
        // splitmix64's increment keeps neighbouring steps' seeds far apart.
        base ^ step.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

impl<P: PolicyKind> Layer for Dropout<P> {
    type Policy = P;
    type Input = P::Compute;
    type Output = P::Compute;

    fn type_name(&self) -> &'static str {
        "Dropout"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }

    fn build(&mut self, input_shape: &[usize]) -> Result<Vec<usize>> {
        if !(self.rate.is_finite() && (0.0..1.0).contains(&self.rate)) {
            return Err(Error::InvalidArgument {
                what: format!("{}: dropout rate {} is not in [0, 1)", self.name, self.rate),
            });
        }
        self.output_shape = Some(input_shape.to_vec());
        Ok(input_shape.to_vec())
    }

    fn output_shape(&self) -> Option<&[usize]> {
        self.output_shape.as_deref()
    }

    fn forward(&self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        Ok(x.clone())
    }

    fn forward_train(&mut self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        let seed = self.mask_seed(self.step);
        self.step += 1;
        self.saved_seed = Some(seed);
        Ok(ops::dropout(x, self.rate, seed)?)
    }

    fn backward(
        &mut self,
        dy: &Tensor<P::Compute>,
        _need_dx: bool,
    ) -> Result<Option<Tensor<P::Compute>>> {
        let seed = self.saved_seed.take().ok_or_else(|| Error::InvalidState {
            layer: self.name.clone(),
            what: "backward called without a preceding forward_train".into(),
        })?;
        Ok(Some(ops::dropout_backward(dy, self.rate, seed)?))
    }

    fn begin_step(&mut self, step: u64) {
        self.step = step;
    }

    fn visit_variables(
        &mut self,
        _prefix: &str,
        _f: &mut dyn FnMut(&str, &mut Variable) -> Result<()>,
    ) -> Result<()> {
        Ok(())
    }

    fn saved_bytes(&self) -> usize {
        0
    }

    fn param_count(&self) -> usize {
        0
    }
}
