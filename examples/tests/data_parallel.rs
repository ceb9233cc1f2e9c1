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

/// Runs `dp_check --fault case` on 2 ranks with a collective deadline of `deadline` seconds,
/// killing the job (and failing) if it has not ended in `limit`: a hang is a failure here, not
/// a CI timeout. Returns the exit status, stdout, stderr and how long the job ran.
fn fault(case: &str, deadline: u32, limit: Duration) -> (bool, String, String, Duration) {
    let started = Instant::now();
    let mut job = mpirun()
        .args(["-x", &format!("MP_COLLECTIVE_TIMEOUT={deadline}")])
        .args([DP_CHECK, "--fault", case])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the pipes while waiting, so that a full pipe cannot stall the job.
    fn reader(mut r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    }
    let out_t = reader(job.stdout.take().unwrap());
    let err_t = reader(job.stderr.take().unwrap());
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > limit {
            let _ = job.kill();
            // A stopped rank outlives mpirun: end it too.
            let _ = Command::new("pkill")
                .args(["-KILL", "-f", &format!("dp_check --fault {case}")])
                .status();
            panic!("dp_check --fault {case} still ran after {limit:?}: a hang");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    let (stdout, stderr) = (out_t.join().unwrap(), err_t.join().unwrap());
    println!("--fault {case}: {status} after {took:?}\n{stdout}\n{stderr}");
    (status.success(), stdout, stderr, took)
}

/// The line rank `rank` printed for its error in a `--fault` run.
fn error_of(stdout: &str, rank: usize, case: &str) -> String {
    let prefix = format!("rank {rank}: fault {case}: ");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no error from rank {rank} in:\n{stdout}"))
        .to_string()
}

#[test]
fn a_bad_label_on_one_rank_stops_every_rank_with_its_error() {
    for (case, what) in [("label", "fit"), ("evaluate-label", "evaluate")] {
        let (ok, stdout, _, _) = fault(case, 30, Duration::from_secs(90));
        assert!(ok, "{what}: a rank did not fail");
        let own = error_of(&stdout, 1, case);
        assert!(own.contains("label 99") && own.contains("row 3"), "{own}");
        let other = error_of(&stdout, 0, case);
        assert!(
            other.contains("rank(s) [1]") && other.contains("rank 1: ") && other.contains(&own),
            "{other}"
        );
    }
}

#[test]
fn ranks_that_disagree_fail_together_naming_both_values() {
    for (case, expected) in [
        ("epochs", "disagree on epochs: 3 on rank 0, 1 on rank 1"),
        (
            "width",
            "disagree on variable dense_1/kernel: shape [48, 40] on rank 0, shape [48, 20] on \
             rank 1",
        ),
        (
            "samples",
            "disagree on training samples: 2700 on rank 0, 2691 on rank 1",
        ),
        (
            "batch",
            "disagree on global batch: 250 on rank 0, 125 on rank 1",
        ),
    ] {
        let (ok, stdout, _, _) = fault(case, 30, Duration::from_secs(90));
        assert!(ok, "{case}: a rank did not fail");
        for rank in 0..2 {
            let e = error_of(&stdout, rank, case);
            assert!(e.contains(expected), "{case}, rank {rank}: {e}");
        }
    }
}

#[test]
fn an_empty_global_batch_is_an_error_on_every_rank() {
    let (ok, stdout, _, _) = fault("empty", 30, Duration::from_secs(90));
    assert!(ok, "a rank did not fail");
    for rank in 0..2 {
        let e = error_of(&stdout, rank, "empty");
        assert!(e.contains("the global batch is empty"), "rank {rank}: {e}");
    }
}

#[test]
fn a_stalled_rank_ends_the_job_at_the_collective_deadline() {
    let deadline = 3;
    let (ok, stdout, stderr, took) = fault("stall", deadline, Duration::from_secs(90));
    assert!(!ok, "the job succeeded although rank 1 stopped:\n{stdout}");
    assert!(stderr.contains("rank 1: stopping myself"), "{stderr}");
    assert!(
        stderr.contains("rank 0 of 2: ")
            && stderr.contains("past the 3.0 s deadline (MP_COLLECTIVE_TIMEOUT)")
            && stderr.contains("rank 1 did not arrive"),
        "{stderr}"
    );
    // Training to the stop takes a second or two; then the deadline, then the abort.
    assert!(
        took < Duration::from_secs(u64::from(deadline) + 30),
        "the job took {took:?}"
    );
}

/// Runs an example binary on 2 ranks; returns whether it succeeded, its stdout and stderr.
fn run_example(bin: &str, args: &[&str]) -> (bool, String, String) {
    let out = mpirun().arg(bin).args(args).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    println!("{bin}: {}\n{stdout}\n{stderr}", out.status);
    (out.status.success(), stdout, stderr)
}

#[test]
fn single_process_examples_refuse_to_run_as_several_ranks() {
    for bin in [
        env!("CARGO_BIN_EXE_reverse_lm"),
        env!("CARGO_BIN_EXE_mnist_custom_loop"),
    ] {
        let (ok, _, stderr) = run_example(bin, &[]);
        assert!(!ok, "{bin} ran under mpirun -np 2");
        assert!(
            stderr.contains("trains in one process, but was launched as one of 2 MPI ranks"),
            "{stderr}"
        );
    }
}

/// `mnist_cnn` under `mpirun -np 2` trains data-parallel (when MNIST is present: CI fetches it
/// with `cargo xtask data`).
#[test]
fn mnist_cnn_trains_data_parallel_under_mpirun() {
    let present = mp_data::mnist::Loader::new()
        .fetch(false)
        .quiet(true)
        .load()
        .is_ok();
    if !present {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(
            !ci,
            "MNIST is missing under CI; run `cargo xtask data` first"
        );
        println!("skipped: MNIST is not present (cargo xtask data fetches it)");
        return;
    }
    let args = [
        "--policy",
        "mixed_bfloat16",
        "--train-samples",
        "1000",
        "--epochs",
        "1",
        "--batch-size",
        "100",
    ];
    let (ok, stdout, stderr) = run_example(env!("CARGO_BIN_EXE_mnist_cnn"), &args);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("data parallel: 2 ranks over mpi"),
        "{stdout}"
    );
    // Rank 0 alone prints.
    assert_eq!(stdout.matches("Test accuracy").count(), 1, "{stdout}");
}
