"""export.py: ONNX graphs checked against PyTorch with onnxruntime on the CPU, on a real
frame and on sizes that are not multiples of 32; predict.py on the exports."""
import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import export
import predict
from bisenetv2 import BiSeNetV2, load_paddleseg
from conftest import shared_fixture

# in requirements.txt, so CI runs these; a GPU machine with torch alone skips them
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# (name, (H, W)): the frame is 512x1024; the others are resized from it or cropped out of it
SIZES = {"frame": (512, 1024), "resized_720x1280": (720, 1280), "resized_513x1025": (513, 1025),
         "crop_375x611": (375, 611)}


@pytest.fixture(scope="module")
def weights():
    return shared_fixture("paddleseg_bisenetv2", "bisenetv2_random.pdparams")


@pytest.fixture(scope="module")
def model(weights):
    return load_paddleseg(BiSeNetV2(19), weights).eval()


@pytest.fixture(scope="module")
def frame_path():
    return shared_fixture("cityscapes_frames", "street_1024x512.png")


def real_input(frame_path, name):
    """(1, 3, H, W) normalised float32 from the real frame: itself, resized or cropped."""
    photo = Image.open(frame_path).convert("RGB")
    height, width = SIZES[name]
    if name.startswith("resized"):
        photo = photo.resize((width, height), Image.BILINEAR)
    elif name.startswith("crop"):
        photo = photo.crop((13, 7, 13 + width, 7 + height))  # odd offsets too
    return predict.preprocess([photo])


def run_onnx(path, images):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def assert_matches_pytorch(model, onnx_logits, images):
    with torch.no_grad():
        expected = model(images)
    assert onnx_logits.shape == expected.shape
    # the bounds; float32 through ~60 layers differs by ~5e-6 between runtimes
    error = ((onnx_logits.double() - expected.double()).norm() / expected.double().norm()).item()
    assert error <= 1e-4
    assert (onnx_logits.argmax(1) == expected.argmax(1)).double().mean().item() >= 0.9999


def graph_input_shape(path):
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


@pytest.fixture(scope="module")
def dynamic_export(model, tmp_path_factory):
    """One --dynamic export; its BGA is a stand-in for the fused kernel that must not be
    exported (calling it fails)."""
    def fused_stand_in(*args):
        raise AssertionError("the fused BGA entered the export")

    kernel_model = BiSeNetV2(19)
    kernel_model.load_state_dict(model.state_dict())
    kernel_model.bga.aggregate = fused_stand_in
    logged = []
    path = export.export_onnx(kernel_model, tmp_path_factory.mktemp("dynamic") / "model.onnx", (64, 96),
                              dynamic=True, log=logged.append)
    assert any("plain-PyTorch bga_aggregate" in line for line in logged)
    return path


@pytest.mark.parametrize("name", ["resized_720x1280", "resized_513x1025", "crop_375x611"])
def test_fixed_export_matches_pytorch(model, frame_path, tmp_path, name):
    images = real_input(frame_path, name)
    path = export.export_onnx(model, tmp_path / "model.onnx", SIZES[name], log=lambda line: None)
    onnx.checker.check_model(str(path), full_check=True)
    assert graph_input_shape(path) == [1, 3, *SIZES[name]]
    assert_matches_pytorch(model, run_onnx(path, images), images)


def test_dynamic_export_serves_every_size(model, frame_path, dynamic_export):
    assert graph_input_shape(dynamic_export) == ["batch", 3, "height", "width"]
    for name in SIZES:
        images = real_input(frame_path, name)
        assert_matches_pytorch(model, run_onnx(dynamic_export, images), images)
    pair = torch.cat([real_input(frame_path, "crop_375x611"), real_input(frame_path, "crop_375x611").flip(-1)])
    assert_matches_pytorch(model, run_onnx(dynamic_export, pair), pair)  # batch 2


@pytest.fixture(scope="module")
def argmax_export(weights, tmp_path_factory):
    """export.py's command line: a fixed 512x1024 export with the train ids in the graph."""
    out = tmp_path_factory.mktemp("argmax") / "model.onnx"
    assert export.main(["--weights", str(weights), "--out", str(out), "--size", "512", "1024", "--argmax"]) == 0
    return out


