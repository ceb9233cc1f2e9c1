//! Layers over token sequences `[batch, tokens, features]`: [`Embedding`] (integer token ids to
//! vectors), [`PositionEmbedding`] (a learned vector per position, added), [`ClassToken`] (a
//! learned token prepended, as in the Vision Transformer) and [`SequencePooling`] (the first
//! token, or the mean over the tokens).
//!
//! Every table is a float32 variable under every policy; outputs are in the compute dtype; the
//! gradients of the tables are summed in float32.

use std::marker::PhantomData;

use mp_core::{F32, PolicyKind, Tensor, Variable};
use mp_kernels::ops;
use mp_kernels::sequence::Pool;
use ndarray::ArrayViewD;

use super::util::{glorot_uniform, name_seed, uniform};
use crate::checkpoint::ForeignTensors;
use crate::error::{Error, Result};
use crate::layer::Layer;

/// What a layer over token sequences takes per sample.
pub(crate) const SEQUENCE: &str = "[tokens, width] inputs (rank 2)";

fn saved<T: Clone>(slot: &mut Option<T>, layer: &str) -> Result<T> {
    slot.take().ok_or_else(|| Error::InvalidState {
        layer: layer.to_string(),
        what: "backward called without a preceding forward_train".into(),
    })
}

fn not_built(layer: &str) -> Error {
    Error::NotBuilt {
        layer: layer.to_string(),
    }
}

/// The rows of a kernel error naming this layer.
fn named(layer: &str, e: mp_kernels::Error) -> Error {
    Error::InvalidArgument {
        what: format!("{layer}: {e}"),
    }
}

/// Keras's `Embedding`: integer token ids to vectors of `output_dim`, looked up in a float32
/// table `embeddings` (`input_dim × output_dim`, `U(-0.05, 0.05)` as Keras's default
/// initializer).
///
/// The input is token ids held in float32 (exact up to 2^24) whatever the policy — a model whose
/// first layer is an `Embedding` takes float32 ids in `fit`, `evaluate` and `predict` — and the
/// output is the compute dtype, `input shape + [output_dim]`. The table's gradient is summed in
/// float32 row by row. A token id that is not an integer below `input_dim` is an error naming
/// the layer, the id and its position. An `Embedding` computes no input gradient, so it is the
/// first layer of a model.
///
/// ```
/// use mp_core::{MixedBFloat16, Tensor, F32};
/// use mp_layers::{Embedding, Layer};
///
/// let mut embed = Embedding::<MixedBFloat16>::new(32, 8);
/// assert_eq!(embed.build(&[5])?, vec![5, 8]);
/// let ids = Tensor::<F32>::from_f32(&[1, 5], &[0.0, 3.0, 31.0, 3.0, 7.0])?;
/// assert_eq!(embed.forward(&ids)?.shape(), &[1, 5, 8]); // bfloat16
/// let bad = Tensor::<F32>::from_f32(&[1, 5], &[0.0, 3.0, 32.0, 3.0, 7.0])?;
/// assert!(embed.forward(&bad).unwrap_err().to_string().contains("token id 32 at position 2"));
/// # Ok::<(), mp_layers::Error>(())
/// ```
pub struct Embedding<P: PolicyKind> {
    input_dim: usize,
    output_dim: usize,
    seed: Option<u64>,
    name: String,
    output_shape: Option<Vec<usize>>,
    embeddings: Option<Variable>,
    saved_ids: Option<Tensor<F32>>,
    _policy: PhantomData<P>,
}

impl<P: PolicyKind> std::fmt::Debug for Embedding<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedding")
            .field("name", &self.name)
            .field("input_dim", &self.input_dim)
            .field("output_dim", &self.output_dim)
            .field("policy", &P::POLICY)
            .finish()
    }
}

impl<P: PolicyKind> Embedding<P> {
    /// A vocabulary of `input_dim` tokens, each a vector of `output_dim`.
    pub fn new(input_dim: usize, output_dim: usize) -> Self {
        Embedding {
            input_dim,
            output_dim,
            seed: None,
            name: "embedding".into(),
            output_shape: None,
            embeddings: None,
            saved_ids: None,
            _policy: PhantomData,
        }
    }

    /// Seeds the initializer (default: a hash of the layer's name).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The vocabulary size.
    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    /// The table variable (`input_dim × output_dim`, float32), once built.
    pub fn embeddings(&self) -> Option<&Variable> {
        self.embeddings.as_ref()
    }

