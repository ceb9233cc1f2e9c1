//! Checkpoints: model weights in the safetensors format, with everything else training needs to
//! resume exactly saved beside them in the same file; atomic writes; loads that validate
//! everything before changing anything; and the checkpoint callbacks of `fit`.
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
//! # Writing and loading
//!
//! Every file is written atomically ([`write_atomic`]): to a temporary file in the same
//! directory, flushed to disk, renamed over the destination, and the directory flushed, so a
//! crash at any moment leaves either the previous file or the new one, never a mix. A write
//! killed before its rename leaves its temporary file (`.<name>.tmp-<pid>-<n>`), which is never
//! read; `fit` removes those of dead writers from its checkpoint folder at the end of each
//! epoch (see [`CheckpointConfig`]).
//!
//! Loading ([`Trainer::resume`], [`load_weights`]) parses and checks the whole file, checks
//! every tensor's name, dtype and shape against the model (and the optimizer's slots against the
//! variables) and reports every mismatch by name ([`Error::Mismatch`]), all before assigning
//! anything: on any error the model, the optimizer and the trainer are unchanged. I/O errors
//! ([`Error::Io`]) name the operation and the path and keep the [`io::Error`] as their
//! `source()`.
//!
//! # Checkpoint folders
//!
//! `fit` with [`Trainer::with_checkpoints`] writes `epoch-000001.safetensors`, ... into
//! [`CheckpointConfig::dir`] and prunes only the epochs up to its own current one, so the files
//! of later epochs that an earlier, longer run left in the same folder are kept, and
//! [`Trainer::resume_latest`] (or [`latest`]) then picks the highest epoch number, whichever run
//! wrote it. So a new `fit` into the folder of an earlier run that got further, followed by
//! `resume_latest`, continues the *earlier* run from its later epoch. This is intended (a
//! folder holds one run's history, and a restarted job resumes where that run got to), but to
//! start fresh, give the new run a new folder or delete the old one first.

pub mod safetensors;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::{self, Write as _};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use mp_core::{
    DynamicLossScale, DynamicLossScaleConfig, F32, LossScale, LossScaleState, PolicyKind, Tensor,
};
use mp_optim::Optimizer;
use mp_optim::loss_scale_optimizer::ScalingState;
use serde::de::{self, Unexpected, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use self::safetensors::SafeTensors;
use crate::layer::Model;
use crate::train::{EpochLogs, TrainOptimizer, Trainer, TrainingProgress};

/// The checkpoint format version this mp writes, and the newest it reads.
pub const FORMAT_VERSION: u64 = 1;

/// Metadata key: `checkpoint` or `weights`.
pub const KEY_KIND: &str = "mp.kind";
/// Metadata key: the format version.
pub const KEY_VERSION: &str = "mp.format_version";
/// Metadata key: the training state (JSON), in checkpoints.
pub const KEY_STATE: &str = "mp.state";
/// Metadata key: the [`checksum`].
pub const KEY_SHA256: &str = "mp.sha256";
/// The prefix of optimizer slot tensors' names.
pub const SLOT_PREFIX: &str = "optimizer/";

const KIND_CHECKPOINT: &str = "checkpoint";
const KIND_WEIGHTS: &str = "weights";

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
    /// [`crate::Error::Checkpoint`], whose `source()` chain reaches the cause (an I/O error, a
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
            other => crate::Error::Checkpoint(Box::new(other)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration of fit's checkpoint callbacks
// ---------------------------------------------------------------------------------------------

/// Whether a smaller or a larger value of a metric is better (saved as `min` or `max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Smaller is better (losses).
    Min,
    /// Larger is better (accuracies).
    Max,
}

impl Mode {
    /// Whether `value` improves on `best` (NaN never does).
    fn improves(self, value: f32, best: Option<f32>) -> bool {
        if value.is_nan() {
            return false;
        }
        match (self, best) {
            (_, None) => true,
            (Mode::Min, Some(b)) => value < b,
            (Mode::Max, Some(b)) => value > b,
        }
    }
}

/// The metric whose best epoch is kept (Keras's `ModelCheckpoint(save_best_only=True)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BestMetric {
    /// `loss`, `accuracy`, `val_loss` or `val_accuracy`.
    pub metric: String,
    /// Whether smaller or larger is better.
    pub mode: Mode,
}

impl BestMetric {
    /// Keep the epoch with the smallest `metric` (a loss).
    pub fn min(metric: &str) -> Self {
        BestMetric {
            metric: metric.to_string(),
            mode: Mode::Min,
        }
    }

    /// Keep the epoch with the largest `metric` (an accuracy).
    pub fn max(metric: &str) -> Self {
        BestMetric {
            metric: metric.to_string(),
            mode: Mode::Max,
        }
    }
}

const METRICS: [&str; 4] = ["loss", "accuracy", "val_loss", "val_accuracy"];

/// The file name of the best checkpoint in a [`CheckpointConfig::dir`].
const BEST_FILE: &str = "best.safetensors";

fn metric_value(logs: &EpochLogs, metric: &str) -> Option<f32> {
    match metric {
        "loss" => Some(logs.loss),
        "accuracy" => Some(logs.accuracy),
        "val_loss" => logs.val_loss,
        "val_accuracy" => logs.val_accuracy,
        _ => None,
    }
}

/// Where and when `fit` writes checkpoints ([`Trainer::with_checkpoints`]).
///
/// One folder is meant for one run. A new run into a folder that an earlier, longer run used
/// leaves that run's later `epoch-*.safetensors` files in place, and [`Trainer::resume_latest`]
/// resumes the newest epoch in the folder, so it would continue the earlier run (see the
/// [module docs](crate::checkpoint#checkpoint-folders)); use a new folder, or delete the old
/// one, to start fresh.
///
/// At the end of each epoch `fit` also removes the temporary files that killed checkpoint
/// writes left in the folder (`.epoch-000007.safetensors.tmp-<pid>-<n>`): on Linux those whose
/// process is no longer running and that were untouched for a minute, elsewhere those older
/// than an hour; never those of the running process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointConfig {
    /// The directory (created when needed).
    pub dir: PathBuf,
    /// How many per-epoch checkpoints to keep (`epoch-000007.safetensors`, the newest ones up
    /// to the current epoch; files of later epochs, left by another run, are not touched);
    /// 0 writes none.
    pub keep_last: usize,
    /// Also keep the best epoch so far on this metric, as `best.safetensors`.
    pub best: Option<BestMetric>,
}

