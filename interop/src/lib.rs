//! Tests only: mp's weights as other frameworks read them. See `tests/candle.rs`: candle builds
//! the guide's MLP, `mnist_cnn` and a CNN ending in `Flatten -> Dense` from mp's PyTorch-layout
//! exports (float32, bfloat16, float16) through its `VarBuilder`, and their outputs are compared
//! with mp's.
