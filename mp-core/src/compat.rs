//! The mixed precision compatibility check for this machine.
//!
//! Keras prints `Mixed precision compatibility check (mixed_float16): OK` when the GPU has
//! float16 tensor cores. mp does the same for the CPU it runs on, from what was **measured**
//! there ([`Measured`], filled by mp-kernels' calibration), not from its flags alone: a flag says
//! what an instruction can run, not how fast. `vdpbf16ps` (AVX512_BF16) runs at twice the
//! float32 FMA rate on AMD Zen 4 and at half of it on recent Intel Xeons, where mixed_bfloat16
//! then widens to float32 FMA and still halves activation memory. [`CpuFeatures`] detects the
//! flags (F16C, AVX-512, AVX512_BF16, AVX512_FP16, AMX-BF16) for the messages; without F16C,
//! float16 is slow to even load.
//!
//! On an NVIDIA GPU the check is Keras' (see [`check_gpu`]): float16 tensor cores need compute
//! capability 7.0 or higher, bfloat16 ones 8.0. Under a 16-bit policy, tensor cores are used
//! only when the GEMM dimensions are multiples of 8, which [`tensor_core_shape_warning`] checks.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::dtype::DType;
use crate::policy::Policy;

/// What the CPU offers for 16-bit floating point, detected at run time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CpuFeatures {
    /// AVX2 (256-bit integer and float SIMD).
    pub avx2: bool,
    /// Fused multiply-add.
    pub fma: bool,
    /// float16 ↔ float32 conversion instructions.
    pub f16c: bool,
    /// AVX-512 Foundation.
    pub avx512f: bool,
    /// AVX512_BF16: `vdpbf16ps` (bfloat16 pair dot products into float32).
    pub avx512_bf16: bool,
    /// AVX512_FP16: float16 arithmetic.
    pub avx512_fp16: bool,
    /// AMX-BF16 tile matrix multiplies (reported by CPUID).
    pub amx_bf16: bool,
}

impl CpuFeatures {
    /// Detects the features of the CPU this runs on.
    pub fn detect() -> CpuFeatures {
        #[cfg(target_arch = "x86_64")]
        {
            CpuFeatures {
                avx2: is_x86_feature_detected!("avx2"),
                fma: is_x86_feature_detected!("fma"),
                f16c: is_x86_feature_detected!("f16c"),
                avx512f: is_x86_feature_detected!("avx512f"),
                avx512_bf16: is_x86_feature_detected!("avx512bf16"),
                avx512_fp16: is_x86_feature_detected!("avx512fp16"),
                amx_bf16: amx_bf16_cpuid(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuFeatures::default()
        }
    }

    /// Whether bfloat16 dot products run natively (AVX512_BF16 or AMX-BF16).
    pub fn fast_bf16(&self) -> bool {
        self.avx512_bf16 || self.amx_bf16
    }

    /// The names of the 16-bit features present, for messages.
    pub fn summary(&self) -> String {
        let mut names = vec![];
        for (on, name) in [
            (self.f16c, "F16C"),
            (self.avx512f, "AVX-512"),
            (self.avx512_bf16, "AVX512_BF16"),
            (self.avx512_fp16, "AVX512_FP16"),
            (self.amx_bf16, "AMX-BF16"),
        ] {
            if on {
                names.push(name);
            }
        }
        if names.is_empty() {
            "no 16-bit float features".to_string()
        } else {
            names.join(", ")
        }
    }
}

/// AMX-BF16 is CPUID leaf 7, sub-leaf 0, EDX bit 22 (`is_x86_feature_detected!("amx-bf16")` is
/// not stable yet).
#[cfg(target_arch = "x86_64")]
fn amx_bf16_cpuid() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    #[allow(unused_unsafe)]
    // SAFETY: CPUID is available on every x86_64 CPU; leaf 7 is read only if the maximum leaf
    // reported by leaf 0 includes it.
    unsafe {
        if __cpuid(0).eax < 7 {
            return false;
        }
        __cpuid_count(7, 0).edx & (1 << 22) != 0
    }
}

/// The verdict of the compatibility check for one policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompatReport {
    /// The policy checked.
    pub policy: Policy,
    /// Whether the policy is expected to run at least as fast as float32 here.
    pub ok: bool,
    /// Why, in one sentence.
    pub reason: String,
}

