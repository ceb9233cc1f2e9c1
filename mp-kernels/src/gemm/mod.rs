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
//! bit-identical from run to run (and does not depend on the thread count).
//!
//! Microkernels, chosen by [`Isa`]:
//! - [`Isa::Avx512Bf16`], bfloat16 inputs: `vdpbf16ps` on pairs of `k` (B packed as interleaved
//!   `(b[k, j], b[k+1, j])` pairs, A's pair broadcast as one 32-bit value; odd `K` padded with 0).
//!   Like the instruction, this path treats subnormal bfloat16 inputs as zero and flushes
//!   subnormal float32 partial results to zero (|x| < 1.2e-38; the other paths keep them).
//! - [`Isa::Avx512`] (and `Avx512Bf16` for float32/float16 inputs): a 512-bit float32 FMA tile;
//!   float16 and bfloat16 inputs are widened to float32 while packing (F16C for float16).
//! - [`Isa::Avx2`]: the same with a 256-bit FMA tile.
//! - [`Isa::Scalar`]: portable Rust, same packing, a small tile the compiler may vectorise.
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

/// What to apply to `alpha * op(A) * op(B) + beta * C` before it is stored.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Epilogue<'a> {
    /// Store as is.
    #[default]
    None,
    /// `max(x, 0)`, keeping NaN (ReLU).
    Relu,
    /// Add `bias[j]` to every element of column `j` (`bias.len() == n`).
    Bias(&'a [f32]),
    /// Add the bias, then ReLU.
    BiasRelu(&'a [f32]),
}

impl<'a> Epilogue<'a> {
    /// The bias, if any.
    pub fn bias(&self) -> Option<&'a [f32]> {
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

/// An input element type of [`gemm`]: `f32`, `half::bf16` or `half::f16`.
pub trait GemmInput: Element + sealed::Sealed {}
impl<T: Element> GemmInput for T {}

/// An output element type of [`gemm`]: `f32` (what weight gradients use), `half::bf16` or
/// `half::f16` (rounded to nearest even once, from the float32 result).
pub trait GemmOutput: Element + sealed::Sealed {}
impl<T: Element> GemmOutput for T {}

/// `C = epilogue(alpha * op(A) * op(B) + beta * C)` with float32 accumulation, on the best
/// instruction set of this CPU ([`Isa::detect`]).
///
/// - `op(A)` is `m x k`: `A` is stored `m x k` (row stride `lda`), or `k x m` when `trans_a`.
/// - `op(B)` is `k x n`: `B` is stored `k x n` (row stride `ldb`), or `n x k` when `trans_b`.
/// - `C` is `m x n` with row stride `ldc`.
///
/// Leading dimensions must be at least the stored row width and the slices long enough for the
/// stored shapes (longer is fine). `beta == 0` means C is not read (NaN in C does not propagate,
/// as in BLAS). Zero-sized `m`, `n` or `k` are valid; with `k == 0`, `C = epilogue(beta * C)`.
/// NaN and infinities in the inputs propagate as IEEE 754 says (ReLU keeps NaN).
///
/// Arguments are checked before any memory is touched; on error C is unchanged.
///
/// ```
/// use mp_kernels::gemm::{gemm, Epilogue};
///
/// // [1 2; 3 4] * [5 6; 7 8] = [19 22; 43 50], plus bias [1, -100] then ReLU.
/// let a = [1.0f32, 2.0, 3.0, 4.0];
/// let b = [5.0f32, 6.0, 7.0, 8.0];
/// let mut c = [0.0f32; 4];
/// gemm(false, false, 2, 2, 2, 1.0, &a, 2, &b, 2, 0.0, &mut c, 2, Epilogue::BiasRelu(&[1.0, -100.0]))?;
/// assert_eq!(c, [20.0, 0.0, 44.0, 0.0]);
/// # Ok::<(), mp_kernels::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: GemmInput, O: GemmOutput>(
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
    gemm_with_isa(
        Isa::detect(),
        trans_a,
        trans_b,
        m,
        n,
        k,
        alpha,
        a,
        lda,
        b,
        ldb,
        beta,
        c,
        ldc,
        epilogue,
    )
}

/// [`gemm`] on a given instruction set (tests force every path this CPU supports).
///
/// Returns [`Error::InvalidArgument`] if this CPU does not support `isa`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_with_isa<T: GemmInput, O: GemmOutput>(
    isa: Isa,
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
    gemm_impl(
        isa,
        driver::Blocking::DEFAULT,
        trans_a,
        trans_b,
        m,
        n,
        k,
        alpha,
        a,
        lda,
        b,
        ldb,
        beta,
        c,
        ldc,
        epilogue,
    )
}

/// [`gemm_with_isa`] with given cache blocking budgets.
#[allow(clippy::too_many_arguments)]
fn gemm_impl<T: GemmInput, O: GemmOutput>(
    isa: Isa,
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
    if !isa.is_supported() {
        return Err(Error::InvalidArgument {
            op: OP,
            what: format!("instruction set {isa:?} is not supported by this CPU"),
        });
    }
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
    // Strides of op(A) (rows i, depth p) and op(B) (columns j, depth p).
    let (a_rs, a_ps) = if trans_a { (1, lda) } else { (lda, 1) };
    let (b_cs, b_ps) = if trans_b { (ldb, 1) } else { (1, ldb) };
    let problem = driver::Problem {
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
    };
    // SAFETY: the shapes, strides and lengths were checked above; C is exclusively borrowed.
    unsafe { dispatch(isa, &problem, blocking) };
    Ok(())
}

/// Runs the problem on the kernel family for `isa` and these element types.
///
/// # Safety
/// `problem` must describe valid, checked matrices.
unsafe fn dispatch<T: GemmInput, O: GemmOutput>(
    isa: Isa,
    problem: &driver::Problem<T, O>,
    blocking: driver::Blocking,
) {
    #[cfg(target_arch = "x86_64")]
    {
        match isa {
            Isa::Avx512Bf16 if T::DTYPE == DType::BF16 => {
                // SAFETY: T is bf16 (checked through its DTYPE), so the cast is the identity.
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
            Isa::Avx512 | Isa::Avx512Bf16 => {
                // SAFETY: the CPU supports AVX-512 F/BW/VL/DQ (checked by the caller).
                return unsafe {
                    driver::run(
                        &x86::Avx512Kernel::<{ x86::F32_MR }, { x86::F32_NV }>,
                        problem,
                        blocking,
                    )
                };
            }
            Isa::Avx2 => {
                // SAFETY: the CPU supports AVX2, FMA and F16C (checked by the caller).
                return unsafe { driver::run(&x86::Avx2Kernel, problem, blocking) };
            }
            Isa::Scalar => {}
        }
    }
    let _ = isa;
    // SAFETY: the scalar kernel needs no CPU feature.
    unsafe { driver::run(&scalar::ScalarKernel, problem, blocking) }
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
        for isa in Isa::supported() {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let (m, n, k) = if isa == Isa::Scalar {
                    (45, 70, 600)
                } else {
                    (230, 150, 3500)
                };
                let a: Vec<T> = (0..m * k)
                    .map(|_| T::from_f32(rng.uniform(-1.0, 1.0)))
                    .collect();
                let b: Vec<T> = (0..k * n)
                    .map(|_| T::from_f32(rng.uniform(-1.0, 1.0)))
                    .collect();
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
                        isa,
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
                        "{isa:?} {} -> {} ta={ta} tb={tb}",
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
}
