// Arithmetic that gives the same bits on the host and on the device.
//
// The kernels' per-item functions run in CUDA kernels and in the C++ CPU loops that CI
// tests. For the two to compute the very same numbers:
//   - every multiply-add is written as fma_acc (one rounding, IEEE on both sides), and the
//     build turns implicit contraction off (nvcc --fmad=false, the host -ffp-contract=off),
//     so no compiler fuses a product and a sum on one side only;
//   - exp and log are built here from +, *, /, fma and bit operations, which IEEE 754
//     defines exactly (CUDA's expf/logf and the host's libm differ in the last bits).
// Accuracy (tests/test_kernels_same_bits.py measures it against long double references):
//   exp_acc: |relative error| <= 2 ulp for normal results; exp(x) = 2^(x log2 e) by exp2_acc,
//            so results below 2^-126.5 (2^-1022.5) are 0, from 2^127.5 (2^1023.5) inf;
//   exp2_acc: |relative error| <= 2 ulp for u < 127.5 (1023.5); 2^u for u < -126.5 (-1022.5)
//             flushes to 0, for u >= 127.5 (1023.5) is inf;
//   log_acc: |error| <= 2 ulp of the result's magnitude or 2^-24 (2^-53) absolute near 1;
//   sigmoid_acc (fast, the BGA's): |error| <= 2.5 + 1.25 max(-v, 0) ulp (its exp's argument
//            rounded once: a relative error that grows where the sigmoid is tiny), and below
//            2^-23 (2^-52) absolute everywhere.
// Light on purpose: no torch headers.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__CUDACC__)
#define BISENET_HD __host__ __device__ __forceinline__
#else
#define BISENET_HD inline
#endif

