//! GEMM on the device through cuBLASLt, with the semantics of [`crate::gemm::gemm`]:
//! `C = epilogue(alpha * op(A) * op(B) + beta * C)`, row-major with leading dimensions, float32
//! accumulation, the output rounded once.
//!
//! cuBLASLt is column-major; a row-major `m x n` matrix with row stride `ld` is the column-major
//! `n x m` matrix with the same `ld`, so the row-major `C = op(A) op(B)` is computed as the
//! column-major `C^T = op(B)^T op(A)^T`: the operands swap places, `m` and `n` swap, and each
//! keeps its transpose flag. The bias (one per column of the row-major C) is then one per row
//! of the column-major `C^T`, which is what cuBLASLt's bias epilogue adds.
//!
//! Compute type `CUBLAS_COMPUTE_32F` for every input dtype (tensor cores for float16 and
//! bfloat16; real float32 for float32 inputs, or `CUBLAS_COMPUTE_32F_FAST_TF32` when
//! [`Gpu::set_allow_tf32`] allows it). The plan of each shape (algorithm from cuBLASLt's
//! heuristic, descriptors) is made once and cached per device:
//! - **fused**: cuBLASLt computes the whole thing, the bias + ReLU in its epilogue
//!   (`CUBLASLT_EPILOGUE_BIAS` / `RELU_BIAS` / `RELU`), with a float32 bias
//!   (`CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = CUDA_R_32F`) for 16-bit outputs;
//! - **via float32**: where cuBLASLt offers no algorithm for that combination (a 16-bit output
//!   with a float32 bias, or an output dtype other than float32 or the input's), it computes
//!   `alpha * op(A) op(B)` into a float32 scratch matrix and the `gemm_epilogue_<o>` kernel adds
//!   `beta * C` and the bias, applies ReLU and rounds once.
//!
//! ReLU: the kernel keeps NaN as the CPU does; cuBLASLt's fused ReLU is `max(x, 0)`, whose NaN
//! behaviour NVIDIA does not document (the GPU check reports it).

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};
use mp_core::cuda::CudaBuf;
use mp_core::{DType, Element};

use super::{Gpu, driver_err};
use crate::error::{Error, Result};
use crate::gemm::{GemmInput, GemmOutput};

const OP: &str = "cuda gemm";

/// cuBLASLt's workspace: 32 MiB, what NVIDIA recommends for Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

/// What to apply before the store, with the bias on the device (float32, one per column).
#[derive(Clone, Copy, Debug, Default)]
pub enum CudaEpilogue<'a> {
    /// Store as is.
    #[default]
    None,
    /// `max(x, 0)`.
    Relu,
    /// Add `bias[j]` to column `j`.
    Bias(&'a CudaBuf<f32>),
    /// Add the bias, then ReLU.
    BiasRelu(&'a CudaBuf<f32>),
}

impl<'a> CudaEpilogue<'a> {
    fn bias(&self) -> Option<&'a CudaBuf<f32>> {
        match *self {
            CudaEpilogue::Bias(b) | CudaEpilogue::BiasRelu(b) => Some(b),
            CudaEpilogue::None | CudaEpilogue::Relu => None,
        }
    }

    fn relu(&self) -> bool {
        matches!(self, CudaEpilogue::Relu | CudaEpilogue::BiasRelu(_))
    }

    fn lt(&self) -> sys::cublasLtEpilogue_t {
        use sys::cublasLtEpilogue_t::*;
        match self {
            CudaEpilogue::None => CUBLASLT_EPILOGUE_DEFAULT,
            CudaEpilogue::Relu => CUBLASLT_EPILOGUE_RELU,
            CudaEpilogue::Bias(_) => CUBLASLT_EPILOGUE_BIAS,
            CudaEpilogue::BiasRelu(_) => CUBLASLT_EPILOGUE_RELU_BIAS,
        }
    }
}

fn lt_type(dtype: DType) -> sys::cudaDataType {
    match dtype {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
    }
}

fn lt_err(what: &'static str) -> impl Fn(lt::CublasError) -> Error {
    move |e| Error::Cuda {
        op: OP,
        what: format!("{what}: {e}"),
    }
}

/// The largest power of two (up to 256) dividing a device address.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        1u32 << ptr.trailing_zeros().min(8)
    }
}

/// What identifies a cached plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PlanKey {
    input: DType,
    output: DType,
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    epilogue: sys::cublasLtEpilogue_t,
    tf32: bool,
    align: [u32; 3],
}

/// A cuBLASLt matmul description with its layouts and algorithm.
struct LtCall {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
    has_bias: bool,
}

