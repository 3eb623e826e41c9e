// The fused per-batch pass: the CUDA twin of gpuloader/fused/cpu.py.
//
// Three kernels per batch, reading straight from the resident store (every sample of a split
// concatenated in device memory) with the batch's plan (gpuloader.fused.cpu.BatchPlan,
// struct of arrays, B samples) already on the device:
//
//   fused_rays   one thread per output ray: row selection (Feistel), gather, symmetry, scale,
//                noise, renormalization, hits/ids conversion and ray_to_voxel;
//   fused_grids  one thread per output voxel of the (B, S, S, S) float32 batch: symmetry and
//                jitter of each sample's own cube, 0 in the padding;
//   fused_views  one thread per output view position: symmetry and scale;
// and fused_select_rows, the row selection of fused_rays alone (fused_numpy.select_store_rows).
//
// The epoch-indexed twins fused_rays_epoch, fused_grids_epoch and fused_views_epoch (end of
// this file) take the whole epoch plan instead (gpuloader.plan.epoch.EpochPlan: base
// pointers of its per-slot arrays) and a device cursor: they read their batch's slot range
// from batch_starts[*batch_index] and do exactly what the per-batch kernels do, through the
// same __device__ bodies (gpl_fused_rays, gpl_fused_grids, gpl_fused_views) with offset
// pointers. With fused_next_batch (*batch_index += 1) they make a CUDA graph that needs no
// argument change from one batch to the next (gpuloader.fused.cuda.EpochGraphs).
//
// Plain pointers and integers only, so the source runs under CuPy (gpuloader/augment/
// fused_cupy.py, NVRTC) and, without a GPU, as C++ through tests/cuda_shim/shim.h. Each kernel
// is a grid-stride loop (any grid and block size give the same result). Each ray, view
// position and voxel goes through the functions of transform.cuh that kernels/augment.cu
// uses too (the gpl_f* operations of philox.cuh, each rounded on its own like numpy;
// compiled with -fmad=false). `sym_table` is numpy_backend.SYMMETRY_TABLE,
// (48, 6) int32 rows (perm0, perm1, perm2, sign0, sign1, sign2); (key0, key1) = (seed &
// 0xffffffff, seed >> 32).
#include "transform.cuh"

// The store row of kept ray j of sample b (module doc of fused_numpy):
//   ray_start[b] + j                                                if keep[b] >= ray_count[b]
//   ray_start[b] + feistel_permute(j, ray_count[b], select_keys[b])  otherwise (cycle walking)
__device__ __forceinline__ long long gpl_store_row(const long long* ray_start,
                                                   const long long* ray_count,
                                                   const long long* keep,
                                                   const unsigned int* select_keys, int b,
                                                   long long j) {
    return ray_start[b] +
           gpl_kept_row(ray_count[b], keep[b], select_keys + GPL_FEISTEL_ROUNDS * b, j);
}

// One thread per output ray r < total: rows[r] = gpl_store_row(b, j), owner[r] = b,
// js[r] = j, with b the sample of r (out_start, binary search) and j = r - out_start[b].
// ray_start, ray_count, keep, out_start: (B,) int64; select_keys: (B, 4) uint32; rows, owner,
// js: (total,) int64 (fused_numpy.select_store_rows).
extern "C" __global__ void fused_select_rows(const long long* ray_start,
                                             const long long* ray_count, const long long* keep,
                                             const long long* out_start,
                                             const unsigned int* select_keys, long long* rows,
                                             long long* owner, long long* js, int num_samples,
                                             long long total) {
    GPL_GRID_STRIDE_LOOP(r, total) {
        const int b = gpl_find_sample(out_start, num_samples, r);
        const long long j = r - out_start[b];
        rows[r] = gpl_store_row(ray_start, ray_count, keep, select_keys, b, j);
        owner[r] = (long long)b;
        js[r] = j;
    }
}

