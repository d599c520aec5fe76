/* Fused CNL update rules for the CPU: one pass over a float32 parameter.
 *
 * Each function reads the gradient, the optimizer state and the stored reference sign, updates the
 * state (always from the unmasked gradient), and moves an element of the parameter only where the
 * update u agrees in sign with the reference (SPEC §4: frozen where u * g_M < 0). It returns how
 * many elements were frozen. The arithmetic repeats, operation by operation and rounding by
 * rounding, what the eager torch rules of cnl.optim compute (those are the reference
 * implementation): PyTorch's CPU kernels fuse `a + alpha * b` (sub_/add_ with alpha, addcmul_)
 * into one fma, so exactly those places use fmaf here, and the file is compiled with
 * -ffp-contract=off so that the compiler fuses nothing else.
 *
 * Reference signs come in three storages: none (plain update, no mask), int8 (-1, 0, +1 per
 * element) or bits: 2-bit codes (1 = positive, 2 = negative, 0 = zero) in blocks of 256 elements
 * held by 64 bytes, byte j of a block carrying elements j, 64 + j, 128 + j and 192 + j in its bit
 * pairs 0-1, 2-3, 4-5 and 6-7. That layout lets the compiler decode 64 consecutive elements with
 * one vector shift, so the masked update runs at the speed of memory.
 *
 * Work is split by the caller into ranges [start, stop) of elements (multiples of 256 except for
 * the last stop); csr, when not 0, is the caller thread's SSE control word, set for the duration so
 * that a worker thread flushes denormals exactly when the caller does.
 */
#include <math.h>
#include <stdint.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#define BLOCK_BYTES 64
#define BLOCK 256

enum { NONE = 0, BITS = 1, INT8 = 2 };

static inline uint32_t enter(uint32_t csr) {
#if defined(__SSE__)
    uint32_t old = _mm_getcsr();
    if (csr) _mm_setcsr(csr);
    return old;
#else
    (void)csr;
    return 0;
#endif
}

static inline void leave(uint32_t csr, uint32_t old) {
#if defined(__SSE__)
    if (csr) _mm_setcsr(old);
#else
    (void)csr;
    (void)old;
#endif
}

uint32_t cnl_get_csr(void) {
#if defined(__SSE__)
    return _mm_getcsr();
#else
    return 0;
#endif
}

/* sign code of element i: 1 positive, 2 negative, 0 zero (any storage) */
static inline int code_at(const void* signs, int storage, int64_t i) {
    if (storage == BITS) {
        const uint8_t* c = (const uint8_t*)signs;
        int64_t b = i / BLOCK, r = i % BLOCK;
        return (c[b * BLOCK_BYTES + r % BLOCK_BYTES] >> (2 * (r / BLOCK_BYTES))) & 3;
    }
    if (storage == INT8) {
        int8_t s = ((const int8_t*)signs)[i];
        return (s > 0) | ((s < 0) << 1);
    }
    return 0;
}

/* BODY(i, code) computes u for element i (updating the state), then freezes or moves theta[i] */
#define FREEZE(u, code) ((((code) == 2) & ((u) > 0.0f)) | (((code) == 1) & ((u) < 0.0f)))

#define LOOPS(BODY)                                                                              \
    int64_t frozen = 0;                                                                          \
    int64_t i = start;                                                                           \
    if (storage == BITS) {                                                                       \
        const uint8_t* codes = (const uint8_t*)signs;                                            \
        for (; i + BLOCK <= stop; i += BLOCK) {                                                  \
            const uint8_t* cb = codes + (i / BLOCK) * BLOCK_BYTES;                               \
            for (int k = 0; k < 4; k++) {                                                        \
                int32_t count = 0;                                                               \
                for (int j = 0; j < BLOCK_BYTES; j++) {                                          \
                    const int64_t e = i + k * BLOCK_BYTES + j;                                   \
                    const int code = (cb[j] >> (2 * k)) & 3;                                     \
                    BODY(e, code)                                                                \
                }                                                                                \
                frozen += count;                                                                 \
            }                                                                                    \
        }                                                                                        \
    } else if (storage == INT8) {                                                                \
        const int8_t* s8 = (const int8_t*)signs;                                                 \
        int32_t count = 0;                                                                       \
        for (; i < stop; i++) {                                                                  \
            const int code = (s8[i] > 0) | ((s8[i] < 0) << 1);                                   \
            BODY(i, code)                                                                        \
        }                                                                                        \
        frozen += count;                                                                         \
    } else {                                                                                     \
        int32_t count = 0;                                                                       \
        for (; i < stop; i++) {                                                                  \
            const int code = 0;                                                                  \
            BODY(i, code)                                                                        \
        }                                                                                        \
        frozen += count;                                                                         \
    }                                                                                            \
    {                                                                                            \
        int32_t count = 0;                                                                       \
        for (; i < stop; i++) {                                                                  \
            const int code = code_at(signs, storage, i);                                         \
            BODY(i, code)                                                                        \
        }                                                                                        \
        frozen += count;                                                                         \
    }                                                                                            \
    return frozen;

