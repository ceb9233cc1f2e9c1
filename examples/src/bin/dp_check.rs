//! Checks data-parallel training across the ranks `mpirun` started (build with `--features mpi`):
//!
//! ```sh
//! cargo build --release -p examples --features mpi --bin dp_check
//! mpirun --oversubscribe -np 2 target/release/dp_check
//! ```
//!
//! On a synthetic task (Gaussian clusters, the guide's model with small layers):
//! 1. float32: after every epoch the weights are bit-identical on every rank; after training,
//!    rank 0 trains the same model in one process on the same global batches and compares;
//! 2. resuming from a checkpoint on the same ranks continues the run bit for bit;
//! 3. a rank that fails (rank 0 cannot write its checkpoint) stops every rank with an error
//!    naming it, without a hang;
//! 4. mixed_float16: one sample of rank 1's shard is NaN; every rank must skip that step, with
//!    the same loss scale and skipped-step counts everywhere.
//!
//! `--fault CASE` instead runs one fault between the ranks and prints each rank's error as
//! `rank R: fault CASE: <error>` (exit 0 when every rank failed as it should, see [`fault`]);
//! what the data-parallel tests drive, each case bounded in time.
//!
//! `--kill-test DIR` instead trains until killed, writing a checkpoint to `DIR` every epoch and
//! each rank's process id to `DIR/rank-<r>.pid` (what the failure test drives).
//!
//! Prints `dp_check: ok` and exits 0 when every check holds on every rank.

use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use examples::{Args, Digits, clusters};
use mp_core::dist::{self, Communicator};
use mp_core::{Float32, MixedFloat16, PolicyKind};
use mp_layers::{
    Callback, Checkpointing, EpochLogs, FitOptions, Layer, Model, ModelCheckpoint,
    SparseCategoricalCrossentropy, TrainOptimizer, Trainer, Verbose,
};
use mp_optim::{Optimizer, RmsProp};

const OPTIONS: &[&str] = &[
    "kill-test",
    "fault",
    "samples",
    "units",
    "epochs",
    "batch-size",
];
const FEATURES: usize = 48;
const CLASSES: usize = 10;
const SEED: u64 = 7;

/// Every weight of the model, in order.
fn weights<M: Model, O: Optimizer>(t: &mut Trainer<M, O>) -> anyhow::Result<Vec<f32>> {
    let mut out = vec![];
    for (_, w) in t.model_mut().get_weights()? {
        out.extend(w.to_f32_vec()?);
    }
    Ok(out)
}

/// Whether `v` holds the same bits on every rank (rank 0's copy against each rank's own).
fn identical(comm: &dyn Communicator, v: &[f32]) -> anyhow::Result<bool> {
    let mut root = v.to_vec();
    comm.broadcast_f32(&mut root, 0)?;
    let differ = root
        .iter()
        .zip(v)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    let mut n = [differ as f64];
    comm.all_reduce_sum_f64(&mut n)?;
    Ok(n[0] == 0.0)
}

/// After every epoch: are the weights and the loss-scale state bit-identical on every rank?
struct Identical {
    comm: Arc<dyn Communicator>,
    epochs: Arc<Mutex<Vec<bool>>>,
}

impl<M: Model, O: Optimizer> Callback<M, O> for Identical {
    fn on_epoch_end(&mut self, t: &mut Trainer<M, O>, _: &EpochLogs) -> mp_layers::Result<()> {
        let mut v = weights(t).map_err(|e| mp_layers::Error::InvalidArgument {
            what: e.to_string(),
        })?;
        if let TrainOptimizer::Scaled(s) = t.optimizer() {
            v.extend([
                s.loss_scale(),
                s.skipped_steps() as f32,
                s.applied_steps() as f32,
            ]);
        }
        let same = identical(&*self.comm, &v).map_err(|e| mp_layers::Error::InvalidArgument {
            what: e.to_string(),
        })?;
        self.epochs.lock().unwrap().push(same);
        Ok(())
    }
}

fn compile<P: PolicyKind>(units: usize) -> Trainer<Digits<P>, RmsProp> {
    Trainer::compile(
        Digits::<P>::guide(units),
        RmsProp::default(),
        SparseCategoricalCrossentropy::new(),
    )
}

