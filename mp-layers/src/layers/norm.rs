//! `BatchNormalization` and `LayerNormalization`: inputs and outputs in the compute dtype,
//! statistics and normalisation in float32 (as Keras 3 runs normalisation under mixed
//! precision); BatchNormalization's moving statistics committed only by applied steps.

use std::marker::PhantomData;

use mp_core::{F32, PolicyKind, Tensor, Variable};
use mp_kernels::ops::{self, Norm};

use crate::checkpoint::ForeignTensors;
use crate::error::{Error, Result};
use crate::layer::Layer;

/// What both normalisation layers check at `build`: a finite positive epsilon, a non-empty last
/// axis (returned: the features), and, when already built (`built`), the same shape (then
/// `None`: nothing to allocate).
fn features(
    type_name: &str,
    layer: &str,
    epsilon: f32,
    built: Option<&[usize]>,
    input_shape: &[usize],
) -> Result<Option<usize>> {
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(Error::InvalidArgument {
            what: format!("{layer}: epsilon {epsilon} is not finite and positive"),
        });
    }
    let Some(&features) = input_shape.last().filter(|&&c| c > 0) else {
        return Err(Error::InvalidArgument {
            what: format!(
                "{layer}: {type_name} needs inputs with a non-empty last axis, got \
                 {input_shape:?} per sample"
            ),
        });
    };
    match built {
        Some(shape) if shape != input_shape => Err(Error::IncompatibleShapes {
            layer: layer.to_string(),
            previous: "the layer before".into(),
            expected: shape.to_vec(),
            got: input_shape.to_vec(),
        }),
        Some(_) => Ok(None),
        None => Ok(Some(features)),
    }
}

/// That `x` is a batch of the per-sample shape the layer was built for.
fn check_batch(layer: &str, built: Option<&[usize]>, x: &[usize]) -> Result<()> {
    let shape = built.ok_or_else(|| Error::NotBuilt {
        layer: layer.to_string(),
    })?;
    if x.len() != shape.len() + 1 || x[1..] != shape[..] {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        return Err(Error::ShapeMismatch {
            layer: layer.to_string(),
            expected: format!("(batch, {})", dims.join(", ")),
            got: x.to_vec(),
        });
    }
    Ok(())
}

/// Batch normalization over the last axis (the channels of NHWC images, the features of a
/// `[batch, features]` input), like Keras's `BatchNormalization`.
///
/// - Variables (float32 under every policy): `gamma` (ones) and `beta` (zeros), trainable;
///   `moving_mean` (zeros) and `moving_variance` (ones), non-trainable: never seen by the
///   optimizer, counted as non-trainable in `summary`, saved in checkpoints.
/// - Training (`forward_train`): the batch's mean and (biased) variance per channel, in float32,
///   normalise the batch; `y = gamma (x - mean) / sqrt(var + epsilon) + beta` in float32,
///   rounded once to the compute dtype.
/// - The moving statistics move towards the batch's (`moving = moving * momentum + batch * (1 -
///   momentum)`) only in [`Layer::end_step`] of a step the optimizer applied: a step skipped for
///   non-finite gradients (an overflowing float16 batch, NaN data) leaves them bit-identical,
///   where PyTorch's running statistics take the update anyway (pytorch/pytorch#90342).
///   Every `forward_train` since the last `end_step` is kept and committed in order (the
///   micro-batches of a gradient-accumulation window); a custom loop calls `end_step` once
///   per update.
/// - Inference (`forward`, so `evaluate` and `predict`) normalises with the moving statistics.
///
/// Keras's defaults: momentum 0.99, epsilon 1e-3.
pub struct BatchNormalization<P: PolicyKind> {
    momentum: f32,
    epsilon: f32,
    name: String,
    output_shape: Option<Vec<usize>>,
    gamma: Option<Variable>,
    beta: Option<Variable>,
    moving_mean: Option<Variable>,
    moving_variance: Option<Variable>,
    /// The last `forward_train`'s input and batch statistics, for backward.
    saved: Option<Saved<P>>,
    /// The batch statistics of each `forward_train` of the step in flight (one per
    /// micro-batch), committed by an applied `end_step`.
    pending: Vec<(Tensor<F32>, Tensor<F32>)>,
    _policy: PhantomData<P>,
}

