// C entry points for the CPU tests of kernels/fused.cu (called through ctypes; see
// tests/support/fused_kernels.py): launch_<kernel>(grid, block, args) runs one kernel with
// tests/support/cuda_shim/shim.h's serial launch() on a grid of `grid` blocks of `block`
// threads, `args` pointing at the kernel's gpl_fused_args (kernels/fused_args.cuh: a numpy
// array of gpuloader.fused.cuda.FUSED_ARGS_DTYPE), which it gets by value as on the GPU.
// The device helpers of kernels/philox.cuh are exported too (shim_*). One translation unit
// with the kernels, so the arguments cannot drift apart.
#include "fused.cu"

#define GPL_SHIM_LAUNCHER(kernel)                                          \
    void launch_##kernel(int grid, int block, const gpl_fused_args* args) { \
        launch(kernel, dim3(grid), dim3(block), *args);                    \
    }

extern "C" {

GPL_SHIM_LAUNCHER(fused_rays)
GPL_SHIM_LAUNCHER(fused_grids)
GPL_SHIM_LAUNCHER(fused_views)
GPL_SHIM_LAUNCHER(fused_select_rows)
GPL_SHIM_LAUNCHER(fused_rays_epoch)
GPL_SHIM_LAUNCHER(fused_grids_epoch)
GPL_SHIM_LAUNCHER(fused_views_epoch)
GPL_SHIM_LAUNCHER(fused_next_batch)

// sizeof(gpl_fused_args), for the layout test.
long long shim_fused_args_size() { return (long long)sizeof(gpl_fused_args); }

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
