//! The CUDA kernels' launch wrappers: argument checks, then one launch each.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use mp_core::cuda::CudaBuf;
use mp_core::{DType, Element};

use super::{Gpu, driver_err};
use crate::error::{Error, Result, check_len};
use crate::optim::{AdamParams, RmspropParams, SgdParams};
use crate::reduce::matrix_len;
use crate::softmax::{Label, check_labels};

/// The kernel `<prefix>_<dtype suffix>` as a `&'static str`.
macro_rules! entry {
    ($prefix:literal, $dtype:expr) => {
        match $dtype {
            DType::F32 => concat!($prefix, "_f32"),
            DType::F16 => concat!($prefix, "_f16"),
            DType::BF16 => concat!($prefix, "_bf16"),
        }
    };
}

/// A null device pointer, for optional pointer arguments.
const NULL: u64 = 0;

/// Class labels on the device (`u32`), checked against the number of classes when uploaded, so
/// the kernels that take them need no check of their own.
#[derive(Debug)]
pub struct DeviceLabels {
    buf: CudaSlice<u32>,
    ordinal: usize,
    classes: usize,
}

impl DeviceLabels {
    /// Uploads `labels`, each of which must be in `0..classes`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the first label out of range (and its row); nothing is
    /// uploaded then.
    pub fn new<L: Label>(gpu: &Gpu, labels: &[L], classes: usize) -> Result<Self> {
        let host = to_u32("DeviceLabels::new", labels, classes)?;
        Ok(DeviceLabels {
            buf: gpu
                .stream()
                .clone_htod(&host)
                .map_err(driver_err("DeviceLabels::new"))?,
            ordinal: gpu.ordinal(),
            classes,
        })
    }

    /// Replaces the labels with `labels` (same length and classes), reusing the buffer.
    ///
    /// # Errors
    /// As [`DeviceLabels::new`], and [`Error::LengthMismatch`] for another length.
    pub fn upload<L: Label>(&mut self, labels: &[L]) -> Result<()> {
        check_len(
            "DeviceLabels::upload",
            "labels",
            labels.len(),
            self.buf.len(),
        )?;
        let host = to_u32("DeviceLabels::upload", labels, self.classes)?;
        let stream = self.buf.stream().clone();
        stream
            .memcpy_htod(&host, &mut self.buf)
            .map_err(driver_err("DeviceLabels::upload"))
    }

    /// The number of labels.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether there are no labels.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The number of classes the labels were checked against.
    pub fn classes(&self) -> usize {
        self.classes
    }
}

/// Checks that a label or flag buffer was made on `gpu`.
fn check_ordinal(op: &'static str, gpu: &Gpu, ordinal: usize) -> Result<()> {
    if ordinal == gpu.ordinal() {
        Ok(())
    } else {
        Err(mp_core::Error::WrongDevice {
            op,
            expected: mp_core::Device::Cuda(gpu.ordinal()),
            got: mp_core::Device::Cuda(ordinal),
        }
        .into())
    }
}

fn to_u32<L: Label>(op: &'static str, labels: &[L], classes: usize) -> Result<Vec<u32>> {
    check_labels(op, labels, labels.len(), classes)?;
    if u32::try_from(classes).is_err() {
        return Err(Error::InvalidArgument {
            op,
            what: format!("{classes} classes do not fit in u32"),
        });
    }
    Ok(labels
        .iter()
        .map(|l| l.index().unwrap_or(0) as u32)
        .collect())
}

/// The all-finite flag of loss scaling, in device memory: [`unscale_and_check`] and
/// [`all_finite`] set it when they see a NaN or an infinity; the optimizer updates read it on the
/// device and skip the step when it is set. Only [`FiniteFlag::all_finite`] brings it to the host.
#[derive(Debug)]
pub struct FiniteFlag {
    buf: CudaSlice<u32>,
    ordinal: usize,
}

impl FiniteFlag {
    /// A cleared flag on `gpu`.
    ///
    /// # Errors
    /// As [`Gpu::zeros`].
    pub fn new(gpu: &Gpu) -> Result<Self> {
        Ok(FiniteFlag {
            buf: gpu
                .stream()
                .alloc_zeros(1)
                .map_err(driver_err("FiniteFlag::new"))?,
            ordinal: gpu.ordinal(),
        })
    }

