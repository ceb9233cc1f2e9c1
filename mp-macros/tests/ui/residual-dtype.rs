// A residual block must output its input's dtype: this one ends in a float32 softmax, so under
// the mixed policies `block(x) + x` would add float32 to float16 or bfloat16.
use mp_layers::{Dense, Softmax, model};

#[model]
struct Block {
    dense: Dense,
    #[dtype = "float32"]
    probs: Softmax,
}

#[model]
struct Net {
    stem: Dense,
    #[residual]
    block: Block,
    #[dtype = "float32"]
    head: Softmax,
}

fn main() {}
