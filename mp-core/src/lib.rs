//! # mp-core
//!
//! The foundation of mp, mixed precision training in Rust: what every other mp crate speaks.
//!
//! - [`DType`] and the element types (`f32`, [`half::f16`], [`half::bf16`]) with their marker
//!   types [`F32`], [`F16`], [`BF16`];
//! - [`Policy`], the Keras dtype policies `float32`, `mixed_float16` and `mixed_bfloat16`, and
//!   the policy marker types ([`Float32`], [`MixedFloat16`], [`MixedBFloat16`]);
//! - [`LossScale`]: fixed, or dynamic with the Keras defaults and the guards users ask for;
//! - [`Tensor<D>`]: the dtype is a type parameter, shape and [`Device`] are runtime values;
//! - [`Variable`]: a named float32 value with its float32 gradient, what optimizers update;
//! - [`Rng`], the project's one seeded generator, with shuffling, batching and validation splits;
//! - [`compat`]: the mixed precision compatibility check for this machine's CPU and GPU;
//! - [`Error`], the error type.
//!
//! It owns no kernels, layers or I/O.
//!
//! ```
//! use mp_core::{DType, Policy};
//!
//! let policy: Policy = "mixed_float16".parse()?;
//! assert_eq!(policy.compute_dtype(), DType::F16);
//! assert_eq!(policy.variable_dtype(), DType::F32);
//! assert!(policy.default_loss_scale().is_some()); // float16 needs loss scaling
//! # Ok::<(), mp_core::Error>(())
//! ```

pub mod compat;
pub mod cuda;
pub mod dist;
pub mod dtype;
pub mod error;
pub mod loss_scale;
pub mod memory;
pub mod policy;
pub mod rng;
pub mod tensor;
pub mod variable;

pub use compat::{CompatReport, CpuFeatures, Measured};
pub use dtype::{BF16, DType, DTypeKind, Element, F16, F32, FloatInfo};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use loss_scale::{
    DynamicLossScale, DynamicLossScaleConfig, FixedLossScale, LossScale, LossScaleState,
};
pub use policy::{
    Float32, MixedBFloat16, MixedFloat16, Policy, PolicyKind, PolicyVisitor, global_policy,
    set_global_policy,
};
pub use rng::Rng;
pub use tensor::{Device, Tensor};
pub use variable::{Domain, OutOfDomain, Variable};
