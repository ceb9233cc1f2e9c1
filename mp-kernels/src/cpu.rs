//! The CPU backend: a value that holds the kernel paths chosen for this machine.
//!
//! Every CPU kernel of mp is a method of [`Cpu`]. [`Cpu::global`] is the one the op surface
//! ([`crate::ops`]) uses: the best instruction set this CPU supports for the elementwise kernels,
//! and for each GEMM input dtype the path that [`crate::calibrate`] measured fastest here (or the
//! one `MP_GEMM_PATH` forces). Tests build their own with a forced instruction set
//! ([`Cpu::with`]) or forced GEMM paths ([`Cpu::with_gemm_paths`]), so every path runs on one
//! machine through the same methods.
//!
//! Arguments are checked before any memory is touched; on error nothing is written.
//!
//! ```
//! use mp_kernels::{Cpu, Isa};
//! use mp_kernels::gemm::{Epilogue, Gemm, MatMut, MatRef};
//!
//! let cpu = Cpu::with(Isa::Scalar)?; // the portable path, on any machine
//! // [1 2; 3 4] * [5 6; 7 8] = [19 22; 43 50], plus bias [1, -100] then ReLU.
//! let (a, b, mut c) = ([1.0f32, 2.0, 3.0, 4.0], [5.0f32, 6.0, 7.0, 8.0], [0.0f32; 4]);
//! let bias = [1.0, -100.0];
//! cpu.gemm(
//!     MatRef::new(&a, 2, 2),
//!     MatRef::new(&b, 2, 2),
//!     MatMut::new(&mut c, 2, 2),
//!     Gemm::new().epilogue(Epilogue::BiasRelu(&bias)),
//! )?;
//! assert_eq!(c, [20.0, 0.0, 44.0, 0.0]);
//! # Ok::<(), mp_kernels::Error>(())
//! ```

use std::sync::OnceLock;

use mp_core::Element;

use crate::activation::{self, Activation};
use crate::conv::{self, Geometry};
use crate::error::{Error, Result};
use crate::gelu::{self, Gelu};
use crate::gemm::{self, Gemm, GemmInput, GemmOutput, GemmPaths, MatMut, MatRef};
use crate::isa::Isa;
use crate::optim::{self, AdamParams, NonFiniteOutputs, RmspropParams, SgdParams};
use crate::softmax::{self, Label};
use crate::{cast, reduce, scale};

/// The CPU backend: an instruction set for the elementwise kernels and a GEMM path per input
/// dtype, each checked against this CPU when the value is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cpu {
    isa: Isa,
    gemm: GemmPaths,
}

impl Cpu {
    /// Every kernel on `isa`, GEMMs on the paths `isa` implies (the dot-product path for
    /// bfloat16 on [`Isa::Avx512Bf16`]), nothing measured.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when this CPU does not support `isa`, or naming
    /// `MP_NUM_THREADS` or `MP_BUFFER_CACHE_MIB` when that knob is malformed (or the kernel
    /// threads cannot be started).
    pub fn with(isa: Isa) -> Result<Cpu> {
        crate::threads::try_pool()?;
        mp_core::memory::check_knob()?;
        if !isa.is_supported() {
            return Err(Error::InvalidArgument {
                op: "Cpu::with",
                what: format!("instruction set {isa:?} is not supported by this CPU"),
            });
        }
        Ok(Cpu {
            isa,
            gemm: GemmPaths::default_for(isa),
        })
    }

    /// The same elementwise kernels with these GEMM paths.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the first path this CPU cannot run, or that does not
    /// compute its dtype.
    pub fn with_gemm_paths(self, gemm: GemmPaths) -> Result<Cpu> {
        gemm.check()?;
        Ok(Cpu { gemm, ..self })
    }

    /// The backend of this machine: the best instruction set it supports, and the GEMM paths
    /// measured fastest here (see [`crate::calibrate::calibration`]), once per process.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `MP_GEMM_PATH` when that knob is malformed or forces a
    /// path this CPU cannot run (the message is the same at every call).
    pub fn global() -> Result<&'static Cpu> {
        static CPU: OnceLock<std::result::Result<Cpu, String>> = OnceLock::new();
        CPU.get_or_init(|| {
            let best = Cpu::with(Isa::detect()).map_err(|e| e.to_string())?;
            let cal = crate::calibrate::calibration().map_err(|e| e.to_string())?;
            best.with_gemm_paths(cal.chosen).map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|what| Error::InvalidArgument {
            op: "Cpu::global",
            what: what.clone(),
        })
    }

