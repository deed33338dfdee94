// The arithmetic of the fused upsample + cross-entropy loss:
//   z[n, c, y, x] = up(logits)[n, c, y, x]        bilinear, align_corners=False, (h, w) -> (H, W)
//   lse[n, y, x]  = log(sum_c exp(z[n, c, y, x]))
//   loss[n, y, x] = lse[n, y, x] - z[n, label, y, x]    (0 where label == ignore_index)
// and its gradient: d loss[p] / d z[c, p] = softmax_c(z[p]) - [c == label[p]].
//
// Everything here is __host__ __device__: the CUDA kernels (ohem_ce.cu) run these functions
// with one thread per item, the C++ CPU loops (ohem_ce.cpp) run the very same functions in a
// serial loop, so the CPU tests check the kernels' arithmetic.
//
// Forward: one item per high-res pixel; z is interpolated on the fly from the low-res logits
// (4 taps per class), never stored. The pixel keeps its loss and lse (for the backward).
// Backward, a deterministic gather (no atomics), separable like the upsampling: the gradient
// of logit (n, c, i, j) is
//     sum_x w_x(x, j) * [ sum_y w_y(y, i) * g[y, x] * (exp(z[c, y, x] - lse[y, x]) - [c == label]) ]
// with z recomputed from the logits; the rows that read low-res row i are those whose first
// tap is i - 1 or i (bilinear.h: first_dst_with_tap_at_least), likewise columns. One CUDA
// block per low-res row (n, c, i): stage 1, one item per high-res column x, the bracket (the
// row sums, W values in shared memory); stage 2, one item per low-res column j, the x-sum.
// Each high-res (c, y, x) is evaluated by the two blocks of its two row taps (not four
// times, as a gather per logit would), with reads coalesced along x. Pixels with a zero
// incoming gradient (ignored, or not kept by OHEM) are skipped.
//
// The OHEM selection needs the k-th largest pixel loss; it is found by a radix select over
// the loss's float bits (non-negative floats order as their bit patterns read as integers),
// 8 bits at a time from the top: radix_digit says which of 256 bins an entry falls in.
#pragma once

#include <math.h>
#include <stdint.h>

#include "bilinear.h"

