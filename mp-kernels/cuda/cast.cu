// Casts between float32, float16 and bfloat16: `cast_<src>_<dst>`, one element per thread in a
// grid-stride loop. Bit-identical to mp_kernels::cast on the CPU (see common.cuh); float16 and
// bfloat16 convert to each other through float32 (exact, then one rounding).
#include "common.cuh"

#define MP_CAST(NAME, S, D)                                                                \
    extern "C" __global__ void NAME(const S* __restrict__ src, D* __restrict__ dst, u64 n) { \
        MP_FOR_EACH(i, n) { mp_store(dst + i, mp_load(src + i)); }                        \
    }

MP_CAST(cast_f32_bf16, float, __nv_bfloat16)
MP_CAST(cast_f32_f16, float, __half)
MP_CAST(cast_bf16_f32, __nv_bfloat16, float)
MP_CAST(cast_f16_f32, __half, float)
MP_CAST(cast_bf16_f16, __nv_bfloat16, __half)
MP_CAST(cast_f16_bf16, __half, __nv_bfloat16)
