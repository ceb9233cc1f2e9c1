use mp_layers::{Dense, Softmax, model};

#[model]
pub struct Digits {
    dense_1: Dense,
    #[dtype = "float32"]
    #[dtype = "mixed_float16"]
    predictions: Softmax,
}

fn main() {}
