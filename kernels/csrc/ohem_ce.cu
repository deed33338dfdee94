// CUDA kernels of the fused upsample + cross-entropy loss: the per-pixel forward, the
// gather backward into the low-res logits, and the histogram pass of the OHEM radix select.
// The arithmetic lives in ohem_ce_math.h (shared with the C++ CPU loops in ohem_ce.cpp);
// this file only maps items to threads and launches. The tensors arrive from ohem_ce.cpp
// checked, contiguous and allocated.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "ohem_ce_math.h"

namespace bisenet {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535LL * 8;

template <typename scalar_t>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };

int64_t blocks_for(int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxBlocks));
}

// One thread per high-res pixel: loss and lse, the logits interpolated on the fly.
template <typename scalar_t, typename label_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) ce_forward_kernel(
    CeGeometry<acc_t> geo, int64_t pixels, const scalar_t* __restrict__ logits,
    const label_t* __restrict__ labels, int64_t ignore_index, acc_t* __restrict__ loss, acc_t* __restrict__ lse) {
  for (int64_t pixel = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; pixel < pixels;
       pixel += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    ce_pixel_forward<scalar_t, label_t, acc_t>(pixel, geo, logits, labels, ignore_index, loss, lse);
  }
}

// One block per low-res row (n, c, i): the row sums of every high-res column into shared
// memory, then the low-res row's gradients (ohem_ce_math.h: no atomics, deterministic).
template <typename scalar_t, typename label_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) ce_backward_kernel(
    CeGeometry<acc_t> geo, const scalar_t* __restrict__ logits, const label_t* __restrict__ labels,
    const acc_t* __restrict__ grad_loss, const acc_t* __restrict__ lse, int64_t ignore_index,
    scalar_t* __restrict__ grad_logits) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* row_sums = reinterpret_cast<acc_t*>(shared_bytes);  // (W,)
  const int64_t row = blockIdx.x;                             // (n * C + c) * h + i
  const int i = static_cast<int>(row % geo.h);
  const int64_t nc = row / geo.h;
  const int c = static_cast<int>(nc % geo.C);
  const int64_t n = nc / geo.C;
  const int64_t pixels = static_cast<int64_t>(geo.H) * geo.W;
  const scalar_t* plane = logits + nc * geo.h * geo.w;
  for (int x = threadIdx.x; x < geo.W; x += blockDim.x)
    row_sums[x] = ce_backward_row_sum<scalar_t, label_t, acc_t>(geo, plane, labels + n * pixels, grad_loss + n * pixels,
                                                                lse + n * pixels, ignore_index, c, i, x);
  __syncthreads();
  for (int j = threadIdx.x; j < geo.w; j += blockDim.x)
    grad_logits[row * geo.w + j] = static_cast<scalar_t>(ce_backward_column_sum<acc_t>(geo, row_sums, j));
}

// One pass of the radix select: counts[d] += number of entries in bin d (radix_digit).
// Per-block bins in shared memory; lanes of a warp holding the same digit add once
// (__match_any_sync), since late passes see long runs of equal digits. Every lane of a warp
// runs the same iterations (lanes past the end hold digit -1), so the match sees all 32.
// The prefix is read on the device: no host synchronisation.
__global__ void __launch_bounds__(kThreads) radix_histogram_kernel(
    const int32_t* __restrict__ bits, int64_t count, const int64_t* __restrict__ prefix, int shift,
    unsigned long long* __restrict__ counts) {
  __shared__ unsigned int bins[256];
  for (int b = threadIdx.x; b < 256; b += blockDim.x) bins[b] = 0;
  __syncthreads();
  const uint32_t prefix_bits = static_cast<uint32_t>(*prefix);
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t base = blockIdx.x * static_cast<int64_t>(blockDim.x) + (threadIdx.x & ~31); base < count;
       base += stride) {
    const int64_t index = base + lane;
    const int digit = index < count ? radix_digit(bits[index], prefix_bits, shift) : -1;
    const unsigned peers = __match_any_sync(0xFFFFFFFFu, digit);
    if (digit >= 0 && lane == __ffs(peers) - 1) atomicAdd(&bins[digit], static_cast<unsigned>(__popc(peers)));
  }
  __syncthreads();
  for (int b = threadIdx.x; b < 256; b += blockDim.x) {
    if (bins[b] != 0) atomicAdd(&counts[b], static_cast<unsigned long long>(bins[b]));
  }
}

