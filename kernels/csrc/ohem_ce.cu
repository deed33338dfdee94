// CUDA kernels of the fused upsample + cross-entropy loss: the per-pixel forward, the
// tiled gather backward into the low-res logits, and the OHEM selection's weights.
// The arithmetic lives in ohem_ce_math.h (shared with the C++ CPU loops in ohem_ce.cpp);
// this file maps items to threads, launches, and registers the CUDA implementations of the
// ops whose schema ohem_ce.cpp defines; prepare_* (ohem_ce_op.h) check the inputs, make them
// contiguous and allocate the outputs, for both devices alike.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "ohem_ce_op.h"

namespace bisenet {
namespace {

constexpr int kThreads = 256;
static_assert(kThreads == kCeBackwardThreads, "the backward plan fills blocks of kCeBackwardThreads");

template <typename scalar_t>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };

// What a launch asks of the driver that takes more than a lookup, asked once per kernel and
// device, not every call: each step's host time is what bounds the small heads' steps.

// Lets `kernel` take `bytes` of dynamic shared memory on the current device (above 48 KiB a
// kernel must opt in); the attribute stays as set, so the driver is asked only when it changes.
void allow_shared_bytes(const void* kernel, int64_t bytes) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int>, int64_t> allowed;  // (kernel, device) -> bytes as set
  const std::tuple<const void*, int> key{kernel, c10::cuda::current_device()};
  std::lock_guard<std::mutex> lock(mutex);
  const auto found = allowed.find(key);
  if (found != allowed.end() && found->second == bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  allowed[key] = bytes;
}

// How many blocks of `kernel` (kThreads each, `shared_bytes` of dynamic shared memory) an SM
// of the current device holds at once, once per (kernel, device, bytes).
int resident_blocks_per_sm(const void* kernel, size_t shared_bytes) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, size_t>, int> known;
  const std::tuple<const void*, int, size_t> key{kernel, c10::cuda::current_device(), shared_bytes};
  std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(key);
  if (found != known.end()) return found->second;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, shared_bytes));
  known.emplace(key, per_sm);
  return per_sm;
}

// Sums in a fixed order (ohem_ce_math.h): a block's tree through shared memory, a barrier
// between steps; thread 0 then holds the block's sums.
template <typename... value_t>
__device__ void sum_tree(value_t*... values) {
  for (int half = kSumThreads / 2; half > 0; half /= 2) {
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < half) (sum_tree_step(threadIdx.x, half, values), ...);
  }
}

// One block per tile of high-res rows and columns (ohem_ce_math.h, "Forward tiling"): per
// class chunk (one for 19 classes) the block stages the logit rows the tile reads, meets at a
// barrier, and each thread takes its pixels' chunk arithmetic in registers. With block_sums
// (the CE mean), the block's sum of its counted pixels' losses and their count, by its
// threads' tree, into block_sums and block_counts at its index.
static_assert(kCeForwardThreads == kSumThreads, "the CE mean's tree runs over the forward's threads");
template <typename scalar_t, typename label_t, typename acc_t>
__global__ void __launch_bounds__(kCeForwardThreads, 4) ce_forward_kernel(
    CeGeometry<acc_t> geo, CeForwardPlan plan, const scalar_t* __restrict__ logits,
    const label_t* __restrict__ labels, int64_t ignore_index, acc_t* __restrict__ loss, acc_t* __restrict__ lse,
    acc_t* __restrict__ block_sums, int64_t* __restrict__ block_counts) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const CeForwardBuffers<acc_t> buf = ce_forward_buffers<acc_t>(shared_bytes, plan);
  const CeForwardTile t = ce_forward_tile(blockIdx.x, geo, plan);
  const int64_t pixels = static_cast<int64_t>(geo.H) * geo.W;
  const int plane = geo.h * geo.w;
  const scalar_t* sample = held_pointer(logits + static_cast<int64_t>(t.n) * geo.C * plane);
  if (threadIdx.x < t.x1 - t.x0) ce_forward_table_item(threadIdx.x, t, geo, buf);
  // a slot's pixel (a slot past the tile: an ignored state) is made again each chunk, from its
  // label and taps: only its log-sum-exp is kept from one chunk to the next (in registers:
  // 3 values a slot where the whole state takes 8)
  const auto pixel = [&](int k) {
    return ce_forward_pixel_start<label_t, acc_t>(threadIdx.x + k * kCeForwardThreads, t, geo, labels + t.n * pixels,
                                                  ignore_index);
  };
  acc_t kept_max[kCeForwardPixels], kept_sum[kCeForwardPixels], kept_label_z[kCeForwardPixels];
  acc_t mean_sum = static_cast<acc_t>(0);
  int64_t mean_count = 0;
  // stage items (r, x, g): this thread's column, every kStageStep-th (row, group) pair from
  // the thread's row of the block (groups fastest)
  const int stage_x = threadIdx.x % kCeForwardChunk;
  constexpr int kStageStep = kCeForwardThreads / kCeForwardChunk;
  for (int c0 = 0; c0 < geo.C; c0 += kCeChunkClasses) {
    const int classes = ce_chunk_classes(c0, geo.C), groups = ce_chunk_groups(classes);
    __syncthreads();  // the column taps; after the first chunk, its pixels are done with the staged rows
    if (stage_x < t.x1 - t.x0) {
      const Taps<acc_t> tx = buf.col_taps[stage_x];  // the same for every item of this thread
      int r = static_cast<int>(threadIdx.x / kCeForwardChunk) / groups;
      int g = static_cast<int>(threadIdx.x / kCeForwardChunk) % groups;
      while (r < t.rows) {
        ce_forward_stage_group<scalar_t, acc_t>(r, stage_x, tx, g, t, geo, sample, c0, buf.staged);
        for (g += kStageStep; g >= groups; g -= groups) ++r;  // the next pair, no division
      }
    }
    __syncthreads();  // the chunk is staged
    const bool last = c0 + classes == geo.C;
#pragma unroll
    for (int k = 0; k < kCeForwardPixels; ++k) {
      CeForwardPixel<acc_t> state = pixel(k);
      if (c0 > 0) {
        state.max_z = kept_max[k];
        state.sum = kept_sum[k];
        state.label_z = kept_label_z[k];
      }
      ce_forward_pixel_chunk(state, c0, classes, buf.staged);
      const int item = threadIdx.x + k * kCeForwardThreads;
      if (!last) {
        kept_max[k] = state.max_z;
        kept_sum[k] = state.sum;
        kept_label_z[k] = state.label_z;
      } else if (item < ce_forward_pixels(t)) {
        const int64_t p = t.n * pixels + ce_forward_pixel_offset(item, t, geo);
        ce_mean_add(state, ce_forward_pixel_finish(state, loss + p, lse + p), &mean_sum, &mean_count);
      }
    }
  }
  if (block_sums == nullptr) return;  // the same for the whole block
  // the tree in the staged rows' bytes, once every thread is done reading them
  __syncthreads();
  acc_t* sums = reinterpret_cast<acc_t*>(shared_bytes);
  int64_t* counts = reinterpret_cast<int64_t*>(shared_bytes + kSumThreads * sizeof(acc_t));
  sums[threadIdx.x] = mean_sum;
  counts[threadIdx.x] = mean_count;
  sum_tree(sums, counts);
  if (threadIdx.x == 0) {
    block_sums[blockIdx.x] = sums[0];
    block_counts[blockIdx.x] = counts[0];
  }
}