impl CheckpointConfig {
    /// A checkpoint at the end of every epoch in `dir`, keeping the last one.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CheckpointConfig {
            dir: dir.into(),
            keep_last: 1,
            best: None,
        }
    }

    /// Keeps the last `n` per-epoch checkpoints (0: none).
    pub fn keep_last(mut self, n: usize) -> Self {
        self.keep_last = n;
        self
    }

    /// Also keeps the best epoch so far on `best`.
    pub fn best(mut self, best: BestMetric) -> Self {
        self.best = Some(best);
        self
    }

    /// The path of the checkpoint written after `epoch` epochs.
    pub fn epoch_path(&self, epoch: usize) -> PathBuf {
        self.dir.join(format!("epoch-{epoch:06}.safetensors"))
    }

    /// The path of the best checkpoint.
    pub fn best_path(&self) -> PathBuf {
        self.dir.join(BEST_FILE)
    }

    /// Checks the metric exists (and, for a validation metric, that there is validation data).
    pub(crate) fn check(&self, has_validation: bool) -> crate::Result<()> {
        let Some(best) = &self.best else {
            return Ok(());
        };
        if !METRICS.contains(&best.metric.as_str()) {
            return Err(crate::Error::InvalidArgument {
                what: format!(
                    "unknown checkpoint metric {:?}: use one of {METRICS:?}",
                    best.metric
                ),
            });
        }
        if best.metric.starts_with("val_") && !has_validation {
            return Err(crate::Error::InvalidArgument {
                what: format!(
                    "checkpoint metric {:?} needs validation data: set validation_split",
                    best.metric
                ),
            });
        }
        Ok(())
    }
}

