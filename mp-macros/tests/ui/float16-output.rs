// The guide's model without `#[dtype = "float32"]` on its softmax, used as a model under
// mixed_float16: its output would be float16.
use mp_core::MixedFloat16;
use mp_layers::{Dense, Model, Softmax, model};

#[model]
pub struct Digits {
    dense_1: Dense,
    dense_2: Dense,
    dense_logits: Dense,
    predictions: Softmax,
}

fn needs_model<M: Model>() {}

fn main() {
    needs_model::<Digits<MixedFloat16>>();
}
