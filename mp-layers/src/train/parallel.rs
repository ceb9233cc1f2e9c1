//! Data parallelism: what a trainer does with the other ranks of a job (see
//! [`mp_core::dist`]).
//!
//! Every rank holds a replica of the model and takes its shard of each global batch. A step:
//! 1. forward and backward on the shard (a rank whose shard is empty only takes part);
//! 2. the ranks agree on the step ([`Replicas::agree`]): samples, loss sum, and which ranks
//!    failed; a failure anywhere is an error everywhere, before any rank waits on a collective
//!    the failed one will not make;
//! 3. the gradients are summed across ranks ([`Replicas::all_reduce_gradients`]), each rank's
//!    weighted by its share of the global batch, so the sum is the gradient one process would
//!    take over the global batch;
//! 4. each rank checks the summed gradients and the ranks sum their non-finite flags
//!    ([`Replicas::any`]): every rank skips or applies the same step, and the loss scale moves the
//!    same way on all of them;
//! 5. non-trainable state (BatchNormalization's moving statistics) is averaged
//!    ([`Replicas::average_state`]).
//!
//! Replicas start from rank 0's weights ([`Replicas::broadcast_variables`]) and, since every
//! later change is the same on every rank, stay bit-identical.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mp_core::dist::{self, Buckets, Communicator, Local};

use crate::error::{Error, Result};
use crate::layer::Layer;

/// A trainer's view of the other ranks, and what the collectives cost.
#[derive(Debug)]
pub(crate) struct Replicas {
    comm: Arc<dyn Communicator>,
    buckets: Buckets,
    /// Gradient bytes summed and the time spent in collectives, over the last step.
    pub(crate) last: CommStats,
}

/// What the collectives of one training step moved and took.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommStats {
    /// Gradient bytes summed across ranks (per rank).
    pub gradient_bytes: usize,
    /// Wall time in the gradient all-reduce, staging copies included.
    pub gradient_time: Duration,
    /// Wall time in the step's small collectives (agreement, non-finite flag, state averages).
    pub other_time: Duration,
}

/// What the ranks agreed on for one step.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Agreement {
    /// Samples in the global batch.
    pub samples: usize,
    /// The global batch's sum of per-sample losses.
    pub loss_sum: f64,
}

impl Default for Replicas {
    fn default() -> Self {
        Replicas::new(Arc::new(Local))
    }
}

impl Replicas {
    pub(crate) fn new(comm: Arc<dyn Communicator>) -> Self {
        Replicas {
            comm,
            buckets: Buckets::new(),
            last: CommStats::default(),
        }
    }

