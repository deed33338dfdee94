// The arithmetic of the fused Bilateral Guided Aggregation (BiSeNetV2's BGA gating):
//   out = detail_keep * sigmoid(up(sem_up)) + up(detail_down * sigmoid(sem_keep))
// with `up` bilinear (align_corners=False) from the low-res (h, w) to the high-res (H, W).
//
// Everything here is __host__ __device__: the CUDA kernels (bga.cu) run these functions
// with one thread per item, the C++ CPU loops (bga.cpp) run the very same functions in a
// serial loop, so the CPU tests check the kernels' arithmetic and their tiling.
//
// Backward as a deterministic gather (no atomics), reading every high-res element once:
// the low-res plane is cut into tiles, each tile reads the high-res pixels it owns and
// finishes the low-res pixels inside its grid lines, and a second kernel finishes those on
// the grid lines from the tiles' partial sums (bilinear.h: the rim). Per tile, one block
// of one channel group:
//   1. per owned high-res pixel, grad_detail_keep and the two values to scatter back, g
//      and g * detail_keep * s * (1 - s), s = sigmoid(up(sem_up)), summed along x into
//      the low-res columns the tile reaches (the "row buffer"). NCHW: window items (one
//      per pixel, consecutive threads along x, into the window buffer), then x-pass items
//      (per row and low-res column). channels_last: walk items, one per (row, channel),
//      or (row, channel pair) in 16-bit types (walk_lanes), walking along the row
//      (consecutive threads along C), with the column sums in
//      registers, so there is no window buffer (its room holds the tile's column table)
//      and the tile can be large;
//   2. y-table items (per owned row its weights, per reached low-res row its rows, into
//      the window buffers' room), then y-pass items: per low-res pixel the tile reaches, the
//      weighted sum along y, then the three low-res gradients, or on a grid line the rim's
//      two partial sums;
//   then, over the whole plane, rim items: per low-res pixel on a grid line, the sum of the
//   tiles' partial sums, then the three gradients.
// A column's sum runs along x in the same order in both layouts (the same fma_acc
// chain), so NCHW and channels_last give the same bits for one tiling.
// The shared buffers have odd pitches (odd_pitch: a window row of odd(owned width)
// pixels, a row-buffer column of odd(owned height) rows): consecutive x-pass and y-pass
// threads then read addresses an odd multiple of the channel group apart, in distinct
// banks; walk threads write adjacent addresses. A padding pixel or row is never read.
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
  FastDivider divide_C, divide_H, divide_W;  // the forward's 32-bit index path
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

// The output from detail_keep and the two upsampled values at one pixel.
template <typename acc_t>
BISENET_HD acc_t bga_output(acc_t detail_keep, acc_t sem_up_value, acc_t gated_value) {
  return fma_acc(detail_keep, sigmoid_acc(sem_up_value), gated_value);
}

