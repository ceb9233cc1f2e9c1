//! The CUDA backend (the `cuda` feature): the kernels of this crate on NVIDIA GPUs.
//!
//! - [`Gpu`]: one device: its context and stream, the kernel modules (loaded lazily from the
//!   committed PTX, [`ptx`], cached per device) and the cuBLASLt handle;
//! - [`gemm()`]: `C = epilogue(alpha * op(A) * op(B) + beta * C)` through cuBLASLt with float32
//!   accumulation (`CUBLAS_COMPUTE_32F`; tensor cores for float16/bfloat16 inputs; true float32
//!   for float32 inputs unless [`Gpu::set_allow_tf32`]), bias and ReLU fused into cuBLASLt's
//!   epilogue where it offers it, else into a kernel;
//! - kernels with the semantics of their CPU twins: [`cast`], [`relu_forward`],
//!   [`relu_backward`], [`bias_grad`], [`softmax`], [`softmax_cross_entropy_rows`],
//!   [`softmax_cross_entropy_grad`], the fused [`softmax_cross_entropy_fused`], [`scale`],
//!   [`all_finite`], the fused [`unscale_and_check`] with a device [`FiniteFlag`], and the
//!   optimizer updates [`sgd_update`], [`rmsprop_update`], [`adam_update`] (bit-identical to the
//!   CPU's), which skip the step on the device when the flag is set.
//!
//! Everything is ordered on the device's default stream; nothing synchronises with the host
//! except copies to the host and [`FiniteFlag::all_finite`]. Without a driver or a device,
//! [`Gpu::new`] returns an error (never a panic); without a library (cuBLASLt) the GEMM does.
//!
//! All arguments are checked before anything is launched, with the errors of the CPU kernels
//! ([`Error::LengthMismatch`], [`Error::InvalidArgument`]); driver and library failures are
//! [`Error::Cuda`].

mod gemm;
mod ops;
pub mod ptx;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig};
use cudarc::nvrtc::Ptx;
use mp_core::Element;
use mp_core::cuda::CudaBuf;

pub use gemm::{CudaEpilogue, gemm};
pub use ops::*;
pub use ptx::Arch;

use crate::error::{Error, Result};

/// One CUDA device as the kernels see it. Cheap to share: [`Gpu::new`] hands out one `Arc` per
/// device.
pub struct Gpu {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    capability: (u32, u32),
    arch: Arch,
    sm_count: u32,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    blas: Mutex<Option<gemm::Blas>>,
    allow_tf32: AtomicBool,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Gpu(cuda:{}, {}, compute capability {}.{}, {})",
            self.ordinal,
            self.name,
            self.capability.0,
            self.capability.1,
            self.arch.name()
        )
    }
}

/// Maps a driver error to [`Error::Driver`], keeping it as the source.
pub(crate) fn driver_err(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |source| Error::Driver { op, source }
}

impl Gpu {
    /// Device `ordinal`, created once per process and shared.
    ///
    /// # Errors
    /// [`mp_core::Error::CudaUnavailable`] (wrapped in [`Error::Core`]) without a driver or a
    /// device; [`Error::InvalidArgument`] for a device older than compute capability 8.0.
    pub fn new(ordinal: usize) -> Result<Arc<Gpu>> {
        static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
        let mut gpus = GPUS
            .get_or_init(|| Mutex::new(HashMap::new()))
            .lock()
            .map_err(|_| Error::Cuda {
                op: "Gpu::new",
                what: "device cache poisoned".into(),
            })?;
        if let Some(g) = gpus.get(&ordinal) {
            return Ok(g.clone());
        }
        let ctx = mp_core::cuda::context(ordinal)?;
        let (name, capability) = mp_core::cuda::device_info(ordinal)?;
        let arch = Arch::for_capability(capability)?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(driver_err("Gpu::new"))?
            .max(1) as u32;
        let gpu = Arc::new(Gpu {
            ordinal,
            stream: ctx.default_stream(),
            ctx,
            name,
            capability,
            arch,
            sm_count,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            blas: Mutex::new(None),
            allow_tf32: AtomicBool::new(false),
        });
        gpus.insert(ordinal, gpu.clone());
        Ok(gpu)
    }