/// What backward needs of a training forward: the input, the batch mean and variance, and
/// whether a ReLU was fused into the output ([`Layer::forward_train_fused`]).
struct Saved<P: PolicyKind> {
    /// The input; for a frozen layer with a fused ReLU, the output (its mask is what backward
    /// needs).
    x: Tensor<P::Compute>,
    mean: Tensor<F32>,
    var: Tensor<F32>,
    relu: bool,
    /// Normalised with the moving statistics (a frozen layer): backward is a per-channel scale.
    frozen: bool,
}

impl<P: PolicyKind> std::fmt::Debug for BatchNormalization<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchNormalization")
            .field("name", &self.name)
            .field("momentum", &self.momentum)
            .field("epsilon", &self.epsilon)
            .field("policy", &P::POLICY)
            .finish()
    }
}

impl<P: PolicyKind> Default for BatchNormalization<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: PolicyKind> BatchNormalization<P> {
    /// Keras's defaults: momentum 0.99, epsilon 1e-3.
    pub fn new() -> Self {
        BatchNormalization {
            momentum: 0.99,
            epsilon: 1e-3,
            name: "batch_normalization".to_string(),
            output_shape: None,
            gamma: None,
            beta: None,
            moving_mean: None,
            moving_variance: None,
            saved: None,
            pending: vec![],
            _policy: PhantomData,
        }
    }

    /// The momentum of the moving statistics (in `[0, 1]`; checked at `build`).
    pub fn momentum(mut self, momentum: f32) -> Self {
        self.momentum = momentum;
        self
    }

    /// Added to the variance (finite and positive; checked at `build`).
    pub fn epsilon(mut self, epsilon: f32) -> Self {
        self.epsilon = epsilon;
        self
    }

    /// The moving mean (float32, one per channel), once built.
    pub fn moving_mean(&self) -> Option<&Variable> {
        self.moving_mean.as_ref()
    }

    /// The moving variance (float32, one per channel), once built.
    pub fn moving_variance(&self) -> Option<&Variable> {
        self.moving_variance.as_ref()
    }

    fn not_built(&self) -> Error {
        Error::NotBuilt {
            layer: self.name.clone(),
        }
    }

    fn channels(&self) -> Result<usize> {
        self.gamma
            .as_ref()
            .map(|g| g.value().len())
            .ok_or_else(|| self.not_built())
    }

    fn check_input(&self, x: &Tensor<P::Compute>) -> Result<()> {
        check_batch(&self.name, self.output_shape.as_deref(), x.shape())
    }

    /// The training forward, followed by ReLU in the same pass when `relu`.
    /// Whether the layer is frozen (its `gamma` is): it then normalises with its moving
    /// statistics in training too, and leaves them as they are.
    fn frozen(&self) -> bool {
        self.gamma.as_ref().is_some_and(Variable::frozen)
    }

    fn train_forward(&mut self, x: &Tensor<P::Compute>, relu: bool) -> Result<Tensor<P::Compute>> {
        self.check_input(x)?;
        if self.frozen() {
            let (Some(mean), Some(var)) = (&self.moving_mean, &self.moving_variance) else {
                return Err(self.not_built());
            };
            let (mean, var) = (mean.value().clone(), var.value().clone());
            let params = self.params(&mean, &var)?;
            let y = if relu {
                ops::normalize_relu(x, params)?
            } else {
                ops::normalize(x, params)?
            };
            self.saved = Some(Saved {
                x: if relu { y.clone() } else { x.clone() },
                mean,
                var,
                relu,
                frozen: true,
            });
            return Ok(y);
        }
        let (mean, var) = ops::moments(x)?;
        let params = self.params(&mean, &var)?;
        let y = if relu {
            ops::normalize_relu(x, params)?
        } else {
            ops::normalize(x, params)?
        };
        self.pending.push((mean.clone(), var.clone()));
        self.saved = Some(Saved {
            x: x.clone(),
            mean,
            var,
            relu,
            frozen: false,
        });
        Ok(y)
    }

    fn params<'a>(&'a self, mean: &'a Tensor<F32>, var: &'a Tensor<F32>) -> Result<Norm<'a>> {
        match (&self.gamma, &self.beta) {
            (Some(gamma), Some(beta)) => Ok(Norm {
                mean,
                var,
                gamma: gamma.value(),
                beta: beta.value(),
                epsilon: self.epsilon,
            }),
            _ => Err(self.not_built()),
        }
    }
}

impl<P: PolicyKind> Layer for BatchNormalization<P> {
    type Policy = P;
    type Input = P::Compute;
    type Output = P::Compute;

