// The last field's output is the model's: it cannot be a residual block.
use mp_layers::{Dense, model};

#[model]
struct Block {
    dense: Dense,
}

#[model]
struct Net {
    stem: Dense,
    #[residual]
    block: Block,
}

fn main() {}
