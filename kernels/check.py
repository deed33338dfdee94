"""The fused ops checked against their references on small random cases, forward and backward.

    python -m kernels.check            # every case on the GPU; exit 1 on a disagreement
    python -m kernels.check --quick    # the cases kernels.select() runs before using the kernels

kernels.select("auto") runs the quick cases once per process (milliseconds) before handing
out the CUDA kernels, and falls back to the reference of an op that disagrees; .ci/gpu runs
all of them under compute-sanitizer. Each case compares the op on float32 inputs with the
reference computed in float64 from the same inputs: the relative L2 error of the result and
of every input gradient must be within TOLERANCE (TOLERANCE_16_BIT for the bfloat16 case).
"""
import argparse
import sys

import torch

from . import bga, loss

# float32 arithmetic against float64: a per-pixel loss is within about 4 C ulp of
# |z| + log C (~1e-5 relative for C = 19), a BGA output within a few ulp, their gradients
# sums of at most a few hundred float32 terms; 1e-4 is several times those bounds, far below
# what a wrong tap, a missed tile or a race gives (order 1e-2 and up).
TOLERANCE = 1e-4
# bfloat16 results rounded once, 2^-9 relative at most (1.7e-3 measured as the relative L2
# error of the BGA kernels' outputs and gradients; 3.4e-3 down eager bfloat16's several
# roundings, which the CPU test runs too): twice that, far below a wrong channel (order 1)
TOLERANCE_16_BIT = 2.0 ** -7


