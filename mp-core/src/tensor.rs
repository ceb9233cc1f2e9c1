//! Tensors: the dtype is a type parameter, the shape and the device are runtime values.
//!
//! CPU storage is contiguous, row-major and 64-byte aligned (one cache line, one zmm register;
//! from 2 MiB up, aligned to and backed by huge pages where Linux offers them), allocated through
//! [`crate::memory`] so the bytes held by tensors can be counted. The CUDA arm
//! exists behind mp-core's `cuda` feature; without it, [`Device::Cuda`] is still a value, and
//! asking for it returns [`Error::CudaNotCompiled`].

use std::alloc::{self, Layout};
use std::fmt;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;

use ndarray::{ArrayBase, ArrayD, Data, Dimension, IxDyn};

use crate::dtype::{DType, DTypeKind, Element};
use crate::error::{Error, Result};

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory.
    #[default]
    Cpu,
    /// CUDA device `n` (usable only in builds with the `cuda` feature).
    Cuda(usize),
}

impl Device {
    /// CUDA device `ordinal`, after checking that it can be used: without the `cuda` feature this
    /// is [`Error::CudaNotCompiled`]; with it, a missing driver or device is
    /// [`Error::CudaUnavailable`] (never a panic).
    pub fn cuda(ordinal: usize) -> Result<Device> {
        crate::cuda::check_device(ordinal)?;
        Ok(Device::Cuda(ordinal))
    }

    /// Whether this is the host.
    pub fn is_cpu(self) -> bool {
        matches!(self, Device::Cpu)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

pub use crate::memory::ALIGN;

/// A 64-byte aligned, initialised buffer of elements on the host.
pub struct AlignedBuf<E: Element> {
    ptr: NonNull<E>,
    len: usize,
    _owns: PhantomData<E>,
}

// SAFETY: `AlignedBuf` owns its elements exclusively (like `Vec<E>`), and `E` is `Send + Sync`.
unsafe impl<E: Element> Send for AlignedBuf<E> {}
// SAFETY: shared references only hand out `&[E]`, and `E: Sync`.
unsafe impl<E: Element> Sync for AlignedBuf<E> {}

impl<E: Element> AlignedBuf<E> {
    fn layout(len: usize) -> Result<Layout> {
        len.checked_mul(std::mem::size_of::<E>())
            .and_then(crate::memory::buffer_layout)
            .ok_or_else(|| Error::InvalidArgument {
                what: format!("a tensor of {len} {} elements is too large", E::DTYPE),
            })
    }

    /// `len` copies of `value`.
    pub fn filled(len: usize, value: E) -> Result<Self> {
        let zero = value.to_f32().to_bits() == 0;
        let (mut buf, fresh) = Self::alloc(len)?;
        if !(fresh && zero) {
            buf.as_mut_slice().fill(value);
        }
        Ok(buf)
    }

    /// `len` elements with unspecified values, for outputs that are overwritten in full: a cached
    /// buffer of the same size when one is free (its old contents are valid numbers of any
    /// dtype: every bit pattern of f32, f16 and bf16 is one), else fresh zeros.
    pub fn for_overwrite(len: usize) -> Result<Self> {
        Ok(Self::alloc(len)?.0)
    }

    /// Allocates `len` initialised elements: a cached buffer of the same size if one is free
    /// (returns `false`), else a fresh zeroed one (returns `true`).
    fn alloc(len: usize) -> Result<(Self, bool)> {
        let layout = Self::layout(len)?;
        if layout.size() == 0 {
            let buf = AlignedBuf {
                ptr: NonNull::dangling(),
                len,
                _owns: PhantomData,
            };
            return Ok((buf, true));
        }
        let (raw, fresh) = match crate::memory::take_cached(layout.size()) {
            Some(p) => (p, false),
            // SAFETY: the layout has a non-zero size; zeroed memory is a valid value of every
            // element type (0.0).
            None => (unsafe { crate::memory::alloc_zeroed(layout) }, true),
        };
        let Some(ptr) = NonNull::new(raw as *mut E) else {
            return Err(Error::InvalidArgument {
                what: format!(
                    "out of memory: a tensor of {len} {} elements ({:.2} GiB) cannot be allocated",
                    E::DTYPE,
                    layout.size() as f64 / (1u64 << 30) as f64
                ),
            });
        };
        crate::memory::on_alloc(layout.size());
        let buf = AlignedBuf {
            ptr,
            len,
            _owns: PhantomData,
        };
        Ok((buf, fresh))
    }

    /// A copy of `data`.
    pub fn from_slice(data: &[E]) -> Result<Self> {
        let mut buf = Self::for_overwrite(data.len())?;
        buf.as_mut_slice().copy_from_slice(data);
        Ok(buf)
    }

    /// The elements.
    pub fn as_slice(&self) -> &[E] {
        // SAFETY: `ptr` points to `len` initialised elements we own (or is dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The elements, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [E] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<E: Element> Drop for AlignedBuf<E> {
    fn drop(&mut self) {
        let layout = Self::layout(self.len).expect("layout was valid at allocation");
        if layout.size() != 0 {
            crate::memory::on_free(layout.size());
            if !crate::memory::give_cached(self.ptr.as_ptr() as *mut u8, layout.size()) {
                // SAFETY: allocated in `alloc` (or taken from the cache, which allocated it) with
                // this very layout; `E` has no drop glue (Copy).
                unsafe { alloc::dealloc(self.ptr.as_ptr() as *mut u8, layout) };
            }
        }
    }
}

impl<E: Element> Clone for AlignedBuf<E> {
    fn clone(&self) -> Self {
        Self::from_slice(self.as_slice()).expect("cloning a buffer that was allocated before")
    }
}

impl<E: Element> fmt::Debug for AlignedBuf<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBuf<{}>[{}]", E::DTYPE, self.len)
    }
}

enum Storage<E: Element> {
    /// Shared, copy-on-write: cloning a tensor is O(1), and writing to a shared buffer copies it
    /// first, so tensors keep value semantics.
    Cpu(Arc<AlignedBuf<E>>),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaBuf<E>),
}

