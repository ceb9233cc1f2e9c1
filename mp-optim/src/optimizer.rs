//! The `Optimizer` trait and SGD, RMSprop and Adam.
//!
//! Variables and optimizer state are float32 under every policy. Each update is one fused
//! per-variable kernel from mp-kernels; this module holds the hyperparameters, the per-variable
//! state and the step count.

use std::fmt;

use mp_core::{Domain, F32, Tensor, Variable};
use mp_kernels::ops;
use mp_kernels::optim::NonFiniteOutputs;

use crate::error::{Error, Result};

/// Something that holds variables: a model, a slice of variables. Visited in a fixed order.
pub trait VariableSet {
    /// Calls `f` with each variable's path and the variable, in a fixed order.
    fn for_each_variable(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Variable) -> Result<()>,
    ) -> Result<()>;
}

impl VariableSet for [Variable] {
    fn for_each_variable(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Variable) -> Result<()>,
    ) -> Result<()> {
        for v in self.iter_mut() {
            let name = v.name().to_string();
            f(&name, v)?;
        }
        Ok(())
    }
}

impl VariableSet for Vec<Variable> {
    fn for_each_variable(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Variable) -> Result<()>,
    ) -> Result<()> {
        self.as_mut_slice().for_each_variable(f)
    }
}

/// What one [`Optimizer::apply_gradients`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// Every variable and its slots were updated, and `iterations` advanced.
    Applied,
    /// Nothing was written and `iterations` did not advance: the update of a variable would
    /// have put NaN or infinity into it or into one of its slots, though every gradient was
    /// finite (a gradient of 1e30 under Adam makes `g * g`, so `v`, infinite).
    Skipped(NonFiniteUpdate),
}

impl Update {
    /// Whether the update was applied.
    pub fn applied(&self) -> bool {
        matches!(self, Update::Applied)
    }
}

/// An update that was skipped because it would have written NaN or infinity: which variable
/// (the first, in visiting order) and which of its values. Displayed as `the update of
/// dense_1/kernel would make Adam's v non-finite`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NonFiniteUpdate {
    /// The optimizer (`Adam`).
    pub optimizer: &'static str,
    /// The variable's path.
    pub variable: String,
    /// Whether the variable's own new value would be non-finite.
    pub value: bool,
    /// The slots whose new values would be non-finite (`v`), in slot order.
    pub slots: Vec<&'static str>,
}

impl NonFiniteUpdate {
    /// What would be non-finite, in words: `its value`, `Adam's v`, `its value and Adam's m`.
    pub fn what(&self) -> String {
        let mut what: Vec<String> = vec![];
        if self.value {
            what.push("its value".into());
        }
        what.extend(
            self.slots
                .iter()
                .map(|s| format!("{}'s {s}", self.optimizer)),
        );
        if what.is_empty() {
            what.push("it".into());
        }
        what.join(" and ")
    }
}

impl fmt::Display for NonFiniteUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the update of {} would make {} non-finite",
            self.variable,
            self.what()
        )
    }
}

/// An optimizer: updates float32 variables from their (unscaled) float32 gradients.
pub trait Optimizer: Send {
    /// The Keras name (`SGD`, `RMSprop`, `Adam`).
    fn name(&self) -> &'static str;

    /// The learning rate.
    fn learning_rate(&self) -> f32;

    /// Sets the learning rate (finite and non-negative, else an error and no change).
    fn set_learning_rate(&mut self, learning_rate: f32) -> Result<()>;

    /// Updates applied so far (Keras's `iterations`).
    fn iterations(&self) -> u64;

    /// Updates every variable from its gradient, or none. The variables must be the same, in
    /// the same order, at every step (checked before anything is written).
    ///
    /// **An update that would write NaN or infinity is skipped**: the new values of every
    /// variable and slot are computed first without writing (a checking pass with the update's
    /// own arithmetic), and written only when all are finite. Otherwise nothing is written,
    /// `iterations` does not advance, and [`Update::Skipped`] names the first such variable.
    /// The gradients are not checked here (a non-finite gradient makes a non-finite update,
    /// and is skipped as one; [`LossScaleOptimizer`](crate::LossScaleOptimizer) checks them
    /// first). On CUDA the built-in rules have no checking kernel yet: their updates are
    /// written unchecked there.
    fn apply_gradients(&mut self, vars: &mut dyn VariableSet) -> Result<Update>;