/* the masked step theta <- theta - lr * u, as torch's sub_(u, alpha=lr) on the masked u: one fma,
 * with u = +0 where frozen (so a frozen element goes through the same arithmetic as in the eager
 * rule: unchanged, except that a denormal is flushed when the caller flushes denormals) */
#define STEP(e, u, code)                                    \
    {                                                       \
        const int f = FREEZE(u, code);                      \
        count += f;                                         \
        const float masked = f ? 0.0f : (u);                \
        theta[e] = fmaf(masked, neg_lr, theta[e]);          \
    }

static int64_t sgd_range(float* restrict theta, const float* restrict grad, const void* restrict signs, int storage,
                         int64_t start, int64_t stop, float neg_lr) {
#define SGD_BODY(e, code)         \
    {                             \
        const float u = grad[e];  \
        STEP(e, u, code)          \
    }
    LOOPS(SGD_BODY)
}

int64_t cnl_sgd(float* theta, const float* grad, const void* signs, int storage, int64_t start, int64_t stop,
                float neg_lr, uint32_t csr) {
    uint32_t old = enter(csr);
    int64_t n = sgd_range(theta, grad, signs, storage, start, stop, neg_lr);
    leave(csr, old);
    return n;
}

/* heavy-ball momentum: v <- mu v + g (v <- g on the first step), u = v */
static int64_t momentum_range(float* restrict theta, const float* restrict grad, float* restrict v,
                              const void* restrict signs, int storage, int64_t start, int64_t stop, float neg_lr,
                              float mu, int first) {
#define MOMENTUM_BODY(e, code)                                   \
    {                                                            \
        const float g = grad[e];                                 \
        const float u = first ? g : v[e] * mu + g;               \
        v[e] = u;                                                \
        STEP(e, u, code)                                         \
    }
    LOOPS(MOMENTUM_BODY)
}

int64_t cnl_momentum(float* theta, const float* grad, float* v, const void* signs, int storage, int64_t start,
                     int64_t stop, float neg_lr, float mu, int first, uint32_t csr) {
    uint32_t old = enter(csr);
    int64_t n = momentum_range(theta, grad, v, signs, storage, start, stop, neg_lr, mu, first);
    leave(csr, old);
    return n;
}

/* Adam / AdamW's direction from the new moments: u = m^ / (sqrt(v^) + eps) [+ wd theta], as the eager rule
 * rounds it (shared by the masked update, MoFO's band update and its settling) */
static inline float adam_direction(float mm, float vv, float theta, float bc1, float bc2, float eps, float wd,
                                   int decay) {
    const float denom = sqrtf(vv / bc2) + eps;
    const float plain = (mm / bc1) / denom;
    return decay ? fmaf(theta, wd, plain) : plain;
}

/* Adam / AdamW: bias-corrected moments from the unmasked g; u = m^ / (sqrt(v^) + eps) [+ wd theta] */
static int64_t adam_range(float* restrict theta, const float* restrict grad, float* restrict m, float* restrict v,
                          const void* restrict signs, int storage, int64_t start, int64_t stop, float neg_lr,
                          float beta1, float one_minus_beta1, float beta2, float one_minus_beta2, float bc1, float bc2,
                          float eps, float wd, int decay) {
#define ADAM_BODY(e, code)                                                    \
    {                                                                         \
        const float g = grad[e];                                              \
        const float mm = fmaf(g, one_minus_beta1, m[e] * beta1);              \
        const float vv = fmaf(one_minus_beta2 * g, g, v[e] * beta2);          \
        m[e] = mm;                                                            \
        v[e] = vv;                                                            \
        const float u = adam_direction(mm, vv, theta[e], bc1, bc2, eps, wd, decay); \
        STEP(e, u, code)                                                      \
    }
    LOOPS(ADAM_BODY)
}

