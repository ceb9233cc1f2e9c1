//! Small helpers shared by the layers.

use mp_core::{DType, DTypeKind, F32, Rng, Tensor, Variable};
use mp_kernels::ops;

use crate::error::{Error, Result};
use crate::layer::same_dtype;

/// The number of rows of a `[..., features]` tensor, checking its last dimension.
pub(crate) fn check_features(layer: &str, shape: &[usize], features: usize) -> Result<usize> {
    match shape.split_last() {
        Some((&last, batch)) if last == features && !batch.is_empty() => Ok(batch.iter().product()),
        _ => Err(Error::ShapeMismatch {
            layer: layer.to_string(),
            expected: format!("(batch, {features})"),
            got: shape.to_vec(),
        }),
    }
}

/// A seed derived from a layer's name (FNV-1a), so models initialise the same way every run.
pub(crate) fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A glorot-uniform float32 kernel of `shape` (`U(-limit, limit)`, `limit = sqrt(6 / (fan_in +
/// fan_out))`, Keras's default), or an error naming `layer` and the size when it cannot be
/// allocated.
pub(crate) fn glorot_uniform(
    layer: &str,
    seed: u64,
    shape: &[usize],
    fan_in: usize,
    fan_out: usize,
) -> Result<Tensor<F32>> {
    let limit = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
    uniform(layer, seed, shape, limit)
}

/// A float32 variable of `shape` drawn from `U(-limit, limit)` (Keras's `RandomUniform`), or an
/// error naming `layer` and the size when it cannot be allocated.
pub(crate) fn uniform(layer: &str, seed: u64, shape: &[usize], limit: f32) -> Result<Tensor<F32>> {
    let mut rng = Rng::new(seed);
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let too_large = |n: f64| Error::InvalidArgument {
        what: format!(
            "{layer}: a {} float32 variable ({:.1} GiB) cannot be allocated",
            dims.join(" x "),
            n * 4.0 / (1u64 << 30) as f64
        ),
    };
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|n| n.checked_mul(4).is_some_and(|b| b <= isize::MAX as usize))
        .ok_or_else(|| too_large(shape.iter().map(|&d| d as f64).product()))?;
    let mut values = Vec::new();
    values
        .try_reserve_exact(n)
        .map_err(|_| too_large(n as f64))?;
    values.extend((0..n).map(|_| rng.uniform(-limit, limit)));
    Ok(Tensor::<F32>::from_vec(shape, values)?)
}

/// A float32 kernel's copy in the compute dtype `D`, made once per training step and reused by
/// backward (nothing is copied when `D` is float32).
#[derive(Debug)]
pub(crate) struct KernelCast<D: DTypeKind> {
    cast: Option<Tensor<D>>,
}

impl<D: DTypeKind> KernelCast<D> {
    pub(crate) fn new() -> Self {
        KernelCast { cast: None }
    }

    /// Casts `kernel` into the reused buffer.
    pub(crate) fn refresh(&mut self, kernel: &Variable) -> Result<()> {
        if D::DTYPE == DType::F32 {
            return Ok(()); // float32 compute: the variable is used directly
        }
        let cast = match &mut self.cast {
            Some(c) if c.shape() == kernel.shape() && c.device() == kernel.value().device() => c,
            slot => slot.insert(ops::for_overwrite(kernel.shape(), kernel.value().device())?),
        };
        ops::cast_into(kernel.value(), cast)?;
        Ok(())
    }

    /// The kernel in `D`: the variable itself under float32, else the copy of the last
    /// [`KernelCast::refresh`] (an error naming `layer` when there was none).
    pub(crate) fn get<'a>(&'a self, kernel: &'a Variable, layer: &str) -> Result<&'a Tensor<D>> {
        if let Some(k) = same_dtype::<F32, D>(kernel.value()) {
            return Ok(k);
        }
        self.cast.as_ref().ok_or_else(|| Error::InvalidState {
            layer: layer.to_string(),
            what: "the kernel was not cast for this step".into(),
        })
    }
}

/// Values in the frozen variables among `vars`.
pub(crate) fn frozen_len(vars: &[Option<&mp_core::Variable>]) -> usize {
    vars.iter()
        .flatten()
        .filter(|v| v.frozen())
        .map(|v| v.value().len())
        .sum()
}

/// A layer's kernel in its compute dtype for inference (`forward`, which `predict` and
/// `evaluate` run), kept between calls and cast again only when the variable's
/// [version](Variable::version) says its value may have changed (a step, `set_weights`, a load,
/// a resume). Under float32 it is the variable itself.
pub(crate) struct InferenceCast<D: DTypeKind> {
    cached: std::sync::Mutex<Option<(u64, Tensor<D>)>>,
}

impl<D: DTypeKind> InferenceCast<D> {
    pub(crate) fn new() -> Self {
        InferenceCast {
            cached: std::sync::Mutex::new(None),
        }
    }

    /// `kernel` in `D` (an O(1) shared copy).
    pub(crate) fn get(&self, kernel: &Variable) -> Result<Tensor<D>> {
        if let Some(k) = same_dtype::<F32, D>(kernel.value()) {
            return Ok(k.clone());
        }
        let mut slot = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((version, cast)) = slot.as_ref()
            && *version == kernel.version()
            && cast.device() == kernel.value().device()
        {
            return Ok(cast.clone());
        }
        let cast: Tensor<D> = ops::cast(kernel.value())?;
        *slot = Some((kernel.version(), cast.clone()));
        Ok(cast)
    }
}
