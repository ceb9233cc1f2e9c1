//! The `Layer` and `Model` traits, and the dtype conversions between layers.

use std::fmt::Write as _;
use std::ops::Deref;

use mp_core::{DTypeKind, F32, Policy, PolicyKind, Tensor, Variable};

use mp_kernels::ops;

use crate::checkpoint::{ForeignTensors, Transform};
use crate::error::{Error, Result};

/// The compute dtype (marker type) of layer `L`.
pub type Compute<L> = <<L as Layer>::Policy as PolicyKind>::Compute;

/// The dtype of layer `L`'s input: its compute dtype, except for layers that take something
/// else (an [`Embedding`](crate::Embedding) takes integer token ids, exact in float32).
pub type Input<L> = <L as Layer>::Input;

/// One row of a model summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SummaryRow {
    /// The layer's path (`dense_1`, or `block/dense_1` inside a nested model).
    pub name: String,
    /// The layer's type (`Dense`).
    pub type_name: String,
    /// The layer's dtype policy.
    pub policy: Policy,
    /// The output shape per sample, `None` before `build`.
    pub output_shape: Option<Vec<usize>>,
    /// Parameters, trainable and not (Keras's "Param #").
    pub params: usize,
    /// Of which non-trainable (BatchNormalization's moving statistics).
    pub non_trainable: usize,
    /// Of which trainable but [frozen](Model::freeze).
    pub frozen: usize,
}

