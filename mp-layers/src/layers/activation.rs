//! Activation layers (`Activation`, `Softmax`) and `Flatten`.

use std::marker::PhantomData;
use std::str::FromStr;

use mp_core::{F32, PolicyKind, Tensor, Variable};
use mp_kernels::activation::Activation as Act;
use mp_kernels::ops;

use crate::checkpoint::ForeignTensors;
use crate::error::{Error, Result};
use crate::layer::{Layer, convert_ref};

/// An activation function, by Keras name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActivationKind {
    /// The identity.
    Linear,
    /// `max(x, 0)`.
    Relu,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `tanh(x)`.
    Tanh,
    /// Softmax over the last axis, computed in float32.
    Softmax,
    /// GELU, exact: `x Φ(x)` (Keras's `gelu`, PyTorch's `approximate='none'`), float32 math.
    Gelu,
    /// GELU in its tanh form (Keras's `gelu` with `approximate=True`, PyTorch's
    /// `approximate='tanh'`), float32 math.
    GeluTanh,
}

impl ActivationKind {
    /// The Keras name.
    pub fn name(self) -> &'static str {
        match self {
            ActivationKind::Linear => "linear",
            ActivationKind::Relu => "relu",
            ActivationKind::Sigmoid => "sigmoid",
            ActivationKind::Tanh => "tanh",
            ActivationKind::Softmax => "softmax",
            ActivationKind::Gelu => "gelu",
            ActivationKind::GeluTanh => "gelu_tanh",
        }
    }

    fn gelu(self) -> Option<mp_kernels::gelu::Gelu> {
        match self {
            ActivationKind::Gelu => Some(mp_kernels::gelu::Gelu::Exact),
            ActivationKind::GeluTanh => Some(mp_kernels::gelu::Gelu::Tanh),
            _ => None,
        }
    }

    fn elementwise(self) -> Option<Act> {
        match self {
            ActivationKind::Linear => Some(Act::Linear),
            ActivationKind::Relu => Some(Act::Relu),
            ActivationKind::Sigmoid => Some(Act::Sigmoid),
            ActivationKind::Tanh => Some(Act::Tanh),
            ActivationKind::Softmax | ActivationKind::Gelu | ActivationKind::GeluTanh => None,
        }
    }
}

impl FromStr for ActivationKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "linear" => ActivationKind::Linear,
            "relu" => ActivationKind::Relu,
            "sigmoid" => ActivationKind::Sigmoid,
            "tanh" => ActivationKind::Tanh,
            "softmax" => ActivationKind::Softmax,
            "gelu" => ActivationKind::Gelu,
            "gelu_tanh" => ActivationKind::GeluTanh,
            _ => {
                return Err(Error::InvalidArgument {
                    what: format!(
                        "unknown activation {s:?}: valid activations are \"linear\", \"relu\", \
                         \"sigmoid\", \"tanh\", \"softmax\", \"gelu\" and \"gelu_tanh\""
                    ),
                });
            }
        })
    }
}

/// An activation's output in the compute dtype and, for softmax, its float32 probabilities.
type Applied<P> = (Tensor<<P as PolicyKind>::Compute>, Option<Tensor<F32>>);

/// Applies an activation function, like Keras's `Activation` layer.
///
/// The output has the compute dtype; sigmoid, tanh and softmax do their math in float32.
pub struct Activation<P: PolicyKind> {
    kind: ActivationKind,
    name: String,
    shape: Option<Vec<usize>>,
    /// What backward needs: the output (relu, sigmoid, tanh), or the input (GELU).
    saved_y: Option<Tensor<P::Compute>>,
    /// Softmax keeps its float32 output.
    saved_p: Option<Tensor<F32>>,
    /// The last `forward_train` was done by the preceding layer
    /// ([`Layer::forward_train_absorbed`]): backward hands the gradient through.
    absorbed: bool,
    _policy: PhantomData<P>,
}

impl<P: PolicyKind> std::fmt::Debug for Activation<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activation")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("policy", &P::POLICY)
            .finish()
    }
}

