//! `LossScaleOptimizer`: loss scaling around any optimizer, as Keras's.

use mp_core::{DynamicLossScale, F32, FixedLossScale, LossScale, Tensor};

use crate::error::{Error, Result};
use crate::optimizer::{NonFiniteUpdate, Optimizer, Update, VariableSet};
use mp_kernels::ops;

/// The default number of consecutive skipped steps at the loss-scale floor after which
/// [`LossScaleOptimizer::apply_gradients`] stops training with
/// [`Error::LossScaleCollapsed`].
pub const DEFAULT_MAX_SKIPS_AT_FLOOR: u64 = 20;

/// What the unscale pass found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GradientCheck {
    /// Whether every gradient value was finite.
    pub all_finite: bool,
    /// The first variable (in visiting order) with a non-finite gradient.
    pub first_nonfinite: Option<String>,
}

/// What one call of [`LossScaleOptimizer::apply_gradients`] did.
#[must_use = "a step may have been skipped: check `applied`"]
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutcome {
    /// Whether the update was applied (false: skipped, variables and state untouched).
    pub applied: bool,
    /// The loss scale this step's gradients were scaled by.
    pub scale_before: f32,
    /// The loss scale for the next step.
    pub scale_after: f32,
    /// The first variable whose gradient was non-finite, when skipped for that.
    pub first_nonfinite: Option<String>,
    /// When every gradient was finite but the update would have written NaN or infinity into a
    /// variable or a slot (see [`Optimizer::apply_gradients`]): which, and skipped for that.
    /// The loss scale does not change then.
    pub nonfinite_update: Option<NonFiniteUpdate>,
}

/// Everything loss scaling changes or is configured with: what a checkpoint saves so that a
/// resumed run scales, skips and stops exactly as the uninterrupted one would.
#[derive(Clone, Debug, PartialEq)]
pub struct ScalingState {
    /// The loss scale: its whole configuration and, when dynamic, its current scale and
    /// good-step count.
    pub loss_scale: LossScale,
    /// Steps whose update was applied: the inner optimizer's `iterations`.
    pub applied: u64,
    /// Steps skipped because a gradient was non-finite.
    pub skipped: u64,
    /// Consecutive skipped steps with the scale at its floor.
    pub skips_at_floor: u64,
    /// How many such steps stop training.
    pub max_skips_at_floor: u64,
}

impl ScalingState {
    /// Checks that a [`LossScaleOptimizer`] could have been in this state: a valid loss-scale
    /// configuration and state, a limit of at least 1, no more skips at the floor than skips.
    pub fn validate(&self) -> Result<()> {
        match &self.loss_scale {
            LossScale::Fixed(f) => {
                FixedLossScale::new(f.scale())?;
            }
            LossScale::Dynamic(d) => {
                DynamicLossScale::from_config(*d.config())?.restore(d.state())?;
            }
        }
        let bad = |what: String| {
            Err(Error::InvalidHyperparameter {
                optimizer: "LossScaleOptimizer",
                what,
            })
        };
        if self.max_skips_at_floor == 0 {
            return bad("max_skips_at_floor must be at least 1, got 0".into());
        }
        if self.skips_at_floor > self.skipped {
            return bad(format!(
                "{} skips at the floor but only {} skipped steps",
                self.skips_at_floor, self.skipped
            ));
        }
        Ok(())
    }
}