impl<E: Element> Clone for Storage<E> {
    fn clone(&self) -> Self {
        match self {
            Storage::Cpu(b) => Storage::Cpu(Arc::clone(b)),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Storage::Cuda(b.clone()),
        }
    }
}

/// An n-dimensional array of `D::Elem` on a [`Device`].
///
/// Host storage is shared copy-on-write: `clone` is O(1) (a layer can keep its input for
/// backward without copying it), and the first write to a shared buffer copies it.
///
/// Casts between dtypes are kernels: `mp_kernels::ops::cast`.
///
/// ```
/// use mp_core::{Tensor, BF16};
///
/// let y = Tensor::<BF16>::from_f32(&[2, 2], &[1.0, 2.5, -3.0, 1e-3])?; // rounded once
/// assert_eq!(y.shape(), &[2, 2]);
/// assert_eq!(y.to_f32_vec()?, vec![1.0, 2.5, -3.0, 0.0009994507]);
/// # Ok::<(), mp_core::Error>(())
/// ```
pub struct Tensor<D: DTypeKind> {
    shape: Vec<usize>,
    storage: Storage<D::Elem>,
}

impl<D: DTypeKind> Clone for Tensor<D> {
    fn clone(&self) -> Self {
        Tensor {
            shape: self.shape.clone(),
            storage: self.storage.clone(),
        }
    }
}

fn numel(op: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::InvalidArgument {
            what: format!("{op}: shape {shape:?} has too many elements"),
        })
}

