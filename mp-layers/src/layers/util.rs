//! Small helpers shared by the layers.

use crate::error::{Error, Result};

/// The number of rows of a `[..., features]` tensor, checking its last dimension.
pub(crate) fn check_features(layer: &str, shape: &[usize], features: usize) -> Result<usize> {
    match shape.split_last() {
        Some((&last, batch)) if last == features && !batch.is_empty() => Ok(batch.iter().product()),
        _ => Err(Error::ShapeMismatch {
            layer: layer.to_string(),
            expected: format!("(batch, {features})"),
            got: shape.to_vec(),
        }),
    }
}

/// A seed derived from a layer's name (FNV-1a), so models initialise the same way every run.
pub(crate) fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
