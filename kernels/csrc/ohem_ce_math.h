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
// Forward: a block per tile of high-res rows and columns (see "Forward tiling" below); z is
// interpolated from logit rows staged in shared memory per chunk of classes, never stored in global
// memory. The pixel keeps its loss and lse (for the backward).
// Backward, a deterministic gather (no atomics), separable like the upsampling: the gradient
// of logit (n, c, i, j) is
//     sum_x w_x(x, j) * [ sum_y w_y(y, i) * g[y, x] * (exp(z[c, y, x] - lse[y, x]) - [c == label]) ]
// with z recomputed from the logits; the rows that read low-res row i are those whose first
// tap is i - 1 or i (bilinear.h: first_dst_with_tap_at_least), likewise columns. One CUDA
// block per tile of low-res rows and columns, all classes (see "Backward tiling" below): each
// high-res pixel's gradient, label and lse read once per block, the logits interpolated
// along x once per class and window column into shared memory, each window pixel read once
// per pass of two classes and evaluated once per class. Pixels with a zero incoming gradient
// (ignored, or not kept by OHEM) add nothing.
// Forward with gradient (the CE mean's training step, C <= 20): the backward's tiles with all
// classes in one pass, each pixel's exps evaluated once for its loss and its gradient (see
// "Forward with gradient" below).
//
// The OHEM selection (the k-th largest pixel loss by a radix select, then per-pixel
// weights) is at the end of this file.
#pragma once

#include <math.h>
#include <stdint.h>

#include <limits>

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

// Shared memory per block: the forward stays within 48 KiB (no opt-in), as the other kernels
// do. The backward takes a budget from its caller, the most a block may take on the device
// that runs it: kCeMaxSharedBytes, or less where the GPU allows less (the launch opts in to
// it: sm_90 allows 227 KiB a block, sm_80 163, sm_86/89/120 99, sm_75 64). Every sm_80+ GPU
// thus plans with kCeMaxSharedBytes, as the CPU loops do, so the two run the same tiles and
// their bits agree; on sm_75 a large upscale's automatic tile is smaller.
constexpr int64_t kCeSharedBytes = 48 * 1024;
constexpr int64_t kCeMaxSharedBytes = 96 * 1024;

// ---------------------------------------------------------------------------------------
// Sums over the pixels in a fixed order (the CE mean, the OHEM loss), so that they are
// deterministic and the same bits on both devices: blocks of kSumThreads threads, each thread
// adding its pixels in order (the OHEM loss: sum_blocks(pixels) blocks, thread t of block b
// adding pixels b * threads + t + i * stride, stride = blocks * threads, in order of i; the CE
// mean: the forward's blocks, each thread its pixel slots in order, ce_mean_add); a block's
// threads' sums added by sum_tree_step (halving: 128, 64, ..., 1, a barrier between steps);
// then one block adds the blocks' sums likewise (thread t: blocks t, t + threads, ...;
// sum_blocks_part). Counts are int64, exact in any order.
constexpr int kSumThreads = 256;
constexpr int64_t kSumMostBlocks = 1024;

BISENET_HD int64_t sum_blocks(int64_t pixels) {
  const int64_t blocks = (pixels + kSumThreads - 1) / kSumThreads;
  return blocks < 1 ? 1 : (blocks < kSumMostBlocks ? blocks : kSumMostBlocks);
}

// One step of a block's tree, thread t < half: after the steps half = 128, 64, ..., 1,
// values[0] is the block's.
template <typename value_t>
BISENET_HD void sum_tree_step(int t, int half, value_t* values) {
  values[t] = values[t] + values[t + half];
}

// Thread t of the final block: the blocks' sums t, t + threads, ... in order.
template <typename value_t>
BISENET_HD value_t sum_blocks_part(int t, int64_t blocks, const value_t* block_sums) {
  value_t s = static_cast<value_t>(0);
  for (int64_t b = t; b < blocks; b += kSumThreads) s = s + block_sums[b];
  return s;
}

// The CE mean's tree: kSumThreads sums and int64 counts.
template <typename acc_t>
BISENET_HD constexpr int64_t ce_mean_tree_bytes() {
  return kSumThreads * static_cast<int64_t>(sizeof(acc_t) + sizeof(int64_t));
}

// The mean (0 when no pixel counts) and its denominator max(count, 1).
template <typename acc_t>
BISENET_HD void ce_mean_finish(acc_t sum, int64_t count, acc_t* mean, acc_t* denominator) {
  *denominator = static_cast<acc_t>(count > 1 ? count : 1);
  *mean = sum / *denominator;
}

// ---------------------------------------------------------------------------------------
// The alignment of a shared-memory struct of `bytes`: its size, for one load of it, up to 16
// bytes, the widest shared load (float64's 32-byte structs take two): the blocks' buffers are
// 16-byte aligned, no more (the shared memory's __align__(16), the layouts' offsets).
BISENET_HD constexpr size_t ce_shared_align(size_t bytes) { return bytes < 16 ? bytes : 16; }

// The backward takes the classes in passes of kCePassClasses (the last pass of an odd C has
// one): a pass stages its classes' logit rows side by side, so that a pixel reads a pass's
// values at one staged tap with one shared load, and the block meets at a barrier once a
// pass. Each class's arithmetic, and the order of the classes, is that of one class a pass.
// (The forward stages its classes in chunks of 20: "Forward tiling" below.)
constexpr int kCePassClasses = 2;

// A pass's staged values at one (row, column).
template <typename acc_t, int kClasses>
struct alignas(ce_shared_align(kClasses * sizeof(acc_t))) CeStaged {
  acc_t z_log2[kClasses];
};

// The classes of the pass that starts at class c0, of C.
BISENET_HD int ce_pass_classes(int c0, int classes) {
  return classes - c0 < kCePassClasses ? classes - c0 : kCePassClasses;
}

// ---------------------------------------------------------------------------------------
// Forward tiling. A block owns a tile of high-res rows [y0, y1) (a band, up to
// kCeForwardBand) and columns [x0, x1) (a chunk, kCeForwardChunk) of sample n; it reads low-res
// rows [row0, row0 + rows) (taps are non-decreasing: the first row's i0 to the last row's i1).
// The classes go in class chunks of up to kCeChunkClasses (one chunk for Cityscapes' 19): the
// block stages the rows it reads of a class chunk, interpolated along x at its columns, times
// log2(e) (ATen's order: along x first), classes innermost (staged[r][x][q]), and meets at a
// barrier; then each thread takes its pixels one after the other (kCeForwardPixels slots), a
// pixel's z log2(e) of the chunk's classes from its two staged rows (kCeGroupClasses values a
// 16-byte shared load, one lerp a class) held in registers: their maximum, then the sum of
// 2^(z log2(e) - maximum), one exp2 a class and no rescaling within a chunk (a later chunk
// rescales the sum once a pixel, exp2 of the old maximum minus the new). The label's z is
// read from its staged rows alone, the same lerp of the same values.
// Where the staging and the arithmetic ran side by side a pass of 2 classes at a time, with a
// barrier each pass and an online maximum (a compare, two selects and an fma a class), they
// are now two phases: one barrier a chunk, and the pixels' loop has no staging in it; other
// blocks on the SM (4 fit) overlap one block's staging with their arithmetic.
// 32 x 32 rather than 16 x 64: a taller band reads fewer low-res rows per pixel, so fewer
// values are staged (at 1/8, 6 rows for 32 high-res rows where 16 rows read 4).
constexpr int kCeForwardThreads = 256;
constexpr int kCeForwardChunk = 32;
constexpr int kCeForwardBand = 32;
constexpr int kCeForwardPixels = kCeForwardBand * kCeForwardChunk / kCeForwardThreads;
// A class group: the values of one 16-byte shared load in float32. A class chunk: 5 groups,
// 20 classes: (row, column) entries 80 bytes apart, so that a quarter warp's 16-byte loads at
// 8 consecutive columns fall in distinct banks (80 = 5 x 16, an odd multiple of 16). Classes
// past C in a chunk's last group are staged as the most negative finite value:
// their z (that value, or -inf where the lerp's rounding overflows) is never above a finite
// z, and 2^(z - maximum) is exactly 0 (exp2_nonpositive of less than -127).
constexpr int kCeGroupClasses = 4;
constexpr int kCeChunkGroups = 5;
constexpr int kCeChunkClasses = kCeGroupClasses * kCeChunkGroups;

// A group's staged values at one (row, column).
template <typename acc_t>
struct alignas(ce_shared_align(kCeGroupClasses * sizeof(acc_t))) CeGroup {
  acc_t z_log2[kCeGroupClasses];
};
static_assert(sizeof(CeGroup<float>) == 16 && sizeof(CeGroup<double>) == 32, "a group: 16 bytes, 32 in float64");

// The group of staged values that starts at entry `entry` (one 16-byte shared load in float32).
template <typename acc_t>
BISENET_HD CeGroup<acc_t> ce_group_at(const acc_t* staged, int entry) {
  return *reinterpret_cast<const CeGroup<acc_t>*>(staged + entry);
}

// The classes of the chunk that starts at class c0, of C, and its groups.
BISENET_HD int ce_chunk_classes(int c0, int classes) {
  return classes - c0 < kCeChunkClasses ? classes - c0 : kCeChunkClasses;
}

BISENET_HD int ce_chunk_groups(int chunk_classes) { return (chunk_classes + kCeGroupClasses - 1) / kCeGroupClasses; }

// The forward's plan, made on the host for both devices: the band (rows per block), the
// capacity of the staged buffer in low-res rows (the most any band reads), the shared bytes.
struct CeForwardPlan {
  int band, staged_rows;
  int64_t shared_bytes;
};

struct CeForwardTile {
  int n, y0, y1, x0, x1;
  int row0, rows;
};

template <typename acc_t>
BISENET_HD int64_t ce_forward_blocks(const CeGeometry<acc_t>& geo, const CeForwardPlan& plan) {
  return static_cast<int64_t>(geo.N) * ((geo.H + plan.band - 1) / plan.band) *
         ((geo.W + kCeForwardChunk - 1) / kCeForwardChunk);
}

