// The host side shared by the two implementations of bisenet_cuda::upsample_ce_forward,
// upsample_ce_backward and ohem_weights: ohem_ce.cpp (the schema, the input checks, the
// CPU loops, registered for CPU) and ohem_ce.cu (the CUDA kernels, registered for CUDA). A
// call is checked, its tensors made contiguous and its outputs allocated once, here,
// whatever the device.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "ohem_ce_math.h"

namespace bisenet {

struct CeForwardCall {
  at::Tensor logits, labels;      // contiguous
  at::Tensor loss, lse;           // (N, H, W) float32 (float64 for float64 logits)
  at::Tensor mean, denominator;   // () like loss: the CE mean, max(count, 1); (0,) when not asked for
  at::Tensor block_sums, block_counts;  // (forward blocks,) like loss and int64: the mean's workspace; (0,) without it
  CeForwardPlan plan;             // ohem_ce_math.h; band 0 when there is nothing to compute
};

// A call's optional tensor's data, or nullptr where the argument was not given.
template <typename T>
const T* data_or_null(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.const_data_ptr<T>() : nullptr;
}

// upsample_ce_backward's optional arguments beside grad_loss (their meaning: CeBackwardCall).
struct CeBackwardScales {
  std::optional<at::Tensor> grad_sum, sum_weight, grad_scale, sum_divisor;
};

struct CeBackwardCall {
  at::Tensor grad_loss, logits, labels, lse;  // contiguous
  // 1; 0 where grad_loss is one value for every pixel (an expanded scalar, as the backward of
  // a mean gives), then held as that one value: grad_loss[p * grad_stride] is pixel p's
  int grad_stride = 1;
  at::Tensor grad_logits;
  CeBackwardPlan plan;  // ohem_ce_math.h; unset when there is nothing to compute (an empty batch)
  at::Tensor rim;       // workspace: the grid-line logits' partial gradients (bilinear.h: TileRim)
  // optional, both or neither: grad_sum (like logits, in lse's dtype), the gradient of a sum
  // of pixels' losses (upsample_ce_forward_grad's), and sum_weight (() like lse, on the
  // device), each such pixel's weight. Where sum_weight is not 0 (OHEM's hard branch:
  // ohem_ce_math.h, ohem_hard_weight), or where there is no grad_loss (sum_only), the
  // gradient is grad_sum times sum_weight (over sum_divisor, where given) times grad_scale
  // and the gather is skipped.
  at::Tensor grad_sum, sum_weight;
  at::Tensor sum_divisor;  // optional, () like lse on the device (the CE mean's denominator)
  bool sum_only = false;  // no grad_loss: nothing to gather (grad_loss and the plan unset)
  at::Tensor grad_scale;  // optional, () like lse on the device: the incoming gradient's factor
};

// The forward with gradient (ohem_ce_math.h): the forward's outputs and the CE mean's
// workspace (one sum and count per backward tile), the gradient of the counted pixels'
// summed losses, over the backward's tiles with all classes in one pass.
struct CeForwardGradCall {
  CeForwardCall forward;  // its plan unused (band 0): the tiles are plan's
  at::Tensor grad_sum;    // (N, C, h, w) like loss
  CeBackwardPlan plan;    // pass_classes kCeChunkClasses; band 0 when there is nothing to compute
  at::Tensor rim;         // as the backward's
  bool hard_only = false;  // grad_sum over the hard pixels, loss > threshold (ohem_ce_math.h: CeGradPixels)
  double threshold = 0;
};

// Which pixels the call's grad_sum adds up (ohem_ce_math.h: CeGradPixels).
template <typename acc_t>
CeGradPixels<acc_t> grad_pixels(const CeForwardGradCall& call) {
  return {call.hard_only, static_cast<acc_t>(call.threshold)};
}

// The rim workspace `rim` of a backward-tiled call on logits (bilinear.h: TileRim).
template <typename acc_t>
TileRim<acc_t> tile_rim_of(const at::Tensor& rim, const at::Tensor& logits, const CeBackwardPlan& plan) {
  return make_tile_rim<acc_t>(rim.mutable_data_ptr<acc_t>(), static_cast<int>(logits.size(0)),
                              static_cast<int>(logits.size(1)), static_cast<int>(logits.size(2)),
                              static_cast<int>(logits.size(3)), plan.band, plan.chunk, false);
}

struct OhemCall {
  at::Tensor loss, labels;  // (N, H, W) contiguous; loss float32 or float64
  at::Tensor weights;       // like loss
  at::Tensor value;         // () like loss: sum(weights * loss), the OHEM loss
  at::Tensor hard_weight;   // () like loss: ohem_hard_weight
  at::Tensor block_sums;    // (sum_blocks,) like loss: its workspace
  // scratch: one int64 buffer, not zeroed here (the CPU loop zeroes it, the CUDA kernel
  // itself, in its launch): state, counts and class_counts are views of it, in this order
  at::Tensor scratch;
  at::Tensor state;   // (kOhemStateSize,) int64: ohem_ce_math.h's OhemState
  at::Tensor counts;  // (passes, 256) int64: each radix pass's histogram
  double threshold;
  int64_t min_kept;
  // with class weights (classes > 0): the weights (C,) like loss, contiguous; the kept and
  // tied pixels' counts per class (2, C) int64
  int classes = 0;
  at::Tensor class_weights, class_counts;
};

// ohem_ce.cpp. prepare_ce_backward plans with shared_budget, the most shared memory a block
// may take on the device that runs it (ohem_ce_math.h: kCeMaxSharedBytes).
CeForwardCall prepare_ce_forward(const at::Tensor& logits, const at::Tensor& labels, bool with_mean);
CeBackwardCall prepare_ce_backward(const std::optional<at::Tensor>& grad_loss, const at::Tensor& logits,
                                   const at::Tensor& labels, const at::Tensor& lse, int64_t band, int64_t chunk,
                                   int64_t shared_budget, const CeBackwardScales& scales);
CeForwardGradCall prepare_ce_forward_grad(const at::Tensor& logits, const at::Tensor& labels, int64_t band,
                                          int64_t chunk, int64_t shared_budget, std::optional<double> threshold);
OhemCall prepare_ohem_weights(const at::Tensor& loss, const at::Tensor& labels, double threshold, int64_t min_kept,
                              const std::optional<at::Tensor>& class_weights);

// Runs CALL(scalar_t, label_t) for the logits' and labels' dtypes (checked by the prepare_*).
#define BISENET_CE_DISPATCH(logits, labels, CALL)                                                    \
  do {                                                                                               \
    const bool bytes = (labels).scalar_type() == at::kByte;                                          \
    switch ((logits).scalar_type()) {                                                                \
      case at::kFloat: if (bytes) CALL(float, uint8_t); else CALL(float, int64_t); break;            \
      case at::kDouble: if (bytes) CALL(double, uint8_t); else CALL(double, int64_t); break;         \
      case at::kHalf: if (bytes) CALL(c10::Half, uint8_t); else CALL(c10::Half, int64_t); break;     \
      default: if (bytes) CALL(c10::BFloat16, uint8_t); else CALL(c10::BFloat16, int64_t); break;    \
    }                                                                                                \
  } while (0)

// Runs CALL(acc_t, label_t) for a per-pixel loss's and the labels' dtypes (checked by the
// prepare_*): ohem_weights, the CE mean.
#define BISENET_OHEM_DISPATCH(loss, labels, CALL)                 \
  do {                                                            \
    const bool bytes = (labels).scalar_type() == at::kByte;       \
    if ((loss).scalar_type() == at::kDouble) {                    \
      if (bytes) CALL(double, uint8_t); else CALL(double, int64_t); \
    } else {                                                      \
      if (bytes) CALL(float, uint8_t); else CALL(float, int64_t);   \
    }                                                             \
  } while (0)

}  // namespace bisenet
