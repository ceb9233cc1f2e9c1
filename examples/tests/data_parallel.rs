//! Data-parallel training on 2 ranks of `mpirun` on this machine (feature `mpi`; CI installs
//! Open MPI with `apt-get`): the checks of `dp_check`, and a rank killed mid-epoch.
#![cfg(feature = "mpi")]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use examples::Digits;
use mp_core::Float32;
use mp_layers::{Checkpointing, Layer, SparseCategoricalCrossentropy, Trainer};
use mp_optim::RmsProp;

const DP_CHECK: &str = env!("CARGO_BIN_EXE_dp_check");

/// `mpirun` for 2 ranks of one kernel thread each on this machine (root allowed: CI runs as
/// root).
fn mpirun() -> Command {
    let found = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "mpirun not found: the `mpi` feature needs Open MPI (apt-get install openmpi-bin \
         libopenmpi-dev)"
    );
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", "2", "-x", "MP_NUM_THREADS=1"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

#[test]
fn two_ranks_stay_identical_match_one_process_and_skip_together() {
    dp_check(&[]);
}

/// 2601 training samples in global batches of 260: the last batch has one sample, so rank 0's
/// shard of it is empty (it computes nothing and still takes part).
#[test]
fn an_empty_shard_takes_part_in_the_step() {
    dp_check(&["--samples", "2890", "--batch-size", "260"]);
}

fn dp_check(args: &[&str]) {
    let out = mpirun().arg(DP_CHECK).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "dp_check failed:\n{stdout}\n{stderr}");
    for expected in [
        "2 ranks over mpi",
        "bit-identical on every rank after each epoch: [true, true, true]",
        "skipped steps 1 on every rank",
        "bit-identical to the uninterrupted run: true",
        "rank 1: a failed checkpoint on rank 0 stopped fit with: rank(s) [0]",
        "dp_check: ok",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
}

/// Waits up to `limit` for `path` to exist.
fn wait_for(path: &Path, limit: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn killing_a_rank_mid_epoch_ends_the_job_and_the_last_checkpoint_loads() {
    let dir = tempfile::tempdir().unwrap();
    let units = 128;
    let mut job = mpirun()
        .args([DP_CHECK, "--kill-test"])
        .arg(dir.path())
        .args(["--samples", "20000", "--units", &units.to_string()])
        .args(["--batch-size", "500"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let second = dir.path().join("epoch-000002.safetensors");
    assert!(
        wait_for(&second, Duration::from_secs(120)),
        "no checkpoint after 2 epochs in 120 s"
    );
    let pid = std::fs::read_to_string(dir.path().join("rank-1.pid")).unwrap();
    // Into the next epoch, then rank 1 dies without a word.
    std::thread::sleep(Duration::from_millis(150));
    let killed = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-KILL", pid.trim()])
            .status()
            .unwrap()
            .success()
    );
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(30) {
            job.kill().unwrap();
            panic!("the job still runs 30 s after rank 1 was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let ended = killed.elapsed();
    let out = job.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("job ended {ended:?} after the kill with {status}; stderr:\n{stderr}");
    assert!(
        !status.success(),
        "the job succeeded although a rank was killed"
    );

    // The last complete checkpoint loads (rank 0 writes each one to a temporary file first).
    let mut t = Trainer::compile(
        Digits::<Float32>::guide(units),
        RmsProp::default(),
        SparseCategoricalCrossentropy::new(),
    );
    t.model_mut().build(&[48]).unwrap(); // dp_check's features
    let path = t.resume_latest(dir.path()).unwrap().expect("a checkpoint");
    println!("resumed {} at epoch {}", path.display(), t.progress().epoch);
    assert!(t.progress().epoch >= 2);
}
