// The fused per-batch pass: the CUDA twin of gpuloader/fused/cpu.py.
//
// Three kernels per batch, reading straight from the resident store (every sample of a split
// concatenated in device memory) with the batch's plan (gpuloader.plan.batch.BatchPlan,
// struct of arrays, B samples) already on the device:
//
//   fused_rays   one thread per output ray: row selection (Feistel), gather, symmetry, scale,
//                noise, renormalization, hits/ids conversion and ray_to_voxel;
//   fused_grids  one thread per output voxel of the (B, S, S, S) float32 batch: symmetry and
//                jitter of each sample's own cube, 0 in the padding;
//   fused_views  one thread per output view position: symmetry and scale;
// and fused_select_rows, the row selection of fused_rays alone (fused.cpu.select_store_rows).
//
// Every kernel takes one argument, a gpl_fused_args (kernels/fused_args.cuh) by value: the
// store, the plan, the outputs, the sizes and the key. Each reads only the fields named in
// its comment.
//
// The epoch-indexed twins fused_rays_epoch, fused_grids_epoch and fused_views_epoch (end of
// this file) read the whole epoch plan instead (gpuloader.plan.epoch.EpochPlan: the plan
// fields point at slot 0 of the epoch) and a device cursor: they find their batch's slot range
// from batch_starts[cursor[0]] and do exactly what the per-batch kernels do, through the
// same __device__ bodies (gpl_fused_rays, gpl_fused_grids, gpl_fused_views) on an offset copy
// of the arguments. With fused_next_batch (cursor[0] += 1) they make a CUDA graph that needs
// no argument change from one batch to the next (gpuloader.fused.graphs.EpochGraphs).
//
// Plain C++ besides __global__/__device__, so the source runs under CuPy (NVRTC) and, without
// a GPU, as C++ through tests/support/cuda_shim/shim.h. Each kernel is a grid-stride loop (any
// grid and block size give the same result). Each ray, view position and voxel goes through
// the functions of transform.cuh (the gpl_f* operations of philox.cuh, each rounded on its
// own like numpy; compiled with -fmad=false). `sym_table` is numpy_backend.SYMMETRY_TABLE,
// (48, 6) int32 rows (perm0, perm1, perm2, sign0, sign1, sign2); (key0, key1) = (seed &
// 0xffffffff, seed >> 32).
#include "fused_args.cuh"
#include "transform.cuh"

// The store row of kept ray j of sample b (module doc of gpuloader.fused.cpu):
//   ray_start[b] + j                                                if keep[b] >= ray_count[b]
//   ray_start[b] + feistel_permute(j, ray_count[b], select_keys[b])  otherwise (cycle walking)
__device__ __forceinline__ long long gpl_store_row(const gpl_fused_args& a, int b, long long j) {
    return a.ray_start[b] +
           gpl_kept_row(a.ray_count[b], a.keep[b], a.select_keys + GPL_FEISTEL_ROUNDS * b, j);
}

// Sample b's Philox stream (epoch, index, purpose_offset and the key).
__device__ __forceinline__ gpl_stream gpl_sample_stream(const gpl_fused_args& a, int b) {
    return gpl_make_stream(a.epoch, a.index, a.purpose_offset, a.key0, a.key1, b);
}

// One thread per output ray r < num_rays: out_rows[r] = gpl_store_row(b, j), out_owner[r] = b,
// out_j[r] = j, with b the sample of r (out_start, binary search) and j = r - out_start[b].
// Reads ray_start, ray_count, keep, out_start, select_keys, num_samples, num_rays.
extern "C" __global__ void fused_select_rows(const gpl_fused_args a) {
    GPL_GRID_STRIDE_LOOP(r, a.num_rays) {
        const int b = gpl_find_sample(a.out_start, a.num_samples, r);
        const long long j = r - a.out_start[b];
        a.out_rows[r] = gpl_store_row(a, b, j);
        a.out_owner[r] = (long long)b;
        a.out_j[r] = j;
    }
}

