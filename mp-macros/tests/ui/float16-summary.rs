// The guide's model without `#[dtype = "float32"]`, built under mixed_float16 and asked for its
// summary (a `Model` method).
use mp_core::MixedFloat16;
use mp_layers::{Dense, Model, Softmax, model};

#[model]
pub struct Digits {
    dense_1: Dense,
    predictions: Softmax,
}

fn main() {
    let model = Digits::<MixedFloat16>::new(Dense::new(10), Softmax::new());
    println!("{}", model.summary());
}
