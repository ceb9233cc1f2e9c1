//! Convolution and pooling over NHWC images (channels last, as Keras): the geometry of a 2-D
//! window (size, strides, dilation, padding), the im2col / col2im pair that turns a convolution
//! into one GEMM, and max and average pooling, forward and backward.
//!
//! A convolution of `x` `[n, h, w, c]` with a kernel `[kh, kw, c, f]` (Keras's layout) is the
//! GEMM `y[n·oh·ow, f] = cols[n·oh·ow, kh·kw·c] · kernel[kh·kw·c, f]`, where row `(b, i, j)` of
//! `cols` ([`crate::Cpu::im2col`]) holds the input patch under output pixel `(i, j)` of image
//! `b`, zero where the patch lies in the padding. Its input gradient is
//! [`crate::Cpu::col2im`] of `dy · kernelᵀ` (every patch value added back where it came from,
//! in float32), its kernel gradient `colsᵀ · dy`. The GEMMs run on the measured paths of
//! [`crate::gemm`].
//!
//! Where the path has implicit-GEMM tiles (the AVX-512 float32 family), the forward convolution and the stride-1 input gradient (itself a convolution)
//! skip the im2col matrix: each kernel thread copies a few of its images into a zero-padded
//! float32 buffer and the tiles read every patch where it lies there, with the same float32 sums
//! in the same order (the same bits). The kernel gradient does the same where the channels are
//! a multiple of 16 and the filters of 8: its tiles (8 filters x 48 patch entries) sum each
//! thread's pixels in order from the padded copy and `dy`, where the GEMM packed an im2col
//! matrix. `MP_CONV_IMPLICIT=0` turns both off.
//!
//! The kernels are methods of [`crate::Cpu`] ([`crate::Cpu::im2col`], ...); tensors reach them
//! through [`crate::ops`].
//!
//! Work is split across the kernel threads by whole images, so every sum is taken in the same
//! order whatever the thread count: results are bit-identical run to run.

use std::ops::Range;

use mp_core::Element;

use crate::error::{Error, Result};
use crate::gemm::{
    self, Block16, ConvKernel, Gemm, GemmInput, GemmOutput, GemmPath, GemmPaths, MatMut, MatRef,
    gemm_views,
};
use crate::isa::Isa;
use crate::norm;
use crate::threads;

/// How a window meets the border (Keras's `padding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Padding {
    /// No padding: only windows that fit inside the input (`out = (in - span) / stride + 1`).
    #[default]
    Valid,
    /// Zero padding (for pooling: positions that are ignored) so that `out = ceil(in /
    /// stride)`, split as TensorFlow does: the odd one at the bottom and right.
    Same,
}

impl Padding {
    /// `valid` or `same`.
    pub fn name(self) -> &'static str {
        match self {
            Padding::Valid => "valid",
            Padding::Same => "same",
        }
    }
}

/// A 2-D window: size, strides, dilation and padding, each `[rows, cols]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    /// The window's size (the kernel size, or the pool size).
    pub size: [usize; 2],
    /// The step between windows.
    pub strides: [usize; 2],
    /// The step between the window's taps (1: contiguous).
    pub dilation: [usize; 2],
    /// How the window meets the border.
    pub padding: Padding,
}

impl Window {
    /// A `size` window with strides and dilation 1, `valid` padding.
    pub fn new(size: [usize; 2]) -> Window {
        Window {
            size,
            strides: [1, 1],
            dilation: [1, 1],
            padding: Padding::Valid,
        }
    }

    /// With these strides.
    pub fn strides(self, strides: [usize; 2]) -> Window {
        Window { strides, ..self }
    }

    /// With this dilation.
    pub fn dilation(self, dilation: [usize; 2]) -> Window {
        Window { dilation, ..self }
    }

    /// With this padding.
    pub fn padding(self, padding: Padding) -> Window {
        Window { padding, ..self }
    }
}

/// A window over a batch of NHWC images: the input and output sizes and where the window's
/// taps fall. Made by [`Geometry::new`], which checks everything; every kernel of this module
/// takes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Images in the batch.
    pub batch: usize,
    /// Input `[height, width]`.
    pub input: [usize; 2],
    /// Channels (of the input; pooling keeps them).
    pub channels: usize,
    /// The window.
    pub window: Window,
    /// Padding before the first row and column (`[top, left]`).
    pub pad: [usize; 2],
    /// Output `[height, width]`.
    pub output: [usize; 2],
}

impl Geometry {
    /// The geometry of `window` over `[batch, height, width, channels]` images; `op` names the
    /// caller in errors.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `op` for a zero size, stride or dilation, for a window
    /// whose span (`(size - 1) * dilation + 1`) exceeds the (padded) input, and for sizes whose
    /// element counts overflow.
    pub fn new(op: &'static str, input: [usize; 4], window: Window) -> Result<Geometry> {
        let [batch, h, w, channels] = input;
        let invalid = |what: String| Error::InvalidArgument { op, what };
        for (name, v) in [
            ("size", window.size),
            ("strides", window.strides),
            ("dilation", window.dilation),
        ] {
            if v.contains(&0) {
                return Err(invalid(format!(
                    "window {name} {v:?}: every value must be at least 1"
                )));
            }
        }
        let mut pad = [0; 2];
        let mut output = [0; 2];
        for d in 0..2 {
            let extent = [h, w][d];
            let span = (window.size[d] - 1)
                .checked_mul(window.dilation[d])
                .and_then(|s| s.checked_add(1))
                .ok_or_else(|| invalid(format!("window span overflows: {window:?}")))?;
            let stride = window.strides[d];
            match window.padding {
                Padding::Valid => {
                    if span > extent {
                        return Err(invalid(format!(
                            "a window spanning {span} (size {:?}, dilation {:?}) does not fit \
                             the input {:?} [height, width] with padding valid",
                            window.size,
                            window.dilation,
                            [h, w]
                        )));
                    }
                    output[d] = (extent - span) / stride + 1;
                }
                Padding::Same => {
                    if extent == 0 {
                        return Err(invalid(format!(
                            "the input {:?} [height, width] is empty",
                            [h, w]
                        )));
                    }
                    output[d] = extent.div_ceil(stride);
                    let needed = (output[d] - 1) * stride + span;
                    pad[d] = needed.saturating_sub(extent) / 2;
                }
            }
        }
        let g = Geometry {
            batch,
            input: [h, w],
            channels,
            window,
            pad,
            output,
        };
        // Every length the kernels compute must fit.
        let lens = [
            [batch, h, w, channels]
                .iter()
                .try_fold(1usize, |a, &b| a.checked_mul(b)),
            [batch, output[0], output[1], channels]
                .iter()
                .try_fold(1usize, |a, &b| a.checked_mul(b)),
            g.pixels()
                .checked_mul(window.size[0] * window.size[1])
                .and_then(|p| p.checked_mul(channels)),
        ];
        if lens.iter().any(Option::is_none) {
            return Err(invalid(format!(
                "the sizes overflow: input {input:?}, window {window:?}"
            )));
        }
        Ok(g)
    }

    /// Output pixels in the batch: `batch * out_h * out_w`, the GEMM's rows.
    pub fn pixels(&self) -> usize {
        self.batch
            .saturating_mul(self.output[0])
            .saturating_mul(self.output[1])
    }

    /// The input's element count, `batch * h * w * channels`.
    pub fn input_len(&self) -> usize {
        self.batch * self.input[0] * self.input[1] * self.channels
    }

