"""predict.Predictor, the fast inference path, against the plain float32 model.

Tolerances (relative L2 error of the logits, share of pixels with the same argmax):
  float32         1e-5, 99.99%: float32 rounding through ~60 layers is ~2e-6 of the norm
                  (test_model.py), whatever the order of the sums.
  TF32 (CUDA)     6e-3, 99.9%: cuDNN may run float32 convs in TF32, 10 stored mantissa bits,
                  8x the unit roundoff of bf16 below.
  bf16            5e-2, 99%: 7 stored mantissa bits (unit roundoff 2^-8 = 3.9e-3); measured
                  on the CPU against float64 on the real frame: 2.2e-2 to 2.4e-2 (autocast
                  2.2e-2), argmax 99.8%. The bounds are about twice that.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import predict
from bisenetv2 import BiSeNetV2, load_paddleseg
from conftest import shared_fixture

FP32, TF32, BF16 = (1e-5, 0.9999), (6e-3, 0.999), (5e-2, 0.99)


@pytest.fixture(scope="module")
def model():
    return load_paddleseg(BiSeNetV2(19), shared_fixture("paddleseg_bisenetv2", "bisenetv2_random.pdparams")).eval()


@pytest.fixture(scope="module")
def photo():
    return Image.open(shared_fixture("cityscapes_frames", "street_1024x512.png")).convert("RGB")


def crops(photo, *boxes):
    return predict.preprocess([photo.crop(box) for box in boxes])


def assert_close(logits, expected, bounds):
    error_bound, agreement = bounds
    logits, expected = logits.detach().cpu().double(), expected.double()
    assert logits.shape == expected.shape
    assert ((logits - expected).norm() / expected.norm()).item() <= error_bound
    assert (logits.argmax(1) == expected.argmax(1)).double().mean().item() >= agreement


def reference(model, images):
    with torch.no_grad():
        return model(images)


def test_predictor_fp32_is_the_model(model, photo):
    images = crops(photo, (0, 0, 333, 191))
    expected = reference(model, images)
    logits = predict.Predictor(model, "cpu", output="logits")(images)
    assert torch.equal(logits, expected)
    train_ids = predict.Predictor(model, "cpu")(images)
    assert train_ids.dtype == torch.uint8 and torch.equal(train_ids, expected.argmax(1).to(torch.uint8))


def test_predictor_takes_uint8_photos(model, photo):
    """(N, H, W, 3) uint8 RGB photos are normalised on the predictor's device by a table:
    preprocess's bits for every value, and the same logits."""
    values = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(2, 16, 16, 3)
    expected = (np.arange(256, dtype=np.float32) / 255.0 - 0.5) / 0.5
    predictor = predict.Predictor(model, "cpu", output="logits")
    prepared = predictor.prepare(values)
    assert prepared.shape == (2, 3, 16, 16) and prepared.is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(prepared.numpy().reshape(6, 256), np.broadcast_to(expected, (6, 256)))
    boxes = [(0, 0, 333, 191), (5, 3, 338, 194)]
    rgb = torch.from_numpy(np.stack([np.asarray(photo.crop(box)) for box in boxes]))
    images = crops(photo, *boxes)
    assert torch.equal(predictor.prepare(rgb), images)
    assert torch.equal(predictor(rgb), reference(model, images))
    with pytest.raises(ValueError, match=r"Predictor: photos must be \(N, H, W, 3\) uint8 RGB, got \(2, 3, 191, 333\)"):
        predictor(rgb.permute(0, 3, 1, 2))


def test_predictor_channels_last_and_batch(model, photo):
    boxes = [(0, 0, 333, 191), (400, 200, 733, 391)]
    images = crops(photo, *boxes)
    logits = predict.Predictor(model, "cpu", channels_last=True, output="logits")(images)
    for i, box in enumerate(boxes):  # a batch of two == each alone
        assert_close(logits[i:i + 1], reference(model, crops(photo, box)), FP32)


