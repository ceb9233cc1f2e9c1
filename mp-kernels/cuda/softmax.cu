// Row softmax and sparse categorical cross-entropy in float32 math, whatever the input dtype
// (the mixed precision guide's float32 softmax); the same formulas as mp_kernels::softmax:
//   softmax:  y = e^(x - max) / sum e^(x - max) per row;
//   loss:     from logits ln(sum e^(z - max)) - (z[label] - max); from probabilities (Keras)
//             -ln(clip(p[label] / sum p, 1e-7, 1 - 1e-7));
//   gradient: dlogits = factor * (p - onehot(label)), factor = scale / rows (the host computes
//             it in float64 and rounds once).
// One warp per row (8 rows per 256-thread block); lanes stride over the columns. Labels are
// u32, checked against `cols` on the host before upload.
#include "common.cuh"

#define MP_EPS 1e-7f
// (1.0 - 1e-7) rounded to float32, as the CPU computes it.
#define MP_ONE_MINUS_EPS 0.99999988079071044921875f

__device__ __forceinline__ u64 mp_warp_row() {
    return ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
}

template <typename T>
__device__ __forceinline__ void softmax_row(const T* x, float* y, u64 cols, u32 lane) {
    float m = -__int_as_float(0x7f800000);
    for (u64 j = lane; j < cols; j += 32) {
        m = fmaxf(m, mp_load(x + j));
    }
    m = mp_warp_max(m);
    float s = 0.0f;
    for (u64 j = lane; j < cols; j += 32) {
        float e = expf(__fsub_rn(mp_load(x + j), m));
        y[j] = e;
        s = __fadd_rn(s, e);
    }
    s = mp_warp_sum(s);
    for (u64 j = lane; j < cols; j += 32) {
        y[j] = __fdiv_rn(y[j], s);
    }
}

template <typename T>
__device__ __forceinline__ void softmax(const T* x, float* y, u64 rows, u64 cols) {
    const u64 r = mp_warp_row();
    if (r >= rows) {
        return;
    }
    softmax_row(x + r * cols, y + r * cols, cols, threadIdx.x & 31u);
}

// The from-probabilities loss of one row (all lanes return it).
__device__ __forceinline__ float prob_row_loss(const float* p, u32 label, u64 cols, u32 lane) {
    float s = 0.0f;
    for (u64 j = lane; j < cols; j += 32) {
        s = __fadd_rn(s, p[j]);
    }
    s = mp_warp_sum(s);
    float q = __fdiv_rn(p[label], s);
    // clamp as Rust's f32::clamp: NaN stays NaN.
    q = q < MP_EPS ? MP_EPS : (q > MP_ONE_MINUS_EPS ? MP_ONE_MINUS_EPS : q);
    return -logf(q);
}

__device__ __forceinline__ float logit_row_loss(const float* z, u32 label, u64 cols, u32 lane) {
    float m = -__int_as_float(0x7f800000);
    for (u64 j = lane; j < cols; j += 32) {
        m = fmaxf(m, z[j]);
    }
    m = mp_warp_max(m);
    float s = 0.0f;
    for (u64 j = lane; j < cols; j += 32) {
        s = __fadd_rn(s, expf(__fsub_rn(z[j], m)));
    }
    s = mp_warp_sum(s);
    return __fsub_rn(logf(s), __fsub_rn(z[label], m));
}

#define MP_SOFTMAX(SUFFIX, T)                                                              \
    extern "C" __global__ void softmax_##SUFFIX(const T* x, float* y, u64 rows, u64 cols) { \
        softmax(x, y, rows, cols);                                                         \
    }

MP_SOFTMAX(f32, float)
MP_SOFTMAX(f16, __half)
MP_SOFTMAX(bf16, __nv_bfloat16)

// Per-row losses of a [rows, cols] float32 input (logits or probabilities).
extern "C" __global__ void xent_rows_f32(const float* input, const u32* labels, float* loss,
                                         u64 rows, u64 cols, int from_logits) {
    const u64 r = mp_warp_row();
    if (r >= rows) {
        return;
    }
    const u32 lane = threadIdx.x & 31u;
    const float* x = input + r * cols;
    float l = from_logits ? logit_row_loss(x, labels[r], cols, lane)
                          : prob_row_loss(x, labels[r], cols, lane);
    if (lane == 0) {
        loss[r] = l;
    }
}

// dlogits = factor * (p - onehot(label)) from the softmax output p.
extern "C" __global__ void xent_grad_f32(const float* probs, const u32* labels, float* dlogits,
                                         u64 rows, u64 cols, float factor) {
    MP_FOR_EACH(i, rows * cols) {
        const u64 r = i / cols;
        const u64 j = i - r * cols;
        const float p = probs[i];
        dlogits[i] = j == labels[r] ? __fmul_rn(__fsub_rn(p, 1.0f), factor) : __fmul_rn(p, factor);
    }
}

// The fused head of a training step: probs = softmax(logits) in float32, the per-row
// from-probabilities loss, and dlogits = factor * (probs - onehot(label)), in one pass.
template <typename T>
__device__ __forceinline__ void softmax_xent(const T* logits, const u32* labels, float* probs,
                                             float* loss, float* dlogits, u64 rows, u64 cols,
                                             float factor) {
    const u64 r = mp_warp_row();
    if (r >= rows) {
        return;
    }
    const u32 lane = threadIdx.x & 31u;
    float* p = probs + r * cols;
    softmax_row(logits + r * cols, p, cols, lane);
    __syncwarp();
    const u32 label = labels[r];
    float l = prob_row_loss(p, label, cols, lane);
    if (lane == 0) {
        loss[r] = l;
    }
    float* d = dlogits + r * cols;
    for (u64 j = lane; j < cols; j += 32) {
        d[j] = j == label ? __fmul_rn(__fsub_rn(p[j], 1.0f), factor) : __fmul_rn(p[j], factor);
    }
}

#define MP_SOFTMAX_XENT(SUFFIX, T)                                                         \
    extern "C" __global__ void softmax_xent_##SUFFIX(const T* logits, const u32* labels,   \
                                                     float* probs, float* loss,            \
                                                     float* dlogits, u64 rows, u64 cols,   \
                                                     float factor) {                       \
        softmax_xent(logits, labels, probs, loss, dlogits, rows, cols, factor);            \
    }

MP_SOFTMAX_XENT(f32, float)
MP_SOFTMAX_XENT(f16, __half)
MP_SOFTMAX_XENT(bf16, __nv_bfloat16)
