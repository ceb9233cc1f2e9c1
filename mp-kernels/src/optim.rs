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

use rayon::prelude::*;

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

/// See [`crate::Cpu::sgd_update`].
pub(crate) fn sgd_update(
    isa: Isa,
    var: &mut [f32],
    grad: &[f32],
    momentum: Option<&mut [f32]>,
    p: SgdParams,
) -> Result<()> {
    const OP: &str = "sgd_update";
    check_len(OP, "grad", grad.len(), var.len())?;
    let m = if p.momentum != 0.0 {
        let m = momentum.ok_or_else(|| missing(OP, "momentum", "p.momentum is not 0"))?;
        check_len(OP, "momentum", m.len(), var.len())?;
        Some(m)
    } else {
        None
    };
    check_isa(OP, isa)?;
    split(var, grad, m, None, |var, g, m, _| {
        // SAFETY: `isa` is supported; the chunks have equal lengths.
        unsafe { kernels::sgd(isa, var, g, m, p) }
    });
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
    check_len(OP, "grad", grad.len(), var.len())?;
    check_len(OP, "velocity", velocity.len(), var.len())?;
    let mom = if p.momentum > 0.0 {
        let m = momentum.ok_or_else(|| missing(OP, "momentum", "p.momentum is above 0"))?;
        check_len(OP, "momentum", m.len(), var.len())?;
        Some(m)
    } else {
        None
    };
    check_isa(OP, isa)?;
    split(var, grad, Some(velocity), mom, |var, g, v, mom| {
        // SAFETY: `isa` is supported; the chunks have equal lengths; `v` is always given.
        unsafe { kernels::rmsprop(isa, var, g, v.unwrap_or_default(), mom, p) }
    });
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
    check_len(OP, "grad", grad.len(), var.len())?;
    check_len(OP, "m", m.len(), var.len())?;
    check_len(OP, "v", v.len(), var.len())?;
    check_isa(OP, isa)?;
    split(var, grad, Some(m), Some(v), |var, g, m, v| {
        // SAFETY: `isa` is supported; the chunks have equal lengths; `m` and `v` always given.
        unsafe { kernels::adam(isa, var, g, m.unwrap_or_default(), v.unwrap_or_default(), p) }
    });
    Ok(())
}

fn missing(op: &'static str, what: &str, why: &str) -> Error {
    Error::InvalidArgument {
        op,
        what: format!("{what} buffer is required when {why}"),
    }
}

type Chunk<'a> = (
    &'a mut [f32],
    &'a [f32],
    Option<&'a mut [f32]>,
    Option<&'a mut [f32]>,
);

/// Runs `f` on matching chunks of the variable, gradient and up to two state buffers (all of the
/// variable's length), on the pool for large variables.
fn split(
    var: &mut [f32],
    grad: &[f32],
    s1: Option<&mut [f32]>,
    s2: Option<&mut [f32]>,
    f: impl Fn(&mut [f32], &[f32], Option<&mut [f32]>, Option<&mut [f32]>) + Sync,
) {
    let n = var.len();
    if n < PAR_MIN || threads::num_threads() < 2 {
        return f(var, grad, s1, s2);
    }
    let ch = n.div_ceil(4 * threads::num_threads()).next_multiple_of(64);
    let mut chunks: Vec<Chunk<'_>> = Vec::with_capacity(n.div_ceil(ch));
    let mut s1 = s1.map(|s| s.chunks_mut(ch));
    let mut s2 = s2.map(|s| s.chunks_mut(ch));
    for (v, g) in var.chunks_mut(ch).zip(grad.chunks(ch)) {
        let a = s1.as_mut().and_then(Iterator::next);
        let b = s2.as_mut().and_then(Iterator::next);
        chunks.push((v, g, a, b));
    }
    threads::pool().install(|| {
        chunks
            .into_par_iter()
            .for_each(|(v, g, a, b)| f(v, g, a, b))
    });
}

/// The update formulas, written once per instruction set with the same float32 operations.
mod kernels {
    use super::{AdamParams, RmspropParams, SgdParams};
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

