"""The loss (kernels/loss.py, kernels/csrc/ohem_ce*) and the build machinery.

CPU: the reference against plain compositions (CoinCheung's OHEM, F.cross_entropy) and
gradcheck; the fused path (per-pixel loss, OHEM weights), also down the kernels' path with the
C++ CPU loops, against the reference; the C++ CPU loops (the CUDA kernels' per-item functions,
run serially) against the reference; opcheck of the C++ ops and torch.compile(fullgraph=True).
GPU (marked gpu): the CUDA kernels against the float64 reference on many shapes and dtypes,
poisoned outputs, determinism, no host sync.
Tests that need the compiled extension skip when it cannot be built, unless
BISENET_REQUIRE_KERNELS=1, where they fail.
"""
import itertools
import math
import os
import re
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
from conftest import dispatched_ops, poison_cuda_cache, random_loss_shapes
from kernels import build
from kernels import loss as loss_module
from kernels.loss import ohem_cross_entropy as loss_fused
from kernels.loss import ohem_cross_entropy_reference as loss_ref

EPS32 = 2.0 ** -24  # float32 unit roundoff


def coincheung_ohem(logits, labels, thresh, min_kept, ignore_index=255):
    """OHEM as CoinCheung/BiSeNet writes it (boolean indexing, topk), on upsampled logits."""
    up = F.interpolate(logits.double(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(up, labels.long(), ignore_index=ignore_index, reduction="none").flatten()
    valid = labels.flatten() != ignore_index
    n_valid = int(valid.sum())
    k = min(n_valid // 16 if min_kept is None else min_kept, n_valid)
    loss = loss[valid]
    hard = loss[loss > -math.log(thresh)]
    if hard.numel() < k:
        hard = loss.topk(k).values
    return hard.mean() if hard.numel() else loss.sum() * 0


def random_case(n=2, c=5, low=(3, 4), high=(11, 13), ignore_frac=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, *low, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, c, (n, *high), generator=g)
    labels[torch.rand(n, *high, generator=g) < ignore_frac] = 255
    return logits, labels


@pytest.mark.parametrize("thresh,min_kept", [(None, None), (0.7, None), (0.7, 40), (0.3, 1000), (0.99, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_matches_plain_composition(thresh, min_kept, seed):
    logits, labels = random_case(seed=seed)
    ours = loss_ref(logits, labels, thresh=thresh, min_kept=min_kept)
    if thresh is None:
        up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        expected = F.cross_entropy(up, labels, ignore_index=255)
    else:
        expected = coincheung_ohem(logits, labels, thresh, min_kept)
    # float64 throughout, different summation orders: ~1e-15 relative
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_uint8_labels_and_low_precision_logits():
    logits, labels = random_case()
    expected = loss_ref(logits.float(), labels, thresh=0.7)
    torch.testing.assert_close(loss_ref(logits.float(), labels.to(torch.uint8), thresh=0.7), expected)
    # bf16 logits are upcast exactly, then the same float32 arithmetic
    bf16 = logits.to(torch.bfloat16)
    torch.testing.assert_close(loss_ref(bf16, labels, thresh=0.7), loss_ref(bf16.float(), labels, thresh=0.7))


def test_gradcheck_float64():
    logits, labels = random_case(n=1, c=3, low=(2, 3), high=(5, 7), seed=3)
    for thresh, min_kept in ((None, None), (0.7, 5), (0.9, 30)):
        leaf = logits.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: loss_ref(x, labels, thresh=thresh, min_kept=min_kept), (leaf,))


def test_ties_at_the_kth_value_share_the_weight():
    # four pixels, identical logits -> identical losses log(2); k = 2 of them
    logits = torch.zeros(1, 2, 1, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    loss = loss_ref(logits, labels, thresh=0.9, min_kept=2)  # -log(0.9) = 0.105 < log 2: all hard
    assert loss.item() == pytest.approx(math.log(2))
    loss = loss_ref(logits, labels, thresh=0.1, min_kept=2)  # none hard: the top 2 of 4 equal
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    grad = logits.grad[0, 0, 0]
    assert torch.allclose(grad, grad[0].expand(4))  # symmetric: every tied pixel the same share


def test_all_ignored_is_zero_with_zero_gradient():
    logits = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    labels = torch.full((1, 4, 4), 255)
    for thresh in (None, 0.7):
        loss = loss_ref(logits, labels, thresh=thresh)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.all(grad == 0)


def test_one_valid_pixel():
    logits, labels = random_case(n=1, c=4, seed=5)
    labels.fill_(255)
    labels[0, 3, 7] = 2
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    expected = -up[0, :, 3, 7].log_softmax(0)[2]
    for thresh in (None, 0.7, 0.01):
        torch.testing.assert_close(loss_ref(logits, labels, thresh=thresh, min_kept=5), expected)


def test_bad_labels_are_named():
    logits, labels = random_case()
    labels[0, 0, 0] = 7
    with pytest.raises(ValueError, match="value 7 is outside"):
        loss_ref(logits, labels)
    with pytest.raises(ValueError, match="int64 or uint8"):
        loss_ref(logits, labels.clamp(max=4).int())


@pytest.mark.parametrize("loss_fn", [loss_ref, loss_fused])
@pytest.mark.parametrize("settings, named", [({"thresh": 0.0}, "thresh 0.0 must be a probability in (0, 1]"),
                                             ({"thresh": 1.5}, "thresh 1.5 must be"),
                                             ({"min_kept": -3}, "min_kept -3 must be at least 0")])
def test_selection_settings_out_of_range_are_named(loss_fn, settings, named):
    """A threshold that is no probability (0 was a math domain error, 1.5 kept every valid
    pixel) and a negative min_kept (taken as valid // 16) are refused by both paths."""
    logits, labels = random_case()
    with pytest.raises(ValueError, match=re.escape(named)):
        loss_fn(logits, labels.clamp(max=4), **settings)


@pytest.mark.parametrize("loss_fn", [loss_ref, loss_fused])
def test_class_weights_are_checked(loss_fn):
    """class_weights must be one floating weight a class (torch's rule; 18 weights for 19
    classes dropped the last class, 20 passed unnoticed); with validate, finite, at least 0 and
    not all 0 (all negative made the mean's divisor its floor, a loss of -1e16)."""
    logits, labels = random_case()  # 5 classes
    labels = labels.clamp(max=4)
    for weights in (torch.ones(4), torch.ones(6), torch.ones(1, 5), torch.ones(5, dtype=torch.int64), [1.0] * 5):
        for thresh in (None, 0.7):
            with pytest.raises(ValueError, match=re.escape("class_weights must be a floating tensor of shape (5,)")):
                loss_fn(logits, labels, thresh=thresh, class_weights=weights)
    for weights in (-torch.ones(5), torch.zeros(5), torch.tensor([1.0, math.nan, 1, 1, 1])):
        with pytest.raises(ValueError, match="class_weights must be finite, at least 0 and not all 0"):
            loss_fn(logits, labels, thresh=None, class_weights=weights)
        loss_fn(logits, labels, thresh=None, class_weights=weights, validate=False)  # trusted: no sync, no check


def test_upscales_beyond_the_tiles_run_the_reference(cpu_loops, monkeypatch):
    """2 x 2 to 128 x 128 (64x): no tile of the backward's gather fits a block's shared memory
    (nor, in float64, of the forward with gradient); those steps take the reference, warned
    once a size, and the loss's gradient is the reference's, where it raised after the forward."""
    monkeypatch.setattr(loss_module, "_FITS", {})  # nothing asked yet
    logits, labels = random_case(n=1, c=3, low=(2, 2), high=(128, 128), seed=5)
    cases = [(torch.float32, 0.7, ["backward"]), (torch.float32, None, []),  # the CE mean's backward gathers nothing
             (torch.float64, None, ["forward with gradient", "backward"]), (torch.float64, 0.7, [])]  # warned already
    for dtype, thresh, warned in cases:
        exact = logits.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(loss_ref(exact, labels, thresh=thresh), exact)
        leaf = logits.to(dtype).requires_grad_(True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (got,) = torch.autograd.grad(loss_fused(leaf, labels, thresh=thresh), leaf)
        said = [str(w.message) for w in caught]
        assert [m.split("the loss's ")[-1].split(" for these sizes")[0] for m in said] == warned, said
        assert all(re.fullmatch(r"upsample_ce_\w+: a tile of 1x1 low-res pixels \(2x2 to 128x128\) needs \d+ bytes of "
                                r"shared memory, more than a block may take here \(98304\): the loss's .* for these "
                                r"sizes runs the PyTorch reference", m) for m in said), said
        torch.testing.assert_close(got.double(), want, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-9)


# --- the fused path on the CPU: the references, and the kernels' path (cpu_loops) ------

CASES = [(2, 5, (3, 4), (11, 13)), (1, 19, (16, 16), (128, 128)), (2, 3, (7, 9), (7, 9)),
         (1, 4, (9, 11), (4, 3)), (1, 3, (1, 1), (5, 5))]  # 2.75-8x up, 1x, down, one pixel
OHEM = [(None, None), (0.7, None), (0.7, 40), (0.3, 10 ** 6), (0.99, 3)]


@pytest.mark.parametrize("n,c,low,high", CASES)
def test_fused_path_matches_reference_float64(n, c, low, high, fused_path):
    logits, labels = random_case(n=n, c=c, low=low, high=high, seed=c)
    for thresh, min_kept in OHEM:
        leaves = [logits.clone().requires_grad_(True) for _ in range(2)]
        want = loss_ref(leaves[0], labels, thresh=thresh, min_kept=min_kept)
        got = loss_fused(leaves[1], labels, thresh=thresh, min_kept=min_kept)
        # the same float64 arithmetic up to summation order: ~1e-16 relative
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        (want_grad,), (got_grad,) = (torch.autograd.grad(v, x) for v, x in ((want, leaves[0]), (got, leaves[1])))
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-13)


def test_fused_path_float32_and_uint8_labels(fused_path):
    logits, labels = random_case(n=2, c=19, low=(8, 8), high=(64, 64), seed=7)
    for thresh, min_kept in OHEM:
        want = loss_ref(logits, labels, thresh=thresh, min_kept=min_kept)
        got = loss_fused(logits.float(), labels.to(torch.uint8), thresh=thresh, min_kept=min_kept)
        # float32 per-pixel losses of size ~|z| + log C ~ 10: ~1e-6 absolute each
        assert abs(got.item() - want.item()) < 64 * EPS32 * 10


def test_fused_gradcheck_float64(fused_path):
    logits, labels = random_case(n=1, c=3, low=(2, 3), high=(5, 7), seed=3)
    for thresh, min_kept in ((None, None), (0.7, 5), (0.9, 30)):
        leaf = logits.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: loss_fused(x, labels, thresh=thresh, min_kept=min_kept), (leaf,))


def test_fused_gradient_takes_the_incoming_one(fused_path):
    """The loss's gradient for an incoming gradient other than 1 (a weighted head, a negative
    factor): on the kernels' path the backward op multiplies by it itself (grad_scale) in
    OHEM's hard branch, its top-k branch and CE's mean, against the reference's float64
    gradient of the same objective."""
    logits, labels = random_case(n=2, c=5, low=(5, 6), high=(19, 23), seed=8)
    for thresh, min_kept in ((None, None), (0.7, 5), (0.9, 10 ** 6)):  # CE, hard branch, top-k
        for factor in (2.5, -0.75):
            leaf, exact = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
            (got,) = torch.autograd.grad(factor * loss_fused(leaf, labels, thresh=thresh, min_kept=min_kept), leaf)
            (want,) = torch.autograd.grad(factor * loss_ref(exact, labels, thresh=thresh, min_kept=min_kept), exact)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15, msg=lambda m: f"{thresh} {factor}: {m}")


def selection_case(size, dtype, seed=0, device="cpu"):
    """Per-pixel losses (1, 1, size) with a long run of ties, zeros and ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(size, generator=g, dtype=torch.float64).to(dtype) * 5
    loss[size // 50: size // 12] = loss[7]   # a long run of one value, as late passes see
    loss[size // 12: size // 12 + 10] = 0.0  # zeros are valid losses too
    labels = torch.randint(0, 19, (size,), generator=g)
    ignored = torch.rand(size, generator=g) < 0.2
    labels[ignored] = 255
    loss[ignored] = 0.0
    return loss.view(1, 1, size).to(device), labels.view(1, 1, size).to(device)


def assert_same_selection(got, want):
    """The same pixels kept, with the same weights up to the rounding of share / k and of the
    sums that normalise them (each a few dozen roundings at most: 1e-6 in float32, 1e-13 in
    float64, so a float64 weight rounded through float32 is caught)."""
    assert torch.equal(got > 0, want > 0)
    rtol = 1e-6 if got.dtype == torch.float32 else 1e-13
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ohem_weights_op_equals_reference(kernel_device, extension, dtype):
    """The C++ loop (CPU) and the kernels (GPU) against the sort-based reference, for every k
    from 1 to all valid pixels, ties at the k-th value, both branches."""
    loss, labels = selection_case(5000, dtype, device=kernel_device)
    num_valid = int((labels != 255).sum())
    for threshold in (10.0, 4.0, 0.5):  # no hard pixel, some, most
        for k in (1, 2, 17, 250, num_valid // 2, num_valid - 1, num_valid, 10 ** 9):
            got, value, _ = extension.ohem_weights(loss, labels, 255, threshold, k)
            want = loss_module.ohem_weights_reference(loss.cpu(), labels.cpu(), 255, threshold, k)
            assert got.dtype == value.dtype == dtype and got.shape == loss.shape and value.shape == ()
            assert_same_selection(got.cpu(), want)
            # the OHEM loss, summed in the fixed order: nonnegative terms, a few roundings
            rtol = 1e-5 if dtype == torch.float32 else 1e-13
            torch.testing.assert_close(value.cpu(), (loss.cpu() * want).sum(), rtol=rtol, atol=0)
    default_k, *_ = extension.ohem_weights(loss, labels.to(torch.uint8), 255, 4.0, -1)  # valid // 16
    assert_same_selection(default_k.cpu(), loss_module.ohem_weights_reference(loss.cpu(), labels.cpu(), 255, 4.0, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_weighted_ohem_weights_op_equals_reference(kernel_device, extension, dtype):
    """Class weights in the selection op (counts per class, their weighted total): the C++
    loop (CPU) and the kernels (GPU) against the reference, both branches, ties at the k-th
    value, a class with weight 0, labels outside the weights' classes."""
    loss, labels = selection_case(5000, dtype, device=kernel_device)
    class_weights = torch.linspace(0.0, 3.0, 19, dtype=dtype)  # class 0 weighs nothing
    num_valid = int((labels != 255).sum())
    for threshold in (10.0, 4.0, 0.5):
        for k in (1, 17, num_valid // 2, num_valid, -1):
            got, value, _ = extension.ohem_weights(loss, labels, 255, threshold, k, class_weights.to(kernel_device))
            want = loss_module.ohem_weights_reference(loss.cpu(), labels.cpu(), 255, threshold, k, class_weights)
            assert_same_selection(got.cpu(), want)
            rtol = 1e-5 if dtype == torch.float32 else 1e-13
            torch.testing.assert_close(value.cpu(), (loss.cpu() * want).sum(), rtol=rtol, atol=0)
            assert got.sum().item() == pytest.approx(1.0, rel=1e-5)
    # labels >= 5 weigh 0
    few, *_ = extension.ohem_weights(loss, labels, 255, 0.5, 17, class_weights[:5].to(kernel_device))
    assert_same_selection(few.cpu(), loss_module.ohem_weights_reference(loss.cpu(), labels.cpu(), 255, 0.5, 17,
                                                                        class_weights[:5]))
    assert torch.all(few.cpu()[labels.cpu() >= 5] == 0)
    with pytest.raises(RuntimeError, match="class_weights must be"):
        extension.ohem_weights(loss, labels, 255, 0.5, 17, class_weights.to(torch.float16).to(kernel_device))


@pytest.mark.parametrize("size", [1, 31, 255, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ohem_weights_op_at_small_sizes(kernel_device, extension, size, dtype):
    """Fewer pixels than a block's threads, or one more (on a GPU one block, warps with no
    pixel, a partial warp), k = 0 (min_kept 0), 1 and every valid pixel, both branches, int64
    and uint8 labels, without and with the most class weights (4096: 32 KiB of bins a block):
    against the reference, and on a GPU the CPU loop's bits."""
    g = torch.Generator().manual_seed(size)
    loss = torch.rand(size, generator=g, dtype=torch.float64).to(dtype) * 5
    loss[::3] = loss[0]  # ties
    labels = torch.randint(0, 19, (size,), generator=g)
    labels[torch.rand(size, generator=g) < 0.2] = 255
    loss[labels == 255] = 0.0
    loss, labels = loss.view(1, 1, size), labels.view(1, 1, size)
    num_valid = int((labels != 255).sum())
    for class_weights in (None, torch.linspace(0.5, 2.0, 4096, dtype=dtype)):
        on_device = None if class_weights is None else class_weights.to(kernel_device)
        for label_dtype in (torch.int64, torch.uint8):
            cases = labels.to(label_dtype)
            for threshold, k in itertools.product((4.0, 10.0), (0, 1, num_valid)):
                got = extension.ohem_weights(loss.to(kernel_device), cases.to(kernel_device), 255, threshold, k,
                                             on_device)
                want = loss_module.ohem_weights_reference(loss, labels, 255, threshold, k, class_weights)
                assert_same_selection(got[0].cpu(), want)
                if kernel_device.type == "cuda":
                    cpu = extension.ohem_weights(loss, cases, 255, threshold, k, class_weights)
                    for name, got_value, want_value in zip(("weights", "value", "hard_weight"), got, cpu):
                        assert torch.equal(got_value.cpu(), want_value), (name, threshold, k)


def test_backward_reads_an_expanded_gradient_as_one_value(kernel_device, extension):
    """The mean's backward hands the op one value expanded over (N, H, W) (strides 0): it is
    read as that one value, not copied out H * W times, and gives the same bits as the
    materialised gradient; one pixel's own value (a slice of a larger tensor) is honoured."""
    logits, labels = random_case(n=2, c=5, low=(5, 6), high=(19, 23), seed=8)
    logits, labels = logits.float().to(kernel_device), labels.to(kernel_device)
    loss, lse, _, _ = extension.upsample_ce_forward(logits, labels, 255)
    expanded = torch.tensor(0.37, device=kernel_device).expand(labels.shape)
    got = extension.upsample_ce_backward(expanded, logits, labels, lse, 255)
    want = extension.upsample_ce_backward(expanded.contiguous(), logits, labels, lse, 255)
    assert torch.equal(got, want) and got.abs().sum() > 0
    # zero strides in some dimensions only (one row broadcast over H): per pixel, copied
    row = torch.randn(1, 1, labels.shape[2], device=kernel_device).expand(labels.shape)
    assert torch.equal(extension.upsample_ce_backward(row, logits, labels, lse, 255),
                       extension.upsample_ce_backward(row.contiguous(), logits, labels, lse, 255))
    # the loss's own backward (the CE mean's gradient: the forward with gradient's grad_sum, scaled)
    leaf = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fused(leaf, labels, thresh=None), leaf)
    exact = logits.cpu().double().requires_grad_(True)
    (want_grad,) = torch.autograd.grad(loss_ref(exact, labels.cpu(), thresh=None), exact)
    torch.testing.assert_close(grad.cpu().double(), want_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("thresh", [None, 0.7, 1e-9])
def test_class_weighted_loss(kernel_device, thresh):
    """Fused (CPU op or CUDA kernels) against the float64 reference, value and gradient; the
    reference against torch's weighted cross-entropy (CE) and against a direct weighted mean
    of the top-k (OHEM); weights all equal give the unweighted loss."""
    logits, labels = random_case(n=2, c=5, low=(5, 6), high=(19, 23), seed=7)
    class_weights = torch.tensor([0.5, 2.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    exact = logits.clone().requires_grad_(True)
    want = loss_ref(exact, labels, thresh=thresh, min_kept=40, class_weights=class_weights)
    (want_grad,) = torch.autograd.grad(want, exact)
    fused = logits.float().to(kernel_device).requires_grad_(True)
    got = loss_fused(fused, labels.to(kernel_device), thresh=thresh, min_kept=40,
                     class_weights=class_weights.float().to(kernel_device))
    (got_grad,) = torch.autograd.grad(got, fused)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    torch.testing.assert_close(got_grad.cpu().double(), want_grad, rtol=1e-4, atol=1e-7)
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if thresh is None:
        torch.testing.assert_close(want, F.cross_entropy(up, labels, weight=class_weights, ignore_index=255))
    elif thresh == 1e-9:  # no pixel is hard (a loss above 20.7): the 40 largest losses, weighted (no ties in random data)
        per_pixel = F.cross_entropy(up, labels, ignore_index=255, reduction="none").flatten()
        top = per_pixel.topk(40).indices
        weights = class_weights[labels.flatten()[top]]
        torch.testing.assert_close(want, (per_pixel[top] * weights).sum() / weights.sum())
    equal = loss_fused(fused.detach(), labels.to(kernel_device), thresh=thresh, min_kept=40,
                       class_weights=torch.full((5,), 2.5, device=kernel_device))
    plain = loss_fused(fused.detach(), labels.to(kernel_device), thresh=thresh, min_kept=40)
    assert abs(equal.item() - plain.item()) <= 1e-6 * abs(plain.item())


@pytest.mark.parametrize("thresh", [0.7, None])
def test_loss_dispatches_few_ops(cpu_loops, thresh):
    """The OHEM loss, forward and backward, on the kernels' path is a handful of dispatched ops
    (the forward with the hard pixels' gradient, the weights op with the weighted sum, the
    backward op, which multiplies by the incoming gradient itself), not the dozens of small
    ops a selection made of tensor ops issues: each is a kernel launch on a GPU. The CE mean:
    the forward with gradient returns it and its gradient's sum; the backward is the backward
    op without grad_loss (the sum weighted by the incoming gradient over the denominator, in
    the logits' dtype). Beside the loss's own ops only the engine's seed (ones_like) and the
    gradient's detach into .grad."""
    logits, labels = random_case(n=2, c=19, low=(16, 16), high=(128, 128), seed=4)
    logits = logits.float().requires_grad_(True)
    loss_fused(logits, labels, thresh=thresh, validate=False).backward()  # warm-up
    logits.grad = None
    ops = dispatched_ops(lambda: loss_fused(logits, labels, thresh=thresh, validate=False).backward())
    # beside the loss's own ops, the engine's seed and the gradient's detach into .grad (no kernel)
    assert [op for op in ops if "bisenet" not in op] == ["aten.ones_like.default", "aten.detach.default"], ops
    if thresh is None:
        assert [op for op in ops if "bisenet" in op] == ["bisenet_cuda.upsample_ce_forward_grad.default",
                                                         "bisenet_cuda.upsample_ce_backward.default"], ops
    else:
        assert [op for op in ops if "bisenet" in op] == ["bisenet_cuda.upsample_ce_forward_grad.default",
                                                         "bisenet_cuda.ohem_weights.default",
                                                         "bisenet_cuda.upsample_ce_backward.default"], ops


@pytest.mark.parametrize("c", [5, 21])
def test_upsample_cross_entropy_gradient_of_loss_mean_or_both(fused_path, c):
    """upsample_cross_entropy's gradient, whichever outputs it flows from, against the float64
    reference's: the CE mean alone (on the kernels' path with C <= 20, the forward with
    gradient's grad_sum weighted, no gather), the per-pixel loss alone (the gather),
    both (their sum); with 21 classes the forward and the backward kernel. Without a gradient
    to compute (no_grad, or logits that need none) the kernels' path runs the forward alone."""
    logits, labels = random_case(n=2, c=c, low=(5, 6), high=(19, 23), seed=c)
    weights = torch.rand(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(c))
    objectives = {"mean": lambda loss, mean: 1.5 * mean, "loss": lambda loss, mean: (loss * weights).sum(),
                  "both": lambda loss, mean: 1.5 * mean + (loss * weights).sum()}
    for name, objective in objectives.items():
        leaf, exact = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        loss, _, mean, _ = loss_module.upsample_cross_entropy(leaf, labels, 255)
        (got,) = torch.autograd.grad(objective(loss, mean), leaf)
        want_loss, _ = loss_module.upsample_cross_entropy_reference(exact, labels, 255)
        (want,) = torch.autograd.grad(objective(want_loss, loss_module.ce_mean_reference(want_loss, labels, 255)[0]),
                                      exact)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13, msg=lambda m: f"{name}: {m}")
    if fused_path == "kernels":
        def ops(inputs, grad_mode=True):
            with torch.set_grad_enabled(grad_mode):
                return [op for op in dispatched_ops(lambda: loss_module.upsample_cross_entropy(inputs, labels, 255))
                        if "bisenet" in op]
        fused = ["bisenet_cuda.upsample_ce_forward_grad.default"] if c <= 20 else \
            ["bisenet_cuda.upsample_ce_forward.default"]
        assert ops(logits.clone().requires_grad_(True)) == fused
        assert ops(logits.clone().requires_grad_(True), False) == ["bisenet_cuda.upsample_ce_forward.default"]
        assert ops(logits) == ["bisenet_cuda.upsample_ce_forward.default"]


def test_fused_ties_all_ignored_and_one_valid_pixel(fused_path):
    logits = torch.zeros(1, 2, 1, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    loss = loss_fused(logits, labels, thresh=0.1, min_kept=2)  # none hard: the top 2 of 4 equal
    assert loss.item() == pytest.approx(math.log(2))
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.allclose(grad[0, 0, 0], grad[0, 0, 0, :1].expand(4))
    for thresh in (None, 0.7):
        leaf = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
        loss = loss_fused(leaf, torch.full((1, 4, 4), 255), thresh=thresh)
        (grad,) = torch.autograd.grad(loss, leaf)
        assert loss.item() == 0.0 and torch.all(grad == 0)
    logits, labels = random_case(n=1, c=4, seed=5)
    labels.fill_(255)
    labels[0, 3, 7] = 2
    for thresh in (None, 0.7, 0.01):
        torch.testing.assert_close(loss_fused(logits, labels, thresh=thresh, min_kept=5),
                                   loss_ref(logits, labels, thresh=thresh, min_kept=5))


def test_fused_bad_label_raises_or_poisons(fused_path):
    logits, labels = random_case()
    labels[1, 2, 3] = 9
    with pytest.raises(ValueError, match="value 9 is outside"):
        loss_fused(logits, labels)
    for thresh in (None, 0.7, 0.01):  # unvalidated: never an out-of-bounds read, a NaN loss
        assert torch.isnan(loss_fused(logits, labels, thresh=thresh, validate=False))


def test_opcheck(kernel_device, extension):
    """The C++ ops (their autograd is loss.py's Functions, checked against the references
    elsewhere in this file)."""
    logits, labels = random_case(n=2, c=4, low=(3, 5), high=(9, 11), seed=2)
    logits, labels = logits.float().to(kernel_device), labels.to(kernel_device)
    torch.library.opcheck(extension.upsample_ce_forward.default, (logits, labels, 255))
    torch.library.opcheck(extension.upsample_ce_forward.default, (logits, labels, 255, False))
    loss, lse, _, _ = extension.upsample_ce_forward(logits, labels, 255)
    torch.library.opcheck(extension.upsample_ce_backward.default, (torch.randn_like(loss), logits, labels, lse, 255))
    torch.library.opcheck(extension.upsample_ce_forward_grad.default, (logits, labels, 255))
    torch.library.opcheck(extension.upsample_ce_forward_grad.default, (logits, labels, 255, 0, 0, 1.5))
    grad_sum, grad_scale = torch.randn_like(logits), torch.tensor(1.5, device=kernel_device)
    for weight in (0.0, 0.5):  # the gather, or grad_sum weighted
        sum_weight = torch.tensor(weight, device=kernel_device)
        torch.library.opcheck(extension.upsample_ce_backward.default,
                              (torch.randn_like(loss), logits, labels, lse, 255, 0, 0, grad_sum, sum_weight))
        torch.library.opcheck(extension.upsample_ce_backward.default,
                              (torch.randn_like(loss), logits, labels, lse, 255, 0, 0, grad_sum, sum_weight, grad_scale))
        torch.library.opcheck(extension.upsample_ce_backward.default,
                              (None, logits, labels, lse, 255, 0, 0, grad_sum, sum_weight))
    torch.library.opcheck(extension.ohem_weights.default, (loss, labels, 255, 0.5, 20))
    torch.library.opcheck(extension.ohem_weights.default, (loss, labels, 255, 0.5, 20, torch.rand(4, device=kernel_device)))


# --- one body, CPU and GPU (the GPU run marked gpu, with the CUDA kernels) -------------

def separated_rank(values, near):
    """The first rank r >= near (1-based) whose loss is clearly above the next one's, so that
    float32 and float64 losses rank the pixels around it alike."""
    rank = near
    while values[rank - 1] - values[rank] < 1e-4:  # float32 losses are within ~1e-5 of float64
        rank += 1
    return rank


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ohem_top_k_branch(kernel_device, dtype):
    """0 < hard < k < valid: the k largest, not the hard pixels, are kept."""
    logits, labels = random_case(n=2, c=19, low=(16, 24), high=(128, 192), seed=11)
    logits = logits.to(dtype)
    exact = logits.double()
    loss, valid = loss_module.pixel_losses(exact, labels)
    values = loss[valid].sort(descending=True).values
    num_valid = int(valid.sum())
    k = separated_rank(values, num_valid // 16)
    hard = separated_rank(values, k // 2)
    thresh = math.exp(-float(values[hard - 1] + values[hard]) / 2)
    assert 0 < hard < k < num_valid and int((values > -math.log(thresh)).sum()) == hard
    leaves = [exact.clone().requires_grad_(True), logits.to(kernel_device).requires_grad_(True)]
    want = loss_ref(leaves[0], labels, thresh=thresh, min_kept=k)
    got = loss_fused(leaves[1], labels.to(kernel_device), thresh=thresh, min_kept=k, validate=False)
    assert torch.isclose(want, values[:k].mean())  # the top-k branch
    # a mean of float32 per-pixel losses, each within 4 C ulp of |z| + log C
    assert abs(got.item() - want.item()) < 4 * 19 * EPS32 * (exact.abs().max().item() + math.log(19))
    (want_grad,), (got_grad,) = (torch.autograd.grad(v, x) for v, x in ((want, leaves[0]), (got, leaves[1])))
    # the gradient stored in the logits' dtype: one rounding each (2^-9 relative on average in bf16)
    error = ((got_grad.double().cpu() - want_grad).norm() / want_grad.norm()).item()
    assert error < (2.0 ** -8 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ohem_ties_at_the_kth_value(kernel_device, dtype):
    """Exact ties at the k-th largest loss share the remaining weight: zero logits at scale 1
    give every such pixel the loss log C, bit for bit."""
    g = torch.Generator().manual_seed(13)
    c, high = 19, (48, 64)
    labels = torch.randint(0, c, (2, *high), generator=g)
    labels[torch.rand(2, *high, generator=g) < 0.1] = 255
    logits = torch.zeros(2, c, *high)
    hard_pixels = torch.nonzero(labels != 255)[torch.randperm(int((labels != 255).sum()), generator=g)[:50]]
    for n, y, x in hard_pixels.tolist():
        logits[n, labels[n, y, x], y, x] = -4.0  # loss log(18 + e^-4) + 4 ~ 6.89
    k = 50 + 100  # the 50 hard pixels, then 100 of the thousands tied at log 19
    thresh = math.exp(-(math.log(c) + 1))
    hard_loss = math.log(18 + math.exp(-4)) + 4
    expected = (50 * hard_loss + 100 * math.log(c)) / k
    leaves = [logits.double().requires_grad_(True), logits.to(dtype).to(kernel_device).requires_grad_(True)]
    want = loss_ref(leaves[0], labels, thresh=thresh, min_kept=k)
    got = loss_fused(leaves[1], labels.to(kernel_device), thresh=thresh, min_kept=k, validate=False)
    assert want.item() == pytest.approx(expected, rel=1e-12)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    (want_grad,), (got_grad,) = (torch.autograd.grad(v, x) for v, x in ((want, leaves[0]), (got, leaves[1])))
    error = ((got_grad.double().cpu() - want_grad).norm() / want_grad.norm()).item()
    assert error < (2.0 ** -8 if dtype == torch.bfloat16 else 1e-5)
    # every tied pixel gets the same share: its gradient is share * (1/C - onehot(label))
    tied = (logits.abs().sum(1) == 0) & (labels != 255)
    per_pixel = got_grad.float().cpu().permute(0, 2, 3, 1)[tied].abs()  # (tied pixels, C)
    for extreme in (per_pixel.amax(1), per_pixel.amin(1)):
        assert torch.equal(extreme, extreme[:1].expand_as(extreme))


@pytest.mark.parametrize("thresh", [None, 0.7])
def test_empty_batch_and_empty_planes(kernel_device, thresh):
    logits = torch.randn(0, 19, 8, 8, device=kernel_device, requires_grad=True)
    labels = torch.zeros(0, 64, 64, dtype=torch.uint8, device=kernel_device)
    loss = loss_fused(logits, labels, thresh=thresh)
    loss.backward()
    assert loss.item() == 0 and logits.grad.shape == (0, 19, 8, 8)
    with pytest.raises(ValueError, match="empty plane"):
        loss_fused(torch.randn(1, 19, 0, 8, device=kernel_device), torch.zeros(1, 64, 64, dtype=torch.long,
                                                                               device=kernel_device))
    with pytest.raises(ValueError, match="labels .* empty plane"):
        loss_fused(torch.randn(1, 19, 8, 8, device=kernel_device), torch.zeros(1, 0, 64, dtype=torch.long,
                                                                               device=kernel_device))


def test_sliced_inputs(kernel_device, extension):
    """Non-contiguous logits and labels (slices of larger tensors) give the contiguous result."""
    logits_full, labels_full = random_case(n=2, c=7, low=(20, 30), high=(80, 130), seed=17)
    logits = logits_full.float().to(kernel_device)[:, :, ::2, 1::2]    # (2, 7, 10, 15)
    labels = labels_full.to(kernel_device)[:, :, 5:125]                 # (2, 80, 120)
    assert not logits.is_contiguous() and not labels.is_contiguous()
    for thresh in (None, 0.7):
        leaves = [logits.clone().requires_grad_(True), logits.contiguous().requires_grad_(True)]
        sliced = loss_fused(leaves[0], labels, thresh=thresh)
        dense = loss_fused(leaves[1], labels.contiguous(), thresh=thresh)
        sliced.backward()
        dense.backward()
        assert torch.equal(sliced, dense) and torch.equal(leaves[0].grad, leaves[1].grad)
    # the extension's ops themselves (on the CPU: the C++ loops)
    loss, lse, _, _ = extension.upsample_ce_forward(logits, labels, 255)
    dense_loss, dense_lse, _, _ = extension.upsample_ce_forward(logits.contiguous(), labels.contiguous(), 255)
    assert torch.equal(loss, dense_loss) and torch.equal(lse, dense_lse)


def test_random_shapes_and_tiles_match_float64_reference(kernel_device, extension):
    """A seeded sweep of 40 shapes and tiles (conftest: random_loss_shapes) through the three
    pixel ops and the loss's autograd path (CE, OHEM's hard branch, its top-k branch; an
    incoming gradient other than 1), in float64 against the reference: tile edges on every
    kind of pixel, tiny and odd sides, downscales, beyond the listed cases. An explicit tile
    over the shared-memory budget must say so; the automatic one always fits."""
    for index, (n, c, low, high, (band, chunk), seed) in enumerate(random_loss_shapes(40, seed=2026)):
        what = f"case {index}: {n}x{c}x{low} -> {high}, tile {band}x{chunk}"
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(n, c, *low, generator=g, dtype=torch.float64) * 3
        labels = torch.randint(0, c, (n, *high), generator=g)
        labels[torch.rand(n, *high, generator=g) < 0.2] = 255
        grad_loss = torch.randn(n, *high, generator=g, dtype=torch.float64)
        grad_loss[:, ::3] = 0.0  # skipped pixels
        want_loss, want_lse = loss_module.upsample_cross_entropy_reference(logits, labels, 255)
        want_grad = loss_module.upsample_cross_entropy_backward_reference(grad_loss, logits, labels, want_lse, 255)
        threshold = (None, 1.0, 2.5)[index % 3]
        counted = (labels != 255) & (want_loss > (threshold if threshold is not None else -math.inf))
        want_sum = loss_module.upsample_cross_entropy_backward_reference(counted.double(), logits, labels, want_lse,
                                                                         255)
        logits, grad_loss = logits.to(kernel_device), grad_loss.to(kernel_device)
        labels = labels.to(kernel_device, torch.uint8 if index % 2 else torch.int64)
        tol = 1e-13 * support_size(low, high)
        if kernel_device.type == "cuda":
            poison_cuda_cache(logits.numel() * 8 + labels.numel() * 8)
        loss, lse, _, _ = extension.upsample_ce_forward(logits, labels, 255)
        torch.testing.assert_close(loss.cpu(), want_loss, rtol=0, atol=1e-12, msg=lambda m: f"{what}: {m}")
        torch.testing.assert_close(lse.cpu(), want_lse, rtol=0, atol=1e-12, msg=lambda m: f"{what}: {m}")
        def in_explicit_tile(op, *args):  # None where the explicit tile is over the budget, which it must say
            try:
                return op(*args)
            except RuntimeError as error:
                assert (band, chunk) != (0, 0) and "bytes of shared memory" in str(error), f"{what}: {error}"
                return None
        grad = in_explicit_tile(extension.upsample_ce_backward, grad_loss, logits, labels, lse, 255, band, chunk)
        fused = None if c > 20 else in_explicit_tile(extension.upsample_ce_forward_grad, logits, labels, 255, band,
                                                     chunk, threshold)
        if grad is not None:
            torch.testing.assert_close(grad.cpu(), want_grad, rtol=0, atol=tol, msg=lambda m: f"{what}: {m}")
        if fused is not None:
            assert torch.equal(fused[0], loss) and torch.equal(fused[1], lse), what
            torch.testing.assert_close(fused[4].cpu(), want_sum, rtol=0, atol=tol,
                                       msg=lambda m: f"{what}, threshold {threshold}: {m}")
        thresh, min_kept = ((None, None), (0.7, None), (0.9, 10 ** 6))[index % 3]
        leaf, exact = logits.clone().requires_grad_(True), logits.cpu().requires_grad_(True)
        got = loss_fused(leaf, labels, thresh=thresh, min_kept=min_kept)
        want = loss_ref(exact, labels.cpu(), thresh=thresh, min_kept=min_kept)
        (got_grad,) = torch.autograd.grad(-0.75 * got, leaf)
        (want_grad_logits,) = torch.autograd.grad(-0.75 * want, exact)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-14, msg=lambda m: f"{what}, {thresh}: {m}")
        torch.testing.assert_close(got_grad.cpu(), want_grad_logits, rtol=1e-10, atol=1e-15,
                                   msg=lambda m: f"{what}, {thresh}: {m}")


@pytest.mark.gpu
def test_cuda_loss_on_a_side_stream(cuda_kernel):
    logits, labels = cuda_case(2, 19, (32, 48), (256, 384), seed=12)
    logits = logits.float()
    expected_leaf = logits.clone().requires_grad_(True)
    expected = loss_fused(expected_leaf, labels, thresh=0.7, validate=False)
    expected.backward()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        leaf = (logits * 1.0).requires_grad_(True)  # made on the side stream, used at once
        loss = loss_fused(leaf, labels, thresh=0.7, validate=False)
        loss.backward()
    side.synchronize()
    assert torch.equal(loss, expected) and torch.equal(leaf.grad, expected_leaf.grad)


@pytest.mark.gpu
def test_cuda_five_head_loss_compiled_under_bf16_autocast(cuda_kernel):
    """The training loss: OHEM on the five heads (1/8, 1/4, 1/8, 1/16, 1/32 of a 256 crop),
    bf16 channels_last logits, under autocast, compiled as one graph."""
    g = torch.Generator().manual_seed(21)
    labels = torch.randint(0, 19, (2, 256, 256), generator=g)
    labels[torch.rand(2, 256, 256, generator=g) < 0.1] = 255
    labels = labels.to(torch.uint8).cuda()
    heads = [(torch.randn(2, 19, 256 // s, 256 // s, generator=g) * 3).cuda().to(torch.bfloat16)
             .contiguous(memory_format=torch.channels_last) for s in (8, 4, 8, 16, 32)]

    def total(*logits):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return sum(loss_fused(head, labels, thresh=0.7, validate=False) for head in logits)

    eager_leaves = [h.clone().requires_grad_(True) for h in heads]
    compiled_leaves = [h.clone().requires_grad_(True) for h in heads]
    eager = total(*eager_leaves)
    compiled = torch.compile(total, fullgraph=True)(*compiled_leaves)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)  # the sums' order may differ
    eager.backward()
    compiled.backward()
    for got, want in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(got.grad.float(), want.grad.float(), rtol=2 ** -7, atol=1e-8)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("thresh", [None, 0.7])
def test_compile_fullgraph_cpu(fused_path, thresh, dynamic):
    """One graph (no break: nothing in the loss asks the host for a value), on the CPU path
    (the references) and on the kernels' (the autograd.Functions and the C++ ops' fakes),
    with static and with symbolic sizes."""
    logits, labels = random_case(n=2, c=5, seed=4)
    leaves = [logits.float().requires_grad_(True) for _ in range(2)]
    fn = lambda x: loss_fused(x, labels, thresh=thresh, min_kept=30, validate=False)  # noqa: E731
    eager = fn(leaves[0])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)(leaves[1])
    torch.testing.assert_close(compiled, eager)
    eager.backward()
    compiled.backward()
    torch.testing.assert_close(leaves[1].grad, leaves[0].grad)


# --- the C++ CPU loops: the CUDA kernels' arithmetic ----------------------------------

def support_size(low, high):
    """High-res pixels that read one low-res logit, at most: (2 * H / h + 2) per axis."""
    return math.prod(2 * math.ceil(big / small) + 2 for small, big in zip(low, high))


def coordinate_tolerance(eps, low, logits):
    """The taps' source coordinate src = scale (dst + 0.5) - 0.5 (< max(h, w)) is rounded in
    the accumulation type, as ATen's upsampling rounds it, and so is scale: a weight is off by
    up to 2 max(h, w) eps, z by that times the spread of two logits (2 max|logit|) on each
    axis. At 389 x 523 from 97 x 131 in float32 that is ~2e-4, ATen's own float32
    interpolate's error against its float64 one."""
    return 2 * 2 * max(low) * eps * 2 * logits.abs().max().item()


def backward_tolerance(eps, scale, low, high, grad_loss):
    """A logit's gradient sums up to S terms, each at most |g| with an error ~2 * scale * eps
    (exp(z - lse), z and lse of size ~scale); float sums grow that by ~sqrt(S)."""
    size = support_size(low, high)
    return (2 * scale + math.sqrt(size)) * eps * size * grad_loss.abs().max().item()


@pytest.mark.parametrize("n,c,low,high", CASES)
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.uint8])
def test_cpu_loop_float64_matches_reference(extension, n, c, low, high, label_dtype):
    logits, labels = random_case(n=n, c=c, low=low, high=high, seed=n + c)
    labels = labels.to(label_dtype)
    loss, lse, mean, denominator = extension.upsample_ce_forward(logits, labels, 255)
    want_loss, want_lse = loss_module.upsample_cross_entropy_reference(logits, labels, 255)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)
    want_mean, want_denominator = loss_module.ce_mean_reference(want_loss, labels, 255)
    assert denominator.shape == mean.shape == () and denominator == want_denominator
    torch.testing.assert_close(mean, want_mean, rtol=1e-14, atol=0)
    grad_loss = torch.randn(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grad_loss[labels == 0] = 0.0  # not kept by OHEM: skipped
    got = extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255)
    want = loss_module.upsample_cross_entropy_backward_reference(grad_loss, logits, labels, want_lse, 255)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13 * support_size(low, high))


# odd sides against their 1/4 and 1/8 (rounded up, as the model's stride-2 layers do), as
# squares and 1:2, in the backward's automatic tiling and with tile borders everywhere
TILED_SIDES = [8, 9, 31, 57, 131]
BACKWARD_TILES = [(0, 0), (1, 1), (2, 3)]


def tiled_cases():
    for side in TILED_SIDES:
        for ratio in (4, 8):
            yield (side, side), (-(-side // ratio),) * 2
        yield (side, 2 * side + 1), (-(-side // 8), -(-(2 * side + 1) // 8))


@pytest.mark.parametrize("c", [1, 2, 19, 33])
def test_cpu_loop_backward_tiles_cover_every_pixel(extension, c):
    """Each logit's gradient gathers every high-res pixel that reads it exactly once, whatever
    the tile: a pixel missed or counted twice by the tiling is an error of order |g|, the
    float64 tolerance is 1e-13 of it. The forward's bands (32 rows, 32 columns; 33 classes:
    two class chunks) likewise."""
    for index, (high, low) in enumerate(tiled_cases()):
        logits, labels = random_case(n=2, c=c, low=low, high=high, seed=index)
        loss, lse, _, _ = extension.upsample_ce_forward(logits, labels, 255)  # the forward's bands too
        want_loss, want_lse = loss_module.upsample_cross_entropy_reference(logits, labels, 255)
        torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-12)
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-12)
        grad_loss = torch.randn(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(index))
        grad_loss[:, ::3] = 0.0  # skipped pixels too
        want = loss_module.upsample_cross_entropy_backward_reference(grad_loss, logits, labels, lse, 255)
        for band, chunk in BACKWARD_TILES:
            got = extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255, band, chunk)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-13 * support_size(low, high),
                                       msg=lambda m: f"{high} from {low}, tile {band}x{chunk}: {m}")


def test_cpu_loop_backward_large_upscale_opts_in(extension):
    """1/32 in float64 takes 32 bytes a pixel: the automatic tile of 32 x 64 pixels (1 x 2
    low-res, 145 KiB) does not fit the 96 KiB budget, 1 x 1 (a 48 x 48 window, 94 KiB) does,
    above the 48 KiB that needs an opt-in; the result is the reference's."""
    plan = extension.upsample_ce_backward_plan([1, 3, 256, 256], [8, 8], torch.float64)
    assert plan[:2] == [1, 1] and 54 * 1024 < plan[4] <= 96 * 1024, plan
    logits, labels = random_case(n=1, c=3, low=(8, 8), high=(256, 256), seed=3)
    loss, lse, _, _ = extension.upsample_ce_forward(logits, labels, 255)
    grad_loss = torch.randn(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255)
    want = loss_module.upsample_cross_entropy_backward_reference(grad_loss, logits, labels, lse, 255)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13 * support_size((8, 8), (256, 256)))


def forward_grad_case(extension, logits, labels, tiles=((0, 0),)):
    """upsample_ce_forward_grad against the forward op and the float64 reference, per tile:
    loss and lse are the forward's bits (the same staged values, the same exps in the same
    order), the denominator its value, the mean its value up to the order of the sum, grad_sum
    the gradient of the counted pixels' summed losses (each pixel gathered once: an error of
    order 1 where one is missed or counted twice, against a float64 tolerance of 1e-13)."""
    loss, lse, mean, denominator = extension.upsample_ce_forward(logits, labels, 255)
    counted = (labels != 255).double()
    want = loss_module.upsample_cross_entropy_backward_reference(counted, logits, labels, lse, 255)
    low, high = logits.shape[-2:], labels.shape[-2:]
    for band, chunk in tiles:
        got_loss, got_lse, got_mean, got_denominator, grad_sum = extension.upsample_ce_forward_grad(
            logits, labels, 255, band, chunk)
        assert torch.equal(got_loss, loss) and torch.equal(got_lse, lse), (high, low, band, chunk)
        assert got_denominator == denominator
        torch.testing.assert_close(got_mean, mean, rtol=1e-14, atol=0)
        assert grad_sum.shape == logits.shape and grad_sum.dtype == torch.float64
        torch.testing.assert_close(grad_sum, want, rtol=0, atol=1e-13 * support_size(low, high),
                                   msg=lambda m: f"{high} from {low}, tile {band}x{chunk}: {m}")


@pytest.mark.parametrize("c", [1, 2, 19, 20])
def test_cpu_loop_forward_grad_tiles_cover_every_pixel(extension, c):
    """The forward with gradient (the CE mean's training step) over the backward's tiles with
    all classes in one pass (20 at most: one class chunk), automatic and with tile borders
    everywhere, at 1/4 and 1/8 of odd sides."""
    for index, (high, low) in enumerate(tiled_cases()):
        logits, labels = random_case(n=2, c=c, low=low, high=high, seed=index)
        forward_grad_case(extension, logits, labels, BACKWARD_TILES)


def test_cpu_loop_forward_grad_large_upscale_and_other_shapes(extension):
    """1/16 and 1/32, where the automatic plan splits segments into parts (fewer than the
    backward's: 20 classes of segment sums), and the loss tests' other shapes (a factor 1, a
    downscale, one logit); 1 x 1 tiles too (2 x 3 at 1/32 is over the budget in float64)."""
    for n, c, low, high in [(1, 3, (8, 8), (256, 256)), (1, 5, (16, 16), (256, 256))] + CASES:
        logits, labels = random_case(n=n, c=c, low=low, high=high, seed=c + low[0])
        forward_grad_case(extension, logits, labels, ((0, 0), (1, 1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_loop_forward_grad_low_precision_matches_float64(extension, dtype):
    n, c, low, high = 2, 19, (8, 8), (64, 64)
    logits, labels = random_case(n=n, c=c, low=low, high=high, seed=12)
    logits = logits.to(dtype)
    exact = logits.double()
    _, want_lse = loss_module.upsample_cross_entropy_reference(exact, labels, 255)
    counted = (labels != 255).double()
    want = loss_module.upsample_cross_entropy_backward_reference(counted, exact, labels, want_lse, 255)
    got = extension.upsample_ce_forward_grad(logits, labels.to(torch.uint8), 255)[4]
    assert got.dtype == torch.float32  # the sum, scaled and rounded to the logits' dtype by loss.py
    scale = exact.abs().max().item() + math.log(c)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=backward_tolerance(EPS32, scale, low, high, counted))


def test_cpu_loop_forward_grad_edges(extension):
    """More than 20 classes: an error naming them (loss.py takes the two kernels there). A bad
    label: its loss NaN, and the gradient of the logits it reads. Every pixel ignored: mean 0
    over 1, no gradient. An empty batch: empty outputs."""
    logits, labels = random_case(n=1, c=21, seed=4)
    with pytest.raises(RuntimeError, match="21 classes, at most 20"):
        extension.upsample_ce_forward_grad(logits, labels, 255)
    logits, labels = random_case(n=1, c=3, low=(3, 4), high=(11, 13), seed=5)
    labels[0, 0, 0] = 200
    loss, lse, mean, _, grad_sum = extension.upsample_ce_forward_grad(logits, labels, 255)
    assert torch.isnan(loss[0, 0, 0]) and torch.isnan(lse[0, 0, 0]) and torch.isnan(mean)
    assert torch.isnan(grad_sum[0, :, 0, 0]).all() and torch.isfinite(grad_sum[0, :, -1, -1]).all()
    ignored = torch.full_like(labels, 255)
    loss, lse, mean, denominator, grad_sum = extension.upsample_ce_forward_grad(logits, ignored, 255)
    assert mean == 0 and denominator == 1 and not loss.any() and not lse.any() and not grad_sum.any()
    empty = extension.upsample_ce_forward_grad(logits[:0], labels[:0], 255)
    assert [t.shape for t in empty] == [(0, 11, 13), (0, 11, 13), (), (), (0, 3, 3, 4)]
    assert empty[2] == 0 and empty[3] == 1


def test_cpu_loop_forward_grad_over_the_hard_pixels(extension):
    """With a threshold (OHEM's -log(thresh)) grad_sum adds up only the hard pixels, loss >
    threshold as the selection compares them (a bad label's NaN loss is not hard); loss and lse
    are unchanged."""
    logits, labels = random_case(n=2, c=19, low=(9, 13), high=(67, 101), seed=13)
    labels[0, 3, 5] = 200  # a bad label: NaN loss, not hard, no NaN in the gradient
    loss, lse, _, _ = extension.upsample_ce_forward(logits, labels, 255)
    threshold = 2.5
    hard = ((labels != 255) & (loss > threshold)).double()
    assert 0 < hard.sum() < (labels != 255).sum()
    want = loss_module.upsample_cross_entropy_backward_reference(hard, logits, labels, lse, 255)
    for band, chunk in BACKWARD_TILES:
        got_loss, got_lse, _, _, hard_sum = extension.upsample_ce_forward_grad(logits, labels, 255, band, chunk,
                                                                               threshold)
        torch.testing.assert_close(got_loss, loss, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got_lse, lse, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(hard_sum, want, rtol=0, atol=1e-13 * support_size((9, 13), (67, 101)))


def test_cpu_loop_ohem_hard_weight_and_the_backward_it_scales(extension):
    """ohem_weights' third output: each hard pixel's weight, 1 / hard, where the hard branch
    was taken; 0 in the top-k branch and with class weights. The backward op given grad_sum
    and sum_weight: grad_sum times the weight in the logits' dtype where the weight is not 0
    (no gather), the gather's very bits where it is 0; both or neither. Without grad_loss
    (the CE mean's backward): grad_sum times the weight whatever it is; with sum_divisor (the
    CE mean's denominator) the weight over it, the bits of torch's division. grad_scale: a
    factor of the incoming gradient, the bits of grad_loss (and of the weight) multiplied by it."""
    logits, labels = random_case(n=2, c=5, low=(5, 6), high=(19, 23), seed=14)
    loss, lse, _, _ = extension.upsample_ce_forward(logits, labels, 255)
    threshold = 1.0
    hard = int(((labels != 255) & (loss > threshold)).sum())
    _, _, hard_weight = extension.ohem_weights(loss, labels, 255, threshold, 3)  # k = 3 <= hard: the hard branch
    assert hard >= 3 and hard_weight.item() == 1.0 / hard
    _, _, hard_weight = extension.ohem_weights(loss, labels, 255, threshold, 10 ** 6)  # k = valid > hard: top-k
    assert hard_weight.item() == 0
    _, _, hard_weight = extension.ohem_weights(loss, labels, 255, threshold, 3, torch.ones(5, dtype=torch.float64))
    assert hard_weight.item() == 0
    _, _, hard_weight = extension.ohem_weights(loss[:0], labels[:0], 255, threshold, 3)  # no pixel: k = 0
    assert hard_weight.item() == 1
    generator = torch.Generator().manual_seed(14)
    grad_loss = torch.randn(labels.shape, dtype=torch.float64, generator=generator)
    grad_sum = torch.randn(logits.shape, dtype=torch.float64, generator=generator)
    gathered = extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255)
    weight, zero = torch.tensor(0.25, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    factor = torch.tensor(1.0 / 3.0, dtype=torch.float64)  # a product with it rounds
    assert torch.equal(extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255, 0, 0, grad_sum, weight),
                       grad_sum * 0.25)
    assert torch.equal(extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255, 0, 0, grad_sum, zero),
                       gathered)
    assert torch.equal(extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255, 0, 0, grad_sum, weight,
                                                      factor), grad_sum * (weight * factor))
    assert torch.equal(extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255, 0, 0, grad_sum, zero,
                                                      factor),
                       extension.upsample_ce_backward(grad_loss * factor, logits, labels, lse, 255))
    assert torch.equal(extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255, 0, 0, None, None, factor),
                       extension.upsample_ce_backward(grad_loss * factor, logits, labels, lse, 255))
    for sum_weight in (weight, zero):
        assert torch.equal(extension.upsample_ce_backward(None, logits, labels, lse, 255, 0, 0, grad_sum, sum_weight),
                           grad_sum * sum_weight)
    # the CE mean's: the weight over a divisor (its denominator), the division torch's, rounding (1.5 / 7)
    grad_mean, divisor = torch.tensor(1.5, dtype=torch.float64), torch.tensor(7.0, dtype=torch.float64)
    assert torch.equal(extension.upsample_ce_backward(None, logits, labels, lse, 255, 0, 0, grad_sum, grad_mean, None,
                                                      divisor), grad_sum * (grad_mean / divisor))
    assert torch.equal(extension.upsample_ce_backward(None, logits.float(), labels, lse.float(), 255, 0, 0,
                                                      grad_sum.float(), grad_mean.float(), factor.float(),
                                                      divisor.float()),
                       grad_sum.float() * ((grad_mean.float() / divisor.float()) * factor.float()))
    assert torch.equal(extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255, 0, 0, grad_sum, zero, None,
                                                      divisor), gathered)  # sum_weight 0: the gather, as without
    assert torch.equal(extension.upsample_ce_backward(None, logits.float(), labels, lse.float(), 255, 0, 0,
                                                      grad_sum.float(), weight.float(), factor.float()),
                       (grad_sum.float() * (weight.float() * factor.float())))
    # 45 elements: a tail shorter than the 4-element vectors; grad_sum a view 1 element off
    # their alignment (copied to an aligned one)
    odd_logits, odd_labels = random_case(n=1, c=3, low=(3, 5), high=(7, 9), seed=16)
    _, odd_lse, _, _ = extension.upsample_ce_forward(odd_logits, odd_labels, 255)
    shifted = torch.randn(odd_logits.numel() + 1, dtype=torch.float64, generator=generator)[1:].view(odd_logits.shape)
    assert torch.equal(extension.upsample_ce_backward(None, odd_logits, odd_labels, odd_lse, 255, 0, 0, shifted,
                                                      weight), shifted * weight)
    half = extension.upsample_ce_backward(None, logits.bfloat16(), labels, lse.float(), 255, 0, 0, grad_sum.float(),
                                          weight.float())
    assert half.dtype == torch.bfloat16 and torch.equal(half, (grad_sum.float() * 0.25).bfloat16())
    with pytest.raises(RuntimeError, match="grad_sum and sum_weight come together"):
        extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255, 0, 0, grad_sum)
    with pytest.raises(RuntimeError, match="without grad_loss, grad_sum and sum_weight are the gradient"):
        extension.upsample_ce_backward(None, logits, labels, lse, 255)
    with pytest.raises(RuntimeError, match="grad_sum must be Double"):
        extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255, 0, 0, grad_sum[:1], weight)
    with pytest.raises(RuntimeError, match="sum_weight must be a 0-dim Double"):
        extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255, 0, 0, grad_sum, weight.view(1))
    with pytest.raises(RuntimeError, match="grad_scale must be a 0-dim Double"):
        extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255, 0, 0, None, None, factor.float())
    with pytest.raises(RuntimeError, match="sum_divisor divides sum_weight, which is missing"):
        extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255, 0, 0, None, None, None, divisor)
    with pytest.raises(RuntimeError, match="sum_divisor must be a 0-dim Double"):
        extension.upsample_ce_backward(None, logits, labels, lse, 255, 0, 0, grad_sum, weight, None, divisor.view(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_loop_low_precision_matches_float64(extension, dtype):
    n, c, low, high = 2, 19, (8, 8), (64, 64)
    logits, labels = random_case(n=n, c=c, low=low, high=high, seed=11)
    logits = logits.to(dtype)
    exact = logits.double()  # the same (rounded) values, float64 arithmetic
    loss, lse, _, _ = extension.upsample_ce_forward(logits, labels, 255)
    want_loss, want_lse = loss_module.upsample_cross_entropy_reference(exact, labels, 255)
    assert loss.dtype == lse.dtype == torch.float32
    # float32 arithmetic: interpolation ~4 ulp of |z|, the exp sum C ulp, log; |z| + log C < 16
    scale = exact.abs().max().item() + math.log(c)
    tol = 4 * c * EPS32 * scale
    torch.testing.assert_close(loss.double(), want_loss, rtol=0, atol=tol)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=tol)
    grad_loss = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2))
    got = extension.upsample_ce_backward(grad_loss, logits, labels, lse, 255)
    want = loss_module.upsample_cross_entropy_backward_reference(grad_loss.double(), exact, labels, want_lse, 255)
    assert got.dtype == dtype
    # each of up to S terms |g| * |p - onehot| <= |g| carries an error ~eps * 2 * scale (the
    # exp of z - lse, both ~scale) and the float32 sums grow it by ~sqrt(S); then the rounding
    # to dtype: an ulp of the result
    atol = backward_tolerance(EPS32, scale, low, high, grad_loss)
    rounding = {torch.float32: EPS32, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rounding, atol=atol)


