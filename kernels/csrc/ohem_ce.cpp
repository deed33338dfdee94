// Operator registration of the fused upsample + cross-entropy loss, and its C++ CPU loops.
//
//   bisenet_cuda::upsample_ce_forward(logits, labels, ignore_index, with_mean=True) -> (loss, lse, mean, denominator)
//   bisenet_cuda::upsample_ce_backward(grad_loss, logits, labels, lse, ignore_index, band=0, chunk=0,
//                                      grad_sum=None, sum_weight=None, grad_scale=None) -> grad_logits
//   bisenet_cuda::upsample_ce_forward_grad(logits, labels, ignore_index, band=0, chunk=0, threshold=None)
//       -> (loss, lse, mean, denominator, grad_sum)
//   bisenet_cuda::upsample_ce_backward_plan(size, low_size, dtype, band=0, chunk=0, shared_budget=None,
//                                           forward=False)
//       -> [band, chunk, window_rows, window_cols, shared_bytes, most_rows, most_cols, most_staged,
//           outputs_written, most_parts, most_segment_items]
//   bisenet_cuda::upsample_ce_forward_plan(size, low_size, dtype)
//       -> [band, staged_rows, shared_bytes, most_staged, pixels_written]
//   bisenet_cuda::ohem_weights(loss, labels, ignore_index, threshold, min_kept, class_weights)
//       -> (weights, value, hard_weight)
//
// logits (N, C, h, w) float32/bfloat16/float16/float64, labels (N, H, W) int64 or uint8;
// loss, lse, grad_loss (N, H, W) float32 (float64 for float64 logits; grad_loss with all
// strides 0, one value expanded, is read as that value); mean, denominator () like loss: the
// mean of loss over the pixels whose label is not ignore_index (0 when none) and max(their
// count, 1), in a fixed order (ohem_ce_math.h: the CE mean; each forward block adds its
// pixels, one more launch its blocks); with with_mean=False (OHEM) not computed, (0,);
// grad_logits like logits (NCHW). Both kernels run over tiles planned here once for both devices
// (ohem_ce_math.h): the forward over bands of high-res rows, the backward over tiles of
// low-res rows and columns, then a pass over the logits on the tiles' grid lines (their
// partial sums in the rim workspace, bilinear.h); band, chunk (low-res rows and columns per
// backward block) override the backward's tiling (0: automatic), the tests use them to put
// tile borders everywhere. The backward's shared-memory budget is the device's (ohem_ce_math.h:
// kCeMaxSharedBytes; the CPU loops take that, as every sm_80+ GPU does); a tiling over it is the
// same error on the CPU as at launch. The *_plan ops show a plan (size = (N, C, H, W),
// low_size = (h, w); shared_budget: the backward's, None for kCeMaxSharedBytes) with the most
// any tile needs and how many outputs are written (each once: h * w, H * W); forward=True the
// forward with gradient's plan.
// upsample_ce_forward_grad (C <= 20): the forward's outputs with the mean, and grad_sum (N, C,
// h, w) like loss, the gradient of the counted pixels' summed losses, in one kernel over the
// backward's tiles (band, chunk as the backward's) with all classes in one pass, and the rim
// pass; loss and lse are upsample_ce_forward's bits, the mean its value up to the order of
// the sum. With a threshold grad_sum adds up only the hard pixels, loss > threshold (OHEM's).
// upsample_ce_backward's grad_scale (() like loss, on the device) multiplies the incoming
// gradient (grad_loss, and the weighted sum's); with grad_sum (like logits, in loss's dtype: a
// forward with gradient's) and sum_weight (() like loss, on the device), where sum_weight is
// not 0 (OHEM's hard branch), or where grad_loss is None (the CE mean's backward), the result
// is grad_sum times sum_weight times grad_scale and the gather is skipped (no host sync: its
// kernels read the weight), one elementwise kernel.
// ohem_weights: loss (N, H, W) float32/float64 (the per-pixel losses, 0 where ignored),
// labels as above, threshold = -log(thresh), min_kept < 0 for valid // 16 -> weights like
// loss and value = sum(weights * loss), the OHEM loss (ohem_ce_math.h; a sum in a fixed
// order); no host sync. class_weights (C,) like loss, optional: the kept
// pixels' class-weighted mean instead. hard_weight () like loss: each hard pixel's weight
// where the hard branch was taken without class weights, else 0 (ohem_ce_math.h:
// ohem_hard_weight).
//
// The CPU implementations run the same per-item functions (ohem_ce_math.h) as the CUDA
// kernels with the same arithmetic (same_bits.h), in the same tiling, with buffers of the
// plan's capacities (every tile checked against them), so testing them on a CPU checks the
// kernels' numbers bit for bit.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ohem_ce_op.h"

namespace bisenet {

namespace {

at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Every side below kSideLimit (bilinear.h): the tiles' int arithmetic stays below 2^31.
void check_sides(const char* op, at::IntArrayRef high, at::IntArrayRef low) {
  TORCH_CHECK(sides_below_limit(high) && sides_below_limit(low), op, ": sides of 2^30 or more are not supported, got ",
              high, " and ", low);
}

void check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 4, op, ": logits must be (N, C, h, w), got ", logits.sizes());
  TORCH_CHECK(labels.dim() == 3, op, ": labels must be (N, H, W), got ", labels.sizes());
  TORCH_CHECK(logits.size(0) == labels.size(0), op, ": logits ", logits.sizes(), " and labels ", labels.sizes(),
              " differ in N");
  TORCH_CHECK(logits.size(1) > 0 && logits.size(2) > 0 && logits.size(3) > 0, op, ": logits ", logits.sizes(),
              " has no class or an empty plane");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": logits must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kByte, op,
              ": labels must be int64 or uint8, got ", labels.scalar_type());
  TORCH_CHECK(logits.device() == labels.device(), op, ": logits are on ", logits.device(), " but labels on ",
              labels.device());
  TORCH_CHECK(logits.numel() < (int64_t{1} << 31) && labels.size(1) * labels.size(2) < (int64_t{1} << 31), op,
              ": sizes too large");  // 32-bit offsets inside a sample
  check_sides(op, labels.sizes(), logits.sizes());
}

void check_pixel_tensor(const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& logits,
                        const at::Tensor& labels) {
  TORCH_CHECK(tensor.sizes() == labels.sizes(), op, ": ", name, " ", tensor.sizes(), " and labels ", labels.sizes(),
              " differ");
  TORCH_CHECK(tensor.scalar_type() == acc_type(logits), op, ": ", name, " must be ", acc_type(logits), ", got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.device() == logits.device(), op, ": ", name, " is on ", tensor.device(), " but logits on ",
              logits.device());
}

