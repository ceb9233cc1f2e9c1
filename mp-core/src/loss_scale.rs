//! Loss scales: fixed, or dynamic as in Keras, with the guards users of every framework ask for.
//!
//! Under float16, small gradients underflow to zero. Multiplying the loss by a scale `S` before
//! backward multiplies every gradient by `S`, lifting them into float16's range; dividing the
//! float32 gradients by `S` afterwards restores their value. A dynamic scale searches for the
//! largest `S` that does not overflow:
//!
//! - after a step whose gradients are all finite, the good-step count grows; when it reaches the
//!   growth interval (Keras's `dynamic_growth_steps`, default 2000) the scale is multiplied by
//!   the multiplier (2) and the count restarts, **unless the grown scale would be infinite**
//!   (then the scale stays and the count restarts);
//! - after a step with a non-finite gradient the step is skipped, the scale is divided by the
//!   multiplier, **but never below the floor** (default 1, configurable), and the count restarts.
//!
//! Keras 3 has no floor (its scale can reach 0 and every later step is skipped) and no infinity
//! guard; tf.keras floors at 1. The state ([`LossScaleState`]: the current scale and good-step
//! count) can be read and restored exactly, for checkpoints.

use std::fmt;

use crate::error::{Error, Result};

/// Keras's initial dynamic loss scale, 2^15.
pub const DEFAULT_INITIAL_SCALE: f32 = 32768.0;
/// Keras's growth interval: finite steps between two increases of the scale.
pub const DEFAULT_GROWTH_INTERVAL: u64 = 2000;
/// Keras's multiplier for growth and backoff.
pub const DEFAULT_MULTIPLIER: f32 = 2.0;
/// The default floor of a dynamic scale (tf.keras's and DeepSpeed's).
pub const DEFAULT_MIN_SCALE: f32 = 1.0;

/// A loss scale: fixed, or dynamic.
#[derive(Clone, Debug, PartialEq)]
pub enum LossScale {
    /// The same scale every step; steps with non-finite gradients are still skipped.
    Fixed(FixedLossScale),
    /// A scale that grows after runs of finite steps and backs off on overflow.
    Dynamic(DynamicLossScale),
}

impl LossScale {
    /// A fixed loss scale. The value must be finite and positive.
    pub fn fixed(scale: f32) -> Result<LossScale> {
        Ok(LossScale::Fixed(FixedLossScale::new(scale)?))
    }

    /// A dynamic loss scale with the Keras defaults.
    pub fn dynamic() -> LossScale {
        LossScale::Dynamic(DynamicLossScale::default())
    }

    /// The current scale.
    pub fn scale(&self) -> f32 {
        match self {
            LossScale::Fixed(f) => f.scale(),
            LossScale::Dynamic(d) => d.scale(),
        }
    }

    /// Records whether the last step's gradients were all finite and updates the scale.
    /// Returns whether the step should be applied (that is, `grads_finite`).
    pub fn update(&mut self, grads_finite: bool) -> bool {
        match self {
            LossScale::Fixed(_) => grads_finite,
            LossScale::Dynamic(d) => d.update(grads_finite),
        }
    }

    /// Whether this is a dynamic scale.
    pub fn is_dynamic(&self) -> bool {
        matches!(self, LossScale::Dynamic(_))
    }

    /// Whether the scale is at its floor (a fixed scale never is).
    pub fn at_floor(&self) -> bool {
        match self {
            LossScale::Fixed(_) => false,
            LossScale::Dynamic(d) => d.scale() <= d.min_scale(),
        }
    }
}

impl fmt::Display for LossScale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LossScale::Fixed(s) => s.fmt(f),
            LossScale::Dynamic(s) => s.fmt(f),
        }
    }
}

/// A fixed loss scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FixedLossScale {
    scale: f32,
}

impl FixedLossScale {
    /// A fixed loss scale. The value must be finite and positive.
    pub fn new(scale: f32) -> Result<Self> {
        check_scale("fixed loss scale", scale)?;
        Ok(FixedLossScale { scale })
    }

    /// The scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }
}

impl fmt::Display for FixedLossScale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FixedLossScale(loss_scale={:?})", self.scale)
    }
}

