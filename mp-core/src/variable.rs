//! Variables: named float32 values with their float32 gradients, what optimizers update.

use crate::dtype::{DType, F32};
use crate::error::Result;
use crate::tensor::Tensor;

/// A trainable value: a name (`dense_1/kernel`), a float32 value and its float32 gradient.
///
/// Variables are float32 under every policy; layers read them cast to their compute dtype.
/// Gradients accumulate: backward adds into [`Variable::grad_mut`], and the training step zeroes
/// them with [`Variable::zero_grad`]. A [non-trainable](Variable::non_trainable) variable
/// (BatchNormalization's moving statistics) is state the layer updates itself: optimizers do not
/// see it, checkpoints save it.
#[derive(Clone, Debug)]
pub struct Variable {
    name: String,
    value: Tensor<F32>,
    grad: Tensor<F32>,
    trainable: bool,
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

    /// Whether an optimizer updates it.
    pub fn trainable(&self) -> bool {
        self.trainable
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

    /// The value, to update in place.
    pub fn value_mut(&mut self) -> &mut Tensor<F32> {
        &mut self.value
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
        (&mut self.value, &mut self.grad)
    }

    /// Moves the value and the gradient to `device` (nothing to do when they are there).
    pub fn to_device(&mut self, device: crate::Device) -> Result<()> {
        if self.value.device() != device {
            let value = self.value.to_device(device)?;
            let grad = self.grad.to_device(device)?;
            self.value = value;
            self.grad = grad;
        }
        Ok(())
    }

    /// Sets the gradient to zero.
    pub fn zero_grad(&mut self) -> Result<()> {
        self.grad.fill(0.0)
    }

    /// Replaces the value with `value`, which must have the same shape; on a mismatch the
    /// variable is left unchanged.
    pub fn assign(&mut self, value: &[f32]) -> Result<()> {
        self.value.copy_from_slice(value)
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
}
