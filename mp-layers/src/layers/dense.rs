//! `Dense`: `y = activation(x · kernel + bias)`, computed in the policy's compute dtype with
//! float32 accumulation and float32 variables.

use std::marker::PhantomData;

use mp_core::{F32, PolicyKind, Tensor, Variable};
use mp_kernels::activation::Activation;
use mp_kernels::gemm::{Epilogue, Gemm};
use mp_kernels::ops::{self, Mat};

use super::util::{InferenceCast, KernelCast, check_features, glorot_uniform, name_seed};
use crate::checkpoint::{ForeignTensors, Transform};
use crate::error::{Error, Result};
use crate::layer::Layer;

/// A densely connected layer, like Keras's `Dense`.
///
/// - Variables: `kernel` (`input_dim × units`, glorot-uniform) and `bias` (`units`, zeros), both
///   float32 under every policy.
/// - Forward: the input arrives in the compute dtype; the kernel is cast to the compute dtype
///   once per training step (and reused by backward); the GEMM accumulates in float32 and adds
///   the float32 bias (and applies ReLU) before rounding to the compute dtype once.
/// - Backward: weight gradients come straight out of the float32-accumulating GEMM into the
///   float32 gradient buffers; the input gradient is computed only when asked.
/// - Inputs of any rank: the last axis holds the features and the others fold into the GEMM's
///   rows (`[batch, tokens, features]` is `batch × tokens` rows), as Keras's `Dense` does.
///
/// ```
/// use mp_core::{MixedBFloat16, Tensor, BF16};
/// use mp_layers::{Dense, Layer};
///
/// let mut dense = Dense::<MixedBFloat16>::new(3).relu();
/// assert_eq!(dense.build(&[4])?, vec![3]);
/// let x = Tensor::<BF16>::from_f32(&[2, 4], &[0.5; 8])?;
/// let y = dense.forward(&x)?; // bfloat16 output
/// assert_eq!(y.shape(), &[2, 3]);
/// # Ok::<(), mp_layers::Error>(())
/// ```
pub struct Dense<P: PolicyKind> {
    units: usize,
    relu: bool,
    use_bias: bool,
    seed: Option<u64>,
    name: String,
    input_dim: Option<usize>,
    output_shape: Option<Vec<usize>>,
    kernel: Option<Variable>,
    bias: Option<Variable>,
    /// The kernel cast to the compute dtype by the last `forward_train` (16-bit policies).
    kernel_cast: KernelCast<P::Compute>,
    /// The kernel cast to the compute dtype for `forward`, kept while the kernel is unchanged.
    inference_cast: InferenceCast<P::Compute>,
    saved_x: Option<Tensor<P::Compute>>,
    saved_y: Option<Tensor<P::Compute>>,
    _policy: PhantomData<P>,
}

impl<P: PolicyKind> Dense<P> {
    /// The kernel's and bias's foreign tensors: `weight` (`[out, in]`, its inputs in
    /// channels-first order after a `Flatten` of `flattened` images) and `bias`, under
    /// `foreign_prefix`; `prefix` is the layer's mp prefix.
    pub(crate) fn foreign_as(
        &self,
        prefix: &str,
        foreign_prefix: &str,
        flattened: Option<[usize; 3]>,
        out: &mut ForeignTensors,
    ) {
        let transform = match (flattened, &self.kernel) {
            (Some([h, w, c]), Some(k)) if h * w * c == k.shape()[0] && h * w > 1 => {
                Transform::FlattenedTranspose { h, w, c }
            }
            _ => Transform::Transpose,
        };
        out.push_weight_and_bias(
            (prefix, foreign_prefix),
            self.kernel.as_ref(),
            self.bias.as_ref(),
            transform,
            self.relu,
        );
    }

    /// The kernel's and bias's shapes, once built.
    pub(crate) fn variable_shapes(&self) -> (Option<&[usize]>, Option<&[usize]>) {
        (
            self.kernel.as_ref().map(Variable::shape),
            self.bias.as_ref().map(Variable::shape),
        )
    }
}

impl<P: PolicyKind> std::fmt::Debug for Dense<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dense")
            .field("name", &self.name)
            .field("units", &self.units)
            .field("relu", &self.relu)
            .field("policy", &P::POLICY)
            .field("input_dim", &self.input_dim)
            .finish()
    }
}