/// The configuration of a [`DynamicLossScale`]. [`Default`] gives the Keras values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DynamicLossScaleConfig {
    /// The scale to start from (Keras: 2^15).
    pub initial_scale: f32,
    /// Consecutive finite steps before the scale grows (Keras: 2000).
    pub growth_interval: u64,
    /// Growth multiplies and backoff divides by this (Keras: 2). Must be > 1.
    pub multiplier: f32,
    /// Backoff never goes below this (default 1). Must be positive and at most `initial_scale`.
    pub min_scale: f32,
}

impl Default for DynamicLossScaleConfig {
    fn default() -> Self {
        DynamicLossScaleConfig {
            initial_scale: DEFAULT_INITIAL_SCALE,
            growth_interval: DEFAULT_GROWTH_INTERVAL,
            multiplier: DEFAULT_MULTIPLIER,
            min_scale: DEFAULT_MIN_SCALE,
        }
    }
}

impl DynamicLossScaleConfig {
    /// Checks every setting, naming the first one out of range.
    pub fn validate(&self) -> Result<()> {
        check_scale("initial_scale", self.initial_scale)?;
        check_scale("min_scale", self.min_scale)?;
        if self.growth_interval == 0 {
            return Err(Error::InvalidLossScale {
                what: "growth_interval must be at least 1, got 0".into(),
            });
        }
        if !(self.multiplier.is_finite() && self.multiplier > 1.0) {
            return Err(Error::InvalidLossScale {
                what: format!(
                    "multiplier must be finite and greater than 1, got {:?}",
                    self.multiplier
                ),
            });
        }
        if self.min_scale > self.initial_scale {
            return Err(Error::InvalidLossScale {
                what: format!(
                    "min_scale {:?} is larger than initial_scale {:?}",
                    self.min_scale, self.initial_scale
                ),
            });
        }
        Ok(())
    }
}

/// What changes as a dynamic loss scale runs: enough to restore it exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LossScaleState {
    /// The current scale, as raw float32 bits (exact).
    pub scale_bits: u32,
    /// Consecutive finite steps since the last change of scale.
    pub good_steps: u64,
}

impl LossScaleState {
    /// The current scale.
    pub fn scale(&self) -> f32 {
        f32::from_bits(self.scale_bits)
    }
}

/// A dynamic loss scale (see the module docs for the algorithm).
#[derive(Clone, Debug, PartialEq)]
pub struct DynamicLossScale {
    config: DynamicLossScaleConfig,
    scale: f32,
    good_steps: u64,
}

impl Default for DynamicLossScale {
    fn default() -> Self {
        let config = DynamicLossScaleConfig::default();
        DynamicLossScale {
            scale: config.initial_scale,
            good_steps: 0,
            config,
        }
    }
}

impl DynamicLossScale {
    /// A dynamic loss scale with the given initial scale, growth interval and multiplier, and
    /// the default floor (1, or the initial scale if that is smaller).
    pub fn new(initial_scale: f32, growth_interval: u64, multiplier: f32) -> Result<Self> {
        let min_scale = if initial_scale.is_finite() && initial_scale > 0.0 {
            DEFAULT_MIN_SCALE.min(initial_scale)
        } else {
            DEFAULT_MIN_SCALE
        };
        Self::from_config(DynamicLossScaleConfig {
            initial_scale,
            growth_interval,
            multiplier,
            min_scale,
        })
    }

    /// A dynamic loss scale from a full configuration.
    pub fn from_config(config: DynamicLossScaleConfig) -> Result<Self> {
        config.validate()?;
        Ok(DynamicLossScale {
            scale: config.initial_scale,
            good_steps: 0,
            config,
        })
    }

