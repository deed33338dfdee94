import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import export
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
    # the default --alpha 0.5, rounded from float32 arithmetic (error below 1e-4 at 0..255)
    blend = 0.5 * np.asarray(photo, np.float64) + 0.5 * color
    assert np.abs(np.asarray(overlay, np.float64) - blend).max() <= 0.5 + 1e-3


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


def test_a_folder_that_cannot_be_read_is_reported_and_exits_1(tmp_path, monkeypatch, capsys):
    """A subfolder that cannot be listed is named and the exit code is 1, as for an unreadable
    image (Path.rglob skipped it silently), but for hidden ones and lost+found, which rglob
    passed over too; an --input that cannot be listed is one line. The
    tests run as root, whom chmod does not stop: os.scandir is made to refuse."""
    torch.save({"model": BiSeNetV2(19).state_dict()}, tmp_path / "model.pt")
    images = tmp_path / "images"
    (images / "locked").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "locked" / "b.png")
    scandir, refused = os.scandir, set()

    def permission_denied(path="."):
        if Path(path) in refused:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", permission_denied)
    argv = ["--weights", str(tmp_path / "model.pt"), "--input", str(images), "--out", str(tmp_path / "out"),
            "--device", "cpu"]
    for ignored in (".Trash-1000", "lost+found"):  # unreadable below --input and passed over, as rglob did
        (images / ignored).mkdir()
        refused.add(images / ignored)
    assert predict.main([*argv[:-4], "--out", str(tmp_path / "all"), "--device", "cpu"]) == 0, capsys.readouterr().err
    refused.add(images / "locked")
    assert predict.main(argv) == 1
    err = capsys.readouterr().err
    assert f"skipping a folder: {images / 'locked'} cannot be read (Permission denied)" in err, err
    assert "1 folder(s) not read" in err and "Traceback" not in err, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_color.png", "a_trainIds.png"]
    refused.add(images)
    assert predict.main(argv) == 2
    assert capsys.readouterr().err == (f"predict.py: error: --input {images}: no images "
                                       f"({', '.join(sorted(predict.IMAGE_SUFFIXES))}) in it; {images} cannot be read "
                                       "(Permission denied)\n")


def test_predict_bad_weights_is_one_line_error(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "w.pt").write_bytes(b"garbage")
    result = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--weights", str(tmp_path / "w.pt"),
                             "--input", str(tmp_path / "a.png"), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "w.pt" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def run_predict(*argv):
    result = subprocess.run([sys.executable, str(ROOT / "predict.py"), *argv], capture_output=True, text=True,
                            timeout=300)
    return result.returncode, result.stdout, result.stderr


def assert_one_line_error(code, err, *fragments):
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "error" in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save({"model": BiSeNetV2(19).state_dict()}, path)
    return path


def test_overlay_weighs_the_palette_by_alpha(checkpoint, tmp_path):
    """--alpha weighs the colours, 1 - alpha the photo: exact at 0 and 1, rounded between."""
    photo = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "street.png")
    for alpha in (0.0, 0.25, 1.0):
        out = tmp_path / f"out{alpha}"
        assert predict.main(["--weights", str(checkpoint), "--input", str(tmp_path / "street.png"), "--out", str(out),
                             "--device", "cpu", "--overlay", "--alpha", str(alpha)]) == 0
        color = np.asarray(Image.open(out / "street_color.png"), np.float64)
        overlay = np.asarray(Image.open(out / "street_overlay.png"), np.float64)
        blend = (1 - alpha) * photo + alpha * color
        bound = 0.0 if alpha in (0.0, 1.0) else 0.5 + 1e-3  # float32's error below 1e-4 at 0..255
        assert np.abs(overlay - blend).max() <= bound, alpha