    /// The instruction set of the elementwise kernels.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The GEMM path per input dtype.
    pub fn gemm_paths(&self) -> GemmPaths {
        self.gemm
    }

    /// What decides this backend's bits, in one line: the GEMM path per input dtype, the
    /// elementwise instruction set and the kernel thread count (results are bit-identical run to
    /// run for the same line). Checkpoints record it, so a resume on other paths can say so.
    pub fn kernel_paths(&self) -> String {
        format!(
            "float32={}, bfloat16={}, float16={}; elementwise {:?}; {} threads",
            self.gemm.f32.name(),
            self.gemm.bf16.name(),
            self.gemm.f16.name(),
            self.isa,
            crate::threads::num_threads()
        )
    }

    // ---------------------------------------------------------------------------------------
    // GEMM
    // ---------------------------------------------------------------------------------------

    /// `C = epilogue(alpha * op(A) * op(B) + beta * C)` with float32 accumulation, on this
    /// backend's path for `T` (see [`crate::gemm`] for how it is computed).
    ///
    /// `op(A)` must be `m x k`, `op(B)` `k x n` and C `m x n`; row strides must be at least the
    /// stored row width and the slices long enough for the stored shapes (longer is fine).
    /// `beta == 0` means C is not read (NaN in C does not propagate, as in BLAS). Zero-sized
    /// `m`, `n` or `k` are valid; with `k == 0`, `C = epilogue(beta * C)`. NaN and infinities
    /// propagate as IEEE 754 says (ReLU keeps NaN).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] naming the operands whose shapes do not fit, a stride below the
    /// row width, a slice too short or a bias that is not `n` long. C is unchanged on error.
    pub fn gemm<T: GemmInput, O: GemmOutput>(
        &self,
        a: MatRef<'_, T>,
        b: MatRef<'_, T>,
        c: MatMut<'_, O>,
        g: Gemm<'_>,
    ) -> Result<()> {
        gemm::gemm_views(self.gemm.get(T::DTYPE), a, b, c, g)
    }

    // ---------------------------------------------------------------------------------------
    // Casts and activations
    // ---------------------------------------------------------------------------------------

    /// Casts `src` into `dst` (equal lengths), bit-identical to `half` (see [`crate::cast`]).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] when `dst.len() != src.len()`.
    pub fn cast<S: Element, D: Element>(&self, src: &[S], dst: &mut [D]) -> Result<()> {
        cast::cast(self.isa, src, dst)
    }

    /// `y = act(x)` (equal lengths).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `y`.
    pub fn activation<T: Element>(&self, act: Activation, x: &[T], y: &mut [T]) -> Result<()> {
        activation::forward(self.isa, act, x, y)
    }

    /// `x = act(x)` in place.
    pub fn activation_inplace<T: Element>(&self, act: Activation, x: &mut [T]) -> Result<()> {
        activation::forward_inplace(self.isa, act, x)
    }

    /// `dx = dy * act'(x)`, from the forward output `y` (ReLU also accepts its input; NaN there
    /// gives a NaN gradient).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `y` or `dx` when a length differs from `dy`'s.
    pub fn activation_backward<T: Element>(
        &self,
        act: Activation,
        dy: &[T],
        y: &[T],
        dx: &mut [T],
    ) -> Result<()> {
        activation::backward(self.isa, act, dy, y, dx)
    }

    /// `g = g * act'(x)` in place: `g` holds `dy` on entry and `dx` on return.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `y`.
    pub fn activation_backward_inplace<T: Element>(
        &self,
        act: Activation,
        g: &mut [T],
        y: &[T],
    ) -> Result<()> {
        activation::backward_inplace(self.isa, act, g, y)
    }

    /// `y = gelu(x)` (equal lengths), see [`crate::gelu`].
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `y`.
    pub fn gelu<T: Element>(&self, form: Gelu, x: &[T], y: &mut [T]) -> Result<()> {
        gelu::forward(self.isa, form, x, y)
    }

