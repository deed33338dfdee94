// bisenet_cuda::same_bits_math(x, fn) -> y: same_bits.h's exp_acc, log_acc, sigmoid_acc, exp2_acc or
// exp2_nonpositive (fn "exp", "log", "sigmoid", "exp2", "exp2_nonpositive"; same_bits_apply) of every
// element of x (float32 or float64), on the CPU by a loop here, on the GPU by the kernel in same_bits.cu
// (which registers its implementation). bisenet_cuda::same_bits_divide(n, divisor) -> n / divisor by
// same_bits.h's FastDivider, likewise. The tests measure the functions' error (the divider's
// against exact division) on the CPU, and on a GPU compare the two devices' results bit for bit.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <utility>

#include "same_bits.h"

namespace bisenet {

int same_bits_function(c10::string_view fn_name) {
  const std::string fn(fn_name);
  if (fn == "exp") return 0;
  if (fn == "log") return 1;
  if (fn == "sigmoid") return 2;
  if (fn == "exp2") return 3;
  TORCH_CHECK(fn == "exp2_nonpositive", "same_bits_math: fn must be exp, log, sigmoid, exp2 or exp2_nonpositive, got ",
              fn);
  return 4;
}

// -> (x contiguous, the output allocated)
std::pair<at::Tensor, at::Tensor> prepare_same_bits(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "same_bits_math: x must be float32 or float64, got ", x.scalar_type());
  at::Tensor dense = x.contiguous();
  return {dense, at::empty_like(dense)};
}

// -> (n contiguous, the output allocated, the divider): n int64 in [0, 2^31), divisor in [1, 2^31)
std::tuple<at::Tensor, at::Tensor, FastDivider> prepare_same_bits_divide(const at::Tensor& n, int64_t divisor) {
  TORCH_CHECK(n.scalar_type() == at::kLong, "same_bits_divide: n must be int64, got ", n.scalar_type());
  TORCH_CHECK(divisor >= 1 && divisor < (int64_t{1} << 31), "same_bits_divide: divisor must be in [1, 2^31), got ",
              divisor);
  TORCH_CHECK(n.numel() == 0 || (n.min().item<int64_t>() >= 0 && n.max().item<int64_t>() < (int64_t{1} << 31)),
              "same_bits_divide: n must be in [0, 2^31)");
  at::Tensor dense = n.contiguous();
  return {dense, at::empty_like(dense), make_divider(static_cast<uint32_t>(divisor))};
}

namespace {

at::Tensor same_bits_math_cpu(const at::Tensor& x_in, c10::string_view fn_name) {
  const auto [x, y] = prepare_same_bits(x_in);
  const int fn = same_bits_function(fn_name);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "same_bits_math_cpu", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < x.numel(); ++i) out[i] = same_bits_apply<scalar_t>(fn, in[i]);
  });
  return y;
}

at::Tensor same_bits_divide_cpu(const at::Tensor& n_in, int64_t divisor) {
  const auto [n, quotient, divider] = prepare_same_bits_divide(n_in, divisor);
  const int64_t* in = n.const_data_ptr<int64_t>();
  int64_t* out = quotient.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n.numel(); ++i) out[i] = divide(static_cast<uint32_t>(in[i]), divider);
  return quotient;
}

}  // namespace
}  // namespace bisenet

TORCH_LIBRARY_FRAGMENT(bisenet_cuda, m) {
  m.def("same_bits_math(Tensor x, str fn) -> Tensor");
  m.def("same_bits_divide(Tensor n, int divisor) -> Tensor");
}

// the CUDA implementation is registered in same_bits.cu
TORCH_LIBRARY_IMPL(bisenet_cuda, CPU, m) {
  m.impl("same_bits_math", &bisenet::same_bits_math_cpu);
  m.impl("same_bits_divide", &bisenet::same_bits_divide_cpu);
}