// Blocks run over (n, band, chunk), chunk fastest.
template <typename acc_t>
BISENET_HD CeForwardTile ce_forward_tile(int64_t block, const CeGeometry<acc_t>& geo, const CeForwardPlan& plan) {
  const int chunks = (geo.W + kCeForwardChunk - 1) / kCeForwardChunk;
  const int bands = (geo.H + plan.band - 1) / plan.band;
  CeForwardTile t;
  t.x0 = static_cast<int>(block % chunks) * kCeForwardChunk;
  t.y0 = static_cast<int>((block / chunks) % bands) * plan.band;
  t.n = static_cast<int>(block / (static_cast<int64_t>(chunks) * bands));
  t.x1 = t.x0 + kCeForwardChunk < geo.W ? t.x0 + kCeForwardChunk : geo.W;
  t.y1 = t.y0 + plan.band < geo.H ? t.y0 + plan.band : geo.H;
  t.row0 = bilinear_taps<acc_t>(t.y0, geo.h, geo.scale_y).i0;
  t.rows = bilinear_taps<acc_t>(t.y1 - 1, geo.h, geo.scale_y).i1 + 1 - t.row0;
  return t;
}

BISENET_HD int ce_forward_pixels(const CeForwardTile& t) { return (t.y1 - t.y0) * (t.x1 - t.x0); }

// Pixel `item` of the tile (row-major over its columns): its row and column in the tile; a
// shift where the tile is kCeForwardChunk wide (all but a last, narrower chunk), where an
// integer division takes some 20 instructions.
struct CeTileYX {
  int y, x;
};

BISENET_HD CeTileYX ce_forward_item_yx(int item, const CeForwardTile& t) {
  const int cols = t.x1 - t.x0;
  if (cols == kCeForwardChunk) return {item / kCeForwardChunk, item % kCeForwardChunk};
  return {item / cols, item % cols};
}

// The shared memory of a forward block: the columns' taps, the staged buffer; after the last
// chunk, the CE mean's tree over the block's threads (ce_mean_tree_bytes) in the same bytes.
template <typename acc_t>
struct CeForwardBuffers {
  Taps<acc_t>* col_taps;  // (kCeForwardChunk,)
  acc_t* staged;          // (staged_rows, kCeForwardChunk, kCeChunkClasses)
};

template <typename acc_t>
BISENET_HD int64_t ce_forward_bytes(const CeForwardPlan& plan) {
  const int64_t tables = kCeForwardChunk * (static_cast<int64_t>(sizeof(Taps<acc_t>)) +
                                            static_cast<int64_t>(plan.staged_rows) * kCeChunkClasses *
                                                static_cast<int64_t>(sizeof(acc_t)));
  return tables > ce_mean_tree_bytes<acc_t>() ? tables : ce_mean_tree_bytes<acc_t>();
}

template <typename acc_t>
BISENET_HD CeForwardBuffers<acc_t> ce_forward_buffers(unsigned char* base, const CeForwardPlan& plan) {
  CeForwardBuffers<acc_t> buf;
  buf.col_taps = reinterpret_cast<Taps<acc_t>*>(base);
  buf.staged = reinterpret_cast<acc_t*>(base + kCeForwardChunk * sizeof(Taps<acc_t>));
  return buf;
}

// Host side: the band. kCeForwardBand rows, fewer where a downscale makes a band read more
// low-res rows than kCeSharedBytes holds (one row reads two: band 1 always fits).
template <typename acc_t>
inline CeForwardPlan plan_ce_forward(const CeGeometry<acc_t>& geo) {
  CeForwardPlan plan;
  for (plan.band = kCeForwardBand;; --plan.band) {
    plan.staged_rows = 0;
    for (int y0 = 0; y0 < geo.H; y0 += plan.band) {
      const int y1 = y0 + plan.band < geo.H ? y0 + plan.band : geo.H;
      const int rows = bilinear_taps<acc_t>(y1 - 1, geo.h, geo.scale_y).i1 + 1 -
                       bilinear_taps<acc_t>(y0, geo.h, geo.scale_y).i0;
      if (rows > plan.staged_rows) plan.staged_rows = rows;
    }
    plan.shared_bytes = ce_forward_bytes<acc_t>(plan);
    if (plan.shared_bytes <= kCeSharedBytes || plan.band == 1) return plan;
  }
}

// Item over the columns: their taps.
template <typename acc_t>
BISENET_HD void ce_forward_table_item(int item, const CeForwardTile& t, const CeGeometry<acc_t>& geo,
                                      const CeForwardBuffers<acc_t>& buf) {
  buf.col_taps[item] = bilinear_taps<acc_t>(t.x0 + item, geo.w, geo.scale_x);
}

// Per class, stage item (r, x) (r < rows, x < x1 - x0): low-res row row0 + r of class plane
// `plane` (h, w) interpolated along x at column x0 + x, times log2(e), into staged (row stride
// kCeForwardChunk). What an item needs but the class is the same for every class
// (CeStageItem: a kernel thread makes it once), and the kernel loads the next class's logits
// before this class's math and stores them after it (ce_stage_load, ce_stage_store).
template <typename acc_t>
struct CeStageItem {
  int first, second;  // the two logits' offsets in a class plane
  acc_t w1;           // the second's weight (the first's is 1 - w1: bilinear_taps)
  int staged;         // the staged value's byte offset in a staged buffer
};

template <typename acc_t>
struct CeStageLoad {
  acc_t first, second;
};

template <typename acc_t>
BISENET_HD CeStageItem<acc_t> ce_stage_item(int row, const Taps<acc_t>& tx, int staged_index) {
  return {row + tx.i0, row + tx.i1, tx.w1, static_cast<int>(staged_index * sizeof(acc_t))};
}

// The item's two logits of class plane `plane_offset` elements into sample (a 32-bit offset:
// a sample's logits are fewer than 2^31, prepare_ce_* check).
template <typename scalar_t, typename acc_t>
BISENET_HD CeStageLoad<acc_t> ce_stage_load(const CeStageItem<acc_t>& item, const scalar_t* sample, int plane_offset) {
  return {static_cast<acc_t>(sample[plane_offset + item.first]),
          static_cast<acc_t>(sample[plane_offset + item.second])};
}

// The value `byte_offset` bytes into staged.
template <typename acc_t>
BISENET_HD acc_t& staged_at(acc_t* staged, int byte_offset) {
  return *reinterpret_cast<acc_t*>(reinterpret_cast<unsigned char*>(staged) + byte_offset);
}

template <typename acc_t>
BISENET_HD const acc_t& staged_at(const acc_t* staged, int byte_offset) {
  return *reinterpret_cast<const acc_t*>(reinterpret_cast<const unsigned char*>(staged) + byte_offset);
}

// A pass's kClasses staged values `byte_offset` bytes into staged (one shared load).
template <int kClasses, typename acc_t>
BISENET_HD CeStaged<acc_t, kClasses> staged_pass_at(const acc_t* staged, int byte_offset) {
  return *reinterpret_cast<const CeStaged<acc_t, kClasses>*>(&staged_at(staged, byte_offset));
}

// The lerp along x (lerp_taps, with w0 = 1 - w1 as bilinear_taps makes it), times log2(e).
template <typename acc_t>
BISENET_HD acc_t ce_stage_value(const CeStageLoad<acc_t>& loaded, const CeStageItem<acc_t>& item) {
  const acc_t along_x = lerp_taps(Taps<acc_t>{0, 0, static_cast<acc_t>(1) - item.w1, item.w1}, loaded.first,
                                  loaded.second);
  return along_x * log2e(along_x);
}

template <typename acc_t>
BISENET_HD void ce_stage_store(const CeStageLoad<acc_t>& loaded, const CeStageItem<acc_t>& item, acc_t* staged) {
  staged_at(staged, item.staged) = ce_stage_value(loaded, item);
}

// A stage item for a pass of classes [c0, c0 + classes): each class's logits loaded
// (ce_stage_load; plane: a class plane's elements), then each stored into staged[...][q]
// (ce_stage_store). The backward holds the loads of its first items across a pass.
template <typename acc_t>
struct CeStagePassLoad {
  CeStageLoad<acc_t> of[kCePassClasses];
};

template <typename scalar_t, typename acc_t>
BISENET_HD CeStagePassLoad<acc_t> ce_stage_pass_load(const CeStageItem<acc_t>& item, const scalar_t* sample, int c0,
                                                     int classes, int plane) {
  CeStagePassLoad<acc_t> loaded;
#pragma unroll
  for (int q = 0; q < kCePassClasses; ++q)
    if (q < classes) loaded.of[q] = ce_stage_load<scalar_t, acc_t>(item, sample, (c0 + q) * plane);
  return loaded;
}

template <typename acc_t>
BISENET_HD void ce_stage_pass_store(const CeStagePassLoad<acc_t>& loaded, const CeStageItem<acc_t>& item, int classes,
                                    acc_t* staged) {
#pragma unroll
  for (int q = 0; q < kCePassClasses; ++q)
    if (q < classes) ce_stage_store(loaded.of[q], item, staged + q);
}

