//! Fused optimizer updates on float32 variables, with Keras 3's formulas operation for
//! operation.
//!
//! Each kernel reads a variable, its gradient and its optimizer state once and writes the
//! variable and state once. The arithmetic is the same sequence of float32 operations as Keras'
//! `update_step` (separate multiplies and adds, no FMA), so every instruction set gives
//! bit-identical results:
//!
//! - SGD, `momentum == 0`: `var -= lr * g`. Otherwise `m = momentum * m - lr * g`, then
//!   `var += m`, or with Nesterov `var += momentum * m - lr * g` (with the new `m`).
//! - RMSprop (not centered): `v = rho * v + (1 - rho) * g^2`, `inc = lr * g / sqrt(v + epsilon)`
//!   (epsilon inside the square root, as Keras); with `momentum > 0`,
//!   `mom = momentum * mom + inc; var -= mom`, else `var -= inc`.
//! - Adam: `m += (g - m) * (1 - beta1)`, `v += (g^2 - v) * (1 - beta2)`,
//!   `var -= m * alpha / (sqrt(v) + epsilon)`, where the optimizer passes
//!   `alpha = lr * sqrt(1 - beta2^t) / (1 - beta1^t)` ([`AdamParams::new`] computes it in float64).
//!   With decoupled weight decay (AdamW, [`AdamParams::with_weight_decay`]) the variable is first
//!   decayed as Keras 3 does, `var = var - var * weight_decay * lr`, then updated.
//!
//! The `1 - rho`, `1 - beta` factors are parameters, computed by the optimizer in float64 from
//! its float64 hyperparameters and rounded once (Keras rounds the Python float `1 - rho`).
//! Hyperparameters are validated by the optimizer; these kernels only compute, and check
//! lengths. Arrays of 64K elements or more are split over the thread pool.
//!
//! Each update has a checking twin (`*_check`) that runs the same formula through the same
//! driver without storing anything and reports which outputs (the variable, each state buffer)
//! would hold NaN or infinity ([`NonFiniteOutputs`]): an optimizer runs it over every variable
//! and writes only when all are finite, so a skipped update leaves everything bit-identical.
//! It reads what the update reads, so it costs about one more read pass of the buffers.

use crate::cast::exec::{PAR_MIN, check_isa};
use crate::error::{Error, Result, check_len};
use crate::isa::Isa;
use crate::threads;

/// One SGD step's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdParams {
    /// The learning rate.
    pub lr: f32,
    /// The momentum (0 means plain SGD and needs no momentum buffer).
    pub momentum: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
}

/// One RMSprop step's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmspropParams {
    /// The learning rate.
    pub lr: f32,
    /// The decay of the squared-gradient average.
    pub rho: f32,
    /// `1 - rho`, computed in float64 and rounded once.
    pub one_minus_rho: f32,
    /// The momentum (0 means none and needs no momentum buffer).
    pub momentum: f32,
    /// Added to the average inside the square root.
    pub epsilon: f32,
}

impl RmspropParams {
    /// The parameters from float64 hyperparameters, `1 - rho` computed before rounding.
    pub fn new(lr: f32, rho: f64, momentum: f32, epsilon: f32) -> Self {
        RmspropParams {
            lr,
            rho: rho as f32,
            one_minus_rho: (1.0 - rho) as f32,
            momentum,
            epsilon,
        }
    }
}

/// One Adam step's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamParams {
    /// The step size `lr * sqrt(1 - beta2^t) / (1 - beta1^t)`.
    pub alpha: f32,
    /// `1 - beta1`.
    pub one_minus_beta1: f32,
    /// `1 - beta2`.
    pub one_minus_beta2: f32,
    /// Added to `sqrt(v)` in the denominator.
    pub epsilon: f32,
    /// The learning rate, which scales the decoupled weight decay.
    pub lr: f32,
    /// The decoupled weight decay (0: plain Adam, and the variable is not read for it).
    pub weight_decay: f32,
}

impl AdamParams {
    /// The parameters of step `t` (1 for the first update), everything computed in float64 and
    /// rounded once.
    pub fn new(lr: f64, beta1: f64, beta2: f64, epsilon: f64, t: u64) -> Self {
        let t = t as f64;
        let alpha = lr * (1.0 - beta2.powf(t)).sqrt() / (1.0 - beta1.powf(t));
        AdamParams {
            alpha: alpha as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            epsilon: epsilon as f32,
            lr: lr as f32,
            weight_decay: 0.0,
        }
    }

