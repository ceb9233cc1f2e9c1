//! `Conv2D`: a 2-D convolution over NHWC images (channels last, as Keras), computed as one GEMM
//! per step in the policy's compute dtype with float32 accumulation and float32 variables.

use std::marker::PhantomData;

use mp_core::{F32, PolicyKind, Tensor, Variable};
use mp_kernels::activation::Activation;
use mp_kernels::conv::{Geometry, Padding, Window};
use mp_kernels::gemm::{Epilogue, Gemm};
use mp_kernels::ops;

use super::util::{InferenceCast, KernelCast, glorot_uniform, name_seed};
use crate::checkpoint::{ForeignTensors, Transform};
use crate::error::{Error, Result};
use crate::layer::Layer;

/// A 2-D convolution, like Keras's `Conv2D` (`data_format="channels_last"`).
///
/// - Input `[batch, height, width, channels]`, output `[batch, out_h, out_w, filters]`.
/// - Variables: `kernel` (`[kh, kw, channels, filters]`, Keras's layout, glorot-uniform with
///   `fan_in = kh·kw·channels`, `fan_out = kh·kw·filters`) and `bias` (`filters`, zeros), both
///   float32 under every policy.
/// - Forward: the input patches (im2col, in the compute dtype, formed a few MiB of images at a
///   time; a 1×1 stride-1 convolution uses the input itself) times the kernel cast to the
///   compute dtype, GEMMs accumulating in float32 that add the float32 bias (and apply ReLU)
///   before rounding once.
/// - Backward: the kernel gradient `patchesᵀ · dy` comes out of the float32-accumulating GEMM
///   straight into the float32 gradient. The input gradient of a stride-1 convolution is the
///   convolution of `dy` with the flipped kernel, whose GEMM rounds `dx` once into the compute
///   dtype (no float32 copy of `dx`); with larger strides `dy · kernelᵀ` is formed in float32 and
///   summed back into the input positions in float32 (col2im), then rounded once. Only the
///   input is kept for backward (the patches are formed again), so a 3×3 convolution keeps a
///   ninth of what keeping the patches would.
///
/// ```
/// use mp_core::{MixedBFloat16, Tensor, BF16};
/// use mp_layers::{Conv2D, Layer, Padding};
///
/// let mut conv = Conv2D::<MixedBFloat16>::new(8, [3, 3]).padding(Padding::Same).relu();
/// assert_eq!(conv.build(&[28, 28, 1])?, vec![28, 28, 8]);
/// let x = Tensor::<BF16>::from_f32(&[2, 28, 28, 1], &vec![0.5; 2 * 28 * 28])?;
/// assert_eq!(conv.forward(&x)?.shape(), &[2, 28, 28, 8]);
/// # Ok::<(), mp_layers::Error>(())
/// ```
pub struct Conv2D<P: PolicyKind> {
    filters: usize,
    window: Window,
    relu: bool,
    use_bias: bool,
    seed: Option<u64>,
    name: String,
    /// `[height, width, channels]` of the input, once built.
    input_shape: Option<[usize; 3]>,
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

impl<P: PolicyKind> std::fmt::Debug for Conv2D<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conv2D")
            .field("name", &self.name)
            .field("filters", &self.filters)
            .field("window", &self.window)
            .field("relu", &self.relu)
            .field("policy", &P::POLICY)
            .field("input_shape", &self.input_shape)
            .finish()
    }
}