impl fmt::Display for CompatReport {
    /// `Mixed precision compatibility check (mixed_bfloat16): OK` and the reason on a second line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Mixed precision compatibility check ({}): {}\n{}",
            self.policy.name(),
            if self.ok { "OK" } else { "WARNING" },
            self.reason
        )
    }
}

/// What was measured on this CPU: the arithmetic peaks and the GEMM rate of every path timed
/// per input dtype, with the path chosen for each (mp-kernels' `calibrate` module measures it;
/// this crate only reads it, so the verdicts are testable from fixed figures).
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    /// The float32 FMA peak of all kernel threads, GFLOP/s.
    pub fma_f32_gflops: f64,
    /// The `vdpbf16ps` peak, GFLOP/s (`None` without AVX512_BF16).
    pub dpbf16_gflops: Option<f64>,
    /// Every timed GEMM path's rate.
    pub rates: Vec<PathRate>,
    /// The path chosen per input dtype (float32, bfloat16, float16), by name.
    pub chosen: [(DType, &'static str); 3],
}

/// One GEMM path's measured rate for one input dtype.
#[derive(Clone, Debug, PartialEq)]
pub struct PathRate {
    /// The input dtype.
    pub dtype: DType,
    /// The path's name (`avx512-6x64`, `avx512bf16-dot`, ...).
    pub path: &'static str,
    /// GFLOP/s on the calibration GEMM.
    pub gflops: f64,
}

/// The name of the bfloat16 dot-product GEMM path.
const DOT_PATH: &str = "avx512bf16-dot";
/// A mixed policy at least this fraction of float32's GEMM rate counts as no slower (it still
/// halves activation memory, which the rest of a step gains from).
const NO_SLOWER: f64 = 0.97;

impl Measured {
    /// The chosen path for `dtype`.
    pub fn chosen(&self, dtype: DType) -> &'static str {
        self.chosen
            .iter()
            .find(|(d, _)| *d == dtype)
            .map_or("none", |(_, p)| *p)
    }

    /// The measured rate of the chosen path for `dtype`, if it was timed.
    pub fn chosen_rate(&self, dtype: DType) -> Option<f64> {
        let path = self.chosen(dtype);
        self.rates
            .iter()
            .find(|r| r.dtype == dtype && r.path == path)
            .map(|r| r.gflops)
            .filter(|g| g.is_finite() && *g > 0.0)
    }

    /// The chosen path's GEMM rate for `dtype` over float32's, if both were timed.
    pub fn speedup(&self, dtype: DType) -> Option<f64> {
        Some(self.chosen_rate(dtype)? / self.chosen_rate(DType::F32)?)
    }

    /// `vdpbf16ps`'s peak over the float32 FMA peak.
    pub fn dot_ratio(&self) -> Option<f64> {
        self.dpbf16_gflops.map(|d| d / self.fma_f32_gflops)
    }
}

