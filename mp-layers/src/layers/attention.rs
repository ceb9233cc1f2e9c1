//! `MultiHeadAttention`: self-attention over `[batch, tokens, features]`, as Keras's
//! `MultiHeadAttention(num_heads, key_dim)` called with `query = value = key = x`.

use mp_core::{F32, PolicyKind, Tensor, Variable};
use mp_kernels::attention::Attention;
use mp_kernels::ops;

use super::dense::Dense;
use super::util::name_seed;
use crate::checkpoint::{ForeignTensors, Part, Transform};
use crate::error::{Error, Result};
use crate::layer::Layer;

/// What `forward_train` keeps for backward.
struct Saved<D: mp_core::DTypeKind> {
    q: Tensor<D>,
    k: Tensor<D>,
    v: Tensor<D>,
    probs: Tensor<F32>,
    mask: Option<Tensor<F32>>,
    geometry: Attention,
}

/// Multi-head self-attention (Vaswani et al.), as Keras's `MultiHeadAttention`.
///
/// - Four projections, each a [`Dense`] with float32 variables: `query`, `key`, `value` (features
///   to `heads × key_dim`) and `attention_output` (back to the input's features).
/// - Scores `q · kᵀ / sqrt(key_dim)` and the value product in the compute dtype with float32
///   accumulation; the softmax in float32 ([`mp_kernels::attention`]).
/// - Masks select keys instead of adding a large negative number, so a masked position's
///   probability is exactly zero in every dtype and float16 cannot overflow: an optional key
///   padding mask `[batch, tokens]` (1 attend, 0 padding) given to
///   [`MultiHeadAttention::forward_masked`] / [`MultiHeadAttention::forward_train_masked`], and
///   the causal mask ([`MultiHeadAttention::causal`]) for decoders. A query with every key
///   masked gets a zero output, never NaN.
/// - Dropout on the probabilities in training ([`MultiHeadAttention::with_dropout`]), drawn from
///   the layer's seed and the step number as [`Dropout`](crate::Dropout) does.
///
/// By default each head is `features / num_heads` wide, and heads that do not divide the
/// features are an error naming both; [`MultiHeadAttention::with_key_dim`] sets the width.
///
/// ```
/// use mp_core::{MixedFloat16, Tensor, F16};
/// use mp_layers::{Layer, MultiHeadAttention};
///
/// let mut mha = MultiHeadAttention::<MixedFloat16>::new(4).causal();
/// assert_eq!(mha.build(&[10, 32])?, vec![10, 32]);
/// let x = Tensor::<F16>::from_f32(&[2, 10, 32], &[0.1; 640])?;
/// assert_eq!(mha.forward(&x)?.shape(), &[2, 10, 32]);
/// let err = MultiHeadAttention::<MixedFloat16>::new(3).build(&[10, 32]).unwrap_err();
/// assert!(err.to_string().contains("3 heads"));
/// # Ok::<(), mp_layers::Error>(())
/// ```
pub struct MultiHeadAttention<P: PolicyKind> {
    num_heads: usize,
    key_dim: Option<usize>,
    causal: bool,
    dropout: f32,
    seed: Option<u64>,
    name: String,
    output_shape: Option<Vec<usize>>,
    query: Dense<P>,
    key: Dense<P>,
    value: Dense<P>,
    output: Dense<P>,
    step: u64,
    saved: Option<Saved<P::Compute>>,
}

impl<P: PolicyKind> std::fmt::Debug for MultiHeadAttention<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultiHeadAttention")
            .field("name", &self.name)
            .field("num_heads", &self.num_heads)
            .field("key_dim", &self.key_dim)
            .field("causal", &self.causal)
            .field("dropout", &self.dropout)
            .field("policy", &P::POLICY)
            .finish()
    }
}

impl<P: PolicyKind> MultiHeadAttention<P> {
    /// Self-attention with `num_heads` heads, each `features / num_heads` wide.
    pub fn new(num_heads: usize) -> Self {
        MultiHeadAttention {
            num_heads,
            key_dim: None,
            causal: false,
            dropout: 0.0,
            seed: None,
            name: "multi_head_attention".into(),
            output_shape: None,
            query: Dense::new(1),
            key: Dense::new(1),
            value: Dense::new(1),
            output: Dense::new(1),
            step: 0,
            saved: None,
        }
    }

