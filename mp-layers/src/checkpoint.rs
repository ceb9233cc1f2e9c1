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
//!     same bits; integers (`rng_state` is a full `u64`) as JSON integers.
//!
//! # Writing and loading
//!
//! Every file is written atomically ([`write_atomic`]): to a temporary file in the same
//! directory, flushed to disk, renamed over the destination, and the directory flushed, so a
//! crash at any moment leaves either the previous file or the new one, never a mix.
//!
//! Loading ([`Trainer::resume`], [`load_weights`]) parses and checks the whole file, checks
//! every tensor's name, dtype and shape against the model (and the optimizer's slots against the
//! variables) and reports every mismatch by name ([`Error::Mismatch`]), all before assigning
//! anything: on any error the model, the optimizer and the trainer are unchanged.

pub mod safetensors;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use mp_core::{
    DynamicLossScale, DynamicLossScaleConfig, F32, LossScale, LossScaleState, PolicyKind, Tensor,
};
use mp_optim::Optimizer;
use mp_optim::loss_scale_optimizer::ScalingState;
use serde_json::{Map, Value, json};
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
    /// Well-formed, but holding a state mp could not have written (a bad field, a loss scale
    /// out of range, an inconsistent slot list).
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

/// The result type of checkpointing.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for crate::Error {
    /// `fit` reports checkpoint errors as [`crate::Error`]: model errors as themselves,
    /// mismatches as [`crate::Error::Weights`], the rest as an invalid state of `checkpoint`.
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
            other => crate::Error::InvalidState {
                layer: "checkpoint".into(),
                what: other.to_string(),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration of fit's checkpoint callbacks
// ---------------------------------------------------------------------------------------------

/// Whether a smaller or a larger value of a metric is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Smaller is better (losses).
    Min,
    /// Larger is better (accuracies).
    Max,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Min => "min",
            Mode::Max => "max",
        }
    }

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
        self.dir.join("best.safetensors")
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

/// The newest per-epoch checkpoint in `dir` (`None` when there is none, or no `dir`).
pub fn latest(dir: impl AsRef<Path>) -> Result<Option<PathBuf>> {
    Ok(epoch_files(dir.as_ref())?.pop().map(|(_, p)| p))
}

/// What `fit` does at the end of an epoch with checkpointing on: update the best value, write
/// the epoch's checkpoint and drop the oldest beyond `keep_last`, write the best one if it is.
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

/// The optimizer as saved.
#[derive(Debug)]
struct SavedOptimizer {
    name: String,
    learning_rate: f32,
    iterations: u64,
    config: BTreeMap<String, f64>,
    /// `(variable path, slot name, tensor name)`, in the optimizer's order.
    slots: Vec<(String, String, String)>,
}

/// Everything in `mp.state`.
#[derive(Debug)]
struct SavedState {
    progress: TrainingProgress,
    weights: Vec<String>,
    optimizer: SavedOptimizer,
    scaling: Option<ScalingState>,
    best: Option<(BestMetric, f32)>,
}

fn float(v: f32) -> Value {
    Value::String(format!("{v:?}"))
}

fn float64(v: f64) -> Value {
    Value::String(format!("{v:?}"))
}

fn scaling_json(s: &ScalingState) -> Value {
    let loss_scale = match &s.loss_scale {
        LossScale::Fixed(f) => json!({ "type": "fixed", "scale": float(f.scale()) }),
        LossScale::Dynamic(d) => {
            let c = d.config();
            json!({
                "type": "dynamic",
                "scale": float(d.scale()),
                "good_steps": d.good_steps(),
                "initial_scale": float(c.initial_scale),
                "growth_interval": c.growth_interval,
                "multiplier": float(c.multiplier),
                "min_scale": float(c.min_scale),
            })
        }
    };
    json!({
        "loss_scale": loss_scale,
        "applied_steps": s.applied,
        "skipped_steps": s.skipped,
        "skips_at_floor": s.skips_at_floor,
        "max_skips_at_floor": s.max_skips_at_floor,
    })
}