    /// The pooled output's element count, `batch * out_h * out_w * channels`.
    pub fn output_len(&self) -> usize {
        self.pixels() * self.channels
    }

    /// One patch's length, `size_h * size_w * channels`: the GEMM's depth.
    pub fn patch_len(&self) -> usize {
        self.window.size[0] * self.window.size[1] * self.channels
    }

    /// The im2col matrix's element count, `pixels * patch_len`.
    pub fn cols_len(&self) -> usize {
        self.pixels() * self.patch_len()
    }

    /// Whether the convolution is a plain GEMM on the input (a 1×1 window, stride 1, no
    /// padding): then `cols` is the input itself.
    pub fn is_pointwise(&self) -> bool {
        self.window.size == [1, 1] && self.window.strides == [1, 1] && self.pad == [0, 0]
    }

    /// The input position of tap `k` (along axis `d`) of the window at output position `o`, if
    /// it is inside the input.
    #[inline]
    fn tap(&self, d: usize, o: usize, k: usize) -> Option<usize> {
        let p =
            (o * self.window.strides[d] + k * self.window.dilation[d]).checked_sub(self.pad[d])?;
        (p < self.input[d]).then_some(p)
    }

    /// The input element count of one image.
    fn image_len(&self) -> usize {
        self.input[0] * self.input[1] * self.channels
    }
}

/// Pooling windows are contiguous (Keras's pooling layers have no dilation), which also keeps
/// every window touching the input.
fn check_pool(op: &'static str, g: &Geometry) -> Result<()> {
    if g.window.dilation == [1, 1] {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            op,
            what: format!(
                "pooling windows have no dilation, got {:?}",
                g.window.dilation
            ),
        })
    }
}

fn check_len(op: &'static str, what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            op,
            what,
            expected,
            got,
        })
    }
}

/// Whether work over `batch` images of `len` elements in all is worth the kernel threads.
fn parallel(batch: usize, len: usize) -> bool {
    threads::num_threads() > 1 && batch > 1 && len >= 1 << 14
}

/// Runs `f(image, part)` for every image, `out` split in `per` elements an image, on the
/// kernel threads (one image a task) when that pays.
fn per_image<A: Send>(out: &mut [A], per: usize, f: impl Fn(usize, &mut [A]) + Sync) {
    if per == 0 {
        return;
    }
    if parallel(out.len() / per, out.len()) {
        threads::pool().chunks_mut(out, per, f);
    } else {
        out.chunks_mut(per).enumerate().for_each(|(i, a)| f(i, a));
    }
}

/// [`per_image`] over two outputs split alike.
fn per_image2<A: Send, B: Send>(
    a: &mut [A],
    b: &mut [B],
    per: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    if per == 0 {
        return;
    }
    if parallel(a.len() / per, a.len()) {
        threads::pool().chunks_mut2((a, per), (b, per), f);
    } else {
        for (i, (a, b)) in a.chunks_mut(per).zip(b.chunks_mut(per)).enumerate() {
            f(i, a, b);
        }
    }
}

/// Bytes of patches (im2col rows, or their gradient) a convolution forms at a time: whole
/// images, as many as fit, so the temporaries stay this size whatever the batch (a batch of 256
/// 28x28x64 images would otherwise need 0.9 GiB of float32 patch gradients).
const CHUNK_BYTES: usize = 8 << 20;

/// The same for one kernel thread working alone on its images ([`thread_parts`]): about what
/// its share of a 1 MiB L2 holds beside the GEMM's packed panels, so the patches it writes are
/// still in its cache when its GEMM reads them.
const THREAD_CHUNK_BYTES: usize = 1 << 20;

/// Images per chunk for patches of `elem` bytes each (at least one), for the threads together
/// or, `serial`, for one thread alone.
fn images_per_chunk(g: &Geometry, elem: usize, serial: bool) -> usize {
    let per_image = g.output[0] * g.output[1] * g.patch_len() * elem;
    let budget = if serial {
        THREAD_CHUNK_BYTES
    } else {
        CHUNK_BYTES
    };
    (budget / per_image.max(1)).clamp(1, g.batch.max(1))
}

/// Contiguous ranges of a batch of `batch` images, one per kernel thread, when the batch has
/// enough images that each thread working alone on its own beats the threads sharing every
/// GEMM: at least 4 per thread (a fixed partition for a thread count, so results stay
/// bit-identical run to run).
fn thread_parts(batch: usize) -> Option<Vec<Range<usize>>> {
    let threads = threads::num_threads();
    (threads > 1 && batch >= 4 * threads).then(|| threads::static_ranges(batch, threads, 1))
}

/// The geometry of images `b0..b0 + n` of `g`'s batch.
fn chunk(g: &Geometry, n: usize) -> Geometry {
    Geometry { batch: n, ..*g }
}

/// `y = epilogue(patches(x) · kernel)`: a convolution, `kernel` `[patch_len, filters]`
/// row-major, `y` `[pixels, filters]`. The patches are formed a chunk of images at a time (a
/// 1x1 stride-1 convolution uses `x` itself).
///
/// # Errors
/// [`Error::LengthMismatch`] naming `x`, `kernel` or `y`; the GEMM's errors.
pub(crate) fn conv2d<T: GemmInput, O: GemmOutput>(
    paths: GemmPaths,
    g: &Geometry,
    x: &[T],
    kernel: &[T],
    filters: usize,
    y: &mut [O],
    gemm: Gemm<'_>,
) -> Result<()> {
    conv2d_with(paths, g, x, kernel, filters, y, gemm, implicit_enabled()?)
}

/// Whether the convolutions may take the implicit-GEMM tiles: `MP_CONV_IMPLICIT=0` turns them
/// off, to compare the two forms of the same convolution ([`crate::switch_knob`]).
fn implicit_enabled() -> Result<bool> {
    static ON: std::sync::OnceLock<std::result::Result<bool, String>> = std::sync::OnceLock::new();
    crate::switch_knob("MP_CONV_IMPLICIT", &ON)
}

/// [`conv2d`], on the implicit-GEMM tiles where they apply when `implicit`, else always on the
/// im2col matrix (what the tests compare the tiles with).
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d_with<T: GemmInput, O: GemmOutput>(
    paths: GemmPaths,
    g: &Geometry,
    x: &[T],
    kernel: &[T],
    filters: usize,
    y: &mut [O],
    gemm: Gemm<'_>,
    implicit: bool,
) -> Result<()> {
    const OP: &str = "conv2d";
    check_len(OP, "x", x.len(), g.input_len())?;
    check_len(OP, "kernel", kernel.len(), g.patch_len() * filters)?;
    check_len(OP, "y", y.len(), g.pixels() * filters)?;
    let w = MatRef::new(kernel, g.patch_len(), filters);
    if g.is_pointwise() {
        return gemm_views(
            paths.get(T::DTYPE),
            MatRef::new(x, g.pixels(), g.channels),
            w,
            MatMut::new(y, g.pixels(), filters),
            gemm,
        );
    }
    let path = paths.get(T::DTYPE);
    if implicit && conv2d_implicit(path, g, x, kernel, filters, y, gemm)? {
        return Ok(());
    }
    let pix = g.output[0] * g.output[1];
    // Images `images` into their rows of `y` (`out`), a chunk of images at a time.
    let run = |images: Range<usize>, out: &mut [O], serial: bool| -> Result<()> {
        let per = images_per_chunk(g, std::mem::size_of::<T>(), serial);
        let mut cols = vec![T::ZERO; per.min(images.len()) * pix * g.patch_len()];
        for b0 in images.clone().step_by(per) {
            let n = per.min(images.end - b0);
            let c = chunk(g, n);
            let cols = &mut cols[..c.cols_len()];
            im2col(&c, &x[b0 * g.image_len()..(b0 + n) * g.image_len()], cols)?;
            let at = (b0 - images.start) * pix * filters;
            gemm_views(
                path,
                MatRef::new(cols, c.pixels(), g.patch_len()),
                w,
                MatMut::new(&mut out[at..at + n * pix * filters], c.pixels(), filters),
                gemm,
            )?;
        }
        Ok(())
    };
    let Some(parts) = thread_parts(g.batch) else {
        return run(0..g.batch, y, false);
    };
    let mut slices = Vec::with_capacity(parts.len());
    let mut rest = y;
    for r in parts {
        let (mine, others) = rest.split_at_mut(r.len() * pix * filters);
        slices.push((r, mine));
        rest = others;
    }
    threads::pool()
        .map_chunks_mut(&mut slices, 1, |_, s| {
            let (r, out) = &mut s[0];
            threads::serial(|| run(r.clone(), out, true))
        })
        .into_iter()
        .collect()
}

