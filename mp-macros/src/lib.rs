//! # mp-macros
//!
//! `#[model]`: declares a model as a struct of layers, generates its typed forward and backward
//! code, and rejects a float16 or bfloat16 model output at compile time. Filled by the layers
//! issue.