/// Wraps an optimizer with loss scaling, like Keras's `LossScaleOptimizer`.
///
/// A training step under loss scaling:
///
/// 1. [`get_scaled_loss`](Self::get_scaled_loss) (or multiply the loss gradient that starts
///    backward by [`loss_scale`](Self::loss_scale), which is what a tape-free loop does);
/// 2. backward produces scaled float32 gradients;
/// 3. [`get_unscaled_gradients`](Self::get_unscaled_gradients) divides them by the scale and
///    checks that every value is finite, in one fused pass per variable;
/// 4. [`apply_gradients`](Self::apply_gradients) applies the inner optimizer if they were all
///    finite, or skips the step — variables and optimizer state bit-for-bit unchanged — and
///    updates the scale either way.
///
/// **Skipped steps do not advance the inner optimizer's `iterations`** (as Keras 3; tf.keras
/// advances it), so Adam's bias correction and learning-rate schedules count applied updates.
/// [`applied_steps`](Self::applied_steps) is that count; the wrapper counts
/// [`skipped_steps`](Self::skipped_steps) itself.
///
/// **A non-finite update is not a non-finite gradient.** When every gradient is finite but the
/// inner optimizer refuses to write an update that would be NaN or infinite (Adam's `v`
/// overflowing on a gradient of 1e30; see [`Optimizer::apply_gradients`]), the step is skipped
/// with everything bit-identical, and the loss scale is left exactly as it was: not halved (the
/// scale did not cause it, and a smaller scale would not cure it) and its good-step count
/// neither advanced nor reset; the skip counts neither as applied nor in `skipped_steps`, nor
/// toward [`max_skips_at_floor`](Self::with_max_skips_at_floor). [`StepOutcome`] names it in
/// `nonfinite_update`, and `fit` counts it toward its own limit on consecutive skipped steps.
///
/// **No silent death**: when the scale has sat at its floor for
/// [`max_skips_at_floor`](Self::with_max_skips_at_floor) consecutive skipped steps, training
/// stops with [`Error::LossScaleCollapsed`] instead of skipping forever. A fixed scale counts as
/// its own floor.
#[derive(Debug, Clone)]
pub struct LossScaleOptimizer<O: Optimizer> {
    inner: O,
    loss_scale: LossScale,
    skipped: u64,
    skips_at_floor: u64,
    max_skips_at_floor: u64,
    pending: Option<GradientCheck>,
}

impl<O: Optimizer> LossScaleOptimizer<O> {
    /// Wraps `inner` with a dynamic loss scale with the Keras defaults (2^15, growth every 2000
    /// finite steps, multiplier 2) and a floor of 1.
    pub fn new(inner: O) -> Self {
        Self::with_loss_scale(inner, LossScale::dynamic())
    }

    /// Wraps `inner` with the given loss scale (fixed or dynamic).
    pub fn with_loss_scale(inner: O, loss_scale: LossScale) -> Self {
        LossScaleOptimizer {
            inner,
            loss_scale,
            skipped: 0,
            skips_at_floor: 0,
            max_skips_at_floor: DEFAULT_MAX_SKIPS_AT_FLOOR,
            pending: None,
        }
    }

    /// Sets how many consecutive skipped steps at the floor stop training (at least 1).
    pub fn with_max_skips_at_floor(mut self, n: u64) -> Result<Self> {
        if n == 0 {
            return Err(Error::InvalidHyperparameter {
                optimizer: "LossScaleOptimizer",
                what: "max_skips_at_floor must be at least 1, got 0".into(),
            });
        }
        self.max_skips_at_floor = n;
        Ok(self)
    }

    /// The current loss scale.
    pub fn loss_scale(&self) -> f32 {
        self.loss_scale.scale()
    }

    /// The loss scale object (its state can be saved and restored).
    pub fn loss_scale_state(&self) -> &LossScale {
        &self.loss_scale
    }

    /// The loss scale object, mutably (to restore a checkpoint).
    pub fn loss_scale_mut(&mut self) -> &mut LossScale {
        &mut self.loss_scale
    }

    /// Gives the wrapped optimizer back.
    pub fn into_inner(self) -> O {
        self.inner
    }

    /// The wrapped optimizer.
    pub fn inner(&self) -> &O {
        &self.inner
    }

    /// The wrapped optimizer, mutably.
    pub fn inner_mut(&mut self) -> &mut O {
        &mut self.inner
    }

    /// Steps whose update was applied: the inner optimizer's `iterations` (so it counts the
    /// updates the inner optimizer made before it was wrapped too).
    pub fn applied_steps(&self) -> u64 {
        self.inner.iterations()
    }

    /// Steps skipped because a gradient was non-finite.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// Consecutive skipped steps with the scale at its floor.
    pub fn skips_at_floor(&self) -> u64 {
        self.skips_at_floor
    }

    /// How many consecutive skipped steps at the floor stop training.
    pub fn max_skips_at_floor(&self) -> u64 {
        self.max_skips_at_floor
    }

    /// The loss scale and the step counters, for a checkpoint.
    pub fn scaling_state(&self) -> ScalingState {
        ScalingState {
            loss_scale: self.loss_scale.clone(),
            applied: self.inner.iterations(),
            skipped: self.skipped,
            skips_at_floor: self.skips_at_floor,
            max_skips_at_floor: self.max_skips_at_floor,
        }
    }

