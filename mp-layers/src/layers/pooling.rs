//! Pooling over NHWC images: `MaxPooling2D`, `AveragePooling2D` and `GlobalAveragePooling2D`,
//! as Keras's. They have no variables; averages are summed in float32.

use std::marker::PhantomData;

use mp_core::{PolicyKind, Tensor, Variable};
use mp_kernels::conv::{Geometry, Padding, Window};
use mp_kernels::ops::{self, PoolIndices};

use crate::error::{Error, Result};
use crate::layer::{Layer, convert};

/// Which reduction a pooling layer takes over its windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reduce {
    Max,
    Average,
}

/// What a pooling layer shares: its window, its shapes and what backward needs.
struct Pool<P: PolicyKind> {
    reduce: Reduce,
    /// The window, or `None` for the global pool (the whole image).
    window: Option<Window>,
    name: String,
    input_shape: Option<[usize; 3]>,
    output_shape: Option<Vec<usize>>,
    /// Max pooling: which element each output took, from the last `forward_train`.
    saved_indices: Option<PoolIndices>,
    /// Average pooling: the geometry of the last `forward_train`.
    saved_geometry: Option<Geometry>,
    _policy: PhantomData<P>,
}

impl<P: PolicyKind> Pool<P> {
    fn new(reduce: Reduce, window: Option<Window>, name: &str) -> Self {
        Pool {
            reduce,
            window,
            name: name.to_string(),
            input_shape: None,
            output_shape: None,
            saved_indices: None,
            saved_geometry: None,
            _policy: PhantomData,
        }
    }

    fn type_name(&self) -> &'static str {
        match (self.reduce, self.window) {
            (Reduce::Max, _) => "MaxPooling2D",
            (Reduce::Average, Some(_)) => "AveragePooling2D",
            (Reduce::Average, None) => "GlobalAveragePooling2D",
        }
    }

    fn window_for(&self, [h, w, _]: [usize; 3]) -> Window {
        self.window.unwrap_or_else(|| Window::new([h, w]))
    }

    fn build(&mut self, input_shape: &[usize]) -> Result<Vec<usize>> {
        let Ok(inp) = <[usize; 3]>::try_from(input_shape) else {
            return Err(Error::InvalidArgument {
                what: format!(
                    "{}: {} takes images of shape (height, width, channels), got {input_shape:?} \
                     per sample",
                    self.name,
                    self.type_name()
                ),
            });
        };
        let [h, w, c] = inp;
        let g =
            Geometry::new(self.type_name(), [1, h, w, c], self.window_for(inp)).map_err(|e| {
                Error::InvalidArgument {
                    what: format!("{}: {e}", self.name),
                }
            })?;
        if let Some(built) = self.input_shape
            && built != inp
        {
            return Err(Error::IncompatibleShapes {
                layer: self.name.clone(),
                previous: "the layer before".into(),
                expected: built.to_vec(),
                got: input_shape.to_vec(),
            });
        }
        let out = match self.window {
            Some(_) => vec![g.output[0], g.output[1], c],
            None => vec![c],
        };
        self.input_shape = Some(inp);
        self.output_shape = Some(out.clone());
        Ok(out)
    }

    fn geometry(&self, x: &Tensor<P::Compute>) -> Result<Geometry> {
        let inp = self.input_shape.ok_or_else(|| Error::NotBuilt {
            layer: self.name.clone(),
        })?;
        if x.rank() != 4 || x.shape()[1..] != inp {
            return Err(Error::ShapeMismatch {
                layer: self.name.clone(),
                expected: format!("(batch, {}, {}, {})", inp[0], inp[1], inp[2]),
                got: x.shape().to_vec(),
            });
        }
        let [h, w, c] = inp;
        Ok(Geometry::new(
            self.type_name(),
            [x.shape()[0], h, w, c],
            self.window_for(inp),
        )?)
    }

    /// The output, and for training what backward needs.
    fn forward(
        &self,
        x: &Tensor<P::Compute>,
    ) -> Result<(Tensor<P::Compute>, Option<PoolIndices>, Geometry)> {
        let g = self.geometry(x)?;
        let (y, idx) = match self.reduce {
            Reduce::Max => {
                let (y, idx) = ops::max_pool(x, &g)?;
                (y, Some(idx))
            }
            Reduce::Average => (ops::avg_pool(x, &g)?, None),
        };
        let y = match self.window {
            Some(_) => y,
            None => y.reshape(&[g.batch, g.channels])?,
        };
        Ok((y, idx, g))
    }

    fn forward_train(&mut self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        let (y, idx, g) = self.forward(x)?;
        self.saved_indices = idx;
        self.saved_geometry = Some(g);
        Ok(y)
    }

    fn backward(&mut self, dy: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
        let missing = || Error::InvalidState {
            layer: self.name.clone(),
            what: "backward called without a preceding forward_train".into(),
        };
        let g = self.saved_geometry.take().ok_or_else(missing)?;
        let pooled = [g.batch, g.output[0], g.output[1], g.channels];
        let expected: Vec<usize> = match self.window {
            Some(_) => pooled.to_vec(),
            None => vec![g.batch, g.channels],
        };
        if dy.shape() != expected {
            return Err(Error::ShapeMismatch {
                layer: self.name.clone(),
                expected: format!("a gradient of shape {expected:?}"),
                got: dy.shape().to_vec(),
            });
        }
        let dy = dy.clone().reshape(&pooled)?;
        let dx = match self.reduce {
            Reduce::Max => {
                let idx = self.saved_indices.take().ok_or_else(missing)?;
                ops::max_pool_backward(&dy, &idx)?
            }
            Reduce::Average => ops::avg_pool_backward(&dy, &g)?,
        };
        convert(dx)
    }

    fn saved_bytes(&self) -> usize {
        self.saved_indices
            .as_ref()
            .map_or(0, |i| std::mem::size_of_val(i.as_slice()))
    }
}