// The CE mean from the blocks' sums and counts: where a launch's one block (kSumThreads
// threads, all of them) writes it.
template <typename acc_t>
struct CeMeanFinal {
  const acc_t* block_sums = nullptr;  // nullptr: no mean to write
  const int64_t* block_counts = nullptr;
  int64_t blocks = 0;
  acc_t* mean = nullptr;
  acc_t* denominator = nullptr;
};

template <typename acc_t>
__device__ void ce_mean_final_block(const CeMeanFinal<acc_t>& final) {
  __shared__ acc_t sums[kSumThreads];
  __shared__ int64_t counts[kSumThreads];
  sums[threadIdx.x] = sum_blocks_part(threadIdx.x, final.blocks, final.block_sums);
  counts[threadIdx.x] = sum_blocks_part(threadIdx.x, final.blocks, final.block_counts);
  sum_tree(sums, counts);
  if (threadIdx.x == 0) ce_mean_finish(sums[0], counts[0], final.mean, final.denominator);
}

// The CE mean of the forward's blocks: one block.
template <typename acc_t>
__global__ void __launch_bounds__(kSumThreads) ce_mean_final_kernel(CeMeanFinal<acc_t> final) {
  ce_mean_final_block(final);
}

// The items (k, x) of a rows x cols grid, strided over the block's threads as item = k * cols
// + x would be, with one division per thread, not one per item.
template <typename F>
__device__ __forceinline__ void for_grid_items(int rows, int cols, F f) {
  if (cols <= 0) return;
  int k = threadIdx.x / cols, x = threadIdx.x % cols;
  const int step_k = blockDim.x / cols, step_x = blockDim.x % cols;
  while (k < rows) {
    f(k, x);
    x += step_x;
    k += step_k;
    if (x >= cols) {
      x -= cols;
      ++k;
    }
  }
}

// The weighted sum's gradient (ohem_ce_op.h: CeBackwardCall): grad_logits (count elements)
// = grad_sum times scale (ohem_ce_math.h: ce_weighted_sum_item), the launch's threads
// striding over the items; index_t: int32_t where an item and the grid's stride fit (count
// below 2^30, at most 2^21 blocks: the gather's launch may have more), else int64_t.
template <typename scalar_t, typename acc_t>
__device__ void weighted_sum_items(int64_t count, const acc_t* __restrict__ grad_sum, acc_t scale,
                                   scalar_t* __restrict__ grad_logits) {
  const auto walk = [&](auto items) {
    using index_t = decltype(items);
    for (index_t item = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; item < items;
         item += static_cast<index_t>(gridDim.x) * blockDim.x)
      ce_weighted_sum_item(item, static_cast<index_t>(count), grad_sum, scale, grad_logits);
  };
  if (count < (int64_t{1} << 30) && gridDim.x <= (1u << 21))  // item + stride (at most 2^29) below 2^31
    walk(static_cast<int32_t>(ce_weighted_sum_items(count)));
  else
    walk(ce_weighted_sum_items(count));
}

