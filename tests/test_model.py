import argparse
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bisenetv2 import BiSeNetV2, load_matching, load_paddleseg, load_weights, pad_same, read_pdparams
from conftest import shared_fixture


@pytest.fixture(scope="module")
def paddle_weights():
    return shared_fixture("paddleseg_bisenetv2", "bisenetv2_random.pdparams")


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_reproduces_paddleseg_logits(paddle_weights):
    folder = paddle_weights.parent
    model = load_paddleseg(BiSeNetV2(19), paddle_weights).eval()
    images = torch.from_numpy(np.load(folder / "input.npy"))
    expected = torch.from_numpy(np.load(folder / "expected_logits.npy"))
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == expected.shape
    # float32 through ~60 layers: PaddleSeg's own float32 rounding is ~2e-6 of the norm
    assert relative_error(logits, expected) < 1e-5
    assert torch.equal(logits.argmax(1), expected.argmax(1))


def test_pad_same_matches_paddle_rule():
    # Paddle's 'same': out = ceil(n / s), total = (out - 1) * s + k - n, smaller half first
    x = torch.zeros(1, 1, 6, 7)
    assert pad_same(x, 3, 2).shape[-2:] == (7, 9)  # 6: (0, 1); 7: (1, 1)
    marked = pad_same(torch.ones(1, 1, 6, 7), 3, 2)
    assert marked[0, 0, 0, 1] == 1 and marked[0, 0, -1, 1] == 0  # even height: nothing on top
    assert marked[0, 0, 1, 0] == 0 and marked[0, 0, 1, -1] == 0  # odd width: one each side


@pytest.mark.parametrize("size", [(64, 128), (97, 131), (33, 35)])
def test_train_mode_head_shapes(size):
    torch.manual_seed(0)
    model = BiSeNetV2(19).train()
    outputs = model(torch.randn(2, 3, *size))
    assert len(outputs) == 5
    ceil = lambda n, s: -(-n // s)  # every stride 2 layer rounds up
    strides = [8, 4, 8, 16, 32]  # main, stem, stage 3, stage 4, stage 5
    for out, stride in zip(outputs, strides):
        assert out.shape == (2, 19, ceil(size[0], stride), ceil(size[1], stride))


@pytest.mark.parametrize("size", [(1, 1), (31, 47), (96, 160)])
def test_eval_mode_logits_at_input_size(size):
    model = BiSeNetV2(7).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, *size))
    assert logits.shape == (1, 7, *size)
    assert torch.isfinite(logits).all()


def test_eval_is_upsampled_main_head():
    torch.manual_seed(1)
    model = BiSeNetV2(19)
    images = torch.randn(1, 3, 50, 70)
    model.train()
    for m in model.modules():  # train-mode structure, eval-mode BN and dropout
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout)):
            m.eval()
    with torch.no_grad():
        main = model(images)[0]
        model.eval()
        logits = model(images)
    expected = F.interpolate(main, size=(50, 70), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, expected)


def write_pdparams(path, state):
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=4)


def test_load_paddleseg_names_missing_tensor(paddle_weights, tmp_path):
    state = read_pdparams(paddle_weights)
    del state["bga.conv._batch_norm._variance"]
    write_pdparams(tmp_path / "m.pdparams", state)
    with pytest.raises(ValueError, match=r"missing: bga\.conv\._batch_norm\._variance"):
        load_paddleseg(BiSeNetV2(19), tmp_path / "m.pdparams")


def test_load_paddleseg_names_misshaped_tensor(paddle_weights, tmp_path):
    state = read_pdparams(paddle_weights)
    state["head.conv_1x1.weight"] = np.zeros((18, 128, 1, 1), np.float32)
    write_pdparams(tmp_path / "m.pdparams", state)
    with pytest.raises(ValueError, match=r"mis-shaped: head\.conv_1x1\.weight \(18, 128, 1, 1\)"):
        load_paddleseg(BiSeNetV2(19), tmp_path / "m.pdparams")