template <typename acc_t>
CeGeometry<acc_t> ce_geometry(const at::Tensor& logits, const at::Tensor& labels) {
  return make_ce_geometry<acc_t>(logits.size(0), logits.size(1), logits.size(2), logits.size(3), labels.size(1),
                                 labels.size(2));
}

template <typename scalar_t>
using acc_of = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

// A block's tree (ohem_ce_math.h: sum_tree_step) over its threads' values, as the kernels'.
template <typename... value_t>
void sum_tree_cpu(std::vector<value_t>&... values) {
  for (int half = kSumThreads / 2; half > 0; half /= 2)
    for (int t = 0; t < half; ++t) (sum_tree_step(t, half, values.data()), ...);
}

// The CUDA kernel's blocks one after the other, its threads' pixels as a loop; the staged
// rows in a buffer of the plan's capacity, every tile checked against it. Phases the kernel
// runs side by side (the column taps beside the pixels' start) in either order, and each
// phase's items in either order (same_bits.h: cpu_items_reversed).
template <typename scalar_t, typename label_t>
void forward_cpu_typed(const CeForwardCall& call, int64_t ignore_index) {
  using acc_t = acc_of<scalar_t>;
  const CeForwardPlan& plan = call.plan;
  const auto geo = ce_geometry<acc_t>(call.logits, call.labels);
  const scalar_t* logits = call.logits.const_data_ptr<scalar_t>();
  const label_t* labels = call.labels.const_data_ptr<label_t>();
  acc_t* loss = call.loss.mutable_data_ptr<acc_t>();
  acc_t* lse = call.lse.mutable_data_ptr<acc_t>();
  const int64_t pixels = static_cast<int64_t>(geo.H) * geo.W;
  const int64_t plane = static_cast<int64_t>(geo.h) * geo.w;
  std::vector<double> shared((plan.shared_bytes + 7) / 8);  // 8-byte aligned, as the kernel's
  const CeForwardBuffers<acc_t> buf = ce_forward_buffers<acc_t>(reinterpret_cast<unsigned char*>(shared.data()), plan);
  std::vector<CeForwardPixel<acc_t>> states(kCeForwardBand * kCeForwardChunk);
  // the CE mean's part: each block's sum and count by its threads' tree, as the kernel's
  acc_t* block_sums = call.block_sums.numel() > 0 ? call.block_sums.mutable_data_ptr<acc_t>() : nullptr;
  int64_t* block_counts = call.block_counts.numel() > 0 ? call.block_counts.mutable_data_ptr<int64_t>() : nullptr;
  std::vector<acc_t> sums(kSumThreads);
  std::vector<int64_t> counts(kSumThreads);
  const bool reversed = cpu_items_reversed();
  for_items(ce_forward_blocks(geo, plan), reversed, [&](int64_t block) {
    const CeForwardTile t = ce_forward_tile(block, geo, plan);
    if (reversed)  // shared memory holds no earlier values: a read before a write gives NaN (ints -1)
      memset(shared.data(), 0xFF, shared.size() * sizeof(double));
    TORCH_CHECK(t.rows <= plan.staged_rows, "upsample_ce_forward: rows [", t.y0, ", ", t.y1, ") read ", t.rows,
                " low-res rows, the plan has room for ", plan.staged_rows);
    const scalar_t* sample = logits + t.n * geo.C * plane;
    const int cols = t.x1 - t.x0;
    const auto tables = [&] { for_items(cols, reversed, [&](int64_t x) { ce_forward_table_item(static_cast<int>(x), t, geo, buf); }); };
    const auto starts = [&] {
      for_items(ce_forward_pixels(t), reversed, [&](int64_t item) {
        states[item] = ce_forward_pixel_start<label_t, acc_t>(static_cast<int>(item), t, geo, labels + t.n * pixels,
                                                              ignore_index);
      });
    };
    if (reversed) { starts(); tables(); } else { tables(); starts(); }
    for (int c0 = 0; c0 < geo.C; c0 += kCeChunkClasses) {  // a chunk: stage, barrier, the pixels
      const int classes = ce_chunk_classes(c0, geo.C), groups = ce_chunk_groups(classes);
      for_items(static_cast<int64_t>(t.rows) * cols * groups, reversed, [&](int64_t item) {
        const int64_t row_item = item / groups;
        const int x = static_cast<int>(row_item % cols);
        ce_forward_stage_group<scalar_t, acc_t>(static_cast<int>(row_item / cols), x, buf.col_taps[x],
                                                static_cast<int>(item % groups), t, geo, sample, c0, buf.staged);
      });
      for_items(ce_forward_pixels(t), reversed, [&](int64_t item) {  // the kernel evaluates ignored pixels too
        if (states[item].label != -1) ce_forward_pixel_chunk(states[item], c0, classes, buf.staged);
      });
    }
    for_items(ce_forward_pixels(t), reversed, [&](int64_t item) {
      const int64_t p = t.n * pixels + ce_forward_pixel_offset(static_cast<int>(item), t, geo);
      ce_forward_pixel_finish(states[item], loss + p, lse + p);
    });
    if (block_sums == nullptr) return;
    for (int thread = 0; thread < kSumThreads; ++thread) {  // its slots thread + k * threads, in order
      sums[thread] = static_cast<acc_t>(0);
      counts[thread] = 0;
      for (int item = thread; item < ce_forward_pixels(t); item += kCeForwardThreads)
        ce_mean_add(states[item], loss[t.n * pixels + ce_forward_pixel_offset(item, t, geo)], &sums[thread],
                    &counts[thread]);
    }
    sum_tree_cpu(sums, counts);
    block_sums[block] = sums[0];
    block_counts[block] = counts[0];
  });
}

// The CE mean from the forward blocks' sums and counts, as the CUDA kernel's final block.
template <typename acc_t>
void mean_cpu_typed(const CeForwardCall& call) {
  const int64_t blocks = call.block_sums.numel();
  const acc_t* block_sums = call.block_sums.const_data_ptr<acc_t>();
  const int64_t* block_counts = call.block_counts.const_data_ptr<int64_t>();
  std::vector<acc_t> sums(kSumThreads);
  std::vector<int64_t> counts(kSumThreads);
  for (int t = 0; t < kSumThreads; ++t) {
    sums[t] = sum_blocks_part(t, blocks, block_sums);
    counts[t] = sum_blocks_part(t, blocks, block_counts);
  }
  sum_tree_cpu(sums, counts);
  ce_mean_finish(sums[0], counts[0], call.mean.mutable_data_ptr<acc_t>(), call.denominator.mutable_data_ptr<acc_t>());
}