    /// `dx = dy * gelu'(x)` from the forward's input `x`, see [`crate::gelu`].
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `x` or `dx` when a length differs from `dy`'s.
    pub fn gelu_backward<T: Element>(
        &self,
        form: Gelu,
        dy: &[T],
        x: &[T],
        dx: &mut [T],
    ) -> Result<()> {
        gelu::backward(self.isa, form, dy, x, dx)
    }

    // ---------------------------------------------------------------------------------------
    // Softmax and cross-entropy (float32 math)
    // ---------------------------------------------------------------------------------------

    /// Row softmax of a `[rows, cols]` row-major `x` of any dtype into float32 `out`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `x` or `out` (both `rows * cols`).
    pub fn softmax<T: Element>(
        &self,
        x: &[T],
        rows: usize,
        cols: usize,
        out: &mut [f32],
    ) -> Result<()> {
        softmax::softmax(self.isa, x, rows, cols, out)
    }

    /// The softmax gradient: `dx = (dy - sum(dy * y)) * y` per row, from the forward output `y`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `y`, `dy` or `dx` (all `rows * cols`).
    pub fn softmax_backward(
        &self,
        y: &[f32],
        dy: &[f32],
        rows: usize,
        cols: usize,
        dx: &mut [f32],
    ) -> Result<()> {
        softmax::softmax_backward(self.isa, y, dy, rows, cols, dx)
    }

    /// The mean sparse categorical cross-entropy of a `[rows, cols]` float32 `input` (logits
    /// when `from_logits`, else probabilities, clipped as Keras does) against one label per row;
    /// row losses in float32, their mean in float64 (in row order), rounded once.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `input` or `labels`; [`Error::InvalidArgument`] for a
    /// label out of range (naming its row and value) or `rows == 0`.
    pub fn softmax_cross_entropy<L: Label>(
        &self,
        input: &[f32],
        labels: &[L],
        rows: usize,
        cols: usize,
        from_logits: bool,
    ) -> Result<f32> {
        softmax::softmax_cross_entropy(self.isa, input, labels, rows, cols, from_logits)
    }

    /// Per-row losses of [`Cpu::softmax_cross_entropy`] written to `out` (`rows` long);
    /// `rows == 0` is allowed.
    ///
    /// # Errors
    /// As [`Cpu::softmax_cross_entropy`], with `out` checked too.
    pub fn softmax_cross_entropy_rows<L: Label>(
        &self,
        input: &[f32],
        labels: &[L],
        rows: usize,
        cols: usize,
        from_logits: bool,
        out: &mut [f32],
    ) -> Result<()> {
        softmax::softmax_cross_entropy_rows(self.isa, input, labels, rows, cols, from_logits, out)
    }

    /// `dlogits = scale * (p - onehot(label)) / rows`, from the softmax output `probs`: the
    /// gradient of `scale * loss` with respect to the logits of a float32 softmax (the factor
    /// `scale / rows` computed in float64 and rounded once).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `probs`, `labels` or `dlogits`;
    /// [`Error::InvalidArgument`] for a label out of range.
    pub fn softmax_cross_entropy_grad<L: Label>(
        &self,
        probs: &[f32],
        labels: &[L],
        rows: usize,
        cols: usize,
        scale: f32,
        dlogits: &mut [f32],
    ) -> Result<()> {
        softmax::softmax_cross_entropy_grad(self.isa, probs, labels, rows, cols, scale, dlogits)
    }

    /// The gradient of the from-probabilities loss (times `scale`) with respect to the
    /// probabilities, as Keras differentiates it (0 for a row whose clip is active).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `probs`, `labels` or `dprobs`;
    /// [`Error::InvalidArgument`] for a label out of range.
    pub fn crossentropy_grad_probs<L: Label>(
        &self,
        probs: &[f32],
        labels: &[L],
        rows: usize,
        cols: usize,
        scale: f32,
        dprobs: &mut [f32],
    ) -> Result<()> {
        softmax::crossentropy_grad_probs(self.isa, probs, labels, rows, cols, scale, dprobs)
    }

    // ---------------------------------------------------------------------------------------
    // Convolution and pooling (NHWC images; see [`crate::conv`])
    // ---------------------------------------------------------------------------------------

