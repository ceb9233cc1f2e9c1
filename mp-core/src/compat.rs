//! The mixed precision compatibility check for this machine.
//!
//! Keras prints `Mixed precision compatibility check (mixed_float16): OK` when the GPU has
//! float16 tensor cores. mp does the same for the CPU it runs on, detected at run time:
//!
//! - **AVX512_BF16** (`vdpbf16ps`) or **AMX-BF16**: bfloat16 dot products at twice the float32
//!   rate, so `mixed_bfloat16` is the fast policy;
//! - **AVX512_FP16**: native float16 arithmetic (mp's kernels still convert float16 to float32
//!   for the math, so it brings no speedup over float32 yet);
//! - **F16C**: fast float16 ↔ float32 conversion; without it float16 is slow to even load.
//!
//! On an NVIDIA GPU the check is Keras' (see [`check_gpu`]): float16 tensor cores need compute
//! capability 7.0 or higher, bfloat16 ones 8.0. Under a 16-bit policy, tensor cores are used
//! only when the GEMM dimensions are multiples of 8, which [`tensor_core_shape_warning`] checks.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// Checks `policy` against this machine's CPU.
pub fn check(policy: Policy) -> CompatReport {
    check_with(policy, &CpuFeatures::detect())
}

/// Checks `policy` against the given CPU features (what [`check`] does, testable).
pub fn check_with(policy: Policy, cpu: &CpuFeatures) -> CompatReport {
    let (ok, reason) = match policy {
        Policy::Float32 => (
            true,
            "float32 runs everywhere; it is the baseline.".to_string(),
        ),
        Policy::MixedBFloat16 if cpu.fast_bf16() => (
            true,
            format!(
                "Your CPU will likely run quickly with dtype policy mixed_bfloat16: it has {} \
                 (bfloat16 dot products at twice the float32 rate).",
                if cpu.avx512_bf16 {
                    "AVX512_BF16"
                } else {
                    "AMX-BF16"
                }
            ),
        ),
        Policy::MixedBFloat16 => (
            false,
            "The dtype policy mixed_bfloat16 may run slowly because this CPU has no AVX512_BF16 \
             or AMX-BF16: bfloat16 is converted to float32 for the math, which halves activation \
             memory but brings no speedup."
                .to_string(),
        ),
        Policy::MixedFloat16 if !cpu.f16c => (
            false,
            "The dtype policy mixed_float16 will run slowly: this CPU has no F16C, so every \
             float16 value is converted in software. Use float32."
                .to_string(),
        ),
        Policy::MixedFloat16 => (
            false,
            format!(
                "float16 is emulated on this CPU (float16 is converted to float32 for the math): \
                 no speedup expected, use {}.",
                if cpu.fast_bf16() {
                    "mixed_bfloat16"
                } else {
                    "float32"
                }
            ),
        ),
    };
    CompatReport { policy, ok, reason }
}

/// The policy the check recommends on this machine: `mixed_bfloat16` where bfloat16 is native,
/// else `float32`.
pub fn recommended_policy() -> Policy {
    recommended_policy_for(&CpuFeatures::detect())
}

/// The policy the check recommends for the given CPU features.
pub fn recommended_policy_for(cpu: &CpuFeatures) -> Policy {
    if cpu.fast_bf16() {
        Policy::MixedBFloat16
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

    #[test]
    fn verdicts() {
        let r = check_with(Policy::MixedBFloat16, &ZEN4);
        assert!(r.ok);
        assert!(
            r.to_string()
                .starts_with("Mixed precision compatibility check (mixed_bfloat16): OK\n")
        );
        let r = check_with(Policy::MixedFloat16, &ZEN4);
        assert!(!r.ok);
        let text = r.to_string();
        assert!(
            text.contains("WARNING") && text.contains("use mixed_bfloat16"),
            "{text}"
        );
        let old = CpuFeatures {
            avx512_bf16: false,
            ..ZEN4
        };
        assert!(!check_with(Policy::MixedBFloat16, &old).ok);
        assert!(
            check_with(Policy::MixedFloat16, &old)
                .reason
                .contains("use float32")
        );
        let ancient = CpuFeatures::default();
        assert!(
            check_with(Policy::MixedFloat16, &ancient)
                .reason
                .contains("no F16C")
        );
        assert!(check_with(Policy::Float32, &ancient).ok);
        assert_eq!(recommended_policy_for(&ZEN4), Policy::MixedBFloat16);
        assert_eq!(recommended_policy_for(&old), Policy::Float32);
    }

    #[test]
    fn detection_runs() {
        let cpu = CpuFeatures::detect();
        // Whatever the CPU, the check gives a verdict for every policy without panicking.
        for p in Policy::ALL {
            assert!(!check(p).reason.is_empty());
        }
        assert!(!cpu.summary().is_empty());
        if cpu.avx512_bf16 {
            assert_eq!(recommended_policy(), Policy::MixedBFloat16);
        }
    }
}