fn options(batch_size: usize, epochs: usize) -> FitOptions {
    FitOptions {
        batch_size,
        epochs,
        validation_split: 0.1,
        shuffle: true,
        seed: SEED,
        verbose: Verbose::Silent,
        gradient_accumulation_steps: 1,
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::from_env(&[])?;
    args.check_known(OPTIONS)?;
    let comm = dist::from_env()?;
    let (rank, size) = (comm.rank(), comm.size());
    let samples = args.get("samples", 3000)?;
    let units = args.get("units", 40)?;
    let batch = args.get("batch-size", 250)?;
    if let Some(dir) = args.raw("kill-test") {
        return kill_test(comm, dir, samples, units, batch);
    }
    if let Some(case) = args.raw("fault") {
        return fault(comm, case, samples, units, batch);
    }
    let epochs = args.get("epochs", 3)?;
    let (x, y) = clusters(samples, FEATURES, CLASSES, SEED);
    let say = |s: String| {
        if rank == 0 {
            println!("{s}");
        }
    };
    say(format!(
        "dp_check: {size} ranks over {}, {samples} samples x {FEATURES} features, global batch \
         {batch}, guide model with {units} units",
        comm.name()
    ));

    // 1. float32: identical replicas, and the single process.
    let epochs_same = Arc::new(Mutex::new(vec![]));
    let mut dp = compile::<Float32>(units)
        .with_communicator(comm.clone())
        .with_callback(Identical {
            comm: comm.clone(),
            epochs: epochs_same.clone(),
        });
    let history = dp.fit(x.view(), y.view(), &options(batch, epochs))?;
    let same = epochs_same.lock().unwrap().clone();
    let last = history.epochs.last().context("no epoch ran")?;
    say(format!(
        "float32: loss {:.4}, accuracy {:.4}, val_accuracy {:.4} after {epochs} epochs; weights \
         bit-identical on every rank after each epoch: {same:?}",
        last.loss,
        last.get("accuracy").unwrap(),
        last.get("val_accuracy").unwrap_or(f32::NAN)
    ));
    if same.len() != epochs || same.contains(&false) {
        bail!("the replicas' weights differ after an epoch: {same:?}");
    }
    let stats = dp.comm_stats();
    say(format!(
        "all-reduce per step: {} bytes of gradients, {:.3} ms (+{:.3} ms of small collectives)",
        stats.gradient_bytes,
        stats.gradient_time.as_secs_f64() * 1e3,
        stats.other_time.as_secs_f64() * 1e3
    ));
    let w_dp = weights(&mut dp)?;
    // Rank 0 trains the same model alone on the same global batches; the others wait.
    let mut verdict = [0.0f64];
    if rank == 0 {
        let mut single = compile::<Float32>(units);
        let h1 = single.fit(x.view(), y.view(), &options(batch, epochs))?;
        let w1 = weights(&mut single)?;
        let scale = w1.iter().fold(0f32, |m, v| m.max(v.abs()));
        let max_diff = w1
            .iter()
            .zip(&w_dp)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let rel = max_diff / scale;
        let bit_exact = w1
            .iter()
            .zip(&w_dp)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        println!(
            "{size} ranks vs 1 process, global batch {batch}: max |w_dp - w_1| = {max_diff:.3e} \
             ({rel:.3e} of max |w|; bit-exact: {bit_exact}); loss {:.6} vs {:.6}",
            last.loss,
            h1.epochs.last().map_or(f32::NAN, |e| e.loss)
        );
        // Sums in another order: float32 rounding, grown over the steps by training itself.
        if rel.is_nan() || rel > 1e-5 {
            verdict[0] = 1.0;
        }
    }
    comm.all_reduce_sum_f64(&mut verdict)?;
    if verdict[0] != 0.0 {
        bail!("the data-parallel weights are further than 1e-5 (relative) from one process's");
    }

    // 2. Resume on the same ranks: 2 epochs with a checkpoint, a fresh trainer resumes from it
    //    on every rank and trains the third: the weights of the uninterrupted run, bit for bit.
    let mut dir = if rank == 0 {
        let d = std::env::temp_dir().join(format!("mp-dp-check-{}", std::process::id()));
        d.display().to_string().into_bytes()
    } else {
        vec![]
    };
    comm.broadcast_bytes(&mut dir, 0)?;
    let dir = std::path::PathBuf::from(String::from_utf8(dir)?);
    let mut first = compile::<Float32>(units)
        .with_communicator(comm.clone())
        .with_callback(ModelCheckpoint::new(&dir).keep_last(1));
    first.fit(x.view(), y.view(), &options(batch, epochs - 1))?;
    let mut resumed = compile::<Float32>(units).with_communicator(comm.clone());
    resumed.model_mut().build(&[FEATURES])?;
    let from = resumed
        .resume_latest(&dir)?
        .context("no checkpoint written")?;
    resumed.fit(x.view(), y.view(), &options(batch, 1))?;
    let same_resumed = weights(&mut resumed)?
        .iter()
        .zip(&w_dp)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    say(format!(
        "resumed on {size} ranks from {} after {} epochs, then 1 more: bit-identical to the \
         uninterrupted run: {same_resumed}",
        from.file_name().unwrap_or_default().to_string_lossy(),
        epochs - 1
    ));
    comm.barrier()?;
    if rank == 0 {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if !identical(&*comm, &[f32::from(u8::from(same_resumed))])? || !same_resumed {
        bail!("the resumed run differs from the uninterrupted one");
    }

    // 3. A rank that fails (rank 0 cannot write its checkpoint) stops every rank, no hang.
    let blocked = std::env::temp_dir().join(format!("mp-dp-check-file-{}", std::process::id()));
    std::fs::write(&blocked, b"a file, not a directory")?;
    let mut failing = compile::<Float32>(units)
        .with_communicator(comm.clone())
        .with_callback(ModelCheckpoint::new(blocked.join("checkpoints")));
    let err = failing
        .fit(x.view(), y.view(), &options(batch, 1))
        .expect_err("a failed checkpoint on rank 0 must stop fit");
    let _ = std::fs::remove_file(&blocked);
    let expected = if rank == 0 {
        matches!(err, mp_layers::Error::Callback { .. })
    } else {
        matches!(&err, mp_layers::Error::ReplicaFailed { ranks, .. } if ranks == &[0])
    };
    println!("rank {rank}: a failed checkpoint on rank 0 stopped fit with: {err}");
    let mut wrong = [f64::from(u8::from(!expected))];
    comm.all_reduce_sum_f64(&mut wrong)?;
    if wrong[0] != 0.0 {
        bail!("a rank stopped with an unexpected error");
    }

    // 4. mixed_float16: a NaN in one rank's shard skips the step on every rank.
    if size > 1 {
        let mut xn = x.clone();
        // Replay fit's shuffle: the training samples (before the validation split) in the order
        // of the first epoch; the NaN goes into the last rank's shard of the second batch.
        let train = (samples as f64 * (1.0 - 0.1)).floor() as usize;
        let mut order: Vec<usize> = (0..train).collect();
        mp_core::Rng::new(SEED).shuffle(&mut order);
        let global = &order[batch..2 * batch];
        let shard = &global[(size - 1) * batch / size..];
        xn[[shard[3], 0]] = f32::NAN;
        let same16 = Arc::new(Mutex::new(vec![]));
        let mut t16 = compile::<MixedFloat16>(units)
            .with_communicator(comm.clone())
            .with_callback(Identical {
                comm: comm.clone(),
                epochs: same16.clone(),
            });
        let h16 = t16.fit(xn.view(), y.view(), &options(batch, 1))?;
        let TrainOptimizer::Scaled(s) = t16.optimizer() else {
            bail!("mixed_float16 without loss scaling");
        };
        let skipped = h16.epochs[0].skipped_steps;
        let mut counts = [skipped as f64, s.skipped_steps() as f64];
        comm.all_reduce_sum_f64(&mut counts)?;
        let same16 = same16.lock().unwrap().clone();
        say(format!(
            "mixed_float16 with a NaN in rank {}'s shard of step 2: skipped steps {skipped} on \
             every rank (sum over ranks {}), loss scale {} ; weights, scale and step counts \
             bit-identical on every rank: {same16:?}",
            size - 1,
            counts[0],
            s.loss_scale()
        ));
        if skipped != 1 || counts[0] != (size as u64 * skipped) as f64 || same16 != [true] {
            bail!("the ranks did not skip the poisoned step together");
        }
    }
    say("dp_check: ok".into());
    Ok(())
}

/// Trains until killed, a checkpoint every epoch; each rank writes its process id first.
fn kill_test(
    comm: Arc<dyn Communicator>,
    dir: &str,
    samples: usize,
    units: usize,
    batch: usize,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let pid = std::path::Path::new(dir).join(format!("rank-{}.pid", comm.rank()));
    std::fs::write(&pid, std::process::id().to_string())?;
    let (x, y) = clusters(samples, FEATURES, CLASSES, SEED);
    let mut t = compile::<Float32>(units)
        .with_communicator(comm)
        .with_callback(ModelCheckpoint::new(dir).keep_last(2));
    t.fit(x.view(), y.view(), &options(batch, 100_000))?;
    Ok(())
}

/// One fault between the ranks, on the synthetic task; every rank must return an error (none
/// may hang), and each prints it:
/// - `label`: rank 1's labels hold 99 for 10 classes (`fit`'s up-front checks);
/// - `evaluate-label`: the same in `evaluate`;
/// - `epochs`: rank 0 asks for 3 epochs, rank 1 for 1;
/// - `width`: rank 1's Dense layers are narrower;
/// - `samples`: rank 1 has fewer samples;
/// - `batch`: rank 1's global batch is half rank 0's;
/// - `empty`: a `train_step` whose global batch is empty (every shard empty);
/// - `stall`: rank 1 stops itself (`SIGSTOP`) after the first epoch; rank 0 must give up at
///   the collective deadline (`MP_COLLECTIVE_TIMEOUT`) and abort the job.
fn fault(
    comm: Arc<dyn Communicator>,
    case: &str,
    samples: usize,
    units: usize,
    batch: usize,
) -> anyhow::Result<()> {
    let rank = comm.rank();
    let odd = rank == 1;
    let (x, mut y) = clusters(
        if case == "samples" && odd {
            samples - 10
        } else {
            samples
        },
        FEATURES,
        CLASSES,
        SEED,
    );
    if case.ends_with("label") && odd {
        y[3] = 99;
    }
    let units = if case == "width" && odd {
        units / 2
    } else {
        units
    };
    let mut t = compile::<Float32>(units).with_communicator(comm.clone());
    let batch = if case == "batch" && odd {
        batch / 2
    } else {
        batch
    };
    let epochs = if case == "epochs" && odd { 1 } else { 3 };
    let outcome = match case {
        "label" | "epochs" | "width" | "samples" | "batch" => t
            .fit(x.view(), y.view(), &options(batch, epochs))
            .map(|_| ()),
        "evaluate-label" => t
            .evaluate(x.view(), y.view(), batch, Verbose::Silent)
            .map(|_| ()),
        "empty" => {
            t.model_mut().build(&[FEATURES])?;
            let empty = mp_core::Tensor::<mp_core::F32>::from_f32(&[0, FEATURES], &[])?;
            t.train_step::<u32>(&empty, &[]).map(|_| ())
        }
        "stall" => {
            let stop = Stall { rank };
            t.add_callback(stop);
            t.fit(x.view(), y.view(), &options(batch, 3)).map(|_| ())
        }
        other => bail!("unknown --fault {other:?}"),
    };
    match outcome {
        Err(e) => {
            println!("rank {rank}: fault {case}: {e}");
            Ok(())
        }
        Ok(()) => bail!("rank {rank}: fault {case} did not fail"),
    }
}

/// Stops rank 1's process (`SIGSTOP`, as `kill -STOP` does) at the end of the first epoch.
struct Stall {
    rank: usize,
}

impl<M: Model, O: Optimizer> Callback<M, O> for Stall {
    fn on_epoch_end(&mut self, _: &mut Trainer<M, O>, logs: &EpochLogs) -> mp_layers::Result<()> {
        if self.rank == 1 && logs.epoch == 0 {
            eprintln!("rank 1: stopping myself (SIGSTOP)");
            let _ = std::process::Command::new("kill")
                .args(["-STOP", &std::process::id().to_string()])
                .status();
        }
        Ok(())
    }
}