    fn type_name(&self) -> &'static str {
        "BatchNormalization"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }

    fn build(&mut self, input_shape: &[usize]) -> Result<Vec<usize>> {
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(Error::InvalidArgument {
                what: format!("{}: momentum {} is not in [0, 1]", self.name, self.momentum),
            });
        }
        let Some(channels) = features(
            "BatchNormalization",
            &self.name,
            self.epsilon,
            self.output_shape.as_deref(),
            input_shape,
        )?
        else {
            return Ok(input_shape.to_vec());
        };
        let full = |v: f32| Tensor::<F32>::full(&[channels], v);
        self.gamma = Some(Variable::new("gamma", full(1.0)?)?);
        self.beta = Some(Variable::new("beta", full(0.0)?)?);
        self.moving_mean = Some(Variable::non_trainable("moving_mean", full(0.0)?)?);
        self.moving_variance = Some(
            Variable::non_trainable("moving_variance", full(1.0)?)?
                .with_domain(mp_core::Domain::NonNegative),
        );
        self.output_shape = Some(input_shape.to_vec());
        Ok(input_shape.to_vec())
    }

    fn output_shape(&self) -> Option<&[usize]> {
        self.output_shape.as_deref()
    }

    fn forward(&self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        self.check_input(x)?;
        let (Some(mean), Some(var)) = (&self.moving_mean, &self.moving_variance) else {
            return Err(self.not_built());
        };
        Ok(ops::normalize(x, self.params(mean.value(), var.value())?)?)
    }

    fn forward_train(&mut self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        self.train_forward(x, false)
    }

    fn forward_train_fused(
        &mut self,
        x: &Tensor<P::Compute>,
        act: mp_kernels::activation::Activation,
    ) -> Result<Option<Tensor<P::Compute>>> {
        // The fused pass is a CPU kernel; elsewhere the two layers run one after the other.
        if act != mp_kernels::activation::Activation::Relu || x.device() != mp_core::Device::Cpu {
            return Ok(None);
        }
        self.train_forward(x, true).map(Some)
    }

    fn backward(
        &mut self,
        dy: &Tensor<P::Compute>,
        _need_dx: bool,
    ) -> Result<Option<Tensor<P::Compute>>> {
        let Saved {
            x,
            mean,
            var,
            relu,
            frozen,
        } = self.saved.take().ok_or_else(|| Error::InvalidState {
            layer: self.name.clone(),
            what: "backward called without a preceding forward_train".into(),
        })?;
        if dy.shape() != x.shape() {
            return Err(Error::ShapeMismatch {
                layer: self.name.clone(),
                expected: format!("a gradient of shape {:?}", x.shape()),
                got: dy.shape().to_vec(),
            });
        }
        if frozen {
            // y = gamma (x - mean) / sqrt(var + epsilon) + beta with constant statistics:
            // dx = dy gamma / sqrt(var + epsilon), which is `normalize` of dy with a zero mean
            // and a zero beta (in float32, rounded once to the compute dtype).
            let masked;
            let dz = if relu {
                masked =
                    ops::activation_backward(mp_kernels::activation::Activation::Relu, dy, &x)?;
                &masked
            } else {
                dy
            };
            let Some(gamma) = &self.gamma else {
                return Err(self.not_built());
            };
            let zeros = Tensor::<F32>::zeros_on(mean.shape(), mean.device())?;
            let params = Norm {
                mean: &zeros,
                var: &var,
                gamma: gamma.value(),
                beta: &zeros,
                epsilon: self.epsilon,
            };
            return Ok(Some(ops::normalize(dz, params)?));
        }
        let (Some(gamma), Some(beta)) = (self.gamma.as_mut(), self.beta.as_mut()) else {
            return Err(Error::NotBuilt {
                layer: self.name.clone(),
            });
        };
        // Backward does not read beta; a shared (O(1)) copy frees beta's gradient to be written.
        let beta_value = beta.value().clone();
        let (gamma_value, dgamma) = gamma.value_and_grad_mut();
        let params = Norm {
            mean: &mean,
            var: &var,
            gamma: gamma_value,
            beta: &beta_value,
            epsilon: self.epsilon,
        };
        let dbeta = beta.grad_mut();
        let dx = if relu {
            ops::normalize_relu_backward(&x, dy, params, dgamma, dbeta)?
        } else {
            ops::normalize_backward(&x, dy, params, dgamma, dbeta)?
        };
        Ok(Some(dx))
    }

    fn end_step(&mut self, applied: bool) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        if !applied || pending.is_empty() {
            return Ok(());
        }
        let (Some(mm), Some(mv)) = (self.moving_mean.as_mut(), self.moving_variance.as_mut())
        else {
            return Err(Error::NotBuilt {
                layer: self.name.clone(),
            });
        };
        // One moving-average update per forward pass of the step (several under gradient
        // accumulation), in order, as Keras updates them.
        for (mean, var) in &pending {
            ops::moving_average(mm.value_mut(), mean, self.momentum)?;
            ops::moving_average(mv.value_mut(), var, self.momentum)?;
        }
        Ok(())
    }

    fn foreign_tensors(&mut self, prefix: &str, out: &mut ForeignTensors) -> Result<()> {
        out.push_renamed(
            prefix,
            &[
                (self.gamma.as_ref(), "gamma", "weight"),
                (self.beta.as_ref(), "beta", "bias"),
                (self.moving_mean.as_ref(), "moving_mean", "running_mean"),
                (
                    self.moving_variance.as_ref(),
                    "moving_variance",
                    "running_var",
                ),
            ],
        );
        if self.moving_mean.is_some() {
            out.push_batches_tracked(ForeignTensors::name(prefix, "num_batches_tracked"));
        }
        out.hyperparameter(prefix, "eps", self.epsilon);
        out.hyperparameter(prefix, "momentum", 1.0 - self.momentum);
        Ok(())
    }

    fn visit_variables(
        &mut self,
        prefix: &str,
        f: &mut dyn FnMut(&str, &mut Variable) -> Result<()>,
    ) -> Result<()> {
        for (name, v) in [
            ("gamma", &mut self.gamma),
            ("beta", &mut self.beta),
            ("moving_mean", &mut self.moving_mean),
            ("moving_variance", &mut self.moving_variance),
        ] {
            if let Some(v) = v.as_mut() {
                f(&format!("{prefix}{name}"), v)?;
            }
        }
        Ok(())
    }

    fn saved_bytes(&self) -> usize {
        self.saved.as_ref().map_or(0, |s| {
            s.x.size_in_bytes() + s.mean.size_in_bytes() + s.var.size_in_bytes()
        })
    }

    fn param_count(&self) -> usize {
        self.channels().map_or(0, |c| 4 * c)
    }

    fn non_trainable_param_count(&self) -> usize {
        self.channels().map_or(0, |c| 2 * c)
    }

    fn frozen_param_count(&self) -> usize {
        super::util::frozen_len(&[self.gamma.as_ref(), self.beta.as_ref()])
    }
}

