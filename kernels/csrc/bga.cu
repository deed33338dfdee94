// CUDA kernels of the fused BGA gating: two forward kernels (the low-res gate, then the
// output), two backward kernels (the tiles, then the low-res pixels on the tiles' grid
// lines).
// The arithmetic lives in bga_math.h (shared with the C++ CPU loops in bga.cpp); this file
// maps items to threads, launches, and registers the CUDA implementations of the ops whose
// schema bga.cpp defines. prepare_bga_forward/backward (bga_op.h) check the inputs, make
// them dense in one memory format (NCHW or channels_last), allocate the outputs and make
// the backward's plan (tile, buffer capacities, shared bytes) and its rim workspace, for
// both devices alike.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "bga_op.h"

namespace bisenet {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };

// Forward pass 1: one thread per low-res element (bga_math.h: bga_gate_item).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) bga_gate_kernel(
    int64_t count, const scalar_t* __restrict__ detail_down, const scalar_t* __restrict__ sem_keep,
    acc_t* __restrict__ gated) {
  for (int64_t offset = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; offset < count;
       offset += static_cast<int64_t>(gridDim.x) * blockDim.x)
    bga_gate_item(offset, detail_down, sem_keep, gated);
}

// Forward pass 2: one thread per kVec outputs (bga_math.h: bga_forward_item). index_t:
// int32_t when the output has fewer than 2^30 elements (a vector's (n, c, y, x) then comes
// from the geometry's FastDividers, a multiply-high, an add and a shift each, where a 32-bit
// division by a runtime value is about 20 instructions and a 64-bit one several times more),
// else int64_t.
template <typename scalar_t, typename acc_t, int kVec, typename index_t>
__global__ void __launch_bounds__(kThreads) bga_forward_kernel(
    BgaGeometry<acc_t> geo, bool channels_last, index_t vectors, const scalar_t* __restrict__ detail_keep,
    const scalar_t* __restrict__ sem_up, const acc_t* __restrict__ gated, scalar_t* __restrict__ out) {
  for (index_t vec = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; vec < vectors;
       vec += static_cast<index_t>(gridDim.x) * blockDim.x)
    bga_forward_item<scalar_t, acc_t, kVec, index_t>(vec, geo, channels_last, detail_keep, sem_up, gated, out);
}

// Backward, kernel 1: one block per (low-res tile, channel group, sample); see bga_math.h.
// kGroup > 0 makes the channel group a compile-time constant (1 for NCHW, 16 for
// channels_last), which turns the item loops' divisions by it into shifts. kWalk:
// channels_last's walk items instead of the window and x-pass items, each of kLanes channels
// (walk_lanes). At 2 lanes the registers are held to 64, as one lane needs anyway, so that 4
// blocks fit an SM (the tile's 46 KiB of shared memory allow 4); at 1 no minimum (0), as
// before (a minimum of 1 cost the NCHW kernel 14 registers).
template <typename scalar_t, typename acc_t, int kGroup, bool kWalk, int kLanes>
__global__ void __launch_bounds__(kThreads, kLanes == 2 ? 4 : 0) bga_backward_kernel(
    BgaGeometry<acc_t> geo, BgaBackwardData<scalar_t> data, TileRim<acc_t> rim, int runtime_group,
    int window_capacity, int row_capacity) {
  const int group = kGroup > 0 ? kGroup : runtime_group;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* window_grad = reinterpret_cast<acc_t*>(shared_bytes);
  acc_t* window_sem_grad = window_grad + window_capacity;
  acc_t* row_grad = window_sem_grad + window_capacity;
  acc_t* row_sem_grad = row_grad + row_capacity;

  const BgaTile t = make_tile(geo, static_cast<int>(blockIdx.z), static_cast<int>(blockIdx.y), group,
                              static_cast<int>(blockIdx.x) / rim.tiles_x, static_cast<int>(blockIdx.x) % rim.tiles_x,
                              rim.tile_h, rim.tile_w);
  if (kWalk) {
    BgaWalkColumn<acc_t>* columns = reinterpret_cast<BgaWalkColumn<acc_t>*>(shared_bytes);  // the window's room
    for (int item = threadIdx.x; item < t.x1 - t.x0; item += blockDim.x) walk_column_item(item, t, geo, columns);
    __syncthreads();
    const int walk_items = static_cast<int>(tile_walk_items(t, group, kLanes));
    for (int item = threadIdx.x; item < walk_items; item += blockDim.x)
      backward_walk_item<scalar_t, acc_t, kLanes>(item, group, t, geo, data, columns, row_grad, row_sem_grad);
  } else {
    const int window_items = static_cast<int>(tile_window_items<acc_t>(t, group, false));
    for (int item = threadIdx.x; item < window_items; item += blockDim.x)
      backward_window_item<scalar_t, acc_t>(item, group, t, geo, data, window_grad, window_sem_grad);
    __syncthreads();
    const int row_items = static_cast<int>(tile_row_items(t, geo, group));
    for (int item = threadIdx.x; item < row_items; item += blockDim.x)
      backward_xpass_item<acc_t>(item, group, t, geo, window_grad, window_sem_grad, row_grad, row_sem_grad);
  }
  __syncthreads();
  BgaYRow<acc_t>* y_rows = reinterpret_cast<BgaYRow<acc_t>*>(shared_bytes);  // the window's room, free now
  const int y_table_items = tile_y_table_items(t, geo);
  for (int item = threadIdx.x; item < y_table_items; item += blockDim.x) y_table_item(item, t, geo, y_rows);
  __syncthreads();
  const int low_items = static_cast<int>(tile_low_items(t, geo, group));
  for (int item = threadIdx.x; item < low_items; item += blockDim.x)
    backward_ypass_item<scalar_t, acc_t>(item, group, t, geo, y_rows, row_grad, row_sem_grad, data, rim);
}

