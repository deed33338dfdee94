// Bilinear taps of PyTorch's F.interpolate(mode="bilinear", align_corners=False, size=...),
// the sample at one pixel, the rows/columns that read a low-res index and the rim of a tiled
// gather backward, shared by the CUDA kernels and the C++ CPU loops (so the CPU tests check the kernels'
// arithmetic, bit for bit: see same_bits.h). Light on purpose: no torch headers.
#pragma once

#include <stdint.h>

#include "same_bits.h"

namespace bisenet {

// The two source rows (or columns) and their weights for one output index, exactly as
// ATen's upsample_bilinear2d computes them with align_corners=False and no scale factor:
// scale = in / out, src = max(scale * (dst + 0.5) - 0.5, 0), i0 = (int)src,
// (the multiply-add as one fma, as nvcc compiles ATen's CUDA kernel; so host and device
// agree on every tap, which the backward's tile sizes depend on)
// i1 = i0 + (i0 < in - 1), w1 = src - i0, w0 = 1 - w1. `acc_t` is float for float/half/
// bfloat16 data and double for double data, as in ATen.
template <typename acc_t>
struct Taps {
  int i0, i1;
  acc_t w0, w1;
};

template <typename acc_t>
BISENET_HD acc_t bilinear_scale(int in_size, int out_size) {
  return static_cast<acc_t>(in_size) / static_cast<acc_t>(out_size);
}

template <typename acc_t>
BISENET_HD Taps<acc_t> bilinear_taps(int dst, int in_size, acc_t scale) {
  acc_t src = fma_acc(scale, static_cast<acc_t>(dst) + static_cast<acc_t>(0.5), static_cast<acc_t>(-0.5));
  if (src < static_cast<acc_t>(0)) src = static_cast<acc_t>(0);
  Taps<acc_t> t;
  t.i0 = static_cast<int>(src);
  t.i1 = t.i0 + (t.i0 < in_size - 1 ? 1 : 0);
  t.w1 = src - static_cast<acc_t>(t.i0);
  t.w0 = static_cast<acc_t>(1) - t.w1;
  return t;
}

// Smallest dst in [0, out_size] whose tap i0 is >= i (out_size when there is none).
// i0(dst) is non-decreasing, so the rows with i0 in [a, b) are [first(a), first(b)).
// The estimate inverts src = scale * (dst + 0.5) - 0.5; the loops make it exact for the
// float arithmetic of bilinear_taps.
template <typename acc_t>
BISENET_HD int first_dst_with_tap_at_least(int i, int in_size, int out_size, acc_t scale) {
  if (i <= 0) return 0;
  if (i >= in_size) return out_size;
  acc_t estimate = (static_cast<acc_t>(i) + static_cast<acc_t>(0.5)) / scale - static_cast<acc_t>(0.5);
  int dst = estimate <= static_cast<acc_t>(0) ? 0 : static_cast<int>(estimate);
  if (dst > out_size) dst = out_size;
  while (dst > 0 && bilinear_taps<acc_t>(dst - 1, in_size, scale).i0 >= i) --dst;
  while (dst < out_size && bilinear_taps<acc_t>(dst, in_size, scale).i0 < i) ++dst;
  return dst;
}

// Weight with which high-res index dst (taps t) reads low-res index i (both taps may be i
// at the last row/column, where i1 == i0).
template <typename acc_t>
BISENET_HD acc_t tap_weight(const Taps<acc_t>& t, int i) {
  acc_t weight = static_cast<acc_t>(0);
  if (t.i0 == i) weight += t.w0;
  if (t.i1 == i) weight += t.w1;
  return weight;
}

// The sizes the ops take, checked on the host (ohem_ce.cpp, bga.cpp): every side (N, C, H, W,
// h, w) below kSideLimit and every tile side (band, chunk, tile_h, tile_w) below kTileLimit,
// so that in int a side plus a tile (a tile loop's last step), a rim's 2 (tile_h + tile_w)
// entries and a tile's spans stay below 2^31.
constexpr int64_t kSideLimit = int64_t{1} << 30;
constexpr int64_t kTileLimit = int64_t{1} << 20;

template <typename Sizes>
inline bool sides_below_limit(const Sizes& sizes) {
  for (const int64_t side : sizes)
    if (side >= kSideLimit) return false;
  return true;
}

// Host side: the most high-res indices any tile of `tile` low-res indices (tiles starting at
// 0, tile, 2 tile, ...) owns, [first(i0), first(i0 + tile)): the backward kernels'
// shared-memory capacities, from the tap arithmetic the kernels run (same_bits.h).
template <typename acc_t>
inline int most_owned_span(int in_size, int out_size, acc_t scale, int tile) {
  int most = 0;
  for (int i0 = 0; i0 < in_size; i0 += tile) {
    const int i1 = i0 + tile < in_size ? i0 + tile : in_size;
    const int span = first_dst_with_tap_at_least(i1, in_size, out_size, scale) -
                     first_dst_with_tap_at_least(i0, in_size, out_size, scale);
    if (span > most) most = span;
  }
  return most;
}

// ---------------------------------------------------------------------------------------
// The rim of a tiled gather backward (bga_math.h and ohem_ce_math.h use it). The low-res
// plane (h, w) is cut into tiles of tile_h x tile_w; a tile owns the high-res pixels whose
// first taps lie in it (rows [first(ly0), first(ly1)), likewise columns), and only that
// tile reads them. Their taps reach the tile's low-res pixels and one row and one column
// beyond: [ly0, ly1] x [lx0, lx1] within the plane (reached_span). A low-res pixel strictly
// inside the tile's grid lines is reached by that tile's pixels alone; one on a grid line
// (i a multiple of tile_h, or j of tile_w) by the pixels of up to four tiles. Each of those
// tiles writes its partial sums for the pixel to a workspace, the rim (per tile: its top
// and bottom rows, tile_w + 1 entries each, then its left and right columns without the
// corners, tile_h - 1 each), and a second pass adds them up in a fixed order: deterministic,
// no atomics, and no high-res pixel read twice.

// Low-res rows (or columns) a tile [lo, hi) reaches: [lo, hi] within [0, size).
BISENET_HD int reached_span(int lo, int hi, int size) { return (hi < size ? hi + 1 : size) - lo; }

template <typename acc_t>
struct TileRim {
  acc_t* data;
  int tile_h, tile_w, tiles_y, tiles_x, entries;
  int64_t value_stride, n_stride, tile_stride, entry_stride, channel_stride;
};

BISENET_HD int rim_entries(int tile_h, int tile_w) { return 2 * (tile_h + tile_w); }

// The workspace of `values` partial sums per entry and channel: value-major, then sample,
// tile; within a tile channels fastest (channels_fastest, for channels_last data) or each
// channel's entries adjacent.
template <typename acc_t>
BISENET_HD TileRim<acc_t> make_tile_rim(acc_t* data, int N, int C, int h, int w, int tile_h, int tile_w,
                                        bool channels_fastest) {
  TileRim<acc_t> rim;
  rim.data = data;
  rim.tile_h = tile_h;
  rim.tile_w = tile_w;
  rim.tiles_y = (h + tile_h - 1) / tile_h;
  rim.tiles_x = (w + tile_w - 1) / tile_w;
  rim.entries = rim_entries(tile_h, tile_w);
  rim.entry_stride = channels_fastest ? C : 1;
  rim.channel_stride = channels_fastest ? 1 : rim.entries;
  rim.tile_stride = static_cast<int64_t>(C) * rim.entries;
  rim.n_stride = rim.tile_stride * rim.tiles_y * rim.tiles_x;
  rim.value_stride = rim.n_stride * N;
  return rim;
}

inline int64_t tile_rim_elements(int values, int N, int C, int h, int w, int tile_h, int tile_w) {
  const int64_t tiles = static_cast<int64_t>((h + tile_h - 1) / tile_h) * ((w + tile_w - 1) / tile_w);
  return static_cast<int64_t>(values) * N * tiles * rim_entries(tile_h, tile_w) * C;
}

// Whether the tile's local low-res pixel (ii, jj) in [0, tile_h] x [0, tile_w] lies on a
// grid line, and its rim entry.
BISENET_HD bool on_rim(int ii, int jj, int tile_h, int tile_w) {
  return ii == 0 || jj == 0 || ii == tile_h || jj == tile_w;
}
// Host side: how many of the rows x cols low-res pixels a tile reaches it finishes itself
// (those not on_rim); the plan ops count the outputs written with it.
inline int64_t tile_finished_pixels(int rows, int cols, int tile_h, int tile_w) {
  int64_t finished = 0;
  for (int ii = 0; ii < rows; ++ii)
    for (int jj = 0; jj < cols; ++jj) finished += !on_rim(ii, jj, tile_h, tile_w);
  return finished;
}

BISENET_HD int rim_entry(int ii, int jj, int tile_h, int tile_w) {
  if (ii == 0) return jj;
  if (ii == tile_h) return tile_w + 1 + jj;
  return 2 * (tile_w + 1) + (jj == 0 ? 0 : tile_h - 1) + ii - 1;
}

// Where tile (tile_y, tile_x) keeps value 0 of its local pixel (ii, jj), channel c; value v
// is v * value_stride further.
template <typename acc_t>
BISENET_HD int64_t rim_offset(const TileRim<acc_t>& rim, int n, int tile_y, int tile_x, int ii, int jj, int c) {
  return n * rim.n_stride + (static_cast<int64_t>(tile_y) * rim.tiles_x + tile_x) * rim.tile_stride +
         rim_entry(ii, jj, rim.tile_h, rim.tile_w) * rim.entry_stride + c * rim.channel_stride;
}

// The low-res pixels on grid lines, per sample and channel: the grid rows (i a multiple of
// tile_h) whole, then the grid columns without those rows; rim_pixel gives the p-th.
template <typename acc_t>
BISENET_HD int64_t rim_pixels(const TileRim<acc_t>& rim, int h, int w) {
  return static_cast<int64_t>(rim.tiles_y) * w + static_cast<int64_t>(rim.tiles_x) * (h - rim.tiles_y);
}

template <typename acc_t>
BISENET_HD void rim_pixel(const TileRim<acc_t>& rim, int h, int w, int p, int* i, int* j) {
  const int on_rows = rim.tiles_y * w;
  if (p < on_rows) {
    *i = p / w * rim.tile_h;
    *j = p % w;
  } else {  // the q-th row that is not a grid row (tile_h > 1 here) of grid column k
    const int q = (p - on_rows) % (h - rim.tiles_y);
    *j = (p - on_rows) / (h - rim.tiles_y) * rim.tile_w;
    *i = q / (rim.tile_h - 1) * rim.tile_h + q % (rim.tile_h - 1) + 1;
  }
}

// The sum of value `value` of grid-line pixel (i, j), channel c, over the tiles that reach
// it, in the order (tile_y, tile_x) ascending: one, two or four partial sums.
template <typename acc_t>
BISENET_HD acc_t rim_sum(const TileRim<acc_t>& rim, int value, int n, int c, int i, int j) {
  const int ty_last = i / rim.tile_h, tx_last = j / rim.tile_w;
  const int ty_first = i % rim.tile_h == 0 && i > 0 ? ty_last - 1 : ty_last;
  const int tx_first = j % rim.tile_w == 0 && j > 0 ? tx_last - 1 : tx_last;
  const acc_t* data = rim.data + value * rim.value_stride;
  acc_t sum = static_cast<acc_t>(0);
  for (int tile_y = ty_first; tile_y <= ty_last; ++tile_y)
    for (int tile_x = tx_first; tile_x <= tx_last; ++tile_x)
      sum = sum + data[rim_offset(rim, n, tile_y, tile_x, i - tile_y * rim.tile_h, j - tile_x * rim.tile_w, c)];
  return sum;
}

template <typename scalar_t, typename acc_t>
BISENET_HD acc_t load_acc(const scalar_t* ptr, int64_t offset) {
  return static_cast<acc_t>(ptr[offset]);
}

// w0 * v0 + w1 * v1 with one fma: the interpolation between two taps.
template <typename acc_t>
BISENET_HD acc_t lerp_taps(const Taps<acc_t>& t, acc_t v0, acc_t v1) {
  return fma_acc(t.w1, v1, t.w0 * v0);
}

// up at one high-res pixel from the values at its four taps (v01: row tap i0, column tap
// i1), in ATen's order: wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (...).
template <typename acc_t>
BISENET_HD acc_t bilinear_combine(const Taps<acc_t>& ty, const Taps<acc_t>& tx, acc_t v00, acc_t v01, acc_t v10,
                                  acc_t v11) {
  return lerp_taps(ty, lerp_taps(tx, v00, v01), lerp_taps(tx, v10, v11));
}

// up(plane) at one high-res pixel; offset_t: int32_t where the plane's offsets fit.
template <typename scalar_t, typename acc_t, typename offset_t = int64_t>
BISENET_HD acc_t bilinear_sample(const scalar_t* plane, offset_t sy, offset_t sx,
                                 const Taps<acc_t>& ty, const Taps<acc_t>& tx) {
  return bilinear_combine(ty, tx, load_acc<scalar_t, acc_t>(plane, ty.i0 * sy + tx.i0 * sx),
                          load_acc<scalar_t, acc_t>(plane, ty.i0 * sy + tx.i1 * sx),
                          load_acc<scalar_t, acc_t>(plane, ty.i1 * sy + tx.i0 * sx),
                          load_acc<scalar_t, acc_t>(plane, ty.i1 * sy + tx.i1 * sx));
}

}  // namespace bisenet