def test_load_paddleseg_names_unexpected_tensor(paddle_weights, tmp_path):
    state = read_pdparams(paddle_weights)
    state["extra.weight"] = np.zeros(3, np.float32)
    write_pdparams(tmp_path / "m.pdparams", state)
    with pytest.raises(ValueError, match=r"unexpected: extra\.weight"):
        load_paddleseg(BiSeNetV2(19), tmp_path / "m.pdparams")


def test_load_paddleseg_leaves_model_untouched_on_error(paddle_weights, tmp_path):
    state = read_pdparams(paddle_weights)
    del state["db.convs.0._conv.weight"]
    write_pdparams(tmp_path / "m.pdparams", state)
    model = BiSeNetV2(19)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        load_paddleseg(model, tmp_path / "m.pdparams")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_paddleseg_refuses_code_in_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    write_pdparams(tmp_path / "evil.pdparams", {"x": Evil()})
    with pytest.raises(ValueError, match="refusing to unpickle builtins.print"):
        load_paddleseg(BiSeNetV2(19), tmp_path / "evil.pdparams")


def test_an_upper_case_pdparams_suffix_is_paddlesegs(paddle_weights, tmp_path):
    upper = tmp_path / "model.PDPARAMS"
    shutil.copy(paddle_weights, upper)
    expected = load_paddleseg(BiSeNetV2(19), paddle_weights).state_dict()
    for load in (load_weights, load_matching):
        model = BiSeNetV2(19)
        load(model, upper)
        assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items()), load


@pytest.mark.parametrize("value, what", [(np.array(["a"]), "dtype <U1"), (np.array([1, None], object), "dtype object"),
                                         (np.array([1j]), "dtype complex128"), ("text", "a str")])
def test_pdparams_of_non_numeric_arrays_are_named(tmp_path, value, what):
    write_pdparams(tmp_path / "w.pdparams", {"db.convs.0._conv.weight": value})
    for load in (load_weights, load_matching):
        with pytest.raises(ValueError, match=rf"^{tmp_path / 'w.pdparams'}: db\.convs\.0\._conv\.weight is not a "
                                             rf"numeric array \({what}\)$"):
            load(BiSeNetV2(19), tmp_path / "w.pdparams")


@pytest.mark.parametrize("content", [b"", b"not a pickle at all"])
def test_corrupt_weights_are_named(tmp_path, content):
    for name in ("w.pdparams", "w.pt"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=name):
            load_weights(BiSeNetV2(19), tmp_path / name)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_weights(BiSeNetV2(19), tmp_path / "absent.pt")