    pub(crate) fn comm(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    pub(crate) fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub(crate) fn size(&self) -> usize {
        self.comm.size()
    }

    /// Whether there are other ranks.
    pub(crate) fn is_parallel(&self) -> bool {
        self.comm.size() > 1
    }

    /// This rank's part of `items`: the `rank`-th of `size` contiguous pieces whose lengths
    /// differ by at most one.
    pub(crate) fn shard<'a, T>(&self, items: &'a [T]) -> &'a [T] {
        let (r, n) = (self.rank(), self.size());
        &items[r * items.len() / n..(r + 1) * items.len() / n]
    }

    /// Every variable (trainable or not) set to rank 0's value.
    pub(crate) fn broadcast_variables<M: Layer>(&mut self, model: &mut M) -> Result<()> {
        if !self.is_parallel() {
            return Ok(());
        }
        let comm = self.comm.clone();
        model.visit_variables("", &mut |_, v| {
            Ok(dist::broadcast_tensor(&*comm, v.value_mut(), 0)?)
        })
    }

    /// The ranks' step: this rank's samples and loss in (`None` when it failed), the global
    /// batch's out. A rank that failed makes every other rank's result an error naming it.
    pub(crate) fn agree(&mut self, local: Option<(usize, f64)>) -> Result<Agreement> {
        let started = Instant::now();
        let (n, loss_sum) = local.map_or((0.0, 0.0), |(n, l)| (n as f64, l));
        let mut buf = [n, loss_sum];
        let outcome = self.all_succeeded(local.is_some(), &mut buf);
        self.last = CommStats {
            other_time: started.elapsed(),
            ..CommStats::default()
        };
        outcome?;
        Ok(Agreement {
            samples: buf[0] as usize,
            loss_sum: buf[1],
        })
    }

    /// Whether every rank succeeded at something (`ok` is this rank's outcome), summing `extra`
    /// across ranks on the way; an error naming the ranks that did not. A rank that failed gets
    /// `Ok(())` back and returns its own error.
    pub(crate) fn all_succeeded(&mut self, ok: bool, extra: &mut [f64]) -> Result<()> {
        if !self.is_parallel() {
            return Ok(());
        }
        let size = self.size();
        // [extra..., failed per rank...]
        let mut buf = extra.to_vec();
        buf.resize(extra.len() + size, 0.0);
        if !ok {
            buf[extra.len() + self.rank()] = 1.0;
        }
        self.comm.all_reduce_sum_f64(&mut buf)?;
        extra.copy_from_slice(&buf[..extra.len()]);
        let failed: Vec<usize> = (0..size).filter(|&r| buf[extra.len() + r] > 0.0).collect();
        if ok && !failed.is_empty() {
            return Err(Error::ReplicaFailed { ranks: failed });
        }
        Ok(())
    }

    /// Sums every trainable variable's gradient across ranks, this rank's weighted by
    /// `share` (its samples over the global batch's: the gradients are per-sample means).
    pub(crate) fn all_reduce_gradients<M: Layer>(
        &mut self,
        model: &mut M,
        share: f32,
    ) -> Result<()> {
        if !self.is_parallel() {
            return Ok(());
        }
        let started = Instant::now();
        let b = &mut self.buckets;
        b.clear();
        model.visit_variables("", &mut |_, v| {
            if v.trainable() {
                b.push(v.grad_mut(), share)?;
            }
            Ok(())
        })?;
        b.all_reduce(&*self.comm)?;
        model.visit_variables("", &mut |_, v| {
            if v.trainable() {
                b.pop(v.grad_mut(), 1.0)?;
            }
            Ok(())
        })?;
        self.last.gradient_bytes = b.bytes;
        self.last.gradient_time = started.elapsed();
        Ok(())
    }

    /// Whether `flag` holds on any rank.
    pub(crate) fn any(&mut self, flag: bool) -> Result<bool> {
        if !self.is_parallel() {
            return Ok(flag);
        }
        let started = Instant::now();
        let mut buf = [f64::from(u8::from(flag))];
        self.comm.all_reduce_sum_f64(&mut buf)?;
        self.last.other_time += started.elapsed();
        Ok(buf[0] > 0.0)
    }

    /// Non-trainable variables (moving statistics) set to their mean over the ranks. Each
    /// rank's moving average followed its own batches; their mean is the moving average of the
    /// ranks' mean batch statistics (the update is linear).
    pub(crate) fn average_state<M: Layer>(&mut self, model: &mut M) -> Result<()> {
        if !self.is_parallel() || model.non_trainable_param_count() == 0 {
            return Ok(());
        }
        let started = Instant::now();
        let inv = 1.0 / self.size() as f32;
        let b = &mut self.buckets;
        b.clear();
        model.visit_variables("", &mut |_, v| {
            if !v.trainable() {
                b.push(v.value(), 1.0)?;
            }
            Ok(())
        })?;
        b.all_reduce(&*self.comm)?;
        model.visit_variables("", &mut |_, v| {
            if !v.trainable() {
                b.pop(v.value_mut(), inv)?;
            }
            Ok(())
        })?;
        self.last.other_time += started.elapsed();
        Ok(())
    }

    /// Sums `values` across ranks (metric sums and counts).
    pub(crate) fn sum(&self, values: &mut [f64]) -> Result<()> {
        if self.is_parallel() {
            self.comm.all_reduce_sum_f64(values)?;
        }
        Ok(())
    }
}