namespace bisenet {

template <typename acc_t>
BISENET_HD acc_t quiet_nan() {
  return static_cast<acc_t>(NAN);
}

// Sizes of one call: logits (N, C, h, w) and labels (N, H, W), both dense and contiguous.
template <typename acc_t>
struct CeGeometry {
  int N, C, h, w, H, W;
  acc_t scale_y, scale_x;  // in / out, as ATen computes them
};

template <typename acc_t>
CeGeometry<acc_t> make_ce_geometry(int64_t N, int64_t C, int64_t h, int64_t w, int64_t H, int64_t W) {
  CeGeometry<acc_t> geo;
  geo.N = static_cast<int>(N);
  geo.C = static_cast<int>(C);
  geo.h = static_cast<int>(h);
  geo.w = static_cast<int>(w);
  geo.H = static_cast<int>(H);
  geo.W = static_cast<int>(W);
  geo.scale_y = bilinear_scale<acc_t>(geo.h, geo.H);
  geo.scale_x = bilinear_scale<acc_t>(geo.w, geo.W);
  return geo;
}

// Forward of high-res pixel `pixel` (flat index into (N, H, W)). logits: (N, C, h, w).
// Writes its loss and lse: 0 and 0 where the label is ignore_index, NaN and NaN where the
// label is outside [0, C) (nothing is read out of bounds; the loss turns non-finite).
template <typename scalar_t, typename label_t, typename acc_t>
BISENET_HD void ce_pixel_forward(int64_t pixel, const CeGeometry<acc_t>& geo, const scalar_t* logits,
                                 const label_t* labels, int64_t ignore_index, acc_t* loss, acc_t* lse) {
  const int64_t label = static_cast<int64_t>(labels[pixel]);
  if (label == ignore_index) {
    loss[pixel] = static_cast<acc_t>(0);
    lse[pixel] = static_cast<acc_t>(0);
    return;
  }
  if (label < 0 || label >= geo.C) {
    loss[pixel] = quiet_nan<acc_t>();
    lse[pixel] = quiet_nan<acc_t>();
    return;
  }
  const int x = static_cast<int>(pixel % geo.W);
  const int y = static_cast<int>((pixel / geo.W) % geo.H);
  const int64_t n = pixel / (static_cast<int64_t>(geo.W) * geo.H);
  const int64_t plane = static_cast<int64_t>(geo.h) * geo.w;
  const scalar_t* sample = logits + n * geo.C * plane;
  const Taps<acc_t> ty = bilinear_taps<acc_t>(y, geo.h, geo.scale_y);
  const Taps<acc_t> tx = bilinear_taps<acc_t>(x, geo.w, geo.scale_x);
  // one pass over the classes: running maximum and the sum of exp(z - maximum)
  acc_t max_z = bilinear_sample<scalar_t, acc_t>(sample, geo.w, 1, ty, tx);
  acc_t label_z = max_z;
  acc_t sum = static_cast<acc_t>(1);
  for (int c = 1; c < geo.C; ++c) {
    const acc_t z = bilinear_sample<scalar_t, acc_t>(sample + c * plane, geo.w, 1, ty, tx);
    if (c == label) label_z = z;
    if (z > max_z) {
      sum = fma_acc(sum, exp_acc(max_z - z), static_cast<acc_t>(1));
      max_z = z;
    } else {
      sum += exp_acc(z - max_z);
    }
  }
  const acc_t pixel_lse = max_z + log_acc(sum);
  lse[pixel] = pixel_lse;
  loss[pixel] = pixel_lse - label_z;
}

// Backward, stage 1 of a block (n, c, i): the y-sum of high-res column x for low-res row i,
//     sum over y reading row i of  w_y(y, i) * g[y, x] * (exp(z[c, y, x] - lse[y, x]) - [c == label])
// (0 terms for ignored pixels and zero incoming gradients, which are skipped).
// plane: logits (n, c) (h, w); the per-pixel pointers point at sample n's (H, W).
template <typename scalar_t, typename label_t, typename acc_t>
BISENET_HD acc_t ce_backward_row_sum(const CeGeometry<acc_t>& geo, const scalar_t* plane, const label_t* labels,
                                     const acc_t* grad_loss, const acc_t* lse, int64_t ignore_index, int c, int i,
                                     int x) {
  const Taps<acc_t> tx = bilinear_taps<acc_t>(x, geo.w, geo.scale_x);
  const int y_begin = first_dst_with_tap_at_least(i - 1, geo.h, geo.H, geo.scale_y);
  const int y_end = first_dst_with_tap_at_least(i + 1, geo.h, geo.H, geo.scale_y);
  acc_t sum = static_cast<acc_t>(0);
  for (int y = y_begin; y < y_end; ++y) {
    const int64_t p = static_cast<int64_t>(y) * geo.W + x;
    const acc_t g = grad_loss[p];
    const int64_t label = static_cast<int64_t>(labels[p]);
    if (g == static_cast<acc_t>(0) || label == ignore_index) continue;
    const Taps<acc_t> ty = bilinear_taps<acc_t>(y, geo.h, geo.scale_y);
    const acc_t weight_y = tap_weight(ty, i);
    if (weight_y == static_cast<acc_t>(0)) continue;
    const acc_t z = bilinear_sample<scalar_t, acc_t>(plane, geo.w, 1, ty, tx);
    acc_t d = exp_acc(z - lse[p]);
    if (label == c) d -= static_cast<acc_t>(1);
    sum = fma_acc(weight_y * g, d, sum);
  }
  return sum;
}

// The backward block's shared memory: the row sums of one low-res row (W values). The
// budget is the default per-block limit; ohem_ce.cpp checks it for the CPU loop and the
// CUDA launch alike.
constexpr int64_t kCeSharedBytes = 48 * 1024;
inline int64_t ce_backward_shared_bytes(int64_t W, int64_t acc_bytes) { return W * acc_bytes; }

// Backward, stage 2: the gradient of logit (n, c, i, j) from the block's row sums (W).
template <typename acc_t>
BISENET_HD acc_t ce_backward_column_sum(const CeGeometry<acc_t>& geo, const acc_t* row_sums, int j) {
  const int x_begin = first_dst_with_tap_at_least(j - 1, geo.w, geo.W, geo.scale_x);
  const int x_end = first_dst_with_tap_at_least(j + 1, geo.w, geo.W, geo.scale_x);
  acc_t grad = static_cast<acc_t>(0);
  for (int x = x_begin; x < x_end; ++x)
    grad = fma_acc(tap_weight(bilinear_taps<acc_t>(x, geo.w, geo.scale_x), j), row_sums[x], grad);
  return grad;
}

// Radix select: the bin (0..255) of 32-bit pattern `bits` in the pass that looks at bits
// [shift, shift + 8), given the bits above them fixed to `prefix`; -1 when the entry is
// excluded (a negative pattern: excluded entries are marked with a negative value) or
// does not match the prefix.
BISENET_HD int radix_digit(int32_t bits, uint32_t prefix, int shift) {
  if (bits < 0) return -1;
  const uint32_t value = static_cast<uint32_t>(bits);
  const uint32_t high_mask = shift >= 24 ? 0u : (0xFFFFFFFFu << (shift + 8));
  if ((value & high_mask) != (prefix & high_mask)) return -1;
  return static_cast<int>((value >> shift) & 0xFFu);
}

}  // namespace bisenet