// One block per tile of low-res rows and columns, all classes (ohem_ce_math.h, "Backward
// tiling"): the window's pixels and taps into shared memory once, then per class the staged
// logit rows, the segment sums and the tile's gradients. No atomics: deterministic. Where
// *sum_weight is not 0 (OHEM's hard branch, ohem_ce_math.h: ohem_hard_weight; read on the
// device) the blocks write the weighted sum's gradient instead (weighted_sum_items), no gather.
template <typename scalar_t, typename label_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 4) ce_backward_kernel(
    CeGeometry<acc_t> geo, CeBackwardPlan plan, const scalar_t* __restrict__ logits,
    const label_t* __restrict__ labels, const acc_t* __restrict__ grad_loss, int grad_stride,
    const acc_t* __restrict__ lse, int64_t ignore_index, scalar_t* __restrict__ grad_logits, TileRim<acc_t> rim,
    const acc_t* __restrict__ grad_sum, const acc_t* __restrict__ sum_weight, const acc_t* __restrict__ sum_divisor,
    const acc_t* __restrict__ grad_scale) {
  if (ce_weighted_sum_taken(sum_weight)) {  // the whole launch alike
    const int64_t count = static_cast<int64_t>(geo.N) * geo.C * geo.h * geo.w;
    weighted_sum_items(count, grad_sum, ce_weighted_sum_scale(sum_weight, sum_divisor, grad_scale), grad_logits);
    return;
  }
  const acc_t scale = ce_grad_scale(grad_scale);
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const CeBackwardBuffers<acc_t> buf = ce_backward_buffers<acc_t>(shared_bytes, plan);
  const CeTile t = ce_backward_tile(blockIdx.x, geo, plan);
  const int64_t pixels = static_cast<int64_t>(geo.H) * geo.W;
  const int plane = geo.h * geo.w;
  const int64_t sample = static_cast<int64_t>(t.n) * geo.C * plane;
  for (int item = threadIdx.x; item < ce_tile_tables(t, geo.w); item += blockDim.x)
    ce_backward_table_item(item, t, geo, buf);
  // the window's pixels, kPixelsAhead items a thread loaded before any is stored
  constexpr int kPixelsAhead = 4;
  const int window = ce_tile_window(t);
  for (int base = threadIdx.x; base < window; base += kPixelsAhead * blockDim.x) {
    CePixelLoad<acc_t> loaded[kPixelsAhead];
#pragma unroll
    for (int k = 0; k < kPixelsAhead; ++k)
      if (base + k * blockDim.x < window)
        loaded[k] = ce_backward_pixel_load<label_t, acc_t>(base + k * blockDim.x, t, geo, labels + t.n * pixels,
                                                           grad_loss + t.n * pixels * grad_stride, grad_stride,
                                                           scale, lse + t.n * pixels);
#pragma unroll
    for (int k = 0; k < kPixelsAhead; ++k)
      if (base + k * blockDim.x < window)
        ce_backward_pixel_store(loaded[k], base + k * blockDim.x, geo.C, ignore_index, buf);
  }
  __syncthreads();  // the column taps, for the stage
  const int cols = t.wx1 - t.wx0;
  // This thread's stage items: item = threadIdx.x + k * blockDim.x, (r, x) = (item / cols,
  // item % cols), each the pass's classes. The first kAhead of a pass are loaded before the
  // previous pass's segment items and stored after them, so the loads' latency passes under the
  // walk; any further items (more than kAhead * blockDim.x staged rows and columns) are staged
  // with the stores. As the forward's: the items made once, 32-bit offsets. Two items ahead for
  // 16-bit logits, one for float32 (with two, ptxas spills the 8 held values at 64 registers).
  constexpr int kAhead = sizeof(scalar_t) == 2 ? 2 : 1;
  const int staged_items = t.rows * cols;
  CeStageItem<acc_t> ahead_item[kAhead];
#pragma unroll
  for (int k = 0; k < kAhead; ++k) {
    const int item = threadIdx.x + k * blockDim.x;
    if (item < staged_items) ahead_item[k] = ce_backward_stage_item_for(item / cols, item % cols, t, geo, buf);
  }
  CeStagePassLoad<acc_t> ahead[kAhead];
  const scalar_t* sample_logits = held_pointer(logits + sample);
  const auto stage_begin = [&](int c0) {
#pragma unroll
    for (int k = 0; k < kAhead; ++k)
      if (threadIdx.x + k * blockDim.x < staged_items)
        ahead[k] = ce_stage_pass_load<scalar_t, acc_t>(ahead_item[k], sample_logits, c0, ce_pass_classes(c0, geo.C),
                                                      plane);
  };
  const auto stage_end = [&](int c0) {
    const int classes = ce_pass_classes(c0, geo.C);
#pragma unroll
    for (int k = 0; k < kAhead; ++k)
      if (threadIdx.x + k * blockDim.x < staged_items)
        ce_stage_pass_store(ahead[k], ahead_item[k], classes, buf.staged);
    for (int item = threadIdx.x + kAhead * blockDim.x; item < staged_items; item += blockDim.x)
      ce_backward_stage_item<scalar_t, acc_t>(item / cols, item % cols, t, geo, sample_logits, c0, classes, buf);
  };
  stage_begin(0);
  stage_end(0);
  __syncthreads();
  const int outputs = ce_tile_outputs(t, geo.h, geo.w), columns = ce_tile_columns(t, geo.h);
  for (int c0 = 0; c0 < geo.C; c0 += kCePassClasses) {
    const int classes = ce_pass_classes(c0, geo.C);
    const bool stage_next = c0 + classes < geo.C;
    if (stage_next) stage_begin(c0 + classes);
    if (classes == kCePassClasses)
      for_grid_items(ce_tile_segments(t), cols,
                     [&](int k, int x) { ce_backward_segment_item<kCePassClasses>(k, x, c0, t, buf); });
    else
      for_grid_items(ce_tile_segments(t), cols, [&](int k, int x) { ce_backward_segment_item<1>(k, x, c0, t, buf); });
    __syncthreads();  // the segment sums are complete; the staged rows are free
    if (columns > 0) {  // segments in parts (the whole block alike): each column's parts summed once
      for (int item = threadIdx.x; item < classes * columns; item += blockDim.x)
        ce_backward_column_item(item, t, geo.h, buf);
      __syncthreads();
    }
    for (int item = threadIdx.x; item < classes * outputs; item += blockDim.x)
      ce_backward_output_item<scalar_t, acc_t>(item, outputs, c0, t, geo, buf, rim, grad_logits + sample);
    if (stage_next) stage_end(c0 + classes);
    __syncthreads();  // the next pass's rows are staged; the segment sums are free
  }
}

// The weighted sum's gradient without grad_loss (sum_only; the CE mean's backward): grad_sum
// times the weight (over the divisor, the CE mean's denominator, where given) times the
// incoming factor (ce_weighted_sum_scale).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) ce_weighted_sum_kernel(int64_t count, const acc_t* __restrict__ grad_sum,
                                                                  const acc_t* __restrict__ sum_weight,
                                                                  const acc_t* __restrict__ grad_scale,
                                                                  const acc_t* __restrict__ sum_divisor,
                                                                  scalar_t* __restrict__ grad_logits) {
  weighted_sum_items(count, grad_sum, ce_weighted_sum_scale(sum_weight, sum_divisor, grad_scale), grad_logits);
}

