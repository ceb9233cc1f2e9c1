//! GELU, the Gaussian error linear unit of transformers, exact and in its tanh form, for every
//! element type: float32 math, one rounding back to the element type.
//!
//! | form | forward | derivative |
//! |---|---|---|
//! | exact (Keras `approximate=False`, PyTorch `approximate='none'`) | `x Φ(x) = x/2 · erfc(-x/√2)` | `Φ(x) + x φ(x)` |
//! | tanh (`approximate=True`, `'tanh'`) | `x/2 (1 + tanh z)`, `z = √(2/π) (x + 0.044715 x³)` | `s + 2 x s (1 - s) z'` |
//!
//! Both are written so that nothing cancels for large negative `x`, where the output is tiny:
//! the exact form through `erfc` (not `1 + erf`), the tanh form as `x σ(2z)` with `s = σ(2z)`
//! (`1 + tanh z = 2 σ(2z)`). The backward takes the forward's **input** `x` (GELU is not
//! monotonic, so its output does not determine its slope). NaN propagates, `+inf` gives `+inf`,
//! and `-inf` gives NaN (`-inf · 0`), as IEEE arithmetic says.
//!
//! `erfc` and `exp` come from `libm` (the Rust port of musl's libm): the standard library has
//! no stable `erf`.
//!
//! ```
//! use mp_kernels::gelu::{Gelu, gelu};
//!
//! let x = [-1.0f32, 0.0, 1.0];
//! let mut y = [0.0f32; 3];
//! gelu(Gelu::Exact, &x, &mut y)?;
//! assert!((y[2] - 0.841_344_7).abs() < 1e-6);
//! assert_eq!(y[1], 0.0);
//! # Ok::<(), mp_kernels::Error>(())
//! ```

use mp_core::Element;

use crate::cast::exec::{par_zip, par_zip2};
use crate::error::{Result, check_len};

/// Which GELU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Gelu {
    /// `x Φ(x)` with the normal distribution's CDF (Keras's and PyTorch's default).
    #[default]
    Exact,
    /// The tanh approximation of BERT and GPT-2.
    Tanh,
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / √(2π)`.
const INV_SQRT_2PI: f32 = 0.398_942_3;
/// `√(2/π)`.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const TANH_C: f32 = 0.044_715;

#[inline]
fn sigmoid(v: f32) -> f32 {
    if v >= 0.0 {
        1.0 / (1.0 + libm::expf(-v))
    } else {
        let e = libm::expf(v);
        e / (1.0 + e)
    }
}

/// The forward in float32.
#[inline]
pub fn forward_f32(form: Gelu, x: f32) -> f32 {
    match form {
        Gelu::Exact => 0.5 * x * libm::erfcf(-x * FRAC_1_SQRT_2),
        Gelu::Tanh => {
            let z = SQRT_2_OVER_PI * (x + TANH_C * x * x * x);
            x * sigmoid(2.0 * z)
        }
    }
}

/// The derivative in float32.
#[inline]
pub fn derivative_f32(form: Gelu, x: f32) -> f32 {
    match form {
        Gelu::Exact => {
            let cdf = 0.5 * libm::erfcf(-x * FRAC_1_SQRT_2);
            cdf + x * INV_SQRT_2PI * libm::expf(-0.5 * x * x)
        }
        Gelu::Tanh => {
            let z = SQRT_2_OVER_PI * (x + TANH_C * x * x * x);
            let dz = SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_C * x * x);
            let s = sigmoid(2.0 * z);
            s + 2.0 * x * s * (1.0 - s) * dz
        }
    }
}

/// `y = gelu(x)` elementwise.
///
/// # Errors
/// [`crate::Error::LengthMismatch`] when `y` is not as long as `x`.
pub fn gelu<T: Element>(form: Gelu, x: &[T], y: &mut [T]) -> Result<()> {
    check_len("gelu", "y", y.len(), x.len())?;
    par_zip(x, 1, y, 1, |x: &[T], y: &mut [T]| {
        for (y, x) in y.iter_mut().zip(x) {
            *y = T::from_f32(forward_f32(form, x.to_f32()));
        }
    });
    Ok(())
}

/// `dx = dy * gelu'(x)` elementwise, `x` the forward's input.
///
/// # Errors
/// [`crate::Error::LengthMismatch`] naming `x` or `dx`.
pub fn gelu_backward<T: Element>(form: Gelu, dy: &[T], x: &[T], dx: &mut [T]) -> Result<()> {
    check_len("gelu_backward", "x", x.len(), dy.len())?;
    check_len("gelu_backward", "dx", dx.len(), dy.len())?;
    par_zip2(
        (dy, 1),
        (x, 1),
        (dx, 1),
        |dy: &[T], x: &[T], dx: &mut [T]| {
            for ((dx, dy), x) in dx.iter_mut().zip(dy).zip(x) {
                *dx = T::from_f32(dy.to_f32() * derivative_f32(form, x.to_f32()));
            }
        },
    );
    Ok(())
}
