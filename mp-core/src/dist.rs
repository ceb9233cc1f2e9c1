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
pub fn launched_size() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMIX_SIZE",
        "PMI_SIZE",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.parse().ok())
}

/// The communicator this process was launched with: [`Mpi`] under `mpirun` (with the `mpi`
/// feature), [`Local`] otherwise.
///
/// # Errors
/// [`Error::Communication`] when launched as one of several ranks by a build without the `mpi`
/// feature (N copies of a single-process run would each train alone), or when MPI fails to
/// start.
pub fn from_env() -> Result<Arc<dyn Communicator>> {
    match launched_size() {
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
pub use self::mpi_comm::Mpi;

#[cfg(feature = "mpi")]
mod mpi_comm {
    use std::sync::Mutex;

    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};

    use super::{Communicator, check_root};
    use crate::error::{Error, Result};

    /// MPI's world communicator (feature `mpi`). MPI is initialised once per process, with
    /// `MPI_THREAD_SERIALIZED`, and finalised when this value drops.
    ///
    /// Sums: `MPI_Allreduce` on two ranks (where IEEE addition's commutativity makes both ranks'
    /// sums the same bits); on more, `MPI_Reduce` to rank 0 then `MPI_Bcast`, because MPI does
    /// not promise that an all-reduce gives every rank the same bits.
    pub struct Mpi {
        state: Mutex<State>,
        rank: usize,
        size: usize,
    }

    struct State {
        world: SimpleCommunicator,
        scratch_f32: Vec<f32>,
        scratch_f64: Vec<f64>,
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
                .finish()
        }
    }

    impl Mpi {
        /// Initialises MPI and takes its world communicator.
        ///
        /// # Errors
        /// [`Error::Communication`] when MPI is already initialised in this process or does not
        /// provide `MPI_THREAD_SERIALIZED`.
        pub fn init() -> Result<Mpi> {
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
                    _universe: universe,
                }),
                rank,
                size,
            })
        }

        fn state(&self) -> std::sync::MutexGuard<'_, State> {
            // A panic while holding the lock leaves no MPI call half-made: the state is usable.
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    macro_rules! sum {
        ($s:expr, $buf:expr, $scratch:ident, $size:expr) => {{
            let s = &mut *$s;
            s.$scratch.clear();
            s.$scratch.extend_from_slice($buf);
            if $size <= 2 {
                s.world
                    .all_reduce_into(&s.$scratch[..], &mut $buf[..], SystemOperation::sum());
            } else {
                let root = s.world.process_at_rank(0);
                if s.world.rank() == 0 {
                    root.reduce_into_root(&s.$scratch[..], &mut $buf[..], SystemOperation::sum());
                } else {
                    root.reduce_into(&s.$scratch[..], SystemOperation::sum());
                }
                root.broadcast_into(&mut $buf[..]);
            }
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
            s.world.process_at_rank(root as i32).broadcast_into(buf);
            Ok(())
        }
        fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
            check_root(self, "broadcast", root)?;
            let s = self.state();
            let p = s.world.process_at_rank(root as i32);
            let mut len = buf.len() as u64;
            p.broadcast_into(&mut len);
            buf.resize(len as usize, 0);
            p.broadcast_into(&mut buf[..]);
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            self.state().world.barrier();
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
}