def test_cpu_loop_float32_odd_size_within_coordinate_tolerance(extension):
    """Large odd sizes in float32: the taps' float32 coordinates cost more than the
    interpolation and the log-sum-exp (coordinate_tolerance); the GPU test's tolerance, here
    on the CPU loops (the kernels' bits)."""
    n, c, low, high = 1, 19, (97, 131), (389, 523)
    g = torch.Generator().manual_seed(c + low[0])
    logits = torch.randn(n, c, *low, generator=g, dtype=torch.float64) * 3.0
    labels = torch.randint(0, c, (n, *high), generator=g)
    exact = logits.float().double()
    loss, lse, _, _ = extension.upsample_ce_forward(logits.float(), labels, 255)
    want_loss, want_lse = loss_module.upsample_cross_entropy_reference(exact, labels, 255)
    interpolation = 4 * c * EPS32 * (exact.abs().max().item() + math.log(c))
    error = max((loss.double() - want_loss).abs().max().item(), (lse.double() - want_lse).abs().max().item())
    assert interpolation < error <= interpolation + coordinate_tolerance(EPS32, low, exact)


def test_cpu_loop_ce_mean_in_its_fixed_order(extension):
    """The CE mean (ohem_ce_math.h): over the pixels not ignored, in float32 by the forward's
    blocks (32 high-res rows by 32 columns here, chunks fastest), each of a block's 256 threads
    adding its pixel slots thread + 256 k in order, then the halving tree, then one block over
    the blocks: that order, emulated here, gives the C++ loop's bits (the kernels' too: the GPU
    test). 0 over max(count, 1) when every pixel is ignored; NaN with a bad label."""
    logits, labels = random_case(n=3, c=5, low=(20, 40), high=(150, 333), seed=21)
    band, chunk, threads = 32, 32, 256
    assert extension.upsample_ce_forward_plan([3, 5, 150, 333], [20, 40], torch.float32)[0] == band
    loss, _, mean, denominator = extension.upsample_ce_forward(logits.float(), labels, 255)
    counted = (labels != 255).numpy()
    values = loss.numpy()

    def tree(sums):  # float32 adds, halving
        sums = list(sums)
        half = threads // 2
        while half:
            for t in range(half):
                sums[t] = np.float32(sums[t] + sums[t + half])
            half //= 2
        return sums[0]

    block_sums = []
    for n in range(values.shape[0]):
        for y0 in range(0, values.shape[1], band):
            for x0 in range(0, values.shape[2], chunk):
                rows, cols = min(band, values.shape[1] - y0), min(chunk, values.shape[2] - x0)
                sums = []
                for t in range(threads):
                    total = np.float32(0)
                    for item in range(t, rows * cols, threads):
                        y, x = y0 + item // cols, x0 + item % cols
                        if counted[n, y, x]:
                            total = np.float32(total + values[n, y, x])
                    sums.append(total)
                block_sums.append(tree(sums))
    blocks = len(block_sums)
    final = [np.float32(0)] * threads
    for t in range(threads):
        for b in range(t, blocks, threads):
            final[t] = np.float32(final[t] + block_sums[b])
    count = int((labels != 255).sum())
    assert denominator.item() == count and mean.item() == np.float32(tree(final) / np.float32(count))
    ignored = torch.full_like(labels, 255)
    _, _, mean, denominator = extension.upsample_ce_forward(logits, ignored, 255)
    assert mean.item() == 0 and denominator.item() == 1
    _, _, mean, denominator = extension.upsample_ce_forward(logits[:0], labels[:0], 255)  # an empty batch
    assert mean.item() == 0 and denominator.item() == 1
    loss_only, _, mean, denominator = extension.upsample_ce_forward(logits, labels, 255, False)  # OHEM's call
    assert mean.shape == denominator.shape == (0,) and torch.equal(loss_only, extension.upsample_ce_forward(
        logits, labels, 255)[0])
    labels[0, 0, 0] = 7
    assert torch.isnan(extension.upsample_ce_forward(logits, labels, 255)[2])


