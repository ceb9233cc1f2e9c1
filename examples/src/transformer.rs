//! The transformer models of the examples: [`MnistVit`], a small Vision Transformer on MNIST
//! (`mnist_vit`), and [`ReverseLm`], a causal decoder that learns to reverse token sequences
//! (`reverse_lm`); with the pre-LN sublayers they are built from and their data.
//!
//! A pre-LN encoder block is `x + MHA(LN(x))` then `x + MLP(LN(x))`: two `#[residual]` fields
//! per block, each holding an [`AttentionSublayer`] or an [`MlpSublayer`].

use mp_core::{PolicyKind, Rng};
use mp_layers::{
    Activation, ClassToken, Dense, Embedding, LayerNormalization, MultiHeadAttention,
    PositionEmbedding, SequencePooling, Softmax, model,
};
use ndarray::{Array1, Array2, Array3, ArrayView3};

/// `LN -> MultiHeadAttention`, added to its input by the `#[residual]` field that holds it.
#[model]
pub struct AttentionSublayer {
    /// The pre-attention normalization.
    pub norm: LayerNormalization,
    /// Self-attention.
    pub attention: MultiHeadAttention,
}

/// `LN -> Dense(mlp, GELU) -> Dense(width)`, added to its input by its `#[residual]` field.
#[model]
pub struct MlpSublayer {
    /// The pre-MLP normalization.
    pub norm: LayerNormalization,
    /// Width to the MLP width.
    pub fc_1: Dense,
    /// GELU (exact).
    pub gelu: Activation,
    /// Back to the width.
    pub fc_2: Dense,
}

impl<P: PolicyKind> AttentionSublayer<P> {
    /// `heads` heads; `causal` for a decoder; initializers seeded from `seed`.
    pub fn with(heads: usize, causal: bool, seed: u64) -> Self {
        let mha = MultiHeadAttention::new(heads).with_seed(seed);
        AttentionSublayer {
            norm: LayerNormalization::new(),
            attention: if causal { mha.causal() } else { mha },
        }
    }
}

impl<P: PolicyKind> MlpSublayer<P> {
    /// An MLP of `hidden` units back to `width`, seeded from `seed`.
    pub fn with(hidden: usize, width: usize, seed: u64) -> Self {
        MlpSublayer {
            norm: LayerNormalization::new(),
            fc_1: Dense::new(hidden).with_seed(seed),
            gelu: Activation::gelu(),
            fc_2: Dense::new(width).with_seed(seed + 1),
        }
    }
}

/// The Vision Transformer of the issue, exactly: 28x28 images as 16 patches of 7x7 (49 values)
/// -> Dense(64) -> a class token -> learned positions (17) -> 4 pre-LN encoder blocks (4 heads,
/// MLP 128, GELU) -> LayerNorm -> the class token -> Dense(10) -> Softmax (float32).
#[model]
pub struct MnistVit {
    /// Each 49-value patch to 64 features.
    pub patches: Dense,
    /// The class token, first of 17.
    pub class_token: ClassToken,
    /// Learned positions.
    pub positions: PositionEmbedding,
    /// Block 1, attention.
    #[residual]
    pub attention_1: AttentionSublayer,
    /// Block 1, MLP.
    #[residual]
    pub mlp_1: MlpSublayer,
    /// Block 2, attention.
    #[residual]
    pub attention_2: AttentionSublayer,
    /// Block 2, MLP.
    #[residual]
    pub mlp_2: MlpSublayer,
    /// Block 3, attention.
    #[residual]
    pub attention_3: AttentionSublayer,
    /// Block 3, MLP.
    #[residual]
    pub mlp_3: MlpSublayer,
    /// Block 4, attention.
    #[residual]
    pub attention_4: AttentionSublayer,
    /// Block 4, MLP.
    #[residual]
    pub mlp_4: MlpSublayer,
    /// The final normalization.
    pub norm: LayerNormalization,
    /// The class token's features.
    pub pool: SequencePooling,
    /// The logits.
    pub logits: Dense,
    /// The softmax, in float32 whatever the policy.
    #[dtype = "float32"]
    pub predictions: Softmax,
}

/// The ViT's width.
pub const VIT_WIDTH: usize = 64;
/// The ViT's heads.
pub const VIT_HEADS: usize = 4;
/// The ViT's MLP width.
pub const VIT_MLP: usize = 128;
/// The ViT's peak learning rate (AdamW).
pub const VIT_LEARNING_RATE: f32 = 1e-3;
/// The ViT's patches per image (a 4x4 grid of 7x7 patches), its tokens but the class token.
pub const VIT_PATCHES: usize = 16;
/// The values of one patch (7x7 pixels), the ViT's input features per token.
pub const VIT_PATCH_VALUES: usize = 49;
/// The ViT's encoder blocks ([`MnistVit`]'s `attention_i`/`mlp_i` pairs).
pub const VIT_BLOCKS: usize = 4;
/// The ViT's classes (the digits).
pub const VIT_CLASSES: usize = 10;
/// Variables the ViT's AdamW does not decay (substrings of their paths).
pub const VIT_NO_DECAY: &[&str] = &["bias", "gamma", "beta", "positions", "class_token"];