/// Bytes of zero-padded float32 images one kernel thread keeps for the implicit-GEMM tiles:
/// about a third of a 2 MiB L2, beside the packed kernel the tiles stream.
const PADDED_CHUNK_BYTES: usize = 512 << 10;

/// The split of a batch over the kernel threads for the implicit-GEMM tiles: images split over
/// the threads ([`thread_parts`]), or all of them on a single thread; `None` for a batch too
/// small to split, which is left to the threads sharing each GEMM of the im2col path.
fn implicit_parts(batch: usize) -> Option<Vec<Range<usize>>> {
    match thread_parts(batch) {
        Some(parts) => Some(parts),
        None if threads::num_threads() == 1 => Some(std::iter::once(0..batch).collect()),
        None => None,
    }
}

/// A zero-padded float32 copy of a few images at a time, what the implicit-GEMM tiles read:
/// its border holds every tap that falls in the padding, so that tap `(ki, kj)` of output pixel
/// `(b, i, j)` starts at one fixed offset (`taps`) from the pixel's base (`bases`).
struct PaddedImages {
    /// Padded rows and columns: every tap of every output pixel is inside.
    hp: usize,
    wp: usize,
    /// Images per copy.
    per: usize,
    /// The offset of each tap from its pixel's base, in elements, taps in patch order.
    taps: Vec<usize>,
    /// `per` padded images, 64-byte aligned (with channels a multiple of 16, every tap's
    /// vectors are whole cache lines); the border stays zero (only the interior is written).
    xp: Vec<Block16>,
    /// The base of each output pixel of the loaded images, in pixel order.
    bases: Vec<*const f32>,
}

impl PaddedImages {
    /// Room for as many images (at most `most`, at least one) as fit `budget` bytes together
    /// with `extra` bytes per image that the caller keeps beside them.
    fn new(g: &Geometry, budget: usize, extra: usize, most: usize) -> PaddedImages {
        let [kh, kw] = g.window.size;
        let [sh, sw] = g.window.strides;
        let [dh, dw] = g.window.dilation;
        let [oh, ow] = g.output;
        let hp = (g.input[0] + g.pad[0]).max((oh - 1) * sh + (kh - 1) * dh + 1);
        let wp = (g.input[1] + g.pad[1]).max((ow - 1) * sw + (kw - 1) * dw + 1);
        let padded = hp * wp * g.channels;
        let per = (budget / (padded * 4 + extra)).clamp(1, most.max(1));
        let taps = (0..kh)
            .flat_map(|ki| (0..kw).map(move |kj| (ki * dh * wp + kj * dw) * g.channels))
            .collect();
        PaddedImages {
            hp,
            wp,
            per,
            taps,
            xp: vec![Block16([0.0; 16]); (per * padded).div_ceil(16)],
            bases: Vec::with_capacity(per * oh * ow),
        }
    }

    /// Copies images `b0..b0 + n` (`n <= per`) of `x`, widened to float32, and sets the bases of
    /// their output pixels. Afterwards every base plus every tap offset starts `channels`
    /// elements inside the copy: the last element a tile reads, tap `(kh - 1, kw - 1)` of pixel
    /// `(b, oh - 1, ow - 1)` plus `channels - 1`, is at most `(b + 1) hp wp channels - 1`.
    fn load<T: Element>(&mut self, g: &Geometry, x: &[T], b0: usize, n: usize) {
        debug_assert!(n <= self.per);
        let (hp, wp, ch) = (self.hp, self.wp, g.channels);
        let w = g.input[1];
        let isa = Isa::detect();
        for b in 0..n {
            let src = &x[(b0 + b) * g.image_len()..][..g.image_len()];
            for (ih, row) in src.chunks_exact(w * ch).enumerate() {
                let at = ((b * hp + ih + g.pad[0]) * wp + g.pad[1]) * ch;
                norm::convert(
                    isa,
                    row,
                    &mut Block16::floats_mut(&mut self.xp)[at..at + w * ch],
                );
            }
        }
        let base: *const f32 = self.xp.as_ptr().cast();
        let [sh, sw] = g.window.strides;
        let [oh, ow] = g.output;
        self.bases.clear();
        for b in 0..n {
            for i in 0..oh {
                let row = (b * hp + i * sh) * wp;
                self.bases
                    .extend((0..ow).map(|j| base.wrapping_add((row + j * sw) * ch)));
            }
        }
    }
}

/// [`conv2d`] without an im2col matrix, where the path has implicit-GEMM tiles
/// ([`ConvKernel`]; each tap is a run of `channels` steps, one for a one-channel first layer,
/// which still beats forming its im2col matrix) and the batch
/// splits over the kernel threads by images ([`thread_parts`]); `Ok(false)` (nothing written)
/// where it does not apply.
///
/// Each thread copies a few of its images at a time, widened to float32, into a zero-padded
/// buffer whose border holds every tap that falls in the padding, so that tap `(ki, kj)` of
/// output pixel `(b, i, j)` starts at one fixed offset from the pixel's base: the tiles read
/// the patches there, as many pixels to a tile as the tile has rows (across image rows and
/// images). The same float32 chain per element as the GEMM on the im2col matrix: the same bits.
fn conv2d_implicit<T: GemmInput, O: GemmOutput>(
    path: GemmPath,
    g: &Geometry,
    x: &[T],
    kernel: &[T],
    filters: usize,
    y: &mut [O],
    gemm: Gemm<'_>,
) -> Result<bool> {
    let Some(parts) = implicit_parts(g.batch) else {
        return Ok(false);
    };
    let Some(packed) = ConvKernel::pack(path, kernel, g.patch_len(), filters) else {
        return Ok(false);
    };
    let pix = g.output[0] * g.output[1];
    let run = |images: Range<usize>, out: &mut [O]| -> Result<()> {
        let mut pad = PaddedImages::new(g, PADDED_CHUNK_BYTES, 0, images.len());
        for b0 in images.clone().step_by(pad.per) {
            let n = pad.per.min(images.end - b0);
            pad.load(g, x, b0, n);
            let at = (b0 - images.start) * pix * filters;
            // SAFETY: `load` made every base plus every tap offset start `channels` elements
            // inside the padded copy.
            unsafe {
                packed.rows(
                    &pad.bases,
                    &pad.taps,
                    g.channels,
                    &mut out[at..at + n * pix * filters],
                    gemm,
                )?
            };
        }
        Ok(())
    };
    let mut slices = Vec::with_capacity(parts.len());
    let mut rest = y;
    for r in parts {
        let (mine, others) = rest.split_at_mut(r.len() * pix * filters);
        slices.push((r, mine));
        rest = others;
    }
    threads::pool()
        .map_chunks_mut(&mut slices, 1, |_, s| {
            let (r, out) = &mut s[0];
            threads::serial(|| run(r.clone(), out))
        })
        .into_iter()
        .collect::<Result<()>>()?;
    Ok(true)
}