def test_cpu_loop_bad_label_is_nan_not_a_wild_read(extension):
    logits, labels = random_case(n=1, c=3, seed=6)
    labels[0, 0, 0] = 200  # neither a class nor 255
    loss, lse, _, _ = extension.upsample_ce_forward(logits, labels, 255)
    assert torch.isnan(loss[0, 0, 0]) and torch.isnan(lse[0, 0, 0])
    assert torch.isfinite(loss.flatten()[1:]).all()


def test_cpu_loop_rejects_bad_inputs(extension):
    logits, labels = random_case()
    with pytest.raises(RuntimeError, match="labels must be int64 or uint8"):
        extension.upsample_ce_forward(logits, labels.int(), 255)
    with pytest.raises(RuntimeError, match="differ in N"):
        extension.upsample_ce_forward(logits, labels[:1], 255)
    loss, lse, _, _ = extension.upsample_ce_forward(logits, labels, 255)
    with pytest.raises(RuntimeError, match="lse must be Double"):
        extension.upsample_ce_backward(loss, logits, labels, lse.float(), 255)


@pytest.mark.parametrize("high, low", [((1, 2**30, 1), (1, 2, 1, 1)), ((1, 1, 1), (1, 1, 1, 2**30))])
def test_cpu_loop_rejects_sides_of_2_30(extension, high, low):
    # a band added to a side near 2^31 wrapped (a tile loop that never ended); expanded
    # scalars, nothing allocated
    labels = torch.zeros(1, 1, 1, dtype=torch.uint8).expand(*high)
    logits = torch.zeros(1, 1, 1, 1).expand(*low)
    pattern = r"sides of 2\^30 or more are not supported"
    for call in (lambda: extension.upsample_ce_forward(logits, labels, 255),
                 lambda: extension.upsample_ce_forward_grad(logits, labels, 255),
                 lambda: extension.upsample_ce_forward_plan([1, 2, *high[1:]], list(low[2:]), torch.float32),
                 lambda: extension.upsample_ce_backward_plan([1, 2, *high[1:]], list(low[2:]), torch.float32)):
        with pytest.raises(RuntimeError, match=pattern):
            call()