// Forward, pass 2, one item per kVec consecutive outputs along the fastest dimension (W in
// NCHW, C in channels_last) of dense tensors, so output index vec * kVec sits at that
// offset in memory. kVec divides W or C and every pointer is aligned to its vectors (the
// host checks: prepare_bga_forward), so detail_keep and out move as one vector, and in
// channels_last, where the kVec channels share their taps, so do sem_up and gated at each
// tap (one load of each per tap, not kVec).
template <typename scalar_t, typename acc_t, int kVec, typename index_t>
BISENET_HD void bga_forward_item(index_t vec, const BgaGeometry<acc_t>& geo, bool channels_last,
                                 const scalar_t* detail_keep, const scalar_t* sem_up, const acc_t* gated,
                                 scalar_t* out) {
  const index_t index = vec * kVec;
  int n, c, y, x;
  if (sizeof(index_t) == 4) {  // index < 2^30: the launch's dividers, not three divisions
    const uint32_t at = static_cast<uint32_t>(index);
    const FastDivider& inner = channels_last ? geo.divide_C : geo.divide_W;  // the fastest dimension
    const FastDivider& middle = channels_last ? geo.divide_W : geo.divide_H;
    const FastDivider& outer = channels_last ? geo.divide_H : geo.divide_C;
    const uint32_t rest0 = divide(at, inner), rest1 = divide(rest0, middle), rest2 = divide(rest1, outer);
    const int fastest = static_cast<int>(at - rest0 * inner.divisor);
    const int second = static_cast<int>(rest0 - rest1 * middle.divisor);
    const int third = static_cast<int>(rest1 - rest2 * outer.divisor);
    c = channels_last ? fastest : third;
    x = channels_last ? second : fastest;
    y = channels_last ? third : second;
    n = static_cast<int>(rest2);
  } else if (channels_last) {  // (N, H, W, C) in memory
    c = static_cast<int>(index % geo.C);
    index_t rest = index / geo.C;
    x = static_cast<int>(rest % geo.W);
    rest /= geo.W;
    y = static_cast<int>(rest % geo.H);
    n = static_cast<int>(rest / geo.H);
  } else {  // (N, C, H, W) in memory
    x = static_cast<int>(index % geo.W);
    index_t rest = index / geo.W;
    y = static_cast<int>(rest % geo.H);
    rest /= geo.H;
    c = static_cast<int>(rest % geo.C);
    n = static_cast<int>(rest / geo.C);
  }
  const Vec<scalar_t, kVec> keep = *reinterpret_cast<const Vec<scalar_t, kVec>*>(detail_keep + index);
  Vec<scalar_t, kVec> result;
  const Taps<acc_t> ty = bilinear_taps<acc_t>(y, geo.h, geo.scale_y);
  if (channels_last) {
    const Taps<acc_t> tx = bilinear_taps<acc_t>(x, geo.w, geo.scale_x);
    // in index_t: int32_t only where the low-res tensors' offsets fit too (the launch checks)
    const index_t sy = static_cast<index_t>(geo.lo_sy), sx = static_cast<index_t>(geo.lo_sx);
    const index_t base = n * static_cast<index_t>(geo.lo_sn) + c * static_cast<index_t>(geo.lo_sc);  // lo_sc == 1
    const index_t at[4] = {base + ty.i0 * sy + tx.i0 * sx, base + ty.i0 * sy + tx.i1 * sx,
                           base + ty.i1 * sy + tx.i0 * sx, base + ty.i1 * sy + tx.i1 * sx};
    Vec<scalar_t, kVec> up[4];
    Vec<acc_t, kVec> gate[4];
#pragma unroll
    for (int tap = 0; tap < 4; ++tap) {
      up[tap] = *reinterpret_cast<const Vec<scalar_t, kVec>*>(sem_up + at[tap]);
      gate[tap] = *reinterpret_cast<const Vec<acc_t, kVec>*>(gated + at[tap]);
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const acc_t up_value = bilinear_combine(ty, tx, static_cast<acc_t>(up[0].v[k]), static_cast<acc_t>(up[1].v[k]),
                                              static_cast<acc_t>(up[2].v[k]), static_cast<acc_t>(up[3].v[k]));
      const acc_t gate_value = bilinear_combine(ty, tx, gate[0].v[k], gate[1].v[k], gate[2].v[k], gate[3].v[k]);
      result.v[k] = static_cast<scalar_t>(bga_output(static_cast<acc_t>(keep.v[k]), up_value, gate_value));
    }
  } else {  // the kVec outputs run along x: taps of their own
    const index_t plane = n * static_cast<index_t>(geo.lo_sn) + c * static_cast<index_t>(geo.lo_sc);
    const index_t sy = static_cast<index_t>(geo.lo_sy), sx = static_cast<index_t>(geo.lo_sx);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const Taps<acc_t> tx = bilinear_taps<acc_t>(x + k, geo.w, geo.scale_x);
      result.v[k] = static_cast<scalar_t>(
          bga_output(static_cast<acc_t>(keep.v[k]), bilinear_sample<scalar_t, acc_t, index_t>(sem_up + plane, sy, sx, ty, tx),
                     bilinear_sample<acc_t, acc_t, index_t>(gated + plane, sy, sx, ty, tx)));
    }
  }
  *reinterpret_cast<Vec<scalar_t, kVec>*>(out + index) = result;
}

// ---------------------------------------------------------------------------------------
// Backward tiling.

// One block of work: low-res tile [ly0, ly1) x [lx0, lx1) (tile (tile_y, tile_x) of the
// grid) of channels [c0, c0 + channels) of sample n, and the high-res pixels it owns,
// [y0, y1) x [x0, x1): those whose first taps lie in the tile.
struct BgaTile {
  int n, c0, channels;  // channels: how many of the group's slots are real
  int tile_y, tile_x;
  int ly0, ly1, lx0, lx1;
  int y0, y1, x0, x1;
};

template <typename acc_t>
BISENET_HD BgaTile make_tile(const BgaGeometry<acc_t>& geo, int n, int group_index, int group,
                             int tile_y, int tile_x, int tile_h, int tile_w) {
  BgaTile t;
  t.n = n;
  t.c0 = group_index * group;
  t.channels = geo.C - t.c0 < group ? geo.C - t.c0 : group;
  t.tile_y = tile_y;
  t.tile_x = tile_x;
  t.ly0 = tile_y * tile_h;
  t.ly1 = t.ly0 + tile_h < geo.h ? t.ly0 + tile_h : geo.h;
  t.lx0 = tile_x * tile_w;
  t.lx1 = t.lx0 + tile_w < geo.w ? t.lx0 + tile_w : geo.w;
  t.y0 = first_dst_with_tap_at_least(t.ly0, geo.h, geo.H, geo.scale_y);
  t.y1 = first_dst_with_tap_at_least(t.ly1, geo.h, geo.H, geo.scale_y);
  t.x0 = first_dst_with_tap_at_least(t.lx0, geo.w, geo.W, geo.scale_x);
  t.x1 = first_dst_with_tap_at_least(t.lx1, geo.w, geo.W, geo.scale_x);
  return t;
}

