// The arithmetic of the fused Bilateral Guided Aggregation (BiSeNetV2's BGA gating):
//   out = detail_keep * sigmoid(up(sem_up)) + up(detail_down * sigmoid(sem_keep))
// with `up` bilinear (align_corners=False) from the low-res (h, w) to the high-res (H, W).
//
// Everything here is __host__ __device__: the CUDA kernels (bga.cu) run these functions
// with one thread per item, the C++ CPU loops (bga.cpp) run the very same functions in a
// serial loop, so the CPU tests check the kernels' arithmetic and their tiling.
//
// Backward as a deterministic gather (no atomics). The adjoint of `up` sends high-res row y
// to its two taps i0(y), i1(y); since i0 is non-decreasing in y, the high-res rows feeding
// low-res row i are the contiguous range of rows with i0 in {i - 1, i}. The low-res plane
// is cut into tiles; a tile's "window" is every high-res pixel whose taps touch the tile,
// and it "owns" (writes grad_detail_keep for) the high-res pixels whose i0 lies in the
// tile, so every high-res pixel is written exactly once. Per tile:
//   1. window items: per high-res pixel, grad_detail_keep (if owned) and the two values
//      to scatter back, g and g * detail_keep * s * (1 - s) with s = sigmoid(up(sem_up));
//   2. x-pass items: per (window row, low-res column) the weighted sum along x;
//   3. y-pass items: per low-res pixel the weighted sum along y, then the three
//      low-res gradients.
// Items are numbered channel-group-fastest: with one channel per group (NCHW) consecutive
// window items walk along x, with several channels per group (channels_last) along C, so
// consecutive CUDA threads touch consecutive addresses in both memory formats. The x-pass
// items walk down the window rows (then along the tile's columns), and for channel groups
// under 16 the shared buffers have odd pitches (buffer_pitch: a window row of
// odd(window width) pixels, an x-pass column of odd(window height) rows): consecutive
// x-pass and y-pass threads then read addresses an odd multiple of the group apart, in
// distinct banks (along the tile's columns they were about one upscale factor apart: 4-way
// bank conflicts at x4 in NCHW). A padding pixel or row is written as zeros, never read.
#pragma once

#include <math.h>
#include <stdint.h>

#include "bilinear.h"