def test_forward_grad_plan_where_band_times_width_passes_2_32(extension):
    # the automatic chunk's bound, band x W, in 64 bits: in int it wrapped to 0, a division by
    # zero that killed the process; now the plan's own error (no tile fits such rows)
    with pytest.raises(RuntimeError, match=r"a tile of 1x1 low-res pixels \(64x1 to 16x67108864\) needs"):
        extension.upsample_ce_backward_plan([1, 19, 16, 2**26], [64, 1], torch.float32, forward=True)


# --- GPU: the CUDA kernels ------------------------------------------------------------

def cuda_case(n, c, low, high, seed, ignore_frac=0.2, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, *low, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, c, (n, *high), generator=g)
    labels[torch.rand(n, *high, generator=g) < ignore_frac] = 255
    return logits.cuda(), labels.cuda()


GPU_CASES = [
    (2, 19, (128, 128), (1024, 1024)),   # the main head at the seed's crop
    (2, 19, (32, 32), (1024, 1024)),     # the 1/32 head
    (3, 19, (97, 131), (389, 523)),      # odd sizes, non-integer factors
    (1, 37, (5, 7), (5, 7)),             # factor 1, C other than 19
    (2, 3, (40, 30), (11, 13)),          # downscale
    (1, 1, (1, 1), (3, 2)),              # one class, one logit
]