    /// The same step with decoupled weight decay `weight_decay` (AdamW): `var - var *
    /// weight_decay * lr` before the update.
    pub fn with_weight_decay(mut self, weight_decay: f32) -> Self {
        self.weight_decay = weight_decay;
        self
    }
}

/// Which new values of an optimizer update would be NaN or infinite: what the checking twin of
/// an update ([`crate::Cpu::sgd_update_check`], [`crate::Cpu::rmsprop_update_check`],
/// [`crate::Cpu::adam_update_check`]) finds, computing the update with the same arithmetic and
/// writing nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NonFiniteOutputs(u32);

impl NonFiniteOutputs {
    /// The report for an update whose variable (`variable`) and state buffers (`state`, in the
    /// update's argument order, at most 31) would or would not hold NaN or infinity: what an
    /// update computed some other way (out of place, say) reports.
    pub fn from_flags(variable: bool, state: impl IntoIterator<Item = bool>) -> Self {
        let mut bits = u32::from(variable);
        for (i, s) in state.into_iter().take(31).enumerate() {
            bits |= u32::from(s) << (i + 1);
        }
        NonFiniteOutputs(bits)
    }

    /// Whether every new value would be finite: the update may be written.
    pub fn all_finite(self) -> bool {
        self.0 == 0
    }

    /// Whether the variable's new value would hold NaN or infinity somewhere.
    pub fn variable(self) -> bool {
        self.0 & 1 != 0
    }

    /// Whether state buffer `i` would, the buffers counted in the update's argument order
    /// (SGD: the momentum; RMSprop: the velocity, then the momentum; Adam: `m`, then `v`).
    pub fn state(self, i: usize) -> bool {
        i < 31 && (self.0 >> (i + 1)) & 1 != 0
    }
}

/// See [`crate::Cpu::sgd_update`].
pub(crate) fn sgd_update(
    isa: Isa,
    var: &mut [f32],
    grad: &[f32],
    momentum: Option<&mut [f32]>,
    p: SgdParams,
) -> Result<()> {
    const OP: &str = "sgd_update";
    sgd_args(OP, var.len(), grad, momentum.as_deref(), p)?;
    check_isa(OP, isa)?;
    let b = Bufs {
        n: var.len(),
        var: var.as_mut_ptr(),
        g: grad.as_ptr(),
        s1: used_mut(momentum, p.momentum != 0.0),
        s2: std::ptr::null_mut(),
    };
    // SAFETY: `isa` is supported; every buffer has the variable's length (checked) and is
    // borrowed, the written ones mutably, for the whole call.
    run(b, |c| unsafe { kernels::sgd::<WRITE>(isa, c, p) });
    Ok(())
}

/// See [`crate::Cpu::sgd_update_check`].
pub(crate) fn sgd_check(
    isa: Isa,
    var: &[f32],
    grad: &[f32],
    momentum: Option<&[f32]>,
    p: SgdParams,
) -> Result<NonFiniteOutputs> {
    const OP: &str = "sgd_update_check";
    sgd_args(OP, var.len(), grad, momentum, p)?;
    check_isa(OP, isa)?;
    let b = Bufs {
        n: var.len(),
        var: var.as_ptr().cast_mut(),
        g: grad.as_ptr(),
        s1: used(momentum, p.momentum != 0.0),
        s2: std::ptr::null_mut(),
    };
    // SAFETY: as in `sgd_update`; the `CHECK` pass only reads.
    Ok(NonFiniteOutputs(run(b, |c| unsafe {
        kernels::sgd::<CHECK>(isa, c, p)
    })))
}

fn sgd_args(
    op: &'static str,
    n: usize,
    grad: &[f32],
    momentum: Option<&[f32]>,
    p: SgdParams,
) -> Result<()> {
    check_len(op, "grad", grad.len(), n)?;
    if p.momentum != 0.0 {
        let m = momentum.ok_or_else(|| missing(op, "momentum", "p.momentum is not 0"))?;
        check_len(op, "momentum", m.len(), n)?;
    }
    Ok(())
}

