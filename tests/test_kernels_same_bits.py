"""The kernels compute the same bits on the host and on the device (kernels/csrc/same_bits.h).

CPU: the error of same_bits.h's exp, log and sigmoid against higher-precision references,
its integer divider against exact division; the BGA and loss backwards' plans (tile,
shared-memory capacities) against what every tile of them needs, swept over sizes; a tiling
over the shared-memory budget fails on the CPU as it would at launch. GPU (marked gpu): the CUDA kernels and the C++ CPU loops give identical results,
bit for bit, for the math functions, the divider, the BGA and the loss, on odd sizes.
"""
import math

import numpy as np
import pytest
import torch

from conftest import poison_cuda_cache, random_bga_shapes, random_loss_shapes

EPS32, EPS64 = 2.0 ** -23, 2.0 ** -52  # one ulp at 1


def ulps(actual, exact, eps):
    """|actual - exact| in units of the last place of exact (numpy arrays; exact nonzero)."""
    exact = np.asarray(exact, dtype=np.longdouble)
    ulp = np.exp2(np.floor(np.log2(np.abs(exact)))) * eps
    return np.abs(np.asarray(actual, dtype=np.longdouble) - exact) / ulp


def float32_sweep(low, high, count=200_001, seed=0):
    generator = torch.Generator().manual_seed(seed)
    even = torch.linspace(low, high, count, dtype=torch.float64)
    scattered = torch.rand(count, generator=generator, dtype=torch.float64) * (high - low) + low
    return torch.cat([even, scattered]).float()


# ---------------------------------------------------------------------------------------
# Accuracy of the functions (CPU: the C++ loop runs same_bits.h)

def test_exp_within_two_ulp(extension):
    # every x whose exp is a normal number below 2^127.5 (from there inf, as exp2_acc's u)
    x = float32_sweep(-87.33, 88.37)
    y = extension.same_bits_math(x, "exp")
    assert ulps(y.numpy(), np.exp(x.numpy().astype(np.longdouble)), EPS32).max() <= 2
    x64 = x.double() * (1 + 1e-9)
    y64 = extension.same_bits_math(x64, "exp")
    assert ulps(y64.numpy(), np.exp(x64.numpy().astype(np.longdouble)), EPS64).max() <= 2


def test_exp_edges(extension):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 89.0, -88.0, 0.0, -0.0, 88.38, 1e30, -1e30])
    y = extension.same_bits_math(x, "exp")
    assert math.isnan(y[0]) and y[1] == math.inf and y[2] == 0 and y[3] == math.inf and y[4] == 0
    assert y[5] == 1 and y[6] == 1 and y[7] == math.inf and y[8] == math.inf and y[9] == 0  # x log2(e) >= 127.5: inf
    y64 = extension.same_bits_math(torch.tensor([float("nan"), float("inf"), -float("inf"), 710.0, -746.0, 709.0, 1.0],
                                                dtype=torch.float64), "exp")
    assert math.isnan(y64[0]) and y64[1] == math.inf and y64[2] == 0 and y64[3] == math.inf and y64[4] == 0
    assert y64[5] == pytest.approx(math.exp(709.0), rel=1e-15) and y64[6] == pytest.approx(math.e, rel=1e-15)


def test_exp2_within_two_ulp(extension):
    # every u whose 2^u is a normal number, densely, up to 127.5 (from there inf: same_bits.h);
    # below -126, the result is subnormal or 0
    u = float32_sweep(-126.0, 127.49)
    y = extension.same_bits_math(u, "exp2")
    assert ulps(y.numpy(), np.exp2(u.numpy().astype(np.longdouble)), EPS32).max() <= 2
    u64 = u.double() * (1 + 1e-9)
    y64 = extension.same_bits_math(u64, "exp2")
    assert ulps(y64.numpy(), np.exp2(u64.numpy().astype(np.longdouble)), EPS64).max() <= 2


def test_exp2_edges(extension):
    u = torch.tensor([float("nan"), float("inf"), -float("inf"), 128.0, -127.0, -200.0, 0.0, -0.0, 1.0, -126.0,
                      127.5, 127.0, -126.75, -0.5, 0.5])
    y = extension.same_bits_math(u, "exp2")
    assert math.isnan(y[0]) and y[1] == math.inf and y[2] == 0 and y[3] == math.inf
    assert y[4] == 0 and y[5] == 0 and y[6] == 1 and y[7] == 1 and y[8] == 2 and y[9] == 2.0 ** -126
    assert y[10] == math.inf and y[11] == 2.0 ** 127 and y[12] == 0  # the clamp's edges
    assert abs(y[13] - 2 ** -0.5) <= 2 * 2 ** -24 and abs(y[14] - 2 ** 0.5) <= 2 * 2 ** -23  # f at +-1/2
    y64 = extension.same_bits_math(torch.tensor([1024.0, -1023.0, -1022.0, 10.0, 1023.5, float("nan")],
                                                dtype=torch.float64), "exp2")
    assert y64[0] == math.inf and y64[1] == 0 and y64[2] == 2.0 ** -1022 and y64[3] == 1024
    assert y64[4] == math.inf and math.isnan(y64[5])


