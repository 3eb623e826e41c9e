// The arguments of every kernel of kernels/fused.cu: one struct, passed by value.
//
// Each kernel takes a `gpl_fused_args` and reads the fields it needs (the others may be
// anything; the wrappers leave them null / 0). One struct value can serve the three per-batch
// kernels of a batch (gpuloader.fused.cuda.fused_batch) and the four kernels of one CUDA graph
// slot (gpuloader.fused.graphs.EpochGraphs).
//
// The host side mirrors this layout in one numpy dtype, gpuloader.fused.cuda.FUSED_ARGS_DTYPE
// (align=True: every pointer an 8-byte uint64 device address, 0 for null); CuPy passes a
// size-one numpy array of that dtype by value (the driver copies sizeof(gpl_fused_args) bytes
// from its data). tests/fused/test_fused_kernels_cpu.py checks that both layouts agree (field
// names, offsets, sizes and sizeof) by compiling offsetof() of every field here with g++.
// Change a field here and in FUSED_ARGS_DTYPE together, in the same order.
//
// Shapes: B samples of the batch (for the epoch kernels: every slot of the epoch), R rays,
// V_store view positions and G grid bytes in the store; T output rays, V output views, S the
// batch's grid side. Self-contained (no system headers), like philox.cuh.
#pragma once

struct gpl_fused_args {
    // --- the store: every sample of the split, concatenated -------------------------------
    const float* origins;            // (R, 3) float32
    const float* directions;         // (R, 3) float32
    const float* distances;          // (R,) float32
    const unsigned char* hits;       // (R,) uint8, or null (no out_hits written)
    const int* view_ids;             // (R,) int32, or null (no out_view_ids written)
    const int* face_ids;             // (R,) int32, or null (no out_face_ids written)
    const float* view_positions;     // (V_store, 3) float32
    const unsigned char* grids;      // (G,) uint8, sample b: side[b]^3 bytes, C order (z, y, x)

    // --- the plan: per sample b (gpuloader.plan.batch.BatchPlan) --------------------------
    const long long* ray_start;      // (B,) int64 first store row of the sample's rays
    const long long* ray_count;      // (B,) int64 rays the sample has (< 2^32 if keep < it)
    const long long* keep;           // (B,) int64 rays kept, <= ray_count
    const long long* out_start;      // (B,) int64 exclusive prefix sum of keep
    const unsigned int* select_keys; // (B, 4) uint32 Feistel round keys
    const long long* view_start;     // (B,) int64 first store row of the sample's views
    const long long* view_out_start; // (B,) int64 exclusive prefix sum of the view counts
    const long long* grid_start;     // (B,) int64 first byte of the sample's grid
    const long long* side;           // (B,) int64 the sample's grid side, <= S
    const int* symmetry;             // (B,) int32 in [0, 48)
    const float* origin_scale;       // (B,) float32
    const float* distance_scale;     // (B,) float32
    const float* origin_std;         // (B,) float32
    const float* direction_std;      // (B,) float32
    const unsigned int* jitter_threshold;  // (B,) uint32
    const unsigned int* epoch;       // (B,) uint32 Philox counter word 2
    const unsigned int* index;       // (B,) uint32 Philox counter word 1
    const unsigned int* purpose_offset;    // (B,) uint32 added to counter word 3
    const int* sym_table;            // (48, 6) int32 numpy_backend.SYMMETRY_TABLE

    // --- the outputs ----------------------------------------------------------------------
    float* out_origins;              // (T, 3) float32
    float* out_directions;           // (T, 3) float32
    float* out_distances;            // (T,) float32
    float* out_hits;                 // (T,) float32, or null
    long long* out_view_ids;         // (T,) int64, or null
    long long* out_face_ids;         // (T,) int64, or null
    long long* out_ray_to_voxel;     // (T,) int64, or null
    float* out_voxels;               // B * S^3 float32 ((B, S, S, S) or (B, 1, S, S, S))
    float* out_view_positions;       // (V, 3) float32
    long long* out_rows;             // (T,) int64 fused_select_rows: store row of each ray
    long long* out_owner;            // (T,) int64 fused_select_rows: sample of each ray
    long long* out_j;                // (T,) int64 fused_select_rows: ray among the sample's

    // --- the epoch kernels (one CUDA graph per output slot; nb batches) --------------------
    const long long* batch_starts;   // (nb + 1,) int64 batch i: slots [starts[i], starts[i+1])
    const long long* batch_rays;     // (nb,) int64 T of batch i (sum of keep)
    const long long* batch_views;    // (nb,) int64 V of batch i (sum of view counts)
    const long long* batch_side;     // (nb,) int64 S of batch i (its largest side)
    long long* cursor;               // (2,) int64 (batch to make, nb)

    // --- sizes and the key (per-batch kernels; the epoch kernels derive their own) --------
    long long num_rays;              // T
    long long num_views;             // V
    long long grid_side;             // S
    unsigned int key0;               // seed & 0xffffffff
    unsigned int key1;               // seed >> 32
    int num_samples;                 // B
};
