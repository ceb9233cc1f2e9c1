//! Step telemetry: [`StepLogger`] writes one row per optimizer update of `fit` to a CSV or
//! JSON Lines file (Keras's `CSVLogger`, per step instead of per epoch, with what mixed precision
//! adds: the loss scale, whether the step was skipped and why, the global gradient norm).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use mp_optim::Optimizer;

use super::{Callback, EpochLogs, StepReport, Trainer};
use crate::error::{Error, Result};
use crate::layer::Model;

/// The columns of a step log, in order (the CSV header; the JSON Lines keys).
pub const COLUMNS: [&str; 12] = [
    "step",
    "epoch",
    "batch",
    "loss",
    "loss_scale",
    "applied",
    "skipped",
    "gradient_norm",
    "learning_rate",
    "micro_batches",
    "samples",
    "seconds",
];

/// A step log's file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Comma-separated values with a header row ([`COLUMNS`]); an absent value (no loss scale,
    /// no skip, no norm) is an empty cell, a skip reason is quoted.
    Csv,
    /// One JSON object per line with the keys of [`COLUMNS`]; an absent value is `null`, and a
    /// non-finite number is the string `"NaN"`, `"Infinity"` or `"-Infinity"` (JSON has no
    /// such numbers).
    JsonLines,
}

/// A callback of `fit` that logs every optimizer update ([`StepReport`]) to a file, one row
/// per update, skipped steps included and marked.
///
/// - Rank 0 writes under data parallelism (every rank sees the same figures).
/// - A fresh run (the trainer at step 0) starts the file anew. A resumed run (a trainer whose
///   progress came from a checkpoint) keeps the rows up to the checkpoint's step, drops the
///   later ones that the interrupted run wrote, and appends: the log has one row per step.
/// - Rows are flushed at the end of every epoch and of training.
/// - It asks `fit` for the global gradient norm ([`Callback::wants_gradient_norm`]) unless
///   built [`StepLogger::without_gradient_norm`].
///
/// ```no_run
/// use mp_layers::{StepLogger, Trainer};
/// # fn f<M: mp_layers::Model, O: mp_optim::Optimizer>(t: Trainer<M, O>) {
/// let t = t.with_callback(StepLogger::csv("steps.csv"));
/// # }
/// ```
#[derive(Debug)]
pub struct StepLogger {
    path: PathBuf,
    format: LogFormat,
    norm: bool,
    out: Option<BufWriter<File>>,
}

impl StepLogger {
    /// A logger writing CSV to `path`.
    pub fn csv(path: impl Into<PathBuf>) -> Self {
        Self::new(path, LogFormat::Csv)
    }

    /// A logger writing JSON Lines to `path`.
    pub fn jsonl(path: impl Into<PathBuf>) -> Self {
        Self::new(path, LogFormat::JsonLines)
    }

    /// A logger writing `format` to `path`.
    pub fn new(path: impl Into<PathBuf>, format: LogFormat) -> Self {
        StepLogger {
            path: path.into(),
            format,
            norm: true,
            out: None,
        }
    }

    /// Leaves the gradient norm out (its column empty), saving `fit` a read of the gradients
    /// per step.
    pub fn without_gradient_norm(mut self) -> Self {
        self.norm = false;
        self
    }