    /// The same scale with another floor.
    pub fn with_min_scale(self, min_scale: f32) -> Result<Self> {
        let config = DynamicLossScaleConfig {
            min_scale,
            ..self.config
        };
        config.validate()?;
        Ok(DynamicLossScale {
            config,
            scale: self.scale.max(min_scale),
            ..self
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DynamicLossScaleConfig {
        &self.config
    }

    /// The current scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Consecutive finite steps since the scale last changed.
    pub fn good_steps(&self) -> u64 {
        self.good_steps
    }

    /// The floor.
    pub fn min_scale(&self) -> f32 {
        self.config.min_scale
    }

    /// Records whether the last step's gradients were all finite and updates the scale.
    /// Returns whether the step should be applied (that is, `grads_finite`).
    pub fn update(&mut self, grads_finite: bool) -> bool {
        if grads_finite {
            self.good_steps += 1;
            if self.good_steps >= self.config.growth_interval {
                let grown = self.scale * self.config.multiplier;
                if grown.is_finite() {
                    self.scale = grown;
                }
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale / self.config.multiplier).max(self.config.min_scale);
            self.good_steps = 0;
        }
        grads_finite
    }

    /// The state, for a checkpoint.
    pub fn state(&self) -> LossScaleState {
        LossScaleState {
            scale_bits: self.scale.to_bits(),
            good_steps: self.good_steps,
        }
    }

    /// Restores a state saved with [`DynamicLossScale::state`]. A state this configuration
    /// could not have produced (a non-finite scale, one below the floor, a good-step count not
    /// below the growth interval) is refused and `self` is left unchanged.
    pub fn restore(&mut self, state: LossScaleState) -> Result<()> {
        let scale = state.scale();
        check_scale("restored scale", scale)?;
        if scale < self.config.min_scale {
            return Err(Error::InvalidLossScale {
                what: format!(
                    "restored scale {scale:?} is below min_scale {:?}",
                    self.config.min_scale
                ),
            });
        }
        if state.good_steps >= self.config.growth_interval {
            return Err(Error::InvalidLossScale {
                what: format!(
                    "restored good-step count {} is not below growth_interval {}",
                    state.good_steps, self.config.growth_interval
                ),
            });
        }
        self.scale = scale;
        self.good_steps = state.good_steps;
        Ok(())
    }
}

impl fmt::Display for DynamicLossScale {
    /// Prints like the guide:
    /// `DynamicLossScale(current_loss_scale=32768.0, num_good_steps=30, initial_loss_scale=32768.0, increment_period=2000, multiplier=2.0)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DynamicLossScale(current_loss_scale={:?}, num_good_steps={}, \
             initial_loss_scale={:?}, increment_period={}, multiplier={:?})",
            self.scale,
            self.good_steps,
            self.config.initial_scale,
            self.config.growth_interval,
            self.config.multiplier
        )
    }
}

