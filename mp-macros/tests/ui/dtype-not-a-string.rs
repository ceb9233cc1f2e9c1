use mp_layers::{Dense, Softmax, model};

#[model]
pub struct Digits {
    dense_1: Dense,
    #[dtype = 16]
    predictions: Softmax,
}

fn main() {}