// The blocks of a kernel over the backward's tiles (op's: the backward, the forward with
// gradient) one after the other, in either order: body(block, tile, buffers, base), "shared
// memory" one buffer of the plan's bytes (base) laid out as the kernel lays it out, each tile
// checked against the plan's capacities.
template <typename acc_t, typename Body>
void for_backward_tiles(const CeGeometry<acc_t>& geo, const CeBackwardPlan& plan, const char* op, bool reversed,
                        Body body) {
  std::vector<double> shared((plan.shared_bytes + 7) / 8);  // 8-byte aligned, as the kernel's
  unsigned char* base = reinterpret_cast<unsigned char*>(shared.data());
  const CeBackwardBuffers<acc_t> buf = ce_backward_buffers<acc_t>(base, plan);
  for_items(ce_backward_blocks(geo, plan), reversed, [&](int64_t block) {
    const CeTile t = ce_backward_tile(block, geo, plan);
    if (reversed)  // shared memory holds no earlier values: a read before a write gives NaN (ints -1)
      memset(shared.data(), 0xFF, shared.size() * sizeof(double));
    TORCH_CHECK(t.wy1 - t.wy0 <= plan.window_rows && t.wx1 - t.wx0 <= plan.window_cols && t.rows <= plan.band + 1 &&
                    (t.ly1 - t.ly0) * t.parts * (t.wx1 - t.wx0) <= plan.band * plan.part_cols,
                op, ": tile at low-res (", t.ly0, ", ", t.lx0, ") has a ", t.wy1 - t.wy0, "x", t.wx1 - t.wx0,
                " window reading ", t.rows, " rows, the plan has room for ", plan.window_rows, "x", plan.window_cols,
                " and ", plan.band + 1);
    body(block, t, buf, base);
  });
}

// The CUDA kernels' blocks one after the other; "threads" are the item loops, "shared
// memory" one buffer of the plan's bytes laid out as the kernel lays it out. Phases the
// kernel runs side by side (the tables beside the pixels, the next class's staging beside
// this class's outputs) in either order (same_bits.h: cpu_items_reversed).
template <typename scalar_t, typename label_t>
void backward_cpu_typed(const CeBackwardCall& call, int64_t ignore_index) {
  using acc_t = acc_of<scalar_t>;
  const at::Tensor& logits = call.logits;
  const CeBackwardPlan& plan = call.plan;
  auto geo = make_ce_geometry<acc_t>(logits.size(0), logits.size(1), logits.size(2), logits.size(3),
                                     call.labels.size(1), call.labels.size(2));
  const scalar_t* logit_data = logits.const_data_ptr<scalar_t>();
  const label_t* labels = call.labels.const_data_ptr<label_t>();
  const acc_t* lse = call.lse.const_data_ptr<acc_t>();
  scalar_t* out = call.grad_logits.mutable_data_ptr<scalar_t>();
  const acc_t grad_scale = ce_grad_scale(data_or_null<acc_t>(call.grad_scale));
  if (call.grad_sum.defined()) {  // the weighted sum's gradient where it is the gradient, no gather
    const acc_t* sum_weight = call.sum_weight.const_data_ptr<acc_t>();
    if (call.sum_only || ce_weighted_sum_taken(sum_weight)) {
      const acc_t* grad_sum = call.grad_sum.const_data_ptr<acc_t>();
      const int64_t count = logits.numel();
      const acc_t scale = ce_weighted_sum_scale(sum_weight, data_or_null<acc_t>(call.sum_divisor),
                                                data_or_null<acc_t>(call.grad_scale));
      for_items(ce_weighted_sum_items(count), false,
                [&](int64_t item) { ce_weighted_sum_item(item, count, grad_sum, scale, out); });
      return;
    }
  }
  const acc_t* grad_loss = call.grad_loss.const_data_ptr<acc_t>();
  const int64_t pixels = static_cast<int64_t>(geo.H) * geo.W;
  const int64_t plane = static_cast<int64_t>(geo.h) * geo.w;
  const TileRim<acc_t> rim = tile_rim_of<acc_t>(call.rim, call.logits, plan);
  const bool reversed = cpu_items_reversed();
  for_backward_tiles(geo, plan, "upsample_ce_backward", reversed, [&](int64_t, const CeTile& t,
                                                                       const CeBackwardBuffers<acc_t>& buf,
                                                                       unsigned char*) {
    const scalar_t* sample = logit_data + t.n * geo.C * plane;
    scalar_t* sample_out = out + t.n * geo.C * plane;
    const int cols = t.wx1 - t.wx0;
    const auto tables = [&] {
      for_items(ce_tile_tables(t, geo.w), reversed,
                [&](int64_t item) { ce_backward_table_item(static_cast<int>(item), t, geo, buf); });
    };
    const auto pixel_items = [&] {
      for_items(ce_tile_window(t), reversed, [&](int64_t item) {
        const CePixelLoad<acc_t> loaded = ce_backward_pixel_load<label_t, acc_t>(
            static_cast<int>(item), t, geo, labels + t.n * pixels, grad_loss + t.n * pixels * call.grad_stride,
            call.grad_stride, grad_scale, lse + t.n * pixels);
        ce_backward_pixel_store(loaded, static_cast<int>(item), geo.C, ignore_index, buf);
      });
    };
    const auto stage = [&](int c0) {
      for_items(static_cast<int64_t>(t.rows) * cols, reversed, [&](int64_t item) {
        ce_backward_stage_item<scalar_t, acc_t>(static_cast<int>(item / cols), static_cast<int>(item % cols), t, geo,
                                                sample, c0, ce_pass_classes(c0, geo.C), buf);
      });
    };
    const int outputs = ce_tile_outputs(t, geo.h, geo.w);
    const auto output_items = [&](int c0) {
      for_items(ce_pass_classes(c0, geo.C) * outputs, reversed, [&](int64_t item) {
        ce_backward_output_item<scalar_t, acc_t>(static_cast<int>(item), outputs, c0, t, geo, buf, rim, sample_out);
      });
    };
    const auto segment_items = [&](auto segment_item) {
      for_items(static_cast<int64_t>(ce_tile_segments(t)) * cols, reversed,
                [&](int64_t item) { segment_item(static_cast<int>(item / cols), static_cast<int>(item % cols)); });
    };
    if (reversed) { pixel_items(); tables(); } else { tables(); pixel_items(); }
    stage(0);
    for (int c0 = 0; c0 < geo.C; c0 += kCePassClasses) {
      const int next = c0 + ce_pass_classes(c0, geo.C);
      if (next - c0 == kCePassClasses)
        segment_items([&](int kq, int x) { ce_backward_segment_item<kCePassClasses>(kq, x, c0, t, buf); });
      else
        segment_items([&](int kq, int x) { ce_backward_segment_item<1>(kq, x, c0, t, buf); });
      for_items(static_cast<int64_t>(next - c0) * ce_tile_columns(t, geo.h), reversed,
                [&](int64_t item) { ce_backward_column_item(static_cast<int>(item), t, geo.h, buf); });
      if (reversed && next < geo.C) stage(next);  // the next pass's staging beside this pass's outputs
      output_items(c0);
      if (!reversed && next < geo.C) stage(next);
    }
  });
  const int64_t rim_items = geo.N * geo.C * rim_pixels(rim, geo.h, geo.w);
  for_items(rim_items, reversed, [&](int64_t item) { ce_backward_rim_item<scalar_t, acc_t, int64_t>(item, geo, rim, out); });
}