impl<P: PolicyKind> Activation<P> {
    /// An activation layer of the given kind.
    pub fn new(kind: ActivationKind) -> Self {
        Activation {
            kind,
            name: kind.name().to_string(),
            shape: None,
            saved_y: None,
            saved_p: None,
            absorbed: false,
            _policy: PhantomData,
        }
    }

    /// An activation layer from a Keras name (`"relu"`, `"softmax"`, ...).
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(Self::new(name.parse()?))
    }

    /// The identity.
    pub fn linear() -> Self {
        Self::new(ActivationKind::Linear)
    }
    /// ReLU.
    pub fn relu() -> Self {
        Self::new(ActivationKind::Relu)
    }
    /// The logistic sigmoid.
    pub fn sigmoid() -> Self {
        Self::new(ActivationKind::Sigmoid)
    }
    /// tanh.
    pub fn tanh() -> Self {
        Self::new(ActivationKind::Tanh)
    }
    /// Softmax over the last axis (float32 math).
    pub fn softmax() -> Self {
        Self::new(ActivationKind::Softmax)
    }
    /// GELU, exact (float32 math).
    pub fn gelu() -> Self {
        Self::new(ActivationKind::Gelu)
    }
    /// GELU, tanh form (float32 math).
    pub fn gelu_tanh() -> Self {
        Self::new(ActivationKind::GeluTanh)
    }

    /// The activation function.
    pub fn kind(&self) -> ActivationKind {
        self.kind
    }

    fn softmax_f32(&self, x: &Tensor<P::Compute>) -> Result<Tensor<F32>> {
        if x.rank() == 0 {
            return Err(Error::ShapeMismatch {
                layer: self.name.clone(),
                expected: "(batch, classes)".into(),
                got: x.shape().to_vec(),
            });
        }
        Ok(ops::softmax(x)?)
    }

    /// The activation's output and, for softmax, the float32 probabilities kept for backward.
    fn apply(&self, x: &Tensor<P::Compute>) -> Result<Applied<P>> {
        if let Some(form) = self.kind.gelu() {
            return Ok((ops::gelu(form, x)?, None));
        }
        match self.kind.elementwise() {
            Some(act) => Ok((ops::activation(act, x)?, None)),
            None => {
                let p = self.softmax_f32(x)?;
                let y = crate::layer::convert::<F32, P::Compute>(p.clone())?;
                Ok((y, Some(p)))
            }
        }
    }
}

impl<P: PolicyKind> Layer for Activation<P> {
    type Policy = P;
    type Input = P::Compute;
    type Output = P::Compute;

