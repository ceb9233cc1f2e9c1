//! Learning-rate schedules: the learning rate as a function of the number of *applied* updates.
//!
//! A schedule is read at the optimizer's update count ([`Optimizer::iterations`](crate::Optimizer::iterations)),
//! which a step skipped by the loss-scale optimizer does not advance: a skipped step does not
//! move the schedule either (PyTorch users hit the opposite, a scheduler stepped although
//! `optimizer.step()` was skipped). The count is saved in checkpoints, so a resumed run
//! continues the schedule where it was.
//!
//! The warmup-then-decay shapes are those of Hugging Face's `get_cosine_schedule_with_warmup`
//! and `get_linear_schedule_with_warmup`: `peak * step / warmup` during the warmup, then a
//! cosine or straight decay from `peak` to `floor` at step `total`, and `floor` after.

use crate::error::{Error, Result};

/// How the learning rate follows the applied updates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LearningRateSchedule {
    /// The same rate at every step.
    Constant(f32),
    /// Linear warmup from 0 to `peak` over `warmup` updates, then a half cosine down to
    /// `floor` at update `total`.
    WarmupCosine {
        /// The rate at the end of the warmup.
        peak: f32,
        /// Updates of warmup.
        warmup: u64,
        /// The update at which the rate reaches `floor`.
        total: u64,
        /// The rate from `total` on.
        floor: f32,
    },
    /// Linear warmup from 0 to `peak` over `warmup` updates, then a straight line down to
    /// `floor` at update `total`.
    WarmupLinear {
        /// The rate at the end of the warmup.
        peak: f32,
        /// Updates of warmup.
        warmup: u64,
        /// The update at which the rate reaches `floor`.
        total: u64,
        /// The rate from `total` on.
        floor: f32,
    },
}

impl LearningRateSchedule {
    /// Warmup then cosine decay to 0.
    pub fn warmup_cosine(peak: f32, warmup: u64, total: u64) -> Result<Self> {
        let s = LearningRateSchedule::WarmupCosine {
            peak,
            warmup,
            total,
            floor: 0.0,
        };
        s.validate().map(|()| s)
    }

    /// Warmup then linear decay to 0.
    pub fn warmup_linear(peak: f32, warmup: u64, total: u64) -> Result<Self> {
        let s = LearningRateSchedule::WarmupLinear {
            peak,
            warmup,
            total,
            floor: 0.0,
        };
        s.validate().map(|()| s)
    }

    /// Checks that every rate is finite and non-negative, that `total` is at least 1 and that
    /// `warmup <= total`.
    ///
    /// # Errors
    /// [`Error::InvalidHyperparameter`] naming the value.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| {
            Err(Error::InvalidHyperparameter {
                optimizer: "learning-rate schedule",
                what,
            })
        };
        let rate = |name: &str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                bad(format!("{name} must be finite and non-negative, got {v}"))
            }
        };
        match *self {
            LearningRateSchedule::Constant(r) => rate("the learning rate", r),
            LearningRateSchedule::WarmupCosine {
                peak,
                warmup,
                total,
                floor,
            }
            | LearningRateSchedule::WarmupLinear {
                peak,
                warmup,
                total,
                floor,
            } => {
                rate("peak", peak)?;
                rate("floor", floor)?;
                if total == 0 {
                    // Every step would be at or past the end: the rate is `floor` forever.
                    return bad(format!(
                        "total must be at least 1 update, got 0 (a schedule with 0 total steps \
                         stays at the floor rate {floor} from the first update)"
                    ));
                }
                if warmup > total {
                    return bad(format!(
                        "warmup ({warmup} updates) must not exceed total ({total})"
                    ));
                }
                Ok(())
            }
        }
    }

    /// The learning rate for the update that follows `step` applied updates (computed in
    /// float64, rounded once).
    pub fn at(&self, step: u64) -> f32 {
        let (peak, warmup, total, floor, cosine) = match *self {
            LearningRateSchedule::Constant(r) => return r,
            LearningRateSchedule::WarmupCosine {
                peak,
                warmup,
                total,
                floor,
            } => (peak, warmup, total, floor, true),
            LearningRateSchedule::WarmupLinear {
                peak,
                warmup,
                total,
                floor,
            } => (peak, warmup, total, floor, false),
        };
        let (peak, floor) = (peak as f64, floor as f64);
        if step < warmup {
            return (peak * step as f64 / warmup as f64) as f32;
        }
        if step >= total {
            return floor as f32;
        }
        let progress = (step - warmup) as f64 / (total - warmup) as f64;
        let shape = if cosine {
            0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        } else {
            1.0 - progress
        };
        (floor + (peak - floor) * shape) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_as_hugging_face_computes_them() {
        let c = LearningRateSchedule::warmup_cosine(1e-3, 10, 110).unwrap();
        assert_eq!(c.at(0), 0.0);
        assert_eq!(c.at(5), 5e-4);
        assert_eq!(c.at(10), 1e-3);
        assert_eq!(c.at(60), 5e-4); // halfway down the cosine
        assert!(c.at(109) > 0.0 && c.at(109) < 1e-6);
        assert_eq!(c.at(110), 0.0);
        assert_eq!(c.at(1_000), 0.0);
        let l = LearningRateSchedule::WarmupLinear {
            peak: 2.0,
            warmup: 0,
            total: 4,
            floor: 1.0,
        };
        assert_eq!(
            [l.at(0), l.at(1), l.at(2), l.at(4), l.at(9)],
            [2.0, 1.75, 1.5, 1.0, 1.0]
        );
        assert_eq!(LearningRateSchedule::Constant(0.1).at(7), 0.1);
    }

    #[test]
    fn bad_rates_a_zero_total_and_a_warmup_past_the_end_are_refused_by_name() {
        let e = LearningRateSchedule::warmup_cosine(f32::NAN, 1, 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("peak must be finite") && e.contains("NaN"),
            "{e}"
        );
        let e = LearningRateSchedule::warmup_linear(1.0, 5, 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("warmup (5 updates) must not exceed total (2)"),
            "{e}"
        );
        for s in [
            LearningRateSchedule::warmup_cosine(1e-3, 0, 0),
            LearningRateSchedule::warmup_linear(1e-3, 0, 0),
        ] {
            let e = s.unwrap_err().to_string();
            assert!(
                e.contains("learning-rate schedule")
                    && e.contains("total must be at least 1 update, got 0"),
                "{e}"
            );
        }
        // One update is a schedule (at the floor from then on).
        assert!(LearningRateSchedule::warmup_cosine(1e-3, 0, 1).is_ok());
        let e = LearningRateSchedule::Constant(-1.0)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("learning rate must be finite and non-negative, got -1"),
            "{e}"
        );
    }
}
