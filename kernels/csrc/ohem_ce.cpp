// Operator registration of the fused upsample + cross-entropy loss, and its C++ CPU loops.
//
//   bisenet_cuda::upsample_ce_forward(logits, labels, ignore_index) -> (loss, lse)
//   bisenet_cuda::upsample_ce_backward(grad_loss, logits, labels, lse, ignore_index) -> grad_logits
//   bisenet_cuda::ohem_weights(loss, labels, ignore_index, threshold, min_kept, class_weights) -> weights
//
// logits (N, C, h, w) float32/bfloat16/float16/float64, labels (N, H, W) int64 or uint8;
// loss, lse, grad_loss (N, H, W) float32 (float64 for float64 logits); grad_logits like
// logits (NCHW). ohem_weights: loss (N, H, W) float32/float64 (the per-pixel losses, 0 where
// ignored), labels as above, threshold = -log(thresh), min_kept < 0 for valid // 16 ->
// weights like loss, sum(weights * loss) the OHEM loss (ohem_ce_math.h); no host sync.
// class_weights (C,) like loss, optional: the kept pixels' class-weighted mean instead.
//
// The CPU implementations run the same per-item functions (ohem_ce_math.h) as the CUDA
// kernels with the same arithmetic (same_bits.h) and the same shared-memory budget check,
// so testing them on a CPU checks the kernels' numbers bit for bit.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>
#include <vector>

#include "ohem_ce_op.h"