    fn type_name(&self) -> &'static str {
        "Activation"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }
    fn build(&mut self, input_shape: &[usize]) -> Result<Vec<usize>> {
        if self.kind == ActivationKind::Softmax && input_shape.is_empty() {
            return Err(Error::InputRank {
                layer: self.name.clone(),
                previous: "the model input".into(),
                expected: crate::layers::AT_LEAST_ONE_AXIS,
                got: vec![],
            });
        }
        self.shape = Some(input_shape.to_vec());
        Ok(input_shape.to_vec())
    }
    fn output_shape(&self) -> Option<&[usize]> {
        self.shape.as_deref()
    }
    fn forward(&self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        Ok(self.apply(x)?.0)
    }
    fn forward_train(&mut self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        self.absorbed = false;
        let (y, p) = self.apply(x)?;
        match p {
            Some(p) => self.saved_p = Some(p),
            // GELU's slope is a function of its input (a shared, O(1) copy).
            None if self.kind.gelu().is_some() => self.saved_y = Some(x.clone()),
            None if self.kind != ActivationKind::Linear => self.saved_y = Some(y.clone()),
            None => self.saved_y = None,
        }
        Ok(y)
    }
    fn backward(
        &mut self,
        dy: &Tensor<P::Compute>,
        _need_dx: bool,
    ) -> Result<Option<Tensor<P::Compute>>> {
        if std::mem::take(&mut self.absorbed) {
            // The preceding layer applies this activation's gradient.
            return Ok(Some(dy.clone()));
        }
        if let Some(form) = self.kind.gelu() {
            let x = self
                .saved_y
                .take()
                .ok_or_else(|| missing_forward(&self.name))?;
            return Ok(Some(ops::gelu_backward(form, dy, &x)?));
        }
        match self.kind.elementwise() {
            Some(Act::Linear) => Ok(Some(dy.clone())),
            Some(act) => {
                let y = self
                    .saved_y
                    .take()
                    .ok_or_else(|| missing_forward(&self.name))?;
                Ok(Some(ops::activation_backward(act, dy, &y)?))
            }
            None => {
                let p = self
                    .saved_p
                    .take()
                    .ok_or_else(|| missing_forward(&self.name))?;
                let dy32 = convert_ref::<P::Compute, F32>(dy)?;
                let dx = ops::softmax_backward(&p, &dy32)?;
                Ok(Some(crate::layer::convert::<F32, P::Compute>(dx)?))
            }
        }
    }
    fn ends_in_softmax(&self) -> bool {
        self.kind == ActivationKind::Softmax && P::POLICY == mp_core::Policy::Float32
    }
    fn backward_from_softmax_input(
        &mut self,
        dz: &Tensor<F32>,
        _need_dx: bool,
    ) -> Result<Option<Tensor<P::Compute>>> {
        if !self.ends_in_softmax() {
            return Err(Error::InvalidState {
                layer: self.name.clone(),
                what: "backward_from_softmax_input needs a float32 softmax".into(),
            });
        }
        self.saved_p = None;
        Ok(Some(crate::layer::convert::<F32, P::Compute>(dz.clone())?))
    }
    fn foreign_tensors(&mut self, prefix: &str, out: &mut ForeignTensors) -> Result<()> {
        // No variables; GELU's form is what PyTorch's `approximate` argument needs.
        match self.kind {
            ActivationKind::Gelu => out.hyperparameter(prefix, "approximate", "none"),
            ActivationKind::GeluTanh => out.hyperparameter(prefix, "approximate", "tanh"),
            _ => {}
        }
        Ok(())
    }

    fn visit_variables(
        &mut self,
        _prefix: &str,
        _f: &mut dyn FnMut(&str, &mut Variable) -> Result<()>,
    ) -> Result<()> {
        Ok(())
    }
    fn fusable_activation(&self) -> Option<Act> {
        (self.kind.elementwise() == Some(Act::Relu)).then_some(Act::Relu)
    }
    fn forward_train_absorbed(&mut self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        if self.fusable_activation().is_none() {
            return Err(Error::InvalidState {
                layer: self.name.clone(),
                what: format!("a {:?} activation cannot be absorbed", self.kind),
            });
        }
        self.saved_y = None;
        self.saved_p = None;
        self.absorbed = true;
        Ok(x.clone())
    }
    fn saved_bytes(&self) -> usize {
        self.saved_y.as_ref().map_or(0, Tensor::size_in_bytes)
            + self.saved_p.as_ref().map_or(0, Tensor::size_in_bytes)
    }
    fn param_count(&self) -> usize {
        0
    }
}

fn missing_forward(layer: &str) -> Error {
    Error::InvalidState {
        layer: layer.to_string(),
        what: "backward called without a preceding forward_train".into(),
    }
}

/// Softmax over the last axis, computed in float32 whatever the policy: the usual last layer of
/// a classifier. Put it under `#[dtype = "float32"]` so the model's output is float32.
pub struct Softmax<P: PolicyKind>(Activation<P>);

impl<P: PolicyKind> std::fmt::Debug for Softmax<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Softmax")
            .field("name", &self.0.name)
            .field("policy", &P::POLICY)
            .finish()
    }
}

impl<P: PolicyKind> Softmax<P> {
    /// A softmax layer.
    pub fn new() -> Self {
        let mut a = Activation::softmax();
        a.name = "softmax".into();
        Softmax(a)
    }
}

impl<P: PolicyKind> Default for Softmax<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: PolicyKind> Layer for Softmax<P> {
    type Policy = P;
    type Input = P::Compute;
    type Output = P::Compute;

