//! The error type of mp-layers.

/// What layers, models and training can refuse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A layer whose input does not fit the previous layer's output, found at `build`.
    #[error(
        "cannot build {layer}: it expects inputs of shape {expected:?}, but {previous} outputs {got:?}"
    )]
    IncompatibleShapes {
        /// The layer being built.
        layer: String,
        /// The layer before it (or `the model input`).
        previous: String,
        /// What the layer accepts.
        expected: Vec<usize>,
        /// What it was given.
        got: Vec<usize>,
    },
    /// A layer given per-sample inputs of a rank it does not take (or none at all), found at
    /// `build`.
    #[error("cannot build {layer}: it expects {expected} per sample, but {previous} gives {got:?}")]
    InputRank {
        /// The layer being built.
        layer: String,
        /// The layer before it (or `the model input`).
        previous: String,
        /// What the layer takes, in words: `[tokens, width] inputs (rank 2)`.
        expected: &'static str,
        /// What it was given.
        got: Vec<usize>,
    },
    /// A tensor of the wrong shape at run time.
    #[error("shape mismatch in {layer}: expected {expected}, got {got:?}")]
    ShapeMismatch {
        /// The layer or operation.
        layer: String,
        /// What was expected, in words or as a shape.
        expected: String,
        /// The shape given.
        got: Vec<usize>,
    },
    /// A layer used before `build`.
    #[error("layer {layer} is not built: call build(input_shape) first")]
    NotBuilt {
        /// The layer.
        layer: String,
    },
    /// A call out of order (backward before forward_train, ...).
    #[error("invalid state in {layer}: {what}")]
    InvalidState {
        /// The layer.
        layer: String,
        /// What is wrong.
        what: String,
    },
    /// Weights that do not match the model's variables (names, count, shapes).
    #[error("weights do not match the model: {}", problems.join("; "))]
    Weights {
        /// Every mismatch found.
        problems: Vec<String>,
    },
    /// An argument out of range (zero units, an unknown activation, a bad label...).
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// What is wrong.
        what: String,
    },
    /// A run of training steps that were all skipped as non-finite (each left the weights as
    /// they were, so they stayed finite): training cannot progress.
    #[error(
        "training stopped: {steps} consecutive steps were skipped as non-finite (the weights are \
         unchanged); the first non-finite value of the first such step was in {origin}. Check \
         the data for NaN or infinity, lower the learning rate, or clip the gradients"
    )]
    NonFiniteSteps {
        /// Consecutive skipped steps.
        steps: u64,
        /// Where the first non-finite value appeared: `the input batch`, `the model output
        /// (the loss is not finite)`, `the gradient of dense_1/kernel`, or, when every gradient
        /// was finite, `the update of dense_1/kernel (every gradient was finite, but it would
        /// make Adam's v non-finite)`.
        origin: String,
    },
    /// A callback of `fit` failed for a cause of its own: a checkpoint that could not be written
    /// or read ([`crate::checkpoint::Error`], reached by `source()` and `downcast_ref`).
    #[error("{callback}: {source}")]
    Callback {
        /// The callback (`ModelCheckpoint`).
        callback: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// Other ranks of a data-parallel job failed: every rank stops, and a training step they
    /// failed in was applied on none. `first` is the first failed rank's own error.
    #[error(
        "rank(s) {ranks:?} of the data-parallel job failed, so every rank stops (a step they \
         failed in is applied on none); rank {first_rank}: {first}"
    )]
    ReplicaFailed {
        /// The ranks that failed.
        ranks: Vec<usize>,
        /// The lowest of them.
        first_rank: usize,
        /// Its error, as it printed it.
        first: String,
    },
    /// The ranks of a data-parallel job do not run the same training: what must match (the
    /// model's variables, the policy, the global batch, the epochs...) differs between them.
    #[error(
        "the ranks of the data-parallel job disagree on {item}: {ours} on rank 0, {theirs} on \
         rank {rank} (ranks that differ from rank 0: {ranks:?}); every rank must run the same \
         model and options on the same data"
    )]
    ReplicasDisagree {
        /// What differs.
        item: String,
        /// Rank 0's value.
        ours: String,
        /// The first differing rank.
        rank: usize,
        /// Its value.
        theirs: String,
        /// Every rank that differs from rank 0 somewhere in the handshake.
        ranks: Vec<usize>,
    },
    /// An error from mp-core.
    #[error(transparent)]
    Core(#[from] mp_core::Error),
    /// An error from a kernel.
    #[error(transparent)]
    Kernel(#[from] mp_kernels::Error),
    /// An error from an optimizer (including a collapsed loss scale).
    #[error(transparent)]
    Optim(#[from] mp_optim::Error),
}

/// The result type of mp-layers.
pub type Result<T, E = Error> = std::result::Result<T, E>;
