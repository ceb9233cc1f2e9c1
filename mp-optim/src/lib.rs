//! # mp-optim
//!
//! Optimizers that update float32 [`mp_core::Variable`]s (SGD, RMSprop, Adam; their arithmetic is
//! in mp-kernels' fused update kernels) and `LossScaleOptimizer`, which scales the loss, unscales
//! and checks the gradients, and skips non-finite steps. Filled by the optimizer issue; it owns
//! optimizer logic and state, never layers or training loops.
