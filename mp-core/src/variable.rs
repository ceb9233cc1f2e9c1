//! Variables: named float32 values with their float32 gradients, what optimizers update.

use std::fmt;

use crate::dtype::{DType, F32};
use crate::error::{Error, Result};
use crate::tensor::{Device, Tensor};

/// The values a variable may hold. Every variable's are finite; a variance or a second moment
/// (BatchNormalization's `moving_variance`, Adam's `v`) is also never negative.
///
/// Checked where values enter from outside ([`Variable::assign`], [`Variable::set_value`],
/// `set_weights`, checkpoint loads) and before they are saved; not in the kernels that update
/// variables every step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Domain {
    /// No NaN, no infinity.
    #[default]
    Finite,
    /// Finite and at least 0.
    NonNegative,
}

impl Domain {
    /// The first of `values` outside the domain, if any.
    pub fn first_outside(self, values: &[f32]) -> Option<OutOfDomain> {
        let index = match self {
            Domain::Finite => values.iter().position(|v| !v.is_finite()),
            Domain::NonNegative => values.iter().position(|v| !(v.is_finite() && *v >= 0.0)),
        }?;
        Some(OutOfDomain {
            index,
            value: values[index],
        })
    }

    /// [`Error::InvalidValue`] naming `op` and `variable` for the first of `values` outside the
    /// domain.
    pub fn check(self, op: &'static str, variable: &str, values: &[f32]) -> Result<()> {
        match self.first_outside(values) {
            None => Ok(()),
            Some(problem) => Err(Error::InvalidValue {
                op,
                variable: variable.to_string(),
                problem,
            }),
        }
    }
}

/// A value outside a variable's [`Domain`] and where it is; displayed as `NaN at index 3,
/// which is not finite` or `-1.0 at index 0, which is below 0`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OutOfDomain {
    /// The index of the value in the flat, row-major data.
    pub index: usize,
    /// The value.
    pub value: f32,
}

impl fmt::Display for OutOfDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = if self.value.is_finite() {
            "below 0"
        } else {
            "not finite"
        };
        write!(
            f,
            "{:?} at index {}, which is {why}",
            self.value, self.index
        )
    }
}

/// A trainable value: a name (`dense_1/kernel`), a float32 value and its float32 gradient.
///
/// Variables are float32 under every policy; layers read them cast to their compute dtype.
/// Gradients accumulate: backward adds into [`Variable::grad_mut`], and the training step zeroes
/// them with [`Variable::zero_grad`]. A [non-trainable](Variable::non_trainable) variable
/// (BatchNormalization's moving statistics) is state the layer updates itself: optimizers do not
/// see it, checkpoints save it. Its [`Domain`] says which values it may hold; values given from
/// outside are checked against it.
///
/// A [frozen](Variable::set_frozen) variable is held fixed for fine-tuning: its layer computes no
/// gradient for it and optimizers do not see it (no update, no slots, no weight decay). Frozen is
/// separate from trainable: a frozen layer's moving statistics are frozen too.
#[derive(Clone, Debug)]
pub struct Variable {
    name: String,
    value: Tensor<F32>,
    grad: Tensor<F32>,
    trainable: bool,
    frozen: bool,
    domain: Domain,
    /// See [`Variable::version`].
    version: u64,
}

