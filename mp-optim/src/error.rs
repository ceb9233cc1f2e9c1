//! The error type of mp-optim.

/// What optimizers refuse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A hyperparameter out of range (a NaN learning rate, a negative momentum, ...).
    #[error("invalid {optimizer} hyperparameter: {what}")]
    InvalidHyperparameter {
        /// The optimizer.
        optimizer: &'static str,
        /// Which hyperparameter, its value and the valid range.
        what: String,
    },
    /// The variables changed between steps (the optimizer's state no longer matches).
    #[error("{optimizer} state does not match the variables: {what}")]
    StateMismatch {
        /// The optimizer.
        optimizer: &'static str,
        /// What differs.
        what: String,
    },
    /// A saved slot value the optimizer could not have produced: NaN, infinity, or a negative
    /// second moment (Adam's `v`, RMSprop's `velocity`).
    #[error("{optimizer} slot {slot:?} of {variable:?} holds {problem}")]
    InvalidSlot {
        /// The optimizer.
        optimizer: &'static str,
        /// The variable's path.
        variable: String,
        /// The slot (`v`).
        slot: String,
        /// The first value outside the slot's domain.
        problem: mp_core::OutOfDomain,
    },
    /// The dynamic loss scale sat at its floor for too many consecutive skipped steps.
    #[error(
        "training stopped: {skipped} consecutive steps were skipped with the loss scale at its \
         floor ({scale:?}); the gradients are non-finite whatever the scale (first non-finite \
         variable: {variable}), so the forward pass or the loss produces NaN or infinity. Check \
         the inputs, the learning rate, and layers that overflow in float16"
    )]
    LossScaleCollapsed {
        /// Consecutive skipped steps at the floor.
        skipped: u64,
        /// The scale.
        scale: f32,
        /// The first variable whose gradient was non-finite in the last step.
        variable: String,
    },
    /// An error raised while visiting the variables, by whatever holds them (a model's layer, say),
    /// kept whole so `source()` reaches it.
    #[error("visiting the variables failed: {0}")]
    Variables(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// An error from mp-core.
    #[error(transparent)]
    Core(#[from] mp_core::Error),
    /// An error from a kernel.
    #[error(transparent)]
    Kernel(#[from] mp_kernels::Error),
}

/// The result type of mp-optim.
pub type Result<T, E = Error> = std::result::Result<T, E>;