// The forward with gradient's kernel (ohem_ce.cu) as loops, as backward_cpu_typed: blocks
// one after the other; each "thread"'s segment items in its order (item = thread + 256 k),
// its CE mean sums as the kernel thread's, then the block's tree.
template <typename scalar_t, typename label_t>
void forward_grad_cpu_typed(const CeForwardGradCall& call, int64_t ignore_index) {
  using acc_t = acc_of<scalar_t>;
  const CeForwardCall& forward = call.forward;
  const CeBackwardPlan& plan = call.plan;
  const auto geo = ce_geometry<acc_t>(forward.logits, forward.labels);
  const scalar_t* logit_data = forward.logits.const_data_ptr<scalar_t>();
  const label_t* labels = forward.labels.const_data_ptr<label_t>();
  acc_t* loss = forward.loss.mutable_data_ptr<acc_t>();
  acc_t* lse = forward.lse.mutable_data_ptr<acc_t>();
  acc_t* block_sums = forward.block_sums.mutable_data_ptr<acc_t>();
  int64_t* block_counts = forward.block_counts.mutable_data_ptr<int64_t>();
  acc_t* out = call.grad_sum.mutable_data_ptr<acc_t>();
  const CeGradPixels<acc_t> which = grad_pixels<acc_t>(call);
  const int64_t pixels = static_cast<int64_t>(geo.H) * geo.W;
  const int64_t plane = static_cast<int64_t>(geo.h) * geo.w;
  const TileRim<acc_t> rim = tile_rim_of<acc_t>(call.rim, forward.logits, plan);
  const bool reversed = cpu_items_reversed();
  for_backward_tiles(geo, plan, "upsample_ce_forward_grad", reversed, [&](int64_t block, const CeTile& t,
                                                                           const CeBackwardBuffers<acc_t>& buf,
                                                                           unsigned char* base) {
    const scalar_t* sample = logit_data + t.n * geo.C * plane;
    const int cols = t.wx1 - t.wx0, groups = ce_chunk_groups(geo.C);
    const auto tables = [&] {
      for_items(ce_tile_tables(t, geo.w), reversed,
                [&](int64_t item) { ce_backward_table_item(static_cast<int>(item), t, geo, buf); });
    };
    const auto pixel_items = [&] {
      for_items(ce_tile_window(t), reversed, [&](int64_t item) {
        ce_fused_pixel_item<label_t, acc_t>(static_cast<int>(item), t, geo, labels + t.n * pixels, ignore_index, buf);
      });
    };
    if (reversed) { pixel_items(); tables(); } else { tables(); pixel_items(); }
    for_items(static_cast<int64_t>(t.rows) * groups * cols, reversed, [&](int64_t item) {
      const int rg = static_cast<int>(item / cols);
      ce_fused_stage_item<scalar_t, acc_t>(rg / groups, rg % groups, static_cast<int>(item % cols), t, geo, sample,
                                           buf);
    });
    const CeMeanTree<acc_t> tree = ce_fused_mean_tree<acc_t>(base, plan);
    const int segment_items = ce_tile_segments(t) * cols;
    for_items(kCeBackwardThreads, reversed, [&](int64_t thread) {
      acc_t mean_sum = static_cast<acc_t>(0);
      int64_t mean_count = 0;
      for (int item = static_cast<int>(thread); item < segment_items; item += kCeBackwardThreads)
        ce_fused_segment_item(item / cols, item % cols, t, geo, buf, which, loss + t.n * pixels, lse + t.n * pixels,
                              &mean_sum, &mean_count);
      tree.sums[thread] = mean_sum;
      tree.counts[thread] = mean_count;
    });
    for_items(static_cast<int64_t>(geo.C) * ce_tile_columns(t, geo.h), reversed,
              [&](int64_t item) { ce_backward_column_item(static_cast<int>(item), t, geo.h, buf); });
    const int outputs = ce_tile_outputs(t, geo.h, geo.w);
    for_items(static_cast<int64_t>(geo.C) * outputs, reversed, [&](int64_t item) {
      ce_backward_output_item<acc_t, acc_t>(static_cast<int>(item), outputs, 0, t, geo, buf, rim, out + t.n * geo.C * plane);
    });
    for (int half = kSumThreads / 2; half > 0; half /= 2)
      for (int thread = 0; thread < half; ++thread) {
        sum_tree_step(thread, half, tree.sums);
        sum_tree_step(thread, half, tree.counts);
      }
    block_sums[block] = tree.sums[0];
    block_counts[block] = tree.counts[0];
  });
  const int64_t rim_items = geo.N * geo.C * rim_pixels(rim, geo.h, geo.w);
  for_items(rim_items, reversed, [&](int64_t item) { ce_backward_rim_item<acc_t, acc_t, int64_t>(item, geo, rim, out); });
}