def test_out_inside_input_is_never_read(checkpoint, tmp_path):
    """--out and --label-ids inside --input; the label ids of a checkpoint that records
    Cityscapes' classes (as train_ddp.py's do); --label-ids where it would break the evaluator
    or overwrite an input."""
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)).save(images / "a.png")
    trained = tmp_path / "best.pt"
    torch.save({"model": torch.load(checkpoint)["model"], "config": {"dataset": data.dataset_info_json(data.CITYSCAPES)}},
               trained)
    common = ["--weights", str(trained), "--input", str(images), "--out", str(images / "pred"), "--device", "cpu",
              "--label-ids", str(images / "ids")]
    for _ in range(2):
        code, _, err = run_predict(*common)
        assert code == 0 and "1 image(s)" in err and f"--label-ids {images / 'ids'} is inside --input" in err, err
    assert sorted(p.name for p in (images / "pred").iterdir()) == ["a_color.png", "a_trainIds.png"]
    train_ids = np.asarray(Image.open(images / "pred" / "a_trainIds.png"))
    assert sorted(p.name for p in (images / "ids").iterdir()) == ["a.png"]  # one PNG a frame, the evaluator's form
    np.testing.assert_array_equal(np.asarray(Image.open(images / "ids" / "a.png")),
                                  data.train_id_to_label_id()[train_ids])
    for label_dir in (images / "pred", images):  # the evaluator would meet several PNGs a frame
        code, _, err = run_predict(*common[:-1], str(label_dir))
        assert_one_line_error(code, err, f"--label-ids {label_dir}: holds --out {images / 'pred'}")
    code, _, err = run_predict(*common[:2], "--input", str(images / "a.png"), "--out", str(tmp_path / "o"),
                               "--label-ids", str(images))
    assert_one_line_error(code, err, f"--label-ids {images}: would overwrite the input {images / 'a.png'}")
    # an --out or --label-ids that is --input or holds it: said so, not "no images"
    for out, flags, named in ((images, [], f"--out {images}"), (tmp_path, [], f"--out {tmp_path}"),
                              (tmp_path / "o", ["--label-ids", str(images)], f"--label-ids {images}")):
        code, _, err = run_predict(*common[:2], "--input", str(images), "--out", str(out), *flags)
        assert_one_line_error(code, err, f"{named}: is --input {images} or holds it")