    /// Clears the flag (queued on the stream: no host round trip).
    ///
    /// # Errors
    /// [`Error::Cuda`] when the memset cannot be queued.
    pub fn reset(&mut self, gpu: &Gpu) -> Result<()> {
        check_ordinal("FiniteFlag::reset", gpu, self.ordinal)?;
        gpu.stream()
            .memset_zeros(&mut self.buf)
            .map_err(driver_err("FiniteFlag::reset"))
    }

    /// Whether every value checked since the last reset was finite. Synchronises the stream
    /// (one 4-byte copy): call it once per step, after the updates are queued.
    ///
    /// # Errors
    /// [`Error::Core`] when the copy fails.
    pub fn all_finite(&self) -> Result<bool> {
        let host = self
            .buf
            .stream()
            .clone_dtoh(&self.buf)
            .map_err(driver_err("FiniteFlag::all_finite"))?;
        Ok(host.first().copied() == Some(0))
    }
}

/// Casts `src` into `dst` (equal lengths): round to nearest even, subnormals kept, NaN kept,
/// bit-identical to [`crate::Cpu::cast`] (NaN payloads included, see `cuda/common.cuh`). A
/// cast to the same type is a device copy.
///
/// # Errors
/// [`Error::LengthMismatch`] when the lengths differ; nothing is launched.
pub fn cast<S: Element, D: Element>(
    gpu: &Gpu,
    src: &CudaBuf<S>,
    dst: &mut CudaBuf<D>,
) -> Result<()> {
    const OP: &str = "cuda cast";
    check_len(OP, "dst", dst.len(), src.len())?;
    gpu.check_buf(OP, src)?;
    gpu.check_buf(OP, dst)?;
    if src.is_empty() {
        return Ok(());
    }
    let name = match (S::DTYPE, D::DTYPE) {
        (DType::F32, DType::BF16) => "cast_f32_bf16",
        (DType::F32, DType::F16) => "cast_f32_f16",
        (DType::BF16, DType::F32) => "cast_bf16_f32",
        (DType::F16, DType::F32) => "cast_f16_f32",
        (DType::BF16, DType::F16) => "cast_bf16_f16",
        (DType::F16, DType::BF16) => "cast_f16_bf16",
        _ => {
            // Same type: a plain device-to-device copy.
            // SAFETY: `Element` is sealed, one type per dtype, so `S` and `D` are the same type
            // and have the same size; the view covers exactly `src.len()` elements.
            let same = unsafe { src.slice().transmute::<D>(src.len()) }.ok_or_else(|| {
                Error::InvalidArgument {
                    op: OP,
                    what: "element sizes differ".into(),
                }
            })?;
            return gpu
                .stream()
                .memcpy_dtod(&same, dst.slice_mut())
                .map_err(driver_err(OP));
        }
    };
    let f = gpu.function(name)?;
    let n = src.len() as u64;
    let cfg = gpu.grid(src.len());
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(src.slice()).arg(dst.slice_mut()).arg(&n);
    // SAFETY: `cast_<s>_<d>(const S*, D*, u64 n)`: both buffers hold `n` elements of the types
    // the kernel reads and writes.
    unsafe { b.launch(cfg) }.map_err(driver_err(OP))?;
    Ok(())
}

/// `y = max(x, 0)`, NaN kept ([`crate::Cpu::activation`]). `y` may be `x`'s own buffer
/// through [`relu_forward_inplace`].
///
/// # Errors
/// [`Error::LengthMismatch`] naming `y`.
pub fn relu_forward<T: Element>(gpu: &Gpu, x: &CudaBuf<T>, y: &mut CudaBuf<T>) -> Result<()> {
    const OP: &str = "cuda relu_forward";
    check_len(OP, "y", y.len(), x.len())?;
    gpu.check_buf(OP, x)?;
    gpu.check_buf(OP, y)?;
    if x.is_empty() {
        return Ok(());
    }
    let f = gpu.function(entry!("relu_forward", T::DTYPE))?;
    let n = x.len() as u64;
    let cfg = gpu.grid(x.len());
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x.slice()).arg(y.slice_mut()).arg(&n);
    // SAFETY: `relu_forward_<t>(const T* x, T* y, u64 n)`, both `n` elements of `T`.
    unsafe { b.launch(cfg) }.map_err(driver_err(OP))?;
    Ok(())
}