/// See [`crate::Cpu::rmsprop_update`].
pub(crate) fn rmsprop_update(
    isa: Isa,
    var: &mut [f32],
    grad: &[f32],
    velocity: &mut [f32],
    momentum: Option<&mut [f32]>,
    p: RmspropParams,
) -> Result<()> {
    const OP: &str = "rmsprop_update";
    rmsprop_args(OP, var.len(), grad, velocity, momentum.as_deref(), p)?;
    check_isa(OP, isa)?;
    let b = Bufs {
        n: var.len(),
        var: var.as_mut_ptr(),
        g: grad.as_ptr(),
        s1: velocity.as_mut_ptr(),
        s2: used_mut(momentum, p.momentum > 0.0),
    };
    // SAFETY: as in `sgd_update`; the velocity is always given.
    run(b, |c| unsafe { kernels::rmsprop::<WRITE>(isa, c, p) });
    Ok(())
}

/// See [`crate::Cpu::rmsprop_update_check`].
pub(crate) fn rmsprop_check(
    isa: Isa,
    var: &[f32],
    grad: &[f32],
    velocity: &[f32],
    momentum: Option<&[f32]>,
    p: RmspropParams,
) -> Result<NonFiniteOutputs> {
    const OP: &str = "rmsprop_update_check";
    rmsprop_args(OP, var.len(), grad, velocity, momentum, p)?;
    check_isa(OP, isa)?;
    let b = Bufs {
        n: var.len(),
        var: var.as_ptr().cast_mut(),
        g: grad.as_ptr(),
        s1: velocity.as_ptr().cast_mut(),
        s2: used(momentum, p.momentum > 0.0),
    };
    // SAFETY: as in `rmsprop_update`; the `CHECK` pass only reads.
    Ok(NonFiniteOutputs(run(b, |c| unsafe {
        kernels::rmsprop::<CHECK>(isa, c, p)
    })))
}

fn rmsprop_args(
    op: &'static str,
    n: usize,
    grad: &[f32],
    velocity: &[f32],
    momentum: Option<&[f32]>,
    p: RmspropParams,
) -> Result<()> {
    check_len(op, "grad", grad.len(), n)?;
    check_len(op, "velocity", velocity.len(), n)?;
    if p.momentum > 0.0 {
        let m = momentum.ok_or_else(|| missing(op, "momentum", "p.momentum is above 0"))?;
        check_len(op, "momentum", m.len(), n)?;
    }
    Ok(())
}

/// See [`crate::Cpu::adam_update`].
pub(crate) fn adam_update(
    isa: Isa,
    var: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    p: AdamParams,
) -> Result<()> {
    const OP: &str = "adam_update";
    adam_args(OP, var.len(), grad, m, v)?;
    check_isa(OP, isa)?;
    let b = Bufs {
        n: var.len(),
        var: var.as_mut_ptr(),
        g: grad.as_ptr(),
        s1: m.as_mut_ptr(),
        s2: v.as_mut_ptr(),
    };
    // SAFETY: as in `sgd_update`; `m` and `v` are always given.
    run(b, |c| unsafe { kernels::adam::<WRITE>(isa, c, p) });
    Ok(())
}

/// See [`crate::Cpu::adam_update_check`].
pub(crate) fn adam_check(
    isa: Isa,
    var: &[f32],
    grad: &[f32],
    m: &[f32],
    v: &[f32],
    p: AdamParams,
) -> Result<NonFiniteOutputs> {
    const OP: &str = "adam_update_check";
    adam_args(OP, var.len(), grad, m, v)?;
    check_isa(OP, isa)?;
    let b = Bufs {
        n: var.len(),
        var: var.as_ptr().cast_mut(),
        g: grad.as_ptr(),
        s1: m.as_ptr().cast_mut(),
        s2: v.as_ptr().cast_mut(),
    };
    // SAFETY: as in `adam_update`; the `CHECK` pass only reads.
    Ok(NonFiniteOutputs(run(b, |c| unsafe {
        kernels::adam::<CHECK>(isa, c, p)
    })))
}

fn adam_args(op: &'static str, n: usize, grad: &[f32], m: &[f32], v: &[f32]) -> Result<()> {
    check_len(op, "grad", grad.len(), n)?;
    check_len(op, "m", m.len(), n)?;
    check_len(op, "v", v.len(), n)
}

fn missing(op: &'static str, what: &str, why: &str) -> Error {
    Error::InvalidArgument {
        op,
        what: format!("{what} buffer is required when {why}"),
    }
}