@pytest.mark.gpu
@pytest.mark.parametrize("n,c,low,high", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_pixel_op_matches_float64_reference(cuda_kernel, n, c, low, high, dtype, channels_last):
    logits, labels = cuda_case(n, c, low, high, seed=c + low[0])
    logits = logits.to(dtype)
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    exact = logits.double()
    want_loss, want_lse = loss_module.upsample_cross_entropy_reference(exact, labels, 255)
    grad_loss = torch.randn(labels.shape, device="cuda", dtype=torch.float64)
    grad_loss[torch.rand(labels.shape, device="cuda") < 0.5] = 0.0
    want_grad = loss_module.upsample_cross_entropy_backward_reference(grad_loss, exact, labels, want_lse, 255)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    eps = 2.0 ** -53 if dtype == torch.float64 else EPS32
    for label_dtype in (torch.int64, torch.uint8):
        poison_cuda_cache(labels.numel() * 8)
        loss, lse, _, _ = loss_module.upsample_cross_entropy(logits, labels.to(label_dtype), 255)
        assert loss.dtype == lse.dtype == acc
        tol = (4 * max(c, 2) * eps * (exact.abs().max().item() + math.log(max(c, 2))) +
               coordinate_tolerance(eps, low, exact))
        torch.testing.assert_close(loss.double(), want_loss, rtol=0, atol=tol)
        torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=tol)
        poison_cuda_cache(logits.numel() * 8)
        grad = loss_module.upsample_cross_entropy_backward(grad_loss.to(acc), logits, labels.to(label_dtype), lse, 255)
        assert grad.dtype == dtype and grad.shape == logits.shape
        scale = exact.abs().max().item() + math.log(max(c, 2))
        rounding = {torch.float32: EPS32, torch.float64: 2.0 ** -53, torch.bfloat16: 2.0 ** -8,
                    torch.float16: 2.0 ** -11}[dtype]
        torch.testing.assert_close(grad.double(), want_grad, rtol=rounding,
                                   atol=backward_tolerance(eps, scale, low, high, grad_loss))
        if c <= 20:  # the forward with gradient: the forward's loss and lse, the counted pixels' gradient
            poison_cuda_cache(logits.numel() * 8)
            fused = cuda_kernel.upsample_ce_forward_grad(logits, labels.to(label_dtype), 255)
            assert torch.equal(fused[0], loss) and torch.equal(fused[1], lse)
            counted = (labels != 255).double()
            want_sum = loss_module.upsample_cross_entropy_backward_reference(counted, exact, labels, want_lse, 255)
            torch.testing.assert_close(fused[4].double(), want_sum, rtol=0,
                                       atol=backward_tolerance(eps, scale, low, high, counted))


