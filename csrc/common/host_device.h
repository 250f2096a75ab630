// LUB_FAST_HD marks a function that CUDA kernels and host code (the CPU kernels, the ctest
// programs) both call: __host__ __device__ under nvcc, a plain inline function for other compilers.
#pragma once

#if defined(__CUDACC__)
#define LUB_FAST_HD __host__ __device__ __forceinline__
#else
#define LUB_FAST_HD inline
#endif