/// Checks `policy` against a CPU's features and what was measured on it (mp-kernels'
/// `calibrate::check` calls this with this machine's figures).
pub fn check_with(policy: Policy, cpu: &CpuFeatures, m: &Measured) -> CompatReport {
    let ratio = |d| {
        m.speedup(d)
            .map_or("an unmeasured".to_string(), |r| format!("{r:.2}x"))
    };
    let (ok, reason) = match policy {
        Policy::Float32 => (
            true,
            "float32 runs everywhere; it is the baseline.".to_string(),
        ),
        Policy::MixedBFloat16 => {
            let fast = m.speedup(DType::BF16).is_some_and(|r| r >= NO_SLOWER);
            let dots = match m.dot_ratio() {
                Some(r) => format!(
                    "bfloat16 dot products (vdpbf16ps) run at {r:.2}x the float32 rate here"
                ),
                None => "this CPU has no bfloat16 dot product (AVX512_BF16)".to_string(),
            };
            let path = m.chosen(DType::BF16);
            let reason = if fast && path == DOT_PATH {
                format!(
                    "Your CPU will likely run quickly with dtype policy mixed_bfloat16: {dots}, and \
                     bfloat16 GEMMs measured {} float32's.",
                    ratio(DType::BF16)
                )
            } else if fast {
                format!(
                    "{dots}; mixed_bfloat16 uses float32 FMA ({path}, bfloat16 widened while \
                     packing; GEMMs measured {} float32's) and still halves activation memory.",
                    ratio(DType::BF16)
                )
            } else {
                format!(
                    "The dtype policy mixed_bfloat16 may run slowly here: {dots}, and bfloat16 \
                     GEMMs ({path}) measured {} float32's. It still halves activation memory.",
                    ratio(DType::BF16)
                )
            };
            (fast, reason)
        }
        Policy::MixedFloat16 if !cpu.f16c => (
            false,
            "The dtype policy mixed_float16 will run slowly: this CPU has no F16C, so every \
             float16 value is converted in software. Use float32."
                .to_string(),
        ),
        Policy::MixedFloat16 => {
            let fast = m.speedup(DType::F16).is_some_and(|r| r >= NO_SLOWER);
            let path = m.chosen(DType::F16);
            let reason = if fast {
                format!(
                    "mixed_float16 runs at float32 speed here (float16 widened to float32 while \
                     packing, {path}; GEMMs measured {} float32's) and halves activation \
                     memory; it needs loss scaling, which fit applies.",
                    ratio(DType::F16)
                )
            } else {
                format!(
                    "The dtype policy mixed_float16 may run slowly here: float16 GEMMs ({path}, \
                     widened to float32 while packing) measured {} float32's.",
                    ratio(DType::F16)
                )
            };
            (fast, reason)
        }
    };
    CompatReport { policy, ok, reason }
}

/// The policy the measurement recommends: `mixed_bfloat16` when its GEMMs run at least 0.97x
/// float32's here (it needs no loss scaling and halves activation memory), else
/// `mixed_float16` under the same rule, else `float32` (also when nothing was timed).
pub fn recommended_policy_for(m: &Measured) -> Policy {
    let no_slower = |d| m.speedup(d).is_some_and(|r| r >= NO_SLOWER);
    if no_slower(DType::BF16) {
        Policy::MixedBFloat16
    } else if no_slower(DType::F16) {
        Policy::MixedFloat16
    } else {
        Policy::Float32
    }
}

/// The suffix Keras appends to its GPU compatibility warning.
const GPU_WARNING_SUFFIX: &str = "If you will use compatible GPU(s) not attached to this host, \
     e.g. by running a multi-worker model, you can ignore this warning. This message will only \
     be logged once";

/// The compute capability a policy's tensor cores need: 7.0 for float16 (Volta), 8.0 for
/// bfloat16 (Ampere); `None` for float32.
pub fn min_capability(policy: Policy) -> Option<(u32, u32)> {
    match policy {
        Policy::Float32 => None,
        Policy::MixedFloat16 => Some((7, 0)),
        Policy::MixedBFloat16 => Some((8, 0)),
    }
}

