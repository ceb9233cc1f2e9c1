use mp_layers::model;

#[model]
pub struct Digits<P: mp_core::PolicyKind> {
    dense_1: mp_layers::Dense<P>,
    predictions: mp_layers::Softmax<P>,
}

fn main() {}
