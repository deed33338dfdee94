// Bilinear taps of PyTorch's F.interpolate(mode="bilinear", align_corners=False, size=...),
// shared by the CUDA kernels and the C++ CPU loops (so the CPU tests check the kernels'
// arithmetic). Light on purpose: no torch headers.
#pragma once

#if defined(__CUDACC__)
#define BISENET_HD __host__ __device__ __forceinline__
#else
#define BISENET_HD inline
#endif

namespace bisenet {

// The two source rows (or columns) and their weights for one output index, exactly as
// ATen's upsample_bilinear2d computes them with align_corners=False and no scale factor:
// scale = in / out, src = max(scale * (dst + 0.5) - 0.5, 0), i0 = (int)src,
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
  acc_t src = scale * (static_cast<acc_t>(dst) + static_cast<acc_t>(0.5)) - static_cast<acc_t>(0.5);
  if (src < static_cast<acc_t>(0)) src = static_cast<acc_t>(0);
  Taps<acc_t> t;
  t.i0 = static_cast<int>(src);
  t.i1 = t.i0 + (t.i0 < in_size - 1 ? 1 : 0);
  t.w1 = src - static_cast<acc_t>(t.i0);
  t.w0 = static_cast<acc_t>(1) - t.w1;
  return t;
}

}  // namespace bisenet
