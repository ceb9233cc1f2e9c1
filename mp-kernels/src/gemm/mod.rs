//! General matrix multiplication with float32 accumulation:
//! `C = epilogue(alpha * op(A) * op(B) + beta * C)`.
//!
//! Inputs are float32, bfloat16 or float16 ([`GemmInput`]); the output is float32 or a 16-bit
//! dtype ([`GemmOutput`]), rounded to nearest even once, at the end. Accumulation is always
//! float32. Matrices are row-major with explicit leading dimensions (row strides); `op(X)` is `X`
//! or its transpose. The [`Epilogue`] (bias per column, ReLU) is fused into the store.
//!
//! # How it is computed
//! The BLIS design: `op(B)` is packed into panels `NR` columns wide, blocks of `op(A)` into
//! panels `MR` rows tall, and a register-tiled microkernel computes one `MR x NR` tile of C over a
//! block of `K` at a time, keeping its partial sums in a float32 tile workspace between blocks so
//! that every element of C is one float32 accumulation chain over `k = 0, 1, ..., K-1` in order.
//! The work is split statically over [`crate::threads::pool`] (whole column or row ranges per
//! thread), so each element of C is computed by exactly one thread in a fixed order: the result is
//! bit-identical from run to run (and does not depend on the thread count). A small, deep GEMM
//! into float32 (a weight gradient over a batch of tokens) is split instead into two halves of
//! its depth, fixed by its shape, one per thread, added at the end.
//!
//! Microkernels ([`GemmPath`]), one chosen per input dtype by measurement (see
//! [`crate::calibrate`]):
//! - [`GemmPath::Avx512Bf16Dot`], bfloat16 inputs only: `vdpbf16ps` on pairs of `k` (B packed as
//!   interleaved `(b[k, j], b[k+1, j])` pairs, A's pair broadcast as one 32-bit value; odd `K`
//!   padded with 0). Like the instruction, this path treats subnormal bfloat16 inputs as zero and
//!   flushes subnormal float32 partial results to zero (|x| < 1.2e-38; the other paths keep them).
//! - [`GemmPath::Avx512`]: a 6 x 64 float32 FMA tile (24 zmm accumulators, 10 loads per 24 FMAs);
//!   float16 and bfloat16 inputs are widened to float32 while packing (F16C for float16).
//! - [`GemmPath::Avx512Wide`]: the same with an 8 x 48 tile (24 accumulators, 11 loads per 24
//!   FMAs, a taller A panel): the candidate for cores with two FMA ports.
//! - [`GemmPath::Avx512L1`]: the 6 x 64 tile with a depth block of 192, so a panel of packed B
//!   (48 KiB) stays in a 48 KiB L1 while a row block of A is swept under it, and A always packed
//!   (read in place, its rows are a page apart in large matrices, and the TLB misses): measured
//!   1.2x to 1.6x the 6 x 64 path on a 2-FMA-port Xeon, single-threaded, at 1024 and 2048.
//! - [`GemmPath::Avx2`]: the same with a 256-bit FMA tile.
//! - [`GemmPath::Scalar`]: portable Rust, same packing, a small tile the compiler may vectorise.
//!
//! When op(A) is already in packed form (float32, or bfloat16 pairs with an even row stride, and
//! contiguous along `k`), full panels are read in place instead of packed. Pack buffers live in
//! thread-local storage and are reused across calls: each kernel thread keeps up to ~8 MiB of
//! packed B, ~4 MiB of float32 partial sums (only when `K` spans several depth blocks) and a
//! few hundred KiB of packed A.

mod driver;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use half::bf16;
use mp_core::{DType, Element};

use crate::error::{Error, Result};
use crate::isa::Isa;

const OP: &str = "gemm";

/// A GEMM microkernel family: what [`crate::calibrate`] times per input dtype and
/// [`crate::Cpu`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmPath {
    /// Portable Rust.
    Scalar,
    /// 256-bit FMA (AVX2 + FMA + F16C); 16-bit inputs widened while packing.
    Avx2,
    /// 512-bit FMA, 6 x 64 tile; 16-bit inputs widened while packing.
    Avx512,
    /// 512-bit FMA, 8 x 48 tile; 16-bit inputs widened while packing.
    Avx512Wide,
    /// 512-bit FMA, 6 x 64 tile, depth blocks of 192 and A always packed (cache blocking for a
    /// 48 KiB L1); 16-bit inputs widened while packing.
    Avx512L1,
    /// `vdpbf16ps` on bfloat16 pairs (bfloat16 inputs only).
    Avx512Bf16Dot,
}

impl GemmPath {
    /// Every path, in the order the calibration tries them.
    pub const ALL: [GemmPath; 6] = [
        GemmPath::Scalar,
        GemmPath::Avx2,
        GemmPath::Avx512,
        GemmPath::Avx512Wide,
        GemmPath::Avx512L1,
        GemmPath::Avx512Bf16Dot,
    ];

