"""Benchmark of the fused kernels against eager PyTorch and torch.compile of the same code.

    python -m kernels.bench                    # the seed's shapes on the GPU, markdown table
    python -m kernels.bench --no-compile       # skip the torch.compile column (minutes faster)
    python -m kernels.bench --profile          # and each fused row's time per CUDA kernel
    python -m kernels.bench --device cpu --quick   # a smoke run of the table's machinery
    python -m kernels.bench --host             # the host's part of a fused step, on the CPU
                                               # (and on a GPU machine, of each op there)
    python -m kernels.bench --tiles            # the loss ops alone per head, and the BGA backward
                                               # alone: each backward's automatic tile against the
                                               # tiles around it
    python -m kernels.bench --sass [--arch ARCH]   # each kernel's static size: SASS instructions,
                                               # registers, stack, static shared memory (no GPU)

Loss rows: logits of each BiSeNetV2 head (main 1/8 and auxiliary 1/4, 1/8, 1/16, 1/32 of a
1024x1024 crop, 19 classes; the 1/8 auxiliary head has the main head's shape) against uint8 labels of 1024x1024, CE and OHEM (thresh 0.7,
n_min = valid // 16), forward + backward. BGA rows: 128 channels, 128x128 from 32x32,
forward + backward, NCHW and channels_last. Each variant:
  eager    the PyTorch references (F.interpolate + F.cross_entropy + sort; the BGA composition)
  compile  torch.compile of those same functions
  fused    kernels.ohem_cross_entropy / kernels.bga_aggregate with the CUDA kernels
Before a row is timed, each variant's result (loss or output, and every input gradient) is
compared with eager's; a disagreement stops the table (exit 1), naming the row and variant.
Times are medians of --iters runs after --warmup runs (CUDA events on the GPU). GB/s counts
the bytes the fused kernels must move (see bytes_moved_*) against the device-to-device copy
bandwidth measured in the same run; "floor ms" is those bytes at that bandwidth, the time
a kernel at memory speed would take. Peak memory is the allocator's
peak above what the inputs already hold, for one forward + backward.

--host needs no GPU: each op's kernel path (its autograd.Function, the C++ op, the checks)
on tiny CPU tensors, where the C++ loops (a few us) stand in for the kernels, so the time
is the Python, autograd and dispatcher work a GPU step pays too, without its launches; the
references' on the same tensors beside it. A fused step shorter on the GPU than this (times
the GPU machine's host speed) is bound by the host: the "fused host ms" column above. On
a GPU machine --host adds host_parts_table: at the benchmark's shapes (the first --batch),
the host's time to issue each C++ op alone, each kernel path's step, the references' and
one aten op, and torch.profiler's CPU events of the fused BGA and CE steps; what the CUDA
side of a call adds over the C++ loops' row is there.

--sass needs no GPU either: every kernel of the built libraries (kernels.load()) for one
architecture, read with cuobjdump (-sass, -res-usage): the instructions of its code (NOPs
left out), registers, stack, static shared memory (as cuobjdump counts it: from sm_90 with
the 1 KiB the system reserves a block; a launch's dynamic shared memory is not in it); the
performance guide between GPU runs (kernels/README.md's model). The libraries hold the
architectures they were built for (TORCH_CUDA_ARCH_LIST; sm_80 and sm_90 on a machine
without a GPU).
"""
import argparse
import datetime
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .bga import bga_aggregate, bga_aggregate_reference
from .loss import FUSED_GRAD_MOST_CLASSES, ohem_cross_entropy, ohem_cross_entropy_reference

# the heads' resolutions (the 1/8 auxiliary head has the main head's shape)
HEADS = [("main 1/8", 8), ("aux 1/4", 4), ("aux 1/16", 16), ("aux 1/32", 32)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--size", type=int, default=1024, help="label (crop) side")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--heads", type=int, nargs="+", default=[stride for _, stride in HEADS],
                        choices=[stride for _, stride in HEADS], metavar="STRIDE",
                        help="loss rows for the heads at these strides only (8: main, 4, 16, 32: auxiliary)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few runs: checks the machinery")
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    parser.add_argument("--host", action="store_true",
                        help="only the host's part of a fused step, on the CPU, and on a GPU machine each "
                             "op's there (see above)")
    parser.add_argument("--tiles", action="store_true",
                        help="only the loss ops alone per head and the BGA backward op alone, each backward "
                             "with its automatic tile and the tiles around it (on the CPU: the C++ loops)")
    parser.add_argument("--profile", action="store_true",
                        help="also each row's kernels: torch.profiler's time per step of every CUDA kernel the "
                             "fused variant launches (on the CPU: the eager variant's ops)")
    parser.add_argument("--sass", action="store_true",
                        help="only each kernel's static size from its SASS for --arch (cuobjdump; no GPU needed)")
    parser.add_argument("--arch", help="--sass: the architecture read (default: the visible GPU's, else sm_90)")
    args = parser.parse_args(argv)
    if args.arch is None:
        args.arch = "sm_%d%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "sm_90"
    if not re.fullmatch(r"sm_\d+a?", args.arch):
        parser.error(f"--arch {args.arch}: an architecture such as sm_90")
    check_out(parser, args.out)
    if args.quick:
        args.batch, args.size, args.iters, args.warmup = [2], 64, 3, 1
    return args


