//! `bench dp`: data-parallel training of the guide's model, 2 ranks of 1 kernel thread each
//! (`mpirun -np 2`) against 1 process of 2 threads, on the same global batch.
//!
//! Per policy: the median step time of each configuration over the rounds (the configurations
//! alternate each round, so a slow spell of a shared machine hits both), their ratio, and for
//! the 2 ranks the gradient bytes each rank all-reduces per step and the median time in that
//! all-reduce (staging copies included) and in the step's small collectives; the rest of a
//! step is its computation. The 2-rank job is this binary again, started by `mpirun` with
//! `--worker` (it needs the `mpi` feature and Open MPI's `mpirun`).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mp_core::dist::{self, Communicator, Local};
use mp_core::{Float32, MixedBFloat16, MixedFloat16, PolicyKind, Rng, Tensor};
use mp_layers::{Layer, SparseCategoricalCrossentropy, Trainer};
use mp_optim::RmsProp;
use serde_json::{Value, json};

use crate::Digits;
use crate::bench_train::median;

#[derive(Debug, Clone)]
struct Opts {
    rounds: usize,
    steps: usize,
    batch: usize,
    units: usize,
    out: PathBuf,
    worker: bool,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        rounds: 3,
        steps: 4,
        batch: 8192,
        units: 4096,
        out: PathBuf::from("target/bench/dp.json"),
        worker: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--quick" => {
                o.rounds = 2;
                o.steps = 2;
                o.batch = 64;
                o.units = 128;
            }
            "--rounds" => o.rounds = value()?.parse().context("--rounds")?,
            "--steps" => o.steps = value()?.parse().context("--steps")?,
            "--batch" => o.batch = value()?.parse().context("--batch")?,
            "--units" => o.units = value()?.parse().context("--units")?,
            "--out" => o.out = PathBuf::from(value()?),
            "--worker" => o.worker = true,
            other => bail!("unknown option {other:?} for bench dp"),
        }
    }
    if o.rounds == 0 || o.steps == 0 || o.batch < 2 || o.units == 0 {
        bail!("rounds, steps and units must be positive and the batch at least 2");
    }
    Ok(o)
}

/// One configuration's steps of one policy: step times, and the all-reduce's bytes and times.
fn steps<P: PolicyKind>(comm: Arc<dyn Communicator>, o: &Opts) -> Result<Value> {
    let mut t = Trainer::compile(
        Digits::<P>::guide(o.units),
        RmsProp::default(),
        SparseCategoricalCrossentropy::new(),
    )
    .with_communicator(comm.clone());
    t.model_mut().build(&[784])?;
    // The global batch, the same on every rank; each rank takes its shard.
    let mut rng = Rng::new(1);
    let (r, n) = (comm.rank(), comm.size());
    let (lo, hi) = (r * o.batch / n, (r + 1) * o.batch / n);
    let x = rng.uniform_vec(o.batch * 784, 0.0, 1.0);
    let labels: Vec<u32> = (0..o.batch).map(|_| rng.below(10) as u32).collect();
    let xs = Tensor::<P::Compute>::from_f32(&[hi - lo, 784], &x[lo * 784..hi * 784])?;
    let ys = &labels[lo..hi];
    t.train_step(&xs, ys)?; // warm-up: optimizer slots, buffer cache
    let (mut step, mut grad, mut other) = (vec![], vec![], vec![]);
    for _ in 0..o.steps {
        comm.barrier()?;
        let started = Instant::now();
        t.train_step(&xs, ys)?;
        step.push(started.elapsed().as_secs_f64() * 1e3);
        let s = t.comm_stats();
        grad.push(s.gradient_time.as_secs_f64() * 1e3);
        other.push(s.other_time.as_secs_f64() * 1e3);
    }
    Ok(json!({
        "policy": P::POLICY.name(),
        "step_ms": median(&mut step),
        "allreduce_ms": median(&mut grad),
        "collectives_ms": median(&mut other),
        "allreduce_bytes": t.comm_stats().gradient_bytes,
    }))
}

fn policies(comm: Arc<dyn Communicator>, o: &Opts) -> Result<Vec<Value>> {
    Ok(vec![
        steps::<Float32>(comm.clone(), o)?,
        steps::<MixedBFloat16>(comm.clone(), o)?,
        steps::<MixedFloat16>(comm, o)?,
    ])
}