/// The pass that writes the new values.
const WRITE: bool = true;
/// The checking twin: the same arithmetic, nothing written, the non-finite outputs reported.
const CHECK: bool = false;

/// A state buffer the update uses (`used`), else null.
fn used_mut(s: Option<&mut [f32]>, used: bool) -> *mut f32 {
    match s {
        Some(s) if used => s.as_mut_ptr(),
        _ => std::ptr::null_mut(),
    }
}

/// [`used_mut`] for the checking twin, which never writes through the pointer.
fn used(s: Option<&[f32]>, used: bool) -> *mut f32 {
    match s {
        Some(s) if used => s.as_ptr().cast_mut(),
        _ => std::ptr::null_mut(),
    }
}

/// One update's buffers, `n` elements each, as pointers: the variable, the gradient and up to
/// two state buffers (null when the update has fewer; a null one is never dereferenced). The
/// update writes the variable and the state; its checking twin only reads them.
#[derive(Clone, Copy)]
struct Bufs {
    n: usize,
    var: *mut f32,
    g: *const f32,
    s1: *mut f32,
    s2: *mut f32,
}

// SAFETY: `run` hands the pool disjoint chunks of buffers that its caller borrows (mutably, for
// the pass that writes) for the whole call, so no two threads touch the same element.
unsafe impl Send for Bufs {}
// SAFETY: as for `Send`.
unsafe impl Sync for Bufs {}

impl Bufs {
    /// Elements `start..start + len`.
    ///
    /// # Safety
    /// `start + len <= self.n`.
    unsafe fn chunk(self, start: usize, len: usize) -> Bufs {
        let at = |p: *mut f32| {
            if p.is_null() {
                p
            } else {
                // SAFETY: in bounds (caller); null pointers stay null.
                unsafe { p.add(start) }
            }
        };
        Bufs {
            n: len,
            var: at(self.var),
            // SAFETY: in bounds (caller).
            g: unsafe { self.g.add(start) },
            s1: at(self.s1),
            s2: at(self.s2),
        }
    }
}

/// Runs `f` on the whole of `b`, or for large variables on contiguous chunks of it on the pool
/// (the chunks do not depend on the pass, so both passes compute the same values), and ORs
/// what the chunks report.
fn run(b: Bufs, f: impl Fn(Bufs) -> u32 + Sync) -> u32 {
    let n = b.n;
    if n < PAR_MIN || threads::num_threads() < 2 {
        return f(b);
    }
    let ch = n.div_ceil(4 * threads::num_threads()).next_multiple_of(64);
    let flags = std::sync::atomic::AtomicU32::new(0);
    threads::pool().for_each_index(n.div_ceil(ch), |i| {
        let start = i * ch;
        // SAFETY: `start + len <= n`.
        let part = f(unsafe { b.chunk(start, ch.min(n - start)) });
        flags.fetch_or(part, std::sync::atomic::Ordering::Relaxed);
    });
    flags.into_inner()
}

/// The update formulas, written once per instruction set with the same float32 operations, each
/// driven either to write (`WRITE = true`) or to report which outputs would not be finite
/// (`WRITE = false`, nothing written): one closure per formula serves both, so the check and the
/// update cannot disagree.
mod kernels {
    use super::{AdamParams, Bufs, RmspropParams, SgdParams};
    use crate::isa::Isa;

    /// The scalar formulas: `var` and `g` in, the new `var` out, state updated in place.
    pub(super) mod scalar {
        use super::*;

        #[inline(always)]
        pub(crate) fn sgd_plain(var: f32, g: f32, p: SgdParams) -> f32 {
            var - g * p.lr
        }

        #[inline(always)]
        pub(crate) fn sgd_momentum(var: f32, g: f32, m: &mut f32, p: SgdParams) -> f32 {
            let lr_g = g * p.lr;
            *m = *m * p.momentum - lr_g;
            if p.nesterov {
                var + (*m * p.momentum - lr_g)
            } else {
                var + *m
            }
        }

        #[inline(always)]
        pub(crate) fn rmsprop(
            var: f32,
            g: f32,
            v: &mut f32,
            mom: Option<&mut f32>,
            p: RmspropParams,
        ) -> f32 {
            *v = p.rho * *v + p.one_minus_rho * (g * g);
            let inc = (p.lr * g) / (*v + p.epsilon).sqrt();
            match mom {
                Some(mom) => {
                    *mom = p.momentum * *mom + inc;
                    var - *mom
                }
                None => var - inc,
            }
        }