    /// Restores a state saved with [`LossScaleOptimizer::scaling_state`]. The inner optimizer is
    /// restored separately, with [`Optimizer::load_state`], and first: `state.applied` must be
    /// its `iterations`. The state is validated first ([`ScalingState::validate`]); on error
    /// nothing changes. Forgets any pending gradient check.
    pub fn restore_scaling_state(&mut self, state: ScalingState) -> Result<()> {
        state.validate()?;
        if state.applied != self.inner.iterations() {
            return Err(Error::InvalidHyperparameter {
                optimizer: "LossScaleOptimizer",
                what: format!(
                    "the state has {} applied steps but the inner {} optimizer has {} \
                     iterations: they count the same updates (restore the inner optimizer's \
                     state first)",
                    state.applied,
                    self.inner.name(),
                    self.inner.iterations()
                ),
            });
        }
        self.loss_scale = state.loss_scale;
        self.skipped = state.skipped;
        self.skips_at_floor = state.skips_at_floor;
        self.max_skips_at_floor = state.max_skips_at_floor;
        self.pending = None;
        Ok(())
    }

    /// `loss * scale`: what backward should start from.
    pub fn get_scaled_loss(&self, loss: f32) -> f32 {
        loss * self.loss_scale.scale()
    }

    /// Divides every gradient by the loss scale in place and checks that all are finite, in one
    /// pass per variable. The result is remembered for the next `apply_gradients`.
    pub fn get_unscaled_gradients(&mut self, vars: &mut dyn VariableSet) -> Result<GradientCheck> {
        // The reciprocal in float64, rounded once: exact for the power-of-two scales a dynamic
        // scale takes.
        let inv = (1.0 / self.loss_scale.scale() as f64) as f32;
        let check = scan_gradients(vars, |g, flag| ops::unscale_and_check(g, inv, flag))?;
        self.pending = Some(check.clone());
        Ok(check)
    }

    /// Applies the inner optimizer if the (unscaled) gradients are all finite, else skips the
    /// step and updates the loss scale. Uses the check of the last `get_unscaled_gradients`
    /// when there was one this step, else checks the gradients as given. The inner optimizer
    /// may still skip an update that would be non-finite: then the scale is unchanged and the
    /// outcome's `nonfinite_update` says which (see the [type docs](Self)).
    pub fn apply_gradients(&mut self, vars: &mut dyn VariableSet) -> Result<StepOutcome> {
        let check = match self.pending.take() {
            Some(c) => c,
            None => check_gradients(vars)?,
        };
        self.apply_checked(vars, check)
    }

    /// [`LossScaleOptimizer::apply_gradients`] on a decision made elsewhere: applies the inner
    /// optimizer if `check` says every gradient is finite, else skips; updates the loss scale
    /// either way. A data-parallel trainer passes the check every rank agreed on, so that all
    /// ranks skip or apply together and their scales stay equal.
    pub fn apply_checked(
        &mut self,
        vars: &mut dyn VariableSet,
        check: GradientCheck,
    ) -> Result<StepOutcome> {
        self.pending = None;
        let scale_before = self.loss_scale.scale();
        let mut nonfinite_update = None;
        if check.all_finite {
            // The inner optimizer validates before writing; on its error nothing changed, so the
            // scale is not updated either.
            match self.inner.apply_gradients(vars)? {
                Update::Applied => {
                    let _ = self.loss_scale.update(true);
                    self.skips_at_floor = 0;
                }
                // Finite gradients, non-finite update: not the scale's doing, so the scale and
                // its counts stay as they are.
                Update::Skipped(u) => nonfinite_update = Some(u),
            }
        } else {
            let was_at_floor = self.loss_scale.at_floor() || !self.loss_scale.is_dynamic();
            let _ = self.loss_scale.update(false);
            self.skipped += 1;
            if was_at_floor {
                self.skips_at_floor += 1;
            }
            if self.skips_at_floor >= self.max_skips_at_floor {
                return Err(Error::LossScaleCollapsed {
                    skipped: self.skips_at_floor,
                    scale: self.loss_scale.scale(),
                    variable: check.first_nonfinite.unwrap_or_default(),
                });
            }
        }
        Ok(StepOutcome {
            applied: check.all_finite && nonfinite_update.is_none(),
            scale_before,
            scale_after: self.loss_scale.scale(),
            first_nonfinite: check.first_nonfinite,
            nonfinite_update,
        })
    }
}

