//! The op surface between layers and kernels: what a training step computes, on tensors, on
//! whatever device they live on.
//!
//! Layers and optimizers say *what* to compute and call only these functions; each one checks
//! that its tensors share one device and fit together, then runs the CPU kernels of
//! [`Cpu::global`] (the paths measured fastest on this machine) or, for tensors on
//! `Device::Cuda(n)` in builds with the `cuda` feature, the CUDA kernels and cuBLASLt. A tensor
//! on another device than its operands is [`mp_core::Error::WrongDevice`] naming the op; shapes
//! that do not fit are an error naming the op and both shapes. Nothing is written on error.
//!
//! Matrices are tensors viewed as `[rows, cols]` with `cols` the last axis and every leading
//! axis folded into `rows` ([`Mat`]); a [`Mat`] can be transposed ([`Mat::t`]).
//!
//! ```
//! use mp_core::{Tensor, F32, BF16};
//! use mp_kernels::gemm::{Epilogue, Gemm};
//! use mp_kernels::ops::{self, Mat};
//!
//! let x = Tensor::<BF16>::from_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])?;
//! let w = Tensor::<BF16>::from_f32(&[3, 2], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0])?;
//! let bias = Tensor::<F32>::from_vec(&[2], vec![0.5, -20.0])?;
//! let mut y = Tensor::<F32>::zeros(&[2, 2])?;
//! ops::gemm(Mat::of(&x), Mat::of(&w), &mut y, Gemm::new().epilogue(Epilogue::BiasRelu(&bias)))?;
//! assert_eq!(y.to_f32_vec()?, vec![4.5, 0.0, 10.5, 0.0]);
//! # Ok::<(), mp_kernels::Error>(())
//! ```

use mp_core::{DTypeKind, Device, F32, Tensor};

use crate::activation::Activation;
use crate::conv::{Geometry, Window};
use crate::cpu::Cpu;
use crate::error::{Error, Result};
#[cfg(feature = "cuda")]
use crate::gemm::Epilogue;
use crate::gemm::{Gemm, MatMut, MatRef};
use crate::optim::{AdamParams, NonFiniteOutputs, RmspropParams, SgdParams};
use crate::profile::{self, OpClass};
use crate::softmax::Label;

mod losses;
mod sequence;
pub use self::losses::{categorical_crossentropy_softmax_grad, dense_loss, dense_loss_grad};
pub use self::sequence::{
    add_table, add_table_backward, attention, attention_backward, embedding, embedding_backward,
    prepend_token, prepend_token_backward, scatter_rows, select_rows, sequence_pool,
    sequence_pool_backward,
};

/// A tensor seen as a `[rows, cols]` matrix (the last axis is `cols`), possibly transposed.
#[derive(Debug)]
pub struct Mat<'a, D: DTypeKind> {
    t: &'a Tensor<D>,
    rows: usize,
    cols: usize,
    trans: bool,
}

impl<D: DTypeKind> Clone for Mat<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<D: DTypeKind> Copy for Mat<'_, D> {}

impl<'a, D: DTypeKind> Mat<'a, D> {
    /// `t` as `[product of the leading axes, last axis]` (a vector is one row).
    pub fn of(t: &'a Tensor<D>) -> Self {
        let (rows, cols) = rows_cols(t.shape());
        Mat {
            t,
            rows,
            cols,
            trans: false,
        }
    }

    /// The transpose.
    pub fn t(self) -> Self {
        Mat {
            trans: !self.trans,
            ..self
        }
    }

    /// The host view the CPU kernels take.
    fn cpu(self) -> Result<MatRef<'a, D::Elem>> {
        let v = MatRef::new(self.t.as_slice()?, self.rows, self.cols);
        Ok(if self.trans { v.t() } else { v })
    }

    /// The shape the product sees.
    pub fn shape(&self) -> (usize, usize) {
        if self.trans {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }
}

/// `[rows, cols]` of a shape: the last axis, every other folded into the rows (a scalar is 1 x 1).
fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape.split_last() {
        Some((&cols, lead)) => (lead.iter().product(), cols),
        None => (1, 1),
    }
}

/// `Ok` on the CPU; on a CUDA device the error that this op has no kernel there yet.
fn on_cpu(op: &'static str, dev: Device) -> Result<()> {
    match dev {
        Device::Cpu => Ok(()),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => {
            let _ = op;
            Err(cuda_missing(n))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Err(not_on_cuda(op)),
    }
}

/// The one device of `devices`, or [`mp_core::Error::WrongDevice`] naming `op`.
fn device(op: &'static str, devices: &[Device]) -> Result<Device> {
    let first = devices.first().copied().unwrap_or_default();
    match devices.iter().find(|&&d| d != first) {
        None => Ok(first),
        Some(&got) => Err(mp_core::Error::WrongDevice {
            op,
            expected: first,
            got,
        }
        .into()),
    }
}

fn same_shape(op: &'static str, what: &'static str, want: &[usize], got: &[usize]) -> Result<()> {
    if want == got {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            op,
            lhs_name: "input",
            lhs: want.to_vec(),
            rhs_name: what,
            rhs: got.to_vec(),
        })
    }
}

/// An op this device has no kernel for yet.
#[cfg(feature = "cuda")]
fn not_on_cuda(op: &'static str) -> Error {
    Error::InvalidArgument {
        op,
        what: "this op has no CUDA kernel yet; run it on the CPU".into(),
    }
}

#[cfg(feature = "cuda")]
fn gpu(ordinal: usize) -> Result<std::sync::Arc<crate::cuda::Gpu>> {
    crate::cuda::Gpu::new(ordinal)
}

#[cfg(not(feature = "cuda"))]
fn cuda_missing(ordinal: usize) -> Error {
    mp_core::Error::CudaNotCompiled { ordinal }.into()
}

/// The bytes of `t`'s elements.
pub(crate) fn nb<D: DTypeKind>(t: &Tensor<D>) -> usize {
    t.len() * size_of::<D::Elem>()
}

/// The floating-point operations of `a · b`.
fn gemm_flop<D: DTypeKind>(a: &Mat<'_, D>, b: &Mat<'_, D>) -> f64 {
    let ((m, k), (_, n)) = (a.shape(), b.shape());
    2.0 * (m * k * n) as f64
}

/// The floating-point operations of one of a convolution's three products, for a kernel of
/// `weights` elements (`patch_len × filters`).
fn conv_flop(g: &Geometry, weights: usize) -> f64 {
    2.0 * (g.pixels() * weights) as f64
}

/// The outputs of a convolution with a kernel of `weights` elements.
fn conv_outputs(g: &Geometry, weights: usize) -> usize {
    g.pixels() * (weights / g.patch_len().max(1))
}

/// A tensor of `shape` on `device` whose values the caller overwrites.
pub fn for_overwrite<D: DTypeKind>(shape: &[usize], device: Device) -> Result<Tensor<D>> {
    Ok(match device {
        Device::Cpu => Tensor::for_overwrite(shape)?,
        Device::Cuda(_) => Tensor::zeros_on(shape, device)?,
    })
}

// -------------------------------------------------------------------------------------------
// GEMM
// -------------------------------------------------------------------------------------------