    /// The im2col matrix of `x` (`[batch, h, w, channels]`) into `cols` (`[pixels,
    /// patch_len]`): row `(b, i, j)` is the input patch under output pixel `(i, j)`, zero in the
    /// padding, so that a convolution is one GEMM with the kernel.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `x` or `cols`; nothing is written then.
    pub fn im2col<T: Element>(&self, g: &Geometry, x: &[T], cols: &mut [T]) -> Result<()> {
        conv::im2col(g, x, cols)
    }

    /// A convolution: `y = epilogue(patches(x) · kernel)` (`kernel` `[patch_len, filters]`, `y`
    /// `[pixels, filters]`), the patches formed a chunk of images at a time on this backend's
    /// GEMM path for `T`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `x`, `kernel` or `y`; the GEMM's errors.
    #[allow(clippy::too_many_arguments)]
    pub fn conv2d<T: GemmInput, O: GemmOutput>(
        &self,
        g: &Geometry,
        x: &[T],
        kernel: &[T],
        filters: usize,
        y: &mut [O],
        gemm: Gemm<'_>,
    ) -> Result<()> {
        conv::conv2d(self.gemm, g, x, kernel, filters, y, gemm)
    }

    /// The input gradient of [`Cpu::conv2d`] into `dx`, rounded once from float32 sums: for a
    /// stride of 1, the convolution of `dy` with the flipped kernel; otherwise the patch
    /// gradients formed in float32 a chunk at a time and summed back.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `dy`, `kernel` or `dx`; the GEMM's errors.
    pub fn conv2d_backward_input<T: GemmInput, O: GemmOutput>(
        &self,
        g: &Geometry,
        dy: &[T],
        kernel: &[T],
        filters: usize,
        dx: &mut [O],
    ) -> Result<()> {
        conv::conv2d_backward_input(self.gemm, g, dy, kernel, filters, dx)
    }

    /// The kernel gradient of [`Cpu::conv2d`], added into `dw` (float32, `[patch_len,
    /// filters]`).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `x`, `dy` or `dw`; the GEMM's errors.
    pub fn conv2d_backward_kernel<T: GemmInput>(
        &self,
        g: &Geometry,
        x: &[T],
        dy: &[T],
        filters: usize,
        dw: &mut [f32],
    ) -> Result<()> {
        conv::conv2d_backward_kernel(self.gemm, g, x, dy, filters, dw)
    }

    /// The adjoint of [`Cpu::im2col`]: every entry of `dcols` added, in float32, to the input
    /// position it was copied from (the padding's dropped), into `dx`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `dcols` or `dx`; nothing is written then.
    pub fn col2im<T: Element>(&self, g: &Geometry, dcols: &[T], dx: &mut [f32]) -> Result<()> {
        conv::col2im(g, dcols, dx)
    }

    /// Max pooling of `x` into `y`, with the index into `x` of each chosen element in `argmax`
    /// (NaN wins; positions in the padding are no candidates).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `x`, `y` or `argmax`; [`Error::InvalidArgument`] for an
    /// input over `u32::MAX` elements. Nothing is written on error.
    pub fn max_pool<T: Element>(
        &self,
        g: &Geometry,
        x: &[T],
        y: &mut [T],
        argmax: &mut [u32],
    ) -> Result<()> {
        conv::max_pool(g, x, y, argmax)
    }

    /// The gradient of [`Cpu::max_pool`] into `dx` (float32): each window's `dy` added to its
    /// chosen element.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `dy`, `argmax` or `dx`; [`Error::InvalidArgument`] for
    /// an `argmax` entry outside its image. Nothing is written on error.
    pub fn max_pool_backward<T: Element>(
        &self,
        g: &Geometry,
        dy: &[T],
        argmax: &[u32],
        dx: &mut [f32],
    ) -> Result<()> {
        conv::max_pool_backward(g, dy, argmax, dx)
    }

    /// Average pooling of `x` into `y`, summed in float32 over the window's positions inside
    /// the input.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `x` or `y`; nothing is written then.
    pub fn avg_pool<T: Element>(&self, g: &Geometry, x: &[T], y: &mut [T]) -> Result<()> {
        conv::avg_pool(g, x, y)
    }