namespace bisenet {

// Sizes and element strides. All high-res tensors (detail_keep, grad_out, out,
// grad_detail_keep) share one set of strides, all low-res tensors the other.
template <typename acc_t>
struct BgaGeometry {
  int N, C, H, W;  // high-res
  int h, w;        // low-res
  int64_t hi_sn, hi_sc, hi_sy, hi_sx;
  int64_t lo_sn, lo_sc, lo_sy, lo_sx;
  acc_t scale_y, scale_x;  // in / out, as ATen computes them
};

// detail_down * sigmoid(sem_keep) at one low-res offset.
template <typename scalar_t, typename acc_t>
BISENET_HD acc_t gated_detail(const scalar_t* detail_down, const scalar_t* sem_keep, int64_t offset) {
  return load_acc<scalar_t, acc_t>(detail_down, offset) *
         sigmoid_acc(load_acc<scalar_t, acc_t>(sem_keep, offset));
}

// Forward, pass 1, one item per low-res element (a dense tensor: the item is the offset):
// detail_down * sigmoid(sem_keep), kept in acc_t for pass 2, so each low-res element's
// sigmoid is taken once, not once for every high-res pixel that reads it (16 at x4).
template <typename scalar_t, typename acc_t>
BISENET_HD void bga_gate_item(int64_t offset, const scalar_t* detail_down, const scalar_t* sem_keep, acc_t* gated) {
  gated[offset] = gated_detail<scalar_t, acc_t>(detail_down, sem_keep, offset);
}

// Forward, pass 2: the output at high-res (n, c, y, x). sem_up_plane and gated_plane point
// at (n, c) of tensors with the low-res strides sy, sx.
template <typename scalar_t, typename acc_t>
BISENET_HD acc_t bga_forward_value(acc_t detail_keep, const scalar_t* sem_up_plane, const acc_t* gated_plane,
                                   int64_t sy, int64_t sx, const Taps<acc_t>& ty, const Taps<acc_t>& tx) {
  acc_t sem_gate = sigmoid_acc(bilinear_sample<scalar_t, acc_t>(sem_up_plane, sy, sx, ty, tx));
  return fma_acc(detail_keep, sem_gate, bilinear_sample<acc_t, acc_t>(gated_plane, sy, sx, ty, tx));
}

// ---------------------------------------------------------------------------------------
// Backward tiling.

// One block of work: low-res tile [ly0, ly1) x [lx0, lx1) of channels [c0, c0 + groups)
// of sample n, and its high-res window [wy0, wy1) x [wx0, wx1) of which it owns
// [own_y0, wy1) x [own_x0, wx1).
struct BgaTile {
  int n, c0, channels;  // channels: how many of the group's `group` slots are real
  int ly0, ly1, lx0, lx1;
  int wy0, wy1, wx0, wx1;
  int own_y0, own_x0;
};

template <typename acc_t>
BISENET_HD BgaTile make_tile(const BgaGeometry<acc_t>& geo, int n, int group_index, int group,
                             int tile_y, int tile_x, int tile_h, int tile_w) {
  BgaTile t;
  t.n = n;
  t.c0 = group_index * group;
  t.channels = geo.C - t.c0 < group ? geo.C - t.c0 : group;
  t.ly0 = tile_y * tile_h;
  t.ly1 = t.ly0 + tile_h < geo.h ? t.ly0 + tile_h : geo.h;
  t.lx0 = tile_x * tile_w;
  t.lx1 = t.lx0 + tile_w < geo.w ? t.lx0 + tile_w : geo.w;
  t.wy0 = first_dst_with_tap_at_least(t.ly0 - 1, geo.h, geo.H, geo.scale_y);
  t.own_y0 = first_dst_with_tap_at_least(t.ly0, geo.h, geo.H, geo.scale_y);
  t.wy1 = first_dst_with_tap_at_least(t.ly1, geo.h, geo.H, geo.scale_y);
  t.wx0 = first_dst_with_tap_at_least(t.lx0 - 1, geo.w, geo.W, geo.scale_x);
  t.own_x0 = first_dst_with_tap_at_least(t.lx0, geo.w, geo.W, geo.scale_x);
  t.wx1 = first_dst_with_tap_at_least(t.lx1, geo.w, geo.W, geo.scale_x);
  return t;
}

template <typename scalar_t>
struct BgaBackwardData {
  const scalar_t* grad_out;     // high-res
  const scalar_t* detail_keep;  // high-res
  const scalar_t* sem_up;       // low-res
  const scalar_t* detail_down;  // low-res
  const scalar_t* sem_keep;     // low-res
  scalar_t* grad_detail_keep;   // high-res
  scalar_t* grad_sem_up;        // low-res
  scalar_t* grad_detail_down;   // low-res
  scalar_t* grad_sem_keep;      // low-res
};

// The shared buffers' pitches (pixels per window row, rows per x-pass column): made odd
// for channel groups under 16, so that the strided x-pass and y-pass reads fall in distinct
// banks. A group of 16 (channels_last) keeps even pitches: padding would cost the 3 x 4
// tile its fit in 48 KiB (3 x 3 then: more halo to read), for 2-way conflicts in the x-pass.
BISENET_HD int buffer_pitch(int n, int group) { return group < 16 ? (n | 1) : n; }

// Step 1, item = ((row * buffer_pitch(window_width, group)) + col) * group + slot.
// Writes grad_detail_keep when the tile owns the pixel; stores g and
// g * detail_keep * s * (1 - s) in the window buffers (zeros for unused channel slots and
// the padding column).
template <typename scalar_t, typename acc_t>
BISENET_HD void backward_window_item(int item, int group, const BgaTile& t, const BgaGeometry<acc_t>& geo,
                                     const BgaBackwardData<scalar_t>& d, acc_t* window_grad,
                                     acc_t* window_sem_grad) {
  int slot = item % group;
  int pixel = item / group;
  int pitch = buffer_pitch(t.wx1 - t.wx0, group);
  int y = t.wy0 + pixel / pitch;
  int x = t.wx0 + pixel % pitch;
  if (slot >= t.channels || x >= t.wx1) {
    window_grad[item] = static_cast<acc_t>(0);
    window_sem_grad[item] = static_cast<acc_t>(0);
    return;
  }
  int c = t.c0 + slot;
  int64_t hi = t.n * geo.hi_sn + c * geo.hi_sc + y * geo.hi_sy + x * geo.hi_sx;
  const scalar_t* sem_up_plane = d.sem_up + t.n * geo.lo_sn + c * geo.lo_sc;
  Taps<acc_t> ty = bilinear_taps<acc_t>(y, geo.h, geo.scale_y);
  Taps<acc_t> tx = bilinear_taps<acc_t>(x, geo.w, geo.scale_x);
  acc_t s = sigmoid_acc(bilinear_sample<scalar_t, acc_t>(sem_up_plane, geo.lo_sy, geo.lo_sx, ty, tx));
  acc_t g = load_acc<scalar_t, acc_t>(d.grad_out, hi);
  acc_t detail_keep = load_acc<scalar_t, acc_t>(d.detail_keep, hi);
  if (y >= t.own_y0 && x >= t.own_x0) d.grad_detail_keep[hi] = static_cast<scalar_t>(g * s);
  window_grad[item] = g;
  window_sem_grad[item] = g * detail_keep * s * (static_cast<acc_t>(1) - s);
}

// Step 2, item = ((j * buffer_pitch(window_height, group)) + row) * group + slot: the
// window row's sums along x for low-res column lx0 + j (zeros for the padding row).
template <typename acc_t>
BISENET_HD void backward_xpass_item(int item, int group, const BgaTile& t, const BgaGeometry<acc_t>& geo,
                                    const acc_t* window_grad, const acc_t* window_sem_grad,
                                    acc_t* row_grad, acc_t* row_sem_grad) {
  int slot = item % group;
  int rest = item / group;
  int column_pitch = buffer_pitch(t.wy1 - t.wy0, group);
  int row = rest % column_pitch;
  int j = rest / column_pitch;
  if (t.wy0 + row >= t.wy1) {
    row_grad[item] = static_cast<acc_t>(0);
    row_sem_grad[item] = static_cast<acc_t>(0);
    return;
  }
  int ix = t.lx0 + j;
  int window_pitch = buffer_pitch(t.wx1 - t.wx0, group);
  int x_begin = first_dst_with_tap_at_least(ix - 1, geo.w, geo.W, geo.scale_x);
  int x_end = first_dst_with_tap_at_least(ix + 1, geo.w, geo.W, geo.scale_x);
  acc_t sum_grad = static_cast<acc_t>(0), sum_sem_grad = static_cast<acc_t>(0);
  for (int x = x_begin; x < x_end; ++x) {
    acc_t weight = tap_weight(bilinear_taps<acc_t>(x, geo.w, geo.scale_x), ix);
    int at = (row * window_pitch + (x - t.wx0)) * group + slot;
    sum_grad = fma_acc(weight, window_grad[at], sum_grad);
    sum_sem_grad = fma_acc(weight, window_sem_grad[at], sum_sem_grad);
  }
  row_grad[item] = sum_grad;
  row_sem_grad[item] = sum_sem_grad;
}

// Step 3, item = ((i * tile_width) + j) * group + slot: low-res pixel (ly0 + i, lx0 + j).
// up^T(g) and up^T(g * detail_keep * s * (1 - s)) by summing the x-pass along y, then
//   grad_sem_up = up^T(g * detail_keep * s * (1 - s))
//   grad_detail_down = up^T(g) * sigmoid(sem_keep)
//   grad_sem_keep = up^T(g) * detail_down * sigmoid(sem_keep) * (1 - sigmoid(sem_keep))
template <typename scalar_t, typename acc_t>
BISENET_HD void backward_ypass_item(int item, int group, const BgaTile& t, const BgaGeometry<acc_t>& geo,
                                    const acc_t* row_grad, const acc_t* row_sem_grad,
                                    const BgaBackwardData<scalar_t>& d) {
  int slot = item % group;
  if (slot >= t.channels) return;
  int rest = item / group;
  int tile_width = t.lx1 - t.lx0;
  int j = rest % tile_width;
  int iy = t.ly0 + rest / tile_width;
  int column_pitch = buffer_pitch(t.wy1 - t.wy0, group);
  int y_begin = first_dst_with_tap_at_least(iy - 1, geo.h, geo.H, geo.scale_y);
  int y_end = first_dst_with_tap_at_least(iy + 1, geo.h, geo.H, geo.scale_y);
  acc_t up_t_grad = static_cast<acc_t>(0), up_t_sem_grad = static_cast<acc_t>(0);
  for (int y = y_begin; y < y_end; ++y) {
    acc_t weight = tap_weight(bilinear_taps<acc_t>(y, geo.h, geo.scale_y), iy);
    int at = (j * column_pitch + (y - t.wy0)) * group + slot;
    up_t_grad = fma_acc(weight, row_grad[at], up_t_grad);
    up_t_sem_grad = fma_acc(weight, row_sem_grad[at], up_t_sem_grad);
  }
  int c = t.c0 + slot;
  int64_t lo = t.n * geo.lo_sn + c * geo.lo_sc + iy * geo.lo_sy + (t.lx0 + j) * geo.lo_sx;
  acc_t gate = sigmoid_acc(load_acc<scalar_t, acc_t>(d.sem_keep, lo));
  acc_t detail_down = load_acc<scalar_t, acc_t>(d.detail_down, lo);
  d.grad_sem_up[lo] = static_cast<scalar_t>(up_t_sem_grad);
  d.grad_detail_down[lo] = static_cast<scalar_t>(up_t_grad * gate);
  d.grad_sem_keep[lo] = static_cast<scalar_t>(up_t_grad * detail_down * gate * (static_cast<acc_t>(1) - gate));
}

// Sizes and strides as at::Tensor::sizes() / strides() give them (N, C, H, W order).
template <typename acc_t>
inline BgaGeometry<acc_t> make_geometry(const int64_t* hi_sizes, const int64_t* hi_strides,
                                        const int64_t* lo_sizes, const int64_t* lo_strides) {
  BgaGeometry<acc_t> geo;
  geo.N = static_cast<int>(hi_sizes[0]);
  geo.C = static_cast<int>(hi_sizes[1]);
  geo.H = static_cast<int>(hi_sizes[2]);
  geo.W = static_cast<int>(hi_sizes[3]);
  geo.h = static_cast<int>(lo_sizes[2]);
  geo.w = static_cast<int>(lo_sizes[3]);
  geo.hi_sn = hi_strides[0];
  geo.hi_sc = hi_strides[1];
  geo.hi_sy = hi_strides[2];
  geo.hi_sx = hi_strides[3];
  geo.lo_sn = lo_strides[0];
  geo.lo_sc = lo_strides[1];
  geo.lo_sy = lo_strides[2];
  geo.lo_sx = lo_strides[3];
  geo.scale_y = bilinear_scale<acc_t>(geo.h, geo.H);
  geo.scale_x = bilinear_scale<acc_t>(geo.w, geo.W);
  return geo;
}

// Host side: the largest window over all tiles of a tiling (the shared-memory size), from
// the same tap arithmetic the kernel's make_tile runs (same_bits.h: the host's numbers are
// the device's).
template <typename acc_t>
inline void max_window(const BgaGeometry<acc_t>& geo, int tile_h, int tile_w, int* height, int* width) {
  *height = most_window_span(geo.h, geo.H, geo.scale_y, tile_h, false);
  *width = most_window_span(geo.w, geo.W, geo.scale_x, tile_w, false);
}

// Accumulator elements per tile: the window (two values per pixel and slot, rows of
// buffer_pitch(window_w) pixels) and the x-pass (two values per tile column, slot and
// window row, columns of buffer_pitch(window_h) rows).
inline int64_t backward_buffer_elements(int window_h, int window_w, int tile_w, int group) {
  const int64_t window = static_cast<int64_t>(window_h) * buffer_pitch(window_w, group);
  const int64_t rows = static_cast<int64_t>(tile_w) * buffer_pitch(window_h, group);
  return 2 * static_cast<int64_t>(group) * (window + rows);
}

// Host side: the tile (in low-res pixels) for the backward. Starts from tiles owning about
// 64 x 64 high-res pixels and shrinks the longer side until the buffers fit
// `budget_elements`; returns false when not even a 1 x 1 tile fits (a huge upscale).
// A larger tile re-reads less of the neighbours' windows (the halo: about one upscale
// factor of rows and columns per tile).
template <typename acc_t>
inline bool choose_tile(const BgaGeometry<acc_t>& geo, int group, int64_t budget_elements,
                        int* tile_h, int* tile_w) {
  const int target = 64;
  int th = static_cast<int>((static_cast<int64_t>(target) * geo.h + geo.H - 1) / (geo.H > 0 ? geo.H : 1));
  int tw = static_cast<int>((static_cast<int64_t>(target) * geo.w + geo.W - 1) / (geo.W > 0 ? geo.W : 1));
  th = th < 1 ? 1 : (th > geo.h ? geo.h : th);
  tw = tw < 1 ? 1 : (tw > geo.w ? geo.w : tw);
  while (true) {
    int window_h, window_w;
    max_window(geo, th, tw, &window_h, &window_w);
    if (backward_buffer_elements(window_h, window_w, tw, group) <= budget_elements) break;
    if (th == 1 && tw == 1) return false;
    if (th >= tw && th > 1) --th; else --tw;
  }
  *tile_h = th;
  *tile_w = tw;
  return true;
}

// The backward's launch plan, made once on the host and followed by the CUDA launch and
// the CPU loop alike (so a tiling that cannot launch fails on the CPU too): the channels per
// block, the tile, the capacity of each window buffer and each x-pass buffer (elements),
// the shared bytes.
struct BgaBackwardPlan {
  int group;
  int tile_h, tile_w;
  int window_capacity, row_capacity;
  int64_t shared_bytes;
};

// The items of one tile's steps, each one buffer element (padding included for steps 1
// and 2): what the kernel and the CPU loop iterate and what the buffers must hold.
BISENET_HD int64_t tile_window_items(const BgaTile& t, int group) {
  return static_cast<int64_t>(t.wy1 - t.wy0) * buffer_pitch(t.wx1 - t.wx0, group) * group;
}
BISENET_HD int64_t tile_row_items(const BgaTile& t, int group) {
  return static_cast<int64_t>(buffer_pitch(t.wy1 - t.wy0, group)) * (t.lx1 - t.lx0) * group;
}
BISENET_HD int64_t tile_low_items(const BgaTile& t, int group) {
  return static_cast<int64_t>(t.ly1 - t.ly0) * (t.lx1 - t.lx0) * group;
}

// Shared memory per backward block: the default limit (no opt-in), which leaves room for
// four blocks (1024 threads) per H100 SM. The CPU loop plans with the same budget.
constexpr int64_t kBgaSharedBytes = 48 * 1024;

enum class BgaPlanStatus { kOk, kUpscaleTooLarge, kOverBudget };

// group: the channels per block (1 for NCHW, up to 16 for channels_last). tile_h, tile_w
// <= 0: the tile is chosen by choose_tile, halving the channel group while not even a 1 x 1
// tile fits (large upscales in channels_last); an explicit tile keeps the group.
// budget_bytes: the shared memory per block.
template <typename acc_t>
inline BgaPlanStatus plan_backward(const BgaGeometry<acc_t>& geo, int group, int tile_h, int tile_w,
                                   int64_t budget_bytes, BgaBackwardPlan* plan) {
  const int64_t budget = budget_bytes / static_cast<int64_t>(sizeof(acc_t));
  if (tile_h <= 0 || tile_w <= 0) {
    while (!choose_tile(geo, group, budget, &tile_h, &tile_w)) {
      if (group == 1) return BgaPlanStatus::kUpscaleTooLarge;
      group /= 2;
    }
  }
  int window_h, window_w;
  max_window(geo, tile_h, tile_w, &window_h, &window_w);
  const int64_t elements = backward_buffer_elements(window_h, window_w, tile_w, group);
  plan->group = group;
  plan->tile_h = tile_h;
  plan->tile_w = tile_w;
  plan->window_capacity = window_h * buffer_pitch(window_w, group) * group;
  plan->row_capacity = buffer_pitch(window_h, group) * tile_w * group;
  plan->shared_bytes = elements * static_cast<int64_t>(sizeof(acc_t));
  return elements <= budget ? BgaPlanStatus::kOk : BgaPlanStatus::kOverBudget;
}

}  // namespace bisenet
