// Arithmetic that gives the same bits on the host and on the device.
//
// The kernels' per-item functions run in CUDA kernels and in the C++ CPU loops that CI
// tests. For the two to compute the very same numbers:
//   - every multiply-add is written as fma_acc (one rounding, IEEE on both sides), and the
//     build turns implicit contraction off (nvcc --fmad=false, the host -ffp-contract=off),
//     so no compiler fuses a product and a sum on one side only;
//   - exp and log are built here from +, *, /, fma, rint and bit operations, which IEEE 754
//     defines exactly (CUDA's expf/logf and the host's libm differ in the last bits).
// Accuracy (tests/test_kernels_math.py measures it against float64 / exact references):
//   exp_acc: |relative error| <= 2 ulp; results below the smallest normal number flush to 0
//            (about 1e-38 in float, 2e-308 in double), above the largest give inf;
//   log_acc: |error| <= 2 ulp of the result's magnitude or 2^-24 (2^-53) absolute near 1.
// Light on purpose: no torch headers.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define BISENET_HD __host__ __device__ __forceinline__
#else
#define BISENET_HD inline
#endif

namespace bisenet {

BISENET_HD float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
BISENET_HD double fma_acc(double a, double b, double c) { return fma(a, b, c); }

BISENET_HD float bits_to_value(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float value;
  memcpy(&value, &bits, sizeof value);
  return value;
#endif
}

BISENET_HD double bits_to_value(int64_t bits) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(bits));
#else
  double value;
  memcpy(&value, &bits, sizeof value);
  return value;
#endif
}

BISENET_HD int32_t value_to_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(value);
#else
  int32_t bits;
  memcpy(&bits, &value, sizeof bits);
  return bits;
#endif
}

BISENET_HD int64_t value_to_bits(double value) {
#if defined(__CUDA_ARCH__)
  return static_cast<int64_t>(__double_as_longlong(value));
#else
  int64_t bits;
  memcpy(&bits, &value, sizeof bits);
  return bits;
#endif
}

// exp(x) = 2^n exp(r), n = rint(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 in two
// parts, each product by n taken with one rounding), exp(r) by its Taylor polynomial
// (float: to r^7, truncation 5e-9 relative; double: to r^13, 4e-18), 2^n from its bits.
BISENET_HD float exp_acc(float x) {
  if (!(x == x)) return x;                        // NaN
  if (x > 88.72283f) return INFINITY;             // above log(FLT_MAX)
  if (x < -87.33654f) return 0.0f;                // below log(FLT_MIN): flushed
  const float n = rintf(x * 1.44269504f);         // in [-126, 128]
  float r = fma_acc(-n, 0.693145751953125f, x);   // ln 2 = 0.693145751953125 + 1.4286068e-6
  r = fma_acc(-n, 1.42860677e-6f, r);
  float p = 1.0f / 5040.0f;
  p = fma_acc(p, r, 1.0f / 720.0f);
  p = fma_acc(p, r, 1.0f / 120.0f);
  p = fma_acc(p, r, 1.0f / 24.0f);
  p = fma_acc(p, r, 1.0f / 6.0f);
  p = fma_acc(p, r, 0.5f);
  p = fma_acc(p, r, 1.0f);
  p = fma_acc(p, r, 1.0f);
  int exponent = static_cast<int>(n);
  if (exponent > 127) {  // 2^128 has no float: scale by 2 first (exact)
    p *= 2.0f;
    exponent -= 1;
  }
  return p * bits_to_value(static_cast<int32_t>((exponent + 127) << 23));
}