/// Layer normalization over the last axis, like Keras's `LayerNormalization(axis=-1)`: each
/// row (a token's features, a sample's units) is normalised by its own mean and variance, then
/// scaled by `gamma` and shifted by `beta` per feature.
///
/// - Variables (float32 under every policy): `gamma` (ones) and `beta` (zeros).
/// - Input and output in the compute dtype; the statistics and the normalisation are float32
///   (Keras 3 runs normalisation in float32 under mixed precision: in float16 the variance of
///   large activations overflows and LayerNorm goes NaN, tensorflow/models#10426), rounded
///   once to the compute dtype.
/// - The same computation in training and inference (no moving statistics).
///
/// Keras's default epsilon is 1e-3 (PyTorch's `nn.LayerNorm`: 1e-5).
pub struct LayerNormalization<P: PolicyKind> {
    epsilon: f32,
    name: String,
    output_shape: Option<Vec<usize>>,
    gamma: Option<Variable>,
    beta: Option<Variable>,
    /// The last `forward_train`'s input and per-row statistics, for backward.
    saved: Option<Normalized<P>>,
}

/// A layer normalization's output (or input), and each row's float32 mean and inverse
/// standard deviation.
type Normalized<P> = (Tensor<<P as PolicyKind>::Compute>, Tensor<F32>, Tensor<F32>);

impl<P: PolicyKind> std::fmt::Debug for LayerNormalization<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerNormalization")
            .field("name", &self.name)
            .field("epsilon", &self.epsilon)
            .field("policy", &P::POLICY)
            .finish()
    }
}

impl<P: PolicyKind> Default for LayerNormalization<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: PolicyKind> LayerNormalization<P> {
    /// Keras's default: epsilon 1e-3.
    pub fn new() -> Self {
        LayerNormalization {
            epsilon: 1e-3,
            name: "layer_normalization".to_string(),
            output_shape: None,
            gamma: None,
            beta: None,
            saved: None,
        }
    }