impl<P: PolicyKind> Dense<P> {
    /// A dense layer with `units` outputs and no activation.
    pub fn new(units: usize) -> Self {
        Dense {
            units,
            relu: false,
            use_bias: true,
            seed: None,
            name: "dense".to_string(),
            input_dim: None,
            output_shape: None,
            kernel: None,
            bias: None,
            kernel_cast: KernelCast::new(),
            inference_cast: InferenceCast::new(),
            saved_x: None,
            saved_y: None,
            _policy: PhantomData,
        }
    }

    /// Applies ReLU to the output (fused into the GEMM's store).
    pub fn relu(mut self) -> Self {
        self.relu = true;
        self
    }

    /// Leaves out the bias.
    pub fn without_bias(mut self) -> Self {
        self.use_bias = false;
        self
    }

    /// Seeds the kernel initialiser (default: a hash of the layer's name, so a model builds the
    /// same initial weights every time).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The number of outputs.
    pub fn units(&self) -> usize {
        self.units
    }

    /// The kernel variable (`input_dim × units`, float32), once built.
    pub fn kernel(&self) -> Option<&Variable> {
        self.kernel.as_ref()
    }

    /// The bias variable (`units`, float32), once built.
    pub fn bias(&self) -> Option<&Variable> {
        self.bias.as_ref()
    }

    fn built(&self) -> Result<(usize, &Variable)> {
        match (self.input_dim, &self.kernel) {
            (Some(d), Some(k)) => Ok((d, k)),
            _ => Err(Error::NotBuilt {
                layer: self.name.clone(),
            }),
        }
    }

    fn epilogue(&self) -> Epilogue<'_, Tensor<F32>> {
        Epilogue::from_parts(self.bias.as_ref().map(Variable::value), self.relu)
    }

    /// `x · kernel (+ bias, relu)` with `kernel` already in the compute dtype.
    fn compute(
        &self,
        x: &Tensor<P::Compute>,
        kernel: &Tensor<P::Compute>,
    ) -> Result<Tensor<P::Compute>> {
        let (input_dim, _) = self.built()?;
        check_features(&self.name, x.shape(), input_dim)?;
        let mut out_shape = x.shape().to_vec();
        *out_shape.last_mut().expect("rank checked") = self.units;
        let mut y = ops::for_overwrite(&out_shape, x.device())?;
        ops::gemm(
            Mat::of(x),
            Mat::of(kernel),
            &mut y,
            Gemm::new().epilogue(self.epilogue()),
        )?;
        Ok(y)
    }

    /// The kernel in the compute dtype for this step.
    fn kernel_compute(&self) -> Result<&Tensor<P::Compute>> {
        let (_, kernel) = self.built()?;
        self.kernel_cast.get(kernel, &self.name)
    }
}

impl<P: PolicyKind> Layer for Dense<P> {
    type Policy = P;
    type Input = P::Compute;
    type Output = P::Compute;