    /// The name used by the `MP_GEMM_PATH` knob, the calibration cache and the bench report.
    pub const fn name(self) -> &'static str {
        match self {
            GemmPath::Scalar => "scalar",
            GemmPath::Avx2 => "avx2",
            GemmPath::Avx512 => "avx512-6x64",
            GemmPath::Avx512Wide => "avx512-8x48",
            GemmPath::Avx512L1 => "avx512-6x64-l1",
            GemmPath::Avx512Bf16Dot => "avx512bf16-dot",
        }
    }

    /// The path named `name` (as [`GemmPath::name`] prints it).
    pub fn from_name(name: &str) -> Option<GemmPath> {
        GemmPath::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The instruction set the path needs.
    pub const fn isa(self) -> Isa {
        match self {
            GemmPath::Scalar => Isa::Scalar,
            GemmPath::Avx2 => Isa::Avx2,
            GemmPath::Avx512 | GemmPath::Avx512Wide | GemmPath::Avx512L1 => Isa::Avx512,
            GemmPath::Avx512Bf16Dot => Isa::Avx512Bf16,
        }
    }

    /// Whether the path computes GEMMs of `dtype` inputs (the dot-product path only bfloat16).
    pub fn computes(self, dtype: DType) -> bool {
        self != GemmPath::Avx512Bf16Dot || dtype == DType::BF16
    }

    /// Whether this CPU can run the path for `dtype` inputs.
    pub fn runs_here(self, dtype: DType) -> bool {
        self.computes(dtype) && self.isa().is_supported()
    }

    /// The paths this CPU can run for `dtype` inputs, in [`GemmPath::ALL`] order.
    pub fn candidates(dtype: DType) -> Vec<GemmPath> {
        GemmPath::ALL
            .into_iter()
            .filter(|p| p.runs_here(dtype))
            .collect()
    }

    /// The path an instruction set implies when nothing was measured: its own family, the dot
    /// product for bfloat16 on AVX512_BF16.
    pub fn default_for(isa: Isa, dtype: DType) -> GemmPath {
        match isa {
            Isa::Scalar => GemmPath::Scalar,
            Isa::Avx2 => GemmPath::Avx2,
            Isa::Avx512 => GemmPath::Avx512,
            Isa::Avx512Bf16 if dtype == DType::BF16 => GemmPath::Avx512Bf16Dot,
            Isa::Avx512Bf16 => GemmPath::Avx512,
        }
    }

    /// An error unless this CPU can run the path for `dtype` inputs (running code for a missing
    /// instruction set is undefined behaviour, so every GEMM checks first).
    pub(crate) fn check(self, dtype: DType) -> Result<()> {
        if !self.computes(dtype) {
            return Err(Error::InvalidArgument {
                op: OP,
                what: format!("path {} does not compute {dtype} inputs", self.name()),
            });
        }
        if !self.isa().is_supported() {
            return Err(Error::InvalidArgument {
                op: OP,
                what: format!(
                    "path {} needs {:?}, which this CPU does not support",
                    self.name(),
                    self.isa()
                ),
            });
        }
        Ok(())
    }
}

impl std::fmt::Display for GemmPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The GEMM path per input dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmPaths {
    /// For float32 inputs.
    pub f32: GemmPath,
    /// For bfloat16 inputs.
    pub bf16: GemmPath,
    /// For float16 inputs.
    pub f16: GemmPath,
}

impl GemmPaths {
    /// The paths an instruction set implies when nothing was measured.
    pub fn default_for(isa: Isa) -> GemmPaths {
        GemmPaths {
            f32: GemmPath::default_for(isa, DType::F32),
            bf16: GemmPath::default_for(isa, DType::BF16),
            f16: GemmPath::default_for(isa, DType::F16),
        }
    }

    /// The path for `dtype` inputs.
    pub fn get(&self, dtype: DType) -> GemmPath {
        match dtype {
            DType::F32 => self.f32,
            DType::BF16 => self.bf16,
            DType::F16 => self.f16,
        }
    }

    /// Sets the path for `dtype` inputs.
    pub fn set(&mut self, dtype: DType, path: GemmPath) {
        match dtype {
            DType::F32 => self.f32 = path,
            DType::BF16 => self.bf16 = path,
            DType::F16 => self.f16 = path,
        }
    }

    /// An error naming the first path this CPU cannot run for its dtype.
    pub fn check(&self) -> Result<()> {
        for d in [DType::F32, DType::BF16, DType::F16] {
            self.get(d).check(d)?;
        }
        Ok(())
    }
}

impl std::fmt::Display for GemmPaths {
    /// `float32=avx512-6x64, bfloat16=avx512bf16-dot, float16=avx512-6x64`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "float32={}, bfloat16={}, float16={}",
            self.f32, self.bf16, self.f16
        )
    }
}

/// A matrix operand read by [`crate::Cpu::gemm`]: `rows x cols` stored row-major with row stride
/// `ld` (at least `cols`), used as stored or transposed ([`MatRef::t`]).
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    ld: usize,
    trans: bool,
}

impl<'a, T> MatRef<'a, T> {
    /// `data` as a stored `rows x cols` matrix with row stride `cols`.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            ld: cols,
            trans: false,
        }
    }

    /// The same storage with row stride `ld`.
    pub fn with_ld(self, ld: usize) -> Self {
        MatRef { ld, ..self }
    }

    /// The transpose (of the stored matrix, or back).
    pub fn t(self) -> Self {
        MatRef {
            trans: !self.trans,
            ..self
        }
    }

    /// The shape of the operand as the product sees it: `(cols, rows)` when transposed.
    pub fn shape(&self) -> (usize, usize) {
        if self.trans {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }
}

/// The output of [`crate::Cpu::gemm`]: `rows x cols` stored row-major with row stride `ld`.
#[derive(Debug)]
pub struct MatMut<'a, O> {
    data: &'a mut [O],
    rows: usize,
    cols: usize,
    ld: usize,
}

impl<'a, O> MatMut<'a, O> {
    /// `data` as a `rows x cols` matrix with row stride `cols`.
    pub fn new(data: &'a mut [O], rows: usize, cols: usize) -> Self {
        MatMut {
            data,
            rows,
            cols,
            ld: cols,
        }
    }

    /// The same storage with row stride `ld`.
    pub fn with_ld(self, ld: usize) -> Self {
        MatMut { ld, ..self }
    }
}

/// The scalars and the epilogue of a GEMM: `C = epilogue(alpha * op(A) * op(B) + beta * C)`.
/// The default is `alpha = 1`, `beta = 0` (C not read), no epilogue. `B` is what holds the bias:
/// a float32 slice on the CPU, a float32 tensor in [`crate::ops`].
#[derive(Debug)]
pub struct Gemm<'a, B: ?Sized = [f32]> {
    /// The product's factor.
    pub alpha: f32,
    /// C's factor (`0` means C is not read, as in BLAS).
    pub beta: f32,
    /// Bias and ReLU, fused into the store.
    pub epilogue: Epilogue<'a, B>,
}