/// `x = max(x, 0)` in place.
///
/// # Errors
/// [`Error::Cuda`] when the launch fails.
pub fn relu_forward_inplace<T: Element>(gpu: &Gpu, x: &mut CudaBuf<T>) -> Result<()> {
    const OP: &str = "cuda relu_forward_inplace";
    gpu.check_buf(OP, x)?;
    if x.is_empty() {
        return Ok(());
    }
    let f = gpu.function(entry!("relu_forward", T::DTYPE))?;
    let n = x.len() as u64;
    let ptr = raw_ptr(gpu, x);
    let cfg = gpu.grid(x.len());
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&ptr).arg(x.slice_mut()).arg(&n);
    // SAFETY: the kernel reads element i before writing it, so input and output may be the same
    // buffer of `n` elements of `T`.
    unsafe { b.launch(cfg) }.map_err(driver_err(OP))?;
    Ok(())
}

/// `dx = dy * (y > 0)` with the CPU's NaN rules ([`crate::Cpu::activation_backward`]).
///
/// # Errors
/// [`Error::LengthMismatch`] naming `y` or `dx`.
pub fn relu_backward<T: Element>(
    gpu: &Gpu,
    dy: &CudaBuf<T>,
    y: &CudaBuf<T>,
    dx: &mut CudaBuf<T>,
) -> Result<()> {
    const OP: &str = "cuda relu_backward";
    check_len(OP, "y", y.len(), dy.len())?;
    check_len(OP, "dx", dx.len(), dy.len())?;
    for b in [dy, y] {
        gpu.check_buf(OP, b)?;
    }
    gpu.check_buf(OP, dx)?;
    if dy.is_empty() {
        return Ok(());
    }
    let f = gpu.function(entry!("relu_backward", T::DTYPE))?;
    let n = dy.len() as u64;
    let cfg = gpu.grid(dy.len());
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(dy.slice()).arg(y.slice()).arg(dx.slice_mut()).arg(&n);
    // SAFETY: `relu_backward_<t>(const T* dy, const T* y, T* dx, u64 n)`, all `n` elements.
    unsafe { b.launch(cfg) }.map_err(driver_err(OP))?;
    Ok(())
}

/// `g = g * (y > 0)` in place: `g` holds `dy` on entry and `dx` on return.
///
/// # Errors
/// [`Error::LengthMismatch`] naming `y`.
pub fn relu_backward_inplace<T: Element>(
    gpu: &Gpu,
    g: &mut CudaBuf<T>,
    y: &CudaBuf<T>,
) -> Result<()> {
    const OP: &str = "cuda relu_backward_inplace";
    check_len(OP, "y", y.len(), g.len())?;
    gpu.check_buf(OP, g)?;
    gpu.check_buf(OP, y)?;
    if g.is_empty() {
        return Ok(());
    }
    let f = gpu.function(entry!("relu_backward", T::DTYPE))?;
    let n = g.len() as u64;
    let ptr = raw_ptr(gpu, g);
    let cfg = gpu.grid(g.len());
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&ptr).arg(y.slice()).arg(g.slice_mut()).arg(&n);
    // SAFETY: element i of `dy` is read before element i of `dx` is written, so they may be the
    // same buffer of `n` elements.
    unsafe { b.launch(cfg) }.map_err(driver_err(OP))?;
    Ok(())
}

