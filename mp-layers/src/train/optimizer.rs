//! What the trainer steps: the optimizer, plain or wrapped in loss scaling, and a model's
//! variables as an optimizer sees them.

use mp_core::Variable;
use mp_optim::{LossScaleOptimizer, Optimizer, VariableSet};

use crate::error::Error;
use crate::layer::Layer;

/// A model's variables as an optimizer sees them: the trainable ones that are not frozen.
#[derive(Debug)]
pub struct ModelVars<'a, M: Layer>(pub &'a mut M);

impl<M: Layer> VariableSet for ModelVars<'_, M> {
    fn for_each_variable(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Variable) -> mp_optim::Result<()>,
    ) -> mp_optim::Result<()> {
        // The optimizer's own error travels through the model's visit as itself and comes out
        // unchanged; a model's error is kept whole as the source.
        match self.0.visit_variables("", &mut |name, v| {
            if v.updated() {
                f(name, v).map_err(Error::Optim)
            } else {
                Ok(())
            }
        }) {
            Ok(()) => Ok(()),
            Err(Error::Optim(e)) => Err(e),
            Err(other) => Err(mp_optim::Error::Variables(Box::new(other))),
        }
    }
}

/// The optimizer a trainer steps: plain, or wrapped in loss scaling.
#[derive(Debug)]
pub enum TrainOptimizer<O: Optimizer> {
    /// No loss scaling.
    Plain(O),
    /// Loss scaling around the optimizer.
    Scaled(LossScaleOptimizer<O>),
}

impl<O: Optimizer> TrainOptimizer<O> {
    /// The loss scale (1 without loss scaling).
    pub fn loss_scale(&self) -> f32 {
        match self {
            TrainOptimizer::Plain(_) => 1.0,
            TrainOptimizer::Scaled(s) => s.loss_scale(),
        }
    }

    /// The loss-scale state, `None` without loss scaling: the scale and, for a dynamic one,
    /// its count of good steps since the last change and its floor (what a callback reads).
    pub fn loss_scale_state(&self) -> Option<&mp_core::LossScale> {
        match self {
            TrainOptimizer::Plain(_) => None,
            TrainOptimizer::Scaled(s) => Some(s.loss_scale_state()),
        }
    }

    /// The optimizer itself.
    pub fn inner(&self) -> &O {
        match self {
            TrainOptimizer::Plain(o) => o,
            TrainOptimizer::Scaled(s) => s.inner(),
        }
    }

    /// The optimizer itself, mutably.
    pub fn inner_mut(&mut self) -> &mut O {
        match self {
            TrainOptimizer::Plain(o) => o,
            TrainOptimizer::Scaled(s) => s.inner_mut(),
        }
    }
}