// The backward's plan for these sizes (see the file comment), all classes in one pass for the
// forward with gradient; raises when it cannot launch.
template <typename acc_t>
CeBackwardPlan backward_plan(const CeGeometry<acc_t>& geo, int64_t band, int64_t chunk, int64_t shared_budget,
                             bool forward = false) {
  const char* op = forward ? "upsample_ce_forward_grad" : "upsample_ce_backward";
  TORCH_CHECK(band >= 0 && chunk >= 0 && band < kTileLimit && chunk < kTileLimit, op,
              ": band and chunk must be in [0, 2^20), got ", band, " and ", chunk);
  CeBackwardPlan plan;
  const bool fits = plan_ce_backward(geo, static_cast<int>(band), static_cast<int>(chunk), shared_budget, &plan,
                                     forward ? kCeChunkClasses : kCePassClasses);
  TORCH_CHECK(fits, op, ": a tile of ", plan.band, "x", plan.chunk, " low-res pixels (", geo.h, "x",
              geo.w, " to ", geo.H, "x", geo.W, ") needs ", plan.shared_bytes,
              " bytes of shared memory, more than a block may take here (", shared_budget, ")");
  return plan;
}

// The forward's plan into call; returns its block count.
template <typename acc_t>
int64_t plan_forward(CeForwardCall& call) {
  const auto geo = ce_geometry<acc_t>(call.logits, call.labels);
  call.plan = plan_ce_forward(geo);
  return ce_forward_blocks(geo, call.plan);
}

// A backward-tiled call's plan (the backward's, or forward: the forward with gradient's) for
// logits and labels in their accumulation type, and its block count into *blocks where given.
CeBackwardPlan tile_plan(const at::Tensor& logits, const at::Tensor& labels, int64_t band, int64_t chunk,
                         int64_t shared_budget, bool forward, int64_t* blocks = nullptr) {
  const auto plan_for = [&](auto geo) {
    const CeBackwardPlan plan = backward_plan(geo, band, chunk, shared_budget, forward);
    if (blocks != nullptr) *blocks = ce_backward_blocks(geo, plan);
    return plan;
  };
  if (acc_type(logits) == at::kDouble) return plan_for(ce_geometry<double>(logits, labels));
  return plan_for(ce_geometry<float>(logits, labels));
}

// The rim workspace of a backward-tiled call (bilinear.h: TileRim), in the logits' accumulation type.
at::Tensor rim_workspace(const at::Tensor& logits, const CeBackwardPlan& plan) {
  return at::empty({tile_rim_elements(1, static_cast<int>(logits.size(0)), static_cast<int>(logits.size(1)),
                                      static_cast<int>(logits.size(2)), static_cast<int>(logits.size(3)), plan.band,
                                      plan.chunk)},
                   logits.options().dtype(acc_type(logits)));
}

}  // namespace

CeForwardCall prepare_ce_forward(const at::Tensor& logits, const at::Tensor& labels, bool with_mean) {
  check_inputs("upsample_ce_forward", logits, labels);
  CeForwardCall call;
  call.logits = logits.contiguous();
  call.labels = labels.contiguous();
  const auto acc_options = logits.options().dtype(acc_type(logits));
  call.loss = at::empty(labels.sizes(), acc_options);
  call.lse = at::empty(labels.sizes(), acc_options);
  call.mean = with_mean ? at::empty({}, acc_options) : at::empty({0}, acc_options);
  call.denominator = at::empty_like(call.mean);
  call.plan = CeForwardPlan{};  // band 0: nothing to compute
  int64_t blocks = 0;
  if (labels.numel() > 0)
    blocks = acc_type(logits) == at::kDouble ? plan_forward<double>(call) : plan_forward<float>(call);
  // the CE mean's workspace: one sum and count per forward block
  call.block_sums = at::empty({with_mean ? blocks : 0}, acc_options);
  call.block_counts = at::empty({with_mean ? blocks : 0}, acc_options.dtype(at::kLong));
  return call;
}

// A 0-dim tensor in lse's dtype on logits' device, or one naming what it is not.
void check_scale(const char* name, const at::Tensor& scale, const at::Tensor& logits) {
  TORCH_CHECK(scale.dim() == 0 && scale.scalar_type() == acc_type(logits) && scale.device() == logits.device(),
              "upsample_ce_backward: ", name, " must be a 0-dim ", acc_type(logits), " on ", logits.device(), ", got ",
              scale.scalar_type(), " ", scale.sizes(), " on ", scale.device());
}

CeBackwardCall prepare_ce_backward(const std::optional<at::Tensor>& grad_loss, const at::Tensor& logits,
                                   const at::Tensor& labels, const at::Tensor& lse, int64_t band, int64_t chunk,
                                   int64_t shared_budget, const CeBackwardScales& scales) {
  check_inputs("upsample_ce_backward", logits, labels);
  check_pixel_tensor("upsample_ce_backward", "lse", lse, logits, labels);
  if (grad_loss.has_value()) check_pixel_tensor("upsample_ce_backward", "grad_loss", *grad_loss, logits, labels);
  TORCH_CHECK(scales.grad_sum.has_value() == scales.sum_weight.has_value(),
              "upsample_ce_backward: grad_sum and sum_weight come together");
  TORCH_CHECK(grad_loss.has_value() || scales.grad_sum.has_value(),
              "upsample_ce_backward: without grad_loss, grad_sum and sum_weight are the gradient");
  CeBackwardCall call;
  if (scales.grad_sum.has_value()) {
    const at::Tensor& grad_sum = *scales.grad_sum;
    TORCH_CHECK(grad_sum.sizes() == logits.sizes() && grad_sum.scalar_type() == acc_type(logits) &&
                    grad_sum.device() == logits.device(),
                "upsample_ce_backward: grad_sum must be ", acc_type(logits), " ", logits.sizes(), " on ",
                logits.device(), " like logits, got ", grad_sum.scalar_type(), " ", grad_sum.sizes(), " on ",
                grad_sum.device());
    check_scale("sum_weight", *scales.sum_weight, logits);
    call.grad_sum = grad_sum.contiguous();
    // its vectors aligned (ohem_ce_math.h: ce_weighted_sum_item), as a new tensor's are
    const auto vector_bytes = static_cast<uintptr_t>(kCeSumVec * call.grad_sum.element_size());
    if (reinterpret_cast<uintptr_t>(call.grad_sum.const_data_ptr()) % vector_bytes != 0)
      call.grad_sum = call.grad_sum.clone();
    call.sum_weight = *scales.sum_weight;
  }
  if (scales.grad_scale.has_value()) {
    check_scale("grad_scale", *scales.grad_scale, logits);
    call.grad_scale = *scales.grad_scale;
  }
  if (scales.sum_divisor.has_value()) {
    TORCH_CHECK(scales.sum_weight.has_value(),
                "upsample_ce_backward: sum_divisor divides sum_weight, which is missing");
    check_scale("sum_divisor", *scales.sum_divisor, logits);
    call.sum_divisor = *scales.sum_divisor;
  }
  call.logits = logits.contiguous();
  call.labels = labels.contiguous();
  call.lse = lse.contiguous();
  call.grad_logits = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  call.plan = CeBackwardPlan{};  // band 0: nothing to gather
  if (labels.numel() == 0) {  // an empty batch, or no pixel: no gradient
    call.grad_logits.zero_();
    return call;
  }
  call.sum_only = !grad_loss.has_value();
  if (call.sum_only) return call;
  const auto strides = grad_loss->strides();
  if (grad_loss->numel() > 0 && std::all_of(strides.begin(), strides.end(), [](int64_t s) { return s == 0; })) {
    call.grad_loss = grad_loss->as_strided({1}, {1});  // the one value, not H * W copies of it
    call.grad_stride = 0;
  } else {
    call.grad_loss = grad_loss->contiguous();
  }
  call.plan = tile_plan(logits, labels, band, chunk, shared_budget, false);
  call.rim = rim_workspace(logits, call.plan);
  return call;
}

