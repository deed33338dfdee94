// Bilinear taps of PyTorch's F.interpolate(mode="bilinear", align_corners=False, size=...),
// the sample at one pixel and the rows/columns that read a low-res index (for the gather
// backward), shared by the CUDA kernels and the C++ CPU loops (so the CPU tests check the kernels'
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

// Smallest dst that gives low-res index i a nonzero weight: first_dst_with_tap_at_least(i - 1)
// past the leading dst of tap i - 1 whose weight to i is 0 (those clamped at the border,
// src = 0, or one whose src is exactly i - 1; they read only i - 1).
template <typename acc_t>
BISENET_HD int first_dst_reading(int i, int in_size, int out_size, acc_t scale) {
  int dst = first_dst_with_tap_at_least(i - 1, in_size, out_size, scale);
  const int end = first_dst_with_tap_at_least(i, in_size, out_size, scale);
  while (dst < end && tap_weight(bilinear_taps<acc_t>(dst, in_size, scale), i) == static_cast<acc_t>(0)) ++dst;
  return dst;
}

// Host side: the most high-res indices any tile of `tile` low-res indices (tiles starting at
// 0, tile, 2 tile, ...) has in its window, [first_dst_with_tap_at_least(i0 - 1), first(i0 +
// tile)), or from first_dst_reading(i0) with `reading_only`: the backward kernels'
// shared-memory capacities, from the tap arithmetic the kernels use.
template <typename acc_t>
inline int most_window_span(int in_size, int out_size, acc_t scale, int tile, bool reading_only) {
  int most = 0;
  for (int i0 = 0; i0 < in_size; i0 += tile) {
    const int i1 = i0 + tile < in_size ? i0 + tile : in_size;
    const int begin = reading_only ? first_dst_reading(i0, in_size, out_size, scale)
                                   : first_dst_with_tap_at_least(i0 - 1, in_size, out_size, scale);
    const int span = first_dst_with_tap_at_least(i1, in_size, out_size, scale) - begin;
    if (span > most) most = span;
  }
  return most;
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

// up(plane) at one high-res pixel, in ATen's order: wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (...).
template <typename scalar_t, typename acc_t>
BISENET_HD acc_t bilinear_sample(const scalar_t* plane, int64_t sy, int64_t sx,
                                 const Taps<acc_t>& ty, const Taps<acc_t>& tx) {
  acc_t row0 = lerp_taps(tx, load_acc<scalar_t, acc_t>(plane, ty.i0 * sy + tx.i0 * sx),
                         load_acc<scalar_t, acc_t>(plane, ty.i0 * sy + tx.i1 * sx));
  acc_t row1 = lerp_taps(tx, load_acc<scalar_t, acc_t>(plane, ty.i1 * sy + tx.i0 * sx),
                         load_acc<scalar_t, acc_t>(plane, ty.i1 * sy + tx.i1 * sx));
  return lerp_taps(ty, row0, row1);
}

}  // namespace bisenet