def relative_error(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def loss_case(name, n, classes, low, high, thresh, weighted=False, constant_planes=False):
    """constant_planes: each (sample, class) logit plane one small integer, upsampled by 4: the
    interpolation is exact, so the losses are one value per (sample, label), exactly tied in
    float32 as in float64; with a high threshold (few hard pixels) OHEM takes the k largest
    and the k-th falls in a tie: the radix select, not only the hard-pixel branch."""
    def run(device, generator):
        class_weights = torch.rand(classes, generator=generator).to(device) + 0.1 if weighted else None
        if constant_planes:
            logits = torch.randint(-3, 4, (n, classes, 1, 1), generator=generator).float().expand(n, classes, *low)
            logits = logits.contiguous().to(device)
        else:
            logits = (torch.randn(n, classes, *low, generator=generator) * 3).to(device)
        labels = torch.randint(0, classes, (n, *high), generator=generator)
        labels[torch.rand(n, *high, generator=generator) < 0.1] = 255
        labels = labels.to(device)
        fused_logits = logits.clone().requires_grad_(True)
        exact_logits = logits.double().requires_grad_(True)
        fused = loss.ohem_cross_entropy(fused_logits, labels, thresh=thresh, validate=False,
                                        class_weights=class_weights)
        exact = loss.ohem_cross_entropy_reference(exact_logits, labels, thresh=thresh, validate=False,
                                                  class_weights=class_weights)
        fused.backward()
        exact.backward()
        return max(relative_error(fused, exact), relative_error(fused_logits.grad, exact_logits.grad))
    return "loss", name, run, TOLERANCE


def bga_case(name, n, channels, high, low, channels_last, dtype=torch.float32):
    """dtype bfloat16 with channels_last and an even C: the backward walks a channel pair an
    item (bga_math.h: walk_lanes), the path bfloat16 training takes."""
    def run(device, generator):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        shapes = [(n, channels, *high)] + [(n, channels, *low)] * 3
        inputs = [torch.randn(shape, generator=generator).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
                  for shape in shapes]
        grad_out = torch.randn(shapes[0], generator=generator).to(device=device, dtype=dtype)
        fused_leaves = [t.clone().requires_grad_(True) for t in inputs]
        exact_leaves = [t.double().requires_grad_(True) for t in inputs]
        fused = bga.bga_aggregate(*fused_leaves)
        exact = bga.bga_aggregate_reference(*exact_leaves)
        fused.backward(grad_out)
        exact.backward(grad_out.double())
        return max([relative_error(fused, exact)] +
                   [relative_error(a.grad, b.grad) for a, b in zip(fused_leaves, exact_leaves)])
    return "bga", name, run, TOLERANCE if dtype == torch.float32 else TOLERANCE_16_BIT


QUICK = [
    loss_case("CE 2x19x9x13 -> 67x101", 2, 19, (9, 13), (67, 101), None),
    loss_case("OHEM 2x19x9x13 -> 67x101", 2, 19, (9, 13), (67, 101), 0.7),
    loss_case("OHEM 2x19x9x13 -> 67x101, class weights", 2, 19, (9, 13), (67, 101), 0.7, weighted=True),
    loss_case("OHEM top-k, ties at the k-th, 2x19x9x13 -> 36x52", 2, 19, (9, 13), (36, 52), 1e-6,
              constant_planes=True),
    bga_case("BGA 2x3x33x35 from 9x9 NCHW", 2, 3, (33, 35), (9, 9), False),
    bga_case("BGA 2x20x33x35 from 9x9 NHWC", 2, 20, (33, 35), (9, 9), True),
    bga_case("BGA 2x20x33x35 from 9x9 NHWC bf16 (a channel pair a walk item)", 2, 20, (33, 35), (9, 9), True,
             torch.bfloat16),
]
# and the sizes where the tiling once overflowed its shared memory (257 from 65), odd
# factors, a downscale: each kernel's edges, for compute-sanitizer
FULL = QUICK + [
    bga_case("BGA 1x2x257x257 from 65x65 NCHW", 1, 2, (257, 257), (65, 65), False),
    bga_case("BGA 1x16x257x257 from 65x65 NHWC", 1, 16, (257, 257), (65, 65), True),
    bga_case("BGA 2x5x17x23 from 9x12 NCHW", 2, 5, (17, 23), (9, 12), False),
    bga_case("BGA 1x3x5x3 from 9x11 NCHW (downscale)", 1, 3, (5, 3), (9, 11), False),
    bga_case("BGA 1x3x5x3 from 9x11 NHWC (downscale)", 1, 3, (5, 3), (9, 11), True),
    bga_case("BGA 2x3x17x23 from 9x12 NHWC (3 channels a block)", 2, 3, (17, 23), (9, 12), True),
    loss_case("OHEM 2x19x97x131 -> 389x523", 2, 19, (97, 131), (389, 523), 0.7),
    loss_case("OHEM top-k, ties at the k-th, 2x19x97x131 -> 388x524 (1024 blocks a pass)", 2, 19, (97, 131),
              (388, 524), 1e-6, constant_planes=True),
    loss_case("OHEM top-k, ties at the k-th, class weights, 2x19x97x131 -> 388x524", 2, 19, (97, 131), (388, 524),
              1e-6, weighted=True, constant_planes=True),
    loss_case("CE 1x3x40x30 -> 11x13 (downscale)", 1, 3, (40, 30), (11, 13), None),
    loss_case("CE 2x19x25x33 -> 97x131 (the forward with gradient's tiles)", 2, 19, (25, 33), (97, 131), None),
    loss_case("CE 1x19x4x4 -> 128x128 (the forward with gradient, segments in parts)", 1, 19, (4, 4), (128, 128),
              None),
    loss_case("CE 2x21x9x13 -> 67x101 (21 classes: the forward and the backward)", 2, 21, (9, 13), (67, 101), None),
]


def run_cases(device, cases=QUICK, seed=0, report=None):
    """-> [(op, case name, error or None, message)]: error is the relative error, message
    says what went wrong (empty when within TOLERANCE). The CUDA kernels are used for the
    duration (each EXTENSION.use_cuda_kernel), whatever the caller had set. report, if
    given, is called with each result as its case ends."""
    extensions = (loss.EXTENSION, bga.EXTENSION)
    previous = [extension.use_cuda_kernel for extension in extensions]
    for extension in extensions:
        extension.use_cuda_kernel = True
    results = []
    try:
        for op, name, run, tolerance in cases:
            generator = torch.Generator().manual_seed(seed)
            try:
                error = run(device, generator)
            except Exception as e:  # a launch failure is a disagreement too
                results.append((op, name, None, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"))
            else:
                bad = not error <= tolerance  # NaN is bad
                results.append((op, name, error, f"relative error {error:.2e} > {tolerance:.0e}" if bad else ""))
            if report is not None:
                report(results[-1])
    finally:
        for extension, value in zip(extensions, previous):
            extension.use_cuda_kernel = value
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the cases kernels.select() runs")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    from . import load
    load()

    def report(result):  # each line as its case ends: a kernel that never returns leaves the log at the case before
        _, name, error, message = result
        shown = "—" if error is None else f"{error:.2e}"
        print(f"{'FAIL' if message else 'ok  '} {name}: relative error {shown} {message}".rstrip(), flush=True)

    results = run_cases(torch.device(args.device), QUICK if args.quick else FULL, report=report)
    failed = sum(1 for result in results if result[3])
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
