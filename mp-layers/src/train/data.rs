//! The host data a trainer takes: checks before the first step, batches copied to the device,
//! and where a non-finite value came from.

use mp_core::{Device, F32, Tensor};
use ndarray::{ArrayViewD, Axis};

use crate::error::{Error, Result};
use crate::layer::{Model, convert};
use crate::train::ModelVars;

/// `x` and `y` hold the same number of samples (their first axis), at least one.
pub(crate) fn check_data<T>(x: &ArrayViewD<'_, f32>, y: &ArrayViewD<'_, T>) -> Result<()> {
    let samples = x.shape().first().copied().unwrap_or(0);
    let targets = y.shape().first().copied().unwrap_or(0);
    if samples != targets {
        return Err(Error::ShapeMismatch {
            layer: "fit".into(),
            expected: format!(
                "targets for each of the {samples} samples along their first axis (one label \
                 per sample, or a row of targets per sample)"
            ),
            got: y.shape().to_vec(),
        });
    }
    if samples == 0 {
        return Err(Error::InvalidArgument {
            what: "no samples given".into(),
        });
    }
    Ok(())
}

/// The targets `y` (`[samples, ...]`) flat in row-major order, and how many per sample.
pub(crate) fn targets_of<T: Copy>(y: &ArrayViewD<'_, T>) -> (Vec<T>, usize) {
    let per = y.shape().get(1..).map_or(1, |s| s.iter().product());
    (y.iter().copied().collect(), per)
}

/// The path of the first variable whose gradient holds NaN or infinity, if any (the loss-scale
/// optimizer's own check, without the scale).
pub(crate) fn first_nonfinite_gradient<M: Model>(model: &mut M) -> Result<Option<String>> {
    Ok(mp_optim::loss_scale_optimizer::check_gradients(&mut ModelVars(model))?.first_nonfinite)
}

/// The global L2 norm of the model's gradients (float64 sums of squares over every variable
/// with a gradient); NaN or infinite when a gradient is.
pub(crate) fn gradient_norm<M: Model>(model: &mut M) -> Result<f64> {
    use mp_optim::VariableSet;
    let mut total = 0.0f64;
    ModelVars(model).for_each_variable(&mut |_, v| {
        total += mp_kernels::ops::sum_squares(v.grad())?;
        Ok(())
    })?;
    Ok(total.sqrt())
}

/// Where a skipped step's first non-finite value appeared: the input batch, the model output
/// (the loss), or the named gradient.
pub(crate) fn nonfinite_origin<D: mp_core::DTypeKind>(
    inputs: &[&Tensor<D>],
    loss: f32,
    gradient: Option<String>,
) -> Result<String> {
    let mut finite = true;
    for x in inputs {
        let mut flag = mp_kernels::ops::Finite::new(x.device())?;
        mp_kernels::ops::check_finite(x, &mut flag)?;
        finite &= flag.get()?;
    }
    Ok(if !finite {
        "the input batch".to_string()
    } else if !loss.is_finite() {
        "the model output (the loss is not finite)".to_string()
    } else {
        match gradient {
            Some(v) => format!("the gradient of {v}"),
            None => "a gradient".to_string(),
        }
    })
}

/// Copies samples `idx` of `x` (`[samples, ...]`, any rank) into a float32 tensor
/// `[idx.len(), ...]` on `device` and converts it to the compute dtype there.
pub(crate) fn gather<D: mp_core::DTypeKind>(
    x: &ArrayViewD<'_, f32>,
    idx: &[usize],
    device: Device,
) -> Result<Tensor<D>> {
    let mut shape = x.shape().to_vec();
    shape[0] = idx.len();
    let per: usize = shape[1..].iter().product();
    let host = Tensor::<F32>::from_writer(&shape, |out| {
        for (o, &i) in out.chunks_exact_mut(per.max(1)).zip(idx) {
            let sample = x.index_axis(Axis(0), i);
            match sample.as_slice() {
                Some(s) => o.copy_from_slice(s),
                None => o.iter_mut().zip(sample.iter()).for_each(|(o, &v)| *o = v),
            }
        }
    })?;
    convert::<F32, D>(host.to_device(device)?)
}
