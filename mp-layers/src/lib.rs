//! # mp-layers
//!
//! Layers that compute in their policy's compute dtype while keeping float32 variables, with
//! explicit backward passes; losses and metrics; the [`Model`] trait that `#[model]` implements;
//! and training with `fit`, `evaluate` and `predict`.
//!
//! Layers compose mp-kernels' kernels and never loop over elements themselves.

pub mod activation;
pub mod checkpoint;
pub mod dense;
pub mod error;
pub mod layer;
pub mod losses;
pub mod metrics;
pub mod train;
mod util;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use activation::{Activation, ActivationKind, Flatten, Softmax};
pub use checkpoint::{BestMetric, CheckpointConfig, Mode as CheckpointMode};
pub use dense::Dense;
pub use error::{Error, Result};
pub use layer::{
    Compute, Converted, Layer, Model, SummaryRow, convert, convert_opt, convert_ref, format_summary,
};
pub use losses::SparseCategoricalCrossentropy;
pub use metrics::{Mean, SparseCategoricalAccuracy};
pub use mp_macros::model;
pub use train::{
    Callback, EpochLogs, FitOptions, History, ModelVars, Scores, StepResult, TrainOptimizer,
    Trainer, TrainingProgress, Verbose,
};