def test_project_checkpoint_round_trip(tmp_path):
    torch.manual_seed(2)
    model = BiSeNetV2(19)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    torch.save({"model": model.state_dict(), "iter": 3}, tmp_path / "c.pt")
    loaded = load_weights(BiSeNetV2(19), tmp_path / "c.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # wrong number of classes is named, not a traceback from deep inside
    with pytest.raises(ValueError, match="does not fit BiSeNetV2"):
        load_weights(BiSeNetV2(5), tmp_path / "c.pt")


def test_weights_that_do_not_fit_are_one_short_line(tmp_path):
    """Another model's weights name a few tensors of each kind and count the rest (not
    hundreds of names); a file torch.load refuses gives the reason, not torch's advice to
    load it unsafely."""
    torch.save({"model": BiSeNetV2(3).state_dict()}, tmp_path / "three.pt")
    with pytest.raises(ValueError) as error:
        load_weights(BiSeNetV2(19), tmp_path / "three.pt")
    message = str(error.value)
    assert "mis-shaped: head.classifier.weight (3, 128, 1, 1) (expected (19, 128, 1, 1))" in message
    assert message.endswith(" and 6 more") and "\n" not in message  # 5 heads x (weight, bias)

    torch.save({"model": {"stranger.weight": torch.zeros(3)}}, tmp_path / "stranger.pt")
    write_pdparams(tmp_path / "stranger.pdparams", {"stranger.weight": np.zeros(3, np.float32)})
    messages = []
    for name in ("stranger.pt", "stranger.pdparams"):
        with pytest.raises(ValueError) as error:
            load_weights(BiSeNetV2(19), tmp_path / name)
        messages.append(str(error.value))
        assert messages[-1].count("missing: ") == 1 and len(messages[-1]) < 400 and "\n" not in messages[-1]
        assert messages[-1].endswith(" more; unexpected: stranger.weight"), messages[-1]
    assert f" and {len(BiSeNetV2(19).state_dict()) - 4} more; " in messages[0]  # every tensor missing, 4 named

    torch.save({"model": {}, "args": argparse.Namespace(lr=0.05)}, tmp_path / "namespace.pt")
    with pytest.raises(ValueError) as error:
        load_weights(BiSeNetV2(19), tmp_path / "namespace.pt")
    message = str(error.value)
    assert "namespace.pt: not a readable checkpoint (UnpicklingError: Unsupported global" in message
    assert "argparse.Namespace" in message and "weights_only` set to `False`" not in message
    assert "\n" not in message


def test_weights_holding_nan_or_inf_are_refused_by_name(paddle_weights, tmp_path):
    """Every loader names the first tensor holding NaN or infinity (the file's name for it) and
    counts them, and leaves the model untouched; a float64 value past float32 counts too."""
    state = BiSeNetV2(19).state_dict()
    state["detail.layers.0.conv.weight"][0, 0, 0, 0] = float("nan")
    state["head.classifier.bias"][3] = float("inf")
    torch.save({"model": state}, tmp_path / "nan.pt")
    paddle = read_pdparams(paddle_weights)
    paddle["sb.stem.conv._batch_norm._variance"][0] = np.nan
    paddle["bga.conv._conv.bias"] = np.full_like(paddle["bga.conv._batch_norm._mean"], -np.inf)  # folded into the mean
    write_pdparams(tmp_path / "nan.pdparams", paddle)
    paddle = read_pdparams(paddle_weights)
    paddle["head.conv_1x1.bias"] = paddle["head.conv_1x1.bias"].astype(np.float64) + 1e300
    write_pdparams(tmp_path / "huge.pdparams", paddle)
    for name, named in (("nan.pt", "NaN or infinity in 2 tensors, the first detail.layers.0.conv.weight"),
                        ("nan.pdparams", "NaN or infinity in 2 tensors, the first sb.stem.conv._batch_norm._variance"),
                        ("huge.pdparams", "NaN or infinity in 1 tensor, the first head.conv_1x1.bias")):
        for load in (load_weights, load_matching):
            model = BiSeNetV2(19)
            before = {k: v.clone() for k, v in model.state_dict().items()}
            with pytest.raises(ValueError, match=f"^{tmp_path / name}: {named}$"):
                load(model, tmp_path / name)
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), (name, load)