    /// The gradient of [`Cpu::avg_pool`] into `dx` (float32).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `dy` or `dx`; nothing is written then.
    pub fn avg_pool_backward<T: Element>(
        &self,
        g: &Geometry,
        dy: &[T],
        dx: &mut [f32],
    ) -> Result<()> {
        conv::avg_pool_backward(g, dy, dx)
    }

    // ---------------------------------------------------------------------------------------
    // Reductions
    // ---------------------------------------------------------------------------------------

    /// The bias gradient of a `[rows, cols]` row-major `dy`: `out[c] = sum over r of dy[r, c]`
    /// in float32, or `out[c] += ...` when `accumulate` (fixed blocks of 2048 rows, added in
    /// order).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `dy` or `out`.
    pub fn bias_grad<T: Element>(
        &self,
        dy: &[T],
        rows: usize,
        cols: usize,
        out: &mut [f32],
        accumulate: bool,
    ) -> Result<()> {
        reduce::bias_grad(self.isa, dy, rows, cols, out, accumulate)
    }

    /// The index of each row's maximum (the first NaN, else the first maximum) into `out`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `x` or `out`; [`Error::InvalidArgument`] when `cols` is
    /// 0 and `rows` is not, or `cols` does not fit in `u32`.
    pub fn argmax_rows<T: Element>(
        &self,
        x: &[T],
        rows: usize,
        cols: usize,
        out: &mut [u32],
    ) -> Result<()> {
        reduce::argmax_rows(self.isa, x, rows, cols, out)
    }

    /// The sum of `x`: float32 within blocks of 4096 elements, float64 across blocks (in
    /// order), rounded once; `0.0` when empty; NaN and infinities propagate.
    pub fn sum<T: Element>(&self, x: &[T]) -> f32 {
        reduce::sum(self.isa, x)
    }

    /// The sum of the squares of `x`, in float64: blocks of 4096 elements summed in order, so
    /// the result does not depend on the thread count. `0.0` when empty; NaN and infinities
    /// propagate. What a gradient's L2 norm is made of.
    pub fn sum_squares(&self, x: &[f32]) -> f64 {
        reduce::sum_squares(x)
    }

    /// The mean of `x` as [`Cpu::sum`] computes it, divided in float64 (NaN when empty).
    pub fn mean<T: Element>(&self, x: &[T]) -> f32 {
        reduce::mean(self.isa, x)
    }

    // ---------------------------------------------------------------------------------------
    // Loss scaling
    // ---------------------------------------------------------------------------------------

    /// Per-column mean and biased variance of a `[rows, cols]` matrix, in float32 (see
    /// [`crate::norm::moments`]).
    ///
    /// # Errors
    /// As [`crate::norm::moments`].
    pub fn moments<T: Element>(
        &self,
        x: &[T],
        rows: usize,
        cols: usize,
        mean: &mut [f32],
        var: &mut [f32],
    ) -> Result<()> {
        crate::norm::moments(x, rows, cols, mean, var)
    }

    /// `gamma (x - mean) / sqrt(var + epsilon) + beta` per column, in float32 (see
    /// [`crate::norm::normalize`]).
    ///
    /// # Errors
    /// As [`crate::norm::normalize`].
    #[allow(clippy::too_many_arguments)]
    pub fn normalize<T: Element>(
        &self,
        x: &[T],
        rows: usize,
        cols: usize,
        mean: &[f32],
        var: &[f32],
        gamma: &[f32],
        beta: &[f32],
        epsilon: f32,
        y: &mut [T],
    ) -> Result<()> {
        crate::norm::normalize(x, rows, cols, mean, var, gamma, beta, epsilon, y)
    }

    /// [`Cpu::normalize`] followed by ReLU, in one pass (see [`crate::norm::normalize_relu`]).
    ///
    /// # Errors
    /// As [`crate::norm::normalize_relu`].
    #[allow(clippy::too_many_arguments)]
    pub fn normalize_relu<T: Element>(
        &self,
        x: &[T],
        rows: usize,
        cols: usize,
        mean: &[f32],
        var: &[f32],
        gamma: &[f32],
        beta: &[f32],
        epsilon: f32,
        y: &mut [T],
    ) -> Result<()> {
        crate::norm::normalize_relu(x, rows, cols, mean, var, gamma, beta, epsilon, y)
    }