    fn type_name(&self) -> &'static str {
        "Dense"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }

    fn build(&mut self, input_shape: &[usize]) -> Result<Vec<usize>> {
        if self.units == 0 {
            return Err(Error::InvalidArgument {
                what: format!("{}: Dense needs at least one unit", self.name),
            });
        }
        let Some(&input_dim) = input_shape.last() else {
            return Err(Error::InputRank {
                layer: self.name.clone(),
                previous: "the model input".into(),
                expected: crate::layers::AT_LEAST_ONE_AXIS,
                got: input_shape.to_vec(),
            });
        };
        // Inputs of any rank: the last axis is the features, every other axis (a sequence's
        // tokens) folds into the GEMM's rows, as Keras's Dense on rank-N inputs.
        let mut out_shape = input_shape.to_vec();
        *out_shape.last_mut().expect("not empty") = self.units;
        if input_dim == 0 {
            return Err(Error::IncompatibleShapes {
                layer: self.name.clone(),
                previous: "the model input".into(),
                expected: vec![input_dim.max(1)],
                got: input_shape.to_vec(),
            });
        }
        if let Some(d) = self.input_dim {
            if d != input_dim {
                return Err(Error::IncompatibleShapes {
                    layer: self.name.clone(),
                    previous: "the model input".into(),
                    expected: vec![d],
                    got: input_shape.to_vec(),
                });
            }
            self.output_shape = Some(out_shape.clone());
            return Ok(out_shape);
        }
        let seed = self.seed.unwrap_or_else(|| name_seed(&self.name));
        let shape = [input_dim, self.units];
        let kernel = glorot_uniform(&self.name, seed, &shape, input_dim, self.units)?;
        self.kernel = Some(Variable::new("kernel", kernel)?);
        if self.use_bias {
            self.bias = Some(Variable::new("bias", Tensor::<F32>::zeros(&[self.units])?)?);
        }
        self.input_dim = Some(input_dim);
        self.output_shape = Some(out_shape.clone());
        Ok(out_shape)
    }

    fn output_shape(&self) -> Option<&[usize]> {
        self.output_shape.as_deref()
    }

    fn forward(&self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        let (_, kernel) = self.built()?;
        let k = self.inference_cast.get(kernel)?;
        self.compute(x, &k)
    }

    fn forward_train(&mut self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        let kernel = self.kernel.as_ref().ok_or_else(|| Error::NotBuilt {
            layer: self.name.clone(),
        })?;
        self.kernel_cast.refresh(kernel)?;
        let y = self.compute(x, self.kernel_compute()?)?;
        self.saved_x = Some(x.clone());
        self.saved_y = if self.relu { Some(y.clone()) } else { None };
        Ok(y)
    }

    fn backward(
        &mut self,
        dy: &Tensor<P::Compute>,
        need_dx: bool,
    ) -> Result<Option<Tensor<P::Compute>>> {
        let (input_dim, _) = self.built()?;
        let x = self.saved_x.take().ok_or_else(|| Error::InvalidState {
            layer: self.name.clone(),
            what: "backward called without a preceding forward_train".into(),
        })?;
        let y = self.saved_y.take();
        let rows = check_features(&self.name, dy.shape(), self.units)?;
        if rows * input_dim != x.len() {
            return Err(Error::ShapeMismatch {
                layer: self.name.clone(),
                expected: format!("a gradient for {} rows", x.len() / input_dim),
                got: dy.shape().to_vec(),
            });
        }
        // Through the ReLU: dz = dy where y > 0.
        let dz_owned;
        let dz = match &y {
            Some(y) => {
                dz_owned = ops::activation_backward(Activation::Relu, dy, y)?;
                &dz_owned
            }
            None => dy,
        };
        let dx = if need_dx {
            // dx = dz · kernelᵀ, in the compute dtype.
            let mut dx = ops::for_overwrite(x.shape(), x.device())?;
            ops::gemm(
                Mat::of(dz),
                Mat::of(self.kernel_compute()?).t(),
                &mut dx,
                Gemm::new(),
            )?;
            Some(dx)
        } else {
            None
        };
        // d kernel += xᵀ · dz, accumulated in float32 straight into the gradient.
        let Some(kernel) = self.kernel.as_mut() else {
            return Err(Error::NotBuilt {
                layer: self.name.clone(),
            });
        };
        // A frozen variable gets no gradient: no weight-gradient GEMM at all.
        if !kernel.frozen() {
            ops::gemm(
                Mat::of(&x).t(),
                Mat::of(dz),
                kernel.grad_mut(),
                Gemm::new().accumulate(),
            )?;
        }
        if let Some(bias) = self.bias.as_mut().filter(|b| !b.frozen()) {
            ops::bias_grad_accumulate(dz, bias.grad_mut())?;
        }
        Ok(dx)
    }

    fn foreign_tensors(&mut self, prefix: &str, out: &mut ForeignTensors) -> Result<()> {
        let flattened = out.take_flattened();
        self.foreign_as(prefix, prefix, flattened, out);
        Ok(())
    }

    fn visit_variables(
        &mut self,
        prefix: &str,
        f: &mut dyn FnMut(&str, &mut Variable) -> Result<()>,
    ) -> Result<()> {
        if let Some(k) = self.kernel.as_mut() {
            f(&format!("{prefix}kernel"), k)?;
        }
        if let Some(b) = self.bias.as_mut() {
            f(&format!("{prefix}bias"), b)?;
        }
        Ok(())
    }

    fn saved_bytes(&self) -> usize {
        self.saved_x.as_ref().map_or(0, Tensor::size_in_bytes)
            + self.saved_y.as_ref().map_or(0, Tensor::size_in_bytes)
    }

    fn param_count(&self) -> usize {
        self.kernel.as_ref().map_or(0, |k| k.value().len())
            + self.bias.as_ref().map_or(0, |b| b.value().len())
    }

    fn frozen_param_count(&self) -> usize {
        super::util::frozen_len(&[self.kernel.as_ref(), self.bias.as_ref()])
    }
}
