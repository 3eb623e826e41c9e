// Batched augmentation kernels: the CUDA twin of gpuloader/augment_numpy.py.
//
// One pass per batch and per field. Every kernel takes plain pointers and integers only, so
// the same source runs under CuPy (gpuloader/augment_cupy.py, NVRTC) and, in CI without a
// GPU, as C++ through tests/cuda_shim/shim.h. Each kernel is a grid-stride loop over its
// n items (any grid and block size give the same result).
//
// Per-sample parameters are struct-of-arrays indexed by sample b (see augment_numpy's
// BatchParams); `sym_table` is augment_numpy.SYMMETRY_TABLE, (48, 6) int32 rows
// (perm0, perm1, perm2, sign0, sign1, sign2) with (P v)_i = sign_i * v[perm_i].
// (key0, key1) = (seed & 0xffffffff, seed >> 32).
//
// Float arithmetic follows augment_numpy's float32 order, each operation rounded on its own
// with denormals kept (gpl_fmul, gpl_fadd, gpl_fdiv, gpl_fsqrt of philox.cuh: the
// __fmul_rn/__fadd_rn/__fdiv_rn/__fsqrt_rn operations, written in PTX on the device so that
// neither fused multiply-add nor CuPy's -ftz=true changes them); the module is compiled with
// -fmad=false besides.
#include "philox.cuh"

#define GPL_GRID_STRIDE_LOOP(t, n)                                                    \
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < (n);     \
         t += (long long)gridDim.x * blockDim.x)

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

// One thread per ray i < n:
//   o' = P o * origin_scale (+ origin_std * n_o when origin_std > 0)
//   d' = P d, then when direction_std > 0: d' = normalize(d' + direction_std * n_d) with
//        |d|^2 = (x*x + y*y) + z*z, d / sqrtf(|d|^2)
//   dist' = dist * distance_scale
// n_o, n_d: normals of Philox block (ray_row, index_b, epoch_b, PURPOSE + purpose_offset_b),
// words (0, 1) -> (r cos, r sin), words (2, 3) -> r cos.
// origins, directions, out_origins, out_directions: (n, 3) float32; distances,
// out_distances: (n,) float32; ray_sample, ray_row: (n,) int32; per-sample arrays: (B,).
// Outputs may alias the inputs (each thread reads its ray before writing it).
extern "C" __global__ void transform_rays(
    const float* origins, const float* directions, const float* distances,
    const int* ray_sample, const int* ray_row, const int* sym_table, const int* symmetry,
    const float* origin_scale, const float* distance_scale, const float* origin_std,
    const float* direction_std, const unsigned int* epoch, const unsigned int* index,
    const unsigned int* purpose_offset, unsigned int key0, unsigned int key1,
    float* out_origins, float* out_directions, float* out_distances, long long n) {
    GPL_GRID_STRIDE_LOOP(i, n) {
        const int b = ray_sample[i];
        const unsigned int row = (unsigned int)ray_row[i];
        const int* P = sym_table + 6 * symmetry[b];
        const float ox = origins[3 * i], oy = origins[3 * i + 1], oz = origins[3 * i + 2];
        const float dx = directions[3 * i], dy = directions[3 * i + 1],
                    dz = directions[3 * i + 2];
        const float dist = distances[i];

        float o[3], d[3];
        gpl_apply_symmetry(P, ox, oy, oz, o);
        gpl_apply_symmetry(P, dx, dy, dz, d);
        const float s = origin_scale[b];
#pragma unroll
        for (int c = 0; c < 3; ++c) o[c] = gpl_fmul(o[c], s);

        const float ostd = origin_std[b];
        if (gpl_positive(ostd)) {
            const gpl_u32x4 w = philox4x32_10(row, index[b], epoch[b],
                                              GPL_PURPOSE_ORIGIN_NOISE + purpose_offset[b],
                                              key0, key1);
            float nz[3];
            normal3(w, nz);
#pragma unroll
            for (int c = 0; c < 3; ++c) o[c] = gpl_fadd(o[c], gpl_fmul(ostd, nz[c]));
        }
        const float dstd = direction_std[b];
        if (gpl_positive(dstd)) {
            const gpl_u32x4 w = philox4x32_10(row, index[b], epoch[b],
                                              GPL_PURPOSE_DIRECTION_NOISE + purpose_offset[b],
                                              key0, key1);
            float nz[3];
            normal3(w, nz);
#pragma unroll
            for (int c = 0; c < 3; ++c) d[c] = gpl_fadd(d[c], gpl_fmul(dstd, nz[c]));
            const float sq = gpl_fadd(gpl_fadd(gpl_fmul(d[0], d[0]), gpl_fmul(d[1], d[1])),
                                      gpl_fmul(d[2], d[2]));
            const float len = gpl_fsqrt(sq);
#pragma unroll
            for (int c = 0; c < 3; ++c) d[c] = gpl_fdiv(d[c], len);
        }
#pragma unroll
        for (int c = 0; c < 3; ++c) {
            out_origins[3 * i + c] = o[c];
            out_directions[3 * i + c] = d[c];
        }
        out_distances[i] = gpl_fmul(dist, distance_scale[b]);
    }
}

