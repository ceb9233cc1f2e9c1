use mp_layers::model;

#[model]
pub struct Nothing {}

fn main() {}
