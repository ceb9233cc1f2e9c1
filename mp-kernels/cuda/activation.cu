// ReLU forward and backward, float32 math, one rounding back to the element type; the same
// rules as mp_kernels::activation on the CPU:
//   forward:  y = x if x > 0, +0 if x <= 0, NaN if x is NaN;
//   backward: dx = dy * s, s = 1 if y > 0, 0 if y <= 0, NaN if y is NaN (a product, as
//             TensorFlow's ReluGrad, so an infinite dy where the unit is off gives NaN).
// `dx` may alias `dy` (in-place backward) and `y` may alias `x` (in-place forward).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void relu_forward(const T* x, T* y, u64 n) {
    MP_FOR_EACH(i, n) {
        float v = mp_load(x + i);
        mp_store(y + i, (v > 0.0f || mp_is_nan(v)) ? v : 0.0f);
    }
}

template <typename T>
__device__ __forceinline__ void relu_backward(const T* dy, const T* y, T* dx, u64 n) {
    MP_FOR_EACH(i, n) {
        float yv = mp_load(y + i);
        float s = yv > 0.0f ? 1.0f : (mp_is_nan(yv) ? yv : 0.0f);
        mp_store(dx + i, __fmul_rn(mp_load(dy + i), s));
    }
}

#define MP_RELU(SUFFIX, T)                                                                 \
    extern "C" __global__ void relu_forward_##SUFFIX(const T* x, T* y, u64 n) {            \
        relu_forward(x, y, n);                                                             \
    }                                                                                      \
    extern "C" __global__ void relu_backward_##SUFFIX(const T* dy, const T* y, T* dx, u64 n) { \
        relu_backward(dy, y, dx, n);                                                       \
    }

MP_RELU(f32, float)
MP_RELU(f16, __half)
MP_RELU(bf16, __nv_bfloat16)