template <typename scalar_t, typename label_t>
void forward_typed(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, const at::Tensor& loss,
                   const at::Tensor& lse) {
  using acc_t = typename AccType<scalar_t>::type;
  auto geo = make_ce_geometry<acc_t>(logits.size(0), logits.size(1), logits.size(2), logits.size(3),
                                     labels.size(1), labels.size(2));
  const int64_t pixels = labels.numel();
  ce_forward_kernel<scalar_t, label_t, acc_t><<<blocks_for(pixels), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      geo, pixels, logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<label_t>(), ignore_index,
      loss.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename label_t>
void backward_typed(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                    const at::Tensor& lse, int64_t ignore_index, const at::Tensor& grad_logits) {
  using acc_t = typename AccType<scalar_t>::type;
  auto geo = make_ce_geometry<acc_t>(logits.size(0), logits.size(1), logits.size(2), logits.size(3),
                                     labels.size(1), labels.size(2));
  const int64_t rows = logits.size(0) * logits.size(1) * logits.size(2);  // < 2^31, checked in ohem_ce.cpp
  const size_t shared = static_cast<size_t>(ce_backward_shared_bytes(geo.W, sizeof(acc_t)));  // <= the budget, idem
  ce_backward_kernel<scalar_t, label_t, acc_t><<<rows, kThreads, shared, c10::cuda::getCurrentCUDAStream()>>>(
      geo, logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<label_t>(), grad_loss.const_data_ptr<acc_t>(),
      lse.const_data_ptr<acc_t>(), ignore_index, grad_logits.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs CALL(scalar_t, label_t) for the logits' and labels' dtypes.
#define BISENET_CE_DISPATCH(op, logits, labels, CALL)                                                       \
  do {                                                                                                      \
    const bool bytes = (labels).scalar_type() == at::kByte;                                                 \
    TORCH_CHECK(bytes || (labels).scalar_type() == at::kLong, op, ": labels must be int64 or uint8, got ",  \
                (labels).scalar_type());                                                                    \
    switch ((logits).scalar_type()) {                                                                       \
      case at::kFloat: if (bytes) CALL(float, uint8_t); else CALL(float, int64_t); break;                   \
      case at::kDouble: if (bytes) CALL(double, uint8_t); else CALL(double, int64_t); break;                \
      case at::kHalf: if (bytes) CALL(c10::Half, uint8_t); else CALL(c10::Half, int64_t); break;            \
      case at::kBFloat16: if (bytes) CALL(c10::BFloat16, uint8_t); else CALL(c10::BFloat16, int64_t); break; \
      default: TORCH_CHECK(false, op, ": unsupported logits dtype ", (logits).scalar_type());              \
    }                                                                                                       \
  } while (0)

}  // namespace

void ce_forward_cuda_launch(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                            const at::Tensor& loss, const at::Tensor& lse) {
  if (labels.numel() == 0) return;
  c10::cuda::CUDAGuard guard(logits.device());
#define BISENET_CE_FORWARD(scalar_t, label_t) forward_typed<scalar_t, label_t>(logits, labels, ignore_index, loss, lse)
  BISENET_CE_DISPATCH("upsample_ce_forward", logits, labels, BISENET_CE_FORWARD);
#undef BISENET_CE_FORWARD
}

void ce_backward_cuda_launch(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& lse, int64_t ignore_index, const at::Tensor& grad_logits) {
  if (logits.numel() == 0) return;
  c10::cuda::CUDAGuard guard(logits.device());
#define BISENET_CE_BACKWARD(scalar_t, label_t) \
  backward_typed<scalar_t, label_t>(grad_loss, logits, labels, lse, ignore_index, grad_logits)
  BISENET_CE_DISPATCH("upsample_ce_backward", logits, labels, BISENET_CE_BACKWARD);
#undef BISENET_CE_BACKWARD
}

void radix_histogram_cuda_launch(const at::Tensor& bits, const at::Tensor& prefix, int64_t shift,
                                 const at::Tensor& counts) {
  if (bits.numel() == 0) return;
  c10::cuda::CUDAGuard guard(bits.device());
  const int64_t blocks = std::min<int64_t>(blocks_for(bits.numel()), 1024);
  radix_histogram_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      bits.const_data_ptr<int32_t>(), bits.numel(), prefix.const_data_ptr<int64_t>(), static_cast<int>(shift),
      reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace bisenet