    fn type_name(&self) -> &'static str {
        "Softmax"
    }
    fn name(&self) -> &str {
        self.0.name()
    }
    fn set_name(&mut self, name: &str) {
        self.0.set_name(name)
    }
    fn build(&mut self, input_shape: &[usize]) -> Result<Vec<usize>> {
        self.0.build(input_shape)
    }
    fn output_shape(&self) -> Option<&[usize]> {
        self.0.output_shape()
    }
    fn forward(&self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        self.0.forward(x)
    }
    fn forward_train(&mut self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        self.0.forward_train(x)
    }
    fn backward(
        &mut self,
        dy: &Tensor<P::Compute>,
        need_dx: bool,
    ) -> Result<Option<Tensor<P::Compute>>> {
        self.0.backward(dy, need_dx)
    }
    fn ends_in_softmax(&self) -> bool {
        P::POLICY == mp_core::Policy::Float32
    }
    fn backward_from_softmax_input(
        &mut self,
        dz: &Tensor<F32>,
        need_dx: bool,
    ) -> Result<Option<Tensor<P::Compute>>> {
        if !self.ends_in_softmax() {
            return Err(Error::InvalidState {
                layer: self.0.name.clone(),
                what: "backward_from_softmax_input needs a float32 softmax".into(),
            });
        }
        self.0.saved_p = None;
        let _ = need_dx;
        Ok(Some(crate::layer::convert::<F32, P::Compute>(dz.clone())?))
    }
    fn visit_variables(
        &mut self,
        prefix: &str,
        f: &mut dyn FnMut(&str, &mut Variable) -> Result<()>,
    ) -> Result<()> {
        self.0.visit_variables(prefix, f)
    }
    fn saved_bytes(&self) -> usize {
        self.0.saved_bytes()
    }
    fn param_count(&self) -> usize {
        0
    }
}

/// Flattens each sample to one dimension (`(batch, 28, 28)` → `(batch, 784)`).
pub struct Flatten<P: PolicyKind> {
    name: String,
    input_shape: Option<Vec<usize>>,
    output_shape: Option<Vec<usize>>,
    _policy: PhantomData<P>,
}

impl<P: PolicyKind> std::fmt::Debug for Flatten<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flatten").field("name", &self.name).finish()
    }
}

impl<P: PolicyKind> Flatten<P> {
    /// A flatten layer.
    pub fn new() -> Self {
        Flatten {
            name: "flatten".into(),
            input_shape: None,
            output_shape: None,
            _policy: PhantomData,
        }
    }
}

impl<P: PolicyKind> Default for Flatten<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: PolicyKind> Layer for Flatten<P> {
    type Policy = P;
    type Input = P::Compute;
    type Output = P::Compute;

    fn type_name(&self) -> &'static str {
        "Flatten"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }
    fn build(&mut self, input_shape: &[usize]) -> Result<Vec<usize>> {
        let out = vec![input_shape.iter().product()];
        self.input_shape = Some(input_shape.to_vec());
        self.output_shape = Some(out.clone());
        Ok(out)
    }
    fn output_shape(&self) -> Option<&[usize]> {
        self.output_shape.as_deref()
    }
    fn forward(&self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        let (Some(inp), Some(out)) = (&self.input_shape, &self.output_shape) else {
            return Err(Error::NotBuilt {
                layer: self.name.clone(),
            });
        };
        if x.rank() != inp.len() + 1 || &x.shape()[1..] != inp.as_slice() {
            return Err(Error::ShapeMismatch {
                layer: self.name.clone(),
                expected: format!("(batch, {})", dims(inp)),
                got: x.shape().to_vec(),
            });
        }
        Ok(x.clone().reshape(&[x.shape()[0], out[0]])?)
    }
    fn forward_train(&mut self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        self.forward(x)
    }
    fn backward(
        &mut self,
        dy: &Tensor<P::Compute>,
        _need_dx: bool,
    ) -> Result<Option<Tensor<P::Compute>>> {
        let inp = self.input_shape.as_ref().ok_or_else(|| Error::NotBuilt {
            layer: self.name.clone(),
        })?;
        let mut shape = vec![dy.shape().first().copied().unwrap_or(0)];
        shape.extend_from_slice(inp);
        Ok(Some(dy.clone().reshape(&shape)?))
    }
    fn foreign_tensors(&mut self, _prefix: &str, out: &mut ForeignTensors) -> Result<()> {
        out.set_flattened(self.input_shape.as_deref());
        Ok(())
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

fn dims(s: &[usize]) -> String {
    s.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