def test_argmax_export_and_predict_onnx(model, frame_path, argmax_export, tmp_path):
    graph = onnx.load(str(argmax_export)).graph
    assert graph.output[0].name == "train_ids"
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    images = real_input(frame_path, "frame")
    with torch.no_grad():
        expected = model(images).argmax(1)[0].numpy()
    assert predict.main(["--weights", str(argmax_export), "--input", str(frame_path), "--out", str(tmp_path),
                         "--overlay"]) == 0
    train_ids = np.asarray(Image.open(tmp_path / "street_1024x512_trainIds.png"))
    assert train_ids.shape == expected.shape
    assert (train_ids == expected).mean() >= 0.9999
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "street_1024x512_color.png")),
                                  data.dataset_palette(data.CITYSCAPES)[train_ids])
    assert Image.open(tmp_path / "street_1024x512_overlay.png").size == (1024, 512)


def test_predict_takes_an_upper_case_onnx_suffix(argmax_export, frame_path, tmp_path, capsys):
    """model.ONNX (a name export.py writes) is an export, its metadata read, as model.onnx."""
    upper = tmp_path / "model.ONNX"
    shutil.copy(argmax_export, upper)
    assert predict.main(["--weights", str(upper), "--input", str(frame_path), "--out", str(tmp_path / "out")]) == 0
    assert f"classes: 19 from {upper}'s dataset" in capsys.readouterr().err
    assert (tmp_path / "out" / "street_1024x512_trainIds.png").exists()


def test_predict_onnx_fixed_size_skips_other_sizes(frame_path, argmax_export, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.open(frame_path).save(folder / "fits.png")
    Image.open(frame_path).crop((0, 0, 611, 375)).save(folder / "other.png")
    assert predict.main(["--weights", str(argmax_export), "--input", str(folder), "--out", str(tmp_path / "out"),
                         "--batch-size", "4"]) == 1
    stderr = capsys.readouterr().err
    assert "other.png: 375x611, but the export's input is fixed at 512x1024" in stderr
    assert "batch size is fixed at 1" in stderr
    assert (tmp_path / "out" / "fits_trainIds.png").exists() and not (tmp_path / "out" / "other_trainIds.png").exists()


def test_predict_refuses_an_export_of_other_classes(argmax_export, dynamic_export, frame_path, tmp_path, capsys):
    """An export's classes (its logits' channels, or the metadata of an --argmax export) must
    be the classes asked for (--num-classes, --dataset), as a checkpoint's must; an --argmax
    export without metadata runs unchecked, logged."""
    data.write_dataset_info(tmp_path, data.numbered_info(2))
    unrecorded = onnx.load(str(argmax_export))
    del unrecorded.metadata_props[:]
    onnx.save(unrecorded, str(tmp_path / "unrecorded.onnx"))
    common = ["--input", str(frame_path), "--out", str(tmp_path / "out")]
    for path, flags, known in ((dynamic_export, ["--num-classes", "2"], 19),
                               (argmax_export, ["--dataset", str(tmp_path)], 19),
                               (tmp_path / "unrecorded.onnx", ["--num-classes", "2"], None)):
        assert predict.OnnxPredictor(path, log=lambda line: None).num_classes == known
        code = predict.main(["--weights", str(path), *common, *flags])
        err = capsys.readouterr().err
        if known is None:
            assert code == 0 and "the export records no number of classes" in err, err
        else:
            assert code == 2 and err == f"predict.py: error: --weights: {path}: an export of 19 classes, not 2\n"
    assert predict.main(["--weights", str(argmax_export), *common, "--num-classes", "19"]) == 0


def test_predict_dynamic_onnx_batches_two_sizes(model, frame_path, dynamic_export, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    photo = Image.open(frame_path).convert("RGB")
    crops = {"a": (0, 0, 257, 131), "b": (5, 3, 262, 134), "c": (0, 0, 97, 65)}  # a, b one size, c another
    for name, box in crops.items():
        photo.crop(box).save(folder / f"{name}.png")
    assert predict.main(["--weights", str(dynamic_export), "--input", str(folder), "--out", str(tmp_path / "out"),
                         "--batch-size", "2"]) == 0
    for name, box in crops.items():
        images = predict.preprocess([photo.crop(box)])
        with torch.no_grad():
            expected = model(images).argmax(1)[0].numpy()
        train_ids = np.asarray(Image.open(tmp_path / "out" / f"{name}_trainIds.png"))
        assert train_ids.shape == expected.shape and (train_ids == expected).mean() >= 0.9999


def test_photos_export_takes_uint8_photos_and_predict_uses_it(model, weights, frame_path, tmp_path, capsys):
    """--photos --dynamic: the graph takes (N, H, W, 3) uint8 RGB and normalises it itself (a
    lookup of the 256 normalised values), so its logits are the float export's; predict.py
    feeds it the photos as they are, and refuses it float images."""
    out = tmp_path / "photos.onnx"
    assert export.main(["--weights", str(weights), "--out", str(out), "--size", "64", "96", "--photos",
                        "--dynamic"]) == 0
    assert "images N x H x W x 3 uint8 -> logits" in capsys.readouterr().err
    assert graph_input_shape(out) == ["batch", "height", "width", 3]
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    photo = Image.open(frame_path).convert("RGB").crop((13, 7, 624, 382))
    rgb = np.asarray(photo)
    pair = np.stack([rgb, rgb[:, ::-1]])  # batch 2, an odd size
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {"images": pair})[0])
    assert_matches_pytorch(model, logits, predict.preprocess([photo, Image.fromarray(pair[1])]))
    runner = predict.OnnxPredictor(out, log=lambda line: None)
    assert runner.takes_photos and runner.fixed_size is None and runner.batch is None
    with pytest.raises(ValueError, match=r"takes \(N, H, W, 3\) uint8 RGB photos, not torch.float32"):
        runner(predict.preprocess([photo]))
    photo.save(tmp_path / "street.png")
    assert predict.main(["--weights", str(out), "--input", str(tmp_path / "street.png"), "--out",
                         str(tmp_path / "pred")]) == 0
    train_ids = np.asarray(Image.open(tmp_path / "pred" / "street_trainIds.png"))
    np.testing.assert_array_equal(train_ids, logits[0].argmax(0).numpy())


