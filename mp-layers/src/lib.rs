//! # mp-layers
//!
//! Layers that compute in their policy's compute dtype while keeping float32 variables, with
//! explicit backward passes; losses and metrics; the [`Model`] trait that `#[model]` implements;
//! and training with `fit`, `evaluate` and `predict`.
//!
//! Layers compose the op surface of mp-kernels (`mp_kernels::ops`) and never loop over elements
//! themselves.
//!
//! The crate's rooms:
//! - [`layer`]: the [`Layer`] and [`Model`] traits and the dtype conversions between layers;
//! - [`layers`]: the layers, one file per family (`Dense`, `Conv2D`, pooling,
//!   `BatchNormalization`, `Dropout`, activations, `Flatten`);
//! - [`train`]: the [`Trainer`] (`fit`, `evaluate`, `predict` on inputs of any rank), its
//!   options and logs, callbacks, losses, metrics and progress output;
//! - [`checkpoint`]: checkpoints of a whole training state, in the safetensors format;
//! - [`error`]: the error type.

pub mod checkpoint;
pub mod error;
pub mod layer;
pub mod layers;
pub mod train;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use checkpoint::{Checkpointing, ModelCheckpoint};
pub use error::{Error, Result};
pub use layer::{
    Compute, Converted, Input, Layer, Model, SummaryRow, convert, convert_opt, convert_ref,
    format_summary,
};
pub use layers::activation::{Activation, ActivationKind, Flatten, Softmax};
pub use layers::attention::MultiHeadAttention;
pub use layers::conv::Conv2D;
pub use layers::dense::Dense;
pub use layers::dropout::Dropout;
pub use layers::norm::{BatchNormalization, LayerNormalization};
pub use layers::pooling::{AveragePooling2D, GlobalAveragePooling2D, MaxPooling2D};
pub use layers::sequence::{ClassToken, Embedding, PositionEmbedding, SequencePooling};
pub use mp_kernels::conv::Padding;
pub use mp_macros::model;

pub use train::{
    BestMetric, BinaryCrossentropy, Callback, CategoricalCrossentropy, EarlyStopping, EpochLogs,
    FitOptions, History, LogFormat, Loss, LossInfo, Mean, MeanSquaredError, Metric, MicroBatch,
    ModelVars, STEP_LOG_COLUMNS, Scores, SparseCategoricalAccuracy, SparseCategoricalCrossentropy,
    StepLogger, StepReport, StepResult, TrainOptimizer, Trainer, TrainingProgress, Verbose,
};
