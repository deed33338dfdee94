"""The loss reference (kernels/loss.py) against plain compositions, and the build machinery."""
import math
import os
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import build
from kernels.loss import ohem_cross_entropy_reference as loss_ref


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


def test_select_logs_its_choice():
    messages = []
    loss_fn, bga_fn = kernels.select("auto", torch.device("cpu"), log=messages.append)
    assert loss_fn is kernels.ohem_cross_entropy_reference and "no CUDA device" in messages[0]
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        kernels.select("cuda", torch.device("cpu"), log=messages.append)


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


def test_wrong_cuda_home_is_explained(monkeypatch):
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local")
    with pytest.raises(RuntimeError, match="export CUDA_HOME=/usr/local/cuda"):
        build.check_cuda_home()


def test_extension_builds_from_scratch(tmp_path):
    """CI has nvcc but no GPU: the CUDA extension must still compile (for sm_80 and sm_90).
    In a fresh process and cache folder (a process cannot register the same ops twice)."""
    import subprocess
    import sys
    if os.environ.get("BISENET_REQUIRE_KERNELS") != "1":
        try:
            build.check_cuda_home()
        except RuntimeError as e:
            pytest.skip(str(e))
    env = dict(os.environ, BISENET_KERNELS_CACHE=str(tmp_path / "cache"))
    code = "import torch, kernels; kernels.load(); print(torch.ops.bisenet_cuda.bga_forward)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "cache").glob("bisenet_kernels_*/*.so"))