    /// The optimizer's per-variable state, as `(variable path, slot name, value)`.
    fn state(&self) -> Vec<(String, &'static str, &Tensor<F32>)>;

    /// The values slot `slot` may hold: finite, and for a second moment (Adam's `v`, RMSprop's
    /// `velocity`, running means of squared gradients) also never negative. Saved state is
    /// checked against it when loaded ([`Optimizer::load_state`]) and saved.
    fn slot_domain(&self, slot: &str) -> Domain {
        let _ = slot;
        Domain::Finite
    }

    /// The hyperparameters other than the learning rate, as `(name, value)`: what a checkpoint
    /// records so that loading it into a differently configured optimizer can be refused.
    fn config(&self) -> Vec<(&'static str, f64)> {
        vec![]
    }

    /// Replaces the step count and the per-variable state with saved values, as
    /// [`Optimizer::state`] and [`Optimizer::iterations`] gave them (slot names as strings), to
    /// resume training exactly. Every entry is checked (each variable's slots, in order, with
    /// one shape; no variable twice; every value in its [slot's domain](Optimizer::slot_domain))
    /// before anything is written: on error the optimizer is unchanged. An empty `state` means
    /// no step has built the state yet.
    ///
    /// The default refuses: an optimizer that keeps state must implement this to be resumable.
    fn load_state(
        &mut self,
        iterations: u64,
        state: Vec<(String, String, Tensor<F32>)>,
    ) -> Result<()> {
        let _ = (iterations, state);
        Err(Error::StateMismatch {
            optimizer: self.name(),
            what: "this optimizer cannot restore saved state".into(),
        })
    }
}

/// The update a [`Slots::update`] caller applies: `(variable path, value, gradient, state
/// buffers)`.
pub(crate) type UpdateFn<'a> =
    dyn FnMut(&str, &mut Tensor<F32>, &Tensor<F32>, &mut [Tensor<F32>]) -> Result<()> + 'a;

/// Per-variable state buffers, created at the first step and checked at every later one.
#[derive(Debug, Default, Clone)]
pub(crate) struct Slots {
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    buffers: Vec<Vec<Tensor<F32>>>,
}

impl Slots {
    /// Creates the buffers at the first step; afterwards matches them to the variables by
    /// name. The set may change between steps (fine-tuning freezes and unfreezes layers): a
    /// variable no longer given loses its buffers, a new one gets zeroed buffers. A variable
    /// given under a known name with another shape, or a set sharing no name with the one the
    /// buffers were built for (another model), is an error. Returns the buffers as they were
    /// when it changed them, so that a skipped step can put them back. Nothing is written to
    /// the variables.
    pub(crate) fn prepare(
        &mut self,
        optimizer: &'static str,
        per_variable: usize,
        vars: &mut dyn VariableSet,
    ) -> Result<Option<Slots>> {
        let mut seen: Vec<(String, Vec<usize>, mp_core::Device)> = vec![];
        vars.for_each_variable(&mut |name, v| {
            seen.push((name.to_string(), v.shape().to_vec(), v.value().device()));
            Ok(())
        })?;
        let same = seen.len() == self.names.len()
            && seen
                .iter()
                .zip(self.names.iter().zip(&self.shapes))
                .all(|((n, s, _), (name, shape))| n == name && s == shape);
        if same {
            return Ok(None);
        }
        let index = |name: &str| self.names.iter().position(|n| n == name);
        let mut persisting = 0;
        for (name, shape, _) in &seen {
            if let Some(i) = index(name) {
                persisting += 1;
                if *shape != self.shapes[i] {
                    return Err(Error::StateMismatch {
                        optimizer,
                        what: format!(
                            "variable {name:?} had shape {:?}, now {shape:?}",
                            self.shapes[i]
                        ),
                    });
                }
            }
        }
        if !self.is_empty() && !seen.is_empty() && persisting == 0 {
            return Err(Error::StateMismatch {
                optimizer,
                what: format!(
                    "it was built for the variables {:?}, none of which were given (now {:?}): \
                     a new model needs a new optimizer",
                    self.names,
                    seen.iter().map(|(n, _, _)| n.as_str()).collect::<Vec<_>>()
                ),
            });
        }
        let mut next = Slots::default();
        for (name, shape, device) in seen {
            let bufs = match index(&name) {
                Some(i) => self.buffers[i].clone(),
                None => (0..per_variable)
                    .map(|_| Tensor::<F32>::zeros_on(&shape, device))
                    .collect::<Result<_, _>>()?,
            };
            next.names.push(name);
            next.shapes.push(shape);
            next.buffers.push(bufs);
        }
        Ok(Some(std::mem::replace(self, next)))
    }

    /// Whether no step has built the buffers yet.
    fn is_empty(&self) -> bool {
        self.names.is_empty() && self.buffers.is_empty()
    }

    /// Calls `f(path, value, grad, state)` for each variable, in order (after
    /// [`Slots::prepare`]).
    pub(crate) fn update(
        &mut self,
        vars: &mut dyn VariableSet,
        f: &mut UpdateFn<'_>,
    ) -> Result<()> {
        let mut i = 0;
        let buffers = &mut self.buffers;
        vars.for_each_variable(&mut |path, v| {
            let (value, grad) = v.value_and_grad_mut();
            f(path, value, grad, &mut buffers[i])?;
            i += 1;
            Ok(())
        })
    }

    /// Slots rebuilt from saved `(variable path, slot name, value)` entries: each variable's
    /// `expected` slots in order, all of one shape, no variable twice, every value in its slot's
    /// `domain`. Nothing is kept on error.
    pub(crate) fn from_saved(
        optimizer: &'static str,
        expected: &[&'static str],
        domain: &dyn Fn(&str) -> Domain,
        iterations: u64,
        state: Vec<(String, String, Tensor<F32>)>,
    ) -> Result<Slots> {
        let mismatch = |what: String| Error::StateMismatch { optimizer, what };
        if state.is_empty() {
            if iterations > 0 && !expected.is_empty() {
                return Err(mismatch(format!(
                    "{iterations} updates were applied but no slot values ({expected:?}) were given"
                )));
            }
            return Ok(Slots::default());
        }
        if expected.is_empty() {
            return Err(mismatch(format!(
                "this configuration keeps no per-variable state, but {} slot values were given \
                 (first: {:?} of {:?})",
                state.len(),
                state[0].1,
                state[0].0
            )));
        }
        let mut slots = Slots::default();
        let mut entries = state.into_iter().peekable();
        while let Some((name, slot, first)) = entries.next() {
            if slots.names.contains(&name) {
                return Err(mismatch(format!(
                    "the slots of variable {name:?} are given twice or not together"
                )));
            }
            let shape = first.shape().to_vec();
            let mut got = vec![slot];
            let mut bufs = vec![first];
            while got.len() < expected.len() {
                match entries.next_if(|(n, _, _)| *n == name) {
                    Some((_, slot, t)) => {
                        if t.shape() != shape.as_slice() {
                            return Err(mismatch(format!(
                                "variable {name:?}: slot {slot:?} has shape {:?}, slot {:?} has \
                                 {shape:?}",
                                t.shape(),
                                got[0]
                            )));
                        }
                        got.push(slot);
                        bufs.push(t);
                    }
                    None => break,
                }
            }
            if got.len() != expected.len() || got.iter().zip(expected).any(|(g, e)| g != e) {
                return Err(mismatch(format!(
                    "variable {name:?}: expected slots {expected:?}, got {got:?}"
                )));
            }
            for (slot, t) in got.iter().zip(&bufs) {
                let host;
                let values = if t.device().is_cpu() {
                    t.as_slice()?
                } else {
                    host = t.to_device(mp_core::Device::Cpu)?;
                    host.as_slice()?
                };
                if let Some(problem) = domain(slot).first_outside(values) {
                    return Err(Error::InvalidSlot {
                        optimizer,
                        variable: name,
                        slot: slot.clone(),
                        problem,
                    });
                }
            }
            slots.names.push(name);
            slots.shapes.push(shape);
            slots.buffers.push(bufs);
        }
        Ok(slots)
    }

    pub(crate) fn state(
        &self,
        slot_names: &[&'static str],
    ) -> Vec<(String, &'static str, &Tensor<F32>)> {
        let mut out = vec![];
        for (name, bufs) in self.names.iter().zip(&self.buffers) {
            for (slot, t) in slot_names.iter().zip(bufs) {
                out.push((name.clone(), *slot, t));
            }
        }
        out
    }
}

pub(crate) fn check_rate(optimizer: &'static str, what: &str, v: f32) -> Result<f32> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(Error::InvalidHyperparameter {
            optimizer,
            what: format!("{what} must be finite and non-negative, got {v:?}"),
        })
    }
}

