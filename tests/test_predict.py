import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import predict
from bisenetv2 import BiSeNetV2, load_paddleseg
from conftest import ROOT, shared_fixture


@pytest.fixture(scope="module")
def weights():
    return shared_fixture("paddleseg_bisenetv2", "bisenetv2_random.pdparams")


def test_predict_street_frame_equals_argmax(weights, tmp_path):
    frame = shared_fixture("cityscapes_frames", "street_1024x512.png")
    assert predict.main(["--weights", str(weights), "--input", str(frame), "--out", str(tmp_path),
                         "--device", "cpu", "--overlay"]) == 0
    train_ids = np.asarray(Image.open(tmp_path / "street_1024x512_trainIds.png"))
    color = np.asarray(Image.open(tmp_path / "street_1024x512_color.png"))
    overlay = Image.open(tmp_path / "street_1024x512_overlay.png")
    photo = Image.open(frame).convert("RGB")
    assert train_ids.shape == (512, 1024) and train_ids.dtype == np.uint8
    assert color.shape == (512, 1024, 3) and overlay.size == photo.size

    # PaddleSeg's preprocessing written out independently: RGB, / 255, (x - 0.5) / 0.5
    rgb = np.asarray(photo, np.float32) / 255.0
    images = torch.from_numpy((rgb - 0.5) / 0.5).permute(2, 0, 1)[None]
    model = load_paddleseg(BiSeNetV2(19), weights).eval()
    with torch.no_grad():
        expected = model(images).argmax(1)[0].numpy()
    np.testing.assert_array_equal(train_ids, expected)
    np.testing.assert_array_equal(color, data.dataset_palette(data.CITYSCAPES)[expected])


def test_predict_folder_skips_corrupt_image(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    torch.save({"model": BiSeNetV2(19).state_dict()}, ckpt)
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.fromarray(np.random.randint(0, 255, (40, 60, 3), np.uint8)).save(images / "sub" / "good.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--weights", str(ckpt),
                             "--input", str(images), "--out", str(out), "--device", "cpu"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    assert np.asarray(Image.open(out / "sub" / "good_trainIds.png")).shape == (40, 60)
    assert not list(out.glob("broken*"))


def test_predict_bad_weights_is_one_line_error(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "w.pt").write_bytes(b"garbage")
    result = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--weights", str(tmp_path / "w.pt"),
                             "--input", str(tmp_path / "a.png"), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "w.pt" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