/// A layer: computes in its policy's compute dtype, keeps float32 variables, and knows its own
/// backward pass.
///
/// Shapes given to [`Layer::build`] are per sample (without the batch dimension); tensors given
/// to `forward` have the batch as their first dimension.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an mp layer",
    note = "implement `mp_layers::Layer` for it, or use `Dense`, `Softmax`, `Activation`, `Flatten`"
)]
pub trait Layer: Send + 'static {
    /// The layer's dtype policy.
    type Policy: PolicyKind;
    /// The dtype of the layer's input: the compute dtype (`P::Compute`) for every layer but
    /// those whose input is not an activation (token ids, kept in float32 so they stay exact).
    /// A model's input is its first layer's.
    type Input: DTypeKind;
    /// The dtype of the layer's output (the compute dtype for most layers).
    type Output: DTypeKind;

    /// The layer's type, for summaries (`Dense`).
    fn type_name(&self) -> &'static str;

    /// The layer's name (`dense_1`); a model names its layers after their fields.
    fn name(&self) -> &str;

    /// Renames the layer.
    fn set_name(&mut self, name: &str);

    /// Allocates the variables for inputs of shape `input_shape` (per sample) and returns the
    /// output shape. Building twice with the same shape keeps the variables; with another shape
    /// it is an error naming both shapes.
    fn build(&mut self, input_shape: &[usize]) -> Result<Vec<usize>>;

    /// The output shape per sample, once built.
    fn output_shape(&self) -> Option<&[usize]>;

    /// Checks the inputs of a whole data set before `fit`, `evaluate` or `predict` runs a
    /// step: `x` is `[samples, ...]`, float32 host values as given to them. The default takes
    /// any value; a layer whose input is not an activation checks it here
    /// ([`Embedding`](crate::Embedding): every token id a whole number below its vocabulary),
    /// and a `#[model]` asks its first layer.
    ///
    /// # Errors
    /// A value the layer cannot take, naming the layer, the value, its row of the data (the
    /// sample) and its position in the sample.
    fn check_input(&self, x: &ndarray::ArrayViewD<'_, f32>) -> Result<()> {
        let _ = x;
        Ok(())
    }

    /// Inference: computes the output and keeps nothing.
    fn forward(&self, x: &Tensor<Self::Input>) -> Result<Tensor<Self::Output>>;

    /// Training: computes the output and keeps what [`Layer::backward`] needs.
    fn forward_train(&mut self, x: &Tensor<Self::Input>) -> Result<Tensor<Self::Output>>;

    /// Given the gradient of the loss with respect to the last `forward_train` output, adds the
    /// gradients of the variables (in float32) to their `grad` and returns the gradient with
    /// respect to the input when `need_dx` (the first layer of a model needs none).
    fn backward(
        &mut self,
        dy: &Tensor<Self::Output>,
        need_dx: bool,
    ) -> Result<Option<Tensor<Self::Input>>>;

    /// The elementwise activation this layer is, when a preceding layer can apply it to its own
    /// output in the same pass ([`Layer::forward_train_fused`]); a `#[model]` then runs the two
    /// fields fused in training. ReLU `Activation`s answer; every other layer `None`.
    fn fusable_activation(&self) -> Option<mp_kernels::activation::Activation> {
        None
    }

    /// Training forward with `act` applied to the output in the same pass, keeping what the
    /// backward of both needs (its own backward then applies `act`'s gradient too), where this
    /// layer can (`BatchNormalization` with ReLU, on the CPU); `Ok(None)`, nothing computed and
    /// nothing kept, where it cannot: the model then runs the two layers one after the other.
    /// The result is what [`Layer::forward_train`] then the activation would give, bit for bit.
    fn forward_train_fused(
        &mut self,
        x: &Tensor<Self::Input>,
        act: mp_kernels::activation::Activation,
    ) -> Result<Option<Tensor<Self::Output>>> {
        let _ = (x, act);
        Ok(None)
    }

    /// Training forward of an activation whose work the preceding layer did
    /// ([`Layer::forward_train_fused`]): `x` is already its output. It keeps nothing, and its
    /// next backward hands `dy` through unchanged (the preceding layer applies the gradient).
    /// Only layers with a [`Layer::fusable_activation`] are asked.
    fn forward_train_absorbed(&mut self, x: &Tensor<Self::Input>) -> Result<Tensor<Self::Output>> {
        let _ = x;
        Err(Error::InvalidState {
            layer: self.name().to_string(),
            what: "forward_train_absorbed called on a layer that fuses into no other".into(),
        })
    }

    /// Whether the layer ends in a softmax computed in float32, so a cross-entropy loss can hand
    /// it the gradient with respect to the softmax's *input* (`p - onehot`, the fused form).
    fn ends_in_softmax(&self) -> bool {
        false
    }

    /// Backward given the gradient with respect to the final softmax's input (only called when
    /// [`Layer::ends_in_softmax`] is true).
    fn backward_from_softmax_input(
        &mut self,
        dz: &Tensor<F32>,
        need_dx: bool,
    ) -> Result<Option<Tensor<Self::Input>>> {
        let _ = (dz, need_dx);
        Err(Error::InvalidState {
            layer: self.name().to_string(),
            what: "backward_from_softmax_input called on a layer that does not end in softmax"
                .into(),
        })
    }

    /// Calls `f` with each variable and its path (`prefix` + `kernel`, ...), in a fixed order.
    fn visit_variables(
        &mut self,
        prefix: &str,
        f: &mut dyn FnMut(&str, &mut Variable) -> Result<()>,
    ) -> Result<()>;

    /// Describes this layer's variables in a foreign weights layout (`out.layout()`): their
    /// names, shapes and element orders there. `prefix` is the layer's mp path prefix
    /// (`block_1/conv_a/`); [`ForeignTensors::name`] turns it into the foreign prefix.
    ///
    /// The default exports each variable as it is, named by its path with `/` as `.`: right for
    /// layers whose variables have no other convention. Layers with a PyTorch counterpart
    /// (`Dense`, `Conv2D`, the normalizations, embeddings, attention) rename and rearrange;
    /// `#[model]` calls its fields in order. Every layer with variables calls
    /// [`ForeignTensors::take_flattened`].
    fn foreign_tensors(&mut self, prefix: &str, out: &mut ForeignTensors) -> Result<()> {
        let mut found = vec![];
        self.visit_variables(prefix, &mut |path, v| {
            found.push((path.to_string(), v.shape().to_vec()));
            Ok(())
        })?;
        if !found.is_empty() {
            out.take_flattened();
        }
        for (path, shape) in found {
            out.push(path.replace('/', "."), path, &shape, Transform::Same);
        }
        Ok(())
    }

    /// Bytes of activations kept by the last `forward_train` for backward.
    fn saved_bytes(&self) -> usize;

    /// Parameters, trainable and not (Keras's "Param #").
    fn param_count(&self) -> usize;

    /// Of [`Layer::param_count`], the non-trainable ones (state the layer updates itself).
    fn non_trainable_param_count(&self) -> usize {
        0
    }

    /// Of [`Layer::param_count`], the trainable ones that are [frozen](Model::freeze).
    fn frozen_param_count(&self) -> usize {
        0
    }

    /// Called by the trainer before each training step's `forward_train` with the step's number
    /// (counted from 0 over the whole run, saved in checkpoints): layers that draw random
    /// numbers (Dropout) seed them from it, so a resumed run draws what an uninterrupted one
    /// would. A custom training loop calls it with its own step count.
    fn begin_step(&mut self, step: u64) {
        let _ = step;
    }

    /// Called once per training step after the optimizer decided: `applied` is false when the
    /// step was skipped for non-finite gradients. Layers with state of their own
    /// (BatchNormalization's moving statistics) commit what the step's `forward_train`
    /// computed only when it was applied, so a skipped step leaves them bit-identical. A custom
    /// training loop calls it after `apply_gradients`.
    fn end_step(&mut self, applied: bool) -> Result<()> {
        let _ = applied;
        Ok(())
    }

    /// Appends this layer's summary rows: one named `path` for a plain layer; one per layer for
    /// a model, named `path/field`.
    fn summary_rows(&self, path: &str, rows: &mut Vec<SummaryRow>) {
        rows.push(SummaryRow {
            name: path.to_string(),
            type_name: self.type_name().to_string(),
            policy: <Self::Policy as PolicyKind>::POLICY,
            output_shape: self.output_shape().map(<[usize]>::to_vec),
            params: self.param_count(),
            non_trainable: self.non_trainable_param_count(),
            frozen: self.frozen_param_count(),
        });
    }
}