impl<D: DTypeKind> Tensor<D> {
    /// A host tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Result<Self> {
        Self::full(shape, <D::Elem as Element>::ZERO)
    }

    /// A host tensor whose values are unspecified, for an output that a kernel overwrites in
    /// full (a GEMM with `beta = 0`, a cast, an activation). It reuses a freed buffer of the same
    /// size when one is cached (see [`crate::memory`]), so a training step's activations cost no
    /// page faults or zeroing after the first step; the values are then whatever that buffer
    /// held (always valid numbers), else zeros.
    ///
    /// ```
    /// use mp_core::{Tensor, F32};
    ///
    /// let mut y = Tensor::<F32>::for_overwrite(&[2, 3])?;
    /// y.as_mut_slice()?.fill(1.5);
    /// assert_eq!(y.to_f32_vec()?, vec![1.5; 6]);
    /// # Ok::<(), mp_core::Error>(())
    /// ```
    pub fn for_overwrite(shape: &[usize]) -> Result<Self> {
        let n = numel("for_overwrite", shape)?;
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(Arc::new(AlignedBuf::for_overwrite(n)?)),
        })
    }

    /// A tensor of zeros on `device` (allocated there directly, no host copy).
    pub fn zeros_on(shape: &[usize], device: Device) -> Result<Self> {
        match device {
            Device::Cpu => Self::zeros(shape),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(ordinal) => Err(Error::CudaNotCompiled { ordinal }),
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => {
                let n = numel("zeros_on", shape)?;
                Ok(Tensor {
                    shape: shape.to_vec(),
                    storage: Storage::Cuda(crate::cuda::CudaBuf::zeros(ordinal, n)?),
                })
            }
        }
    }

    /// A device tensor holding `buf` (its length must match the shape).
    #[cfg(feature = "cuda")]
    pub fn from_cuda(shape: &[usize], buf: crate::cuda::CudaBuf<D::Elem>) -> Result<Self> {
        let n = numel("from_cuda", shape)?;
        if n != buf.len() {
            return Err(Error::LengthMismatch {
                op: "Tensor::from_cuda",
                shape: shape.to_vec(),
                expected: n,
                got: buf.len(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cuda(buf),
        })
    }

    /// The device memory of a CUDA tensor (what the CUDA kernels of mp-kernels take).
    #[cfg(feature = "cuda")]
    pub fn cuda_buf(&self) -> Result<&crate::cuda::CudaBuf<D::Elem>> {
        match &self.storage {
            Storage::Cuda(b) => Ok(b),
            Storage::Cpu(_) => Err(Error::WrongDevice {
                op: "cuda_buf",
                expected: Device::Cuda(0),
                got: Device::Cpu,
            }),
        }
    }

    /// The device memory of a CUDA tensor, mutably.
    #[cfg(feature = "cuda")]
    pub fn cuda_buf_mut(&mut self) -> Result<&mut crate::cuda::CudaBuf<D::Elem>> {
        match &mut self.storage {
            Storage::Cuda(b) => Ok(b),
            Storage::Cpu(_) => Err(Error::WrongDevice {
                op: "cuda_buf_mut",
                expected: Device::Cuda(0),
                got: Device::Cpu,
            }),
        }
    }

    /// A host tensor with every element `value`.
    pub fn full(shape: &[usize], value: D::Elem) -> Result<Self> {
        let n = numel("full", shape)?;
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(Arc::new(AlignedBuf::filled(n, value)?)),
        })
    }

    /// A host tensor holding `data` in row-major order. The length must match the shape.
    pub fn from_vec(shape: &[usize], data: Vec<D::Elem>) -> Result<Self> {
        Self::from_slice(shape, &data)
    }

    /// A host tensor of `shape` whose elements `write` fills (row-major; it must write every
    /// one: they start unspecified, as in [`Tensor::for_overwrite`]). For assembling a batch
    /// straight into a (reused) tensor buffer.
    pub fn from_writer(shape: &[usize], write: impl FnOnce(&mut [D::Elem])) -> Result<Self> {
        let mut t = Self::for_overwrite(shape)?;
        write(t.as_mut_slice()?);
        Ok(t)
    }

    /// A host tensor holding a copy of `data` in row-major order.
    pub fn from_slice(shape: &[usize], data: &[D::Elem]) -> Result<Self> {
        let n = numel("from_slice", shape)?;
        if n != data.len() {
            return Err(Error::LengthMismatch {
                op: "Tensor::from_slice",
                shape: shape.to_vec(),
                expected: n,
                got: data.len(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(Arc::new(AlignedBuf::from_slice(data)?)),
        })
    }

    /// A host tensor from float32 values, each rounded to `D` (nearest even).
    pub fn from_f32(shape: &[usize], data: &[f32]) -> Result<Self> {
        let n = numel("from_f32", shape)?;
        if n != data.len() {
            return Err(Error::LengthMismatch {
                op: "Tensor::from_f32",
                shape: shape.to_vec(),
                expected: n,
                got: data.len(),
            });
        }
        let mut t = Self::zeros(shape)?;
        for (o, &x) in t.as_mut_slice()?.iter_mut().zip(data) {
            *o = <D::Elem as Element>::from_f32(x);
        }
        Ok(t)
    }

    /// A host tensor copied from an `ndarray` array of any dimension and memory order.
    pub fn from_ndarray<S, Dim>(array: &ArrayBase<S, Dim>) -> Result<Self>
    where
        S: Data<Elem = D::Elem>,
        Dim: Dimension,
    {
        let shape = array.shape().to_vec();
        match array.as_slice() {
            Some(s) => Self::from_slice(&shape, s),
            None => {
                let mut t = Self::zeros(&shape)?;
                for (o, &x) in t.as_mut_slice()?.iter_mut().zip(array.iter()) {
                    *o = x;
                }
                Ok(t)
            }
        }
    }

    /// A copy as an `ndarray` array (host tensors only).
    pub fn to_ndarray(&self) -> Result<ArrayD<D::Elem>> {
        let data = self.as_slice()?.to_vec();
        ArrayD::from_shape_vec(IxDyn(&self.shape), data).map_err(|e| Error::InvalidArgument {
            what: format!("to_ndarray: {e}"),
        })
    }

    /// The values widened to float32 (host tensors only).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(self.as_slice()?.iter().map(|x| x.to_f32()).collect())
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The runtime dtype.
    pub fn dtype(&self) -> DType {
        D::DTYPE
    }

    /// Bytes of element storage.
    pub fn size_in_bytes(&self) -> usize {
        self.len() * D::DTYPE.size_in_bytes()
    }

    /// Where the tensor lives.
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Device::Cuda(b.ordinal()),
        }
    }

    /// The elements of a host tensor, row-major.
    pub fn as_slice(&self) -> Result<&[D::Elem]> {
        match &self.storage {
            Storage::Cpu(b) => Ok(b.as_slice()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Err(Error::WrongDevice {
                op: "as_slice",
                expected: Device::Cpu,
                got: Device::Cuda(b.ordinal()),
            }),
        }
    }

    /// The elements of a host tensor, row-major, mutably.
    pub fn as_mut_slice(&mut self) -> Result<&mut [D::Elem]> {
        match &mut self.storage {
            Storage::Cpu(b) => Ok(Arc::make_mut(b).as_mut_slice()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Err(Error::WrongDevice {
                op: "as_mut_slice",
                expected: Device::Cpu,
                got: Device::Cuda(b.ordinal()),
            }),
        }
    }

    /// Sets every element to `value` (given as float32, rounded to `D`), on the tensor's device.
    pub fn fill(&mut self, value: f32) -> Result<()> {
        let v = <D::Elem as Element>::from_f32(value);
        match &mut self.storage {
            Storage::Cpu(_) => self.as_mut_slice()?.fill(v),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.fill(v)?,
        }
        Ok(())
    }

    /// Copies `data` in; the length must match. On a mismatch nothing is written.
    pub fn copy_from_slice(&mut self, data: &[D::Elem]) -> Result<()> {
        if data.len() != self.len() {
            return Err(Error::LengthMismatch {
                op: "Tensor::copy_from_slice",
                shape: self.shape.clone(),
                expected: self.len(),
                got: data.len(),
            });
        }
        self.as_mut_slice()?.copy_from_slice(data);
        Ok(())
    }

    /// The same data with another shape holding the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        let n = numel("reshape", shape)?;
        if n != self.len() {
            return Err(Error::ShapeMismatch {
                op: "reshape",
                expected: self.shape.clone(),
                got: shape.to_vec(),
            });
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// A copy on `device` (a clone when it is already there).
    pub fn to_device(&self, device: Device) -> Result<Self> {
        match (&self.storage, device) {
            (Storage::Cpu(_), Device::Cpu) => Ok(self.clone()),
            #[cfg(not(feature = "cuda"))]
            (Storage::Cpu(_), Device::Cuda(ordinal)) => Err(Error::CudaNotCompiled { ordinal }),
            #[cfg(feature = "cuda")]
            (Storage::Cpu(b), Device::Cuda(ordinal)) => Ok(Tensor {
                shape: self.shape.clone(),
                storage: Storage::Cuda(crate::cuda::CudaBuf::from_host(ordinal, b.as_slice())?),
            }),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(b), Device::Cpu) => Ok(Tensor {
                shape: self.shape.clone(),
                storage: Storage::Cpu(Arc::new(AlignedBuf::from_slice(&b.to_host()?)?)),
            }),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(b), Device::Cuda(ordinal)) => {
                if b.ordinal() == ordinal {
                    Ok(self.clone())
                } else {
                    self.to_device(Device::Cpu)?
                        .to_device(Device::Cuda(ordinal))
                }
            }
        }
    }
}