impl Drop for LtCall {
    fn drop(&mut self) {
        // SAFETY: created by `LtCall::new`, destroyed once here. Errors on teardown are ignored.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// How a shape is computed.
enum Plan {
    /// cuBLASLt does everything.
    Fused(LtCall),
    /// cuBLASLt into a float32 scratch, then the epilogue kernel.
    ViaF32(LtCall),
}

/// The cuBLASLt state of one device.
pub(crate) struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    scratch: Option<CudaSlice<f32>>,
    plans: HashMap<PlanKey, Plan>,
}

// SAFETY: the handle is only used under the `Gpu::blas` mutex, with the device's context bound.
unsafe impl Send for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created in `Blas::new`, destroyed once here.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

impl Blas {
    fn new(gpu: &Gpu) -> Result<Blas> {
        // SAFETY: only probes for the library with dlopen; cudarc panics on first use otherwise.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Cuda {
                op: OP,
                what: "libcublasLt.so (CUDA 13) not found: add the folder holding it (e.g. the \
                       nvidia-cublas wheel's nvidia/cu13/lib) to LD_LIBRARY_PATH"
                    .into(),
            });
        }
        gpu.context().bind_to_thread().map_err(driver_err(OP))?;
        let handle = lt::create_handle().map_err(lt_err("cublasLtCreate"))?;
        let workspace = match gpu.stream().alloc_zeros::<u8>(WORKSPACE_BYTES) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: just created, not shared.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(driver_err(OP)(e));
            }
        };
        Ok(Blas {
            handle,
            workspace,
            scratch: None,
            plans: HashMap::new(),
        })
    }
}

/// The column-major view of the problem (operands swapped, see the module docs).
struct Problem {
    key: PlanKey,
}

impl Problem {
    /// A description, layouts and heuristic algorithm for output dtype `out` and `epilogue`, or
    /// `None` when cuBLASLt has no algorithm for that combination.
    fn lt_call(
        &self,
        blas: &Blas,
        out: DType,
        epilogue: sys::cublasLtEpilogue_t,
        bias_f32: bool,
    ) -> Result<Option<LtCall>> {
        let k = &self.key;
        let compute = if k.input == DType::F32 && k.tf32 {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let desc = lt::create_matmul_desc(compute, sys::cudaDataType::CUDA_R_32F)
            .map_err(lt_err("cublasLtMatmulDescCreate"))?;
        // Column-major: A' = B (transpose flag trans_b), B' = A (trans_a), D' = C^T (n x m).
        let (a_rows, a_cols) = if k.trans_b { (k.k, k.n) } else { (k.n, k.k) };
        let (b_rows, b_cols) = if k.trans_a { (k.m, k.k) } else { (k.k, k.m) };
        let ldd = if out == k.output { k.ldc } else { k.n };
        let mut call = LtCall {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
            has_bias: bias_f32
                || matches!(
                    epilogue,
                    sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
                        | sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU_BIAS
                ),
        };
        call.a =
            lt::create_matrix_layout(lt_type(k.input), a_rows as u64, a_cols as u64, k.ldb as i64)
                .map_err(lt_err("cublasLtMatrixLayoutCreate"))?;
        call.b =
            lt::create_matrix_layout(lt_type(k.input), b_rows as u64, b_cols as u64, k.lda as i64)
                .map_err(lt_err("cublasLtMatrixLayoutCreate"))?;
        call.d = lt::create_matrix_layout(lt_type(out), k.n as u64, k.m as u64, ldd as i64)
            .map_err(lt_err("cublasLtMatrixLayoutCreate"))?;
        let ta: i32 = k.trans_b.into();
        let tb: i32 = k.trans_a.into();
        // SAFETY: the descriptor is live; each attribute gets a pointer to a value of its type
        // and that value's size.
        unsafe {
            use sys::cublasLtMatmulDescAttributes_t::*;
            set_desc(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta)?;
            set_desc(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb)?;
            set_desc(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
            if bias_f32 {
                set_desc(
                    desc,
                    CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    &sys::cudaDataType::CUDA_R_32F,
                )?;
            }
        }
        let pref = lt::create_matmul_pref().map_err(lt_err("cublasLtMatmulPreferenceCreate"))?;
        let found = (|| {
            // SAFETY: `pref` is live; values of the attributes' types and sizes.
            unsafe {
                use sys::cublasLtMatmulPreferenceAttributes_t::*;
                let ws = WORKSPACE_BYTES as u64;
                set_pref(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws)?;
                // A' is our B, B' our A; C and D are the same memory.
                set_pref(
                    pref,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    &k.align[1],
                )?;
                set_pref(
                    pref,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    &k.align[0],
                )?;
                set_pref(
                    pref,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    &k.align[2],
                )?;
                set_pref(
                    pref,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                    &k.align[2],
                )?;
                // SAFETY: every descriptor is live.
                Ok::<_, Error>(
                    lt::get_matmul_algo_heuristic(
                        blas.handle,
                        desc,
                        call.a,
                        call.b,
                        call.d,
                        call.d,
                        pref,
                    )
                    .ok(),
                )
            }
        })();
        // SAFETY: created above, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        match found? {
            Some(h) => {
                call.algo = h.algo;
                Ok(Some(call))
            }
            None => Ok(None),
        }
    }
}

/// # Safety
/// `desc` live; `T` is the attribute's type.
unsafe fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc,
            attr,
            (value as *const T).cast::<c_void>(),
            std::mem::size_of::<T>(),
        )
    }
    .map_err(lt_err("cublasLtMatmulDescSetAttribute"))
}