/// A whole model: a layer whose output is float32, with Keras's model conveniences.
///
/// `#[model]` implements it only when the last layer's output dtype is float32: the rule is a
/// trait bound, so using a model whose last layer would output float16 or bfloat16 as a `Model`
/// (`fit`, `evaluate`, `predict`, `summary`) does not compile, and the error names the field to
/// annotate with `#[dtype = "float32"]`.
pub trait Model: Layer {
    /// Inference: the model's float32 output. (`#[model]` guarantees the output dtype is
    /// float32, so the conversion is a no-op.)
    fn forward_f32(&self, x: &Tensor<Self::Input>) -> Result<Tensor<F32>> {
        convert::<Self::Output, F32>(self.forward(x)?)
    }

    /// Training forward: the float32 output; every layer keeps what backward needs.
    fn forward_train_f32(&mut self, x: &Tensor<Self::Input>) -> Result<Tensor<F32>> {
        convert::<Self::Output, F32>(self.forward_train(x)?)
    }

    /// Backward from the gradient of the loss with respect to the float32 output. The model's
    /// input needs no gradient, so the first layer skips computing one.
    fn backward_f32(&mut self, dy: &Tensor<F32>) -> Result<()> {
        let dy = convert_ref::<F32, Self::Output>(dy)?;
        self.backward(&dy, false).map(|_| ())
    }

    /// Backward from the gradient with respect to the input of the final float32 softmax (the
    /// fused cross-entropy gradient `p - onehot`); only when [`Layer::ends_in_softmax`].
    fn backward_from_softmax_input_f32(&mut self, dz: &Tensor<F32>) -> Result<()> {
        self.backward_from_softmax_input(dz, false).map(|_| ())
    }