// The forward with gradient (ohem_ce_math.h, "Forward with gradient"): one block per backward
// tile, all classes in one pass: the window's labels and taps, the tile's rows of every class
// staged, then the segment items (loss, lse, the CE mean's sums, the gradient's segment sums),
// the column and output items into grad_sum (its grid lines into the rim), the block's CE
// mean tree. No atomics: deterministic.
template <typename scalar_t, typename label_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2) ce_forward_grad_kernel(
    CeGeometry<acc_t> geo, CeBackwardPlan plan, const scalar_t* __restrict__ logits,
    const label_t* __restrict__ labels, int64_t ignore_index, CeGradPixels<acc_t> which, acc_t* __restrict__ loss,
    acc_t* __restrict__ lse, acc_t* __restrict__ block_sums, int64_t* __restrict__ block_counts,
    acc_t* __restrict__ grad_sum, TileRim<acc_t> rim) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const CeBackwardBuffers<acc_t> buf = ce_backward_buffers<acc_t>(shared_bytes, plan);
  const CeTile t = ce_backward_tile(blockIdx.x, geo, plan);
  const int64_t pixels = static_cast<int64_t>(geo.H) * geo.W;
  const int64_t sample = static_cast<int64_t>(t.n) * geo.C * geo.h * geo.w;
  for (int item = threadIdx.x; item < ce_tile_tables(t, geo.w); item += blockDim.x)
    ce_backward_table_item(item, t, geo, buf);
  for (int item = threadIdx.x; item < ce_tile_window(t); item += blockDim.x)
    ce_fused_pixel_item<label_t, acc_t>(item, t, geo, labels + t.n * pixels, ignore_index, buf);
  __syncthreads();  // the column taps, for the stage
  const int cols = t.wx1 - t.wx0, groups = ce_chunk_groups(geo.C);
  const scalar_t* sample_logits = held_pointer(logits + sample);
  // items (r, g, x), x fastest (a warp's loads of one class row are adjacent), strided over
  // the threads as item = (r * groups + g) * cols + x would be, (r, g) stepped without a division
  if (cols > 0) {
    const int first = threadIdx.x / cols, step_k = blockDim.x / cols, step_x = blockDim.x % cols;
    int r = first / groups, g = first % groups, x = threadIdx.x % cols;
    while (r < t.rows) {
      ce_fused_stage_item<scalar_t, acc_t>(r, g, x, t, geo, sample_logits, buf);
      x += step_x;
      g += step_k;
      if (x >= cols) {
        x -= cols;
        ++g;
      }
      for (; g >= groups; g -= groups) ++r;
    }
  }
  __syncthreads();  // the rows are staged
  acc_t mean_sum = static_cast<acc_t>(0);
  int64_t mean_count = 0;
  for_grid_items(ce_tile_segments(t), cols, [&](int k, int x) {
    ce_fused_segment_item(k, x, t, geo, buf, which, loss + t.n * pixels, lse + t.n * pixels, &mean_sum, &mean_count);
  });
  const CeMeanTree<acc_t> tree = ce_fused_mean_tree<acc_t>(shared_bytes, plan);
  tree.sums[threadIdx.x] = mean_sum;
  tree.counts[threadIdx.x] = mean_count;
  __syncthreads();  // the segment sums are complete
  const int columns = ce_tile_columns(t, geo.h), outputs = ce_tile_outputs(t, geo.h, geo.w);
  if (columns > 0) {  // segments in parts (the whole block alike): each column's parts summed once
    for (int item = threadIdx.x; item < geo.C * columns; item += blockDim.x) ce_backward_column_item(item, t, geo.h, buf);
    __syncthreads();
  }
  for (int item = threadIdx.x; item < geo.C * outputs; item += blockDim.x)
    ce_backward_output_item<acc_t, acc_t>(item, outputs, 0, t, geo, buf, rim, grad_sum + sample);
  sum_tree(tree.sums, tree.counts);
  if (threadIdx.x == 0) {
    block_sums[blockIdx.x] = tree.sums[0];
    block_counts[blockIdx.x] = tree.counts[0];
  }
}

// The grid-line logits: one thread per (sample, class, grid-line low-res pixel). After the
// forward with gradient, block 0 then writes the CE mean from its tiles' sums (final): its
// own launch saved, the host's time to issue one.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads) ce_backward_rim_kernel(CeGeometry<acc_t> geo, TileRim<acc_t> rim,
                                                                  index_t count, scalar_t* __restrict__ grad_logits,
                                                                  const acc_t* __restrict__ sum_weight,
                                                                  CeMeanFinal<acc_t> final) {
  static_assert(kThreads == kSumThreads, "the mean's tree takes the block's threads");
  if (ce_weighted_sum_taken(sum_weight)) return;  // the gather's blocks wrote the weighted sum
  for (index_t item = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; item < count;
       item += static_cast<index_t>(gridDim.x) * blockDim.x)
    ce_backward_rim_item<scalar_t, acc_t, index_t>(item, geo, rim, grad_logits);
  if (final.block_sums != nullptr && blockIdx.x == 0) ce_mean_final_block(final);  // the same for the whole block
}

// ---------------------------------------------------------------------------------------
// OHEM weights (ohem_ce_math.h): the whole selection is one cooperative launch
// (ohem_select_kernel): its blocks are all resident at once, so grid.sync() stands where a
// launch boundary stood (the zero-fill, each radix pass, the class tally, the weights and the
// final sum were 6 to 10 launches); the running numbers in `state` on the device, no host
// synchronisation.

// Sums of per-thread counts over the block's warps into state[slot_a], state[slot_b].
__device__ void add_counts(int64_t a, int64_t b, int64_t* state, int slot_a, int slot_b) {
  for (int offset = 16; offset > 0; offset /= 2) {
    a += __shfl_down_sync(0xFFFFFFFFu, a, offset);
    b += __shfl_down_sync(0xFFFFFFFFu, b, offset);
  }
  if ((threadIdx.x & 31) == 0) {
    if (a) atomicAdd(reinterpret_cast<unsigned long long*>(state + slot_a), static_cast<unsigned long long>(a));
    if (b) atomicAdd(reinterpret_cast<unsigned long long*>(state + slot_b), static_cast<unsigned long long>(b));
  }
}

