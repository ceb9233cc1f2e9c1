// Scaling by a scalar and the loss-scale checks, as mp_kernels::scale:
//   scale_<t>:          x = x * s in float32, rounded back to the element type;
//   unscale_check_f32:  g = g * inv_scale and, if any result is NaN or infinite, flag |= 1;
//   all_finite_<t>:     flag |= 1 if any element is NaN or infinite.
// The flag is a u32 in device memory that the host zeroes before a step; it is read on the
// device by the optimizer kernels (which skip the update when it is set), so the skip decision
// needs no host round trip. One atomic per warp that saw a non-finite value.
#include "common.cuh"

__device__ __forceinline__ void mp_flag_if(bool bad, u32* flag) {
    // Every lane of the warp reaches this after its grid-stride loop.
    if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31u) == 0u) {
        atomicOr(flag, 1u);
    }
}

template <typename T>
__device__ __forceinline__ void scale(T* x, u64 n, float s) {
    MP_FOR_EACH(i, n) { mp_store(x + i, __fmul_rn(mp_load(x + i), s)); }
}

template <typename T>
__device__ __forceinline__ void all_finite(const T* x, u64 n, u32* flag) {
    bool bad = false;
    MP_FOR_EACH(i, n) { bad |= !mp_is_finite(mp_load(x + i)); }
    mp_flag_if(bad, flag);
}

#define MP_SCALE(SUFFIX, T)                                                                \
    extern "C" __global__ void scale_##SUFFIX(T* x, u64 n, float s) { scale(x, n, s); }     \
    extern "C" __global__ void all_finite_##SUFFIX(const T* x, u64 n, u32* flag) {         \
        all_finite(x, n, flag);                                                            \
    }

MP_SCALE(f32, float)
MP_SCALE(f16, __half)
MP_SCALE(bf16, __nv_bfloat16)

extern "C" __global__ void unscale_check_f32(float* g, u64 n, float inv_scale, u32* flag) {
    bool bad = false;
    MP_FOR_EACH(i, n) {
        const float v = __fmul_rn(g[i], inv_scale);
        g[i] = v;
        bad |= !mp_is_finite(v);
    }
    mp_flag_if(bad, flag);
}