def test_exp2_nonpositive_is_exp2_bit_for_bit(extension):
    # every nonpositive float32 (a stride through their bit patterns, -0 and -inf among them)
    # and NaN: the variant without the upper clamp gives exp2_acc's bits
    bits = torch.cat([torch.arange(0, 2 ** 31, 97, dtype=torch.int64), torch.tensor([2 ** 31 - 1, 0x7F800000])])
    u = -(bits.to(torch.int32).view(torch.float32))
    u = torch.cat([u, torch.tensor([float("nan"), -float("inf")]), -float32_sweep(0.0, 130.0, count=100_001)])
    y, want = extension.same_bits_math(u, "exp2_nonpositive"), extension.same_bits_math(u, "exp2")
    assert torch.equal(y.isnan(), u.isnan()) and torch.equal(want.isnan(), u.isnan())
    assert torch.equal(y.nan_to_num(0.0).view(torch.int32), want.nan_to_num(0.0).view(torch.int32))
    u64 = -(torch.rand(100_000, dtype=torch.float64) * 1100)
    assert torch.equal(extension.same_bits_math(u64, "exp2_nonpositive"), extension.same_bits_math(u64, "exp2"))


def test_exp_by_prescaled_exp2_bound(extension):
    """exp(x) as exp2_acc(x * log2(e)), log2(e) rounded to float: exp2's 2 ulp plus the
    rounding of the product and of log2(e), |x| 2^-23 relative at most (2 |x| ulp): the
    softmax's exp(z - lse), x <= 0, loses at most that against exp_acc's 2 ulp."""
    x = float32_sweep(-87.0, 88.0)
    y = extension.same_bits_math(x * 1.4426950408889634, "exp2")  # the float32 product, as the kernels
    error = ulps(y.numpy(), np.exp(x.numpy().astype(np.longdouble)), EPS32)
    assert (error <= 2 + 2 * np.abs(x.numpy())).all()
    near = x.abs() <= 1  # where the softmax's large terms are
    assert error[near.numpy()].max() <= 4


def test_log_within_two_ulp(extension):
    # every binade of float32, subnormals included, and densely around 1 (lse's log(sum))
    x = torch.cat([torch.logspace(-44, 38, 400_001, dtype=torch.float64).float(),
                   float32_sweep(0.5, 40.0)])
    x = x[(x > 0) & (x != 1)]
    y = extension.same_bits_math(x, "log")
    exact = np.log(x.numpy().astype(np.longdouble))
    # 2 ulp of the result, or of 2^-24 absolute where the result is tiny (x near 1)
    error = np.abs(y.numpy().astype(np.longdouble) - exact)
    bound = 2 * np.maximum(np.exp2(np.floor(np.log2(np.abs(exact)))) * EPS32, 2.0 ** -24)
    assert (error <= bound).all()
    x64 = x.double() * (1 + 1e-9)
    error64 = np.abs(extension.same_bits_math(x64, "log").numpy().astype(np.longdouble) -
                     np.log(x64.numpy().astype(np.longdouble)))
    exact64 = np.log(x64.numpy().astype(np.longdouble))
    assert (error64 <= 2 * np.maximum(np.exp2(np.floor(np.log2(np.abs(exact64)))) * EPS64, 2.0 ** -53)).all()


def test_log_edges(extension):
    y = extension.same_bits_math(torch.tensor([0.0, -1.0, float("nan"), float("inf"), 1.0]), "log")
    assert y[0] == -math.inf and math.isnan(y[1]) and math.isnan(y[2]) and y[3] == math.inf and y[4] == 0


def test_sigmoid_within_its_bound(extension):
    """The fast sigmoid (same_bits.h): 1 / (1 + exp2(-v log2(e))), the product rounded once, so
    within 2.5 + 1.25 max(-v, 0) ulp (exp2's 0.81, the sum's rounding, the reciprocal's 0.78, and
    the product's error, 1.23 |v| ulp where the sigmoid is tiny) and 2^-23 (2^-52) absolute;
    every v whose sigmoid is a normal number, in float32 and float64."""
    x = float32_sweep(-87.0, 100.0)
    y = extension.same_bits_math(x, "sigmoid")
    exact = 1 / (1 + np.exp(-x.numpy().astype(np.longdouble)))
    allowed = 2.5 + 1.25 * np.maximum(-x.numpy(), 0)
    assert (ulps(y.numpy(), exact, EPS32) <= allowed).all()
    assert np.abs(y.numpy().astype(np.longdouble) - exact).max() <= 2.0 ** -23
    x64 = torch.cat([x.double() * (1 + 1e-9), torch.linspace(-708.0, 40.0, 100_001, dtype=torch.float64)])
    y64 = extension.same_bits_math(x64, "sigmoid")
    exact64 = 1 / (1 + np.exp(-x64.numpy().astype(np.longdouble)))
    assert (ulps(y64.numpy(), exact64, EPS64) <= 2.5 + 1.25 * np.maximum(-x64.numpy(), 0)).all()
    assert np.abs(y64.numpy().astype(np.longdouble) - exact64).max() <= 2.0 ** -52
    edges = extension.same_bits_math(torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -89.0]), "sigmoid")
    assert math.isnan(edges[0]) and edges[1] == 1 and edges[2] == 0 and edges[3] == 0.5 and edges[4] == 0


def test_math_rejects_bad_input(extension):
    with pytest.raises(RuntimeError, match="fn must be exp, log, sigmoid, exp2 or exp2_nonpositive"):
        extension.same_bits_math(torch.ones(2), "tanh")
    with pytest.raises(RuntimeError, match="float32 or float64"):
        extension.same_bits_math(torch.ones(2, dtype=torch.bfloat16), "exp")