// The sum of `value` over the threads before this one (a block-wide exclusive scan).
__device__ int64_t block_exclusive_sum(int64_t value) {
  __shared__ int64_t warp_sums[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  int64_t inclusive = value;
  for (int offset = 1; offset < 32; offset *= 2) {
    const int64_t before = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
    if (lane >= offset) inclusive += before;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  for (int w = 0; w < warp; ++w) inclusive += warp_sums[w];
  return inclusive - value;
}

// The selection's arguments, one struct (a cooperative launch takes the parameters as an
// array of pointers). state, counts and class_counts are views of scratch (ohem_ce_op.h:
// OhemCall), which the kernel zeroes first.
template <typename acc_t, typename label_t>
struct OhemArgs {
  const acc_t* loss;
  const label_t* labels;
  int64_t pixels, ignore_index, min_kept;
  acc_t threshold;
  int64_t* scratch;
  int64_t scratch_size;
  int64_t* state;         // (kOhemStateSize,): OhemState
  int64_t* counts;        // (passes, 256): each pass's histogram
  int64_t* class_counts;  // (2, classes)
  int classes;                 // 0: no class weights
  const acc_t* class_weights;  // (classes,)
  acc_t* weights;              // (pixels,)
  acc_t* block_sums;           // (sum_blocks,): the weights pass's logical blocks
  int64_t sum_blocks;
  acc_t* hard_weight;
  acc_t* value;  // the OHEM loss
};

// One pass of the radix select over bits [shift, shift + 8), this block's share: the
// histogram of the matching keys' digit, per-block bins in shared memory, lanes of a warp
// holding the same digit adding once (__match_any_sync: late passes see long runs of one
// digit; every lane runs the same iterations, lanes past the end holding digit -1, so the
// match sees all 32), then added into the pass's counts. The first pass also counts the
// valid and hard pixels into the state.
template <typename acc_t, typename label_t, bool kFirst>
__device__ void ohem_histogram(const OhemArgs<acc_t, label_t>& a, int64_t prefix, int shift, int64_t* counts) {
  static_assert(kThreads == 256, "one thread per digit");
  __shared__ unsigned int bins[256];
  bins[threadIdx.x] = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t valid = 0, hard = 0;
  // kOhemUnroll grid strides at a time, their loads first (the loss whatever the label, so the
  // two loads do not wait on each other): that many in flight a thread, not one round trip
  for (int64_t base = blockIdx.x * static_cast<int64_t>(blockDim.x) + (threadIdx.x & ~31); base < a.pixels;
       base += kOhemUnroll * stride) {  // base is the same in a warp
    bool is_valid[kOhemUnroll];
    acc_t value[kOhemUnroll];
#pragma unroll
    for (int u = 0; u < kOhemUnroll; ++u) {
      const int64_t p = base + u * stride + lane;
      const bool inside = p < a.pixels;
      const int64_t label = inside ? static_cast<int64_t>(a.labels[p]) : a.ignore_index;
      value[u] = inside ? a.loss[p] : static_cast<acc_t>(0);
      is_valid[u] = label != a.ignore_index;
    }
#pragma unroll
    for (int u = 0; u < kOhemUnroll; ++u) {
      if (kFirst) {
        valid += is_valid[u];
        hard += is_valid[u] && value[u] > a.threshold;
      }
      const int digit = is_valid[u] ? ohem_digit(ohem_key(value[u]), prefix, shift) : -1;
      const unsigned peers = __match_any_sync(0xFFFFFFFFu, digit);
      if (digit >= 0 && lane == __ffs(peers) - 1) atomicAdd(&bins[digit], static_cast<unsigned>(__popc(peers)));
    }
  }
  __syncthreads();
  if (bins[threadIdx.x] != 0)
    atomicAdd(reinterpret_cast<unsigned long long*>(counts + threadIdx.x),
              static_cast<unsigned long long>(bins[threadIdx.x]));
  if (kFirst) add_counts(valid, hard, a.state, kOhemValid, kOhemHard);
}

// The selection's state, complete, copied into registers once a thread: read through the
// pointer, nvcc loaded the k-th key again for every pixel, inside the pick's branch.
struct OhemSelection {
  int64_t state[kOhemStateSize];
  __device__ explicit OhemSelection(const int64_t* block_state) {
#pragma unroll
    for (int i = 0; i < kOhemStateSize; ++i) state[i] = block_state[i];
  }
};

// The whole selection, one cooperative launch (every block resident; grid.sync() a barrier
// of the grid, its fences making the other blocks' writes visible):
//   zero the scratch | sync | per pass: the histogram | sync | every block picks the digit
//   from the same counts into its own copy of the state (the first pass: ohem_setup first),
//   so no block waits on another's pick; the passes stop once the branch is the hard one
//   (the same in every block) | with class weights: the tally per class | sync | every
//   block's first thread the weighted total | the weights pass, over sum_blocks logical
//   blocks (the CPU loop's order whatever the grid) | sync | block 0 adds their sums.
// No thread leaves before a grid.sync(): every loop and branch around one is the same in
// every block.
template <typename acc_t, typename label_t, bool kClassWeights>
__global__ void __launch_bounds__(kThreads) ohem_select_kernel(OhemArgs<acc_t, label_t> a) {
  static_assert(kThreads == kSumThreads, "the sums' tree takes the block's threads");
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = first; i < a.scratch_size; i += stride) a.scratch[i] = 0;
  grid.sync();
  __shared__ int64_t block_state[kOhemStateSize];
  constexpr int passes = ohem_passes<acc_t>();
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = 8 * (passes - 1 - pass);
    int64_t* counts = a.counts + 256 * pass;
    if (pass == 0) ohem_histogram<acc_t, label_t, true>(a, 0, shift, counts);
    else ohem_histogram<acc_t, label_t, false>(a, block_state[kOhemPrefix], shift, counts);
    grid.sync();  // the pass's counts (and the first's valid and hard counts) complete
    if (pass == 0) {
      if (threadIdx.x < kOhemStateSize) block_state[threadIdx.x] = __ldcg(a.state + threadIdx.x);
      __syncthreads();
      if (threadIdx.x == 0) ohem_setup(block_state, a.min_kept);
      __syncthreads();
    }
    if (block_state[kOhemUseHard]) break;  // the hard branch: no k-th value (every block alike)
    const int digit = 255 - static_cast<int>(threadIdx.x);
    const int64_t count = __ldcg(counts + digit);
    const int64_t remaining = block_state[kOhemRemaining];  // read before the scan's barrier
    const int64_t above = block_exclusive_sum(count);       // keys on larger digits
    if (ohem_is_digit(above, count, remaining)) ohem_take_digit(digit, above, count, shift, block_state);
    __syncthreads();  // the block's state has the pass's digit
  }
  const OhemSelection selection(block_state);
  if (blockIdx.x == 0 && threadIdx.x == 0) *a.hard_weight = ohem_hard_weight<acc_t>(selection.state, kClassWeights);
  const acc_t threshold = a.threshold;
  acc_t class_total = static_cast<acc_t>(0);
  if (kClassWeights) {  // the kept and tied pixels per class: integers, the same counts in any order
    extern __shared__ unsigned int class_bins[];  // (2, classes)
    for (int b = threadIdx.x; b < 2 * a.classes; b += blockDim.x) class_bins[b] = 0;
    __syncthreads();
    for (int64_t p = first; p < a.pixels; p += stride) {
      const bool valid = static_cast<int64_t>(a.labels[p]) != a.ignore_index;
      const int64_t slot = ohem_class_slot(ohem_pick(a.loss[p], valid, threshold, selection.state), a.labels[p],
                                           a.classes);
      if (slot >= 0) atomicAdd(&class_bins[slot], 1u);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < 2 * a.classes; b += blockDim.x) {
      if (class_bins[b] != 0)
        atomicAdd(reinterpret_cast<unsigned long long*>(a.class_counts + b),
                  static_cast<unsigned long long>(class_bins[b]));
    }
    grid.sync();  // the class counts complete
    __shared__ acc_t block_total;
    if (threadIdx.x == 0) block_total = ohem_class_total(a.class_weights, a.class_counts, a.classes, selection.state);
    __syncthreads();
    class_total = block_total;
  }
  const OhemWeightValues<acc_t> values = ohem_weight_values<acc_t>(selection.state);
  const auto weight_of = [&](acc_t value, label_t label) {
    const bool valid = static_cast<int64_t>(label) != a.ignore_index;
    if (kClassWeights)
      return ohem_class_pixel_weight(value, label, valid, threshold, selection.state, a.class_weights, a.classes,
                                     class_total);
    return ohem_pixel_weight(ohem_pick(value, valid, threshold, selection.state), values);
  };
  __shared__ acc_t sums[kSumThreads];
  for (int64_t b = blockIdx.x; b < a.sum_blocks; b += gridDim.x) {  // the same in the whole block
    sums[threadIdx.x] = ohem_weights_pixels(b * kSumThreads + threadIdx.x, a.sum_blocks * kSumThreads, a.pixels,
                                            a.loss, a.labels, a.weights, weight_of);
    sum_tree(sums);
    if (threadIdx.x == 0) a.block_sums[b] = sums[0];
    __syncthreads();  // sums[0] and [1] read before the next block's values
  }
  grid.sync();  // every logical block's sum written
  if (blockIdx.x != 0) return;
  sums[threadIdx.x] = sum_blocks_part(threadIdx.x, a.sum_blocks, a.block_sums);
  sum_tree(sums);
  if (threadIdx.x == 0) *a.value = sums[0];
}