    /// The training-mode gradient of [`Cpu::normalize_relu`] (see
    /// [`crate::norm::normalize_relu_backward`]).
    ///
    /// # Errors
    /// As [`crate::norm::normalize_relu_backward`].
    #[allow(clippy::too_many_arguments)]
    pub fn normalize_relu_backward<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        rows: usize,
        cols: usize,
        mean: &[f32],
        var: &[f32],
        gamma: &[f32],
        beta: &[f32],
        epsilon: f32,
        dx: &mut [T],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) -> Result<()> {
        crate::norm::normalize_relu_backward(
            x, dy, rows, cols, mean, var, gamma, beta, epsilon, dx, dgamma, dbeta,
        )
    }

    /// The training-mode gradient of [`Cpu::normalize`] (see
    /// [`crate::norm::normalize_backward`]).
    ///
    /// # Errors
    /// As [`crate::norm::normalize_backward`].
    #[allow(clippy::too_many_arguments)]
    pub fn normalize_backward<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        rows: usize,
        cols: usize,
        mean: &[f32],
        var: &[f32],
        gamma: &[f32],
        epsilon: f32,
        dx: &mut [T],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) -> Result<()> {
        crate::norm::normalize_backward(
            x, dy, rows, cols, mean, var, gamma, epsilon, dx, dgamma, dbeta,
        )
    }

    /// Inverted dropout (see [`crate::dropout::dropout`]).
    ///
    /// # Errors
    /// As [`crate::dropout::dropout`].
    pub fn dropout<T: Element>(
        &self,
        x: &[T],
        rate: f32,
        seed: u64,
        offset: u64,
        y: &mut [T],
    ) -> Result<()> {
        crate::dropout::dropout(x, rate, seed, offset, y)
    }

    /// The gradient of [`Cpu::dropout`] (see [`crate::dropout::dropout_backward`]).
    ///
    /// # Errors
    /// As [`crate::dropout::dropout_backward`].
    pub fn dropout_backward<T: Element>(
        &self,
        dy: &[T],
        rate: f32,
        seed: u64,
        offset: u64,
        dx: &mut [T],
    ) -> Result<()> {
        crate::dropout::dropout_backward(dy, rate, seed, offset, dx)
    }

    /// `value = value * momentum + batch * (1 - momentum)`, Keras's update of moving
    /// statistics, in float32 in that order.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `batch`; [`Error::InvalidArgument`] for a momentum that
    /// is not finite or outside `[0, 1]`. Nothing is written on error.
    pub fn moving_average(&self, value: &mut [f32], batch: &[f32], momentum: f32) -> Result<()> {
        if batch.len() != value.len() {
            return Err(Error::LengthMismatch {
                op: "moving_average",
                what: "batch",
                expected: value.len(),
                got: batch.len(),
            });
        }
        if !(0.0..=1.0).contains(&momentum) {
            return Err(Error::InvalidArgument {
                op: "moving_average",
                what: format!("momentum {momentum} is not in [0, 1]"),
            });
        }
        scale::moving_average(value, batch, momentum);
        Ok(())
    }

    /// `y = y + x` elementwise, added in float32 and rounded once (a residual connection).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] when `x` and `y` differ in length; `y` is unchanged then.
    pub fn add_assign<T: Element>(&self, x: &[T], y: &mut [T]) -> Result<()> {
        if x.len() != y.len() {
            return Err(Error::LengthMismatch {
                op: "add",
                what: "x",
                expected: y.len(),
                got: x.len(),
            });
        }
        scale::add_assign(self.isa, x, y);
        Ok(())
    }

    /// `x = x * s` in float32, rounded back to the element type.
    pub fn scale<T: Element>(&self, x: &mut [T], s: f32) {
        scale::scale(self.isa, x, s)
    }

    /// Multiplies every gradient by `inv_scale` in place and returns whether every result is
    /// finite, in one pass over the whole slice (a non-finite value stays non-finite after the
    /// multiply, so checking after suffices). `inv_scale` should be
    /// `(1.0 / scale as f64) as f32`, exact for power-of-two scales.
    pub fn unscale_and_check(&self, grads: &mut [f32], inv_scale: f32) -> bool {
        scale::unscale_and_check(self.isa, grads, inv_scale)
    }

    /// Clips every element of `x` into `[lo, hi]`; NaN stays NaN (IEEE comparisons).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `lo > hi` or either is NaN; nothing is written.
    pub fn clip(&self, x: &mut [f32], lo: f32, hi: f32) -> Result<()> {
        if lo.is_nan() || hi.is_nan() || lo > hi {
            return Err(Error::InvalidArgument {
                op: "clip",
                what: format!("the bounds [{lo}, {hi}] are not ordered numbers"),
            });
        }
        scale::clip(x, lo, hi);
        Ok(())
    }

    /// Whether every element is finite (`true` when empty).
    pub fn all_finite<T: Element>(&self, x: &[T]) -> bool {
        scale::all_finite(self.isa, x)
    }

    // ---------------------------------------------------------------------------------------
    // Optimizer updates (float32 variables and state)
    // ---------------------------------------------------------------------------------------

    /// One SGD step; `momentum` is required when `p.momentum != 0`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `grad` or `momentum`; [`Error::InvalidArgument`] when
    /// the momentum buffer is missing.
    pub fn sgd_update(
        &self,
        var: &mut [f32],
        grad: &[f32],
        momentum: Option<&mut [f32]>,
        p: SgdParams,
    ) -> Result<()> {
        optim::sgd_update(self.isa, var, grad, momentum, p)
    }

    /// The checking twin of [`Cpu::sgd_update`]: computes the same step with the same
    /// arithmetic, writes nothing, and says which new values (the variable's, the momentum's)
    /// would be NaN or infinite. An optimizer runs it over every variable first and writes the
    /// update only when all are finite.
    ///
    /// # Errors
    /// As [`Cpu::sgd_update`].
    pub fn sgd_update_check(
        &self,
        var: &[f32],
        grad: &[f32],
        momentum: Option<&[f32]>,
        p: SgdParams,
    ) -> Result<NonFiniteOutputs> {
        optim::sgd_check(self.isa, var, grad, momentum, p)
    }

    /// One RMSprop step; `momentum` is required when `p.momentum > 0`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `grad`, `velocity` or `momentum`;
    /// [`Error::InvalidArgument`] when the momentum buffer is missing.
    pub fn rmsprop_update(
        &self,
        var: &mut [f32],
        grad: &[f32],
        velocity: &mut [f32],
        momentum: Option<&mut [f32]>,
        p: RmspropParams,
    ) -> Result<()> {
        optim::rmsprop_update(self.isa, var, grad, velocity, momentum, p)
    }

    /// The checking twin of [`Cpu::rmsprop_update`] (see [`Cpu::sgd_update_check`]): which of
    /// the new variable, velocity and momentum would hold NaN or infinity; nothing is written.
    ///
    /// # Errors
    /// As [`Cpu::rmsprop_update`].
    pub fn rmsprop_update_check(
        &self,
        var: &[f32],
        grad: &[f32],
        velocity: &[f32],
        momentum: Option<&[f32]>,
        p: RmspropParams,
    ) -> Result<NonFiniteOutputs> {
        optim::rmsprop_check(self.isa, var, grad, velocity, momentum, p)
    }

    /// One Adam step with first and second moments `m` and `v`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `grad`, `m` or `v`.
    pub fn adam_update(
        &self,
        var: &mut [f32],
        grad: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        p: AdamParams,
    ) -> Result<()> {
        optim::adam_update(self.isa, var, grad, m, v, p)
    }

    /// The checking twin of [`Cpu::adam_update`] (see [`Cpu::sgd_update_check`]): which of the
    /// new variable, `m` and `v` would hold NaN or infinity (a finite gradient of 1e30 makes
    /// `g * g`, and so `v`, infinite); nothing is written.
    ///
    /// # Errors
    /// As [`Cpu::adam_update`].
    pub fn adam_update_check(
        &self,
        var: &[f32],
        grad: &[f32],
        m: &[f32],
        v: &[f32],
        p: AdamParams,
    ) -> Result<NonFiniteOutputs> {
        optim::adam_check(self.isa, var, grad, m, v, p)
    }
}