impl<P: PolicyKind> Conv2D<P> {
    /// A convolution with `filters` outputs and a `kernel_size` window; strides and dilation 1,
    /// `valid` padding, a bias, no activation (Keras's defaults).
    pub fn new(filters: usize, kernel_size: [usize; 2]) -> Self {
        Conv2D {
            filters,
            window: Window::new(kernel_size),
            relu: false,
            use_bias: true,
            seed: None,
            name: "conv2d".to_string(),
            input_shape: None,
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

    /// The step between windows (`[rows, cols]`).
    pub fn strides(mut self, strides: [usize; 2]) -> Self {
        self.window = self.window.strides(strides);
        self
    }

    /// The step between the kernel's taps (`[rows, cols]`; 1 is a plain convolution).
    pub fn dilation(mut self, dilation: [usize; 2]) -> Self {
        self.window = self.window.dilation(dilation);
        self
    }

    /// `valid` (the default) or `same` padding.
    pub fn padding(mut self, padding: Padding) -> Self {
        self.window = self.window.padding(padding);
        self
    }

    /// Applies ReLU to the output (fused into the GEMM's store).
    pub fn relu(mut self) -> Self {
        self.relu = true;
        self
    }

    /// Leaves out the bias (as before a `BatchNormalization`, whose beta replaces it).
    pub fn without_bias(mut self) -> Self {
        self.use_bias = false;
        self
    }

    /// Seeds the kernel initialiser (default: a hash of the layer's name).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The number of filters (output channels).
    pub fn filters(&self) -> usize {
        self.filters
    }

    /// The window: kernel size, strides, dilation, padding.
    pub fn window(&self) -> Window {
        self.window
    }

    /// The kernel variable (`[kh, kw, channels, filters]`, float32), once built.
    pub fn kernel(&self) -> Option<&Variable> {
        self.kernel.as_ref()
    }

    /// The bias variable (`filters`, float32), once built.
    pub fn bias(&self) -> Option<&Variable> {
        self.bias.as_ref()
    }

    fn not_built(&self) -> Error {
        Error::NotBuilt {
            layer: self.name.clone(),
        }
    }

    /// The geometry for a batch `x`, whose per-sample shape must be the built one.
    fn geometry(&self, x: &Tensor<P::Compute>) -> Result<Geometry> {
        let inp = self.input_shape.ok_or_else(|| self.not_built())?;
        if x.rank() != 4 || x.shape()[1..] != inp {
            return Err(Error::ShapeMismatch {
                layer: self.name.clone(),
                expected: format!("(batch, {}, {}, {})", inp[0], inp[1], inp[2]),
                got: x.shape().to_vec(),
            });
        }
        let [h, w, c] = inp;
        Geometry::new("Conv2D", [x.shape()[0], h, w, c], self.window).map_err(|e| {
            Error::InvalidArgument {
                what: format!("{}: {e}", self.name),
            }
        })
    }

    fn epilogue(&self) -> Epilogue<'_, Tensor<F32>> {
        Epilogue::from_parts(self.bias.as_ref().map(Variable::value), self.relu)
    }

    /// The convolution with `kernel` already in the compute dtype.
    fn compute(
        &self,
        x: &Tensor<P::Compute>,
        kernel: &Tensor<P::Compute>,
    ) -> Result<Tensor<P::Compute>> {
        let g = self.geometry(x)?;
        Ok(ops::conv2d(
            x,
            kernel,
            &g,
            Gemm::new().epilogue(self.epilogue()),
        )?)
    }

    /// The kernel in the compute dtype for this step.
    fn kernel_compute(&self) -> Result<&Tensor<P::Compute>> {
        let kernel = self.kernel.as_ref().ok_or_else(|| self.not_built())?;
        self.kernel_cast.get(kernel, &self.name)
    }
}

impl<P: PolicyKind> Layer for Conv2D<P> {
    type Policy = P;
    type Input = P::Compute;
    type Output = P::Compute;

    fn type_name(&self) -> &'static str {
        "Conv2D"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }

    fn build(&mut self, input_shape: &[usize]) -> Result<Vec<usize>> {
        if self.filters == 0 {
            return Err(Error::InvalidArgument {
                what: format!("{}: Conv2D needs at least one filter", self.name),
            });
        }
        let Ok(inp) = <[usize; 3]>::try_from(input_shape) else {
            return Err(Error::InvalidArgument {
                what: format!(
                    "{}: Conv2D takes images of shape (height, width, channels), got \
                     {input_shape:?} per sample (use Reshape to add a channel axis)",
                    self.name
                ),
            });
        };
        let [h, w, c] = inp;
        let g = Geometry::new("Conv2D", [1, h, w, c], self.window).map_err(|e| {
            Error::InvalidArgument {
                what: format!("{}: {e}", self.name),
            }
        })?;
        if c == 0 {
            return Err(Error::InvalidArgument {
                what: format!("{}: the input has 0 channels", self.name),
            });
        }
        let out = vec![g.output[0], g.output[1], self.filters];
        if let Some(built) = self.input_shape {
            if built != inp {
                return Err(Error::IncompatibleShapes {
                    layer: self.name.clone(),
                    previous: "the layer before".into(),
                    expected: built.to_vec(),
                    got: input_shape.to_vec(),
                });
            }
            return Ok(out);
        }
        let [kh, kw] = self.window.size;
        let (fan_in, fan_out) = (kh * kw * c, kh * kw * self.filters);
        let seed = self.seed.unwrap_or_else(|| name_seed(&self.name));
        let shape = [kh, kw, c, self.filters];
        let kernel = glorot_uniform(&self.name, seed, &shape, fan_in, fan_out)?;
        self.kernel = Some(Variable::new("kernel", kernel)?);
        if self.use_bias {
            self.bias = Some(Variable::new(
                "bias",
                Tensor::<F32>::zeros(&[self.filters])?,
            )?);
        }
        self.input_shape = Some(inp);
        self.output_shape = Some(out.clone());
        Ok(out)
    }

    fn output_shape(&self) -> Option<&[usize]> {
        self.output_shape.as_deref()
    }

    fn forward(&self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        let kernel = self.kernel.as_ref().ok_or_else(|| self.not_built())?;
        let k = self.inference_cast.get(kernel)?;
        self.compute(x, &k)
    }

    fn forward_train(&mut self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        let kernel = self.kernel.as_ref().ok_or_else(|| self.not_built())?;
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
        let x = self.saved_x.take().ok_or_else(|| Error::InvalidState {
            layer: self.name.clone(),
            what: "backward called without a preceding forward_train".into(),
        })?;
        let y = self.saved_y.take();
        let g = self.geometry(&x)?;
        let expected = [g.batch, g.output[0], g.output[1], self.filters];
        if dy.shape() != expected {
            return Err(Error::ShapeMismatch {
                layer: self.name.clone(),
                expected: format!("a gradient of shape {expected:?}"),
                got: dy.shape().to_vec(),
            });
        }
        let dz_owned;
        let dz = match &y {
            Some(y) => {
                dz_owned = ops::activation_backward(Activation::Relu, dy, y)?;
                &dz_owned
            }
            None => dy,
        };
        let dx = if need_dx {
            Some(ops::conv2d_backward_input::<_, P::Compute>(
                dz,
                self.kernel_compute()?,
                &g,
            )?)
        } else {
            None
        };
        let Some(kernel) = self.kernel.as_mut() else {
            return Err(Error::NotBuilt {
                layer: self.name.clone(),
            });
        };
        // d kernel += patchesᵀ · dz, accumulated in float32 straight into the gradient.
        // A frozen variable gets no gradient: no weight-gradient GEMM at all.
        if !kernel.frozen() {
            ops::conv2d_backward_kernel(&x, dz, &g, kernel.grad_mut())?;
        }
        if let Some(bias) = self.bias.as_mut().filter(|b| !b.frozen()) {
            ops::bias_grad_accumulate(dz, bias.grad_mut())?;
        }
        Ok(dx)
    }

    fn foreign_tensors(&mut self, prefix: &str, out: &mut ForeignTensors) -> Result<()> {
        out.take_flattened();
        out.push_weight_and_bias(
            (prefix, prefix),
            self.kernel.as_ref(),
            self.bias.as_ref(),
            Transform::ConvOihw,
            self.relu,
        );
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
