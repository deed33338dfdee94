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
// block per low-res row and group of up to 8 classes (n, c0, i): stage 1, one item per
// high-res column x, the bracket for each class of the group (the row sums, W values per
// class in shared memory; the pixel's gradient, label and lse read once for the group);
// stage 2, one item per (class, low-res column j), the x-sum. Each high-res (c, y, x) is
// evaluated by the two blocks of its two row taps (not four times, as a gather per logit
// would), with reads coalesced along x. Pixels with a zero incoming gradient (ignored, or not
// kept by OHEM) are skipped.
//
// The OHEM selection (the k-th largest pixel loss by a radix select, then per-pixel
// weights) is at the end of this file.
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

// Backward, stage 1 of a block (n, class group [c0, c0 + classes), i): for high-res column x
// and each class c of the group, the y-sum for low-res row i,
//     sum over y reading row i of  w_y(y, i) * g[y, x] * (exp(z[c, y, x] - lse[y, x]) - [c == label])
// (0 terms for ignored pixels and zero incoming gradients, which are skipped), into
// sums[k * stride] for class c0 + k. Each pixel's gradient, label and lse are read once for
// the whole group. sample: logits of sample n (C, h, w); the per-pixel pointers point at
// sample n's (H, W).
template <typename scalar_t, typename label_t, typename acc_t>
BISENET_HD void ce_backward_row_sums(const CeGeometry<acc_t>& geo, const scalar_t* sample, const label_t* labels,
                                     const acc_t* grad_loss, const acc_t* lse, int64_t ignore_index, int c0,
                                     int classes, int i, int x, acc_t* sums, int stride) {
  const Taps<acc_t> tx = bilinear_taps<acc_t>(x, geo.w, geo.scale_x);
  const int y_begin = first_dst_with_tap_at_least(i - 1, geo.h, geo.H, geo.scale_y);
  const int y_end = first_dst_with_tap_at_least(i + 1, geo.h, geo.H, geo.scale_y);
  const int64_t plane = static_cast<int64_t>(geo.h) * geo.w;
  for (int k = 0; k < classes; ++k) sums[k * stride] = static_cast<acc_t>(0);
  for (int y = y_begin; y < y_end; ++y) {
    const int64_t p = static_cast<int64_t>(y) * geo.W + x;
    const acc_t g = grad_loss[p];
    const int64_t label = static_cast<int64_t>(labels[p]);
    if (g == static_cast<acc_t>(0) || label == ignore_index) continue;
    const Taps<acc_t> ty = bilinear_taps<acc_t>(y, geo.h, geo.scale_y);
    const acc_t weight_y = tap_weight(ty, i);
    if (weight_y == static_cast<acc_t>(0)) continue;
    const acc_t weighted_g = weight_y * g;
    const acc_t pixel_lse = lse[p];
    for (int k = 0; k < classes; ++k) {
      const int c = c0 + k;
      const acc_t z = bilinear_sample<scalar_t, acc_t>(sample + c * plane, geo.w, 1, ty, tx);
      acc_t d = exp_acc(z - pixel_lse);
      if (label == c) d -= static_cast<acc_t>(1);
      sums[k * stride] = fma_acc(weighted_g, d, sums[k * stride]);
    }
  }
}

// The backward block's classes: as many as 8 whose row sums (W values each) fit the
// shared-memory budget; ohem_ce.cpp checks that one class fits, for the CPU loop and the
// CUDA launch alike.
constexpr int64_t kCeSharedBytes = 48 * 1024;
inline int ce_backward_classes_per_block(int64_t C, int64_t W, int64_t acc_bytes) {
  int64_t classes = kCeSharedBytes / (W * acc_bytes);
  if (classes > 8) classes = 8;
  if (classes > C) classes = C;
  return static_cast<int>(classes);
}

// Which rows and classes backward block `block` owns: blocks run over (n, class group, i),
// i fastest.
struct CeBackwardBlock {
  int64_t n;
  int c0, classes, i;
};

template <typename acc_t>
BISENET_HD CeBackwardBlock ce_backward_block(int64_t block, const CeGeometry<acc_t>& geo, int classes_per_block) {
  const int groups = (geo.C + classes_per_block - 1) / classes_per_block;
  CeBackwardBlock b;
  b.i = static_cast<int>(block % geo.h);
  const int64_t rest = block / geo.h;
  b.c0 = static_cast<int>(rest % groups) * classes_per_block;
  b.n = rest / groups;
  b.classes = geo.C - b.c0 < classes_per_block ? geo.C - b.c0 : classes_per_block;
  return b;
}