/// The input gradient of [`conv2d`], written in `O` (rounded once from float32 sums).
///
/// A stride-1 convolution's input gradient is itself a stride-1 convolution: of `dy` with the
/// kernel flipped in space and its channel axes swapped ([`transposed`]). That path forms
/// patches of `dy` and lets the GEMM write `dx` from its float32 accumulators, with no float32
/// `dx` and no scatter. Strided convolutions form the patch gradients `dy · kernelᵀ` in float32
/// and sum them back with [`col2im`], a chunk of images at a time.
///
/// # Errors
/// [`Error::LengthMismatch`] naming `dy`, `kernel` or `dx`; the GEMM's errors.
pub(crate) fn conv2d_backward_input<T: GemmInput, O: GemmOutput>(
    paths: GemmPaths,
    g: &Geometry,
    dy: &[T],
    kernel: &[T],
    filters: usize,
    dx: &mut [O],
) -> Result<()> {
    const OP: &str = "conv2d_backward_input";
    check_len(OP, "dy", dy.len(), g.pixels() * filters)?;
    check_len(OP, "kernel", kernel.len(), g.patch_len() * filters)?;
    check_len(OP, "dx", dx.len(), g.input_len())?;
    let path = paths.get(T::DTYPE);
    if g.is_pointwise() {
        return gemm_views(
            path,
            MatRef::new(dy, g.pixels(), filters),
            MatRef::new(kernel, g.patch_len(), filters).t(),
            MatMut::new(dx, g.pixels(), g.channels),
            Gemm::new(),
        );
    }
    if g.window.strides == [1, 1] {
        let (gt, flipped) = transposed(g, kernel, filters);
        return conv2d(paths, &gt, dy, &flipped, g.channels, dx, Gemm::new());
    }
    let wt = MatRef::new(kernel, g.patch_len(), filters).t();
    let per = images_per_chunk(g, 4, false);
    let pix = g.output[0] * g.output[1];
    let mut dcols = vec![0.0f32; per * pix * g.patch_len()];
    let mut sums = vec![0.0f32; per * g.image_len()];
    for b0 in (0..g.batch).step_by(per) {
        let n = per.min(g.batch - b0);
        let c = chunk(g, n);
        let dcols = &mut dcols[..c.cols_len()];
        gemm_views(
            path,
            MatRef::new(
                &dy[b0 * pix * filters..(b0 + n) * pix * filters],
                c.pixels(),
                filters,
            ),
            wt,
            MatMut::new(dcols, c.pixels(), g.patch_len()),
            Gemm::new(),
        )?;
        let sums = &mut sums[..n * g.image_len()];
        col2im(&c, dcols, sums)?;
        for (d, s) in dx[b0 * g.image_len()..(b0 + n) * g.image_len()]
            .iter_mut()
            .zip(sums.iter())
        {
            *d = O::from_f32(*s);
        }
    }
    Ok(())
}

/// The stride-1 convolution whose output is the input gradient of `g` (stride 1): its input is
/// `dy` (`[batch, out_h, out_w, filters]`), its output `dx`'s `[h, w]`, the same window size and
/// dilation, padded by `(size - 1) * dilation - pad` before, and its kernel `[size_h * size_w *
/// filters, channels]` holds `kernel` with the taps reversed and the channel axes swapped.
fn transposed<T: Element>(g: &Geometry, kernel: &[T], filters: usize) -> (Geometry, Vec<T>) {
    let [kh, kw] = g.window.size;
    let [dh, dw] = g.window.dilation;
    let c = g.channels;
    let gt = Geometry {
        batch: g.batch,
        input: g.output,
        channels: filters,
        window: Window::new(g.window.size).dilation(g.window.dilation),
        // Stride-1 padding never exceeds the window's span less one (see `Geometry::new`).
        pad: [(kh - 1) * dh - g.pad[0], (kw - 1) * dw - g.pad[1]],
        output: g.input,
    };
    let mut flipped = vec![T::ZERO; kernel.len()];
    for ki in 0..kh {
        for kj in 0..kw {
            let src_tap = (kh - 1 - ki) * kw + (kw - 1 - kj);
            let dst_tap = ki * kw + kj;
            for ch in 0..c {
                for f in 0..filters {
                    flipped[(dst_tap * filters + f) * c + ch] =
                        kernel[(src_tap * c + ch) * filters + f];
                }
            }
        }
    }
    (gt, flipped)
}

/// The longest patch whose kernel gradient is computed as `patchesᵀ · dy` (patch entries as
/// the GEMM's rows) rather than `dyᵀ · patches`: 256x28x28x1 -> 32 (a patch of 9) took 6.6 ms
/// the second way on the Xeon, most of it transposing `dy` into packed A.
const SHORT_PATCH: usize = 16;