// A group of 4 classes from class `first` of low-res row `row` (its offset in a class plane)
// interpolated along x at the taps tx, times log2(e), into the 4 staged values from entry
// `entry` (ce_stage_load, ce_stage_value: the backward's staging arithmetic); classes past C
// the lowest finite value (-inf would give 0 x -inf = NaN in a lerp with a zero weight).
// sample: sample n's (C, h, w) logits. The loads of the group's classes come before their
// math; a group of C's classes (all but a last one past C) is one 16-byte store, with no
// per-class branch.
template <typename scalar_t, typename acc_t>
BISENET_HD void ce_stage_group(int row, const Taps<acc_t>& tx, int first, int entry, const CeGeometry<acc_t>& geo,
                               const scalar_t* sample, acc_t* staged) {
  const CeStageItem<acc_t> item = ce_stage_item(row, tx, entry);
  const int plane = geo.h * geo.w;
  CeStageLoad<acc_t> loaded[kCeGroupClasses];
  CeGroup<acc_t> group;
  if (first + kCeGroupClasses <= geo.C) {
#pragma unroll
    for (int i = 0; i < kCeGroupClasses; ++i)
      loaded[i] = ce_stage_load<scalar_t, acc_t>(item, sample, (first + i) * plane);
#pragma unroll
    for (int i = 0; i < kCeGroupClasses; ++i) group.z_log2[i] = ce_stage_value(loaded[i], item);
  } else {
#pragma unroll
    for (int i = 0; i < kCeGroupClasses; ++i)
      if (first + i < geo.C) loaded[i] = ce_stage_load<scalar_t, acc_t>(item, sample, (first + i) * plane);
#pragma unroll
    for (int i = 0; i < kCeGroupClasses; ++i)
      group.z_log2[i] = first + i < geo.C ? ce_stage_value(loaded[i], item) : std::numeric_limits<acc_t>::lowest();
  }
  *reinterpret_cast<CeGroup<acc_t>*>(staged + entry) = group;
}

// Stage item (r, x, g) of the class chunk that starts at c0 (r < rows, x < x1 - x0 with its
// taps tx, g < its groups): classes c0 + 4 g + i, i < 4, of low-res row row0 + r at column
// x0 + x into staged[r][x][4 g + i].
template <typename scalar_t, typename acc_t>
BISENET_HD void ce_forward_stage_group(int r, int x, const Taps<acc_t>& tx, int g, const CeForwardTile& t,
                                       const CeGeometry<acc_t>& geo, const scalar_t* sample, int c0, acc_t* staged) {
  ce_stage_group((t.row0 + r) * geo.w, tx, c0 + g * kCeGroupClasses,
                 (r * kCeForwardChunk + x) * kCeChunkClasses + g * kCeGroupClasses, geo, sample, staged);
}

// A pixel's label as the kernels keep it: -1 ignored, -2 outside [0, C) (its loss and lse NaN),
// else the class.
BISENET_HD int ce_label_code(int64_t label, int64_t ignore_index, int classes) {
  return label == ignore_index ? -1 : (label < 0 || label >= classes ? -2 : static_cast<int>(label));
}

// One pixel's log-sum-exp over the classes, in log2 units: the maximum of z log2(e) over the
// chunks so far, the sum of 2^(z log2(e) - maximum), z log2(e) of the label's class.
template <typename acc_t>
struct CeForwardPixel {
  int label;             // -1: ignored (or no pixel); -2: outside [0, C) (loss and lse NaN)
  int staged0, staged1;  // its two staged rows' entries at its column (class 0 of a chunk)
  acc_t w0, w1;          // their weights
  acc_t max_z, sum, label_z;
};

// item >= the tile's pixels (a kernel thread's spare slot) gets an ignored state reading staged
// row 0, column 0 (every tile stages it), so the class steps need no branch: ignored pixels
// are evaluated like the others and their result dropped (ce_forward_pixel_finish).
template <typename label_t, typename acc_t>
BISENET_HD CeForwardPixel<acc_t> ce_forward_pixel_start(int item, const CeForwardTile& t, const CeGeometry<acc_t>& geo,
                                                        const label_t* labels, int64_t ignore_index) {
  CeForwardPixel<acc_t> state;
  state.max_z = state.sum = state.label_z = static_cast<acc_t>(0);
  if (item >= ce_forward_pixels(t)) {
    state.label = -1;
    state.staged0 = state.staged1 = 0;
    state.w0 = state.w1 = static_cast<acc_t>(0);
    return state;
  }
  const CeTileYX yx = ce_forward_item_yx(item, t);
  const int y = yx.y, x = yx.x;
  const int64_t label = static_cast<int64_t>(labels[(t.y0 + y) * geo.W + t.x0 + x]);
  state.label = ce_label_code(label, ignore_index, geo.C);
  const Taps<acc_t> ty = bilinear_taps<acc_t>(t.y0 + y, geo.h, geo.scale_y);
  state.staged0 = ((ty.i0 - t.row0) * kCeForwardChunk + x) * kCeChunkClasses;
  state.staged1 = ((ty.i1 - t.row0) * kCeForwardChunk + x) * kCeChunkClasses;
  state.w0 = ty.w0;
  state.w1 = ty.w1;
  return state;
}

// max(a, b) of two values, neither NaN the larger, a NaN dropped (fmax: one instruction on the
// device). Where both are zeros of opposite signs the sign may differ between the two sides;
// the log-sum-exp's bits do not depend on it (z - maximum and maximum + log(sum) are the same
// for either zero, log(sum) >= 0).
template <typename acc_t>
BISENET_HD acc_t max_acc(acc_t a, acc_t b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(acc_t) == 4) return fmaxf(a, b);
  else return fmax(a, b);
#else
  return b > a || a != a ? b : a;
#endif
}

// The class chunk that starts at c0 (its `classes` classes staged in `staged`): each class's z
// log2(e) from the pixel's two staged rows, their maximum, then one exp2 a class of z minus
// the maximum, added in class order. The first chunk starts the sum; a later one first
// rescales it to the larger maximum. A NaN z makes the sum NaN (exp2 of NaN; the maximum
// drops it). exps[q] gets class c0 + q's 2^(z log2(e) - maximum), the term the sum adds (q <
// the chunk's groups x 4; the padding classes' 0): where the chunk is the only one, its
// softmax times the sum (the forward with gradient's; the forward drops them).
template <typename acc_t>
BISENET_HD void ce_pixel_chunk_exps(CeForwardPixel<acc_t>& state, int c0, int classes, const acc_t* staged,
                                    acc_t (&exps)[kCeChunkClasses]) {
  const int groups = ce_chunk_groups(classes);
  const Taps<acc_t> ty{0, 0, state.w0, state.w1};
  acc_t* z = exps;  // z log2(e), then the exps in its place
  acc_t chunk_max = static_cast<acc_t>(0);
#pragma unroll
  for (int g = 0; g < kCeChunkGroups; ++g) {
    if (g < groups) {
      const CeGroup<acc_t> row0 = ce_group_at(staged, state.staged0 + g * kCeGroupClasses);
      const CeGroup<acc_t> row1 = ce_group_at(staged, state.staged1 + g * kCeGroupClasses);
#pragma unroll
      for (int i = 0; i < kCeGroupClasses; ++i) {
        const int q = g * kCeGroupClasses + i;
        z[q] = lerp_taps(ty, row0.z_log2[i], row1.z_log2[i]);
        chunk_max = q == 0 ? z[q] : max_acc(chunk_max, z[q]);
      }
    }
  }
  const int label_q = state.label - c0;
  if (label_q >= 0 && label_q < classes)
    state.label_z = lerp_taps(ty, staged[state.staged0 + label_q], staged[state.staged1 + label_q]);
  if (c0 == 0) {
    state.max_z = chunk_max;
  } else {
    const acc_t max_z = max_acc(state.max_z, chunk_max);
    state.sum = state.sum * exp2_nonpositive(state.max_z - max_z);
    state.max_z = max_z;
  }
#pragma unroll
  for (int g = 0; g < kCeChunkGroups; ++g) {
    if (g < groups) {
#pragma unroll
      for (int i = 0; i < kCeGroupClasses; ++i) {
        const int q = g * kCeGroupClasses + i;
        z[q] = exp2_nonpositive(z[q] - state.max_z);
        state.sum = state.sum + z[q];  // the first chunk's from 0
      }
    }
  }
}

template <typename acc_t>
BISENET_HD void ce_forward_pixel_chunk(CeForwardPixel<acc_t>& state, int c0, int classes, const acc_t* staged) {
  acc_t exps[kCeChunkClasses];
  ce_pixel_chunk_exps(state, c0, classes, staged, exps);
}

// The offset of pixel `item` (item < the tile's pixels) in its sample's (H, W) plane.
template <typename acc_t>
BISENET_HD int64_t ce_forward_pixel_offset(int item, const CeForwardTile& t, const CeGeometry<acc_t>& geo) {
  const CeTileYX yx = ce_forward_item_yx(item, t);
  return static_cast<int64_t>(t.y0 + yx.y) * geo.W + t.x0 + yx.x;
}

// After the last class: the pixel's loss and lse (natural log units): 0 and 0 where the label
// is ignore_index, NaN and NaN where it is outside [0, C) (nothing was read out of bounds).
// Returns the loss.
template <typename acc_t>
BISENET_HD acc_t ce_forward_pixel_finish(const CeForwardPixel<acc_t>& state, acc_t* loss, acc_t* lse) {
  if (state.label == -1) {
    *loss = *lse = static_cast<acc_t>(0);
  } else if (state.label == -2) {
    *loss = *lse = quiet_nan<acc_t>();
  } else {
    const acc_t log_sum = log_acc(state.sum);
    *lse = fma_acc(state.max_z, ln2(log_sum), log_sum);
    *loss = fma_acc(state.max_z - state.label_z, ln2(log_sum), log_sum);
  }
  return *loss;
}

// The CE mean's part of a forward thread, slot after slot: a pixel whose label is not
// ignore_index (a bad label too: its NaN makes the mean NaN) adds its loss and 1.
template <typename acc_t>
BISENET_HD void ce_mean_add(const CeForwardPixel<acc_t>& state, acc_t pixel_loss, acc_t* sum, int64_t* count) {
  if (state.label == -1) return;
  *sum = *sum + pixel_loss;
  *count += 1;
}

// The OHEM weights pass, thread `first` of it: each pixel's weight weight_of(loss[p],
// labels[p]) written, and the sum of weight x loss in order, one fma each (the OHEM loss, by
// the fixed-order sum). kOhemUnroll pixels at a time, their loads ahead of their stores: a
// kernel thread then has that many loads in flight, not one round trip a pixel; the sum's
// order is the same.
constexpr int kOhemUnroll = 4;