template <typename scalar_t, typename label_t>
void forward_typed(const CeForwardCall& call, int64_t ignore_index) {
  using acc_t = typename AccType<scalar_t>::type;
  const at::Tensor& logits = call.logits;
  auto geo = make_ce_geometry<acc_t>(logits.size(0), logits.size(1), logits.size(2), logits.size(3),
                                     call.labels.size(1), call.labels.size(2));
  ce_forward_kernel<scalar_t, label_t, acc_t><<<ce_forward_blocks(geo, call.plan), kCeForwardThreads,
                                                call.plan.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
      geo, call.plan, logits.const_data_ptr<scalar_t>(), call.labels.const_data_ptr<label_t>(), ignore_index,
      call.loss.mutable_data_ptr<acc_t>(), call.lse.mutable_data_ptr<acc_t>(),
      call.block_sums.numel() > 0 ? call.block_sums.mutable_data_ptr<acc_t>() : nullptr,
      call.block_counts.numel() > 0 ? call.block_counts.mutable_data_ptr<int64_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The CE mean's arguments: the forward blocks' sums and counts (none when the batch is empty).
template <typename acc_t>
CeMeanFinal<acc_t> mean_final(const CeForwardCall& call) {
  return {call.block_sums.const_data_ptr<acc_t>(), call.block_counts.const_data_ptr<int64_t>(),
          call.block_sums.numel(), call.mean.mutable_data_ptr<acc_t>(), call.denominator.mutable_data_ptr<acc_t>()};
}

// The rim's grid-line logits into out, after the tiles' kernel (at least one tile: the rim
// holds a grid row of every plane, so at least one block); with final, the CE mean too.
template <typename scalar_t, typename acc_t>
void launch_rim(const CeGeometry<acc_t>& geo, const TileRim<acc_t>& rim, scalar_t* out, cudaStream_t stream,
                const acc_t* sum_weight = nullptr, const CeMeanFinal<acc_t>& final = {}) {
  const int64_t count = static_cast<int64_t>(geo.N) * geo.C * rim_pixels(rim, geo.h, geo.w);
  const int64_t blocks = std::min<int64_t>((count + kThreads - 1) / kThreads, 65535LL * 8);
  if (count < (int64_t{1} << 30))  // item + the grid's stride (at most 2^29) below 2^31
    ce_backward_rim_kernel<scalar_t, acc_t, int32_t>
        <<<blocks, kThreads, 0, stream>>>(geo, rim, static_cast<int32_t>(count), out, sum_weight, final);
  else
    ce_backward_rim_kernel<scalar_t, acc_t, int64_t>
        <<<blocks, kThreads, 0, stream>>>(geo, rim, count, out, sum_weight, final);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename label_t>
void backward_typed(const CeBackwardCall& call, int64_t ignore_index, int64_t shared_budget) {
  using acc_t = typename AccType<scalar_t>::type;
  const at::Tensor& logits = call.logits;
  auto geo = make_ce_geometry<acc_t>(logits.size(0), logits.size(1), logits.size(2), logits.size(3),
                                     call.labels.size(1), call.labels.size(2));
  const auto kernel = ce_backward_kernel<scalar_t, label_t, acc_t>;
  // the plan is within the budget (prepare); above 48 KiB a kernel must opt in (the seed's
  // heads do), to the budget: the same value whichever call sets it
  if (call.plan.shared_bytes > kCeSharedBytes) allow_shared_bytes(reinterpret_cast<const void*>(kernel), shared_budget);
  scalar_t* grad_logits = call.grad_logits.mutable_data_ptr<scalar_t>();
  const acc_t* grad_sum = data_or_null<acc_t>(call.grad_sum);
  const acc_t* sum_weight = data_or_null<acc_t>(call.sum_weight);
  const acc_t* sum_divisor = data_or_null<acc_t>(call.sum_divisor);
  const acc_t* grad_scale = data_or_null<acc_t>(call.grad_scale);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (!call.sum_only) {  // the gather, or where *sum_weight is not 0 its blocks the weighted sum
    const TileRim<acc_t> rim = tile_rim_of<acc_t>(call.rim, logits, call.plan);
    kernel<<<ce_backward_blocks(geo, call.plan), kThreads, call.plan.shared_bytes, stream>>>(
        geo, call.plan, logits.const_data_ptr<scalar_t>(), call.labels.const_data_ptr<label_t>(),
        call.grad_loss.const_data_ptr<acc_t>(), call.grad_stride, call.lse.const_data_ptr<acc_t>(), ignore_index,
        grad_logits, rim, grad_sum, sum_weight, sum_divisor, grad_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_rim(geo, rim, grad_logits, stream, sum_weight);  // returns at once likewise
    return;
  }
  const int64_t count = logits.numel();
  const int64_t blocks = std::min<int64_t>((ce_weighted_sum_items(count) + kThreads - 1) / kThreads, 65535LL * 8);
  ce_weighted_sum_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(count, grad_sum, sum_weight, grad_scale,
                                                                          sum_divisor, grad_logits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename label_t>
void forward_grad_typed(const CeForwardGradCall& call, int64_t ignore_index, int64_t shared_budget) {
  using acc_t = typename AccType<scalar_t>::type;
  const CeForwardCall& forward = call.forward;
  const auto geo = make_ce_geometry<acc_t>(forward.logits.size(0), forward.logits.size(1), forward.logits.size(2),
                                           forward.logits.size(3), forward.labels.size(1), forward.labels.size(2));
  const auto kernel = ce_forward_grad_kernel<scalar_t, label_t, acc_t>;
  if (call.plan.shared_bytes > kCeSharedBytes) allow_shared_bytes(reinterpret_cast<const void*>(kernel), shared_budget);
  const TileRim<acc_t> rim = tile_rim_of<acc_t>(call.rim, forward.logits, call.plan);
  acc_t* grad_sum = call.grad_sum.mutable_data_ptr<acc_t>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<ce_backward_blocks(geo, call.plan), kThreads, call.plan.shared_bytes, stream>>>(
      geo, call.plan, forward.logits.const_data_ptr<scalar_t>(), forward.labels.const_data_ptr<label_t>(),
      ignore_index, grad_pixels<acc_t>(call),
      forward.loss.mutable_data_ptr<acc_t>(), forward.lse.mutable_data_ptr<acc_t>(),
      forward.block_sums.mutable_data_ptr<acc_t>(), forward.block_counts.mutable_data_ptr<int64_t>(), grad_sum, rim);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_rim(geo, rim, grad_sum, stream, static_cast<const acc_t*>(nullptr), mean_final<acc_t>(forward));
}

template <typename acc_t>
void mean_typed(const CeForwardCall& call) {
  ce_mean_final_kernel<acc_t><<<1, kSumThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(mean_final<acc_t>(call));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> upsample_ce_forward_cuda(const at::Tensor& logits,
                                                                                    const at::Tensor& labels,
                                                                                    int64_t ignore_index,
                                                                                    bool with_mean) {
  const CeForwardCall call = prepare_ce_forward(logits, labels, with_mean);
  c10::cuda::CUDAGuard guard(logits.device());
  if (call.plan.band != 0) {
#define BISENET_CE_FORWARD(scalar_t, label_t) forward_typed<scalar_t, label_t>(call, ignore_index)
    BISENET_CE_DISPATCH(call.logits, call.labels, BISENET_CE_FORWARD);
#undef BISENET_CE_FORWARD
  }
  if (with_mean) {
    if (call.loss.scalar_type() == at::kDouble) mean_typed<double>(call);
    else mean_typed<float>(call);
  }
  return {call.loss, call.lse, call.mean, call.denominator};
}

// A backward tile's budget: the most shared memory the logits' GPU allows a block,
// kCeMaxSharedBytes at most (logits elsewhere: prepare names the devices before it is used).
int64_t tile_shared_budget(const at::Tensor& logits) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        logits.is_cuda() ? logits.get_device() : c10::cuda::current_device()));
  return std::min<int64_t>(kCeMaxSharedBytes, optin);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> upsample_ce_forward_grad_cuda(
    const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, int64_t band, int64_t chunk,
    std::optional<double> threshold) {
  const int64_t shared_budget = tile_shared_budget(logits);
  const CeForwardGradCall call = prepare_ce_forward_grad(logits, labels, band, chunk, shared_budget, threshold);
  c10::cuda::CUDAGuard guard(logits.device());
  if (call.plan.band != 0) {  // its rim launch writes the mean
#define BISENET_CE_FORWARD_GRAD(scalar_t, label_t) forward_grad_typed<scalar_t, label_t>(call, ignore_index, shared_budget)
    BISENET_CE_DISPATCH(call.forward.logits, call.forward.labels, BISENET_CE_FORWARD_GRAD);
#undef BISENET_CE_FORWARD_GRAD
  } else if (call.forward.loss.scalar_type() == at::kDouble) {  // no pixel: the mean of none
    mean_typed<double>(call.forward);
  } else {
    mean_typed<float>(call.forward);
  }
  const CeForwardCall& forward = call.forward;
  return {forward.loss, forward.lse, forward.mean, forward.denominator, call.grad_sum};
}

at::Tensor upsample_ce_backward_cuda(const std::optional<at::Tensor>& grad_loss, const at::Tensor& logits,
                                     const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index,
                                     int64_t band, int64_t chunk, const std::optional<at::Tensor>& grad_sum,
                                     const std::optional<at::Tensor>& sum_weight,
                                     const std::optional<at::Tensor>& grad_scale,
                                     const std::optional<at::Tensor>& sum_divisor) {
  const int64_t shared_budget = tile_shared_budget(logits);
  const CeBackwardCall call = prepare_ce_backward(grad_loss, logits, labels, lse, band, chunk, shared_budget,
                                                  {grad_sum, sum_weight, grad_scale, sum_divisor});
  if (call.plan.band == 0 && !call.sum_only) return call.grad_logits;
  c10::cuda::CUDAGuard guard(logits.device());
#define BISENET_CE_BACKWARD(scalar_t, label_t) backward_typed<scalar_t, label_t>(call, ignore_index, shared_budget)
  BISENET_CE_DISPATCH(call.logits, call.labels, BISENET_CE_BACKWARD);
#undef BISENET_CE_BACKWARD
  return call.grad_logits;
}

// The blocks of a cooperative launch of `kernel`, `wanted` at most: every one must be resident
// at once (a grid.sync() waits for all), so at most what the device holds of it.
int64_t cooperative_blocks(const void* kernel, size_t shared_bytes, int64_t wanted, const at::Tensor& on) {
  const int device = on.get_device();
  int cooperative = 0, sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  TORCH_CHECK(cooperative, "ohem_weights: the selection is one cooperative launch, which ", on.device(),
              " does not support");
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int per_sm = resident_blocks_per_sm(kernel, shared_bytes);
  TORCH_CHECK(per_sm > 0, "ohem_weights: no block of the selection's kernel fits on ", on.device());
  return std::min<int64_t>(wanted, static_cast<int64_t>(per_sm) * sms);
}

template <typename acc_t, typename label_t>
void ohem_weights_typed(const OhemCall& call, int64_t ignore_index) {
  OhemArgs<acc_t, label_t> args;
  args.loss = call.loss.const_data_ptr<acc_t>();
  args.labels = call.labels.const_data_ptr<label_t>();
  args.pixels = call.loss.numel();
  args.ignore_index = ignore_index;
  args.min_kept = call.min_kept;
  args.threshold = static_cast<acc_t>(call.threshold);
  args.scratch = call.scratch.mutable_data_ptr<int64_t>();
  args.scratch_size = call.scratch.numel();
  args.state = call.state.mutable_data_ptr<int64_t>();
  args.counts = call.counts.mutable_data_ptr<int64_t>();
  args.class_counts = call.classes > 0 ? call.class_counts.mutable_data_ptr<int64_t>() : nullptr;
  args.classes = call.classes;
  args.class_weights = call.classes > 0 ? call.class_weights.const_data_ptr<acc_t>() : nullptr;
  args.weights = call.weights.mutable_data_ptr<acc_t>();
  args.block_sums = call.block_sums.mutable_data_ptr<acc_t>();
  args.sum_blocks = call.block_sums.numel();  // sum_blocks(pixels): the weights pass's logical blocks
  args.hard_weight = call.hard_weight.mutable_data_ptr<acc_t>();
  args.value = call.value.mutable_data_ptr<acc_t>();
  const void* kernel = reinterpret_cast<const void*>(call.classes > 0 ? ohem_select_kernel<acc_t, label_t, true>
                                                                        : ohem_select_kernel<acc_t, label_t, false>);
  const size_t bins_bytes = 2 * static_cast<size_t>(call.classes) * sizeof(unsigned int);  // <= 32 KB (kOhemMaxClasses)
  const int64_t blocks = cooperative_blocks(kernel, bins_bytes, args.sum_blocks, call.loss);
  void* params[] = {&args};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), params,
                                             bins_bytes, c10::cuda::getCurrentCUDAStream()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ohem_weights_cuda(const at::Tensor& loss, const at::Tensor& labels,
                                                                 int64_t ignore_index, double threshold,
                                                                 int64_t min_kept,
                                                                 const std::optional<at::Tensor>& class_weights) {
  const OhemCall call = prepare_ohem_weights(loss, labels, threshold, min_kept, class_weights);
  if (call.loss.numel() == 0)  // no pixel: k = 0, the hard branch (none hard) as on the CPU
    return {call.weights, call.value.zero_(), call.hard_weight.fill_(call.classes > 0 ? 0.0 : 1.0)};
  c10::cuda::CUDAGuard guard(loss.device());
#define BISENET_OHEM_WEIGHTS(acc_t, label_t) ohem_weights_typed<acc_t, label_t>(call, ignore_index)
  BISENET_OHEM_DISPATCH(call.loss, call.labels, BISENET_OHEM_WEIGHTS);
#undef BISENET_OHEM_WEIGHTS
  return {call.weights, call.value, call.hard_weight};
}

}  // namespace
}  // namespace bisenet

TORCH_LIBRARY_IMPL(bisenet_cuda, CUDA, m) {
  m.impl("upsample_ce_forward", &bisenet::upsample_ce_forward_cuda);
  m.impl("upsample_ce_backward", &bisenet::upsample_ce_backward_cuda);
  m.impl("upsample_ce_forward_grad", &bisenet::upsample_ce_forward_grad_cuda);
  m.impl("ohem_weights", &bisenet::ohem_weights_cuda);
}