    /// The file it writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, what: &str, e: std::io::Error) -> Error {
        Error::Callback {
            callback: "StepLogger",
            source: Box::new(std::io::Error::new(
                e.kind(),
                format!("{what} {}: {e}", self.path.display()),
            )),
        }
    }

    fn bad(&self, line: usize, what: String) -> Error {
        Error::Callback {
            callback: "StepLogger",
            source: format!(
                "{} line {line}: {what} (not a step log this logger can resume; move it \
                 away or start from step 0)",
                self.path.display()
            )
            .into(),
        }
    }

    /// Opens the log for a run starting after `step` updates' batches: a new file at step 0,
    /// else the existing rows up to `step` kept and the file opened to append.
    fn open(&mut self, step: u64) -> Result<()> {
        let mut kept = Vec::new();
        if step > 0 && self.path.exists() {
            let file = File::open(&self.path).map_err(|e| self.io("cannot read", e))?;
            for (i, line) in BufReader::new(file).lines().enumerate() {
                let line = line.map_err(|e| self.io("cannot read", e))?;
                if self.format == LogFormat::Csv && i == 0 {
                    if line != COLUMNS.join(",") {
                        return Err(self.bad(1, format!("the header is {line:?}")));
                    }
                    continue;
                }
                if line.is_empty() {
                    continue;
                }
                let s = self.step_of(&line).map_err(|w| self.bad(i + 1, w))?;
                if s <= step {
                    kept.push(line);
                }
            }
        }
        // Written whole to a sibling file and renamed over the log, so that a failure leaves
        // the old log as it was.
        let tmp = self.path.with_extension("tmp");
        let file = File::create(&tmp).map_err(|e| self.io("cannot write", e))?;
        let mut w = BufWriter::new(file);
        let mut write = || -> std::io::Result<()> {
            if self.format == LogFormat::Csv {
                writeln!(w, "{}", COLUMNS.join(","))?;
            }
            for line in &kept {
                writeln!(w, "{line}")?;
            }
            w.flush()
        };
        write().map_err(|e| self.io("cannot write", e))?;
        drop(w);
        std::fs::rename(&tmp, &self.path).map_err(|e| self.io("cannot write", e))?;
        let file = File::options()
            .append(true)
            .open(&self.path)
            .map_err(|e| self.io("cannot append to", e))?;
        self.out = Some(BufWriter::new(file));
        Ok(())
    }

    /// The `step` of one row.
    fn step_of(&self, line: &str) -> std::result::Result<u64, String> {
        let field = match self.format {
            LogFormat::Csv => line.split(',').next().unwrap_or("").to_string(),
            LogFormat::JsonLines => {
                let v: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
                v.get("step")
                    .map(|s| s.to_string())
                    .ok_or("no \"step\" key")?
            }
        };
        field
            .parse()
            .map_err(|_| format!("the step {field:?} is not a whole number"))
    }

    /// One row for `r`.
    fn row(&self, r: &StepReport) -> String {
        let norm = if self.norm { r.gradient_norm } else { None };
        match self.format {
            LogFormat::Csv => {
                let opt = |v: Option<String>| v.unwrap_or_default();
                let skipped = r
                    .skipped
                    .as_ref()
                    .map(|s| format!("\"{}\"", s.replace('"', "\"\"")));
                [
                    r.step.to_string(),
                    r.epoch.to_string(),
                    r.batch.to_string(),
                    r.loss.to_string(),
                    opt(r.loss_scale.map(|s| s.to_string())),
                    r.applied.to_string(),
                    opt(skipped),
                    opt(norm.map(|n| n.to_string())),
                    r.learning_rate.to_string(),
                    r.micro_batches.to_string(),
                    r.samples.to_string(),
                    format!("{:.6}", r.seconds),
                ]
                .join(",")
            }
            LogFormat::JsonLines => {
                use serde_json::Value;
                let num = |v: f64| match serde_json::Number::from_f64(v) {
                    Some(n) => Value::Number(n),
                    None if v.is_nan() => Value::from("NaN"),
                    None if v > 0.0 => Value::from("Infinity"),
                    None => Value::from("-Infinity"),
                };
                let values = [
                    Value::from(r.step),
                    Value::from(r.epoch),
                    Value::from(r.batch),
                    num(f64::from(r.loss)),
                    r.loss_scale.map_or(Value::Null, |s| num(f64::from(s))),
                    Value::from(r.applied),
                    r.skipped.clone().map_or(Value::Null, Value::from),
                    norm.map_or(Value::Null, num),
                    num(f64::from(r.learning_rate)),
                    Value::from(r.micro_batches),
                    Value::from(r.samples),
                    num(r.seconds),
                ];
                let map: serde_json::Map<String, Value> =
                    COLUMNS.iter().map(|c| c.to_string()).zip(values).collect();
                Value::Object(map).to_string()
            }
        }
    }

    fn flush(&mut self) -> Result<()> {
        if let Some(out) = &mut self.out
            && let Err(e) = out.flush()
        {
            return Err(self.io("cannot write", e));
        }
        Ok(())
    }
}

impl<M: Model, O: Optimizer, Lo> Callback<M, O, Lo> for StepLogger {
    fn on_train_begin(&mut self, trainer: &mut Trainer<M, O, Lo>, _: bool) -> Result<()> {
        self.out = None;
        if trainer.rank() == 0 {
            self.open(trainer.progress().step)?;
        }
        Ok(())
    }

    fn on_batch_end(&mut self, _: &mut Trainer<M, O, Lo>, report: &StepReport) -> Result<()> {
        let row = self.row(report);
        if let Some(out) = &mut self.out
            && let Err(e) = writeln!(out, "{row}")
        {
            return Err(self.io("cannot write", e));
        }
        Ok(())
    }

    fn wants_gradient_norm(&self) -> bool {
        self.norm
    }

    fn on_epoch_end(&mut self, _: &mut Trainer<M, O, Lo>, _: &EpochLogs) -> Result<()> {
        self.flush()
    }

    fn on_train_end(&mut self, _: &mut Trainer<M, O, Lo>) -> Result<()> {
        self.flush()?;
        self.out = None;
        Ok(())
    }
}