/// The kernel gradient of [`conv2d`]: `dw += patches(x)ᵀ · dy` in float32 (`dw` `[patch_len,
/// filters]`), the patches formed a chunk of images at a time, chunks added in order.
///
/// # Errors
/// [`Error::LengthMismatch`] naming `x`, `dy` or `dw`; the GEMM's errors.
pub(crate) fn conv2d_backward_kernel<T: GemmInput>(
    paths: GemmPaths,
    g: &Geometry,
    x: &[T],
    dy: &[T],
    filters: usize,
    dw: &mut [f32],
) -> Result<()> {
    const OP: &str = "conv2d_backward_kernel";
    check_len(OP, "x", x.len(), g.input_len())?;
    check_len(OP, "dy", dy.len(), g.pixels() * filters)?;
    check_len(OP, "dw", dw.len(), g.patch_len() * filters)?;
    let acc = Gemm::new().accumulate();
    if g.is_pointwise() {
        let xs = MatRef::new(x, g.pixels(), g.channels).t();
        return gemm_views(
            paths.get(T::DTYPE),
            xs,
            MatRef::new(dy, g.pixels(), filters),
            MatMut::new(dw, g.patch_len(), filters),
            acc,
        );
    }
    // Each kernel thread takes a contiguous range of images and sums its own dwᵀ = dyᵀ ·
    // patches over them, a few images at a time, so that the patches it forms stay in its
    // cache while its (single-threaded) GEMM packs them as B, along the depth (the pixels),
    // from their rows as they are. The threads' sums are added in thread order.
    let patch = g.patch_len();
    let pix = g.output[0] * g.output[1];
    // A patch shorter than one tile of rows (a first layer's 3x3 window on one channel): the
    // patch entries are the GEMM's rows and the filters its columns.
    let short_patch = patch <= SHORT_PATCH;
    let part = |images: Range<usize>, serial: bool| -> Result<Vec<f32>> {
        let per = images_per_chunk(g, std::mem::size_of::<T>(), serial);
        let mut cols = vec![T::ZERO; per.min(images.len()) * pix * patch];
        let mut dwt = vec![0.0f32; filters * patch];
        for b0 in images.clone().step_by(per) {
            let n = per.min(images.end - b0);
            let c = chunk(g, n);
            let cols = &mut cols[..c.cols_len()];
            im2col(&c, &x[b0 * g.image_len()..(b0 + n) * g.image_len()], cols)?;
            let dy = MatRef::new(
                &dy[b0 * pix * filters..(b0 + n) * pix * filters],
                c.pixels(),
                filters,
            );
            let cols = MatRef::new(cols, c.pixels(), patch);
            if short_patch {
                // dw = patchesᵀ · dy: the short patch is the tile's rows, dy packs as B in
                // the order it is stored (transposing it as A cost more than the products).
                let dw = MatMut::new(&mut dwt, patch, filters);
                gemm_views(paths.get(T::DTYPE), cols.t(), dy, dw, acc)?;
            } else {
                let dw = MatMut::new(&mut dwt, filters, patch);
                gemm_views(paths.get(T::DTYPE), dy.t(), cols, dw, acc)?;
            }
        }
        if short_patch {
            // Back to [filters, patch], what the threads' sums are added from.
            let mut t = vec![0.0f32; filters * patch];
            for (e, row) in dwt.chunks_exact(filters).enumerate() {
                for (f, v) in row.iter().enumerate() {
                    t[f * patch + e] = *v;
                }
            }
            dwt = t;
        }
        Ok(dwt)
    };
    let path = paths.get(T::DTYPE);
    let implicit = implicit_enabled()?
        && gemm::conv_kernel_grad_supported(path, g.channels, filters)
        && g.patch_len() <= IMPLICIT_MAX_PATCH;
    let sums: Vec<Result<Vec<f32>>> = match (implicit_parts(g.batch), thread_parts(g.batch)) {
        (Some(parts), _) if implicit => threads::pool().map(parts.len(), |i| {
            threads::serial(|| {
                Ok(kernel_grad_implicit(
                    path,
                    g,
                    x,
                    dy,
                    filters,
                    parts[i].clone(),
                ))
            })
        }),
        (_, None) => vec![part(0..g.batch, false)],
        (_, Some(parts)) => threads::pool().map(parts.len(), |i| {
            threads::serial(|| part(parts[i].clone(), true))
        }),
    };
    for dwt in sums {
        let dwt = dwt?;
        for (e, row) in dw.chunks_exact_mut(filters).enumerate() {
            for (f, d) in row.iter_mut().enumerate() {
                *d += dwt[f * patch + e];
            }
        }
    }
    Ok(())
}

/// The deepest patch the implicit kernel-gradient tiles take: their B vectors are read from the
/// padded images, and a patch longer than this is left to im2col and the GEMM.
const IMPLICIT_MAX_PATCH: usize = 4608;

/// Bytes of padded images and of their `dy` rows one kernel thread keeps for the implicit
/// kernel gradient: every tile of the gradient passes over them, so they stay in its L2.
const GRAD_CHUNK_BYTES: usize = 768 << 10;

/// One kernel thread's share of [`conv2d_backward_kernel`] on the implicit-GEMM tiles: `dwᵀ`
/// (`[filters, patch_len]`) summed over images `images`, pixel after pixel, from a padded copy
/// of a few images at a time ([`PaddedImages`]) and their rows of `dy` (widened to float32).
fn kernel_grad_implicit<T: GemmInput>(
    path: GemmPath,
    g: &Geometry,
    x: &[T],
    dy: &[T],
    filters: usize,
    images: Range<usize>,
) -> Vec<f32> {
    let pix = g.output[0] * g.output[1];
    let per_image_dy = pix * filters;
    let mut pad = PaddedImages::new(g, GRAD_CHUNK_BYTES, per_image_dy * 4, images.len());
    let mut dwt = vec![0.0f32; filters * g.patch_len()];
    let mut wide = vec![
        0.0f32;
        if norm::as_f32(dy).is_some() {
            0
        } else {
            pad.per * per_image_dy
        }
    ];
    let isa = Isa::detect();
    for (i, b0) in images.clone().step_by(pad.per).enumerate() {
        let n = pad.per.min(images.end - b0);
        pad.load(g, x, b0, n);
        let rows = &dy[b0 * per_image_dy..(b0 + n) * per_image_dy];
        let rows: &[f32] = match norm::as_f32(rows) {
            Some(rows) => rows,
            None => {
                let w = &mut wide[..rows.len()];
                norm::convert(isa, rows, w);
                w
            }
        };
        // SAFETY: the caller checked `conv_kernel_grad_supported`; `load` made every base plus
        // every tap offset start `channels` elements inside the padded copy.
        unsafe {
            gemm::conv_kernel_grad_rows(
                path,
                &pad.bases,
                &pad.taps,
                g.channels,
                rows,
                filters,
                i == 0,
                &mut dwt,
            )
        };
    }
    dwt
}

/// Writes the im2col matrix of `x` (`[batch, h, w, channels]`) into `cols`
/// (`[pixels, patch_len]`, row-major): row `(b, i, j)`, column `(ki, kj, c)` holds
/// `x[b, i·sh + ki·dh - pad_top, j·sw + kj·dw - pad_left, c]`, zero in the padding.
///
/// # Errors
/// [`Error::LengthMismatch`] naming `x` or `cols`; nothing is written then.
pub(crate) fn im2col<T: Element>(g: &Geometry, x: &[T], cols: &mut [T]) -> Result<()> {
    const OP: &str = "im2col";
    check_len(OP, "x", x.len(), g.input_len())?;
    check_len(OP, "cols", cols.len(), g.cols_len())?;
    let c = g.channels;
    let [kh, kw] = g.window.size;
    let [oh, ow] = g.output;
    let row_len = g.patch_len();
    let per = oh * ow * row_len;
    per_image(cols, per, |b, out| {
        let image = &x[b * g.image_len()..(b + 1) * g.image_len()];
        for i in 0..oh {
            for j in 0..ow {
                let row = &mut out[(i * ow + j) * row_len..][..row_len];
                // The window's taps along a row are contiguous in the input when they are
                // adjacent (no dilation) and all inside it: one copy for the row of taps.
                let first = g.tap(1, j, 0);
                let whole = g.window.dilation[1] == 1
                    && first.is_some_and(|iw| iw + kw <= g.input[1])
                    && g.tap(1, j, kw - 1).is_some();
                for ki in 0..kh {
                    let ih = g.tap(0, i, ki);
                    let taps = &mut row[ki * kw * c..][..kw * c];
                    match (ih, first) {
                        (None, _) => taps.fill(T::ZERO),
                        (Some(ih), Some(iw)) if whole => {
                            copy_run(taps, &image[(ih * g.input[1] + iw) * c..][..kw * c]);
                        }
                        (Some(ih), _) => {
                            for (kj, dst) in taps.chunks_exact_mut(c).enumerate() {
                                match g.tap(1, j, kj) {
                                    Some(iw) => {
                                        copy_run(dst, &image[(ih * g.input[1] + iw) * c..][..c])
                                    }
                                    None => dst.fill(T::ZERO),
                                }
                            }
                        }
                    }
                }
            }
        }
    });
    Ok(())
}

