//! The layers, one file per family: [`dense`] (`Dense`), [`activation`] (`Activation`,
//! `Softmax`, `Flatten`).

pub mod activation;
pub mod dense;
mod util;
