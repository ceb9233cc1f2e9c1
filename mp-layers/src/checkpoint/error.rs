//! What saving and loading checkpoints can refuse.

use std::io;
use std::path::PathBuf;

use super::format::KEY_STATE;

/// What saving and loading checkpoints can refuse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file system operation failed.
    #[error("{op} {path}: {source}", path = path.display())]
    Io {
        /// What was being done (`reading`, `renaming`, ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Not a well-formed safetensors file (truncated, a foreign file, a broken header).
    #[error("{file} is not a valid safetensors file: {what}")]
    Format {
        /// The file.
        file: String,
        /// The problem.
        what: String,
    },
    /// A safetensors file whose header is not JSON.
    #[error("{file} is not a valid safetensors file: the header is not valid JSON ({source})")]
    Header {
        /// The file.
        file: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A safetensors file that is not what was asked for (no mp metadata, a weights file given
    /// as a checkpoint).
    #[error("{file} is not an mp checkpoint: {what}")]
    NotACheckpoint {
        /// The file.
        file: String,
        /// What it is instead.
        what: String,
    },
    /// A checkpoint written by a newer mp, in a format this one does not know.
    #[error(
        "{file} has checkpoint format version {found}, newer than the newest this version of mp \
         reads ({supported}): load it with a newer mp"
    )]
    NewerVersion {
        /// The file.
        file: String,
        /// Its version.
        found: u64,
        /// The newest version this mp reads.
        supported: u64,
    },
    /// The checksum does not match the content: the file was damaged or edited.
    #[error("{file} is corrupted: {what}")]
    Corrupted {
        /// The file.
        file: String,
        /// What does not match.
        what: String,
    },
    /// The training state (`mp.state`) is not what mp writes: not JSON, a field missing or of
    /// the wrong type. The message names where (`progress.step`), then serde's: the missing
    /// field, or the value and what was expected, and the position.
    #[error(
        "{file} holds an invalid checkpoint: {KEY_STATE}: {}{source}",
        in_field(field)
    )]
    State {
        /// The file.
        file: String,
        /// Where in the state: the dotted path of the value at the error's position
        /// (`loss_scaling.loss_scale`, `optimizer.slots.2`), empty at the top level.
        field: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Well-formed, but holding a state mp could not have written (a value out of range, a
    /// loss scale no optimizer could have had, an inconsistent slot list).
    #[error("{file} holds an invalid checkpoint: {what}")]
    Invalid {
        /// The file.
        file: String,
        /// The problem.
        what: String,
    },
    /// Values no training could have produced: a NaN or infinite weight or optimizer slot, a
    /// variance or second moment below 0. Refused before anything is assigned.
    #[error("{file} holds invalid values: {}", problems.join("; "))]
    InvalidValues {
        /// The file.
        file: String,
        /// Each tensor with such a value, by name (`"optimizer/dense_1/kernel/v" holds NaN at
        /// index 3, which is not finite`).
        problems: Vec<String>,
    },
    /// State that must not be saved: a NaN or infinite weight or slot, a variance below 0,
    /// step counts that disagree. Nothing was written, and no file was replaced.
    #[error("refusing to save {what}: {}; nothing was written", problems.join("; "))]
    Unsaveable {
        /// What was being saved (`the checkpoint`, `the weights`).
        what: &'static str,
        /// Each problem, naming the variable, slot or count.
        problems: Vec<String>,
    },
    /// The file does not fit the model, optimizer or trainer it is loaded into.
    #[error("{file} does not match the trainer: {}", problems.join("; "))]
    Mismatch {
        /// The file.
        file: String,
        /// Every mismatch, each naming the tensor or setting.
        problems: Vec<String>,
    },
    /// An error from the model.
    #[error(transparent)]
    Layers(#[from] crate::Error),
    /// An error from the optimizer.
    #[error(transparent)]
    Optim(#[from] mp_optim::Error),
}

/// `field: ` for [`Error::State`]'s message; nothing at the top level.
fn in_field(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

/// The result type of checkpointing.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for crate::Error {
    /// `fit` reports checkpoint errors as [`crate::Error`]: model errors as themselves,
    /// mismatches as [`crate::Error::Weights`], the rest wrapped whole in
    /// [`crate::Error::Callback`], whose `source()` chain reaches the cause (an I/O error, a
    /// malformed state).
    fn from(e: Error) -> Self {
        match e {
            Error::Layers(e) => e,
            Error::Optim(e) => crate::Error::Optim(e),
            Error::Mismatch { file, problems } => crate::Error::Weights {
                problems: problems
                    .into_iter()
                    .map(|p| format!("{file}: {p}"))
                    .collect(),
            },
            other => crate::Error::Callback {
                callback: "ModelCheckpoint",
                source: Box::new(other),
            },
        }
    }
}
