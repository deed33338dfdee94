// The host side shared by the two implementations of bisenet_cuda::bga_forward/backward:
// bga.cpp (the schema, the input checks, the CPU loops, registered for CPU) and bga.cu (the
// CUDA kernels, registered for CUDA). A call is checked, its tensors made dense in
// detail_keep's memory format and its outputs allocated once, here, whatever the device;
// the backward's plan (bga_math.h) and its rim workspace are made here too, so both devices
// follow the same one.
#pragma once

#include <ATen/core/Tensor.h>

#include "bga_math.h"

namespace bisenet {

struct BgaForwardCall {
  at::Tensor detail_keep, sem_up, detail_down, sem_keep;  // inputs, dense in one format
  at::Tensor gated;  // workspace: detail_down * sigmoid(sem_keep) in float (double), low-res layout
  at::Tensor out;
  bool channels_last;
  int vector;  // outputs per item: 16 bytes of the dtype where W (NCHW) or C (channels_last) and
               // every pointer allow it, else 1 (bga_math.h: bga_forward_item)
};

struct BgaBackwardCall {
  at::Tensor grad_out, detail_keep, sem_up, detail_down, sem_keep;  // inputs, dense in one format
  at::Tensor grad_detail_keep, grad_sem_up, grad_detail_down, grad_sem_keep;
  BgaBackwardPlan plan;  // unset when there is nothing to compute (an empty batch)
  at::Tensor rim;        // workspace: the grid-line pixels' partial sums (bilinear.h: TileRim)
  bool channels_last, empty;
};

// The pointers the backward's per-item functions take.
template <typename scalar_t>
BgaBackwardData<scalar_t> backward_data(const BgaBackwardCall& call) {
  BgaBackwardData<scalar_t> data;
  data.grad_out = call.grad_out.const_data_ptr<scalar_t>();
  data.detail_keep = call.detail_keep.const_data_ptr<scalar_t>();
  data.sem_up = call.sem_up.const_data_ptr<scalar_t>();
  data.detail_down = call.detail_down.const_data_ptr<scalar_t>();
  data.sem_keep = call.sem_keep.const_data_ptr<scalar_t>();
  data.grad_detail_keep = call.grad_detail_keep.mutable_data_ptr<scalar_t>();
  data.grad_sem_up = call.grad_sem_up.mutable_data_ptr<scalar_t>();
  data.grad_detail_down = call.grad_detail_down.mutable_data_ptr<scalar_t>();
  data.grad_sem_keep = call.grad_sem_keep.mutable_data_ptr<scalar_t>();
  return data;
}

// The geometry of a prepared call (its tensors dense in its memory format).
template <typename acc_t, typename Call>
BgaGeometry<acc_t> call_geometry(const Call& call) {
  return make_geometry<acc_t>(call.detail_keep.sizes().data(), call.sem_up.sizes().data(), call.channels_last);
}

template <typename acc_t>
TileRim<acc_t> backward_rim(const BgaBackwardCall& call) {
  return make_tile_rim<acc_t>(call.rim.mutable_data_ptr<acc_t>(), static_cast<int>(call.detail_keep.size(0)),
                         static_cast<int>(call.detail_keep.size(1)), static_cast<int>(call.sem_up.size(2)),
                         static_cast<int>(call.sem_up.size(3)), call.plan.tile_h, call.plan.tile_w,
                         call.channels_last);
}

// bga.cpp
BgaForwardCall prepare_bga_forward(const at::Tensor& detail_keep, const at::Tensor& sem_up,
                                   const at::Tensor& detail_down, const at::Tensor& sem_keep);
BgaBackwardCall prepare_bga_backward(const at::Tensor& grad_out, const at::Tensor& detail_keep,
                                     const at::Tensor& sem_up, const at::Tensor& detail_down,
                                     const at::Tensor& sem_keep, int64_t tile_h, int64_t tile_w, int64_t lanes);

}  // namespace bisenet
