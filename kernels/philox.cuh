// Counter-based random numbers on the device: the CUDA twin of gpuloader/augment/rng.py.
//
// Design decision 3: every random decision is philox4x32_10(counter, key) with
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (c0, index, epoch, purpose)
// and floats are made from integers exactly as in rng.py, so numpy and CUDA agree.
//
// Design decision 4: a keyed Feistel bijection of [0, 2^bits) with cycle walking down to
// [0, n) picks k of n rows without replacement in O(k), no n-sized buffer.
//
// Self-contained (no system headers) so that NVRTC compiles it without a CUDA toolkit; it
// also compiles as plain C++ with tests/support/cuda_shim/shim.h, which is how CI runs it.
#pragma once

#define GPL_PHILOX_M0 0xD2511F53u
#define GPL_PHILOX_M1 0xCD9E8D57u
#define GPL_PHILOX_W0 0x9E3779B9u
#define GPL_PHILOX_W1 0xBB67AE85u
#define GPL_FEISTEL_ROUNDS 4

// Purpose codes (counter word 3); must equal gpuloader.augment.rng.Purpose.
#define GPL_PURPOSE_SUBSAMPLE 3u
#define GPL_PURPOSE_ORIGIN_NOISE 4u
#define GPL_PURPOSE_DIRECTION_NOISE 5u
#define GPL_PURPOSE_JITTER 6u