        #[inline(always)]
        pub(crate) fn adam(var: f32, g: f32, m: &mut f32, v: &mut f32, p: AdamParams) -> f32 {
            let var = if p.weight_decay != 0.0 {
                var - var * p.weight_decay * p.lr
            } else {
                var
            };
            *m += (g - *m) * p.one_minus_beta1;
            *v += (g * g - *v) * p.one_minus_beta2;
            var - (*m * p.alpha) / (v.sqrt() + p.epsilon)
        }
    }

    /// The portable driver: `f(var, g, state)` for each element. With `WRITE` it stores the new
    /// variable and state; without, it stores nothing and returns which outputs were not finite
    /// (bit 0 the variable, bit `1 + j` state `j`).
    ///
    /// # Safety
    /// `b.var`, `b.g` and `st` valid for `b.n` elements (and writable with `WRITE`).
    #[inline(always)]
    unsafe fn drive<const NS: usize, const WRITE: bool>(
        b: Bufs,
        st: [*mut f32; NS],
        f: impl Fn(f32, f32, &mut [f32; NS]) -> f32,
    ) -> u32 {
        let mut bad = 0u32;
        for i in 0..b.n {
            // SAFETY: `i < b.n` (caller).
            unsafe {
                let mut s = [0.0f32; NS];
                for (s, p) in s.iter_mut().zip(st) {
                    *s = *p.add(i);
                }
                let x = f(*b.var.add(i), *b.g.add(i), &mut s);
                if WRITE {
                    *b.var.add(i) = x;
                    for (s, p) in s.iter().zip(st) {
                        *p.add(i) = *s;
                    }
                } else {
                    bad |= u32::from(!x.is_finite());
                    for (j, s) in s.iter().enumerate() {
                        bad |= u32::from(!s.is_finite()) << (j + 1);
                    }
                }
            }
        }
        bad
    }