/// Typed access to one JSON object of `mp.state`, with errors naming the field's path.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    fn root(v: &'a Value) -> std::result::Result<Self, String> {
        match v {
            Value::Object(map) => Ok(Obj {
                map,
                path: String::new(),
            }),
            _ => Err("not a JSON object".into()),
        }
    }

    fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn get(&self, key: &str) -> std::result::Result<&'a Value, String> {
        self.map
            .get(key)
            .ok_or_else(|| format!("{} is missing", self.name(key)))
    }

    fn obj(&self, key: &str) -> std::result::Result<Option<Obj<'a>>, String> {
        match self.get(key)? {
            Value::Null => Ok(None),
            Value::Object(map) => Ok(Some(Obj {
                map,
                path: self.name(key),
            })),
            _ => Err(format!("{} is not an object", self.name(key))),
        }
    }

    fn req(&self, key: &str) -> std::result::Result<Obj<'a>, String> {
        self.obj(key)?
            .ok_or_else(|| format!("{} is null", self.name(key)))
    }

    fn u64(&self, key: &str) -> std::result::Result<u64, String> {
        self.get(key)?
            .as_u64()
            .ok_or_else(|| format!("{} is not an unsigned integer", self.name(key)))
    }

    fn str(&self, key: &str) -> std::result::Result<&'a str, String> {
        self.get(key)?
            .as_str()
            .ok_or_else(|| format!("{} is not a string", self.name(key)))
    }

    fn f64_of(&self, key: &str, v: &Value) -> std::result::Result<f64, String> {
        v.as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .ok_or_else(|| format!("{} is not a number written as a string", self.name(key)))
    }

    fn f32(&self, key: &str) -> std::result::Result<f32, String> {
        let v = self.get(key)?;
        v.as_str()
            .and_then(|s| s.parse::<f32>().ok())
            .ok_or_else(|| format!("{} is not a number written as a string", self.name(key)))
    }

    fn strings(&self, key: &str) -> std::result::Result<Vec<&'a str>, String> {
        let err = || format!("{} is not a list of strings", self.name(key));
        match self.get(key)? {
            Value::Array(items) => items.iter().map(|v| v.as_str().ok_or_else(err)).collect(),
            _ => Err(err()),
        }
    }
}

fn parse_loss_scale(o: &Obj<'_>) -> std::result::Result<LossScale, String> {
    let checked = |r: mp_core::Result<LossScale>| r.map_err(|e| format!("{}: {e}", o.path));
    match o.str("type")? {
        "fixed" => checked(LossScale::fixed(o.f32("scale")?)),
        "dynamic" => {
            let config = DynamicLossScaleConfig {
                initial_scale: o.f32("initial_scale")?,
                growth_interval: o.u64("growth_interval")?,
                multiplier: o.f32("multiplier")?,
                min_scale: o.f32("min_scale")?,
            };
            let state = LossScaleState {
                scale_bits: o.f32("scale")?.to_bits(),
                good_steps: o.u64("good_steps")?,
            };
            checked(DynamicLossScale::from_config(config).and_then(|mut d| {
                d.restore(state)?;
                Ok(LossScale::Dynamic(d))
            }))
        }
        other => Err(format!("{}.type {other:?} is not fixed or dynamic", o.path)),
    }
}