// Backward, kernel 2: one thread per low-res pixel on a grid line and channel.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads) bga_backward_rim_kernel(
    BgaGeometry<acc_t> geo, BgaBackwardData<scalar_t> data, TileRim<acc_t> rim, bool channels_last, index_t count) {
  for (index_t item = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; item < count;
       item += static_cast<index_t>(gridDim.x) * blockDim.x)
    backward_rim_item<scalar_t, acc_t, index_t>(item, channels_last, geo, rim, data);
}

template <typename scalar_t>
void forward_typed(const BgaForwardCall& call) {
  using acc_t = typename AccType<scalar_t>::type;
  auto geo = call_geometry<acc_t>(call);
  const scalar_t* keep_ptr = call.detail_keep.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = call.out.mutable_data_ptr<scalar_t>();
  const int64_t elements = call.detail_keep.numel();
  constexpr int kVec = 16 / sizeof(scalar_t);  // 16-byte loads and stores: 8 bf16, 4 float, 2 double
  const bool vectorise = call.vector == kVec;   // prepare_bga_forward's choice, the CPU loop's too
  const int64_t vectors = elements / call.vector;
  const int64_t max_blocks = 65535LL * 8;
  const int64_t blocks = std::min<int64_t>((vectors + kThreads - 1) / kThreads, max_blocks);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* sem_up = call.sem_up.const_data_ptr<scalar_t>();
  acc_t* gated = call.gated.mutable_data_ptr<acc_t>();
  const int64_t low = call.gated.numel();
  bga_gate_kernel<scalar_t, acc_t><<<std::min<int64_t>((low + kThreads - 1) / kThreads, max_blocks), kThreads, 0,
                                     stream>>>(low, call.detail_down.const_data_ptr<scalar_t>(),
                                               call.sem_keep.const_data_ptr<scalar_t>(), gated);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // 32-bit indices while index + the grid's stride (at most 65535 * 8 * 256 * kVec) stays below
  // 2^31, and the low-res offsets too
  const bool small = elements < (int64_t{1} << 30) && low < (int64_t{1} << 31);
  if (vectorise && small) {
    bga_forward_kernel<scalar_t, acc_t, kVec, int32_t><<<blocks, kThreads, 0, stream>>>(
        geo, call.channels_last, static_cast<int32_t>(vectors), keep_ptr, sem_up, gated, out_ptr);
  } else if (vectorise) {
    bga_forward_kernel<scalar_t, acc_t, kVec, int64_t><<<blocks, kThreads, 0, stream>>>(
        geo, call.channels_last, vectors, keep_ptr, sem_up, gated, out_ptr);
  } else if (small) {
    bga_forward_kernel<scalar_t, acc_t, 1, int32_t><<<blocks, kThreads, 0, stream>>>(
        geo, call.channels_last, static_cast<int32_t>(vectors), keep_ptr, sem_up, gated, out_ptr);
  } else {
    bga_forward_kernel<scalar_t, acc_t, 1, int64_t><<<blocks, kThreads, 0, stream>>>(
        geo, call.channels_last, vectors, keep_ptr, sem_up, gated, out_ptr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void backward_typed(const BgaBackwardCall& call) {
  using acc_t = typename AccType<scalar_t>::type;
  const BgaBackwardPlan& plan = call.plan;
  const int group = plan.group;
  auto geo = call_geometry<acc_t>(call);
  const TileRim<acc_t> rim = backward_rim<acc_t>(call);
  const int groups = (geo.C + group - 1) / group;
  TORCH_CHECK(groups <= 65535 && geo.N <= 65535, "bga_backward: too many channels or samples for the grid");
  const BgaBackwardData<scalar_t> data = backward_data<scalar_t>(call);
  const dim3 grid(static_cast<unsigned>(rim.tiles_y * rim.tiles_x), static_cast<unsigned>(groups),
                  static_cast<unsigned>(geo.N));
  const size_t shared = static_cast<size_t>(plan.shared_bytes);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (!plan.walk) {
    bga_backward_kernel<scalar_t, acc_t, 1, false, 1><<<grid, kThreads, shared, stream>>>(
        geo, data, rim, group, plan.window_capacity, plan.row_capacity);
  } else if (group == 16 && plan.lanes == 2) {
    if constexpr (sizeof(scalar_t) == 2)  // walk_lanes takes two for 16-bit data only
      bga_backward_kernel<scalar_t, acc_t, 16, true, 2><<<grid, kThreads, shared, stream>>>(
          geo, data, rim, group, plan.window_capacity, plan.row_capacity);
    else
      TORCH_CHECK(false, "bga_backward: 2 lanes for ", sizeof(scalar_t), "-byte data");
  } else if (group == 16) {
    bga_backward_kernel<scalar_t, acc_t, 16, true, 1><<<grid, kThreads, shared, stream>>>(
        geo, data, rim, group, plan.window_capacity, plan.row_capacity);
  } else {
    bga_backward_kernel<scalar_t, acc_t, 0, true, 1><<<grid, kThreads, shared, stream>>>(
        geo, data, rim, group, plan.window_capacity, plan.row_capacity);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t count = geo.N * rim_pixels(rim, geo.h, geo.w) * geo.C;
  const int64_t blocks = std::min<int64_t>((count + kThreads - 1) / kThreads, 65535LL * 8);
  if (count < (int64_t{1} << 30))  // item + the grid's stride (at most 2^29) below 2^31
    bga_backward_rim_kernel<scalar_t, acc_t, int32_t><<<blocks, kThreads, 0, stream>>>(
        geo, data, rim, call.channels_last, static_cast<int32_t>(count));
  else
    bga_backward_rim_kernel<scalar_t, acc_t, int64_t><<<blocks, kThreads, 0, stream>>>(geo, data, rim,
                                                                                    call.channels_last, count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor bga_forward_cuda(const at::Tensor& detail_keep, const at::Tensor& sem_up, const at::Tensor& detail_down,
                            const at::Tensor& sem_keep) {
  const BgaForwardCall call = prepare_bga_forward(detail_keep, sem_up, detail_down, sem_keep);
  if (call.out.numel() == 0) return call.out;
  c10::cuda::CUDAGuard guard(detail_keep.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, detail_keep.scalar_type(), "bga_forward_cuda",
                                  [&] { forward_typed<scalar_t>(call); });
  return call.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bga_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& detail_keep, const at::Tensor& sem_up, const at::Tensor& detail_down,
    const at::Tensor& sem_keep, int64_t tile_h, int64_t tile_w, int64_t lanes) {
  const BgaBackwardCall call =
      prepare_bga_backward(grad_out, detail_keep, sem_up, detail_down, sem_keep, tile_h, tile_w, lanes);
  if (!call.empty) {
    c10::cuda::CUDAGuard guard(detail_keep.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, detail_keep.scalar_type(), "bga_backward_cuda",
                                    [&] { backward_typed<scalar_t>(call); });
  }
  return {call.grad_detail_keep, call.grad_sem_up, call.grad_detail_down, call.grad_sem_keep};
}

}  // namespace
}  // namespace bisenet

TORCH_LIBRARY_IMPL(bisenet_cuda, CUDA, m) {
  m.impl("bga_forward", &bisenet::bga_forward_cuda);
  m.impl("bga_backward", &bisenet::bga_backward_cuda);
}
