//! The committed PTX of `mp-kernels/cuda/*.cu`, embedded, and the choice of architecture.
//!
//! `cargo xtask kernels` regenerates the files with NVRTC 13.0 ([`super::nvrtc`]); CI fails when
//! they are stale (`cargo xtask kernels --check`). At run time the driver JIT-compiles the PTX for
//! the device's exact architecture, once per module and device (modules load lazily).

use crate::error::{Error, Result};

/// One kernel source compiled for every architecture, with the entry points Rust launches.
#[derive(Debug, Clone, Copy)]
pub struct PtxModule {
    /// The source's stem (`cast` for `cuda/cast.cu`).
    pub name: &'static str,
    /// The PTX for `compute_80`.
    pub compute_80: &'static str,
    /// The PTX for `compute_90`.
    pub compute_90: &'static str,
    /// Every `extern "C" __global__` entry point of the source.
    pub entries: &'static [&'static str],
}

impl PtxModule {
    /// The PTX for a virtual architecture (`compute_80` or `compute_90`).
    pub fn ptx(&self, arch: Arch) -> &'static str {
        match arch {
            Arch::Compute80 => self.compute_80,
            Arch::Compute90 => self.compute_90,
        }
    }
}

/// The virtual architectures PTX is shipped for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// Ampere and Ada (sm_80, sm_86, sm_89).
    Compute80,
    /// Hopper and newer (the driver JIT-compiles `compute_90` PTX forward).
    Compute90,
}

impl Arch {
    /// The PTX for a device of compute capability `(major, minor)`: `compute_90` from 9.0 on,
    /// `compute_80` from 8.0.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] below 8.0 (the kernels use sm_80 bfloat16 instructions).
    pub fn for_capability(capability: (u32, u32)) -> Result<Arch> {
        if capability >= (9, 0) {
            Ok(Arch::Compute90)
        } else if capability >= (8, 0) {
            Ok(Arch::Compute80)
        } else {
            Err(Error::InvalidArgument {
                op: "cuda",
                what: format!(
                    "compute capability {}.{} is not supported: mp's CUDA kernels need 8.0 \
                     (Ampere) or newer",
                    capability.0, capability.1
                ),
            })
        }
    }

    /// `compute_80` or `compute_90`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Compute80 => "compute_80",
            Arch::Compute90 => "compute_90",
        }
    }
}

macro_rules! module {
    ($name:literal, [$($entry:literal),* $(,)?]) => {
        PtxModule {
            name: $name,
            compute_80: include_str!(concat!("../../cuda/ptx/", $name, ".compute_80.ptx")),
            compute_90: include_str!(concat!("../../cuda/ptx/", $name, ".compute_90.ptx")),
            entries: &[$($entry),*],
        }
    };
}

/// Every module, in [`super::nvrtc::SOURCES`] order.
pub const MODULES: &[PtxModule] = &[
    module!(
        "activation",
        [
            "relu_forward_f32",
            "relu_forward_f16",
            "relu_forward_bf16",
            "relu_backward_f32",
            "relu_backward_f16",
            "relu_backward_bf16",
        ]
    ),
    module!(
        "cast",
        [
            "cast_f32_bf16",
            "cast_f32_f16",
            "cast_bf16_f32",
            "cast_f16_f32",
            "cast_bf16_f16",
            "cast_f16_bf16",
        ]
    ),
    module!(
        "optim",
        ["sgd_f32", "sgd_momentum_f32", "rmsprop_f32", "adam_f32"]
    ),
    module!(
        "reduce",
        [
            "bias_grad_f32",
            "bias_grad_f16",
            "bias_grad_bf16",
            "gemm_epilogue_f32",
            "gemm_epilogue_f16",
            "gemm_epilogue_bf16",
        ]
    ),
    module!(
        "scale",
        [
            "scale_f32",
            "scale_f16",
            "scale_bf16",
            "all_finite_f32",
            "all_finite_f16",
            "all_finite_bf16",
            "unscale_check_f32",
        ]
    ),
    module!(
        "softmax",
        [
            "softmax_f32",
            "softmax_f16",
            "softmax_bf16",
            "xent_rows_f32",
            "xent_grad_f32",
            "softmax_xent_f32",
            "softmax_xent_f16",
            "softmax_xent_bf16",
        ]
    ),
];

/// The module that defines `entry`.
pub fn module_of(entry: &str) -> Option<&'static PtxModule> {
    MODULES.iter().find(|m| m.entries.contains(&entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_is_embedded_for_every_arch() {
        let names: Vec<&str> = MODULES.iter().map(|m| m.name).collect();
        // Every kernel source (what `cargo xtask kernels` compiles) is embedded, in order.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
        let mut sources: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(".cu").map(String::from)
            })
            .collect();
        sources.sort();
        assert_eq!(names, sources);
        for m in MODULES {
            for arch in [Arch::Compute80, Arch::Compute90] {
                let ptx = m.ptx(arch);
                // NVRTC 13.0: PTX ISA 9.0, which the CUDA 13.0 driver loads.
                assert!(ptx.contains("\n.version 9.0\n"), "{} {arch:?}", m.name);
                let target = arch.name().replace("compute_", "sm_");
                assert!(ptx.contains(&format!("\n.target {target}\n")), "{}", m.name);
                // Exactly the entry points Rust launches, no more, no fewer.
                let mut defined: Vec<&str> = ptx
                    .lines()
                    .filter_map(|l| l.strip_prefix(".visible .entry "))
                    .map(|l| l.trim_end_matches('('))
                    .collect();
                defined.sort_unstable();
                let mut listed = m.entries.to_vec();
                listed.sort_unstable();
                assert_eq!(defined, listed, "{} {arch:?}", m.name);
            }
        }
    }

    #[test]
    fn arch_by_capability() {
        assert_eq!(Arch::for_capability((9, 0)).unwrap(), Arch::Compute90);
        assert_eq!(Arch::for_capability((10, 0)).unwrap(), Arch::Compute90);
        assert_eq!(Arch::for_capability((8, 9)).unwrap(), Arch::Compute80);
        assert_eq!(Arch::for_capability((8, 0)).unwrap(), Arch::Compute80);
        let err = Arch::for_capability((7, 5)).unwrap_err().to_string();
        assert!(err.contains("7.5") && err.contains("8.0"), "{err}");
        assert_eq!(module_of("rmsprop_f32").unwrap().name, "optim");
        assert!(module_of("nope").is_none());
    }
}