namespace bisenet {

namespace {

at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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
  TORCH_CHECK(logits.numel() < (int64_t{1} << 31) && labels.size(1) < (int64_t{1} << 31) &&
                  labels.size(2) < (int64_t{1} << 31),
              op, ": sizes too large");
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

template <typename scalar_t>
using acc_of = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

template <typename scalar_t, typename label_t>
void forward_cpu_typed(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                       const at::Tensor& loss, const at::Tensor& lse) {
  using acc_t = acc_of<scalar_t>;
  auto geo = make_ce_geometry<acc_t>(logits.size(0), logits.size(1), logits.size(2), logits.size(3),
                                     labels.size(1), labels.size(2));
  const scalar_t* logit_data = logits.const_data_ptr<scalar_t>();
  const label_t* label_data = labels.const_data_ptr<label_t>();
  acc_t* loss_data = loss.mutable_data_ptr<acc_t>();
  acc_t* lse_data = lse.mutable_data_ptr<acc_t>();
  for (int64_t pixel = 0; pixel < labels.numel(); ++pixel)
    ce_pixel_forward<scalar_t, label_t, acc_t>(pixel, geo, logit_data, label_data, ignore_index, loss_data,
                                               lse_data);
}

// The CUDA kernel's blocks (n, class group, i) one after the other, its two stages as loops.
template <typename scalar_t, typename label_t>
void backward_cpu_typed(const CeBackwardCall& call, int64_t ignore_index) {
  using acc_t = acc_of<scalar_t>;
  const at::Tensor& logits = call.logits;
  auto geo = make_ce_geometry<acc_t>(logits.size(0), logits.size(1), logits.size(2), logits.size(3),
                                     call.labels.size(1), call.labels.size(2));
  const scalar_t* logit_data = logits.const_data_ptr<scalar_t>();
  const label_t* labels = call.labels.const_data_ptr<label_t>();
  const acc_t* grad_loss = call.grad_loss.const_data_ptr<acc_t>();
  const acc_t* lse = call.lse.const_data_ptr<acc_t>();
  scalar_t* out = call.grad_logits.mutable_data_ptr<scalar_t>();
  const int64_t pixels = static_cast<int64_t>(geo.H) * geo.W;
  const int64_t plane = static_cast<int64_t>(geo.h) * geo.w;
  const int groups = (geo.C + call.classes_per_block - 1) / call.classes_per_block;
  std::vector<acc_t> row_sums(static_cast<size_t>(call.classes_per_block) * geo.W);  // (classes, W)
  for (int64_t block = 0; block < static_cast<int64_t>(geo.N) * groups * geo.h; ++block) {
    const CeBackwardBlock b = ce_backward_block(block, geo, call.classes_per_block);
    for (int x = 0; x < geo.W; ++x)
      ce_backward_row_sums<scalar_t, label_t, acc_t>(geo, logit_data + b.n * geo.C * plane, labels + b.n * pixels,
                                                     grad_loss + b.n * pixels, lse + b.n * pixels, ignore_index,
                                                     b.c0, b.classes, b.i, x, row_sums.data() + x, geo.W);
    for (int item = 0; item < b.classes * geo.w; ++item) {
      const int k = item / geo.w, j = item % geo.w;
      out[((b.n * geo.C + b.c0 + k) * geo.h + b.i) * geo.w + j] =
          static_cast<scalar_t>(ce_backward_column_sum<acc_t>(geo, row_sums.data() + k * geo.W, j));
    }
  }
}

}  // namespace

CeForwardCall prepare_ce_forward(const at::Tensor& logits, const at::Tensor& labels) {
  check_inputs("upsample_ce_forward", logits, labels);
  CeForwardCall call;
  call.logits = logits.contiguous();
  call.labels = labels.contiguous();
  call.loss = at::empty(labels.sizes(), logits.options().dtype(acc_type(logits)));
  call.lse = at::empty(labels.sizes(), logits.options().dtype(acc_type(logits)));
  return call;
}

CeBackwardCall prepare_ce_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                                   const at::Tensor& lse) {
  check_inputs("upsample_ce_backward", logits, labels);
  check_pixel_tensor("upsample_ce_backward", "grad_loss", grad_loss, logits, labels);
  check_pixel_tensor("upsample_ce_backward", "lse", lse, logits, labels);
  const int64_t acc_bytes = acc_type(logits) == at::kDouble ? 8 : 4;
  const int classes_per_block = ce_backward_classes_per_block(logits.size(1), labels.size(2), acc_bytes);
  TORCH_CHECK(classes_per_block >= 1, "upsample_ce_backward: labels ", labels.size(2), " wide need more than the kernel's ",
              kCeSharedBytes, " bytes of shared memory");
  TORCH_CHECK(logits.size(0) * logits.size(1) * logits.size(2) < (int64_t{1} << 31),
              "upsample_ce_backward: too many logit rows");
  CeBackwardCall call;
  call.logits = logits.contiguous();
  call.labels = labels.contiguous();
  call.grad_loss = grad_loss.contiguous();
  call.lse = lse.contiguous();
  call.grad_logits = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  call.classes_per_block = classes_per_block;
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
  call.state = at::zeros({kOhemStateSize}, loss.options().dtype(at::kLong));
  call.counts = at::zeros({256}, loss.options().dtype(at::kLong));
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
    call.class_counts = at::zeros({2, weights.numel()}, loss.options().dtype(at::kLong));
    call.class_total = at::zeros({1}, loss.options());
  }
  return call;
}

namespace {

std::tuple<at::Tensor, at::Tensor> upsample_ce_forward_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                           int64_t ignore_index) {
  const CeForwardCall call = prepare_ce_forward(logits, labels);
#define BISENET_CE_FORWARD(scalar_t, label_t) \
  forward_cpu_typed<scalar_t, label_t>(call.logits, call.labels, ignore_index, call.loss, call.lse)
  BISENET_CE_DISPATCH(call.logits, call.labels, BISENET_CE_FORWARD);
#undef BISENET_CE_FORWARD
  return {call.loss, call.lse};
}

at::Tensor upsample_ce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                                    const at::Tensor& lse, int64_t ignore_index) {
  const CeBackwardCall call = prepare_ce_backward(grad_loss, logits, labels, lse);
#define BISENET_CE_BACKWARD(scalar_t, label_t) backward_cpu_typed<scalar_t, label_t>(call, ignore_index)
  BISENET_CE_DISPATCH(call.logits, call.labels, BISENET_CE_BACKWARD);
#undef BISENET_CE_BACKWARD
  return call.grad_logits;
}