    /// Each head `key_dim` wide (Keras's `key_dim`), whatever the features.
    pub fn with_key_dim(mut self, key_dim: usize) -> Self {
        self.key_dim = Some(key_dim);
        self
    }

    /// Query `i` attends to tokens `0..=i` only (Keras's `use_causal_mask=True`).
    pub fn causal(mut self) -> Self {
        self.causal = true;
        self
    }

    /// Dropout `rate` on the attention probabilities while training (Keras's `dropout`).
    pub fn with_dropout(mut self, rate: f32) -> Self {
        self.dropout = rate;
        self
    }

    /// Seeds the projections' initializers and the dropout (default: a hash of the layer's
    /// name).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The heads and the width of each, once built.
    fn heads(&self) -> Result<(usize, usize)> {
        match (self.output_shape.as_ref(), self.key_dim) {
            (Some(_), Some(k)) => Ok((self.num_heads, k)),
            _ => Err(Error::NotBuilt {
                layer: self.name.clone(),
            }),
        }
    }

    fn base_seed(&self) -> u64 {
        self.seed.unwrap_or_else(|| name_seed(&self.name))
    }

    fn geometry(&self, x: &Tensor<P::Compute>) -> Result<Attention> {
        let (heads, key_dim) = self.heads()?;
        let want = self.output_shape.as_deref().unwrap_or(&[]);
        match x.shape() {
            [b, rest @ ..] if rest == want => {
                Ok(Attention::new(*b, want[0], heads, key_dim).with_causal(self.causal))
            }
            got => Err(Error::ShapeMismatch {
                layer: self.name.clone(),
                expected: format!("(batch, {}, {})", want[0], want[1]),
                got: got.to_vec(),
            }),
        }
    }

    fn check_mask(&self, a: &Attention, mask: Option<&Tensor<F32>>) -> Result<()> {
        match mask {
            Some(m) if m.shape() != [a.batch, a.seq] => Err(Error::ShapeMismatch {
                layer: self.name.clone(),
                expected: format!("a padding mask of shape ({}, {})", a.batch, a.seq),
                got: m.shape().to_vec(),
            }),
            _ => Ok(()),
        }
    }

    fn kernel_error(&self, e: mp_kernels::Error) -> Error {
        Error::InvalidArgument {
            what: format!("{}: {e}", self.name),
        }
    }

    /// Inference with a key padding mask `[batch, tokens]` (1 attend, 0 padding), or none.
    ///
    /// # Errors
    /// An input or mask of the wrong shape, a mask value other than 0 and 1, naming the layer.
    pub fn forward_masked(
        &self,
        x: &Tensor<P::Compute>,
        mask: Option<&Tensor<F32>>,
    ) -> Result<Tensor<P::Compute>> {
        Ok(self.forward_with_scores(x, mask)?.0)
    }

    /// [`MultiHeadAttention::forward_masked`] that also returns the float32 attention
    /// probabilities `[batch, heads, tokens, tokens]` (Keras's `return_attention_scores`).
    ///
    /// # Errors
    /// As [`MultiHeadAttention::forward_masked`].
    pub fn forward_with_scores(
        &self,
        x: &Tensor<P::Compute>,
        mask: Option<&Tensor<F32>>,
    ) -> Result<(Tensor<P::Compute>, Tensor<F32>)> {
        let a = self.geometry(x)?;
        self.check_mask(&a, mask)?;
        let q = self.query.forward(x)?;
        let k = self.key.forward(x)?;
        let v = self.value.forward(x)?;
        let (o, probs) = ops::attention(&a, &q, &k, &v, mask).map_err(|e| self.kernel_error(e))?;
        Ok((self.output.forward(&o)?, probs))
    }

