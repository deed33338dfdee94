"""train_ddp.py: augmentation, evaluation, checkpoints, exact resume, bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_ddp
from conftest import ROOT, shared_fixture


def make_dataset(root, num_train=4, num_val=2, size=(40, 60), num_classes=19, seed=0):
    """A tiny dataset in the list-file layout: random photos, labels of random blocks."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("val", num_val)):
        lines = []
        for i in range(count):
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            label = rng.integers(0, num_classes, (size[0] // 10 + 1, size[1] // 10 + 1)).astype(np.uint8)
            label = np.kron(label, np.ones((10, 10), np.uint8))[:size[0], :size[1]]
            label[:3] = 255
            folder = Path(root) / split
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"img{i}.png")
            Image.fromarray(label).save(folder / f"lab{i}.png")
            lines.append(f"{split}/img{i}.png {split}/lab{i}.png")
        (Path(root) / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return Path(root)


def sample_dataset(tmp_path):
    """The real Cityscapes frame of ../shared as both train and val, train ids derived from
    its labelIds with cityscapesscripts' table."""
    from cityscapesscripts.helpers.labels import id2label
    source = shared_fixture("cityscapes_sample")
    root = tmp_path / "cityscapes"
    shutil.copytree(source, root)
    label_ids = next(root.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    table = np.full(256, 255, np.uint8)
    for label_id, label in id2label.items():
        if 0 <= label_id < 256 and label.trainId not in (255, -1):
            table[label_id] = label.trainId
    train_ids = label_ids.with_name(label_ids.name.replace("labelIds", "labelTrainIds"))
    Image.fromarray(table[np.asarray(Image.open(label_ids))]).save(train_ids)
    image = next(root.glob("leftImg8bit/val/*/*.png"))
    line = f"{image.relative_to(root)} {train_ids.relative_to(root)}\n"
    (root / "train.txt").write_text(line)
    (root / "val.txt").write_text(line)
    return root


def args_for(*argv):
    return train_ddp.parse_args(["--data-dir", "unused", *argv])


# --- augmentation -----------------------------------------------------------------------

def test_scale_set_is_paddleseg_step_scaling():
    args = args_for()
    rng = np.random.default_rng(0)
    seen = {draw["scaled_size"] for draw in (train_ddp.draw_augmentation(rng, 100, 200, args) for _ in range(400))}
    expected = {(int(round(s * 100)), int(round(s * 200))) for s in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)}
    assert seen == expected


def test_padding_values_and_label_values_preserved():
    args = args_for("--crop-size", "64", "96")
    image = torch.full((3, 20, 30), 200.0)
    label = torch.from_numpy(np.kron(np.arange(6, dtype=np.uint8).reshape(2, 3), np.ones((10, 10), np.uint8)))
    params = dict(scaled_size=(20, 30), crop_offset=(0, 0), flip=False, distort_order=[0, 1, 2, 3],
                  distort_apply=[False] * 4, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0)
    out_image, out_label = train_ddp.augment(image, label, params, args.crop_size)
    assert out_image.shape == (3, 64, 96) and out_label.shape == (64, 96)
    # padded bottom/right: image 127.5 -> (127.5 / 255 - 0.5) / 0.5 = 0, label 255
    assert torch.all(out_image[:, 20:] == 0) and torch.all(out_image[:, :, 30:] == 0)
    assert torch.all(out_label[20:] == 255) and torch.all(out_label[:, 30:] == 255)
    torch.testing.assert_close(out_image[:, :20, :30], torch.full((3, 20, 30), 200 / 255 * 2 - 1))
    assert torch.equal(out_label[:20, :30], label)
    # nearest resizing never invents label values
    for scale in (0.5, 0.75, 1.25, 2.0):
        params["scaled_size"] = (int(round(20 * scale)), int(round(30 * scale)))
        _, resized = train_ddp.augment(image, label, params, args.crop_size)
        assert set(resized.unique().tolist()) <= set(range(6)) | {255}


def test_flip_moves_image_and_label_together():
    args = args_for("--crop-size", "16", "24")
    label = torch.arange(24, dtype=torch.uint8).repeat(16, 1)           # label = column index
    image = (label.float() * 10).expand(3, 16, 24).clone()               # image encodes the column
    for flip in (False, True):
        params = dict(scaled_size=(16, 24), crop_offset=(0, 0), flip=flip, distort_order=[0, 1, 2, 3],
                      distort_apply=[False] * 4, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0)
        out_image, out_label = train_ddp.augment(image, label, params, args.crop_size)
        pixel = ((out_image + 1) / 2 * 255).round()
        assert torch.equal(pixel[0], out_label.float() * 10)
        assert out_label[0, 0] == (23 if flip else 0)


def test_distort_matches_pil_enhance():
    from PIL import ImageEnhance
    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    image = torch.from_numpy(np.asarray(photo).transpose(2, 0, 1).copy()).float()
    cases = [(0, "brightness", ImageEnhance.Brightness), (2, "saturation", ImageEnhance.Color)]
    for op, name, enhancer in cases:
        apply = [i == op for i in range(4)]
        params = dict(distort_order=[0, 1, 2, 3], distort_apply=apply, brightness=1.3, contrast=1.0,
                      saturation=0.7, hue=0.0)
        ours = train_ddp.distort(image, params)
        theirs = np.asarray(enhancer(photo).enhance(params[name])).transpose(2, 0, 1)
        # PIL truncates each blend to uint8 (< 1 grey level) and rounds its grey image to uint8
        # (< 0.5, weighted by 1 - factor in the blend)
        bound = 1 + 0.5 * abs(1 - params[name]) + 1e-3
        assert (ours - torch.from_numpy(theirs.astype(np.float32))).abs().max() <= bound
    # hue: a full turn (256 steps of PIL's uint8 hue) is the identity, half a turn is not
    full = dict(distort_order=[3], distort_apply=[False, False, False, True], hue=256.0)
    torch.testing.assert_close(train_ddp.distort(image, full), image, atol=1e-3, rtol=0)
    half = dict(full, hue=128.0)
    assert (train_ddp.distort(image, half) - image).abs().max() > 50


def test_sampler_shards_ranks_and_resumes():
    full = list(train_ddp.StepSampler(10, 2, 0, 2, seed=1, start_iter=0, iters=12))
    other = list(train_ddp.StepSampler(10, 2, 1, 2, seed=1, start_iter=0, iters=12))
    resumed = list(train_ddp.StepSampler(10, 2, 0, 2, seed=1, start_iter=7, iters=12))
    assert resumed == full[7:]
    # each epoch of 10 positions covers every sample once across the two ranks
    positions = sorted(p for batch in full + other for _, p in batch)
    assert positions == list(range(48))
    first_epoch = [i for batch in full[:3] + other[:3] for i, p in batch if p < 10]
    assert sorted(first_epoch) == list(range(10))


# --- loss -------------------------------------------------------------------------------

def test_losses_against_hand_computed_values():
    import kernels
    # 1 image, 2 classes, logits already at label resolution (upsampling is the identity)
    logits = torch.tensor([[[[0.0, 2.0, 0.0, -1.0]], [[0.0, 0.0, 3.0, 1.0]]]])  # (1, 2, 1, 4)
    labels = torch.tensor([[[0, 1, 255, 0]]])
    # per-pixel CE: log(2), log(1 + e^2) - 0, ignored, log(1 + e^2) - (-1) + ... computed here:
    pixel = [np.log(2), np.log(1 + np.exp(2.0)), None, np.log(np.exp(-1.0) + np.exp(1.0)) + 1.0]
    ce = kernels.ohem_cross_entropy(logits, labels, thresh=None)
    assert ce.item() == pytest.approx((pixel[0] + pixel[1] + pixel[3]) / 3, rel=1e-6)
    # OHEM: -log(0.7) = 0.357; all three valid losses exceed it, k = 3 // 16 = 0 -> mean of all
    assert kernels.ohem_cross_entropy(logits, labels, thresh=0.7).item() == pytest.approx(ce.item(), rel=1e-6)
    # thresh 0.1: -log(0.1) = 2.303 -> only pixel 3 (2.127 + 1 = 3.127) passes;
    # min_kept 2 forces the fallback to the 2 largest: pixels 3 and 1
    assert kernels.ohem_cross_entropy(logits, labels, thresh=0.1, min_kept=1).item() == pytest.approx(pixel[3], rel=1e-6)
    assert kernels.ohem_cross_entropy(logits, labels, thresh=0.1, min_kept=2).item() == pytest.approx(
        (pixel[3] + pixel[1]) / 2, rel=1e-6)
    # min_kept above the valid count keeps all valid pixels
    assert kernels.ohem_cross_entropy(logits, labels, thresh=0.1, min_kept=50).item() == pytest.approx(ce.item(), rel=1e-6)


# --- evaluation -------------------------------------------------------------------------

def test_metrics_average_present_classes():
    confusion = torch.tensor([[3, 1, 0], [0, 0, 0], [2, 0, 4]])
    metrics = train_ddp.metrics_from_confusion(confusion)
    # class 0: 3 / (4 + 5 - 3) = 0.5; class 1: 0 / (0 + 1 - 0) = 0 (predicted only); class 2: 4 / 6
    assert metrics["class_IoU"] == pytest.approx([0.5, 0.0, 4 / 6])
    assert metrics["mIoU"] == pytest.approx((0.5 + 0 + 4 / 6) / 3)
    assert metrics["pixel_acc"] == pytest.approx(7 / 10)
    absent = train_ddp.metrics_from_confusion(torch.tensor([[5, 0], [0, 0]]))
    assert absent["class_IoU"] == [1.0, None] and absent["mIoU"] == 1.0


def test_eval_matches_official_cityscapes_evaluator(tmp_path, monkeypatch):
    root = sample_dataset(tmp_path)
    weights = shared_fixture("paddleseg_bisenetv2", "bisenetv2_random.pdparams")
    save_dir, pred_dir = tmp_path / "out", tmp_path / "pred"
    assert train_ddp.main(["--data-dir", str(root), "--eval-only", "--weights", str(weights), "--kernels", "torch",
                           "--save-dir", str(save_dir), "--pred-dir", str(pred_dir), "--flip",
                           "--scales", "0.75", "1.0"]) == 0
    ours = json.loads((save_dir / "eval_metrics.json").read_text())
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    official.args.quiet = True
    official.args.JSONOutput = False
    official.args.evalInstLevelScore = False
    official.args.predictionPath, official.args.predictionWalk = str(pred_dir), None
    ground_truth = sorted(str(p) for p in root.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    predictions = [official.getPrediction(official.args, gt) for gt in ground_truth]
    result = official.evaluateImgLists(predictions, ground_truth, official.args)
    assert ours["mIoU"] == pytest.approx(result["averageScoreClasses"], abs=1e-12)
    names = train_ddp.CITYSCAPES_CLASSES
    for name, iou in zip(names, ours["class_IoU"]):
        theirs = result["classScores"][name]
        assert (iou is None and np.isnan(theirs)) or iou == pytest.approx(theirs, abs=1e-12)


def test_learns_the_real_frame(tmp_path):
    """400 CPU iterations at 128x256 on the one real frame reach pixel accuracy >= 0.85."""
    root = sample_dataset(tmp_path)
    save_dir = tmp_path / "out"
    assert train_ddp.main(["--data-dir", str(root), "--iters", "400", "--crop-size", "128", "256",
                           "--batch-size", "4", "--num-workers", "1", "--log-iters", "100",
                           "--save-interval", "400", "--do-eval", "--kernels", "torch",
                           "--save-dir", str(save_dir)]) == 0
    metrics = json.loads((save_dir / "eval_metrics.json").read_text())
    assert metrics["pixel_acc"] >= 0.85
    assert (save_dir / "best.pt").is_file()


# --- checkpoints and exact resume -------------------------------------------------------

TINY = ["--crop-size", "32", "48", "--batch-size", "2", "--num-workers", "0", "--kernels", "torch",
        "--log-iters", "2"]


def test_checkpoint_contents_and_rotation(tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    save_dir = tmp_path / "out"
    assert train_ddp.main(["--data-dir", str(root), "--iters", "8", "--save-interval", "2",
                           "--keep-checkpoints", "2", "--save-dir", str(save_dir), *TINY]) == 0
    assert sorted(p.name for p in save_dir.glob("iter_*.pt")) == ["iter_6.pt", "iter_8.pt"]
    checkpoint = torch.load(save_dir / "iter_8.pt", weights_only=True)
    assert checkpoint["iter"] == 8 and checkpoint["args"]["iters"] == 8
    assert {"model", "optimizer", "scaler", "best"} <= checkpoint.keys()
    assert "config: " in capsys.readouterr().out
    lines = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines] == [2, 4, 6, 8]
    assert {"loss", "loss_main", "loss_aux4", "lr", "batch_cost", "reader_cost", "images_per_s"} <= lines[0].keys()


def assert_same_state(a, b):
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


def test_resume_is_bitwise_exact_in_process(tmp_path):
    root = make_dataset(tmp_path / "data")
    common = ["--data-dir", str(root), "--iters", "6", "--save-interval", "3", *TINY]
    assert train_ddp.main([*common, "--save-dir", str(tmp_path / "a")]) == 0
    # a run that stopped after iteration 3 (its later checkpoint removed), then resumed
    assert train_ddp.main([*common, "--save-dir", str(tmp_path / "b")]) == 0
    (tmp_path / "b" / "iter_6.pt").unlink()
    assert train_ddp.main([*common, "--save-dir", str(tmp_path / "b"), "--resume"]) == 0
    a = torch.load(tmp_path / "a" / "iter_6.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "iter_6.pt", weights_only=True)
    assert_same_state(a, b)


def torchrun(args, **kwargs):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "train_ddp.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_torchrun_sigkill_then_resume_is_bitwise_exact(tmp_path):
    root = make_dataset(tmp_path / "data", num_train=6)
    common = ["--data-dir", str(root), "--iters", "30", "--save-interval", "3", "--keep-checkpoints", "3", *TINY]
    reference = torchrun([*common, "--save-dir", str(tmp_path / "a")])
    output = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, output

    killed = torchrun([*common, "--save-dir", str(tmp_path / "b")])
    deadline = time.time() + 300
    while not (tmp_path / "b" / "iter_9.pt").exists():
        assert killed.poll() is None and time.time() < deadline, killed.communicate()[0]
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate()
    left = list((tmp_path / "b").glob("iter_*.pt"))
    assert left and all(train_ddp.read_checkpoint(p)["iter"] == train_ddp.checkpoint_iter(p) for p in left)

    resumed = torchrun([*common, "--save-dir", str(tmp_path / "b"), "--resume"])
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    assert_same_state(torch.load(tmp_path / "a" / "iter_30.pt", weights_only=True),
                      torch.load(tmp_path / "b" / "iter_30.pt", weights_only=True))


# --- bad input --------------------------------------------------------------------------

def run_script(*argv):
    result = subprocess.run([sys.executable, str(ROOT / "train_ddp.py"), *argv], capture_output=True, text=True,
                            timeout=300)
    return result.returncode, result.stderr


def assert_one_line_error(code, stderr, *fragments):
    assert code != 0
    assert "Traceback" not in stderr, stderr
    error_lines = [l for l in stderr.strip().splitlines() if "error" in l]
    assert len(error_lines) == 1, stderr
    for fragment in fragments:
        assert fragment in error_lines[0], stderr


def test_bad_data_dir_and_list(tmp_path):
    assert_one_line_error(*run_script("--data-dir", str(tmp_path / "nope"), *TINY), "nope")
    (tmp_path / "d").mkdir()
    assert_one_line_error(*run_script("--data-dir", str(tmp_path / "d"), *TINY), "train.txt")


def test_bad_list_entries_and_files(tmp_path):
    root = make_dataset(tmp_path / "data", num_train=2)
    save_dir = tmp_path / "out"
    base = ["--data-dir", str(root), "--iters", "2", "--save-dir", str(save_dir), *TINY]
    train_list = root / "train.txt"
    good = train_list.read_text()

    train_list.write_text(good + "train/missing.png train/lab0.png\n")
    assert_one_line_error(*run_script(*base), "missing.png")

    train_list.write_text("train/img0.png train/lab0.png\n")
    (root / "train" / "img0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert_one_line_error(*run_script(*base), "img0.png")

    make_dataset(root, num_train=2)
    Image.fromarray(np.full((40, 60), 40, np.uint8)).save(root / "train" / "lab1.png")  # train id 40
    assert_one_line_error(*run_script(*base), "lab1.png", "40")

    make_dataset(root, num_train=2)
    Image.fromarray(np.zeros((41, 60), np.uint8)).save(root / "train" / "lab0.png")
    assert_one_line_error(*run_script(*base), "img0.png", "lab0.png")
    assert not list(save_dir.glob("iter_*.pt"))


def test_bad_weights(tmp_path):
    root = make_dataset(tmp_path / "data")
    (tmp_path / "bad.pt").write_bytes(b"corrupt")
    for weights in (tmp_path / "bad.pt", tmp_path / "absent.pdparams"):
        assert_one_line_error(*run_script("--data-dir", str(root), "--eval-only", "--weights", str(weights),
                                          "--kernels", "torch"), weights.name)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    root = make_dataset(tmp_path / "data")
    save_dir = tmp_path / "out"
    real = train_ddp.segmentation_losses
    calls = {"n": 0}

    def poisoned(outputs, labels, loss_fn, args):
        calls["n"] += 1
        losses = real(outputs, labels, loss_fn, args)
        return losses * float("nan") if calls["n"] == 5 else losses

    monkeypatch.setattr(train_ddp, "segmentation_losses", poisoned)
    code = train_ddp.main(["--data-dir", str(root), "--iters", "8", "--save-interval", "2",
                           "--log-iters", "4", "--save-dir", str(save_dir), *TINY[:-2]])
    err = capsys.readouterr().err
    assert code == 2 and "non-finite loss at iteration 5" in err and "iter_4.pt" in err
    assert sorted(p.name for p in save_dir.glob("iter_*.pt")) == ["iter_2.pt", "iter_4.pt"]
    state = torch.load(save_dir / "iter_4.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def reference_augment(image, label, params, crop_size):
    """The textbook chain, written out with whole-image ops: F.interpolate the full image,
    pad bottom/right, crop, flip."""
    import torch.nn.functional as F
    size = params["scaled_size"]
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].to(torch.uint8)
    pad_h, pad_w = max(crop_size[0] - size[0], 0), max(crop_size[1] - size[1], 0)
    image = F.pad(image, (0, pad_w, 0, pad_h), value=127.5)
    label = F.pad(label, (0, pad_w, 0, pad_h), value=255)
    top, left = params["crop_offset"]
    image = image[:, top:top + crop_size[0], left:left + crop_size[1]]
    label = label[top:top + crop_size[0], left:left + crop_size[1]]
    if params["flip"]:
        image, label = image.flip(-1), label.flip(-1)
    return (train_ddp.distort(image, params) / 255 - 0.5) / 0.5, label


def test_batched_augmentation_equals_whole_image_chain():
    """The batch path (the one that runs on the GPU) against the whole-image chain, on the
    same parameters, every sample of a batch with its own draws."""
    args = args_for("--crop-size", "48", "64")
    rng = np.random.default_rng(5)
    images = torch.from_numpy(rng.integers(0, 256, (6, 3, 37, 53), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 19, (6, 37, 53), dtype=np.uint8))
    params = [train_ddp.draw_augmentation(rng, 37, 53, args) for _ in range(6)]
    params[0]["flip"], params[1]["flip"] = True, False
    out_images, out_labels = train_ddp.augment_batch(images, labels, params, args.crop_size)
    for b in range(6):
        expected_image, expected_label = reference_augment(images[b].float(), labels[b], params[b], args.crop_size)
        assert torch.equal(out_labels[b], expected_label)
        # the same taps and weights, summed in another order: float32 rounding of values
        # up to 255 (~255 * 2^-24 per op, a few ops), amplified at most 1.4x by the distortions
        torch.testing.assert_close(out_images[b], expected_image, atol=1e-4, rtol=0)
        assert set(out_labels[b].unique().tolist()) <= set(range(19)) | {255}


# --- packed splits, augmentation on the device, step flags ------------------------------

def pack(root):
    import prepare_data
    for split in ("train", "val"):
        prepare_data.pack_split(root, split, num_workers=1, log=lambda *a: None)


def test_packed_frames_and_device_augmentation_give_the_png_batches(tmp_path):
    """TrainSet over the pack returns the PNG path's samples bitwise; the raw batch
    augmented in the main process (augment_on_device, here on the CPU) has the same draws
    and agrees up to float rounding."""
    import prepare_data
    root = make_dataset(tmp_path / "data", num_train=5, size=(37, 53))
    pack(root)
    args = args_for("--crop-size", "48", "64", "--batch-size", "4")
    pairs = train_ddp.read_list(root, "train")
    index = prepare_data.read_pack(root, "train", mmap=False)
    png, packed = train_ddp.TrainSet(pairs, args), train_ddp.TrainSet(pairs, args, pack=index)
    raw = train_ddp.TrainSet(pairs, args, pack=index, raw=True)
    sampler = train_ddp.StepSampler(5, 4, 0, 1, seed=0, start_iter=0, iters=3)
    for batch_items in sampler:
        expected = [png[item] for item in batch_items]
        for (image, label), item in zip(expected, batch_items):
            got_image, got_label = packed[item]
            assert torch.equal(got_image, image) and torch.equal(got_label, label)
        images, labels, positions = train_ddp.collate_raw([raw[item] for item in batch_items])
        assert images.dtype == torch.uint8 and images.shape == (4, 37, 53, 3)
        out_images, out_labels = train_ddp.augment_on_device(images, labels, positions, args)
        for b, (image, label) in enumerate(expected):
            assert torch.equal(out_labels[b], label)
            # the same float32 ops on the same numbers; only the contrast op's mean is summed
            # over a batch instead of one image (another summation order): < 2e-4 grey
            # levels for 3072 values <= 255, scaled by |1 - contrast| <= 0.4, at most 1.4x
            # per later op, then / 127.5 -> well under 1e-5; 1e-4 leaves headroom
            torch.testing.assert_close(out_images[b], image, atol=1e-4, rtol=0)
        assert set(out_labels.unique().tolist()) <= set(range(19)) | {255}


def test_training_from_the_pack_equals_training_from_pngs(tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    common = ["--data-dir", str(root), "--iters", "2", "--save-interval", "2", *TINY]
    assert train_ddp.main([*common, "--save-dir", str(tmp_path / "png")]) == 0
    assert "data: PNG files" in capsys.readouterr().out
    pack(root)
    assert train_ddp.main([*common, "--save-dir", str(tmp_path / "packed")]) == 0
    out = capsys.readouterr().out
    assert f"data: packed {root / 'packed' / 'train.json'}" in out
    config = json.loads(out.split("config: ", 1)[1].splitlines()[0])
    assert config["aug_device"] == "cpu" and config["channels_last"] is False and config["fused_sgd"] is False
    assert_same_state(torch.load(tmp_path / "png" / "iter_2.pt", weights_only=True),
                      torch.load(tmp_path / "packed" / "iter_2.pt", weights_only=True))
    # a stale pack is a one-line error naming what changed; --no-pack reads the PNGs
    (root / "train.txt").write_text((root / "train.txt").read_text() + "\n")
    assert_one_line_error(*run_script(*common, "--save-dir", str(tmp_path / "stale")),
                          "train.txt changed", "prepare_data.py --pack")
    assert train_ddp.main([*common, "--no-pack", "--save-dir", str(tmp_path / "nopack")]) == 0
    assert_one_line_error(*run_script(*common, "--aug-device", "cuda", "--no-pack"), "needs a CUDA device")


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["torch", "cuda"])
def test_gpu_step_has_no_host_sync_and_gpu_augmentation_matches(tmp_path, kernels):
    root = make_dataset(tmp_path / "data", num_train=4, size=(64, 96))
    pack(root)
    args = train_ddp.parse_args(["--data-dir", str(root), "--crop-size", "64", "64", "--batch-size", "2",
                                 "--num-workers", "0", "--iters", "3", "--kernels", kernels])
    env = train_ddp.Env(args)
    train_ddp.resolve_speed_flags(args, env, packed=True)
    assert args.aug_device == "cuda" and args.channels_last and args.fused_sgd
    model, loss_fn = train_ddp.build_model(args, env)
    optimizer = train_ddp.make_optimizer(model, args)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    step_model, losses_fn = train_ddp.step_functions(model, args, env)
    index = train_ddp.find_pack(args)
    batches = iter(train_ddp.make_train_loader(train_ddp.read_list(root, "train"), index, args, env, 0))
    head_weights = train_ddp.head_weights_on(env.device, args)
    png = train_ddp.TrainSet(train_ddp.read_list(root, "train"), args)
    for it in range(3):
        batch = next(batches)
        torch.cuda.synchronize()
        # iteration 0 is a warm-up (cudnn autotuning and lazy initialisation may synchronise)
        torch.cuda.set_sync_debug_mode("error" if it > 0 else "default")
        try:
            images, labels = train_ddp.batch_to_device(batch, args, env)
            train_ddp.train_step(step_model, losses_fn, optimizer, scaler, images, labels, loss_fn, head_weights,
                                 0.01, it, args, env)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        items = list(train_ddp.StepSampler(4, 2, 0, 1, 0, it, it + 1))[0]
        for b, item in enumerate(items):
            image, label = png[item]
            assert torch.equal(labels[b].cpu(), label)
            # CUDA may contract a * b + c into one rounding (FMA): float32 rounding of values
            # up to 255 per op, a few ops, / 127.5
            torch.testing.assert_close(images[b].float().cpu(), image, atol=1e-4, rtol=0)


def table_rows(table):
    """A markdown table -> {first cell: [the other cells]}."""
    return {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| ---")}


def run_small_benchmark(tmp_path, size, warmup, workers):
    """--benchmark on a small packed dataset at tiny shapes -> the table it wrote."""
    root = make_dataset(tmp_path / "data", size=size)
    pack(root)
    out = tmp_path / "bench.md"
    assert train_ddp.main(["--benchmark", "--data-dir", str(root), "--batch-size", "2", "--crop-size", "64", "128",
                           "--benchmark-iters", "3", "--benchmark-warmup", str(warmup), "--benchmark-infer-size",
                           "64", "128", "--benchmark-infer-iters", "2", "--num-workers", str(workers),
                           "--benchmark-out", str(out)]) == 0
    return out.read_text()


def test_benchmark_smoke_prints_every_row(tmp_path, capsys):
    """--benchmark at tiny shapes on the CPU: one table with every configuration row (those
    needing CUDA marked), the inference rows and the projection line."""
    table = run_small_benchmark(tmp_path, size=(40, 60), warmup=1, workers=0)
    assert table in capsys.readouterr().out
    rows = table_rows(table)
    names = [name for name, _, _ in train_ddp.BENCHMARK_CONFIGS]
    assert set(names) <= rows.keys()
    for name in ("baseline", "packed+gpu-aug", "bf16", "channels_last"):  # measured on the CPU
        images_per_s, step_ms = float(rows[name][1]), float(rows[name][2])
        assert images_per_s > 0 and step_ms > 0 and rows[name][3].endswith("%")
    for name in ("fused-kernels", "fused-sgd", "cudnn-benchmark", "all"):
        assert rows[name][1] == "-" and rows[name][5] == "needs CUDA"
    assert float(rows["fp32 eager, NCHW"][0]) > 0
    assert "Projected 160k iterations on 8 GPUs: n/a" in table


@pytest.mark.gpu
def test_benchmark_on_gpu_measures_every_row(tmp_path):
    """On a GPU every row is measured (the fused-kernels row may report a failed build)
    and the projection line has a number."""
    table = run_small_benchmark(tmp_path, size=(64, 128), warmup=2, workers=1)
    rows = table_rows(table)
    for name, _, _ in train_ddp.BENCHMARK_CONFIGS:
        if name != "fused-kernels":
            assert float(rows[name][1]) > 0 and float(rows[name][4]) > 0, rows[name]
    assert "Projected 160k iterations on 8 GPUs: n/a" not in table


@pytest.mark.parametrize("loss", ["ce", "ohem"])
def test_compile_sees_model_and_loss_without_graph_breaks(loss):
    """--compile: the model (with the fused BGA op) and the five losses (the fused loss op and
    its sync-free selection) each trace as one graph; a host sync or an unsupported op in
    either would be a graph break."""
    import kernels
    model = train_ddp.BiSeNetV2(19).train()
    model.bga.aggregate = kernels.bga_aggregate
    images = torch.randn(2, 3, 64, 128)
    labels = torch.randint(0, 19, (2, 64, 128), dtype=torch.uint8)
    args = train_ddp.parse_args(["--demo", "--loss", loss])
    explained = torch._dynamo.explain(model)(images)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    outputs = [out.detach().requires_grad_(True) for out in model(images)]
    explained = torch._dynamo.explain(train_ddp.segmentation_losses)(outputs, labels, kernels.ohem_cross_entropy, args)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