/// `dst = src` for the short runs of [`im2col`] (a few taps of a few channels): fixed-size
/// copies the compiler inlines as vector moves, where `copy_from_slice` of a run of unknown
/// length calls `memmove` (most of the copy's time for runs of 1 to 100 elements).
#[inline(always)]
fn copy_run<T: Copy>(dst: &mut [T], src: &[T]) {
    let n = dst.len().min(src.len());
    let (dst, src) = (&mut dst[..n], &src[..n]);
    if n >= 16 {
        let mut at = 0;
        while at + 16 <= n {
            copy_fixed::<T, 16>(&mut dst[at..], &src[at..]);
            at += 16;
        }
        if at < n {
            // The last 16, overlapping what was copied.
            copy_fixed::<T, 16>(&mut dst[n - 16..], &src[n - 16..]);
        }
        return;
    }
    // Under 16: the binary digits of n, largest first.
    let mut at = 0;
    for w in [8, 4, 2, 1] {
        if n & w != 0 {
            match w {
                8 => copy_fixed::<T, 8>(&mut dst[at..], &src[at..]),
                4 => copy_fixed::<T, 4>(&mut dst[at..], &src[at..]),
                2 => copy_fixed::<T, 2>(&mut dst[at..], &src[at..]),
                _ => dst[at] = src[at],
            }
            at += w;
        }
    }
}

#[inline(always)]
fn copy_fixed<T: Copy, const W: usize>(dst: &mut [T], src: &[T]) {
    let s: &[T; W] = src[..W].try_into().expect("W elements");
    let d: &mut [T; W] = (&mut dst[..W]).try_into().expect("W elements");
    *d = *s;
}

/// The adjoint of [`im2col`]: `dx` (`[batch, h, w, channels]`, float32) becomes the sum, for
/// every input position, of the `dcols` entries (`[pixels, patch_len]`) that [`im2col`] copied
/// from it (the padding's entries are dropped). Each image's sums are taken in one fixed
/// order.
///
/// # Errors
/// [`Error::LengthMismatch`] naming `dcols` or `dx`; nothing is written then.
pub(crate) fn col2im<T: Element>(g: &Geometry, dcols: &[T], dx: &mut [f32]) -> Result<()> {
    const OP: &str = "col2im";
    check_len(OP, "dcols", dcols.len(), g.cols_len())?;
    check_len(OP, "dx", dx.len(), g.input_len())?;
    let c = g.channels;
    let [kh, kw] = g.window.size;
    let [oh, ow] = g.output;
    let row_len = g.patch_len();
    let per_cols = oh * ow * row_len;
    per_image(dx, g.image_len(), |b, image| {
        image.fill(0.0);
        let rows = &dcols[b * per_cols..(b + 1) * per_cols];
        for i in 0..oh {
            for j in 0..ow {
                let row = &rows[(i * ow + j) * row_len..][..row_len];
                for ki in 0..kh {
                    let Some(ih) = g.tap(0, i, ki) else { continue };
                    for kj in 0..kw {
                        let Some(iw) = g.tap(1, j, kj) else { continue };
                        let dst = &mut image[(ih * g.input[1] + iw) * c..][..c];
                        let src = &row[(ki * kw + kj) * c..][..c];
                        for (d, s) in dst.iter_mut().zip(src) {
                            *d += s.to_f32();
                        }
                    }
                }
            }
        }
    });
    Ok(())
}

/// Max pooling: `y[b, i, j, c]` is the largest `x` in the window at `(i, j)` (positions in the
/// padding are not candidates; NaN wins, as IEEE `maximum` says, the first one), and
/// `argmax[b, i, j, c]` the index into `x` of the chosen element, which
/// [`max_pool_backward`] routes the gradient to. In 16 bits the 2 x 2, stride-2 windows compare
/// order keys of the bits ([`order_key16`]), the general windows widened values: the same
/// choices.
///
/// # Errors
/// [`Error::LengthMismatch`] naming `x`, `y` or `argmax`; [`Error::InvalidArgument`] when `x`
/// has more than `u32::MAX` elements. Nothing is written on error.
pub(crate) fn max_pool<T: Element>(
    g: &Geometry,
    x: &[T],
    y: &mut [T],
    argmax: &mut [u32],
) -> Result<()> {
    const OP: &str = "max_pool";
    check_pool(OP, g)?;
    check_len(OP, "x", x.len(), g.input_len())?;
    check_len(OP, "y", y.len(), g.output_len())?;
    check_len(OP, "argmax", argmax.len(), g.output_len())?;
    if x.len() > u32::MAX as usize {
        return Err(Error::InvalidArgument {
            op: OP,
            what: format!(
                "{} input elements: at most {} are supported",
                x.len(),
                u32::MAX
            ),
        });
    }
    let c = g.channels;
    let [kh, kw] = g.window.size;
    let [oh, ow] = g.output;
    let per = oh * ow * c;
    // Keras's default, 2 x 2 windows at stride 2 with every window inside the input (no
    // padding before, none needed after), so its four taps are read straight from two rows (the same taps in the same order,
    // the same rule, so the same result as the general loop below).
    let two_by_two = g.window.size == [2, 2]
        && g.window.strides == [2, 2]
        && g.window.dilation == [1, 1]
        && g.pad == [0, 0]
        // `same` padding of an odd side pads after it: a window would reach past the input.
        && 2 * g.output[0] <= g.input[0]
        && 2 * g.output[1] <= g.input[1];
    per_image2(y, argmax, per, |b, y, arg| {
        let base = b * g.image_len();
        if two_by_two {
            let w = g.input[1];
            for i in 0..oh {
                for j in 0..ow {
                    let o = (i * ow + j) * c;
                    let at = [
                        base + ((2 * i) * w + 2 * j) * c,
                        base + ((2 * i) * w + 2 * j + 1) * c,
                        base + ((2 * i + 1) * w + 2 * j) * c,
                        base + ((2 * i + 1) * w + 2 * j + 1) * c,
                    ];
                    max_of_four(x, at, c, &mut y[o..o + c], &mut arg[o..o + c]);
                }
            }
            return;
        }
        let mut best = vec![f32::NEG_INFINITY; c];
        for i in 0..oh {
            for j in 0..ow {
                let o = (i * ow + j) * c;
                best.fill(f32::NEG_INFINITY);
                let arg = &mut arg[o..o + c];
                // Every window touches the input (no dilation, pad < size), so `arg` is set.
                arg.fill(base as u32);
                let mut seen = false;
                for ki in 0..kh {
                    let Some(ih) = g.tap(0, i, ki) else { continue };
                    for kj in 0..kw {
                        let Some(iw) = g.tap(1, j, kj) else { continue };
                        let at = base + (ih * g.input[1] + iw) * c;
                        let xs = &x[at..at + c];
                        if !seen {
                            for (ch, ((b, a), v)) in
                                best.iter_mut().zip(&mut *arg).zip(xs).enumerate()
                            {
                                *b = v.to_f32();
                                *a = (at + ch) as u32;
                            }
                        } else {
                            // Take v when it is larger, or the first NaN; keep a NaN once taken.
                            // Selects, not branches, so the channels run as vectors.
                            for (ch, ((b, a), v)) in
                                best.iter_mut().zip(&mut *arg).zip(xs).enumerate()
                            {
                                let v = v.to_f32();
                                let take = v > *b || (v.is_nan() && !b.is_nan());
                                *b = if take { v } else { *b };
                                *a = if take { (at + ch) as u32 } else { *a };
                            }
                        }
                        seen = true;
                    }
                }
                for (dst, &a) in y[o..o + c].iter_mut().zip(arg.iter()) {
                    *dst = x[a as usize];
                }
            }
        }
    });
    Ok(())
}

