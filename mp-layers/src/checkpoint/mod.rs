//! Checkpoints: model weights in the safetensors format, with everything else training needs to
//! resume exactly saved beside them in the same file; atomic writes; loads that validate
//! everything before changing anything; and [`ModelCheckpoint`], the callback that writes them
//! during `fit`.
//!
//! # The file
//!
//! One [`safetensors`] file (`.safetensors`), readable by PyTorch's and Hugging
//! Face's tools:
//!
//! - each model variable is a float32 (`F32`) tensor named by its path (`dense_1/kernel`), in
//!   the model's variable order;
//! - each optimizer slot is a float32 tensor named `optimizer/<variable path>/<slot>`
//!   (`optimizer/dense_1/kernel/m`);
//! - the header's `__metadata__` holds (all strings, as the format requires):
//!   - `mp.kind`: `checkpoint` (or `weights` for a file from [`save_weights`]);
//!   - `mp.format_version`: [`FORMAT_VERSION`]. A file with a newer version is refused with
//!     [`Error::NewerVersion`] before anything else in it is trusted;
//!   - `mp.sha256`: the SHA-256 of the tensors (names, dtypes, shapes, bytes) and of the other
//!     metadata ([`checksum`]), so a damaged file is refused ([`Error::Corrupted`]);
//!   - `mp.kernel_paths` (checkpoints only): the CPU kernel paths that computed the state
//!     (`mp_kernels::Cpu::kernel_paths`: the GEMM path per dtype, the elementwise instruction
//!     set, the thread count). A resume on other paths continues and says so on stderr
//!     ([`paths_note`]): results are bit-identical only on the same paths;
//!   - `mp.state` (checkpoints only): a JSON object with the model's name and policy, the
//!     training progress (epoch, step, shuffling RNG state), the optimizer (name, learning
//!     rate, `iterations`, hyperparameters, which tensor holds which slot), the loss scaling
//!     (the whole loss-scale configuration, its current scale and good-step count, the applied,
//!     skipped and skipped-at-floor step counts and the floor limit) and the best value so far
//!     of the checkpointing metric. Floats are written as decimal strings that read back to the
//!     same bits; integers (`rng_state` is a full `u64`) as JSON integers. The state is a
//!     `#[derive(Serialize, Deserialize)]` struct: every field it lists must be present, once
//!     (`null` where there is no loss scaling or best value), every nested object must be an
//!     object, and fields it does not know are ignored. A state that does not fit is refused
//!     with [`Error::State`], whose message names where (`progress.step`) and then serde's
//!     message (the missing field, or the value and what was expected, and the position); a
//!     value out of range after that with [`Error::Invalid`]. A version-1 file written before
//!     the state derived serde (`mp-layers/tests/fixtures/checkpoint-v1.safetensors`) must keep
//!     loading.
//!
//! The state also lists the frozen variables (`frozen`, absent when none is): a resume freezes
//! exactly those.
//!
//! # Weights files in other layouts
//!
//! [`save_weights_as`] writes the weights alone in mp's layout or in PyTorch's
//! ([`Layout::PyTorch`]: `dense_1.weight` as `[out, in]`, convolutions as `[out, in, kh, kw]`,
//! BatchNormalization's `running_mean`/`running_var`/`num_batches_tracked`, attention as
//! `q_proj`/`k_proj`/`v_proj`/`out_proj` or packed), as float32, bfloat16 or float16
//! ([`WeightDtype`]), with `mp.layout`, `mp.dtype` and the hyperparameters the tensors do not
//! carry (`mp.hparams.<layer>.eps`, ...) in the metadata. Each layer says how its variables
//! appear there ([`Layer::foreign_tensors`](crate::Layer::foreign_tensors)). [`load_weights`]
//! reads any of them back; [`load_weights_with`] chooses the layout, a non-strict load
//! ([`LoadReport`] lists what was skipped) and a renaming of foreign names.
//!
//! # Writing and loading
//!
//! Every file is written atomically ([`write_atomic`]): to a temporary file in the same
//! directory, flushed to disk, renamed over the destination, and the directory flushed, so a
//! crash at any moment leaves either the previous file or the new one, never a mix. A write
//! killed before its rename leaves its temporary file (`.<name>.tmp-<pid>-<n>`), which is never
//! read; `fit` removes those of dead writers from its checkpoint folder at the end of each
//! epoch (see [`ModelCheckpoint`]).
//!
//! Loading ([`Checkpointing::resume`], [`load_weights`]) parses and checks the whole file, checks
//! every tensor's name, dtype and shape against the model (and the optimizer's slots against the
//! variables) and reports every mismatch by name ([`Error::Mismatch`]), then every value: weights
//! and slots finite, moving variances and second moments (Adam's `v`, RMSprop's `velocity`) not
//! below 0 ([`Error::InvalidValues`], naming each tensor, the index and the value), and the step
//! counts of `mp.state` consistent with each other ([`Error::Invalid`]), all before assigning
//! anything: on any error the model, the optimizer and the trainer are unchanged. Saving refuses
//! the same values and counts ([`Error::Unsaveable`]) before any file is written or replaced, so
//! mp never writes a file it would refuse. I/O errors ([`Error::Io`]) name the operation and the
//! path and keep the [`std::io::Error`] as their `source()`.
//!
//! # Checkpoint folders
//!
//! `fit` with a [`ModelCheckpoint`] callback writes `epoch-000001.safetensors`, ... into
//! [`ModelCheckpoint::dir`] and prunes only the epochs up to its own current one, so the files
//! of later epochs that an earlier, longer run left in the same folder are kept, and
//! [`Checkpointing::resume_latest`] (or [`latest`]) then picks the highest epoch number, whichever run
//! wrote it. So a new `fit` into the folder of an earlier run that got further, followed by
//! `resume_latest`, continues the *earlier* run from its later epoch. This is intended (a
//! folder holds one run's history, and a restarted job resumes where that run got to), but to
//! start fresh, give the new run a new folder or delete the old one first.
//!
//! # The rooms
//!
//! - [`safetensors`]: the file format, read and written;
//! - `format`: the metadata keys and the format version;
//! - `seal`: the mp metadata (kind, version) and the checksum;
//! - `state`: the training state (`mp.state`), a serde struct;
//! - `weights`: weights only ([`save_weights`], [`load_weights`]) and the checks of a file's
//!   tensors against a model;
//! - `resume`: whole checkpoints of a [`crate::Trainer`] ([`Checkpointing`]);
//! - `callback`: [`ModelCheckpoint`], the callback of `fit`;
//! - `folder` and `atomic`: checkpoint folders (epoch files, stale temporaries) and atomic
//!   writes;
//! - `error`: what can be refused ([`Error`]).

mod atomic;
mod callback;
mod error;
mod folder;
mod format;
mod layout;
mod resume;
pub mod safetensors;
mod seal;
mod state;
mod weights;

pub use self::atomic::{write_atomic, write_atomic_with};
pub use self::callback::ModelCheckpoint;
pub use self::error::{Error, Result};
pub use self::folder::latest;
pub use self::format::{
    FORMAT_VERSION, KEY_DTYPE, KEY_KERNEL_PATHS, KEY_KIND, KEY_LAYOUT, KEY_SHA256, KEY_STATE,
    KEY_VERSION, SLOT_PREFIX,
};
pub use self::layout::{ForeignTensor, ForeignTensors, Layout, Part, Transform, WeightDtype};
pub use self::resume::{Checkpointing, paths_note};
pub use self::seal::checksum;
pub use self::weights::{
    LoadOptions, LoadReport, load_weights, load_weights_from_bytes, load_weights_from_bytes_with,
    load_weights_with, save_weights, save_weights_as, weights_to_bytes, weights_to_bytes_as,
};
pub use crate::train::{BestMetric, Mode};
