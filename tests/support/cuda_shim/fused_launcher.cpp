// C entry points for tests/test_fused_kernels_cpu.py (called through ctypes): each runs one
// kernel of kernels/fused.cu on the CPU with tests/cuda_shim/shim.h's serial launch(), on a
// grid of `grid` blocks of `block` threads. One translation unit with the kernels, so the
// argument lists cannot drift apart.
#include "fused.cu"

extern "C" {

void launch_fused_rays(int grid, int block, const float* origins, const float* directions,
                       const float* distances, const unsigned char* hits, const int* view_ids,
                       const int* face_ids, const long long* ray_start,
                       const long long* ray_count, const long long* keep,
                       const long long* out_start, const unsigned int* select_keys,
                       const int* sym_table, const int* symmetry, const float* origin_scale,
                       const float* distance_scale, const float* origin_std,
                       const float* direction_std, const unsigned int* epoch,
                       const unsigned int* index, const unsigned int* purpose_offset,
                       unsigned int key0, unsigned int key1, float* out_origins,
                       float* out_directions, float* out_distances, float* out_hits,
                       long long* out_view_ids, long long* out_face_ids,
                       long long* out_ray_to_voxel, int num_samples, long long total) {
    launch(fused_rays, dim3(grid), dim3(block), origins, directions, distances, hits, view_ids,
           face_ids, ray_start, ray_count, keep, out_start, select_keys, sym_table, symmetry,
           origin_scale, distance_scale, origin_std, direction_std, epoch, index,
           purpose_offset, key0, key1, out_origins, out_directions, out_distances, out_hits,
           out_view_ids, out_face_ids, out_ray_to_voxel, num_samples, total);
}

void launch_fused_grids(int grid, int block, const unsigned char* grids,
                        const long long* grid_start, const long long* side,
                        const int* sym_table, const int* symmetry,
                        const unsigned int* jitter_threshold, const unsigned int* epoch,
                        const unsigned int* index, const unsigned int* purpose_offset,
                        unsigned int key0, unsigned int key1, float* out, int num_samples,
                        long long S) {
    launch(fused_grids, dim3(grid), dim3(block), grids, grid_start, side, sym_table, symmetry,
           jitter_threshold, epoch, index, purpose_offset, key0, key1, out, num_samples, S);
}

void launch_fused_views(int grid, int block, const float* views, const long long* view_start,
                        const long long* view_out_start, const int* sym_table,
                        const int* symmetry, const float* origin_scale, float* out,
                        int num_samples, long long total) {
    launch(fused_views, dim3(grid), dim3(block), views, view_start, view_out_start, sym_table,
           symmetry, origin_scale, out, num_samples, total);
}

void launch_fused_select_rows(int grid, int block, const long long* ray_start,
                              const long long* ray_count, const long long* keep,
                              const long long* out_start, const unsigned int* select_keys,
                              long long* rows, long long* owner, long long* js,
                              int num_samples, long long total) {
    launch(fused_select_rows, dim3(grid), dim3(block), ray_start, ray_count, keep, out_start,
           select_keys, rows, owner, js, num_samples, total);
}

void launch_fused_rays_epoch(
    int grid, int block, const float* origins, const float* directions, const float* distances,
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
    launch(fused_rays_epoch, dim3(grid), dim3(block), origins, directions, distances, hits,
           view_ids, face_ids, ray_start, ray_count, keep, out_start, select_keys, sym_table,
           symmetry, origin_scale, distance_scale, origin_std, direction_std, epoch, index,
           purpose_offset, key0, key1, out_origins, out_directions, out_distances, out_hits,
           out_view_ids, out_face_ids, out_ray_to_voxel, batch_starts, batch_total, cursor);
}

void launch_fused_grids_epoch(int grid, int block, const unsigned char* grids,
                              const long long* grid_start, const long long* side,
                              const int* sym_table, const int* symmetry,
                              const unsigned int* jitter_threshold, const unsigned int* epoch,
                              const unsigned int* index, const unsigned int* purpose_offset,
                              unsigned int key0, unsigned int key1, float* out,
                              const long long* batch_starts, const long long* batch_total,
                              const long long* cursor) {
    launch(fused_grids_epoch, dim3(grid), dim3(block), grids, grid_start, side, sym_table,
           symmetry, jitter_threshold, epoch, index, purpose_offset, key0, key1, out,
           batch_starts, batch_total, cursor);
}

void launch_fused_views_epoch(int grid, int block, const float* views,
                              const long long* view_start, const long long* view_out_start,
                              const int* sym_table, const int* symmetry,
                              const float* origin_scale, float* out,
                              const long long* batch_starts, const long long* batch_total,
                              const long long* cursor) {
    launch(fused_views_epoch, dim3(grid), dim3(block), views, view_start, view_out_start,
           sym_table, symmetry, origin_scale, out, batch_starts, batch_total, cursor);
}

void launch_fused_next_batch(int grid, int block, long long* cursor) {
    launch(fused_next_batch, dim3(grid), dim3(block), cursor);
}

}  // extern "C"
