// A model whose last layer computes in the policy's dtype, used as a model under
// mixed_bfloat16.
use mp_core::MixedBFloat16;
use mp_layers::{Dense, Model, model};

#[model]
pub struct Regressor {
    hidden: Dense,
    out: Dense,
}

fn needs_model<M: Model>(_: &M) {}

fn main() {
    let model = Regressor::<MixedBFloat16>::new(Dense::new(16).relu(), Dense::new(1));
    needs_model(&model);
}