/// The bias gradient of a `[rows, cols]` row-major `dy`: column sums in float32 into `out`
/// (`cols` long), or added to it when `accumulate` ([`crate::Cpu::bias_grad`]).
///
/// # Errors
/// [`Error::LengthMismatch`] naming `dy` or `out`.
pub fn bias_grad<T: Element>(
    gpu: &Gpu,
    dy: &CudaBuf<T>,
    rows: usize,
    cols: usize,
    out: &mut CudaBuf<f32>,
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "cuda bias_grad";
    check_len(OP, "dy", dy.len(), matrix_len(OP, rows, cols)?)?;
    check_len(OP, "out", out.len(), cols)?;
    gpu.check_buf(OP, dy)?;
    gpu.check_buf(OP, out)?;
    if cols == 0 {
        return Ok(());
    }
    let f = gpu.function(entry!("bias_grad", T::DTYPE))?;
    let (r, c, acc) = (rows as u64, cols as u64, i32::from(accumulate));
    let cfg = LaunchConfig {
        grid_dim: (cols.div_ceil(32) as u32, 1, 1),
        block_dim: (32, 32, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(dy.slice())
        .arg(&r)
        .arg(&c)
        .arg(out.slice_mut())
        .arg(&acc);
    // SAFETY: `bias_grad_<t>(const T* dy, u64 rows, u64 cols, float* out, int accumulate)`:
    // `dy` holds rows * cols elements, `out` cols; one block per 32 columns, 32 x 32 threads as
    // the kernel's __launch_bounds__ says.
    unsafe { b.launch(cfg) }.map_err(driver_err(OP))?;
    Ok(())
}

/// One warp per row, 8 rows per block.
fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(8).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check_rows(op: &'static str, rows: usize) -> Result<()> {
    // Grid x is at most 2^31 - 1 blocks of 8 rows.
    if rows.div_ceil(8) > i32::MAX as usize {
        return Err(Error::InvalidArgument {
            op,
            what: format!("{rows} rows are more than one launch handles"),
        });
    }
    Ok(())
}

/// Row softmax of a `[rows, cols]` row-major `x` of any dtype into float32 `out`
/// ([`crate::Cpu::softmax`]).
///
/// # Errors
/// [`Error::LengthMismatch`] naming `x` or `out`.
pub fn softmax<T: Element>(
    gpu: &Gpu,
    x: &CudaBuf<T>,
    rows: usize,
    cols: usize,
    out: &mut CudaBuf<f32>,
) -> Result<()> {
    const OP: &str = "cuda softmax";
    let n = matrix_len(OP, rows, cols)?;
    check_len(OP, "x", x.len(), n)?;
    check_len(OP, "out", out.len(), n)?;
    check_rows(OP, rows)?;
    gpu.check_buf(OP, x)?;
    gpu.check_buf(OP, out)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(entry!("softmax", T::DTYPE))?;
    let (r, c) = (rows as u64, cols as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x.slice()).arg(out.slice_mut()).arg(&r).arg(&c);
    // SAFETY: `softmax_<t>(const T* x, float* y, u64 rows, u64 cols)`, both rows * cols long;
    // one warp per row.
    unsafe { b.launch(rows_config(rows)) }.map_err(driver_err(OP))?;
    Ok(())
}

/// Per-row sparse categorical cross-entropy losses of a `[rows, cols]` float32 `input` (logits
/// when `from_logits`, else probabilities, clipped as Keras does) into `out` (`rows` long)
/// ([`crate::Cpu::softmax_cross_entropy_rows`]).
///
/// # Errors
/// [`Error::LengthMismatch`] naming `input`, `labels` or `out`; [`Error::InvalidArgument`] when
/// the labels were checked against another number of classes than `cols`.
pub fn softmax_cross_entropy_rows(
    gpu: &Gpu,
    input: &CudaBuf<f32>,
    labels: &DeviceLabels,
    rows: usize,
    cols: usize,
    from_logits: bool,
    out: &mut CudaBuf<f32>,
) -> Result<()> {
    const OP: &str = "cuda softmax_cross_entropy_rows";
    check_len(OP, "input", input.len(), matrix_len(OP, rows, cols)?)?;
    check_device_labels(OP, labels, rows, cols)?;
    check_len(OP, "out", out.len(), rows)?;
    check_rows(OP, rows)?;
    gpu.check_buf(OP, input)?;
    check_ordinal(OP, gpu, labels.ordinal)?;
    gpu.check_buf(OP, out)?;
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function("xent_rows_f32")?;
    let (r, c, fl) = (rows as u64, cols as u64, i32::from(from_logits));
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(input.slice())
        .arg(&labels.buf)
        .arg(out.slice_mut())
        .arg(&r)
        .arg(&c)
        .arg(&fl);
    // SAFETY: `xent_rows_f32(const float* input, const u32* labels, float* loss, u64 rows,
    // u64 cols, int from_logits)`: sizes checked above, every label < cols.
    unsafe { b.launch(rows_config(rows)) }.map_err(driver_err(OP))?;
    Ok(())
}

fn check_device_labels(
    op: &'static str,
    labels: &DeviceLabels,
    rows: usize,
    cols: usize,
) -> Result<()> {
    check_len(op, "labels", labels.len(), rows)?;
    if labels.classes != cols {
        return Err(Error::InvalidArgument {
            op,
            what: format!(
                "the labels were checked against {} classes, but the input has {cols} columns",
                labels.classes
            ),
        });
    }
    Ok(())
}

/// `factor = scale / rows`, computed in float64 and rounded once (as the CPU does).
fn grad_factor(scale: f32, rows: usize) -> f32 {
    (f64::from(scale) / rows as f64) as f32
}

/// `dlogits = scale * (p - onehot(label)) / rows` from the softmax output `probs`
/// ([`crate::Cpu::softmax_cross_entropy_grad`]; bit-identical).
///
/// # Errors
/// [`Error::LengthMismatch`] naming `probs`, `labels` or `dlogits`.
pub fn softmax_cross_entropy_grad(
    gpu: &Gpu,
    probs: &CudaBuf<f32>,
    labels: &DeviceLabels,
    rows: usize,
    cols: usize,
    scale: f32,
    dlogits: &mut CudaBuf<f32>,
) -> Result<()> {
    const OP: &str = "cuda softmax_cross_entropy_grad";
    let n = matrix_len(OP, rows, cols)?;
    check_len(OP, "probs", probs.len(), n)?;
    check_device_labels(OP, labels, rows, cols)?;
    check_len(OP, "dlogits", dlogits.len(), n)?;
    gpu.check_buf(OP, probs)?;
    check_ordinal(OP, gpu, labels.ordinal)?;
    gpu.check_buf(OP, dlogits)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("xent_grad_f32")?;
    let (r, c, factor) = (rows as u64, cols as u64, grad_factor(scale, rows));
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(probs.slice())
        .arg(&labels.buf)
        .arg(dlogits.slice_mut())
        .arg(&r)
        .arg(&c)
        .arg(&factor);
    // SAFETY: `xent_grad_f32(const float* probs, const u32* labels, float* dlogits, u64 rows,
    // u64 cols, float factor)`: sizes checked above, every label < cols.
    unsafe { b.launch(gpu.grid(n)) }.map_err(driver_err(OP))?;
    Ok(())
}

/// The fused head of a training step with a float32 softmax output: `probs = softmax(logits)`
/// (float32 math whatever `T`), the per-row from-probabilities losses into `loss` (`rows`
/// long), and `dlogits = scale * (probs - onehot(label)) / rows`, in one pass.
///
/// # Errors
/// [`Error::LengthMismatch`] naming `logits`, `labels`, `probs`, `loss` or `dlogits`.
#[allow(clippy::too_many_arguments)]
pub fn softmax_cross_entropy_fused<T: Element>(
    gpu: &Gpu,
    logits: &CudaBuf<T>,
    labels: &DeviceLabels,
    rows: usize,
    cols: usize,
    scale: f32,
    probs: &mut CudaBuf<f32>,
    loss: &mut CudaBuf<f32>,
    dlogits: &mut CudaBuf<f32>,
) -> Result<()> {
    const OP: &str = "cuda softmax_cross_entropy_fused";
    let n = matrix_len(OP, rows, cols)?;
    check_len(OP, "logits", logits.len(), n)?;
    check_device_labels(OP, labels, rows, cols)?;
    check_len(OP, "probs", probs.len(), n)?;
    check_len(OP, "loss", loss.len(), rows)?;
    check_len(OP, "dlogits", dlogits.len(), n)?;
    check_rows(OP, rows)?;
    gpu.check_buf(OP, logits)?;
    check_ordinal(OP, gpu, labels.ordinal)?;
    for b in [&*probs, &*loss, &*dlogits] {
        gpu.check_buf(OP, b)?;
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let f = gpu.function(entry!("softmax_xent", T::DTYPE))?;
    let (r, c, factor) = (rows as u64, cols as u64, grad_factor(scale, rows));
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(logits.slice())
        .arg(&labels.buf)
        .arg(probs.slice_mut())
        .arg(loss.slice_mut())
        .arg(dlogits.slice_mut())
        .arg(&r)
        .arg(&c)
        .arg(&factor);
    // SAFETY: `softmax_xent_<t>(const T* logits, const u32* labels, float* probs, float* loss,
    // float* dlogits, u64 rows, u64 cols, float factor)`: sizes checked above, labels < cols.
    unsafe { b.launch(rows_config(rows)) }.map_err(driver_err(OP))?;
    Ok(())
}

/// `x = x * s` in float32, rounded back to the element type ([`crate::Cpu::scale`]).
///
/// # Errors
/// [`Error::Cuda`] when the launch fails.
pub fn scale<T: Element>(gpu: &Gpu, x: &mut CudaBuf<T>, s: f32) -> Result<()> {
    const OP: &str = "cuda scale";
    gpu.check_buf(OP, x)?;
    if x.is_empty() {
        return Ok(());
    }
    let f = gpu.function(entry!("scale", T::DTYPE))?;
    let n = x.len() as u64;
    let cfg = gpu.grid(x.len());
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x.slice_mut()).arg(&n).arg(&s);
    // SAFETY: `scale_<t>(T* x, u64 n, float s)`, `n` elements.
    unsafe { b.launch(cfg) }.map_err(driver_err(OP))?;
    Ok(())
}

/// Sets `flag` when any element of `x` is NaN or infinite (it never clears it).
///
/// # Errors
/// [`Error::Cuda`] when the launch fails.
pub fn all_finite<T: Element>(gpu: &Gpu, x: &CudaBuf<T>, flag: &mut FiniteFlag) -> Result<()> {
    const OP: &str = "cuda all_finite";
    gpu.check_buf(OP, x)?;
    check_ordinal(OP, gpu, flag.ordinal)?;
    if x.is_empty() {
        return Ok(());
    }
    let f = gpu.function(entry!("all_finite", T::DTYPE))?;
    let n = x.len() as u64;
    let cfg = gpu.grid(x.len());
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x.slice()).arg(&n).arg(&mut flag.buf);
    // SAFETY: `all_finite_<t>(const T* x, u64 n, u32* flag)`: `n` elements, a one-element flag.
    unsafe { b.launch(cfg) }.map_err(driver_err(OP))?;
    Ok(())
}

/// The fused unscale + all-finite check of loss scaling ([`crate::Cpu::unscale_and_check`]):
/// `grads *= inv_scale`, and `flag` is set when any result is NaN or infinite. Call it for each
/// gradient of a step with the same flag; the optimizer updates then skip on the device.
///
/// # Errors
/// [`Error::Cuda`] when the launch fails.
pub fn unscale_and_check(
    gpu: &Gpu,
    grads: &mut CudaBuf<f32>,
    inv_scale: f32,
    flag: &mut FiniteFlag,
) -> Result<()> {
    const OP: &str = "cuda unscale_and_check";
    gpu.check_buf(OP, grads)?;
    check_ordinal(OP, gpu, flag.ordinal)?;
    if grads.is_empty() {
        return Ok(());
    }
    let f = gpu.function("unscale_check_f32")?;
    let n = grads.len() as u64;
    let cfg = gpu.grid(grads.len());
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(grads.slice_mut())
        .arg(&n)
        .arg(&inv_scale)
        .arg(&mut flag.buf);
    // SAFETY: `unscale_check_f32(float* g, u64 n, float inv_scale, u32* flag)`.
    unsafe { b.launch(cfg) }.map_err(driver_err(OP))?;
    Ok(())
}

/// The raw device address of a buffer, for kernels that take one buffer twice (in place).
fn raw_ptr<E: Element>(gpu: &Gpu, buf: &CudaBuf<E>) -> u64 {
    use cudarc::driver::DevicePtr;
    let (ptr, _sync) = buf.slice().device_ptr(gpu.stream());
    ptr
}

fn skip_ptr(gpu: &Gpu, skip: Option<&FiniteFlag>) -> u64 {
    use cudarc::driver::DevicePtr;
    skip.map_or(NULL, |f| f.buf.device_ptr(gpu.stream()).0)
}

fn check_var(
    op: &'static str,
    gpu: &Gpu,
    var: &CudaBuf<f32>,
    bufs: &[(&'static str, &CudaBuf<f32>)],
    skip: Option<&FiniteFlag>,
) -> Result<()> {
    gpu.check_buf(op, var)?;
    for (name, b) in bufs {
        check_len(op, name, b.len(), var.len())?;
        gpu.check_buf(op, b)?;
    }
    if let Some(f) = skip {
        check_ordinal(op, gpu, f.ordinal)?;
    }
    Ok(())
}

/// One SGD step on the device ([`crate::Cpu::sgd_update`], bit-identical). `momentum` is
/// required when `p.momentum != 0`. When `skip` is given and set, nothing is written.
///
/// # Errors
/// [`Error::LengthMismatch`] naming `grad` or `momentum`; [`Error::InvalidArgument`] when the
/// momentum buffer is missing.
pub fn sgd_update(
    gpu: &Gpu,
    var: &mut CudaBuf<f32>,
    grad: &CudaBuf<f32>,
    momentum: Option<&mut CudaBuf<f32>>,
    p: SgdParams,
    skip: Option<&FiniteFlag>,
) -> Result<()> {
    const OP: &str = "cuda sgd_update";
    let n = var.len() as u64;
    let skip = {
        let mut bufs = vec![("grad", grad)];
        if p.momentum != 0.0 {
            let m = momentum.as_deref().ok_or_else(|| Error::InvalidArgument {
                op: OP,
                what: "momentum buffer is required when p.momentum is not 0".into(),
            })?;
            bufs.push(("momentum", m));
        }
        check_var(OP, gpu, var, &bufs, skip)?;
        skip_ptr(gpu, skip)
    };
    if var.is_empty() {
        return Ok(());
    }
    let cfg = gpu.grid(var.len());
    match momentum {
        Some(m) if p.momentum != 0.0 => {
            let f = gpu.function("sgd_momentum_f32")?;
            let nesterov = i32::from(p.nesterov);
            let mut b = gpu.stream().launch_builder(&f);
            b.arg(var.slice_mut())
                .arg(grad.slice())
                .arg(m.slice_mut())
                .arg(&n)
                .arg(&p.lr)
                .arg(&p.momentum)
                .arg(&nesterov)
                .arg(&skip);
            // SAFETY: `sgd_momentum_f32(float* var, const float* g, float* m, u64 n, float lr,
            // float momentum, int nesterov, const u32* skip)`: three buffers of `n` elements,
            // `skip` null or a one-element flag.
            unsafe { b.launch(cfg) }.map_err(driver_err(OP))?;
        }
        _ => {
            let f = gpu.function("sgd_f32")?;
            let mut b = gpu.stream().launch_builder(&f);
            b.arg(var.slice_mut())
                .arg(grad.slice())
                .arg(&n)
                .arg(&p.lr)
                .arg(&skip);
            // SAFETY: `sgd_f32(float* var, const float* g, u64 n, float lr, const u32* skip)`.
            unsafe { b.launch(cfg) }.map_err(driver_err(OP))?;
        }
    }
    Ok(())
}

/// One RMSprop step on the device ([`crate::Cpu::rmsprop_update`], bit-identical).
/// `momentum` is required when `p.momentum > 0`. When `skip` is given and set, nothing is
/// written.
///
/// # Errors
/// [`Error::LengthMismatch`] naming `grad`, `velocity` or `momentum`;
/// [`Error::InvalidArgument`] when the momentum buffer is missing.
pub fn rmsprop_update(
    gpu: &Gpu,
    var: &mut CudaBuf<f32>,
    grad: &CudaBuf<f32>,
    velocity: &mut CudaBuf<f32>,
    momentum: Option<&mut CudaBuf<f32>>,
    p: RmspropParams,
    skip: Option<&FiniteFlag>,
) -> Result<()> {
    const OP: &str = "cuda rmsprop_update";
    let n = var.len() as u64;
    let skip = {
        let mut bufs = vec![("grad", grad), ("velocity", &*velocity)];
        if p.momentum > 0.0 {
            let m = momentum.as_deref().ok_or_else(|| Error::InvalidArgument {
                op: OP,
                what: "momentum buffer is required when p.momentum is above 0".into(),
            })?;
            bufs.push(("momentum", m));
        }
        check_var(OP, gpu, var, &bufs, skip)?;
        skip_ptr(gpu, skip)
    };
    if var.is_empty() {
        return Ok(());
    }
    let f = gpu.function("rmsprop_f32")?;
    let cfg = gpu.grid(var.len());
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(var.slice_mut())
        .arg(grad.slice())
        .arg(velocity.slice_mut());
    let mom = match momentum {
        Some(m) if p.momentum > 0.0 => Some(m),
        _ => None,
    };
    match mom {
        Some(m) => b.arg(m.slice_mut()),
        None => b.arg(&NULL),
    };
    b.arg(&n)
        .arg(&p.lr)
        .arg(&p.rho)
        .arg(&p.one_minus_rho)
        .arg(&p.momentum)
        .arg(&p.epsilon)
        .arg(&skip);
    // SAFETY: `rmsprop_f32(float* var, const float* g, float* v, float* mom, u64 n, float lr,
    // float rho, float one_minus_rho, float momentum, float epsilon, const u32* skip)`: buffers
    // of `n` elements (`mom` null when there is no momentum), `skip` null or a flag.
    unsafe { b.launch(cfg) }.map_err(driver_err(OP))?;
    Ok(())
}

/// One Adam step on the device ([`crate::Cpu::adam_update`], bit-identical). When `skip` is
/// given and set, nothing is written.
///
/// # Errors
/// [`Error::LengthMismatch`] naming `grad`, `m` or `v`.
pub fn adam_update(
    gpu: &Gpu,
    var: &mut CudaBuf<f32>,
    grad: &CudaBuf<f32>,
    m: &mut CudaBuf<f32>,
    v: &mut CudaBuf<f32>,
    p: AdamParams,
    skip: Option<&FiniteFlag>,
) -> Result<()> {
    const OP: &str = "cuda adam_update";
    let n = var.len() as u64;
    check_var(
        OP,
        gpu,
        var,
        &[("grad", grad), ("m", &*m), ("v", &*v)],
        skip,
    )?;
    let skip = skip_ptr(gpu, skip);
    if var.is_empty() {
        return Ok(());
    }
    let f = gpu.function("adam_f32")?;
    let cfg = gpu.grid(var.len());
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(var.slice_mut())
        .arg(grad.slice())
        .arg(m.slice_mut())
        .arg(v.slice_mut())
        .arg(&n)
        .arg(&p.alpha)
        .arg(&p.one_minus_beta1)
        .arg(&p.one_minus_beta2)
        .arg(&p.epsilon)
        .arg(&p.lr)
        .arg(&p.weight_decay)
        .arg(&skip);
    // SAFETY: `adam_f32(float* var, const float* g, float* m, float* v, u64 n, float alpha,
    // float one_minus_beta1, float one_minus_beta2, float epsilon, float lr, float weight_decay,
    // const u32* skip)`.
    unsafe { b.launch(cfg) }.map_err(driver_err(OP))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked_before_upload() {
        assert_eq!(to_u32("t", &[0u8, 9, 3], 10).unwrap(), vec![0, 9, 3]);
        let err = to_u32("t", &[0i64, -1], 10).unwrap_err().to_string();
        assert!(
            err.contains("labels[1] = -1 is out of range for 10 classes"),
            "{err}"
        );
        let err = to_u32("t", &[10u32], 10).unwrap_err().to_string();
        assert!(err.contains("labels[0] = 10"), "{err}");
    }

    #[test]
    fn launch_shapes() {
        assert_eq!(rows_config(8192).grid_dim.0, 1024);
        assert_eq!(rows_config(1).grid_dim.0, 1);
        assert_eq!(rows_config(0).grid_dim.0, 1);
        assert!(check_rows("t", 1000).is_ok());
        assert!(check_rows("t", usize::MAX).is_err());
        assert_eq!(grad_factor(1.0, 4), 0.25);
        assert_eq!(grad_factor(32768.0, 8192), 4.0);
    }
}