/// One 2 x 2 window over `c` channels: the taps start at `at` (in window order), `y` gets the
/// largest (the first NaN wins and stays), `arg` its index into `x`. Selects over the channels,
/// so they run as vectors; 16-bit taps are compared by [`order_key16`] of their bits, never
/// widened.
#[inline]
fn max_of_four<T: Element>(x: &[T], at: [usize; 4], c: usize, y: &mut [T], arg: &mut [u32]) {
    let taps = at.map(|a| &x[a..a + c]);
    if let Some(nan_above) = nan_above16::<T>() {
        // 16-bit: compare order keys of the bits (no widening): the same choice as float32
        // comparisons of the widened values, the chosen element copied bit for bit.
        // SAFETY: `T` is bfloat16 or float16, two bytes with the bits of a `u16`.
        let (taps, y) = unsafe {
            (
                taps.map(|t| std::slice::from_raw_parts(t.as_ptr().cast::<u16>(), c)),
                std::slice::from_raw_parts_mut(y.as_mut_ptr().cast::<u16>(), c),
            )
        };
        let at = at.map(|a| a as u32);
        for ch in 0..c {
            let mut best = taps[0][ch];
            let mut kb = order_key16(best, nan_above);
            let mut a = at[0] + ch as u32;
            for t in 1..4 {
                let v = taps[t][ch];
                let kv = order_key16(v, nan_above);
                let take = kv > kb;
                best = if take { v } else { best };
                kb = if take { kv } else { kb };
                a = if take { at[t] + ch as u32 } else { a };
            }
            y[ch] = best;
            arg[ch] = a;
        }
        return;
    }
    for ch in 0..c {
        let mut best = taps[0][ch];
        let mut b = best.to_f32();
        let mut a = (at[0] + ch) as u32;
        for t in 1..4 {
            let v = taps[t][ch];
            let vf = v.to_f32();
            let take = vf > b || (vf.is_nan() && !b.is_nan());
            best = if take { v } else { best };
            b = if take { vf } else { b };
            a = if take { (at[t] + ch) as u32 } else { a };
        }
        y[ch] = best;
        arg[ch] = a;
    }
}

/// For a 16-bit float type, the magnitude bits above which a value is NaN (its infinity's
/// bits); `None` for float32.
#[inline(always)]
fn nan_above16<T: Element>() -> Option<u16> {
    match T::DTYPE {
        mp_core::DType::BF16 => Some(0x7f80),
        mp_core::DType::F16 => Some(0x7c00),
        mp_core::DType::F32 => None,
    }
}

/// A key whose integer order is max pooling's order of 16-bit floats: every NaN above
/// everything (so the first NaN of a window wins and stays, keys being compared strictly), `-0`
/// and `+0` equal (the first of them stays, as float comparison says), then the usual order.
#[inline(always)]
fn order_key16(bits: u16, nan_above: u16) -> u16 {
    let mag = bits & 0x7fff;
    if mag > nan_above {
        u16::MAX
    } else if bits & 0x8000 != 0 {
        0x7fff - mag
    } else {
        0x7fff + mag
    }
}

/// The gradient of [`max_pool`]: `dx` (float32, `[batch, h, w, channels]`) is zero but for the
/// chosen elements, which receive the sum of their windows' `dy`.
///
/// # Errors
/// [`Error::LengthMismatch`] naming `dy`, `argmax` or `dx`; [`Error::InvalidArgument`] for an
/// `argmax` entry outside its image. Nothing is written on error.
pub(crate) fn max_pool_backward<T: Element>(
    g: &Geometry,
    dy: &[T],
    argmax: &[u32],
    dx: &mut [f32],
) -> Result<()> {
    const OP: &str = "max_pool_backward";
    check_pool(OP, g)?;
    check_len(OP, "dy", dy.len(), g.output_len())?;
    check_len(OP, "argmax", argmax.len(), g.output_len())?;
    check_len(OP, "dx", dx.len(), g.input_len())?;
    let per = g.output[0] * g.output[1] * g.channels;
    let image = g.image_len();
    if per > 0 {
        // Image b's entries must lie in image b: a range test, not a division per entry (the
        // divisions were half of this function's time). Checked on all kernel threads before
        // anything is written (on one, this check was a third of the CNN's pooling time).
        let first_bad = |b: usize| {
            let inside = b * image..(b + 1) * image;
            argmax[b * per..(b + 1) * per]
                .iter()
                .find(|&&a| !inside.contains(&(a as usize)))
                .copied()
        };
        let bad = if parallel(g.batch, argmax.len()) {
            threads::pool().map(g.batch, first_bad)
        } else {
            (0..g.batch).map(first_bad).collect()
        };
        if let Some((b, bad)) = bad.iter().enumerate().find_map(|(b, x)| x.map(|a| (b, a))) {
            return Err(Error::InvalidArgument {
                op: OP,
                what: format!("argmax entry {bad} is not in image {b}"),
            });
        }
    }
    per_image(dx, image, |b, dx| {
        dx.fill(0.0);
        let base = b * image;
        for (&a, d) in argmax[b * per..(b + 1) * per]
            .iter()
            .zip(&dy[b * per..(b + 1) * per])
        {
            dx[a as usize - base] += d.to_f32();
        }
    });
    Ok(())
}

/// Average pooling: `y[b, i, j, c]` is the mean of the window's `x` at `(i, j)`, summed in
/// float32 over the positions inside the input only (with `same` padding the border windows
/// average fewer values, as Keras does).
///
/// # Errors
/// [`Error::LengthMismatch`] naming `x` or `y`; nothing is written then.
pub(crate) fn avg_pool<T: Element>(g: &Geometry, x: &[T], y: &mut [T]) -> Result<()> {
    const OP: &str = "avg_pool";
    check_pool(OP, g)?;
    check_len(OP, "x", x.len(), g.input_len())?;
    check_len(OP, "y", y.len(), g.output_len())?;
    let c = g.channels;
    let [oh, ow] = g.output;
    let per = oh * ow * c;
    per_image(y, per, |b, y| {
        let base = b * g.image_len();
        let mut sum = vec![0.0f32; c];
        for i in 0..oh {
            for j in 0..ow {
                sum.fill(0.0);
                let count = window_taps(g, i, j, |at| {
                    for (s, v) in sum.iter_mut().zip(&x[base + at..base + at + c]) {
                        *s += v.to_f32();
                    }
                });
                let inv = 1.0 / count as f32;
                for (dst, s) in y[(i * ow + j) * c..][..c].iter_mut().zip(&sum) {
                    *dst = T::from_f32(s * inv);
                }
            }
        }
    });
    Ok(())
}