def test_fold_batchnorm_is_the_same_function(model, photo):
    images = crops(photo, (5, 3, 262, 134))
    folded = predict.fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.detail.modules())
    assert_close(reference(folded, images), reference(model, images), FP32)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.detail.modules())  # the original is untouched


def test_predictor_bf16_within_bf16_rounding(model, photo):
    images = crops(photo, (0, 0, 512, 256))
    logits = predict.Predictor(model, "cpu", torch.bfloat16, channels_last=True, output="logits")(images)
    assert logits.dtype == torch.bfloat16
    assert_close(logits, reference(model, images), BF16)


def test_predictor_stops_autotuning_past_two_sizes(model):
    """cudnn.benchmark (which the predictor turns on on CUDA) autotunes every new input size:
    at the third size the predictor turns it off, once, and says so."""
    said, saved = [], torch.backends.cudnn.benchmark
    predictor = predict.Predictor(model, "cpu", log=said.append)
    try:
        torch.backends.cudnn.benchmark = True  # as on CUDA
        autotuning = []
        for n, size in ((1, (32, 64)), (2, (32, 64)), (1, (64, 64)), (3, (32, 64)), (1, (64, 128)), (1, (96, 64))):
            predictor(torch.zeros(n, 3, *size) if n != 2 else torch.zeros(n, *size, 3, dtype=torch.uint8))
            autotuning.append(torch.backends.cudnn.benchmark)
    finally:
        torch.backends.cudnn.benchmark = saved
    assert autotuning == [True, True, True, True, False, False]  # batch sizes and layouts are not sizes
    assert said == ["predictor: 3 input sizes (64x128 the last): cudnn.benchmark off (it autotunes every new size, "
                    "seconds each)"]


def test_predictor_rejects_cuda_graph_without_cuda(model):
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        predict.Predictor(model, "cpu", cuda_graph=True)


def test_predict_batches_equal_one_at_a_time(photo, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    boxes = {"a": (0, 0, 257, 131), "b": (9, 9, 266, 140), "c": (20, 20, 277, 151), "d": (0, 0, 97, 65)}
    for name, box in boxes.items():
        photo.crop(box).save(folder / f"{name}.png")
    weights = shared_fixture("paddleseg_bisenetv2", "bisenetv2_random.pdparams")
    for batch in ("1", "3"):
        assert predict.main(["--weights", str(weights), "--input", str(folder), "--out", str(tmp_path / batch),
                             "--device", "cpu", "--batch-size", batch]) == 0
    for name in boxes:
        one, three = (np.asarray(Image.open(tmp_path / b / f"{name}_trainIds.png")) for b in ("1", "3"))
        assert one.shape == three.shape and (one == three).mean() >= FP32[1]


@pytest.mark.parametrize("args, named", [(["--batch-size", "0"], "--batch-size 0: must be positive"),
                                         (["--cuda-graph", "--device", "cpu"], "--cuda-graph needs a CUDA device"),
                                         (["--device", "gpu"], "--device gpu: not a device")])
def test_predict_bad_arguments_exit_2(photo, tmp_path, capsys, args, named):
    weights = shared_fixture("paddleseg_bisenetv2", "bisenetv2_random.pdparams")
    argv = ["--weights", str(weights), "--input", str(tmp_path), "--out", str(tmp_path / "o")] + args
    assert predict.main(argv) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and named in stderr[0]


def test_inference_table_runs_on_cpu():
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module)
    table = predict.inference_table(BiSeNetV2(19), "cpu", sizes=((64, 128), (33, 47)), iters=1, warmup=1,
                                    onnx_iters=1, log=lambda line: None)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table.splitlines()[2:]}
    assert list(rows) == [label for label, _ in predict.INFERENCE_ROWS] + ["onnxruntime CPU, fp32"]
    for label in ("fp32 eager, NCHW", "onnxruntime CPU, fp32"):
        assert all(float(cell) > 0 for cell in rows[label][:4])
    assert rows["bf16 channels_last CUDA graph"][-1].startswith("needs CUDA")


# --- on a GPU ----------------------------------------------------------------------------