template <typename acc_t, typename label_t, typename WeightOf>
BISENET_HD acc_t ohem_weights_pixels(int64_t first, int64_t stride, int64_t pixels, const acc_t* loss,
                                     const label_t* labels, acc_t* weights, WeightOf weight_of) {
  acc_t s = static_cast<acc_t>(0);
  int64_t p = first;
  for (; p + (kOhemUnroll - 1) * stride < pixels; p += kOhemUnroll * stride) {
    acc_t value[kOhemUnroll], w[kOhemUnroll];
    label_t label[kOhemUnroll];
#pragma unroll
    for (int u = 0; u < kOhemUnroll; ++u) {
      value[u] = loss[p + u * stride];
      label[u] = labels[p + u * stride];
    }
#pragma unroll
    for (int u = 0; u < kOhemUnroll; ++u) w[u] = weight_of(value[u], label[u]);
#pragma unroll
    for (int u = 0; u < kOhemUnroll; ++u) {
      weights[p + u * stride] = w[u];
      s = fma_acc(w[u], value[u], s);
    }
  }
  for (; p < pixels; p += stride) {
    const acc_t value = loss[p];
    const acc_t w = weight_of(value, labels[p]);
    weights[p] = w;
    s = fma_acc(w, value, s);
  }
  return s;
}

// ---------------------------------------------------------------------------------------
// Backward tiling. A block owns a tile of low-res rows [ly0, ly1) (a band) and columns
// [lx0, lx1) (a chunk) of sample n, all classes, and the high-res pixels whose first taps
// lie in it, its window: rows [wy0, wy1) = [first(ly0), first(ly1)), likewise columns
// (first = first_dst_with_tap_at_least; bilinear.h). Each high-res pixel is in one window
// only, read and evaluated once per class. The window's pixels reach the low-res pixels
// [ly0, ly1] x [lx0, lx1] (bilinear.h: the rim): the block writes the gradient of those
// strictly inside its grid lines, and its partial sums of those on them to the rim, which
// a second kernel adds up. The window's rows fall into band segments, segment k holding the
// rows whose first tap is s = ly0 + k: [first(s), first(s + 1)).
// Indices inside a tile are 32-bit; only the block's base offsets are 64-bit.
//
// The block, in shared memory (CeBackwardBuffers):
//   prologue: the window rows' and columns' taps, the segment and column bounds, and each
//     window pixel's gradient (0 where skipped: ignored, or a zero incoming gradient), lse
//     and label: read from global memory once for all classes;
//   per pass, the classes c0 + q, q < kCePassClasses (the last pass of an odd C has one):
//     stage:   staged[r][x][q] = the logits of class c0 + q, low-res row row0 + r,
//              interpolated along x at window column x (ATen's order: along x first), times
//              log2(e) (a pass's classes side by side: one 8-byte shared load a tap);
//     segment: item (k, x): over the rows y of segment k, per class c, z log2(e) from the two
//              staged rows, gd = g (exp2(z log2(e) - lse log2(e)) - [c == label]) (same_bits.h:
//              exp2_acc, log2(e) applied once per staged value), summed with y's weight to its first
//              tap s into to_row[q][k][x] and with its weight to s + 1 into to_next_row[q][k][x]:
//              each window pixel read once a pass and evaluated once a class;
//     output:  item (q, i, j) of the reached low-res pixels: the y-sum of column x for low-res
//              row ly0 + i is to_row[q][i][x] + to_next_row[q][i - 1][x] (a segment outside
//              the tile, i = band' or i - 1 = -1, reads zeros); summed along x with x's
//              weight to lx0 + j, it is the gradient of logit (n, c0 + q, ly0 + i, lx0 + j), or
//              on a grid line this tile's part of it, written once.
// Two barriers per pass; the next pass's stage runs beside the output items. A pass shares
// the window pixel's and the row tap's shared loads between its classes.

// The backward's launch plan, made once on the host and followed by the CUDA launch and the
// CPU loop alike: the tile (low-res rows and columns per block), the capacities (the most
// window rows and columns any block has) and the shared bytes they take. The forward with
// gradient ("Forward with gradient" below) runs the same tiles with its own plan.
struct CeBackwardPlan {
  int band, chunk;
  int pass_classes;  // classes staged side by side: kCePassClasses (the backward), or
                     // kCeChunkClasses (the forward with its gradient: all classes in one pass)
  int most_parts;    // the most parts a segment is split into (kCeMaxParts, or fewer: the plan)
  int window_rows, window_cols;
  int part_cols;  // the most parts x window columns of any tile (ce_backward_parts): the length
                  // of a segment row of the sums' tables
  int64_t shared_bytes;
};

// The backward's block size, which the plan fills: a segment item walks one window column of
// a segment (about the upscale factor in rows), so a tile of band x window-columns items
// leaves threads idle where the band is short (1 low-res row at 1/32: 48 of 256 threads, each
// walking up to 48 rows; 32 inside the image's first row and column of tiles). Then each
// segment's rows are split into `parts` consecutive pieces, one a thread, summed in order by
// the output items: band x parts x window columns items, as many parts as keep a tile's items
// within one pass of the block (at most kCeMaxParts), per tile by its columns.
constexpr int kCeBackwardThreads = 256;
constexpr int kCeMaxParts = 8;

BISENET_HD int ce_backward_parts(int band, int cols, int most_parts) {
  const int parts = cols > 0 ? kCeBackwardThreads / (band * cols) : 1;
  return parts < 1 ? 1 : (parts < most_parts ? parts : most_parts);
}


// A window row's or column's taps as the backward block uses them: the two low-res indices
// (for a row, as byte offsets into the staged rows: (i - row0) * window columns values), the weights,
// and the weights to its first tap and to the index after it (bilinear.h: tap_weight), so
// the inner loops take them with one 16-byte-aligned load and no compare.
template <typename acc_t>
struct alignas(16) CeTap {
  int first, second;
  acc_t w0, w1, to_first, to_next;
};

template <typename acc_t>
BISENET_HD CeTap<acc_t> ce_tap(const Taps<acc_t>& t, int first, int second) {
  CeTap<acc_t> tap;
  tap.first = first;
  tap.second = second;
  tap.w0 = t.w0;
  tap.w1 = t.w1;
  tap.to_first = tap_weight(t, t.i0);
  tap.to_next = tap_weight(t, t.i0 + 1);
  return tap;
}

// A window pixel's incoming gradient g (0 where skipped), lse log2(e) and label (-1 where
// skipped), side by side so that the inner loop takes them with one 16-byte shared load from
// one address (two for float64).
template <typename acc_t>
struct alignas(ce_shared_align(4 * sizeof(acc_t))) CePixel {
  acc_t grad, lse_log2;
  int label;
};
static_assert(sizeof(CePixel<float>) == 16 && sizeof(CePixel<double>) == 32, "a pixel: 16 bytes, 32 in float64");

// The shared-memory buffers of one backward block (capacities from the plan).
template <typename acc_t>
struct CeBackwardBuffers {
  CePixel<acc_t>* pixel;  // (window_rows, window_cols): g, lse, label
  int* labels;            // the forward with gradient's in the same place: (window_rows, window_cols)
                          // labels (ce_fused_pixel_item)
  acc_t* staged;       // (band + 1, window_cols, pass_classes): logit rows interpolated along x,
                       // times log2(e), a pass's classes side by side
  acc_t* to_row;       // per class of the pass (slot elements apart), (band * parts, cols) of
                       // the tile: row k * parts + q, part q of segment k's sums to its first
                       // tap row (capacity band * part_cols)
  acc_t* to_next_row;  // likewise: row k * parts + q, part q of segment k's sums to the row
                       // after
  int slot;            // band * part_cols: to_row's and to_next_row's class stride
  acc_t* zeros;        // (parts, cols) of the tile (capacity part_cols): the sums of a segment
                       // outside it (ly0 - 1's to its next row, ly1's to its first), for every class
  int pass_classes;    // the plan's: the classes side by side in staged, and the class slots
  CeTap<acc_t>* row_taps;  // (window_rows,): first, second are offsets into staged
  CeTap<acc_t>* col_taps;  // (window_cols,): first, second are logit columns
  int* part_y;         // (band * parts + 1,) (capacity band * kCeMaxParts + 1): part q of segment k
                       // is rows [part_y[kq], part_y[kq + 1]),
                       // kq = k * parts + q; segment k starts at part_y[k * parts]
  int* column_x;       // (chunk + 3,): column lx0 + j reads window columns [column_x[j], column_x[j + 2])
};

// Where each buffer starts (bytes from the block's shared memory) and the bytes they take:
// the taps first (16-byte aligned), then the pixels (16 or 32 bytes; the forward with
// gradient's labels 4), the acc_t arrays from a 16-byte boundary, the ints, the forward with
// gradient's CE mean tree from an 8-byte one, so each stays aligned.
struct CeBackwardLayout {
  int64_t pixel, staged, to_row, to_next_row, zeros, row_taps, col_taps, part_y, column_x;
  int64_t tree;  // the forward with gradient's CE mean tree (ce_mean_tree_bytes), else empty
  int64_t bytes;
};

template <typename acc_t>
BISENET_HD CeBackwardLayout ce_backward_layout(const CeBackwardPlan& plan) {
  const int64_t window = static_cast<int64_t>(plan.window_rows) * plan.window_cols;
  const int64_t staged = static_cast<int64_t>(plan.band + 1) * plan.window_cols * plan.pass_classes;
  const int64_t segments = static_cast<int64_t>(plan.band) * plan.part_cols * plan.pass_classes;
  const int64_t acc = sizeof(acc_t), taps = sizeof(CeTap<acc_t>), word = sizeof(int);
  CeBackwardLayout at;
  at.row_taps = 0;  // 16-byte aligned first
  at.col_taps = at.row_taps + plan.window_rows * taps;
  at.pixel = at.col_taps + plan.window_cols * taps;
  const int64_t pixel_bytes = plan.pass_classes == kCeChunkClasses ? sizeof(int) : sizeof(CePixel<acc_t>);
  at.staged = (at.pixel + window * pixel_bytes + 15) / 16 * 16;  // 16-byte aligned
  at.to_row = at.staged + staged * acc;
  at.to_next_row = at.to_row + segments * acc;
  at.zeros = at.to_next_row + segments * acc;
  at.part_y = at.zeros + plan.part_cols * acc;
  at.column_x = at.part_y + (static_cast<int64_t>(plan.band) * kCeMaxParts + 1) * word;
  at.tree = (at.column_x + (plan.chunk + 3) * word + 7) / 8 * 8;  // 8-byte aligned (int64 counts)
  at.bytes = at.tree + (plan.pass_classes == kCeChunkClasses ? ce_mean_tree_bytes<acc_t>() : 0);
  return at;
}

