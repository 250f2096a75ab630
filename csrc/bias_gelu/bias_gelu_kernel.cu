// Fused bias + GELU forward and backward: the CUDA kernels of lub_fast::bias_gelu_{fwd,bwd}
// (spec: lub_fast/ops/bias_gelu.py; GELU from Hendrycks and Gimpel, arXiv:1606.08415).
//
// Mapping: x is [rows, n]. Thread (blockIdx.x, threadIdx.x) owns one column vector of V elements
// (V * sizeof(x) = 16 bytes: 8 for fp16/bf16, 4 for fp32) and walks the rows blockIdx.y,
// blockIdx.y + gridDim.y, ..., four rows per step with all four 16-byte loads issued before the
// math; its bias vector is loaded once. The grid fills the GPU (about 16 blocks of 128 threads per
// SM); the launcher picks V = 1 (scalar accesses) when n % V != 0 or a pointer is not 16-byte
// aligned. Memory traffic: one read of x (and grad_out) and one write, the bias from L2.
//
// Math in fp32 with the accurate erff, tanhf and expf (no fast-math intrinsics), rounded once to
// the output dtype, as the reference. Size limits: rows and n up to 2**31 - 1 (grid y walks rows).
#include "bias_gelu/bias_gelu_kernel.h"

#include <cstdint>
#include <type_traits>

#include "common/cuda_utils.cuh"

namespace lub_fast {
namespace bias_gelu_cuda {
namespace {

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhCoef = 0.044715f;
constexpr int kThreads = 128;
constexpr int kRowsPerStep = 4;

// V consecutive elements at p (aligned to V * sizeof(T) when that is 16 or more bytes) as floats.
template <typename T, int V>
__device__ __forceinline__ void load(const T* p, float (&f)[V]) {
  if constexpr (V == 1) {
    f[0] = cuda::to_float(*p);
  } else if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int i = 0; i < V / 4; ++i) {
      const float4 a = reinterpret_cast<const float4*>(p)[i];
      f[4 * i] = a.x;
      f[4 * i + 1] = a.y;
      f[4 * i + 2] = a.z;
      f[4 * i + 3] = a.w;
    }
  } else {
    static_assert(V % 8 == 0, "16-bit vectors hold 8 elements");
#pragma unroll
    for (int i = 0; i < V / 8; ++i) {
      const uint4 a = reinterpret_cast<const uint4*>(p)[i];
      const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 v = cuda::unpack2<T>(w[j]);
        f[8 * i + 2 * j] = v.x;
        f[8 * i + 2 * j + 1] = v.y;
      }
    }
  }
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&f)[V]) {
  if constexpr (V == 1) {
    *p = cuda::from_float<T>(f[0]);
  } else if constexpr (std::is_same_v<T, float>) {
    static_assert(V == 4, "fp32 vectors hold 4 elements");
    *reinterpret_cast<float4*>(p) = make_float4(f[0], f[1], f[2], f[3]);
  } else {
    static_assert(V == 8, "16-bit vectors hold 8 elements");
    uint4 a;
    a.x = cuda::pack2<T>(f[0], f[1]);
    a.y = cuda::pack2<T>(f[2], f[3]);
    a.z = cuda::pack2<T>(f[4], f[5]);
    a.w = cuda::pack2<T>(f[6], f[7]);
    *reinterpret_cast<uint4*>(p) = a;
  }
}

template <bool kTanh>
__device__ __forceinline__ float gelu(float u) {
  if constexpr (kTanh) {
    return 0.5f * u * (1.0f + tanhf(kSqrt2OverPi * (u + kTanhCoef * u * u * u)));
  } else {
    return 0.5f * u * (1.0f + erff(u * kSqrtHalf));
  }
}

template <bool kTanh>
__device__ __forceinline__ float gelu_grad(float u) {
  if constexpr (kTanh) {
    const float t = tanhf(kSqrt2OverPi * (u + kTanhCoef * u * u * u));
    return 0.5f * (1.0f + t) + 0.5f * u * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kTanhCoef * u * u);
  } else {
    const float cdf = 0.5f * (1.0f + erff(u * kSqrtHalf));
    const float pdf = expf(-0.5f * u * u) * kInvSqrt2Pi;
    return cdf + u * pdf;
  }
}

