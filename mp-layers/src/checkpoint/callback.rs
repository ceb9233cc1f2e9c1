//! [`ModelCheckpoint`]: the callback of `fit` that writes checkpoints into a folder.

use std::fs;
use std::path::PathBuf;

use mp_optim::Optimizer;

use super::atomic::{io_error, write_atomic};
use super::error::Result;
use super::folder::{BEST_FILE, epoch_files, remove_stale_temporaries};
use super::resume::Checkpointing;
use crate::layer::Model;
use crate::train::{BestMetric, Callback, EpochLogs, Trainer};

/// The callback of `fit` that writes checkpoints (Keras's `ModelCheckpoint`): at the end of
/// every epoch, the last [`keep_last`](ModelCheckpoint::keep_last) epochs
/// (`epoch-000003.safetensors`, ...) and, with a [`BestMetric`], the best epoch so far
/// (`best.safetensors`). Each is a whole checkpoint that [`Checkpointing::resume`] continues
/// from exactly. Add it with [`Trainer::with_callback`](crate::Trainer::with_callback):
///
/// ```no_run
/// # use mp_layers::{checkpoint::ModelCheckpoint, BestMetric, Trainer};
/// # fn f<M: mp_layers::Model, O: mp_optim::Optimizer>(trainer: Trainer<M, O>) -> Trainer<M, O> {
/// let best = BestMetric::min("val_loss");
/// trainer.with_callback(ModelCheckpoint::new("ckpt").keep_last(3).best(best))
/// # }
/// ```
///
/// One folder is meant for one run. A new run into a folder that an earlier, longer run used
/// leaves that run's later `epoch-*.safetensors` files in place, and
/// [`Checkpointing::resume_latest`] resumes the newest epoch in the folder, so it would continue
/// the earlier run (see the [module docs](crate::checkpoint#checkpoint-folders)); use a new
/// folder, or delete the old one, to start fresh.
///
/// At the end of each epoch `fit` also removes the temporary files that killed checkpoint
/// writes left in the folder (`.epoch-000007.safetensors.tmp-<pid>-<n>`): on Linux those whose
/// process is no longer running and that were untouched for a minute, elsewhere those older
/// than an hour; never those of the running process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelCheckpoint {
    /// The directory (created when needed).
    pub dir: PathBuf,
    /// How many per-epoch checkpoints to keep (`epoch-000007.safetensors`, the newest ones up
    /// to the current epoch; files of later epochs, left by another run, are not touched);
    /// 0 writes none.
    pub keep_last: usize,
    /// Also keep the best epoch so far on this metric, as `best.safetensors`.
    pub best: Option<BestMetric>,
}

impl ModelCheckpoint {
    /// A checkpoint at the end of every epoch in `dir`, keeping the last one.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ModelCheckpoint {
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

    /// What the callback does at the end of an epoch: update the best value, remove stale
    /// temporary files, write the epoch's checkpoint and drop the oldest beyond `keep_last`,
    /// write the best one if it is.
    fn save<M: Model, O: Optimizer, Lo>(
        &self,
        trainer: &mut Trainer<M, O, Lo>,
        logs: &EpochLogs,
    ) -> Result<()> {
        let mut improved = false;
        if let Some(best) = &self.best {
            let value = best
                .value(logs)
                .ok_or_else(|| crate::Error::InvalidArgument {
                    what: format!("metric {:?} was not computed this epoch", best.metric),
                })?;
            improved = trainer.update_best(best, value);
        }
        // Data-parallel, the replicas are identical and rank 0 writes for all of them.
        if (self.keep_last == 0 && !improved) || trainer.rank() != 0 {
            return Ok(());
        }
        fs::create_dir_all(&self.dir).map_err(|e| io_error("creating", &self.dir, e))?;
        remove_stale_temporaries(&self.dir);
        let bytes = trainer.checkpoint_bytes()?;
        if self.keep_last > 0 {
            let epoch = trainer.progress().epoch;
            write_atomic(self.epoch_path(epoch), &bytes)?;
            // Only this run's history is pruned: files of later epochs (from another run in the
            // same directory) are left alone, and the file just written is always kept.
            let mut files = epoch_files(&self.dir)?;
            files.retain(|(n, _)| *n <= epoch as u64);
            let excess = files.len().saturating_sub(self.keep_last);
            for (_, old) in &files[..excess] {
                fs::remove_file(old).map_err(|e| io_error("removing", old, e))?;
            }
        }
        if improved {
            write_atomic(self.best_path(), &bytes)?;
        }
        Ok(())
    }
}

impl<M: Model, O: Optimizer, Lo> Callback<M, O, Lo> for ModelCheckpoint {
    fn uses_batch_end(&self) -> bool {
        false
    }

    /// Checks the metric exists (and, for a validation metric, that there is validation data).
    fn on_train_begin(
        &mut self,
        trainer: &mut Trainer<M, O, Lo>,
        has_validation: bool,
    ) -> crate::Result<()> {
        match &self.best {
            Some(best) => best.check("checkpoint", has_validation, &trainer.metric_names()),
            None => Ok(()),
        }
    }

    fn on_epoch_end(
        &mut self,
        trainer: &mut Trainer<M, O, Lo>,
        logs: &EpochLogs,
    ) -> crate::Result<()> {
        Ok(self.save(trainer, logs)?)
    }
}