template <typename acc_t>
BISENET_HD CeBackwardBuffers<acc_t> ce_backward_buffers(unsigned char* base, const CeBackwardPlan& plan) {
  const CeBackwardLayout at = ce_backward_layout<acc_t>(plan);
  CeBackwardBuffers<acc_t> buf;
  buf.pixel = reinterpret_cast<CePixel<acc_t>*>(base + at.pixel);
  buf.labels = reinterpret_cast<int*>(base + at.pixel);
  buf.staged = reinterpret_cast<acc_t*>(base + at.staged);
  buf.to_row = reinterpret_cast<acc_t*>(base + at.to_row);
  buf.to_next_row = reinterpret_cast<acc_t*>(base + at.to_next_row);
  buf.zeros = reinterpret_cast<acc_t*>(base + at.zeros);
  buf.row_taps = reinterpret_cast<CeTap<acc_t>*>(base + at.row_taps);
  buf.col_taps = reinterpret_cast<CeTap<acc_t>*>(base + at.col_taps);
  buf.part_y = reinterpret_cast<int*>(base + at.part_y);
  buf.column_x = reinterpret_cast<int*>(base + at.column_x);
  buf.slot = plan.band * plan.part_cols;
  buf.pass_classes = plan.pass_classes;
  return buf;
}

// One backward block's tile: sample n, tile (tile_y, tile_x) of the grid, low-res rows
// [ly0, ly1) and columns [lx0, lx1), the high-res window it owns [wy0, wy1) x [wx0, wx1),
// and the low-res rows the window reads, [row0, row0 + rows) (staged per class); the parts of
// its segments (ce_backward_parts, by the plan's band and the tile's columns).
struct CeTile {
  int n, tile_y, tile_x;
  int ly0, ly1, lx0, lx1;
  int wy0, wy1, wx0, wx1;
  int row0, rows;
  int parts;
};

// Blocks run over (n, band, chunk), chunk fastest.
template <typename acc_t>
BISENET_HD CeTile ce_backward_tile(int64_t block, const CeGeometry<acc_t>& geo, const CeBackwardPlan& plan) {
  const int chunks = (geo.w + plan.chunk - 1) / plan.chunk;
  const int bands = (geo.h + plan.band - 1) / plan.band;
  CeTile t;
  t.tile_x = static_cast<int>(block % chunks);
  t.tile_y = static_cast<int>((block / chunks) % bands);
  t.n = static_cast<int>(block / (static_cast<int64_t>(chunks) * bands));
  t.lx0 = t.tile_x * plan.chunk;
  t.ly0 = t.tile_y * plan.band;
  t.ly1 = t.ly0 + plan.band < geo.h ? t.ly0 + plan.band : geo.h;
  t.lx1 = t.lx0 + plan.chunk < geo.w ? t.lx0 + plan.chunk : geo.w;
  t.wy0 = first_dst_with_tap_at_least(t.ly0, geo.h, geo.H, geo.scale_y);
  t.wy1 = first_dst_with_tap_at_least(t.ly1, geo.h, geo.H, geo.scale_y);
  t.wx0 = first_dst_with_tap_at_least(t.lx0, geo.w, geo.W, geo.scale_x);
  t.wx1 = first_dst_with_tap_at_least(t.lx1, geo.w, geo.W, geo.scale_x);
  t.row0 = 0;
  t.rows = 0;
  t.parts = ce_backward_parts(plan.band, t.wx1 - t.wx0, plan.most_parts);
  if (t.wy1 > t.wy0) {  // taps are non-decreasing in y: the first row's i0 to the last row's i1
    t.row0 = bilinear_taps<acc_t>(t.wy0, geo.h, geo.scale_y).i0;
    t.rows = bilinear_taps<acc_t>(t.wy1 - 1, geo.h, geo.scale_y).i1 + 1 - t.row0;
  }
  return t;
}

template <typename acc_t>
BISENET_HD int64_t ce_backward_blocks(const CeGeometry<acc_t>& geo, const CeBackwardPlan& plan) {
  return static_cast<int64_t>(geo.N) * ((geo.h + plan.band - 1) / plan.band) * ((geo.w + plan.chunk - 1) / plan.chunk);
}

// Item counts of a block's steps; the low-res rows and columns the tile's pixels reach.
BISENET_HD int ce_reached_rows(const CeTile& t, int h) { return reached_span(t.ly0, t.ly1, h); }
BISENET_HD int ce_reached_cols(const CeTile& t, int w) { return reached_span(t.lx0, t.lx1, w); }
BISENET_HD int ce_tile_window(const CeTile& t) { return (t.wy1 - t.wy0) * (t.wx1 - t.wx0); }
BISENET_HD int ce_tile_tables(const CeTile& t, int w) {
  return (t.wy1 - t.wy0) + (1 + t.parts) * (t.wx1 - t.wx0) + ((t.ly1 - t.ly0) * t.parts + 1) +
         (ce_reached_cols(t, w) + 2);
}
BISENET_HD int ce_tile_segments(const CeTile& t) { return (t.ly1 - t.ly0) * t.parts; }
BISENET_HD int ce_tile_columns(const CeTile& t, int h) {  // ce_backward_column_item's, where there are parts
  return t.parts > 1 ? ce_reached_rows(t, h) * (t.wx1 - t.wx0) : 0;
}
BISENET_HD int ce_tile_outputs(const CeTile& t, int h, int w) { return ce_reached_rows(t, h) * ce_reached_cols(t, w); }

// Prologue, item over the tables: the window rows' taps, the columns' taps, the zeros, the
// parts' row bounds, the column bounds (clamped to the window: the columns beyond it are
// other tiles').
template <typename acc_t>
BISENET_HD void ce_backward_table_item(int item, const CeTile& t, const CeGeometry<acc_t>& geo,
                                       const CeBackwardBuffers<acc_t>& buf) {
  const int rows = t.wy1 - t.wy0, cols = t.wx1 - t.wx0, part_bounds = (t.ly1 - t.ly0) * t.parts + 1;
  if (item < rows) {
    const Taps<acc_t> ty = bilinear_taps<acc_t>(t.wy0 + item, geo.h, geo.scale_y);
    const int row_bytes = cols * buf.pass_classes * static_cast<int>(sizeof(acc_t));
    buf.row_taps[item] = ce_tap(ty, (ty.i0 - t.row0) * row_bytes, (ty.i1 - t.row0) * row_bytes);
  } else if ((item -= rows) < cols) {
    const Taps<acc_t> tx = bilinear_taps<acc_t>(t.wx0 + item, geo.w, geo.scale_x);
    buf.col_taps[item] = ce_tap(tx, tx.i0, tx.i1);
  } else if ((item -= cols) < t.parts * cols) {
    buf.zeros[item] = static_cast<acc_t>(0);
  } else if ((item -= t.parts * cols) < part_bounds) {
    const int k = item / t.parts, q = item % t.parts;  // segment k's rows split evenly
    const int begin = first_dst_with_tap_at_least(t.ly0 + k, geo.h, geo.H, geo.scale_y);
    const int end = q == 0 ? begin : first_dst_with_tap_at_least(t.ly0 + k + 1, geo.h, geo.H, geo.scale_y);
    buf.part_y[item] = begin + (end - begin) * q / t.parts;
  } else {
    item -= part_bounds;
    const int x = first_dst_with_tap_at_least(t.lx0 - 1 + item, geo.w, geo.W, geo.scale_x);
    buf.column_x[item] = x < t.wx0 ? t.wx0 : (x > t.wx1 ? t.wx1 : x);
  }
}

// Prologue, item over the window pixels (row-major): the pixel's gradient, lse and label,
// loaded (ce_backward_pixel_load: a kernel thread loads several items before it stores them,
// so their loads are in flight together) and stored (ce_backward_pixel_store). labels, lse:
// sample n's (H, W); grad_loss: sample n's (H, W), or with grad_stride 0 the one value of
// every pixel; a pixel's gradient is its grad_loss times grad_scale (ce_grad_scale).
template <typename acc_t>
struct CePixelLoad {
  int64_t label;
  acc_t grad, lse;
};

template <typename label_t, typename acc_t>
BISENET_HD CePixelLoad<acc_t> ce_backward_pixel_load(int item, const CeTile& t, const CeGeometry<acc_t>& geo,
                                                     const label_t* labels, const acc_t* grad_loss, int grad_stride,
                                                     acc_t grad_scale, const acc_t* lse) {
  const int cols = t.wx1 - t.wx0;
  const int p = (t.wy0 + item / cols) * geo.W + t.wx0 + item % cols;
  return {static_cast<int64_t>(labels[p]), grad_loss[p * grad_stride] * grad_scale, lse[p]};
}

// The backward's factor of the incoming gradient: *grad_scale, or 1 (exact: x * 1 is x).
template <typename acc_t>
BISENET_HD acc_t ce_grad_scale(const acc_t* grad_scale) {
  return grad_scale != nullptr ? *grad_scale : static_cast<acc_t>(1);
}

// Whether the backward's gradient is the weighted sum's where there is a gather to do: a
// sum_weight given and not 0 (OHEM's hard branch, ohem_hard_weight; read where it lies, on
// the device for the kernels: no sync). Without grad_loss it always is (sum_only).
template <typename acc_t>
BISENET_HD bool ce_weighted_sum_taken(const acc_t* sum_weight) {
  return sum_weight != nullptr && *sum_weight != static_cast<acc_t>(0);
}