namespace bisenet {

// p, opaque to the compiler on the device: held in one 64-bit register, so that an access
// p[offset] with a 32-bit offset is one wide multiply-add, where nvcc otherwise folds a
// 64-bit index into every address (five instructions a load). The host gets p as it is.
template <typename T>
BISENET_HD T* held_pointer(T* p) {
#if defined(__CUDA_ARCH__)
  asm("" : "+l"(p));
  __builtin_assume(__isGlobal(p));  // still global memory: loads stay LDG
#endif
  return p;
}

// n / d for a divisor d fixed at the launch, by a multiply-high, an add and a shift (Granlund
// and Montgomery's method, as ATen's IntDivider): exact for n and d below 2^31, so host and
// device agree, where a 32-bit division by a runtime d is about 20 instructions on the GPU.
// shift = ceil(log2 d), magic = floor(2^32 (2^shift - d) / d) + 1; then
// n / d = (umulhi(n, magic) + n) >> shift, the sum below 2^32 since n < 2^31.
struct FastDivider {
  uint32_t divisor, magic, shift;
};

inline FastDivider make_divider(uint32_t divisor) {  // host side; 1 <= divisor < 2^31
  FastDivider f;
  f.divisor = divisor;
  f.shift = 0;
  while ((uint64_t{1} << f.shift) < divisor) ++f.shift;
  f.magic = static_cast<uint32_t>((uint64_t{1} << 32) * ((uint64_t{1} << f.shift) - divisor) / divisor + 1);
  return f;
}

BISENET_HD uint32_t divide(uint32_t n, const FastDivider& f) {  // n < 2^31
#if defined(__CUDA_ARCH__)
  const uint32_t high = __umulhi(n, f.magic);
#else
  const uint32_t high = static_cast<uint32_t>((static_cast<uint64_t>(n) * f.magic) >> 32);
#endif
  return (high + n) >> f.shift;
}

// kVec consecutive elements, read or written as one vector (an aligned pointer's: the host
// checks).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

// ptr[offset], ... ptr[offset + kVec - 1] as one vector, the offset in 64 bits as load_acc's
// (the backward walk's loads: with an int offset nvcc spent more address instructions).
template <typename T, int kVec>
BISENET_HD Vec<T, kVec> load_vec(const T* ptr, int64_t offset) {
  return *reinterpret_cast<const Vec<T, kVec>*>(ptr + offset);
}
template <typename T, int kVec>
BISENET_HD void store_vec(T* ptr, int64_t offset, const Vec<T, kVec>& value) {
  *reinterpret_cast<Vec<T, kVec>*>(ptr + offset) = value;
}

// Host only: the order of the CPU loops' items. The CPU loops run each kernel phase's items
// (and blocks) one after the other, ascending; with BISENET_CPU_ITEM_ORDER=reverse,
// descending, and where a kernel runs two phases side by side with no barrier between them,
// the other one first. An item that reads what another item of its phase (or of the phase
// beside it) writes, a race on the GPU, then gives other bits: the tests compare the orders.
inline bool cpu_items_reversed() {
  const char* order = getenv("BISENET_CPU_ITEM_ORDER");
  return order != nullptr && strcmp(order, "reverse") == 0;
}

// Host only: the index width of the CPU loops, the launch's (32 bits where the items fit,
// with FastDivider's divisions) unless BISENET_CPU_WIDE_INDEX=1, where they take the 64-bit
// path the launch keeps for larger tensors: the tests compare the two.
inline bool cpu_wide_index() {
  const char* wide = getenv("BISENET_CPU_WIDE_INDEX");
  return wide != nullptr && strcmp(wide, "1") == 0;
}

template <typename F>
inline void for_items(int64_t count, bool reversed, F f) {
  if (reversed) {
    for (int64_t item = count - 1; item >= 0; --item) f(item);
  } else {
    for (int64_t item = 0; item < count; ++item) f(item);
  }
}

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

// 2^u = 2^n 2^f, n = rint(u), f = u - n in [-1/2, 1/2] (exact: no reduction error), 2^f by a
// polynomial in f (float: degree 6, minimax in relative error on [-1/2, 1/2] with the
// constant term 1, its coefficients rounded to float32 one at a time by a Remez exchange
// over the rest, 6.4e-9 relative, where the Taylor polynomial took degree 7 for 5e-9;
// double: Taylor to f^13, 4e-18), 2^n from its bits: n + 1.5 * 2^23 (2^52) holds n in its low bits (exact, an
// integer below 2^22 added to 1.5 * 2^23), and shifted left by 23 (52) the constant's bits
// fall off, leaving n << 23; so 2^n's bits are one shift and one add, with no conversion to
// int and no branch. u is clamped to [-127, 128] by selects (NaN passes through them and
// gives NaN): u < -126.5 gives 0 (u in [-126.5, -126) gives a subnormal) and u >= 127.5 gives
// inf (n = 128: the bits of inf; 2^u overflows from u = 128, so [127.5, 128) gives inf for a
// value just below the largest float). The loss kernels take u <= 0 (a logit minus its
// log-sum-exp, or minus the running maximum), with log2(e) applied ahead (the loss scales its
// logits once per low-res value, not once per exp): the rounding of x * log2(e) adds up to
// |x| 2^-24 (2^-53) relative to the result, besides exp2_acc's own 2 ulp
// (tests/test_kernels_same_bits.py measures both). exp_acc carries x * log2(e) in two parts
// and loses nothing to it.
constexpr float kLog2eFloat = 1.44269504088896340736f;
constexpr double kLog2eDouble = 1.44269504088896340736;
constexpr float kLn2Float = 0.693147180559945309417f;
constexpr double kLn2Double = 0.693147180559945309417;

// n = rint(u) without a rounding instruction: for |u| < 2^22 (2^51), u + 1.5 * 2^23 (2^52)
// lies in [2^23, 2^24) ([2^52, 2^53)), where the spacing is 1, so the sum rounds u to an
// integer n held in its low bits (to nearest, ties to even like rint: the constant is even),
// and subtracting the constant back gives n exactly. The sum also gives 2^n's bits
// (exp2_parts), so the rounding costs two adds and no conversion.
constexpr float kRoundFloat = 12582912.0f;           // 1.5 * 2^23
constexpr double kRoundDouble = 6755399441055744.0;  // 1.5 * 2^52

// 2^n 2^f for shifted = n + 1.5 * 2^23 (2^52), an integer n in [-127, 128] ([-1023, 1024]),
// and |f| about 1/2 at most.
BISENET_HD float exp2_parts(float shifted, float f) {
  float p = 1.58371141878888e-04f;  // the minimax polynomial (see above)
  p = fma_acc(p, f, 1.3418503804132342e-03f);
  p = fma_acc(p, f, 9.6170259639620781e-03f);
  p = fma_acc(p, f, 5.5502727627754211e-02f);
  p = fma_acc(p, f, 2.4022655189037323e-01f);
  p = fma_acc(p, f, 6.9314724206924438e-01f);
  p = fma_acc(p, f, 1.0f);
  const uint32_t n_bits = static_cast<uint32_t>(value_to_bits(shifted));  // n in the low bits
  return p * bits_to_value(static_cast<int32_t>((n_bits << 23) + 0x3F800000u));  // (n + 127) << 23
}

BISENET_HD double exp2_parts(double shifted, double f) {
  double p = 1.3691488853904128e-12;  // ln2^13 / 13!
  p = fma_acc(p, f, 2.5678435993488206e-11);
  p = fma_acc(p, f, 4.4455382718708116e-10);
  p = fma_acc(p, f, 7.0549116208011230e-09);
  p = fma_acc(p, f, 1.0178086009239700e-07);
  p = fma_acc(p, f, 1.3215486790144310e-06);
  p = fma_acc(p, f, 1.5252733804059841e-05);
  p = fma_acc(p, f, 1.5403530393381610e-04);
  p = fma_acc(p, f, 1.3333558146428443e-03);
  p = fma_acc(p, f, 9.6181291076284772e-03);
  p = fma_acc(p, f, 5.5504108664821580e-02);
  p = fma_acc(p, f, 2.4022650695910072e-01);
  p = fma_acc(p, f, 6.9314718055994531e-01);
  p = fma_acc(p, f, 1.0);
  const uint64_t n_bits = static_cast<uint64_t>(value_to_bits(shifted));  // n in the low bits
  return p * bits_to_value(static_cast<int64_t>((n_bits << 52) + 0x3FF0000000000000ull));  // (n + 1023) << 52
}

// u clamped to [-127, 128] ([-1023, 1024]) by selects: NaN stays NaN, and so does the result.
BISENET_HD float exp2_clamp(float u) {
  u = u < -127.0f ? -127.0f : u;
  return u > 128.0f ? 128.0f : u;
}

BISENET_HD double exp2_clamp(double u) {
  u = u < -1023.0 ? -1023.0 : u;
  return u > 1024.0 ? 1024.0 : u;
}

BISENET_HD float round_constant(float) { return kRoundFloat; }
BISENET_HD double round_constant(double) { return kRoundDouble; }

// 2^(u + u_lo) for u already within the clamp's range (or NaN): n = rint(u) by the rounding
// constant, u_lo (0 when not given: exp2_acc(u)) added to the exact reduced argument u - n.
template <typename acc_t>
BISENET_HD acc_t exp2_in_range(acc_t u) {
  const acc_t shifted = u + round_constant(u);
  return exp2_parts(shifted, u - (shifted - round_constant(u)));
}

template <typename acc_t>
BISENET_HD acc_t exp2_in_range(acc_t u, acc_t u_lo) {
  const acc_t shifted = u + round_constant(u);
  return exp2_parts(shifted, (u - (shifted - round_constant(u))) + u_lo);
}

BISENET_HD float exp2_acc(float u) { return exp2_in_range(exp2_clamp(u)); }
BISENET_HD double exp2_acc(double u) { return exp2_in_range(exp2_clamp(u)); }

// 2^u for u <= 0 (or NaN), as exp2_acc gives it bit for bit, without the upper clamp that
// such u never reach: one select fewer where it is known (the loss forward's z minus its
// maximum).
BISENET_HD float exp2_nonpositive(float u) { return exp2_in_range(u < -127.0f ? -127.0f : u); }
BISENET_HD double exp2_nonpositive(double u) { return exp2_in_range(u < -1023.0 ? -1023.0 : u); }

// 2^(u + u_lo) for a u carried in two parts, |u_lo| far below 1/2: u_lo joins the reduced
// argument (exp_acc).
BISENET_HD float exp2_acc(float u, float u_lo) { return exp2_in_range(exp2_clamp(u), u_lo); }
BISENET_HD double exp2_acc(double u, double u_lo) { return exp2_in_range(exp2_clamp(u), u_lo); }

BISENET_HD float log2e(float) { return kLog2eFloat; }
BISENET_HD double log2e(double) { return kLog2eDouble; }
// -log2(e): v * minus_log2e(v) is one multiply, then the two clamps' min and max (nvcc
// turned -(v * log2e(v)) into two multiplies and a compare for the lower clamp)
BISENET_HD float minus_log2e(float) { return -kLog2eFloat; }
BISENET_HD double minus_log2e(double) { return -kLog2eDouble; }
BISENET_HD float ln2(float) { return kLn2Float; }
BISENET_HD double ln2(double) { return kLn2Double; }

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

// exp(x) = 2^u, u = x log2(e) carried in two parts: u_hi the rounded product, u_lo its rounding
// error (one fma, exact) plus x times log2(e)'s own rounding, added to the reduced argument
// (exp2_acc(u, u_lo)). Without u_lo the product's rounding would add up to |x| 2^-24 relative
// (5 ulp at |x| = 88); with it the error is exp2_acc's. No range branch and no int conversion:
// x is clamped by selects (NaN stays NaN), and exp2_acc's clamps give inf and 0 at the ends.
BISENET_HD float exp_acc(float x) {
  x = x < -128.0f ? -128.0f : x;
  x = x > 128.0f ? 128.0f : x;
  const float u_hi = x * kLog2eFloat;
  const float u_lo = fma_acc(x, 1.9259629911266175e-08f, fma_acc(x, kLog2eFloat, -u_hi));  // log2(e) - kLog2eFloat
  return exp2_acc(u_hi, u_lo);
}

BISENET_HD double exp_acc(double x) {
  x = x < -1024.0 ? -1024.0 : x;
  x = x > 1024.0 ? 1024.0 : x;
  const double u_hi = x * kLog2eDouble;
  const double u_lo = fma_acc(x, 2.0355273740931033e-17, fma_acc(x, kLog2eDouble, -u_hi));  // log2(e) - kLog2eDouble
  return exp2_acc(u_hi, u_lo);
}

// 1 / x for x >= 1 (NaN for NaN), branch-free: nvcc compiles an IEEE division with a
// slow-path branch, a point no instruction of the next sigmoid can be scheduled across. The
// initial guess from the bits (within 5.1%), then one step of third order, r (1 + e + e^2)
// with e = 1 - x r (three fmas: the error to about e^3), and one Newton step r + r (1 - x r)
// (two): within 0.78 ulp of 1 / x for every float32 x in [1, 2^126) (measured over every
// mantissa, the error's pattern repeating in each binade, 2026-11-29; three Newton steps,
// six fmas, gave 0.50), where the result is normal; 0 from 2^126 (a subnormal 1 / x) and for
// inf. float64 (the tests' oracle) divides.
BISENET_HD float reciprocal_at_least_one(float x) {
  float r = bits_to_value(static_cast<int32_t>(0x7EF311C3 - value_to_bits(x)));
  const float e = fma_acc(-x, r, 1.0f);
  r = fma_acc(r, fma_acc(e, e, e), r);
  r = fma_acc(r, fma_acc(-x, r, 1.0f), r);
  return x >= 8.50705917e37f ? 0.0f : r;  // 2^126; NaN compares false and stays NaN
}

BISENET_HD double reciprocal_at_least_one(double x) { return 1.0 / x; }

// The fast sigmoid, 1 / (1 + 2^(-v log2(e))): the product rounded once and exp2_acc (its
// selects clamp it; NaN stays NaN, -inf gives 0 and inf 1), then the reciprocal above. Where
// exp_acc carries v log2(e) in two parts, this drops the second (two fmas and an add) and
// exp_acc's own clamp of v (two selects): with the reciprocal's fma, 25 instructions a
// sigmoid on sm_90 where it took 32. The product's error, its rounding (|u| 2^-24) and
// log2(e)'s own rounding to float (0.22 |u| 2^-24), is at most 1.23 |v| 2^-24 relative in 2^u,
// and reaches the sigmoid s times 1 - s: under 0.35 ulp for v >= 0, up to 1.23 |v| ulp where
// v is very negative (s tiny), and never more than about 0.28 2^-24 absolute. Bounds
// (tests/test_kernels_same_bits.py): 2.5 + 1.25 max(-v, 0) ulp, and 2^-23 absolute; measured
// over every float32 with a normal sigmoid (2026-11-29; the bound held everywhere, its least
// margin 0.23 ulp near v = 0): 2.27 ulp for v >= -1, 5.1 from -4, 15.5 from -16, 30.1 from
// -32, 64.4 at most (v = -86.6, s = 2^-125), 2^-23.17 absolute (exp_acc's: 2.48 ulp; over
// every 61st float32 2.38 ulp and 2^-23.42 absolute, the fast one 2^-23.18).
template <typename acc_t>
BISENET_HD acc_t sigmoid_acc(acc_t v) {
  return reciprocal_at_least_one(static_cast<acc_t>(1) + exp2_acc(v * minus_log2e(v)));
}

// What the same_bits_math op (same_bits.cpp, same_bits.cu) applies: fn 0 exp_acc, 1 log_acc,
// 2 sigmoid_acc, 3 exp2_acc, 4 exp2_nonpositive.
template <typename acc_t>
BISENET_HD acc_t same_bits_apply(int fn, acc_t v) {
  switch (fn) {
    case 0: return exp_acc(v);
    case 1: return log_acc(v);
    case 2: return sigmoid_acc(v);
    case 3: return exp2_acc(v);
    default: return exp2_nonpositive(v);
  }
}

}  // namespace bisenet