@pytest.mark.parametrize("args, named", [
    (["--weights", "MISSING.pdparams"], "MISSING.pdparams: no such weights file"),
    (["--weights", "CORRUPT.pt"], "CORRUPT.pt: not a readable checkpoint"),
    (["--weights", "NAN.pt"], "NAN.pt: NaN or infinity in 1 tensor, the first head.classifier.weight"),
    (["--opset", "11"], "--opset 11: unsupported"),
    (["--opset", "999"], "--opset 999: unsupported"),
    (["--size", "0", "64"], "--size 0 64: height and width must be positive"),
    (["--out", "FOLDER"], "FOLDER: a folder, not the .onnx file to write"),
    (["--out", "CORRUPT.pt/model.onnx"], "CORRUPT.pt/model.onnx: cannot make its folder"),
])
def test_export_bad_input_is_one_line_and_exit_2(weights, tmp_path, capsys, args, named):
    (tmp_path / "CORRUPT.pt").write_bytes(b"not a checkpoint")
    if "NAN.pt" in args:
        state = BiSeNetV2(19).state_dict()
        state["head.classifier.weight"][0, 0] = float("inf")
        torch.save({"model": state}, tmp_path / "NAN.pt")
    out = tmp_path / "model.onnx"
    out.write_bytes(b"a good export")
    argv = ["--weights", str(weights), "--out", str(out)] + args
    (tmp_path / "FOLDER").mkdir()
    argv = [str(tmp_path / a) if a in ("MISSING.pdparams", "CORRUPT.pt", "NAN.pt", "FOLDER", "CORRUPT.pt/model.onnx")
            else a
            for a in argv]
    assert export.main(argv) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and named in stderr[0]
    assert out.read_bytes() == b"a good export"
    assert [p.name for p in tmp_path.iterdir()] != [] and not list(tmp_path.glob(".model.onnx.tmp*"))


@pytest.mark.parametrize("content, named", [(None, "no such ONNX file"), (b"garbage", "not a readable ONNX model")])
def test_predict_bad_onnx_is_one_line_and_exit_2(frame_path, tmp_path, capsys, content, named):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    assert predict.main(["--weights", str(path), "--input", str(frame_path), "--out", str(tmp_path / "o")]) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and named in stderr[0] and "model.onnx" in stderr[0]


def test_export_that_cannot_be_written_is_one_line_and_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    weights = tmp_path / "w.pt"
    torch.save({"model": BiSeNetV2(19).state_dict()}, weights)
    out = tmp_path / "model.onnx"
    out.write_bytes(b"a good export")

    def full_disk(graph, args, path, **kwargs):
        Path(path).write_bytes(b"half an ")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch.onnx, "export", full_disk)
    assert export.main(["--weights", str(weights), "--out", str(out)]) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr[-1] == f"export.py: error: --out {out}: cannot write it (No space left on device)"
    assert out.read_bytes() == b"a good export" and not list(tmp_path.glob(".model.onnx.tmp*"))
