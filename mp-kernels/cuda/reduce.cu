// The bias gradient: column sums of a [rows, cols] row-major matrix into float32,
// `out[c] = (accumulate ? out[c] : 0) + sum_r dy[r, c]`, accumulated in float32.
//
// One block per 32 columns, 32 x 32 threads: thread (x, y) sums column 32 * blockIdx.x + x over
// rows y, y + 32, y + 64, ... in order; the 32 partial sums of a column are then added in order
// of y. The order depends on the shape only, so results are bit-identical run to run (they may
// differ from the CPU's row-after-row order by float32 rounding).
#include "common.cuh"

#define MP_BG_TILE 32

template <typename T>
__device__ __forceinline__ void bias_grad(const T* __restrict__ dy, u64 rows, u64 cols,
                                          float* __restrict__ out, int accumulate) {
    __shared__ float part[MP_BG_TILE][MP_BG_TILE + 1];
    const u64 c = (u64)blockIdx.x * MP_BG_TILE + threadIdx.x;
    float s = 0.0f;
    if (c < cols) {
        for (u64 r = threadIdx.y; r < rows; r += MP_BG_TILE) {
            s = __fadd_rn(s, mp_load(dy + r * cols + c));
        }
    }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float t = part[0][threadIdx.x];
        for (int y = 1; y < MP_BG_TILE; ++y) {
            t = __fadd_rn(t, part[y][threadIdx.x]);
        }
        out[c] = accumulate ? __fadd_rn(out[c], t) : t;
    }
}

#define MP_BIAS_GRAD(SUFFIX, T)                                                            \
    extern "C" __global__ void __launch_bounds__(MP_BG_TILE * MP_BG_TILE)                  \
        bias_grad_##SUFFIX(const T* dy, u64 rows, u64 cols, float* out, int accumulate) {  \
        bias_grad(dy, rows, cols, out, accumulate);                                        \
    }

MP_BIAS_GRAD(f32, float)
MP_BIAS_GRAD(f16, __half)
MP_BIAS_GRAD(bf16, __nv_bfloat16)

// The GEMM epilogue when cuBLASLt cannot fuse it (and for k == 0):
// c[i, j] = act(acc[i, j] + beta * c[i, j] + bias[j]), rounded once to the element type.
// `acc` is float32 [m, n] with row stride n, or null (zeros); `bias` may be null; `c` has row
// stride ldc. `beta == 0` means c is not read (as in BLAS).
template <typename T>
__device__ __forceinline__ void gemm_epilogue(const float* __restrict__ acc, T* c, u64 m, u64 n,
                                              u64 ldc, float beta,
                                              const float* __restrict__ bias, int relu) {
    MP_FOR_EACH(i, m * n) {
        const u64 r = i / n;
        const u64 j = i - r * n;
        float v = acc ? acc[i] : 0.0f;
        if (beta != 0.0f) {
            v = __fadd_rn(v, __fmul_rn(beta, mp_load(c + r * ldc + j)));
        }
        if (bias) {
            v = __fadd_rn(v, bias[j]);
        }
        if (relu && !(v > 0.0f || mp_is_nan(v))) {
            v = 0.0f;
        }
        mp_store(c + r * ldc + j, v);
    }
}

#define MP_EPILOGUE(SUFFIX, T)                                                             \
    extern "C" __global__ void gemm_epilogue_##SUFFIX(const float* acc, T* c, u64 m, u64 n, \
                                                      u64 ldc, float beta, const float* bias, \
                                                      int relu) {                          \
        gemm_epilogue(acc, c, m, n, ldc, beta, bias, relu);                                \
    }

MP_EPILOGUE(f32, float)
MP_EPILOGUE(f16, __half)
MP_EPILOGUE(bf16, __nv_bfloat16)