/// The gradient of [`avg_pool`]: every position of a window receives `dy / count` of that
/// window, summed in float32 into `dx` (`[batch, h, w, channels]`).
///
/// # Errors
/// [`Error::LengthMismatch`] naming `dy` or `dx`; nothing is written then.
pub(crate) fn avg_pool_backward<T: Element>(g: &Geometry, dy: &[T], dx: &mut [f32]) -> Result<()> {
    const OP: &str = "avg_pool_backward";
    check_pool(OP, g)?;
    check_len(OP, "dy", dy.len(), g.output_len())?;
    check_len(OP, "dx", dx.len(), g.input_len())?;
    let c = g.channels;
    let [oh, ow] = g.output;
    let per = oh * ow * c;
    per_image(dx, g.image_len(), |b, dx| {
        dx.fill(0.0);
        let dy = &dy[b * per..(b + 1) * per];
        let mut share = vec![0.0f32; c];
        for i in 0..oh {
            for j in 0..ow {
                let count = window_taps(g, i, j, |_| {});
                let inv = 1.0 / count as f32;
                for (s, d) in share.iter_mut().zip(&dy[(i * ow + j) * c..][..c]) {
                    *s = d.to_f32() * inv;
                }
                window_taps(g, i, j, |at| {
                    for (d, s) in dx[at..at + c].iter_mut().zip(&share) {
                        *d += s;
                    }
                });
            }
        }
    });
    Ok(())
}

/// Calls `f` with the offset (within one image) of every window position at output `(i, j)`
/// that lies inside the input, in row-major window order; returns how many there were.
fn window_taps(g: &Geometry, i: usize, j: usize, mut f: impl FnMut(usize)) -> usize {
    let mut count = 0;
    for ki in 0..g.window.size[0] {
        let Some(ih) = g.tap(0, i, ki) else { continue };
        for kj in 0..g.window.size[1] {
            let Some(iw) = g.tap(1, j, kj) else { continue };
            f((ih * g.input[1] + iw) * g.channels);
            count += 1;
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use mp_core::Rng;

    /// The implicit-GEMM tiles against the GEMM on the im2col matrix, bit for bit (both are
    /// float64-checked in tests/conv.rs): every tile (8 x 32 for at most 32 filters, 6 x 64
    /// with one and two panels), strides, dilation, both paddings, edge tiles across image
    /// rows and images, the epilogue (alpha, beta, bias, ReLU), outputs in float32 and in `T`.
    fn implicit_matches_im2col<T: GemmInput>(seed: u64) {
        let cpu = crate::Cpu::global().unwrap();
        let paths = cpu.gemm_paths();
        if ConvKernel::pack::<T>(paths.get(T::DTYPE), &[T::ZERO], 1, 1).is_none() {
            return; // no implicit tiles on this CPU's path
        }
        let mut rng = Rng::new(seed);
        let cases = [
            (
                [9, 11, 13, 16],
                Window::new([3, 3]).padding(Padding::Same),
                32,
            ),
            ([8, 7, 9, 8], Window::new([3, 3]), 5),
            (
                [10, 12, 9, 9],
                Window::new([3, 2]).strides([2, 1]).dilation([1, 2]),
                40,
            ),
            (
                [8, 9, 10, 24],
                Window::new([2, 3]).strides([2, 2]).padding(Padding::Same),
                64,
            ),
            (
                [11, 6, 5, 33],
                Window::new([3, 3]).dilation([2, 1]).padding(Padding::Same),
                77,
            ),
            ([8, 5, 5, 64], Window::new([1, 1]).strides([2, 2]), 20),
        ];
        for (input, window, filters) in cases {
            let g = geo(input, window);
            let what = format!("{:?} {g:?} filters {filters}", T::DTYPE);
            let x: Vec<T> = (0..g.input_len())
                .map(|_| T::from_f32(rng.uniform(-1.0, 1.0)))
                .collect();
            let k: Vec<T> = (0..g.patch_len() * filters)
                .map(|_| T::from_f32(rng.uniform(-1.0, 1.0)))
                .collect();
            let bias: Vec<f32> = (0..filters).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let c0: Vec<f32> = (0..g.pixels() * filters)
                .map(|_| rng.uniform(-1.0, 1.0))
                .collect();
            let fused = Gemm::new().epilogue(crate::gemm::Epilogue::from_parts(
                Some(bias.as_slice()),
                true,
            ));
            for gemm in [Gemm::new(), Gemm::new().scaled(0.5, 2.0), fused] {
                let run = |implicit: bool| {
                    let mut y = c0.clone();
                    let mut yt: Vec<T> = c0.iter().map(|v| T::from_f32(*v)).collect();
                    conv2d_with(paths, &g, &x, &k, filters, &mut y, gemm, implicit).unwrap();
                    conv2d_with(paths, &g, &x, &k, filters, &mut yt, gemm, implicit).unwrap();
                    (y, yt)
                };
                let (a, at) = run(true);
                let (b, bt) = run(false);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "{what} {gemm:?} float32 out");
                let bits_t = |v: &[T]| v.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
                assert_eq!(bits_t(&at), bits_t(&bt), "{what} {gemm:?} out in T");
            }
            let mut y = vec![0.0f32; g.pixels() * filters];
            let path = paths.get(T::DTYPE);
            let ran = conv2d_implicit(path, &g, &x, &k, filters, &mut y, Gemm::new()).unwrap();
            assert!(
                ran,
                "{what}: the implicit tiles should take this convolution"
            );
        }
    }

    #[test]
    fn implicit_gemm_tiles_match_the_im2col_gemm_bit_for_bit() {
        implicit_matches_im2col::<f32>(11);
        implicit_matches_im2col::<bf16>(12);
        implicit_matches_im2col::<f16>(13);
    }

    fn geo(input: [usize; 4], w: Window) -> Geometry {
        Geometry::new("test", input, w).unwrap()
    }

    #[test]
    fn same_padding_matches_tensorflow() {
        // TensorFlow: out = ceil(in / stride), pad_total = (out - 1) * stride + span - in, the
        // smaller half before.
        let g = geo([1, 28, 28, 1], Window::new([3, 3]).padding(Padding::Same));
        assert_eq!((g.output, g.pad), ([28, 28], [1, 1]));
        let g = geo(
            [1, 28, 27, 1],
            Window::new([3, 4]).strides([2, 2]).padding(Padding::Same),
        );
        // rows: out 14, needed 13*2+3=29, total 1 -> 0 before; cols: out 14, 13*2+4=30, 3 -> 1.
        assert_eq!((g.output, g.pad), ([14, 14], [0, 1]));
        let g = geo(
            [1, 7, 7, 1],
            Window::new([3, 3]).dilation([2, 2]).padding(Padding::Same),
        );
        assert_eq!((g.output, g.pad), ([7, 7], [2, 2]));
        let g = geo([2, 7, 9, 3], Window::new([3, 2]).strides([2, 3]));
        assert_eq!((g.output, g.pad), ([3, 3], [0, 0]));
    }

    #[test]
    fn bad_windows_are_errors_that_name_the_problem() {
        let e = |input, w| {
            Geometry::new("Conv2D conv", input, w)
                .unwrap_err()
                .to_string()
        };
        let s = e([1, 5, 5, 1], Window::new([3, 3]).strides([0, 1]));
        assert!(
            s.contains("Conv2D conv") && s.contains("strides [0, 1]"),
            "{s}"
        );
        let s = e([1, 5, 5, 1], Window::new([0, 3]));
        assert!(s.contains("size [0, 3]"), "{s}");
        let s = e([1, 2, 5, 1], Window::new([3, 3]));
        assert!(s.contains("does not fit the input [2, 5]"), "{s}");
        let s = e([1, 5, 5, 1], Window::new([3, 3]).dilation([3, 1]));
        assert!(s.contains("spanning 7"), "{s}");
        let s = e([1, 0, 5, 1], Window::new([1, 1]).padding(Padding::Same));
        assert!(s.contains("empty"), "{s}");
        let s = e([usize::MAX, 2, 2, 2], Window::new([1, 1]));
        assert!(s.contains("overflow"), "{s}");
    }
}
