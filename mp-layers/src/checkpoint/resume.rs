//! Whole checkpoints of a [`Trainer`]: written in one file, and resumed only after every check
//! passed, so a refused file changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use mp_core::{F32, Tensor};
use mp_optim::Optimizer;

use super::atomic::{read, write_atomic};
use super::error::{Error, Result};
use super::folder::latest;
use super::format::{
    KEY_KERNEL_PATHS, KEY_KIND, KEY_STATE, KEY_VERSION, KIND_CHECKPOINT, SLOT_PREFIX,
};
use super::safetensors::SafeTensors;
use super::seal::{check_mp_metadata, seal};
use super::state::{self, state_of};
use super::weights::{
    domains, invalid_values, match_weights, unsaveable, value_problem, variables,
    weight_value_problems, weights_problems,
};
use crate::layer::Model;
use crate::train::{TrainOptimizer, Trainer};

/// Whole checkpoints of a [`Trainer`]: its model's weights, the optimizer's state, the loss
/// scaling, the training progress and the best monitored value, in one file (see the [module
/// docs](crate::checkpoint)). Bring it into scope (`use mp_layers::Checkpointing`) to call
/// `trainer.resume(...)`.
pub trait Checkpointing {
    /// The whole training state as a checkpoint file in memory.
    ///
    /// # Errors
    /// A variable that cannot be read back from its device; [`Error::Unsaveable`] naming every
    /// weight or optimizer slot that holds NaN or infinity (or a variance or second moment
    /// below 0) and every step count that disagrees with another (what
    /// [`Checkpointing::resume`] would refuse).
    fn checkpoint_bytes(&mut self) -> Result<Vec<u8>>;

    /// Saves the whole training state atomically to `path`: the model's weights, the
    /// optimizer's state, the loss scaling and the training progress (see the [module
    /// docs](crate::checkpoint)). [`Checkpointing::resume`] continues from it exactly.
    ///
    /// # Errors
    /// As [`Checkpointing::checkpoint_bytes`] (then no file is written or replaced); an I/O
    /// error naming the path.
    fn save_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<()>;

    /// Restores the training state saved in the checkpoint at `path`, so that `fit` continues
    /// as if it had never stopped: with the same seed and thread count, the weights after
    /// resuming are bit-for-bit those of an uninterrupted run. `fit` then runs `epochs` more
    /// epochs from the restored epoch.
    ///
    /// The model must be built (its variables are what the file is checked against). Everything
    /// is checked first — the file's format, version and checksum, every weight's and slot's
    /// name, dtype and shape, the optimizer's kind and hyperparameters, the loss scaling, the
    /// step counts (the optimizer's `iterations` are the applied steps; no more steps skipped
    /// at the loss-scale floor than skipped, no more skipped than run), and every value (weights
    /// and slots finite, variances and second moments not below 0) — and every problem is
    /// reported by name; on any error the model, the optimizer and the trainer are unchanged.
    fn resume(&mut self, path: impl AsRef<Path>) -> Result<()>;

    /// Resumes from the newest per-epoch checkpoint in `dir` (the highest epoch number), if
    /// there is one; returns its path.
    ///
    /// The newest file may not be this run's: files of later epochs that an earlier, longer
    /// run left in `dir` are kept by `fit`, so after a new `fit` into that folder this resumes
    /// the earlier run at its later epoch (see the [module
    /// docs](crate::checkpoint#checkpoint-folders)). To start fresh, use a new folder or delete
    /// the old one.
    fn resume_latest(&mut self, dir: impl AsRef<Path>) -> Result<Option<PathBuf>>;

    /// [`Checkpointing::resume`] from a checkpoint in memory; `file` names it in errors.
    fn resume_from_bytes(&mut self, file: &str, bytes: &[u8]) -> Result<()>;
}