/// Implements `Layer` for a pooling layer by handing everything to its `Pool`.
macro_rules! pooling_layer {
    ($ty:ident) => {
        impl<P: PolicyKind> std::fmt::Debug for $ty<P> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($ty))
                    .field("name", &self.pool.name)
                    .field("window", &self.pool.window)
                    .finish()
            }
        }

        impl<P: PolicyKind> Layer for $ty<P> {
            type Policy = P;
            type Input = P::Compute;
            type Output = P::Compute;

            fn type_name(&self) -> &'static str {
                self.pool.type_name()
            }
            fn name(&self) -> &str {
                &self.pool.name
            }
            fn set_name(&mut self, name: &str) {
                self.pool.name = name.to_string();
            }
            fn build(&mut self, input_shape: &[usize]) -> Result<Vec<usize>> {
                self.pool.build(input_shape)
            }
            fn output_shape(&self) -> Option<&[usize]> {
                self.pool.output_shape.as_deref()
            }
            fn forward(&self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
                Ok(self.pool.forward(x)?.0)
            }
            fn forward_train(&mut self, x: &Tensor<P::Compute>) -> Result<Tensor<P::Compute>> {
                self.pool.forward_train(x)
            }
            fn backward(
                &mut self,
                dy: &Tensor<P::Compute>,
                _need_dx: bool,
            ) -> Result<Option<Tensor<P::Compute>>> {
                Ok(Some(self.pool.backward(dy)?))
            }
            fn visit_variables(
                &mut self,
                _prefix: &str,
                _f: &mut dyn FnMut(&str, &mut Variable) -> Result<()>,
            ) -> Result<()> {
                Ok(())
            }
            fn saved_bytes(&self) -> usize {
                self.pool.saved_bytes()
            }
            fn param_count(&self) -> usize {
                0
            }
        }
    };
}

/// Max pooling, like Keras's `MaxPooling2D`: the largest value of each window (NaN wins);
/// the gradient goes to the element that was taken. Strides default to the pool size.
///
/// ```
/// use mp_core::{Float32, Tensor, F32};
/// use mp_layers::{Layer, MaxPooling2D};
///
/// let mut pool = MaxPooling2D::<Float32>::new([2, 2]);
/// assert_eq!(pool.build(&[4, 4, 3])?, vec![2, 2, 3]);
/// # Ok::<(), mp_layers::Error>(())
/// ```
pub struct MaxPooling2D<P: PolicyKind> {
    pool: Pool<P>,
}

impl<P: PolicyKind> MaxPooling2D<P> {
    /// Windows of `pool_size`, strides `pool_size`, `valid` padding (Keras's defaults).
    pub fn new(pool_size: [usize; 2]) -> Self {
        let window = Window::new(pool_size).strides(pool_size);
        MaxPooling2D {
            pool: Pool::new(Reduce::Max, Some(window), "max_pooling2d"),
        }
    }

    /// With these strides.
    pub fn strides(mut self, strides: [usize; 2]) -> Self {
        self.pool.window = self.pool.window.map(|w| w.strides(strides));
        self
    }

    /// With this padding (`same`: windows at the border take the positions inside the input).
    pub fn padding(mut self, padding: Padding) -> Self {
        self.pool.window = self.pool.window.map(|w| w.padding(padding));
        self
    }
}

pooling_layer!(MaxPooling2D);

/// Average pooling, like Keras's `AveragePooling2D`: the mean of each window, summed in
/// float32 over the positions inside the input. Strides default to the pool size.
pub struct AveragePooling2D<P: PolicyKind> {
    pool: Pool<P>,
}

impl<P: PolicyKind> AveragePooling2D<P> {
    /// Windows of `pool_size`, strides `pool_size`, `valid` padding (Keras's defaults).
    pub fn new(pool_size: [usize; 2]) -> Self {
        let window = Window::new(pool_size).strides(pool_size);
        AveragePooling2D {
            pool: Pool::new(Reduce::Average, Some(window), "average_pooling2d"),
        }
    }

    /// With these strides.
    pub fn strides(mut self, strides: [usize; 2]) -> Self {
        self.pool.window = self.pool.window.map(|w| w.strides(strides));
        self
    }

    /// With this padding (`same`: border windows average the positions inside the input).
    pub fn padding(mut self, padding: Padding) -> Self {
        self.pool.window = self.pool.window.map(|w| w.padding(padding));
        self
    }
}

pooling_layer!(AveragePooling2D);

/// The mean of each channel over the whole image, like Keras's `GlobalAveragePooling2D`:
/// `[batch, h, w, c]` becomes `[batch, c]`, summed in float32.
pub struct GlobalAveragePooling2D<P: PolicyKind> {
    pool: Pool<P>,
}

impl<P: PolicyKind> GlobalAveragePooling2D<P> {
    /// A global average pooling layer.
    pub fn new() -> Self {
        GlobalAveragePooling2D {
            pool: Pool::new(Reduce::Average, None, "global_average_pooling2d"),
        }
    }
}

impl<P: PolicyKind> Default for GlobalAveragePooling2D<P> {
    fn default() -> Self {
        Self::new()
    }
}

pooling_layer!(GlobalAveragePooling2D);