    /// The model's name (the struct's name).
    fn model_name(&self) -> &'static str {
        self.type_name()
    }

    /// The Keras-style summary table: name, type, output shape, parameters, dtype policy.
    fn summary(&self) -> String {
        let mut rows = vec![];
        self.summary_rows("", &mut rows);
        format_summary(
            self.model_name(),
            <Self::Policy as PolicyKind>::POLICY,
            &rows,
        )
    }

    /// Copies of every variable's value, with its path, in a fixed order.
    fn get_weights(&mut self) -> Result<Vec<(String, Tensor<F32>)>> {
        let mut out = vec![];
        self.visit_variables("", &mut |path, v| {
            out.push((path.to_string(), v.value().clone()));
            Ok(())
        })?;
        Ok(out)
    }

    /// Sets every variable from `weights` (as returned by [`Model::get_weights`]). Every name,
    /// shape and value is checked before anything is written, so a mismatch, a NaN or infinite
    /// value, or a negative variance leaves the model unchanged.
    ///
    /// # Errors
    /// [`Error::Weights`] naming every mismatching name or shape; [`mp_core::Error::InvalidValue`]
    /// naming the variable path and the first value outside its [domain](mp_core::Domain).
    fn set_weights(&mut self, weights: &[(String, Tensor<F32>)]) -> Result<()> {
        let mut expected = vec![];
        self.visit_variables("", &mut |path, v| {
            expected.push((path.to_string(), v.shape().to_vec(), v.domain()));
            Ok(())
        })?;
        let mut problems = vec![];
        if expected.len() != weights.len() {
            problems.push(format!(
                "the model has {} variables, {} were given",
                expected.len(),
                weights.len()
            ));
        }
        for ((name, shape, _), (given_name, given)) in expected.iter().zip(weights) {
            if name != given_name {
                problems.push(format!("expected variable {name:?}, got {given_name:?}"));
            } else if shape.as_slice() != given.shape() {
                problems.push(format!(
                    "variable {name:?} has shape {shape:?}, the given value has {:?}",
                    given.shape()
                ));
            }
        }
        if !problems.is_empty() {
            return Err(Error::Weights { problems });
        }
        for ((name, _, domain), (_, given)) in expected.iter().zip(weights) {
            if given.device().is_cpu() {
                domain.check("set_weights", name, given.as_slice()?)?;
            } else {
                let host = given.to_device(mp_core::Device::Cpu)?;
                domain.check("set_weights", name, host.as_slice()?)?;
            }
        }
        let mut it = weights.iter();
        self.visit_variables("", &mut |_, v| {
            let (_, w) = it.next().expect("counts checked above");
            *v.value_mut() = w.to_device(v.value().device())?;
            Ok(())
        })
    }

    /// Sets every variable's gradient to zero.
    fn zero_grad(&mut self) -> Result<()> {
        self.visit_variables("", &mut |_, v| Ok(v.zero_grad()?))
    }

    /// Freezes the layer or nested block at `path` for fine-tuning: a field (`conv_1`), a
    /// nested model's field (`block_1/conv_a`), or `""` for the whole model. Its variables keep
    /// their values through training: `Dense` and `Conv2D` skip their weight-gradient GEMMs,
    /// `BatchNormalization` normalises with its moving statistics (and leaves them as they are),
    /// optimizers neither step them nor keep slots or decay for them. The frozen set is saved
    /// in checkpoints and must agree across ranks. Returns how many variables `path` holds.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `path` and the model's layers when no variable is at
    /// `path`.
    fn freeze(&mut self, path: &str) -> Result<usize> {
        set_frozen(self, path, true)
    }

    /// Unfreezes the layer or nested block at `path` (see [`Model::freeze`]): it trains again.
    fn unfreeze(&mut self, path: &str) -> Result<usize> {
        set_frozen(self, path, false)
    }

    /// The paths of the frozen variables, in the model's order.
    fn frozen_variables(&mut self) -> Result<Vec<String>> {
        let mut out = vec![];
        self.visit_variables("", &mut |path, v| {
            if v.frozen() {
                out.push(path.to_string());
            }
            Ok(())
        })?;
        Ok(out)
    }
}

/// Sets the frozen flag of every variable at `path` (see [`Model::freeze`]).
fn set_frozen<M: Model + ?Sized>(model: &mut M, path: &str, frozen: bool) -> Result<usize> {
    let path = path.trim_end_matches('/');
    let mut matched = 0;
    let mut layers: Vec<String> = vec![];
    model.visit_variables("", &mut |var, v| {
        let layer = var.rsplit_once('/').map_or("", |(l, _)| l);
        if !layers.iter().any(|l| l == layer) {
            layers.push(layer.to_string());
        }
        let inside = path.is_empty()
            || var == path
            || var
                .strip_prefix(path)
                .is_some_and(|rest| rest.starts_with('/'));
        if inside {
            v.set_frozen(frozen);
            matched += 1;
        }
        Ok(())
    })?;
    if matched == 0 {
        let what = if layers.is_empty() {
            "the model has no variables: build it first".to_string()
        } else {
            format!("its layers with variables are {}", layers.join(", "))
        };
        return Err(Error::InvalidArgument {
            what: format!(
                "{}: no layer of {} is at path {path:?}: {what}",
                if frozen { "freeze" } else { "unfreeze" },
                model.model_name()
            ),
        });
    }
    Ok(matched)
}

