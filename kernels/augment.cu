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
// -fmad=false besides. The per-ray, per-point and per-voxel math is that of transform.cuh,
// shared with kernels/fused.cu.
#include "transform.cuh"

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
        const float dist = distances[i];
        float o[3], d[3];
        gpl_transform_ray(sym_table + 6 * symmetry[b], origins + 3 * i, directions + 3 * i,
                          origin_scale[b], origin_std[b], direction_std[b],
                          gpl_make_stream(epoch, index, purpose_offset, key0, key1, b),
                          (unsigned int)ray_row[i], o, d);
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
        gpl_transform_point(sym_table + 6 * symmetry[b], points + 3 * i, origin_scale[b], p);
#pragma unroll
        for (int c = 0; c < 3; ++c) out_points[3 * i + c] = p[c];
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
        voxels_out[t] = gpl_transform_voxel(
            voxels_in + (long long)b * s3, S, (long long)S * S, sym_table + 6 * symmetry[b], x,
            y, z, side, jitter_threshold[b],
            gpl_make_stream(epoch, index, purpose_offset, key0, key1, b));
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
        const int b = gpl_find_sample(offsets, num_samples, t);
        rows[t] = gpl_kept_row(n[b], k[b], keys + GPL_FEISTEL_ROUNDS * b, t - offsets[b]);
        ray_sample[t] = b;
    }
}