int64_t cnl_adam(float* theta, const float* grad, float* m, float* v, const void* signs, int storage, int64_t start,
                 int64_t stop, float neg_lr, float beta1, float one_minus_beta1, float beta2, float one_minus_beta2,
                 float bc1, float bc2, float eps, float wd, int decay, uint32_t csr) {
    uint32_t old = enter(csr);
    int64_t n = adam_range(theta, grad, m, v, signs, storage, start, stop, neg_lr, beta1, one_minus_beta1, beta2,
                           one_minus_beta2, bc1, bc2, eps, wd, decay);
    leave(csr, old);
    return n;
}

/* ---- MoFO: the top fraction of a tensor by |first moment|, found exactly in two passes ----------------
 *
 * Pass 1 (cnl_moment_ladder) computes each element's new first moment exactly as the update will (Adam:
 * fmaf(g, 1 - beta1, m * beta1); momentum: v * mu + g, or g on the first step), without writing it, and
 * counts how many have |moment| >= t[j] for a ladder of LADDER thresholds (counts[j]). The caller picks the
 * rung pair [t[j], t[j+1]) that holds the k-th largest |moment|. Pass 2 (cnl_adam_band, cnl_momentum_band) is
 * the fused update with the CNL mask replaced by a band: an element moves when |moment| >= hi, stays when
 * |moment| < lo, and is left unmoved and listed (idx) when lo <= |moment| < hi, for the caller to settle
 * with the exact k-th value (few elements). Unmoved elements go through fmaf(0, -lr, theta) like a frozen
 * element of the eager rule. A 256-element block is rescanned for its band members only when it has any. */
#define LADDER 8
#define LADDER_BLOCK 1024
#define BAND_BLOCK 256

/* counts[j] += #(|x| >= t[j]) over a block of new moments x (each element against every rung) */
static inline void ladder_block(const float* restrict x, int64_t len, const float* restrict t, int64_t* counts) {
    /* one loop over the elements with a counter per rung, written out so that the compiler vectorizes the
     * elements (not the 8 rungs) */
    const float t0 = t[0], t1 = t[1], t2 = t[2], t3 = t[3], t4 = t[4], t5 = t[5], t6 = t[6], t7 = t[7];
    int32_t c0 = 0, c1 = 0, c2 = 0, c3 = 0, c4 = 0, c5 = 0, c6 = 0, c7 = 0;
    for (int64_t e = 0; e < len; e++) {
        const float a = fabsf(x[e]);
        c0 += a >= t0;
        c1 += a >= t1;
        c2 += a >= t2;
        c3 += a >= t3;
        c4 += a >= t4;
        c5 += a >= t5;
        c6 += a >= t6;
        c7 += a >= t7;
    }
    counts[0] += c0;
    counts[1] += c1;
    counts[2] += c2;
    counts[3] += c3;
    counts[4] += c4;
    counts[5] += c5;
    counts[6] += c6;
    counts[7] += c7;
}

int64_t cnl_moment_ladder(const float* restrict grad, const float* restrict mom, int64_t start, int64_t stop,
                          int kind, float a1, float b1, int first, const float* restrict t, int64_t* counts,
                          uint32_t csr) {
    uint32_t old = enter(csr);
    int64_t total[LADDER] = {0};
    float x[LADDER_BLOCK];
    for (int64_t i = start; i < stop; i += LADDER_BLOCK) {
        const int64_t len = i + LADDER_BLOCK < stop ? LADDER_BLOCK : stop - i;
        const float* restrict g = grad + i;
        const float* restrict mo = mom + i;
        /* kind 1 (Adam): a1 = beta1, b1 = 1 - beta1; kind 2 (momentum): a1 = mu */
        if (kind == 1)
            for (int64_t e = 0; e < len; e++) x[e] = fmaf(g[e], b1, mo[e] * a1);
        else if (first)
            for (int64_t e = 0; e < len; e++) x[e] = g[e];
        else
            for (int64_t e = 0; e < len; e++) x[e] = mo[e] * a1 + g[e];
        ladder_block(x, len, t, total);
    }
    for (int j = 0; j < LADDER; j++) counts[j] = total[j];
    leave(csr, old);
    return 0;
}

#define BAND_STEP(e, u, a)                                   \
    {                                                        \
        const int mv = (a) >= hi;                            \
        any |= ((a) >= lo) & !mv;                            \
        moved += mv;                                         \
        theta[e] = fmaf(mv ? (u) : 0.0f, neg_lr, theta[e]);  \
    }