impl<P: PolicyKind> MnistVit<P> {
    /// The issue's ViT, not yet built; each sublayer seeded on its own.
    pub fn issue() -> Self {
        let attn = |i: u64| AttentionSublayer::with(VIT_HEADS, false, 100 * i);
        let mlp = |i: u64| MlpSublayer::with(VIT_MLP, VIT_WIDTH, 100 * i + 50);
        MnistVit {
            patches: Dense::new(VIT_WIDTH).with_seed(1),
            class_token: ClassToken::new(),
            positions: PositionEmbedding::new(VIT_PATCHES + 1).with_seed(2),
            attention_1: attn(1),
            mlp_1: mlp(1),
            attention_2: attn(2),
            mlp_2: mlp(2),
            attention_3: attn(3),
            mlp_3: mlp(3),
            attention_4: attn(4),
            mlp_4: mlp(4),
            norm: LayerNormalization::new(),
            pool: SequencePooling::class_token(),
            logits: Dense::new(VIT_CLASSES).with_seed(3),
            predictions: Softmax::new(),
        }
    }
}

/// The ViT's schedule: linear warmup over the first `warmup` updates to [`VIT_LEARNING_RATE`],
/// then a cosine to 0 at `total`.
///
/// # Errors
/// A warmup longer than the run.
pub fn vit_learning_rate_schedule(
    warmup: usize,
    total: usize,
) -> mp_optim::Result<mp_optim::LearningRateSchedule> {
    mp_optim::LearningRateSchedule::warmup_cosine(VIT_LEARNING_RATE, warmup as u64, total as u64)
}

/// `(n, 28, 28)` images in `[0, 1]` as `(n, 16, 49)`: 7x7 patches in row-major order, each
/// patch's pixels row-major.
pub fn to_patches(images: ArrayView3<'_, f32>) -> Array3<f32> {
    let n = images.dim().0;
    Array3::from_shape_fn((n, VIT_PATCHES, VIT_PATCH_VALUES), |(i, p, q)| {
        let (pr, pc) = (p / 4, p % 4);
        let (r, c) = (q / 7, q % 7);
        images[[i, pr * 7 + r, pc * 7 + c]]
    })
}

/// The causal decoder of `reverse_lm`: token ids -> Embedding(width) -> learned positions -> 2
/// pre-LN decoder blocks (causal self-attention, GELU MLP) -> LayerNorm -> Dense(vocabulary) ->
/// Softmax (float32), a next-token distribution at every position.
#[model]
pub struct ReverseLm {
    /// Token ids to vectors.
    pub embed: Embedding,
    /// Learned positions.
    pub positions: PositionEmbedding,
    /// Block 1, causal attention.
    #[residual]
    pub attention_1: AttentionSublayer,
    /// Block 1, MLP.
    #[residual]
    pub mlp_1: MlpSublayer,
    /// Block 2, causal attention.
    #[residual]
    pub attention_2: AttentionSublayer,
    /// Block 2, MLP.
    #[residual]
    pub mlp_2: MlpSublayer,
    /// The final normalization.
    pub norm: LayerNormalization,
    /// The next token's logits.
    pub logits: Dense,
    /// The softmax, in float32 whatever the policy.
    #[dtype = "float32"]
    pub predictions: Softmax,
}

/// The reversal task: `length` random tokens from `1..vocab`, the separator 0, then the same
/// tokens reversed; the model reads `2 * length` tokens (the last one dropped) and predicts the
/// next token at every position. Only the `length` positions from the separator on are
/// predictable, and only they are scored.
#[derive(Clone, Copy, Debug)]
pub struct ReverseTask {
    /// Vocabulary size, the separator included.
    pub vocab: usize,
    /// Tokens to reverse.
    pub length: usize,
}

/// The label of a position that is not scored ([`mp_layers::SparseCategoricalCrossentropy::ignore_class`]).
pub const IGNORE: i32 = -1;

impl ReverseTask {
    /// Tokens the model reads per sequence.
    pub fn context(&self) -> usize {
        2 * self.length
    }

    /// `n` sequences from `seed`: the inputs `(n, 2 * length)` (float32 token ids) and the
    /// next-token labels `(n, 2 * length)`, [`IGNORE`] before the separator.
    pub fn data(&self, n: usize, seed: u64) -> (Array2<f32>, Array2<i32>) {
        let (l, t) = (self.length, self.context());
        let mut rng = Rng::new(seed);
        let mut x = Array2::zeros((n, t));
        let mut y = Array2::from_elem((n, t), IGNORE);
        for i in 0..n {
            let tokens: Vec<usize> = (0..l)
                .map(|_| 1 + rng.below(self.vocab as u64 - 1) as usize)
                .collect();
            // The full sequence: tokens, separator, reversed tokens.
            let mut full: Vec<usize> = tokens.clone();
            full.push(0);
            full.extend(tokens.iter().rev());
            for p in 0..t {
                x[[i, p]] = full[p] as f32;
                if p >= l {
                    y[[i, p]] = full[p + 1] as i32;
                }
            }
        }
        (x, y)
    }
}

impl<P: PolicyKind> ReverseLm<P> {
    /// The decoder for `task`, `width` wide with `heads` heads and an MLP of `4 * width`.
    pub fn for_task(task: &ReverseTask, width: usize, heads: usize) -> Self {
        ReverseLm {
            embed: Embedding::new(task.vocab, width).with_seed(1),
            positions: PositionEmbedding::new(task.context()).with_seed(2),
            attention_1: AttentionSublayer::with(heads, true, 100),
            mlp_1: MlpSublayer::with(4 * width, width, 150),
            attention_2: AttentionSublayer::with(heads, true, 200),
            mlp_2: MlpSublayer::with(4 * width, width, 250),
            norm: LayerNormalization::new(),
            logits: Dense::new(task.vocab).with_seed(3),
            predictions: Softmax::new(),
        }
    }
}

/// Per-sequence labels flattened to one per token, for a loss over `[batch, tokens, vocab]`.
pub fn flatten_labels(y: &Array2<i32>) -> Array1<i32> {
    y.iter().copied().collect()
}
