//! Communicators between the processes of a data-parallel job.
//!
//! A data-parallel job runs one process (a *rank*) per replica of the model. Every rank trains
//! on its shard of each global batch; the ranks then sum their gradients, so that all of them
//! apply the same update, and agree on whether to apply it at all. A [`Communicator`] is that
//! conversation: rank and size, the sum of float32 (and float64) buffers across ranks, broadcast
//! and barrier.
//!
//! - [`Local`] is the single process: rank 0 of 1, where every collective is the identity. It is
//!   the default, and costs nothing.
//! - [`Mpi`] (feature `mpi`) runs over MPI (Open MPI, the engine of HPC clusters and Horovod),
//!   through the `mpi` crate: launch with `mpirun -np N <binary>`, on one machine or with a
//!   hostfile.
//! - [`from_env`] picks [`Mpi`] when the process was launched by `mpirun` (it reads Open MPI's,
//!   PMIx's and MPICH's environment) and [`Local`] otherwise; a process launched as one of several
//!   ranks by a build without the `mpi` feature is an error rather than N independent runs.
//!
//! Sums are the same bits on every rank (the communicator promises it, see
//! [`Communicator::all_reduce_sum_f32`]), so replicas that start equal stay equal. A GPU
//! implementation (NCCL, through cudarc's `nccl` module) fits the same trait; [`Buckets`] is
//! where it would take device buffers instead of staging them on the host.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::dtype::F32;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The processes of a data-parallel job, as one rank sees them.
///
/// Every collective must be called by every rank, in the same order, with buffers of the same
/// length; a rank that stops calling leaves the others waiting (the trainer makes every rank
/// agree on errors before the next collective for that reason).
pub trait Communicator: Send + Sync + fmt::Debug {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// How many ranks the job has.
    fn size(&self) -> usize;
    /// What carries the messages (`"local"`, `"mpi"`).
    fn name(&self) -> &'static str;
    /// Replaces `buf`, on every rank, with the elementwise sum of every rank's `buf`. Every rank
    /// receives the same bits.
    ///
    /// # Errors
    /// [`Error::Communication`] when the ranks' lengths are known to differ.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// [`Communicator::all_reduce_sum_f32`] for float64 (metric sums and counts).
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_sum_f32`].
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Replaces `buf` on every rank with `root`'s `buf` (same length everywhere).
    ///
    /// # Errors
    /// [`Error::Communication`] for a `root` that is not a rank.
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Replaces `buf` on every rank with `root`'s bytes, whatever their length elsewhere.
    ///
    /// # Errors
    /// [`Error::Communication`] for a `root` that is not a rank.
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    ///
    /// # Errors
    /// [`Error::Communication`] if the transport fails.
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the job with exit status `code` (MPI's `MPI_Abort`): what a rank does
    /// when it cannot go on and the others might be waiting for it.
    fn abort(&self, code: i32) -> !;
}

/// The single process: rank 0 of 1. Every collective leaves its buffer as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Local;

impl Communicator for Local {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn name(&self) -> &'static str {
        "local"
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_f32(&self, _buf: &mut [f32], root: usize) -> Result<()> {
        check_root(self, "broadcast", root)
    }
    fn broadcast_bytes(&self, _buf: &mut Vec<u8>, root: usize) -> Result<()> {
        check_root(self, "broadcast", root)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

fn check_root(comm: &dyn Communicator, op: &'static str, root: usize) -> Result<()> {
    if root < comm.size() {
        Ok(())
    } else {
        Err(Error::Communication {
            op,
            what: format!("root rank {root} is not one of the {} ranks", comm.size()),
        })
    }
}

/// How many ranks the launcher says this process is one of, from the environment `mpirun` (Open
/// MPI), PMIx and MPICH's Hydra set: `None` when not launched by one.
///
/// # Errors
/// [`Error::Communication`] naming the variable when its value is not a whole number of ranks
/// (at least 1): a launcher never sets that, so the environment was edited by hand.
pub fn launched_size() -> Result<Option<usize>> {
    launched_size_from(|k| std::env::var(k).ok())
}

/// [`launched_size`] over any environment (tests pass a table).
fn launched_size_from(var: impl Fn(&str) -> Option<String>) -> Result<Option<usize>> {
    for k in [
        "OMPI_COMM_WORLD_SIZE",
        "PMIX_SIZE",
        "PMI_SIZE",
        "MPI_LOCALNRANKS",
    ] {
        let Some(v) = var(k) else { continue };
        return match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(Some(n)),
            _ => Err(Error::Communication {
                op: "from_env",
                what: format!(
                    "{k}={v:?} is not a number of MPI ranks (a whole number, at least 1): the \
                     launcher sets it, so unset it or launch with mpirun -np N"
                ),
            }),
        };
    }
    Ok(None)
}

/// The knob that sets how long a rank waits in one collective before it gives up on the others:
/// seconds (`"300"`, `"2.5"`), or `"off"` (also `"0"`, `"none"`) for no deadline, as a debugger
/// that stops a rank needs. Unset: [`DEFAULT_DEADLINE`]. Under `mpirun`, pass it to every rank
/// with `-x MP_COLLECTIVE_TIMEOUT=60`.
pub const DEADLINE_KNOB: &str = "MP_COLLECTIVE_TIMEOUT";

/// How long a rank waits in one collective by default: 10 minutes, since legitimate waits are
/// long (rank 0 writing a checkpoint, first-use kernel calibration, a dataset download on one
/// rank).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(600);

/// The deadline [`DEADLINE_KNOB`]'s value asks for (`None` for the value: unset, the default;
/// `Ok(None)`: no deadline).
///
/// # Errors
/// [`Error::Communication`] naming the knob and the value when it is neither a positive number
/// of seconds nor `off`.
pub fn deadline_from(value: Option<&str>) -> Result<Option<Duration>> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(Some(DEFAULT_DEADLINE));
    };
    if ["off", "none", "0"].contains(&v.to_ascii_lowercase().as_str()) {
        return Ok(None);
    }
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Some(Duration::from_secs_f64(s))),
        _ => Err(Error::Communication {
            op: DEADLINE_KNOB,
            what: format!(
                "{DEADLINE_KNOB}={v:?} is not a positive number of seconds (or \"off\" for no \
                 deadline)"
            ),
        }),
    }
}

/// The communicator this process was launched with: [`Mpi`] under `mpirun` (with the `mpi`
/// feature), [`Local`] otherwise.
///
/// # Errors
/// [`Error::Communication`] when launched as one of several ranks by a build without the `mpi`
/// feature (N copies of a single-process run would each train alone), when the launcher's
/// environment or [`DEADLINE_KNOB`] does not parse, or when MPI fails to start.
pub fn from_env() -> Result<Arc<dyn Communicator>> {
    match launched_size()? {
        None => Ok(Arc::new(Local)),
        #[cfg(feature = "mpi")]
        Some(_) => Ok(Arc::new(Mpi::init()?)),
        #[cfg(not(feature = "mpi"))]
        Some(1) => Ok(Arc::new(Local)),
        #[cfg(not(feature = "mpi"))]
        Some(n) => Err(Error::Communication {
            op: "from_env",
            what: format!(
                "launched as one of {n} MPI ranks, but mp was built without the `mpi` feature: \
                 rebuild with `--features mpi`"
            ),
        }),
    }
}

/// Refuses to run a program that trains in one process alone when the launcher started it as
/// one of several ranks: N copies would each train the same model alone, silently. `program`
/// and `instead` go into the message (what the program is, and what to run for data-parallel
/// training).
///
/// # Errors
/// [`Error::Communication`] under `mpirun -np N` with N > 1, or when the launcher's environment
/// does not parse.
pub fn single_process(program: &str, instead: &str) -> Result<()> {
    match launched_size()? {
        Some(n) if n > 1 => Err(Error::Communication {
            op: "single_process",
            what: format!(
                "{program} trains in one process, but was launched as one of {n} MPI ranks: \
                 each rank would train the same model alone. Run it without mpirun, or {instead}"
            ),
        }),
        _ => Ok(()),
    }
}

/// Elements per collective call when summing many tensors: 4 Mi float32 (16 MiB), large enough
/// that the per-call latency is small against the transfer, small enough that the staging copy
/// of one bucket is cheap.
pub const BUCKET_ELEMS: usize = 4 << 20;

/// A sum of many float32 tensors across ranks, a bucket at a time: [`Buckets::push`] copies each
/// tensor into a staging buffer, [`Buckets::all_reduce`] sums the buffer across ranks (in
/// [`BUCKET_ELEMS`] pieces, each piece scaled first by the factor it was pushed with), and
/// [`Buckets::pop`] copies the sums back out in the same order.
#[derive(Debug, Default)]
pub struct Buckets {
    staging: Vec<f32>,
    read: usize,
    /// Bytes summed by the last [`Buckets::all_reduce`].
    pub bytes: usize,
    /// Collective calls made by the last [`Buckets::all_reduce`].
    pub calls: usize,
}

impl Buckets {
    /// An empty staging buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets what was pushed (keeping the buffer's memory for the next round).
    pub fn clear(&mut self) {
        self.staging.clear();
        self.read = 0;
    }

    /// Appends `t` times `factor` (one float32 rounding; exact for a power of two).
    ///
    /// # Errors
    /// [`Error::WrongDevice`] for a tensor that is not on the CPU (NCCL would take device
    /// buffers directly).
    pub fn push(&mut self, t: &Tensor<F32>, factor: f32) -> Result<()> {
        let s = t.as_slice()?;
        if factor == 1.0 {
            self.staging.extend_from_slice(s);
        } else {
            self.staging.extend(s.iter().map(|v| v * factor));
        }
        Ok(())
    }

    /// Sums the staging buffer across ranks, [`BUCKET_ELEMS`] at a time.
    ///
    /// # Errors
    /// The communicator's.
    pub fn all_reduce(&mut self, comm: &dyn Communicator) -> Result<()> {
        self.read = 0;
        self.bytes = self.staging.len() * 4;
        self.calls = 0;
        if comm.size() == 1 {
            return Ok(());
        }
        for piece in self.staging.chunks_mut(BUCKET_ELEMS) {
            comm.all_reduce_sum_f32(piece)?;
            self.calls += 1;
        }
        Ok(())
    }

    /// Replaces `t` with the next `t.len()` summed values, times `factor`.
    ///
    /// # Errors
    /// [`Error::Communication`] when fewer values are left than `t` holds (a push/pop order
    /// mismatch); [`Error::WrongDevice`] for a tensor not on the CPU.
    pub fn pop(&mut self, t: &mut Tensor<F32>, factor: f32) -> Result<()> {
        let d = t.as_mut_slice()?;
        let Some(src) = self.staging.get(self.read..self.read + d.len()) else {
            return Err(Error::Communication {
                op: "pop",
                what: format!(
                    "{} values asked for, {} left in the bucket",
                    d.len(),
                    self.staging.len() - self.read
                ),
            });
        };
        if factor == 1.0 {
            d.copy_from_slice(src);
        } else {
            for (o, s) in d.iter_mut().zip(src) {
                *o = s * factor;
            }
        }
        self.read += d.len();
        Ok(())
    }
}

/// Broadcasts a tensor's values from `root` (every rank passes a tensor of the same shape).
///
/// # Errors
/// The communicator's; [`Error::WrongDevice`] for a tensor not on the CPU.
pub fn broadcast_tensor(comm: &dyn Communicator, t: &mut Tensor<F32>, root: usize) -> Result<()> {
    if comm.size() == 1 {
        return check_root(comm, "broadcast", root);
    }
    comm.broadcast_f32(t.as_mut_slice()?, root)
}

#[cfg(feature = "mpi")]
pub use self::mpi_comm::{DEADLINE_EXIT, Mpi};

#[cfg(feature = "mpi")]
mod mpi_comm {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::request::{Request, Scope};
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};

    use super::{Communicator, DEADLINE_KNOB, check_root, deadline_from};
    use crate::error::{Error, Result};

    /// The exit status of every rank when a collective passed its deadline.
    pub const DEADLINE_EXIT: i32 = 124;

    /// How long a rank polls a collective back to back before it sleeps between polls: the
    /// collectives of a step finish well within it, so they cost what a blocking call costs.
    const SPIN: Duration = Duration::from_millis(50);

    /// MPI's world communicator (feature `mpi`). MPI is initialised once per process, with
    /// `MPI_THREAD_SERIALIZED`, and finalised when this value drops.
    ///
    /// Sums: `MPI_Iallreduce` on two ranks (where IEEE addition's commutativity makes both ranks'
    /// sums the same bits); on more, `MPI_Ireduce` to rank 0 then `MPI_Ibcast`, because MPI does
    /// not promise that an all-reduce gives every rank the same bits.
    ///
    /// Every collective is issued as a non-blocking request and polled against a deadline
    /// ([`DEADLINE_KNOB`], 10 minutes by default): a rank still waiting past it prints an
    /// error naming the collective and the ranks it waited for, and aborts the whole job
    /// (`MPI_Abort`, exit status [`DEADLINE_EXIT`]). An MPI collective cannot be cancelled, and
    /// returning with one pending could hang in `MPI_Finalize`, so aborting is the only way out
    /// that never hangs. Resume the job from its last checkpoint (every rank calls
    /// `resume_latest`).
    pub struct Mpi {
        state: Mutex<State>,
        rank: usize,
        size: usize,
    }

    struct State {
        world: SimpleCommunicator,
        scratch_f32: Vec<f32>,
        scratch_f64: Vec<f64>,
        /// How long one collective may wait (`None`: forever).
        deadline: Option<Duration>,
        /// Collectives issued so far (names the one that timed out).
        issued: std::cell::Cell<u64>,
        // Dropped last: finalises MPI.
        _universe: Universe,
    }

    // SAFETY: MPI is initialised with MPI_THREAD_SERIALIZED (checked in `init`), which allows
    // calls from any thread as long as no two overlap; every call goes through `state`'s mutex.
    unsafe impl Send for Mpi {}
    // SAFETY: as for `Send`: shared references only reach MPI through the mutex.
    unsafe impl Sync for Mpi {}

    impl std::fmt::Debug for Mpi {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Mpi")
                .field("rank", &self.rank)
                .field("size", &self.size)
                // Never waits on the lock (a collective may hold it).
                .field("deadline", &self.state.try_lock().ok().map(|s| s.deadline))
                .finish()
        }
    }

    impl Mpi {
        /// Initialises MPI and takes its world communicator, with the deadline
        /// [`DEADLINE_KNOB`] sets.
        ///
        /// # Errors
        /// [`Error::Communication`] when MPI is already initialised in this process or does not
        /// provide `MPI_THREAD_SERIALIZED`, or when [`DEADLINE_KNOB`] does not parse.
        pub fn init() -> Result<Mpi> {
            let deadline = deadline_from(std::env::var(DEADLINE_KNOB).ok().as_deref())?;
            let fail = |what: String| Error::Communication {
                op: "mpi init",
                what,
            };
            let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
                .ok_or_else(|| fail("MPI is already initialised in this process".into()))?;
            if threading < mpi::Threading::Serialized {
                return Err(fail(format!(
                    "MPI provides thread level {threading:?}, mp needs Serialized"
                )));
            }
            let world = universe.world();
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            Ok(Mpi {
                state: Mutex::new(State {
                    world,
                    scratch_f32: vec![],
                    scratch_f64: vec![],
                    deadline,
                    issued: std::cell::Cell::new(0),
                    _universe: universe,
                }),
                rank,
                size,
            })
        }

        /// How long one collective may wait before the job is aborted (`None`: forever).
        pub fn deadline(&self) -> Option<Duration> {
            self.state().deadline
        }

        /// Sets how long one collective may wait (`None`: forever), on this rank: every rank
        /// should set the same.
        pub fn set_deadline(&self, deadline: Option<Duration>) {
            self.state().deadline = deadline;
        }

        fn state(&self) -> std::sync::MutexGuard<'_, State> {
            // A panic while holding the lock leaves no MPI call half-made: the state is usable.
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    impl State {
        /// Polls `req` until it completes; past the deadline, aborts the job with a message
        /// naming `op`, the wait and the ranks this one waited for.
        fn wait<'a, D: ?Sized, S: Scope<'a>>(&self, op: &'static str, mut req: Request<'a, D, S>) {
            self.issued.set(self.issued.get() + 1);
            let started = Instant::now();
            loop {
                match req.test() {
                    Ok(_) => return,
                    Err(pending) => req = pending,
                }
                let waited = started.elapsed();
                if let Some(deadline) = self.deadline
                    && waited > deadline
                {
                    self.expire(op, waited, deadline);
                }
                if waited > SPIN {
                    // A long wait (another rank still computing or writing): poll less often.
                    std::thread::sleep((waited / 64).min(Duration::from_millis(5)));
                } else {
                    std::hint::spin_loop();
                }
            }
        }

        fn expire(&self, op: &'static str, waited: Duration, deadline: Duration) -> ! {
            let (rank, size) = (self.world.rank(), self.world.size());
            let others: Vec<i32> = (0..size).filter(|&r| r != rank).collect();
            let whom = if others.len() == 1 {
                format!("rank {} did not arrive", others[0])
            } else {
                format!("one or more of ranks {others:?} did not arrive")
            };
            eprintln!(
                "mp: rank {rank} of {size}: {op} (collective #{}) waited {:.1} s, past the \
                 {:.1} s deadline ({DEADLINE_KNOB}): {whom} (stopped, hung, or on another \
                 step). Aborting every rank with exit status {DEADLINE_EXIT}; resume from the \
                 last checkpoint (every rank calls resume_latest), and set {DEADLINE_KNOB} \
                 (seconds, or off) if the wait was legitimate",
                self.issued.get(),
                waited.as_secs_f64(),
                deadline.as_secs_f64(),
            );
            self.world.abort(DEADLINE_EXIT)
        }
    }

    macro_rules! sum {
        ($s:expr, $buf:expr, $scratch:ident, $size:expr) => {{
            let guard = &mut *$s;
            let mut scratch = std::mem::take(&mut guard.$scratch);
            scratch.clear();
            scratch.extend_from_slice($buf);
            let s: &State = &*guard;
            if $size <= 2 {
                mpi::request::scope(|scope| {
                    let req = s.world.immediate_all_reduce_into(
                        scope,
                        &scratch[..],
                        &mut $buf[..],
                        SystemOperation::sum(),
                    );
                    s.wait("all_reduce", req);
                });
            } else {
                let root = s.world.process_at_rank(0);
                mpi::request::scope(|scope| {
                    if s.world.rank() == 0 {
                        let req = root.immediate_reduce_into_root(
                            scope,
                            &scratch[..],
                            &mut $buf[..],
                            SystemOperation::sum(),
                        );
                        s.wait("reduce", req);
                    } else {
                        let req =
                            root.immediate_reduce_into(scope, &scratch[..], SystemOperation::sum());
                        s.wait("reduce", req);
                    }
                });
                mpi::request::scope(|scope| {
                    let req = root.immediate_broadcast_into(scope, &mut $buf[..]);
                    s.wait("broadcast", req);
                });
            }
            guard.$scratch = scratch;
        }};
    }
    impl Communicator for Mpi {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn name(&self) -> &'static str {
            "mpi"
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            sum!(self.state(), buf, scratch_f32, self.size);
            Ok(())
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            sum!(self.state(), buf, scratch_f64, self.size);
            Ok(())
        }
        fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
            check_root(self, "broadcast", root)?;
            let s = self.state();
            let p = s.world.process_at_rank(root as i32);
            mpi::request::scope(|scope| {
                let req = p.immediate_broadcast_into(scope, buf);
                s.wait("broadcast", req);
            });
            Ok(())
        }
        fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
            check_root(self, "broadcast", root)?;
            let s = self.state();
            let p = s.world.process_at_rank(root as i32);
            let mut len = buf.len() as u64;
            mpi::request::scope(|scope| {
                let req = p.immediate_broadcast_into(scope, &mut len);
                s.wait("broadcast", req);
            });
            buf.resize(len as usize, 0);
            mpi::request::scope(|scope| {
                let req = p.immediate_broadcast_into(scope, &mut buf[..]);
                s.wait("broadcast", req);
            });
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            let s = self.state();
            let req = s.world.immediate_barrier();
            s.wait("barrier", req);
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            self.state().world.abort(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_is_rank_zero_of_one_and_leaves_buffers_alone() {
        let c = Local;
        assert_eq!((c.rank(), c.size()), (0, 1));
        let mut v = vec![1.5f32, -2.0];
        c.all_reduce_sum_f32(&mut v).unwrap();
        assert_eq!(v, [1.5, -2.0]);
        let e = c.broadcast_f32(&mut v, 1).unwrap_err().to_string();
        assert!(e.contains("root rank 1") && e.contains("1 ranks"), "{e}");
    }

    #[test]
    fn buckets_scale_on_the_way_in_and_out_and_refuse_a_short_pop() {
        let a = Tensor::<F32>::from_f32(&[3], &[1.0, 2.0, 3.0]).unwrap();
        let b = Tensor::<F32>::from_f32(&[2], &[4.0, 5.0]).unwrap();
        let mut k = Buckets::new();
        k.push(&a, 0.5).unwrap();
        k.push(&b, 1.0).unwrap();
        k.all_reduce(&Local).unwrap();
        assert_eq!(k.bytes, 20);
        let mut a2 = Tensor::<F32>::from_f32(&[3], &[0.0; 3]).unwrap();
        let mut b2 = Tensor::<F32>::from_f32(&[2], &[0.0; 2]).unwrap();
        k.pop(&mut a2, 2.0).unwrap();
        k.pop(&mut b2, 1.0).unwrap();
        assert_eq!(a2.to_f32_vec().unwrap(), [1.0, 2.0, 3.0]);
        assert_eq!(b2.to_f32_vec().unwrap(), [4.0, 5.0]);
        let e = k.pop(&mut b2, 1.0).unwrap_err().to_string();
        assert!(e.contains("2 values asked for, 0 left"), "{e}");
    }
    #[test]
    fn the_launcher_size_is_a_positive_whole_number() {
        let env =
            |k: &'static str, v: &'static str| move |name: &str| (name == k).then(|| v.to_string());
        assert_eq!(launched_size_from(|_| None).unwrap(), None);
        assert_eq!(
            launched_size_from(env("OMPI_COMM_WORLD_SIZE", "2")).unwrap(),
            Some(2)
        );
        assert_eq!(launched_size_from(env("PMI_SIZE", " 4 ")).unwrap(), Some(4));
        // The sweep found "launched as one of 0 MPI ranks".
        for bad in ["0", "-1", "two", ""] {
            let e = launched_size_from(env("OMPI_COMM_WORLD_SIZE", bad))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("OMPI_COMM_WORLD_SIZE={bad:?}")) && e.contains("at least 1"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_deadline_knob_takes_seconds_or_off() {
        assert_eq!(deadline_from(None).unwrap(), Some(DEFAULT_DEADLINE));
        assert_eq!(deadline_from(Some(" ")).unwrap(), Some(DEFAULT_DEADLINE));
        assert_eq!(
            deadline_from(Some("5")).unwrap(),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            deadline_from(Some("2.5")).unwrap(),
            Some(Duration::from_millis(2500))
        );
        for off in ["off", "OFF", "none", "0"] {
            assert_eq!(deadline_from(Some(off)).unwrap(), None, "{off}");
        }
        for bad in ["-1", "nan", "inf", "soon", "1e12"] {
            let e = deadline_from(Some(bad)).unwrap_err().to_string();
            assert!(e.contains(DEADLINE_KNOB) && e.contains(bad), "{e}");
        }
    }
}
