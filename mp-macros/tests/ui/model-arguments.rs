use mp_layers::{Dense, Softmax, model};

#[model(mixed_float16)]
pub struct Digits {
    dense_1: Dense,
    #[dtype = "float32"]
    predictions: Softmax,
}

fn main() {}