def test_initialisation_is_paddlesegs():
    """Kaiming-normal conv weights (std sqrt(2 / fan_in)), conv biases 0 (Paddle's default
    for a bias; torch's would be uniform), BN weight 1 and bias 0."""
    torch.manual_seed(0)
    model = BiSeNetV2(19)
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None]
    assert len(biases) == 8  # the five heads' classifiers, the context block's 3x3, the BGA's two 1x1
    assert all(torch.count_nonzero(bias) == 0 for bias in biases)
    weight = model.semantic.stage5[1].dw_expand.conv.weight  # 768 depthwise 3x3 filters
    std = weight.std().item() / (2 / 9) ** 0.5
    assert 0.95 < std < 1.05  # 6912 draws: the sample std is within 2% of the true one
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.all(bn.weight == 1) and torch.all(bn.bias == 0) for bn in bns)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_keep_biased_running_var_gives_paddles_update(momentum):
    """After torch's update (the unbiased variance), keep_biased_running_var leaves Paddle's
    SyncBatchNorm's: (1 - f) old + f var with the biased variance of the n values normalised
    (f the momentum, or 1 / batches for a cumulative average). float64: exact but for
    rounding."""
    from bisenetv2 import keep_biased_running_var
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(5, momentum=momentum).double().train()
    bn.running_var.uniform_(0.5, 2)
    for step in range(3):
        pooled = torch.randn(4, 5, 1, 1, dtype=torch.float64) * 3 + 1  # 4 values a channel
        old_var = bn.running_var.clone()
        bn(pooled)
        assert not torch.allclose(bn.running_var, old_var)
        keep_biased_running_var(bn, old_var, count=4)
        factor = 0.1 if momentum is not None else 1 / (step + 1)
        expected = (1 - factor) * old_var + factor * pooled.var(dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(bn.running_var, expected, rtol=1e-13, atol=0)


def test_pooled_bns_keep_the_biased_variance_only_where_they_sync(monkeypatch):
    """synced_processes: the world of a training SyncBatchNorm under torch.distributed, else 1.
    ContextEmbedding corrects its two pooled BNs, with n = N images x processes, only then."""
    import bisenetv2
    sync_bn = torch.nn.SyncBatchNorm(4).train()
    assert bisenetv2.synced_processes(sync_bn) == 1  # torch.distributed not initialised
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 8)
    assert bisenetv2.synced_processes(sync_bn) == 8
    assert bisenetv2.synced_processes(sync_bn.eval()) == 1
    assert bisenetv2.synced_processes(torch.nn.BatchNorm2d(4).train()) == 1

    calls = []
    monkeypatch.setattr(bisenetv2, "keep_biased_running_var",
                        lambda bn, old_var, count: calls.append((bn, old_var.clone(), count)))
    block = bisenetv2.ContextEmbedding(4).train()
    features = torch.randn(3, 4, 5, 6)
    block(features)
    assert calls == []  # plain BatchNorm2d: torch's update stands (PaddleSeg's on one GPU)
    monkeypatch.setattr(bisenetv2, "synced_processes", lambda bn: 8 if bn.training else 1)
    old_vars = [block.pool_bn.running_var.clone(), block.pool_conv.bn.running_var.clone()]
    block(features)
    assert [(bn, count) for bn, _, count in calls] == [(block.pool_bn, 24), (block.pool_conv.bn, 24)]
    assert all(torch.equal(old, recorded) for old, (_, recorded, _) in zip(old_vars, calls))
    calls.clear()
    block.eval()(features)
    assert calls == []


SYNC_BN_RUN = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import bisenetv2
dist.init_process_group("gloo")  # two processes on one GPU (NCCL wants a GPU each)
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same block and the same batches on every rank
block = torch.nn.SyncBatchNorm.convert_sync_batchnorm(bisenetv2.ContextEmbedding(8)).cuda().train()
features = torch.randn(world, 3, 8, 5, 6)  # (processes, N, C, H, W)
block(features[rank].cuda()).square().sum().backward()  # the in-place update must leave the backward whole
if rank == 0:
    torch.save({"features": features, "conv": block.pool_conv.conv.weight.detach().cpu(),
                "pool_bn": block.pool_bn.running_var.cpu(), "conv_bn": block.pool_conv.bn.running_var.cpu()},
               sys.argv[2])
dist.destroy_process_group()
"""


def paddle_running_vars(features, conv_weight):
    """Paddle's SyncBatchNorm's running variances of the context block's two pooled BNs after one
    step from their initial state (weight 1, bias 0, variance 1, momentum 0.1), in float64:
    features (processes, N, C, H, W), every process's images in one batch."""
    pooled = features.double().mean(dim=(3, 4)).flatten(0, 1)                  # (processes x N, C)
    normalised = (pooled - pooled.mean(0)) / torch.sqrt(pooled.var(0, unbiased=False) + 1e-5)
    convolved = normalised @ conv_weight.double()[:, :, 0, 0].T                 # the 1x1 conv
    return [0.9 + 0.1 * values.var(0, unbiased=False) for values in (pooled, convolved)]


@pytest.mark.gpu
def test_synced_pooled_bns_keep_paddles_running_variance(tmp_path):
    """Two torchrun processes with SyncBatchNorm (gloo, sharing the GPU): after a step, forward
    and backward, the context block's pooled BNs hold Paddle's running variance over both
    processes' 6 images (the biased one; torch's own would be 6/5 of the batch's part)."""
    import subprocess
    import sys
    from conftest import ROOT
    (tmp_path / "run.py").write_text(SYNC_BN_RUN)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(tmp_path / "run.py"), str(ROOT), str(tmp_path / "out.pt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    # float32 on the GPU against float64: a few ulps of values near 1
    for name, expected in zip(("pool_bn", "conv_bn"), paddle_running_vars(out["features"], out["conv"])):
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-5, atol=0, msg=name)