/// `C = epilogue(alpha * op(A) * op(B) + beta * C)` with float32 accumulation: `op(A)` is
/// `m x k`, `op(B)` `k x n`, and `c` viewed as a matrix `m x n`; the bias (if any) is a float32
/// tensor of `n` values on the same device.
///
/// # Errors
/// [`Error::ShapeMismatch`] naming the shapes that do not fit; `WrongDevice` for an operand on
/// another device.
pub fn gemm<T: DTypeKind, O: DTypeKind>(
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    c: &mut Tensor<O>,
    g: Gemm<'_, Tensor<F32>>,
) -> Result<()> {
    let _span = profile::span(OpClass::Gemm)
        .flop(gemm_flop(&a, &b))
        .bytes(nb(a.t) + nb(b.t) + nb(c));
    const OP: &str = "gemm";
    let bias_dev = g.epilogue.bias().map(Tensor::device);
    let mut devices = vec![a.t.device(), b.t.device(), c.device()];
    devices.extend(bias_dev);
    let (c_rows, c_cols) = rows_cols(c.shape());
    match device(OP, &devices)? {
        Device::Cpu => {
            let epilogue = g.epilogue.try_map(|t| t.as_slice())?;
            let (av, bv) = (a.cpu()?, b.cpu()?);
            Cpu::global()?.gemm(
                av,
                bv,
                MatMut::new(c.as_mut_slice()?, c_rows, c_cols),
                Gemm {
                    alpha: g.alpha,
                    beta: g.beta,
                    epilogue,
                },
            )
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => {
            let ((m, k), (kb, n)) = (a.shape(), b.shape());
            if k != kb || (c_rows, c_cols) != (m, n) {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    lhs_name: "op(a) [m, k], op(b) [k, n]",
                    lhs: vec![m, k, kb, n],
                    rhs_name: "c [rows, cols]",
                    rhs: vec![c_rows, c_cols],
                });
            }
            use crate::cuda::CudaEpilogue as E;
            let epi = match g.epilogue {
                Epilogue::None => E::None,
                Epilogue::Relu => E::Relu,
                Epilogue::Bias(t) => E::Bias(t.cuda_buf()?),
                Epilogue::BiasRelu(t) => E::BiasRelu(t.cuda_buf()?),
            };
            crate::cuda::gemm(
                &*gpu(ord)?,
                a.trans,
                b.trans,
                m,
                n,
                k,
                g.alpha,
                a.t.cuda_buf()?,
                a.cols,
                b.t.cuda_buf()?,
                b.cols,
                g.beta,
                c.cuda_buf_mut()?,
                c_cols,
                epi,
            )
        }
    }
}

// -------------------------------------------------------------------------------------------
// Casts and activations
// -------------------------------------------------------------------------------------------

/// Casts `x` into `out` (same shape and device), round to nearest even, NaN and infinities kept.
///
/// # Errors
/// [`Error::ShapeMismatch`] for another shape; `WrongDevice`.
pub fn cast_into<S: DTypeKind, D: DTypeKind>(x: &Tensor<S>, out: &mut Tensor<D>) -> Result<()> {
    let _span = profile::span(OpClass::Cast).bytes(nb(x) + nb(out));
    crate::counters::record_cast();
    const OP: &str = "cast";
    same_shape(OP, "out", x.shape(), out.shape())?;
    match device(OP, &[x.device(), out.device()])? {
        Device::Cpu => Cpu::global()?.cast(x.as_slice()?, out.as_mut_slice()?),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => crate::cuda::cast(&*gpu(n)?, x.cuda_buf()?, out.cuda_buf_mut()?),
    }
}

/// `y = y + x` elementwise (added in float32, rounded once to `D`): a residual connection.
///
/// # Errors
/// [`Error::ShapeMismatch`] for shapes that differ; `WrongDevice`; on CUDA, no kernel yet.
pub fn add_assign<D: DTypeKind>(x: &Tensor<D>, y: &mut Tensor<D>) -> Result<()> {
    let _span = profile::span(OpClass::Add).bytes(nb(x) + 2 * nb(y));
    const OP: &str = "add";
    same_shape(OP, "y", x.shape(), y.shape())?;
    match device(OP, &[x.device(), y.device()])? {
        Device::Cpu => Cpu::global()?.add_assign(x.as_slice()?, y.as_mut_slice()?),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Err(not_on_cuda(OP)),
    }
}

/// `x` cast to `D`, on `x`'s device.
///
/// # Errors
/// As [`cast_into`].
pub fn cast<S: DTypeKind, D: DTypeKind>(x: &Tensor<S>) -> Result<Tensor<D>> {
    let mut out = for_overwrite(x.shape(), x.device())?;
    cast_into(x, &mut out)?;
    Ok(out)
}

/// `act(x)` as a new tensor, in one pass (reading `x`, writing the result): what a layer whose
/// input is borrowed calls, where cloning `x` and applying [`activation_inplace`] would copy
/// `x` first (its buffer is shared).
///
/// # Errors
/// As [`activation_inplace`].
pub fn activation<D: DTypeKind>(act: Activation, x: &Tensor<D>) -> Result<Tensor<D>> {
    if x.device() != Device::Cpu {
        // No out-of-place kernel on CUDA: the copy and the in-place kernel.
        let mut y = x.clone();
        activation_inplace(act, &mut y)?;
        return Ok(y);
    }
    let _span = profile::span(OpClass::Activation).bytes(2 * nb(x));
    let mut y = for_overwrite::<D>(x.shape(), x.device())?;
    Cpu::global()?.activation(act, x.as_slice()?, y.as_mut_slice()?)?;
    Ok(y)
}

/// `x = act(x)` in place.
///
/// # Errors
/// On CUDA, an activation other than ReLU (no kernel yet).
pub fn activation_inplace<D: DTypeKind>(act: Activation, x: &mut Tensor<D>) -> Result<()> {
    let _span = profile::span(OpClass::Activation).bytes(2 * nb(x));
    match x.device() {
        Device::Cpu => Cpu::global()?.activation_inplace(act, x.as_mut_slice()?),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => match act {
            Activation::Linear => Ok(()),
            Activation::Relu => crate::cuda::relu_forward_inplace(&*gpu(n)?, x.cuda_buf_mut()?),
            _ => Err(not_on_cuda("activation")),
        },
    }
}

/// The gradient through `act`, from its forward output `y` (ReLU also accepts its input): a
/// new tensor `dy * act'(x)`.
///
/// # Errors
/// [`Error::ShapeMismatch`] when `y`'s shape differs from `dy`'s; `WrongDevice`.
pub fn activation_backward<D: DTypeKind>(
    act: Activation,
    dy: &Tensor<D>,
    y: &Tensor<D>,
) -> Result<Tensor<D>> {
    let _span = profile::span(OpClass::Activation).bytes(2 * nb(dy) + nb(y));
    const OP: &str = "activation backward";
    same_shape(OP, "y", dy.shape(), y.shape())?;
    let dev = device(OP, &[dy.device(), y.device()])?;
    let mut dx = for_overwrite(dy.shape(), dev)?;
    match dev {
        Device::Cpu => Cpu::global()?.activation_backward(
            act,
            dy.as_slice()?,
            y.as_slice()?,
            dx.as_mut_slice()?,
        )?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => match act {
            Activation::Relu => crate::cuda::relu_backward(
                &*gpu(n)?,
                dy.cuda_buf()?,
                y.cuda_buf()?,
                dx.cuda_buf_mut()?,
            )?,
            Activation::Linear => crate::cuda::cast(&*gpu(n)?, dy.cuda_buf()?, dx.cuda_buf_mut()?)?,
            _ => return Err(not_on_cuda(OP)),
        },
    }
    Ok(dx)
}

/// `g = g * act'(x)` in place, from the forward output `y`.
///
/// # Errors
/// As [`activation_backward`].
pub fn activation_backward_inplace<D: DTypeKind>(
    act: Activation,
    g: &mut Tensor<D>,
    y: &Tensor<D>,
) -> Result<()> {
    let _span = profile::span(OpClass::Activation).bytes(2 * nb(g) + nb(y));
    const OP: &str = "activation backward";
    same_shape(OP, "y", g.shape(), y.shape())?;
    match device(OP, &[g.device(), y.device()])? {
        Device::Cpu => {
            Cpu::global()?.activation_backward_inplace(act, g.as_mut_slice()?, y.as_slice()?)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => match act {
            Activation::Linear => Ok(()),
            Activation::Relu => {
                crate::cuda::relu_backward_inplace(&*gpu(n)?, g.cuda_buf_mut()?, y.cuda_buf()?)
            }
            _ => Err(not_on_cuda(OP)),
        },
    }
}

// -------------------------------------------------------------------------------------------
// Softmax and cross-entropy
// -------------------------------------------------------------------------------------------

/// Row softmax over the last axis, in float32 whatever `x`'s dtype.
///
/// # Errors
/// `WrongDevice` never (one operand); allocation errors.
pub fn softmax<D: DTypeKind>(x: &Tensor<D>) -> Result<Tensor<F32>> {
    let _span = profile::span(OpClass::Loss);
    let (rows, cols) = rows_cols(x.shape());
    let mut p = for_overwrite(x.shape(), x.device())?;
    match x.device() {
        Device::Cpu => Cpu::global()?.softmax(x.as_slice()?, rows, cols, p.as_mut_slice()?)?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            crate::cuda::softmax(&*gpu(n)?, x.cuda_buf()?, rows, cols, p.cuda_buf_mut()?)?
        }
    }
    Ok(p)
}

