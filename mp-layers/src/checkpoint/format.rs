//! The names and the version of mp's checkpoint format: its metadata keys and values.

/// The checkpoint format version this mp writes, and the newest it reads.
pub const FORMAT_VERSION: u64 = 1;

/// Metadata key: `checkpoint` or `weights`.
pub const KEY_KIND: &str = "mp.kind";
/// Metadata key: the format version.
pub const KEY_VERSION: &str = "mp.format_version";
/// Metadata key: the training state (JSON), in checkpoints.
pub const KEY_STATE: &str = "mp.state";
/// Metadata key: the CPU kernel paths that computed the state (`mp_kernels::Cpu::kernel_paths`),
/// in checkpoints; informative (a resume on other paths continues, and says so).
pub const KEY_KERNEL_PATHS: &str = "mp.kernel_paths";
/// Metadata key, in weights files: their [`Layout`](super::Layout) (`mp`, `pytorch`, ...).
pub const KEY_LAYOUT: &str = "mp.layout";
/// Metadata key, in weights files: the dtype their values are stored in (`float32`, ...).
pub const KEY_DTYPE: &str = "mp.dtype";
/// Metadata key: the [`super::checksum`].
pub const KEY_SHA256: &str = "mp.sha256";
/// The prefix of optimizer slot tensors' names.
pub const SLOT_PREFIX: &str = "optimizer/";

pub(crate) const KIND_CHECKPOINT: &str = "checkpoint";
pub(crate) const KIND_WEIGHTS: &str = "weights";