def test_colliding_names_out_file_and_devices_are_one_line(checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    photo = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    photo.save(images / "street.png")
    photo.save(images / "street.jpg")
    out = tmp_path / "out"
    code, _, err = run_predict("--weights", str(checkpoint), "--input", str(images), "--out", str(out))
    assert_one_line_error(code, err, str(images / "street.jpg"), str(images / "street.png"), "street_trainIds.png")
    assert not out.exists()
    (images / "street.jpg").unlink()
    (tmp_path / "file").write_text("in the way")
    code, _, err = run_predict("--weights", str(checkpoint), "--input", str(images), "--out", str(tmp_path / "file"))
    assert_one_line_error(code, err, f"--out {tmp_path / 'file'}")
    for alpha in ("1.5", "nan"):
        code, _, err = run_predict("--weights", str(checkpoint), "--input", str(images), "--out", str(out),
                                   "--overlay", "--alpha", alpha)
        assert_one_line_error(code, err, f"--alpha {float(alpha)}: must be between 0 and 1")
    for weights, device in ((checkpoint, "banana"), (checkpoint, "cuda:7"), (checkpoint, "mps"), (checkpoint, "meta"),
                            (tmp_path / "model.onnx", "xpu")):
        code, _, err = run_predict("--weights", str(weights), "--input", str(images), "--out", str(out),
                                   "--device", device)
        assert_one_line_error(code, err, f"--device {device}")


def test_weights_holding_nan_are_one_line_and_write_nothing(tmp_path):
    state = BiSeNetV2(19).state_dict()
    state["semantic.stem.conv.bn.running_var"][0] = float("nan")
    torch.save({"model": state}, tmp_path / "nan.pt")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    code, _, err = run_predict("--weights", str(tmp_path / "nan.pt"), "--input", str(tmp_path / "a.png"), "--out",
                               str(tmp_path / "out"), "--device", "cpu")
    assert_one_line_error(code, err, f"--weights: {tmp_path / 'nan.pt'}: NaN or infinity in 1 tensor, the first "
                                     "semantic.stem.conv.bn.running_var")
    assert not list((tmp_path / "out").iterdir())


def test_16_bit_greyscale_is_read_by_its_top_8_bits(checkpoint, tmp_path):
    """A 16-bit greyscale PNG segments as the 8-bit greyscale image of value >> 8; a float
    image is refused by name (skipped, exit code 1)."""
    images = tmp_path / "images"
    images.mkdir()
    wide = np.random.default_rng(0).integers(0, 65536, (40, 60)).astype(np.uint16)
    Image.fromarray(wide).save(images / "wide.png")
    Image.fromarray((wide >> 8).astype(np.uint8)).save(images / "narrow.png")
    Image.fromarray(wide.astype(np.float32) / 65535).save(images / "float.tif")
    out = tmp_path / "out"
    code, _, err = run_predict("--weights", str(checkpoint), "--input", str(images), "--out", str(out),
                               "--device", "cpu")
    assert code == 1 and "float.tif: 32-bit float greyscale (mode F)" in err, err
    wide_ids = np.asarray(Image.open(out / "wide_trainIds.png"))
    np.testing.assert_array_equal(wide_ids, np.asarray(Image.open(out / "narrow_trainIds.png")))


def test_outputs_that_cannot_be_written_stop_in_one_line_and_keep_the_old_files(checkpoint, tmp_path, monkeypatch,
                                                                                  capsys):
    """A full disk: the output being written is named, the run stops (exit code 2), and the
    earlier run's file of that name is left whole (written beside it, renamed over it)."""
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_color.png").write_bytes(b"the earlier run's colours")
    save = Image.Image.save

    def full_disk_for_colours(image, fp, *args, **kwargs):
        if image.mode != "RGB":
            return save(image, fp, *args, **kwargs)
        fp.write(b"half a PNG")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Image.Image, "save", full_disk_for_colours)
    assert predict.main(["--weights", str(checkpoint), "--input", str(tmp_path / "a.png"), "--out", str(out),
                         "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"predict.py: error: --out: cannot write {out / 'a_color.png'} (No space left on device)"
    assert (out / "a_color.png").read_bytes() == b"the earlier run's colours"
    assert sorted(p.name for p in out.iterdir()) == ["a_color.png", "a_trainIds.png"]  # no temporary file left


def test_preprocess_and_normalize_photos_are_paddlesegs_normalisation_bit_for_bit():
    """(rgb / 255 - 0.5) / 0.5 in float32, as numpy computes it, for every value (a plane of
    all 256) and at a size whose rows leave a vector tail; RGBA and greyscale become RGB."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    odd = np.random.default_rng(0).integers(0, 256, (37, 53, 3), np.uint8)
    for array in (np.stack([values, values[::-1], values.T], -1), odd):
        expected = ((array.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None]
        actual = predict.preprocess([Image.fromarray(array), Image.fromarray(array)])
        assert actual.dtype == torch.float32 and actual.shape == (2, 3, *array.shape[:2]) and actual.is_contiguous()
        assert np.array_equal(actual[1].numpy(), expected[0]) and np.array_equal(actual[:1].numpy(), expected)
        on_device = data.normalize_photos(torch.from_numpy(array)[None], data.normalize_table("cpu"))  # evaluation's
        assert on_device.shape == expected.shape and np.array_equal(on_device.numpy(), expected)
    with pytest.raises(ValueError, match=r"^photos must be \(N, H, W, 3\) uint8 RGB, got \(1, 37, 53, 3\) torch.float32$"):
        data.normalize_photos(torch.from_numpy(odd)[None].float(), data.normalize_table("cpu"))
    grey = Image.fromarray(values)
    assert torch.equal(predict.preprocess([grey]), predict.preprocess([grey.convert("RGB")]))
    rgba = Image.fromarray(np.dstack([odd, odd[..., 0]]), "RGBA")
    assert torch.equal(predict.preprocess([rgba]), predict.preprocess([Image.fromarray(odd)]))


def test_preprocess_reads_photos_by_read_photos_rule(tmp_path):
    """preprocess (the Python API) makes 16-bit greyscale RGB by its top 8 bits, as predict.py
    and training read the file (PIL's convert('RGB') saturated it), and refuses what they refuse."""
    wide = np.random.default_rng(0).integers(0, 65536, (6, 10)).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    expected = predict.preprocess([Image.fromarray((wide >> 8).astype(np.uint8))])
    read = torch.from_numpy(data.read_photo(tmp_path / "wide.png")).permute(2, 0, 1)[None].float()
    assert torch.equal(data.normalize(read), expected)
    for photo in (Image.open(tmp_path / "wide.png"), Image.fromarray(wide), Image.fromarray(wide.astype(np.int32))):
        assert torch.equal(predict.preprocess([photo]), expected), photo.mode
    Image.fromarray(wide.astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'float.tif'}: 32-bit float greyscale \(mode F\)"):
        predict.preprocess([Image.open(tmp_path / "float.tif")])
    with pytest.raises(ValueError, match=r"^photos\[1\]: 32-bit greyscale values -1\.\.0 are outside 0\.\.65535$"):
        predict.preprocess([Image.fromarray(wide), Image.fromarray(np.array([[0, -1]], np.int32))])


@pytest.mark.parametrize("count", ["0", "-1", "256"])
def test_num_classes_outside_1_to_255_is_one_line(checkpoint, tmp_path, capsys, count):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    for script, flags in ((predict, ["--input", str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]),
                          (export, ["--out", str(tmp_path / "m.onnx")])):
        assert script.main(["--weights", str(checkpoint), *flags, "--num-classes", count]) == 2
        err = capsys.readouterr().err
        assert err == f"{script.__name__}.py: error: --num-classes {count}: must be in 1..255\n", err
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("script, flags, named", [
    ("predict.py", ["--weights", "w.pt", "--input", "in", "--out", "out", "--alpha", "half"],
     "argument --alpha: invalid float value: 'half'"),
    ("export.py", ["--weights", "w.pt", "--out", "m.onnx", "--size", "64"], "argument --size: expected 2 arguments"),
])
def test_a_flag_argparse_refuses_is_one_line_without_the_usage(script, flags, named):
    result = subprocess.run([sys.executable, str(ROOT / script), *flags], capture_output=True, text=True, timeout=300)
    assert_one_line_error(result.returncode, result.stderr, f"{script}: error: {named}")