// Backward, stage 2: the gradient of logit (n, c, i, j) from its class's row sums (W).
template <typename acc_t>
BISENET_HD acc_t ce_backward_column_sum(const CeGeometry<acc_t>& geo, const acc_t* row_sums, int j) {
  const int x_begin = first_dst_with_tap_at_least(j - 1, geo.w, geo.W, geo.scale_x);
  const int x_end = first_dst_with_tap_at_least(j + 1, geo.w, geo.W, geo.scale_x);
  acc_t grad = static_cast<acc_t>(0);
  for (int x = x_begin; x < x_end; ++x)
    grad = fma_acc(tap_weight(bilinear_taps<acc_t>(x, geo.w, geo.scale_x), j), row_sums[x], grad);
  return grad;
}

// ---------------------------------------------------------------------------------------
// OHEM selection: bisenet_cuda::ohem_weights(loss, labels, ignore_index, threshold,
// min_kept) -> per-pixel weights w with sum(w * loss) the OHEM loss. Valid pixels are those
// whose label is not ignore_index; k = min(min_kept, valid) (valid // 16 when min_kept < 0);
// the hard pixels are the valid ones with loss > threshold (= -log(thresh)). If at least k
// are hard (or k == 0), w = [hard] / hard; else the k largest losses: w = [loss > kth] / k,
// and the pixels tied at the k-th largest share what remains, (k - greater) / tied / k each.
//
// The k-th largest comes from a radix select, 8 bits at a time from the top, over each valid
// pixel's key: its loss clamped at 0 (a rounding can leave a loss a hair below 0, and -0.0
// reads negative) as unsigned bits, which order like the non-negative floats. The running
// numbers live in a small int64 array on the device (OhemState), so no value comes to the
// host: counts, then per pass a histogram of the matching keys' next digit and the pick of
// the digit, then the counts of keys above and at the k-th, then the weights.
// At most this many classes take class weights (the CUDA tally's bins in shared memory).
constexpr int kOhemMaxClasses = 4096;

enum OhemState { kOhemValid, kOhemHard, kOhemK, kOhemUseHard, kOhemRemaining, kOhemPrefix, kOhemGreater,
                 kOhemTied, kOhemStateSize };

template <typename acc_t>
struct OhemKey;
template <>
struct OhemKey<float> {
  using type = uint32_t;
};
template <>
struct OhemKey<double> {
  using type = uint64_t;
};

template <typename acc_t>
BISENET_HD typename OhemKey<acc_t>::type ohem_key(acc_t loss) {
  return static_cast<typename OhemKey<acc_t>::type>(value_to_bits(loss > static_cast<acc_t>(0) ? loss
                                                                                                 : static_cast<acc_t>(0)));
}

// After the counts: k, the branch, and the radix select's starting point.
BISENET_HD void ohem_setup(int64_t* state, int64_t min_kept) {
  const int64_t valid = state[kOhemValid];
  const int64_t k = min_kept < 0 ? valid / 16 : (min_kept < valid ? min_kept : valid);
  state[kOhemK] = k;
  state[kOhemUseHard] = (state[kOhemHard] >= k || k == 0) ? 1 : 0;
  state[kOhemRemaining] = k > 1 ? k : 1;  // the rank still to find among the keys matching the prefix
  state[kOhemPrefix] = 0;
  state[kOhemGreater] = 0;
  state[kOhemTied] = 0;
}

// The bin (0..255) of `key` in the pass over bits [shift, shift + 8), or -1 when its bits
// above those differ from the prefix's.
template <typename key_t>
BISENET_HD int ohem_digit(key_t key, int64_t prefix, int shift) {
  const int width = static_cast<int>(sizeof(key_t) * 8);
  const key_t high_mask = shift + 8 >= width ? static_cast<key_t>(0) : (~static_cast<key_t>(0) << (shift + 8));
  if ((key & high_mask) != (static_cast<key_t>(prefix) & high_mask)) return -1;
  return static_cast<int>((key >> shift) & 0xFF);
}