// One thread per output ray r < total. With b the sample of r (out_start, binary search) and
// j = r - out_start[b]:
//   row = j                                                  if keep[b] >= ray_count[b]
//       = feistel_permute(j, ray_count[b], select_keys[b])   otherwise (cycle walking)
//   g   = ray_start[b] + row
//   out_origins[r]    = P o[g] * origin_scale[b] (+ origin_std[b] * n_o)
//   out_directions[r] = P d[g], normalized after + direction_std[b] * n_d when direction_std > 0
//   out_distances[r]  = distances[g] * distance_scale[b]
//   out_hits[r] = (float)hits[g]; out_view_ids[r], out_face_ids[r] = (int64)...[g];
//   out_ray_to_voxel[r] = b
// n_o, n_d: normal3 of Philox block (j, index[b], epoch[b], ORIGIN_NOISE / DIRECTION_NOISE +
// purpose_offset[b]): kernels/augment.cu's transform_rays with ray_row = j.
// Store: origins, directions (R, 3) float32; distances (R,) float32; hits (R,) uint8;
// view_ids, face_ids (R,) int32. Plan: ray_start, ray_count, keep, out_start (B,) int64
// (out_start the exclusive prefix sum of keep, keep <= ray_count < 2^32 where keep <
// ray_count); select_keys (B, 4) uint32; symmetry (B,) int32 in [0, 48); scales and stds (B,)
// float32; epoch, index, purpose_offset (B,) uint32. Outputs (total = sum(keep)): out_origins,
// out_directions (total, 3) float32; out_distances, out_hits (total,) float32; out_view_ids,
// out_face_ids, out_ray_to_voxel (total,) int64. hits, view_ids, face_ids and their outputs
// may be null pointers (that field is skipped), as may out_ray_to_voxel.
// gpl_fused_rays is the body, shared with fused_rays_epoch.
__device__ __forceinline__ void gpl_fused_rays(
    const float* origins, const float* directions, const float* distances,
    const unsigned char* hits, const int* view_ids, const int* face_ids,
    const long long* ray_start, const long long* ray_count, const long long* keep,
    const long long* out_start, const unsigned int* select_keys, const int* sym_table,
    const int* symmetry, const float* origin_scale, const float* distance_scale,
    const float* origin_std, const float* direction_std, const unsigned int* epoch,
    const unsigned int* index, const unsigned int* purpose_offset, unsigned int key0,
    unsigned int key1, float* out_origins, float* out_directions, float* out_distances,
    float* out_hits, long long* out_view_ids, long long* out_face_ids,
    long long* out_ray_to_voxel, int num_samples, long long total) {
    GPL_GRID_STRIDE_LOOP(r, total) {
        const int b = gpl_find_sample(out_start, num_samples, r);
        const long long j = r - out_start[b];
        const long long g = gpl_store_row(ray_start, ray_count, keep, select_keys, b, j);

        float o[3], d[3];
        gpl_transform_ray(sym_table + 6 * symmetry[b], origins + 3 * g, directions + 3 * g,
                          origin_scale[b], origin_std[b], direction_std[b],
                          gpl_make_stream(epoch, index, purpose_offset, key0, key1, b),
                          (unsigned int)j, o, d);
#pragma unroll
        for (int c = 0; c < 3; ++c) {
            out_origins[3 * r + c] = o[c];
            out_directions[3 * r + c] = d[c];
        }
        out_distances[r] = gpl_fmul(distances[g], distance_scale[b]);
        if (hits && out_hits) out_hits[r] = (float)hits[g];
        if (view_ids && out_view_ids) out_view_ids[r] = (long long)view_ids[g];
        if (face_ids && out_face_ids) out_face_ids[r] = (long long)face_ids[g];
        if (out_ray_to_voxel) out_ray_to_voxel[r] = (long long)b;
    }
}

extern "C" __global__ void fused_rays(
    const float* origins, const float* directions, const float* distances,
    const unsigned char* hits, const int* view_ids, const int* face_ids,
    const long long* ray_start, const long long* ray_count, const long long* keep,
    const long long* out_start, const unsigned int* select_keys, const int* sym_table,
    const int* symmetry, const float* origin_scale, const float* distance_scale,
    const float* origin_std, const float* direction_std, const unsigned int* epoch,
    const unsigned int* index, const unsigned int* purpose_offset, unsigned int key0,
    unsigned int key1, float* out_origins, float* out_directions, float* out_distances,
    float* out_hits, long long* out_view_ids, long long* out_face_ids,
    long long* out_ray_to_voxel, int num_samples, long long total) {
    gpl_fused_rays(origins, directions, distances, hits, view_ids, face_ids, ray_start,
                   ray_count, keep, out_start, select_keys, sym_table, symmetry, origin_scale,
                   distance_scale, origin_std, direction_std, epoch, index, purpose_offset,
                   key0, key1, out_origins, out_directions, out_distances, out_hits,
                   out_view_ids, out_face_ids, out_ray_to_voxel, num_samples, total);
}