/// # Safety
/// `pref` live; `T` is the attribute's type.
unsafe fn set_pref<T>(
    pref: sys::cublasLtMatmulPreference_t,
    attr: sys::cublasLtMatmulPreferenceAttributes_t,
    value: &T,
) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe {
        lt::set_matmul_pref_attribute(
            pref,
            attr,
            (value as *const T).cast::<c_void>(),
            std::mem::size_of::<T>(),
        )
    }
    .map_err(lt_err("cublasLtMatmulPreferenceSetAttribute"))
}

/// Checks that a stored `rows x cols` row-major matrix with row stride `ld` fits in `len`.
fn check_matrix(what: &'static str, rows: usize, cols: usize, ld: usize, len: usize) -> Result<()> {
    if ld < cols.max(1) {
        return Err(Error::InvalidArgument {
            op: OP,
            what: format!("{what}: leading dimension {ld} is less than the row width {cols}"),
        });
    }
    let need = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1)
            .checked_mul(ld)
            .and_then(|x| x.checked_add(cols))
            .ok_or_else(|| Error::InvalidArgument {
                op: OP,
                what: format!("{what}: {rows} x {cols} with stride {ld} overflows"),
            })?
    };
    if len < need {
        return Err(Error::LengthMismatch {
            op: OP,
            what,
            expected: need,
            got: len,
        });
    }
    if ld > i64::MAX as usize {
        return Err(Error::InvalidArgument {
            op: OP,
            what: format!("{what}: leading dimension {ld} is too large"),
        });
    }
    Ok(())
}

