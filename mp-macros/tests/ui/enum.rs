use mp_layers::model;

#[model]
pub enum Digits {
    Small(mp_layers::Dense<mp_core::Float32>),
    Large(mp_layers::Dense<mp_core::Float32>),
}

fn main() {}