/// Formats summary rows as Keras does.
pub fn format_summary(model_name: &str, policy: Policy, rows: &[SummaryRow]) -> String {
    let shape = |s: &Option<Vec<usize>>| match s {
        Some(s) => {
            let dims: Vec<String> = s.iter().map(|d| d.to_string()).collect();
            format!("(None, {})", dims.join(", "))
        }
        None => "(unbuilt)".to_string(),
    };
    let w0 = rows
        .iter()
        .map(|r| r.name.len() + r.type_name.len() + 3)
        .max()
        .unwrap_or(0)
        .max(20);
    let w1 = rows
        .iter()
        .map(|r| shape(&r.output_shape).len())
        .max()
        .unwrap_or(0)
        .max(14);
    let w2 = 16;
    let line = "_".repeat(w0 + w1 + w2 + 12);
    let mut out = String::new();
    let _ = writeln!(out, "Model: \"{model_name}\" (policy {})", policy.name());
    let _ = writeln!(out, "{line}");
    let _ = writeln!(
        out,
        " {:<w0$}  {:<w1$}  {:>8}  {:<w2$}",
        "Layer (type)", "Output Shape", "Param #", "Dtype policy"
    );
    let _ = writeln!(out, "{}", "=".repeat(line.len()));
    for r in rows {
        let name = format!("{} ({})", r.name, r.type_name);
        let _ = writeln!(
            out,
            " {:<w0$}  {:<w1$}  {:>8}  {:<w2$}",
            name,
            shape(&r.output_shape),
            r.params,
            r.policy.name()
        );
    }
    let total: usize = rows.iter().map(|r| r.params).sum();
    let _ = writeln!(out, "{}", "=".repeat(line.len()));
    let _ = writeln!(
        out,
        "Total params: {total} ({:.2} MB in float32)",
        total as f64 * 4.0 / 1e6
    );
    let non_trainable: usize = rows.iter().map(|r| r.non_trainable).sum();
    let frozen: usize = rows.iter().map(|r| r.frozen).sum();
    let _ = writeln!(out, "Trainable params: {}", total - non_trainable - frozen);
    let _ = writeln!(out, "Non-trainable params: {non_trainable}");
    if frozen > 0 {
        let _ = writeln!(out, "Frozen params: {frozen} (trainable, held fixed)");
    }
    let _ = write!(out, "{line}");
    out
}

/// A tensor converted to another dtype, borrowed when no conversion was needed.
#[derive(Debug)]
pub enum Converted<'a, D: DTypeKind> {
    /// The input had the target dtype already.
    Borrowed(&'a Tensor<D>),
    /// A converted copy.
    Owned(Tensor<D>),
}

impl<D: DTypeKind> Deref for Converted<'_, D> {
    type Target = Tensor<D>;
    fn deref(&self) -> &Tensor<D> {
        match self {
            Converted::Borrowed(t) => t,
            Converted::Owned(t) => t,
        }
    }
}

/// `x` itself when `A` and `B` are one dtype (decided from their `DTYPE` constants), else `None`.
pub fn same_dtype<A: DTypeKind, B: DTypeKind>(x: &Tensor<A>) -> Option<&Tensor<B>> {
    if A::DTYPE == B::DTYPE {
        // SAFETY: `DTypeKind` is sealed with exactly one marker type per `DType`, so equal
        // `DTYPE`s mean `A` and `B` are the same type and `Tensor<A>` is `Tensor<B>`.
        Some(unsafe { &*(x as *const Tensor<A>).cast::<Tensor<B>>() })
    } else {
        None
    }
}

/// `x` as dtype `B`: the same tensor when `A` is `B`, else a converted copy on the same device
/// (round to nearest even, NaN and infinities kept). This is the cast a layer applies to its
/// input.
pub fn convert_ref<A: DTypeKind, B: DTypeKind>(x: &Tensor<A>) -> Result<Converted<'_, B>> {
    match same_dtype::<A, B>(x) {
        Some(same) => Ok(Converted::Borrowed(same)),
        None => Ok(Converted::Owned(ops::cast(x)?)),
    }
}

/// `x` as dtype `B`, by value: moved when `A` is `B`, else converted.
pub fn convert<A: DTypeKind, B: DTypeKind>(x: Tensor<A>) -> Result<Tensor<B>> {
    if A::DTYPE == B::DTYPE {
        let x = std::mem::ManuallyDrop::new(x);
        // SAFETY: as in `same_dtype`, `A` and `B` are the same type; `x` is not dropped, so the
        // value is moved out exactly once.
        return Ok(unsafe { std::ptr::read((&*x as *const Tensor<A>).cast::<Tensor<B>>()) });
    }
    Ok(ops::cast(&x)?)
}

/// `Some(x)` converted to `B`, for gradients that may be absent.
pub fn convert_opt<A: DTypeKind, B: DTypeKind>(x: Option<Tensor<A>>) -> Result<Option<Tensor<B>>> {
    x.map(convert).transpose()
}
