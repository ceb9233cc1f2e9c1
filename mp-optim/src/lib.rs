//! # mp-optim
//!
//! Optimizers that update float32 [`Variable`](mp_core::Variable)s — [`Sgd`], [`RmsProp`],
//! [`Adam`], [`AdamW`], with Keras's defaults and semantics, their arithmetic in mp-kernels' fused update
//! kernels — and [`LossScaleOptimizer`], which scales the loss, unscales and checks the
//! gradients in one pass, skips non-finite steps without touching anything, and refuses to skip
//! forever.
//!
//! ```
//! use mp_core::{Tensor, Variable};
//! use mp_optim::{LossScaleOptimizer, Optimizer, RmsProp};
//!
//! let mut vars = vec![Variable::new("w", Tensor::from_vec(&[2], vec![1.0, -1.0])?)?];
//! let mut opt = LossScaleOptimizer::new(RmsProp::default());
//! assert_eq!(opt.get_scaled_loss(0.5), 0.5 * 32768.0);
//! // Backward would write scaled gradients; here, by hand:
//! vars[0].grad_mut().copy_from_slice(&[32768.0, f32::INFINITY])?;
//! let check = opt.get_unscaled_gradients(&mut vars)?;
//! assert!(!check.all_finite);
//! let outcome = opt.apply_gradients(&mut vars)?;
//! assert!(!outcome.applied);                       // skipped: w unchanged
//! assert_eq!(vars[0].value().as_slice()?, &[1.0, -1.0]);
//! assert_eq!(outcome.scale_after, 16384.0);       // and the scale halved
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod error;
pub mod loss_scale_optimizer;
pub mod optimizer;
pub mod schedule;

pub use error::{Error, Result};
pub use loss_scale_optimizer::{
    DEFAULT_MAX_SKIPS_AT_FLOOR, GradientCheck, LossScaleOptimizer, ScalingState, StepOutcome,
};
pub use optimizer::{
    Adam, AdamRule, AdamW, AdamWRule, Clip, NonFiniteUpdate, Optim, Optimizer, RmsProp,
    RmsPropRule, Sgd, SgdRule, Update, UpdateRule, VariableSet,
};
pub use schedule::LearningRateSchedule;