/// The softmax gradient `(dy - sum(dy * y)) * y` per row, from the forward output `y`.
///
/// # Errors
/// [`Error::ShapeMismatch`] when the shapes differ; `WrongDevice`; on CUDA, no kernel yet.
pub fn softmax_backward(y: &Tensor<F32>, dy: &Tensor<F32>) -> Result<Tensor<F32>> {
    let _span = profile::span(OpClass::Loss);
    const OP: &str = "softmax_backward";
    same_shape(OP, "dy", y.shape(), dy.shape())?;
    let dev = device(OP, &[y.device(), dy.device()])?;
    let (rows, cols) = rows_cols(y.shape());
    let mut dx = for_overwrite(y.shape(), dev)?;
    match dev {
        Device::Cpu => Cpu::global()?.softmax_backward(
            y.as_slice()?,
            dy.as_slice()?,
            rows,
            cols,
            dx.as_mut_slice()?,
        )?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda(OP)),
    }
    Ok(dx)
}

/// The mean sparse categorical cross-entropy of float32 `input` (`[rows, classes]`, logits when
/// `from_logits`, else probabilities) against one host label per row.
///
/// # Errors
/// A label out of range, naming its row and value; `rows == 0`; a label count that is not the
/// row count.
pub fn softmax_cross_entropy<L: Label>(
    input: &Tensor<F32>,
    labels: &[L],
    from_logits: bool,
) -> Result<f32> {
    let _span = profile::span(OpClass::Loss);
    let (rows, cols) = rows_cols(input.shape());
    match input.device() {
        Device::Cpu => {
            Cpu::global()?.softmax_cross_entropy(input.as_slice()?, labels, rows, cols, from_logits)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            let g = &*gpu(n)?;
            let dl = crate::cuda::DeviceLabels::new(g, labels, cols)?;
            let mut out = Tensor::<F32>::zeros_on(&[rows], input.device())?;
            crate::cuda::softmax_cross_entropy_rows(
                g,
                input.cuda_buf()?,
                &dl,
                rows,
                cols,
                from_logits,
                out.cuda_buf_mut()?,
            )?;
            let host = out.to_device(Device::Cpu)?;
            if rows == 0 {
                return Err(Error::InvalidArgument {
                    op: "softmax_cross_entropy",
                    what: "rows is 0: the mean loss of an empty batch is undefined".into(),
                });
            }
            let total: f64 = host.as_slice()?.iter().map(|&x| f64::from(x)).sum();
            Ok((total / rows as f64) as f32)
        }
    }
}

/// `scale * (p - onehot(label)) / rows`: the gradient of `scale * loss` with respect to the
/// logits of a float32 softmax whose output is `probs`.
///
/// # Errors
/// A label out of range; a label count that is not the row count.
pub fn softmax_cross_entropy_grad<L: Label>(
    probs: &Tensor<F32>,
    labels: &[L],
    scale: f32,
) -> Result<Tensor<F32>> {
    let _span = profile::span(OpClass::Loss);
    let (rows, cols) = rows_cols(probs.shape());
    let mut d = for_overwrite(probs.shape(), probs.device())?;
    match probs.device() {
        Device::Cpu => Cpu::global()?.softmax_cross_entropy_grad(
            probs.as_slice()?,
            labels,
            rows,
            cols,
            scale,
            d.as_mut_slice()?,
        )?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            let g = &*gpu(n)?;
            let dl = crate::cuda::DeviceLabels::new(g, labels, cols)?;
            crate::cuda::softmax_cross_entropy_grad(
                g,
                probs.cuda_buf()?,
                &dl,
                rows,
                cols,
                scale,
                d.cuda_buf_mut()?,
            )?;
        }
    }
    Ok(d)
}

/// The gradient of the from-probabilities loss (times `scale`) with respect to the
/// probabilities, as Keras differentiates it.
///
/// # Errors
/// A label out of range; on CUDA, no kernel yet.
pub fn crossentropy_grad_probs<L: Label>(
    probs: &Tensor<F32>,
    labels: &[L],
    scale: f32,
) -> Result<Tensor<F32>> {
    let _span = profile::span(OpClass::Loss);
    let (rows, cols) = rows_cols(probs.shape());
    let mut d = for_overwrite(probs.shape(), probs.device())?;
    match probs.device() {
        Device::Cpu => Cpu::global()?.crossentropy_grad_probs(
            probs.as_slice()?,
            labels,
            rows,
            cols,
            scale,
            d.as_mut_slice()?,
        )?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda("crossentropy_grad_probs")),
    }
    Ok(d)
}

// -------------------------------------------------------------------------------------------
// Reductions
// -------------------------------------------------------------------------------------------

/// Adds the column sums of `dy` (`[rows, cols]`, summed in float32) to `grad` (`cols` float32
/// values): the bias gradient.
///
/// # Errors
/// [`Error::ShapeMismatch`] when `grad` is not `cols` long; `WrongDevice`.
pub fn bias_grad_accumulate<D: DTypeKind>(dy: &Tensor<D>, grad: &mut Tensor<F32>) -> Result<()> {
    let _span = profile::span(OpClass::Activation).bytes(nb(dy));
    const OP: &str = "bias_grad";
    let (rows, cols) = rows_cols(dy.shape());
    same_shape(OP, "grad", &[cols], grad.shape())?;
    match device(OP, &[dy.device(), grad.device()])? {
        Device::Cpu => {
            Cpu::global()?.bias_grad(dy.as_slice()?, rows, cols, grad.as_mut_slice()?, true)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => crate::cuda::bias_grad(
            &*gpu(n)?,
            dy.cuda_buf()?,
            rows,
            cols,
            grad.cuda_buf_mut()?,
            true,
        ),
    }
}

/// The index of each row's maximum over the last axis (ties to the first), on the host; `None`
/// for a row that holds NaN (a NaN prediction is never scored as a class).
///
/// # Errors
/// Zero columns with rows. On CUDA the values are copied to the host first.
pub fn argmax_rows<D: DTypeKind>(x: &Tensor<D>) -> Result<Vec<Option<u32>>> {
    let _span = profile::span(OpClass::Other);
    let host;
    let x = if x.device().is_cpu() {
        x
    } else {
        host = x.to_device(Device::Cpu)?;
        &host
    };
    let (rows, cols) = rows_cols(x.shape());
    let mut out = vec![0u32; rows];
    let values = x.as_slice()?;
    Cpu::global()?.argmax_rows(values, rows, cols, &mut out)?;
    // The kernel gives a row's first NaN when it holds one.
    Ok(out
        .into_iter()
        .enumerate()
        .map(|(r, a)| {
            let v = mp_core::Element::to_f32(values[r * cols + a as usize]);
            (!v.is_nan()).then_some(a)
        })
        .collect())
}

// -------------------------------------------------------------------------------------------
// Convolution and pooling (NHWC images)
// -------------------------------------------------------------------------------------------

/// The geometry of `window` over `x`, which must be `[batch, height, width, channels]`; `op`
/// (the layer) names the caller in errors.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `op` and the shape for an input that is not rank 4, and
/// every refusal of [`Geometry::new`] (a zero size or stride, a window larger than the padded
/// input).
pub fn geometry<D: DTypeKind>(op: &'static str, x: &Tensor<D>, window: Window) -> Result<Geometry> {
    let input: [usize; 4] = x.shape().try_into().map_err(|_| Error::InvalidArgument {
        op,
        what: format!(
            "expected an input of rank 4 [batch, height, width, channels], got shape {:?}",
            x.shape()
        ),
    })?;
    Geometry::new(op, input, window)
}

fn check_image<D: DTypeKind>(op: &'static str, x: &Tensor<D>, g: &Geometry) -> Result<()> {
    let want = [g.batch, g.input[0], g.input[1], g.channels];
    same_shape(op, "x", &want, x.shape())
}

/// The im2col matrix of `x` (`[batch, h, w, channels]`), `[pixels, patch_len]`, in `x`'s dtype
/// and on its device (see [`crate::conv`]).
///
/// # Errors
/// [`Error::ShapeMismatch`] when `x` does not have `g`'s input shape; on CUDA, no kernel yet.
pub fn im2col<D: DTypeKind>(x: &Tensor<D>, g: &Geometry) -> Result<Tensor<D>> {
    let _span = profile::span(OpClass::Convolution);
    const OP: &str = "im2col";
    check_image(OP, x, g)?;
    let mut cols = for_overwrite::<D>(&[g.pixels(), g.patch_len()], x.device())?;
    match x.device() {
        Device::Cpu => Cpu::global()?.im2col(g, x.as_slice()?, cols.as_mut_slice()?)?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda(OP)),
    }
    Ok(cols)
}

