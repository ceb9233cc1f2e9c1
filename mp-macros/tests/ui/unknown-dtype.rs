use mp_core::MixedFloat16;
use mp_layers::{Dense, Model, Softmax, model};

#[model]
pub struct Digits {
    dense_1: Dense,
    #[dtype = "float23"]
    predictions: Softmax,
}

fn needs_model<M: Model>() {}

fn main() {
    needs_model::<Digits<MixedFloat16>>();
}
