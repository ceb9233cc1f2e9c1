use mp_layers::model;

#[model]
pub struct Digits(mp_layers::Dense, mp_layers::Softmax);

fn main() {}