// One thread per output voxel of the (B, S, S, S) float32 batch (axes z, y, x; world x is the
// last axis). Sample b's grid is the side[b]^3 bytes from grids[grid_start[b]], C order
// (z, y, x). Inside [0, n)^3 (n = side[b]), with output world coordinates q = (x, y, z) and
// P = (perm, sign):
//   out[b, z, y, x] = (float)(grid_b[q_in] ^ jitter),
//   q_in[perm_i] = sign_i > 0 ? q_i : n - 1 - q_i   (out[i'] = in[P^-1 i'] on the centred grid)
// and 0 outside it (the padding at the end of each axis).
// jitter = ((word >> 8) < jitter_threshold[b]) with word v & 3 of Philox block
// (v >> 2, index[b], epoch[b], JITTER + purpose_offset[b]), v = (z * n + y) * n + x.
// grids: flat uint8 store; grid_start, side: (B,) int64 (side in [0, S]); out: B * S^3
// float32 (a (B, S, S, S) or (B, 1, S, S, S) array).
// gpl_fused_grids is the body, shared with fused_grids_epoch.
__device__ __forceinline__ void gpl_fused_grids(
    const unsigned char* grids, const long long* grid_start, const long long* side,
    const int* sym_table, const int* symmetry, const unsigned int* jitter_threshold,
    const unsigned int* epoch, const unsigned int* index, const unsigned int* purpose_offset,
    unsigned int key0, unsigned int key1, float* out, int num_samples, long long S) {
    const long long s2 = S * S;
    const long long s3 = s2 * S;
    const long long total = s3 * num_samples;
    GPL_GRID_STRIDE_LOOP(t, total) {
        const int b = (int)(t / s3);
        const long long rem = t - (long long)b * s3;
        const long long z = rem / s2;
        const long long y = (rem / S) % S;
        const long long x = rem % S;
        long long n = side[b];
        n = n < S ? n : S;  // memory safety only; the wrapper documents side <= S
        if (x >= n || y >= n || z >= n) {
            out[t] = 0.0f;
            continue;
        }
        const unsigned char value = gpl_transform_voxel(
            grids + grid_start[b], n, n * n, sym_table + 6 * symmetry[b], x, y, z, n,
            jitter_threshold[b], gpl_make_stream(epoch, index, purpose_offset, key0, key1, b));
        out[t] = (float)value;
    }
}

extern "C" __global__ void fused_grids(const unsigned char* grids, const long long* grid_start,
                                       const long long* side, const int* sym_table,
                                       const int* symmetry,
                                       const unsigned int* jitter_threshold,
                                       const unsigned int* epoch, const unsigned int* index,
                                       const unsigned int* purpose_offset, unsigned int key0,
                                       unsigned int key1, float* out, int num_samples,
                                       long long S) {
    gpl_fused_grids(grids, grid_start, side, sym_table, symmetry, jitter_threshold, epoch, index,
                    purpose_offset, key0, key1, out, num_samples, S);
}

// One thread per output view position r < total: with b the sample of r (view_out_start,
// binary search), p = views[view_start[b] + r - view_out_start[b]] and
//   out[r] = P p * origin_scale[b]   (transform_points; no noise).
// views: (V_store, 3) float32; view_start, view_out_start: (B,) int64 (view_out_start the
// exclusive prefix sum of the view counts); out: (total, 3) float32.
// gpl_fused_views is the body, shared with fused_views_epoch.
__device__ __forceinline__ void gpl_fused_views(const float* views, const long long* view_start,
                                                const long long* view_out_start,
                                                const int* sym_table, const int* symmetry,
                                                const float* origin_scale, float* out,
                                                int num_samples, long long total) {
    GPL_GRID_STRIDE_LOOP(r, total) {
        const int b = gpl_find_sample(view_out_start, num_samples, r);
        const long long g = view_start[b] + (r - view_out_start[b]);
        float p[3];
        gpl_transform_point(sym_table + 6 * symmetry[b], views + 3 * g, origin_scale[b], p);
#pragma unroll
        for (int c = 0; c < 3; ++c) out[3 * r + c] = p[c];
    }
}

extern "C" __global__ void fused_views(const float* views, const long long* view_start,
                                       const long long* view_out_start, const int* sym_table,
                                       const int* symmetry, const float* origin_scale,
                                       float* out, int num_samples, long long total) {
    gpl_fused_views(views, view_start, view_out_start, sym_table, symmetry, origin_scale, out,
                    num_samples, total);
}

// --- the epoch-indexed kernels (one CUDA graph per output slot) -----------------------------
//
// Each takes, instead of a batch's plan and its sizes, the epoch plan's per-slot arrays
// (base pointers: slot 0 of the epoch, same fields and dtypes as above) and
//   batch_starts  (num_batches + 1,) int64: the slots of batch i are
//                 [batch_starts[i], batch_starts[i + 1]) (EpochPlan.batch_starts);
//   batch_total   (num_batches,) int64: the batch's size in output items (rays: sum of keep;
//                 views: sum of view_count; grids: S, the largest side of the batch);
//   cursor        (2,) int64: cursor[0] = i, the batch to make (fused_next_batch advances
//                 it), cursor[1] = num_batches (no work when i is outside [0, num_batches)).
// The epoch plan's out_start / view_out_start are relative to each batch already, so the
// batch is the per-batch kernel's plan at slot offset batch_starts[i]. The launch size is
// free (grid-stride loops): a graph launches for the largest batch of its outputs, and
// threads past the batch's total do nothing, so output items past the batch's total (rays,
// views, or voxels past B * S^3) are left untouched.

