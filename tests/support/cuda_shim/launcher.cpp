// C entry points for tests/test_kernels_cpu.py (called through ctypes): each runs one kernel
// of kernels/augment.cu on the CPU with tests/cuda_shim/shim.h's serial launch(), on a grid
// of `grid` blocks of `block` threads. Device helpers of kernels/philox.cuh are exported too.
// One translation unit with the kernels, so the argument lists cannot drift apart.
#include "augment.cu"

extern "C" {

void launch_transform_rays(int grid, int block, const float* origins, const float* directions,
                           const float* distances, const int* ray_sample, const int* ray_row,
                           const int* sym_table, const int* symmetry, const float* origin_scale,
                           const float* distance_scale, const float* origin_std,
                           const float* direction_std, const unsigned int* epoch,
                           const unsigned int* index, const unsigned int* purpose_offset,
                           unsigned int key0, unsigned int key1, float* out_origins,
                           float* out_directions, float* out_distances, long long n) {
    launch(transform_rays, dim3(grid), dim3(block), origins, directions, distances, ray_sample,
           ray_row, sym_table, symmetry, origin_scale, distance_scale, origin_std,
           direction_std, epoch, index, purpose_offset, key0, key1, out_origins,
           out_directions, out_distances, n);
}

void launch_transform_points(int grid, int block, const float* points, const int* point_sample,
                             const int* sym_table, const int* symmetry,
                             const float* origin_scale, float* out_points, long long n) {
    launch(transform_points, dim3(grid), dim3(block), points, point_sample, sym_table, symmetry,
           origin_scale, out_points, n);
}

void launch_transform_voxels(int grid, int block, const unsigned char* voxels_in,
                             const int* sides, const int* sym_table, const int* symmetry,
                             const unsigned int* jitter_threshold, const unsigned int* epoch,
                             const unsigned int* index, const unsigned int* purpose_offset,
                             unsigned int key0, unsigned int key1, unsigned char* voxels_out,
                             int num_samples, int S) {
    launch(transform_voxels, dim3(grid), dim3(block), voxels_in, sides, sym_table, symmetry,
           jitter_threshold, epoch, index, purpose_offset, key0, key1, voxels_out, num_samples,
           S);
}

void launch_select_rows(int grid, int block, const long long* n, const long long* k,
                        const long long* offsets, const unsigned int* keys, long long* rows,
                        int* ray_sample, int num_samples, long long total) {
    launch(select_rows, dim3(grid), dim3(block), n, k, offsets, keys, rows, ray_sample,
           num_samples, total);
}

// philox4x32_10 on m counters: counters (m, 4) uint32 -> out (m, 4) uint32.
void shim_philox(const unsigned int* counters, unsigned int key0, unsigned int key1,
                 unsigned int* out, long long m) {
    for (long long i = 0; i < m; ++i) {
        const unsigned int* c = counters + 4 * i;
        const gpl_u32x4 w = philox4x32_10(c[0], c[1], c[2], c[3], key0, key1);
        out[4 * i] = w.x;
        out[4 * i + 1] = w.y;
        out[4 * i + 2] = w.z;
        out[4 * i + 3] = w.w;
    }
}

// normal3 on m Philox blocks: words (m, 4) uint32 -> out (m, 3) float32.
void shim_normal3(const unsigned int* words, float* out, long long m) {
    for (long long i = 0; i < m; ++i) {
        gpl_u32x4 w;
        w.x = words[4 * i];
        w.y = words[4 * i + 1];
        w.z = words[4 * i + 2];
        w.w = words[4 * i + 3];
        normal3(w, out + 3 * i);
    }
}

// hash32 on m words.
void shim_hash32(const unsigned int* x, unsigned int* out, long long m) {
    for (long long i = 0; i < m; ++i) out[i] = hash32(x[i]);
}

// feistel_permute of positions i (m,) uint32 in [0, n) with 4 round keys -> out (m,) uint32.
void shim_feistel_permute(const unsigned int* i, unsigned int n, const unsigned int* keys,
                          unsigned int* out, long long m) {
    for (long long t = 0; t < m; ++t) out[t] = feistel_permute(i[t], n, keys);
}

int shim_feistel_bits(unsigned int n) { return feistel_bits(n); }

}  // extern "C"