// One thread per output ray r < num_rays. With b the sample of r (out_start, binary search)
// and j = r - out_start[b]:
//   row = j                                                  if keep[b] >= ray_count[b]
//       = feistel_permute(j, ray_count[b], select_keys[b])   otherwise (cycle walking)
//   g   = ray_start[b] + row
//   out_origins[r]    = P o[g] * origin_scale[b] (+ origin_std[b] * n_o)
//   out_directions[r] = P d[g], normalized after + direction_std[b] * n_d when direction_std > 0
//   out_distances[r]  = distances[g] * distance_scale[b]
//   out_hits[r] = (float)hits[g]; out_view_ids[r], out_face_ids[r] = (int64)...[g];
//   out_ray_to_voxel[r] = b
// n_o, n_d: normal3 of Philox block (j, index[b], epoch[b], ORIGIN_NOISE / DIRECTION_NOISE +
// purpose_offset[b]) (numpy_backend.transform_rays with ray_row = j).
// Reads the ray store (hits, view_ids, face_ids may be null: that field is skipped), the
// row selection's fields, symmetry, the scales and stds, epoch, index, purpose_offset,
// sym_table, the key, the ray outputs (out_hits, out_view_ids, out_face_ids and
// out_ray_to_voxel may be null), num_samples and num_rays (sum of keep).
// gpl_fused_rays is the body, shared with fused_rays_epoch.
__device__ __forceinline__ void gpl_fused_rays(const gpl_fused_args& a) {
    GPL_GRID_STRIDE_LOOP(r, a.num_rays) {
        const int b = gpl_find_sample(a.out_start, a.num_samples, r);
        const long long j = r - a.out_start[b];
        const long long g = gpl_store_row(a, b, j);

        float o[3], d[3];
        gpl_transform_ray(a.sym_table + 6 * a.symmetry[b], a.origins + 3 * g,
                          a.directions + 3 * g, a.origin_scale[b], a.origin_std[b],
                          a.direction_std[b], gpl_sample_stream(a, b), (unsigned int)j, o, d);
#pragma unroll
        for (int c = 0; c < 3; ++c) {
            a.out_origins[3 * r + c] = o[c];
            a.out_directions[3 * r + c] = d[c];
        }
        a.out_distances[r] = gpl_fmul(a.distances[g], a.distance_scale[b]);
        if (a.hits && a.out_hits) a.out_hits[r] = (float)a.hits[g];
        if (a.view_ids && a.out_view_ids) a.out_view_ids[r] = (long long)a.view_ids[g];
        if (a.face_ids && a.out_face_ids) a.out_face_ids[r] = (long long)a.face_ids[g];
        if (a.out_ray_to_voxel) a.out_ray_to_voxel[r] = (long long)b;
    }
}

extern "C" __global__ void fused_rays(const gpl_fused_args a) { gpl_fused_rays(a); }

// One thread per output voxel of the (B, S, S, S) float32 batch (S = grid_side; axes z, y, x;
// world x is the last axis). Sample b's grid is the side[b]^3 bytes from grids[grid_start[b]],
// C order (z, y, x). Inside [0, n)^3 (n = side[b]), with output world coordinates
// q = (x, y, z) and P = (perm, sign):
//   out_voxels[b, z, y, x] = (float)(grid_b[q_in] ^ jitter),
//   q_in[perm_i] = sign_i > 0 ? q_i : n - 1 - q_i   (out[i'] = in[P^-1 i'] on the centred grid)
// and 0 outside it (the padding at the end of each axis).
// jitter = ((word >> 8) < jitter_threshold[b]) with word v & 3 of Philox block
// (v >> 2, index[b], epoch[b], JITTER + purpose_offset[b]), v = (z * n + y) * n + x.
// Reads grids, grid_start, side (in [0, S]), symmetry, jitter_threshold, epoch, index,
// purpose_offset, sym_table, the key, out_voxels, num_samples and grid_side.
// gpl_fused_grids is the body, shared with fused_grids_epoch.
__device__ __forceinline__ void gpl_fused_grids(const gpl_fused_args& a) {
    const long long S = a.grid_side;
    const long long s2 = S * S;
    const long long s3 = s2 * S;
    const long long total = s3 * a.num_samples;
    GPL_GRID_STRIDE_LOOP(t, total) {
        const int b = (int)(t / s3);
        const long long rem = t - (long long)b * s3;
        const long long z = rem / s2;
        const long long y = (rem / S) % S;
        const long long x = rem % S;
        long long n = a.side[b];
        n = n < S ? n : S;  // memory safety only; the wrapper documents side <= S
        if (x >= n || y >= n || z >= n) {
            a.out_voxels[t] = 0.0f;
            continue;
        }
        const unsigned char value = gpl_transform_voxel(
            a.grids + a.grid_start[b], n, n * n, a.sym_table + 6 * a.symmetry[b], x, y, z, n,
            a.jitter_threshold[b], gpl_sample_stream(a, b));
        a.out_voxels[t] = (float)value;
    }
}

extern "C" __global__ void fused_grids(const gpl_fused_args a) { gpl_fused_grids(a); }

// One thread per output view position r < num_views: with b the sample of r (view_out_start,
// binary search), p = view_positions[view_start[b] + r - view_out_start[b]] and
//   out_view_positions[r] = P p * origin_scale[b]   (transform_points; no noise).
// Reads view_positions, view_start, view_out_start, symmetry, origin_scale, sym_table,
// out_view_positions, num_samples and num_views.
// gpl_fused_views is the body, shared with fused_views_epoch.
__device__ __forceinline__ void gpl_fused_views(const gpl_fused_args& a) {
    GPL_GRID_STRIDE_LOOP(r, a.num_views) {
        const int b = gpl_find_sample(a.view_out_start, a.num_samples, r);
        const long long g = a.view_start[b] + (r - a.view_out_start[b]);
        float p[3];
        gpl_transform_point(a.sym_table + 6 * a.symmetry[b], a.view_positions + 3 * g,
                            a.origin_scale[b], p);
#pragma unroll
        for (int c = 0; c < 3; ++c) a.out_view_positions[3 * r + c] = p[c];
    }
}