CeForwardGradCall prepare_ce_forward_grad(const at::Tensor& logits, const at::Tensor& labels, int64_t band,
                                          int64_t chunk, int64_t shared_budget, std::optional<double> threshold) {
  check_inputs("upsample_ce_forward_grad", logits, labels);
  TORCH_CHECK(logits.size(1) <= kCeFusedMostClasses, "upsample_ce_forward_grad: logits ", logits.sizes(), " have ",
              logits.size(1), " classes, at most ", kCeFusedMostClasses, " are taken in one pass");
  CeForwardGradCall call;
  call.hard_only = threshold.has_value();
  call.threshold = threshold.value_or(0.0);
  CeForwardCall& forward = call.forward;
  forward.logits = logits.contiguous();
  forward.labels = labels.contiguous();
  const auto acc_options = logits.options().dtype(acc_type(logits));
  forward.loss = at::empty(labels.sizes(), acc_options);
  forward.lse = at::empty(labels.sizes(), acc_options);
  forward.mean = at::empty({}, acc_options);
  forward.denominator = at::empty_like(forward.mean);
  forward.plan = CeForwardPlan{};
  call.grad_sum = at::empty(logits.sizes(), acc_options);
  call.plan = CeBackwardPlan{};  // band 0: nothing to compute
  int64_t blocks = 0;
  if (labels.numel() == 0) {
    call.grad_sum.zero_();
  } else {
    call.plan = tile_plan(logits, labels, band, chunk, shared_budget, true, &blocks);
    call.rim = rim_workspace(logits, call.plan);
  }
  forward.block_sums = at::empty({blocks}, acc_options);
  forward.block_counts = at::empty({blocks}, acc_options.dtype(at::kLong));
  return call;
}

