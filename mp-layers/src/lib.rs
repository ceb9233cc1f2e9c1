//! # mp-layers
//!
//! The `Layer` trait (forward, backward, variables, output dtype), `Dense`, `Activation`, losses,
//! metrics, the `Model` trait that `#[model]` implements, and `fit`/`evaluate`/`predict`.
//! Layers compose mp-kernels' kernels and never loop over elements themselves. Filled by the
//! layers issue.