extern "C" __global__ void fused_views(const gpl_fused_args a) { gpl_fused_views(a); }

// --- the epoch-indexed kernels (one CUDA graph per output slot) -----------------------------
//
// Each reads, instead of a batch's plan and its sizes, the epoch plan's per-slot arrays (the
// plan fields: slot 0 of the epoch, same dtypes as above) and
//   batch_starts  (nb + 1,) int64: the slots of batch i are [batch_starts[i],
//                 batch_starts[i + 1]) (EpochPlan.batch_starts);
//   batch_rays / batch_views / batch_side  (nb,) int64: the batch's size in output items
//                 (rays: sum of keep; views: sum of view_count; grids: S, its largest side),
//                 each read by its own kernel only;
//   cursor        (2,) int64: cursor[0] = i, the batch to make (fused_next_batch advances
//                 it), cursor[1] = nb (no work when i is outside [0, nb)).
// num_samples, num_rays, num_views and grid_side are not read. The epoch plan's out_start /
// view_out_start are relative to each batch already, so the batch is the per-batch kernel's
// plan at slot offset batch_starts[i]. The launch size is free (grid-stride loops): a graph
// launches for the largest batch of its outputs, and threads past the batch's total do
// nothing, so output items past the batch's total (rays, views, or voxels past B * S^3) are
// left untouched.

// Batch cursor[0] of an epoch: `batch` = the arguments with every plan field moved to the
// batch's first slot and num_samples its number of samples. Returns the batch's index i, or
// -1 when the cursor is outside the epoch or the batch is empty.
__device__ __forceinline__ long long gpl_epoch_batch(const gpl_fused_args& a,
                                                     gpl_fused_args* batch) {
    const long long i = a.cursor[0];
    if (i < 0 || i >= a.cursor[1]) return -1;
    const long long f = a.batch_starts[i];
    const int nb = (int)(a.batch_starts[i + 1] - f);
    if (nb <= 0) return -1;
    *batch = a;
    batch->ray_start = a.ray_start + f;
    batch->ray_count = a.ray_count + f;
    batch->keep = a.keep + f;
    batch->out_start = a.out_start + f;
    batch->select_keys = a.select_keys + GPL_FEISTEL_ROUNDS * f;
    batch->view_start = a.view_start + f;
    batch->view_out_start = a.view_out_start + f;
    batch->grid_start = a.grid_start + f;
    batch->side = a.side + f;
    batch->symmetry = a.symmetry + f;
    batch->origin_scale = a.origin_scale + f;
    batch->distance_scale = a.distance_scale + f;
    batch->origin_std = a.origin_std + f;
    batch->direction_std = a.direction_std + f;
    batch->jitter_threshold = a.jitter_threshold + f;
    batch->epoch = a.epoch + f;
    batch->index = a.index + f;
    batch->purpose_offset = a.purpose_offset + f;
    batch->num_samples = nb;
    return i;
}

// fused_rays for batch cursor[0]: num_rays = batch_rays[i]; outputs as fused_rays ((T_max, 3)
// / (T_max,) buffers, the batch in the first sum(keep) rows).
extern "C" __global__ void fused_rays_epoch(const gpl_fused_args a) {
    gpl_fused_args b;
    const long long i = gpl_epoch_batch(a, &b);
    if (i < 0) return;
    b.num_rays = a.batch_rays[i];
    gpl_fused_rays(b);
}

// fused_grids for batch cursor[0]: grid_side = batch_side[i], the batch's largest side;
// out_voxels: a flat float32 buffer of at least B * S^3 (the batch's (B, 1, S, S, S) array is
// its prefix).
extern "C" __global__ void fused_grids_epoch(const gpl_fused_args a) {
    gpl_fused_args b;
    const long long i = gpl_epoch_batch(a, &b);
    if (i < 0) return;
    b.grid_side = a.batch_side[i];
    gpl_fused_grids(b);
}

// fused_views for batch cursor[0]: num_views = batch_views[i]; out_view_positions:
// (V_max, 3) float32, the batch in the first rows.
extern "C" __global__ void fused_views_epoch(const gpl_fused_args a) {
    gpl_fused_args b;
    const long long i = gpl_epoch_batch(a, &b);
    if (i < 0) return;
    b.num_views = a.batch_views[i];
    gpl_fused_views(b);
}

// cursor[0] += 1 (one thread; the last node of a batch's graph, after the kernels that read
// the cursor). Reads cursor only.
extern "C" __global__ void fused_next_batch(const gpl_fused_args a) {
    if (blockIdx.x == 0 && threadIdx.x == 0) a.cursor[0] += 1;
}