// Batch cursor[0] of an epoch: its first slot, its number of samples and its total; false
// when the cursor is outside the epoch.
__device__ __forceinline__ bool gpl_epoch_batch(const long long* batch_starts,
                                                const long long* batch_total,
                                                const long long* cursor, long long* first,
                                                int* num_samples, long long* total) {
    const long long i = cursor[0];
    if (i < 0 || i >= cursor[1]) return false;
    *first = batch_starts[i];
    *num_samples = (int)(batch_starts[i + 1] - *first);
    *total = batch_total[i];
    return *num_samples > 0;
}

// fused_rays for batch cursor[0]: per-slot arrays of the whole epoch (see above), batch_total
// = the batch's ray count; outputs as fused_rays ((T_max, 3) / (T_max,) buffers, the batch in
// the first sum(keep) rows).
extern "C" __global__ void fused_rays_epoch(
    const float* origins, const float* directions, const float* distances,
    const unsigned char* hits, const int* view_ids, const int* face_ids,
    const long long* ray_start, const long long* ray_count, const long long* keep,
    const long long* out_start, const unsigned int* select_keys, const int* sym_table,
    const int* symmetry, const float* origin_scale, const float* distance_scale,
    const float* origin_std, const float* direction_std, const unsigned int* epoch,
    const unsigned int* index, const unsigned int* purpose_offset, unsigned int key0,
    unsigned int key1, float* out_origins, float* out_directions, float* out_distances,
    float* out_hits, long long* out_view_ids, long long* out_face_ids,
    long long* out_ray_to_voxel, const long long* batch_starts, const long long* batch_total,
    const long long* cursor) {
    long long f, total;
    int nb;
    if (!gpl_epoch_batch(batch_starts, batch_total, cursor, &f, &nb, &total)) return;
    gpl_fused_rays(origins, directions, distances, hits, view_ids, face_ids, ray_start + f,
                   ray_count + f, keep + f, out_start + f, select_keys + GPL_FEISTEL_ROUNDS * f,
                   sym_table, symmetry + f, origin_scale + f, distance_scale + f,
                   origin_std + f, direction_std + f, epoch + f, index + f,
                   purpose_offset + f, key0, key1, out_origins, out_directions, out_distances,
                   out_hits, out_view_ids, out_face_ids, out_ray_to_voxel, nb, total);
}

// fused_grids for batch cursor[0]: batch_total = S, the batch's largest side; out: a flat
// float32 buffer of at least B * S^3 (the batch's (B, 1, S, S, S) array is its prefix).
extern "C" __global__ void fused_grids_epoch(
    const unsigned char* grids, const long long* grid_start, const long long* side,
    const int* sym_table, const int* symmetry, const unsigned int* jitter_threshold,
    const unsigned int* epoch, const unsigned int* index, const unsigned int* purpose_offset,
    unsigned int key0, unsigned int key1, float* out, const long long* batch_starts,
    const long long* batch_total, const long long* cursor) {
    long long f, S;
    int nb;
    if (!gpl_epoch_batch(batch_starts, batch_total, cursor, &f, &nb, &S)) return;
    gpl_fused_grids(grids, grid_start + f, side + f, sym_table, symmetry + f,
                    jitter_threshold + f, epoch + f, index + f, purpose_offset + f, key0, key1,
                    out, nb, S);
}

// fused_views for batch cursor[0]: batch_total = the batch's view count; out: (V_max, 3)
// float32, the batch in the first rows.
extern "C" __global__ void fused_views_epoch(const float* views, const long long* view_start,
                                             const long long* view_out_start,
                                             const int* sym_table, const int* symmetry,
                                             const float* origin_scale, float* out,
                                             const long long* batch_starts,
                                             const long long* batch_total,
                                             const long long* cursor) {
    long long f, total;
    int nb;
    if (!gpl_epoch_batch(batch_starts, batch_total, cursor, &f, &nb, &total)) return;
    gpl_fused_views(views, view_start + f, view_out_start + f, sym_table, symmetry + f,
                    origin_scale + f, out, nb, total);
}

// cursor[0] += 1 (one thread; the last node of a batch's graph, after the kernels that read
// the cursor).
extern "C" __global__ void fused_next_batch(long long* cursor) {
    if (blockIdx.x == 0 && threadIdx.x == 0) cursor[0] += 1;
}