impl<B: ?Sized> Clone for Gemm<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: ?Sized> Copy for Gemm<'_, B> {}

impl<B: ?Sized> Default for Gemm<'_, B> {
    fn default() -> Self {
        Gemm {
            alpha: 1.0,
            beta: 0.0,
            epilogue: Epilogue::None,
        }
    }
}

impl<'a, B: ?Sized> Gemm<'a, B> {
    /// `C = op(A) * op(B)`.
    pub fn new() -> Self {
        Self::default()
    }

    /// With the epilogue `e`.
    pub fn epilogue(self, e: Epilogue<'a, B>) -> Self {
        Gemm {
            epilogue: e,
            ..self
        }
    }

    /// `C += op(A) * op(B)`: `beta = 1`, how weight gradients accumulate.
    pub fn accumulate(self) -> Self {
        Gemm { beta: 1.0, ..self }
    }

    /// With these scalars.
    pub fn scaled(self, alpha: f32, beta: f32) -> Self {
        Gemm {
            alpha,
            beta,
            ..self
        }
    }
}

/// What to apply to `alpha * op(A) * op(B) + beta * C` before it is stored. `B` holds the bias
/// (`n` float32 values): a slice on the CPU, a tensor in [`crate::ops`].
#[derive(Debug, Default)]
pub enum Epilogue<'a, B: ?Sized = [f32]> {
    /// Store as is.
    #[default]
    None,
    /// `max(x, 0)`, keeping NaN (ReLU).
    Relu,
    /// Add `bias[j]` to every element of column `j` (`bias.len() == n`).
    Bias(&'a B),
    /// Add the bias, then ReLU.
    BiasRelu(&'a B),
}

impl<B: ?Sized> Clone for Epilogue<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: ?Sized> Copy for Epilogue<'_, B> {}

impl<'a, B: ?Sized> Epilogue<'a, B> {
    /// With the bias `bias`, and ReLU when `relu` (what a dense layer's configuration reads as).
    pub fn from_parts(bias: Option<&'a B>, relu: bool) -> Self {
        match (bias, relu) {
            (Some(b), true) => Epilogue::BiasRelu(b),
            (Some(b), false) => Epilogue::Bias(b),
            (None, true) => Epilogue::Relu,
            (None, false) => Epilogue::None,
        }
    }

    /// The same epilogue with the bias mapped by `f` (a tensor to its slice or device buffer).
    pub fn try_map<C: ?Sized, E>(
        self,
        f: impl FnOnce(&'a B) -> std::result::Result<&'a C, E>,
    ) -> std::result::Result<Epilogue<'a, C>, E> {
        Ok(match self {
            Epilogue::None => Epilogue::None,
            Epilogue::Relu => Epilogue::Relu,
            Epilogue::Bias(b) => Epilogue::Bias(f(b)?),
            Epilogue::BiasRelu(b) => Epilogue::BiasRelu(f(b)?),
        })
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&'a B> {
        match *self {
            Epilogue::Bias(b) | Epilogue::BiasRelu(b) => Some(b),
            Epilogue::None | Epilogue::Relu => None,
        }
    }

    /// Whether ReLU is applied.
    pub fn relu(&self) -> bool {
        matches!(self, Epilogue::Relu | Epilogue::BiasRelu(_))
    }
}

mod sealed {
    pub trait Sealed {}
    // mp_core::Element is itself sealed to f32, bf16 and f16.
    impl<T: mp_core::Element> Sealed for T {}
}

/// An input element type of [`crate::Cpu::gemm`]: `f32`, `half::bf16` or `half::f16`.
pub trait GemmInput: Element + sealed::Sealed {}
impl<T: Element> GemmInput for T {}

/// An output element type of [`crate::Cpu::gemm`]: `f32` (what weight gradients use),
/// `half::bf16` or `half::f16` (rounded to nearest even once, from the float32 result).
pub trait GemmOutput: Element + sealed::Sealed {}
impl<T: Element> GemmOutput for T {}

/// The checked GEMM on one path with given cache blocking budgets (what [`crate::Cpu::gemm`]
/// calls; the tests vary the budgets).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_impl<T: GemmInput, O: GemmOutput>(
    path: GemmPath,
    blocking: driver::Blocking,
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    beta: f32,
    c: &mut [O],
    ldc: usize,
    epilogue: Epilogue<'_>,
) -> Result<()> {
    path.check(T::DTYPE)?;
    let (a_rows, a_cols) = if trans_a { (k, m) } else { (m, k) };
    let (b_rows, b_cols) = if trans_b { (n, k) } else { (k, n) };
    check_matrix("a", "lda", a_rows, a_cols, lda, a.len())?;
    check_matrix("b", "ldb", b_rows, b_cols, ldb, b.len())?;
    check_matrix("c", "ldc", m, n, ldc, c.len())?;
    if let Some(bias) = epilogue.bias()
        && bias.len() != n
    {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs_name: "c [m, n]",
            lhs: vec![m, n],
            rhs_name: "bias",
            rhs: vec![bias.len()],
        });
    }
    crate::counters::record_gemm(T::DTYPE);
    if m == 0 || n == 0 {
        return Ok(());
    }
    let out = driver::Output {
        c: c.as_mut_ptr(),
        ldc,
        alpha,
        beta,
        bias: epilogue.bias().map_or(std::ptr::null(), <[f32]>::as_ptr),
        relu: epilogue.relu(),
    };
    if k == 0 {
        // SAFETY: C was checked to hold `m` rows of `n` elements with stride `ldc`.
        unsafe { scalar::epilogue_only(m, n, &out) };
        return Ok(());
    }
    let problem = stored_problem((trans_a, trans_b), (m, n, k), (a, lda), (b, ldb), out);
    // SAFETY: the shapes, strides and lengths were checked above; C is exclusively borrowed.
    unsafe { dispatch(path, &problem, blocking) };
    Ok(())
}