/// Filters of a `[kh, kw, channels, filters]` (or `[patch_len, filters]`) kernel for `g`.
fn conv_filters<D: DTypeKind>(op: &'static str, kernel: &Tensor<D>, g: &Geometry) -> Result<usize> {
    let (rows, cols) = rows_cols(kernel.shape());
    if rows != g.patch_len() {
        return Err(Error::ShapeMismatch {
            op,
            lhs_name: "window [kh, kw, channels]",
            lhs: vec![g.window.size[0], g.window.size[1], g.channels],
            rhs_name: "kernel",
            rhs: kernel.shape().to_vec(),
        });
    }
    Ok(cols)
}

/// A convolution of `x` (`[batch, h, w, channels]`) with `kernel` (`[kh, kw, channels,
/// filters]`, Keras's layout) into a new `[batch, out_h, out_w, filters]` tensor of dtype `O`,
/// with the GEMM's epilogue (bias, ReLU) fused: the patches are formed a chunk of images at a
/// time, so the temporaries stay a few MiB whatever the batch.
///
/// # Errors
/// Shapes that do not fit `g` (naming both); `WrongDevice`; on CUDA, no kernel yet.
pub fn conv2d<T: DTypeKind, O: DTypeKind>(
    x: &Tensor<T>,
    kernel: &Tensor<T>,
    g: &Geometry,
    gemm: Gemm<'_, Tensor<F32>>,
) -> Result<Tensor<O>> {
    let _span = profile::span(OpClass::Convolution)
        .flop(conv_flop(g, kernel.len()))
        .bytes(nb(x) + nb(kernel) + conv_outputs(g, kernel.len()) * size_of::<O::Elem>());
    const OP: &str = "conv2d";
    check_image(OP, x, g)?;
    let filters = conv_filters(OP, kernel, g)?;
    if let Some(bias) = gemm.epilogue.bias() {
        same_shape(OP, "bias", &[filters], bias.shape())?;
    }
    let mut y = for_overwrite::<O>(&[g.batch, g.output[0], g.output[1], filters], x.device())?;
    match device(OP, &[x.device(), kernel.device()])? {
        Device::Cpu => {
            let epilogue = gemm.epilogue.try_map(|t| t.as_slice())?;
            let g2 = Gemm {
                alpha: gemm.alpha,
                beta: gemm.beta,
                epilogue,
            };
            Cpu::global()?.conv2d(
                g,
                x.as_slice()?,
                kernel.as_slice()?,
                filters,
                y.as_mut_slice()?,
                g2,
            )?;
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda(OP)),
    }
    Ok(y)
}

/// The input gradient of [`conv2d`]: `[batch, h, w, channels]` in `O`, rounded once from
/// float32 sums.
///
/// # Errors
/// As [`conv2d`], with `dy` checked against the output shape.
pub fn conv2d_backward_input<T: DTypeKind, O: DTypeKind>(
    dy: &Tensor<T>,
    kernel: &Tensor<T>,
    g: &Geometry,
) -> Result<Tensor<O>> {
    let _span = profile::span(OpClass::Convolution)
        .flop(conv_flop(g, kernel.len()))
        .bytes(nb(dy) + nb(kernel) + g.input_len() * size_of::<O::Elem>());
    const OP: &str = "conv2d_backward_input";
    let filters = conv_filters(OP, kernel, g)?;
    same_shape(
        OP,
        "dy",
        &[g.batch, g.output[0], g.output[1], filters],
        dy.shape(),
    )?;
    let shape = [g.batch, g.input[0], g.input[1], g.channels];
    let mut dx = for_overwrite::<O>(&shape, dy.device())?;
    match device(OP, &[dy.device(), kernel.device()])? {
        Device::Cpu => Cpu::global()?.conv2d_backward_input(
            g,
            dy.as_slice()?,
            kernel.as_slice()?,
            filters,
            dx.as_mut_slice()?,
        )?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda(OP)),
    }
    Ok(dx)
}

/// The kernel gradient of [`conv2d`], added in float32 into `dw` (the kernel's shape).
///
/// # Errors
/// As [`conv2d`], with `dy` and `dw` checked.
pub fn conv2d_backward_kernel<T: DTypeKind>(
    x: &Tensor<T>,
    dy: &Tensor<T>,
    g: &Geometry,
    dw: &mut Tensor<F32>,
) -> Result<()> {
    let _span = profile::span(OpClass::Convolution)
        .flop(conv_flop(g, dw.len()))
        .bytes(nb(x) + nb(dy) + nb(dw));
    const OP: &str = "conv2d_backward_kernel";
    check_image(OP, x, g)?;
    let filters = conv_filters(OP, dw, g)?;
    same_shape(
        OP,
        "dy",
        &[g.batch, g.output[0], g.output[1], filters],
        dy.shape(),
    )?;
    match device(OP, &[x.device(), dy.device(), dw.device()])? {
        Device::Cpu => Cpu::global()?.conv2d_backward_kernel(
            g,
            x.as_slice()?,
            dy.as_slice()?,
            filters,
            dw.as_mut_slice()?,
        ),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Err(not_on_cuda(OP)),
    }
}

/// The adjoint of [`im2col`]: `dcols` (`[pixels, patch_len]`) summed, in float32, back into the
/// input positions, `[batch, h, w, channels]`.
///
/// # Errors
/// [`Error::ShapeMismatch`] when `dcols` is not `[pixels, patch_len]`; on CUDA, no kernel yet.
pub fn col2im<D: DTypeKind>(dcols: &Tensor<D>, g: &Geometry) -> Result<Tensor<F32>> {
    let _span = profile::span(OpClass::Convolution);
    const OP: &str = "col2im";
    same_shape(OP, "dcols", &[g.pixels(), g.patch_len()], dcols.shape())?;
    let shape = [g.batch, g.input[0], g.input[1], g.channels];
    let mut dx = for_overwrite::<F32>(&shape, dcols.device())?;
    match dcols.device() {
        Device::Cpu => Cpu::global()?.col2im(g, dcols.as_slice()?, dx.as_mut_slice()?)?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda(OP)),
    }
    Ok(dx)
}

/// Which input element each output of [`max_pool`] took (host indices), for
/// [`max_pool_backward`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolIndices {
    geometry: Geometry,
    index: Vec<u32>,
}

impl PoolIndices {
    /// The pooling's geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The index into the input of each output element.
    pub fn as_slice(&self) -> &[u32] {
        &self.index
    }
}

fn pooled_shape(g: &Geometry) -> [usize; 4] {
    [g.batch, g.output[0], g.output[1], g.channels]
}

/// Max pooling of `x` (`[batch, h, w, channels]`) into `[batch, out_h, out_w, channels]`, with
/// the chosen elements' indices (NaN wins; positions in the padding are no candidates).
///
/// # Errors
/// [`Error::ShapeMismatch`] when `x` does not have `g`'s input shape; on CUDA, no kernel yet.
pub fn max_pool<D: DTypeKind>(x: &Tensor<D>, g: &Geometry) -> Result<(Tensor<D>, PoolIndices)> {
    let _span =
        profile::span(OpClass::Pooling).bytes(nb(x) + g.output_len() * (size_of::<D::Elem>() + 4));
    const OP: &str = "max_pool";
    check_image(OP, x, g)?;
    let mut y = for_overwrite::<D>(&pooled_shape(g), x.device())?;
    let mut index = vec![0u32; g.output_len()];
    match x.device() {
        Device::Cpu => {
            Cpu::global()?.max_pool(g, x.as_slice()?, y.as_mut_slice()?, &mut index)?;
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda(OP)),
    }
    let geometry = *g;
    Ok((y, PoolIndices { geometry, index }))
}

