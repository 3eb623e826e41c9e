// Per-ray, per-point and per-voxel device functions of kernels/fused.cu: one sample's
// augmentation, the same code for the per-batch and the epoch-indexed kernels.
//
// `P` is one row of numpy_backend.SYMMETRY_TABLE: (perm0, perm1, perm2, sign0, sign1, sign2)
// with (P v)_i = sign_i * v[perm_i]. Float arithmetic uses the gpl_f* operations of
// philox.cuh (each rounded on its own like numpy, denormals kept); modules that include this
// header are compiled with -fmad=false besides.
//
// Self-contained like philox.cuh: compiles with NVRTC and, through
// tests/support/cuda_shim/shim.h, as plain C++.
#pragma once

#include "philox.cuh"

// A grid-stride loop over t in [0, n): any grid and block size give the same result.
#define GPL_GRID_STRIDE_LOOP(t, n)                                                    \
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < (n);     \
         t += (long long)gridDim.x * blockDim.x)

// --- which item, which row ---------------------------------------------------------------

// The sample of output item t: the largest b in [0, num_samples) with starts[b] <= t
// (starts: exclusive prefix sum of the per-sample counts, so empty samples, which share their
// start with the next one, are skipped). num_samples >= 1.
__device__ __forceinline__ int gpl_find_sample(const long long* starts, int num_samples,
                                               long long t) {
    int lo = 0, hi = num_samples - 1;
    while (lo < hi) {
        const int mid = lo + (hi - lo + 1) / 2;
        if (starts[mid] <= t) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

// The row of kept ray j (j < min(k, n)) among a sample's n rays when k are kept:
//   j                           if k >= n (file order)
//   feistel_permute(j, n, keys) otherwise (cycle walking; n < 2^32)
// keys: the sample's GPL_FEISTEL_ROUNDS round keys (rng.feistel_keys of purpose SUBSAMPLE).
__device__ __forceinline__ long long gpl_kept_row(long long n, long long k,
                                                  const unsigned int* keys, long long j) {
    long long row = j;
    if (k < n) {
        row = (long long)feistel_permute((unsigned int)j, (unsigned int)n, keys);
    }
    return row;
}

// --- a sample's random stream ------------------------------------------------------------

// Sample b's Philox stream: block (c0, index[b], epoch[b], purpose + purpose_offset[b]) under
// key (key0, key1). The per-sample words are read only when a block is drawn.
struct gpl_stream {
    const unsigned int* epoch;
    const unsigned int* index;
    const unsigned int* purpose_offset;
    unsigned int key0, key1;
    int b;
};

__device__ __forceinline__ gpl_stream gpl_make_stream(const unsigned int* epoch,
                                                      const unsigned int* index,
                                                      const unsigned int* purpose_offset,
                                                      unsigned int key0, unsigned int key1,
                                                      int b) {
    gpl_stream s;
    s.epoch = epoch;
    s.index = index;
    s.purpose_offset = purpose_offset;
    s.key0 = key0;
    s.key1 = key1;
    s.b = b;
    return s;
}

__device__ __forceinline__ gpl_u32x4 gpl_stream_block(const gpl_stream& s, unsigned int c0,
                                                      unsigned int purpose) {
    return philox4x32_10(c0, s.index[s.b], s.epoch[s.b], purpose + s.purpose_offset[s.b],
                         s.key0, s.key1);
}

// --- rays and points ---------------------------------------------------------------------

// (P v) for one 3-vector: exact (a gather and sign changes).
__device__ __forceinline__ void gpl_apply_symmetry(const int* row6, float v0, float v1, float v2,
                                                   float* out) {
    const float v[3] = {v0, v1, v2};
#pragma unroll
    for (int i = 0; i < 3; ++i) {
        const int p = row6[i];
        const float g = p == 0 ? v[0] : (p == 1 ? v[1] : v[2]);
        out[i] = row6[3 + i] < 0 ? gpl_fneg(g) : g;
    }
}

// out = P p * scale for the 3-vector p[0..2] (a point, or a ray origin before its noise).
__device__ __forceinline__ void gpl_transform_point(const int* P, const float* p, float scale,
                                                    float* out) {
    gpl_apply_symmetry(P, p[0], p[1], p[2], out);
#pragma unroll
    for (int c = 0; c < 3; ++c) out[c] = gpl_fmul(out[c], scale);
}

// v += stdev * n when stdev > 0 (false for NaN), n = normal3 of the stream's block
// (counter, purpose); returns whether noise was added.
__device__ __forceinline__ bool gpl_add_noise(float* v, float stdev, const gpl_stream& s,
                                              unsigned int counter, unsigned int purpose) {
    if (!gpl_positive(stdev)) return false;
    const gpl_u32x4 w = gpl_stream_block(s, counter, purpose);
    float nz[3];
    normal3(w, nz);
#pragma unroll
    for (int c = 0; c < 3; ++c) v[c] = gpl_fadd(v[c], gpl_fmul(stdev, nz[c]));
    return true;
}

// v / sqrt(|v|^2) with |v|^2 = (x*x + y*y) + z*z.
__device__ __forceinline__ void gpl_normalize3(float* v) {
    const float sq =
        gpl_fadd(gpl_fadd(gpl_fmul(v[0], v[0]), gpl_fmul(v[1], v[1])), gpl_fmul(v[2], v[2]));
    const float len = gpl_fsqrt(sq);
#pragma unroll
    for (int c = 0; c < 3; ++c) v[c] = gpl_fdiv(v[c], len);
}

// One ray of a sample (numpy_backend.transform_rays), o_in and d_in its 3-vectors:
//   o = P o_in * scale (+ origin_std * n_o when origin_std > 0)
//   d = P d_in, then when direction_std > 0: d = normalize(d + direction_std * n_d)
// n_o, n_d: normal3 of the stream's blocks (counter, ORIGIN_NOISE / DIRECTION_NOISE).
// The inputs are read before o and d are written, so they may alias.
__device__ __forceinline__ void gpl_transform_ray(const int* P, const float* o_in,
                                                  const float* d_in, float scale,
                                                  float origin_std, float direction_std,
                                                  const gpl_stream& s, unsigned int counter,
                                                  float* o, float* d) {
    gpl_transform_point(P, o_in, scale, o);
    gpl_apply_symmetry(P, d_in[0], d_in[1], d_in[2], d);
    gpl_add_noise(o, origin_std, s, counter, GPL_PURPOSE_ORIGIN_NOISE);
    if (gpl_add_noise(d, direction_std, s, counter, GPL_PURPOSE_DIRECTION_NOISE)) {
        gpl_normalize3(d);
    }
}

// --- voxels ------------------------------------------------------------------------------

// Output voxel (x, y, z) (world coordinates; 0 <= x, y, z < n) of a sample's cube of side n,
// from its input cube `cube` (C order (z, y, x), axis strides (1, stride_y, stride_z)):
//   cube[q_in] ^ jitter,   q_in[perm_i] = sign_i > 0 ? q_i : n - 1 - q_i
// (out[i'] = in[P^-1 i'] on the centred grid). jitter = ((word >> 8) < jitter_threshold) with
// word v & 3 of the stream's block (v >> 2, JITTER), v = (z * n + y) * n + x; no jitter (and
// no draw) when jitter_threshold == 0.
__device__ __forceinline__ unsigned char gpl_transform_voxel(
    const unsigned char* cube, long long stride_y, long long stride_z, const int* P, long long x,
    long long y, long long z, long long n, unsigned int jitter_threshold, const gpl_stream& s) {
    const long long q[3] = {x, y, z};
    long long src = 0;
#pragma unroll
    for (int i = 0; i < 3; ++i) {
        const int p = P[i];
        const long long stride = p == 0 ? 1 : (p == 1 ? stride_y : stride_z);
        const long long c = P[3 + i] > 0 ? q[i] : n - 1 - q[i];
        src += stride * c;
    }
    unsigned char value = cube[src];
    if (jitter_threshold > 0u) {
        const unsigned long long v = ((unsigned long long)z * n + y) * n + x;
        const gpl_u32x4 w = gpl_stream_block(s, (unsigned int)(v >> 2), GPL_PURPOSE_JITTER);
        if ((philox_word(w, (unsigned int)(v & 3u)) >> 8) < jitter_threshold) value ^= 1;
    }
    return value;
}