GPU_PATHS = [(label, settings) for label, settings in predict.INFERENCE_ROWS if settings.get("dtype") != torch.float32]
GPU_PATHS.append(("fp32 CUDA graph", dict(dtype=torch.float32, cuda_graph=True)))


@pytest.fixture(scope="module")
def gpu_cases(model, photo):
    """(images, float32 CPU logits): a batch of two 512x1024 images and one odd crop."""
    full = crops(photo, (0, 0, 1024, 512))
    pair = torch.cat([full, full.flip(-1)])  # two different images
    odd = crops(photo, (13, 7, 624, 382))
    return (pair, reference(model, pair)), (odd, reference(model, odd))


@pytest.mark.gpu
@pytest.mark.parametrize("label, settings", GPU_PATHS, ids=[label for label, _ in GPU_PATHS])
def test_gpu_predictor_matches_fp32(model, gpu_cases, label, settings):
    """Every path at batch 2; a CUDA graph replayed with new data, then recaptured at a new
    shape. Compiled paths see one shape only (compiling takes most of .ci/gpu's budget)."""
    bounds = BF16 if settings["dtype"] == torch.bfloat16 else TF32
    (pair, pair_logits), (odd, odd_logits) = gpu_cases
    captures = []
    predictor = predict.Predictor(model, "cuda", output="logits", log=captures.append, **settings)
    assert_close(predictor(pair.cuda()), pair_logits, bounds)
    # same shape, new data: a graph replays with the new input
    assert_close(predictor(pair.flip(0).cuda()), pair_logits.flip(0), bounds)
    if not settings.get("compile"):
        assert_close(predictor(odd), odd_logits, bounds)  # a new shape, from host memory
        train_ids = predict.Predictor(model, "cuda", log=captures.append, **settings)(odd.cuda())
        assert train_ids.dtype == torch.uint8
        assert (train_ids.cpu() == odd_logits.argmax(1)).double().mean().item() >= bounds[1]
        assert len(captures) == (3 if settings.get("cuda_graph") else 0)


@pytest.mark.gpu
def test_gpu_predict_cli_fast_path(photo, tmp_path):
    weights = shared_fixture("paddleseg_bisenetv2", "bisenetv2_random.pdparams")
    folder = tmp_path / "images"
    folder.mkdir()
    for name, box in {"a": (0, 0, 1024, 512), "b": (0, 0, 611, 375), "c": (5, 5, 616, 380)}.items():
        photo.crop(box).save(folder / f"{name}.png")
    argv = ["--weights", str(weights), "--input", str(folder), "--device", "cuda", "--batch-size", "2"]
    assert predict.main(argv + ["--out", str(tmp_path / "fast"), "--cuda-graph"]) == 0
    assert predict.main(argv + ["--out", str(tmp_path / "fp32"), "--fp32"]) == 0
    for name in "abc":
        fast, fp32 = (np.asarray(Image.open(tmp_path / d / f"{name}_trainIds.png")) for d in ("fast", "fp32"))
        assert fast.shape == fp32.shape and (fast == fp32).mean() >= BF16[1]


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "cuda graph"])
def test_gpu_predictor_normalises_uint8_photos_on_the_device(model, photo, cuda_graph):
    """uint8 photos are normalised on the GPU to preprocess's bits (the table), eagerly and
    inside a CUDA graph, and give the float input's logits."""
    boxes = [(0, 0, 1024, 512), (13, 7, 1037, 519)]
    rgb = torch.from_numpy(np.stack([np.asarray(photo.crop(box)) for box in boxes]))
    images = crops(photo, *boxes)
    predictor = predict.Predictor(model, "cuda", torch.bfloat16, channels_last=True, cuda_graph=cuda_graph,
                                  output="logits", log=lambda line: None)
    assert torch.equal(predictor.prepare(rgb).cpu(), images)
    expected = predictor(images).clone()
    assert_close(predictor(rgb), expected.float().cpu(), BF16)
    assert_close(predictor(rgb.flip(2)), reference(model, images.flip(-1)), BF16)  # a graph replays new data