// One thread per view position i < n: p' = P p * origin_scale (no noise).
// points, out_points: (n, 3) float32; point_sample: (n,) int32; per-sample arrays: (B,).
extern "C" __global__ void transform_points(const float* points, const int* point_sample,
                                            const int* sym_table, const int* symmetry,
                                            const float* origin_scale, float* out_points,
                                            long long n) {
    GPL_GRID_STRIDE_LOOP(i, n) {
        const int b = point_sample[i];
        float p[3];
        gpl_apply_symmetry(sym_table + 6 * symmetry[b], points[3 * i], points[3 * i + 1],
                           points[3 * i + 2], p);
        const float s = origin_scale[b];
#pragma unroll
        for (int c = 0; c < 3; ++c) out_points[3 * i + c] = gpl_fmul(p[c], s);
    }
}

// One thread per output voxel of the (B, S, S, S) uint8 batch (axes z, y, x; world x is the
// last axis). Sample b occupies [0, side_b)^3 of its S^3 block. Inside it, with output world
// coordinates q = (x, y, z) and P = (perm, sign):
//   out[b, q] = in[b, q_in] ^ jitter,   q_in[perm_i] = sign_i > 0 ? q_i : side_b - 1 - q_i
// (out[i'] = in[P^-1 i'] on the centred grid); outside it out = 0.
// jitter = ((word >> 8) < jitter_threshold_b) with word v & 3 of Philox block
// (v >> 2, index_b, epoch_b, JITTER + purpose_offset_b), v = (z * side_b + y) * side_b + x.
// voxels_in, voxels_out: (B, S, S, S) uint8 (must not alias); sides: (B,) int32 in [0, S].
extern "C" __global__ void transform_voxels(const unsigned char* voxels_in, const int* sides,
                                            const int* sym_table, const int* symmetry,
                                            const unsigned int* jitter_threshold,
                                            const unsigned int* epoch,
                                            const unsigned int* index,
                                            const unsigned int* purpose_offset,
                                            unsigned int key0, unsigned int key1,
                                            unsigned char* voxels_out, int num_samples,
                                            int S) {
    const long long s3 = (long long)S * S * S;
    const long long total = s3 * num_samples;
    GPL_GRID_STRIDE_LOOP(t, total) {
        const int b = (int)(t / s3);
        const long long r = t - (long long)b * s3;
        const int z = (int)(r / ((long long)S * S));
        const int y = (int)((r / S) % S);
        const int x = (int)(r % S);
        int side = sides[b];
        side = side < S ? side : S;  // memory safety only; the wrapper checks sides <= S
        if (x >= side || y >= side || z >= side) {
            voxels_out[t] = 0;
            continue;
        }
        const int* P = sym_table + 6 * symmetry[b];
        const int q[3] = {x, y, z};
        long long src = (long long)b * s3;
#pragma unroll
        for (int i = 0; i < 3; ++i) {
            const int p = P[i];
            const long long stride = p == 0 ? 1 : (p == 1 ? (long long)S : (long long)S * S);
            const int c = P[3 + i] > 0 ? q[i] : side - 1 - q[i];
            src += stride * c;
        }
        unsigned char value = voxels_in[src];
        const unsigned int thr = jitter_threshold[b];
        if (thr > 0u) {
            const unsigned long long v =
                ((unsigned long long)z * side + (unsigned long long)y) * side + x;
            const gpl_u32x4 w =
                philox4x32_10((unsigned int)(v >> 2), index[b], epoch[b],
                              GPL_PURPOSE_JITTER + purpose_offset[b], key0, key1);
            if ((philox_word(w, (unsigned int)(v & 3u)) >> 8) < thr) value ^= 1;
        }
        voxels_out[t] = value;
    }
}

// One thread per kept row t < total. offsets: (num_samples + 1,) int64 exclusive prefix sum
// of the per-sample counts max(0, min(k_b, n_b)), offsets[num_samples] = total. The thread
// finds its sample b (offsets[b] <= t < offsets[b + 1], binary search), its position
// j = t - offsets[b], and writes rows[t] = j when k_b >= n_b (file order), else the Feistel
// image of j in [0, n_b) with round keys keys[b, 0..3]; ray_sample[t] = b.
// n, k: (num_samples,) int64; keys: (num_samples, 4) uint32 (rng.feistel_keys of purpose
// SUBSAMPLE + offset); rows: (total,) int64; ray_sample: (total,) int32.
extern "C" __global__ void select_rows(const long long* n, const long long* k,
                                       const long long* offsets, const unsigned int* keys,
                                       long long* rows, int* ray_sample, int num_samples,
                                       long long total) {
    GPL_GRID_STRIDE_LOOP(t, total) {
        int lo = 0, hi = num_samples - 1;  // largest b with offsets[b] <= t
        while (lo < hi) {
            const int mid = lo + (hi - lo + 1) / 2;
            if (offsets[mid] <= t) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        const int b = lo;
        const long long j = t - offsets[b];
        const long long nb = n[b];
        long long row = j;
        if (k[b] < nb) {
            row = (long long)feistel_permute((unsigned int)j, (unsigned int)nb,
                                             keys + GPL_FEISTEL_ROUNDS * b);
        }
        rows[t] = row;
        ray_sample[t] = b;
    }
}