def divider_cases(seed):
    """(divisor, dividends): every divisor to 2048, the powers of two and their neighbours to
    2^31 - 1, random ones; per divisor the dividends at and next to its multiples (the first
    40, 60 random ones), 0, 1, 2^31 - 2, 2^31 - 1 and 100 random ones below 2^31."""
    generator = torch.Generator().manual_seed(seed)
    top = 2 ** 31 - 1
    divisors = list(range(1, 2049)) + [2 ** k + e for k in range(11, 31) for e in (-1, 0, 1)] + [top - 1, top]
    divisors += torch.randint(1, 2 ** 31, (200,), generator=generator).tolist()
    for divisor in divisors:
        multiples = torch.cat([torch.arange(40), torch.randint(0, top // divisor + 1, (60,), generator=generator)])
        multiples = multiples * divisor
        n = torch.cat([multiples - 1, multiples, multiples + 1, torch.tensor([0, 1, top - 1, top]),
                       torch.randint(0, 2 ** 31, (100,), generator=generator)])
        yield divisor, n[(n >= 0) & (n <= top)]


def test_divider_is_exact(extension):
    # n / d by a multiply-high, an add and a shift (same_bits.h: FastDivider; the BGA
    # forward's 32-bit index path): exact for n and d below 2^31
    for divisor, n in divider_cases(seed=0):
        assert torch.equal(extension.same_bits_divide(n, divisor), n // divisor), divisor
    with pytest.raises(RuntimeError, match="n must be int64"):
        extension.same_bits_divide(torch.ones(2, dtype=torch.int32), 3)
    with pytest.raises(RuntimeError, match=r"divisor must be in \[1, 2\^31\), got 0"):
        extension.same_bits_divide(torch.ones(2, dtype=torch.int64), 0)
    with pytest.raises(RuntimeError, match=r"n must be in \[0, 2\^31\)"):
        extension.same_bits_divide(torch.tensor([2 ** 31]), 3)


# ---------------------------------------------------------------------------------------
# The BGA backward's plan (CPU; the plan is made on the host for both devices)

def plan(extension, size, low, channels_last, dtype, tile=(0, 0), lanes=0):
    """-> dict of bga_backward_plan's numbers, or None when the tiling is over budget."""
    try:
        values = extension.bga_backward_plan(list(size), list(low), channels_last, dtype, *tile, lanes)
    except RuntimeError as error:
        assert "shared memory" in str(error)
        return None
    keys = ["group", "tile_h", "tile_w", "window_capacity", "row_capacity", "shared_bytes", "most_window", "most_row",
            "walk", "rim_entries", "written", "lanes"]
    return dict(zip(keys, values))


def sweep_shapes():
    """Every high-res side 8..600 against its 1/4 and 1/8 low-res side (rounded up, as the
    model's stride-2 layers do), square and 1:2 (a Cityscapes frame's aspect)."""
    for side in range(8, 601):
        for ratio in (4, 8):
            low = -(-side // ratio)
            yield (side, side), (low, low)
            yield (side, 2 * side + 1), (low, -(-(2 * side + 1) // ratio))


@pytest.mark.parametrize("channels_last, dtype", [(False, torch.float32), (True, torch.float32),
                                                  (True, torch.float64)])
def test_backward_plan_has_room_for_every_tile(extension, channels_last, dtype):
    tiles = [(0, 0), (1, 1), (2, 3)]
    checked = 0
    shapes = list(sweep_shapes())
    for (height, width), low in shapes:
        for tile in tiles:
            numbers = plan(extension, (1, 128, height, width), low, channels_last, dtype, tile)
            if numbers is None:
                assert tile != (0, 0), f"no automatic tiling for {height}x{width} from {low}"
                continue
            assert numbers["most_window"] <= numbers["window_capacity"], (height, width, low, tile, numbers)
            assert numbers["most_row"] <= numbers["row_capacity"], (height, width, low, tile, numbers)
            # each low-res pixel written once: by its tile inside the grid lines, else by the rim pass
            assert numbers["written"] == low[0] * low[1], (height, width, low, tile, numbers)
            assert numbers["shared_bytes"] <= 48 * 1024
            checked += 1
    assert checked > len(shapes)  # every automatic tiling, and explicit ones within budget


def test_backward_257_from_65_fits_and_matches_reference(extension):
    # the sizes where the host and the device once disagreed on a tile's extent (FMA)
    from kernels import bga
    for channels_last, channels in ((False, 2), (True, 16)):
        numbers = plan(extension, (1, channels, 257, 257), (65, 65), channels_last, torch.float32)
        assert numbers["most_window"] <= numbers["window_capacity"]
        assert numbers["most_row"] <= numbers["row_capacity"]
        generator = torch.Generator().manual_seed(channels)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        inputs = [torch.randn(1, channels, 257, 257, generator=generator, dtype=torch.float64)]
        inputs += [torch.randn(1, channels, 65, 65, generator=generator, dtype=torch.float64) for _ in range(3)]
        inputs = [t.contiguous(memory_format=fmt) for t in inputs]
        grad_out = torch.randn(1, channels, 257, 257, generator=generator, dtype=torch.float64)
        grads = extension.bga_backward(grad_out, *inputs)
        for grad, want in zip(grads, bga.bga_aggregate_backward_reference(grad_out, *inputs)):
            torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


def test_tiling_over_budget_fails_on_cpu_as_at_launch(extension):
    # float64 channels_last at C=128 with 16x16 tiles (factor 4): row buffers of
    # 2 x 17 columns x 65 rows x 16 channels x 8 bytes, more than 48 KiB
    size, low = (1, 128, 64, 64), (16, 16)
    assert plan(extension, size, low, True, torch.float64, (16, 16)) is None
    inputs = [torch.randn(size, dtype=torch.float64)] + [torch.randn(1, 128, *low, dtype=torch.float64)
                                                          for _ in range(3)]
    inputs = [t.contiguous(memory_format=torch.channels_last) for t in inputs]
    with pytest.raises(RuntimeError, match="bytes of shared memory, more than the kernel's 49152"):
        extension.bga_backward(torch.randn(size, dtype=torch.float64), *inputs, 16, 16)


def test_walk_lanes(extension):
    # a channel pair a walk item for 16-bit channels_last data in groups of 16 channels with C
    # even (bga_math.h: walk_lanes; the op also asks the tensors on 4 bytes); one otherwise
    size, low = [2, 32, 64, 64], [16, 16]
    for dtype in (torch.bfloat16, torch.float16):
        assert plan(extension, size, low, True, dtype)["lanes"] == 2
        assert plan(extension, [2, 20, 64, 64], low, True, dtype)["lanes"] == 2  # groups of 16 and 4
        assert plan(extension, [2, 19, 64, 64], low, True, dtype)["lanes"] == 1  # C odd
        assert plan(extension, [2, 8, 64, 64], low, True, dtype)["lanes"] == 1  # a group of 8
        assert plan(extension, size, low, False, dtype)["lanes"] == 1  # NCHW: no walk
        assert plan(extension, size, low, True, dtype, lanes=1)["lanes"] == 1
    for dtype in (torch.float32, torch.float64):
        assert plan(extension, size, low, True, dtype)["lanes"] == 1
    with pytest.raises(RuntimeError, match="2 lanes need channels_last 16-bit data"):
        extension.bga_backward_plan(size, low, True, torch.float32, 0, 0, 2)
    with pytest.raises(RuntimeError, match=r"lanes must be 0 \(automatic\), 1 or 2, got 3"):
        extension.bga_backward_plan(size, low, True, torch.bfloat16, 0, 0, 3)


@pytest.mark.parametrize("tile", [(1, 1), (2, 3), (3, 2)])
@pytest.mark.parametrize("size, low", [((2, 5, 20, 12), (5, 3)), ((1, 3, 9, 11), (3, 4)), ((1, 2, 4, 3), (9, 11))])
def test_backward_walk_and_window_give_the_same_bits(extension, size, low, tile):
    # channels_last walks each row once, NCHW fills a window and sums it (bga_math.h): the
    # same fma chains in the same order, so with one tiling the same gradients, bit for bit
    generator = torch.Generator().manual_seed(sum(size))
    inputs = [torch.randn(size, generator=generator)] + [torch.randn(*size[:2], *low, generator=generator)
                                                          for _ in range(3)]
    grad_out = torch.randn(size, generator=generator)
    nchw = extension.bga_backward(grad_out, *inputs, *tile)
    last = [t.contiguous(memory_format=torch.channels_last) for t in [grad_out] + inputs]
    assert plan(extension, size, low, True, torch.float32, tile)["walk"] == 1
    assert plan(extension, size, low, False, torch.float32, tile)["walk"] == 0
    for nchw_grad, last_grad in zip(nchw, extension.bga_backward(*last, *tile)):
        assert last_grad.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(nchw_grad, last_grad)


# ---------------------------------------------------------------------------------------
# The CPU loops in either item order: no item reads what another item of its phase writes

def run_in_both_orders(monkeypatch, fn):
    """fn() with the CPU loops' items ascending, then descending (and phases the kernels run
    side by side in the other order, shared buffers NaN at each block's start): same_bits.h."""
    monkeypatch.delenv("BISENET_CPU_ITEM_ORDER", raising=False)
    ascending = fn()
    monkeypatch.setenv("BISENET_CPU_ITEM_ORDER", "reverse")
    descending = fn()
    monkeypatch.delenv("BISENET_CPU_ITEM_ORDER")
    return ascending, descending


def assert_same_bits(first, second, what):
    for a, b in zip(first, second):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)), what


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("tile", [(0, 0), (1, 1), (2, 3)])
def test_bga_loops_give_the_same_bits_in_either_item_order(extension, monkeypatch, channels_last, tile):
    # a race in the kernels (an item reading what another writes between two barriers) would
    # make the order matter; so would a buffer entry read before it is written (NaN)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(7)
    for size, low in (((2, 20, 33, 35), (9, 9)), ((1, 3, 5, 3), (9, 11))):
        inputs = [torch.randn(size, generator=generator)] + [torch.randn(*size[:2], *low, generator=generator)
                                                              for _ in range(3)]
        inputs = [t.contiguous(memory_format=fmt) for t in inputs]
        grad_out = torch.randn(size, generator=generator).contiguous(memory_format=fmt)
        ascending, descending = run_in_both_orders(monkeypatch, lambda: (
            [extension.bga_forward(*inputs)] + list(extension.bga_backward(grad_out, *inputs, *tile))))
        assert_same_bits(ascending, descending, (size, low, tile))
        assert not any(t.isnan().any() for t in ascending), (size, low, tile)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bga_forward_index_widths_give_the_same_bits(extension, monkeypatch, channels_last, dtype):
    # below 2^30 outputs the forward finds each item's (n, c, y, x) with FastDivider in 32 bits,
    # from there by 64-bit divisions (the kernel alike) (BISENET_CPU_WIDE_INDEX=1 makes the CPU loop take that
    # path): the same outputs, for 16-byte vectors (W or C a multiple of 16 bytes) and single
    # elements
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(9)
    for high, low, channels in (((33, 35), (9, 9), 20), ((16, 24), (4, 6), 16), ((9, 11), (3, 4), 3),
                                ((5, 3), (9, 11), 7)):
        inputs = [torch.randn(3, channels, *high, generator=generator)]
        inputs += [torch.randn(3, channels, *low, generator=generator) for _ in range(3)]
        inputs = [t.to(dtype).contiguous(memory_format=fmt) for t in inputs]
        monkeypatch.delenv("BISENET_CPU_WIDE_INDEX", raising=False)
        narrow = extension.bga_forward(*inputs)
        monkeypatch.setenv("BISENET_CPU_WIDE_INDEX", "1")
        wide = extension.bga_forward(*inputs)
        monkeypatch.delenv("BISENET_CPU_WIDE_INDEX")
        assert torch.equal(narrow, wide), (high, low, channels)  # (test_kernels_bga: narrow against the reference)


@pytest.mark.parametrize("tile", [(0, 0), (1, 1), (2, 3), (5, 64)])
@pytest.mark.parametrize("classes", [19, 33])  # the forward's class chunks: one of 20; 20 and 13
def test_loss_loops_give_the_same_bits_in_either_item_order(extension, monkeypatch, tile, classes):
    generator = torch.Generator().manual_seed(8)
    for low, high in (((9, 13), (67, 101)), ((40, 30), (11, 13))):
        logits = torch.randn(2, classes, *low, generator=generator)
        labels = torch.randint(0, classes, (2, *high), generator=generator)
        labels[:, ::5] = 255
        grad_loss = torch.randn(2, *high, generator=generator)

        def run():
            loss, lse, _, _ = extension.upsample_ce_forward(logits, labels, 255)
            outputs = [loss, lse, extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255, *tile)]
            if classes <= 20 and tile != (5, 64):  # the forward with gradient (5 x 64: over its budget)
                outputs += extension.upsample_ce_forward_grad(logits, labels, 255, *tile)
                outputs.append(extension.upsample_ce_forward_grad(logits, labels, 255, *tile, 2.5)[4])  # OHEM's
            return outputs
        ascending, descending = run_in_both_orders(monkeypatch, run)
        assert_same_bits(ascending, descending, (low, high, tile))
        assert not any(t.isnan().any() for t in ascending), (low, high, tile)


# ---------------------------------------------------------------------------------------
# The loss backward's plan (CPU; made on the host for both devices)

CE_PLAN_KEYS = ["band", "chunk", "window_rows", "window_cols", "shared_bytes", "most_rows", "most_cols",
                "most_staged", "written", "most_parts", "most_segment_items"]


def ce_plan(extension, size, low, dtype, tile=(0, 0), budget=None, forward=False):
    """-> dict of upsample_ce_backward_plan's numbers (forward: the forward with gradient's), or
    None when the tile is over budget (None: the CPU loops' and every sm_80+ GPU's, 96 KiB)."""
    try:
        values = extension.upsample_ce_backward_plan(list(size), list(low), dtype, *tile, budget, forward)
    except RuntimeError as error:
        assert f"bytes of shared memory, more than a block may take here ({budget or 98304})" in str(error)
        return None
    return dict(zip(CE_PLAN_KEYS, values))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("forward", [False, True])
def test_ce_backward_plan_has_room_for_every_tile(extension, dtype, forward):
    """Every high-res side 8..300 against its 1/4 and 1/8 side, square and 1:2: each tile's
    window fits the plan's capacities, each low-res pixel is written once (by its tile inside
    the grid lines, by the rim pass on them: written == h * w with none outside), within the
    budget: 96 KiB (the CPU loops', every sm_80+ GPU's) and sm_75's 64 KiB. The backward's
    plan and the forward with gradient's (20 classes a pass)."""
    checked = 0
    for side in range(8, 301):
        for ratio in (4, 8):
            for high in ((side, side), (side, 2 * side + 1)):
                low = tuple(-(-big // ratio) for big in high)
                for tile, budget in (((0, 0), None), ((0, 0), 64 * 1024), ((1, 1), None), ((2, 3), None),
                                     ((5, 64), None)):
                    numbers = ce_plan(extension, (2, 19) + high, low, dtype, tile, budget, forward)
                    if numbers is None:
                        assert tile != (0, 0), f"no automatic tiling for {high} from {low}"
                        continue
                    assert numbers["most_rows"] <= numbers["window_rows"], (high, low, tile, numbers)
                    assert numbers["most_cols"] <= numbers["window_cols"], (high, low, tile, numbers)
                    assert numbers["most_staged"] <= numbers["band"] + 1, (high, low, tile, numbers)
                    assert numbers["written"] == low[0] * low[1], (high, low, tile, numbers)
                    assert numbers["shared_bytes"] <= (budget or 96 * 1024), (high, low, tile, budget)
                    checked += 1
    assert checked > 293 * 4 * 3


def test_ce_backward_plan_at_every_head(extension):
    """At the seed's heads (1024 x 1024 labels from 1/4 to 1/32, float32) the automatic tile
    owns 32 x 64 pixels within the 96 KiB budget: 1/4 and 1/8 within 54 KiB (4 blocks an SM on
    sm_90), 1/16 and 1/32 above it, where a 54 KiB budget had shrunk 1/32 to 1 x 1 (measured on
    an H200: 1867 us for the backward against 811 with 1 x 2). With sm_75's 64 KiB, 1/32 still
    shrinks. A tile's segment items (band x parts x its columns) take at most one pass of the
    256-thread block where it has parts: at 1/32 a band of 1 low-res row alone left most
    threads idle while a few walked 32 rows each. At 1/4 and 1/8 one part, so their bits are
    those of the plan without parts."""
    tiles, parts = {}, {}
    for low in (256, 128, 64, 32):
        numbers = ce_plan(extension, (4, 19, 1024, 1024), (low, low), torch.float32)
        assert numbers["most_segment_items"] <= max(256, numbers["band"] * numbers["most_cols"]), (low, numbers)
        assert numbers["shared_bytes"] <= (54 if low >= 128 else 96) * 1024, (low, numbers)
        tiles[low] = (numbers["band"], numbers["chunk"])
        parts[low] = numbers["most_parts"]
    assert tiles == {256: (8, 16), 128: (4, 8), 64: (2, 4), 32: (1, 2)}, tiles
    assert parts == {256: 1, 128: 1, 64: 2, 32: 5}, parts
    sm75 = ce_plan(extension, (4, 19, 1024, 1024), (32, 32), torch.float32, budget=64 * 1024)
    assert (sm75["band"], sm75["chunk"]) == (1, 1) and sm75["shared_bytes"] <= 64 * 1024, sm75


def test_ce_forward_grad_plan_at_every_head(extension):
    """The forward with gradient at the seed's heads (float32): an inner tile's segment items
    within one round of the 256-thread block (band x chunk x the upscale <= 256: 8 x 8 at 1/4,
    where the backward takes 8 x 16; with parts, at most 256 items in any tile), within the
    96 KiB budget (2 blocks an SM on sm_90, as its registers allow), and at 1/32 the
    backward's 5 parts: its 20 classes of segment sums fit since the sums' tables hold no rows
    of zeros (they took 2 parts there, 128 to 160 of the 256 threads walking)."""
    tiles, parts = {}, {}
    for low in (256, 128, 64, 32):
        numbers = ce_plan(extension, (4, 19, 1024, 1024), (low, low), torch.float32, forward=True)
        assert numbers["shared_bytes"] <= 96 * 1024, (low, numbers)
        assert numbers["band"] * numbers["chunk"] * (1024 // low) <= 256, (low, numbers)
        assert numbers["most_parts"] == 1 or numbers["most_segment_items"] <= 256, (low, numbers)
        tiles[low] = (numbers["band"], numbers["chunk"])
        parts[low] = numbers["most_parts"]
    assert tiles == {256: (8, 8), 128: (4, 8), 64: (2, 4), 32: (1, 2)}, tiles
    assert parts == {256: 1, 128: 1, 64: 2, 32: 5}, parts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ce_forward_plan_has_room_for_every_tile(extension, dtype):
    """The forward's bands over sides 8..300 from 1/4, 1/8, a factor 1 and a downscale: each
    band's staged rows fit the plan's buffers, the tiles write each pixel once (written ==
    H * W), within 48 KiB; a downscale reads more low-res rows a band, so its bands shrink."""
    checked = 0
    for side in range(8, 301):
        for high, low in [((side, side), (-(-side // 4),) * 2), ((side, 2 * side + 1), (-(-side // 8), side // 4 + 1)),
                          ((side, side), (side, side)), ((side // 4 + 1, side), (side, side))]:
            band, staged_rows, shared_bytes, most_staged, written = extension.upsample_ce_forward_plan(
                [2, 19, *high], list(low), dtype)
            assert most_staged <= staged_rows and written == high[0] * high[1], (high, low, band, staged_rows)
            assert 1 <= band <= 32 and shared_bytes <= 48 * 1024, (high, low, band, shared_bytes)
            checked += 1
    assert checked == 293 * 4
    # 4x downscale in float64: 32 rows read 130 low-res rows, 133 KB: a smaller band
    assert extension.upsample_ce_forward_plan([1, 1, 32, 32], [128, 128], torch.float64)[0] < 32


def test_ce_backward_budget_fails_on_cpu_as_at_launch(extension):
    # a 3 x 3 tile at 1/32 in float64: a 96 x 96 window, more than the 96 KiB a block may take
    assert ce_plan(extension, (1, 2, 256, 256), (8, 8), torch.float64, (3, 3)) is None
    with pytest.raises(RuntimeError, match=r"shared_budget must be in \(0, 98304\], got 98305"):
        extension.upsample_ce_backward_plan([1, 2, 256, 256], [8, 8], torch.float64, 0, 0, 96 * 1024 + 1)
    logits = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    labels = torch.zeros(1, 256, 256, dtype=torch.long)
    loss, lse, _, _ = extension.upsample_ce_forward(logits, labels, 255)
    with pytest.raises(RuntimeError, match=r"bytes of shared memory, more than a block may take here \(98304\)"):
        extension.upsample_ce_backward(torch.ones_like(loss), logits, labels, lse, 255, 3, 3)


# ---------------------------------------------------------------------------------------
# GPU: the same bits on both devices

@pytest.mark.gpu
@pytest.mark.parametrize("fn", ["exp", "log", "sigmoid", "exp2", "exp2_nonpositive"])
def test_cuda_math_equals_cpu_bitwise(extension, fn):
    # a stride through every float32 bit pattern (NaNs compared as NaNs), and float64 values
    bits = torch.arange(0, 2 ** 32, 4093, dtype=torch.int64)
    x = (bits - 2 ** 31).to(torch.int32).view(torch.float32)
    x = torch.cat([x, float32_sweep(-90.0, 90.0, count=100_001)])
    cpu = extension.same_bits_math(x, fn)
    cuda = extension.same_bits_math(x.cuda(), fn).cpu()
    assert torch.equal(cpu.isnan(), cuda.isnan())
    assert torch.equal(cpu.nan_to_num(0.0).view(torch.int32), cuda.nan_to_num(0.0).view(torch.int32))
    x64 = torch.randn(100_000, dtype=torch.float64) * 300
    x64 = x64.abs() if fn == "log" else x64
    assert torch.equal(extension.same_bits_math(x64, fn), extension.same_bits_math(x64.cuda(), fn).cpu())


@pytest.mark.gpu
def test_cuda_divider_is_exact(extension):
    for divisor, n in divider_cases(seed=1):
        assert torch.equal(extension.same_bits_divide(n.cuda(), divisor).cpu(), n // divisor), divisor


ODD_SIZES = [((257, 257), (65, 65)), ((257, 513), (33, 65)), ((97, 131), (13, 17)), ((9, 11), (3, 4)),
             ((33, 35), (9, 9)), ((5, 3), (9, 11))]


@pytest.mark.gpu
@pytest.mark.parametrize("high, low", ODD_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_bga_equals_cpu_loop_bitwise(extension, high, low, dtype, channels_last):
    generator = torch.Generator().manual_seed(high[0] + low[1])
    channels = 20 if channels_last else 3
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inputs = [torch.randn(2, channels, *high, generator=generator)]
    inputs += [torch.randn(2, channels, *low, generator=generator) for _ in range(3)]
    inputs = [t.to(dtype).contiguous(memory_format=fmt) for t in inputs]
    grad_out = torch.randn(2, channels, *high, generator=generator).to(dtype)
    on_gpu = [t.cuda() for t in inputs]
    poison_cuda_cache(inputs[0].numel() * 8)
    assert torch.equal(extension.bga_forward(*on_gpu).cpu(), extension.bga_forward(*inputs))
    for tile in ((0, 0), (1, 1), (2, 3)):
        if plan(extension, (2, channels) + high, low, channels_last, dtype, tile) is None:
            continue
        poison_cuda_cache(inputs[0].numel() * 8)
        cuda_grads = extension.bga_backward(grad_out.cuda(), *on_gpu, *tile)
        for cuda_grad, cpu_grad in zip(cuda_grads, extension.bga_backward(grad_out, *inputs, *tile)):
            assert torch.equal(cuda_grad.cpu(), cpu_grad), tile


@pytest.mark.gpu
@pytest.mark.parametrize("high, low", ODD_SIZES + [((1024, 1024), (128, 128)), ((1024, 1024), (32, 32))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_loss_equals_cpu_loop_bitwise(extension, high, low, dtype):
    # 1/32: the automatic tile (1 x 2, 70 KiB; the forward with gradient's 76) is within the
    # GPU's budget as within the CPU loops' (an sm_80+ GPU's: the same 96 KiB), so both run the
    # same tiles
    generator = torch.Generator().manual_seed(high[1] + low[0])
    logits = (torch.randn(2, 19, *low, generator=generator) * 3).to(dtype)
    labels = torch.randint(0, 19, (2, *high), generator=generator)
    labels[torch.rand(2, *high, generator=generator) < 0.2] = 255
    loss, lse, mean, denominator = extension.upsample_ce_forward(logits, labels, 255)
    poison_cuda_cache(labels.numel() * 8)
    cuda_loss, cuda_lse, cuda_mean, cuda_denominator = extension.upsample_ce_forward(logits.cuda(), labels.cuda(), 255)
    assert torch.equal(cuda_loss.cpu(), loss) and torch.equal(cuda_lse.cpu(), lse)
    assert torch.equal(cuda_mean.cpu(), mean) and torch.equal(cuda_denominator.cpu(), denominator)
    grad_loss = torch.randn(labels.shape, generator=generator)
    grad_loss[torch.rand(labels.shape, generator=generator) < 0.5] = 0
    for tile in ((0, 0), (1, 1), (2, 3)):
        grad = extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255, *tile)
        poison_cuda_cache(logits.numel() * 8)
        cuda_grad = extension.upsample_ce_backward(grad_loss.cuda(), logits.cuda(), labels.cuda(), cuda_lse, 255, *tile)
        assert torch.equal(cuda_grad.cpu(), grad), tile
        # the CE mean's step; OHEM's (the hard pixels' gradient) with the automatic tile
        for threshold in (None, 2.5) if tile == (0, 0) else (None,):
            fused = extension.upsample_ce_forward_grad(logits, labels, 255, *tile, threshold)
            poison_cuda_cache(logits.numel() * 8)
            cuda_fused = extension.upsample_ce_forward_grad(logits.cuda(), labels.cuda(), 255, *tile, threshold)
            for name, cuda_value, value in zip(("loss", "lse", "mean", "denominator", "grad_sum"), cuda_fused, fused):
                assert torch.equal(cuda_value.cpu(), value), (tile, threshold, name)
            if threshold is not None:
                hard_sum = fused[4]
    # OHEM's top-k branch (the gather), its hard branch (hard_sum weighted), the weighted sum
    # alone (no grad_loss), the CE mean's backward (the weight over the denominator, 1.5 / 7
    # rounding); the incoming gradient's factor rounds (1/3)
    cases = ((grad_loss, 0.0, 1.0 / 3.0, None), (grad_loss, 0.375, 1.0 / 3.0, None), (None, 0.375, 1.0 / 3.0, None),
             (None, 1.5, None, 7.0))
    for weighted_loss, weight, scale, divisor in cases:
        scalars = [None if value is None else torch.tensor(value) for value in (weight, scale, divisor)]
        grad = extension.upsample_ce_backward(weighted_loss, logits, labels, lse, 255, 0, 0, hard_sum, *scalars)
        poison_cuda_cache(logits.numel() * 8)
        cuda_grad = extension.upsample_ce_backward(None if weighted_loss is None else weighted_loss.cuda(),
                                                   logits.cuda(), labels.cuda(), cuda_lse, 255, 0, 0, hard_sum.cuda(),
                                                   *[None if value is None else value.cuda() for value in scalars])
        assert torch.equal(cuda_grad.cpu(), grad), (weighted_loss is None, weight, divisor)


def loss_op_outputs(extension, logits, labels, grad_loss, tile, threshold):
    """{name: tensor} of every loss op on these inputs (on their device), the backward and
    the forward with gradient at this tile; {} where the tile is over the budget."""
    loss, lse, mean, denominator = extension.upsample_ce_forward(logits, labels, 255)
    outputs = {"loss": loss, "lse": lse, "mean": mean, "denominator": denominator}
    try:
        outputs["grad"] = extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255, *tile)
        if logits.shape[1] <= 20:
            fused = extension.upsample_ce_forward_grad(logits, labels, 255, *tile, threshold)
            outputs.update(zip(("fused loss", "fused lse", "fused mean", "fused denominator", "grad_sum"), fused))
            # the weighted sum (OHEM's hard branch), a factor that rounds; the CE mean's backward,
            # the incoming gradient over the denominator
            scales = [torch.tensor(value, device=logits.device) for value in (0.375, 1.0 / 3.0)]
            outputs["weighted"] = extension.upsample_ce_backward(None, logits, labels, lse, 255, 0, 0, fused[4],
                                                                 *scales)
            grad_mean = torch.tensor(1.5, device=logits.device)
            outputs["mean's gradient"] = extension.upsample_ce_backward(None, logits, labels, lse, 255, 0, 0, fused[4],
                                                                        grad_mean, None, fused[3])
    except RuntimeError as error:
        assert "bytes of shared memory" in str(error)
        return {}
    return outputs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_random_shapes_equal_cpu_loops_bitwise(extension, dtype):
    """The seeded sweeps' shapes and tiles (conftest: random_loss_shapes, random_bga_shapes) in
    float32 and bfloat16: every op's every output on the GPU is the CPU loops' bit for bit."""
    for index, (n, c, low, high, tile, seed) in enumerate(random_loss_shapes(40, seed=2026)):
        generator = torch.Generator().manual_seed(seed)
        logits = (torch.randn(n, c, *low, generator=generator) * 3).to(dtype)
        labels = torch.randint(0, c, (n, *high), generator=generator)
        labels[torch.rand(n, *high, generator=generator) < 0.2] = 255
        grad_loss = torch.randn(n, *high, generator=generator)
        grad_loss[:, ::3] = 0.0
        threshold = (None, 1.0, 2.5)[index % 3]
        want = loss_op_outputs(extension, logits, labels, grad_loss, tile, threshold)
        poison_cuda_cache(logits.numel() * 8 + labels.numel() * 8)
        got = loss_op_outputs(extension, logits.cuda(), labels.cuda(), grad_loss.cuda(), tile, threshold)
        assert got.keys() == want.keys(), index
        what = f"loss case {index} ({n}x{c}x{low} -> {high}, tile {tile})"
        for name, value in want.items():
            assert torch.equal(got[name].cpu(), value), f"{what}: {name}"
    for index, (shape, low_hw, channels_last, tile, seed) in enumerate(random_bga_shapes(40, seed=2026)):
        generator = torch.Generator().manual_seed(seed)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        inputs = [torch.randn(shape, generator=generator)] + [torch.randn(shape[:2] + low_hw, generator=generator)
                                                              for _ in range(3)]
        inputs = [t.to(dtype).contiguous(memory_format=fmt) for t in inputs]
        grad_out = torch.randn(shape, generator=generator).to(dtype)
        what = f"BGA case {index} ({shape} from {low_hw}, channels_last {channels_last}, {tile})"
        poison_cuda_cache(inputs[0].numel() * 8)
        on_gpu = [t.cuda() for t in inputs]
        assert torch.equal(extension.bga_forward(*on_gpu).cpu(), extension.bga_forward(*inputs)), what
        if plan(extension, shape, low_hw, channels_last, dtype, tile) is None:
            continue
        poison_cuda_cache(inputs[0].numel() * 8)
        cuda_grads = extension.bga_backward(grad_out.cuda(), *on_gpu, *tile)
        for name, cuda_grad, cpu_grad in zip(("detail_keep", "sem_up", "detail_down", "sem_keep"), cuda_grads,
                                             extension.bga_backward(grad_out, *inputs, *tile)):
            assert torch.equal(cuda_grad.cpu(), cpu_grad), f"{what}: grad of {name}"