// --- float32 operations rounded like numpy ------------------------------------------------
// Each is one IEEE-754 operation, round to nearest even, denormals kept: what numpy does. On
// the device they are written as PTX because CuPy compiles every module with -ftz=true
// (flush denormals to zero), which would turn __fmul_rn and friends, negation and
// comparisons into their .ftz variants; an instruction written out in PTX keeps its
// modifiers. Elsewhere (the g++ shim of the tests) they are the plain intrinsics.
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float gpl_fmul(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float gpl_fadd(float a, float b) {
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float gpl_fdiv(float a, float b) {
    float r;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float gpl_fsqrt(float a) {
    float r;
    asm("sqrt.rn.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
}
__device__ __forceinline__ float gpl_fneg(float a) {
    float r;
    asm("neg.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
}
__device__ __forceinline__ float gpl_double2float(double a) {
    float r;
    asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(a));
    return r;
}
// a > 0 (false for NaN), denormals included.
__device__ __forceinline__ bool gpl_positive(float a) {
    unsigned int r;
    asm("{\n\t.reg .pred p;\n\tsetp.gt.f32 p, %1, 0f00000000;\n\tselp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(r)
        : "f"(a));
    return r != 0u;
}
#else
__device__ __forceinline__ float gpl_fmul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float gpl_fadd(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float gpl_fdiv(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float gpl_fsqrt(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ float gpl_fneg(float a) { return -a; }
__device__ __forceinline__ float gpl_double2float(double a) { return __double2float_rn(a); }
__device__ __forceinline__ bool gpl_positive(float a) { return a > 0.0f; }
#endif

struct gpl_u32x4 {
    unsigned int x, y, z, w;
};

// Philox4x32-10 block function: 4 counter words, 2 key words -> 4 random words.
// Same round structure as rng.philox4x32: key bumped by (W0, W1) before rounds 1..9.
__device__ __forceinline__ gpl_u32x4 philox4x32_10(unsigned int c0, unsigned int c1,
                                                    unsigned int c2, unsigned int c3,
                                                    unsigned int k0, unsigned int k1) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        if (r) {
            k0 += GPL_PHILOX_W0;
            k1 += GPL_PHILOX_W1;
        }
        const unsigned int hi0 = __umulhi(GPL_PHILOX_M0, c0);
        const unsigned int lo0 = GPL_PHILOX_M0 * c0;
        const unsigned int hi1 = __umulhi(GPL_PHILOX_M1, c2);
        const unsigned int lo1 = GPL_PHILOX_M1 * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    gpl_u32x4 out;
    out.x = c0;
    out.y = c1;
    out.z = c2;
    out.w = c3;
    return out;
}

// Word i (0..3) of a Philox block.
__device__ __forceinline__ unsigned int philox_word(const gpl_u32x4& b, unsigned int i) {
    return i == 0 ? b.x : (i == 1 ? b.y : (i == 2 ? b.z : b.w));
}

// rng.uniform24: uint32 word -> double in [0, 1) with 24 bits (exact in float too).
__device__ __forceinline__ double uniform24(unsigned int w) {
    return (double)(w >> 8) * 5.9604644775390625e-08;  // 2^-24
}

// rng.normal_pairs for one pair (wa, wb): Box-Muller in double, u1 in (0, 1].
//   u1 = (wa >> 8) * 2^-24 + 2^-24, r = sqrt(-2 log u1), theta = (2 pi) * ((wb >> 8) * 2^-24)
//   (*n0, *n1) = (r cos theta, r sin theta)
__device__ __forceinline__ void normal_pair(unsigned int wa, unsigned int wb, double* n0,
                                            double* n1) {
    const double u1 = uniform24(wa) + 5.9604644775390625e-08;
    const double r = sqrt(-2.0 * log(u1));
    const double theta = (2.0 * 3.141592653589793) * uniform24(wb);  // 2.0 * np.pi, exact
    *n0 = r * cos(theta);
    *n1 = r * sin(theta);
}

// The first three normals of rng.normal_pairs(block) (pairs (x, y) and (z, w)), each rounded
// once to float: what one ray's 3-vector of noise is.
__device__ __forceinline__ void normal3(const gpl_u32x4& b, float* out3) {
    double a0, a1, b0, b1;
    normal_pair(b.x, b.y, &a0, &a1);
    normal_pair(b.z, b.w, &b0, &b1);
    out3[0] = gpl_double2float(a0);
    out3[1] = gpl_double2float(a1);
    out3[2] = gpl_double2float(b0);
}

// rng._hash32: a 32-bit xorshift-multiply finalizer.
__device__ __forceinline__ unsigned int hash32(unsigned int x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

// rng.feistel_bits: number of bits (at least 2) whose domain [0, 2^bits) covers [0, n); n >= 1.
__device__ __forceinline__ int feistel_bits(unsigned int n) {
    int bits = 2;
    if (n > 1) {
        const int len = 32 - __clz(n - 1);  // bit length of n - 1
        bits = len > 2 ? len : 2;
    }
    return bits;
}

// rng._feistel_once: one pass of the 4-round Feistel network on [0, 2^bits). The high part
// has bits - bits/2 bits, the low part bits/2; a round maps (L, R) to
// (R, L ^ (hash32(R ^ key) & mask_L)), so the widths swap each round (unbalanced for odd bits)
// and are back in place after the 4 rounds.
__device__ __forceinline__ unsigned int feistel_once(unsigned int x, int bits,
                                                     const unsigned int* keys) {
    int wr = bits / 2;
    int wl = bits - wr;
    unsigned int left = x >> wr;
    unsigned int right = x & ((1u << wr) - 1u);
#pragma unroll
    for (int r = 0; r < GPL_FEISTEL_ROUNDS; ++r) {
        const unsigned int f = hash32(right ^ keys[r]) & ((1u << wl) - 1u);
        const unsigned int t = left ^ f;
        left = right;
        right = t;
        const int w = wl;
        wl = wr;
        wr = w;
    }
    return (left << wr) | right;
}

// rng.feistel_permute for one position i < n (1 <= n < 2^32): the keyed bijection of
// [0, 2^bits) applied until the value falls in [0, n) (cycle walking; 2^bits < 2n, so under
// 2 passes on average). keys: GPL_FEISTEL_ROUNDS round keys (rng.feistel_keys).
__device__ __forceinline__ unsigned int feistel_permute(unsigned int i, unsigned int n,
                                                        const unsigned int* keys) {
    const int bits = feistel_bits(n);
    unsigned int x = i;
    do {
        x = feistel_once(x, bits, keys);
    } while (x >= n);
    return x;
}
