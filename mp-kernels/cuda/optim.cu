// Fused optimizer updates on float32 variables: the same float32 operations, in the same order,
// as mp_kernels::optim on the CPU (Keras 3's formulas), written with the _rn intrinsics so the
// compiler cannot contract them into FMAs: results are bit-identical to the CPU kernels.
//
// Each kernel first reads `skip` (a device flag written by unscale_check_f32, or null): when it
// is non-zero the step is skipped and nothing is written, so a non-finite gradient skips the
// update without a host round trip.
#include "common.cuh"

#define MP_SKIP()                                                                          \
    if (skip != 0 && *skip != 0u) {                                                        \
        return;                                                                            \
    }

// var -= g * lr
extern "C" __global__ void sgd_f32(float* var, const float* g, u64 n, float lr,
                                   const u32* skip) {
    MP_SKIP();
    MP_FOR_EACH(i, n) { var[i] = __fsub_rn(var[i], __fmul_rn(g[i], lr)); }
}

// m = m * momentum - g * lr; var += m, or with Nesterov var += m * momentum - g * lr.
extern "C" __global__ void sgd_momentum_f32(float* var, const float* g, float* m, u64 n,
                                            float lr, float momentum, int nesterov,
                                            const u32* skip) {
    MP_SKIP();
    MP_FOR_EACH(i, n) {
        const float lr_g = __fmul_rn(g[i], lr);
        const float mi = __fsub_rn(__fmul_rn(m[i], momentum), lr_g);
        m[i] = mi;
        var[i] = nesterov ? __fadd_rn(var[i], __fsub_rn(__fmul_rn(mi, momentum), lr_g))
                          : __fadd_rn(var[i], mi);
    }
}

// v = rho * v + (1 - rho) * g^2; inc = lr * g / sqrt(v + epsilon);
// with momentum: mom = momentum * mom + inc, var -= mom; else var -= inc.
extern "C" __global__ void rmsprop_f32(float* var, const float* g, float* v, float* mom, u64 n,
                                       float lr, float rho, float one_minus_rho, float momentum,
                                       float epsilon, const u32* skip) {
    MP_SKIP();
    MP_FOR_EACH(i, n) {
        const float gi = g[i];
        const float vi = __fadd_rn(__fmul_rn(rho, v[i]), __fmul_rn(one_minus_rho, __fmul_rn(gi, gi)));
        v[i] = vi;
        const float inc = __fdiv_rn(__fmul_rn(lr, gi), __fsqrt_rn(__fadd_rn(vi, epsilon)));
        if (mom != 0) {
            const float mo = __fadd_rn(__fmul_rn(momentum, mom[i]), inc);
            mom[i] = mo;
            var[i] = __fsub_rn(var[i], mo);
        } else {
            var[i] = __fsub_rn(var[i], inc);
        }
    }
}

// AdamW decay first when weight_decay != 0: var = var - var * weight_decay * lr (Keras 3).
// m += (g - m) * (1 - beta1); v += (g^2 - v) * (1 - beta2); var -= m * alpha / (sqrt(v) + eps).
extern "C" __global__ void adam_f32(float* var, const float* g, float* m, float* v, u64 n,
                                    float alpha, float one_minus_beta1, float one_minus_beta2,
                                    float epsilon, float lr, float weight_decay,
                                    const u32* skip) {
    MP_SKIP();
    MP_FOR_EACH(i, n) {
        const float gi = g[i];
        float xi = var[i];
        if (weight_decay != 0.0f) {
            xi = __fsub_rn(xi, __fmul_rn(__fmul_rn(xi, weight_decay), lr));
        }
        const float mi = __fadd_rn(m[i], __fmul_rn(__fsub_rn(gi, m[i]), one_minus_beta1));
        const float vi =
            __fadd_rn(v[i], __fmul_rn(__fsub_rn(__fmul_rn(gi, gi), v[i]), one_minus_beta2));
        m[i] = mi;
        v[i] = vi;
        var[i] = __fsub_rn(xi, __fdiv_rn(__fmul_rn(mi, alpha), __fadd_rn(__fsqrt_rn(vi), epsilon)));
    }
}