impl<D: DTypeKind> fmt::Debug for Tensor<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor<{}>(shape={:?}, device={}",
            D::DTYPE,
            self.shape,
            self.device()
        )?;
        if let Ok(s) = self.as_slice() {
            let shown: Vec<_> = s.iter().take(6).collect();
            write!(
                f,
                ", data={shown:?}{}",
                if s.len() > 6 { "..." } else { "" }
            )?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::{BF16, F16, F32};
    use ndarray::{Array2, ShapeBuilder};

    #[test]
    fn construction_checks_shape_against_length() {
        let err = Tensor::<F32>::from_vec(&[2, 3], vec![0.0; 5])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[2, 3]") && err.contains('6') && err.contains('5'),
            "{err}"
        );
        assert!(Tensor::<F16>::from_f32(&[4], &[1.0; 3]).is_err());
        assert!(Tensor::<F32>::zeros(&[usize::MAX, 4]).is_err());
        let t = Tensor::<F32>::from_vec(&[0, 5], vec![]).unwrap();
        assert!(t.is_empty());
        assert_eq!(t.shape(), &[0, 5]);
    }

    #[test]
    fn storage_is_64_byte_aligned() {
        for n in [1, 3, 17, 1000] {
            let t = Tensor::<BF16>::zeros(&[n]).unwrap();
            assert_eq!(t.as_slice().unwrap().as_ptr() as usize % ALIGN, 0);
        }
    }

    #[test]
    fn ndarray_round_trip_any_layout() {
        let a = Array2::from_shape_fn((3, 4), |(i, j)| (i * 10 + j) as f32);
        let t = Tensor::<F32>::from_ndarray(&a).unwrap();
        assert_eq!(t.to_ndarray().unwrap().into_dimensionality().unwrap(), a);
        // A column-major array is copied in logical (row-major) order.
        let f = Array2::from_shape_fn((3, 4).f(), |(i, j)| (i * 10 + j) as f32);
        let tf = Tensor::<F32>::from_ndarray(&f).unwrap();
        assert_eq!(tf.as_slice().unwrap(), t.as_slice().unwrap());
        let tt = Tensor::<F32>::from_ndarray(&a.t()).unwrap();
        assert_eq!(tt.shape(), &[4, 3]);
        assert_eq!(tt.as_slice().unwrap()[1], 10.0);
    }

    #[test]
    fn casts_round_and_keep_specials() {
        let x = Tensor::<F32>::from_vec(
            &[5],
            vec![
                1.0 + 2f32.powi(-11),
                65520.0,
                f32::NAN,
                f32::NEG_INFINITY,
                1e-8,
            ],
        )
        .unwrap();
        let h = Tensor::<F16>::from_f32(x.shape(), &x.to_f32_vec().unwrap()).unwrap();
        let v = h.to_f32_vec().unwrap();
        assert_eq!(v[0], 1.0);
        assert!(v[1].is_infinite());
        assert!(v[2].is_nan());
        assert_eq!(v[3], f32::NEG_INFINITY);
        assert_eq!(v[4], 0.0);
        let b = Tensor::<BF16>::from_f32(x.shape(), &x.to_f32_vec().unwrap()).unwrap();
        let v = b.to_f32_vec().unwrap();
        assert_eq!(v[1], 65536.0);
        assert!(v[4] > 0.0);
    }

    #[test]
    fn reshape_and_fill() {
        let mut t = Tensor::<F32>::zeros(&[2, 6]).unwrap();
        t.fill(3.0).unwrap();
        let t = t.reshape(&[3, 4]).unwrap();
        assert_eq!(t.shape(), &[3, 4]);
        let err = t.clone().reshape(&[5]).unwrap_err().to_string();
        assert!(err.contains("[3, 4]") && err.contains("[5]"), "{err}");
        assert_eq!(t.to_f32_vec().unwrap(), vec![3.0; 12]);
    }

    #[test]
    fn clones_share_until_written() {
        let a = Tensor::<F32>::from_vec(&[3], vec![1.0, 2.0, 3.0]).unwrap();
        let mut b = a.clone();
        assert_eq!(
            a.as_slice().unwrap().as_ptr(),
            b.as_slice().unwrap().as_ptr()
        );
        b.as_mut_slice().unwrap()[0] = 9.0;
        assert_eq!(a.as_slice().unwrap(), &[1.0, 2.0, 3.0]);
        assert_eq!(b.as_slice().unwrap(), &[9.0, 2.0, 3.0]);
        assert_eq!(b.as_slice().unwrap().as_ptr() as usize % ALIGN, 0);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_an_error() {
        let err = Device::cuda(0).unwrap_err();
        assert!(matches!(err, Error::CudaNotCompiled { ordinal: 0 }));
        assert!(err.to_string().contains("`cuda` feature"));
        let t = Tensor::<F32>::zeros(&[3]).unwrap();
        assert!(matches!(
            t.to_device(Device::Cuda(1)),
            Err(Error::CudaNotCompiled { ordinal: 1 })
        ));
        assert!(Tensor::<F32>::zeros_on(&[3], Device::Cuda(0)).is_err());
    }

    /// With the feature and no GPU (CI): every way onto the device is a clear error, never a
    /// panic. With a GPU: the round trip is exact.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_device_or_a_clear_error() {
        let t = Tensor::<BF16>::from_f32(&[3], &[1.0, -2.5, f32::NAN]).unwrap();
        if crate::cuda::device_count() == 0 {
            assert!(
                std::env::var("MP_REQUIRE_GPU").is_err(),
                "MP_REQUIRE_GPU is set but no CUDA device is usable"
            );
            eprintln!("skipped the device round trip: no CUDA driver or device");
            let err = Device::cuda(0).unwrap_err();
            assert!(matches!(err, Error::CudaUnavailable { ordinal: 0, .. }));
            let text = err.to_string();
            assert!(
                text.contains("cuda device 0") && text.contains("no CUDA"),
                "{text}"
            );
            assert!(matches!(
                t.to_device(Device::Cuda(0)),
                Err(Error::CudaUnavailable { .. })
            ));
            assert!(Tensor::<F32>::zeros_on(&[3], Device::Cuda(1)).is_err());
            assert!(crate::cuda::device_info(0).is_err());
            assert!(t.cuda_buf().is_err());
            return;
        }
        let d = t.to_device(Device::cuda(0).unwrap()).unwrap();
        assert_eq!(d.device(), Device::Cuda(0));
        assert!(d.as_slice().is_err());
        let back = d.to_device(Device::Cpu).unwrap().to_f32_vec().unwrap();
        assert_eq!(&back[..2], &[1.0, -2.5]);
        assert!(back[2].is_nan());
        let z = Tensor::<F32>::zeros_on(&[4], Device::Cuda(0)).unwrap();
        assert_eq!(
            z.to_device(Device::Cpu).unwrap().to_f32_vec().unwrap(),
            vec![0.0; 4]
        );
        let (name, cc) = crate::cuda::device_info(0).unwrap();
        eprintln!("cuda:0 is {name}, compute capability {}.{}", cc.0, cc.1);
    }
}
