//! The CUDA arm of tensor storage (behind the `cuda` feature).
//!
//! CUDA libraries are loaded dynamically at first use, so a build with the feature needs no CUDA
//! installed. cudarc panics when the driver library is missing, so every entry point checks for
//! it first and returns [`Error::CudaUnavailable`] instead.

use crate::error::{Error, Result};

/// Checks that CUDA device `ordinal` can be used.
#[cfg(not(feature = "cuda"))]
pub fn check_device(ordinal: usize) -> Result<()> {
    Err(Error::CudaNotCompiled { ordinal })
}

#[cfg(feature = "cuda")]
pub use imp::*;

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::{Arc, Mutex, OnceLock};

    use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

    use super::{Error, Result};
    use crate::dtype::Element;

    /// Whether a CUDA driver library can be loaded and reports at least one device.
    pub fn device_count() -> usize {
        // SAFETY: only probes for the library with dlopen; it never calls into it.
        let present = unsafe { cudarc::driver::sys::is_culib_present() };
        if !present {
            return 0;
        }
        CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    }

    /// The context of device `ordinal`, created once and cached.
    pub fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
        static CONTEXTS: OnceLock<Mutex<Vec<Option<Arc<CudaContext>>>>> = OnceLock::new();
        let mut cache = CONTEXTS
            .get_or_init(|| Mutex::new(Vec::new()))
            .lock()
            .map_err(|_| Error::CudaUnavailable {
                ordinal,
                reason: "context cache poisoned".into(),
            })?;
        if let Some(Some(ctx)) = cache.get(ordinal) {
            return Ok(ctx.clone());
        }
        let count = device_count();
        if count == 0 {
            return Err(Error::CudaUnavailable {
                ordinal,
                reason: "no CUDA driver library (libcuda.so) or no device found".into(),
            });
        }
        if ordinal >= count {
            return Err(Error::CudaUnavailable {
                ordinal,
                reason: format!("only {count} device(s) present"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::CudaUnavailable {
            ordinal,
            reason: e.to_string(),
        })?;
        if cache.len() <= ordinal {
            cache.resize(ordinal + 1, None);
        }
        cache[ordinal] = Some(ctx.clone());
        Ok(ctx)
    }

    /// Checks that CUDA device `ordinal` can be used.
    pub fn check_device(ordinal: usize) -> Result<()> {
        context(ordinal).map(|_| ())
    }

    /// The name and compute capability `(major, minor)` of device `ordinal` (what the
    /// compatibility check, [`crate::compat::check_gpu`], takes).
    pub fn device_info(ordinal: usize) -> Result<(String, (u32, u32))> {
        let ctx = context(ordinal)?;
        let err = |e: cudarc::driver::DriverError| Error::CudaUnavailable {
            ordinal,
            reason: e.to_string(),
        };
        let name = ctx.name().map_err(err)?;
        let (major, minor) = ctx.compute_capability().map_err(err)?;
        Ok((name, (major.max(0) as u32, minor.max(0) as u32)))
    }

    /// Elements on a CUDA device, with the stream they are ordered on.
    pub struct CudaBuf<E: Element> {
        slice: CudaSlice<E>,
        stream: Arc<CudaStream>,
        ordinal: usize,
    }

    impl<E: Element> CudaBuf<E> {
        /// `len` zeros on device `ordinal` (allocated on its default stream, no host copy).
        pub fn zeros(ordinal: usize, len: usize) -> Result<Self> {
            let stream = context(ordinal)?.default_stream();
            let slice = stream
                .alloc_zeros::<E>(len)
                .map_err(|e| Error::CudaUnavailable {
                    ordinal,
                    reason: format!("allocating {len} {} elements: {e}", E::DTYPE),
                })?;
            Ok(CudaBuf {
                slice,
                stream,
                ordinal,
            })
        }

        /// Copies `data` (of the same length) from the host into this buffer.
        pub fn copy_from_host(&mut self, data: &[E]) -> Result<()> {
            if data.len() != self.slice.len() {
                return Err(Error::LengthMismatch {
                    op: "CudaBuf::copy_from_host",
                    shape: vec![self.slice.len()],
                    expected: self.slice.len(),
                    got: data.len(),
                });
            }
            self.stream
                .memcpy_htod(data, &mut self.slice)
                .map_err(|e| Error::CudaUnavailable {
                    ordinal: self.ordinal,
                    reason: e.to_string(),
                })
        }

        /// Sets every element to `value` (a device memset for zero, else one host upload).
        pub fn fill(&mut self, value: E) -> Result<()> {
            let err = |e: cudarc::driver::DriverError| Error::CudaUnavailable {
                ordinal: self.ordinal,
                reason: e.to_string(),
            };
            if value.to_f32().to_bits() == 0 {
                return self.stream.memset_zeros(&mut self.slice).map_err(err);
            }
            let host = vec![value; self.slice.len()];
            self.stream.memcpy_htod(&host, &mut self.slice).map_err(err)
        }

        /// The number of elements.
        pub fn len(&self) -> usize {
            self.slice.len()
        }

        /// Whether there are no elements.
        pub fn is_empty(&self) -> bool {
            self.slice.len() == 0
        }

        /// A device copy of `data` on device `ordinal`'s default stream.
        pub fn from_host(ordinal: usize, data: &[E]) -> Result<Self> {
            let stream = context(ordinal)?.default_stream();
            let slice = stream
                .clone_htod(data)
                .map_err(|e| Error::CudaUnavailable {
                    ordinal,
                    reason: e.to_string(),
                })?;
            Ok(CudaBuf {
                slice,
                stream,
                ordinal,
            })
        }

        /// A host copy (synchronises the stream).
        pub fn to_host(&self) -> Result<Vec<E>> {
            self.stream
                .clone_dtoh(&self.slice)
                .map_err(|e| Error::CudaUnavailable {
                    ordinal: self.ordinal,
                    reason: e.to_string(),
                })
        }

        /// The device ordinal.
        pub fn ordinal(&self) -> usize {
            self.ordinal
        }

        /// The device memory.
        pub fn slice(&self) -> &CudaSlice<E> {
            &self.slice
        }

        /// The device memory, mutably.
        pub fn slice_mut(&mut self) -> &mut CudaSlice<E> {
            &mut self.slice
        }

        /// The stream the memory is ordered on.
        pub fn stream(&self) -> &Arc<CudaStream> {
            &self.stream
        }
    }

    impl<E: Element> std::fmt::Debug for CudaBuf<E> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "CudaBuf<{}>[{}] on cuda:{}",
                E::DTYPE,
                self.slice.len(),
                self.ordinal
            )
        }
    }

    impl<E: Element> Clone for CudaBuf<E> {
        fn clone(&self) -> Self {
            CudaBuf {
                slice: self.slice.clone(),
                stream: self.stream.clone(),
                ordinal: self.ordinal,
            }
        }
    }
}