    fn lookup(&self, ids: &Tensor<F32>) -> Result<Tensor<P::Compute>> {
        let table = self
            .embeddings
            .as_ref()
            .ok_or_else(|| not_built(&self.name))?;
        let want = self.output_shape.as_deref().unwrap_or(&[]);
        if ids.shape().get(1..) != want.get(..want.len().saturating_sub(1)) {
            return Err(Error::ShapeMismatch {
                layer: self.name.clone(),
                expected: format!(
                    "token ids of shape (batch, {:?})",
                    &want[..want.len().saturating_sub(1)]
                ),
                got: ids.shape().to_vec(),
            });
        }
        ops::embedding(ids, table.value()).map_err(|e| named(&self.name, e))
    }
}

impl<P: PolicyKind> Layer for Embedding<P> {
    type Policy = P;
    type Input = F32;
    type Output = P::Compute;

    fn type_name(&self) -> &'static str {
        "Embedding"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }

    fn build(&mut self, input_shape: &[usize]) -> Result<Vec<usize>> {
        if self.input_dim == 0 || self.output_dim == 0 {
            return Err(Error::InvalidArgument {
                what: format!(
                    "{}: Embedding needs a vocabulary and a width of at least 1, got {} x {}",
                    self.name, self.input_dim, self.output_dim
                ),
            });
        }
        let mut out = input_shape.to_vec();
        out.push(self.output_dim);
        if self.embeddings.is_none() {
            let seed = self.seed.unwrap_or_else(|| name_seed(&self.name));
            let table = uniform(&self.name, seed, &[self.input_dim, self.output_dim], 0.05)?;
            self.embeddings = Some(Variable::new("embeddings", table)?);
        }
        self.output_shape = Some(out.clone());
        Ok(out)
    }

    fn output_shape(&self) -> Option<&[usize]> {
        self.output_shape.as_deref()
    }

    /// Every token id of the data set a whole number in `0..input_dim`, checked before the
    /// first step (the lookup checks each batch too, but can only name its position in the
    /// batch, after earlier steps were applied).
    fn check_input(&self, x: &ArrayViewD<'_, f32>) -> Result<()> {
        let sample = x.shape().get(1..).unwrap_or(&[]);
        let vocab = self.input_dim;
        let ok = |v: f32| v >= 0.0 && v.fract() == 0.0 && (v as usize) < vocab;
        for (row, ids) in x.outer_iter().enumerate() {
            let Some((at, v)) = ids.iter().enumerate().find(|&(_, &v)| !ok(v)) else {
                continue;
            };
            let problem = if !v.is_finite() {
                "is not finite"
            } else if v.fract() != 0.0 {
                "is not a whole number"
            } else if *v < 0.0 {
                "is negative"
            } else {
                "is out of range"
            };
            // The position as an index into the sample (one number for a sequence).
            let mut index = vec![0; sample.len()];
            let mut rest = at;
            for (i, &n) in index.iter_mut().zip(sample).rev() {
                *i = rest % n.max(1);
                rest /= n.max(1);
            }
            let position = match index.as_slice() {
                [p] => p.to_string(),
                more => format!("{more:?}"),
            };
            return Err(Error::InvalidArgument {
                what: format!(
                    "{}: token id {v} in row {row} of the data (position {position}) {problem}: \
                     the vocabulary has {vocab} tokens, ids 0 to {}",
                    self.name,
                    vocab.saturating_sub(1)
                ),
            });
        }
        Ok(())
    }

    fn forward(&self, x: &Tensor<F32>) -> Result<Tensor<P::Compute>> {
        self.lookup(x)
    }

    fn forward_train(&mut self, x: &Tensor<F32>) -> Result<Tensor<P::Compute>> {
        let y = self.lookup(x)?;
        self.saved_ids = Some(x.clone());
        Ok(y)
    }

    fn backward(&mut self, dy: &Tensor<P::Compute>, _need_dx: bool) -> Result<Option<Tensor<F32>>> {
        let ids = saved(&mut self.saved_ids, &self.name)?;
        let table = self
            .embeddings
            .as_mut()
            .ok_or_else(|| not_built(&self.name))?;
        ops::embedding_backward(&ids, dy, table.grad_mut()).map_err(|e| named(&self.name, e))?;
        // Token ids have no gradient.
        Ok(None)
    }

    fn foreign_tensors(&mut self, prefix: &str, out: &mut ForeignTensors) -> Result<()> {
        out.push_renamed(
            prefix,
            &[(self.embeddings.as_ref(), "embeddings", "weight")],
        );
        Ok(())
    }

    fn visit_variables(
        &mut self,
        prefix: &str,
        f: &mut dyn FnMut(&str, &mut Variable) -> Result<()>,
    ) -> Result<()> {
        match self.embeddings.as_mut() {
            Some(e) => f(&format!("{prefix}embeddings"), e),
            None => Ok(()),
        }
    }

    fn saved_bytes(&self) -> usize {
        self.saved_ids.as_ref().map_or(0, Tensor::size_in_bytes)
    }

    fn param_count(&self) -> usize {
        self.embeddings.as_ref().map_or(0, |e| e.value().len())
    }

    fn frozen_param_count(&self) -> usize {
        super::util::frozen_len(&[self.embeddings.as_ref()])
    }
}