/// `C = epilogue(alpha * op(A) * op(B) + beta * C)` on the device, with float32 accumulation:
/// the semantics and argument rules of [`crate::Cpu::gemm`] (row-major, leading dimensions,
/// `beta == 0` does not read C, `k == 0` gives `epilogue(beta * C)`).
///
/// # Errors
/// [`Error::InvalidArgument`] for a leading dimension below the row width;
/// [`Error::LengthMismatch`] naming `a`, `b`, `c` or `bias` when a buffer is too short (or the
/// bias is not `n` long); [`Error::Core`] for a buffer on another device; [`Error::Cuda`] when
/// cuBLASLt is missing or fails. Arguments are checked before anything is queued.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: GemmInput, O: GemmOutput>(
    gpu: &Gpu,
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &CudaBuf<T>,
    lda: usize,
    b: &CudaBuf<T>,
    ldb: usize,
    beta: f32,
    c: &mut CudaBuf<O>,
    ldc: usize,
    epilogue: CudaEpilogue<'_>,
) -> Result<()> {
    let (ar, ac) = if trans_a { (k, m) } else { (m, k) };
    let (br, bc) = if trans_b { (n, k) } else { (k, n) };
    check_matrix("a", ar, ac, lda, a.len())?;
    check_matrix("b", br, bc, ldb, b.len())?;
    check_matrix("c", m, n, ldc, c.len())?;
    gpu.check_buf(OP, a)?;
    gpu.check_buf(OP, b)?;
    gpu.check_buf(OP, c)?;
    if let Some(bias) = epilogue.bias() {
        crate::error::check_len(OP, "bias", bias.len(), n)?;
        gpu.check_buf(OP, bias)?;
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        return epilogue_kernel::<O>(gpu, None, c, m, n, ldc, beta, epilogue);
    }
    let stream = gpu.stream().clone();
    let (a_ptr, _ga) = a.slice().device_ptr(&stream);
    let (b_ptr, _gb) = b.slice().device_ptr(&stream);
    let c_addr = {
        let (p, _g) = c.slice_mut().device_ptr_mut(&stream);
        p
    };
    let key = PlanKey {
        input: T::DTYPE,
        output: O::DTYPE,
        trans_a,
        trans_b,
        m,
        n,
        k,
        lda,
        ldb,
        ldc,
        epilogue: epilogue.lt(),
        tf32: gpu.allow_tf32(),
        align: [alignment(a_ptr), alignment(b_ptr), alignment(c_addr)],
    };
    let mut guard = gpu.blas.lock().map_err(|_| Error::Cuda {
        op: OP,
        what: "cuBLASLt state poisoned".into(),
    })?;
    if guard.is_none() {
        *guard = Some(Blas::new(gpu)?);
    }
    let blas = guard.as_mut().ok_or_else(|| Error::Cuda {
        op: OP,
        what: "cuBLASLt state missing".into(),
    })?;
    gpu.context().bind_to_thread().map_err(driver_err(OP))?;
    if !blas.plans.contains_key(&key) {
        let plan = make_plan(blas, key)?;
        blas.plans.insert(key, plan);
    }
    let via_f32 = matches!(blas.plans.get(&key), Some(Plan::ViaF32(_)));
    if via_f32 && blas.scratch.as_ref().is_none_or(|s| s.len() < m * n) {
        blas.scratch = None;
        blas.scratch = Some(stream.alloc_zeros::<f32>(m * n).map_err(driver_err(OP))?);
    }
    let Blas {
        handle,
        workspace,
        scratch,
        plans,
    } = &mut *blas;
    let plan = plans.get(&key).ok_or_else(|| Error::Cuda {
        op: OP,
        what: "plan missing".into(),
    })?;
    let (ws_ptr, _gw) = workspace.device_ptr_mut(&stream);
    let cu_stream = stream.cu_stream() as sys::cudaStream_t;
    match plan {
        Plan::Fused(call) => {
            let bias_ptr = epilogue.bias().map(|bias| bias.slice().device_ptr(&stream));
            if call.has_bias {
                let p: u64 = bias_ptr.as_ref().map_or(0, |(p, _)| *p);
                // SAFETY: the descriptor is live; the attribute is a device pointer.
                unsafe {
                    set_desc(
                        call.desc,
                        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                        &p,
                    )?
                };
            }
            let (c_ptr, _gc) = c.slice_mut().device_ptr_mut(&stream);
            // SAFETY: the layouts describe the checked buffers (operands swapped for column
            // major); alpha and beta are host float32 values (scale type 32F, host pointer
            // mode); C and D are the same memory with the same layout; the workspace holds
            // WORKSPACE_BYTES, the heuristic's limit; everything is ordered on `stream`.
            unsafe {
                lt::matmul(
                    *handle,
                    call.desc,
                    (&alpha as *const f32).cast(),
                    (&beta as *const f32).cast(),
                    b_ptr as *const c_void,
                    call.a,
                    a_ptr as *const c_void,
                    call.b,
                    c_ptr as *const c_void,
                    call.d,
                    c_ptr as *mut c_void,
                    call.d,
                    &call.algo,
                    ws_ptr as *mut c_void,
                    WORKSPACE_BYTES,
                    cu_stream,
                )
            }
            .map_err(lt_err("cublasLtMatmul"))?;
            Ok(())
        }
        Plan::ViaF32(call) => {
            let scratch = scratch.as_mut().ok_or_else(|| Error::Cuda {
                op: OP,
                what: "scratch missing".into(),
            })?;
            {
                let (s_ptr, _gs) = scratch.device_ptr_mut(&stream);
                let zero = 0.0f32;
                // SAFETY: as above, with D a float32 `n x m` column-major scratch (ld n) of at
                // least m * n elements and beta 0 (C is not read).
                unsafe {
                    lt::matmul(
                        *handle,
                        call.desc,
                        (&alpha as *const f32).cast(),
                        (&zero as *const f32).cast(),
                        b_ptr as *const c_void,
                        call.a,
                        a_ptr as *const c_void,
                        call.b,
                        s_ptr as *const c_void,
                        call.d,
                        s_ptr as *mut c_void,
                        call.d,
                        &call.algo,
                        ws_ptr as *mut c_void,
                        WORKSPACE_BYTES,
                        cu_stream,
                    )
                }
                .map_err(lt_err("cublasLtMatmul"))?;
            }
            epilogue_kernel::<O>(gpu, Some(scratch), c, m, n, ldc, beta, epilogue)
        }
    }
}

