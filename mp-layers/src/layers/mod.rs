//! The layers, one file per family: [`dense`] (`Dense`), [`conv`] (`Conv2D`), [`pooling`]
//! (`MaxPooling2D`, `AveragePooling2D`, `GlobalAveragePooling2D`), [`activation`]
//! (`Activation`, `Softmax`, `Flatten`).

pub mod activation;
pub mod conv;
pub mod dense;
pub mod pooling;
mod util;