BISENET_HD double exp_acc(double x) {
  if (!(x == x)) return x;
  if (x > 709.782712893384) return INFINITY;
  if (x < -708.3964185322641) return 0.0;
  const double n = rint(x * 1.4426950408889634);  // in [-1022, 1024]
  double r = fma_acc(-n, 6.93147180369123816490e-01, x);  // fdlibm's ln2_hi + ln2_lo
  r = fma_acc(-n, 1.90821492927058770002e-10, r);
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = fma_acc(p, r, 1.0 / 479001600.0);
  p = fma_acc(p, r, 1.0 / 39916800.0);
  p = fma_acc(p, r, 1.0 / 3628800.0);
  p = fma_acc(p, r, 1.0 / 362880.0);
  p = fma_acc(p, r, 1.0 / 40320.0);
  p = fma_acc(p, r, 1.0 / 5040.0);
  p = fma_acc(p, r, 1.0 / 720.0);
  p = fma_acc(p, r, 1.0 / 120.0);
  p = fma_acc(p, r, 1.0 / 24.0);
  p = fma_acc(p, r, 1.0 / 6.0);
  p = fma_acc(p, r, 0.5);
  p = fma_acc(p, r, 1.0);
  p = fma_acc(p, r, 1.0);
  int64_t exponent = static_cast<int64_t>(n);
  if (exponent > 1023) {
    p *= 2.0;
    exponent -= 1;
  }
  return p * bits_to_value(static_cast<int64_t>((exponent + 1023) << 52));
}

// log(x) = e ln 2 + log(m), x = 2^e m with m in [sqrt(1/2), sqrt(2)); log(m) = 2 atanh(s),
// s = (m - 1) / (m + 1), |s| <= 0.1716, by its odd series (float: to s^9, truncation 2e-9
// relative; double: to s^21, 6e-19). m - 1 is exact there (Sterbenz).
BISENET_HD float log_acc(float x) {
  if (!(x > 0.0f)) return x == 0.0f ? -INFINITY : NAN;  // 0, negative, NaN
  if (x == INFINITY) return x;
  int exponent = 0;
  if (x < 1.17549435e-38f) {  // subnormal: make it normal
    x *= 8388608.0f;          // 2^23
    exponent = -23;
  }
  const int32_t bits = value_to_bits(x);
  exponent += ((bits >> 23) & 0xFF) - 127;
  float m = bits_to_value(static_cast<int32_t>((bits & 0x007FFFFF) | 0x3F800000));  // [1, 2)
  if (m > 1.41421356f) {
    m *= 0.5f;
    exponent += 1;
  }
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = 1.0f / 9.0f;
  p = fma_acc(p, s2, 1.0f / 7.0f);
  p = fma_acc(p, s2, 1.0f / 5.0f);
  p = fma_acc(p, s2, 1.0f / 3.0f);
  const float two_s = s + s;
  const float log_m = fma_acc(two_s * s2, p, two_s);
  const float e = static_cast<float>(exponent);
  return fma_acc(e, 0.693145751953125f, fma_acc(e, 1.42860677e-6f, log_m));
}

BISENET_HD double log_acc(double x) {
  if (!(x > 0.0)) return x == 0.0 ? -INFINITY : NAN;
  if (x == INFINITY) return x;
  int64_t exponent = 0;
  if (x < 2.2250738585072014e-308) {
    x *= 4503599627370496.0;  // 2^52
    exponent = -52;
  }
  const int64_t bits = value_to_bits(x);
  exponent += ((bits >> 52) & 0x7FF) - 1023;
  double m = bits_to_value(static_cast<int64_t>((bits & 0x000FFFFFFFFFFFFFLL) | 0x3FF0000000000000LL));
  if (m > 1.4142135623730951) {
    m *= 0.5;
    exponent += 1;
  }
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  double p = 1.0 / 21.0;
  p = fma_acc(p, s2, 1.0 / 19.0);
  p = fma_acc(p, s2, 1.0 / 17.0);
  p = fma_acc(p, s2, 1.0 / 15.0);
  p = fma_acc(p, s2, 1.0 / 13.0);
  p = fma_acc(p, s2, 1.0 / 11.0);
  p = fma_acc(p, s2, 1.0 / 9.0);
  p = fma_acc(p, s2, 1.0 / 7.0);
  p = fma_acc(p, s2, 1.0 / 5.0);
  p = fma_acc(p, s2, 1.0 / 3.0);
  const double two_s = s + s;
  const double log_m = fma_acc(two_s * s2, p, two_s);
  const double e = static_cast<double>(exponent);
  return fma_acc(e, 6.93147180369123816490e-01, fma_acc(e, 1.90821492927058770002e-10, log_m));
}

// 1 / (1 + exp(-v))
template <typename acc_t>
BISENET_HD acc_t sigmoid_acc(acc_t v) {
  return static_cast<acc_t>(1) / (static_cast<acc_t>(1) + exp_acc(-v));
}

}  // namespace bisenet
