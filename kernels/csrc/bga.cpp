// Operator registration of the fused BGA gating, and its C++ CPU loops.
//
//   bisenet_cuda::bga_forward(detail_keep, sem_up, detail_down, sem_keep) -> out
//   bisenet_cuda::bga_backward(grad_out, detail_keep, sem_up, detail_down, sem_keep,
//                              tile_h=0, tile_w=0, lanes=0)
//       -> (grad_detail_keep, grad_sem_up, grad_detail_down, grad_sem_keep)
//   bisenet_cuda::bga_backward_plan(size, low_size, channels_last, dtype, tile_h=0, tile_w=0,
//                                   lanes=0)
//       -> [group, tile_h, tile_w, window_capacity, row_capacity, shared_bytes,
//           most_window_items, most_row_items, walk, rim_entries, low_res_written, lanes]
//
// detail_keep / grad_out (N, C, H, W), the others (N, C, h, w). Outputs are in
// detail_keep's memory format (channels_last when detail_keep is channels_last and not
// also plain contiguous, else NCHW); inputs in another format are copied into it.
// tile_h / tile_w (low-res pixels) override the backward's tiling (0: automatic); the
// tests use them to put tile borders everywhere. lanes: the channels a channels_last walk
// item takes, 0 walk_lanes' choice (bga_math.h), 1 one, 2 two (an error where walk_lanes
// would not take two); the tests and kernels.bench --tiles compare them. The backward's
// plan (tile, buffer capacities, shared bytes, channels per block, walk or window, the
// walk's lanes; bga_math.h) and its rim workspace are made here once for both devices, so a
// tiling over the kernel's shared-memory budget is the same error on the CPU as on the GPU;
// bga_backward_plan shows it (size = (N, C, H, W), low_size = (h, w)) with the most
// elements any tile of it needs and how many low-res pixels are written (by the tiles inside
// their grid lines, then by the rim pass: each once, h * w), for the tests' sweep of sizes.
//
// The CPU implementations run the same per-item functions (bga_math.h) as the CUDA
// kernels, in the same tiling, with the same arithmetic (same_bits.h), so testing them on a
// CPU checks the kernels' numbers bit for bit; the CPU loop also checks every tile's
// buffers against the plan's capacities.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bga_op.h"