    /// Whether a CUDA device can be used here (a driver library that loads and at least one
    /// device). Never panics.
    pub fn available() -> bool {
        mp_core::cuda::device_count() > 0
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device name (`NVIDIA H200`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The compute capability `(major, minor)`.
    pub fn capability(&self) -> (u32, u32) {
        self.capability
    }

    /// The PTX architecture loaded on this device.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The stream every kernel and GEMM of this device is ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The driver context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Lets float32 GEMMs use TF32 tensor cores (`CUBLAS_COMPUTE_32F_FAST_TF32`: 10-bit
    /// mantissa inputs, float32 accumulation). Off by default: the float32 policy computes in
    /// real float32, like the CPU.
    pub fn set_allow_tf32(&self, allow: bool) {
        self.allow_tf32.store(allow, Ordering::Relaxed);
    }

    /// Whether float32 GEMMs may use TF32.
    pub fn allow_tf32(&self) -> bool {
        self.allow_tf32.load(Ordering::Relaxed)
    }

    /// Waits until everything queued on the stream has run.
    ///
    /// # Errors
    /// [`Error::Cuda`] with the first asynchronous error a kernel raised.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver_err("synchronize"))
    }

    /// `len` zeros on this device.
    ///
    /// # Errors
    /// As [`CudaBuf::zeros`].
    pub fn zeros<E: Element>(&self, len: usize) -> Result<CudaBuf<E>> {
        Ok(CudaBuf::zeros(self.ordinal, len)?)
    }

    /// A device copy of `data`.
    ///
    /// # Errors
    /// As [`CudaBuf::from_host`].
    pub fn upload<E: Element>(&self, data: &[E]) -> Result<CudaBuf<E>> {
        Ok(CudaBuf::from_host(self.ordinal, data)?)
    }

    /// The kernel `entry` (its module loaded on first use).
    pub(crate) fn function(&self, entry: &'static str) -> Result<CudaFunction> {
        let poisoned = || Error::Cuda {
            op: "load kernel",
            what: "kernel cache poisoned".into(),
        };
        if let Some(f) = self.functions.lock().map_err(|_| poisoned())?.get(entry) {
            return Ok(f.clone());
        }
        let module = ptx::module_of(entry).ok_or_else(|| Error::InvalidArgument {
            op: "load kernel",
            what: format!("no kernel named {entry:?}"),
        })?;
        let loaded = {
            let mut modules = self.modules.lock().map_err(|_| poisoned())?;
            match modules.get(module.name) {
                Some(m) => m.clone(),
                None => {
                    let m = self
                        .ctx
                        .load_module(Ptx::from_src(module.ptx(self.arch)))
                        .map_err(|e| Error::Cuda {
                            op: "load kernel",
                            what: format!(
                                "loading the {} PTX of {}.cu: {e}",
                                self.arch.name(),
                                module.name
                            ),
                        })?;
                    modules.insert(module.name, m.clone());
                    m
                }
            }
        };
        let f = loaded.load_function(entry).map_err(|e| Error::Cuda {
            op: "load kernel",
            what: format!("{entry}: {e}"),
        })?;
        self.functions
            .lock()
            .map_err(|_| poisoned())?
            .insert(entry, f.clone());
        Ok(f)
    }

    /// A grid-stride launch over `n` elements: 256 threads per block, at most 32 blocks per SM.
    pub(crate) fn grid(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, 32 * self.sm_count as usize) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Checks that `buf` lives on this device.
    pub(crate) fn check_buf<E: Element>(&self, op: &'static str, buf: &CudaBuf<E>) -> Result<()> {
        if buf.ordinal() == self.ordinal {
            Ok(())
        } else {
            Err(mp_core::Error::WrongDevice {
                op,
                expected: mp_core::Device::Cuda(self.ordinal),
                got: mp_core::Device::Cuda(buf.ordinal()),
            }
            .into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver error keeps its cause: `source()` is the driver's own error.
    #[test]
    fn driver_errors_keep_their_source() {
        use std::error::Error as _;
        let raw = cudarc::driver::DriverError(
            cudarc::driver::sys::cudaError_enum::CUDA_ERROR_INVALID_VALUE,
        );
        let e = driver_err("cast")(raw);
        // (Formatting a DriverError asks the driver for its text, so it is not printed here.)
        assert!(matches!(e, Error::Driver { op: "cast", .. }));
        let src = e.source().expect("a source");
        assert!(src.downcast_ref::<cudarc::driver::DriverError>().is_some());
    }
}