// The low-res rows and columns the tile's pixels reach: [ly0, ly1] x [lx0, lx1] within
// the plane.
template <typename acc_t>
BISENET_HD int reached_rows(const BgaTile& t, const BgaGeometry<acc_t>& geo) {
  return reached_span(t.ly0, t.ly1, geo.h);
}
template <typename acc_t>
BISENET_HD int reached_columns(const BgaTile& t, const BgaGeometry<acc_t>& geo) {
  return reached_span(t.lx0, t.lx1, geo.w);
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

// The rim (bilinear.h: TileRim) holds two values per entry and channel: value 0 the partial
// up^T(g), value 1 the partial up^T(g * detail_keep * s * (1 - s)); channels fastest in
// channels_last, each channel's entries adjacent in NCHW (the rim kernel's order).
constexpr int kBgaRimValues = 2;

// Pitches of the shared buffers, odd (see the file comment).
BISENET_HD int odd_pitch(int n) { return n | 1; }

// The three low-res gradients at low-res offset `lo` from the sums up^T(g) and
// up^T(g * detail_keep * s * (1 - s)):
//   grad_sem_up = up^T(g * detail_keep * s * (1 - s))
//   grad_detail_down = up^T(g) * sigmoid(sem_keep)
//   grad_sem_keep = up^T(g) * detail_down * sigmoid(sem_keep) * (1 - sigmoid(sem_keep))
template <typename scalar_t, typename acc_t>
BISENET_HD void finish_low_res(int64_t lo, acc_t up_t_grad, acc_t up_t_sem_grad, const BgaBackwardData<scalar_t>& d) {
  acc_t gate = sigmoid_acc(load_acc<scalar_t, acc_t>(d.sem_keep, lo));
  acc_t detail_down = load_acc<scalar_t, acc_t>(d.detail_down, lo);
  d.grad_sem_up[lo] = static_cast<scalar_t>(up_t_sem_grad);
  d.grad_detail_down[lo] = static_cast<scalar_t>(up_t_grad * gate);
  d.grad_sem_keep[lo] = static_cast<scalar_t>(up_t_grad * detail_down * gate * (static_cast<acc_t>(1) - gate));
}

// At one owned high-res pixel, from g, detail_keep and up(sem_up) there: returns
// grad_detail_keep = g * s and sets *sem_grad = g * detail_keep * s * (1 - s) (the value the
// adjoint of `up` sums besides g), s = sigmoid(up(sem_up)).
template <typename acc_t>
BISENET_HD acc_t pixel_values(acc_t g, acc_t detail_keep, acc_t up_value, acc_t* sem_grad) {
  acc_t s = sigmoid_acc(up_value);
  *sem_grad = g * detail_keep * s * (static_cast<acc_t>(1) - s);
  return g * s;
}

// Step 1, NCHW, window items: item = ((row * odd_pitch(x1 - x0)) + col) * group + slot,
// owned pixel (y0 + row, x0 + col); its two values into the window buffers.
template <typename scalar_t, typename acc_t>
BISENET_HD void backward_window_item(int item, int group, const BgaTile& t, const BgaGeometry<acc_t>& geo,
                                     const BgaBackwardData<scalar_t>& d, acc_t* window_grad,
                                     acc_t* window_sem_grad) {
  int slot = item % group;
  int pixel = item / group;
  int pitch = odd_pitch(t.x1 - t.x0);
  int y = t.y0 + pixel / pitch;
  int x = t.x0 + pixel % pitch;
  if (slot >= t.channels || x >= t.x1) return;  // padding: never read
  int c = t.c0 + slot;
  // the planes' pointers held (a load is one wide multiply-add), offsets within a plane in 32
  // bits (prepare_bga_backward checks that a plane's H * W and h * w elements fit)
  const int64_t hi_plane = t.n * geo.hi_sn + c * geo.hi_sc;
  const scalar_t* grad_plane = held_pointer(d.grad_out + hi_plane);
  const scalar_t* keep_plane = held_pointer(d.detail_keep + hi_plane);
  scalar_t* grad_keep_plane = held_pointer(d.grad_detail_keep + hi_plane);
  const scalar_t* up_plane = held_pointer(d.sem_up + t.n * geo.lo_sn + c * geo.lo_sc);
  const int hi = y * static_cast<int>(geo.hi_sy) + x * static_cast<int>(geo.hi_sx);
  acc_t up_value = bilinear_sample<scalar_t, acc_t, int>(
      up_plane, static_cast<int>(geo.lo_sy), static_cast<int>(geo.lo_sx), bilinear_taps<acc_t>(y, geo.h, geo.scale_y),
      bilinear_taps<acc_t>(x, geo.w, geo.scale_x));
  acc_t g = load_acc<scalar_t, acc_t>(grad_plane, hi);
  grad_keep_plane[hi] =
      static_cast<scalar_t>(pixel_values(g, load_acc<scalar_t, acc_t>(keep_plane, hi), up_value, &window_sem_grad[item]));
  window_grad[item] = g;
}

// Step 1, NCHW, x-pass items: item = ((k * odd_pitch(y1 - y0)) + row) * group + slot, the
// sums along the owned row y0 + row for low-res column lx0 + k, k < reached_columns, into
// the row buffers at the item's index.
template <typename acc_t>
BISENET_HD void backward_xpass_item(int item, int group, const BgaTile& t, const BgaGeometry<acc_t>& geo,
                                    const acc_t* window_grad, const acc_t* window_sem_grad,
                                    acc_t* row_grad, acc_t* row_sem_grad) {
  int slot = item % group;
  int rest = item / group;
  int column_pitch = odd_pitch(t.y1 - t.y0);
  int row = rest % column_pitch;
  int j = t.lx0 + rest / column_pitch;
  if (t.y0 + row >= t.y1) return;  // padding: never read
  int window_pitch = odd_pitch(t.x1 - t.x0);
  int x_begin = first_dst_with_tap_at_least(j - 1, geo.w, geo.W, geo.scale_x);
  int x_end = first_dst_with_tap_at_least(j + 1, geo.w, geo.W, geo.scale_x);
  x_begin = x_begin > t.x0 ? x_begin : t.x0;
  x_end = x_end < t.x1 ? x_end : t.x1;
  acc_t sum_grad = static_cast<acc_t>(0), sum_sem_grad = static_cast<acc_t>(0);
  for (int x = x_begin; x < x_end; ++x) {
    acc_t weight = tap_weight(bilinear_taps<acc_t>(x, geo.w, geo.scale_x), j);
    int at = (row * window_pitch + (x - t.x0)) * group + slot;
    sum_grad = fma_acc(weight, window_grad[at], sum_grad);
    sum_sem_grad = fma_acc(weight, window_sem_grad[at], sum_sem_grad);
  }
  row_grad[item] = sum_grad;
  row_sem_grad[item] = sum_sem_grad;
}

// Step 1, channels_last, the walk's column table: per owned high-res column x0 + item, what
// every (row, channel) walk of the tile needs there (bilinear_taps, and tap_weight at the two
// low-res columns it reaches), made once per tile where each walk made it at every pixel.
// It lives in the window buffers' room, which the walk has no other use for.
template <typename acc_t>
struct alignas(16) BgaWalkColumn {
  int i0;            // the first column tap
  int lo0, lo1;      // both taps' offsets in a low-res row (i0 * lo_sx, i1 * lo_sx)
  acc_t w0, w1;      // their weights
  acc_t here, next;  // tap_weight at low-res columns i0 and i0 + 1
};

// The acc_t elements of each of the two window buffers one table entry takes.
template <typename acc_t>
constexpr int walk_column_elements() {
  static_assert(sizeof(BgaWalkColumn<acc_t>) % (2 * sizeof(acc_t)) == 0, "a table entry spans whole elements");
  return static_cast<int>(sizeof(BgaWalkColumn<acc_t>) / (2 * sizeof(acc_t)));
}

template <typename acc_t>
BISENET_HD void walk_column_item(int item, const BgaTile& t, const BgaGeometry<acc_t>& geo,
                                 BgaWalkColumn<acc_t>* columns) {
  const Taps<acc_t> tx = bilinear_taps<acc_t>(t.x0 + item, geo.w, geo.scale_x);
  BgaWalkColumn<acc_t> column;
  column.i0 = tx.i0;
  column.lo0 = tx.i0 * static_cast<int>(geo.lo_sx);  // within a row: 32 bits (prepare_bga_backward)
  column.lo1 = tx.i1 * static_cast<int>(geo.lo_sx);
  column.w0 = tx.w0;
  column.w1 = tx.w1;
  column.here = tap_weight(tx, tx.i0);
  column.next = tap_weight(tx, tx.i0 + 1);
  columns[item] = column;
}

// Step 1, channels_last, walk items: item = row * (group / kLanes) + k walks owned row
// y0 + row of the kLanes channels from c0 + k * kLanes along x, keeping for each the sums of
// low-res columns j and j + 1 (the taps of the pixels with i0 = j: when the walk reaches a
// pixel, j is its i0, so tap_weight(tx, j) and (tx, j + 1) are the table's here and next) and
// storing column j's when the walk passes it, at the index the x-pass item of (column, row)
// uses. Each channel's fma_acc chain is the x-pass's, in the same order: NCHW and
// channels_last agree bit for bit, whatever kLanes. kLanes = 2 (walk_lanes) moves a
// channel pair as one 4-byte vector and shares the walk's control, its column table reads
// and pointers between the two.
template <typename scalar_t, typename acc_t, int kLanes>
BISENET_HD void backward_walk_item(int item, int group, const BgaTile& t, const BgaGeometry<acc_t>& geo,
                                   const BgaBackwardData<scalar_t>& d, const BgaWalkColumn<acc_t>* columns,
                                   acc_t* row_grad, acc_t* row_sem_grad) {
  using Lanes = Vec<scalar_t, kLanes>;
  const int per_row = group / kLanes;
  const int slot = item % per_row * kLanes;
  const int row = item / per_row;
  if (slot >= t.channels) return;  // unused slots: their row-buffer entries are never read
  const int j_end = t.lx0 + reached_columns(t, geo);
  const int c = t.c0 + slot;
  const int y = t.y0 + row;
  const Taps<acc_t> ty = bilinear_taps<acc_t>(y, geo.h, geo.scale_y);
  // the row's pointers, once (held: a load is one wide multiply-add): the high-res row,
  // sem_up's first tap row (the second an offset from it); offsets within a row in 32 bits
  // (prepare_bga_backward checks that a row's (W + 4) * C and w * C elements fit)
  const int hi_sx = static_cast<int>(geo.hi_sx);
  const int64_t hi_row = t.n * geo.hi_sn + c * geo.hi_sc + y * geo.hi_sy;
  const scalar_t* grad_row = held_pointer(d.grad_out + hi_row);
  const scalar_t* keep_row = held_pointer(d.detail_keep + hi_row);
  scalar_t* grad_keep_row = held_pointer(d.grad_detail_keep + hi_row);
  const scalar_t* up_plane = d.sem_up + t.n * geo.lo_sn + c * geo.lo_sc;
  const scalar_t* up_row0 = held_pointer(up_plane + ty.i0 * geo.lo_sy);
  const int up_second_row = static_cast<int>((ty.i1 - ty.i0) * geo.lo_sy);  // from up_row0: 0 or one row
  acc_t grad_here[kLanes], sem_here[kLanes], grad_next[kLanes], sem_next[kLanes];  // columns j, j + 1
#pragma unroll
  for (int l = 0; l < kLanes; ++l) grad_here[l] = sem_here[l] = grad_next[l] = sem_next[l] = static_cast<acc_t>(0);
  int j = t.lx0;
  // column j's entry in the row buffers, ((j - lx0) * column_pitch + row) * group + slot
  const int column_stride = odd_pitch(t.y1 - t.y0) * group;
  int at = row * group + slot;
  const auto store_column = [&]() {  // column j is complete for this row: store it, move to j + 1
#pragma unroll
    for (int l = 0; l < kLanes; ++l) {
      row_grad[at + l] = grad_here[l];
      row_sem_grad[at + l] = sem_here[l];
      grad_here[l] = grad_next[l];
      sem_here[l] = sem_next[l];
      grad_next[l] = static_cast<acc_t>(0);
      sem_next[l] = static_cast<acc_t>(0);
    }
    at += column_stride;
    ++j;
  };
  // g and detail_keep of kAhead pixels, 4 values of each a thread (kLanes a load), are loaded
  // before the first is used, so that they are in flight together (a pixel past the row's end
  // loads the last one again, unused)
  constexpr int kAhead = 4 / kLanes;
  const int last = (t.x1 - 1) * hi_sx;
  // sem_up's four tap values, loaded again only when the column taps move (every 4 pixels at
  // x4; the same x in every thread of a warp, so the branch is uniform)
  int taps_of = -1;
  acc_t up00[kLanes] = {}, up01[kLanes] = {}, up10[kLanes] = {}, up11[kLanes] = {};
  for (int x_start = t.x0, hi_start = t.x0 * hi_sx; x_start < t.x1; x_start += kAhead, hi_start += kAhead * hi_sx) {
    Lanes grads[kAhead], keeps[kAhead];
    int hi = hi_start;
#pragma unroll
    for (int k = 0; k < kAhead; ++k, hi += hi_sx) {
      grads[k] = load_vec<scalar_t, kLanes>(grad_row, hi < last ? hi : last);
      keeps[k] = load_vec<scalar_t, kLanes>(keep_row, hi < last ? hi : last);
    }
    hi = hi_start;
#pragma unroll
    for (int k = 0; k < kAhead; ++k, hi += hi_sx) {
      const int x = x_start + k;
      if (x >= t.x1) break;
      const BgaWalkColumn<acc_t> column = columns[x - t.x0];
      while (j < column.i0) store_column();
      if (column.i0 != taps_of) {
        const Lanes tap00 = load_vec<scalar_t, kLanes>(up_row0, column.lo0);
        const Lanes tap01 = load_vec<scalar_t, kLanes>(up_row0, column.lo1);
        const Lanes tap10 = load_vec<scalar_t, kLanes>(up_row0, up_second_row + column.lo0);
        const Lanes tap11 = load_vec<scalar_t, kLanes>(up_row0, up_second_row + column.lo1);
#pragma unroll
        for (int l = 0; l < kLanes; ++l) {
          up00[l] = static_cast<acc_t>(tap00.v[l]);
          up01[l] = static_cast<acc_t>(tap01.v[l]);
          up10[l] = static_cast<acc_t>(tap10.v[l]);
          up11[l] = static_cast<acc_t>(tap11.v[l]);
        }
        taps_of = column.i0;
      }
      Taps<acc_t> tx;  // the weights bilinear_combine reads
      tx.i0 = tx.i1 = column.i0;
      tx.w0 = column.w0;
      tx.w1 = column.w1;
      Lanes grad_keep;
#pragma unroll
      for (int l = 0; l < kLanes; ++l) {
        const acc_t g = static_cast<acc_t>(grads[k].v[l]);
        acc_t up_value = bilinear_combine(ty, tx, up00[l], up01[l], up10[l], up11[l]);
        acc_t sem_grad;
        grad_keep.v[l] = static_cast<scalar_t>(pixel_values(g, static_cast<acc_t>(keeps[k].v[l]), up_value, &sem_grad));
        grad_here[l] = fma_acc(column.here, g, grad_here[l]);
        sem_here[l] = fma_acc(column.here, sem_grad, sem_here[l]);
        grad_next[l] = fma_acc(column.next, g, grad_next[l]);
        sem_next[l] = fma_acc(column.next, sem_grad, sem_next[l]);
      }
      store_vec(grad_keep_row, hi, grad_keep);
    }
  }
  while (j < j_end) store_column();
}

// Step 2's tables, made once a tile after step 1 in the window buffers' room (free then in
// both layouts; bga.cu: a barrier before and after): per owned row y0 + r, its first tap row
// and tap_weight there and at the next row (as the walk's column table: the y-pass took
// tap_weight(bilinear_taps(y), i) for every row of every low-res pixel), then per low-res row
// ly0 + ii the tile reaches, the owned rows that reach it (first_dst_with_tap_at_least's two
// searches, once a row where the y-pass made them once a pixel and channel).
template <typename acc_t>
struct alignas(16) BgaYRow {
  int i0;            // the first row tap
  acc_t here, next;  // tap_weight at low-res rows i0 and i0 + 1
};

struct BgaYRange {
  int begin, end;  // the owned rows [begin, end) reach the low-res row
};

// The ranges follow the rows' entries.
template <typename acc_t>
BISENET_HD BgaYRange* y_ranges(BgaYRow<acc_t>* rows, int owned_rows) {
  return reinterpret_cast<BgaYRange*>(rows + owned_rows);
}
template <typename acc_t>
BISENET_HD const BgaYRange* y_ranges(const BgaYRow<acc_t>* rows, int owned_rows) {
  return reinterpret_cast<const BgaYRange*>(rows + owned_rows);
}

// The acc_t elements of each of the two window buffers the tables of owned_rows rows and
// reached low-res rows take.
template <typename acc_t>
BISENET_HD int64_t y_table_elements(int owned_rows, int reached) {
  const int64_t bytes = static_cast<int64_t>(owned_rows) * static_cast<int64_t>(sizeof(BgaYRow<acc_t>)) +
                        static_cast<int64_t>(reached) * static_cast<int64_t>(sizeof(BgaYRange));
  const int64_t per_element = 2 * static_cast<int64_t>(sizeof(acc_t));
  return (bytes + per_element - 1) / per_element;
}

template <typename acc_t>
BISENET_HD int tile_y_table_items(const BgaTile& t, const BgaGeometry<acc_t>& geo) {
  return (t.y1 - t.y0) + reached_rows(t, geo);
}

// item < owned rows: that row's entry; then item - owned rows = ii: low-res row ly0 + ii's range.
template <typename acc_t>
BISENET_HD void y_table_item(int item, const BgaTile& t, const BgaGeometry<acc_t>& geo, BgaYRow<acc_t>* rows) {
  const int owned_rows = t.y1 - t.y0;
  if (item < owned_rows) {
    const Taps<acc_t> ty = bilinear_taps<acc_t>(t.y0 + item, geo.h, geo.scale_y);
    BgaYRow<acc_t> row;
    row.i0 = ty.i0;
    row.here = tap_weight(ty, ty.i0);
    row.next = tap_weight(ty, ty.i0 + 1);
    rows[item] = row;
    return;
  }
  const int i = t.ly0 + item - owned_rows;
  const int begin = first_dst_with_tap_at_least(i - 1, geo.h, geo.H, geo.scale_y);
  const int end = first_dst_with_tap_at_least(i + 1, geo.h, geo.H, geo.scale_y);
  BgaYRange range;
  range.begin = begin > t.y0 ? begin : t.y0;
  range.end = end < t.y1 ? end : t.y1;
  y_ranges(rows, owned_rows)[item - owned_rows] = range;
}

// Step 2, y-pass items: item = ((ii * reached_columns) + k) * group + slot, low-res pixel
// (ly0 + ii, lx0 + k), ii < reached_rows: the row buffers' sums along y over the owned
// rows that reach it; inside the grid lines the three gradients, on them the rim's
// partial sums. The rows [first(i - 1), first(i + 1)) have their first tap at i - 1 or i,
// so the weight at i is the table's next or here: tap_weight(taps(y), i), the same bits.
template <typename scalar_t, typename acc_t>
BISENET_HD void backward_ypass_item(int item, int group, const BgaTile& t, const BgaGeometry<acc_t>& geo,
                                    const BgaYRow<acc_t>* rows, const acc_t* row_grad, const acc_t* row_sem_grad,
                                    const BgaBackwardData<scalar_t>& d, const TileRim<acc_t>& rim) {
  int slot = item % group;
  if (slot >= t.channels) return;
  int rest = item / group;
  int columns = reached_columns(t, geo);
  int k = rest % columns;
  int ii = rest / columns;
  int i = t.ly0 + ii;
  int column_pitch = odd_pitch(t.y1 - t.y0);
  const BgaYRange range = y_ranges(rows, t.y1 - t.y0)[ii];
  acc_t up_t_grad = static_cast<acc_t>(0), up_t_sem_grad = static_cast<acc_t>(0);
#pragma unroll 4  // (nvcc unrolled it 16 times: 8 more registers in the NCHW kernel, no fewer instructions)
  for (int y = range.begin; y < range.end; ++y) {
    const BgaYRow<acc_t> row = rows[y - t.y0];
    const acc_t weight = row.i0 == i ? row.here : row.next;
    int at = (k * column_pitch + (y - t.y0)) * group + slot;
    up_t_grad = fma_acc(weight, row_grad[at], up_t_grad);
    up_t_sem_grad = fma_acc(weight, row_sem_grad[at], up_t_sem_grad);
  }
  int c = t.c0 + slot;
  if (on_rim(ii, k, rim.tile_h, rim.tile_w)) {
    int64_t at = rim_offset(rim, t.n, t.tile_y, t.tile_x, ii, k, c);
    rim.data[at] = up_t_grad;
    rim.data[at + rim.value_stride] = up_t_sem_grad;
    return;
  }
  int64_t lo = t.n * geo.lo_sn + c * geo.lo_sc + i * geo.lo_sy + (t.lx0 + k) * geo.lo_sx;
  finish_low_res<scalar_t, acc_t>(lo, up_t_grad, up_t_sem_grad, d);
}

// The grid-line pixels' pass, item = (n * rim_pixels + p) * C + c in channels_last,
// (n * C + c) * rim_pixels + p in NCHW (consecutive threads along the low-res layout's
// fastest dimension): the partial sums of the tiles that reach the pixel (rim_sum), then
// the three gradients. index_t: int32_t where the items fit (the divisions that find an
// item's pixel are several times cheaper), else int64_t.
template <typename scalar_t, typename acc_t, typename index_t>
BISENET_HD void backward_rim_item(index_t item, bool channels_last, const BgaGeometry<acc_t>& geo,
                                  const TileRim<acc_t>& rim, const BgaBackwardData<scalar_t>& d) {
  const index_t pixels = static_cast<index_t>(rim_pixels(rim, geo.h, geo.w));
  int n, c, p;
  if (channels_last) {
    c = static_cast<int>(item % geo.C);
    const index_t rest = item / geo.C;
    p = static_cast<int>(rest % pixels);
    n = static_cast<int>(rest / pixels);
  } else {
    p = static_cast<int>(item % pixels);
    const index_t rest = item / pixels;
    c = static_cast<int>(rest % geo.C);
    n = static_cast<int>(rest / geo.C);
  }
  int i, j;
  rim_pixel(rim, geo.h, geo.w, p, &i, &j);
  int64_t lo = n * geo.lo_sn + c * geo.lo_sc + i * geo.lo_sy + j * geo.lo_sx;
  finish_low_res<scalar_t, acc_t>(lo, rim_sum(rim, 0, n, c, i, j), rim_sum(rim, 1, n, c, i, j), d);
}

// Sizes as at::Tensor::sizes() gives them (N, C, H, W order), of tensors dense in one memory
// format (NCHW, or channels_last); their strides follow from the sizes. (A dimension of size
// 1 may carry any stride in a tensor PyTorch calls dense; this one's is what a larger size
// would give, so an offset past such a dimension's only index, as the walk's clamped loads
// ahead make, stays within int.)
template <typename acc_t>
inline BgaGeometry<acc_t> make_geometry(const int64_t* hi_sizes, const int64_t* lo_sizes, bool channels_last) {
  BgaGeometry<acc_t> geo;
  geo.N = static_cast<int>(hi_sizes[0]);
  geo.C = static_cast<int>(hi_sizes[1]);
  geo.H = static_cast<int>(hi_sizes[2]);
  geo.W = static_cast<int>(hi_sizes[3]);
  geo.h = static_cast<int>(lo_sizes[2]);
  geo.w = static_cast<int>(lo_sizes[3]);
  const auto dense_strides = [&](int64_t rows, int64_t cols, int64_t* sn, int64_t* sc, int64_t* sy, int64_t* sx) {
    const int64_t channels = geo.C;
    *sn = channels * rows * cols;
    *sc = channels_last ? 1 : rows * cols;
    *sy = channels_last ? cols * channels : cols;
    *sx = channels_last ? channels : 1;
  };
  dense_strides(geo.H, geo.W, &geo.hi_sn, &geo.hi_sc, &geo.hi_sy, &geo.hi_sx);
  dense_strides(geo.h, geo.w, &geo.lo_sn, &geo.lo_sc, &geo.lo_sy, &geo.lo_sx);
  geo.scale_y = bilinear_scale<acc_t>(geo.h, geo.H);
  geo.scale_x = bilinear_scale<acc_t>(geo.w, geo.W);
  geo.divide_C = make_divider(static_cast<uint32_t>(geo.C > 0 ? geo.C : 1));
  geo.divide_H = make_divider(static_cast<uint32_t>(geo.H > 0 ? geo.H : 1));
  geo.divide_W = make_divider(static_cast<uint32_t>(geo.W > 0 ? geo.W : 1));
  return geo;
}

// ---------------------------------------------------------------------------------------
// The backward's plan, made once on the host and followed by the CUDA launch and the CPU
// loop alike (so a tiling that cannot launch fails on the CPU too).

// Accumulator elements of one tile's shared buffers: the window (NCHW: two values per
// owned pixel and slot, rows of odd_pitch(owned width); channels_last: the walk's column
// table, an entry per owned column across both) and the row buffers (two values per reached
// column, slot and owned row, columns of odd_pitch(owned height)).
template <typename acc_t>
inline int64_t window_buffer_elements(int owned_h, int owned_w, int group, bool walk) {
  return walk ? static_cast<int64_t>(owned_w) * walk_column_elements<acc_t>()
              : static_cast<int64_t>(owned_h) * odd_pitch(owned_w) * group;
}
inline int64_t row_buffer_elements(int owned_h, int tile_w, int group) {
  return static_cast<int64_t>(tile_w + 1) * odd_pitch(owned_h) * group;
}

struct BgaBackwardPlan {
  int group;
  bool walk;  // channels_last: walk items instead of window and x-pass items
  int lanes;  // channels a walk item takes (walk_lanes)
  int tile_h, tile_w;
  int window_capacity, row_capacity;  // elements of each window buffer, each row buffer
  int64_t shared_bytes;
  int rim_entries;  // per tile
};

// The buffers of a tile_h x tile_w tiling, in elements of acc_t.
template <typename acc_t>
inline void size_buffers(const BgaGeometry<acc_t>& geo, int group, bool walk, int tile_h, int tile_w,
                         BgaBackwardPlan* plan) {
  const int owned_h = most_owned_span(geo.h, geo.H, geo.scale_y, tile_h);
  const int owned_w = most_owned_span(geo.w, geo.W, geo.scale_x, tile_w);
  plan->group = group;
  plan->walk = walk;
  plan->lanes = 1;  // walk_lanes, where the tensors are at hand
  plan->tile_h = tile_h;
  plan->tile_w = tile_w;
  // step 1's buffers (NCHW's window, the walk's column table), then step 2's tables in their room
  const int64_t step1 = window_buffer_elements<acc_t>(owned_h, owned_w, group, walk);
  const int64_t step2 = y_table_elements<acc_t>(owned_h, tile_h + 1);
  plan->window_capacity = static_cast<int>(step1 > step2 ? step1 : step2);
  plan->row_capacity = static_cast<int>(row_buffer_elements(owned_h, tile_w, group));
  plan->shared_bytes = 2 * (static_cast<int64_t>(plan->window_capacity) + plan->row_capacity) *
                       static_cast<int64_t>(sizeof(acc_t));
  plan->rim_entries = rim_entries(tile_h, tile_w);
}

// Host side: the tile (in low-res pixels). Starts from tiles owning about 64 x 64 high-res
// pixels and shrinks the longer side until the buffers fit `budget_bytes`; returns false
// when not even a 1 x 1 tile fits (a huge upscale). A larger tile leaves fewer low-res
// pixels on grid lines (the rim's share of the low-res plane: about 1/tile_h + 1/tile_w).
template <typename acc_t>
inline bool choose_tile(const BgaGeometry<acc_t>& geo, int group, bool walk, int64_t budget_bytes,
                        BgaBackwardPlan* plan) {
  const int target = 64;
  int th = static_cast<int>((static_cast<int64_t>(target) * geo.h + geo.H - 1) / (geo.H > 0 ? geo.H : 1));
  int tw = static_cast<int>((static_cast<int64_t>(target) * geo.w + geo.W - 1) / (geo.W > 0 ? geo.W : 1));
  th = th < 1 ? 1 : (th > geo.h ? geo.h : th);
  tw = tw < 1 ? 1 : (tw > geo.w ? geo.w : tw);
  while (true) {
    size_buffers(geo, group, walk, th, tw, plan);
    if (plan->shared_bytes <= budget_bytes) return true;
    if (th == 1 && tw == 1) return false;
    if (th >= tw && th > 1) --th; else --tw;
  }
}

// The items of one tile's steps (padding included for the window and x-pass items): what
// the kernel and the CPU loop iterate; the buffers must hold the window and row items (for
// the walk, the window elements its column table takes: walk_column_elements per column).
template <typename acc_t>
BISENET_HD int64_t tile_window_items(const BgaTile& t, int group, bool walk) {
  return walk ? static_cast<int64_t>(t.x1 - t.x0) * walk_column_elements<acc_t>()
              : static_cast<int64_t>(t.y1 - t.y0) * odd_pitch(t.x1 - t.x0) * group;
}
// What a tile takes of each window buffer: step 1's items, then step 2's tables in their room.
template <typename acc_t>
inline int64_t tile_room_elements(const BgaTile& t, const BgaGeometry<acc_t>& geo, int group, bool walk) {
  const int64_t step1 = tile_window_items<acc_t>(t, group, walk);
  const int64_t step2 = y_table_elements<acc_t>(t.y1 - t.y0, reached_rows(t, geo));
  return step1 > step2 ? step1 : step2;
}
template <typename acc_t>
BISENET_HD int64_t tile_row_items(const BgaTile& t, const BgaGeometry<acc_t>& geo, int group) {
  return static_cast<int64_t>(reached_columns(t, geo)) * odd_pitch(t.y1 - t.y0) * group;
}
BISENET_HD int64_t tile_walk_items(const BgaTile& t, int group, int lanes) {
  return static_cast<int64_t>(t.y1 - t.y0) * (group / lanes);
}
template <typename acc_t>
BISENET_HD int64_t tile_low_items(const BgaTile& t, const BgaGeometry<acc_t>& geo, int group) {
  return static_cast<int64_t>(reached_rows(t, geo)) * reached_columns(t, geo) * group;
}

// Shared memory per backward block: the default limit (no opt-in), which leaves room for
// four blocks (1024 threads) per H100 SM. The CPU loop plans with the same budget.
constexpr int64_t kBgaSharedBytes = 48 * 1024;

enum class BgaPlanStatus { kOk, kUpscaleTooLarge, kOverBudget };

// group: the channels per block (1 for NCHW, up to 16 for channels_last, which walks).
// tile_h, tile_w <= 0: the tile is chosen by choose_tile, halving the channel group while
// not even a 1 x 1 tile fits (large upscales in channels_last); an explicit tile keeps the
// group. budget_bytes: the shared memory per block.
template <typename acc_t>
inline BgaPlanStatus plan_backward(const BgaGeometry<acc_t>& geo, int group, bool walk, int tile_h, int tile_w,
                                   int64_t budget_bytes, BgaBackwardPlan* plan) {
  if (tile_h <= 0 || tile_w <= 0) {
    while (!choose_tile(geo, group, walk, budget_bytes, plan)) {
      if (group == 1) return BgaPlanStatus::kUpscaleTooLarge;
      group /= 2;
    }
    return BgaPlanStatus::kOk;
  }
  size_buffers(geo, group, walk, tile_h, tile_w, plan);
  return plan->shared_bytes <= budget_bytes ? BgaPlanStatus::kOk : BgaPlanStatus::kOverBudget;
}

// Channels a walk item takes (the plan's lanes, set where the tensors are at hand): 2 for
// 16-bit data in the channel groups of 16, where C is even and the walked tensors (grad_out,
// detail_keep, grad_detail_keep, sem_up) start on 4 bytes, so every pair's vector is aligned;
// else 1.
inline int walk_lanes(const BgaBackwardPlan& plan, int64_t channels, int64_t element_size, bool aligned) {
  return plan.walk && plan.group == 16 && channels % 2 == 0 && element_size == 2 && aligned ? 2 : 1;
}

}  // namespace bisenet