/// Learned positional embeddings (keras-nlp's `PositionEmbedding`): a float32 table
/// `embeddings` of `sequence_length × features` (glorot-uniform), whose first `tokens` rows are
/// added to every sample of `[batch, tokens, features]`. A sequence longer than the table is an
/// error naming both lengths.
///
/// ```
/// use mp_core::{MixedFloat16, Tensor, F16};
/// use mp_layers::{Layer, PositionEmbedding};
///
/// let mut pos = PositionEmbedding::<MixedFloat16>::new(16);
/// assert_eq!(pos.build(&[10, 4])?, vec![10, 4]);
/// let err = PositionEmbedding::<MixedFloat16>::new(16).build(&[17, 4]).unwrap_err();
/// assert!(err.to_string().contains("17 tokens"));
/// # Ok::<(), mp_layers::Error>(())
/// ```
pub struct PositionEmbedding<P: PolicyKind> {
    sequence_length: usize,
    seed: Option<u64>,
    name: String,
    output_shape: Option<Vec<usize>>,
    embeddings: Option<Variable>,
    _policy: PhantomData<P>,
}

impl<P: PolicyKind> std::fmt::Debug for PositionEmbedding<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PositionEmbedding")
            .field("name", &self.name)
            .field("sequence_length", &self.sequence_length)
            .field("policy", &P::POLICY)
            .finish()
    }
}

impl<P: PolicyKind> PositionEmbedding<P> {
    /// A table for sequences of up to `sequence_length` tokens.
    pub fn new(sequence_length: usize) -> Self {
        PositionEmbedding {
            sequence_length,
            seed: None,
            name: "position_embedding".into(),
            output_shape: None,
            embeddings: None,
            _policy: PhantomData,
        }
    }

    /// Seeds the initializer (default: a hash of the layer's name).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }
}

impl<P: PolicyKind> Layer for PositionEmbedding<P> {
    type Policy = P;
    type Input = P::Compute;
    type Output = P::Compute;