pub(crate) fn check_unit(
    optimizer: &'static str,
    what: &str,
    v: f64,
    closed_top: bool,
) -> Result<f64> {
    let ok = v.is_finite() && v >= 0.0 && if closed_top { v <= 1.0 } else { v < 1.0 };
    if ok {
        Ok(v)
    } else {
        Err(Error::InvalidHyperparameter {
            optimizer,
            what: format!(
                "{what} must be in [0, 1{}, got {v:?}",
                if closed_top { "]" } else { ")" }
            ),
        })
    }
}

pub(crate) fn check_epsilon(optimizer: &'static str, v: f32) -> Result<f32> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(Error::InvalidHyperparameter {
            optimizer,
            what: format!("epsilon must be finite and positive, got {v:?}"),
        })
    }
}

/// The per-rule part of an optimizer (burn's `SimpleOptimizer`): its name, the slots it keeps
/// per variable, its hyperparameters and one variable's update. [`Optim`] does what every
/// optimizer shares: the learning rate, the step count, the slots (created at the first step,
/// checked at every later one, saved and restored).
pub trait UpdateRule: Clone + std::fmt::Debug + Send {
    /// The Keras name (`SGD`, `RMSprop`, `Adam`).
    const NAME: &'static str;

    /// The slots each variable keeps, in order (they may depend on the configuration).
    fn slots(&self) -> &'static [&'static str];

    /// The hyperparameters other than the learning rate, as `(name, value)`.
    fn config(&self) -> Vec<(&'static str, f64)>;

    /// One variable's update at step `t` (counted from 1) with learning rate `lr`; `path` is
    /// the variable's path and `slots` its buffers in [`UpdateRule::slots`] order.
    fn update(
        &self,
        path: &str,
        lr: f32,
        t: u64,
        var: &mut Tensor<F32>,
        grad: &Tensor<F32>,
        slots: &mut [Tensor<F32>],
    ) -> Result<()>;

    /// Which new values [`UpdateRule::update`] with the same arguments would make NaN or
    /// infinite (the variable's, each slot's in order), computed with the update's own
    /// arithmetic and writing nothing; `None` when this rule cannot check on the variable's
    /// device (its update is then written unchecked). [`Optim`] runs it over every variable
    /// before writing any.
    ///
    /// The default runs `update` on copies of the variable and its slots and checks them: exact
    /// for any rule, on any device, at the cost of the copies. The built-in rules override it
    /// with a fused checking kernel on the CPU that reads the buffers once and copies nothing.
    fn check(
        &self,
        path: &str,
        lr: f32,
        t: u64,
        var: &Tensor<F32>,
        grad: &Tensor<F32>,
        slots: &[Tensor<F32>],
    ) -> Result<Option<NonFiniteOutputs>> {
        let mut new_var = var.clone();
        let mut new_slots = slots.to_vec();
        self.update(path, lr, t, &mut new_var, grad, &mut new_slots)?;
        let finite = |t: &Tensor<F32>| -> Result<bool> {
            let mut flag = ops::Finite::new(t.device())?;
            ops::check_finite(t, &mut flag)?;
            Ok(flag.get()?)
        };
        let var_bad = !finite(&new_var)?;
        let slots_bad = new_slots
            .iter()
            .map(|s| finite(s).map(|ok| !ok))
            .collect::<Result<Vec<bool>>>()?;
        Ok(Some(NonFiniteOutputs::from_flags(var_bad, slots_bad)))
    }

    /// The values slot `slot` may hold (see [`Optimizer::slot_domain`]): finite unless the
    /// rule says more.
    fn slot_domain(&self, slot: &str) -> Domain {
        let _ = slot;
        Domain::Finite
    }
}

/// How an optimizer clips the gradients it is given before updating (Keras's `clipvalue`,
/// `clipnorm` and `global_clipnorm`, of which at most one may be set).
///
/// Under a [`LossScaleOptimizer`](crate::LossScaleOptimizer) the inner optimizer only sees
/// unscaled gradients, and only when every one is finite: the clip threshold is in the units
/// of the real gradients, whatever the loss scale, and a non-finite step is skipped before
/// clipping could turn its infinities into finite numbers. (PyTorch users must call
/// `GradScaler.unscale_` themselves before `clip_grad_norm_` for the same effect.)
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Clip {
    /// No clipping.
    #[default]
    None,
    /// Each element into `[-c, c]`.
    Value(f32),
    /// Each variable's gradient scaled down to L2 norm `c` when its norm is larger.
    Norm(f32),
    /// All gradients scaled by one factor so that their joint L2 norm is at most `c`
    /// (`torch.nn.utils.clip_grad_norm_`, Keras's `global_clipnorm`).
    GlobalNorm(f32),
}