    /// Training forward with a key padding mask (or none); keeps what backward needs.
    ///
    /// # Errors
    /// As [`MultiHeadAttention::forward_masked`].
    pub fn forward_train_masked(
        &mut self,
        x: &Tensor<P::Compute>,
        mask: Option<&Tensor<F32>>,
    ) -> Result<Tensor<P::Compute>> {
        let mut a = self.geometry(x)?;
        self.check_mask(&a, mask)?;
        if self.dropout > 0.0 {
            let seed = self.base_seed()
                ^ self
                    .step
                    .wrapping_add(1)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15);
            a = a.with_dropout(self.dropout, seed);
        }
        self.step += 1;
        let q = self.query.forward_train(x)?;
        let k = self.key.forward_train(x)?;
        let v = self.value.forward_train(x)?;
        let (o, probs) = ops::attention(&a, &q, &k, &v, mask).map_err(|e| self.kernel_error(e))?;
        let y = self.output.forward_train(&o)?;
        self.saved = Some(Saved {
            q,
            k,
            v,
            probs,
            mask: mask.cloned(),
            geometry: a,
        });
        Ok(y)
    }
}

impl<P: PolicyKind> Layer for MultiHeadAttention<P> {
    type Policy = P;
    type Input = P::Compute;
    type Output = P::Compute;