    fn type_name(&self) -> &'static str {
        "PositionEmbedding"
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
                expected: SEQUENCE,
                got: input_shape.to_vec(),
            });
        };
        if tokens > self.sequence_length || features == 0 {
            return Err(Error::InvalidArgument {
                what: format!(
                    "{}: a sequence of {tokens} tokens of {features} features does not fit the \
                     positional table of {} positions",
                    self.name, self.sequence_length
                ),
            });
        }
        match &self.embeddings {
            Some(e) if e.shape()[1] != features => {
                return Err(Error::IncompatibleShapes {
                    layer: self.name.clone(),
                    previous: "the model input".into(),
                    expected: vec![tokens, e.shape()[1]],
                    got: input_shape.to_vec(),
                });
            }
            Some(_) => {}
            None => {
                let seed = self.seed.unwrap_or_else(|| name_seed(&self.name));
                let shape = [self.sequence_length, features];
                let table =
                    glorot_uniform(&self.name, seed, &shape, self.sequence_length, features)?;
                self.embeddings = Some(Variable::new("embeddings", table)?);
            }
        }
        self.output_shape = Some(input_shape.to_vec());
        Ok(input_shape.to_vec())
    }

    fn output_shape(&self) -> Option<&[usize]> {
        self.output_shape.as_deref()
    }

    fn forward(&self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        let table = self
            .embeddings
            .as_ref()
            .ok_or_else(|| not_built(&self.name))?;
        ops::add_table(x, table.value()).map_err(|e| named(&self.name, e))
    }

    fn forward_train(&mut self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        self.forward(x)
    }

    fn backward(
        &mut self,
        dy: &Tensor<P::Compute>,
        _need_dx: bool,
    ) -> Result<Option<Tensor<P::Compute>>> {
        let table = self
            .embeddings
            .as_mut()
            .ok_or_else(|| not_built(&self.name))?;
        ops::add_table_backward(dy, table.grad_mut()).map_err(|e| named(&self.name, e))?;
        Ok(Some(dy.clone()))
    }

    fn foreign_tensors(&mut self, prefix: &str, out: &mut ForeignTensors) -> Result<()> {
        out.take_flattened();
        if let Some(e) = &self.embeddings {
            let mut to = vec![1];
            to.extend_from_slice(e.shape());
            out.push_reshaped(
                ForeignTensors::name(prefix, "position_embeddings"),
                format!("{prefix}embeddings"),
                e.shape(),
                to,
            );
        }
        Ok(())
    }

    fn visit_variables(
        &mut self,
        prefix: &str,
        f: &mut dyn FnMut(&str, &mut Variable) -> Result<()>,
    ) -> Result<()> {
        match self.embeddings.as_mut() {
            Some(e) => f(&format!("{prefix}embeddings"), e),
            None => Ok(()),
        }
    }

    fn saved_bytes(&self) -> usize {
        0
    }

    fn param_count(&self) -> usize {
        self.embeddings.as_ref().map_or(0, |e| e.value().len())
    }

    fn frozen_param_count(&self) -> usize {
        super::util::frozen_len(&[self.embeddings.as_ref()])
    }
}

/// A learned class token prepended to every sequence (the Vision Transformer's `[class]`):
/// `[batch, tokens, features]` to `[batch, tokens + 1, features]`, with a float32 variable
/// `token` (`features`, zeros as in the ViT paper). Pool it out with
/// [`SequencePooling::class_token`].
pub struct ClassToken<P: PolicyKind> {
    name: String,
    output_shape: Option<Vec<usize>>,
    token: Option<Variable>,
    _policy: PhantomData<P>,
}

impl<P: PolicyKind> std::fmt::Debug for ClassToken<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassToken")
            .field("name", &self.name)
            .field("policy", &P::POLICY)
            .finish()
    }
}

impl<P: PolicyKind> ClassToken<P> {
    /// A class token of the input's width.
    pub fn new() -> Self {
        ClassToken {
            name: "class_token".into(),
            output_shape: None,
            token: None,
            _policy: PhantomData,
        }
    }
}

impl<P: PolicyKind> Default for ClassToken<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: PolicyKind> Layer for ClassToken<P> {
    type Policy = P;
    type Input = P::Compute;
    type Output = P::Compute;

    fn type_name(&self) -> &'static str {
        "ClassToken"
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
                expected: SEQUENCE,
                got: input_shape.to_vec(),
            });
        };
        match &self.token {
            Some(t) if t.shape() != [features] => {
                return Err(Error::IncompatibleShapes {
                    layer: self.name.clone(),
                    previous: "the model input".into(),
                    expected: vec![tokens, t.shape()[0]],
                    got: input_shape.to_vec(),
                });
            }
            Some(_) => {}
            None => {
                self.token = Some(Variable::new("token", Tensor::<F32>::zeros(&[features])?)?);
            }
        }
        let out = vec![tokens + 1, features];
        self.output_shape = Some(out.clone());
        Ok(out)
    }

    fn output_shape(&self) -> Option<&[usize]> {
        self.output_shape.as_deref()
    }

    fn forward(&self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        let token = self.token.as_ref().ok_or_else(|| not_built(&self.name))?;
        ops::prepend_token(x, token.value()).map_err(|e| named(&self.name, e))
    }

    fn forward_train(&mut self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        self.forward(x)
    }

    fn backward(
        &mut self,
        dy: &Tensor<P::Compute>,
        _need_dx: bool,
    ) -> Result<Option<Tensor<P::Compute>>> {
        let token = self.token.as_mut().ok_or_else(|| not_built(&self.name))?;
        let dx =
            ops::prepend_token_backward(dy, token.grad_mut()).map_err(|e| named(&self.name, e))?;
        Ok(Some(dx))
    }

    fn foreign_tensors(&mut self, prefix: &str, out: &mut ForeignTensors) -> Result<()> {
        out.take_flattened();
        if let Some(t) = &self.token {
            let mut to = vec![1, 1];
            to.extend_from_slice(t.shape());
            out.push_reshaped(
                ForeignTensors::name(prefix, "cls_token"),
                format!("{prefix}token"),
                t.shape(),
                to,
            );
        }
        Ok(())
    }

    fn visit_variables(
        &mut self,
        prefix: &str,
        f: &mut dyn FnMut(&str, &mut Variable) -> Result<()>,
    ) -> Result<()> {
        match self.token.as_mut() {
            Some(t) => f(&format!("{prefix}token"), t),
            None => Ok(()),
        }
    }

    fn saved_bytes(&self) -> usize {
        0
    }

    fn param_count(&self) -> usize {
        self.token.as_ref().map_or(0, |t| t.value().len())
    }

    fn frozen_param_count(&self) -> usize {
        super::util::frozen_len(&[self.token.as_ref()])
    }
}