/// The driver's problem for stored matrices: op(A) `m x k` from `a` (row stride `lda`,
/// transposed when `trans.0`), op(B) `k x n` from `b` likewise, storing through `out`.
fn stored_problem<T, O>(
    trans: (bool, bool),
    (m, n, k): (usize, usize, usize),
    (a, lda): (&[T], usize),
    (b, ldb): (&[T], usize),
    out: driver::Output<O>,
) -> driver::Problem<T, O> {
    // Strides of op(A) (rows i, depth p) and op(B) (columns j, depth p).
    let (a_rs, a_ps) = if trans.0 { (1, lda) } else { (lda, 1) };
    let (b_cs, b_ps) = if trans.1 { (ldb, 1) } else { (1, ldb) };
    driver::Problem {
        m,
        n,
        k,
        a: a.as_ptr(),
        a_rs,
        a_ps,
        b: b.as_ptr(),
        b_cs,
        b_ps,
        out,
    }
}

/// Runs the problem on the kernel family of `path` for these element types.
///
/// # Safety
/// `problem` must describe valid, checked matrices, and `path` must have passed
/// [`GemmPath::check`] for `T`.
unsafe fn dispatch<T: GemmInput, O: GemmOutput>(
    path: GemmPath,
    problem: &driver::Problem<T, O>,
    blocking: driver::Blocking,
) {
    #[cfg(target_arch = "x86_64")]
    {
        // A depth that fits one depth block of the in-place tile (a transformer's projections,
        // a convolution's patches): the L1 path's smaller blocks only add partial-sum traffic and
        // its packing of A a copy, so the same tile reads A in place in one block (the same
        // multiply-adds in the same order; see `SHALLOW_K` for the one change of bits).
        let path = if path == GemmPath::Avx512L1 && problem.k <= x86::SHALLOW_K {
            GemmPath::Avx512
        } else {
            path
        };
        match path {
            // A C of at most 32 columns fills only part of the 64- and 48-wide tiles: the
            // 12 x 32 tile of the same family does the same multiply-adds in the same order
            // along the depth (the same bits) without the padding.
            GemmPath::Avx512Bf16Dot if problem.n <= x86::NARROW_N => {
                // SAFETY: as below.
                let p = unsafe { &*(problem as *const driver::Problem<T, O>).cast() };
                // SAFETY: the CPU supports AVX512_BF16 (checked by the caller).
                return unsafe {
                    driver::run::<bf16, O, _>(
                        &x86::Avx512Bf16Kernel::<{ x86::NARROW_MR }, { x86::NARROW_NV }>,
                        p,
                        blocking,
                    )
                };
            }
            GemmPath::Avx512L1 if problem.n <= x86::NARROW_N => {
                // SAFETY: the CPU supports AVX-512 F/BW/VL/DQ (checked by the caller).
                return unsafe {
                    driver::run(
                        &x86::Avx512Kernel::<{ x86::NARROW_MR }, { x86::NARROW_NV }, true>,
                        problem,
                        blocking,
                    )
                };
            }
            GemmPath::Avx512L1 => {
                // SAFETY: the CPU supports AVX-512 F/BW/VL/DQ (checked by the caller).
                return unsafe {
                    driver::run(
                        &x86::Avx512Kernel::<{ x86::F32_MR }, { x86::F32_NV }, true>,
                        problem,
                        blocking,
                    )
                };
            }
            GemmPath::Avx512 | GemmPath::Avx512Wide if problem.n <= x86::NARROW_N => {
                // SAFETY: the CPU supports AVX-512 F/BW/VL/DQ (checked by the caller).
                return unsafe {
                    driver::run(
                        &x86::Avx512Kernel::<{ x86::NARROW_MR }, { x86::NARROW_NV }, false>,
                        problem,
                        blocking,
                    )
                };
            }
            GemmPath::Avx512Bf16Dot => {
                // SAFETY: the check admits this path for bf16 only, so the cast is the identity.
                let p = unsafe { &*(problem as *const driver::Problem<T, O>).cast() };
                // SAFETY: the CPU supports AVX512_BF16 (checked by the caller).
                return unsafe {
                    driver::run::<bf16, O, _>(
                        &x86::Avx512Bf16Kernel::<{ x86::BF_MR }, { x86::BF_NV }>,
                        p,
                        blocking,
                    )
                };
            }
            GemmPath::Avx512 => {
                // SAFETY: the CPU supports AVX-512 F/BW/VL/DQ (checked by the caller).
                return unsafe {
                    driver::run(
                        &x86::Avx512Kernel::<{ x86::F32_MR }, { x86::F32_NV }, false>,
                        problem,
                        blocking,
                    )
                };
            }
            GemmPath::Avx512Wide => {
                // SAFETY: as above.
                return unsafe {
                    driver::run(
                        &x86::Avx512Kernel::<{ x86::WIDE_MR }, { x86::WIDE_NV }, false>,
                        problem,
                        blocking,
                    )
                };
            }
            GemmPath::Avx2 => {
                // SAFETY: the CPU supports AVX2, FMA and F16C (checked by the caller).
                return unsafe { driver::run(&x86::Avx2Kernel, problem, blocking) };
            }
            GemmPath::Scalar => {}
        }
    }
    let _ = path;
    // SAFETY: the scalar kernel needs no CPU feature.
    unsafe { driver::run(&scalar::ScalarKernel, problem, blocking) }
}