    /// # Safety
    /// `isa` supported; `b` valid as [`drive`] requires; `b.s1` the momentum buffer, or null
    /// when `p.momentum` is 0.
    pub(super) unsafe fn sgd<const WRITE: bool>(isa: Isa, b: Bufs, p: SgdParams) -> u32 {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: forwarded from the caller.
            Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::sgd_avx512::<WRITE>(b, p) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: forwarded from the caller.
            Isa::Avx2 => unsafe { x86::sgd_avx2::<WRITE>(b, p) },
            // SAFETY: forwarded from the caller; the momentum pointer is used only when present.
            _ => unsafe {
                if b.s1.is_null() {
                    drive::<0, WRITE>(b, [], |x, g, _| scalar::sgd_plain(x, g, p))
                } else {
                    drive::<1, WRITE>(b, [b.s1], |x, g, [m]| scalar::sgd_momentum(x, g, m, p))
                }
            },
        }
    }

    /// # Safety
    /// `isa` supported; `b` valid as [`drive`] requires; `b.s1` the velocity, `b.s2` the
    /// momentum buffer or null when `p.momentum` is not above 0.
    pub(super) unsafe fn rmsprop<const WRITE: bool>(isa: Isa, b: Bufs, p: RmspropParams) -> u32 {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: forwarded from the caller.
            Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::rmsprop_avx512::<WRITE>(b, p) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: forwarded from the caller.
            Isa::Avx2 => unsafe { x86::rmsprop_avx2::<WRITE>(b, p) },
            // SAFETY: forwarded from the caller; the momentum pointer is used only when present.
            _ => unsafe {
                if b.s2.is_null() {
                    drive::<1, WRITE>(b, [b.s1], |x, g, [v]| scalar::rmsprop(x, g, v, None, p))
                } else {
                    drive::<2, WRITE>(b, [b.s1, b.s2], |x, g, [v, mom]| {
                        scalar::rmsprop(x, g, v, Some(mom), p)
                    })
                }
            },
        }
    }

    /// # Safety
    /// `isa` supported; `b` valid as [`drive`] requires; `b.s1` is `m`, `b.s2` is `v`.
    pub(super) unsafe fn adam<const WRITE: bool>(isa: Isa, b: Bufs, p: AdamParams) -> u32 {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: forwarded from the caller.
            Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::adam_avx512::<WRITE>(b, p) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: forwarded from the caller.
            Isa::Avx2 => unsafe { x86::adam_avx2::<WRITE>(b, p) },
            // SAFETY: forwarded from the caller.
            _ => unsafe {
                drive::<2, WRITE>(b, [b.s1, b.s2], |x, g, [m, v]| scalar::adam(x, g, m, v, p))
            },
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use core::arch::x86_64::*;

        use super::super::{AdamParams, Bufs, RmspropParams, SgdParams};
        use crate::cast::x86::{load8, load8_partial, store8, store8_partial, tail_mask16};

        /// `vfpclassps` categories: QNaN, +inf, -inf, SNaN.
        const NON_FINITE: i32 = 0x01 | 0x08 | 0x10 | 0x80;

        /// Runs `f(var, g, [s1, s2])` over 16 lanes at a time with a masked tail. With `WRITE`
        /// it stores the new `var` and the first `NS` state vectors back; without, it stores
        /// nothing and returns which outputs had a non-finite lane (bit 0 the variable, bit
        /// `1 + j` state `j`).
        ///
        /// # Safety
        /// `var`, `g` and the first `NS` state pointers valid for `n` elements (writable with
        /// `WRITE`).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        unsafe fn drive512<const NS: usize, const WRITE: bool>(
            n: usize,
            var: *mut f32,
            g: *const f32,
            st: [*mut f32; NS],
            f: impl Fn(__m512, __m512, &mut [__m512; NS]) -> __m512,
        ) -> u32 {
            let (mut bad_x, mut bad_s): (__mmask16, [__mmask16; NS]) = (0, [0; NS]);
            let mut i = 0;
            while i < n {
                let k = if i + 16 <= n {
                    0xffff
                } else {
                    tail_mask16(n - i)
                };
                // SAFETY: the mask keeps every access below `n`.
                unsafe {
                    let mut s = [_mm512_setzero_ps(); NS];
                    for (s, p) in s.iter_mut().zip(st) {
                        *s = _mm512_maskz_loadu_ps(k, p.add(i));
                    }
                    let x = f(
                        _mm512_maskz_loadu_ps(k, var.add(i)),
                        _mm512_maskz_loadu_ps(k, g.add(i)),
                        &mut s,
                    );
                    if WRITE {
                        _mm512_mask_storeu_ps(var.add(i), k, x);
                        for (s, p) in s.iter().zip(st) {
                            _mm512_mask_storeu_ps(p.add(i), k, *s);
                        }
                    } else {
                        bad_x |= _mm512_mask_fpclass_ps_mask::<NON_FINITE>(k, x);
                        for (b, s) in bad_s.iter_mut().zip(&s) {
                            *b |= _mm512_mask_fpclass_ps_mask::<NON_FINITE>(k, *s);
                        }
                    }
                }
                i += 16;
            }
            bits(bad_x != 0, bad_s.map(|b| b != 0))
        }

        /// As [`drive512`], 8 lanes at a time with a buffered tail.
        ///
        /// # Safety
        /// As [`drive512`].
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn drive256<const NS: usize, const WRITE: bool>(
            n: usize,
            var: *mut f32,
            g: *const f32,
            st: [*mut f32; NS],
            f: impl Fn(__m256, __m256, &mut [__m256; NS]) -> __m256,
        ) -> u32 {
            // A lane is not finite when its exponent bits are all ones.
            let exp = _mm256_set1_epi32(0x7f80_0000);
            let non_finite = |v: __m256| {
                let e = _mm256_and_si256(_mm256_castps_si256(v), exp);
                _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(e, exp)))
            };
            let (mut bad_x, mut bad_s) = (0i32, [0i32; NS]);
            let mut i = 0;
            while i < n {
                let c = (n - i).min(8);
                let lanes = (1i32 << c) - 1;
                // SAFETY: full or partial accesses of `c` elements below `n`.
                unsafe {
                    let load = |p: *const f32| {
                        if c == 8 {
                            load8(p)
                        } else {
                            load8_partial(p, c)
                        }
                    };
                    let store = |p: *mut f32, v| {
                        if c == 8 {
                            store8(p, v)
                        } else {
                            store8_partial(p, c, v)
                        }
                    };
                    let mut s = [_mm256_setzero_ps(); NS];
                    for (s, p) in s.iter_mut().zip(st) {
                        *s = load(p.add(i));
                    }
                    let x = f(load(var.add(i)), load(g.add(i)), &mut s);
                    if WRITE {
                        store(var.add(i), x);
                        for (s, p) in s.iter().zip(st) {
                            store(p.add(i), *s);
                        }
                    } else {
                        bad_x |= non_finite(x) & lanes;
                        for (b, s) in bad_s.iter_mut().zip(&s) {
                            *b |= non_finite(*s) & lanes;
                        }
                    }
                }
                i += c;
            }
            bits(bad_x != 0, bad_s.map(|b| b != 0))
        }

        /// The report of a driver: bit 0 the variable, bit `1 + j` state `j`.
        #[inline(always)]
        fn bits<const NS: usize>(var: bool, state: [bool; NS]) -> u32 {
            let mut out = u32::from(var);
            for (j, s) in state.into_iter().enumerate() {
                out |= u32::from(s) << (j + 1);
            }
            out
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        pub(super) unsafe fn sgd_avx512<const WRITE: bool>(b: Bufs, p: SgdParams) -> u32 {
            let lr = _mm512_set1_ps(p.lr);
            let mo = _mm512_set1_ps(p.momentum);
            // SAFETY: `b` valid (caller); the momentum pointer is used only when present.
            unsafe {
                match (b.s1.is_null(), p.nesterov) {
                    (true, _) => drive512::<0, WRITE>(b.n, b.var, b.g, [], |x, g, _| {
                        _mm512_sub_ps(x, _mm512_mul_ps(g, lr))
                    }),
                    (false, nesterov) => {
                        drive512::<1, WRITE>(b.n, b.var, b.g, [b.s1], |x, g, [m]| {
                            let lr_g = _mm512_mul_ps(g, lr);
                            *m = _mm512_sub_ps(_mm512_mul_ps(*m, mo), lr_g);
                            if nesterov {
                                _mm512_add_ps(x, _mm512_sub_ps(_mm512_mul_ps(*m, mo), lr_g))
                            } else {
                                _mm512_add_ps(x, *m)
                            }
                        })
                    }
                }
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn sgd_avx2<const WRITE: bool>(b: Bufs, p: SgdParams) -> u32 {
            let lr = _mm256_set1_ps(p.lr);
            let mo = _mm256_set1_ps(p.momentum);
            // SAFETY: as in `sgd_avx512`.
            unsafe {
                match (b.s1.is_null(), p.nesterov) {
                    (true, _) => drive256::<0, WRITE>(b.n, b.var, b.g, [], |x, g, _| {
                        _mm256_sub_ps(x, _mm256_mul_ps(g, lr))
                    }),
                    (false, nesterov) => {
                        drive256::<1, WRITE>(b.n, b.var, b.g, [b.s1], |x, g, [m]| {
                            let lr_g = _mm256_mul_ps(g, lr);
                            *m = _mm256_sub_ps(_mm256_mul_ps(*m, mo), lr_g);
                            if nesterov {
                                _mm256_add_ps(x, _mm256_sub_ps(_mm256_mul_ps(*m, mo), lr_g))
                            } else {
                                _mm256_add_ps(x, *m)
                            }
                        })
                    }
                }
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        pub(super) unsafe fn rmsprop_avx512<const WRITE: bool>(b: Bufs, p: RmspropParams) -> u32 {
            let (rho, omr) = (_mm512_set1_ps(p.rho), _mm512_set1_ps(p.one_minus_rho));
            let (lr, eps, mo) = (
                _mm512_set1_ps(p.lr),
                _mm512_set1_ps(p.epsilon),
                _mm512_set1_ps(p.momentum),
            );
            let inc = |g: __m512, v: &mut __m512| {
                *v = _mm512_add_ps(
                    _mm512_mul_ps(rho, *v),
                    _mm512_mul_ps(omr, _mm512_mul_ps(g, g)),
                );
                _mm512_div_ps(_mm512_mul_ps(lr, g), _mm512_sqrt_ps(_mm512_add_ps(*v, eps)))
            };
            // SAFETY: `b` valid (caller); the momentum pointer is used only when present.
            unsafe {
                if b.s2.is_null() {
                    drive512::<1, WRITE>(b.n, b.var, b.g, [b.s1], |x, g, [v]| {
                        _mm512_sub_ps(x, inc(g, v))
                    })
                } else {
                    drive512::<2, WRITE>(b.n, b.var, b.g, [b.s1, b.s2], |x, g, [v, m]| {
                        let d = inc(g, v);
                        *m = _mm512_add_ps(_mm512_mul_ps(mo, *m), d);
                        _mm512_sub_ps(x, *m)
                    })
                }
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn rmsprop_avx2<const WRITE: bool>(b: Bufs, p: RmspropParams) -> u32 {
            let (rho, omr) = (_mm256_set1_ps(p.rho), _mm256_set1_ps(p.one_minus_rho));
            let (lr, eps, mo) = (
                _mm256_set1_ps(p.lr),
                _mm256_set1_ps(p.epsilon),
                _mm256_set1_ps(p.momentum),
            );
            let inc = |g: __m256, v: &mut __m256| {
                *v = _mm256_add_ps(
                    _mm256_mul_ps(rho, *v),
                    _mm256_mul_ps(omr, _mm256_mul_ps(g, g)),
                );
                _mm256_div_ps(_mm256_mul_ps(lr, g), _mm256_sqrt_ps(_mm256_add_ps(*v, eps)))
            };
            // SAFETY: as in `rmsprop_avx512`.
            unsafe {
                if b.s2.is_null() {
                    drive256::<1, WRITE>(b.n, b.var, b.g, [b.s1], |x, g, [v]| {
                        _mm256_sub_ps(x, inc(g, v))
                    })
                } else {
                    drive256::<2, WRITE>(b.n, b.var, b.g, [b.s1, b.s2], |x, g, [v, m]| {
                        let d = inc(g, v);
                        *m = _mm256_add_ps(_mm256_mul_ps(mo, *m), d);
                        _mm256_sub_ps(x, *m)
                    })
                }
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        pub(super) unsafe fn adam_avx512<const WRITE: bool>(b: Bufs, p: AdamParams) -> u32 {
            let (b1, b2) = (
                _mm512_set1_ps(p.one_minus_beta1),
                _mm512_set1_ps(p.one_minus_beta2),
            );
            let (alpha, eps) = (_mm512_set1_ps(p.alpha), _mm512_set1_ps(p.epsilon));
            let decay = p.weight_decay != 0.0;
            let (wd, lr) = (_mm512_set1_ps(p.weight_decay), _mm512_set1_ps(p.lr));
            // SAFETY: `b` valid (caller).
            unsafe {
                drive512::<2, WRITE>(b.n, b.var, b.g, [b.s1, b.s2], |x, g, [m, v]| {
                    *m = _mm512_add_ps(*m, _mm512_mul_ps(_mm512_sub_ps(g, *m), b1));
                    *v = _mm512_add_ps(
                        *v,
                        _mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(g, g), *v), b2),
                    );
                    let den = _mm512_add_ps(_mm512_sqrt_ps(*v), eps);
                    let x = if decay {
                        _mm512_sub_ps(x, _mm512_mul_ps(_mm512_mul_ps(x, wd), lr))
                    } else {
                        x
                    };
                    _mm512_sub_ps(x, _mm512_div_ps(_mm512_mul_ps(*m, alpha), den))
                })
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn adam_avx2<const WRITE: bool>(b: Bufs, p: AdamParams) -> u32 {
            let (b1, b2) = (
                _mm256_set1_ps(p.one_minus_beta1),
                _mm256_set1_ps(p.one_minus_beta2),
            );
            let (alpha, eps) = (_mm256_set1_ps(p.alpha), _mm256_set1_ps(p.epsilon));
            let decay = p.weight_decay != 0.0;
            let (wd, lr) = (_mm256_set1_ps(p.weight_decay), _mm256_set1_ps(p.lr));
            // SAFETY: `b` valid (caller).
            unsafe {
                drive256::<2, WRITE>(b.n, b.var, b.g, [b.s1, b.s2], |x, g, [m, v]| {
                    *m = _mm256_add_ps(*m, _mm256_mul_ps(_mm256_sub_ps(g, *m), b1));
                    *v = _mm256_add_ps(
                        *v,
                        _mm256_mul_ps(_mm256_sub_ps(_mm256_mul_ps(g, g), *v), b2),
                    );
                    let den = _mm256_add_ps(_mm256_sqrt_ps(*v), eps);
                    let x = if decay {
                        _mm256_sub_ps(x, _mm256_mul_ps(_mm256_mul_ps(x, wd), lr))
                    } else {
                        x
                    };
                    _mm256_sub_ps(x, _mm256_div_ps(_mm256_mul_ps(*m, alpha), den))
                })
            }
        }
    }
}