#define BAND_LIST(ABS_AT)                                                   \
    if (any) {                                                              \
        for (int64_t e = i; e < end; e++) {                                 \
            const float a = ABS_AT(e);                                      \
            if (a >= lo && a < hi) {                                        \
                if (n_idx < cap) idx[n_idx] = e;                            \
                n_idx++;                                                    \
            }                                                               \
        }                                                                   \
    }

#define ABS_M(e) fabsf(m[e])
#define ABS_V(e) fabsf(v[e])

/* the band update's loop over 256-element blocks: BODY(e) computes u and the moment a of element e and ends with
 * BAND_STEP; a block with band members is rescanned (ABS_AT: |moment| of an element, as stored) to list them */
#define BAND_LOOPS(BODY, ABS_AT)                                       \
    uint32_t old = enter(csr);                                         \
    int64_t n_idx = 0, moved_total = 0;                                \
    for (int64_t i = start; i < stop; i += BAND_BLOCK) {               \
        const int64_t end = i + BAND_BLOCK < stop ? i + BAND_BLOCK : stop; \
        int any = 0;                                                   \
        int32_t moved = 0;                                             \
        for (int64_t e = i; e < end; e++) BODY(e)                      \
        moved_total += moved;                                          \
        BAND_LIST(ABS_AT)                                              \
    }                                                                  \
    out[0] = moved_total;                                              \
    leave(csr, old);                                                   \
    return n_idx;

/* returns the number of listed (band) elements; out[0]: how many moved */
int64_t cnl_adam_band(float* restrict theta, const float* restrict grad, float* restrict m, float* restrict v,
                      int32_t* restrict idx, int64_t cap, int64_t start, int64_t stop, float neg_lr, float beta1,
                      float one_minus_beta1, float beta2, float one_minus_beta2, float bc1, float bc2, float eps,
                      float wd, int decay, float lo, float hi, int64_t* out, uint32_t csr) {
#define ADAM_BAND_BODY(e)                                            \
    {                                                                \
        const float g = grad[e];                                     \
        const float mm = fmaf(g, one_minus_beta1, m[e] * beta1);     \
        const float vv = fmaf(one_minus_beta2 * g, g, v[e] * beta2); \
        m[e] = mm;                                                   \
        v[e] = vv;                                                   \
        const float u = adam_direction(mm, vv, theta[e], bc1, bc2, eps, wd, decay); \
        const float a = fabsf(mm);                                   \
        BAND_STEP(e, u, a)                                           \
    }
    BAND_LOOPS(ADAM_BAND_BODY, ABS_M)
}

int64_t cnl_momentum_band(float* restrict theta, const float* restrict grad, float* restrict v, int32_t* restrict idx,
                          int64_t cap, int64_t start, int64_t stop, float neg_lr, float mu, int first, float lo,
                          float hi, int64_t* out, uint32_t csr) {
#define MOMENTUM_BAND_BODY(e)                       \
    {                                               \
        const float g = grad[e];                    \
        const float u = first ? g : v[e] * mu + g;  \
        v[e] = u;                                   \
        const float a = fabsf(u);                   \
        BAND_STEP(e, u, a)                          \
    }
    BAND_LOOPS(MOMENTUM_BAND_BODY, ABS_V)
}

/* settle the listed band elements: move those with |moment| >= thr (the exact k-th largest); returns how many */
int64_t cnl_adam_settle(float* theta, const float* m, const float* v, const int32_t* idx, int64_t count,
                        float neg_lr, float bc1, float bc2, float eps, float wd, int decay, float thr) {
    int64_t moved = 0;
    for (int64_t j = 0; j < count; j++) {
        const int64_t e = idx[j];
        if (!(fabsf(m[e]) >= thr)) continue;
        theta[e] = fmaf(adam_direction(m[e], v[e], theta[e], bc1, bc2, eps, wd, decay), neg_lr, theta[e]);
        moved++;
    }
    return moved;
}

int64_t cnl_momentum_settle(float* theta, const float* v, const int32_t* idx, int64_t count, float neg_lr,
                            float thr) {
    int64_t moved = 0;
    for (int64_t j = 0; j < count; j++) {
        const int64_t e = idx[j];
        if (!(fabsf(v[e]) >= thr)) continue;
        theta[e] = fmaf(v[e], neg_lr, theta[e]);
        moved++;
    }
    return moved;
}