OhemCall prepare_ohem_weights(const at::Tensor& loss, const at::Tensor& labels, double threshold, int64_t min_kept,
                              const std::optional<at::Tensor>& class_weights) {
  TORCH_CHECK(loss.dim() == 3 && (loss.scalar_type() == at::kFloat || loss.scalar_type() == at::kDouble),
              "ohem_weights: loss must be (N, H, W) float32 or float64, got ", loss.sizes(), " ", loss.scalar_type());
  TORCH_CHECK(labels.sizes() == loss.sizes(), "ohem_weights: labels ", labels.sizes(), " and loss ", loss.sizes(),
              " differ");
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kByte,
              "ohem_weights: labels must be int64 or uint8, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == loss.device(), "ohem_weights: labels are on ", labels.device(), " but loss on ",
              loss.device());
  OhemCall call;
  call.loss = loss.contiguous();
  call.labels = labels.contiguous();
  call.weights = at::empty_like(call.loss);
  call.value = at::empty({}, call.loss.options());
  call.hard_weight = at::empty({}, call.loss.options());
  call.block_sums = at::empty({sum_blocks(call.loss.numel())}, call.loss.options());
  call.threshold = threshold;
  call.min_kept = min_kept;
  if (class_weights.has_value()) {
    const at::Tensor& weights = *class_weights;
    TORCH_CHECK(weights.dim() == 1 && weights.numel() >= 1 && weights.numel() <= kOhemMaxClasses,
                "ohem_weights: class_weights must be (C,) with 1 <= C <= ", kOhemMaxClasses, ", got ", weights.sizes());
    TORCH_CHECK(weights.scalar_type() == loss.scalar_type() && weights.device() == loss.device(),
                "ohem_weights: class_weights must be ", loss.scalar_type(), " on ", loss.device(), " like loss, got ",
                weights.scalar_type(), " on ", weights.device());
    call.classes = static_cast<int>(weights.numel());
    call.class_weights = weights.contiguous();
  }
  const int64_t passes = loss.element_size();  // ohem_passes: 8 bits a pass
  call.scratch = at::empty({kOhemStateSize + 256 * passes + 2 * call.classes}, loss.options().dtype(at::kLong));
  call.state = call.scratch.narrow(0, 0, kOhemStateSize);
  call.counts = call.scratch.narrow(0, kOhemStateSize, 256 * passes).view({passes, 256});
  if (call.classes > 0) call.class_counts = call.scratch.narrow(0, kOhemStateSize + 256 * passes, 2 * call.classes);
  return call;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> upsample_ce_forward_cpu(const at::Tensor& logits,
                                                                                   const at::Tensor& labels,
                                                                                   int64_t ignore_index,
                                                                                   bool with_mean) {
  const CeForwardCall call = prepare_ce_forward(logits, labels, with_mean);
  if (call.plan.band != 0) {
#define BISENET_CE_FORWARD(scalar_t, label_t) forward_cpu_typed<scalar_t, label_t>(call, ignore_index)
    BISENET_CE_DISPATCH(call.logits, call.labels, BISENET_CE_FORWARD);
#undef BISENET_CE_FORWARD
  }
  if (with_mean) {
    if (call.loss.scalar_type() == at::kDouble) mean_cpu_typed<double>(call);
    else mean_cpu_typed<float>(call);
  }
  return {call.loss, call.lse, call.mean, call.denominator};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> upsample_ce_forward_grad_cpu(
    const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, int64_t band, int64_t chunk,
    std::optional<double> threshold) {
  const CeForwardGradCall call = prepare_ce_forward_grad(logits, labels, band, chunk, kCeMaxSharedBytes, threshold);
  if (call.plan.band != 0) {
#define BISENET_CE_FORWARD_GRAD(scalar_t, label_t) forward_grad_cpu_typed<scalar_t, label_t>(call, ignore_index)
    BISENET_CE_DISPATCH(call.forward.logits, call.forward.labels, BISENET_CE_FORWARD_GRAD);
#undef BISENET_CE_FORWARD_GRAD
  }
  if (call.forward.loss.scalar_type() == at::kDouble) mean_cpu_typed<double>(call.forward);
  else mean_cpu_typed<float>(call.forward);
  const CeForwardCall& forward = call.forward;
  return {forward.loss, forward.lse, forward.mean, forward.denominator, call.grad_sum};
}

at::Tensor upsample_ce_backward_cpu(const std::optional<at::Tensor>& grad_loss, const at::Tensor& logits,
                                    const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index, int64_t band,
                                    int64_t chunk, const std::optional<at::Tensor>& grad_sum,
                                    const std::optional<at::Tensor>& sum_weight,
                                    const std::optional<at::Tensor>& grad_scale,
                                    const std::optional<at::Tensor>& sum_divisor) {
  const CeBackwardCall call = prepare_ce_backward(grad_loss, logits, labels, lse, band, chunk, kCeMaxSharedBytes,
                                                  {grad_sum, sum_weight, grad_scale, sum_divisor});
  if (call.plan.band == 0 && !call.sum_only) return call.grad_logits;
#define BISENET_CE_BACKWARD(scalar_t, label_t) backward_cpu_typed<scalar_t, label_t>(call, ignore_index)
  BISENET_CE_DISPATCH(call.logits, call.labels, BISENET_CE_BACKWARD);
#undef BISENET_CE_BACKWARD
  return call.grad_logits;
}

// The CUDA kernel's steps (ohem_ce.cu: ohem_select_kernel) one after the other, as loops.
template <typename acc_t, typename label_t>
void ohem_weights_cpu_typed(const OhemCall& call, int64_t ignore_index) {
  const acc_t* loss = call.loss.const_data_ptr<acc_t>();
  const label_t* labels = call.labels.const_data_ptr<label_t>();
  acc_t* weights = call.weights.mutable_data_ptr<acc_t>();
  int64_t* state = call.state.mutable_data_ptr<int64_t>();
  int64_t* counts = call.counts.mutable_data_ptr<int64_t>();
  const int64_t pixels = call.loss.numel();
  const acc_t threshold = static_cast<acc_t>(call.threshold);
  const int passes = ohem_passes<acc_t>();
  for (int pass = 0; pass < passes && (pass == 0 || !state[kOhemUseHard]); ++pass) {
    const int shift = 8 * (passes - 1 - pass);
    int64_t* pass_counts = counts + 256 * pass;
    const int64_t prefix = state[kOhemPrefix];
    for (int64_t p = 0; p < pixels; ++p) {
      const bool valid = static_cast<int64_t>(labels[p]) != ignore_index;
      if (pass == 0) {
        state[kOhemValid] += valid;
        state[kOhemHard] += valid && loss[p] > threshold;
      }
      const int digit = valid ? ohem_digit(ohem_key(loss[p]), prefix, shift) : -1;
      if (digit >= 0) ++pass_counts[digit];
    }
    if (pass == 0) ohem_setup(state, call.min_kept);
    if (!state[kOhemUseHard]) ohem_pick_digit(pass_counts, shift, state);
  }
  *call.hard_weight.mutable_data_ptr<acc_t>() = ohem_hard_weight<acc_t>(state, call.classes > 0);
  // the weights pass, its fixed-order sum of weight x loss as the kernel's (its sum_blocks
  // logical blocks, then block 0 over their sums)
  const auto weights_pass = [&](auto weight_of) {
    const int64_t blocks = call.block_sums.numel();
    acc_t* block_sums = call.block_sums.mutable_data_ptr<acc_t>();
    std::vector<acc_t> sums(kSumThreads);
    for (int64_t b = 0; b < blocks; ++b) {
      for (int t = 0; t < kSumThreads; ++t)
        sums[t] = ohem_weights_pixels(b * kSumThreads + t, blocks * kSumThreads, pixels, loss, labels, weights,
                                      weight_of);
      sum_tree_cpu(sums);
      block_sums[b] = sums[0];
    }
    for (int t = 0; t < kSumThreads; ++t) sums[t] = sum_blocks_part(t, blocks, block_sums);
    sum_tree_cpu(sums);
    *call.value.mutable_data_ptr<acc_t>() = sums[0];
  };
  if (call.classes == 0) {
    const OhemWeightValues<acc_t> values = ohem_weight_values<acc_t>(state);
    weights_pass([&](acc_t value, label_t label) {
      const bool valid = static_cast<int64_t>(label) != ignore_index;
      return ohem_pixel_weight(ohem_pick(value, valid, threshold, state), values);
    });
    return;
  }
  int64_t* class_counts = call.class_counts.mutable_data_ptr<int64_t>();
  const acc_t* class_weights = call.class_weights.const_data_ptr<acc_t>();
  for (int64_t p = 0; p < pixels; ++p) {
    const bool valid = static_cast<int64_t>(labels[p]) != ignore_index;
    const int64_t slot = ohem_class_slot(ohem_pick(loss[p], valid, threshold, state), labels[p], call.classes);
    if (slot >= 0) ++class_counts[slot];
  }
  const acc_t total = ohem_class_total(class_weights, class_counts, call.classes, state);
  weights_pass([&](acc_t value, label_t label) {
    return ohem_class_pixel_weight(value, label, static_cast<int64_t>(label) != ignore_index, threshold, state,
                                   class_weights, call.classes, total);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ohem_weights_cpu(const at::Tensor& loss, const at::Tensor& labels,
                                                                int64_t ignore_index, double threshold,
                                                                int64_t min_kept,
                                                                const std::optional<at::Tensor>& class_weights) {
  const OhemCall call = prepare_ohem_weights(loss, labels, threshold, min_kept, class_weights);
  call.scratch.zero_();  // (the CUDA kernel zeroes it first thing)
#define BISENET_OHEM_WEIGHTS(acc_t, label_t) ohem_weights_cpu_typed<acc_t, label_t>(call, ignore_index)
  BISENET_OHEM_DISPATCH(call.loss, call.labels, BISENET_OHEM_WEIGHTS);
#undef BISENET_OHEM_WEIGHTS
  return {call.weights, call.value, call.hard_weight};
}

// The plan upsample_ce_backward would follow for these sizes, the most any of its tiles needs
// (walking the tiles as the kernel does) and how many low-res outputs are written: by the
// tiles inside their grid lines, then by the rim pass on them.
template <typename acc_t>
std::vector<int64_t> backward_plan_numbers(at::IntArrayRef size, at::IntArrayRef low_size, int64_t band,
                                           int64_t chunk, int64_t shared_budget, bool forward) {
  auto geo = make_ce_geometry<acc_t>(size[0], size[1], low_size[0], low_size[1], size[2], size[3]);
  const CeBackwardPlan plan = backward_plan(geo, band, chunk, shared_budget, forward);
  geo.N = 1;  // the tiles of one sample
  int64_t most_rows = 0, most_cols = 0, most_staged = 0, written = 0, most_parts = 0, most_items = 0;
  for (int64_t block = 0; block < ce_backward_blocks(geo, plan); ++block) {
    const CeTile t = ce_backward_tile(block, geo, plan);
    most_rows = std::max<int64_t>(most_rows, t.wy1 - t.wy0);
    most_cols = std::max<int64_t>(most_cols, t.wx1 - t.wx0);
    most_staged = std::max<int64_t>(most_staged, t.rows);
    most_parts = std::max<int64_t>(most_parts, t.parts);
    most_items = std::max<int64_t>(most_items, static_cast<int64_t>(ce_tile_segments(t)) * (t.wx1 - t.wx0));
    written += tile_finished_pixels(ce_reached_rows(t, geo.h), ce_reached_cols(t, geo.w), plan.band, plan.chunk);
  }
  written += rim_pixels(make_tile_rim<acc_t>(nullptr, 1, 1, geo.h, geo.w, plan.band, plan.chunk, false), geo.h, geo.w);
  return {plan.band, plan.chunk, plan.window_rows, plan.window_cols, plan.shared_bytes, most_rows, most_cols,
          most_staged, written, most_parts, most_items};
}

void check_plan_sizes(const char* op, at::IntArrayRef size, at::IntArrayRef low_size) {
  TORCH_CHECK(size.size() == 4 && low_size.size() == 2 && size[2] > 0 && size[3] > 0 && low_size[0] > 0 &&
                  low_size[1] > 0,
              op, ": size must be (N, C, H, W) and low_size (h, w), non-empty planes");
  check_sides(op, size, low_size);
}

std::vector<int64_t> upsample_ce_backward_plan(at::IntArrayRef size, at::IntArrayRef low_size, at::ScalarType dtype,
                                               int64_t band, int64_t chunk, std::optional<int64_t> shared_budget,
                                               bool forward) {
  check_plan_sizes("upsample_ce_backward_plan", size, low_size);
  const int64_t budget = shared_budget.value_or(kCeMaxSharedBytes);
  TORCH_CHECK(budget > 0 && budget <= kCeMaxSharedBytes, "upsample_ce_backward_plan: shared_budget must be in (0, ",
              kCeMaxSharedBytes, "], got ", budget);
  if (dtype == at::kDouble) return backward_plan_numbers<double>(size, low_size, band, chunk, budget, forward);
  return backward_plan_numbers<float>(size, low_size, band, chunk, budget, forward);
}

// The plan upsample_ce_forward follows for these sizes, the most low-res rows any of its tiles
// reads and how many high-res pixels the tiles of one sample write (H * W when each is
// written once).
template <typename acc_t>
std::vector<int64_t> forward_plan_numbers(at::IntArrayRef size, at::IntArrayRef low_size) {
  auto geo = make_ce_geometry<acc_t>(1, size[1], low_size[0], low_size[1], size[2], size[3]);
  const CeForwardPlan plan = plan_ce_forward(geo);
  int64_t most_staged = 0, written = 0;
  for (int64_t block = 0; block < ce_forward_blocks(geo, plan); ++block) {
    const CeForwardTile t = ce_forward_tile(block, geo, plan);
    most_staged = std::max<int64_t>(most_staged, t.rows);
    written += ce_forward_pixels(t);
  }
  return {plan.band, plan.staged_rows, plan.shared_bytes, most_staged, written};
}

std::vector<int64_t> upsample_ce_forward_plan(at::IntArrayRef size, at::IntArrayRef low_size, at::ScalarType dtype) {
  check_plan_sizes("upsample_ce_forward_plan", size, low_size);
  if (dtype == at::kDouble) return forward_plan_numbers<double>(size, low_size);
  return forward_plan_numbers<float>(size, low_size);
}

}  // namespace
}  // namespace bisenet

TORCH_LIBRARY_FRAGMENT(bisenet_cuda, m) {
  m.def("upsample_ce_forward(Tensor logits, Tensor labels, int ignore_index, bool with_mean=True) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "upsample_ce_backward(Tensor? grad_loss, Tensor logits, Tensor labels, Tensor lse, int ignore_index, int band=0, "
      "int chunk=0, Tensor? grad_sum=None, Tensor? sum_weight=None, Tensor? grad_scale=None, "
      "Tensor? sum_divisor=None) -> Tensor");
  m.def("upsample_ce_backward_plan(int[] size, int[] low_size, ScalarType dtype, int band=0, int chunk=0, "
        "int? shared_budget=None, bool forward=False) -> int[]",
        &bisenet::upsample_ce_backward_plan);
  m.def("upsample_ce_forward_plan(int[] size, int[] low_size, ScalarType dtype) -> int[]",
        &bisenet::upsample_ce_forward_plan);
  m.def("upsample_ce_forward_grad(Tensor logits, Tensor labels, int ignore_index, int band=0, int chunk=0, "
        "float? threshold=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ohem_weights(Tensor loss, Tensor labels, int ignore_index, float threshold, int min_kept, "
        "Tensor? class_weights=None) -> (Tensor, Tensor, Tensor)");
}

// the CUDA implementations are registered in ohem_ce.cu
TORCH_LIBRARY_IMPL(bisenet_cuda, CPU, m) {
  m.impl("upsample_ce_forward", &bisenet::upsample_ce_forward_cpu);
  m.impl("upsample_ce_backward", &bisenet::upsample_ce_backward_cpu);
  m.impl("upsample_ce_forward_grad", &bisenet::upsample_ce_forward_grad_cpu);
  m.impl("ohem_weights", &bisenet::ohem_weights_cpu);
}