// The weighted sum's factor of grad_sum: *sum_weight, over *sum_divisor where there is one
// (the CE mean's backward: its incoming gradient over the counted pixels' number, the
// division torch's `grad_mean / denominator` did; IEEE division on both sides, so the same
// bits), times the incoming gradient's factor (ce_grad_scale).
template <typename acc_t>
BISENET_HD acc_t ce_weighted_sum_scale(const acc_t* sum_weight, const acc_t* sum_divisor, const acc_t* grad_scale) {
  const acc_t weight = sum_divisor != nullptr ? *sum_weight / *sum_divisor : *sum_weight;
  return weight * ce_grad_scale(grad_scale);
}

template <typename acc_t>
BISENET_HD void ce_backward_pixel_store(const CePixelLoad<acc_t>& loaded, int item, int classes, int64_t ignore_index,
                                        const CeBackwardBuffers<acc_t>& buf) {
  const acc_t g = loaded.grad;
  const bool skipped = g == static_cast<acc_t>(0) || loaded.label == ignore_index;
  CePixel<acc_t> pixel;
  pixel.grad = skipped ? static_cast<acc_t>(0) : g;
  pixel.lse_log2 = loaded.lse * log2e(g);  // in log2 units, as the staged logits
  // a label outside [0, C) matches no class; its lse is NaN (forward), so is its gradient
  pixel.label = skipped || loaded.label < 0 || loaded.label >= classes ? -1 : static_cast<int>(loaded.label);
  buf.pixel[item] = pixel;
}

// Per pass, stage item (r, x) (r < rows, x < window columns): low-res row row0 + r of each
// of the pass's classes c0 + q (q < classes) interpolated along x at window column wx0 + x,
// times log2(e), into staged[r][x][q]. As the forward's (CeStageItem): the kernel makes its
// items once and loads the next pass's logits before this pass's segment items. sample: sample
// n's (C, h, w) logits.
template <typename acc_t>
BISENET_HD CeStageItem<acc_t> ce_backward_stage_item_for(int r, int x, const CeTile& t, const CeGeometry<acc_t>& geo,
                                                         const CeBackwardBuffers<acc_t>& buf) {
  const CeTap<acc_t> tx = buf.col_taps[x];
  return ce_stage_item((t.row0 + r) * geo.w, Taps<acc_t>{tx.first, tx.second, tx.w0, tx.w1},
                       (r * (t.wx1 - t.wx0) + x) * buf.pass_classes);
}

template <typename scalar_t, typename acc_t>
BISENET_HD void ce_backward_stage_item(int r, int x, const CeTile& t, const CeGeometry<acc_t>& geo,
                                       const scalar_t* sample, int c0, int classes,
                                       const CeBackwardBuffers<acc_t>& buf) {
  const CeStageItem<acc_t> item = ce_backward_stage_item_for(r, x, t, geo, buf);
  ce_stage_pass_store(ce_stage_pass_load<scalar_t, acc_t>(item, sample, c0, classes, geo.h * geo.w), item, classes,
                      buf.staged);
}

