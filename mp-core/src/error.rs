//! The error type of mp-core.

/// Everything mp-core can refuse. Messages are lowercase and name the value that was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A dtype name mp does not know.
    #[error("unknown dtype {name:?}: valid dtypes are \"float32\", \"float16\" and \"bfloat16\"")]
    UnknownDType {
        /// The name that was given.
        name: String,
    },
    /// A policy name mp does not know.
    #[error(
        "unknown dtype policy {name:?}: valid policies are \"float32\", \"mixed_float16\" and \
         \"mixed_bfloat16\""
    )]
    UnknownPolicy {
        /// The name that was given.
        name: String,
    },
    /// `float16` or `bfloat16` asked for as a whole policy (low-precision variables).
    #[error(
        "{name:?} is not supported as a whole policy: mp keeps variables in float32 (updates to \
         16-bit weights round away and training stalls); use {suggestion:?}, which computes in \
         {name} and keeps float32 variables"
    )]
    LowPrecisionVariables {
        /// The name that was given.
        name: String,
        /// The mixed policy to use instead.
        suggestion: &'static str,
    },
    /// A loss-scale setting out of range (NaN, infinite, non-positive, a multiplier <= 1, ...).
    #[error("invalid loss scale configuration: {what}")]
    InvalidLossScale {
        /// What is wrong, naming the setting and its value.
        what: String,
    },
    /// A shape and a data length, or two shapes, that do not fit together.
    #[error("shape mismatch in {op}: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// The operation.
        op: &'static str,
        /// What was expected.
        expected: Vec<usize>,
        /// What was given.
        got: Vec<usize>,
    },
    /// Data whose length does not match the number of elements of the shape.
    #[error("{op}: shape {shape:?} holds {expected} elements but the data has {got}")]
    LengthMismatch {
        /// The operation.
        op: &'static str,
        /// The shape.
        shape: Vec<usize>,
        /// Elements the shape holds.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// A tensor that is not where the operation needs it.
    #[error("{op} needs a tensor on {expected}, but it is on {got}")]
    WrongDevice {
        /// The operation.
        op: &'static str,
        /// Where it must be.
        expected: crate::Device,
        /// Where it is.
        got: crate::Device,
    },
    /// A value a variable must not hold (NaN or infinite; below 0 for a variance), refused before
    /// anything was written.
    #[error("{op}: {variable} would hold {problem}; it is unchanged")]
    InvalidValue {
        /// The operation (`assign`, `set_weights`).
        op: &'static str,
        /// The variable's name.
        variable: String,
        /// The first value outside the variable's domain.
        problem: crate::variable::OutOfDomain,
    },
    /// A collective between the ranks of a data-parallel job that cannot be made.
    #[error("{op}: {what}")]
    Communication {
        /// The collective.
        op: &'static str,
        /// What is wrong.
        what: String,
    },
    /// A CUDA device was asked for in a build without the `cuda` feature.
    #[error(
        "cuda device {ordinal} requested, but mp was built without CUDA support: enable the \
         `cuda` feature"
    )]
    CudaNotCompiled {
        /// The device ordinal.
        ordinal: usize,
    },
    /// The CUDA driver or device could not be used.
    #[error("cuda device {ordinal} is not usable: {reason}")]
    CudaUnavailable {
        /// The device ordinal.
        ordinal: usize,
        /// Why (no driver, no device, a driver error).
        reason: String,
    },
    /// Any other argument out of range.
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// What is wrong.
        what: String,
    },
}

/// The result type of mp-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;