def check_out(parser, out):
    """parser.error for an --out (None: none) that is a folder or whose folder cannot be made:
    said before the measurements, not after them."""
    if out is None:
        return
    if os.path.isdir(out):
        parser.error(f"--out {out}: a folder, not the file to write")
    try:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    except OSError as e:  # a file in the way
        parser.error(f"--out {out}: cannot make its folder ({e.strerror or e})")


# ---------------------------------------------------------------------------------------
# Measuring

def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, warmup, iters):
    """-> (median ms a call, host ms a call). On CUDA the calls are queued back to back with
    an event pair around each and one sync at the end (triton's do_bench does the same): the
    host runs ahead, so a call's time is the GPU's unless the host cannot keep up, which the
    host time (issuing the calls, mean) then shows."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        host_start = time.perf_counter()
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        host_ms = 1e3 * (time.perf_counter() - host_start) / iters
        synchronize(device)
        return statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends)), host_ms
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), statistics.mean(times)


def peak_mb(fn, device):
    """Peak allocation above the current one during one call, in MB (None off CUDA)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def copy_bandwidth_gbs(device, nbytes, warmup, iters):
    """Device-to-device copy: (read + write) bytes / median time."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms, _ = median_ms(lambda: dst.copy_(src), device, warmup, iters)
    return 2 * src.numel() * 4 / ms / 1e6


# ---------------------------------------------------------------------------------------
# Bytes the fused kernels must move, forward + backward

def bytes_moved_loss(logits, labels, thresh):
    """What the fused step moves. C <= FUSED_GRAD_MOST_CLASSES (the forward with gradient):
    the logits read once and their gradient written; grad_sum (the logits' shape, float32)
    written and read once; the labels read; per pixel the float32 loss and lse written; with
    OHEM (thresh) its hard branch, which the benchmark's random logits take: the selection's
    first pass and its weights pass each read the loss and the labels, the weights written
    (the top-k branch adds passes and the gather). Above: the forward and the backward each
    read the logits and the labels; per pixel loss and lse written, lse read back, and with
    OHEM the selection's loss read and the weights (the incoming gradient) written and read."""
    logit_bytes = logits.numel() * logits.element_size()
    label_bytes = labels.numel() * labels.element_size()
    pixels = labels.numel()
    if logits.shape[1] <= FUSED_GRAD_MOST_CLASSES:
        sum_bytes = logits.numel() * (8 if logits.dtype == torch.float64 else 4)
        moved = 2 * logit_bytes + 2 * sum_bytes + label_bytes + 8 * pixels
        return moved if thresh is None else moved + 2 * label_bytes + 12 * pixels
    per_pixel = (4 if thresh is None else 6) * 4
    return 3 * logit_bytes + 2 * label_bytes + per_pixel * pixels


def bytes_moved_bga(detail_keep, low):
    """Forward: read detail_keep and the three low-res inputs, write out, and write and read
    the float gate workspace (low-res). Backward: read grad_out, detail_keep and the three
    low-res inputs, write the four gradients."""
    high_bytes = detail_keep.numel() * detail_keep.element_size()
    low_bytes = low.numel() * low.element_size()
    workspace_bytes = low.numel() * (8 if low.dtype == torch.float64 else 4)
    return (2 * high_bytes + 3 * low_bytes + 2 * workspace_bytes) + (3 * high_bytes + 6 * low_bytes)


# ---------------------------------------------------------------------------------------
# Cases

def loss_step(loss_fn, logits, labels, thresh):
    def step():
        logits.grad = None
        loss = loss_fn(logits, labels, thresh=thresh, validate=False)
        loss.backward()
        return [loss.detach(), logits.grad]
    return step


def bga_step(fn, inputs, grad_out):
    def step():
        for tensor in inputs:
            tensor.grad = None
        out = fn(*inputs)
        out.backward(grad_out)
        return [out.detach()] + [tensor.grad for tensor in inputs]
    return step


# A variant's result (the loss or output, then each input gradient) against eager's: the
# relative L2 error of each. Both sides round the same inputs in the same storage type, so
# they differ by float32 arithmetic (~1e-6) and, for 16-bit results, by one rounding of each
# element (2^-9 relative on average for bfloat16): the limits are several times those.
AGREEMENT = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def disagreement(results, expected, dtype):
    """A message naming the first result beyond AGREEMENT[dtype] of eager's, else ''."""
    for index, (actual, want) in enumerate(zip(results, expected)):
        want = want.double()
        error = ((actual.double() - want).norm() / want.norm().clamp(min=1e-30)).item()
        if not error <= AGREEMENT[dtype]:
            what = "result" if index == 0 else f"gradient {index}"
            return f"{what}: relative error {error:.2e} > {AGREEMENT[dtype]:.0e}"
    return ""


def variants(eager_fn, fused_fn, device, compile_):
    out = [("eager", eager_fn)]
    if compile_:
        out.append(("compile", torch.compile(eager_fn, fullgraph=True, dynamic=False)))
    if device.type == "cuda":
        out.append(("fused", fused_fn))
    return out


def kernel_times(step, device, iters):
    """-> [(name, launches per step, microseconds per step)], largest first: the CUDA kernels
    that `iters` calls of `step` launch (torch.profiler, CUPTI), or off CUDA the ops' own CPU
    time."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    step()  # anything lazy (a build, an autotune) outside the profile
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(iters):
            step()
        synchronize(device)
    out = []
    for event in prof.key_averages():
        kernel = event.device_type == torch.autograd.DeviceType.CUDA
        if cuda != kernel:
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            out.append((event.key, event.count / iters, us / iters))
    return sorted(out, key=lambda item: -item[2])


def kernel_lines(rows, most=12):
    """Markdown: per row with a profile, its kernels' time per step and share (at most `most`)."""
    lines = []
    for row in rows:
        if "profile_error" in row:
            lines += ["", f"{row['case']} ({row['profiled']}): no profile ({row['profile_error']})"]
        if not row.get("kernels"):
            continue
        total = sum(us for _, _, us in row["kernels"])
        lines += ["", f"{row['case']} ({row['profiled']}): {total:.1f} us a step in {len(row['kernels'])} kernels",
                  "", "| kernel | launches a step | us a step | share |", "| --- | ---: | ---: | ---: |"]
        for name, launches, us in row["kernels"][:most]:
            name = name if len(name) <= 90 else name[:87] + "..."
            lines.append(f"| `{name}` | {launches:g} | {us:.1f} | {100 * us / total:.0f}% |")
    return lines


class WrongResult(Exception):
    """A variant disagrees with eager: the table stops."""


def measure_row(name, make_step, fns, nbytes, args, device, dtype):
    """Each variant checked against eager's result, then timed. fns[0] is eager."""
    row = dict(case=name)
    expected = None
    for label, fn in fns:
        step = make_step(fn)
        try:
            results = [t.detach().clone() for t in step()]
        except Exception as e:  # e.g. the compiler missing: the table says so
            row[f"{label}_ms"] = None
            row[f"{label}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            continue
        if expected is None:
            expected = results
        elif message := disagreement(results, expected, dtype):
            raise WrongResult(f"kernels.bench: {name}: {label} disagrees with eager ({message})")
        row[f"{label}_ms"], row[f"{label}_host_ms"] = median_ms(step, device, args.warmup, args.iters)
        row[f"{label}_mb"] = peak_mb(step, device)
        if args.profile and label == fns[-1][0]:  # fused on a GPU: profiled once every row is timed (profile_rows)
            row["profiled"], row["profile_step"] = label, step
    row["bytes"] = nbytes
    return row


def profile_rows(rows, device, iters):
    """Each row's profile_step under kernel_times, after every row was timed: a profiler's
    after-effects (CUPTI can stay attached, slowing launches) reach no timing."""
    for row in rows:
        if (step := row.pop("profile_step", None)) is None:
            continue
        try:
            row["kernels"] = kernel_times(step, device, iters)
        except Exception as e:  # a profiler that cannot run (no CUPTI) costs the breakdown, not the table
            row["profile_error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"


def loss_rows(args, device):
    generator = torch.Generator(device="cpu").manual_seed(0)
    for batch in args.batch:
        labels = torch.randint(0, args.classes, (batch, args.size, args.size), generator=generator)
        labels[torch.rand(labels.shape, generator=generator) < 0.1] = 255
        labels = labels.to(torch.uint8).to(device)
        for dtype_name in args.dtypes:
            for head, stride in HEADS:
                if stride not in args.heads:
                    continue
                side = args.size // stride
                logits = (torch.randn(batch, args.classes, side, side, generator=generator) * 3)
                logits = logits.to(device=device, dtype=DTYPES[dtype_name]).requires_grad_(True)
                for loss_name, thresh in (("CE", None), ("OHEM", 0.7)):
                    fns = variants(ohem_cross_entropy_reference, ohem_cross_entropy, device, not args.no_compile)
                    yield measure_row(
                        f"loss {loss_name} {head} {batch}x{args.classes}x{side}x{side} -> {args.size}^2 {dtype_name}",
                        lambda fn: loss_step(fn, logits, labels, thresh), fns,
                        bytes_moved_loss(logits, labels, thresh), args, device, DTYPES[dtype_name])


def bga_rows(args, device):
    generator = torch.Generator(device="cpu").manual_seed(1)
    channels, side = 128, args.size // 32  # detail 1/8, semantic 1/32 of the crop
    for batch in args.batch:
        for dtype_name in args.dtypes:
            for channels_last in (False, True):
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                shapes = [(batch, channels, side * 4, side * 4)] + [(batch, channels, side, side)] * 3
                inputs = [torch.randn(shape, generator=generator).to(device=device, dtype=DTYPES[dtype_name])
                          .contiguous(memory_format=fmt).requires_grad_(True) for shape in shapes]
                grad_out = torch.randn(shapes[0], generator=generator).to(device=device, dtype=DTYPES[dtype_name])
                grad_out = grad_out.contiguous(memory_format=fmt)
                fns = variants(bga_aggregate_reference, bga_aggregate, device, not args.no_compile)
                yield measure_row(
                    f"BGA {batch}x{channels}x{side * 4}x{side * 4} from {side}x{side} {dtype_name} "
                    f"{'NHWC' if channels_last else 'NCHW'}",
                    lambda fn: bga_step(fn, inputs, grad_out), fns,
                    bytes_moved_bga(inputs[0], inputs[1]), args, device, DTYPES[dtype_name])


def host_table(args):
    """Markdown: the host's microseconds a forward + backward, each op's kernel path (the C++
    loops running) against its reference, tiny CPU tensors, the median of 5 rounds."""
    from . import EXTENSIONS, load
    load()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.randint(0, 3, (1, 4, 4), dtype=torch.uint8)
    inputs = [torch.randn(1, 2, 4, 4, requires_grad=True)] + [torch.randn(1, 2, 1, 1, requires_grad=True)
                                                              for _ in range(3)]
    grad_out = torch.randn(1, 2, 4, 4)
    cases = [("loss CE", lambda fn: loss_step(fn, logits, labels, None),
              ohem_cross_entropy, ohem_cross_entropy_reference),
             ("loss OHEM", lambda fn: loss_step(fn, logits, labels, 0.7),
              ohem_cross_entropy, ohem_cross_entropy_reference),
             ("BGA", lambda fn: bga_step(fn, inputs, grad_out), bga_aggregate, bga_aggregate_reference)]
    calls = max(args.iters, 1) * 20
    lines = ["| op, forward + backward | kernel path us | reference us |", "| --- | ---: | ---: |"]
    for extension in EXTENSIONS.values():
        extension.cpu_loops = True  # the ops' CPU tensors down their kernel path; the references never look
    try:
        for name, make_step, fused, reference in cases:
            us = [host_us(make_step(fn), torch.device("cpu"), calls=calls, warmup=args.warmup * 10)
                  for fn in (fused, reference)]
            lines.append(f"| {name} | {us[0]:.1f} | {us[1]:.1f} |")
    finally:
        for extension in EXTENSIONS.values():
            extension.cpu_loops = False
        torch.set_num_threads(threads)
    return "\n".join([f"host: torch {torch.__version__}, 1 CPU thread; {datetime.date.today().isoformat()}",
                      ""] + lines)


class _Double(torch.autograd.Function):
    """x * 2 as a Function: the autograd layer the fused ops take, with nothing of theirs."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def host_pieces(device, batch, size, dtype):
    """-> {piece: a call}: at the benchmark's shapes (the BGA channels_last, the main head's
    loss), one tiny aten op, torch's fixed cost of a forward + backward on the device (on a
    GPU the autograd engine hands the backward to its device thread and waits: no fused op
    can go below it), each C++ op alone, each kernel path's forward + backward and the
    references'."""
    ops = torch.ops.bisenet_cuda
    generator = torch.Generator().manual_seed(2)
    side = size // 32  # the BGA's semantic side; detail 4x that

    def made(shape, fmt=torch.contiguous_format, grad=False):
        tensor = torch.randn(shape, generator=generator).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
        return tensor.requires_grad_(grad)

    high, low = (batch, 128, side * 4, side * 4), (batch, 128, side, side)
    bga_inputs = [made(high, torch.channels_last, True)] + [made(low, torch.channels_last, True) for _ in range(3)]
    bga_grad = made(high, torch.channels_last)
    bga_plain = [tensor.detach() for tensor in bga_inputs]
    logits = (made((batch, 19, size // 8, size // 8)) * 3).requires_grad_(True)
    labels = torch.randint(0, 19, (batch, size, size), generator=generator).to(device=device, dtype=torch.uint8)
    plain_logits = logits.detach()
    loss, lse, _, _ = ops.upsample_ce_forward(plain_logits, labels, 255, False)
    grad_loss = torch.full((), 1.0 / labels.numel(), device=device).expand(labels.shape)
    one = torch.zeros(1, device=device)
    leaf = torch.zeros(1, device=device, requires_grad=True)

    def tiny_backward(fn):  # torch's own cost of a forward + backward, whatever the op
        def step():
            leaf.grad = None
            fn(leaf).sum().backward()
        return step

    return {
        "one aten op (add_, 1 element)": lambda: one.add_(1),
        "torch's fixed cost: (x * 2).sum().backward(), 1 element": tiny_backward(lambda x: x * 2),
        "torch's fixed cost: an autograd.Function's (x * 2).sum().backward(), 1 element": tiny_backward(
            _Double.apply),
        "bisenet_cuda::bga_forward": lambda: ops.bga_forward(*bga_plain),
        "bisenet_cuda::bga_backward": lambda: ops.bga_backward(bga_grad, *bga_plain),
        "BGA kernel path, forward + backward": bga_step(bga_aggregate, bga_inputs, bga_grad),
        "BGA reference, forward + backward": bga_step(bga_aggregate_reference, bga_inputs, bga_grad),
        "bisenet_cuda::upsample_ce_forward": lambda: ops.upsample_ce_forward(plain_logits, labels, 255, True),
        "bisenet_cuda::upsample_ce_backward": lambda: ops.upsample_ce_backward(grad_loss, plain_logits, labels, lse,
                                                                                255),
        "bisenet_cuda::upsample_ce_forward_grad": lambda: ops.upsample_ce_forward_grad(plain_logits, labels, 255),
        "bisenet_cuda::ohem_weights": lambda: ops.ohem_weights(loss, labels, 255, -math.log(0.7), -1),
        "loss CE kernel path, forward + backward": loss_step(ohem_cross_entropy, logits, labels, None),
        "loss OHEM kernel path, forward + backward": loss_step(ohem_cross_entropy, logits, labels, 0.7),
        "loss CE reference, forward + backward": loss_step(ohem_cross_entropy_reference, logits, labels, None),
    }


def host_us(piece, device, rounds=5, calls=20, warmup=5):
    """The host's time to issue one call of `piece`: the calls queued back to back, one sync
    after a round (outside the time), the median of the rounds. The host's alone while the
    GPU keeps up or the launch queue has room (a few dozen calls)."""
    for _ in range(warmup):
        piece()
    times = []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            piece()
        times.append(1e6 * (time.perf_counter() - start) / calls)
    synchronize(device)
    return statistics.median(times)


def host_profile(step, device, iters, most=10):
    """-> [(op, calls a step, host us a step)]: torch.profiler's CPU events of `step` by self
    time, largest first (at most `most`): where the host's time to issue a step goes."""
    from torch.profiler import ProfilerActivity, profile
    step()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            step()
        synchronize(device)
    events = [(event.key, event.count / iters, event.self_cpu_time_total / iters) for event in prof.key_averages()
              if event.self_cpu_time_total > 0]
    return sorted(events, key=lambda item: -item[2])[:most]


def host_parts_table(args, device):
    """Markdown: each of host_pieces' host time (host_us) at the first --batch and --size in
    bf16, then where the fused BGA and CE steps' host time goes (host_profile). On a GPU, the
    difference from host_table's C++ loops is what the CUDA side of a call adds (its
    allocations, launches, guards and checks)."""
    batch = args.batch[0]
    pieces = host_pieces(device, batch, args.size, torch.bfloat16)
    lines = [f"{versions(device)}; the host's time at {batch} x {args.size}^2 crops, bf16; the BGA channels_last, "
             "the loss the main head's" + (" (the C++ loops standing in)" if device.type == "cpu" else ""),
             "", "| piece | host us a call |", "| --- | ---: |"]
    lines += [f"| {name} | {host_us(piece, device):.1f} |" for name, piece in pieces.items()]
    for what in ("BGA kernel path", "loss CE kernel path"):
        lines += ["", f"{what}, forward + backward: the host's CPU events by self time", "",
                  "| event | calls a step | us a step |", "| --- | ---: | ---: |"]
        lines += [f"| `{event[:80]}` | {calls:g} | {us:.1f} |"
                  for event, calls, us in host_profile(pieces[f"{what}, forward + backward"], device, 20)]
    return "\n".join(lines)


def tile_table(args, device):
    """Markdown: per head (first --batch, first --dtypes), the loss forward op alone, then the
    backward op alone with its automatic tile and with the tiles around it (band and chunk
    halved or doubled, one at a time and crosswise; those over the shared-memory budget are
    left out), each checked against the automatic tile's gradient first: what the plan
    (ohem_ce_math.h: plan_ce_backward) chose against what it could have. Then the forward with
    gradient (the CE mean's training step, up to 20 classes) likewise, against the two ops,
    and the CE mean's backward after it (the backward op without grad_loss: grad_sum weighted,
    an elementwise kernel) with its GB/s against the copy bandwidth measured here."""
    ops = torch.ops.bisenet_cuda
    batch, dtype_name = args.batch[0], args.dtypes[0]
    generator = torch.Generator().manual_seed(4)
    labels = torch.randint(0, args.classes, (batch, args.size, args.size), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.1] = 255
    labels = labels.to(device=device, dtype=torch.uint8)
    lines = [f"{versions(device)}; the loss ops alone, {batch} x {args.classes} classes, {args.size}^2 labels, "
             f"{dtype_name} logits", "",
             "| head | forward us | tile (low-res rows x columns) | shared KiB | parts | backward us | vs automatic |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    with_grad = []
    copy_gbs = copy_bandwidth_gbs(device, 2 ** 30 if device.type == "cuda" else 2 ** 24, args.warmup, args.iters)
    for head, stride in HEADS:
        if stride not in args.heads:
            continue
        side = args.size // stride
        logits = (torch.randn(batch, args.classes, side, side, generator=generator) * 3)
        logits = logits.to(device=device, dtype=DTYPES[dtype_name])
        forward_ms, _ = median_ms(lambda: ops.upsample_ce_forward(logits, labels, 255, True), device, args.warmup,
                                  args.iters)
        _, lse, _, _ = ops.upsample_ce_forward(logits, labels, 255, True)
        grad_loss = torch.full((), 1.0 / labels.numel(), device=device).expand(labels.shape)
        size, low = [batch, args.classes, args.size, args.size], [side, side]
        band, chunk = ops.upsample_ce_backward_plan(size, low, torch.float32)[:2]
        separate_ms = None
        for tile, plan, ms, speed in timed_tiles(
                tiles_around(band, chunk, side, side),
                lambda tile: ops.upsample_ce_backward_plan(size, low, torch.float32, *tile),
                lambda tile: ops.upsample_ce_backward(grad_loss, logits, labels, lse, 255, *tile),
                f"the {head} backward", AGREEMENT[torch.float32], device, args):
            name = f"{plan[0]} x {plan[1]}" + (" (automatic)" if tile == (0, 0) else "")
            lines.append(f"| {head} | {1e3 * forward_ms:.0f} | {name} | {plan[4] / 1024:.1f} | {plan[9]} | "
                         f"{1e3 * ms:.0f} | {speed:.2f}x |")
            separate_ms = separate_ms or forward_ms + ms
        if args.classes > FUSED_GRAD_MOST_CLASSES:
            continue
        band, chunk = ops.upsample_ce_backward_plan(size, low, torch.float32, forward=True)[:2]
        for tile, plan, ms, speed in timed_tiles(
                tiles_around(band, chunk, side, side),
                lambda tile: ops.upsample_ce_backward_plan(size, low, torch.float32, *tile, forward=True),
                lambda tile: ops.upsample_ce_forward_grad(logits, labels, 255, *tile)[4],
                f"the {head} forward with gradient", AGREEMENT[torch.float32], device, args):
            name = f"{plan[0]} x {plan[1]}" + (" (automatic)" if tile == (0, 0) else "")
            mean_backward = ""
            if tile == (0, 0):  # the CE mean's backward: read grad_sum (float32), write the gradient
                _, _, _, denominator, grad_sum = ops.upsample_ce_forward_grad(logits, labels, 255)
                grad_mean = torch.tensor(0.5, device=device)
                backward_ms, _ = median_ms(lambda: ops.upsample_ce_backward(None, logits, labels, lse, 255, 0, 0,
                                                                            grad_sum, grad_mean, None, denominator),
                                           device, args.warmup, args.iters)
                nbytes = grad_sum.numel() * (grad_sum.element_size() + logits.element_size())
                mean_backward = f"{1e3 * backward_ms:.0f} | {nbytes / backward_ms / 1e6 / copy_gbs:.0%}"
            with_grad.append(f"| {head} | {name} | {plan[4] / 1024:.1f} | {plan[9]} | {1e3 * ms:.0f} | {speed:.2f}x | "
                             f"{separate_ms / ms:.2f}x | {mean_backward or ' | '} |")
    if with_grad:
        lines += ["", "The forward with gradient (`upsample_ce_forward_grad`, the CE mean's step) alone, against the "
                  "forward and the backward with their automatic tiles; then the CE mean's backward "
                  f"(`upsample_ce_backward` without grad_loss) and its bandwidth against the copy's, {copy_gbs:.0f} "
                  "GB/s:", "",
                  "| head | tile (low-res rows x columns) | shared KiB | parts | forward with gradient us | "
                  "vs automatic | vs forward + backward | mean's backward us | of copy GB/s |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += with_grad
    return "\n".join(lines) + "\n\n" + bga_tile_table(args, device)


def timed_tiles(tiles, plan_of, run, what, tolerance, device, args):
    """-> [(tile, plan, ms, speed against the automatic tile)] for each of `tiles` (the
    automatic (0, 0) first) whose plan fits (plan_of raises where it does not), each tile's
    results (run(tile): a tensor or a tuple of them) first checked against the automatic
    tile's: WrongResult naming `what` and the tile where their relative difference passes
    tolerance."""
    want, automatic_ms, rows = None, None, []
    for tile in tiles:
        try:
            plan = plan_of(tile)
        except RuntimeError:
            continue
        result = run(tile)
        got = [tensor.double() for tensor in (result if isinstance(result, (tuple, list)) else (result,))]
        want = want or got
        error = max(((g - w).norm() / w.norm().clamp(min=1e-30)).item() for g, w in zip(got, want))
        if not error <= tolerance:
            raise WrongResult(f"kernels.bench: {what} with tile {tile} differs from the automatic tile's by "
                              f"{error:.2e}")
        ms, _ = median_ms(lambda: run(tile), device, args.warmup, args.iters)
        automatic_ms = automatic_ms or ms
        rows.append((tile, plan, ms, automatic_ms / ms))
    return rows


def tiles_around(rows, cols, most_rows, most_cols):
    """(0, 0) (the automatic tile), then the tiles around rows x cols: one side halved or
    doubled, and both crosswise, within 1..most on each side."""
    return [(0, 0)] + [(r, c) for r, c in ((2 * rows, cols), (rows, 2 * cols), (rows // 2, cols), (rows, cols // 2),
                                           (2 * rows, cols // 2), (rows // 2, 2 * cols))
                       if 1 <= r <= most_rows and 1 <= c <= most_cols]


def bga_tile_table(args, device):
    """Markdown: the BGA backward op alone at the benchmark's shape (first --batch, first
    --dtypes), NCHW and channels_last, with its automatic tile and the tiles around it, each
    checked against the automatic tile's gradients first (bga_math.h: plan_backward); in
    channels_last also the automatic tile with one channel a walk item (lanes=1), where the
    automatic choice may take two (walk_lanes)."""
    ops = torch.ops.bisenet_cuda
    batch, dtype_name = args.batch[0], args.dtypes[0]
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(5)
    channels, side = 128, args.size // 32
    shapes = [(batch, channels, side * 4, side * 4)] + [(batch, channels, side, side)] * 3
    lines = [f"{versions(device)}; the BGA backward op alone, {batch} x {channels} x {side * 4}^2 from {side}^2, "
             f"{dtype_name}", "",
             "| layout | tile (low-res rows x columns) | channels a block | walk lanes | shared KiB | us | vs automatic |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for layout, fmt in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
        inputs = [torch.randn(shape, generator=generator).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
                  for shape in [shapes[0]] + shapes]  # grad_out, detail_keep, sem_up, detail_down, sem_keep
        size, low, channels_last = list(shapes[0]), [side, side], fmt == torch.channels_last
        automatic = ops.bga_backward_plan(size, low, channels_last, dtype)
        tiles = tiles_around(automatic[1], automatic[2], side, side)
        if channels_last:
            tiles.insert(1, (0, 0, 1))  # (tile_h, tile_w, lanes)
        for tile, plan, ms, speed in timed_tiles(
                tiles,
                lambda tile: ops.bga_backward_plan(size, low, channels_last, dtype, *tile),
                lambda tile: ops.bga_backward(*inputs, *tile),
                f"the BGA {layout} backward", AGREEMENT[dtype], device, args):
            name = f"{plan[1]} x {plan[2]}" + {(0, 0): " (automatic)", (0, 0, 1): " (the automatic tile)"}.get(tile, "")
            lanes = plan[11] if plan[8] else "—"  # a walk's (channels_last)
            lines.append(f"| {layout} | {name} | {plan[0]} | {lanes} | {plan[5] / 1024:.1f} | {1e3 * ms:.0f} | "
                         f"{speed:.2f}x |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The table

def fmt(value, spec):
    return "—" if value is None else format(value, spec)


def speedup(slow, fast):
    return f"{slow / fast:.1f}x" if slow and fast else "—"


def table(rows, copy_gbs, device):
    # fused host ms: the host's time to issue one fused step; above fused ms, the host bounds it
    lines = ["| case | floor ms | eager ms | compile ms | fused ms | fused host ms | fused vs eager | "
             "fused vs compile | fused GB/s (% of copy) | eager MB | compile MB | fused MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        eager, compiled, fused = row.get("eager_ms"), row.get("compile_ms"), row.get("fused_ms")
        gbs = row["bytes"] / fused / 1e6 if fused else None
        floor = row["bytes"] / copy_gbs / 1e6  # the bytes that must move, at the copy bandwidth
        lines.append(
            f"| {row['case']} | {floor:.3f} | {fmt(eager, '.3f')} | {fmt(compiled, '.3f')} | {fmt(fused, '.3f')} | "
            f"{fmt(row.get('fused_host_ms'), '.3f')} | "
            f"{speedup(eager, fused)} | {speedup(compiled, fused)} | "
            f"{fmt(gbs, '.0f')} ({fmt(100 * gbs / copy_gbs if gbs else None, '.0f')}%) | "
            f"{fmt(row.get('eager_mb'), '.0f')} | {fmt(row.get('compile_mb'), '.0f')} | {fmt(row.get('fused_mb'), '.0f')} |")
        for key in ("eager_error", "compile_error", "fused_error"):
            if key in row:
                lines.append(f"| ↳ {key.split('_')[0]} failed: {row[key]} | | | | | | | | | | | |")
    return "\n".join(lines)


def versions(device):
    return (f"device: {device_name(device)}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
            f"{datetime.date.today().isoformat()}")


def header(device, copy_gbs):
    return f"{versions(device)}; copy bandwidth {copy_gbs:.0f} GB/s (read + write)"


def report(rows, copy_gbs, device):
    return "\n".join([header(device, copy_gbs), "", table(rows, copy_gbs, device)] + kernel_lines(rows))


# ---------------------------------------------------------------------------------------
# --sass: the kernels' static size

def find_cuobjdump():
    """-> the cuobjdump to read the SASS with: on PATH, in the CUDA toolkit (build.check_cuda_home's),
    or the one triton's wheel carries (a toolkit may lack it); which one is printed. SystemExit
    with one line when there is none."""
    from . import build
    candidates = [shutil.which("cuobjdump")]
    try:  # the libraries may come from the cache with no toolkit here
        candidates.append(Path(build.check_cuda_home()) / "bin" / "cuobjdump")
    except RuntimeError:
        pass
    try:
        import triton
        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    for candidate in candidates:
        if candidate is not None and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            print(f"kernels.bench: cuobjdump: {candidate}", flush=True)
            return str(candidate)
    print("kernels.bench: error: --sass needs cuobjdump: none on PATH, in the CUDA toolkit or in triton's wheel",
          file=sys.stderr)
    raise SystemExit(2)


def run_tool(command):
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"kernels.bench: error: {' '.join(command)} failed: {' '.join(result.stderr.split())[:300]}",
              file=sys.stderr)
        raise SystemExit(1)
    return result.stdout


def sass_sizes(cuobjdump, library, arch):
    """-> {mangled kernel name: [instructions, registers, stack bytes, static shared bytes]} of
    `library`'s code for `arch`: the SASS lines of each function (cuobjdump -sass) but NOPs, and
    cuobjdump -res-usage's REG, STACK and SHARED."""
    sizes, name = {}, None
    for line in run_tool([cuobjdump, "-sass", "-arch", arch, str(library)]).splitlines():
        if match := re.match(r"\s+Function : (\S+)", line):
            name = match.group(1)
            sizes[name] = [0, 0, 0, 0]
        elif name and (match := re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)):
            sizes[name][0] += match.group(1) != "NOP"
    usage = run_tool([cuobjdump, "-res-usage", "-arch", arch, str(library)])
    for name, registers, stack, shared in re.findall(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage):
        if name in sizes:
            sizes[name][1:] = [int(registers), int(stack), int(shared)]
    return sizes


def readable_kernel_names(mangled):
    """-> {mangled: short name}: demangled by c++filt where it is found (else the mangled names,
    said once), the namespaces, the return type and the parameter list left out."""
    names = list(mangled)
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        print("kernels.bench: no c++filt on PATH: kernel names stay mangled", flush=True)
        return {name: name for name in names}
    demangled = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = {}
    for name, full in zip(names, demangled):
        full = re.sub(r"^void ", "", full).replace("bisenet::(anonymous namespace)::", "").replace("bisenet::", "")
        depth, end = 0, len(full)
        for at, char in enumerate(full):  # the parameter list: the first '(' outside the template arguments
            depth += {"<": 1, ">": -1}.get(char, 0)
            if char == "(" and depth == 0:
                end = at
                break
        short[name] = full[:end].replace("c10::BFloat16", "bf16").replace("c10::Half", "fp16")
    return short


def sass_table(arch):
    """Markdown table of every kernel of the ops' libraries (kernels.EXTENSIONS) for `arch`."""
    from . import EXTENSIONS, build, load
    load()
    cuobjdump = find_cuobjdump()
    lines = [f"static SASS for {arch} (cuobjdump; torch {torch.__version__}, CUDA {torch.version.cuda}), "
             f"{datetime.date.today().isoformat()}", "",
             "| op | kernel | instructions | registers | stack bytes | static shared bytes |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for op, extension in EXTENSIONS.items():
        library = build.library_path(extension.name, extension.source_paths())
        sizes = sass_sizes(cuobjdump, library, arch)
        if not sizes:
            print(f"kernels.bench: error: {library} holds no {arch} code (built for {build.arch_list()}; "
                  f"TORCH_CUDA_ARCH_LIST chooses)", file=sys.stderr)
            raise SystemExit(1)
        names = readable_kernel_names(sizes)
        for name in sorted(sizes, key=lambda name: names[name]):
            lines.append(f"| {op} | `{names[name]}` | " + " | ".join(str(value) for value in sizes[name]) + " |")
    return "\n".join(lines)


def write_text(path, text):
    try:
        with open(path, "w") as f:
            f.write(text + "\n")
    except OSError as e:  # a full disk (the table is printed too)
        print(f"kernels.bench: error: --out {path}: cannot write it ({e.strerror or e})", file=sys.stderr)
        raise SystemExit(2)


def emit(text, out):
    """Prints a table, writes it to --out (None: nowhere) too, and returns it."""
    print(text)
    if out:
        write_text(out, text)
    return text


def main(argv=None):
    args = parse_args(argv)
    if args.sass:
        return emit(sass_table(args.arch), args.out)
    if args.host:
        text = host_table(args)
        if torch.cuda.is_available():  # and each piece's host time on the GPU, at the benchmark's shapes
            from . import load, use_kernels
            load()
            use_kernels(True)
            text += "\n\n" + host_parts_table(args, torch.device("cuda"))
        return emit(text, args.out)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"kernels.bench: error: --device {args.device}, but torch sees no CUDA device "
              "(--device cpu times the eager column alone, or --tiles the C++ loops)", file=sys.stderr)
        raise SystemExit(2)
    if args.tiles:
        from . import load
        load()
        try:
            text = tile_table(args, device)
        except WrongResult as e:
            print(e, file=sys.stderr)
            raise SystemExit(1)
        return emit(text, args.out)
    if device.type == "cuda":
        from . import load, use_kernels
        load()
        use_kernels(True)
        torch.backends.cudnn.benchmark = True
    else:
        print("note: no CUDA device: eager (and compile) only; the fused column needs a GPU")
    copy_gbs = copy_bandwidth_gbs(device, 2 ** 30 if device.type == "cuda" else 2 ** 24, args.warmup, args.iters)
    print(header(device, copy_gbs), flush=True)
    rows = []
    try:
        for rows_of in (loss_rows, bga_rows):
            for row in rows_of(args, device):
                rows.append(row)
                print(f"  {row['case']}: " + ", ".join(f"{k} {fmt(v, '.3f')}" for k, v in row.items()
                                                       if k.endswith("_ms")), flush=True)
                if args.out:  # the rows so far: a run cut short by a time limit still leaves its table
                    write_text(args.out, report(rows, copy_gbs, device))
    except WrongResult as e:
        print(e, file=sys.stderr)
        raise SystemExit(1)
    profile_rows(rows, device, args.iters)
    text = report(rows, copy_gbs, device)
    print("\n" + text)
    if args.out:
        write_text(args.out, text)
    return rows


if __name__ == "__main__":
    main()