impl Clip {
    fn validate(self, optimizer: &'static str) -> Result<Clip> {
        let (what, c) = match self {
            Clip::None => return Ok(self),
            Clip::Value(c) => ("clipvalue", c),
            Clip::Norm(c) => ("clipnorm", c),
            Clip::GlobalNorm(c) => ("global_clipnorm", c),
        };
        if c.is_finite() && c > 0.0 {
            Ok(self)
        } else {
            Err(Error::InvalidHyperparameter {
                optimizer,
                what: format!("{what} must be finite and positive, got {c:?}"),
            })
        }
    }

    /// Clips the gradients of `vars` in place and returns their global L2 norm before clipping
    /// (computed for the norm clips only).
    fn apply(self, vars: &mut dyn VariableSet) -> Result<Option<f64>> {
        let shrink = |g: &mut Tensor<F32>, norm: f64, c: f32| -> Result<()> {
            if norm > f64::from(c) {
                ops::scale(g, (f64::from(c) / norm) as f32)?;
            }
            Ok(())
        };
        match self {
            Clip::None => Ok(None),
            Clip::Value(c) => {
                vars.for_each_variable(&mut |_, v| Ok(ops::clip(v.grad_mut(), -c, c)?))?;
                Ok(None)
            }
            Clip::Norm(c) => {
                let mut total = 0.0;
                vars.for_each_variable(&mut |_, v| {
                    let sq = ops::sum_squares(v.grad())?;
                    total += sq;
                    shrink(v.grad_mut(), sq.sqrt(), c)
                })?;
                Ok(Some(total.sqrt()))
            }
            Clip::GlobalNorm(c) => {
                let mut total = 0.0;
                vars.for_each_variable(&mut |_, v| {
                    total += ops::sum_squares(v.grad())?;
                    Ok(())
                })?;
                let norm = total.sqrt();
                vars.for_each_variable(&mut |_, v| shrink(v.grad_mut(), norm, c))?;
                Ok(Some(norm))
            }
        }
    }
}

/// An optimizer made of an [`UpdateRule`]: [`Sgd`], [`RmsProp`], [`Adam`] and [`AdamW`] are
/// this with their rules.
#[derive(Debug, Clone)]
pub struct Optim<R: UpdateRule> {
    rule: R,
    learning_rate: f32,
    iterations: u64,
    slots: Slots,
    clip: Clip,
    gradient_norm: Option<f64>,
}

impl<R: UpdateRule> Optim<R> {
    /// `rule` with learning rate `learning_rate` (finite and non-negative).
    pub fn with_rule(rule: R, learning_rate: f32) -> Result<Self> {
        Ok(Optim {
            rule,
            learning_rate: check_rate(R::NAME, "learning_rate", learning_rate)?,
            iterations: 0,
            slots: Slots::default(),
            clip: Clip::None,
            gradient_norm: None,
        })
    }

    /// The update rule and its hyperparameters.
    pub fn rule(&self) -> &R {
        &self.rule
    }

    /// Clips the gradients before every update ([`Clip`]).
    ///
    /// # Errors
    /// A threshold that is not finite and positive, named.
    pub fn with_clip(mut self, clip: Clip) -> Result<Self> {
        self.clip = clip.validate(R::NAME)?;
        Ok(self)
    }

    /// The clipping in force.
    pub fn clip(&self) -> Clip {
        self.clip
    }

    /// The global L2 norm of the gradients of the last update, before clipping (with
    /// [`Clip::Norm`] or [`Clip::GlobalNorm`]; `None` otherwise or before the first update).
    pub fn gradient_norm(&self) -> Option<f64> {
        self.gradient_norm
    }
}

impl<R: UpdateRule> Optimizer for Optim<R> {
    fn name(&self) -> &'static str {
        R::NAME
    }
    fn learning_rate(&self) -> f32 {
        self.learning_rate
    }
    fn set_learning_rate(&mut self, learning_rate: f32) -> Result<()> {
        self.learning_rate = check_rate(R::NAME, "learning_rate", learning_rate)?;
        Ok(())
    }
    fn iterations(&self) -> u64 {
        self.iterations
    }
    fn apply_gradients(&mut self, vars: &mut dyn VariableSet) -> Result<Update> {
        let before = self.slots.prepare(R::NAME, self.rule.slots().len(), vars)?;
        Ok(match self.check_then_update(vars)? {
            None => {
                self.iterations += 1;
                Update::Applied
            }
            Some(skipped) => {
                // Nothing was written: a skipped step leaves the slots as they were (none
                // after a skipped first step), whatever the variable set.
                if let Some(before) = before {
                    self.slots = before;
                }
                Update::Skipped(skipped)
            }
        })
    }
    fn state(&self) -> Vec<(String, &'static str, &Tensor<F32>)> {
        self.slots.state(self.rule.slots())
    }
    fn slot_domain(&self, slot: &str) -> Domain {
        self.rule.slot_domain(slot)
    }
    fn config(&self) -> Vec<(&'static str, f64)> {
        self.rule.config()
    }
    fn load_state(
        &mut self,
        iterations: u64,
        state: Vec<(String, String, Tensor<F32>)>,
    ) -> Result<()> {
        let domain = |slot: &str| self.rule.slot_domain(slot);
        self.slots = Slots::from_saved(R::NAME, self.rule.slots(), &domain, iterations, state)?;
        self.iterations = iterations;
        Ok(())
    }
}