OHEM_CASES = ["random", "one_valid", "all_ignored", "min_kept_above_valid", "few_hard"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", OHEM_CASES)
@pytest.mark.parametrize("thresh,min_kept", OHEM)
def test_cuda_loss_matches_reference_float64(cuda_kernel, case, thresh, min_kept):
    """float64 kernels vs the float64 reference: the selection sees the same values."""
    logits, labels = cuda_case(2, 19, (32, 48), (256, 384), seed=OHEM_CASES.index(case),
                               scale=0.1 if case == "few_hard" else 3.0)
    if case == "one_valid":
        labels.fill_(255)
        labels[1, 100, 200] = 4
    elif case == "all_ignored":
        labels.fill_(255)
    elif case == "min_kept_above_valid":
        labels[:, :, 10:] = 255
        min_kept = 10 ** 7
    leaves = [logits.clone().requires_grad_(True) for _ in range(2)]
    want = loss_ref(leaves[0], labels, thresh=thresh, min_kept=min_kept)
    poison_cuda_cache(labels.numel() * 8)
    got = loss_fused(leaves[1], labels, thresh=thresh, min_kept=min_kept)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (want_grad,) = torch.autograd.grad(want, leaves[0])
    (got_grad,) = torch.autograd.grad(got, leaves[1])
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ce_loss_low_precision(cuda_kernel, dtype):
    logits, labels = cuda_case(4, 19, (128, 128), (1024, 1024), seed=3)
    logits = logits.to(dtype)
    leaves = [logits.double().requires_grad_(True), logits.clone().requires_grad_(True)]
    want = loss_ref(leaves[0], labels, thresh=None)
    got = loss_fused(leaves[1], labels, thresh=None, validate=False)
    # a mean of per-pixel float32 losses, each within 4 * C ulp of |z| + log C
    tol = 4 * 19 * EPS32 * (logits.double().abs().max().item() + math.log(19))
    assert abs(got.item() - want.item()) < tol
    (want_grad,) = torch.autograd.grad(want, leaves[0])
    (got_grad,) = torch.autograd.grad(got, leaves[1])
    scale = logits.double().abs().max().item() + math.log(19)
    grad_loss = torch.full((), 1.0 / int((labels != 255).sum()))  # the mean's per-pixel gradient
    rounding = EPS32 if dtype == torch.float32 else 2.0 ** -8
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=rounding,
                               atol=backward_tolerance(EPS32, scale, (128, 128), (1024, 1024), grad_loss))