/// The rate of `path`'s microkernel alone on the calling thread, GFLOP/s (one multiply-add = 2
/// FLOP), over depth `depth` with its operands packed once and kept in cache (a B panel of
/// `depth x NR` elements: 16 KiB per 64 of depth for the 64-wide float32 tiles), for about
/// `seconds`: what no GEMM on the path can beat on this CPU, so a GEMM's or a network's fraction
/// of the FMA peak can be read against it. Float32 inputs, or bfloat16 for
/// [`GemmPath::Avx512Bf16Dot`]. For `cargo xtask bench`.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the path when this CPU cannot run it.
pub fn microkernel_gflops(path: GemmPath, depth: usize, seconds: f64) -> Result<f64> {
    let dtype = if path == GemmPath::Avx512Bf16Dot {
        DType::BF16
    } else {
        DType::F32
    };
    path.check(dtype)?;
    #[cfg(target_arch = "x86_64")]
    {
        use driver::microkernel_gflops as rate;
        match path {
            GemmPath::Avx512 => {
                let k = x86::Avx512Kernel::<{ x86::F32_MR }, { x86::F32_NV }, false>;
                // SAFETY: `check` confirmed that this CPU runs the path's instructions.
                return Ok(unsafe { rate::<f32, _>(&k, depth, seconds) });
            }
            GemmPath::Avx512Wide => {
                let k = x86::Avx512Kernel::<{ x86::WIDE_MR }, { x86::WIDE_NV }, false>;
                // SAFETY: `check` confirmed that this CPU runs the path's instructions.
                return Ok(unsafe { rate::<f32, _>(&k, depth, seconds) });
            }
            GemmPath::Avx512L1 => {
                let k = x86::Avx512Kernel::<{ x86::F32_MR }, { x86::F32_NV }, true>;
                // SAFETY: `check` confirmed that this CPU runs the path's instructions.
                return Ok(unsafe { rate::<f32, _>(&k, depth, seconds) });
            }
            GemmPath::Avx512Bf16Dot => {
                let k = x86::Avx512Bf16Kernel::<{ x86::BF_MR }, { x86::BF_NV }>;
                // SAFETY: `check` confirmed that this CPU runs the path's instructions.
                return Ok(unsafe { rate::<bf16, _>(&k, depth, seconds) });
            }
            GemmPath::Avx2 => {
                // SAFETY: `check` confirmed that this CPU runs the path's instructions.
                return Ok(unsafe { rate::<f32, _>(&x86::Avx2Kernel, depth, seconds) });
            }
            GemmPath::Scalar => {}
        }
    }
    // SAFETY: the scalar kernel needs no CPU feature.
    Ok(unsafe { driver::microkernel_gflops::<f32, _>(&scalar::ScalarKernel, depth, seconds) })
}

/// [`crate::Cpu::gemm`]: the shapes of the views checked against each other, then
/// [`gemm_impl`].
pub(crate) fn gemm_views<T: GemmInput, O: GemmOutput>(
    path: GemmPath,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    c: MatMut<'_, O>,
    g: Gemm<'_>,
) -> Result<()> {
    let (m, k) = a.shape();
    let (kb, n) = b.shape();
    if kb != k {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs_name: "op(a) [m, k]",
            lhs: vec![m, k],
            rhs_name: "op(b) [k, n]",
            rhs: vec![kb, n],
        });
    }
    if (c.rows, c.cols) != (m, n) {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs_name: "op(a) * op(b) [m, n]",
            lhs: vec![m, n],
            rhs_name: "c [rows, cols]",
            rhs: vec![c.rows, c.cols],
        });
    }
    gemm_impl(
        path,
        driver::Blocking::DEFAULT,
        a.trans,
        b.trans,
        m,
        n,
        k,
        g.alpha,
        a.data,
        a.ld,
        b.data,
        b.ld,
        g.beta,
        c.data,
        c.ld,
        g.epilogue,
    )
}

/// A convolution kernel packed for the implicit-GEMM tiles of the AVX-512 float32 family: a
/// convolution's A operand (its patches) is then read where it lies, in a (padded) float32 copy
/// of the input, instead of from an im2col matrix ([`crate::conv`]). Each element of C is the
/// same float32 chain over the depth in order as the GEMM on the im2col matrix computes on the
/// same paths (one depth block: the patch is at most [`ConvKernel::MAX_DEPTH`] deep), so the
/// results are the same bits.
#[derive(Debug)]
pub(crate) struct ConvKernel {
    /// k-major panels of `width` columns (64-byte blocks of 16 float32).
    panels: Vec<Block16>,
    k: usize,
    n: usize,
    /// The narrow tile's panels (`n <= 32`, 32 wide), else the 6 x 64 tile's.
    narrow: bool,
}

/// 16 float32, 64-byte aligned: the unit of buffers that AVX-512 tiles load whole cache lines
/// from (the packed panels here, the padded images of [`crate::conv`]).
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub(crate) struct Block16(pub(crate) [f32; 16]);

impl Block16 {
    /// `blocks` as float32.
    pub(crate) fn floats_mut(blocks: &mut [Block16]) -> &mut [f32] {
        // SAFETY: `Block16` is 16 float32 with no padding (repr(C), 64 bytes).
        unsafe { std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast(), blocks.len() * 16) }
    }
}

impl ConvKernel {
    /// The deepest patch the tiles take: one depth block of the 6 x 64 path, so that the GEMM
    /// on the im2col matrix is one chain too.
    pub(crate) const MAX_DEPTH: usize = 768;

    /// Packed float32 bytes above which the kernel is left to the im2col GEMM (the tiles read
    /// the whole packed kernel for every tile of rows, from L2).
    const MAX_BYTES: usize = 1 << 20;