impl<R: UpdateRule> Optim<R> {
    /// Clips the gradients, checks that every variable's update would be finite, and writes
    /// them all if so; returns the first update that would not be (nothing written then).
    fn check_then_update(&mut self, vars: &mut dyn VariableSet) -> Result<Option<NonFiniteUpdate>> {
        let slots = self.rule.slots();
        self.gradient_norm = self.clip.apply(vars)?;
        let (rule, lr, t) = (&self.rule, self.learning_rate, self.iterations + 1);
        let expect = |state: &[Tensor<F32>]| {
            if state.len() == slots.len() {
                Ok(())
            } else {
                Err(Error::StateMismatch {
                    optimizer: R::NAME,
                    what: format!("expected the slots {slots:?}, found {}", state.len()),
                })
            }
        };
        // 1. Every new value, computed and checked without writing.
        let mut first = None;
        self.slots.update(vars, &mut |path, w, g, state| {
            expect(state)?;
            if first.is_some() {
                return Ok(());
            }
            if let Some(bad) = rule.check(path, lr, t, w, g, state)?
                && !bad.all_finite()
            {
                first = Some(NonFiniteUpdate {
                    optimizer: R::NAME,
                    variable: path.to_string(),
                    value: bad.variable(),
                    slots: (0..slots.len())
                        .filter(|&i| bad.state(i))
                        .map(|i| slots[i])
                        .collect(),
                });
            }
            Ok(())
        })?;
        if first.is_some() {
            return Ok(first);
        }
        // 2. All finite: the same arithmetic again, written.
        self.slots.update(vars, &mut |path, w, g, state| {
            expect(state)?;
            rule.update(path, lr, t, w, g, state)
        })?;
        Ok(None)
    }
}

/// Stochastic gradient descent with optional (Nesterov) momentum, as Keras's `SGD`.
///
/// Without momentum `w -= lr * g`; with it `m = momentum * m - lr * g`, then `w += m`
/// (Nesterov: `w += momentum * m - lr * g`).
pub type Sgd = Optim<SgdRule>;

/// The rule of [`Sgd`].
#[derive(Debug, Clone, PartialEq)]
pub struct SgdRule {
    momentum: f32,
    nesterov: bool,
}

impl Sgd {
    /// SGD with learning rate `learning_rate` and no momentum.
    pub fn new(learning_rate: f32) -> Result<Self> {
        Optim::with_rule(
            SgdRule {
                momentum: 0.0,
                nesterov: false,
            },
            learning_rate,
        )
    }

    /// Sets the momentum (in [0, 1)).
    pub fn with_momentum(mut self, momentum: f32) -> Result<Self> {
        self.rule.momentum = check_unit("SGD", "momentum", momentum as f64, false)? as f32;
        Ok(self)
    }

    /// Uses Nesterov momentum.
    pub fn with_nesterov(mut self, nesterov: bool) -> Self {
        self.rule.nesterov = nesterov;
        self
    }
}

impl Default for Sgd {
    /// Keras's defaults: learning rate 0.01, no momentum.
    fn default() -> Self {
        Sgd::new(0.01).expect("valid defaults")
    }
}

impl UpdateRule for SgdRule {
    const NAME: &'static str = "SGD";
    fn slots(&self) -> &'static [&'static str] {
        if self.momentum > 0.0 {
            &["momentum"]
        } else {
            &[]
        }
    }
    fn config(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("momentum", f64::from(self.momentum)),
            ("nesterov", f64::from(u8::from(self.nesterov))),
        ]
    }
    fn update(
        &self,
        _path: &str,
        lr: f32,
        _t: u64,
        var: &mut Tensor<F32>,
        grad: &Tensor<F32>,
        slots: &mut [Tensor<F32>],
    ) -> Result<()> {
        Ok(ops::sgd_update(
            var,
            grad,
            slots.first_mut(),
            self.params(lr),
            None,
        )?)
    }
    fn check(
        &self,
        _path: &str,
        lr: f32,
        _t: u64,
        var: &Tensor<F32>,
        grad: &Tensor<F32>,
        slots: &[Tensor<F32>],
    ) -> Result<Option<NonFiniteOutputs>> {
        if !var.device().is_cpu() {
            return Ok(None);
        }
        let p = self.params(lr);
        Ok(Some(ops::sgd_update_check(var, grad, slots.first(), p)?))
    }
}

impl SgdRule {
    fn params(&self, lr: f32) -> mp_kernels::optim::SgdParams {
        mp_kernels::optim::SgdParams {
            lr,
            momentum: self.momentum,
            nesterov: self.nesterov,
        }
    }
}

/// RMSprop as Keras's (not centered): `v = rho * v + (1 - rho) * g²`,
/// `inc = lr * g / sqrt(v + epsilon)` (epsilon inside the square root, as Keras), then
/// `w -= inc`, or with momentum `mom = momentum * mom + inc; w -= mom`.
pub type RmsProp = Optim<RmsPropRule>;

/// The rule of [`RmsProp`].
#[derive(Debug, Clone, PartialEq)]
pub struct RmsPropRule {
    /// Kept as the float64 the user gave, so `1 - rho` is computed before rounding (as Keras).
    rho: f64,
    momentum: f32,
    epsilon: f32,
}

impl RmsProp {
    /// RMSprop with the Keras defaults and learning rate `learning_rate`.
    pub fn new(learning_rate: f32) -> Result<Self> {
        Optim::with_rule(
            RmsPropRule {
                rho: 0.9,
                momentum: 0.0,
                epsilon: 1e-7,
            },
            learning_rate,
        )
    }

    /// Sets rho, the decay of the squared-gradient average (in [0, 1)).
    pub fn with_rho(mut self, rho: f64) -> Result<Self> {
        self.rule.rho = check_unit("RMSprop", "rho", rho, false)?;
        Ok(self)
    }