    /// Added to the variance (finite and positive; checked at `build`).
    pub fn epsilon(mut self, epsilon: f32) -> Self {
        self.epsilon = epsilon;
        self
    }

    fn not_built(&self) -> Error {
        Error::NotBuilt {
            layer: self.name.clone(),
        }
    }

    fn check_input(&self, x: &Tensor<P::Compute>) -> Result<()> {
        check_batch(&self.name, self.output_shape.as_deref(), x.shape())
    }

    fn run(&self, x: &Tensor<P::Compute>) -> Result<Normalized<P>> {
        self.check_input(x)?;
        let (Some(gamma), Some(beta)) = (&self.gamma, &self.beta) else {
            return Err(self.not_built());
        };
        Ok(ops::layer_norm(
            x,
            gamma.value(),
            beta.value(),
            self.epsilon,
        )?)
    }
}

impl<P: PolicyKind> Layer for LayerNormalization<P> {
    type Policy = P;
    type Input = P::Compute;
    type Output = P::Compute;

    fn type_name(&self) -> &'static str {
        "LayerNormalization"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }

    fn build(&mut self, input_shape: &[usize]) -> Result<Vec<usize>> {
        let Some(features) = features(
            "LayerNormalization",
            &self.name,
            self.epsilon,
            self.output_shape.as_deref(),
            input_shape,
        )?
        else {
            return Ok(input_shape.to_vec());
        };
        let full = |v: f32| Tensor::<F32>::full(&[features], v);
        self.gamma = Some(Variable::new("gamma", full(1.0)?)?);
        self.beta = Some(Variable::new("beta", full(0.0)?)?);
        self.output_shape = Some(input_shape.to_vec());
        Ok(input_shape.to_vec())
    }

    fn output_shape(&self) -> Option<&[usize]> {
        self.output_shape.as_deref()
    }

    fn forward(&self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        Ok(self.run(x)?.0)
    }

    fn forward_train(&mut self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        let (y, mean, inv_std) = self.run(x)?;
        self.saved = Some((x.clone(), mean, inv_std));
        Ok(y)
    }

    fn backward(
        &mut self,
        dy: &Tensor<P::Compute>,
        _need_dx: bool,
    ) -> Result<Option<Tensor<P::Compute>>> {
        let (x, mean, inv_std) = self.saved.take().ok_or_else(|| Error::InvalidState {
            layer: self.name.clone(),
            what: "backward called without a preceding forward_train".into(),
        })?;
        if dy.shape() != x.shape() {
            return Err(Error::ShapeMismatch {
                layer: self.name.clone(),
                expected: format!("a gradient of shape {:?}", x.shape()),
                got: dy.shape().to_vec(),
            });
        }
        let (Some(gamma), Some(beta)) = (self.gamma.as_mut(), self.beta.as_mut()) else {
            return Err(Error::NotBuilt {
                layer: self.name.clone(),
            });
        };
        let (gamma_value, dgamma) = gamma.value_and_grad_mut();
        let dx = ops::layer_norm_backward(
            &x,
            dy,
            gamma_value,
            &mean,
            &inv_std,
            dgamma,
            beta.grad_mut(),
        )?;
        Ok(Some(dx))
    }

    fn foreign_tensors(&mut self, prefix: &str, out: &mut ForeignTensors) -> Result<()> {
        out.push_renamed(
            prefix,
            &[
                (self.gamma.as_ref(), "gamma", "weight"),
                (self.beta.as_ref(), "beta", "bias"),
            ],
        );
        out.hyperparameter(prefix, "eps", self.epsilon);
        Ok(())
    }

    fn visit_variables(
        &mut self,
        prefix: &str,
        f: &mut dyn FnMut(&str, &mut Variable) -> Result<()>,
    ) -> Result<()> {
        for (name, v) in [("gamma", &mut self.gamma), ("beta", &mut self.beta)] {
            if let Some(v) = v.as_mut() {
                f(&format!("{prefix}{name}"), v)?;
            }
        }
        Ok(())
    }

    fn saved_bytes(&self) -> usize {
        self.saved.as_ref().map_or(0, |(x, m, s)| {
            x.size_in_bytes() + m.size_in_bytes() + s.size_in_bytes()
        })
    }

    fn param_count(&self) -> usize {
        self.gamma.as_ref().map_or(0, |g| 2 * g.value().len())
    }

    fn frozen_param_count(&self) -> usize {
        super::util::frozen_len(&[self.gamma.as_ref(), self.beta.as_ref()])
    }
}