/// The gradient of [`max_pool`]: `[batch, h, w, channels]` float32, each window's `dy` added to
/// the element it chose.
///
/// # Errors
/// [`Error::ShapeMismatch`] when `dy` is not the pooled shape; on CUDA, no kernel yet.
pub fn max_pool_backward<D: DTypeKind>(dy: &Tensor<D>, idx: &PoolIndices) -> Result<Tensor<F32>> {
    let _span = profile::span(OpClass::Pooling).bytes(nb(dy) + 4 * dy.len());
    const OP: &str = "max_pool_backward";
    let g = &idx.geometry;
    same_shape(OP, "dy", &pooled_shape(g), dy.shape())?;
    let shape = [g.batch, g.input[0], g.input[1], g.channels];
    let mut dx = for_overwrite::<F32>(&shape, dy.device())?;
    match dy.device() {
        Device::Cpu => {
            Cpu::global()?.max_pool_backward(g, dy.as_slice()?, &idx.index, dx.as_mut_slice()?)?;
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda(OP)),
    }
    Ok(dx)
}

/// Average pooling of `x` into `[batch, out_h, out_w, channels]`, summed in float32 over the
/// positions inside the input (global average pooling: a window of the whole image).
///
/// # Errors
/// [`Error::ShapeMismatch`] when `x` does not have `g`'s input shape; on CUDA, no kernel yet.
pub fn avg_pool<D: DTypeKind>(x: &Tensor<D>, g: &Geometry) -> Result<Tensor<D>> {
    let _span = profile::span(OpClass::Pooling).bytes(nb(x));
    const OP: &str = "avg_pool";
    check_image(OP, x, g)?;
    let mut y = for_overwrite::<D>(&pooled_shape(g), x.device())?;
    match x.device() {
        Device::Cpu => Cpu::global()?.avg_pool(g, x.as_slice()?, y.as_mut_slice()?)?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda(OP)),
    }
    Ok(y)
}

/// The gradient of [`avg_pool`], `[batch, h, w, channels]` float32.
///
/// # Errors
/// [`Error::ShapeMismatch`] when `dy` is not the pooled shape; on CUDA, no kernel yet.
pub fn avg_pool_backward<D: DTypeKind>(dy: &Tensor<D>, g: &Geometry) -> Result<Tensor<F32>> {
    let _span = profile::span(OpClass::Pooling).bytes(nb(dy));
    const OP: &str = "avg_pool_backward";
    same_shape(OP, "dy", &pooled_shape(g), dy.shape())?;
    let shape = [g.batch, g.input[0], g.input[1], g.channels];
    let mut dx = for_overwrite::<F32>(&shape, dy.device())?;
    match dy.device() {
        Device::Cpu => Cpu::global()?.avg_pool_backward(g, dy.as_slice()?, dx.as_mut_slice()?)?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda(OP)),
    }
    Ok(dx)
}

// -------------------------------------------------------------------------------------------
// Normalization and dropout
// -------------------------------------------------------------------------------------------

/// Per-channel statistics of `x` (`[..., channels]`, every leading axis a sample): the mean and
/// the biased variance, computed in float32 whatever `x`'s dtype (see [`crate::norm`]).
///
/// # Errors
/// An empty batch; on CUDA, no kernel yet.
pub fn moments<D: DTypeKind>(x: &Tensor<D>) -> Result<(Tensor<F32>, Tensor<F32>)> {
    let _span = profile::span(OpClass::BatchNorm).bytes(nb(x));
    let (rows, cols) = rows_cols(x.shape());
    let mut mean = for_overwrite::<F32>(&[cols], x.device())?;
    let mut var = for_overwrite::<F32>(&[cols], x.device())?;
    match x.device() {
        Device::Cpu => Cpu::global()?.moments(
            x.as_slice()?,
            rows,
            cols,
            mean.as_mut_slice()?,
            var.as_mut_slice()?,
        )?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda("moments")),
    }
    Ok((mean, var))
}

/// The per-channel statistics and affine parameters of a normalization, float32, `channels`
/// long each.
#[derive(Clone, Copy, Debug)]
pub struct Norm<'a> {
    /// The mean subtracted.
    pub mean: &'a Tensor<F32>,
    /// The variance divided by (its square root, plus `epsilon`).
    pub var: &'a Tensor<F32>,
    /// The scale.
    pub gamma: &'a Tensor<F32>,
    /// The offset.
    pub beta: &'a Tensor<F32>,
    /// Added to the variance.
    pub epsilon: f32,
}

impl Norm<'_> {
    fn check(&self, op: &'static str, cols: usize) -> Result<()> {
        for (what, t) in [
            ("mean", self.mean),
            ("var", self.var),
            ("gamma", self.gamma),
            ("beta", self.beta),
        ] {
            same_shape(op, what, &[cols], t.shape())?;
        }
        Ok(())
    }
}

/// `gamma * (x - mean) / sqrt(var + epsilon) + beta` per channel, in float32, rounded once to
/// `x`'s dtype.
///
/// # Errors
/// Parameters that are not `channels` long; a bad `epsilon`; `WrongDevice`; on CUDA, no kernel
/// yet.
pub fn normalize<D: DTypeKind>(x: &Tensor<D>, p: Norm<'_>) -> Result<Tensor<D>> {
    normalize_with(x, p, false)
}

/// [`normalize`] followed by ReLU, in one pass: the same values as [`normalize`] then
/// [`activation`] with ReLU (see [`crate::norm::normalize_relu`]).
///
/// # Errors
/// As [`normalize`].
pub fn normalize_relu<D: DTypeKind>(x: &Tensor<D>, p: Norm<'_>) -> Result<Tensor<D>> {
    normalize_with(x, p, true)
}

/// [`normalize`], then ReLU when `relu`.
fn normalize_with<D: DTypeKind>(x: &Tensor<D>, p: Norm<'_>, relu: bool) -> Result<Tensor<D>> {
    let _span = profile::span(OpClass::BatchNorm).bytes(2 * nb(x));
    let op = if relu { "normalize_relu" } else { "normalize" };
    let (rows, cols) = rows_cols(x.shape());
    p.check(op, cols)?;
    let devices = [
        x.device(),
        p.mean.device(),
        p.var.device(),
        p.gamma.device(),
        p.beta.device(),
    ];
    let mut y = for_overwrite::<D>(x.shape(), x.device())?;
    match device(op, &devices)? {
        Device::Cpu => {
            let cpu = Cpu::global()?;
            let (x, y) = (x.as_slice()?, y.as_mut_slice()?);
            let (mean, var) = (p.mean.as_slice()?, p.var.as_slice()?);
            let (gamma, beta) = (p.gamma.as_slice()?, p.beta.as_slice()?);
            if relu {
                cpu.normalize_relu(x, rows, cols, mean, var, gamma, beta, p.epsilon, y)?
            } else {
                cpu.normalize(x, rows, cols, mean, var, gamma, beta, p.epsilon, y)?
            }
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda(op)),
    }
    Ok(y)
}

/// The gradient of [`normalize`] with the batch's own statistics (training): returns `dx` in
/// `x`'s dtype and adds the float32 gradients of gamma and beta into `dgamma` and `dbeta`.
///
/// # Errors
/// As [`normalize`], with `dy`, `dgamma` and `dbeta` checked too.
pub fn normalize_backward<D: DTypeKind>(
    x: &Tensor<D>,
    dy: &Tensor<D>,
    p: Norm<'_>,
    dgamma: &mut Tensor<F32>,
    dbeta: &mut Tensor<F32>,
) -> Result<Tensor<D>> {
    normalize_backward_with(x, dy, p, dgamma, dbeta, false)
}