/// The epoch number of a per-epoch checkpoint's file name (`epoch-000007.safetensors` → 7).
fn epoch_of(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("epoch-")?.strip_suffix(".safetensors")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The per-epoch checkpoints in `dir`, oldest first (temporary files and others ignored).
fn epoch_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io_error("listing", dir, e)),
    };
    let mut found = vec![];
    for entry in entries {
        let entry = entry.map_err(|e| io_error("listing", dir, e))?;
        if let Some(n) = entry.file_name().to_str().and_then(epoch_of) {
            found.push((n, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The writer's process id in the name of a temporary file that [`write_atomic_with`] made for
/// a checkpoint of a [`CheckpointConfig::dir`] (`.epoch-000007.safetensors.tmp-<pid>-<n>`,
/// `.best.safetensors.tmp-<pid>-<n>`); `None` for any other name.
fn temporary_of(name: &str) -> Option<u32> {
    let (target, tail) = name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    let (pid, n) = tail.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !(digits(pid) && digits(n)) || (epoch_of(target).is_none() && target != BEST_FILE) {
        return None;
    }
    pid.parse().ok()
}

/// How long the temporary file of a writer that is no longer running must have been untouched
/// before it is removed: a margin for a writer in another PID namespace (a container) or on
/// another host sharing the directory, whose process id means nothing here.
const DEAD_WRITER_GRACE: Duration = Duration::from_secs(60);

/// Where there is no `/proc` to tell whether the writer runs, how old a temporary file must be
/// before it is removed (no checkpoint write takes that long).
const UNKNOWN_WRITER_AGE: Duration = Duration::from_secs(60 * 60);

/// Whether process `pid` is running: `Some` on Linux (from `/proc`), `None` where this cannot
/// tell.
fn running(pid: u32) -> Option<bool> {
    (cfg!(target_os = "linux") && Path::new("/proc/self").exists())
        .then(|| Path::new("/proc").join(pid.to_string()).exists())
}

/// Removes the temporary files that killed checkpoint writes left in `dir` (see
/// [`temporary_of`]): on Linux those whose writer is no longer running and that were untouched
/// for [`DEAD_WRITER_GRACE`]; elsewhere those older than [`UNKNOWN_WRITER_AGE`]. Never this
/// process's own, which may be in flight. Best effort: what cannot be read or removed is left.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(temporary_of) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Some(age) = entry
            .metadata()
            .ok()
            .filter(fs::Metadata::is_file)
            .and_then(|m| m.modified().ok())
            .and_then(|t| now.duration_since(t).ok())
        else {
            continue;
        };
        let stale = match running(pid) {
            Some(alive) => !alive && age >= DEAD_WRITER_GRACE,
            None => age >= UNKNOWN_WRITER_AGE,
        };
        if stale {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The newest per-epoch checkpoint in `dir` (`None` when there is none, or no `dir`): the
/// highest epoch number, whichever run wrote it (see [`CheckpointConfig`] on reusing a folder).
pub fn latest(dir: impl AsRef<Path>) -> Result<Option<PathBuf>> {
    Ok(epoch_files(dir.as_ref())?.pop().map(|(_, p)| p))
}

/// What `fit` does at the end of an epoch with checkpointing on: update the best value, remove
/// stale temporary files, write the epoch's checkpoint and drop the oldest beyond `keep_last`,
/// write the best one if it is.
pub(crate) fn on_epoch_end<M: Model, O: Optimizer>(
    trainer: &mut Trainer<M, O>,
    logs: &EpochLogs,
) -> Result<()> {
    let Some(config) = trainer.checkpoints.clone() else {
        return Ok(());
    };
    let mut improved = false;
    if let Some(best) = &config.best {
        let value =
            metric_value(logs, &best.metric).ok_or_else(|| crate::Error::InvalidArgument {
                what: format!("metric {:?} was not computed this epoch", best.metric),
            })?;
        let previous = trainer
            .best
            .as_ref()
            .filter(|(m, _)| m == best)
            .map(|(_, v)| *v);
        if best.mode.improves(value, previous) {
            trainer.best = Some((best.clone(), value));
            improved = true;
        }
    }
    if config.keep_last == 0 && !improved {
        return Ok(());
    }
    fs::create_dir_all(&config.dir).map_err(|e| io_error("creating", &config.dir, e))?;
    remove_stale_temporaries(&config.dir);
    let bytes = trainer.checkpoint_bytes()?;
    if config.keep_last > 0 {
        let epoch = trainer.progress().epoch;
        write_atomic(config.epoch_path(epoch), &bytes)?;
        // Only this run's history is pruned: files of later epochs (from another run in the
        // same directory) are left alone, and the file just written is always kept.
        let mut files = epoch_files(&config.dir)?;
        files.retain(|(n, _)| *n <= epoch as u64);
        let excess = files.len().saturating_sub(config.keep_last);
        for (_, old) in &files[..excess] {
            fs::remove_file(old).map_err(|e| io_error("removing", old, e))?;
        }
    }
    if improved {
        write_atomic(config.best_path(), &bytes)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Atomic writes
// ---------------------------------------------------------------------------------------------

fn io_error(op: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically: see [`write_atomic_with`].
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| io::Write::write_all(f, bytes))
}

/// Writes `path` atomically: `write` fills a new temporary file in the same directory
/// (`.<name>.tmp-<pid>-<n>`), which is flushed to disk (`fsync`), renamed over `path`, and the
/// directory is flushed too. A crash before the rename leaves `path` as it was (and at most a
/// stray temporary file, which mp never reads); after it, the new content. On an error the
/// temporary file is removed.
pub fn write_atomic_with(
    path: impl AsRef<Path>,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let path = path.as_ref();
    let Some(name) = path.file_name() else {
        return Err(io_error(
            "writing",
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
        ));
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| io_error("creating", &tmp, e))?;
    let written = write(&mut file).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_error("writing", &tmp, e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io_error("renaming into", path, e));
    }
    sync_dir(dir)
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("syncing", dir, e))
}

#[cfg(not(unix))]
fn sync_dir(_: &Path) -> Result<()> {
    // Windows cannot open a directory as a file; its rename is durable once it returns.
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| io_error("reading", path, e))
}

// ---------------------------------------------------------------------------------------------
// Checksum and metadata
// ---------------------------------------------------------------------------------------------

/// A tensor to write: name, safetensors dtype, shape, little-endian bytes.
type Entry<'a> = (&'a str, &'a str, &'a [usize], &'a [u8]);

fn digest<'a>(
    metadata: &BTreeMap<String, String>,
    tensors: impl Iterator<Item = Entry<'a>>,
) -> String {
    let mut h = Sha256::new();
    let mut put = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    put(b"mp checkpoint sha256 v1");
    for (k, v) in metadata.iter().filter(|(k, _)| *k != KEY_SHA256) {
        put(k.as_bytes());
        put(v.as_bytes());
    }
    for (name, dtype, shape, data) in tensors {
        put(name.as_bytes());
        put(dtype.as_bytes());
        let dims: Vec<u8> = shape
            .iter()
            .flat_map(|&d| (d as u64).to_le_bytes())
            .collect();
        put(&dims);
        put(data);
    }
    let mut hex = String::with_capacity(64);
    for b in h.finalize() {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// The checksum mp stores in `mp.sha256`: SHA-256 over every tensor's name, dtype, shape and
/// bytes (in data order) and every other metadata entry, each length-prefixed.
pub fn checksum(st: &SafeTensors<'_>) -> String {
    digest(
        &st.metadata,
        st.tensors.iter().map(|t| {
            (
                t.name.as_str(),
                t.dtype.as_str(),
                t.shape.as_slice(),
                st.data(t),
            )
        }),
    )
}

/// Serializes float32 tensors with mp metadata and its checksum.
fn seal(
    tensors: &[(String, &Tensor<F32>)],
    mut metadata: BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut seen = BTreeSet::new();
    let mut bytes = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(Error::Invalid {
                file: "(writing)".into(),
                what: format!("two tensors are named {name:?}"),
            });
        }
        // A host copy (a shared O(1) clone for host tensors).
        let values = t
            .to_device(mp_core::Device::Cpu)
            .and_then(|h| h.to_f32_vec())
            .map_err(crate::Error::from)?;
        bytes.push(
            values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
    }
    let entries: Vec<Entry<'_>> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, t), b)| (name.as_str(), "F32", t.shape(), b.as_slice()))
        .collect();
    metadata.insert(KEY_VERSION.into(), FORMAT_VERSION.to_string());
    let sum = digest(&metadata, entries.iter().copied());
    metadata.insert(KEY_SHA256.into(), sum);
    safetensors::serialize(&entries, &metadata)
}

/// Checks what kind of mp file this is (refusing newer versions) and its checksum.
/// Returns the kind, `None` for a safetensors file without mp metadata.
fn check_mp_metadata(file: &str, st: &SafeTensors<'_>) -> Result<Option<String>> {
    let Some(version) = st.metadata.get(KEY_VERSION) else {
        return Ok(None);
    };
    let invalid = |what: String| Error::Invalid {
        file: file.to_string(),
        what,
    };
    let version: u64 = version
        .parse()
        .map_err(|_| invalid(format!("{KEY_VERSION} {version:?} is not a version number")))?;
    if version > FORMAT_VERSION {
        return Err(Error::NewerVersion {
            file: file.to_string(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if version == 0 {
        return Err(invalid(format!("{KEY_VERSION} 0 does not exist")));
    }
    let Some(expected) = st.metadata.get(KEY_SHA256) else {
        return Err(Error::Corrupted {
            file: file.to_string(),
            what: format!("the checksum ({KEY_SHA256}) is missing"),
        });
    };
    let got = checksum(st);
    if *expected != got {
        return Err(Error::Corrupted {
            file: file.to_string(),
            what: format!(
                "the content does not match its checksum (stored {expected}, computed {got}): \
                 the file was damaged or edited"
            ),
        });
    }
    let kind = st.metadata.get(KEY_KIND).cloned().unwrap_or_default();
    if kind != KIND_CHECKPOINT && kind != KIND_WEIGHTS {
        return Err(invalid(format!("unknown {KEY_KIND} {kind:?}")));
    }
    Ok(Some(kind))
}

// ---------------------------------------------------------------------------------------------
// The training state (mp.state)
// ---------------------------------------------------------------------------------------------

/// `mp.state` as written and read, field for field (format version 1). Serde reads and writes
/// it; [`State::validate`] then checks what the types cannot say (a learning rate out of range,
/// a loss scale no optimizer could have had).
///
/// Every field must be present (`loss_scaling` and `best` as `null` when there is none), every
/// nested object must be a JSON object (not serde's positional array), and fields mp does not
/// know are ignored, as the hand-written reader before it had it; a field given twice is
/// refused (that reader took the last).
#[derive(Debug, Serialize, Deserialize)]
#[serde(expecting = "the training state (a JSON object)")]
struct State {
    /// The model's name, for people and other tools; not read back (the weights are checked
    /// by name and shape instead).
    #[serde(skip_deserializing)]
    model: String,
    /// The policy's name (`mixed_float16`), as `model`.
    #[serde(skip_deserializing)]
    policy: String,
    #[serde(serialize_with = "Progress::serialize", deserialize_with = "progress")]
    progress: TrainingProgress,
    /// The weight tensors' names, in the model's variable order.
    weights: Vec<String>,
    #[serde(deserialize_with = "object")]
    optimizer: SavedOptimizer,
    #[serde(deserialize_with = "nullable_object")]
    loss_scaling: Option<SavedScaling>,
    /// The best value so far of the checkpointing metric.
    #[serde(deserialize_with = "nullable_object")]
    best: Option<SavedBest>,
}

/// [`TrainingProgress`] as saved: `{"epoch": 2, "step": 14, "rng_state": 1234...}`.
#[derive(Serialize, Deserialize)]
#[serde(
    remote = "TrainingProgress",
    expecting = "the training progress (a JSON object)"
)]
struct Progress {
    epoch: usize,
    step: u64,
    rng_state: u64,
}

/// The optimizer as saved.
#[derive(Debug, Serialize, Deserialize)]
#[serde(expecting = "the optimizer (a JSON object)")]
struct SavedOptimizer {
    /// [`Optimizer::name`].
    name: String,
    learning_rate: Decimal<f32>,
    iterations: u64,
    /// [`Optimizer::config`]: the hyperparameters by name.
    config: BTreeMap<String, Decimal<f64>>,
    /// `[variable path, slot name, tensor name]`, in the optimizer's order.
    slots: Vec<(String, String, String)>,
}

/// [`ScalingState`] as saved.
#[derive(Debug, Serialize, Deserialize)]
#[serde(expecting = "the loss scaling (a JSON object)")]
struct SavedScaling {
    #[serde(deserialize_with = "object")]
    loss_scale: SavedLossScale,
    applied_steps: u64,
    skipped_steps: u64,
    skips_at_floor: u64,
    max_skips_at_floor: u64,
}

/// A [`LossScale`] as saved, tagged by `type`; a dynamic one with its whole configuration.
#[derive(Debug, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "lowercase",
    expecting = "the loss scale (a JSON object)"
)]
enum SavedLossScale {
    Fixed {
        scale: Decimal<f32>,
    },
    Dynamic {
        scale: Decimal<f32>,
        good_steps: u64,
        initial_scale: Decimal<f32>,
        growth_interval: u64,
        multiplier: Decimal<f32>,
        min_scale: Decimal<f32>,
    },
}

/// The checkpointing metric's best value so far, as saved.
#[derive(Debug, Serialize, Deserialize)]
#[serde(expecting = "the best metric (a JSON object)")]
struct SavedBest {
    metric: String,
    mode: Mode,
    value: Decimal<f32>,
}

/// `mp.state` after [`State::validate`], in the trainer's types.
#[derive(Debug)]
struct SavedState {
    progress: TrainingProgress,
    weights: Vec<String>,
    optimizer: SavedOptimizer,
    scaling: Option<ScalingState>,
    best: Option<(BestMetric, f32)>,
}

impl State {
    /// Parses `mp.state`: serde's error names the field or value and its position.
    fn parse(text: &str) -> serde_json::Result<State> {
        let mut de = serde_json::Deserializer::from_str(text);
        let state = object(&mut de)?;
        de.end()?;
        Ok(state)
    }

    /// Checks what the types do not, and turns the state into the trainer's types.
    fn validate(self) -> std::result::Result<SavedState, String> {
        let learning_rate = self.optimizer.learning_rate.0;
        if !(learning_rate.is_finite() && learning_rate >= 0.0) {
            return Err(format!(
                "optimizer.learning_rate {learning_rate:?} is not finite and non-negative"
            ));
        }
        let scaling = self.loss_scaling.map(SavedScaling::validate).transpose()?;
        Ok(SavedState {
            progress: self.progress,
            weights: self.weights,
            optimizer: self.optimizer,
            scaling,
            best: self.best.map(|b| {
                let metric = BestMetric {
                    metric: b.metric,
                    mode: b.mode,
                };
                (metric, b.value.0)
            }),
        })
    }
}

impl From<&ScalingState> for SavedScaling {
    fn from(s: &ScalingState) -> Self {
        let loss_scale = match &s.loss_scale {
            LossScale::Fixed(f) => SavedLossScale::Fixed {
                scale: Decimal(f.scale()),
            },
            LossScale::Dynamic(d) => {
                let c = d.config();
                SavedLossScale::Dynamic {
                    scale: Decimal(d.scale()),
                    good_steps: d.good_steps(),
                    initial_scale: Decimal(c.initial_scale),
                    growth_interval: c.growth_interval,
                    multiplier: Decimal(c.multiplier),
                    min_scale: Decimal(c.min_scale),
                }
            }
        };
        SavedScaling {
            loss_scale,
            applied_steps: s.applied,
            skipped_steps: s.skipped,
            skips_at_floor: s.skips_at_floor,
            max_skips_at_floor: s.max_skips_at_floor,
        }
    }
}

impl SavedScaling {
    /// The loss scale as [`LossScale`] builds it (refusing what it refuses), and the scaling
    /// state as [`ScalingState::validate`] accepts it.
    fn validate(self) -> std::result::Result<ScalingState, String> {
        let loss_scale = match self.loss_scale {
            SavedLossScale::Fixed { scale } => LossScale::fixed(scale.0),
            SavedLossScale::Dynamic {
                scale,
                good_steps,
                initial_scale,
                growth_interval,
                multiplier,
                min_scale,
            } => {
                let config = DynamicLossScaleConfig {
                    initial_scale: initial_scale.0,
                    growth_interval,
                    multiplier: multiplier.0,
                    min_scale: min_scale.0,
                };
                let state = LossScaleState {
                    scale_bits: scale.0.to_bits(),
                    good_steps,
                };
                DynamicLossScale::from_config(config).and_then(|mut d| {
                    d.restore(state)?;
                    Ok(LossScale::Dynamic(d))
                })
            }
        }
        .map_err(|e| format!("loss_scaling.loss_scale: {e}"))?;
        let state = ScalingState {
            loss_scale,
            applied: self.applied_steps,
            skipped: self.skipped_steps,
            skips_at_floor: self.skips_at_floor,
            max_skips_at_floor: self.max_skips_at_floor,
        };
        state.validate().map_err(|e| format!("loss_scaling: {e}"))?;
        Ok(state)
    }
}

/// The dotted path (`progress.step`, `optimizer.slots.2`) of the innermost value that JSON
/// `text` is in at `line` and `column` (1-based line, bytes into it), as serde_json reports an
/// error's position: just after the value or key it stopped at, or after the `}` of the object
/// that lacks a field. `text` is well-formed up to there (the parser got that far); past the
/// end, the path at the end.
fn field_at(text: &str, line: usize, column: usize) -> String {
    enum Frame {
        /// The key being read or whose value is being read, and whether a key comes next.
        Object(Option<String>, bool),
        /// The element's index.
        Array(usize),
    }
    let start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    let bytes = &text.as_bytes()[..(start + column).min(text.len())];
    let mut frames = vec![];
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'{' => frames.push(Frame::Object(None, true)),
            b'[' => frames.push(Frame::Array(0)),
            b'}' | b']' => {
                frames.pop();
            }
            b',' => match frames.last_mut() {
                Some(Frame::Object(_, next_is_key)) => *next_is_key = true,
                Some(Frame::Array(index)) => *index += 1,
                None => {}
            },
            b'"' => {
                let begin = i + 1;
                i = begin;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                if let Some(Frame::Object(key, next_is_key @ true)) = frames.last_mut() {
                    let end = i.min(bytes.len());
                    *key = Some(String::from_utf8_lossy(&bytes[begin..end]).into_owned());
                    *next_is_key = false;
                }
            }
            _ => {}
        }
        i += 1;
    }
    let names: Vec<String> = frames
        .into_iter()
        .filter_map(|f| match f {
            Frame::Object(key, _) => key,
            Frame::Array(index) => Some(index.to_string()),
        })
        .collect();
    names.join(".")
}

/// A float written as a JSON string of its shortest decimal that reads back to the same bits
/// (`"0.001"`, `"1e-7"`, `"32768.0"`, `"NaN"`): exact for float32 and float64 alike, where a
/// JSON number is read as float64 by most tools and cannot hold NaN or infinity.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Decimal<T>(T);

impl<T: fmt::Debug> Serialize for Decimal<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:?}", self.0))
    }
}