    /// `kernel` (`[k, n]` row-major) packed for `path`, or `None` where `path` has no
    /// implicit-GEMM tile (only the AVX-512 float32 family has, on x86-64) or the kernel is too
    /// deep or too large for it.
    pub(crate) fn pack<T: GemmInput>(
        path: GemmPath,
        kernel: &[T],
        k: usize,
        n: usize,
    ) -> Option<ConvKernel> {
        let family = matches!(
            path,
            GemmPath::Avx512 | GemmPath::Avx512Wide | GemmPath::Avx512L1
        );
        if !cfg!(target_arch = "x86_64")
            || !family
            || path.check(T::DTYPE).is_err()
            || k == 0
            || n == 0
            || k > Self::MAX_DEPTH
            || kernel.len() != k * n
        {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let narrow = n <= x86::NARROW_N;
            let width = if narrow {
                x86::NARROW_NV * 16
            } else {
                x86::F32_NV * 16
            };
            let blocks = n.div_ceil(width) * width * k / 16;
            if blocks * 64 > Self::MAX_BYTES {
                return None;
            }
            let mut panels = vec![Block16([0.0; 16]); blocks];
            // SAFETY: `check` confirmed AVX-512 F/BW/VL/DQ; `kernel` holds k * n elements and
            // `panels` the padded panels, 64-byte aligned.
            unsafe {
                x86::pack_conv_b_512(kernel.as_ptr(), k, n, width, panels.as_mut_ptr().cast())
            };
            Some(ConvKernel {
                panels,
                k,
                n,
                narrow,
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    /// Rows `0..bases.len()` of `c` (`[bases.len(), n]`, row stride `n`): row `r` is
    /// `epilogue(alpha Σ_t Σ_q bases[r][taps[t] + q] · kernel[t ch + q, :] + beta c[r, :])`,
    /// where `taps.len() * ch` is the packed depth.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the taps and channels are not the packed depth, when `c` is
    /// not `bases.len() x n`, or the bias not `n` long.
    ///
    /// # Safety
    /// Every `bases[r] + taps[t]` must start `ch` readable float32 elements.
    pub(crate) unsafe fn rows<O: GemmOutput>(
        &self,
        bases: &[*const f32],
        taps: &[usize],
        ch: usize,
        c: &mut [O],
        g: Gemm<'_>,
    ) -> Result<()> {
        let shape = |lhs_name, lhs: Vec<usize>, rhs_name, rhs: Vec<usize>| Error::ShapeMismatch {
            op: "conv2d",
            lhs_name,
            lhs,
            rhs_name,
            rhs,
        };
        if taps.len() * ch != self.k {
            return Err(shape(
                "taps x channels",
                vec![taps.len(), ch],
                "packed kernel [k, n]",
                vec![self.k, self.n],
            ));
        }
        if c.len() != bases.len() * self.n {
            return Err(shape(
                "c",
                vec![c.len()],
                "rows x filters",
                vec![bases.len(), self.n],
            ));
        }
        if let Some(bias) = g.epilogue.bias()
            && bias.len() != self.n
        {
            return Err(shape("bias", vec![bias.len()], "filters", vec![self.n]));
        }
        crate::counters::record_gemm(DType::F32);
        #[cfg(target_arch = "x86_64")]
        {
            let out = driver::Output {
                c: c.as_mut_ptr(),
                ldc: self.n,
                alpha: g.alpha,
                beta: g.beta,
                bias: g.epilogue.bias().map_or(std::ptr::null(), <[f32]>::as_ptr),
                relu: g.epilogue.relu(),
            };
            let b: *const f32 = self.panels.as_ptr().cast();
            // SAFETY: `pack` ran, so the CPU supports AVX-512 F/BW/VL/DQ; C holds the rows
            // (checked above), the panels the packed depth, the rows the caller's promise.
            unsafe {
                if self.narrow {
                    x86::conv_rows_512::<O, { x86::CONV_NARROW_MR }, { x86::NARROW_NV }>(
                        bases, taps, ch, b, self.n, &out,
                    )
                } else {
                    x86::conv_rows_512::<O, { x86::F32_MR }, { x86::F32_NV }>(
                        bases, taps, ch, b, self.n, &out,
                    )
                }
            }
        }
        Ok(())
    }
}

/// Filters a tile of the implicit-GEMM kernel gradient covers ([`conv_kernel_grad_rows`]).
const CONV_DW_MR: usize = 8;

/// Whether `path` has implicit-GEMM tiles for the kernel gradient of a convolution with `c`
/// input channels and `filters` filters (the AVX-512 float32 family, on x86-64; `c` a multiple
/// of 16, so that each vector of patch entries lies inside one tap, and `filters` a multiple of
/// 8, the tile's rows).
pub(crate) fn conv_kernel_grad_supported(path: GemmPath, c: usize, filters: usize) -> bool {
    cfg!(target_arch = "x86_64")
        && matches!(
            path,
            GemmPath::Avx512 | GemmPath::Avx512Wide | GemmPath::Avx512L1
        )
        && path.check(DType::F32).is_ok()
        && c > 0
        && c.is_multiple_of(16)
        && filters > 0
        && filters.is_multiple_of(CONV_DW_MR)
}

/// Adds one chunk of pixels into a convolution's transposed kernel gradient `dwt`
/// (`[filters, taps.len() * c]`, float32; overwritten when `first`): `dwt[f, t c + q] += Σ_p
/// dy[p, f] · bases[p][taps[t] + q]`, one float32 chain per element in pixel order across
/// chunks. `dy` is `[bases.len(), filters]`.
///
/// # Safety
/// [`conv_kernel_grad_supported`] must hold for `path`, `c` and `filters`; every
/// `bases[p] + taps[t]` must start `c` readable float32 elements.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn conv_kernel_grad_rows(
    path: GemmPath,
    bases: &[*const f32],
    taps: &[usize],
    c: usize,
    dy: &[f32],
    filters: usize,
    first: bool,
    dwt: &mut [f32],
) {
    debug_assert!(conv_kernel_grad_supported(path, c, filters));
    assert_eq!(
        dy.len(),
        bases.len() * filters,
        "dy: one row of filters a pixel"
    );
    assert_eq!(dwt.len(), filters * taps.len() * c, "dwt: [filters, patch]");
    crate::counters::record_gemm(DType::F32);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU supports the path (the caller checked `conv_kernel_grad_supported`); dy and
    // dwt hold what they must (asserted), the rows the caller's promise.
    unsafe {
        x86::conv_dw_rows_512::<CONV_DW_MR>(
            bases,
            taps,
            c,
            dy.as_ptr(),
            filters,
            filters,
            first,
            dwt.as_mut_ptr(),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (path, bases, taps, c, dy, filters, first, dwt);
}

/// Checks one stored matrix: `ld >= cols` and `len >= (rows - 1) * ld + cols`.
fn check_matrix(
    name: &'static str,
    ld_name: &'static str,
    rows: usize,
    cols: usize,
    ld: usize,
    len: usize,
) -> Result<()> {
    let shape_name = match name {
        "a" => "a stored [rows, cols]",
        "b" => "b stored [rows, cols]",
        _ => "c [m, n]",
    };
    if ld < cols {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs_name: shape_name,
            lhs: vec![rows, cols],
            rhs_name: ld_name,
            rhs: vec![ld],
        });
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let needed = (rows - 1)
        .checked_mul(ld)
        .and_then(|x| x.checked_add(cols))
        .ok_or_else(|| Error::InvalidArgument {
            op: OP,
            what: format!("{name} stored [{rows}, {cols}] with {ld_name} = {ld} overflows usize"),
        })?;
    if len < needed {
        let len_name = match name {
            "a" => "a.len() (needs [rows - 1] * lda + cols)",
            "b" => "b.len() (needs [rows - 1] * ldb + cols)",
            _ => "c.len() (needs [m - 1] * ldc + n)",
        };
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs_name: shape_name,
            lhs: vec![rows, cols],
            rhs_name: len_name,
            rhs: vec![len],
        });
    }
    Ok(())
}

/// The float32 epilogue on one value, shared by every scalar store: `alpha * acc + beta * c`
/// (C not read when `beta == 0`), then bias, then ReLU (NaN kept).
#[inline(always)]
pub(crate) fn epilogue_scalar(
    acc: f32,
    alpha: f32,
    beta: f32,
    c: f32,
    bias: Option<f32>,
    relu: bool,
) -> f32 {
    let mut x = alpha * acc;
    if beta != 0.0 {
        x = beta.mul_add(c, x);
    }
    if let Some(bias) = bias {
        x += bias;
    }
    if relu && x < 0.0 {
        x = 0.0;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `len` values uniform in [-1, 1), rounded to `T`.
    fn uniform<T: Element>(rng: &mut mp_core::Rng, len: usize) -> Vec<T> {
        (0..len)
            .map(|_| T::from_f32(rng.uniform(-1.0, 1.0)))
            .collect()
    }

    /// Small, deep GEMMs into float32 with `alpha == 1` and no epilogue (weight gradients) run as
    /// two depth halves: on every path and input dtype, with `beta` 0 and 1, depths odd and even
    /// at both ends of the range, the result matches float64 and has the same bits on one
    /// thread as on the pool.
    fn depth_halves_match_float64_on_any_thread_count<T: GemmInput>() {
        let mut rng = mp_core::Rng::new(0x4a1f_2c07);
        for path in GemmPath::candidates(T::DTYPE) {
            for &(m, n, k, ta) in &[
                (64, 64, 2176, true),
                (49, 64, 1031, true),
                (7, 130, 1024, false),
                (20, 128, 4096, true),
            ] {
                let a: Vec<T> = uniform(&mut rng, m * k);
                let b: Vec<T> = uniform(&mut rng, k * n);
                let c0: Vec<f32> = (0..m * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
                let lda = if ta { m } else { k };
                let a_at = |i: usize, q: usize| {
                    let x = if ta { a[q * m + i] } else { a[i * k + q] };
                    x.to_f64()
                };
                for beta in [0.0f32, 1.0] {
                    let run = || {
                        let mut c = c0.clone();
                        gemm_impl(
                            path,
                            driver::Blocking::DEFAULT,
                            ta,
                            false,
                            m,
                            n,
                            k,
                            1.0,
                            &a,
                            lda,
                            &b,
                            n,
                            beta,
                            &mut c,
                            n,
                            Epilogue::None,
                        )
                        .unwrap();
                        c
                    };
                    let pooled = run();
                    let serial = crate::threads::serial(run);
                    let bits = |c: &[f32]| c.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert!(
                        bits(&pooled) == bits(&serial),
                        "{path} {} [{m}, {n}, {k}] beta {beta}: one thread differs",
                        T::DTYPE
                    );
                    for i in 0..m {
                        for j in 0..n {
                            let (mut want, mut size) =
                                (f64::from(beta) * f64::from(c0[i * n + j]), 0.0);
                            size += want.abs();
                            for q in 0..k {
                                let t = a_at(i, q) * b[q * n + j].to_f64();
                                want += t;
                                size += t.abs();
                            }
                            let got = f64::from(pooled[i * n + j]);
                            assert!(
                                (got - want).abs() <= 1e-6 * size + 1e-30,
                                "{path} {} [{m}, {n}, {k}] beta {beta} ({i}, {j}): {got} vs {want}",
                                T::DTYPE
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn depth_halves_f32_and_bf16() {
        depth_halves_match_float64_on_any_thread_count::<f32>();
        depth_halves_match_float64_on_any_thread_count::<bf16>();
    }

    /// The microkernel-alone rate runs every path this CPU has (at depths that are and are not
    /// multiples of a pair) and names the path it refuses.
    #[test]
    fn microkernel_rates_run_here_or_name_the_path() {
        for path in GemmPath::ALL {
            let dtype = if path == GemmPath::Avx512Bf16Dot {
                DType::BF16
            } else {
                DType::F32
            };
            for depth in [1, 77, 128] {
                match microkernel_gflops(path, depth, 0.001) {
                    Ok(rate) => {
                        assert!(path.runs_here(dtype), "{path}: ran where it cannot");
                        assert!(
                            rate.is_finite() && rate > 0.0,
                            "{path} depth {depth}: {rate}"
                        );
                    }
                    Err(e) => {
                        assert!(!path.runs_here(dtype), "{path}: {e}");
                        assert!(e.to_string().contains(path.name()), "{e}");
                    }
                }
            }
        }
    }

    /// Every element of C is one float32 chain over k in order, so tiny blocking budgets (one
    /// panel of B per block, one row block of partial sums, several depth blocks) must give
    /// bit-identical results to the default ones, on every path and dtype.
    fn blocking_is_invisible<T: GemmInput, O: GemmOutput>() {
        let tiny = driver::Blocking {
            b_bytes: 1,
            w_bytes: 1,
        };
        // One 64-wide panel of B per block, two 96-row blocks per block of partial sums.
        let small = driver::Blocking {
            b_bytes: 1,
            w_bytes: 2 * 96 * 64 * 4,
        };
        let mut rng = mp_core::Rng::new(0x6e3d_7a11);
        for path in GemmPath::candidates(T::DTYPE) {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let (m, n, k) = if path == GemmPath::Scalar {
                    (45, 70, 600)
                } else {
                    (230, 150, 3500)
                };
                let a: Vec<T> = uniform(&mut rng, m * k);
                let b: Vec<T> = uniform(&mut rng, k * n);
                let bias: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
                let c0: Vec<O> = (0..m * n)
                    .map(|_| O::from_f32(rng.uniform(-1.0, 1.0)))
                    .collect();
                let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
                let mut results = Vec::new();
                // alpha = 1 with a float32 C keeps the partial sums in C (weight gradients).
                for (blocking, alpha) in [
                    (driver::Blocking::DEFAULT, 0.5),
                    (tiny, 0.5),
                    (small, 0.5),
                    (driver::Blocking::DEFAULT, 1.0),
                    (tiny, 1.0),
                    (small, 1.0),
                ] {
                    let mut c = c0.clone();
                    gemm_impl(
                        path,
                        blocking,
                        ta,
                        tb,
                        m,
                        n,
                        k,
                        alpha,
                        &a,
                        lda,
                        &b,
                        ldb,
                        0.25,
                        &mut c,
                        n,
                        Epilogue::BiasRelu(&bias),
                    )
                    .unwrap();
                    results.push(c.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>());
                }
                for (i, r) in results.iter().enumerate() {
                    assert!(
                        results[i / 3 * 3] == *r,
                        "{path} {} -> {} ta={ta} tb={tb}",
                        T::DTYPE,
                        O::DTYPE
                    );
                }
            }
        }
    }

    #[test]
    fn blocking_is_invisible_f32() {
        blocking_is_invisible::<f32, f32>();
    }

    #[test]
    fn blocking_is_invisible_bf16() {
        blocking_is_invisible::<bf16, bf16>();
        blocking_is_invisible::<bf16, f32>();
    }

    #[test]
    fn blocking_is_invisible_f16() {
        blocking_is_invisible::<half::f16, half::f16>();
    }

    /// [`GemmPath::Avx512L1`] runs a GEMM of depth up to [`x86::SHALLOW_K`] on the in-place
    /// tile: the bits must be those of its own kernel, for every input type, transpose and
    /// epilogue, with depths on both sides of the bound (but a float32 C accumulated with alpha
    /// 1, see [`x86::SHALLOW_K`]).
    #[cfg(target_arch = "x86_64")]
    fn shallow_l1_keeps_its_bits<T: GemmInput, O: GemmOutput>() {
        if !GemmPath::Avx512L1.runs_here(T::DTYPE) {
            return;
        }
        let mut rng = mp_core::Rng::new(0x2b7e_1516);
        let (m, n) = (77, 70);
        for k in [1, 64, 300, x86::SHALLOW_K, x86::SHALLOW_K + 1] {
            for (ta, tb) in [(false, false), (true, false), (false, true)] {
                let a: Vec<T> = uniform(&mut rng, m * k);
                let b: Vec<T> = uniform(&mut rng, k * n);
                let bias: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
                let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
                // (alpha 1 with beta 0: a float32 C with alpha 1 and beta != 0 keeps its partial
                // sums in C when there are several depth blocks, starting from beta C.)
                for (alpha, beta, relu) in [(1.0, 0.0, false), (0.5, 0.5, true)] {
                    let c0: Vec<O> = (0..m * n)
                        .map(|_| O::from_f32(rng.uniform(-1.0, 1.0)))
                        .collect();
                    let mut c = c0.clone();
                    gemm_impl(
                        GemmPath::Avx512L1,
                        driver::Blocking::DEFAULT,
                        ta,
                        tb,
                        m,
                        n,
                        k,
                        alpha,
                        &a,
                        lda,
                        &b,
                        ldb,
                        beta,
                        &mut c,
                        n,
                        Epilogue::from_parts(Some(&bias[..]), relu),
                    )
                    .unwrap();
                    let mut own = c0.clone();
                    let out = driver::Output {
                        c: own.as_mut_ptr(),
                        ldc: n,
                        alpha,
                        beta,
                        bias: bias.as_ptr(),
                        relu,
                    };
                    let problem =
                        stored_problem((ta, tb), (m, n, k), (&a[..], lda), (&b[..], ldb), out);
                    // SAFETY: the problem describes the vectors above; the CPU runs AVX-512.
                    unsafe {
                        driver::run(
                            &x86::Avx512Kernel::<{ x86::F32_MR }, { x86::F32_NV }, true>,
                            &problem,
                            driver::Blocking::DEFAULT,
                        )
                    };
                    let bits = |v: &[O]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
                    assert!(
                        bits(&c) == bits(&own),
                        "k {k}, ta {ta}, tb {tb}, alpha {alpha}: the in-place tile changed bits"
                    );
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn shallow_l1_gemms_keep_their_bits() {
        shallow_l1_keeps_its_bits::<f32, f32>();
        shallow_l1_keeps_its_bits::<bf16, bf16>();
        shallow_l1_keeps_its_bits::<half::f16, f32>();
    }
}