namespace bisenet {

namespace {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Every side below kSideLimit (bilinear.h): the geometry's and the tiles' int arithmetic stays
// below 2^31.
void check_sides(const char* op, at::IntArrayRef high, at::IntArrayRef low) {
  TORCH_CHECK(sides_below_limit(high) && sides_below_limit(low), op, ": sides of 2^30 or more are not supported, got ",
              high, " and ", low);
}

void check_inputs(const char* op, const at::Tensor& detail_keep, const at::Tensor& sem_up,
                  const at::Tensor& detail_down, const at::Tensor& sem_keep) {
  const at::Tensor* low[] = {&sem_up, &detail_down, &sem_keep};
  const char* low_names[] = {"sem_up", "detail_down", "sem_keep"};
  TORCH_CHECK(detail_keep.dim() == 4, op, ": detail_keep must be 4D (N, C, H, W), got ", detail_keep.sizes());
  TORCH_CHECK(at::isFloatingType(detail_keep.scalar_type()), op, ": detail_keep must be floating point, got ",
              detail_keep.scalar_type());
  TORCH_CHECK(detail_keep.size(2) > 0 && detail_keep.size(3) > 0, op, ": detail_keep has an empty plane ",
              detail_keep.sizes());
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& t = *low[i];
    TORCH_CHECK(t.dim() == 4, op, ": ", low_names[i], " must be 4D (N, C, h, w), got ", t.sizes());
    TORCH_CHECK(t.size(0) == detail_keep.size(0) && t.size(1) == detail_keep.size(1), op, ": ", low_names[i],
                " ", t.sizes(), " and detail_keep ", detail_keep.sizes(), " differ in N or C");
    TORCH_CHECK(t.sizes() == sem_up.sizes(), op, ": ", low_names[i], " ", t.sizes(), " and sem_up ",
                sem_up.sizes(), " differ");
    TORCH_CHECK(t.size(2) > 0 && t.size(3) > 0, op, ": ", low_names[i], " has an empty plane ", t.sizes());
    TORCH_CHECK(t.scalar_type() == detail_keep.scalar_type(), op, ": ", low_names[i], " is ", t.scalar_type(),
                " but detail_keep is ", detail_keep.scalar_type());
    TORCH_CHECK(t.device() == detail_keep.device(), op, ": ", low_names[i], " is on ", t.device(),
                " but detail_keep is on ", detail_keep.device());
  }
  check_sides(op, detail_keep.sizes(), sem_up.sizes());
}

at::MemoryFormat output_format(const at::Tensor& detail_keep) {
  if (!detail_keep.is_contiguous() && detail_keep.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

// Channels per backward block, at most: one in NCHW (threads along W), 16 in channels_last
// (threads along C, walking along the rows; 16 channels are a full 32-byte sector in 16-bit
// types). The plan halves it where a large upscale leaves no tile that fits.
int channel_group(at::MemoryFormat format, int64_t channels) {
  if (format != at::MemoryFormat::ChannelsLast) return 1;
  return static_cast<int>(std::min<int64_t>(channels, 16));
}

template <typename scalar_t>
using acc_of = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

// The CUDA forward kernels' threads one after the other: the gate pass, then the items of
// call.vector outputs.
template <typename scalar_t>
void forward_cpu_typed(const BgaForwardCall& call) {
  using acc_t = acc_of<scalar_t>;
  auto geo = call_geometry<acc_t>(call);
  const scalar_t* keep = call.detail_keep.const_data_ptr<scalar_t>();
  const scalar_t* up = call.sem_up.const_data_ptr<scalar_t>();
  acc_t* gated = call.gated.mutable_data_ptr<acc_t>();
  scalar_t* result = call.out.mutable_data_ptr<scalar_t>();
  const scalar_t* detail_down = call.detail_down.const_data_ptr<scalar_t>();
  const scalar_t* sem_keep = call.sem_keep.const_data_ptr<scalar_t>();
  const bool reversed = cpu_items_reversed();
  for_items(call.gated.numel(), reversed, [&](int64_t offset) { bga_gate_item(offset, detail_down, sem_keep, gated); });
  constexpr int kVec = 16 / sizeof(scalar_t);
  // the launch's index type (bga.cu): 32 bits and the dividers below 2^30 outputs
  const bool small =
      !cpu_wide_index() && call.out.numel() < (int64_t{1} << 30) && call.gated.numel() < (int64_t{1} << 31);
  for_items(call.out.numel() / call.vector, reversed, [&](int64_t vec) {
    if (call.vector == kVec && small)
      bga_forward_item<scalar_t, acc_t, kVec, int32_t>(static_cast<int32_t>(vec), geo, call.channels_last, keep, up,
                                                       gated, result);
    else if (call.vector == kVec)
      bga_forward_item<scalar_t, acc_t, kVec, int64_t>(vec, geo, call.channels_last, keep, up, gated, result);
    else if (small)
      bga_forward_item<scalar_t, acc_t, 1, int32_t>(static_cast<int32_t>(vec), geo, call.channels_last, keep, up,
                                                    gated, result);
    else
      bga_forward_item<scalar_t, acc_t, 1, int64_t>(vec, geo, call.channels_last, keep, up, gated, result);
  });
}

// Whether t's data starts on a multiple of `bytes` (a vector of that size reads it aligned).
bool starts_on(const at::Tensor& t, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes == 0;
}

// The walk's lanes for the op's `lanes` argument (see the file comment): 0 walk_lanes' choice,
// 1, or 2 where walk_lanes would take two.
int chosen_lanes(const char* op, const BgaBackwardPlan& plan, int64_t lanes, int64_t channels, int64_t element_size,
                 bool aligned) {
  TORCH_CHECK(lanes >= 0 && lanes <= 2, op, ": lanes must be 0 (automatic), 1 or 2, got ", lanes);
  const int automatic = walk_lanes(plan, channels, element_size, aligned);
  TORCH_CHECK(lanes != 2 || automatic == 2, op, ": 2 lanes need channels_last 16-bit data, an even C, channel "
              "groups of 16 and the tensors on 4 bytes");
  return lanes == 0 ? automatic : static_cast<int>(lanes);
}

// The backward's plan for these sizes (see the file comment); raises when it cannot launch.
template <typename acc_t>
BgaBackwardPlan backward_plan(const BgaGeometry<acc_t>& geo, int group, bool walk, int64_t tile_h, int64_t tile_w) {
  // explicit tile sides (0: the plan's) below kTileLimit (bilinear.h)
  TORCH_CHECK(tile_h >= 0 && tile_w >= 0 && tile_h < kTileLimit && tile_w < kTileLimit,
              "bga_backward: tile sizes must be in [0, 2^20), got ", tile_h, "x", tile_w);
  BgaBackwardPlan plan;
  const BgaPlanStatus status = plan_backward(geo, group, walk, static_cast<int>(tile_h), static_cast<int>(tile_w),
                                             kBgaSharedBytes, &plan);
  TORCH_CHECK(status != BgaPlanStatus::kUpscaleTooLarge, "bga_backward: upscale from ", geo.h, "x", geo.w, " to ",
              geo.H, "x", geo.W, " is too large for the kernel's shared memory");
  TORCH_CHECK(status == BgaPlanStatus::kOk, "bga_backward: tile ", plan.tile_h, "x", plan.tile_w, " needs ",
              plan.shared_bytes, " bytes of shared memory, more than the kernel's ", kBgaSharedBytes);
  return plan;
}

// The CUDA backward kernels' blocks, one after the other; "threads" are the item loops (in
// either order: same_bits.h, cpu_items_reversed); the buffers have the plan's capacities,
// which every tile is checked against.
template <typename scalar_t>
void backward_cpu_typed(const BgaBackwardCall& call) {
  using acc_t = acc_of<scalar_t>;
  const BgaBackwardPlan& plan = call.plan;
  const int group = plan.group;
  auto geo = call_geometry<acc_t>(call);
  std::vector<acc_t> window_grad(static_cast<size_t>(plan.window_capacity));
  std::vector<acc_t> window_sem_grad(window_grad.size());
  std::vector<acc_t> row_grad(static_cast<size_t>(plan.row_capacity));
  std::vector<acc_t> row_sem_grad(row_grad.size());
  // the walk's column table and step 2's tables, in the kernel the window buffers' room
  // (window_capacity checks them)
  std::vector<BgaWalkColumn<acc_t>> walk_columns(
      plan.walk ? static_cast<size_t>(plan.window_capacity / walk_column_elements<acc_t>()) : 0);
  std::vector<BgaYRow<acc_t>> y_table(static_cast<size_t>(2 * plan.window_capacity * sizeof(acc_t) /
                                                          sizeof(BgaYRow<acc_t>) + 1));
  const BgaBackwardData<scalar_t> data = backward_data<scalar_t>(call);
  const TileRim<acc_t> rim = backward_rim<acc_t>(call);
  const int groups = (geo.C + group - 1) / group;
  const int tiles = rim.tiles_y * rim.tiles_x;
  const bool reversed = cpu_items_reversed();
  for_items(static_cast<int64_t>(geo.N) * groups * tiles, reversed, [&](int64_t block) {  // (n, group, tile)
    const int tile = static_cast<int>(block % tiles), group_index = static_cast<int>(block / tiles % groups);
    const BgaTile t = make_tile(geo, static_cast<int>(block / tiles / groups), group_index, group, tile / rim.tiles_x,
                                tile % rim.tiles_x, plan.tile_h, plan.tile_w);
    if (reversed)  // shared memory holds no earlier values: an entry read before it is written gives NaN
      for (std::vector<acc_t>* buffer : {&window_grad, &window_sem_grad, &row_grad, &row_sem_grad})
        std::fill(buffer->begin(), buffer->end(), std::numeric_limits<acc_t>::quiet_NaN());
    const int64_t window_items = tile_window_items<acc_t>(t, group, plan.walk);
    const int64_t room = tile_room_elements(t, geo, group, plan.walk);
    const int64_t row_items = tile_row_items(t, geo, group);
    TORCH_CHECK(room <= plan.window_capacity && row_items <= plan.row_capacity, "bga_backward: tile (", t.tile_y,
                ", ", t.tile_x, ") needs ", room, " window and ", row_items, " row elements, the plan has room for ",
                plan.window_capacity, " and ", plan.row_capacity);
    if (plan.walk) {
      if (reversed)  // as unwritten shared memory: 0xFF bytes (i0 -1, weights NaN)
        std::memset(static_cast<void*>(walk_columns.data()), 0xFF, walk_columns.size() * sizeof(walk_columns[0]));
      for_items(t.x1 - t.x0, reversed,
                [&](int64_t item) { walk_column_item(static_cast<int>(item), t, geo, walk_columns.data()); });
      for_items(tile_walk_items(t, group, plan.lanes), reversed, [&](int64_t item) {
        if (plan.lanes == 2)
          backward_walk_item<scalar_t, acc_t, 2>(static_cast<int>(item), group, t, geo, data, walk_columns.data(),
                                                 row_grad.data(), row_sem_grad.data());
        else
          backward_walk_item<scalar_t, acc_t, 1>(static_cast<int>(item), group, t, geo, data, walk_columns.data(),
                                                 row_grad.data(), row_sem_grad.data());
      });
    } else {
      for_items(window_items, reversed, [&](int64_t item) {
        backward_window_item<scalar_t, acc_t>(static_cast<int>(item), group, t, geo, data, window_grad.data(),
                                              window_sem_grad.data());
      });
      for_items(row_items, reversed, [&](int64_t item) {
        backward_xpass_item<acc_t>(static_cast<int>(item), group, t, geo, window_grad.data(), window_sem_grad.data(),
                                   row_grad.data(), row_sem_grad.data());
      });
    }
    if (reversed)  // as unwritten shared memory
      std::memset(static_cast<void*>(y_table.data()), 0xFF, y_table.size() * sizeof(y_table[0]));
    for_items(tile_y_table_items(t, geo), reversed,
              [&](int64_t item) { y_table_item(static_cast<int>(item), t, geo, y_table.data()); });
    for_items(tile_low_items(t, geo, group), reversed, [&](int64_t item) {
      backward_ypass_item<scalar_t, acc_t>(static_cast<int>(item), group, t, geo, y_table.data(), row_grad.data(),
                                           row_sem_grad.data(), data, rim);
    });
  });
  for_items(geo.N * rim_pixels(rim, geo.h, geo.w) * geo.C, reversed,
            [&](int64_t item) { backward_rim_item<scalar_t, acc_t, int64_t>(item, call.channels_last, geo, rim, data); });
}

}  // namespace

BgaForwardCall prepare_bga_forward(const at::Tensor& detail_keep, const at::Tensor& sem_up,
                                   const at::Tensor& detail_down, const at::Tensor& sem_keep) {
  check_inputs("bga_forward", detail_keep, sem_up, detail_down, sem_keep);
  const at::MemoryFormat format = output_format(detail_keep);
  BgaForwardCall call;
  call.detail_keep = detail_keep.contiguous(format);
  call.sem_up = sem_up.contiguous(format);
  call.detail_down = detail_down.contiguous(format);
  call.sem_keep = sem_keep.contiguous(format);
  const at::ScalarType acc = detail_keep.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  call.gated = at::empty(sem_up.sizes(), sem_up.options().dtype(acc).memory_format(format));
  call.out = at::empty(detail_keep.sizes(), detail_keep.options().memory_format(format));
  call.channels_last = format == at::MemoryFormat::ChannelsLast;
  // 16-byte vectors along the fastest dimension where it divides into them and every tensor
  // a vector touches starts on one (sem_up and gated only in channels_last, where they are
  // read as vectors too: 32 bytes of float for 8 bf16)
  const int64_t vector = 16 / detail_keep.element_size();
  const int64_t fastest = call.channels_last ? detail_keep.size(1) : detail_keep.size(3);
  bool vectorise = fastest % vector == 0 && starts_on(call.detail_keep, 16) && starts_on(call.out, 16);
  if (call.channels_last)
    vectorise = vectorise && starts_on(call.sem_up, 16) && starts_on(call.gated, vector * call.gated.element_size());
  call.vector = vectorise ? static_cast<int>(vector) : 1;
  return call;
}

BgaBackwardCall prepare_bga_backward(const at::Tensor& grad_out, const at::Tensor& detail_keep,
                                     const at::Tensor& sem_up, const at::Tensor& detail_down,
                                     const at::Tensor& sem_keep, int64_t tile_h, int64_t tile_w, int64_t lanes) {
  check_inputs("bga_backward", detail_keep, sem_up, detail_down, sem_keep);
  TORCH_CHECK(grad_out.sizes() == detail_keep.sizes(), "bga_backward: grad_out ", grad_out.sizes(),
              " and detail_keep ", detail_keep.sizes(), " differ");
  TORCH_CHECK(grad_out.scalar_type() == detail_keep.scalar_type(), "bga_backward: grad_out is ",
              grad_out.scalar_type(), " but detail_keep is ", detail_keep.scalar_type());
  TORCH_CHECK(grad_out.device() == detail_keep.device(), "bga_backward: grad_out is on ", grad_out.device(),
              " but detail_keep is on ", detail_keep.device());
  // the walk's 32-bit offsets: within a high-res row up to 4 pixels past its end, and in
  // sem_up from its first tap row's start to the second row's last column, (2 w - 1) C
  TORCH_CHECK(detail_keep.size(1) * (detail_keep.size(3) + 4) < (int64_t{1} << 31) &&
                  2 * sem_up.size(1) * sem_up.size(3) < (int64_t{1} << 31),
              "bga_backward: rows of about 2^31 elements (C * W, or 2 C * w in sem_up) or more are not supported, got ",
              detail_keep.sizes(), " and ", sem_up.sizes());
  // NCHW's window items: 32-bit offsets within a plane
  TORCH_CHECK(detail_keep.size(2) * detail_keep.size(3) < (int64_t{1} << 31) &&
                  sem_up.size(2) * sem_up.size(3) < (int64_t{1} << 31),
              "bga_backward: planes of 2^31 elements (H * W) or more are not supported, got ", detail_keep.sizes());
  const at::MemoryFormat format = output_format(detail_keep);
  BgaBackwardCall call;
  call.grad_out = grad_out.contiguous(format);
  call.detail_keep = detail_keep.contiguous(format);
  call.sem_up = sem_up.contiguous(format);
  call.detail_down = detail_down.contiguous(format);
  call.sem_keep = sem_keep.contiguous(format);
  call.grad_detail_keep = at::empty(detail_keep.sizes(), detail_keep.options().memory_format(format));
  call.grad_sem_up = at::empty(sem_up.sizes(), sem_up.options().memory_format(format));
  call.grad_detail_down = at::empty(sem_up.sizes(), sem_up.options().memory_format(format));
  call.grad_sem_keep = at::empty(sem_up.sizes(), sem_up.options().memory_format(format));
  call.channels_last = format == at::MemoryFormat::ChannelsLast;
  call.empty = grad_out.numel() == 0;
  call.plan = BgaBackwardPlan{};
  if (call.empty) return call;
  const int group = channel_group(format, detail_keep.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, detail_keep.scalar_type(), "bga_backward_plan", [&] {
    using acc_t = acc_of<scalar_t>;
    call.plan = backward_plan(call_geometry<acc_t>(call), group, call.channels_last, tile_h, tile_w);
  });
  call.plan.lanes = chosen_lanes("bga_backward", call.plan, lanes, detail_keep.size(1), detail_keep.element_size(),
                                 starts_on(call.grad_out, 4) && starts_on(call.detail_keep, 4) &&
                                     starts_on(call.grad_detail_keep, 4) && starts_on(call.sem_up, 4));
  const at::ScalarType acc = detail_keep.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  call.rim = at::empty({tile_rim_elements(kBgaRimValues, static_cast<int>(sem_up.size(0)), static_cast<int>(sem_up.size(1)),
                                          static_cast<int>(sem_up.size(2)), static_cast<int>(sem_up.size(3)),
                                          call.plan.tile_h, call.plan.tile_w)},
                       sem_up.options().dtype(acc));
  return call;
}

namespace {

at::Tensor bga_forward_cpu(const at::Tensor& detail_keep, const at::Tensor& sem_up, const at::Tensor& detail_down,
                           const at::Tensor& sem_keep) {
  const BgaForwardCall call = prepare_bga_forward(detail_keep, sem_up, detail_down, sem_keep);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, detail_keep.scalar_type(), "bga_forward_cpu",
                                  [&] { forward_cpu_typed<scalar_t>(call); });
  return call.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bga_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& detail_keep, const at::Tensor& sem_up, const at::Tensor& detail_down,
    const at::Tensor& sem_keep, int64_t tile_h, int64_t tile_w, int64_t lanes) {
  const BgaBackwardCall call =
      prepare_bga_backward(grad_out, detail_keep, sem_up, detail_down, sem_keep, tile_h, tile_w, lanes);
  if (!call.empty) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, detail_keep.scalar_type(), "bga_backward_cpu",
                                    [&] { backward_cpu_typed<scalar_t>(call); });
  }
  return {call.grad_detail_keep, call.grad_sem_up, call.grad_detail_down, call.grad_sem_keep};
}