impl<'de, T: FromStr> Deserialize<'de> for Decimal<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Text<T>(PhantomData<T>);
        impl<T: FromStr> Visitor<'_> for Text<T> {
            type Value = Decimal<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number written as a string")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<Decimal<T>, E> {
                s.parse()
                    .map(Decimal)
                    .map_err(|_| E::invalid_value(Unexpected::Str(s), &self))
            }
        }
        d.deserialize_str(Text(PhantomData))
    }
}

/// Deserializes `T` (a struct or an internally tagged enum) from a JSON object only: serde's
/// derived structs also accept an array of their fields in order, which mp never writes.
fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> std::result::Result<T, D::Error> {
    T::deserialize(ObjectOnly(d))
}

/// [`object`] or `null` (`None`). As a `deserialize_with` it also makes the field required
/// (serde would let a missing `Option` be `None`).
fn nullable_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> std::result::Result<Option<T>, D::Error> {
    struct Object<T>(T);
    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            object(d).map(Object)
        }
    }
    Ok(Option::<Object<T>>::deserialize(d)?.map(|o| o.0))
}

/// [`object`] for [`TrainingProgress`], which is saved through [`Progress`].
fn progress<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<TrainingProgress, D::Error> {
    Progress::deserialize(ObjectOnly(d))
}

