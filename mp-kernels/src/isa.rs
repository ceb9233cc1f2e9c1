//! Instruction sets the CPU kernels choose between at run time.
//!
//! Every kernel has a portable fallback ([`Isa::Scalar`]: plain Rust the compiler may
//! auto-vectorise for the baseline target) and faster paths picked with
//! `is_x86_feature_detected!`. A [`crate::Cpu`] holds one (checked when it is made): the best one
//! for [`crate::Cpu::global`], a forced one in tests ([`crate::Cpu::with`]).

use std::sync::OnceLock;

/// An instruction-set level, each including the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust, no explicit SIMD.
    Scalar,
    /// AVX2 + FMA + F16C (256-bit).
    Avx2,
    /// AVX-512 F/BW/VL/DQ + FMA + F16C (512-bit).
    Avx512,
    /// [`Isa::Avx512`] plus AVX512_BF16 (`vdpbf16ps`, `vcvtne2ps2bf16`).
    Avx512Bf16,
}

impl Isa {
    /// Every level, lowest first.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16];

    /// The best level this CPU supports (detected once, then cached).
    pub fn detect() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            Isa::ALL
                .iter()
                .rev()
                .copied()
                .find(|isa| isa.is_supported())
                .unwrap_or(Isa::Scalar)
        })
    }

    /// Whether this CPU can run kernels of this level.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => Isa::Avx512.is_supported() && is_x86_feature_detected!("avx512bf16"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// `self` when this CPU supports it, else [`Isa::Scalar`] (for kernels that cannot fail).
    pub(crate) fn or_scalar(self) -> Isa {
        if self.is_supported() {
            self
        } else {
            Isa::Scalar
        }
    }

    /// The levels this CPU supports, lowest first (what tests iterate over).
    pub fn supported() -> Vec<Isa> {
        Isa::ALL
            .iter()
            .copied()
            .filter(|isa| isa.is_supported())
            .collect()
    }
}