/// Picks how to compute a shape: fused in cuBLASLt when it has an algorithm, else via float32.
fn make_plan(blas: &Blas, key: PlanKey) -> Result<Plan> {
    let problem = Problem { key };
    let epi = CudaEpilogue::lt_kind(key.epilogue);
    let has_bias = epi.1;
    let bias_f32 = has_bias && key.output != DType::F32;
    if let Some(call) = problem.lt_call(blas, key.output, key.epilogue, bias_f32)? {
        return Ok(Plan::Fused(call));
    }
    match problem.lt_call(
        blas,
        DType::F32,
        sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
        false,
    )? {
        Some(call) => Ok(Plan::ViaF32(call)),
        None => Err(Error::Cuda {
            op: OP,
            what: format!(
                "cuBLASLt has no algorithm for {} inputs, float32 output, m={} n={} k={}",
                key.input, key.m, key.n, key.k
            ),
        }),
    }
}

impl CudaEpilogue<'_> {
    /// (relu, bias) of a cuBLASLt epilogue.
    fn lt_kind(e: sys::cublasLtEpilogue_t) -> (bool, bool) {
        use sys::cublasLtEpilogue_t::*;
        match e {
            CUBLASLT_EPILOGUE_RELU => (true, false),
            CUBLASLT_EPILOGUE_BIAS => (false, true),
            CUBLASLT_EPILOGUE_RELU_BIAS => (true, true),
            _ => (false, false),
        }
    }
}

/// `c = epilogue(acc + beta * c)` with the `gemm_epilogue_<o>` kernel (`acc` null means 0).
#[allow(clippy::too_many_arguments)]
fn epilogue_kernel<O: Element>(
    gpu: &Gpu,
    acc: Option<&CudaSlice<f32>>,
    c: &mut CudaBuf<O>,
    m: usize,
    n: usize,
    ldc: usize,
    beta: f32,
    epilogue: CudaEpilogue<'_>,
) -> Result<()> {
    let name = match O::DTYPE {
        DType::F32 => "gemm_epilogue_f32",
        DType::F16 => "gemm_epilogue_f16",
        DType::BF16 => "gemm_epilogue_bf16",
    };
    let f = gpu.function(name)?;
    let (mm, nn, ld, relu) = (m as u64, n as u64, ldc as u64, i32::from(epilogue.relu()));
    let null = 0u64;
    let mut b = gpu.stream().launch_builder(&f);
    match acc {
        Some(s) => b.arg(s),
        None => b.arg(&null),
    };
    b.arg(c.slice_mut()).arg(&mm).arg(&nn).arg(&ld).arg(&beta);
    match epilogue.bias() {
        Some(bias) => b.arg(bias.slice()),
        None => b.arg(&null),
    };
    b.arg(&relu);
    // SAFETY: `gemm_epilogue_<o>(const float* acc, O* c, u64 m, u64 n, u64 ldc, float beta,
    // const float* bias, int relu)`: `acc` null or m * n floats, `c` checked for m x n with
    // stride ldc, `bias` null or n floats.
    unsafe { b.launch(gpu.grid(m * n)) }.map_err(driver_err(OP))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_checks_name_the_operand() {
        check_matrix("a", 3, 4, 4, 12).unwrap();
        check_matrix("a", 3, 4, 6, 16).unwrap();
        // Zero-sized matrices need no memory, but the stride must still cover a row.
        check_matrix("b", 0, 4, 4, 0).unwrap();
        let err = check_matrix("b", 3, 4, 3, 100).unwrap_err().to_string();
        assert!(
            err.contains("b: leading dimension 3 is less than the row width 4"),
            "{err}"
        );
        let err = check_matrix("c", 3, 4, 5, 13).unwrap_err().to_string();
        assert!(err.contains("c has 13 elements, expected 14"), "{err}");
        assert!(check_matrix("a", usize::MAX, 4, usize::MAX, 0).is_err());
    }

    #[test]
    fn alignment_of_addresses() {
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x7f00_0000_0010), 16);
        assert_eq!(alignment(0x7f00_0000_0002), 2);
        assert_eq!(alignment(0), 256);
    }

    #[test]
    fn epilogue_kinds() {
        use sys::cublasLtEpilogue_t::*;
        assert_eq!(CudaEpilogue::None.lt(), CUBLASLT_EPILOGUE_DEFAULT);
        assert_eq!(CudaEpilogue::Relu.lt(), CUBLASLT_EPILOGUE_RELU);
        assert_eq!(
            CudaEpilogue::lt_kind(CUBLASLT_EPILOGUE_RELU_BIAS),
            (true, true)
        );
        assert_eq!(CudaEpilogue::lt_kind(CUBLASLT_EPILOGUE_BIAS), (false, true));
        assert_eq!(
            CudaEpilogue::lt_kind(CUBLASLT_EPILOGUE_DEFAULT),
            (false, false)
        );
    }
}
