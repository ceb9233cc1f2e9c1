//! # mp-kernels
//!
//! Every numeric kernel of mp, per device. Layers and optimizers compose these; they never loop
//! over elements themselves.
//!
//! - [`gemm`]: `C = alpha * op(A) * op(B) + beta * C` for float32, bfloat16 and float16 inputs,
//!   always accumulating in float32, with a fused bias + ReLU epilogue;
//! - elementwise and reductions: [`cast`], [`activation`] (ReLU, sigmoid, tanh), [`softmax`] (softmax and
//!   softmax cross-entropy, float32 math), [`reduce`] (bias gradient, argmax), [`scale`] (scale by
//!   a scalar, fused unscale + all-finite check), [`optim`] (fused SGD, RMSprop and Adam updates);
//! - [`peak`]: the machine's measured float32 FMA and `vdpbf16ps` peaks;
//! - `cuda` (behind the `cuda` feature): the same kernels on NVIDIA GPUs, from PTX committed
//!   under `mp-kernels/cuda/ptx/`, and cuBLASLt GEMMs with float32 accumulation.
//!
//! CPU kernels pick their instruction set at run time ([`Isa::detect`]) and always keep a portable
//! fallback; they run on one thread pool ([`threads`], sized by `MP_NUM_THREADS`) with static
//! partitioning, so results are bit-identical run to run for a fixed thread count.

pub mod activation;
pub mod cast;
pub mod counters;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod gemm;
pub mod isa;
pub mod optim;
pub mod peak;
pub mod reduce;
pub mod scale;
pub mod softmax;
pub mod threads;

pub use error::{Error, Result};
pub use isa::Isa;