@pytest.mark.gpu
def test_cuda_ohem_weights_at_the_seeds_size(cuda_kernel):
    """4 x 1024 x 1024 pixels with long runs of ties: the kernels' selection is the sort's."""
    loss, labels = selection_case(4 * 1024 * 1024, torch.float32, device="cuda")
    num_valid = int((labels != 255).sum())
    for k in (1, 7, num_valid // 16, num_valid // 2, num_valid):
        got, value, hard_weight = cuda_kernel.ohem_weights(loss, labels, 255, 4.0, k)
        assert_same_selection(got, loss_module.ohem_weights_reference(loss, labels, 255, 4.0, k))
        # the OHEM loss's fixed-order sum and the hard pixels' weight: the CPU loop's bits
        cpu_weights, cpu_value, cpu_hard_weight = cuda_kernel.ohem_weights(loss.cpu(), labels.cpu(), 255, 4.0, k)
        assert torch.equal(got.cpu(), cpu_weights) and torch.equal(value.cpu(), cpu_value)
        assert torch.equal(hard_weight.cpu(), cpu_hard_weight)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_selection_launch_equals_cpu_loop(cuda_kernel, dtype, weighted):
    """The selection's one cooperative launch (every block resident, grid.sync() between its
    steps) against the CPU loop, bit for bit: 4 x 1024 x 1024 pixels are the 1024 logical
    blocks of the weights pass's sum, more than the grid holds (the blocks loop over them);
    both branches (threshold 4.0 keeps the hard pixels for k = 7, not for valid // 2), float64's
    8 passes, and class weights (the tally and its barrier)."""
    loss, labels = selection_case(4 * 1024 * 1024, dtype, seed=3, device="cuda")
    class_weights = torch.linspace(0.5, 2.0, 19, dtype=dtype) if weighted else None
    num_valid = int((labels != 255).sum())
    for k in (7, num_valid // 2):
        got = cuda_kernel.ohem_weights(loss, labels, 255, 4.0, k,
                                       None if class_weights is None else class_weights.cuda())
        want = cuda_kernel.ohem_weights(loss.cpu(), labels.cpu(), 255, 4.0, k, class_weights)
        for name, got_value, want_value in zip(("weights", "value", "hard_weight"), got, want):
            assert torch.equal(got_value.cpu(), want_value), (name, k)


@pytest.mark.gpu
def test_cuda_backward_is_deterministic(cuda_kernel):
    logits, labels = cuda_case(4, 19, (128, 128), (1024, 1024), seed=5)
    logits = logits.float().requires_grad_(True)
    grads = [torch.autograd.grad(loss_fused(logits, labels, thresh=0.7, validate=False), logits)[0]
             for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


@pytest.mark.gpu
@pytest.mark.parametrize("thresh", [None, 0.7])
def test_cuda_step_has_no_host_sync(cuda_kernel, thresh):
    logits, labels = cuda_case(2, 19, (64, 64), (512, 512), seed=6)
    logits = logits.to(torch.bfloat16).requires_grad_(True)
    loss_fused(logits, labels, thresh=thresh, validate=False).backward()  # warm-up (lazy inits)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = loss_fused(logits, labels, thresh=thresh, validate=False)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


@pytest.mark.gpu
@pytest.mark.parametrize("thresh, most", [(None, 4), (0.7, 6), (1e-9, 6)])
def test_cuda_step_launches_few_kernels(cuda_kernel, thresh, most):
    """What the host issues a step, each launch its time to issue (the 1/4 step was bound by
    it): the CE step at most 4 kernels (the forward with gradient and its rim, which writes the
    mean; the engine's seed; the weighted sum), OHEM's at most 6 in either branch (1e-9: no
    pixel is hard; the forward with gradient and its rim, the selection, one cooperative launch
    for its zeroing, radix passes and weights, the seed, the gather, whose blocks write the
    hard branch's weighted sum, and its rim). torch.profiler's CUDA activities."""
    from kernels.bench import kernel_times
    logits, labels = cuda_case(2, 19, (64, 64), (512, 512), seed=6)
    logits = logits.to(torch.bfloat16).requires_grad_(True)

    def step():
        logits.grad = None
        loss_fused(logits, labels, thresh=thresh, validate=False).backward()

    launched = kernel_times(step, torch.device("cuda"), iters=3)
    assert 0 < sum(launches for _, launches, _ in launched) <= most, launched


@pytest.mark.gpu
@pytest.mark.parametrize("thresh", [None, 0.7, 1e-9])
def test_cuda_step_replays_in_a_cuda_graph(cuda_kernel, thresh):
    """The fused step, forward and backward, captured in a CUDA graph (what torch.compile's
    mode="reduce-overhead" and a whole-step capture do) and replayed: the bits of the step run
    eagerly. A graph holds no host sync; the selection is a cooperative launch, which a graph
    must take as one (1e-9: its top-k branch, every radix pass)."""
    logits, labels = cuda_case(2, 19, (64, 64), (512, 512), seed=8)
    logits = logits.float().requires_grad_(True)

    def step():
        logits.grad = None
        loss = loss_fused(logits, labels, thresh=thresh, validate=False)
        loss.backward()
        return loss

    want, want_grad = step().detach().clone(), logits.grad.clone()
    side = torch.cuda.Stream()  # the warm-up off the capturing stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(loss, want) and torch.equal(logits.grad, want_grad)


@pytest.mark.gpu
def test_cuda_bad_label_is_nan_not_a_crash(cuda_kernel):
    logits, labels = cuda_case(1, 19, (16, 16), (128, 128), seed=7)
    labels[0, 5, 5] = 77
    for thresh in (None, 0.7):
        assert torch.isnan(loss_fused(logits.float(), labels, thresh=thresh, validate=False)).item()
    torch.cuda.synchronize()  # no device-side fault
    with pytest.raises(ValueError, match="value 77"):
        loss_fused(logits.float(), labels)


@pytest.mark.gpu
@pytest.mark.parametrize("thresh", [None, 0.7])
def test_cuda_compile_fullgraph(cuda_kernel, thresh):
    logits, labels = cuda_case(2, 19, (64, 64), (512, 512), seed=8)
    leaves = [logits.to(torch.bfloat16).requires_grad_(True) for _ in range(2)]
    fn = lambda x: loss_fused(x, labels, thresh=thresh, validate=False)  # noqa: E731
    eager = fn(leaves[0])
    compiled = torch.compile(fn, fullgraph=True)(leaves[1])
    # the same kernels; inductor may sum the per-pixel losses in another order
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    eager.backward()
    compiled.backward()
    torch.testing.assert_close(leaves[1].grad.float(), leaves[0].grad.float(), rtol=2 ** -7, atol=1e-8)


@pytest.mark.gpu
def test_cuda_peak_memory_is_a_tenth_of_eager(cuda_kernel):
    """Forward + backward at the seed's main head: 4 x 19 x 1024 x 1024 never materialised."""
    logits, labels = cuda_case(4, 19, (128, 128), (1024, 1024), seed=9)
    logits, labels = logits.to(torch.bfloat16).requires_grad_(True), labels.to(torch.uint8)  # as in training
    peaks = []
    for fn in (loss_ref, loss_fused):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(logits, labels, thresh=0.7, validate=False).backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        logits.grad = None
    assert peaks[1] <= peaks[0] / 10, peaks


def test_select_logs_its_choice():
    messages = []
    loss_fn, bga_fn = kernels.select("auto", torch.device("cpu"), log=messages.append)
    assert loss_fn is kernels.ohem_cross_entropy_reference and "no CUDA device" in messages[0]
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        kernels.select("cuda", torch.device("cpu"), log=messages.append)


def test_check_cases_pass_and_catch_a_wrong_op(fused_path, monkeypatch):
    """kernels.check's cases (what select() runs before using the kernels) on the CPU, the ops
    down their reference paths and down their kernels' (the C++ loops): all within tolerance;
    a wrong BGA is caught by name; each result is reported as its case ends, a failing one too."""
    from kernels import bga, check
    assert all(not message for *_, message in check.run_cases(torch.device("cpu"), check.FULL))
    monkeypatch.setattr(bga, "bga_aggregate", lambda *inputs: bga.bga_aggregate_reference(*inputs) * 1.01)
    reported = []
    results = check.run_cases(torch.device("cpu"), report=reported.append)
    assert reported == results and len(results) == len(check.QUICK)
    failed = [(op, message) for op, _, _, message in results if message]
    assert failed and all(op == "bga" and "relative error 1.0" in message for op, message in failed)


def test_select_falls_back_per_op_when_a_kernel_disagrees(monkeypatch):
    from kernels import check
    monkeypatch.setattr(kernels, "load", lambda: True)
    for op_extension in kernels.EXTENSIONS.values():
        monkeypatch.setattr(op_extension, "use_cuda_kernel", None)
    monkeypatch.setattr(check, "run_cases", lambda device, cases: [
        ("loss", "CE case", 1e-7, ""), ("bga", "BGA case", 0.3, "relative error 3.00e-01 > 1e-04")])
    messages = []
    loss_fn, bga_fn = kernels.select("auto", torch.device("cuda"), log=messages.append)
    assert loss_fn is kernels.ohem_cross_entropy and bga_fn is kernels.bga_aggregate_reference
    assert messages == ["kernels: the fused bga kernel disagrees with its reference (BGA case: relative error "
                        "3.00e-01 > 1e-04); using the PyTorch reference",
                        "kernels: fused CUDA kernels (upsample+CE/OHEM loss), checked against the references"]
    with pytest.raises(RuntimeError, match="disagree with their references: BGA case: relative error"):
        kernels.select("cuda", torch.device("cuda"), log=messages.append)


def test_check_command_on_cpu(extension, capsys):
    from kernels import check
    assert check.main(["--quick", "--device", "cpu"]) == 0
    assert f"{len(check.QUICK)} passed, 0 failed" in capsys.readouterr().out


# --- build machinery --------------------------------------------------------------------

def test_stale_lock_of_a_dead_process_is_removed(tmp_path, capsys):
    lock = tmp_path / "build.lock"
    import socket
    lock.write_text(f"{socket.gethostname()} 999999999 {time.time()}\n")  # no such pid
    with build.build_lock(lock, poll=0.01):
        assert str(os.getpid()) in lock.read_text()
    assert not lock.exists()
    assert "removing stale build lock" in capsys.readouterr().err


def test_live_lock_makes_the_second_builder_wait(tmp_path):
    lock = tmp_path / "build.lock"
    order = []
    with build.build_lock(lock):
        waiter = threading.Thread(target=lambda: [order.append("waiter in") for _ in [build.build_lock(lock, poll=0.01).__enter__()]])
        waiter.start()
        time.sleep(0.3)
        order.append("holder out")
    waiter.join(timeout=10)
    assert order == ["holder out", "waiter in"]


def test_wrong_cuda_home_is_explained(monkeypatch, tmp_path):
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local")
    monkeypatch.setattr(build, "DEFAULT_TOOLKIT", str(tmp_path))  # no toolkit there either
    with pytest.raises(RuntimeError, match="is not a CUDA toolkit .* set CUDA_HOME"):
        build.check_cuda_home()


def test_wrong_cuda_home_falls_back_to_the_toolkit(monkeypatch, tmp_path, capsys):
    """torch's guess from a wrapper nvcc (e.g. /usr/local) is replaced by a real toolkit,
    loudly. A fake toolkit folder stands in for /usr/local/cuda."""
    from torch.utils import cpp_extension
    toolkit = tmp_path / "cuda"
    for name in ("bin/nvcc", "include/cuda_runtime.h", "lib64/libcudart.so.13"):
        (toolkit / name).parent.mkdir(parents=True, exist_ok=True)
        (toolkit / name).write_text("")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local")
    monkeypatch.setattr(build, "DEFAULT_TOOLKIT", str(toolkit))
    monkeypatch.setenv("CUDA_HOME", "/usr/local")
    assert build.check_cuda_home() == str(toolkit)
    assert cpp_extension.CUDA_HOME == str(toolkit) and os.environ["CUDA_HOME"] == str(toolkit)
    assert f"CUDA_HOME=/usr/local is not a CUDA toolkit (nvcc on PATH may be a wrapper); using {toolkit}" \
        in capsys.readouterr().err


def test_a_cached_library_is_loaded_not_built(extension, monkeypatch, capsys):
    """A library in its key's cache folder loads as it is: no compiler, no ninja (a cache
    folder built elsewhere for the same torch and GPU serves as it is)."""
    from torch.utils import cpp_extension
    sources = kernels.EXTENSIONS["bga"].source_paths()
    assert build.library_path("bisenet_bga", sources).is_file()  # the extension fixture built it

    def no_build(**kwargs):
        raise AssertionError(f"cpp_extension.load called for {kwargs['name']}")
    monkeypatch.setattr(cpp_extension, "load", no_build)
    build.build_and_load("bisenet_bga", sources, verbose=True)
    assert "was in the cache: loaded, not built" in capsys.readouterr().out


def test_a_cached_library_that_does_not_load_is_built_again(tmp_path, monkeypatch, capsys):
    from torch.utils import cpp_extension
    monkeypatch.setattr(build, "check_cuda_home", lambda: None)
    monkeypatch.setenv("BISENET_KERNELS_CACHE", str(tmp_path))
    sources = kernels.EXTENSIONS["bga"].source_paths()
    library = build.library_path("bisenet_bga", sources)
    library.parent.mkdir(parents=True)
    library.write_bytes(b"\x7fELF cut short")  # a link that was killed
    builds = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: builds.append(kwargs))
    build.build_and_load("bisenet_bga", sources)
    assert [(b["name"], b["build_directory"]) for b in builds] == [(library.stem, str(library.parent))]
    assert f"kernels: the cached {library} does not load (" in capsys.readouterr().err


def test_the_library_key_follows_flags_and_architectures(monkeypatch):
    sources = kernels.EXTENSIONS["loss"].source_paths()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert build.arch_list() == "9.0"  # torch's variable, where set, names the targets
    sm90 = build.library_path("bisenet_loss", sources)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    sm80 = build.library_path("bisenet_loss", sources)
    monkeypatch.setattr(build, "CUDA_CFLAGS", [f for f in build.CUDA_CFLAGS if f != "--fmad=false"])
    assert len({sm90, sm80, build.library_path("bisenet_loss", sources)}) == 3
    assert sm90.parent.name.startswith("bisenet_loss_") and sm90.name == sm90.parent.name + ".so"



@pytest.mark.parametrize("cores", [2, 8])
def test_libraries_build_side_by_side_where_the_cores_allow(monkeypatch, cores):
    """load_all: the libraries not yet loaded build at once where there are two cores for each
    (its .cpp and .cu), TORCH_CUDA_ARCH_LIST set throughout every build and restored after,
    and a failure is raised once every build has ended; on 2 cores one after the other (the
    first failure stops them). Stand-ins play the builds."""
    monkeypatch.setattr(build.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(build, "check_cuda_home", lambda: None)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(build, "arch_list", lambda: os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0"))
    extensions = {name: build.Extension(name, [], [f"no_op_{name}"]) for name in ("a", "b", "c", "d")}
    extensions["d"].is_loaded = True  # in the cache already: not built
    running, seen, lock = set(), [], threading.Lock()
    all_in = threading.Barrier(3, timeout=60) if cores == 8 else None  # three builds at once, or it breaks

    def fake_build(name, sources, verbose=False):
        with lock:
            running.add(name)
            seen.append((name, sorted(running), os.environ.get("TORCH_CUDA_ARCH_LIST")))
        if all_in is not None:
            all_in.wait()
        with lock:
            running.discard(name)
        if name == "b":
            raise RuntimeError("kernels: building the CUDA extension b failed")
        extensions[name].is_loaded = True
    monkeypatch.setattr(build, "build_and_load", fake_build)
    with pytest.raises(RuntimeError, match="extension b failed"):
        build.load_all(extensions.values())
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ
    if cores == 2:
        assert [(name, others) for name, others, _ in seen] == [("a", ["a"]), ("b", ["b"])]
        return
    assert sorted(name for name, _, _ in seen) == ["a", "b", "c"]
    assert all(arch == "8.0;9.0" for _, _, arch in seen)
    assert extensions["a"].is_loaded and extensions["c"].is_loaded  # built though b failed


# Each op copied on its own: the files it leaves behind, and what the copy runs. The loss's
# kernel path with the C++ CPU loops (cpu_loops), CE and OHEM, forward and backward; the
# BGA's likewise.
COPIES = {
    "loss": (["bga*", "same_bits.c*"], """
import torch
from ops.loss import EXTENSION, ohem_cross_entropy, ohem_cross_entropy_reference
EXTENSION.cpu_loops = True
logits = torch.randn(2, 5, 4, 6, dtype=torch.float64)
labels = torch.randint(0, 5, (2, 13, 17))
for thresh in (None, 0.7):
    leaf, exact = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ohem_cross_entropy(leaf, labels, thresh=thresh).backward()
    ohem_cross_entropy_reference(exact, labels, thresh=thresh).backward()
    assert torch.allclose(leaf.grad, exact.grad, rtol=1e-10, atol=1e-14)
print("copy ok")
"""),
    "bga": (["ohem_ce*", "loss.py", "same_bits.c*"], """
import torch
from ops.bga import EXTENSION, bga_aggregate, bga_aggregate_reference
EXTENSION.cpu_loops = True
inputs = [torch.randn(2, 3, 9, 11, dtype=torch.float64)]
inputs += [torch.randn(2, 3, 3, 4, dtype=torch.float64) for _ in range(3)]
leaves, exact = [[t.clone().requires_grad_(True) for t in inputs] for _ in range(2)]
bga_aggregate(*leaves).square().sum().backward()
bga_aggregate_reference(*exact).square().sum().backward()
assert all(torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-12) for a, b in zip(leaves, exact))
print("copy ok")
"""),
}


@pytest.mark.parametrize("op", sorted(COPIES))
def test_op_copied_alone_builds_and_runs(tmp_path, op):
    """Each op copied into another project on its own (kernels/ without the other op's files,
    the package's __init__ replaced): it builds its own sources only, in a fresh process and
    cache folder, with CUDA_HOME unset (its EXTENSION finds the toolkit itself), and its kernel
    path runs on the C++ CPU loops against its reference. CI has nvcc but no GPU: the CUDA side
    still compiles, for sm_90 alone (TORCH_CUDA_ARCH_LIST: the package's own build compiles
    both sm_80 and sm_90; one is enough to show the copy builds: 81 s where both took 100)."""
    import shutil
    import subprocess
    import sys
    if os.environ.get("BISENET_REQUIRE_KERNELS") != "1":
        try:
            build.check_cuda_home()
        except RuntimeError as e:
            pytest.skip(str(e))
    left_out, code = COPIES[op]
    kernels_dir = os.path.dirname(os.path.abspath(kernels.__file__))
    copy = tmp_path / "project" / "ops"
    shutil.copytree(kernels_dir, copy, ignore=shutil.ignore_patterns(
        *left_out, "__init__.py", "check.py", "bench.py", "README.md", "__pycache__"))
    (copy / "__init__.py").write_text("")
    env = dict(os.environ, BISENET_KERNELS_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(copy.parent),
               TORCH_CUDA_ARCH_LIST="9.0")
    env.pop("CUDA_HOME", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            cwd=str(tmp_path), timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "copy ok" in result.stdout
    built = sorted(path.parent.name.split("_")[1] for path in (tmp_path / "cache").glob("*/*.so"))
    assert built == [op], built  # bisenet_<op>_<key>: its own sources only
