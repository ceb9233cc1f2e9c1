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

/// What every rank of a data-parallel job must have in common before training starts, as
/// `(what, value)` pairs in a fixed order: the trainer assembles it (policy, variables, data
/// sizes, options, progress) and [`Replicas::handshake`] compares every rank's with rank 0's.
/// Later features join the list with [`Handshake::push`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Handshake {
    items: Vec<(String, String)>,
}

impl Handshake {
    /// Adds `what` with its value.
    pub(crate) fn push(&mut self, what: impl Into<String>, value: impl std::fmt::Display) {
        // Tabs and newlines separate the encoded items.
        let clean = |s: String| s.replace(['\t', '\n'], " ");
        self.items
            .push((clean(what.into()), clean(value.to_string())));
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = String::new();
        for (k, v) in &self.items {
            out.push_str(k);
            out.push('\t');
            out.push_str(v);
            out.push('\n');
        }
        out.into_bytes()
    }

    fn decode(bytes: &[u8]) -> Vec<(String, String)> {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(|l| {
                let (k, v) = l.split_once('\t').unwrap_or((l, ""));
                (k.to_string(), v.to_string())
            })
            .collect()
    }
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

    /// The ranks' step: this rank's samples, loss weight and weighted loss sum in (`Err` when
    /// it failed), the global batch's out. A rank that failed makes every other rank's result
    /// an error naming it and its error; an empty global batch is an error on every rank.
    pub(crate) fn agree<T>(
        &mut self,
        local: &Result<T>,
        local_sums: [f64; 3],
    ) -> Result<Agreement> {
        let started = Instant::now();
        let mut buf = if local.is_ok() { local_sums } else { [0.0; 3] };
        let outcome = self.all_succeeded(local.as_ref().err(), &mut buf);
        self.last = CommStats {
            other_time: started.elapsed(),
            ..CommStats::default()
        };
        outcome?;
        if local.is_ok() && buf[0] == 0.0 {
            return Err(Error::InvalidArgument {
                what: format!(
                    "the global batch is empty: none of the {} ranks has a sample in this step",
                    self.size()
                ),
            });
        }
        Ok(Agreement {
            samples: buf[1] as usize,
            loss_sum: buf[2],
        })
    }

    /// Whether every rank succeeded at something (`failed` is this rank's error, if it
    /// failed), summing `extra` across ranks on the way. When any rank failed, the lowest of
    /// them sends its error's text to the others, and each rank that succeeded returns
    /// [`Error::ReplicaFailed`] naming the failed ranks and that text; a rank that failed gets
    /// `Ok(())` back and returns its own error.
    pub(crate) fn all_succeeded(
        &mut self,
        failed: Option<&Error>,
        extra: &mut [f64],
    ) -> Result<()> {
        if !self.is_parallel() {
            return Ok(());
        }
        let size = self.size();
        // [extra..., failed per rank...]
        let mut buf = extra.to_vec();
        buf.resize(extra.len() + size, 0.0);
        if failed.is_some() {
            buf[extra.len() + self.rank()] = 1.0;
        }
        self.comm.all_reduce_sum_f64(&mut buf)?;
        extra.copy_from_slice(&buf[..extra.len()]);
        let ranks: Vec<usize> = (0..size).filter(|&r| buf[extra.len() + r] > 0.0).collect();
        let Some(&first_rank) = ranks.first() else {
            return Ok(());
        };
        let mut text = match failed {
            Some(e) if self.rank() == first_rank => e.to_string().into_bytes(),
            _ => vec![],
        };
        self.comm.broadcast_bytes(&mut text, first_rank)?;
        if failed.is_some() {
            return Ok(());
        }
        Err(Error::ReplicaFailed {
            ranks,
            first_rank,
            first: String::from_utf8_lossy(&text).into_owned(),
        })
    }

    /// `outcome` (this rank's result of something every rank does) agreed across the ranks:
    /// this rank's own error if it failed, [`Error::ReplicaFailed`] (naming the failed ranks and
    /// the first one's error) if another did, else its value.
    pub(crate) fn agree_outcome<T>(&mut self, outcome: Result<T>) -> Result<T> {
        self.all_succeeded(outcome.as_ref().err(), &mut [])?;
        outcome
    }

    /// Checks that every rank has the same `items` as rank 0: [`Error::ReplicasDisagree`] on
    /// every rank naming the first item that differs, both values and the ranks that differ.
    pub(crate) fn handshake(&mut self, items: &Handshake) -> Result<()> {
        if !self.is_parallel() {
            return Ok(());
        }
        let started = Instant::now();
        let mine = &items.items;
        let mut theirs = if self.rank() == 0 {
            items.encode()
        } else {
            vec![]
        };
        self.comm.broadcast_bytes(&mut theirs, 0)?;
        let root = Handshake::decode(&theirs);
        let differs = (0..mine.len().max(root.len()))
            .find(|&i| mine.get(i) != root.get(i))
            .map_or(0.0, |i| (i + 1) as f64);
        let mut at = vec![0.0; self.size()];
        at[self.rank()] = differs;
        self.comm.all_reduce_sum_f64(&mut at)?;
        let ranks: Vec<usize> = (0..self.size()).filter(|&r| at[r] > 0.0).collect();
        let Some(&rank) = ranks.first() else {
            self.last.other_time += started.elapsed();
            return Ok(());
        };
        let i = at[rank] as usize - 1;
        let missing = || ("<nothing>".to_string(), "nothing".to_string());
        let mut item = if self.rank() == rank {
            let (k, v) = mine.get(i).cloned().unwrap_or_else(missing);
            format!("{k}\t{v}").into_bytes()
        } else {
            vec![]
        };
        self.comm.broadcast_bytes(&mut item, rank)?;
        let item = String::from_utf8_lossy(&item).into_owned();
        let (their_key, theirs) = item.split_once('\t').unwrap_or((&item, ""));
        let (key, ours) = root.get(i).cloned().unwrap_or_else(missing);
        let item = if key == their_key || their_key == "<nothing>" {
            key
        } else if key == "<nothing>" {
            their_key.to_string()
        } else {
            format!("{key} (rank {rank} has {their_key} there)")
        };
        Err(Error::ReplicasDisagree {
            item,
            ours,
            rank,
            theirs: theirs.to_string(),
            ranks,
        })
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
            if v.updated() {
                b.push(v.grad_mut(), share)?;
            }
            Ok(())
        })?;
        b.all_reduce(&*self.comm)?;
        model.visit_variables("", &mut |_, v| {
            if v.updated() {
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
            if !v.trainable() && !v.frozen() {
                b.push(v.value(), 1.0)?;
            }
            Ok(())
        })?;
        b.all_reduce(&*self.comm)?;
        model.visit_variables("", &mut |_, v| {
            if !v.trainable() && !v.frozen() {
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
