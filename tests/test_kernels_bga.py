"""Tests of the fused BGA gating (kernels/bga.py, kernels/csrc/bga*.{h,cpp,cu}).

CPU: the reference against bisenetv2's plain composition and gradcheck; the C++ CPU loops
(the CUDA kernels' per-item functions and tiling, run serially) against the reference; the
C++ ops under opcheck; the op (its autograd.Function with the CPU loops, and the reference)
under torch.compile(fullgraph=True) and inside BiSeNetV2.
GPU (marked gpu): the CUDA kernels against the float64 reference.

Tests that need the compiled extension (kernels.load()) skip when it cannot be
built, unless BISENET_REQUIRE_KERNELS=1, where they fail.
"""

import warnings

import pytest
import torch

import bisenetv2
from bisenetv2 import BiSeNetV2
from conftest import dispatched_ops, poison_cuda_cache, random_bga_shapes
from kernels import bga


# (N, C, H, W) from (h, w): upscale 1, 2, 4, non-integer (9 from 4, 9 x 11 from 3 x 4),
# odd sizes, and a downscale (every low-res pixel need not be touched by a tap).
CPU_SHAPES = [
    ((2, 3, 5, 7), (5, 7)),     # factor 1
    ((1, 2, 10, 14), (5, 7)),   # factor 2
    ((2, 3, 20, 12), (5, 3)),   # factor 4
    ((1, 2, 9, 9), (4, 4)),     # 2.25
    ((2, 3, 9, 11), (3, 4)),    # 3, 2.75
    ((1, 2, 4, 3), (9, 11)),    # downscale
]
TILES = [(0, 0), (1, 1), (2, 3)]  # automatic, and tile borders everywhere
GRAD_NAMES = ["grad_detail_keep", "grad_sem_up", "grad_detail_down", "grad_sem_keep"]


