"""Training on your own data (tests/test_own_dataset.py prepares it): fine-tuning from
weights of another number of classes, class weights, sliding-window inference, the dataset's
classes in evaluation, checkpoints, exports and predictions; through the command line where
a user meets them."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import data
import predict
import train_ddp
from bisenetv2 import BiSeNetV2, load_matching, load_paddleseg
from conftest import shared_fixture
from datasets import make_binary_folders, make_dataset
from test_train import TINY, assert_one_line_error, load, run_script

HEAD_CONVS = [f"{head}.classifier.{name}" for head in ("head", "aux_heads.0", "aux_heads.1", "aux_heads.2",
                                                         "aux_heads.3") for name in ("weight", "bias")]


# --- sliding windows ---------------------------------------------------------------------

def test_slide_windows_are_paddlesegs_grid():
    # PaddleSeg's slide_inference: rows = ceil((H - h) / stride) + 1, the last one moved back to end at H
    assert predict.slide_windows(5, 7, (3, 4), (2, 2)) == [(0, 3, 0, 4), (0, 3, 2, 6), (0, 3, 3, 7),
                                                          (2, 5, 0, 4), (2, 5, 2, 6), (2, 5, 3, 7)]
    assert predict.slide_windows(4, 4, (8, 8), (2, 2)) == [(0, 4, 0, 4)]  # a window larger than the image
    with pytest.raises(ValueError, match="no prediction"):  # columns 4 and 5 of every row in no window
        predict.slide_windows(5, 12, (3, 4), (2, 6))
    windows = predict.slide_windows(100, 203, (32, 64))  # default stride: half a window
    covered = np.zeros((100, 203), int)
    for top, bottom, left, right in windows:
        assert (bottom - top, right - left) == (32, 64)
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1 and len(windows) == (math.ceil(68 / 16) + 1) * (math.ceil(139 / 32) + 1)


def test_slide_logits_average_the_windows():
    images = torch.randn(2, 3, 37, 53, dtype=torch.float64)
    pointwise = lambda x: torch.stack([x[:, 0] * 2, x[:, 1] - x[:, 2]], 1)  # noqa: E731
    torch.testing.assert_close(predict.slide_logits(pointwise, images, (16, 24), (5, 7)), pointwise(images).float())
    counting = lambda x: torch.ones(x.shape[0], 1, *x.shape[2:])  # noqa: E731  every window adds 1: the mean is 1
    assert torch.equal(predict.slide_logits(counting, images, (16, 24), (5, 7)), torch.ones(2, 1, 37, 53))
    torch.manual_seed(0)
    model = BiSeNetV2(4).eval()
    with torch.no_grad():  # a window covering the image is whole-image inference
        torch.testing.assert_close(predict.slide_logits(model, images.float(), (64, 64)), model(images.float()))


# --- fine-tuning from other weights ------------------------------------------------------

def test_load_matching_paddleseg_weights_into_3_classes(tmp_path):
    weights = shared_fixture("paddleseg_bisenetv2", "bisenetv2_random.pdparams")
    source = load_paddleseg(BiSeNetV2(19), weights).state_dict()
    torch.manual_seed(1)
    model = BiSeNetV2(3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    skipped = load_matching(model, weights)
    assert skipped == sorted(HEAD_CONVS)
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh[key] if key in HEAD_CONVS or key.endswith("num_batches_tracked")
                           else source[key]), key
    torch.save({"model": {"other.weight": torch.zeros(3)}}, tmp_path / "unrelated.pt")
    with pytest.raises(ValueError, match="no tensor of it fits"):
        load_matching(BiSeNetV2(3), tmp_path / "unrelated.pt")


def test_train_fine_tunes_19_class_weights_into_3_classes_with_class_weights(tmp_path):
    root = make_dataset(tmp_path / "data", num_classes=3)
    torch.manual_seed(0)
    source = BiSeNetV2(19).state_dict()
    torch.save({"model": source}, tmp_path / "cityscapes.pt")
    common = ["--data-dir", str(root), "--num-classes", "3", "--iters", "2", "--save-interval", "2",
              "--weights", str(tmp_path / "cityscapes.pt"), *TINY]
    assert_one_line_error(*run_script(*common, "--save-dir", str(tmp_path / "strict")), "--weights",
                          "mis-shaped: head.classifier.weight (19, 128, 1, 1) (expected (3, 128, 1, 1))",
                          "(--init-only loads the tensors that fit)")
    code, out, err = run_script(*common, "--init-only", "--class-weights", "auto", "--save-dir", str(tmp_path / "out"))
    assert code == 0, err
    for name in HEAD_CONVS:
        assert f"--init-only: {name} " in out + err
    assert "--class-weights auto: median frequency balancing" in out + err
    checkpoint = load(tmp_path / "out" / "iter_2.pt")
    weights = checkpoint["config"]["class_weights"]
    assert len(weights) == 3 and sorted(weights)[1] == 1.0  # the median class weighs 1
    assert checkpoint["config"]["init_only"] is True
    assert checkpoint["model"]["head.classifier.weight"].shape[0] == 3


def test_median_frequency_weights():
    assert train_ddp.median_frequency_weights([100, 300, 600, 0]) == [3.0, 1.0, 0.5, 0.0]


@pytest.mark.parametrize("flags, fragment", [
    (["--class-weights", "1", "2"], "2 weights for 3 classes"),
    (["--class-weights", "1", "-2", "1"], "--class-weights must be"),
    (["--class-weights", "0", "0", "0"], "--class-weights must be"),
    (["--class-weights", "nan", "1", "1"], "--class-weights must be"),
    (["--init-only"], "--init-only needs --weights"),
    (["--stride", "8", "8"], "--stride must be"),
    (["--slide", "8", "8", "--stride", "8", "9"], "--stride must be positive and at most --slide"),
    (["--slide", "0", "8"], "--slide must be"),
])
def test_bad_fine_tune_flags_are_one_line_errors(tmp_path, flags, fragment):
    root = make_dataset(tmp_path / "data", num_train=1, num_val=1, num_classes=3)
    assert_one_line_error(*run_script("--data-dir", str(root), "--num-classes", "3", "--iters", "1",
                                      "--save-dir", str(tmp_path / "out"), *TINY, *flags), fragment)


def test_eval_and_predict_with_a_covering_window_equal_whole_image(tmp_path, capsys):
    root = make_dataset(tmp_path / "data", num_train=1, num_val=2, num_classes=3)
    torch.manual_seed(0)
    torch.save({"model": BiSeNetV2(3).state_dict()}, tmp_path / "w.pt")
    common = ["--data-dir", str(root), "--num-classes", "3", "--eval-only", "--weights", str(tmp_path / "w.pt"),
              "--kernels", "torch"]
    tables = []
    for extra in ([], ["--slide", "64", "64"]):  # the window covers the 40x60 frames
        assert train_ddp.main([*common, *extra]) == 0
        out = capsys.readouterr().out
        tables.append(out[out.index("class  IoU"):])
    assert tables[0] == tables[1]
    outputs = []
    for extra in ([], ["--slide", "64", "64"]):
        out_dir = tmp_path / f"pred{len(outputs)}"
        assert predict.main(["--weights", str(tmp_path / "w.pt"), "--num-classes", "3", "--device", "cpu",
                             "--input", str(root / "val"), "--out", str(out_dir), *extra]) == 0
        outputs.append(np.asarray(Image.open(out_dir / "img0_trainIds.png")))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert_one_line_error(*run_script("--weights", str(tmp_path / "w.pt"), "--input", str(root / "val"),
                                      "--out", str(tmp_path / "p"), "--stride", "4", "4", script="predict.py"),
                          "--stride needs --slide")
    assert_one_line_error(*run_script("--weights", str(tmp_path / "w.pt"), "--input", str(root / "val"),
                                      "--out", str(tmp_path / "p"), "--slide", "32", "32", "--stride", "33", "8",
                                      script="predict.py"),
                          "--stride 33 8: longer than --slide 32 32")


def test_eval_and_predict_with_flip_and_scales_are_paddlesegs_aug_inference(tmp_path, capsys):
    """--flip --scales 0.5 1.25: evaluation's --pred-dir and predict.py write the same
    predictions, the argmax of the logits averaged over each scale of the image and its
    mirror image, each resized back (PaddleSeg's aug_inference since 2.8, written out here;
    the sum of softmaxes of 2.7 and before gives other argmaxes on these frames)."""
    root = make_dataset(tmp_path / "data", num_train=1, num_val=2, num_classes=3)
    torch.manual_seed(0)
    model = BiSeNetV2(3).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "w.pt")
    aug = ["--flip", "--scales", "0.5", "1.25"]
    assert train_ddp.main(["--data-dir", str(root), "--num-classes", "3", "--eval-only", "--weights",
                           str(tmp_path / "w.pt"), "--kernels", "torch", "--pred-dir", str(tmp_path / "eval"),
                           *aug]) == 0
    assert predict.main(["--weights", str(tmp_path / "w.pt"), "--num-classes", "3", "--device", "cpu",
                         "--input", str(root / "val"), "--out", str(tmp_path / "pred"), *aug]) == 0
    assert "logits averaged over scales 0.5 1.25, each flipped too" in capsys.readouterr().err
    for name in ("img0", "img1"):
        photo = np.asarray(Image.open(root / "val" / f"{name}.png"))
        image = data.normalize(data.image_tensor(photo))[None]  # (1, 3, 40, 60)
        total, softmaxes = 0, 0
        with torch.no_grad():
            for scale in (0.5, 1.25):
                scaled = torch.nn.functional.interpolate(image, size=(int(40 * scale + 0.5), int(60 * scale + 0.5)),
                                                         mode="bilinear", align_corners=False)
                for logits in (model(scaled), model(scaled.flip(-1)).flip(-1)):
                    resized = torch.nn.functional.interpolate(logits, size=(40, 60), mode="bilinear",
                                                              align_corners=False)
                    total, softmaxes = total + resized, softmaxes + resized.softmax(1)
        expected = (total / 4).argmax(1)[0].numpy()
        assert (softmaxes.argmax(1)[0].numpy() != expected).any()  # the test tells the two apart
        predicted = np.asarray(Image.open(tmp_path / "pred" / f"{name}_trainIds.png"))
        np.testing.assert_array_equal(predicted, expected)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "eval" / "val" / f"{name}.png")), expected)
    common = ["--weights", str(tmp_path / "w.pt"), "--input", str(root / "val"), "--out", str(tmp_path / "p")]
    assert_one_line_error(*run_script(*common, "--scales", "1", "0", script="predict.py"),
                          "--scales 1.0 0.0: each must be finite and positive")
    assert predict.main([*common, "--num-classes", "3", "--device", "cpu", "--scales", "0.01"]) == 0  # 1x1: no crash
    assert_one_line_error(*run_script(*common, "--cuda-graph", "--scales", "0.5", "1", script="predict.py"),
                          "--cuda-graph keeps one graph per input size")
    assert_one_line_error(*run_script(*common, "--num-classes", "3", "--label-ids", str(tmp_path / "ids"),
                                      script="predict.py"),
                          "--label-ids: the classes from", "have no Cityscapes label ids")


def test_pred_dir_mirrors_the_val_images_folders(tmp_path, monkeypatch):
    """--pred-dir keeps each frame's path below the deepest folder holding every image's
    folder, so frames of one name in other folders get files of their own (it wrote both to
    x/f.png, and flattened nested folders), whether the list's paths are relative (with
    '..'), absolute, or both; two frames that would write one file (f.jpg and f.png in a
    folder), or a file that would overwrite a val file, stop the run at start, in one line."""
    root = make_dataset(tmp_path / "data", num_train=1, num_val=3, num_classes=3)
    torch.manual_seed(0)
    torch.save({"model": BiSeNetV2(3).eval().state_dict()}, tmp_path / "w.pt")
    for folder in ("a/x", "b/x", "a/x/deeper"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(("a/x/f.png", "b/x/f.png", "a/x/deeper/g.png")):
        (root / "val" / f"img{i}.png").rename(root / image)
    (root / "val.txt").write_text(f"val/../a/x/f.png val/lab0.png\n{root / 'b/x/f.png'} val/lab1.png\n"
                                  "a/x/deeper/g.png val/lab2.png\n")
    monkeypatch.chdir(tmp_path)  # a relative --data-dir, one absolute list entry
    common = ["--data-dir", "data", "--num-classes", "3", "--eval-only", "--weights", str(tmp_path / "w.pt"),
              "--kernels", "torch", "--save-dir", str(tmp_path / "out")]
    assert train_ddp.main([*common, "--pred-dir", "pred"]) == 0
    assert sorted(str(p.relative_to(tmp_path / "pred")) for p in (tmp_path / "pred").rglob("*.png")) == [
        "a/x/deeper/g.png", "a/x/f.png", "b/x/f.png"]
    assert_one_line_error(*run_script(*common, "--pred-dir", str(root)),
                          f"--pred-dir {root}: would overwrite the val file {root / 'a/x/f.png'}")
    Image.open(root / "b/x/f.png").save(root / "b/x/f.jpg")
    (root / "val.txt").write_text("b/x/f.png val/lab0.png\nb/x/f.jpg val/lab1.png\n")
    code, out, err = run_script(*common, "--pred-dir", str(tmp_path / "pred2"))
    assert_one_line_error(code, out, err, "--pred-dir: data/b/x/f.png and data/b/x/f.jpg would both "
                          f"write {tmp_path / 'pred2' / 'x' / 'f.png'}; rename one")
    assert not (tmp_path / "pred2").exists()


def test_own_dataset_from_folders_to_predictions(tmp_path):
    """The README's worked example: 0/255 masks -> prepare_data -> a fine-tune from 19-class
    weights with class weights and evaluation -> predict.py, each with the documented commands."""
    images, masks = make_binary_folders(tmp_path / "mine", n=6)
    root = tmp_path / "prepared"
    code, _, err = run_script("--images", str(images), "--labels", str(masks), "--out", str(root),
                              "--label-map", "0:0", "255:1", "--classes", "background", "object",
                              "--val-fraction", "0.34", script="prepare_data.py")
    assert code == 0, err
    torch.manual_seed(0)
    torch.save({"model": BiSeNetV2(19).state_dict()}, tmp_path / "cityscapes.pt")
    save_dir, pred_dir = tmp_path / "out", tmp_path / "val_preds"
    train = ["--data-dir", str(root), "--weights", str(tmp_path / "cityscapes.pt"), "--init-only", "--iters", "2",
             "--save-interval", "2", "--do-eval", "--pred-dir", str(pred_dir), "--save-dir", str(save_dir), *TINY]
    assert_one_line_error(*run_script(*train, "--num-classes", "3"), "--num-classes 3", "dataset.json says 2")
    code, out, err = run_script(*train, "--class-weights", "auto")
    assert code == 0, err
    assert "dataset: 2 classes" in out + err and "        object  " in out  # the IoU table names the classes
    predicted = [np.asarray(Image.open(p)) for p in pred_dir.rglob("*.png")]
    assert len(predicted) == 2 and all(set(np.unique(p)) <= {0, 1} for p in predicted)  # train ids, not label ids
    code, _, err = run_script("--weights", str(save_dir / "iter_2.pt"), "--input", str(images), "--out",
                              str(tmp_path / "pred"), "--device", "cpu", script="predict.py")
    assert code == 0, err
    ids = np.asarray(Image.open(tmp_path / "pred" / "frame000_trainIds.png"))
    color = np.asarray(Image.open(tmp_path / "pred" / "frame000_color.png"))
    assert set(np.unique(ids)) <= {0, 1}
    np.testing.assert_array_equal(color, data.dataset_palette(data.read_dataset_info(root))[ids])
    # the export records the dataset; predict.py on it draws the same colours
    code, _, err = run_script("--weights", str(save_dir / "iter_2.pt"), "--out", str(tmp_path / "m.onnx"),
                              "--size", "24", "32", script="export.py")
    assert code == 0, err
    assert data.dataset_of_weights(tmp_path / "m.onnx")[0] == data.read_dataset_info(root)
    code, _, err = run_script("--weights", str(tmp_path / "m.onnx"), "--input", str(images / "frame000.jpg"),
                              "--out", str(tmp_path / "onnx_pred"), script="predict.py")
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "onnx_pred" / "frame000_color.png")),
                                  data.dataset_palette(data.read_dataset_info(root))[
                                      np.asarray(Image.open(tmp_path / "onnx_pred" / "frame000_trainIds.png"))])