    /// # Safety
    /// `isa` supported; all slices of equal length.
    pub(super) unsafe fn sgd(
        isa: Isa,
        var: &mut [f32],
        g: &[f32],
        m: Option<&mut [f32]>,
        p: SgdParams,
    ) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: forwarded from the caller.
            Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::sgd_avx512(var, g, m, p) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: forwarded from the caller.
            Isa::Avx2 => unsafe { x86::sgd_avx2(var, g, m, p) },
            _ => match m {
                None => var
                    .iter_mut()
                    .zip(g)
                    .for_each(|(x, &g)| *x = scalar::sgd_plain(*x, g, p)),
                Some(m) => {
                    for ((x, &g), m) in var.iter_mut().zip(g).zip(m) {
                        *x = scalar::sgd_momentum(*x, g, m, p);
                    }
                }
            },
        }
    }

    /// # Safety
    /// `isa` supported; all slices of equal length.
    pub(super) unsafe fn rmsprop(
        isa: Isa,
        var: &mut [f32],
        g: &[f32],
        v: &mut [f32],
        mom: Option<&mut [f32]>,
        p: RmspropParams,
    ) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: forwarded from the caller.
            Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::rmsprop_avx512(var, g, v, mom, p) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: forwarded from the caller.
            Isa::Avx2 => unsafe { x86::rmsprop_avx2(var, g, v, mom, p) },
            _ => match mom {
                None => {
                    for ((x, &g), v) in var.iter_mut().zip(g).zip(v) {
                        *x = scalar::rmsprop(*x, g, v, None, p);
                    }
                }
                Some(mom) => {
                    for (((x, &g), v), mom) in var.iter_mut().zip(g).zip(v).zip(mom) {
                        *x = scalar::rmsprop(*x, g, v, Some(mom), p);
                    }
                }
            },
        }
    }

    /// # Safety
    /// `isa` supported; all slices of equal length.
    pub(super) unsafe fn adam(
        isa: Isa,
        var: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        p: AdamParams,
    ) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: forwarded from the caller.
            Isa::Avx512 | Isa::Avx512Bf16 => unsafe { x86::adam_avx512(var, g, m, v, p) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: forwarded from the caller.
            Isa::Avx2 => unsafe { x86::adam_avx2(var, g, m, v, p) },
            _ => {
                for (((x, &g), m), v) in var.iter_mut().zip(g).zip(m).zip(v) {
                    *x = scalar::adam(*x, g, m, v, p);
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use core::arch::x86_64::*;

        use super::super::{AdamParams, RmspropParams, SgdParams};
        use crate::cast::x86::{load8, load8_partial, store8, store8_partial, tail_mask16};

        /// Null when absent (then never dereferenced).
        fn ptr(s: &mut Option<&mut [f32]>) -> *mut f32 {
            s.as_deref_mut()
                .map_or(std::ptr::null_mut(), <[f32]>::as_mut_ptr)
        }

        /// Runs `f(var, g, [s1, s2])` over 16 lanes at a time with a masked tail, storing the new
        /// `var` and the first `NS` state vectors back.
        ///
        /// # Safety
        /// `var`, `g` and the first `NS` state pointers valid for `n` elements.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        unsafe fn drive512<const NS: usize>(
            n: usize,
            var: *mut f32,
            g: *const f32,
            st: [*mut f32; NS],
            f: impl Fn(__m512, __m512, &mut [__m512; NS]) -> __m512,
        ) {
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
                    _mm512_mask_storeu_ps(var.add(i), k, x);
                    for (s, p) in s.iter().zip(st) {
                        _mm512_mask_storeu_ps(p.add(i), k, *s);
                    }
                }
                i += 16;
            }
        }

        /// As [`drive512`], 8 lanes at a time with a buffered tail.
        ///
        /// # Safety
        /// As [`drive512`].
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn drive256<const NS: usize>(
            n: usize,
            var: *mut f32,
            g: *const f32,
            st: [*mut f32; NS],
            f: impl Fn(__m256, __m256, &mut [__m256; NS]) -> __m256,
        ) {
            let mut i = 0;
            while i < n {
                let c = (n - i).min(8);
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
                    store(var.add(i), x);
                    for (s, p) in s.iter().zip(st) {
                        store(p.add(i), *s);
                    }
                }
                i += c;
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        pub(super) unsafe fn sgd_avx512(
            var: &mut [f32],
            g: &[f32],
            mut m: Option<&mut [f32]>,
            p: SgdParams,
        ) {
            let (n, x, gp, mp) = (var.len(), var.as_mut_ptr(), g.as_ptr(), ptr(&mut m));
            let lr = _mm512_set1_ps(p.lr);
            let mo = _mm512_set1_ps(p.momentum);
            // SAFETY: equal lengths (caller); the momentum pointer is used only when present.
            unsafe {
                match (m.is_some(), p.nesterov) {
                    (false, _) => drive512(n, x, gp, [], |x, g, _| {
                        _mm512_sub_ps(x, _mm512_mul_ps(g, lr))
                    }),
                    (true, nesterov) => drive512(n, x, gp, [mp], |x, g, [m]| {
                        let lr_g = _mm512_mul_ps(g, lr);
                        *m = _mm512_sub_ps(_mm512_mul_ps(*m, mo), lr_g);
                        if nesterov {
                            _mm512_add_ps(x, _mm512_sub_ps(_mm512_mul_ps(*m, mo), lr_g))
                        } else {
                            _mm512_add_ps(x, *m)
                        }
                    }),
                }
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn sgd_avx2(
            var: &mut [f32],
            g: &[f32],
            mut m: Option<&mut [f32]>,
            p: SgdParams,
        ) {
            let (n, x, gp, mp) = (var.len(), var.as_mut_ptr(), g.as_ptr(), ptr(&mut m));
            let lr = _mm256_set1_ps(p.lr);
            let mo = _mm256_set1_ps(p.momentum);
            // SAFETY: as in `sgd_avx512`.
            unsafe {
                match (m.is_some(), p.nesterov) {
                    (false, _) => drive256(n, x, gp, [], |x, g, _| {
                        _mm256_sub_ps(x, _mm256_mul_ps(g, lr))
                    }),
                    (true, nesterov) => drive256(n, x, gp, [mp], |x, g, [m]| {
                        let lr_g = _mm256_mul_ps(g, lr);
                        *m = _mm256_sub_ps(_mm256_mul_ps(*m, mo), lr_g);
                        if nesterov {
                            _mm256_add_ps(x, _mm256_sub_ps(_mm256_mul_ps(*m, mo), lr_g))
                        } else {
                            _mm256_add_ps(x, *m)
                        }
                    }),
                }
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        pub(super) unsafe fn rmsprop_avx512(
            var: &mut [f32],
            g: &[f32],
            v: &mut [f32],
            mut mom: Option<&mut [f32]>,
            p: RmspropParams,
        ) {
            let (n, x, gp, vp, mp) = (
                var.len(),
                var.as_mut_ptr(),
                g.as_ptr(),
                v.as_mut_ptr(),
                ptr(&mut mom),
            );
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
            // SAFETY: equal lengths (caller); the momentum pointer is used only when present.
            unsafe {
                if mom.is_some() {
                    drive512(n, x, gp, [vp, mp], |x, g, [v, m]| {
                        let d = inc(g, v);
                        *m = _mm512_add_ps(_mm512_mul_ps(mo, *m), d);
                        _mm512_sub_ps(x, *m)
                    })
                } else {
                    drive512(n, x, gp, [vp], |x, g, [v]| _mm512_sub_ps(x, inc(g, v)))
                }
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn rmsprop_avx2(
            var: &mut [f32],
            g: &[f32],
            v: &mut [f32],
            mut mom: Option<&mut [f32]>,
            p: RmspropParams,
        ) {
            let (n, x, gp, vp, mp) = (
                var.len(),
                var.as_mut_ptr(),
                g.as_ptr(),
                v.as_mut_ptr(),
                ptr(&mut mom),
            );
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
                if mom.is_some() {
                    drive256(n, x, gp, [vp, mp], |x, g, [v, m]| {
                        let d = inc(g, v);
                        *m = _mm256_add_ps(_mm256_mul_ps(mo, *m), d);
                        _mm256_sub_ps(x, *m)
                    })
                } else {
                    drive256(n, x, gp, [vp], |x, g, [v]| _mm256_sub_ps(x, inc(g, v)))
                }
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        pub(super) unsafe fn adam_avx512(
            var: &mut [f32],
            g: &[f32],
            m: &mut [f32],
            v: &mut [f32],
            p: AdamParams,
        ) {
            let (n, x, gp) = (var.len(), var.as_mut_ptr(), g.as_ptr());
            let (b1, b2) = (
                _mm512_set1_ps(p.one_minus_beta1),
                _mm512_set1_ps(p.one_minus_beta2),
            );
            let (alpha, eps) = (_mm512_set1_ps(p.alpha), _mm512_set1_ps(p.epsilon));
            let decay = p.weight_decay != 0.0;
            let (wd, lr) = (_mm512_set1_ps(p.weight_decay), _mm512_set1_ps(p.lr));
            // SAFETY: equal lengths (caller).
            unsafe {
                drive512(
                    n,
                    x,
                    gp,
                    [m.as_mut_ptr(), v.as_mut_ptr()],
                    |x, g, [m, v]| {
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
                    },
                )
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn adam_avx2(
            var: &mut [f32],
            g: &[f32],
            m: &mut [f32],
            v: &mut [f32],
            p: AdamParams,
        ) {
            let (n, x, gp) = (var.len(), var.as_mut_ptr(), g.as_ptr());
            let (b1, b2) = (
                _mm256_set1_ps(p.one_minus_beta1),
                _mm256_set1_ps(p.one_minus_beta2),
            );
            let (alpha, eps) = (_mm256_set1_ps(p.alpha), _mm256_set1_ps(p.epsilon));
            let decay = p.weight_decay != 0.0;
            let (wd, lr) = (_mm256_set1_ps(p.weight_decay), _mm256_set1_ps(p.lr));
            // SAFETY: equal lengths (caller).
            unsafe {
                drive256(
                    n,
                    x,
                    gp,
                    [m.as_mut_ptr(), v.as_mut_ptr()],
                    |x, g, [m, v]| {
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
                    },
                )
            }
        }
    }
}