// kBackward: out = grad_out * gelu'(x + bias), else out = gelu(x + bias) (grad_out unused).
template <typename T, typename B, int V, bool kTanh, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_kernel(const T* __restrict__ grad_out, const T* __restrict__ x, const B* __restrict__ bias,
                     T* __restrict__ out, int64_t rows, int64_t n) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V;
  if (col >= n) return;
  float b[V];
  load<B, V>(bias + col, b);
  for (int64_t r0 = blockIdx.y; r0 < rows; r0 += static_cast<int64_t>(gridDim.y) * kRowsPerStep) {
    float xv[kRowsPerStep][V];
    float gv[kRowsPerStep][V];
#pragma unroll
    for (int s = 0; s < kRowsPerStep; ++s) {
      const int64_t r = r0 + static_cast<int64_t>(s) * gridDim.y;
      if (r < rows) {
        load<T, V>(x + r * n + col, xv[s]);
        if constexpr (kBackward) load<T, V>(grad_out + r * n + col, gv[s]);
      }
    }
#pragma unroll
    for (int s = 0; s < kRowsPerStep; ++s) {
      const int64_t r = r0 + static_cast<int64_t>(s) * gridDim.y;
      if (r < rows) {
        float y[V];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float u = xv[s][i] + b[i];
          if constexpr (kBackward) {
            y[i] = gv[s][i] * gelu_grad<kTanh>(u);
          } else {
            y[i] = gelu<kTanh>(u);
          }
        }
        store<T, V>(out + r * n + col, y);
      }
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, typename B, int V, bool kBackward>
cudaError_t launch(const Shape& s, const void* grad_out, const void* x, const void* bias, void* out,
                   cudaStream_t stream) {
  int sms = 0;
  LUB_FAST_CUDA_TRY(cuda::multiprocessor_count(&sms));
  const int64_t vectors = s.n / V;
  const int64_t gx = (vectors + kThreads - 1) / kThreads;
  const int64_t want = (16LL * sms + gx - 1) / gx;  // about 16 blocks per SM
  const int64_t gy = want < s.rows ? want : s.rows;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy < 65535 ? gy : 65535));
  const T* go = static_cast<const T*>(grad_out);
  const T* xx = static_cast<const T*>(x);
  const B* bb = static_cast<const B*>(bias);
  T* oo = static_cast<T*>(out);
  if (s.tanh) {
    bias_gelu_kernel<T, B, V, true, kBackward><<<grid, kThreads, 0, stream>>>(go, xx, bb, oo, s.rows, s.n);
  } else {
    bias_gelu_kernel<T, B, V, false, kBackward><<<grid, kThreads, 0, stream>>>(go, xx, bb, oo, s.rows, s.n);
  }
  return cudaGetLastError();
}

template <typename T, typename B, bool kBackward>
cudaError_t dispatch_vector(const Shape& s, const void* grad_out, const void* x, const void* bias, void* out,
                            cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vector = s.n % kVec == 0 && aligned16(x) && aligned16(bias) && aligned16(out) &&
                      (!kBackward || aligned16(grad_out));
  return vector ? launch<T, B, kVec, kBackward>(s, grad_out, x, bias, out, stream)
                : launch<T, B, 1, kBackward>(s, grad_out, x, bias, out, stream);
}

template <bool kBackward>
cudaError_t dispatch(const Shape& s, const void* grad_out, const void* x, const void* bias, void* out,
                     cudaStream_t stream) {
  if (s.rows == 0 || s.n == 0) return cudaSuccess;
  const bool f32_bias = s.bias_dtype == DType::kFloat32;
  if (s.bias_dtype != s.x_dtype && !f32_bias) return cudaErrorInvalidValue;
  switch (s.x_dtype) {
    case DType::kFloat32:
      return dispatch_vector<float, float, kBackward>(s, grad_out, x, bias, out, stream);
    case DType::kFloat16:
      return f32_bias ? dispatch_vector<__half, float, kBackward>(s, grad_out, x, bias, out, stream)
                      : dispatch_vector<__half, __half, kBackward>(s, grad_out, x, bias, out, stream);
    case DType::kBFloat16:
      return f32_bias ? dispatch_vector<__nv_bfloat16, float, kBackward>(s, grad_out, x, bias, out, stream)
                      : dispatch_vector<__nv_bfloat16, __nv_bfloat16, kBackward>(s, grad_out, x, bias, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t bias_gelu_fwd(const Shape& shape, const void* x, const void* bias, void* y, cudaStream_t stream) {
  return dispatch<false>(shape, nullptr, x, bias, y, stream);
}

cudaError_t bias_gelu_bwd(const Shape& shape, const void* grad_out, const void* x, const void* bias, void* grad_x,
                          cudaStream_t stream) {
  return dispatch<true>(shape, grad_out, x, bias, grad_x, stream);
}

}  // namespace bias_gelu_cuda
}  // namespace lub_fast