/// Checks `policy` against an NVIDIA GPU named `name` with compute capability
/// `(major, minor)`, with Keras' wording: `OK` and "Your GPU will likely run quickly with dtype
/// policy mixed_float16 as it has compute capability of at least 7.0. Your GPU: NVIDIA H200,
/// compute capability 9.0", or `WARNING` and why it may run slowly. A pure function (the device
/// query is `mp_core::cuda::device_info` with the `cuda` feature), so it is testable anywhere.
pub fn check_gpu(policy: Policy, name: &str, capability: (u32, u32)) -> CompatReport {
    let device = format!(
        "{name}, compute capability {}.{}",
        capability.0, capability.1
    );
    let (ok, reason) = match min_capability(policy) {
        None => (
            true,
            format!("float32 runs everywhere; it is the baseline. Your GPU: {device}"),
        ),
        Some(min) if capability >= min => (
            true,
            format!(
                "Your GPU will likely run quickly with dtype policy {} as it has compute \
                 capability of at least {}.{}. Your GPU: {device}",
                policy.name(),
                min.0,
                min.1
            ),
        ),
        Some(min) => (
            false,
            format!(
                "Your GPU may run slowly with dtype policy {} because it does not have compute \
                 capability of at least {}.{}. Your GPU:\n  {device}\nSee \
                 https://developer.nvidia.com/cuda-gpus for a list of GPUs and their compute \
                 capabilities.\n{GPU_WARNING_SUFFIX}",
                policy.name(),
                min.0,
                min.1
            ),
        ),
    };
    CompatReport { policy, ok, reason }
}

/// Under a 16-bit policy on a GPU, the warning to print when tensor cores cannot be fully used:
/// the hidden Dense layers whose units, and the batch size, are not multiples of 8. `dense` lists
/// every Dense layer of the model in order as `(name, units)`; the last one is the output layer
/// and is exempt (its width is the number of classes). `None` when there is nothing to say (or
/// under float32).
pub fn tensor_core_shape_warning(
    policy: Policy,
    dense: &[(&str, usize)],
    batch_size: usize,
) -> Option<String> {
    if policy == Policy::Float32 {
        return None;
    }
    let hidden = &dense[..dense.len().saturating_sub(1)];
    let mut offenders: Vec<String> = hidden
        .iter()
        .filter(|(_, units)| !units.is_multiple_of(8))
        .map(|(name, units)| format!("{name} has {units} units"))
        .collect();
    if !batch_size.is_multiple_of(8) {
        offenders.push(format!("the batch size is {batch_size}"));
    }
    if offenders.is_empty() {
        return None;
    }
    Some(format!(
        "WARNING: under dtype policy {}, GPU tensor cores are used only when matrix dimensions \
         are multiples of 8, but {}. Round them up to multiples of 8 (the output layer is \
         exempt) for full speed.",
        policy.name(),
        offenders.join(", ")
    ))
}