    /// Sets the momentum (in [0, 1)).
    pub fn with_momentum(mut self, momentum: f32) -> Result<Self> {
        self.rule.momentum = check_unit("RMSprop", "momentum", momentum as f64, false)? as f32;
        Ok(self)
    }

    /// Sets epsilon (finite, positive).
    pub fn with_epsilon(mut self, epsilon: f32) -> Result<Self> {
        self.rule.epsilon = check_epsilon("RMSprop", epsilon)?;
        Ok(self)
    }
}

impl Default for RmsProp {
    /// Keras's defaults: learning rate 0.001, rho 0.9, momentum 0, epsilon 1e-7.
    fn default() -> Self {
        RmsProp::new(0.001).expect("valid defaults")
    }
}

impl UpdateRule for RmsPropRule {
    const NAME: &'static str = "RMSprop";
    fn slots(&self) -> &'static [&'static str] {
        if self.momentum > 0.0 {
            &["velocity", "momentum"]
        } else {
            &["velocity"]
        }
    }
    fn config(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("rho", self.rho),
            ("momentum", f64::from(self.momentum)),
            ("epsilon", f64::from(self.epsilon)),
        ]
    }
    fn update(
        &self,
        _path: &str,
        lr: f32,
        _t: u64,
        var: &mut Tensor<F32>,
        grad: &Tensor<F32>,
        slots: &mut [Tensor<F32>],
    ) -> Result<()> {
        let Some((v, rest)) = slots.split_first_mut() else {
            return Err(Self::no_velocity());
        };
        let p = self.params(lr);
        Ok(ops::rmsprop_update(
            var,
            grad,
            v,
            rest.first_mut(),
            p,
            None,
        )?)
    }
    fn check(
        &self,
        _path: &str,
        lr: f32,
        _t: u64,
        var: &Tensor<F32>,
        grad: &Tensor<F32>,
        slots: &[Tensor<F32>],
    ) -> Result<Option<NonFiniteOutputs>> {
        let Some((v, rest)) = slots.split_first() else {
            return Err(Self::no_velocity());
        };
        if !var.device().is_cpu() {
            return Ok(None);
        }
        let p = self.params(lr);
        Ok(Some(ops::rmsprop_update_check(
            var,
            grad,
            v,
            rest.first(),
            p,
        )?))
    }
    fn slot_domain(&self, slot: &str) -> Domain {
        // The velocity is the running mean of the squared gradients.
        if slot == "velocity" {
            Domain::NonNegative
        } else {
            Domain::Finite
        }
    }
}

impl RmsPropRule {
    fn params(&self, lr: f32) -> mp_kernels::optim::RmspropParams {
        mp_kernels::optim::RmspropParams::new(lr, self.rho, self.momentum, self.epsilon)
    }

    fn no_velocity() -> Error {
        Error::StateMismatch {
            optimizer: Self::NAME,
            what: "the velocity slot is missing".into(),
        }
    }
}

/// Adam as Keras's: `m += (g - m)(1 - beta_1)`, `v += (g² - v)(1 - beta_2)`,
/// `w -= alpha * m / (sqrt(v) + epsilon)` with `alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)`
/// computed in float64.
pub type Adam = Optim<AdamRule>;

/// The rule of [`Adam`].
#[derive(Debug, Clone, PartialEq)]
pub struct AdamRule {
    /// Betas and epsilon kept as the float64 the user gave; the kernel's constants are
    /// computed from them in float64 and rounded once (as Keras).
    beta_1: f64,
    beta_2: f64,
    epsilon: f64,
}

impl Adam {
    /// Adam with the Keras defaults and learning rate `learning_rate`.
    pub fn new(learning_rate: f32) -> Result<Self> {
        Optim::with_rule(
            AdamRule {
                beta_1: 0.9,
                beta_2: 0.999,
                epsilon: 1e-7,
            },
            learning_rate,
        )
    }

    /// Sets beta_1 and beta_2 (each in [0, 1)).
    pub fn with_betas(mut self, beta_1: f64, beta_2: f64) -> Result<Self> {
        self.rule.beta_1 = check_unit("Adam", "beta_1", beta_1, false)?;
        self.rule.beta_2 = check_unit("Adam", "beta_2", beta_2, false)?;
        Ok(self)
    }

    /// Sets epsilon (finite, positive).
    pub fn with_epsilon(mut self, epsilon: f64) -> Result<Self> {
        self.rule.epsilon = check_epsilon("Adam", epsilon as f32)? as f64;
        Ok(self)
    }
}

impl Default for Adam {
    /// Keras's defaults: 0.001, 0.9, 0.999, 1e-7.
    fn default() -> Self {
        Adam::new(0.001).expect("valid defaults")
    }
}

impl UpdateRule for AdamRule {
    const NAME: &'static str = "Adam";
    fn slots(&self) -> &'static [&'static str] {
        &["m", "v"]
    }
    fn config(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("beta_1", self.beta_1),
            ("beta_2", self.beta_2),
            ("epsilon", self.epsilon),
        ]
    }
    fn update(
        &self,
        _path: &str,
        lr: f32,
        t: u64,
        var: &mut Tensor<F32>,
        grad: &Tensor<F32>,
        slots: &mut [Tensor<F32>],
    ) -> Result<()> {
        self.step(Self::NAME, self.params(0.0, lr, t), var, grad, slots)
    }
    fn check(
        &self,
        _path: &str,
        lr: f32,
        t: u64,
        var: &Tensor<F32>,
        grad: &Tensor<F32>,
        slots: &[Tensor<F32>],
    ) -> Result<Option<NonFiniteOutputs>> {
        Self::check_step(Self::NAME, self.params(0.0, lr, t), var, grad, slots)
    }
    fn slot_domain(&self, slot: &str) -> Domain {
        adam_slot_domain(slot)
    }
}