/// The source of [`Variable::version`]s: unique in the process.
static VERSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_version() -> u64 {
    VERSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Variable {
    /// A variable named `name` holding `value`, with a zero gradient of the same shape.
    pub fn new(name: impl Into<String>, value: Tensor<F32>) -> Result<Self> {
        let grad = Tensor::zeros_on(value.shape(), value.device())?;
        Ok(Variable {
            name: name.into(),
            value,
            grad,
            trainable: true,
            frozen: false,
            domain: Domain::Finite,
            version: next_version(),
        })
    }

    /// A non-trainable variable named `name` holding `value`: state its layer updates (Keras's
    /// `trainable=False` weights), saved in checkpoints, never seen by an optimizer.
    pub fn non_trainable(name: impl Into<String>, value: Tensor<F32>) -> Result<Self> {
        Ok(Variable {
            trainable: false,
            ..Variable::new(name, value)?
        })
    }

    /// The same variable, restricted to `domain` (a variance: [`Domain::NonNegative`]). Its
    /// current value is not checked.
    pub fn with_domain(mut self, domain: Domain) -> Self {
        self.domain = domain;
        self
    }

    /// The values it may hold.
    pub fn domain(&self) -> Domain {
        self.domain
    }

    /// Whether it is state an optimizer updates (not a moving statistic). A frozen trainable
    /// variable is still trainable; [`Variable::updated`] says whether an optimizer steps it.
    pub fn trainable(&self) -> bool {
        self.trainable
    }

    /// Whether it is held fixed (fine-tuning): no gradient, no optimizer update.
    pub fn frozen(&self) -> bool {
        self.frozen
    }

    /// Freezes or unfreezes it. Freezing zeroes nothing: its gradient is simply no longer
    /// computed nor applied.
    pub fn set_frozen(&mut self, frozen: bool) {
        self.frozen = frozen;
    }

    /// Whether an optimizer steps it: trainable and not frozen.
    pub fn updated(&self) -> bool {
        self.trainable && !self.frozen
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renames the variable (a model prefixes its layers' variable names).
    pub fn set_name(&mut self, name: impl Into<String>) {
        self.name = name.into();
    }

    /// The dtype: always float32.
    pub fn dtype(&self) -> DType {
        DType::F32
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }

    /// The value.
    pub fn value(&self) -> &Tensor<F32> {
        &self.value
    }

    /// The value, to update in place: what kernels write every step, unchecked. To set a value
    /// from outside, use [`Variable::assign`] or [`Variable::set_value`], which check it.
    pub fn value_mut(&mut self) -> &mut Tensor<F32> {
        self.version = next_version();
        &mut self.value
    }

    /// A number that changes whenever the value may have changed (every mutable access to it,
    /// every assignment, a move to another device) and is unique in the process: what a cache
    /// of the value in another form (a layer's 16-bit copy of its kernel for inference) is
    /// keyed by.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The gradient.
    pub fn grad(&self) -> &Tensor<F32> {
        &self.grad
    }

    /// The gradient, to accumulate into.
    pub fn grad_mut(&mut self) -> &mut Tensor<F32> {
        &mut self.grad
    }

    /// The value and the gradient at once (what an optimizer update needs).
    pub fn value_and_grad_mut(&mut self) -> (&mut Tensor<F32>, &mut Tensor<F32>) {
        self.version = next_version();
        (&mut self.value, &mut self.grad)
    }

    /// Moves the value and the gradient to `device` (nothing to do when they are there).
    pub fn to_device(&mut self, device: crate::Device) -> Result<()> {
        if self.value.device() != device {
            let value = self.value.to_device(device)?;
            let grad = self.grad.to_device(device)?;
            self.value = value;
            self.grad = grad;
            self.version = next_version();
        }
        Ok(())
    }

    /// Sets the gradient to zero.
    pub fn zero_grad(&mut self) -> Result<()> {
        self.grad.fill(0.0)
    }

    /// Replaces the value with `value`, which must have as many elements and lie in the
    /// variable's [`Domain`] (finite; not negative for a variance).
    ///
    /// # Errors
    /// [`Error::InvalidValue`] naming the variable and the first value outside its domain, or a
    /// length mismatch; the variable is left unchanged.
    pub fn assign(&mut self, value: &[f32]) -> Result<()> {
        self.check_values("assign", value)?;
        self.version = next_version();
        self.value.copy_from_slice(value)
    }

    /// Replaces the value with a copy of `value` (moved to the variable's device), after
    /// [`Variable::check_value`].
    ///
    /// # Errors
    /// As [`Variable::check_value`]; the variable is left unchanged.
    pub fn set_value(&mut self, value: &Tensor<F32>) -> Result<()> {
        self.check_value("set_value", value)?;
        self.value = value.to_device(self.value.device())?;
        self.version = next_version();
        Ok(())
    }

    /// Checks that `value` could replace this variable's value: the same shape, every element
    /// in the variable's [`Domain`]. `op` names the caller in the error (`set_weights`).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`]; [`Error::InvalidValue`] naming the variable and the first value
    /// outside its domain.
    pub fn check_value(&self, op: &'static str, value: &Tensor<F32>) -> Result<()> {
        if value.shape() != self.shape() {
            return Err(Error::ShapeMismatch {
                op,
                expected: self.shape().to_vec(),
                got: value.shape().to_vec(),
            });
        }
        if value.device().is_cpu() {
            self.check_values(op, value.as_slice()?)
        } else {
            self.check_values(op, value.to_device(Device::Cpu)?.as_slice()?)
        }
    }

    fn check_values(&self, op: &'static str, values: &[f32]) -> Result<()> {
        self.domain.check(op, &self.name, values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variable_basics() {
        let t = Tensor::<F32>::from_vec(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let mut v = Variable::new("dense_1/kernel", t).unwrap();
        assert_eq!(v.name(), "dense_1/kernel");
        assert_eq!(v.dtype(), DType::F32);
        assert_eq!(v.shape(), &[2, 3]);
        assert!(v.grad().as_slice().unwrap().iter().all(|&g| g == 0.0));
        v.grad_mut().as_mut_slice().unwrap()[0] = 5.0;
        v.zero_grad().unwrap();
        assert_eq!(v.grad().as_slice().unwrap()[0], 0.0);
        assert!(v.assign(&[0.0; 5]).is_err());
        assert_eq!(v.value().as_slice().unwrap()[4], 5.0);
        v.assign(&[0.0; 6]).unwrap();
        assert_eq!(v.value().as_slice().unwrap(), &[0.0; 6]);
    }

    #[test]
    fn values_outside_the_domain_are_refused_by_name_and_change_nothing() {
        let t = Tensor::<F32>::from_vec(&[3], vec![1.0, 2.0, 3.0]).unwrap();
        let mut v = Variable::non_trainable("bn/moving_variance", t)
            .unwrap()
            .with_domain(Domain::NonNegative);
        let cases: [(&[f32], &str); 3] = [
            (&[1.0, f32::NAN, 0.0], "NaN at index 1, which is not finite"),
            (&[-1.0, 0.0, 0.0], "-1.0 at index 0, which is below 0"),
            (
                &[0.0, 0.0, f32::INFINITY],
                "inf at index 2, which is not finite",
            ),
        ];
        for (bad, want) in cases {
            let e = v.assign(bad).unwrap_err().to_string();
            assert_eq!(
                e,
                format!("assign: bn/moving_variance would hold {want}; it is unchanged")
            );
            let e = v
                .set_value(&Tensor::from_vec(&[3], bad.to_vec()).unwrap())
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("set_value: bn/moving_variance would hold"),
                "{e}"
            );
            assert_eq!(v.value().as_slice().unwrap(), &[1.0, 2.0, 3.0]);
        }
        // -0.0 is not below 0; a plain variable may be negative but not infinite.
        v.assign(&[-0.0, 0.0, 5.0]).unwrap();
        let mut w = Variable::new("d/kernel", Tensor::zeros(&[2]).unwrap()).unwrap();
        w.assign(&[-1.0, 2.0]).unwrap();
        let e = w.assign(&[f32::NEG_INFINITY, 2.0]).unwrap_err().to_string();
        assert!(e.contains("d/kernel would hold -inf at index 0"), "{e}");
        assert!(w.set_value(&Tensor::zeros(&[3]).unwrap()).is_err());
        assert_eq!(w.value().as_slice().unwrap(), &[-1.0, 2.0]);
    }
}
