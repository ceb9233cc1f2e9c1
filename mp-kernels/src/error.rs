//! The error type of mp-kernels.

/// What can go wrong when a kernel is called.
///
/// Kernels check their arguments before they touch memory, so an error never leaves an output
/// half written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Two operands whose shapes do not fit together.
    #[error("shape mismatch in {op}: {lhs_name} {lhs:?}, {rhs_name} {rhs:?}")]
    ShapeMismatch {
        /// The kernel.
        op: &'static str,
        /// What the first shape belongs to.
        lhs_name: &'static str,
        /// The first shape.
        lhs: Vec<usize>,
        /// What the second shape belongs to.
        rhs_name: &'static str,
        /// The second shape.
        rhs: Vec<usize>,
    },
    /// A buffer whose length does not match what the shape implies.
    #[error("length mismatch in {op}: {what} has {got} elements, expected {expected}")]
    LengthMismatch {
        /// The kernel.
        op: &'static str,
        /// The argument.
        what: &'static str,
        /// What the shape implies.
        expected: usize,
        /// What was passed.
        got: usize,
    },
    /// An argument outside its valid range (a NaN learning rate, a label out of range, ...).
    #[error("invalid argument to {op}: {what}")]
    InvalidArgument {
        /// The kernel.
        op: &'static str,
        /// What is wrong, naming the argument and its value.
        what: String,
    },
    /// A CUDA driver, cuBLASLt or kernel launch error (only with the `cuda` feature).
    #[error("cuda error in {op}: {what}")]
    Cuda {
        /// The kernel or library call.
        op: &'static str,
        /// What the driver or library reported.
        what: String,
    },
    /// A CUDA driver call that failed (only with the `cuda` feature), with the driver's error as
    /// its source.
    #[cfg(feature = "cuda")]
    #[error("cuda driver error in {op}: {source}")]
    Driver {
        /// The kernel or call.
        op: &'static str,
        /// What the driver returned.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// An error from mp-core.
    #[error(transparent)]
    Core(#[from] mp_core::Error),
}

/// The result type of mp-kernels.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Checks that a buffer has `expected` elements.
pub(crate) fn check_len(
    op: &'static str,
    what: &'static str,
    got: usize,
    expected: usize,
) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            op,
            what,
            expected,
            got,
        })
    }
}
