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
pub use error::{Error, Result};
pub use isa::Isa;
