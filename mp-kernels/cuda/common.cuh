// Shared helpers of mp's CUDA kernels. NVRTC-compatible: no libc headers, only the CUDA headers
// below; fixed-width integers are spelled out.
//
// Element conversions are bit-identical to the `half` crate that the CPU kernels use:
// float32 -> bfloat16 and float32 -> float16 round to nearest, ties to even, keep subnormals,
// overflow to infinity, and keep NaN (quiet bit set, payload kept as `half` keeps it); widening
// is exact.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

// Grid-stride loop over `n` elements.
#define MP_FOR_EACH(i, n)                                                                  \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                     \
         i += (u64)blockDim.x * gridDim.x)

__device__ __forceinline__ bool mp_is_finite(float v) {
    return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}

__device__ __forceinline__ bool mp_is_nan(float v) { return v != v; }

// float32 -> bfloat16 bits: round to nearest even with the integer trick; NaN keeps its sign and
// high payload bits with the quiet bit set (what `half::bf16::from_f32` does).
__device__ __forceinline__ u16 mp_f32_to_bf16_bits(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((x >> 16) | 0x0040u);
    }
    return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// bfloat16 bits -> float32, exact; a signalling NaN is quieted (as `half` does).
__device__ __forceinline__ float mp_bf16_bits_to_f32(u16 h) {
    u32 x = ((u32)h) << 16;
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        x |= 0x00400000u;
    }
    return __uint_as_float(x);
}

// float32 -> float16 bits: the hardware conversion (round to nearest even, subnormals kept),
// with NaN mapped as `half::f16::from_f32` maps it.
__device__ __forceinline__ u16 mp_f32_to_f16_bits(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (u16)(((x >> 16) & 0x8000u) | 0x7c00u | 0x0200u | ((x & 0x007fffffu) >> 13));
    }
    return __half_as_ushort(__float2half_rn(f));
}

// float16 bits -> float32, exact; NaN as `half::f16::to_f32` maps it (quiet bit set).
__device__ __forceinline__ float mp_f16_bits_to_f32(u16 h) {
    if ((h & 0x7c00u) == 0x7c00u && (h & 0x03ffu) != 0u) {
        return __uint_as_float((((u32)h & 0x8000u) << 16) | 0x7fc00000u |
                               (((u32)h & 0x03ffu) << 13));
    }
    return __half2float(__ushort_as_half(h));
}

__device__ __forceinline__ float mp_load(const float* p) { return *p; }
__device__ __forceinline__ float mp_load(const __half* p) {
    return mp_f16_bits_to_f32(__half_as_ushort(*p));
}
__device__ __forceinline__ float mp_load(const __nv_bfloat16* p) {
    return mp_bf16_bits_to_f32(__bfloat16_as_ushort(*p));
}

__device__ __forceinline__ void mp_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void mp_store(__half* p, float v) {
    *p = __ushort_as_half(mp_f32_to_f16_bits(v));
}
__device__ __forceinline__ void mp_store(__nv_bfloat16* p, float v) {
    *p = __ushort_as_bfloat16(mp_f32_to_bf16_bits(v));
}

// Warp reductions (all 32 lanes must take part).
__device__ __forceinline__ float mp_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}

__device__ __forceinline__ float mp_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) {
        v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}