    fn type_name(&self) -> &'static str {
        "MultiHeadAttention"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }

    fn build(&mut self, input_shape: &[usize]) -> Result<Vec<usize>> {
        let &[tokens, features] = input_shape else {
            return Err(Error::InputRank {
                layer: self.name.clone(),
                previous: "the model input".into(),
                expected: super::sequence::SEQUENCE,
                got: input_shape.to_vec(),
            });
        };
        if let Some(built) = &self.output_shape {
            if built.as_slice() != input_shape {
                return Err(Error::IncompatibleShapes {
                    layer: self.name.clone(),
                    previous: "the model input".into(),
                    expected: built.clone(),
                    got: input_shape.to_vec(),
                });
            }
            return Ok(input_shape.to_vec());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::InvalidArgument {
                what: format!(
                    "{}: the attention dropout rate must be in [0, 1), got {}",
                    self.name, self.dropout
                ),
            });
        }
        let refuse = |what: String| {
            Err(Error::InvalidArgument {
                what: format!("{}: {what}", self.name),
            })
        };
        if self.num_heads == 0 {
            return refuse("MultiHeadAttention needs at least 1 head, got 0".into());
        }
        if features == 0 {
            return refuse(format!(
                "the model width is 0 (inputs of shape {input_shape:?} per sample): attention \
                 needs tokens of at least 1 feature"
            ));
        }
        let key_dim = match self.key_dim {
            Some(0) => {
                return refuse(
                    "key_dim must be at least 1, got 0 (with_key_dim(0)); leave it unset for \
                     a head width of the model width / the number of heads"
                        .into(),
                );
            }
            Some(k) => k,
            None if features % self.num_heads == 0 => features / self.num_heads,
            None => {
                return refuse(format!(
                    "{} heads do not divide the model width {features} (give with_key_dim, or \
                     a number of heads that divides {features})",
                    self.num_heads
                ));
            }
        };
        if tokens == 0 {
            return Err(Error::InvalidArgument {
                what: format!("{}: a sequence of 0 tokens", self.name),
            });
        }
        let width = self.num_heads * key_dim;
        let seed = self.base_seed();
        let name = self.name.clone();
        let projection = |units: usize, part: &str, i: u64| {
            let mut d = Dense::<P>::new(units).with_seed(seed.wrapping_add(i));
            d.set_name(&format!("{name}/{part}"));
            d
        };
        self.query = projection(width, "query", 1);
        self.key = projection(width, "key", 2);
        self.value = projection(width, "value", 3);
        self.output = projection(features, "attention_output", 4);
        self.query.build(input_shape)?;
        self.key.build(input_shape)?;
        self.value.build(input_shape)?;
        self.output.build(&[tokens, width])?;
        self.key_dim = Some(key_dim);
        self.output_shape = Some(input_shape.to_vec());
        Ok(input_shape.to_vec())
    }

    fn output_shape(&self) -> Option<&[usize]> {
        self.output_shape.as_deref()
    }

    fn forward(&self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        self.forward_masked(x, None)
    }

    fn forward_train(&mut self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        self.forward_train_masked(x, None)
    }

    fn backward(
        &mut self,
        dy: &Tensor<P::Compute>,
        need_dx: bool,
    ) -> Result<Option<Tensor<P::Compute>>> {
        let s = self.saved.take().ok_or_else(|| Error::InvalidState {
            layer: self.name.clone(),
            what: "backward called without a preceding forward_train".into(),
        })?;
        let missing = || Error::InvalidState {
            layer: self.name.clone(),
            what: "a projection returned no input gradient".into(),
        };
        let d_o = self.output.backward(dy, true)?.ok_or_else(missing)?;
        let (dq, dk, dv) = ops::attention_backward(
            &s.geometry,
            &s.q,
            &s.k,
            &s.v,
            s.mask.as_ref(),
            &s.probs,
            &d_o,
        )
        .map_err(|e| self.kernel_error(e))?;
        let dx_q = self.query.backward(&dq, need_dx)?;
        let dx_k = self.key.backward(&dk, need_dx)?;
        let dx_v = self.value.backward(&dv, need_dx)?;
        match (dx_q, dx_k, dx_v) {
            (Some(mut dx), Some(dk), Some(dv)) => {
                ops::add_assign(&dk, &mut dx)?;
                ops::add_assign(&dv, &mut dx)?;
                Ok(Some(dx))
            }
            _ if !need_dx => Ok(None),
            _ => Err(missing()),
        }
    }

    fn foreign_tensors(&mut self, prefix: &str, out: &mut ForeignTensors) -> Result<()> {
        out.take_flattened();
        let projections = [
            (&self.query, "query/", "q_proj/"),
            (&self.key, "key/", "k_proj/"),
            (&self.value, "value/", "v_proj/"),
        ];
        if out.layout().packs_attention() {
            // torch.nn.MultiheadAttention: the three projections stacked along the outputs.
            let mut weights = vec![];
            let mut biases = vec![];
            for (dense, mp, _) in &projections {
                let (kernel, bias) = dense.variable_shapes();
                if let Some(k) = kernel {
                    weights.push(Part {
                        path: format!("{prefix}{mp}kernel"),
                        shape: k.to_vec(),
                        transform: Transform::Transpose,
                    });
                }
                if let Some(b) = bias {
                    biases.push(Part {
                        path: format!("{prefix}{mp}bias"),
                        shape: b.to_vec(),
                        transform: Transform::Same,
                    });
                }
            }
            if !weights.is_empty() {
                out.push_parts(ForeignTensors::name(prefix, "in_proj_weight"), weights);
            }
            if !biases.is_empty() {
                out.push_parts(ForeignTensors::name(prefix, "in_proj_bias"), biases);
            }
        } else {
            for (dense, mp, foreign) in &projections {
                dense.foreign_as(
                    &format!("{prefix}{mp}"),
                    &format!("{prefix}{foreign}"),
                    None,
                    out,
                );
            }
        }
        self.output.foreign_as(
            &format!("{prefix}attention_output/"),
            &format!("{prefix}out_proj/"),
            None,
            out,
        );
        out.hyperparameter(prefix, "num_heads", self.num_heads);
        if self.causal {
            out.hyperparameter(prefix, "causal", true);
        }
        Ok(())
    }

    fn visit_variables(
        &mut self,
        prefix: &str,
        f: &mut dyn FnMut(&str, &mut Variable) -> Result<()>,
    ) -> Result<()> {
        self.query.visit_variables(&format!("{prefix}query/"), f)?;
        self.key.visit_variables(&format!("{prefix}key/"), f)?;
        self.value.visit_variables(&format!("{prefix}value/"), f)?;
        self.output
            .visit_variables(&format!("{prefix}attention_output/"), f)
    }

    fn saved_bytes(&self) -> usize {
        let own = self.saved.as_ref().map_or(0, |s| {
            s.q.size_in_bytes()
                + s.k.size_in_bytes()
                + s.v.size_in_bytes()
                + s.probs.size_in_bytes()
                + s.mask.as_ref().map_or(0, Tensor::size_in_bytes)
        });
        own + self.query.saved_bytes()
            + self.key.saved_bytes()
            + self.value.saved_bytes()
            + self.output.saved_bytes()
    }

    fn param_count(&self) -> usize {
        if self.output_shape.is_none() {
            return 0;
        }
        self.query.param_count()
            + self.key.param_count()
            + self.value.param_count()
            + self.output.param_count()
    }

    fn frozen_param_count(&self) -> usize {
        self.query.frozen_param_count()
            + self.key.frozen_param_count()
            + self.value.frozen_param_count()
            + self.output.frozen_param_count()
    }

    fn begin_step(&mut self, step: u64) {
        self.step = step;
    }
}
