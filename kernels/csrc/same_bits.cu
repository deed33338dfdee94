// The GPU side of bisenet_cuda::same_bits_math and same_bits_divide (same_bits.cpp): one thread per
// element.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>

#include "same_bits.h"

namespace bisenet {
namespace {

template <typename acc_t>
__global__ void same_bits_math_kernel(const acc_t* __restrict__ x, int64_t count, int fn, acc_t* __restrict__ y) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = same_bits_apply(fn, x[i]);
  }
}

__global__ void same_bits_divide_kernel(const int64_t* __restrict__ n, int64_t count, FastDivider divider,
                                        int64_t* __restrict__ quotient) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    quotient[i] = divide(static_cast<uint32_t>(n[i]), divider);
  }
}

}  // namespace

// same_bits.cpp
int same_bits_function(c10::string_view fn_name);
std::pair<at::Tensor, at::Tensor> prepare_same_bits(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor, FastDivider> prepare_same_bits_divide(const at::Tensor& n, int64_t divisor);

at::Tensor same_bits_math_cuda(const at::Tensor& x_in, c10::string_view fn_name) {
  const auto [x, y] = prepare_same_bits(x_in);
  const int fn = same_bits_function(fn_name);
  if (x.numel() == 0) return y;
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t blocks = std::min<int64_t>((x.numel() + 255) / 256, 65535LL * 8);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kDouble) {
    same_bits_math_kernel<double><<<blocks, 256, 0, stream>>>(x.const_data_ptr<double>(), x.numel(), fn,
                                                              y.mutable_data_ptr<double>());
  } else {
    same_bits_math_kernel<float><<<blocks, 256, 0, stream>>>(x.const_data_ptr<float>(), x.numel(), fn,
                                                             y.mutable_data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor same_bits_divide_cuda(const at::Tensor& n_in, int64_t divisor) {
  const auto [n, quotient, divider] = prepare_same_bits_divide(n_in, divisor);
  if (n.numel() == 0) return quotient;
  c10::cuda::CUDAGuard guard(n.device());
  const int64_t blocks = std::min<int64_t>((n.numel() + 255) / 256, 65535LL * 8);
  same_bits_divide_kernel<<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      n.const_data_ptr<int64_t>(), n.numel(), divider, quotient.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return quotient;
}

}  // namespace bisenet

TORCH_LIBRARY_IMPL(bisenet_cuda, CUDA, m) {
  m.impl("same_bits_math", &bisenet::same_bits_math_cuda);
  m.impl("same_bits_divide", &bisenet::same_bits_divide_cuda);
}