impl<M: Model, O: Optimizer, Lo> Checkpointing for Trainer<M, O, Lo> {
    fn checkpoint_bytes(&mut self) -> Result<Vec<u8>> {
        let weights = self.model_mut().get_weights()?;
        let frozen = self.model_mut().frozen_variables()?;
        // What resume would refuse is not written: every value, and the counts.
        let mut problems = weight_value_problems(&weights, &domains(self.model_mut())?)?;
        let opt = self.optimizer().inner();
        let slot_state = opt.state();
        let mut tensors: Vec<(String, &Tensor<F32>)> =
            weights.iter().map(|(n, t)| (n.clone(), t)).collect();
        let mut slots = vec![];
        for (var, slot, t) in &slot_state {
            let name = format!("{SLOT_PREFIX}{var}/{slot}");
            problems.extend(value_problem(&name, t, opt.slot_domain(slot))?);
            slots.push((var.clone(), slot.to_string(), name.clone()));
            tensors.push((name, *t));
        }
        let scaling = match self.optimizer() {
            TrainOptimizer::Scaled(s) => Some(s.scaling_state()),
            TrainOptimizer::Plain(_) => None,
        };
        problems.extend(state::count_problems(
            opt.iterations(),
            scaling.as_ref(),
            self.progress().step,
        ));
        unsaveable("the checkpoint", problems)?;
        let names = weights.iter().map(|(n, _)| n.clone()).collect();
        let state = state::to_json(self, names, frozen, slots)?;
        let mut metadata = BTreeMap::new();
        metadata.insert(KEY_KIND.to_string(), KIND_CHECKPOINT.to_string());
        metadata.insert(KEY_STATE.to_string(), state);
        if let Ok(cpu) = mp_kernels::Cpu::global() {
            metadata.insert(KEY_KERNEL_PATHS.to_string(), cpu.kernel_paths());
        }
        seal(&tensors, metadata)
    }

    fn save_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let bytes = self.checkpoint_bytes()?;
        write_atomic(path, &bytes)
    }

    fn resume(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.resume_from_bytes(&path.display().to_string(), &read(path)?)
    }

    fn resume_latest(&mut self, dir: impl AsRef<Path>) -> Result<Option<PathBuf>> {
        match latest(dir)? {
            Some(path) => {
                Checkpointing::resume(self, &path)?;
                Ok(Some(path))
            }
            None => Ok(None),
        }
    }

    fn resume_from_bytes(&mut self, file: &str, bytes: &[u8]) -> Result<()> {
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
        let note = paths_note(file, st.metadata.get(KEY_KERNEL_PATHS).map(String::as_str));

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
        let domains = domains(self.model_mut())?;
        let mut problems = vec![];
        let mut slot_values = vec![];
        let names: Vec<&str> = saved.weights.iter().map(String::as_str).collect();
        let weights = match_weights(&st, &names, &vars, &mut problems)?;
        for name in &saved.frozen {
            if !vars.iter().any(|(p, _)| p == name) {
                problems.push(format!(
                    "frozen variable {name:?} is not a variable of the model"
                ));
            }
        }

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
                    slot_values.extend(value_problem(name, &tensor, opt.slot_domain(slot))?);
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
        let mut values = weight_value_problems(&weights, &domains)?;
        values.append(&mut slot_values);
        invalid_values(file, values)?;

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
        let frozen: BTreeSet<&str> = saved.frozen.iter().map(String::as_str).collect();
        self.model_mut().visit_variables("", &mut |path, v| {
            v.set_frozen(frozen.contains(path));
            Ok(())
        })?;
        self.set_progress(saved.progress);
        self.best = saved.best;
        if let Some(note) = note {
            eprintln!("mp: {note}");
        }
        Ok(())
    }
}

/// What a resume says when the checkpoint in `file` was computed on other CPU kernel paths
/// (`saved`, its [`KEY_KERNEL_PATHS`]) than this process uses: training continues correctly,
/// but not bit-for-bit as an uninterrupted run would. `None` when they agree, or when either
/// is unknown.
pub fn paths_note(file: &str, saved: Option<&str>) -> Option<String> {
    let ours = mp_kernels::Cpu::global().ok()?.kernel_paths();
    let saved = saved?;
    (saved != ours).then(|| {
        format!(
            "{file} was computed with kernel paths [{saved}], this process uses [{ours}]: \
             training continues, but not bit-for-bit as an uninterrupted run on the first \
             paths would (set MP_GEMM_PATH and MP_NUM_THREADS to match them for that)"
        )
    })
}