// Per pass, segment item (kq, x) (kq < band' * parts, x < window columns): part q = kq % parts
// of the rows of segment k = kq / parts at window column x (the segment's rows split into
// parts consecutive pieces), for each class c = c0 + i of the pass (i < kClasses: the pass's
// classes, kCePassClasses or the odd C's last one), their g (exp(z - lse) - [c == label])
// summed with each row's weight to low-res row s = ly0 + k and to s + 1: each row's pixel and
// taps read once for the pass. Skipped pixels (g == 0) add +0 whatever their d (a select, not
// a branch: with no branch in the walk the compiler overlaps one pixel's chain of dependent
// shared loads and arithmetic with the next pixels').
template <int kClasses, typename acc_t>
BISENET_HD void ce_backward_segment_item(int kq, int x, int c0, const CeTile& t, const CeBackwardBuffers<acc_t>& buf) {
  const int cols = t.wx1 - t.wx0;
  acc_t sum_row[kClasses], sum_next[kClasses];
#pragma unroll
  for (int i = 0; i < kClasses; ++i) sum_row[i] = sum_next[i] = static_cast<acc_t>(0);
  const int y_begin = buf.part_y[kq] - t.wy0, y_end = buf.part_y[kq + 1] - t.wy0;
  const CePixel<acc_t>* pixel_column = buf.pixel + x;  // column x of the window's (rows, cols) arrays
  const acc_t* staged_column = buf.staged + x * buf.pass_classes;
  for (int y = y_begin; y < y_end; ++y) {
    const CePixel<acc_t> pixel = pixel_column[y * cols];
    const acc_t g = pixel.grad;
    const CeTap<acc_t> ty = buf.row_taps[y];  // its first tap is s = ly0 + k
    const CeStaged<acc_t, kClasses> first = staged_pass_at<kClasses>(staged_column, ty.first);
    const CeStaged<acc_t, kClasses> second = staged_pass_at<kClasses>(staged_column, ty.second);
#pragma unroll
    for (int i = 0; i < kClasses; ++i) {
      const acc_t z_log2 = lerp_taps(Taps<acc_t>{0, 0, ty.w0, ty.w1}, first.z_log2[i], second.z_log2[i]);
      acc_t d = exp2_acc(z_log2 - pixel.lse_log2);
      if (pixel.label == c0 + i) d -= static_cast<acc_t>(1);
      const acc_t gd = g == static_cast<acc_t>(0) ? static_cast<acc_t>(0) : g * d;  // d may be NaN there
      sum_row[i] = fma_acc(ty.to_first, gd, sum_row[i]);
      sum_next[i] = fma_acc(ty.to_next, gd, sum_next[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kClasses; ++i) {
    buf.to_row[i * buf.slot + kq * cols + x] = sum_row[i];
    buf.to_next_row[i * buf.slot + kq * cols + x] = sum_next[i];
  }
}

// Window column x's y-sum for output row i of the tile: segment ly0 + i's parts to its first
// tap row (to_row, parts rows from row i * parts), then segment ly0 + i - 1's to the row after
// (to_next_row, parts rows from row (i - 1) * parts), each in order, then the two added (a
// segment outside the tile, ly0 - 1's or ly1's, reads the buffers' zeros).
template <typename acc_t>
BISENET_HD acc_t ce_backward_column_sum(const acc_t* to_row, const acc_t* to_next_row, int parts, int cols, int x) {
  acc_t from_row = to_row[x], from_next_row = to_next_row[x];
  for (int q = 1; q < parts; ++q) {
    from_row += to_row[q * cols + x];
    from_next_row += to_next_row[q * cols + x];
  }
  return from_row + from_next_row;
}

// Output row i's sums of class slot q: where its segments' parts are (to_row, to_next_row;
// the zeros for a segment outside the tile: to_next_row's for i = 0, to_row's for i =
// band'), and where its column sums go once summed (ce_backward_column_item): over the first
// row it reads, to_row's where segment ly0 + i is the tile's, else (the last reached row)
// to_next_row's; never the zeros.
template <typename acc_t>
struct CeOutputRow {
  acc_t* to_row;
  acc_t* to_next_row;
  acc_t* summed;
};

template <typename acc_t>
BISENET_HD CeOutputRow<acc_t> ce_output_row(int q, int i, const CeTile& t, const CeBackwardBuffers<acc_t>& buf) {
  const int cols = t.wx1 - t.wx0;
  CeOutputRow<acc_t> row;
  const bool first_tap_here = i < t.ly1 - t.ly0;  // segment ly0 + i is the tile's
  row.to_row = first_tap_here ? buf.to_row + q * buf.slot + i * t.parts * cols : buf.zeros;
  row.to_next_row = i > 0 ? buf.to_next_row + q * buf.slot + (i - 1) * t.parts * cols : buf.zeros;
  row.summed = first_tap_here ? row.to_row : row.to_next_row;
  return row;
}

// Per pass, where the tile's segments have parts (t.parts > 1), column item (q, i, x) = item
// (q < the pass's classes, i < reached rows, x < window columns): window column x's y-sum for
// output row i into its `summed` row, so that an output item reads one value a column, not
// 2 x parts (at 1/32 one thread summed up to 64 columns x 4 parts x 2 rows for an output while
// the block's other threads waited). Each item reads and writes only its own (q, i, x) values;
// the sums and their order are those the output item made itself, so the bits are too.
template <typename acc_t>
BISENET_HD void ce_backward_column_item(int item, const CeTile& t, int h, const CeBackwardBuffers<acc_t>& buf) {
  const int cols = t.wx1 - t.wx0, rows = ce_reached_rows(t, h);
  const int q = item / (rows * cols);
  item -= q * rows * cols;
  const int i = item / cols, x = item % cols;
  const CeOutputRow<acc_t> row = ce_output_row(q, i, t, buf);
  row.summed[x] = ce_backward_column_sum(row.to_row, row.to_next_row, t.parts, cols, x);
}

// The rim (bilinear.h: TileRim) holds one value per entry and class, each class's entries
// adjacent: the tiles' partial gradients of the logits on grid lines.

// Per pass, output item (q, i, j) = item (q < the pass's classes, i < reached rows, j <
// reached columns; `outputs` = ce_tile_outputs): the gradient of logit (n, c0 + q, ly0 + i,
// lx0 + j) into sample_out, sample n's (C, h, w), or on a grid line this tile's part of it
// into the rim.
template <typename scalar_t, typename acc_t>
BISENET_HD void ce_backward_output_item(int item, int outputs, int c0, const CeTile& t, const CeGeometry<acc_t>& geo,
                                        const CeBackwardBuffers<acc_t>& buf, const TileRim<acc_t>& rim,
                                        scalar_t* sample_out) {
  const int cols = t.wx1 - t.wx0, reached_cols = ce_reached_cols(t, geo.w);
  const int q = item / outputs, c = c0 + q;
  item -= q * outputs;
  const int i = item / reached_cols, j = item % reached_cols;
  // segment ly0 + i's parts: rows whose first tap is this row; segment ly0 + i - 1's parts:
  // rows whose second tap is; summed by the column items where there are parts
  const CeOutputRow<acc_t> row = ce_output_row(q, i, t, buf);
  const auto column_sum = [&](int x) {  // window column x's y-sum for this row
    return t.parts > 1 ? row.summed[x] : ce_backward_column_sum(row.to_row, row.to_next_row, 1, cols, x);
  };
  // summed along x in order: the columns [column_x[j], column_x[j + 1]) have their first tap
  // at lx0 + j - 1 and reach lx0 + j as the index after it, the columns [column_x[j + 1],
  // column_x[j + 2]) have it as their first tap
  acc_t grad = static_cast<acc_t>(0);
  const int x_mid = buf.column_x[j + 1] - t.wx0;
  for (int x = buf.column_x[j] - t.wx0; x < x_mid; ++x) grad = fma_acc(buf.col_taps[x].to_next, column_sum(x), grad);
  for (int x = x_mid; x < buf.column_x[j + 2] - t.wx0; ++x)
    grad = fma_acc(buf.col_taps[x].to_first, column_sum(x), grad);
  if (on_rim(i, j, rim.tile_h, rim.tile_w))
    rim.data[rim_offset(rim, t.n, t.tile_y, t.tile_x, i, j, c)] = grad;
  else
    sample_out[(c * geo.h + t.ly0 + i) * geo.w + t.lx0 + j] = static_cast<scalar_t>(grad);
}

// ---------------------------------------------------------------------------------------
// Forward with gradient (the CE mean's training step: C <= kCeChunkClasses). The backward's
// tiles, plan (pass_classes = kCeChunkClasses), rim and output items, in one pass of all the
// classes, with what the forward computes: a block stages its rows of every class as the
// forward's chunk (groups of 4, 80-byte entries: ce_stage_group), then each segment item
// walks its rows once: a pixel's z from its two staged rows, the maximum and the exps as the
// forward's (ce_pixel_chunk_exps: the same staged values and order, so loss and lse are the
// forward's bits), its loss and lse written, and its gradient softmax - onehot = exps / sum -
// [c == label] summed to the segment's rows as the backward's. Each exp is evaluated once for
// the loss and its gradient, where the two kernels evaluate it twice, and the staging, the
// z lerps and the pixel reads happen once. The output is grad_sum, the gradient of the sum
// of the counted pixels' losses (ignored pixels add 0; a bad label's NaN is its gradient
// too), in acc_t; the CE mean's gradient is grad_sum times d mean / denominator (loss.py).
// The CE mean's sums: each thread adds its segment items' counted losses in item order,
// then the block's tree (ce_mean_tree_bytes, after the plan's buffers: CeBackwardLayout.tree),
// then the rim launch's block 0 over the blocks (ohem_ce.cu: ce_mean_final_block), as
// ce_mean_final_kernel does after the forward.
constexpr int kCeFusedMostClasses = kCeChunkClasses;

// Prologue, item over the window pixels (row-major): its label into buf.labels (ce_label_code).
template <typename label_t, typename acc_t>
BISENET_HD void ce_fused_pixel_item(int item, const CeTile& t, const CeGeometry<acc_t>& geo, const label_t* labels,
                                    int64_t ignore_index, const CeBackwardBuffers<acc_t>& buf) {
  const int cols = t.wx1 - t.wx0;
  const int64_t label = static_cast<int64_t>(labels[(t.wy0 + item / cols) * geo.W + t.wx0 + item % cols]);
  buf.labels[item] = ce_label_code(label, ignore_index, geo.C);
}

// Stage item (r, g, x) (r < rows, g < the groups of C, x < window columns): classes 4 g + i of
// low-res row row0 + r at window column x into staged[r][x][4 g + i] (ce_stage_group).
template <typename scalar_t, typename acc_t>
BISENET_HD void ce_fused_stage_item(int r, int g, int x, const CeTile& t, const CeGeometry<acc_t>& geo,
                                    const scalar_t* sample, const CeBackwardBuffers<acc_t>& buf) {
  const CeTap<acc_t> tx = buf.col_taps[x];
  ce_stage_group((t.row0 + r) * geo.w, Taps<acc_t>{tx.first, tx.second, tx.w0, tx.w1}, g * kCeGroupClasses,
                 (r * (t.wx1 - t.wx0) + x) * kCeChunkClasses + g * kCeGroupClasses, geo, sample, buf.staged);
}

// Which pixels the forward with gradient's grad_sum adds up: the counted ones (the CE mean's:
// a bad label's too, its NaN its gradient), or with a threshold the hard ones, loss >
// threshold (OHEM's: the pixels its hard branch keeps, compared as ohem_pick compares them;
// a bad label's NaN loss is not hard).
template <typename acc_t>
struct CeGradPixels {
  bool hard_only;
  acc_t threshold;
};

template <typename acc_t>
BISENET_HD bool ce_grad_counts(const CeGradPixels<acc_t>& which, int label, acc_t pixel_loss) {
  if (label == -2) return !which.hard_only;
  return label >= 0 && (!which.hard_only || pixel_loss > which.threshold);
}

// Segment item (kq, x) as the backward's (ce_backward_segment_item), all classes: for each of
// its rows the pixel's loss and lse into sample_loss and sample_lse (sample n's (H, W)), its
// counted loss into the thread's CE mean sums (ce_mean_add), and exps[c] / sum - [c == label]
// (0 where the pixel is not one of `which`) summed with the row's weights to the segment's
// two low-res rows. The division once a pixel (1 / sum, IEEE on both sides), a product a class.
template <typename acc_t>
BISENET_HD void ce_fused_segment_item(int kq, int x, const CeTile& t, const CeGeometry<acc_t>& geo,
                                      const CeBackwardBuffers<acc_t>& buf, const CeGradPixels<acc_t>& which,
                                      acc_t* sample_loss, acc_t* sample_lse, acc_t* mean_sum, int64_t* mean_count) {
  const int cols = t.wx1 - t.wx0, groups = ce_chunk_groups(geo.C);
  acc_t sum_row[kCeChunkClasses], sum_next[kCeChunkClasses];
#pragma unroll
  for (int q = 0; q < kCeChunkClasses; ++q) sum_row[q] = sum_next[q] = static_cast<acc_t>(0);
  const int y_begin = buf.part_y[kq] - t.wy0, y_end = buf.part_y[kq + 1] - t.wy0;
  const int* label_column = buf.labels + x;  // column x of the window's (rows, cols) labels
  for (int y = y_begin; y < y_end; ++y) {
    const CeTap<acc_t> ty = buf.row_taps[y];  // first, second: byte offsets of the staged rows
    CeForwardPixel<acc_t> state;
    state.label = label_column[y * cols];
    state.staged0 = ty.first / static_cast<int>(sizeof(acc_t)) + x * kCeChunkClasses;
    state.staged1 = ty.second / static_cast<int>(sizeof(acc_t)) + x * kCeChunkClasses;
    state.w0 = ty.w0;
    state.w1 = ty.w1;
    state.max_z = state.sum = state.label_z = static_cast<acc_t>(0);
    acc_t exps[kCeChunkClasses];
    ce_pixel_chunk_exps(state, 0, geo.C, buf.staged, exps);
    const int p = (t.wy0 + y) * geo.W + t.wx0 + x;
    const acc_t pixel_loss = ce_forward_pixel_finish(state, sample_loss + p, sample_lse + p);
    ce_mean_add(state, pixel_loss, mean_sum, mean_count);
    const bool counts = ce_grad_counts(which, state.label, pixel_loss);
    const acc_t share = state.label == -2 ? quiet_nan<acc_t>() : static_cast<acc_t>(1) / state.sum;
#pragma unroll
    for (int g = 0; g < kCeChunkGroups; ++g) {
      if (g < groups) {
#pragma unroll
        for (int i = 0; i < kCeGroupClasses; ++i) {
          const int q = g * kCeGroupClasses + i;
          acc_t d = exps[q] * share;
          if (state.label == q) d -= static_cast<acc_t>(1);
          const acc_t gd = counts ? d : static_cast<acc_t>(0);  // not counted (ignored): d may be NaN
          sum_row[q] = fma_acc(ty.to_first, gd, sum_row[q]);
          sum_next[q] = fma_acc(ty.to_next, gd, sum_next[q]);
        }
      }
    }
  }
#pragma unroll
  for (int q = 0; q < kCeChunkClasses; ++q) {
    if (q < geo.C) {
      buf.to_row[q * buf.slot + kq * cols + x] = sum_row[q];
      buf.to_next_row[q * buf.slot + kq * cols + x] = sum_next[q];
    }
  }
}

// The CE mean's tree of a forward-with-gradient block (after the plan's buffers).
template <typename acc_t>
struct CeMeanTree {
  acc_t* sums;
  int64_t* counts;
};

template <typename acc_t>
BISENET_HD CeMeanTree<acc_t> ce_fused_mean_tree(unsigned char* base, const CeBackwardPlan& plan) {
  const int64_t tree = ce_backward_layout<acc_t>(plan).tree;
  return {reinterpret_cast<acc_t*>(base + tree),
          reinterpret_cast<int64_t*>(base + tree + kSumThreads * static_cast<int64_t>(sizeof(acc_t)))};
}

// The backward where the gradient is a weighted sum's (the CE mean's; OHEM's hard branch,
// ohem_hard_weight): item v, elements kCeSumVec v .. kCeSumVec v + kCeSumVec - 1 of the
// logits' gradient (those below count), grad_sum[i] times scale (the sum's pixels' weight
// times the incoming gradient). A whole item moves as one vector each way: grad_sum and
// grad_logits are aligned to kCeSumVec elements (the host sees to it: prepare_ce_backward).
constexpr int kCeSumVec = 4;

template <typename index_t>
BISENET_HD index_t ce_weighted_sum_items(index_t count) {
  return (count + kCeSumVec - 1) / kCeSumVec;
}

template <typename scalar_t, typename acc_t, typename index_t>
BISENET_HD void ce_weighted_sum_item(index_t item, index_t count, const acc_t* grad_sum, acc_t scale,
                                     scalar_t* grad_logits) {
  const index_t first = item * kCeSumVec;
  if (first + kCeSumVec <= count) {
    const Vec<acc_t, kCeSumVec> sums = reinterpret_cast<const Vec<acc_t, kCeSumVec>*>(grad_sum)[item];
    Vec<scalar_t, kCeSumVec> grads;
#pragma unroll
    for (int k = 0; k < kCeSumVec; ++k) grads.v[k] = static_cast<scalar_t>(sums.v[k] * scale);
    reinterpret_cast<Vec<scalar_t, kCeSumVec>*>(grad_logits)[item] = grads;
  } else {
    for (index_t i = first; i < count; ++i) grad_logits[i] = static_cast<scalar_t>(grad_sum[i] * scale);
  }
}

// The grid-line logits' pass, item = (n * C + c) * rim_pixels + p: the sum of the tiles'
// partial gradients (rim_sum) into grad_logits (N, C, h, w). index_t: int32_t where the
// items fit, else int64_t.
template <typename scalar_t, typename acc_t, typename index_t>
BISENET_HD void ce_backward_rim_item(index_t item, const CeGeometry<acc_t>& geo, const TileRim<acc_t>& rim,
                                     scalar_t* grad_logits) {
  const index_t pixels = static_cast<index_t>(rim_pixels(rim, geo.h, geo.w));
  const int p = static_cast<int>(item % pixels);
  const index_t plane_index = item / pixels;  // n * C + c
  const int c = static_cast<int>(plane_index % geo.C), n = static_cast<int>(plane_index / geo.C);
  int i, j;
  rim_pixel(rim, geo.h, geo.w, p, &i, &j);
  grad_logits[static_cast<int64_t>(plane_index) * geo.h * geo.w + static_cast<int64_t>(i) * geo.w + j] =
      static_cast<scalar_t>(rim_sum(rim, 0, n, c, i, j));
}

// Host side: the plan. band, chunk <= 0: automatic, a tile owning about 32 x 64 high-res
// pixels, shrunk (the side with the longer window first) until it fits budget_bytes (the
// device's; see kCeMaxSharedBytes), 1 x 1 at the least. An explicit tile is kept. Returns
// whether the plan is within budget_bytes.
//
// The 1/4 and 1/8 heads' tiles (51.7 and 48.8 KiB) leave room for 4 blocks an SM on sm_90
// (as many as the kernel's 64 registers allow); at 1/16 and 1/32 the 32 x 64 pixels take
// 54.8 and 70.3 KiB (4 and 3 blocks an SM by shared memory: 228 KiB an SM, 1 KiB of it
// reserved a block; before the sums' tables dropped their rows of zeros, 56.3 and 73.3 KiB,
// 3 and 3). Measured on an H200 (2026-11-28, bf16, batch 4): at
// 1/32 the 1 x 2 tile's backward took 811 us where the 1 x 1 tile that a 54 KiB budget
// shrank it to took 1867.
template <typename acc_t>
inline void ce_backward_capacities(const CeGeometry<acc_t>& geo, CeBackwardPlan* plan) {
  plan->window_rows = most_owned_span(geo.h, geo.H, geo.scale_y, plan->band);
  plan->window_cols = most_owned_span(geo.w, geo.W, geo.scale_x, plan->chunk);
  // parts x columns is at most kCeBackwardThreads / band and most_parts x columns where a tile
  // has parts, else its columns
  const int split = kCeBackwardThreads / plan->band, most = plan->most_parts * plan->window_cols;
  const int parts_cols = split < most ? split : most;
  plan->part_cols = plan->window_cols > parts_cols ? plan->window_cols : parts_cols;
  plan->shared_bytes = ce_backward_layout<acc_t>(*plan).bytes;
}

template <typename acc_t>
inline bool plan_ce_backward(const CeGeometry<acc_t>& geo, int band, int chunk, int64_t budget_bytes,
                             CeBackwardPlan* plan, int pass_classes = kCePassClasses) {
  plan->pass_classes = pass_classes;
  plan->most_parts = kCeMaxParts;
  // the forward with gradient's segment sums take 20 classes: it splits segments into fewer
  // parts before it takes a smaller tile
  const auto fewer_parts = [&] {
    if (pass_classes != kCeChunkClasses || plan->most_parts == 1) return false;
    plan->most_parts /= 2;
    return true;
  };
  if (band > 0 && chunk > 0) {
    plan->band = band;
    plan->chunk = chunk;
    do ce_backward_capacities(geo, plan);
    while (plan->shared_bytes > budget_bytes && fewer_parts());
    return plan->shared_bytes <= budget_bytes;
  }
  const int target_rows = 32, target_cols = 64;
  band = static_cast<int>((static_cast<int64_t>(target_rows) * geo.h + geo.H - 1) / geo.H);
  chunk = static_cast<int>((static_cast<int64_t>(target_cols) * geo.w + geo.W - 1) / geo.W);
  plan->band = band < 1 ? 1 : (band > geo.h ? geo.h : band);
  if (pass_classes == kCeChunkClasses) {  // an inner tile's segment items one round of the block
    const int64_t most =
        static_cast<int64_t>(kCeBackwardThreads) * geo.w / (static_cast<int64_t>(plan->band) * geo.W);
    chunk = chunk < most ? chunk : static_cast<int>(most);
  }
  plan->chunk = chunk < 1 ? 1 : (chunk > geo.w ? geo.w : chunk);
  while (true) {
    ce_backward_capacities(geo, plan);
    if (plan->shared_bytes <= budget_bytes) break;
    if (fewer_parts()) continue;
    if (plan->band == 1 && plan->chunk == 1) break;
    if (plan->chunk > 1 && (plan->window_cols >= plan->window_rows || plan->band == 1)) --plan->chunk;
    else --plan->band;
  }
  return plan->shared_bytes <= budget_bytes;
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
// host. One pass per 8 bits (4 for float32, 8 for float64), each a histogram of the matching
// keys' next digit; the first also counts the valid and hard pixels. After each pass the
// digit is picked from the pass's counts; after the last the counts above and at the k-th
// come from the histograms (ohem_take_digit). Then the weights pass. On CUDA all of it is one
// cooperative launch, each block picking the digits for itself (ohem_ce.cu: ohem_select_kernel).
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

// The radix select's passes: 8 bits each.
template <typename acc_t>
constexpr int ohem_passes() {
  return static_cast<int>(sizeof(typename OhemKey<acc_t>::type));
}

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

// After a pass's histogram: the pass's digit is the largest d with at least `remaining` keys
// at or above it. Seen from digit d, with `above` keys on larger digits (a scan from 255
// down): exactly one d has above < remaining <= above + count[d] (the matching keys number
// at least `remaining`: ohem_setup and ohem_take_digit keep it so).
BISENET_HD bool ohem_is_digit(int64_t above, int64_t count, int64_t remaining) {
  return above < remaining && above + count >= remaining;
}

// The pass's digit joins the prefix; the keys above it are ranked, so `remaining` drops by
// their number. After the last pass (shift 0) the prefix is the k-th largest key, `count`
// keys equal it and k - remaining are larger.
BISENET_HD void ohem_take_digit(int digit, int64_t above, int64_t count, int shift, int64_t* state) {
  state[kOhemRemaining] -= above;
  state[kOhemPrefix] |= static_cast<int64_t>(digit) << shift;
  if (shift == 0) {
    state[kOhemGreater] = state[kOhemK] - state[kOhemRemaining];
    state[kOhemTied] = count;
  }
}

// The whole pick, serially (the CPU loop; each CUDA block scans the 256 digits in parallel).
BISENET_HD void ohem_pick_digit(const int64_t* counts, int shift, int64_t* state) {
  const int64_t remaining = state[kOhemRemaining];
  int64_t above = 0;
  for (int d = 255; d >= 0; --d) {
    if (ohem_is_digit(above, counts[d], remaining)) {
      ohem_take_digit(d, above, counts[d], shift, state);
      return;
    }
    above += counts[d];
  }
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

// The weights of a kept and of a tied pixel, once the state is complete: the same for every
// pixel, so a kernel's thread divides once, not per pixel.
template <typename acc_t>
struct OhemWeightValues {
  acc_t kept, tied;
};

template <typename acc_t>
BISENET_HD OhemWeightValues<acc_t> ohem_weight_values(const int64_t* state) {
  OhemWeightValues<acc_t> values;
  if (state[kOhemUseHard]) {  // no pixel is tied
    const int64_t hard = state[kOhemHard];
    values.kept = static_cast<acc_t>(1) / static_cast<acc_t>(hard > 1 ? hard : 1);
    values.tied = static_cast<acc_t>(0);
  } else {
    const acc_t k = static_cast<acc_t>(state[kOhemK]);
    values.kept = static_cast<acc_t>(1) / k;
    values.tied = ohem_tied_share<acc_t>(state) / k;
  }
  return values;
}

// The weight each hard pixel gets where the hard branch was taken, else 0 (the top-k branch,
// or class weights: ohem_weights' caller passes has_class_weights). Where it is not 0 the
// OHEM loss's gradient is the forward with gradient's sum over the hard pixels (CeGradPixels)
// times it (ce_weighted_sum_item), and the backward's gather is skipped.
template <typename acc_t>
BISENET_HD acc_t ohem_hard_weight(const int64_t* state, bool has_class_weights) {
  return state[kOhemUseHard] && !has_class_weights ? ohem_weight_values<acc_t>(state).kept : static_cast<acc_t>(0);
}

template <typename acc_t>
BISENET_HD acc_t ohem_pixel_weight(OhemPick pick, const OhemWeightValues<acc_t>& values) {
  return pick == kOhemKept ? values.kept : pick == kOhemTiedAtKth ? values.tied : static_cast<acc_t>(0);
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