/// `v` is the running mean of the squared gradients.
fn adam_slot_domain(slot: &str) -> Domain {
    if slot == "v" {
        Domain::NonNegative
    } else {
        Domain::Finite
    }
}

impl AdamRule {
    /// The kernel's parameters of step `t`, with decoupled weight decay `weight_decay` when it
    /// is not 0.
    fn params(&self, weight_decay: f32, lr: f32, t: u64) -> mp_kernels::optim::AdamParams {
        mp_kernels::optim::AdamParams::new(lr as f64, self.beta_1, self.beta_2, self.epsilon, t)
            .with_weight_decay(weight_decay)
    }

    /// One Adam step with parameters `p`.
    fn step(
        &self,
        optimizer: &'static str,
        p: mp_kernels::optim::AdamParams,
        var: &mut Tensor<F32>,
        grad: &Tensor<F32>,
        slots: &mut [Tensor<F32>],
    ) -> Result<()> {
        let [m, v] = slots else {
            return Err(Self::no_moments(optimizer, slots.len()));
        };
        Ok(ops::adam_update(var, grad, m, v, p, None)?)
    }

    /// The checking twin of [`AdamRule::step`] (`None` off the CPU).
    fn check_step(
        optimizer: &'static str,
        p: mp_kernels::optim::AdamParams,
        var: &Tensor<F32>,
        grad: &Tensor<F32>,
        slots: &[Tensor<F32>],
    ) -> Result<Option<NonFiniteOutputs>> {
        let [m, v] = slots else {
            return Err(Self::no_moments(optimizer, slots.len()));
        };
        if !var.device().is_cpu() {
            return Ok(None);
        }
        Ok(Some(ops::adam_update_check(var, grad, m, v, p)?))
    }

    fn no_moments(optimizer: &'static str, found: usize) -> Error {
        Error::StateMismatch {
            optimizer,
            what: format!("expected the slots m and v, found {found}"),
        }
    }
}

/// Adam with decoupled weight decay, as Keras's `AdamW` (Loshchilov & Hutter): before each
/// Adam update, every variable not excluded is decayed as `w = w - w * weight_decay * lr`,
/// with the learning rate of that step (a schedule's, when one drives it). The decay is in
/// the same fused kernel pass as the update. A step the loss-scale optimizer skips decays
/// nothing.
///
/// Keras's defaults: learning rate 0.001, weight decay 0.004, betas 0.9 and 0.999, epsilon
/// 1e-7. PyTorch's `AdamW` defaults to weight decay 0.01 and epsilon 1e-8.
///
/// ```
/// use mp_optim::AdamW;
/// // Decay the kernels only: biases and normalisation parameters keep their values.
/// let opt = AdamW::new(1e-3)?
///     .with_weight_decay(0.05)?
///     .exclude_from_weight_decay(&["bias", "gamma", "beta"]);
/// assert!(opt.rule().decays("dense_1/kernel"));
/// assert!(!opt.rule().decays("dense_1/bias"));
/// # Ok::<(), mp_optim::Error>(())
/// ```
pub type AdamW = Optim<AdamWRule>;

/// The rule of [`AdamW`].
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWRule {
    adam: AdamRule,
    weight_decay: f32,
    exclude: Vec<String>,
}

impl AdamWRule {
    /// Whether the variable at `path` is decayed: no exclusion is a substring of its path.
    pub fn decays(&self, path: &str) -> bool {
        self.weight_decay != 0.0 && !self.exclude.iter().any(|e| path.contains(e.as_str()))
    }

    /// The decoupled weight decay.
    pub fn weight_decay(&self) -> f32 {
        self.weight_decay
    }
}

impl AdamW {
    /// AdamW with Keras's defaults and learning rate `learning_rate`.
    pub fn new(learning_rate: f32) -> Result<Self> {
        let Optim { rule: adam, .. } = Adam::new(learning_rate)?;
        Optim::with_rule(
            AdamWRule {
                adam,
                weight_decay: 0.004,
                exclude: vec![],
            },
            learning_rate,
        )
    }

    /// Sets the weight decay (finite, non-negative; 0 makes this Adam).
    pub fn with_weight_decay(mut self, weight_decay: f32) -> Result<Self> {
        self.rule.weight_decay = check_rate("AdamW", "weight_decay", weight_decay)?;
        Ok(self)
    }

    /// Leaves out of the decay every variable whose path contains one of `names` (Keras's
    /// `exclude_from_weight_decay(var_names=...)`): `["bias", "gamma", "beta"]` keeps biases
    /// and normalisation parameters undecayed, as BERT and ViT recipes do.
    pub fn exclude_from_weight_decay(mut self, names: &[&str]) -> Self {
        self.rule
            .exclude
            .extend(names.iter().map(|n| (*n).to_string()));
        self
    }

    /// Sets beta_1 and beta_2 (each in [0, 1)).
    pub fn with_betas(mut self, beta_1: f64, beta_2: f64) -> Result<Self> {
        self.rule.adam.beta_1 = check_unit("AdamW", "beta_1", beta_1, false)?;
        self.rule.adam.beta_2 = check_unit("AdamW", "beta_2", beta_2, false)?;
        Ok(self)
    }

    /// Sets epsilon (finite, positive).
    pub fn with_epsilon(mut self, epsilon: f64) -> Result<Self> {
        self.rule.adam.epsilon = check_epsilon("AdamW", epsilon as f32)? as f64;
        Ok(self)
    }
}

impl Default for AdamW {
    /// Keras's defaults: 0.001, weight decay 0.004, 0.9, 0.999, 1e-7.
    fn default() -> Self {
        AdamW::new(0.001).expect("valid defaults")
    }
}