fn check_scale(what: &str, value: f32) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidLossScale {
            what: format!("{what} must be finite and positive, got {value:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keras_defaults_and_display() {
        let mut d = DynamicLossScale::default();
        assert_eq!(d.scale(), 32768.0);
        for _ in 0..30 {
            assert!(d.update(true));
        }
        assert_eq!(
            d.to_string(),
            "DynamicLossScale(current_loss_scale=32768.0, num_good_steps=30, \
             initial_loss_scale=32768.0, increment_period=2000, multiplier=2.0)"
        );
        assert_eq!(
            LossScale::fixed(1024.0).unwrap().to_string(),
            "FixedLossScale(loss_scale=1024.0)"
        );
    }

    /// Keras's own test vector: from 400, four non-finite steps give 25.
    #[test]
    fn keras_backoff_vector() {
        let mut d = DynamicLossScale::new(400.0, 2000, 2.0).unwrap();
        for _ in 0..4 {
            assert!(!d.update(false));
        }
        assert_eq!(d.scale(), 25.0);
    }

    /// Keras's own test vector: from 2 with growth interval 2, eight finite steps give 32.
    #[test]
    fn keras_growth_vector() {
        let mut d = DynamicLossScale::new(2.0, 2, 2.0).unwrap();
        let mut trajectory = vec![];
        for _ in 0..8 {
            assert!(d.update(true));
            trajectory.push(d.scale());
        }
        assert_eq!(trajectory, vec![2.0, 4.0, 4.0, 8.0, 8.0, 16.0, 16.0, 32.0]);
    }

    #[test]
    fn a_skip_resets_the_good_step_count() {
        let mut d = DynamicLossScale::new(8.0, 3, 2.0).unwrap();
        d.update(true);
        d.update(true);
        d.update(false);
        assert_eq!((d.scale(), d.good_steps()), (4.0, 0));
        d.update(true);
        d.update(true);
        assert_eq!(d.scale(), 4.0);
        d.update(true);
        assert_eq!(d.scale(), 8.0);
    }

    #[test]
    fn backoff_stops_at_the_floor() {
        let mut d = DynamicLossScale::new(4.0, 2000, 2.0).unwrap();
        for _ in 0..10 {
            d.update(false);
        }
        assert_eq!(d.scale(), 1.0);
        let mut l = LossScale::Dynamic(d);
        assert!(l.at_floor());
        let mut d = DynamicLossScale::new(1024.0, 2000, 2.0)
            .unwrap()
            .with_min_scale(100.0)
            .unwrap();
        for _ in 0..10 {
            d.update(false);
        }
        assert_eq!(d.scale(), 100.0);
        // The floor can be below 1.
        let mut d = DynamicLossScale::new(1.0, 2000, 2.0)
            .unwrap()
            .with_min_scale(0.25)
            .unwrap();
        for _ in 0..10 {
            d.update(false);
        }
        assert_eq!(d.scale(), 0.25);
        assert!(!l.update(false));
    }

    #[test]
    fn growth_never_reaches_infinity() {
        let mut d = DynamicLossScale::new(f32::MAX / 2.0, 1, 4.0).unwrap();
        d.update(true);
        assert_eq!(d.scale(), f32::MAX / 2.0);
        assert_eq!(d.good_steps(), 0);
        let mut d = DynamicLossScale::new(2f32.powi(126), 1, 2.0).unwrap();
        d.update(true);
        assert_eq!(d.scale(), 2f32.powi(127));
        d.update(true);
        assert_eq!(d.scale(), 2f32.powi(127));
        assert!(d.scale().is_finite());
    }

    #[test]
    fn state_round_trips_exactly() {
        let mut d = DynamicLossScale::new(1000.0, 7, 3.0).unwrap();
        for i in 0..25 {
            d.update(i % 11 != 0);
        }
        let saved = d.state();
        let mut restored = DynamicLossScale::new(1000.0, 7, 3.0).unwrap();
        restored.restore(saved).unwrap();
        assert_eq!(restored, d);
        for i in 0..50 {
            assert_eq!(d.update(i % 5 != 0), restored.update(i % 5 != 0));
            assert_eq!(d.state(), restored.state());
        }
    }

    #[test]
    fn bad_restores_leave_the_state_unchanged() {
        let mut d = DynamicLossScale::new(64.0, 4, 2.0).unwrap();
        d.update(true);
        let before = d.clone();
        for bad in [
            LossScaleState {
                scale_bits: f32::NAN.to_bits(),
                good_steps: 0,
            },
            LossScaleState {
                scale_bits: f32::INFINITY.to_bits(),
                good_steps: 0,
            },
            LossScaleState {
                scale_bits: 0.5f32.to_bits(),
                good_steps: 0,
            },
            LossScaleState {
                scale_bits: (-8f32).to_bits(),
                good_steps: 0,
            },
            LossScaleState {
                scale_bits: 8f32.to_bits(),
                good_steps: 4,
            },
        ] {
            let err = d.restore(bad).unwrap_err().to_string();
            assert!(err.contains("invalid loss scale"), "{err}");
            assert_eq!(d, before);
        }
    }

    #[test]
    fn bad_configurations_are_errors() {
        for (scale, interval, mult) in [
            (f32::NAN, 2000, 2.0),
            (f32::INFINITY, 2000, 2.0),
            (0.0, 2000, 2.0),
            (-1.0, 2000, 2.0),
            (1024.0, 0, 2.0),
            (1024.0, 2000, 1.0),
            (1024.0, 2000, 0.5),
            (1024.0, 2000, f32::NAN),
            (1024.0, 2000, f32::INFINITY),
        ] {
            let err = DynamicLossScale::new(scale, interval, mult)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("invalid loss scale configuration"), "{err}");
        }
        assert!(LossScale::fixed(f32::NAN).is_err());
        assert!(LossScale::fixed(0.0).is_err());
        assert!(LossScale::fixed(-2.0).is_err());
        assert!(LossScale::fixed(f32::INFINITY).is_err());
        let err = DynamicLossScale::default()
            .with_min_scale(1e9)
            .unwrap_err()
            .to_string();
        assert!(err.contains("min_scale"), "{err}");
        assert!(
            DynamicLossScale::default()
                .with_min_scale(f32::NAN)
                .is_err()
        );
    }

    #[test]
    fn fixed_scale_never_changes() {
        let mut l = LossScale::fixed(128.0).unwrap();
        assert!(!l.update(false));
        assert!(l.update(true));
        assert_eq!(l.scale(), 128.0);
        assert!(!l.is_dynamic());
    }
}