/// The gradient of [`normalize_relu`] with the batch's own statistics: [`normalize_backward`]
/// of ReLU's gradient, the forward's output recomputed from `x` (see
/// [`crate::norm::normalize_relu_backward`]).
///
/// # Errors
/// As [`normalize_backward`].
pub fn normalize_relu_backward<D: DTypeKind>(
    x: &Tensor<D>,
    dy: &Tensor<D>,
    p: Norm<'_>,
    dgamma: &mut Tensor<F32>,
    dbeta: &mut Tensor<F32>,
) -> Result<Tensor<D>> {
    normalize_backward_with(x, dy, p, dgamma, dbeta, true)
}

/// [`normalize_backward`], of [`normalize_relu`] when `relu`.
fn normalize_backward_with<D: DTypeKind>(
    x: &Tensor<D>,
    dy: &Tensor<D>,
    p: Norm<'_>,
    dgamma: &mut Tensor<F32>,
    dbeta: &mut Tensor<F32>,
    relu: bool,
) -> Result<Tensor<D>> {
    let _span = profile::span(OpClass::BatchNorm).bytes(3 * nb(x));
    let op = if relu {
        "normalize_relu_backward"
    } else {
        "normalize_backward"
    };
    let (rows, cols) = rows_cols(x.shape());
    p.check(op, cols)?;
    same_shape(op, "dy", x.shape(), dy.shape())?;
    same_shape(op, "dgamma", &[cols], dgamma.shape())?;
    same_shape(op, "dbeta", &[cols], dbeta.shape())?;
    let mut dx = for_overwrite::<D>(x.shape(), x.device())?;
    match device(
        op,
        &[x.device(), dy.device(), p.gamma.device(), dgamma.device()],
    )? {
        Device::Cpu => {
            let cpu = Cpu::global()?;
            let (x, dy, dx) = (x.as_slice()?, dy.as_slice()?, dx.as_mut_slice()?);
            let (mean, var, gamma) = (p.mean.as_slice()?, p.var.as_slice()?, p.gamma.as_slice()?);
            let (dgamma, dbeta) = (dgamma.as_mut_slice()?, dbeta.as_mut_slice()?);
            if relu {
                let beta = p.beta.as_slice()?;
                cpu.normalize_relu_backward(
                    x, dy, rows, cols, mean, var, gamma, beta, p.epsilon, dx, dgamma, dbeta,
                )?
            } else {
                cpu.normalize_backward(
                    x, dy, rows, cols, mean, var, gamma, p.epsilon, dx, dgamma, dbeta,
                )?
            }
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda(op)),
    }
    Ok(dx)
}

/// Layer normalization of `x` over its last axis ([`crate::layer_norm::layer_norm`]): every
/// leading axis is a row. Returns `y` in `x`'s dtype and each row's float32 `mean` and
/// `inv_std` (shape `[rows]`), what [`layer_norm_backward`] takes.
///
/// # Errors
/// `gamma` or `beta` not `[features]`; a bad `epsilon`; `WrongDevice`; on CUDA, no kernel yet.
pub fn layer_norm<D: DTypeKind>(
    x: &Tensor<D>,
    gamma: &Tensor<F32>,
    beta: &Tensor<F32>,
    epsilon: f32,
) -> Result<(Tensor<D>, Tensor<F32>, Tensor<F32>)> {
    let _span = profile::span(OpClass::LayerNorm).bytes(2 * nb(x));
    const OP: &str = "layer_norm";
    let (rows, cols) = rows_cols(x.shape());
    same_shape(OP, "gamma", &[cols], gamma.shape())?;
    same_shape(OP, "beta", &[cols], beta.shape())?;
    let devices = [x.device(), gamma.device(), beta.device()];
    let dev = device(OP, &devices)?;
    let mut y = for_overwrite::<D>(x.shape(), dev)?;
    let mut mean = for_overwrite::<F32>(&[rows], dev)?;
    let mut inv_std = for_overwrite::<F32>(&[rows], dev)?;
    match dev {
        Device::Cpu => crate::layer_norm::layer_norm(
            x.as_slice()?,
            rows,
            cols,
            gamma.as_slice()?,
            beta.as_slice()?,
            epsilon,
            y.as_mut_slice()?,
            mean.as_mut_slice()?,
            inv_std.as_mut_slice()?,
        )?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda(OP)),
    }
    Ok((y, mean, inv_std))
}

/// The gradient of [`layer_norm`]: returns `dx` in `x`'s dtype and adds the float32 gradients
/// of gamma and beta into `dgamma` and `dbeta`.
///
/// # Errors
/// Shapes that do not match the forward's; `WrongDevice`; on CUDA, no kernel yet.
pub fn layer_norm_backward<D: DTypeKind>(
    x: &Tensor<D>,
    dy: &Tensor<D>,
    gamma: &Tensor<F32>,
    mean: &Tensor<F32>,
    inv_std: &Tensor<F32>,
    dgamma: &mut Tensor<F32>,
    dbeta: &mut Tensor<F32>,
) -> Result<Tensor<D>> {
    let _span = profile::span(OpClass::LayerNorm).bytes(3 * nb(x));
    const OP: &str = "layer_norm_backward";
    let (rows, cols) = rows_cols(x.shape());
    same_shape(OP, "dy", x.shape(), dy.shape())?;
    for (what, t) in [("gamma", gamma), ("dgamma", &*dgamma), ("dbeta", &*dbeta)] {
        same_shape(OP, what, &[cols], t.shape())?;
    }
    same_shape(OP, "mean", &[rows], mean.shape())?;
    same_shape(OP, "inv_std", &[rows], inv_std.shape())?;
    let devices = [
        x.device(),
        dy.device(),
        gamma.device(),
        mean.device(),
        inv_std.device(),
        dgamma.device(),
        dbeta.device(),
    ];
    let dev = device(OP, &devices)?;
    let mut dx = for_overwrite::<D>(x.shape(), dev)?;
    match dev {
        Device::Cpu => crate::layer_norm::layer_norm_backward(
            x.as_slice()?,
            dy.as_slice()?,
            rows,
            cols,
            gamma.as_slice()?,
            mean.as_slice()?,
            inv_std.as_slice()?,
            dx.as_mut_slice()?,
            dgamma.as_mut_slice()?,
            dbeta.as_mut_slice()?,
        )?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda(OP)),
    }
    Ok(dx)
}

/// GELU of `x` ([`crate::gelu`]), in `x`'s dtype.
///
/// # Errors
/// On CUDA, no kernel yet.
pub fn gelu<D: DTypeKind>(form: crate::gelu::Gelu, x: &Tensor<D>) -> Result<Tensor<D>> {
    let _span = profile::span(OpClass::Gelu).bytes(2 * nb(x));
    let mut y = for_overwrite::<D>(x.shape(), x.device())?;
    match x.device() {
        Device::Cpu => crate::gelu::gelu(form, x.as_slice()?, y.as_mut_slice()?)?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda("gelu")),
    }
    Ok(y)
}

/// The gradient of [`gelu`] at the forward's input `x`: `dy * gelu'(x)`.
///
/// # Errors
/// `dy` and `x` of different shapes; `WrongDevice`; on CUDA, no kernel yet.
pub fn gelu_backward<D: DTypeKind>(
    form: crate::gelu::Gelu,
    dy: &Tensor<D>,
    x: &Tensor<D>,
) -> Result<Tensor<D>> {
    let _span = profile::span(OpClass::Gelu).bytes(3 * nb(x));
    const OP: &str = "gelu_backward";
    same_shape(OP, "x", dy.shape(), x.shape())?;
    let dev = device(OP, &[dy.device(), x.device()])?;
    let mut dx = for_overwrite::<D>(x.shape(), dev)?;
    match dev {
        Device::Cpu => {
            crate::gelu::gelu_backward(form, dy.as_slice()?, x.as_slice()?, dx.as_mut_slice()?)?
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda(OP)),
    }
    Ok(dx)
}

