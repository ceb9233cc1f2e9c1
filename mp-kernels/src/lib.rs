//! # mp-kernels
//!
//! Every numeric kernel of mp, per device. Layers and optimizers compose these; they never loop
//! over elements themselves.
//!
//! - [`ops`]: the op surface layers and optimizers call, on tensors, on whatever device they
//!   live on (the CPU kernels of [`Cpu::global`], or CUDA with the `cuda` feature);
//! - [`Cpu`]: the CPU backend, whose methods are every CPU kernel: [`gemm`]
//!   (`C = alpha * op(A) * op(B) + beta * C` for float32, bfloat16 and float16 inputs, always
//!   accumulating in float32, with a fused bias + ReLU epilogue), [`cast`], [`activation`] (ReLU,
//!   sigmoid, tanh), [`softmax`] (softmax and softmax cross-entropy, float32 math), [`reduce`]
//!   (bias gradient, argmax, sums), [`scale`] (scale by a scalar, elementwise addition, fused
//!   unscale + all-finite check), [`optim`] (fused SGD, RMSprop and Adam updates), [`conv`]
//!   (convolution by im2col + GEMM in chunks, pooling, over NHWC images), [`norm`]
//!   (BatchNormalization statistics and normalisation in float32), [`dropout`] (counter-based
//!   masks); and, as free functions, [`layer_norm`] (LayerNormalization, float32 statistics) and
//!   [`gelu`] (exact and tanh GELU);
//! - [`calibrate`]: the GEMM path per input dtype, chosen by measurement once per machine;
//! - [`peak`]: the machine's measured float32 FMA and `vdpbf16ps` peaks;
//! - `cuda` (behind the `cuda` feature): the same kernels on NVIDIA GPUs, from PTX committed
//!   under `mp-kernels/cuda/ptx/`, and cuBLASLt GEMMs with float32 accumulation.
//!
//! CPU kernels pick their instruction set at run time ([`Isa::detect`], held by [`Cpu::global`];
//! [`Cpu::with`] forces one) and always keep a portable fallback; they run on one thread pool
//! ([`threads`], sized by `MP_NUM_THREADS`) with static partitioning, so results are
//! bit-identical run to run for a fixed thread count.

pub mod activation;
pub mod attention;
pub mod calibrate;
pub mod cast;
pub mod conv;
pub mod counters;
pub mod cpu;
pub mod cpu_time;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dropout;
pub mod error;
pub mod gelu;
pub mod gemm;
pub mod isa;
pub mod layer_norm;
pub mod losses;
pub mod norm;
pub mod ops;
pub mod optim;
pub mod peak;
pub mod profile;
pub mod reduce;
pub mod scale;
pub mod sequence;
pub mod softmax;
pub mod threads;

pub use cpu::Cpu;

/// An on/off knob read from the environment: unset or `1` is on, `0` off; any other value is
/// an [`Error::InvalidArgument`] naming the knob (`MP_CONV_IMPLICIT`, `MP_FUSION`). The value is
/// read once per knob: `cell` keeps it.
///
/// # Errors
/// The knob's value when it is neither `0` nor `1`.
pub fn switch_knob(
    name: &'static str,
    cell: &'static std::sync::OnceLock<std::result::Result<bool, String>>,
) -> Result<bool> {
    cell.get_or_init(|| parse_switch(name, std::env::var(name).ok().as_deref()))
        .clone()
        .map_err(|what| Error::InvalidArgument { op: name, what })
}

fn parse_switch(name: &str, value: Option<&str>) -> std::result::Result<bool, String> {
    match value.map(str::trim) {
        None | Some("" | "1") => Ok(true),
        Some("0") => Ok(false),
        Some(v) => Err(format!("{name}={v:?} is not 0 (off) or 1 (on)")),
    }
}
pub use error::{Error, Result};
pub use isa::Isa;

#[cfg(test)]
mod tests {
    use super::parse_switch;

    #[test]
    fn switch_knobs_take_0_or_1_and_name_themselves_otherwise() {
        assert_eq!(parse_switch("MP_FUSION", None), Ok(true));
        assert_eq!(parse_switch("MP_FUSION", Some("1")), Ok(true));
        assert_eq!(parse_switch("MP_FUSION", Some(" 0 ")), Ok(false));
        for bad in ["off", "yes", "2", "-1"] {
            let e = parse_switch("MP_FUSION", Some(bad)).unwrap_err();
            assert!(e.contains("MP_FUSION") && e.contains(bad), "{e}");
        }
    }
}