/// Pooling over the tokens: `[batch, tokens, features]` to `[batch, features]`, either the first
/// token ([`SequencePooling::class_token`], after a [`ClassToken`]) or the mean over the tokens
/// ([`SequencePooling::mean`], Keras's `GlobalAveragePooling1D`), in float32, rounded once.
pub struct SequencePooling<P: PolicyKind> {
    how: Pool,
    name: String,
    input_shape: Option<Vec<usize>>,
    output_shape: Option<Vec<usize>>,
    _policy: PhantomData<P>,
}

impl<P: PolicyKind> std::fmt::Debug for SequencePooling<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequencePooling")
            .field("name", &self.name)
            .field("how", &self.how)
            .field("policy", &P::POLICY)
            .finish()
    }
}

impl<P: PolicyKind> SequencePooling<P> {
    /// The first token.
    pub fn class_token() -> Self {
        Self::with(Pool::First, "class_token_pooling")
    }

    /// The mean over the tokens.
    pub fn mean() -> Self {
        Self::with(Pool::Mean, "global_average_pooling_1d")
    }

    fn with(how: Pool, name: &str) -> Self {
        SequencePooling {
            how,
            name: name.into(),
            input_shape: None,
            output_shape: None,
            _policy: PhantomData,
        }
    }
}

impl<P: PolicyKind> Layer for SequencePooling<P> {
    type Policy = P;
    type Input = P::Compute;
    type Output = P::Compute;

    fn type_name(&self) -> &'static str {
        match self.how {
            Pool::First => "ClassTokenPooling",
            Pool::Mean => "GlobalAveragePooling1D",
        }
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
                expected: SEQUENCE,
                got: input_shape.to_vec(),
            });
        };
        if tokens == 0 {
            return Err(Error::InvalidArgument {
                what: format!("{}: cannot pool a sequence of 0 tokens", self.name),
            });
        }
        self.input_shape = Some(input_shape.to_vec());
        self.output_shape = Some(vec![features]);
        Ok(vec![features])
    }

    fn output_shape(&self) -> Option<&[usize]> {
        self.output_shape.as_deref()
    }

    fn forward(&self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        ops::sequence_pool(self.how, x).map_err(|e| named(&self.name, e))
    }

    fn forward_train(&mut self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        self.forward(x)
    }

    fn backward(
        &mut self,
        dy: &Tensor<P::Compute>,
        _need_dx: bool,
    ) -> Result<Option<Tensor<P::Compute>>> {
        let tokens = self
            .input_shape
            .as_ref()
            .map(|s| s[0])
            .ok_or_else(|| not_built(&self.name))?;
        let dx =
            ops::sequence_pool_backward(self.how, dy, tokens).map_err(|e| named(&self.name, e))?;
        Ok(Some(dx))
    }

    fn visit_variables(
        &mut self,
        _prefix: &str,
        _f: &mut dyn FnMut(&str, &mut Variable) -> Result<()>,
    ) -> Result<()> {
        Ok(())
    }

    fn saved_bytes(&self) -> usize {
        0
    }

    fn param_count(&self) -> usize {
        0
    }
}