fn parse_state(text: &str) -> std::result::Result<SavedState, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    let root = Obj::root(&value)?;
    let p = root.req("progress")?;
    let progress = TrainingProgress {
        epoch: usize::try_from(p.u64("epoch")?).map_err(|_| "progress.epoch is too large")?,
        step: p.u64("step")?,
        rng_state: p.u64("rng_state")?,
    };
    let weights = root
        .strings("weights")?
        .into_iter()
        .map(String::from)
        .collect();
    let o = root.req("optimizer")?;
    let learning_rate = o.f32("learning_rate")?;
    if !(learning_rate.is_finite() && learning_rate >= 0.0) {
        return Err(format!(
            "optimizer.learning_rate {learning_rate:?} is not finite and non-negative"
        ));
    }
    let c = o.req("config")?;
    let config = c
        .map
        .iter()
        .map(|(k, v)| Ok((k.clone(), c.f64_of(k, v)?)))
        .collect::<std::result::Result<_, String>>()?;
    let slots = match o.get("slots")? {
        Value::Array(items) => items
            .iter()
            .map(|item| match item.as_array().map(Vec::as_slice) {
                Some([Value::String(v), Value::String(s), Value::String(t)]) => {
                    Ok((v.clone(), s.clone(), t.clone()))
                }
                _ => Err(format!(
                    "optimizer.slots entry {item} is not [variable, slot, tensor]"
                )),
            })
            .collect::<std::result::Result<_, String>>()?,
        _ => return Err("optimizer.slots is not a list".into()),
    };
    let optimizer = SavedOptimizer {
        name: o.str("name")?.to_string(),
        learning_rate,
        iterations: o.u64("iterations")?,
        config,
        slots,
    };
    let scaling = match root.obj("loss_scaling")? {
        None => None,
        Some(s) => {
            let state = ScalingState {
                loss_scale: parse_loss_scale(&s.req("loss_scale")?)?,
                applied: s.u64("applied_steps")?,
                skipped: s.u64("skipped_steps")?,
                skips_at_floor: s.u64("skips_at_floor")?,
                max_skips_at_floor: s.u64("max_skips_at_floor")?,
            };
            state.validate().map_err(|e| format!("loss_scaling: {e}"))?;
            Some(state)
        }
    };
    let best = match root.obj("best")? {
        None => None,
        Some(b) => {
            let mode = match b.str("mode")? {
                "min" => Mode::Min,
                "max" => Mode::Max,
                other => return Err(format!("best.mode {other:?} is not min or max")),
            };
            let metric = BestMetric {
                metric: b.str("metric")?.to_string(),
                mode,
            };
            Some((metric, b.f32("value")?))
        }
    };
    Ok(SavedState {
        progress,
        weights,
        optimizer,
        scaling,
        best,
    })
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
    parse_state(text).map_err(|what| Error::Invalid {
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
            slots.push(json!([var, slot, name]));
            tensors.push((name, *t));
        }
        let config: Map<String, Value> = opt
            .config()
            .into_iter()
            .map(|(k, v)| (k.to_string(), float64(v)))
            .collect();
        let scaling = match self.optimizer() {
            TrainOptimizer::Plain(_) => Value::Null,
            TrainOptimizer::Scaled(s) => scaling_json(&s.scaling_state()),
        };
        let best = match &self.best {
            None => Value::Null,
            Some((m, v)) => {
                json!({ "metric": m.metric, "mode": m.mode.name(), "value": float(*v) })
            }
        };
        let state = json!({
            "model": model_name,
            "policy": policy.name(),
            "progress": {
                "epoch": progress.epoch,
                "step": progress.step,
                "rng_state": progress.rng_state,
            },
            "weights": weights.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            "optimizer": {
                "name": opt.name(),
                "learning_rate": float(opt.learning_rate()),
                "iterations": opt.iterations(),
                "config": config,
                "slots": slots,
            },
            "loss_scaling": scaling,
            "best": best,
        });
        let mut metadata = BTreeMap::new();
        metadata.insert(KEY_KIND.to_string(), KIND_CHECKPOINT.to_string());
        metadata.insert(KEY_STATE.to_string(), state.to_string());
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

    /// Resumes from the newest per-epoch checkpoint in `dir`, if there is one; returns its path.
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
            for key in ours
                .keys()
                .chain(saved.optimizer.config.keys())
                .collect::<BTreeSet<_>>()
            {
                let (a, b) = (saved.optimizer.config.get(key), ours.get(key));
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
                .set_learning_rate(saved.optimizer.learning_rate)?;
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

    #[test]
    fn state_fields_name_their_path() {
        let e = parse_state(r#"{"progress": {"epoch": 1, "step": -1}}"#).unwrap_err();
        assert_eq!(e, "progress.step is not an unsigned integer");
        let e = parse_state("[]").unwrap_err();
        assert_eq!(e, "not a JSON object");
    }
}