/// `value = value * momentum + batch * (1 - momentum)` in float32 (moving statistics).
///
/// # Errors
/// Shapes that differ; a momentum outside `[0, 1]`; `WrongDevice`; on CUDA, no kernel yet.
pub fn moving_average(value: &mut Tensor<F32>, batch: &Tensor<F32>, momentum: f32) -> Result<()> {
    let _span = profile::span(OpClass::BatchNorm);
    const OP: &str = "moving_average";
    same_shape(OP, "batch", value.shape(), batch.shape())?;
    match device(OP, &[value.device(), batch.device()])? {
        Device::Cpu => {
            Cpu::global()?.moving_average(value.as_mut_slice()?, batch.as_slice()?, momentum)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Err(not_on_cuda(OP)),
    }
}

/// Inverted dropout of `x` (see [`crate::dropout`]): each element kept with probability
/// `1 - rate` and scaled by `1 / (1 - rate)`, else `+0`, from a mask that depends only on `seed`
/// and the element's index, so [`dropout_backward`] regenerates it.
///
/// # Errors
/// A `rate` outside `[0, 1)`; on CUDA, no kernel yet.
pub fn dropout<D: DTypeKind>(x: &Tensor<D>, rate: f32, seed: u64) -> Result<Tensor<D>> {
    let _span = profile::span(OpClass::Dropout).bytes(2 * nb(x));
    let mut y = for_overwrite::<D>(x.shape(), x.device())?;
    match x.device() {
        Device::Cpu => Cpu::global()?.dropout(x.as_slice()?, rate, seed, 0, y.as_mut_slice()?)?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda("dropout")),
    }
    Ok(y)
}