// The plan bga_backward would follow for these sizes, and the most elements any of its
// tiles needs in each buffer (walking the tiles as the kernel does).
std::vector<int64_t> bga_backward_plan_impl(at::IntArrayRef size, at::IntArrayRef low_size, bool channels_last,
                                            at::ScalarType dtype, int64_t tile_h, int64_t tile_w, int64_t lanes) {
  TORCH_CHECK(size.size() == 4 && low_size.size() == 2 && size[2] > 0 && size[3] > 0 && low_size[0] > 0 &&
                  low_size[1] > 0,
              "bga_backward_plan: size must be (N, C, H, W) and low_size (h, w), non-empty planes");
  TORCH_CHECK(at::isFloatingType(dtype), "bga_backward_plan: dtype must be floating point, got ", dtype);
  check_sides("bga_backward_plan", size, low_size);
  const int64_t hi_sizes[4] = {size[0], size[1], size[2], size[3]};
  const int64_t lo_sizes[4] = {size[0], size[1], low_size[0], low_size[1]};
  const int group = channel_group(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous, size[1]);
  std::vector<int64_t> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bga_backward_plan", [&] {
    using acc_t = acc_of<scalar_t>;
    const auto geo = make_geometry<acc_t>(hi_sizes, lo_sizes, channels_last);
    const BgaBackwardPlan plan = backward_plan(geo, group, channels_last, tile_h, tile_w);
    int64_t most_window = 0, most_row = 0, written = 0;
    for (int tile_y = 0; tile_y * plan.tile_h < geo.h; ++tile_y)
      for (int tile_x = 0; tile_x * plan.tile_w < geo.w; ++tile_x) {
        const BgaTile t = make_tile(geo, 0, 0, plan.group, tile_y, tile_x, plan.tile_h, plan.tile_w);
        most_window = std::max(most_window, tile_room_elements(t, geo, plan.group, plan.walk));
        most_row = std::max(most_row, tile_row_items(t, geo, plan.group));
        written += tile_finished_pixels(reached_rows(t, geo), reached_columns(t, geo), plan.tile_h, plan.tile_w);
      }
    written += rim_pixels(make_tile_rim<acc_t>(nullptr, 1, 1, geo.h, geo.w, plan.tile_h, plan.tile_w, false), geo.h, geo.w);
    result = {plan.group, plan.tile_h, plan.tile_w, plan.window_capacity, plan.row_capacity, plan.shared_bytes, most_window,
              most_row, plan.walk ? 1 : 0, plan.rim_entries, written,
              chosen_lanes("bga_backward_plan", plan, lanes, size[1], static_cast<int64_t>(sizeof(scalar_t)),
                           true)};  // (tensors on 4 bytes)
  });
  return result;
}

}  // namespace
}  // namespace bisenet

TORCH_LIBRARY_FRAGMENT(bisenet_cuda, m) {
  m.def("bga_forward(Tensor detail_keep, Tensor sem_up, Tensor detail_down, Tensor sem_keep) -> Tensor");
  m.def(
      "bga_backward(Tensor grad_out, Tensor detail_keep, Tensor sem_up, Tensor detail_down, Tensor sem_keep, "
      "int tile_h=0, int tile_w=0, int lanes=0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bga_backward_plan(int[] size, int[] low_size, bool channels_last, ScalarType dtype, int tile_h=0, "
      "int tile_w=0, int lanes=0) -> int[]",
      &bisenet::bga_backward_plan_impl);
}

// the CUDA implementations are registered in bga.cu
TORCH_LIBRARY_IMPL(bisenet_cuda, CPU, m) {
  m.impl("bga_forward", &bisenet::bga_forward_cpu);
  m.impl("bga_backward", &bisenet::bga_backward_cpu);
}