impl<O: Optimizer> LossScaleOptimizer<O> {
    /// The inner optimizer's state.
    pub fn state(&self) -> Vec<(String, &'static str, &Tensor<F32>)> {
        self.inner.state()
    }
}

/// Whether every gradient is finite and, if not, the first variable whose gradient holds NaN or
/// infinity: what the loss-scale optimizer checks before applying a step, and what a trainer
/// without loss scaling checks too.
pub fn check_gradients(vars: &mut dyn VariableSet) -> Result<GradientCheck> {
    scan_gradients(vars, |g, flag| ops::check_finite(g, flag))
}

/// Runs `pass` over every gradient into one finiteness flag (one read on a GPU); only when the
/// flag says something was not finite are the gradients searched for the first culprit (a
/// non-finite value stays non-finite through the unscale pass).
fn scan_gradients(
    vars: &mut dyn VariableSet,
    mut pass: impl FnMut(&mut Tensor<F32>, &mut ops::Finite) -> mp_kernels::Result<()>,
) -> Result<GradientCheck> {
    let mut flag: Option<ops::Finite> = None;
    vars.for_each_variable(&mut |_, v| {
        let f = match &mut flag {
            Some(f) => f,
            None => flag.insert(ops::Finite::new(v.grad().device())?),
        };
        pass(v.grad_mut(), f)?;
        Ok(())
    })?;
    if flag.as_ref().map_or(Ok(true), ops::Finite::get)? {
        return Ok(GradientCheck {
            all_finite: true,
            first_nonfinite: None,
        });
    }
    let mut first = None;
    vars.for_each_variable(&mut |name, v| {
        if first.is_none() {
            let mut one = ops::Finite::new(v.grad().device())?;
            ops::check_finite(v.grad(), &mut one)?;
            if !one.get()? {
                first = Some(name.to_string());
            }
        }
        Ok(())
    })?;
    Ok(GradientCheck {
        all_finite: false,
        first_nonfinite: first,
    })
}

#[cfg(test)]
mod tests {
    use mp_core::{DynamicLossScale, Variable};

    use super::*;
    use crate::Sgd;

    #[test]
    fn scaling_state_round_trips_and_bad_states_change_nothing() {
        let scale = DynamicLossScale::new(1024.0, 3, 2.0).unwrap();
        let mut a = LossScaleOptimizer::with_loss_scale(Sgd::default(), LossScale::Dynamic(scale))
            .with_max_skips_at_floor(5)
            .unwrap();
        let mut vars =
            vec![Variable::new("w", Tensor::from_vec(&[1], vec![1.0]).unwrap()).unwrap()];
        for g in [1.0, f32::NAN, 1.0, 1.0, 1.0, 1.0] {
            vars[0].grad_mut().copy_from_slice(&[g]).unwrap();
            let _ = a.apply_gradients(&mut vars).unwrap();
        }
        let saved = a.scaling_state();
        assert_eq!(
            (saved.applied, saved.skipped, saved.max_skips_at_floor),
            (5, 1, 5)
        );
        assert_eq!(a.loss_scale(), 1024.0, "halved once, grown once");
        let mut b = LossScaleOptimizer::new(Sgd::default());
        // The applied steps are the inner optimizer's iterations: it is restored first.
        let e = b.restore_scaling_state(saved.clone()).unwrap_err();
        assert!(e.to_string().contains("5 applied steps"), "{e}");
        b.inner_mut().load_state(5, vec![]).unwrap();
        b.restore_scaling_state(saved.clone()).unwrap();
        assert_eq!(b.scaling_state(), saved);
        assert_eq!(b.skips_at_floor(), 0);
        assert_eq!(b.max_skips_at_floor(), 5);

        let cases = [
            ScalingState {
                max_skips_at_floor: 0,
                ..saved.clone()
            },
            ScalingState {
                skips_at_floor: 9,
                ..saved.clone()
            },
        ];
        let fresh = LossScaleOptimizer::new(Sgd::default()).scaling_state();
        for case in cases {
            let mut c = LossScaleOptimizer::new(Sgd::default());
            assert!(c.restore_scaling_state(case).is_err());
            assert_eq!(c.scaling_state(), fresh);
        }
    }
}