// The CUDA implementation's kernels (ohem_ce.cu) one after the other, as loops.
template <typename acc_t, typename label_t>
void ohem_weights_cpu_typed(const OhemCall& call, int64_t ignore_index) {
  const acc_t* loss = call.loss.const_data_ptr<acc_t>();
  const label_t* labels = call.labels.const_data_ptr<label_t>();
  acc_t* weights = call.weights.mutable_data_ptr<acc_t>();
  int64_t* state = call.state.mutable_data_ptr<int64_t>();
  int64_t* counts = call.counts.mutable_data_ptr<int64_t>();
  const int64_t pixels = call.loss.numel();
  const acc_t threshold = static_cast<acc_t>(call.threshold);
  for (int64_t p = 0; p < pixels; ++p) {
    const bool valid = static_cast<int64_t>(labels[p]) != ignore_index;
    state[kOhemValid] += valid;
    state[kOhemHard] += valid && loss[p] > threshold;
  }
  ohem_setup(state, call.min_kept);
  if (!state[kOhemUseHard]) {
    for (int shift = static_cast<int>(sizeof(acc_t)) * 8 - 8; shift >= 0; shift -= 8) {
      for (int d = 0; d < 256; ++d) counts[d] = 0;
      for (int64_t p = 0; p < pixels; ++p) {
        if (static_cast<int64_t>(labels[p]) == ignore_index) continue;
        const int digit = ohem_digit(ohem_key(loss[p]), state[kOhemPrefix], shift);
        if (digit >= 0) ++counts[digit];
      }
      ohem_pick_digit(counts, shift, state);
    }
    const auto kth = static_cast<typename OhemKey<acc_t>::type>(state[kOhemPrefix]);
    for (int64_t p = 0; p < pixels; ++p) {
      if (static_cast<int64_t>(labels[p]) == ignore_index) continue;
      const auto key = ohem_key(loss[p]);
      state[kOhemGreater] += key > kth;
      state[kOhemTied] += key == kth;
    }
  }
  if (call.classes == 0) {
    for (int64_t p = 0; p < pixels; ++p)
      weights[p] = ohem_pixel_weight(loss[p], static_cast<int64_t>(labels[p]) != ignore_index, threshold, state);
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
  for (int64_t p = 0; p < pixels; ++p)
    weights[p] = ohem_class_pixel_weight(loss[p], labels[p], static_cast<int64_t>(labels[p]) != ignore_index,
                                         threshold, state, class_weights, call.classes, total);
}

at::Tensor ohem_weights_cpu(const at::Tensor& loss, const at::Tensor& labels, int64_t ignore_index, double threshold,
                            int64_t min_kept, const std::optional<at::Tensor>& class_weights) {
  const OhemCall call = prepare_ohem_weights(loss, labels, threshold, min_kept, class_weights);
#define BISENET_OHEM_WEIGHTS(acc_t, label_t) ohem_weights_cpu_typed<acc_t, label_t>(call, ignore_index)
  BISENET_OHEM_DISPATCH(call.loss, call.labels, BISENET_OHEM_WEIGHTS);
#undef BISENET_OHEM_WEIGHTS
  return call.weights;
}

}  // namespace
}  // namespace bisenet

TORCH_LIBRARY_FRAGMENT(bisenet_cuda, m) {
  m.def("upsample_ce_forward(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)");
  m.def("upsample_ce_backward(Tensor grad_loss, Tensor logits, Tensor labels, Tensor lse, int ignore_index) -> Tensor");
  m.def("ohem_weights(Tensor loss, Tensor labels, int ignore_index, float threshold, int min_kept, "
        "Tensor? class_weights=None) -> Tensor");
}

// the CUDA implementations are registered in ohem_ce.cu
TORCH_LIBRARY_IMPL(bisenet_cuda, CPU, m) {
  m.impl("upsample_ce_forward", &bisenet::upsample_ce_forward_cpu);
  m.impl("upsample_ce_backward", &bisenet::upsample_ce_backward_cpu);
  m.impl("ohem_weights", &bisenet::ohem_weights_cpu);
}