/// A deserializer that reads whatever is asked of it as a map (see [`object`]).
struct ObjectOnly<D>(D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ObjectOnly<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> std::result::Result<V::Value, D::Error> {
        self.0.deserialize_map(v)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

// ---------------------------------------------------------------------------------------------
// Validation against a model
// ---------------------------------------------------------------------------------------------

/// The model's variables, `(path, shape)` in order.
fn variables<M: Model>(model: &mut M) -> Result<Vec<(String, Vec<usize>)>> {
    let mut out = vec![];
    model.visit_variables("", &mut |path, v| {
        out.push((path.to_string(), v.shape().to_vec()));
        Ok(())
    })?;
    Ok(out)
}

/// Matches the file's weight tensors (`names`) against the model's variables, pushing every
/// problem; returns the values in the model's order when there were none.
fn match_weights(
    st: &SafeTensors<'_>,
    names: &[&str],
    vars: &[(String, Vec<usize>)],
    problems: &mut Vec<String>,
) -> Result<Vec<(String, Tensor<F32>)>> {
    let before = problems.len();
    if vars.is_empty() {
        problems.push(
            "the model has no variables: build it (model.build(input_shape)) before loading".into(),
        );
    }
    let in_file: HashMap<&str, ()> = names.iter().map(|n| (*n, ())).collect();
    let mut out = vec![];
    for (path, shape) in vars {
        if !in_file.contains_key(path.as_str()) {
            problems.push(format!(
                "variable {path:?} of the model is missing from the file"
            ));
            continue;
        }
        let Some(t) = st.get(path) else {
            problems.push(format!("variable {path:?} is listed but has no tensor"));
            continue;
        };
        if t.dtype != "F32" {
            problems.push(format!("{path:?} has dtype {}, expected F32", t.dtype));
        } else if t.shape != *shape {
            problems.push(format!(
                "{path:?} has shape {:?} in the file, {shape:?} in the model",
                t.shape
            ));
        } else if problems.len() == before {
            let values = st.f32_values(t).unwrap_or_default();
            out.push((
                path.clone(),
                Tensor::from_vec(shape, values).map_err(crate::Error::from)?,
            ));
        }
    }
    let model_vars: HashMap<&str, ()> = vars.iter().map(|(p, _)| (p.as_str(), ())).collect();
    for name in names {
        if !model_vars.contains_key(name) {
            problems.push(format!(
                "{name:?} in the file is not a variable of the model"
            ));
        }
    }
    Ok(out)
}

fn weights_problems(file: &str, problems: Vec<String>) -> Result<()> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Mismatch {
            file: file.to_string(),
            problems,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Weights only
// ---------------------------------------------------------------------------------------------

/// The model's weights as a safetensors file: one float32 tensor per variable, named by its
/// path, with mp metadata (`mp.kind` = `weights`, the version and the checksum).
pub fn weights_to_bytes<M: Model>(model: &mut M) -> Result<Vec<u8>> {
    let weights = model.get_weights()?;
    let tensors: Vec<(String, &Tensor<F32>)> =
        weights.iter().map(|(n, t)| (n.clone(), t)).collect();
    let mut metadata = BTreeMap::new();
    metadata.insert(KEY_KIND.to_string(), KIND_WEIGHTS.to_string());
    metadata.insert("mp.model".to_string(), model.model_name().to_string());
    metadata.insert(
        "mp.policy".to_string(),
        <M::Policy as PolicyKind>::POLICY.name().to_string(),
    );
    seal(&tensors, metadata)
}

/// Saves the model's weights atomically as a safetensors file (see [`weights_to_bytes`]).
pub fn save_weights<M: Model>(model: &mut M, path: impl AsRef<Path>) -> Result<()> {
    write_atomic(path, &weights_to_bytes(model)?)
}

/// Loads weights from a safetensors file: one written by [`save_weights`], a checkpoint (its
/// weights only), or a file from another tool whose tensors are exactly the model's variables
/// (float32, named by path). Every name, dtype and shape is checked before anything is written;
/// each mismatch is reported by name and the model is left unchanged.
pub fn load_weights<M: Model>(model: &mut M, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    load_weights_from_bytes(model, &path.display().to_string(), &read(path)?)
}

/// [`load_weights`] from bytes in memory; `file` names them in errors.
pub fn load_weights_from_bytes<M: Model>(model: &mut M, file: &str, bytes: &[u8]) -> Result<()> {
    let st = SafeTensors::parse(file, bytes)?;
    let names: Vec<String> = match check_mp_metadata(file, &st)?.as_deref() {
        Some(KIND_CHECKPOINT) => state_of(file, &st)?.weights,
        _ => st.tensors.iter().map(|t| t.name.clone()).collect(),
    };
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let vars = variables(model)?;
    let mut problems = vec![];
    let weights = match_weights(&st, &names, &vars, &mut problems)?;
    weights_problems(file, problems)?;
    model.set_weights(&weights)?;
    Ok(())
}

fn state_of(file: &str, st: &SafeTensors<'_>) -> Result<SavedState> {
    let text = st.metadata.get(KEY_STATE).ok_or_else(|| Error::Invalid {
        file: file.to_string(),
        what: format!("the training state ({KEY_STATE}) is missing"),
    })?;
    parse_state(file, text)
}

/// Parses and validates `mp.state`; `file` names it in errors.
fn parse_state(file: &str, text: &str) -> Result<SavedState> {
    let state = State::parse(text).map_err(|source| Error::State {
        file: file.to_string(),
        field: field_at(text, source.line(), source.column()),
        source,
    })?;
    state.validate().map_err(|what| Error::Invalid {
        file: file.to_string(),
        what: format!("{KEY_STATE}: {what}"),
    })
}

// ---------------------------------------------------------------------------------------------
// Whole checkpoints
// ---------------------------------------------------------------------------------------------

impl<M: Model, O: Optimizer> Trainer<M, O> {
    /// The whole training state as a checkpoint file in memory (see the [module
    /// docs](crate::checkpoint)).
    pub fn checkpoint_bytes(&mut self) -> Result<Vec<u8>> {
        let weights = self.model_mut().get_weights()?;
        let policy = <M::Policy as PolicyKind>::POLICY;
        let model_name = self.model().model_name();
        let progress = self.progress();
        let opt = self.optimizer().inner();
        let slot_state = opt.state();
        let mut tensors: Vec<(String, &Tensor<F32>)> =
            weights.iter().map(|(n, t)| (n.clone(), t)).collect();
        let mut slots = vec![];
        for (var, slot, t) in &slot_state {
            let name = format!("{SLOT_PREFIX}{var}/{slot}");
            slots.push((var.clone(), slot.to_string(), name.clone()));
            tensors.push((name, *t));
        }
        let state = State {
            model: model_name.to_string(),
            policy: policy.name().to_string(),
            progress,
            weights: weights.iter().map(|(n, _)| n.clone()).collect(),
            optimizer: SavedOptimizer {
                name: opt.name().to_string(),
                learning_rate: Decimal(opt.learning_rate()),
                iterations: opt.iterations(),
                config: opt
                    .config()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), Decimal(v)))
                    .collect(),
                slots,
            },
            loss_scaling: match self.optimizer() {
                TrainOptimizer::Plain(_) => None,
                TrainOptimizer::Scaled(s) => Some(SavedScaling::from(&s.scaling_state())),
            },
            best: self.best.as_ref().map(|(m, v)| SavedBest {
                metric: m.metric.clone(),
                mode: m.mode,
                value: Decimal(*v),
            }),
        };
        let state = serde_json::to_string(&state).map_err(|source| Error::State {
            file: "(writing)".into(),
            field: String::new(),
            source,
        })?;
        let mut metadata = BTreeMap::new();
        metadata.insert(KEY_KIND.to_string(), KIND_CHECKPOINT.to_string());
        metadata.insert(KEY_STATE.to_string(), state);
        seal(&tensors, metadata)
    }

    /// Saves the whole training state atomically to `path`: the model's weights, the
    /// optimizer's state, the loss scaling and the training progress (see the [module
    /// docs](crate::checkpoint)). [`Trainer::resume`] continues from it exactly.
    pub fn save_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let bytes = self.checkpoint_bytes()?;
        write_atomic(path, &bytes)
    }

    /// Restores the training state saved in the checkpoint at `path`, so that `fit` continues
    /// as if it had never stopped: with the same seed and thread count, the weights after
    /// resuming are bit-for-bit those of an uninterrupted run. `fit` then runs `epochs` more
    /// epochs from the restored epoch.
    ///
    /// The model must be built (its variables are what the file is checked against). Everything
    /// is checked first — the file's format, version and checksum, every weight's and slot's
    /// name, dtype and shape, the optimizer's kind and hyperparameters, the loss scaling — and
    /// every mismatch is reported by name; on any error the model, the optimizer and the trainer
    /// are unchanged.
    pub fn resume(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.resume_from_bytes(&path.display().to_string(), &read(path)?)
    }

    /// Resumes from the newest per-epoch checkpoint in `dir` (the highest epoch number), if
    /// there is one; returns its path.
    ///
    /// The newest file may not be this run's: files of later epochs that an earlier, longer
    /// run left in `dir` are kept by `fit`, so after a new `fit` into that folder this resumes
    /// the earlier run at its later epoch (see the [module
    /// docs](crate::checkpoint#checkpoint-folders)). To start fresh, use a new folder or delete
    /// the old one.
    pub fn resume_latest(&mut self, dir: impl AsRef<Path>) -> Result<Option<PathBuf>> {
        match latest(dir)? {
            Some(path) => {
                self.resume(&path)?;
                Ok(Some(path))
            }
            None => Ok(None),
        }
    }

    /// [`Trainer::resume`] from a checkpoint in memory; `file` names it in errors.
    pub fn resume_from_bytes(&mut self, file: &str, bytes: &[u8]) -> Result<()> {
        let st = SafeTensors::parse(file, bytes)?;
        match check_mp_metadata(file, &st)?.as_deref() {
            Some(KIND_CHECKPOINT) => {}
            Some(_) => {
                return Err(Error::NotACheckpoint {
                    file: file.to_string(),
                    what: "it holds weights only (load it with checkpoint::load_weights)".into(),
                });
            }
            None => {
                return Err(Error::NotACheckpoint {
                    file: file.to_string(),
                    what: format!(
                        "a safetensors file without mp metadata ({KEY_VERSION}), written by \
                         another tool (load its weights with checkpoint::load_weights)"
                    ),
                });
            }
        }
        let saved = state_of(file, &st)?;

        // 1. Check everything, collecting every problem.
        let invalid = |what: String| Error::Invalid {
            file: file.to_string(),
            what,
        };
        let mut referenced: HashMap<&str, usize> = HashMap::new();
        for name in saved
            .weights
            .iter()
            .chain(saved.optimizer.slots.iter().map(|(_, _, t)| t))
        {
            *referenced.entry(name.as_str()).or_default() += 1;
        }
        if let Some((name, _)) = referenced.iter().find(|(_, n)| **n > 1) {
            return Err(invalid(format!(
                "tensor {name:?} is listed twice in {KEY_STATE}"
            )));
        }
        for t in &st.tensors {
            if !referenced.contains_key(t.name.as_str()) {
                return Err(invalid(format!(
                    "tensor {:?} is neither a weight nor an optimizer slot",
                    t.name
                )));
            }
        }
        let vars = variables(self.model_mut())?;
        let mut problems = vec![];
        let names: Vec<&str> = saved.weights.iter().map(String::as_str).collect();
        let weights = match_weights(&st, &names, &vars, &mut problems)?;

        let opt = self.optimizer().inner();
        if saved.optimizer.name != opt.name() {
            problems.push(format!(
                "the optimizer is {} in the file, {} in the trainer",
                saved.optimizer.name,
                opt.name()
            ));
        } else {
            let ours: BTreeMap<String, f64> = opt
                .config()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            let theirs: BTreeMap<String, f64> = saved
                .optimizer
                .config
                .iter()
                .map(|(k, v)| (k.clone(), v.0))
                .collect();
            for key in ours.keys().chain(theirs.keys()).collect::<BTreeSet<_>>() {
                let (a, b) = (theirs.get(key), ours.get(key));
                if a != b {
                    let show = |v: Option<&f64>| v.map_or("absent".into(), |v| format!("{v:?}"));
                    problems.push(format!(
                        "{} {key} is {} in the file, {} in the trainer",
                        opt.name(),
                        show(a),
                        show(b)
                    ));
                }
            }
        }
        let shapes: HashMap<&str, &Vec<usize>> =
            vars.iter().map(|(p, s)| (p.as_str(), s)).collect();
        let mut slots = vec![];
        for (var, slot, name) in &saved.optimizer.slots {
            let Some(t) = st.get(name) else {
                problems.push(format!("optimizer slot {name:?} has no tensor"));
                continue;
            };
            match shapes.get(var.as_str()) {
                None => problems.push(format!(
                    "optimizer slot {name:?} is for {var:?}, which is not a variable of the model"
                )),
                Some(_) if t.dtype != "F32" => {
                    problems.push(format!("{name:?} has dtype {}, expected F32", t.dtype))
                }
                Some(shape) if t.shape != **shape => problems.push(format!(
                    "{name:?} has shape {:?}, but variable {var:?} has {shape:?}",
                    t.shape
                )),
                Some(shape) => {
                    let values = st.f32_values(t).unwrap_or_default();
                    let tensor = Tensor::from_vec(shape, values).map_err(crate::Error::from)?;
                    slots.push((var.clone(), slot.clone(), tensor));
                }
            }
        }
        match (&saved.scaling, self.optimizer()) {
            (Some(s), TrainOptimizer::Plain(_)) => problems.push(format!(
                "the file has loss scaling ({}), the trainer has none",
                s.loss_scale
            )),
            (None, TrainOptimizer::Scaled(s)) => problems.push(format!(
                "the file has no loss scaling, the trainer has {}",
                s.loss_scale_state()
            )),
            _ => {}
        }
        weights_problems(file, problems)?;

        // 2. Assign, undoing on the (unexpected) failure of a later step.
        let old_weights = self.model_mut().get_weights()?;
        let opt = self.optimizer().inner();
        let old_lr = opt.learning_rate();
        let old_iterations = opt.iterations();
        let old_slots: Vec<(String, String, Tensor<F32>)> = opt
            .state()
            .into_iter()
            .map(|(v, s, t)| (v, s.to_string(), t.clone()))
            .collect();
        let old_scaling = match self.optimizer() {
            TrainOptimizer::Scaled(s) => Some(s.scaling_state()),
            TrainOptimizer::Plain(_) => None,
        };
        // The optimizer checks its slot list and writes nothing on error: first.
        self.optimizer_mut()
            .inner_mut()
            .load_state(saved.optimizer.iterations, slots)?;
        let rest = (|| -> Result<()> {
            self.optimizer_mut()
                .inner_mut()
                .set_learning_rate(saved.optimizer.learning_rate.0)?;
            self.model_mut().set_weights(&weights)?;
            if let (TrainOptimizer::Scaled(s), Some(state)) =
                (self.optimizer_mut(), saved.scaling.clone())
            {
                s.restore_scaling_state(state)?;
            }
            Ok(())
        })();
        if let Err(e) = rest {
            let opt = self.optimizer_mut().inner_mut();
            let _ = opt.load_state(old_iterations, old_slots);
            let _ = opt.set_learning_rate(old_lr);
            let _ = self.model_mut().set_weights(&old_weights);
            if let (TrainOptimizer::Scaled(s), Some(state)) = (self.optimizer_mut(), old_scaling) {
                let _ = s.restore_scaling_state(state);
            }
            return Err(e);
        }
        self.set_progress(saved.progress);
        self.best = saved.best;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_names_parse() {
        assert_eq!(epoch_of("epoch-000007.safetensors"), Some(7));
        assert_eq!(epoch_of("epoch-.safetensors"), None);
        assert_eq!(epoch_of(".epoch-000007.safetensors.tmp-1-0"), None);
        assert_eq!(epoch_of("epoch-+7.safetensors"), None);
        assert_eq!(epoch_of("best.safetensors"), None);
    }

    #[test]
    fn temporary_names_parse() {
        assert_eq!(
            temporary_of(".epoch-000007.safetensors.tmp-123-0"),
            Some(123)
        );
        assert_eq!(temporary_of(".best.safetensors.tmp-9-17"), Some(9));
        assert_eq!(temporary_of("epoch-000007.safetensors.tmp-123-0"), None);
        assert_eq!(temporary_of(".epoch-000007.safetensors.tmp-123-"), None);
        assert_eq!(temporary_of(".epoch-000007.safetensors.tmp-x-0"), None);
        assert_eq!(
            temporary_of(".notes.txt.tmp-123-0"),
            None,
            "not a checkpoint's"
        );
        assert_eq!(
            temporary_of(".w.safetensors.tmp-123-0"),
            None,
            "not a folder's name"
        );
        assert_eq!(temporary_of("epoch-000007.safetensors"), None);
    }

    #[test]
    fn best_modes() {
        assert!(Mode::Min.improves(1.0, None));
        assert!(!Mode::Min.improves(f32::NAN, None));
        assert!(Mode::Min.improves(0.5, Some(1.0)));
        assert!(!Mode::Min.improves(1.0, Some(1.0)));
        assert!(Mode::Max.improves(0.9, Some(0.8)));
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        write_atomic(&path, b"old").unwrap();
        let e = write_atomic_with(&path, |f| {
            io::Write::write_all(f, b"half of the new cont")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("c.safetensors")]);
        write_atomic(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
    }

    fn state_error(text: &str) -> String {
        parse_state("f", text).unwrap_err().to_string()
    }

    /// The messages name the field, then serde's: the missing field, or the value and what was
    /// expected, and the position.
    #[test]
    fn state_fields_name_their_path() {
        let prefix = "f holds an invalid checkpoint: mp.state: ";
        let e = state_error(r#"{"progress": {"epoch": 1, "step": -1}}"#);
        assert_eq!(
            e.strip_prefix(prefix).unwrap(),
            "progress.step: invalid value: integer `-1`, expected u64 at line 1 column 36"
        );
        let e = state_error(r#"{"progress": {"epoch": 1, "step": 1}}"#);
        assert_eq!(
            e.strip_prefix(prefix).unwrap(),
            "progress: missing field `rng_state` at line 1 column 36"
        );
        let e = state_error("[]");
        assert_eq!(
            e.strip_prefix(prefix).unwrap(),
            "invalid type: sequence, expected the training state (a JSON object) at line 1 \
             column 0"
        );
        // Nested objects must be objects too: serde alone would take an array of the fields.
        let e = state_error(r#"{"progress": [1, 2, 3]}"#);
        assert!(
            e.contains("progress: invalid type: sequence, expected the training progress"),
            "{e}"
        );
        let e = state_error(
            r#"{"progress": {"epoch": 1, "step": 1, "rng_state": 1}, "weights": ["a", 2]}"#,
        );
        assert!(
            e.contains("weights.1: invalid type: integer `2`, expected a string"),
            "{e}"
        );
        let e = state_error("{\n  \"progress\": {\n    \"epoch\": \"1\"\n  }\n}");
        assert!(
            e.contains("progress.epoch: invalid type: string \"1\", expected usize at line 3"),
            "{e}"
        );
        let e = state_error(r#"{"progress": {"epoch": 1, "step": 1, "rng_state": 1},"#);
        assert!(e.contains("EOF while parsing"), "{e}");
    }

    #[test]
    fn field_paths_follow_keys_escapes_and_arrays() {
        let text = r#"{"a\"}": {"b": [0, {"c": "}"}]}, "d": 1}"#;
        let at = |needle: &str| field_at(text, 1, text.find(needle).unwrap() + needle.len());
        assert_eq!(at(r#""a\"}""#), "a\\\"}");
        assert_eq!(at("[0"), "a\\\"}.b.0");
        assert_eq!(at(r#""c": "}""#), "a\\\"}.b.1.c");
        assert_eq!(at(r#""}"}"#), "a\\\"}.b.1");
        assert_eq!(at(r#""d": 1"#), "d");
        assert_eq!(field_at(text, 1, 0), "");
        assert_eq!(field_at(text, 9, 99), "", "past the end");
    }

    #[test]
    fn floats_are_decimal_strings_that_read_back_to_the_same_bits() {
        for v in [
            0.001f32,
            1e-7,
            32768.0,
            -0.0,
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::NAN,
        ] {
            let text = serde_json::to_string(&Decimal(v)).unwrap();
            let back: Decimal<f32> = serde_json::from_str(&text).unwrap();
            assert_eq!(back.0.to_bits(), v.to_bits(), "{text}");
        }
        assert_eq!(serde_json::to_string(&Decimal(0.9f64)).unwrap(), r#""0.9""#);
        assert_eq!(
            serde_json::to_string(&Decimal(1e-7f32)).unwrap(),
            r#""1e-7""#
        );
        let e = serde_json::from_str::<Decimal<f32>>("0.5").unwrap_err();
        assert!(
            e.to_string()
                .contains("expected a number written as a string"),
            "{e}"
        );
        let e = serde_json::from_str::<Decimal<f32>>(r#""half""#).unwrap_err();
        assert!(
            e.to_string().starts_with("invalid value: string \"half\""),
            "{e}"
        );
    }
}