/// Runs `bench dp`: as the orchestrator (alternating the single process and an `mpirun` job
/// each round) or, with `--worker`, as one rank of that job (rank 0 writes `--out`).
pub fn dp_cmd(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    if o.worker {
        let comm = dist::from_env()?;
        let rows = policies(comm.clone(), &o)?;
        if comm.rank() == 0 {
            std::fs::write(&o.out, serde_json::to_string(&rows)?)?;
        }
        return Ok(());
    }
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let skip = |why: String| -> Result<()> {
        println!("## Data parallel: skipped ({why})\n");
        let j =
            json!({ "skipped": why, "markdown": format!("## Data parallel: skipped ({why})\n") });
        std::fs::write(&o.out, serde_json::to_string_pretty(&j)?)?;
        Ok(())
    };
    if !cfg!(feature = "mpi") {
        return skip("the bench binary was built without the `mpi` feature".into());
    }
    if !Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|s| s.status.success())
    {
        return skip("mpirun not found: apt-get install openmpi-bin libopenmpi-dev".into());
    }
    let exe = std::env::current_exe()?;
    let worker_out = o.out.with_extension("ranks.json");
    let mut single: Vec<Vec<Value>> = vec![];
    let mut ranks: Vec<Vec<Value>> = vec![];
    for _ in 0..o.rounds {
        single.push(policies(Arc::new(Local), &o)?);
        let status = Command::new("mpirun")
            .args(["--oversubscribe", "-np", "2", "-x", "MP_NUM_THREADS=1"])
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .arg(&exe)
            .args(["dp", "--worker", "--out"])
            .arg(&worker_out)
            .args(["--steps", &o.steps.to_string()])
            .args(["--batch", &o.batch.to_string()])
            .args(["--units", &o.units.to_string()])
            .status()?;
        if !status.success() {
            bail!("the 2-rank job failed: {status}");
        }
        ranks.push(serde_json::from_str(&std::fs::read_to_string(
            &worker_out,
        )?)?);
    }
    let field = |runs: &[Vec<Value>], p: usize, k: &str| -> f64 {
        let mut v: Vec<f64> = runs
            .iter()
            .map(|r| r[p][k].as_f64().unwrap_or(f64::NAN))
            .collect();
        median(&mut v)
    };
    let cpu = mp_kernels::peak::describe_cpu();
    let mut md = format!(
        "## Data parallel: the guide's model ({} units), global batch {}, 2 ranks x 1 thread vs 1 \
         process x 2 threads, median of {} rounds x {} steps\n\nCPU: {cpu}\n\n| policy | 1 process \
         ms/step | 2 ranks ms/step | 2 ranks vs 1 | all-reduce MiB/step | all-reduce ms | small \
         collectives ms | 2 ranks' compute ms |\n|---|---|---|---|---|---|---|---|\n",
        o.units, o.batch, o.rounds, o.steps
    );
    let mut rows = vec![];
    for (p, policy) in ["float32", "mixed_bfloat16", "mixed_float16"]
        .iter()
        .enumerate()
    {
        let one = field(&single, p, "step_ms");
        let two = field(&ranks, p, "step_ms");
        let ar = field(&ranks, p, "allreduce_ms");
        let small = field(&ranks, p, "collectives_ms");
        let bytes = ranks[0][p]["allreduce_bytes"].as_u64().unwrap_or(0);
        md += &format!(
            "| {policy} | {one:.1} | {two:.1} | {:.2}x | {:.1} | {ar:.1} | {small:.2} | {:.1} |\n",
            one / two,
            bytes as f64 / (1u64 << 20) as f64,
            two - ar - small
        );
        rows.push(json!({
            "policy": policy, "single_step_ms": one, "ranks_step_ms": two,
            "speedup": one / two, "allreduce_bytes": bytes, "allreduce_ms": ar,
            "collectives_ms": small,
        }));
    }
    md += "\n\"2 ranks vs 1\" is the single process's step time over the 2 ranks' (above 1: \
           the ranks are faster); the 2 ranks' compute is their step less its collectives.\n";
    println!("{md}");
    let j = json!({ "cpu": cpu, "batch": o.batch, "units": o.units, "rows": rows, "markdown": md });
    std::fs::write(&o.out, serde_json::to_string_pretty(&j)?)?;
    Ok(())
}