/// The gradient of [`dropout`] with the same `rate` and `seed`.
///
/// # Errors
/// As [`dropout`].
pub fn dropout_backward<D: DTypeKind>(dy: &Tensor<D>, rate: f32, seed: u64) -> Result<Tensor<D>> {
    let _span = profile::span(OpClass::Dropout).bytes(2 * nb(dy));
    let mut dx = for_overwrite::<D>(dy.shape(), dy.device())?;
    match dy.device() {
        Device::Cpu => {
            Cpu::global()?.dropout_backward(dy.as_slice()?, rate, seed, 0, dx.as_mut_slice()?)?
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => return Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => return Err(not_on_cuda("dropout_backward")),
    }
    Ok(dx)
}

// -------------------------------------------------------------------------------------------
// Loss scaling: the finiteness flag, unscaling
// -------------------------------------------------------------------------------------------

/// Whether every gradient of a step was finite, kept on the step's device (a device flag on
/// CUDA, so the optimizer updates skip there without a host round trip).
#[derive(Debug)]
pub struct Finite {
    device: Device,
    host: bool,
    #[cfg(feature = "cuda")]
    flag: Option<crate::cuda::FiniteFlag>,
}

impl Finite {
    /// A flag saying "all finite so far", on `device`.
    ///
    /// # Errors
    /// Without the `cuda` feature, a CUDA device; a device that cannot be used.
    pub fn new(device: Device) -> Result<Finite> {
        #[cfg(not(feature = "cuda"))]
        if let Device::Cuda(n) = device {
            return Err(cuda_missing(n));
        }
        Ok(Finite {
            device,
            host: true,
            #[cfg(feature = "cuda")]
            flag: match device {
                Device::Cpu => None,
                Device::Cuda(n) => Some(crate::cuda::FiniteFlag::new(&*gpu(n)?)?),
            },
        })
    }

    /// The flag's device.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Back to "all finite".
    ///
    /// # Errors
    /// A CUDA failure.
    pub fn reset(&mut self) -> Result<()> {
        self.host = true;
        #[cfg(feature = "cuda")]
        if let (Some(f), Device::Cuda(n)) = (self.flag.as_mut(), self.device) {
            f.reset(&*gpu(n)?)?;
        }
        Ok(())
    }

    /// Whether everything checked since the last reset was finite (on CUDA this waits for the
    /// queued work and reads the flag).
    ///
    /// # Errors
    /// A CUDA failure.
    pub fn get(&self) -> Result<bool> {
        #[cfg(feature = "cuda")]
        if let Some(f) = &self.flag {
            return f.all_finite();
        }
        Ok(self.host)
    }
}

/// `grads *= inv_scale`, clearing `flag` if any result is NaN or infinite (one pass; the whole
/// tensor is always processed).
///
/// # Errors
/// `WrongDevice` when the flag is on another device.
pub fn unscale_and_check(grads: &mut Tensor<F32>, inv_scale: f32, flag: &mut Finite) -> Result<()> {
    let _span = profile::span(OpClass::Optimizer).bytes(2 * nb(grads));
    const OP: &str = "unscale_and_check";
    match device(OP, &[grads.device(), flag.device])? {
        Device::Cpu => {
            let ok = Cpu::global()?.unscale_and_check(grads.as_mut_slice()?, inv_scale);
            flag.host &= ok;
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            let f = flag.flag.as_mut().ok_or_else(|| not_on_cuda(OP))?;
            crate::cuda::unscale_and_check(&*gpu(n)?, grads.cuda_buf_mut()?, inv_scale, f)
        }
    }
}

/// `x = x * s` in float32 (the gradient scaling of norm clipping).
///
/// # Errors
/// A CUDA failure.
pub fn scale(x: &mut Tensor<F32>, s: f32) -> Result<()> {
    let _span = profile::span(OpClass::Optimizer).bytes(2 * nb(x));
    match x.device() {
        Device::Cpu => {
            Cpu::global()?.scale(x.as_mut_slice()?, s);
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => crate::cuda::scale(&*gpu(n)?, x.cuda_buf_mut()?, s),
    }
}

/// The sum of the squares of `x`, accumulated in float64 ([`Cpu::sum_squares`]): a squared L2
/// norm. NaN and infinities propagate.
///
/// # Errors
/// On CUDA, no kernel yet.
pub fn sum_squares(x: &Tensor<F32>) -> Result<f64> {
    let _span = profile::span(OpClass::Optimizer).bytes(nb(x));
    match x.device() {
        Device::Cpu => Ok(Cpu::global()?.sum_squares(x.as_slice()?)),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Err(not_on_cuda("sum_squares")),
    }
}

/// Clips every element of `x` into `[lo, hi]` (per-value gradient clipping); NaN stays NaN.
///
/// # Errors
/// Bounds that are not ordered numbers; on CUDA, no kernel yet.
pub fn clip(x: &mut Tensor<F32>, lo: f32, hi: f32) -> Result<()> {
    let _span = profile::span(OpClass::Optimizer).bytes(2 * nb(x));
    match x.device() {
        Device::Cpu => Cpu::global()?.clip(x.as_mut_slice()?, lo, hi),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Err(not_on_cuda("clip")),
    }
}

/// Clears `flag` if any element of `x` is NaN or infinite.
///
/// # Errors
/// `WrongDevice` when the flag is on another device.
pub fn check_finite<D: DTypeKind>(x: &Tensor<D>, flag: &mut Finite) -> Result<()> {
    let _span = profile::span(OpClass::Optimizer).bytes(nb(x));
    const OP: &str = "all_finite";
    match device(OP, &[x.device(), flag.device])? {
        Device::Cpu => {
            let ok = Cpu::global()?.all_finite(x.as_slice()?);
            flag.host &= ok;
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            let f = flag.flag.as_mut().ok_or_else(|| not_on_cuda(OP))?;
            crate::cuda::all_finite(&*gpu(n)?, x.cuda_buf()?, f)
        }
    }
}

// -------------------------------------------------------------------------------------------
// Optimizer updates
// -------------------------------------------------------------------------------------------

fn check_slot(
    op: &'static str,
    what: &'static str,
    var: &Tensor<F32>,
    s: &Tensor<F32>,
) -> Result<()> {
    same_shape(op, what, var.shape(), s.shape())
}

/// Whether `skip` says the step must be skipped, read on the host (CPU flags only).
fn skip_on_host(skip: Option<&Finite>) -> bool {
    skip.is_some_and(|f| f.device.is_cpu() && !f.host)
}

/// One SGD step on `var` from `grad`; `momentum` is required when `p.momentum != 0`. When
/// `skip` is given and says a gradient was not finite, nothing is written (decided on the
/// device on CUDA).
///
/// # Errors
/// [`Error::ShapeMismatch`] naming a buffer of another shape; `WrongDevice`; a missing momentum
/// buffer.
pub fn sgd_update(
    var: &mut Tensor<F32>,
    grad: &Tensor<F32>,
    momentum: Option<&mut Tensor<F32>>,
    p: SgdParams,
    skip: Option<&Finite>,
) -> Result<()> {
    let _span = profile::span(OpClass::Optimizer).bytes(2 * nb(var) + nb(grad));
    const OP: &str = "sgd_update";
    check_slot(OP, "grad", var, grad)?;
    let mut devices = vec![var.device(), grad.device()];
    if let Some(m) = &momentum {
        check_slot(OP, "momentum", var, m)?;
        devices.push(m.device());
    }
    devices.extend(skip.map(Finite::device));
    match device(OP, &devices)? {
        Device::Cpu if skip_on_host(skip) => Ok(()),
        Device::Cpu => {
            let m = momentum.map(|m| m.as_mut_slice()).transpose()?;
            Cpu::global()?.sgd_update(var.as_mut_slice()?, grad.as_slice()?, m, p)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            let m = momentum.map(|m| m.cuda_buf_mut()).transpose()?;
            let f = skip.and_then(|s| s.flag.as_ref());
            crate::cuda::sgd_update(&*gpu(n)?, var.cuda_buf_mut()?, grad.cuda_buf()?, m, p, f)
        }
    }
}

/// One RMSprop step; `momentum` is required when `p.momentum > 0`. Skips as [`sgd_update`].
///
/// # Errors
/// As [`sgd_update`].
pub fn rmsprop_update(
    var: &mut Tensor<F32>,
    grad: &Tensor<F32>,
    velocity: &mut Tensor<F32>,
    momentum: Option<&mut Tensor<F32>>,
    p: RmspropParams,
    skip: Option<&Finite>,
) -> Result<()> {
    let _span = profile::span(OpClass::Optimizer).bytes(2 * nb(var) + nb(grad) + 2 * nb(velocity));
    const OP: &str = "rmsprop_update";
    check_slot(OP, "grad", var, grad)?;
    check_slot(OP, "velocity", var, velocity)?;
    let mut devices = vec![var.device(), grad.device(), velocity.device()];
    if let Some(m) = &momentum {
        check_slot(OP, "momentum", var, m)?;
        devices.push(m.device());
    }
    devices.extend(skip.map(Finite::device));
    match device(OP, &devices)? {
        Device::Cpu if skip_on_host(skip) => Ok(()),
        Device::Cpu => {
            let m = momentum.map(|m| m.as_mut_slice()).transpose()?;
            Cpu::global()?.rmsprop_update(
                var.as_mut_slice()?,
                grad.as_slice()?,
                velocity.as_mut_slice()?,
                m,
                p,
            )
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            let m = momentum.map(|m| m.cuda_buf_mut()).transpose()?;
            let f = skip.and_then(|s| s.flag.as_ref());
            crate::cuda::rmsprop_update(
                &*gpu(n)?,
                var.cuda_buf_mut()?,
                grad.cuda_buf()?,
                velocity.cuda_buf_mut()?,
                m,
                p,
                f,
            )
        }
    }
}

/// One Adam step with moments `m` and `v`. Skips as [`sgd_update`].
///
/// # Errors
/// As [`sgd_update`].
pub fn adam_update(
    var: &mut Tensor<F32>,
    grad: &Tensor<F32>,
    m: &mut Tensor<F32>,
    v: &mut Tensor<F32>,
    p: AdamParams,
    skip: Option<&Finite>,
) -> Result<()> {
    let _span =
        profile::span(OpClass::Optimizer).bytes(2 * nb(var) + nb(grad) + 2 * nb(m) + 2 * nb(v));
    const OP: &str = "adam_update";
    check_slot(OP, "grad", var, grad)?;
    check_slot(OP, "m", var, m)?;
    check_slot(OP, "v", var, v)?;
    let mut devices = vec![var.device(), grad.device(), m.device(), v.device()];
    devices.extend(skip.map(Finite::device));
    match device(OP, &devices)? {
        Device::Cpu if skip_on_host(skip) => Ok(()),
        Device::Cpu => Cpu::global()?.adam_update(
            var.as_mut_slice()?,
            grad.as_slice()?,
            m.as_mut_slice()?,
            v.as_mut_slice()?,
            p,
        ),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_missing(n)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            let f = skip.and_then(|s| s.flag.as_ref());
            crate::cuda::adam_update(
                &*gpu(n)?,
                var.cuda_buf_mut()?,
                grad.cuda_buf()?,
                m.cuda_buf_mut()?,
                v.cuda_buf_mut()?,
                p,
                f,
            )
        }
    }
}

/// The checking twin of [`sgd_update`] ([`Cpu::sgd_update_check`]): which new values would be
/// NaN or infinite, computed with the update's own arithmetic; nothing is written.
///
/// # Errors
/// As [`sgd_update`]; on CUDA, no checking kernel yet (the update there is written unchecked).
pub fn sgd_update_check(
    var: &Tensor<F32>,
    grad: &Tensor<F32>,
    momentum: Option<&Tensor<F32>>,
    p: SgdParams,
) -> Result<NonFiniteOutputs> {
    let _span = profile::span(OpClass::Optimizer);
    const OP: &str = "sgd_update_check";
    check_slot(OP, "grad", var, grad)?;
    let mut devices = vec![var.device(), grad.device()];
    if let Some(m) = momentum {
        check_slot(OP, "momentum", var, m)?;
        devices.push(m.device());
    }
    on_cpu(OP, device(OP, &devices)?)?;
    let m = momentum.map(|m| m.as_slice()).transpose()?;
    Cpu::global()?.sgd_update_check(var.as_slice()?, grad.as_slice()?, m, p)
}

/// The checking twin of [`rmsprop_update`] (see [`sgd_update_check`]).
///
/// # Errors
/// As [`sgd_update_check`].
pub fn rmsprop_update_check(
    var: &Tensor<F32>,
    grad: &Tensor<F32>,
    velocity: &Tensor<F32>,
    momentum: Option<&Tensor<F32>>,
    p: RmspropParams,
) -> Result<NonFiniteOutputs> {
    let _span = profile::span(OpClass::Optimizer);
    const OP: &str = "rmsprop_update_check";
    check_slot(OP, "grad", var, grad)?;
    check_slot(OP, "velocity", var, velocity)?;
    let mut devices = vec![var.device(), grad.device(), velocity.device()];
    if let Some(m) = momentum {
        check_slot(OP, "momentum", var, m)?;
        devices.push(m.device());
    }
    on_cpu(OP, device(OP, &devices)?)?;
    let m = momentum.map(|m| m.as_slice()).transpose()?;
    Cpu::global()?.rmsprop_update_check(
        var.as_slice()?,
        grad.as_slice()?,
        velocity.as_slice()?,
        m,
        p,
    )
}

/// The checking twin of [`adam_update`] (see [`sgd_update_check`]).
///
/// # Errors
/// As [`sgd_update_check`].
pub fn adam_update_check(
    var: &Tensor<F32>,
    grad: &Tensor<F32>,
    m: &Tensor<F32>,
    v: &Tensor<F32>,
    p: AdamParams,
) -> Result<NonFiniteOutputs> {
    let _span = profile::span(OpClass::Optimizer);
    const OP: &str = "adam_update_check";
    check_slot(OP, "grad", var, grad)?;
    check_slot(OP, "m", var, m)?;
    check_slot(OP, "v", var, v)?;
    on_cpu(
        OP,
        device(OP, &[var.device(), grad.device(), m.device(), v.device()])?,
    )?;
    Cpu::global()?.adam_update_check(
        var.as_slice()?,
        grad.as_slice()?,
        m.as_slice()?,
        v.as_slice()?,
        p,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Operands on two devices are refused by name before anything runs (a CUDA tensor cannot
    /// be made without the `cuda` feature, so the check itself is tested here).
    #[test]
    fn operands_on_two_devices_are_an_error_naming_the_op() {
        assert_eq!(
            device("gemm", &[Device::Cpu, Device::Cpu]).unwrap(),
            Device::Cpu
        );
        assert_eq!(device("gemm", &[]).unwrap(), Device::Cpu);
        let err = device("gemm", &[Device::Cpu, Device::Cuda(1), Device::Cpu]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("gemm") && text.contains("cuda:1"), "{text}");
        assert!(matches!(
            err,
            Error::Core(mp_core::Error::WrongDevice {
                op: "gemm",
                expected: Device::Cpu,
                got: Device::Cuda(1)
            })
        ));
    }
}