def random_inputs(shape, low_hw, dtype=torch.float64, device="cpu", channels_last=False, seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    n, c, _, _ = shape
    tensors = [torch.randn(shape, generator=generator, dtype=torch.float64)]
    tensors += [torch.randn((n, c) + tuple(low_hw), generator=generator, dtype=torch.float64) for _ in range(3)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [t.to(device=device, dtype=dtype).contiguous(memory_format=fmt) for t in tensors]


def plain_composition(detail_keep, sem_up, detail_down, sem_keep):
    return bisenetv2.bga_aggregate(detail_keep, sem_up, detail_down, sem_keep)


def autograd_grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad_out)


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


# ---------------------------------------------------------------------------------------
# Reference

@pytest.mark.parametrize("channels_last", [False, True])
def test_reference_equals_bisenetv2_composition(channels_last):
    inputs = random_inputs((2, 3, 9, 11), (3, 4), channels_last=channels_last)
    out = bga.bga_aggregate_reference(*inputs)
    # the same float64 operations in the same order: equal up to the layout's rounding
    torch.testing.assert_close(out, plain_composition(*inputs), rtol=1e-14, atol=1e-14)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_kernel_path_dispatches_the_two_ops(cpu_loops):
    """Forward + backward down the kernels' path is the forward op and the backward op, and
    nothing else (each dispatched op is a launch on a GPU; the reference takes some 20)."""
    leaves = [t.requires_grad_(True) for t in random_inputs((2, 3, 9, 11), (3, 4), dtype=torch.float32)]
    grad_out = torch.randn(2, 3, 9, 11)
    ops = dispatched_ops(lambda: bga.bga_aggregate(*leaves).backward(grad_out))
    launches = [op for op in ops if op != "aten.detach.default"]  # autograd storing each .grad: no launch
    assert launches == ["bisenet_cuda.bga_forward.default", "bisenet_cuda.bga_backward.default"]
    assert all(leaf.grad is not None for leaf in leaves)


def test_kernel_path_gradcheck_cpu(cpu_loops):
    # the op down its kernels' path on the CPU: the C++ loops' forward and hand-written
    # backward; gradcheck compares it with finite differences
    inputs = [t.requires_grad_(True) for t in random_inputs((2, 3, 9, 11), (3, 4))]
    assert torch.autograd.gradcheck(bga.bga_aggregate, inputs)


def test_kernel_path_refuses_a_gradient_of_its_gradient(cpu_loops):
    """The backward op has no gradient of its own: a gradient penalty through the kernels'
    path is an error (it was silently zero), as the reference path gives one."""
    leaves = [t.requires_grad_(True) for t in random_inputs((1, 2, 8, 8), (2, 2))]
    for fn in (bga.bga_aggregate_reference, bga.bga_aggregate):
        grads = torch.autograd.grad(fn(*leaves).pow(2).sum(), leaves, create_graph=True)
        penalty = sum(grad.pow(2).sum() for grad in grads)
        if fn is bga.bga_aggregate_reference:
            assert all(grad.abs().sum() > 0 for grad in torch.autograd.grad(penalty, leaves))
        else:
            with pytest.raises(RuntimeError, match="differentiate twice a function .* @once_differentiable"):
                penalty.backward()


@pytest.mark.parametrize("channels_last", [False, True])
def test_upscales_beyond_the_tiles_run_the_reference(cpu_loops, channels_last, monkeypatch):
    """2 x 2 to 128 x 128 (64x) NCHW, 1 x 1 to 1024 x 1024 channels_last: no tile of the backward
    fits a block's shared memory; the op takes the reference (where the backward raised after
    the forward), warned once a size, with the reference's output and gradients."""
    shape, low = ((1, 3, 128, 128), (2, 2)) if not channels_last else ((1, 3, 1024, 1024), (1, 1))
    inputs = random_inputs(shape, low, channels_last=channels_last, seed=4)
    grad_out = torch.randn(shape, dtype=torch.float64)
    want_out, want = autograd_grads(bga.bga_aggregate_reference, inputs, grad_out)
    monkeypatch.setattr(bga, "_FITS", {})  # nothing asked yet
    for call in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, got = autograd_grads(bga.bga_aggregate, inputs, grad_out)
        said = [str(w.message) for w in caught]
        assert said == ([] if call else [f"bga_backward: upscale from {low[0]}x{low[1]} to {shape[2]}x{shape[3]} is "
                                         "too large for the kernel's shared memory: bga_aggregate runs the PyTorch "
                                         "reference for these sizes"]), said
        torch.testing.assert_close(out, want_out, rtol=0, atol=0)
        for grad, expected in zip(got, want):
            torch.testing.assert_close(grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_reference_equals_autograd(channels_last):
    inputs = random_inputs((2, 3, 9, 11), (3, 4), channels_last=channels_last)
    grad_out = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    _, expected = autograd_grads(plain_composition, inputs, grad_out)
    grads = bga.bga_aggregate_backward_reference(grad_out, *inputs)
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)  # float64, a few ops


# ---------------------------------------------------------------------------------------
# Input checks

def test_rejects_mixed_dtypes_naming_them():
    inputs = random_inputs((1, 2, 8, 8), (2, 2), dtype=torch.float32)
    inputs[2] = inputs[2].to(torch.bfloat16)
    with pytest.raises(ValueError, match="detail_down torch.bfloat16"):
        bga.bga_aggregate(*inputs)


@pytest.mark.parametrize("case, pattern", [
    ("3d", "detail_keep must be 4D"),
    ("channels", "sem_up .* differ in N or C"),
    ("low_sizes", "sem_keep .* and sem_up .* differ"),
    ("device", "one device"),
    ("integer", "sem_up must be floating point"),
    ("all_integer", "detail_keep must be floating point"),
    ("low_empty", "sem_up has no channel or an empty plane"),
    ("not_a_tensor", "sem_keep must be a tensor, got ndarray"),
])
def test_rejects_bad_shapes_and_devices(case, pattern):
    """Each is refused by name; the one-expression check of the common case lets none through."""
    detail_keep, sem_up, detail_down, sem_keep = random_inputs((1, 2, 8, 8), (2, 2), dtype=torch.float32)
    assert bga._well_formed(detail_keep, sem_up, detail_down, sem_keep)
    if case == "3d":
        detail_keep = detail_keep[0]
    elif case == "channels":
        sem_up = torch.zeros(1, 3, 2, 2)
    elif case == "low_sizes":
        sem_keep = torch.zeros(1, 2, 3, 2)
    elif case == "device":
        sem_keep = sem_keep.to("meta")
    elif case == "integer":
        sem_up = sem_up.long()
    elif case == "all_integer":
        detail_keep, sem_up, detail_down, sem_keep = (t.long() for t in (detail_keep, sem_up, detail_down, sem_keep))
    elif case == "low_empty":
        sem_up, detail_down, sem_keep = (torch.zeros(1, 2, 0, 2) for _ in range(3))
    elif case == "not_a_tensor":
        sem_keep = sem_keep.numpy()
    assert not bga._well_formed(detail_keep, sem_up, detail_down, sem_keep)
    with pytest.raises(ValueError, match=pattern):
        bga.bga_aggregate(detail_keep, sem_up, detail_down, sem_keep)


# ---------------------------------------------------------------------------------------
# The C++ CPU loops: the kernels' arithmetic and tiling

@pytest.mark.parametrize("shape, low_hw", CPU_SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_loop_float64_matches_reference(extension, shape, low_hw, channels_last):
    inputs = random_inputs(shape, low_hw, channels_last=channels_last, seed=sum(shape))
    grad_out = torch.randn(shape, dtype=torch.float64)
    expected_out = bga.bga_aggregate_reference(*inputs)
    expected_grads = bga.bga_aggregate_backward_reference(grad_out, *inputs)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = extension.bga_forward(*inputs)
    # float64 throughout, sums of at most a few dozen terms: rounding ~1e-15
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous(memory_format=fmt)
    for tile_h, tile_w in TILES:
        grads = extension.bga_backward(grad_out, *inputs, tile_h, tile_w)
        for name, grad, want in zip(GRAD_NAMES, grads, expected_grads):
            torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
            assert grad.is_contiguous(memory_format=fmt), name


# Tolerances against the float64 oracle on the same (rounded) inputs, (rtol, atol as a
# fraction of the largest |expected|):
#   rtol: rounding of the result to the storage type, half an ulp relative to the value:
#         2^-8 for bfloat16 (8 significant bits), 2^-11 for float16 (11 bits); float32
#         results carry only float32 arithmetic, a few ulps (~1e-7), so 1e-5 is loose (the
#         fast sigmoid's relative error grows as 1.25 |v| ulp where it is tiny, for these
#         inputs' |v| < 10 at most 15 ulps, and stays below 2^-23 absolute);
#   atol: float32 accumulation where terms cancel: a gradient sums at most
#         (2 * ceil(scale))^2 = 64 (for the x4 shapes) weighted terms, each no larger than
#         the largest value, so the error stays below 64 * 2^-24 ~ 4e-6 of it; 2e-5 is 5x that.
TOLERANCES = {torch.float32: (1e-5, 2e-5), torch.bfloat16: (2 ** -8, 2e-5),
              torch.float16: (2 ** -11, 2e-5), torch.float64: (1e-12, 1e-12)}


def assert_matches(actual, expected, dtype, what):
    rtol, atol_fraction = TOLERANCES[dtype]
    assert actual.dtype == dtype, what
    torch.testing.assert_close(actual.double(), expected, rtol=rtol,
                               atol=atol_fraction * expected.abs().max().item(),
                               msg=lambda message: f"{what}: {message}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_loop_low_precision_matches_float64(extension, dtype, channels_last):
    inputs = random_inputs((2, 18, 9, 11), (3, 4), dtype=dtype, channels_last=channels_last)
    grad_out = torch.randn(2, 18, 9, 11).to(dtype)
    exact = [t.double() for t in inputs]
    assert_matches(extension.bga_forward(*inputs), bga.bga_aggregate_reference(*exact), dtype, "out")
    grads = extension.bga_backward(grad_out, *inputs)
    expected = bga.bga_aggregate_backward_reference(grad_out.double(), *exact)
    for name, grad, want in zip(GRAD_NAMES, grads, expected):
        assert_matches(grad, want, dtype, name)


def misaligned_copy(tensor):
    """tensor's values in a dense view of its memory format that starts one element past an
    allocation, so no 16-byte vector fits its start: the forward's one-output items."""
    fmt = torch.channels_last if tensor.is_contiguous(memory_format=torch.channels_last) and not \
        tensor.is_contiguous() else torch.contiguous_format
    dense = tensor.contiguous(memory_format=fmt)
    storage = torch.empty(dense.numel() + 1, dtype=tensor.dtype)
    view = storage[1:].as_strided(dense.shape, dense.stride())
    view.copy_(dense)
    return view


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_loop_forward_vectors_equal_one_output_items(extension, dtype, channels_last):
    # 16 channels and 16 columns: 16-byte vectors along C (channels_last, one load of sem_up and
    # of the gate per tap) or W; the same arithmetic per output as the one-output items
    inputs = random_inputs((2, 16, 12, 16), (3, 5), dtype=dtype, channels_last=channels_last, seed=4)
    vectors = extension.bga_forward(*inputs)
    singles = extension.bga_forward(*[misaligned_copy(t) for t in inputs])
    assert torch.equal(vectors, singles)
    assert_matches(vectors, bga.bga_aggregate_reference(*[t.double() for t in inputs]), dtype, "out")


def test_cpu_loop_mixed_formats_follow_detail_keep(extension):
    # NCHW detail_keep with channels_last low-res inputs (and grad_out): copied, NCHW out
    inputs = random_inputs((1, 4, 9, 11), (3, 4))
    inputs[1:] = [t.contiguous(memory_format=torch.channels_last) for t in inputs[1:]]
    grad_out = torch.randn(1, 4, 9, 11, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    out = extension.bga_forward(*inputs)
    assert out.is_contiguous()
    torch.testing.assert_close(out, bga.bga_aggregate_reference(*inputs), rtol=1e-12, atol=1e-12)
    grads = extension.bga_backward(grad_out, *inputs)
    for grad, want in zip(grads, bga.bga_aggregate_backward_reference(grad_out, *inputs)):
        assert grad.is_contiguous()
        torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


def test_cpu_loop_rejects_mismatched_dtype(extension):
    inputs = random_inputs((1, 2, 8, 8), (2, 2))
    inputs[3] = inputs[3].float()
    with pytest.raises(RuntimeError, match="sem_keep is Float but detail_keep is Double"):
        extension.bga_forward(*inputs)


@pytest.mark.parametrize("high, low, pattern", [
    ((1, 2**16, 4, 2**15), (1, 2**16, 1, 2**13), r"rows of about 2\^31 elements \(C \* W, or 2 C \* w in sem_up\)"),
    # sem_up's two tap rows: (2 w - 1) C past the first's start, where w C alone fits
    ((1, 2, 2, 2**29), (1, 2, 1, 2**29), r"rows of about 2\^31 elements \(C \* W, or 2 C \* w in sem_up\)"),
    ((1, 1, 2**16, 2**15), (1, 1, 2**14, 2**13), r"planes of 2\^31 elements \(H \* W\) or more are not supported"),
])
def test_cpu_loop_backward_rejects_sizes_past_32_bit_offsets(extension, high, low, pattern):
    # the kernels' 32-bit offsets within a row (the walk) and a plane (NCHW's window items):
    # refused in one line before anything is allocated (the inputs are expanded scalars)
    def big(shape):
        return torch.zeros(1, 1, 1, 1).expand(*shape)
    with pytest.raises(RuntimeError, match=pattern):
        extension.bga_backward(big(high), big(high), big(low), big(low), big(low))


@pytest.mark.parametrize("high, low", [((1, 1, 1, 2**30), (1, 1, 1, 2)), ((1, 1, 2, 2), (1, 1, 2**30, 1)),
                                       ((2**30, 1, 1, 1), (2**30, 1, 1, 1))])
def test_cpu_loop_rejects_sides_of_2_30(extension, high, low):
    # the geometry's and the tiles' int arithmetic (W = 2^31 made the scale negative: a wrong
    # output, no error); expanded scalars, nothing allocated
    def big(shape):
        return torch.zeros(1, 1, 1, 1).expand(*shape)
    pattern = r"sides of 2\^30 or more are not supported"
    with pytest.raises(RuntimeError, match=pattern):
        extension.bga_forward(big(high), big(low), big(low), big(low))
    with pytest.raises(RuntimeError, match=pattern):
        extension.bga_backward(big(high), big(high), big(low), big(low), big(low))
    with pytest.raises(RuntimeError, match=pattern):
        extension.bga_backward_plan(list(high), list(low[2:]), True, torch.float32)


@pytest.mark.parametrize("tile", [(2**20, 1), (1, 2**31 - 1), (-1, 0)])
def test_cpu_loop_rejects_tiles_outside_2_20(extension, tile):
    # a tile side of 2^31 - 1 wrapped the rim's entries and the tile counts (a crash)
    inputs = random_inputs((1, 16, 8, 8), (2, 2), channels_last=True)
    with pytest.raises(RuntimeError, match=r"tile sizes must be in \[0, 2\^20\)"):
        extension.bga_backward(torch.ones_like(inputs[0]), *inputs, *tile)
    with pytest.raises(RuntimeError, match=r"tile sizes must be in \[0, 2\^20\)"):
        extension.bga_backward_plan([1, 16, 8, 8], [2, 2], True, torch.float64, *tile)


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_loop_ignores_the_stride_of_a_size_1_dimension(extension, channels_last):
    # PyTorch calls a tensor dense whatever stride its size-1 dimensions carry; the walk's loads
    # ahead step past W = 1 (a stride of 2^31 made that offset negative: a wild read)
    inputs = random_inputs((2, 16, 8, 1), (2, 1), channels_last=channels_last)
    odd = [torch.as_strided(t, t.shape, t.stride()[:3] + (2**31,)) for t in inputs]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grad_out = torch.randn(2, 16, 8, 1, dtype=torch.float64).contiguous(memory_format=fmt)
    torch.testing.assert_close(extension.bga_forward(*odd), bga.bga_aggregate_reference(*inputs), rtol=1e-12, atol=1e-12)
    for grad, want in zip(extension.bga_backward(grad_out, *odd),
                          bga.bga_aggregate_backward_reference(grad_out, *inputs)):
        torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# The ops (their autograd is bga._BgaKernels, checked against the reference below)

@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(kernel_device, extension, channels_last):
    inputs = random_inputs((2, 3, 9, 11), (3, 4), dtype=torch.float32, device=kernel_device,
                           channels_last=channels_last)
    torch.library.opcheck(extension.bga_forward.default, inputs)
    grad_out = torch.randn(2, 3, 9, 11, device=kernel_device)
    torch.library.opcheck(extension.bga_backward.default, [grad_out] + inputs)


# ---------------------------------------------------------------------------------------
# One body, CPU (the C++ loops) and GPU (the kernels, marked gpu)

def test_empty_batch(kernel_device, extension):
    shape = (0, 3, 9, 11)
    inputs = random_inputs(shape, (3, 4), dtype=torch.float32, device=kernel_device)
    assert extension.bga_forward(*inputs).shape == shape
    grads = extension.bga_backward(torch.zeros(shape, device=kernel_device), *inputs)
    assert [tuple(g.shape) for g in grads] == [shape] + [shape[:2] + (3, 4)] * 3
    leaves = [t.requires_grad_(True) for t in inputs]
    bga.bga_aggregate(*leaves).sum().backward()
    assert all(leaf.grad.shape == leaf.shape for leaf in leaves)
    for empty in ((1, 0, 9, 11), (1, 3, 0, 11)):  # no channel, no row: refused on every device
        with pytest.raises(ValueError, match="no channel or an empty plane"):
            bga.bga_aggregate(*random_inputs(empty, (3, 4), dtype=torch.float32, device=kernel_device))


@pytest.mark.parametrize("channels_last", [False, True])
def test_sliced_inputs(kernel_device, extension, channels_last):
    """Slices of larger tensors (non-contiguous in either format) give the dense result."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    big = random_inputs((2, 40, 19, 25), (7, 9), dtype=torch.float32, device=kernel_device,
                        channels_last=channels_last)
    sliced = [big[0][:, 3:23, 1:18, ::2]] + [t[:, 3:23, 1:5, 2:8] for t in big[1:]]  # 17x13 from 4x6
    assert not any(t.is_contiguous(memory_format=fmt) for t in sliced)
    dense = [t.contiguous(memory_format=fmt) for t in sliced]
    grad_out = torch.randn(sliced[0].shape, device=kernel_device)
    assert torch.equal(extension.bga_forward(*sliced), extension.bga_forward(*dense))
    for got, want in zip(extension.bga_backward(grad_out, *sliced), extension.bga_backward(grad_out, *dense)):
        assert torch.equal(got, want)


def off_by_one_element(tensor):
    """tensor's values, in its strides, one element past the start of a fresh storage: in a
    16-bit type 2 bytes, off the 4 bytes a pair of channels is read as."""
    storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype, device=tensor.device)
    moved = storage[1:].as_strided(tensor.shape, tensor.stride())
    return moved.copy_(tensor)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile", [(0, 0), (1, 1), (2, 3)])
def test_walk_lanes_give_the_same_bits(kernel_device, extension, dtype, tile):
    """16-bit channels_last with an even C walks a channel pair an item (bga_math.h:
    walk_lanes). One channel an item (lanes=1), the walk of tensors off 4 bytes (one lane by
    walk_lanes) and the NCHW window give the same gradients, bit for bit."""
    for size, low in (((2, 20, 33, 35), (9, 9)), ((1, 32, 16, 24), (4, 6)), ((1, 18, 5, 3), (9, 11))):
        inputs = random_inputs(size, low, dtype=dtype, device=kernel_device, channels_last=True, seed=size[1])
        grad_out = torch.randn(size, device=kernel_device).to(dtype).contiguous(memory_format=torch.channels_last)
        paired = extension.bga_backward(grad_out, *inputs, *tile)
        assert extension.bga_backward_plan(list(size), list(low), True, dtype, *tile)[-1] == 2
        single = extension.bga_backward(grad_out, *inputs, *tile, 1)
        unaligned = extension.bga_backward(off_by_one_element(grad_out), off_by_one_element(inputs[0]), *inputs[1:],
                                           *tile)
        nchw = extension.bga_backward(*[t.contiguous() for t in [grad_out] + inputs], *tile)
        for other in (single, unaligned, nchw):
            for got, want in zip(other, paired):
                assert torch.equal(got, want), (size, low)


def test_random_shapes_and_tiles_match_float64_reference(kernel_device, extension):
    """A seeded sweep of 40 shapes, memory formats and tiles (conftest: random_bga_shapes)
    through both ops and the op's autograd path, in float64 against the reference, beyond the
    listed shapes. An explicit tile over the shared-memory budget must say so; the automatic
    one always fits."""
    for index, (shape, low_hw, channels_last, tile, seed) in enumerate(random_bga_shapes(40, seed=2026)):
        what = f"case {index}: {shape} from {low_hw}, {'NHWC' if channels_last else 'NCHW'}, tile {tile}"
        inputs = random_inputs(shape, low_hw, channels_last=channels_last, seed=seed)
        grad_out = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        want_out = bga.bga_aggregate_reference(*inputs)
        want_grads = bga.bga_aggregate_backward_reference(grad_out, *inputs)
        inputs, grad_out = [t.to(kernel_device) for t in inputs], grad_out.to(kernel_device)
        if kernel_device.type == "cuda":
            poison_cuda_cache(8 * sum(t.numel() for t in inputs))
        torch.testing.assert_close(extension.bga_forward(*inputs).cpu(), want_out, rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"{what}: {m}")
        if tile_fits(extension, shape, low_hw, channels_last, torch.float64, tile):
            grads = extension.bga_backward(grad_out, *inputs, *tile)
            for name, grad, want in zip(GRAD_NAMES, grads, want_grads):
                torch.testing.assert_close(grad.cpu(), want, rtol=1e-12, atol=1e-12,
                                           msg=lambda m: f"{what}, {name}: {m}")
        else:
            assert tile != (0, 0), what
        out, grads = autograd_grads(bga.bga_aggregate, inputs, grad_out)
        torch.testing.assert_close(out.cpu(), want_out, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")
        for name, grad, want in zip(GRAD_NAMES, grads, want_grads):
            torch.testing.assert_close(grad.cpu(), want, rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"{what}, autograd, {name}: {m}")


@pytest.mark.gpu
def test_cuda_on_a_side_stream(cuda_kernel):
    inputs = random_inputs((2, 64, 64, 64), (16, 16), dtype=torch.bfloat16, device="cuda", channels_last=True)
    grad_out = torch.randn(2, 64, 64, 64, device="cuda").to(torch.bfloat16)
    expected_leaves = [t.clone().requires_grad_(True) for t in inputs]
    expected = bga.bga_aggregate(*expected_leaves)
    expected.backward(grad_out)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        leaves = [(t * 1).requires_grad_(True) for t in inputs]  # made on the side stream, used at once
        out = bga.bga_aggregate(*leaves)
        out.backward(grad_out)
    side.synchronize()
    assert torch.equal(out, expected)
    for leaf, want in zip(leaves, expected_leaves):
        assert torch.equal(leaf.grad, want.grad)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_cpu(fused_path, dynamic):
    """One graph, on the CPU path (the reference) and on the kernels' (the autograd.Function
    and the C++ ops' fakes), with static and with symbolic sizes."""
    def gated_sum(detail_keep, sem_up, detail_down, sem_keep):
        return (bga.bga_aggregate(detail_keep, sem_up, detail_down, sem_keep) * 2).relu().sum()

    compiled = torch.compile(gated_sum, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    inputs = random_inputs((2, 3, 9, 11), (3, 4), dtype=torch.float32)
    eager_leaves = [t.clone().requires_grad_(True) for t in inputs]
    compiled_leaves = [t.clone().requires_grad_(True) for t in inputs]
    eager = gated_sum(*eager_leaves)
    eager.backward()
    result = compiled(*compiled_leaves)
    result.backward()
    # the same float32 operations: only the sum's order may differ
    torch.testing.assert_close(result, eager, rtol=1e-6, atol=1e-6)
    for leaf, want in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(leaf.grad, want.grad, rtol=1e-6, atol=1e-6)


def run_bisenet(model, images, aggregate, seed=0):
    """Train-mode outputs and parameter gradients of a fixed weighted sum of them (the
    seed fixes the heads' dropout masks)."""
    model.bga.aggregate = aggregate
    model.zero_grad()
    torch.manual_seed(seed)
    outputs = model(images)
    generator = torch.Generator().manual_seed(seed)
    loss = sum((out * torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)).sum()
               for out in outputs)
    loss.backward()
    grads = {name: param.grad.detach().clone() for name, param in model.named_parameters()}
    return [out.detach() for out in outputs], grads


def test_bisenet_with_fused_op_matches_default_cpu(cpu_loops):
    """BiSeNetV2 in float64 with the op down its kernels' path (the C++ loops) against its
    own composition: the five heads and every parameter's gradient."""
    torch.manual_seed(0)
    model = BiSeNetV2(5).double().train()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected_outputs, expected_grads = run_bisenet(model, images, bisenetv2.bga_aggregate)
    fused = []
    ran = dispatched_ops(lambda: fused.extend(run_bisenet(model, images, bga.bga_aggregate)))
    assert {"bisenet_cuda.bga_forward.default", "bisenet_cuda.bga_backward.default"} <= set(ran)
    outputs, grads = fused
    for out, want in zip(outputs, expected_outputs):
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)  # float64, same math
    for name, want in expected_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------
# GPU: the CUDA kernels

GPU_SHAPES = [
    ((1, 1, 8, 8), (8, 8)),          # factor 1
    ((2, 7, 17, 23), (9, 12)),       # ~2, odd
    ((3, 7, 36, 20), (9, 5)),        # factor 4
    ((1, 7, 9, 11), (4, 4)),         # non-integer
    ((2, 128, 64, 64), (16, 16)),    # BiSeNetV2's BGA at 512 x 512
    ((1, 128, 65, 129), (17, 33)),   # odd BiSeNet-like
    ((3, 1, 5, 3), (9, 11)),         # downscale
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape, low_hw", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_kernels_match_float64_reference(cuda_kernel, shape, low_hw, dtype, channels_last):
    inputs = random_inputs(shape, low_hw, dtype=dtype, device="cuda", channels_last=channels_last,
                           seed=sum(shape) + len(low_hw))
    grad_out = torch.randn(shape, device="cuda").to(dtype)
    exact = [t.double() for t in inputs]
    expected_out = bga.bga_aggregate_reference(*exact)
    expected_grads = bga.bga_aggregate_backward_reference(grad_out.double(), *exact)
    fmt = torch.channels_last if channels_last and shape[1] > 1 else torch.contiguous_format
    poison_cuda_cache(inputs[0].numel() * inputs[0].element_size())
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    out = bga.bga_aggregate(*leaves)
    out.backward(grad_out)
    assert out.is_contiguous(memory_format=fmt)
    assert_matches(out, expected_out, dtype, "out")
    for name, leaf, want in zip(GRAD_NAMES, leaves, expected_grads):
        assert leaf.grad.is_contiguous(memory_format=fmt), name
        assert_matches(leaf.grad, want, dtype, name)
    for tile_h, tile_w in TILES[1:]:  # tile borders everywhere: the rim logic
        poison_cuda_cache(inputs[0].numel() * inputs[0].element_size())
        if not tile_fits(cuda_kernel, shape, low_hw, channels_last, dtype, (tile_h, tile_w)):
            # an explicit tile over the shared-memory budget: refused before the launch
            with pytest.raises(RuntimeError, match="bytes of shared memory, more than"):
                cuda_kernel.bga_backward(grad_out, *inputs, tile_h, tile_w)
            continue
        grads = cuda_kernel.bga_backward(grad_out, *inputs, tile_h, tile_w)
        for name, grad, want in zip(GRAD_NAMES, grads, expected_grads):
            assert_matches(grad, want, dtype, f"{name} with {tile_h}x{tile_w} tiles")


def tile_fits(extension, shape, low_hw, channels_last, dtype, tile):
    """Whether the backward's plan for this explicit tile is within the shared-memory budget."""
    try:
        extension.bga_backward_plan(list(shape), list(low_hw), channels_last, dtype, *tile)
    except RuntimeError as error:
        assert "shared memory" in str(error)
        return False
    return True


@pytest.mark.gpu
def test_cuda_backward_is_deterministic(cuda_kernel):
    inputs = random_inputs((4, 128, 128, 128), (32, 32), dtype=torch.float32, device="cuda")
    grad_out = torch.randn(4, 128, 128, 128, device="cuda")
    first = cuda_kernel.bga_backward(grad_out, *inputs)
    second = cuda_kernel.bga_backward(grad_out, *inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_cuda_compile_fullgraph_uses_one_op(cuda_kernel):
    def gated(detail_keep, sem_up, detail_down, sem_keep):
        return bga.bga_aggregate(detail_keep, sem_up, detail_down, sem_keep).float().square().mean()

    inputs = random_inputs((2, 128, 64, 64), (16, 16), dtype=torch.bfloat16, device="cuda", channels_last=True)
    eager_leaves = [t.clone().requires_grad_(True) for t in inputs]
    compiled_leaves = [t.clone().requires_grad_(True) for t in inputs]
    gated(*eager_leaves).backward()
    torch.compile(gated, fullgraph=True)(*compiled_leaves).backward()
    # the same kernels; only the incoming gradient, 2 * out / numel, may round differently
    # (by one bfloat16 ulp, 2^-7 relative) between inductor's code and eager's
    for leaf, want in zip(compiled_leaves, eager_leaves):
        scale = want.grad.abs().max().item()
        torch.testing.assert_close(leaf.grad, want.grad, rtol=2 ** -7, atol=2 ** -7 * scale)


@pytest.mark.gpu
def test_bisenet_with_cuda_kernel_matches_default(cuda_kernel, no_tf32):
    # float32 convolutions and matmuls, not TF32 (torch's cuDNN default), on both sides:
    # TF32's 10-bit mantissa would swamp the comparison below
    torch.manual_seed(0)
    model = BiSeNetV2(5).cuda().train().to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 128, 256, device="cuda").contiguous(memory_format=torch.channels_last)
    expected_outputs, _ = run_bisenet(model, images, bisenetv2.bga_aggregate)
    outputs, _ = run_bisenet(model, images, bga.bga_aggregate)
    # float32 kernel vs float32 eager ops through ~20 layers after the BGA (and BN's batch
    # statistics): rounding differences of ~1e-7 grow to ~1e-6 of the norms
    for out, want in zip(outputs, expected_outputs):
        assert relative_error(out, want) < 1e-5
    # The gradients in float64, as the CPU test: in float32 those of the BN parameters that
    # the next BN (nearly) cancels are rounding noise, eager against eager too (on an H200,
    # 2026-11-27: semantic.stage3.0.conv.bn.weight, norm 2e-8, relative error 1.3 between
    # the float32 runs; the dw_expand biases, norm 1e-14, off by 1.3 even in float64). Float64
    # leaves them below the absolute tolerance and every other gradient at ~1e-12 relative.
    model = model.double()
    expected_outputs, expected_grads = run_bisenet(model, images.double(), bisenetv2.bga_aggregate)
    outputs, grads = run_bisenet(model, images.double(), bga.bga_aggregate)
    for out, want in zip(outputs, expected_outputs):
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for name, want in expected_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
def test_bisenet_autocast_bf16_runs_kernel(cuda_kernel):
    model = BiSeNetV2(5).cuda().train()
    model.bga.aggregate = bga.bga_aggregate
    images = torch.randn(2, 3, 128, 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outputs = model(images)
    assert outputs[0].dtype == torch.bfloat16
    sum(out.float().sum() for out in outputs).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_cpu_autocast_bisenet_feeds_one_dtype(monkeypatch):
    # under autocast the BGA's four inputs come from convs (and an average pool): all
    # bfloat16, which the op's one-dtype check must accept; CPU tensors always take the
    # reference, whatever use_cuda_kernel says
    monkeypatch.setattr(bga.EXTENSION, "use_cuda_kernel", True)
    model = BiSeNetV2(5).train()
    seen = []

    def recording_aggregate(*inputs):
        out = bga.bga_aggregate(*inputs)
        seen.append([t.dtype for t in inputs] + [out.dtype])
        return out

    model.bga.aggregate = recording_aggregate
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(torch.randn(2, 3, 64, 64))
    assert seen == [[torch.bfloat16] * 5] and outputs[0].dtype == torch.bfloat16