/// Prints [`tensor_core_shape_warning`]'s text to stderr, once per process; returns whether it
/// printed.
pub fn warn_tensor_core_shapes_once(
    policy: Policy,
    dense: &[(&str, usize)],
    batch_size: usize,
) -> bool {
    static WARNED: AtomicBool = AtomicBool::new(false);
    match tensor_core_shape_warning(policy, dense, batch_size) {
        Some(text) if !WARNED.swap(true, Ordering::Relaxed) => {
            eprintln!("{text}");
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_verdicts_use_keras_wording() {
        let h200 = check_gpu(Policy::MixedFloat16, "NVIDIA H200", (9, 0));
        assert_eq!(
            h200.to_string(),
            "Mixed precision compatibility check (mixed_float16): OK\nYour GPU will likely run \
             quickly with dtype policy mixed_float16 as it has compute capability of at least \
             7.0. Your GPU: NVIDIA H200, compute capability 9.0"
        );
        let t4 = check_gpu(Policy::MixedBFloat16, "Tesla T4", (7, 5));
        assert!(!t4.ok);
        let text = t4.to_string();
        assert!(
            text.starts_with(
                "Mixed precision compatibility check (mixed_bfloat16): WARNING\nYour GPU may run \
                 slowly with dtype policy mixed_bfloat16 because it does not have compute \
                 capability of at least 8.0. Your GPU:\n  Tesla T4, compute capability 7.5\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("https://developer.nvidia.com/cuda-gpus"),
            "{text}"
        );
        assert!(check_gpu(Policy::MixedFloat16, "Tesla T4", (7, 5)).ok);
        assert!(check_gpu(Policy::MixedFloat16, "Tesla V100", (7, 0)).ok);
        assert!(!check_gpu(Policy::MixedFloat16, "Tesla P100", (6, 0)).ok);
        assert!(check_gpu(Policy::MixedBFloat16, "NVIDIA A100", (8, 0)).ok);
        assert!(check_gpu(Policy::MixedBFloat16, "NVIDIA H200", (9, 0)).ok);
        // float32 is fine on any GPU.
        assert!(check_gpu(Policy::Float32, "Tesla K80", (3, 7)).ok);
        assert_eq!(min_capability(Policy::Float32), None);
    }

    #[test]
    fn shape_warning_lists_hidden_layers_and_batch() {
        let guide = [("dense_1", 4096), ("dense_2", 4096), ("dense_logits", 10)];
        // The guide's model: the 10-unit output layer is exempt.
        assert_eq!(
            tensor_core_shape_warning(Policy::MixedFloat16, &guide, 8192),
            None
        );
        // float32 never warns.
        let odd = [
            ("dense_1", 100),
            ("dense_2", 4096),
            ("dense_3", 33),
            ("out", 10),
        ];
        assert_eq!(tensor_core_shape_warning(Policy::Float32, &odd, 30), None);
        let text = tensor_core_shape_warning(Policy::MixedBFloat16, &odd, 30).unwrap();
        assert!(text.contains("mixed_bfloat16"), "{text}");
        assert!(
            text.contains("dense_1 has 100 units, dense_3 has 33 units, the batch size is 30"),
            "{text}"
        );
        assert!(
            !text.contains("dense_2") && !text.contains("out has"),
            "{text}"
        );
        let text = tensor_core_shape_warning(Policy::MixedFloat16, &guide, 100).unwrap();
        assert!(
            text.contains("the batch size is 100") && !text.contains("units"),
            "{text}"
        );
        // Only an output layer: nothing hidden to check.
        assert_eq!(
            tensor_core_shape_warning(Policy::MixedFloat16, &[("out", 10)], 64),
            None
        );
        assert_eq!(
            tensor_core_shape_warning(Policy::MixedFloat16, &[], 64),
            None
        );
        // Printed once per process.
        assert!(warn_tensor_core_shapes_once(Policy::MixedFloat16, &odd, 30));
        assert!(!warn_tensor_core_shapes_once(
            Policy::MixedFloat16,
            &odd,
            30
        ));
        assert!(!warn_tensor_core_shapes_once(
            Policy::MixedFloat16,
            &guide,
            64
        ));
    }

    const ZEN4: CpuFeatures = CpuFeatures {
        avx2: true,
        fma: true,
        f16c: true,
        avx512f: true,
        avx512_bf16: true,
        avx512_fp16: false,
        amx_bf16: false,
    };

    fn measured(
        fma: f64,
        dp: Option<f64>,
        rates: &[(DType, &'static str, f64)],
        chosen: [&'static str; 3],
    ) -> Measured {
        Measured {
            fma_f32_gflops: fma,
            dpbf16_gflops: dp,
            rates: rates
                .iter()
                .map(|&(dtype, path, gflops)| PathRate {
                    dtype,
                    path,
                    gflops,
                })
                .collect(),
            chosen: [
                (DType::F32, chosen[0]),
                (DType::BF16, chosen[1]),
                (DType::F16, chosen[2]),
            ],
        }
    }

    /// AMD Zen 4, as measured here: `vdpbf16ps` at 2x the FMA rate.
    fn zen4() -> Measured {
        measured(
            232.0,
            Some(463.6),
            &[
                (DType::F32, "avx512-6x64", 215.0),
                (DType::F32, "avx512-8x48", 205.0),
                (DType::BF16, "avx512-6x64", 212.0),
                (DType::BF16, "avx512bf16-dot", 430.0),
                (DType::F16, "avx512-6x64", 214.0),
            ],
            ["avx512-6x64", "avx512bf16-dot", "avx512-6x64"],
        )
    }

    /// The Intel Xeon of the report: two FMA ports, `vdpbf16ps` at half the FMA rate.
    fn xeon() -> Measured {
        measured(
            344.0,
            Some(167.0),
            &[
                (DType::F32, "avx512-6x64", 297.0),
                (DType::BF16, "avx512-6x64", 292.0),
                (DType::BF16, "avx512bf16-dot", 165.0),
                (DType::F16, "avx512-6x64", 296.0),
            ],
            ["avx512-6x64", "avx512-6x64", "avx512-6x64"],
        )
    }

    /// A CPU without AVX-512, where widening costs a little.
    fn avx2_only() -> Measured {
        measured(
            110.0,
            None,
            &[
                (DType::F32, "avx2", 95.0),
                (DType::BF16, "avx2", 86.0),
                (DType::F16, "avx2", 88.0),
            ],
            ["avx2", "avx2", "avx2"],
        )
    }

    #[test]
    fn verdicts_follow_the_measurement() {
        let r = check_with(Policy::MixedBFloat16, &ZEN4, &zen4());
        assert!(r.ok);
        assert_eq!(
            r.to_string(),
            "Mixed precision compatibility check (mixed_bfloat16): OK\nYour CPU will likely run \
             quickly with dtype policy mixed_bfloat16: bfloat16 dot products (vdpbf16ps) run at \
             2.00x the float32 rate here, and bfloat16 GEMMs measured 2.00x float32's."
        );
        assert_eq!(recommended_policy_for(&zen4()), Policy::MixedBFloat16);
        let f16 = check_with(Policy::MixedFloat16, &ZEN4, &zen4());
        assert!(f16.ok, "{f16}");
        assert!(f16.reason.contains("1.00x float32's"), "{f16}");

        let xeon_cpu = CpuFeatures {
            avx512_fp16: true,
            ..ZEN4
        };
        let r = check_with(Policy::MixedBFloat16, &xeon_cpu, &xeon());
        assert!(r.ok);
        assert_eq!(
            r.reason,
            "bfloat16 dot products (vdpbf16ps) run at 0.49x the float32 rate here; \
             mixed_bfloat16 uses float32 FMA (avx512-6x64, bfloat16 widened while packing; \
             GEMMs measured 0.98x float32's) and still halves activation memory."
        );
        assert_eq!(recommended_policy_for(&xeon()), Policy::MixedBFloat16);
        let f16 = check_with(Policy::MixedFloat16, &xeon_cpu, &xeon());
        assert!(f16.ok && !f16.reason.contains("emulated"), "{f16}");

        let old = CpuFeatures {
            avx512f: false,
            avx512_bf16: false,
            ..ZEN4
        };
        let r = check_with(Policy::MixedBFloat16, &old, &avx2_only());
        assert!(!r.ok);
        assert_eq!(
            r.to_string(),
            "Mixed precision compatibility check (mixed_bfloat16): WARNING\nThe dtype policy \
             mixed_bfloat16 may run slowly here: this CPU has no bfloat16 dot product \
             (AVX512_BF16), and bfloat16 GEMMs (avx2) measured 0.91x float32's. It still halves \
             activation memory."
        );
        let f16 = check_with(Policy::MixedFloat16, &old, &avx2_only());
        assert!(!f16.ok && f16.reason.contains("0.93x float32's"), "{f16}");
        assert_eq!(recommended_policy_for(&avx2_only()), Policy::Float32);

        let ancient = CpuFeatures::default();
        assert!(
            check_with(Policy::MixedFloat16, &ancient, &avx2_only())
                .reason
                .contains("no F16C")
        );
        assert!(check_with(Policy::Float32, &ancient, &avx2_only()).ok);
        // Nothing timed: no speedup is claimed.
        let none = measured(1.0, None, &[], ["scalar", "scalar", "scalar"]);
        assert_eq!(recommended_policy_for(&none), Policy::Float32);
        let r = check_with(Policy::MixedBFloat16, &ancient, &none);
        assert!(!r.ok && r.reason.contains("an unmeasured"), "{r}");
    }
}