// After a pass's histogram: the largest digit d with at least `remaining` keys at or above
// it joins the prefix; the keys above it are ranked, so `remaining` drops by their number.
BISENET_HD void ohem_pick_digit(const int64_t* counts, int shift, int64_t* state) {
  int64_t at_least = 0;
  int digit = 0;
  int64_t above = 0;
  for (int d = 255; d >= 0; --d) {
    if (at_least + counts[d] >= state[kOhemRemaining]) {
      digit = d;
      above = at_least;
      break;
    }
    at_least += counts[d];
  }
  state[kOhemRemaining] -= above;
  state[kOhemPrefix] |= static_cast<int64_t>(digit) << shift;
}

// What the selection does with one pixel, once the state is complete.
enum OhemPick { kOhemDropped, kOhemKept, kOhemTiedAtKth };

template <typename acc_t>
BISENET_HD OhemPick ohem_pick(acc_t loss, bool valid, acc_t threshold, const int64_t* state) {
  if (!valid) return kOhemDropped;
  if (state[kOhemUseHard]) return loss > threshold ? kOhemKept : kOhemDropped;
  const auto key = ohem_key(loss);
  const auto kth = static_cast<decltype(key)>(state[kOhemPrefix]);
  return key > kth ? kOhemKept : key == kth ? kOhemTiedAtKth : kOhemDropped;
}

// The part of its weight a pixel tied at the k-th keeps: what remains of k, shared.
template <typename acc_t>
BISENET_HD acc_t ohem_tied_share(const int64_t* state) {
  const int64_t tied = state[kOhemTied];
  return tied == 0 ? static_cast<acc_t>(0)
                   : static_cast<acc_t>(state[kOhemK] - state[kOhemGreater]) / static_cast<acc_t>(tied);
}

// The weight of one pixel, once the state is complete.
template <typename acc_t>
BISENET_HD acc_t ohem_pixel_weight(acc_t loss, bool valid, acc_t threshold, const int64_t* state) {
  const OhemPick pick = ohem_pick(loss, valid, threshold, state);
  if (pick == kOhemDropped) return static_cast<acc_t>(0);
  if (state[kOhemUseHard]) {
    const int64_t hard = state[kOhemHard];
    return static_cast<acc_t>(1) / static_cast<acc_t>(hard > 1 ? hard : 1);
  }
  const acc_t k = static_cast<acc_t>(state[kOhemK]);
  if (pick == kOhemKept) return static_cast<acc_t>(1) / k;
  return ohem_tied_share<acc_t>(state) / k;
}

// With class weights cw (C,): a kept pixel of class c weighs cw[c] (a tied one cw[c] times
// its share), and the weights are divided by their sum, so the loss is the class-weighted
// mean of the kept losses. The sum comes from integer counts per class (kept, tied), which
// the kernels add in any order with the same result, then one thread in a fixed order:
//     total = sum_c cw[c] * (kept[c] + share * tied[c])
// A label outside [0, C) counts nowhere and weighs 0 (its loss is NaN; see the forward).
template <typename acc_t>
BISENET_HD acc_t ohem_class_total(const acc_t* class_weights, const int64_t* class_counts, int classes,
                                  const int64_t* state) {
  const acc_t share = ohem_tied_share<acc_t>(state);
  acc_t total = static_cast<acc_t>(0);
  for (int c = 0; c < classes; ++c) {
    const acc_t kept = fma_acc(share, static_cast<acc_t>(class_counts[classes + c]),
                               static_cast<acc_t>(class_counts[c]));
    total = fma_acc(class_weights[c], kept, total);
  }
  return total;
}

// class_counts (2, C): [0] kept, [1] tied; the slot of one pixel, or -1.
template <typename label_t>
BISENET_HD int64_t ohem_class_slot(OhemPick pick, label_t label, int classes) {
  const int64_t c = static_cast<int64_t>(label);
  if (pick == kOhemDropped || c < 0 || c >= classes) return -1;
  return pick == kOhemKept ? c : classes + c;
}

template <typename acc_t, typename label_t>
BISENET_HD acc_t ohem_class_pixel_weight(acc_t loss, label_t label, bool valid, acc_t threshold,
                                         const int64_t* state, const acc_t* class_weights, int classes, acc_t total) {
  const OhemPick pick = ohem_pick(loss, valid, threshold, state);
  const int64_t c = static_cast<int64_t>(label);
  if (pick == kOhemDropped || c < 0 || c >= classes || !(total > static_cast<acc_t>(0))) return static_cast<acc_t>(0);
  const acc_t part = pick == kOhemKept ? class_weights[c] : class_weights[c] * ohem_tied_share<acc_t>(state);
  return part / total;
}

}  // namespace bisenet
