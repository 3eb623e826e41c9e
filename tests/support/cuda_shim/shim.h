// A CPU stand-in for the CUDA features the kernels in kernels/ use, so that g++ compiles the
// same .cu sources and tests can run their logic without a GPU (design decision 8).
//
//   g++ -std=c++14 -O1 -ffp-contract=off -Wno-unknown-pragmas -fPIC -shared
//       -include tests/support/cuda_shim/shim.h -I kernels
//       -x c++ tests/support/cuda_shim/fused_launcher.cpp -o libfused.so
//
// (tests/support/shim.py does this for the tests.)
//
// threadIdx/blockIdx/blockDim/gridDim are thread_local globals, and launch() runs every
// (block, thread) of a grid one after the other. That is faithful for kernels without shared
// memory, __syncthreads or inter-thread communication, which is all of ours.
// -ffp-contract=off keeps g++ from fusing a*b+c, so float results are rounded like the
// __fmul_rn/__fadd_rn intrinsics on the GPU.
#pragma once

#include <cmath>
#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef dim3 uint3;

static thread_local dim3 threadIdx(0, 0, 0);
static thread_local dim3 blockIdx(0, 0, 0);
static thread_local dim3 blockDim(1, 1, 1);
static thread_local dim3 gridDim(1, 1, 1);

// Correctly rounded single operations (no contraction with -ffp-contract=off).
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return std::sqrt(a); }
static inline float __double2float_rn(double a) { return (float)a; }
static inline unsigned int __umulhi(unsigned int a, unsigned int b) {
    return (unsigned int)(((unsigned long long)a * (unsigned long long)b) >> 32);
}
static inline int __clz(unsigned int x) { return x ? __builtin_clz(x) : 32; }
static inline int __clz(int x) { return __clz((unsigned int)x); }

using std::cos;
using std::log;
using std::sin;
using std::sqrt;

// Run kernel(args...) for every thread of every block, serially.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, Args... args) {
    gridDim = grid;
    blockDim = block;
    for (unsigned int bz = 0; bz < grid.z; ++bz)
        for (unsigned int by = 0; by < grid.y; ++by)
            for (unsigned int bx = 0; bx < grid.x; ++bx)
                for (unsigned int tz = 0; tz < block.z; ++tz)
                    for (unsigned int ty = 0; ty < block.y; ++ty)
                        for (unsigned int tx = 0; tx < block.x; ++tx) {
                            blockIdx = dim3(bx, by, bz);
                            threadIdx = dim3(tx, ty, tz);
                            kernel(args...);
                        }
    threadIdx = dim3(0, 0, 0);
    blockIdx = dim3(0, 0, 0);
}