impl UpdateRule for AdamWRule {
    const NAME: &'static str = "AdamW";
    fn slots(&self) -> &'static [&'static str] {
        &["m", "v"]
    }
    fn config(&self) -> Vec<(&'static str, f64)> {
        let mut c = self.adam.config();
        c.push(("weight_decay", f64::from(self.weight_decay)));
        c
    }
    fn update(
        &self,
        path: &str,
        lr: f32,
        t: u64,
        var: &mut Tensor<F32>,
        grad: &Tensor<F32>,
        slots: &mut [Tensor<F32>],
    ) -> Result<()> {
        let p = self.adam.params(self.decay_of(path), lr, t);
        self.adam.step(Self::NAME, p, var, grad, slots)
    }
    fn check(
        &self,
        path: &str,
        lr: f32,
        t: u64,
        var: &Tensor<F32>,
        grad: &Tensor<F32>,
        slots: &[Tensor<F32>],
    ) -> Result<Option<NonFiniteOutputs>> {
        let p = self.adam.params(self.decay_of(path), lr, t);
        AdamRule::check_step(Self::NAME, p, var, grad, slots)
    }
    fn slot_domain(&self, slot: &str) -> Domain {
        adam_slot_domain(slot)
    }
}

impl AdamWRule {
    /// The weight decay applied to the variable at `path` (0 when excluded).
    fn decay_of(&self, path: &str) -> f32 {
        if self.decays(path) {
            self.weight_decay
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Saved = Vec<(String, String, Tensor<F32>)>;

    fn vars() -> Vec<Variable> {
        let w = Tensor::from_vec(&[2, 2], vec![0.5, -1.0, 2.0, 0.25]).unwrap();
        let b = Tensor::from_vec(&[2], vec![0.1, -0.2]).unwrap();
        vec![
            Variable::new("d/kernel", w).unwrap(),
            Variable::new("d/bias", b).unwrap(),
        ]
    }

    #[allow(
        clippy::ptr_arg,
        reason = "a Vec is a VariableSet; a slice cannot be made dyn"
    )]
    fn step(opt: &mut dyn Optimizer, vars: &mut Vec<Variable>, k: f32) {
        for v in vars.iter_mut() {
            let n = v.shape().iter().product::<usize>();
            let g: Vec<f32> = (0..n).map(|i| (i as f32 + k) * 0.1 - 0.15).collect();
            v.grad_mut().copy_from_slice(&g).unwrap();
        }
        opt.apply_gradients(vars).unwrap();
    }

    fn saved(opt: &dyn Optimizer) -> Saved {
        opt.state()
            .into_iter()
            .map(|(n, s, t)| (n, s.to_string(), t.clone()))
            .collect()
    }

    fn bits(vars: &[Variable]) -> Vec<u32> {
        vars.iter()
            .flat_map(|v| v.value().as_slice().unwrap().iter().map(|x| x.to_bits()))
            .collect()
    }

    fn resumes_exactly(make: &dyn Fn() -> Box<dyn Optimizer>) {
        let mut a = make();
        let mut va = vars();
        for k in 0..3 {
            step(a.as_mut(), &mut va, k as f32);
        }
        let mut b = make();
        let mut vb = va.clone();
        b.load_state(a.iterations(), saved(a.as_ref())).unwrap();
        assert_eq!(b.iterations(), 3);
        for k in 3..6 {
            step(a.as_mut(), &mut va, k as f32);
            step(b.as_mut(), &mut vb, k as f32);
        }
        assert_eq!(bits(&va), bits(&vb), "{}", a.name());
        assert_eq!(b.iterations(), a.iterations());
    }

    #[test]
    fn every_optimizer_resumes_bit_exactly() {
        resumes_exactly(&|| Box::new(Adam::default()));
        resumes_exactly(&|| Box::new(AdamW::default().exclude_from_weight_decay(&["bias"])));
        resumes_exactly(&|| Box::new(RmsProp::default().with_momentum(0.5).unwrap()));
        resumes_exactly(&|| Box::new(RmsProp::default()));
        resumes_exactly(&|| Box::new(Sgd::new(0.1).unwrap().with_momentum(0.9).unwrap()));
        resumes_exactly(&|| Box::new(Sgd::new(0.1).unwrap()));
    }

    #[test]
    fn bad_saved_state_is_refused_and_changes_nothing() {
        let mut a = Adam::default();
        let mut va = vars();
        step(&mut a, &mut va, 0.0);
        let good = saved(&a);
        let before = (a.iterations(), saved(&a));
        let cases: Vec<(Saved, &str)> = vec![
            (good[..3].to_vec(), "expected slots"),
            (
                good.iter()
                    .cloned()
                    .map(|(n, s, t)| (n, if s == "v" { "x".into() } else { s }, t))
                    .collect(),
                "expected slots",
            ),
            (
                [good.clone(), good[..2].to_vec()].concat(),
                "given twice or not together",
            ),
            (
                {
                    let mut g = good.clone();
                    g[1].2 = Tensor::zeros(&[4]).unwrap();
                    g
                },
                "has shape",
            ),
            (vec![], "no slot values"),
        ];
        for (bad, expect) in cases {
            let e = a.load_state(7, bad).unwrap_err().to_string();
            assert!(e.contains(expect), "{e}");
            assert_eq!(a.iterations(), before.0);
            let now = saved(&a);
            assert_eq!(now.len(), before.1.len());
            for (x, y) in now.iter().zip(&before.1) {
                assert_eq!((&x.0, &x.1), (&y.0, &y.1));
                assert_eq!(x.2.as_slice().unwrap(), y.2.as_slice().unwrap());
            }
        }
        let mut plain = Sgd::new(0.1).unwrap();
        let e = plain.load_state(1, good).unwrap_err().to_string();
        assert!(e.contains("keeps no per-variable state"), "{e}");
        // Before the first step there is no state: an empty one restores that.
        let mut fresh = Adam::default();
        fresh.load_state(0, vec![]).unwrap();
        assert!(fresh.state().is_empty());
        assert_eq!(Adam::default().config()[0], ("beta_1", 0.9));
    }
}
