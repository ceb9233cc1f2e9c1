//! The layers, one file per family: [`dense`] (`Dense`), [`conv`] (`Conv2D`), [`pooling`]
//! (`MaxPooling2D`, `AveragePooling2D`, `GlobalAveragePooling2D`), [`norm`]
//! (`BatchNormalization`, `LayerNormalization`), [`dropout`] (`Dropout`), [`activation`]
//! (`Activation` with GELU among its functions, `Softmax`, `Flatten`), [`sequence`]
//! (`Embedding`, `PositionEmbedding`, `ClassToken`, `SequencePooling`), [`attention`]
//! (`MultiHeadAttention`).

pub mod activation;
pub mod attention;
pub mod conv;
pub mod dense;
pub mod dropout;
pub mod norm;
pub mod pooling;
pub mod sequence;
mod util;

/// What a layer that reads the last axis (the features) takes per sample: the text of its
/// [`Error::InputRank`](crate::Error::InputRank) for an empty input shape.
pub(crate) const AT_LEAST_ONE_AXIS: &str = "an input shape with at least one axis (the features)";
