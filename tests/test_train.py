"""train_ddp.py through its command line and train_step / evaluate: the config, checkpoints,
exact resume, evaluation against the official evaluator, learning, bad input."""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import predict
import prepare_data
import train_ddp
from bisenetv2 import BiSeNetV2
from conftest import ROOT, shared_fixture
from datasets import data_config, make_dataset, pack, sample_dataset

TINY = ["--crop-size", "32", "48", "--batch-size", "2", "--num-workers", "0", "--kernels", "torch",
        "--log-iters", "2"]


def run_script(*argv, script="train_ddp.py"):
    result = subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout, result.stderr


def assert_one_line_error(code, stdout, stderr, *fragments):
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    error_lines = [line for line in stderr.strip().splitlines() if "error" in line]
    assert len(error_lines) == 1, stderr
    for fragment in fragments:
        assert fragment in error_lines[0], stderr


def run_patched(patch, *argv):
    """train_ddp.py's command line in a process that first runs `patch` (Python source: a
    failure that a test cannot cause from outside, e.g. a full disk)."""
    code = "\n".join([f"import runpy, sys; sys.path.insert(0, {str(ROOT)!r})", patch,
                      f"sys.argv[0] = {str(ROOT / 'train_ddp.py')!r}",
                      "runpy.run_path(sys.argv[0], run_name='__main__')"])
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout, result.stderr


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_state(a, b):
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


# --- the command line and the config ----------------------------------------------------

def test_help_has_the_training_flags_and_no_benchmark_flags():
    code, out, _ = run_script("--help")
    assert code == 0
    assert "--eval-amp" in out and "--aug-device" in out and "--resume" in out
    assert "--benchmark" not in out  # bench.py has its own flags


def test_config_is_resolved_once_printed_grouped_and_saved(tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    save_dir = tmp_path / "out"
    assert train_ddp.main(["--data-dir", str(root), "--iters", "8", "--save-interval", "2",
                           "--keep-checkpoints", "2", "--save-dir", str(save_dir), *TINY]) == 0
    out = capsys.readouterr().out
    # one setting per line, grouped; the automatic ones resolved for the CPU
    for line in ("  speed (None: decided at start from the device)", "    amp                none",
                 "    channels_last      False", "    fused_sgd          False", "    aug_device         cpu",
                 "    kernels            torch", "    eval_amp           none", "    device             cpu"):
        assert line + "\n" in out, line
    assert "global batch 2 = 1 process(es) x 2; PaddleSeg's recipe: 16 = 4 GPUs x 4" in out
    assert "this run is not the recipe" in out
    assert sorted(p.name for p in save_dir.glob("iter_*.pt")) == ["iter_6.pt", "iter_8.pt"]
    checkpoint = load(save_dir / "iter_8.pt")
    assert checkpoint["iter"] == 8 and {"model", "optimizer", "scaler", "best"} <= checkpoint.keys()
    config = checkpoint["config"]
    assert config["iters"] == 8 and config["amp"] == "none" and config["channels_last"] is False
    assert config["global_batch"] == 2 and config["eval_interval"] == 2
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [2, 4, 6, 8]
    assert {"loss", "loss_main", "loss_aux4", "lr", "batch_cost", "reader_cost", "images_per_s"} <= records[0].keys()
    # the total is the weighted sum of the heads (all weights 1 by default)
    assert records[0]["loss"] == pytest.approx(sum(records[0][k] for k in records[0] if k.startswith("loss_")))


def test_readme_demo_trains_on_the_data_it_generates(tmp_path, monkeypatch):
    """The README's main command, `python train_ddp.py --demo`, two iterations long: it writes
    the synthetic set into the cache folder, trains with the demo's settings, evaluates and
    saves; the set is written once and found the next time."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the process's and the check's below
    save_dir = tmp_path / "demo"
    result = subprocess.run([sys.executable, str(ROOT / "train_ddp.py"), "--demo", "--iters", "2", "--save-interval",
                             "2", "--log-iters", "1", "--save-dir", str(save_dir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    dataset = tmp_path / "cache" / "bisenetv2" / "synthetic_cityscapes_256x512"
    assert f"writing a synthetic Cityscapes-layout dataset of 256x512 frames to {dataset}" in out
    assert "mIoU" in out and "done: 2 iterations" in out
    config = load(save_dir / "iter_2.pt")["config"]
    assert config["demo"] is True and config["data_dir"] == str(dataset)
    assert config["crop_size"] == [128, 256] and config["batch_size"] == 8 and config["iters"] == 2
    assert (save_dir / "best.pt").is_file()
    lines = []
    assert prepare_data.synthetic_in_cache(train_ddp.DEMO_FRAME_SIZE, 48, log=lines.append) == dataset
    assert lines == []  # found, not written again


def test_the_recipe_line_names_what_differs():
    args = train_ddp.parse_args(["--data-dir", "unused", "--kernels", "torch", "--batch-size", "16", "--no-pack"])
    config, _ = train_ddp.resolve_config(args, train_ddp.Process(0, 1, 0, torch.device("cpu")))
    assert "not the recipe" not in train_ddp.format_config(config)
    with pytest.raises(AttributeError, match="resolved once"):
        config.amp = "bf16"
    # any flag of the computation off the recipe's value is named, and so is autocast
    changed = train_ddp.Config(**{**vars(config), "warmup_iters": 5, "amp": "bf16", "world_size": 2,
                                  "global_batch": 32, "sync_bn": True})
    assert format_config_last_line(changed).endswith(
        "; this run is not the recipe: warmup_iters 5, amp bf16 (PaddleSeg trains in float32: --amp none)")
    changed = train_ddp.Config(**{**vars(config), "crop_size": [512, 1024], "global_batch": 8})
    assert format_config_last_line(changed).endswith(": global batch 8, crop_size [512, 1024]")
    changed = train_ddp.Config(**{**vars(config), "world_size": 4, "batch_size": 4, "sync_bn": False})
    assert format_config_last_line(changed).endswith(
        "; this run is not the recipe: BatchNorm per process (the recipe's is synced: SyncBatchNorm)")
    assert "recipe" not in train_ddp.format_config(train_ddp.Config(**{**vars(config), "eval_only": True}))


def format_config_last_line(config):
    return train_ddp.format_config(config).splitlines()[-1]


# --- the step, the loss, evaluation -----------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_train_step_from_the_loader(tmp_path, device):
    """train_step on batches of the loader over a pack (on CUDA: augmented on the GPU, the
    step under sync-debug mode 'error', i.e. no CPU-GPU sync point); the losses are the five
    heads' and their sum, and the weights move."""
    root = make_dataset(tmp_path / "data", num_train=4, size=(64, 96))
    pack(root)
    args = train_ddp.parse_args(["--data-dir", str(root), "--crop-size", "64", "64", "--batch-size", "2",
                                 "--num-workers", "0", "--iters", "3", "--kernels", "torch"])
    env = train_ddp.Process(0, 1, 0, torch.device(device))
    config, ops = train_ddp.resolve_config(args, env)
    assert config.aug_device == ("cuda" if device == "cuda" else "cpu") and config.pack
    assert (config.channels_last, config.fused_sgd, config.amp) == ((True, True, "bf16") if device == "cuda"
                                                                    else (False, False, "none"))
    model, step_model, criterion, optimizer, scaler = train_ddp.build_training(config, env, ops)
    before = [p.detach().clone() for p in model.parameters()]
    index = data.find_pack(root, "train", data.CITYSCAPES)
    batches = iter(data.make_loader(data.read_list(root, "train"), index, data.CITYSCAPES, config, 0, 1, 0))
    for it in range(3):
        batch = next(batches)
        if device == "cuda":
            torch.cuda.synchronize()
            # iteration 0 is a warm-up (cudnn autotuning and lazy initialisation may synchronise)
            torch.cuda.set_sync_debug_mode("error" if it > 0 else "default")
        try:
            images, labels = data.batch_to_device(batch, env.device, config)
            losses, loss = train_ddp.train_step(step_model, criterion, optimizer, scaler, images, labels, 0.01,
                                                it, train_ddp.AMP_DTYPES[config.amp])
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        assert losses.shape == (5,) and losses.device.type == device
        assert torch.isfinite(losses).all() and float(loss) == pytest.approx(float(losses.sum()), rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_losses_against_hand_computed_values():
    import kernels
    # 1 image, 2 classes, logits already at label resolution (upsampling is the identity)
    logits = torch.tensor([[[[0.0, 2.0, 0.0, -1.0]], [[0.0, 0.0, 3.0, 1.0]]]])  # (1, 2, 1, 4)
    labels = torch.tensor([[[0, 1, 255, 0]]])
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
    # the five heads' loss: the same per head, the weighted sum (main 1, auxiliary --aux-weight)
    config = data_config("--aux-weight", "0.5")
    criterion = train_ddp.SegmentationLoss(kernels.ohem_cross_entropy_reference, config)
    losses, total = criterion([logits] * 5, labels)
    torch.testing.assert_close(losses, ce.expand(5))
    assert total.item() == pytest.approx(3 * ce.item(), rel=1e-6)


def test_confusion_matrix_averages_present_classes():
    confusion = train_ddp.ConfusionMatrix(3, 255, "cpu")
    # ground truth 0 predicted 0, 0, 0, 1; ground truth 2 predicted 0, 0, 2, 2, 2, 2; two ignored
    confusion.update(torch.tensor([0, 0, 0, 1, 0, 0, 2, 2, 2, 2, 1, 2]),
                     torch.tensor([0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 255, 255]))
    confusion.reduce_from_all_processes()  # one process: nothing to sum
    metrics = confusion.compute()
    # class 0: 3 / (4 + 5 - 3) = 0.5; class 1: 0 / (0 + 1 - 0) = 0 (predicted only); class 2: 4 / 6
    assert metrics["class_IoU"] == pytest.approx([0.5, 0.0, 4 / 6])
    assert metrics["mIoU"] == pytest.approx((0.5 + 0 + 4 / 6) / 3)
    assert metrics["pixel_acc"] == pytest.approx(7 / 10)
    absent = train_ddp.ConfusionMatrix(2, 255, "cpu")
    absent.update(torch.zeros(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64))
    assert absent.compute()["class_IoU"] == [1.0, None] and absent.compute()["mIoU"] == 1.0


def test_eval_matches_official_cityscapes_evaluator(tmp_path):
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
    for name, iou in zip(data.CITYSCAPES_CLASSES, ours["class_IoU"]):
        theirs = result["classScores"][name]
        assert (iou is None and np.isnan(theirs)) or iou == pytest.approx(theirs, abs=1e-12)


def test_evaluation_is_float32_unless_eval_amp(tmp_path, capsys):
    """The default evaluation's predictions are the float32 model's argmax, pixel for pixel;
    --eval-amp bf16 is recorded in the config."""
    from bisenetv2 import BiSeNetV2, load_weights
    root = sample_dataset(tmp_path)
    weights = shared_fixture("paddleseg_bisenetv2", "bisenetv2_random.pdparams")
    common = ["--data-dir", str(root), "--eval-only", "--weights", str(weights), "--kernels", "torch"]
    assert train_ddp.main([*common, "--save-dir", str(tmp_path / "a"), "--pred-dir", str(tmp_path / "fp32")]) == 0
    image_path, _ = data.read_list(root, "val")[0]
    image, _ = data.eval_sample((image_path, data.read_list(root, "val")[0][1]), data.CITYSCAPES,
                                train_ddp.parse_args(common))
    model = load_weights(BiSeNetV2(19), weights).eval()
    with torch.no_grad():
        expected = model(data.normalize(data.image_tensor(image.numpy()))[None]).argmax(1)[0].numpy()
    predicted = np.asarray(Image.open(tmp_path / "fp32" / image_path.parent.name / image_path.name))
    np.testing.assert_array_equal(predicted, data.train_id_to_label_id()[expected])
    assert "    eval_amp           none\n" in capsys.readouterr().out
    # predict.py --label-ids over the split's folder writes the same file at the same place (float32 CPU both)
    assert predict.main(["--weights", str(weights), "--input", str(image_path.parent.parent), "--out",
                         str(tmp_path / "pred"), "--label-ids", str(tmp_path / "ids"), "--device", "cpu"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ids" / image_path.parent.name / image_path.name)),
                                  predicted)
    assert train_ddp.main([*common, "--save-dir", str(tmp_path / "b"), "--eval-amp", "bf16"]) == 0
    assert "    eval_amp           bf16\n" in capsys.readouterr().out


def test_evaluation_of_frames_of_several_sizes_does_not_autotune_each(tmp_path, capsys):
    """cudnn.benchmark autotunes every new input size (seconds, and memory, each): an
    evaluation whose val frames come in more than predict.AUTOTUNED_SIZES (2) sizes turns it
    off at the third, says so, and gives it back afterwards."""
    root = make_dataset(tmp_path / "data", num_val=3)
    for i, size in enumerate([(30, 50), (20, 40)]):  # three sizes in all
        make_dataset(tmp_path / f"other{i}", num_train=1, num_val=1, size=size, seed=1)
        for name in ("img0.png", "lab0.png"):
            (root / "val" / f"{i}_{name}").write_bytes((tmp_path / f"other{i}" / "val" / name).read_bytes())
        with open(root / "val.txt", "a") as f:
            f.write(f"val/{i}_img0.png val/{i}_lab0.png\n")
    weights = tmp_path / "random.pt"
    torch.save(dict(model=BiSeNetV2(19).state_dict()), weights)
    saved = torch.backends.cudnn.benchmark
    try:
        assert train_ddp.main(["--data-dir", str(root), "--eval-only", "--weights", str(weights), "--kernels", "torch",
                               "--cudnn-benchmark", "--save-dir", str(tmp_path / "eval")]) == 0
        assert torch.backends.cudnn.benchmark is True  # given back
    finally:
        torch.backends.cudnn.benchmark = saved
    said = "rank 0: evaluation: val frames of more than 2 sizes: cudnn.benchmark off for it\n"
    assert capsys.readouterr().out.count(said) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["--channels-last", "--no-channels-last"])
def test_gpu_evaluation_agrees_with_the_float32_cpu_model(tmp_path, no_tf32, layout):
    """On CUDA (the photo sent as uint8 and normalised there by the table, either memory
    format) the predictions are the float32 CPU model's argmax on all but 0.05% of the
    32768 pixels. TF32 is off here: its 10 mantissa bits flip about 60 pixels of this small
    frame (emulated on the CPU), where float32's own rounding (7e-5 at most against float64)
    can flip only the 12 whose two best logits lie within 1e-4 of the largest."""
    from bisenetv2 import load_weights
    root = sample_dataset(tmp_path)
    weights = shared_fixture("paddleseg_bisenetv2", "bisenetv2_random.pdparams")
    assert train_ddp.main(["--data-dir", str(root), "--eval-only", "--weights", str(weights), "--kernels", "torch",
                           layout, "--save-dir", str(tmp_path / "out"), "--pred-dir", str(tmp_path / "pred")]) == 0
    (image_path, label_path), = data.read_list(root, "val")
    image, _ = data.read_frame(image_path, label_path, data.CITYSCAPES)
    with torch.no_grad():
        expected = load_weights(BiSeNetV2(19), weights).eval()(data.normalize(data.image_tensor(image))[None])
    predicted = np.asarray(Image.open(tmp_path / "pred" / image_path.parent.name / image_path.name))
    agree = (predicted == data.train_id_to_label_id()[expected.argmax(1)[0].numpy()]).mean()
    assert agree >= 0.9995, agree


@pytest.mark.slow
def test_learns_the_real_frame(tmp_path):
    """100 CPU iterations at 128x256 on the one real frame reach pixel accuracy >= 0.85 (on
    the 2-core development machine, 2026-11-29: 0.928 after 100, 34 s; 0.949 after 200,
    0.961 after 400: 100 keep the suite's time down)."""
    root = sample_dataset(tmp_path)
    save_dir = tmp_path / "out"
    assert train_ddp.main(["--data-dir", str(root), "--iters", "100", "--crop-size", "128", "256",
                           "--batch-size", "4", "--num-workers", "1", "--log-iters", "50",
                           "--save-interval", "100", "--do-eval", "--kernels", "torch",
                           "--save-dir", str(save_dir)]) == 0
    metrics = json.loads((save_dir / "eval_metrics.json").read_text())
    assert metrics["pixel_acc"] >= 0.85
    assert (save_dir / "best.pt").is_file()


# --- checkpoints and exact resume -------------------------------------------------------

def test_resume_is_bitwise_exact_in_process(tmp_path):
    root = make_dataset(tmp_path / "data")
    common = ["--data-dir", str(root), "--iters", "6", "--save-interval", "3", *TINY]
    assert train_ddp.main([*common, "--save-dir", str(tmp_path / "a")]) == 0
    # a run that stopped after iteration 3 (its later checkpoint removed), then resumed
    assert train_ddp.main([*common, "--save-dir", str(tmp_path / "b")]) == 0
    (tmp_path / "b" / "iter_6.pt").unlink()
    assert train_ddp.main([*common, "--save-dir", str(tmp_path / "b"), "--resume"]) == 0
    assert_same_state(load(tmp_path / "a" / "iter_6.pt"), load(tmp_path / "b" / "iter_6.pt"))


def test_a_save_dir_belongs_to_one_run(tmp_path):
    root = make_dataset(tmp_path / "data")
    save_dir = tmp_path / "out"
    common = ["--data-dir", str(root), "--iters", "6", "--save-interval", "3", "--save-dir", str(save_dir), *TINY]
    assert train_ddp.main(common) == 0
    before = {p.name: p.read_bytes() for p in save_dir.glob("*.pt")}
    # a second run without --resume is refused before it trains, and nothing is touched
    code, out, err = run_script(*common)
    assert_one_line_error(code, out, err, str(save_dir), "--resume", "another --save-dir")
    assert "iter 2/" not in out
    assert {p.name: p.read_bytes() for p in save_dir.glob("*.pt")} == before


def test_rotation_keeps_checkpoints_later_than_the_one_written(tmp_path):
    """A resume that passes over an unreadable iter_9.pt writes iter_6.pt; keeping one
    checkpoint must not delete that one in favour of the later unreadable one."""
    root = make_dataset(tmp_path / "data")
    save_dir = tmp_path / "out"
    common = ["--data-dir", str(root), "--iters", "6", "--save-interval", "3", "--save-dir", str(save_dir), *TINY]
    assert train_ddp.main(common) == 0
    (save_dir / "iter_6.pt").unlink()
    (save_dir / "iter_9.pt").write_bytes(b"corrupt")
    assert train_ddp.main([*common, "--resume", "--keep-checkpoints", "1"]) == 0
    assert sorted(p.name for p in save_dir.glob("iter_*.pt")) == ["iter_6.pt", "iter_9.pt"]
    assert load(save_dir / "iter_6.pt")["iter"] == 6


def test_resume_refuses_settings_that_change_the_computation(tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    save_dir = tmp_path / "out"
    common = ["--data-dir", str(root), "--iters", "6", "--save-interval", "3", "--save-dir", str(save_dir), *TINY]
    assert train_ddp.main(common) == 0
    (save_dir / "iter_6.pt").unlink()
    code, out, err = run_script(*common, "--resume", "--lr", "0.01", "--crop-size", "32", "40", "--iters", "9",
                                "--num-classes", "21")
    assert_one_line_error(code, out, err, str(save_dir / "iter_3.pt"), "(saved -> given)", "iters 6 -> 9",
                          "crop_size [32, 48] -> [32, 40]", "lr 0.05 -> 0.01", "num_classes 19 -> 21")
    assert "batch_size" not in err and not (save_dir / "iter_6.pt").exists()
    # bookkeeping settings may change
    assert train_ddp.main([*common, "--resume", "--log-iters", "3", "--keep-checkpoints", "1"]) == 0
    assert f"resumed from {save_dir / 'iter_3.pt'}" in capsys.readouterr().out


def torchrun(args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "train_ddp.py"), *args]
    return subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def torchrun_reference_then_started(tmp_path, common):
    """An uninterrupted torchrun run into tmp_path/a (it must succeed), then a second one
    into tmp_path/b, returned once it has written iter_9.pt."""
    reference = torchrun([*common, "--save-dir", str(tmp_path / "a")])
    output = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, output
    started = torchrun([*common, "--save-dir", str(tmp_path / "b")])
    deadline = time.time() + 300
    while not (tmp_path / "b" / "iter_9.pt").exists():
        assert started.poll() is None and time.time() < deadline, started.communicate()[0]
        time.sleep(0.05)
    return started


@pytest.mark.slow
def test_torchrun_sigkill_then_resume_is_bitwise_exact(tmp_path):
    root = make_dataset(tmp_path / "data", num_train=6)
    common = ["--data-dir", str(root), "--iters", "30", "--save-interval", "3", "--keep-checkpoints", "3", *TINY]
    killed = torchrun_reference_then_started(tmp_path, common)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate()
    left = list((tmp_path / "b").glob("iter_*.pt"))
    assert left and all(load(p)["iter"] == int(p.stem.split("_")[1]) for p in left)

    resumed = torchrun([*common, "--save-dir", str(tmp_path / "b"), "--resume"])
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    assert_same_state(load(tmp_path / "a" / "iter_30.pt"), load(tmp_path / "b" / "iter_30.pt"))


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_then_resume_is_bitwise_exact(tmp_path, monkeypatch, capsys, stop_signal):
    """A signal during iteration 5 (logging every 2): the run saves iter_6.pt at the next log
    point, says so in one line and exits 128 + signal; resumed, it ends as an uninterrupted run."""
    root = make_dataset(tmp_path / "data")
    common = ["--data-dir", str(root), "--iters", "8", "--save-interval", "4", *TINY]
    assert train_ddp.main([*common, "--save-dir", str(tmp_path / "a")]) == 0
    real_step, calls = train_ddp.train_step, []

    def step_signalled_at_5(*args):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), stop_signal)
        return real_step(*args)

    handlers_before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(train_ddp, "train_step", step_signalled_at_5)
    save_dir = tmp_path / "b"
    assert train_ddp.main([*common, "--save-dir", str(save_dir)]) == 128 + stop_signal
    assert (f"stopped at iteration 6 ({stop_signal.name}), checkpoint {save_dir / 'iter_6.pt'}; "
            "resume with --resume\n") in capsys.readouterr().out
    assert sorted(p.name for p in save_dir.glob("iter_*.pt")) == ["iter_4.pt", "iter_6.pt"]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers_before
    monkeypatch.setattr(train_ddp, "train_step", real_step)
    assert train_ddp.main([*common, "--save-dir", str(save_dir), "--resume"]) == 0
    assert_same_state(load(tmp_path / "a" / "iter_8.pt"), load(save_dir / "iter_8.pt"))


def test_a_stop_at_the_last_iteration_is_evaluated_on_resume(tmp_path, monkeypatch, capsys):
    """A signal in the last step saves that iteration without evaluating it (a stop does not
    wait for an evaluation); --resume, with nothing left to train, evaluates it once."""
    root = make_dataset(tmp_path / "data")
    save_dir = tmp_path / "run"
    common = ["--data-dir", str(root), "--iters", "4", "--save-interval", "4", "--do-eval", *TINY,
              "--save-dir", str(save_dir)]
    real_step, calls = train_ddp.train_step, []

    def step_signalled_at_4(*args):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args)

    monkeypatch.setattr(train_ddp, "train_step", step_signalled_at_4)
    assert train_ddp.main(common) == 128 + signal.SIGTERM
    assert (save_dir / "iter_4.pt").is_file() and not (save_dir / "eval_metrics.json").exists()
    monkeypatch.setattr(train_ddp, "train_step", real_step)
    capsys.readouterr()

    def evaluations():
        return [r for r in map(json.loads, (save_dir / "metrics.jsonl").read_text().splitlines()) if "mIoU" in r]
    assert train_ddp.main([*common, "--resume"]) == 0
    assert "nothing left to train after iteration 4; evaluating it" in capsys.readouterr().out
    assert json.loads((save_dir / "eval_metrics.json").read_text())["iter"] == 4
    assert [r["iter"] for r in evaluations()] == [4] and load(save_dir / "best.pt")["iter"] == 4
    assert train_ddp.main([*common, "--resume"]) == 0  # evaluated already: not again
    assert "evaluating it" not in capsys.readouterr().out and len(evaluations()) == 1


@pytest.mark.slow
def test_torchrun_sigterm_saves_then_resume_is_bitwise_exact(tmp_path):
    """SIGTERM to torchrun, its ranks and their DataLoader workers: every rank stops at the
    same iteration after its checkpoint, and the resumed run ends as an uninterrupted one."""
    root = make_dataset(tmp_path / "data", num_train=6)
    common = ["--data-dir", str(root), "--iters", "30", "--save-interval", "3", "--keep-checkpoints", "3", *TINY,
              "--num-workers", "1"]
    stopped = torchrun_reference_then_started(tmp_path, common)
    os.killpg(stopped.pid, signal.SIGTERM)
    output = stopped.communicate(timeout=300)[0]
    assert stopped.returncode != 0, output
    lines = [line for line in output.splitlines() if line.startswith("stopped at iteration")]
    assert len(lines) == 1, output  # rank 0 speaks for both
    stop_iter = int(lines[0].split()[3])
    assert 9 <= stop_iter < 30 and "(SIGTERM)" in lines[0] and "resume with --resume" in lines[0], output
    assert load(tmp_path / "b" / f"iter_{stop_iter}.pt")["iter"] == stop_iter

    resumed = torchrun([*common, "--save-dir", str(tmp_path / "b"), "--resume"])
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert f"resumed from {tmp_path / 'b' / f'iter_{stop_iter}.pt'} at iteration {stop_iter}" in output
    assert_same_state(load(tmp_path / "a" / "iter_30.pt"), load(tmp_path / "b" / "iter_30.pt"))


@pytest.mark.slow
def test_torchrun_evaluation_during_training_is_the_saved_models(tmp_path):
    """Without SyncBatchNorm (the CPU; --no-sync-bn) the last step leaves each rank the BN
    running statistics of its own crops: the evaluation during training is of the saved model
    (rank 0's), to the bit what --eval-only gives for its checkpoint."""
    root = make_dataset(tmp_path / "data", num_train=6, num_val=3)
    common = ["--data-dir", str(root), *TINY]
    trained = torchrun([*common, "--iters", "4", "--save-interval", "4", "--do-eval", "--save-dir",
                        str(tmp_path / "run")])
    output = trained.communicate(timeout=600)[0]
    assert trained.returncode == 0, output
    evaluated = torchrun([*common, "--eval-only", "--weights", str(tmp_path / "run" / "iter_4.pt"), "--save-dir",
                          str(tmp_path / "eval")])
    output = evaluated.communicate(timeout=600)[0]
    assert evaluated.returncode == 0, output
    during = json.loads((tmp_path / "run" / "eval_metrics.json").read_text())
    after = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert {k: during[k] for k in ("mIoU", "pixel_acc", "class_IoU")} == \
        {k: after[k] for k in ("mIoU", "pixel_acc", "class_IoU")}


# --- packs ------------------------------------------------------------------------------

def test_training_from_the_pack_equals_training_from_pngs(tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    common = ["--data-dir", str(root), "--iters", "2", "--save-interval", "2", *TINY]
    assert train_ddp.main([*common, "--save-dir", str(tmp_path / "png")]) == 0
    assert "data: PNG files" in capsys.readouterr().out
    pack(root)
    assert train_ddp.main([*common, "--save-dir", str(tmp_path / "packed")]) == 0
    assert f"data: packed {root / 'packed' / 'train.json'}" in capsys.readouterr().out
    assert load(tmp_path / "packed" / "iter_2.pt")["config"]["aug_device"] == "cpu"
    assert_same_state(load(tmp_path / "png" / "iter_2.pt"), load(tmp_path / "packed" / "iter_2.pt"))
    # a stale pack is a one-line error naming what changed; --no-pack reads the PNGs
    (root / "train.txt").write_text((root / "train.txt").read_text() + "\n")
    assert_one_line_error(*run_script(*common, "--save-dir", str(tmp_path / "stale")),
                          "train.txt changed", "prepare_data.py --pack")
    assert train_ddp.main([*common, "--no-pack", "--save-dir", str(tmp_path / "nopack")]) == 0


# --- bad input --------------------------------------------------------------------------

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
    assert_one_line_error(*run_script(*base, "--num-workers", "1"), "lab1.png", "40")  # raised in a worker

    make_dataset(root, num_train=2)
    Image.fromarray(np.zeros((41, 60), np.uint8)).save(root / "train" / "lab0.png")
    assert_one_line_error(*run_script(*base), "img0.png", "lab0.png")
    assert not list(save_dir.glob("iter_*.pt"))


def test_bad_weights_and_devices(tmp_path):
    root = make_dataset(tmp_path / "data")
    (tmp_path / "bad.pt").write_bytes(b"corrupt")
    for weights in (tmp_path / "bad.pt", tmp_path / "absent.pdparams"):
        assert_one_line_error(*run_script("--data-dir", str(root), "--eval-only", "--weights", str(weights),
                                          "--kernels", "torch"), weights.name)
    if not torch.cuda.is_available():
        for flags in (["--aug-device", "cuda"], ["--fused-sgd"], ["--kernels", "cuda"]):
            assert_one_line_error(*run_script("--data-dir", str(root), *TINY, *flags), flags[0], "CUDA device")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    root = make_dataset(tmp_path / "data")
    save_dir = tmp_path / "out"
    real_step, calls = train_ddp.train_step, []

    def step_going_bad_at_5(*args):
        calls.append(1)
        losses, loss = real_step(*args)
        return (losses * float("nan"), loss * float("nan")) if len(calls) == 5 else (losses, loss)

    monkeypatch.setattr(train_ddp, "train_step", step_going_bad_at_5)
    code = train_ddp.main(["--data-dir", str(root), "--iters", "8", "--save-interval", "2",
                           "--log-iters", "4", "--save-dir", str(save_dir), *TINY[:-2]])
    err = capsys.readouterr().err
    assert code == 2 and "non-finite loss at iteration 5" in err and "iter_4.pt" in err
    assert sorted(p.name for p in save_dir.glob("iter_*.pt")) == ["iter_2.pt", "iter_4.pt"]


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch, capsys):
    """A BatchNorm running mean gone NaN at iteration 5 leaves the training loss finite (train
    mode normalises with batch statistics); the checkpoint of iteration 6 is refused."""
    root = make_dataset(tmp_path / "data")
    save_dir = tmp_path / "out"
    real_step, calls = train_ddp.train_step, []

    def step_poisoning_a_buffer_at_5(model, *args):
        calls.append(1)
        result = real_step(model, *args)
        if len(calls) == 5:
            model.semantic.stem.conv.bn.running_mean.fill_(float("nan"))
        return result

    monkeypatch.setattr(train_ddp, "train_step", step_poisoning_a_buffer_at_5)
    code = train_ddp.main(["--data-dir", str(root), "--iters", "8", "--save-interval", "2",
                           "--log-iters", "1", "--save-dir", str(save_dir), *TINY[:-2]])
    err = capsys.readouterr().err
    assert code == 2 and "non-finite weights (semantic.stem.conv.bn.running_mean) at iteration 6" in err, err
    assert "iter_4.pt" in err
    assert sorted(p.name for p in save_dir.glob("iter_*.pt")) == ["iter_2.pt", "iter_4.pt"]


def test_lr_schedule_is_paddlesegs():
    """PolynomialDecay(lr, decay_steps=iters, end_lr=0, power) stepped after each iteration:
    iteration 0 at lr, the last at lr (1 / iters)^power. With a warmup, PaddleSeg's
    LinearWarmup(start_lr=0, end_lr=lr, warmup_steps=W) around a decay over iters - W: lr it / W
    below W, then the decay from lr, restarted."""
    config = argparse.Namespace(lr=0.05, iters=100, power=0.9, warmup_iters=0)
    assert train_ddp.lr_at(0, config) == 0.05
    assert train_ddp.lr_at(50, config) == pytest.approx(0.05 * 0.5 ** 0.9, rel=1e-15)
    assert train_ddp.lr_at(99, config) == pytest.approx(0.05 * 0.01 ** 0.9, rel=1e-15)
    config.warmup_iters = 20
    assert [train_ddp.lr_at(it, config) for it in (0, 5, 19)] == pytest.approx([0, 0.0125, 0.0475], rel=1e-15)
    assert train_ddp.lr_at(20, config) == 0.05  # the decay starts at the warmup's end, from lr
    assert train_ddp.lr_at(60, config) == pytest.approx(0.05 * 0.5 ** 0.9, rel=1e-15)
    assert train_ddp.lr_at(99, config) == pytest.approx(0.05 * (1 / 80) ** 0.9, rel=1e-15)


def test_bad_flag_values_are_one_line(tmp_path, capsys):
    assert_one_line_error(*run_script("--data-dir", str(tmp_path), "--lr", "nan"), "--lr must be finite and positive")
    for flags, fragment in ((["--lr", "0"], "--lr"), (["--lr", "inf"], "--lr"), (["--crop-size", "0", "8"], "--crop-size"),
                            (["--num-workers", "-1"], "--num-workers"), (["--scale-step", "-0.25"], "--scale-step"),
                            (["--min-scale", "2", "--max-scale", "1"], "--min-scale"),
                            (["--min-scale", "0"], "--min-scale"), (["--ignore-index", "256"], "--ignore-index"),
                            (["--ignore-index", "-1"], "--ignore-index"), (["--eval-interval", "0"], "--eval-interval"),
                            (["--scales", "1", "0"], "--scales must be finite and positive, got 1.0 0.0"),
                            (["--scales", "nan"], "--scales"),
                            (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
                            (["--weight-decay", "nan"], "--weight-decay"), (["--power", "-1"], "--power"),
                            (["--warmup-iters", "-2"], "--warmup-iters"),
                            (["--iters", "10", "--warmup-iters", "10"], "--warmup-iters must be at least 0 and below --iters"),
                            (["--ohem-thresh", "0"], "--ohem-thresh must be in (0, 1] (a probability), got 0.0"),
                            (["--ohem-thresh", "1.5"], "--ohem-thresh"), (["--ohem-min-kept", "-3"], "--ohem-min-kept"),
                            (["--aux-weight", "inf"], "--aux-weight"), (["--max-scale", "inf"], "--max-scale"),
                            (["--seed", "-1"], "--seed must be in 0..4294967295, got -1")):
        with pytest.raises(SystemExit) as stop:
            train_ddp.main(["--data-dir", str(tmp_path), *flags])
        assert_one_line_error(stop.value.code, "", capsys.readouterr().err, fragment, "must be")


def test_one_crop_a_step_is_refused_before_training(tmp_path, capsys):
    """The context block's BatchNorm over one pooled value per channel cannot train on one
    crop (torch raises at the first step); evaluation takes any batch."""
    root = make_dataset(tmp_path / "data")
    assert train_ddp.main(["--data-dir", str(root), "--iters", "1", "--save-dir", str(tmp_path / "out"), *TINY,
                           "--batch-size", "1"]) == 2
    assert_one_line_error(2, "", capsys.readouterr().err, "--batch-size 1: ", "at least 2 crops a step")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("loss", ["ce", "ohem"])
def test_compile_sees_model_and_loss_without_graph_breaks(loss, cpu_loops):
    """--compile: the model (with the fused BGA op) and the five-head loss (the fused loss op
    and its sync-free selection) each trace as one graph, down the kernels' path (the C++ loops
    standing in); a host sync or an unsupported op in either would be a graph break."""
    import kernels
    from bisenetv2 import BiSeNetV2
    model = BiSeNetV2(19).train()
    model.bga.aggregate = kernels.bga_aggregate
    images = torch.randn(2, 3, 64, 128)
    labels = torch.randint(0, 19, (2, 64, 128), dtype=torch.uint8)
    config = data_config("--loss", loss)
    explained = torch._dynamo.explain(model)(images)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    outputs = [out.detach().requires_grad_(True) for out in model(images)]
    criterion = train_ddp.SegmentationLoss(kernels.ohem_cross_entropy, config)
    explained = torch._dynamo.explain(criterion)(outputs, labels)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


# --- save, then evaluate; evaluation's input checked at start ---------------------------

def test_checkpoint_is_written_before_evaluation(tmp_path):
    """A val label whose pixels are bad (its header is fine) fails the first evaluation; the
    checkpoint of that iteration is already written."""
    root = make_dataset(tmp_path / "data")
    Image.fromarray(np.full((40, 60), 40, np.uint8)).save(root / "val" / "lab1.png")  # train id 40
    save_dir = tmp_path / "out"
    code, out, err = run_script("--data-dir", str(root), "--iters", "4", "--save-interval", "2", "--do-eval",
                                "--save-dir", str(save_dir), *TINY)
    assert_one_line_error(code, out, err, "lab1.png", "40")
    assert load(save_dir / "iter_2.pt")["iter"] == 2 and not (save_dir / "best.pt").exists()
    assert not (save_dir / ".lock").exists()  # released on an error too


def test_bad_val_file_stops_before_training(tmp_path):
    root = make_dataset(tmp_path / "data")
    common = ["--data-dir", str(root), "--iters", "2", "--save-interval", "2", *TINY]
    (root / "val" / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, out, err = run_script(*common, "--do-eval", "--save-dir", str(tmp_path / "b"))
    assert_one_line_error(code, out, err, str(root / "val" / "img1.png"), "unreadable image")
    assert "iter 2/" not in out and not list((tmp_path / "b").iterdir())
    make_dataset(root)
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(root / "val" / "lab0.png")  # an RGB label
    code, out, err = run_script(*common, "--do-eval", "--save-dir", str(tmp_path / "c"))
    assert_one_line_error(code, out, err, "lab0.png", "mode RGB")
    Image.fromarray(np.zeros((41, 60), np.uint8)).save(root / "val" / "lab0.png")
    code, out, err = run_script(*common, "--eval-only", "--weights", str(tmp_path / "unused.pt"))
    assert_one_line_error(code, out, err, "img0.png", "40x60", "41x60")
    # without evaluation the val files are not read
    assert run_script(*common, "--save-dir", str(tmp_path / "d"))[0] == 0


# --- the save dir's lock ----------------------------------------------------------------

def test_a_second_run_on_a_locked_save_dir_stops_naming_the_holder(tmp_path):
    root = make_dataset(tmp_path / "data")
    save_dir = tmp_path / "out"
    common = ["--data-dir", str(root), "--iters", "100000", "--save-interval", "100000", "--save-dir", str(save_dir),
              *TINY]
    first = subprocess.Popen([sys.executable, str(ROOT / "train_ddp.py"), *common], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        while not (save_dir / "metrics.jsonl").exists():  # training: the lock is held
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        holder = json.loads((save_dir / ".lock").read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        code, out, err = run_script(*common, "--resume")
        assert_one_line_error(code, out, err, f"in use by pid {first.pid} on {socket.gethostname()} since "
                              f"{holder['start']}", str(save_dir / ".lock"))
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    assert not (save_dir / ".lock").exists()  # released on a stop


def test_a_stale_lock_is_taken_over_and_another_hosts_lock_is_not(tmp_path):
    root = make_dataset(tmp_path / "data")
    save_dir = tmp_path / "out"
    save_dir.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = dict(host=socket.gethostname(), pid=gone.pid, start="2026-01-01T00:00:00+00:00")
    (save_dir / ".lock").write_text(json.dumps(stale))
    common = ["--data-dir", str(root), "--iters", "2", "--save-dir", str(save_dir), *TINY]
    code, out, err = run_script(*common)
    assert code == 0, err
    assert f"note: taking over {save_dir / '.lock'}: pid {gone.pid} on this host (started {stale['start']}) is gone" in out
    assert not (save_dir / ".lock").exists()
    (save_dir / ".lock").write_text(json.dumps(dict(stale, host="elsewhere")))
    assert_one_line_error(*run_script(*common, "--resume"), f"in use by pid {gone.pid} on elsewhere")
    assert (save_dir / ".lock").exists()  # not ours: left alone


# --- the file system and the workers failing --------------------------------------------

def test_unusable_save_dir_stops_at_start(tmp_path):
    root = make_dataset(tmp_path / "data")
    (tmp_path / "file").write_text("in the way")
    for save_dir in (tmp_path / "file", tmp_path / "file" / "sub"):
        code, out, err = run_script("--data-dir", str(root), "--iters", "2", "--save-dir", str(save_dir), *TINY)
        assert_one_line_error(code, out, err, f"{save_dir}: not a folder this run can write to")
        assert "initial weights" not in out and "iter 2/" not in out
    if os.geteuid() != 0:  # root writes to read-only folders
        (tmp_path / "ro").mkdir(mode=0o555)
        assert_one_line_error(*run_script("--data-dir", str(root), "--save-dir", str(tmp_path / "ro"), *TINY),
                              str(tmp_path / "ro"), "Permission denied")


def test_a_full_disk_while_saving_stops_and_keeps_the_older_checkpoints(tmp_path):
    root = make_dataset(tmp_path / "data")
    save_dir = tmp_path / "out"
    full_disk_at_the_second_save = """
import errno, torch
real_save, saves = torch.save, []
def save(obj, f, *args, **kwargs):
    saves.append(1)
    if len(saves) == 2:
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, f, *args, **kwargs)
torch.save = save
"""
    code, out, err = run_patched(full_disk_at_the_second_save, "--data-dir", str(root), "--iters", "6",
                                 "--save-interval", "2", "--save-dir", str(save_dir), *TINY)
    assert_one_line_error(code, out, err, f"cannot write {save_dir / 'iter_4.pt'} (No space left on device)",
                          f"last good checkpoint: {save_dir / 'iter_2.pt'}")
    assert sorted(p.name for p in save_dir.iterdir()) == ["iter_2.pt", "metrics.jsonl"]  # no temporary file, no lock
    assert load(save_dir / "iter_2.pt")["iter"] == 2


def test_evaluation_outputs_that_cannot_be_written_are_one_line(tmp_path):
    """--eval-only's --save-dir and --pred-dir are made before the evaluation, so one that
    cannot be made stops the run there; a prediction a full disk refuses is named."""
    root = make_dataset(tmp_path / "data")
    torch.save({"model": BiSeNetV2(19).state_dict()}, tmp_path / "w.pt")
    (tmp_path / "file").write_text("in the way")
    common = ["--data-dir", str(root), "--eval-only", "--weights", str(tmp_path / "w.pt"), "--kernels", "torch"]
    code, out, err = run_script(*common, "--save-dir", str(tmp_path / "file"))
    assert_one_line_error(code, out, err, f"--save-dir {tmp_path / 'file'}: cannot write eval_metrics.json there")
    assert "eval [" not in out
    code, out, err = run_script(*common, "--save-dir", str(tmp_path / "out"),
                                "--pred-dir", str(tmp_path / "file" / "p"))
    assert_one_line_error(code, out, err, f"--pred-dir {tmp_path / 'file' / 'p'}: cannot make it (Not a directory)")
    assert "eval [" not in out
    full_disk_for_pngs = """
import errno, data
real_write = data.atomic_write
def atomic_write(path, content):
    if str(path).endswith(".png"):
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_write(path, content)
data.atomic_write = atomic_write
"""
    code, out, err = run_patched(full_disk_for_pngs, *common, "--save-dir", str(tmp_path / "out"),
                                 "--pred-dir", str(tmp_path / "pred"))
    assert_one_line_error(code, out, err, f"--pred-dir: cannot write {tmp_path / 'pred' / 'val'}",
                          "(No space left on device)")
    assert not (tmp_path / "out" / "eval_metrics.json").exists()


def test_list_file_encoding_and_bad_pack_index(tmp_path):
    root = make_dataset(tmp_path / "data")
    common = ["--data-dir", str(root), "--iters", "2", *TINY]
    good = (root / "train.txt").read_bytes()
    (root / "train.txt").write_bytes(b"\xef\xbb\xbf" + good)  # a byte order mark is fine
    assert run_script(*common, "--save-dir", str(tmp_path / "a"))[0] == 0
    (root / "train.txt").write_bytes(good + b"train/caf\xe9.png train/lab0.png\n")  # Latin-1
    assert_one_line_error(*run_script(*common), f"{root / 'train.txt'}:5: not UTF-8 text (byte 0xe9)")
    (root / "train.txt").write_bytes(good)
    pack(root)
    index_path = root / "packed" / "train.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({k: v for k, v in index.items() if k != "stamps"}))
    assert_one_line_error(*run_script(*common), "stale pack", "lacks stamps", "prepare_data.py --pack")
    index_path.write_text(json.dumps(dict(index, files=index["files"][:2])))
    assert_one_line_error(*run_script(*common), "stale pack", "lists 2 frames' files and 8 file stamps for 4 frames")


def test_a_killed_dataloader_worker_is_one_line(tmp_path):
    root = make_dataset(tmp_path / "data")
    worker_killed_at_position_5 = """
import os, signal, data
real_getitem = data.TrainSet.__getitem__
def getitem(self, item):
    if item[1] == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_getitem(self, item)
data.TrainSet.__getitem__ = getitem
"""
    code, out, err = run_patched(worker_killed_at_position_5, "--data-dir", str(root), "--iters", "6",
                                 "--save-dir", str(tmp_path / "out"), *TINY, "--num-workers", "1")
    assert_one_line_error(code, out, err, "DataLoader worker", "out-of-memory killer", "--num-workers")


def test_resumed_run_rewrites_the_records_after_its_checkpoint(tmp_path):
    root = make_dataset(tmp_path / "data")
    save_dir = tmp_path / "out"
    common = ["--data-dir", str(root), "--iters", "4", "--save-interval", "2", "--log-iters", "1",
              "--save-dir", str(save_dir), *TINY[:-2]]
    assert run_script(*common)[0] == 0
    (save_dir / "iter_4.pt").unlink()
    with open(save_dir / "metrics.jsonl", "a") as f:
        f.write('{"iter": 5, "lo')  # a line cut short by a kill
    code, out, err = run_script(*common, "--resume")
    assert code == 0, err
    assert f"{save_dir / 'metrics.jsonl'}: dropped 3 record(s) after iteration 2" in out
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 2, 3, 4]


def test_tensorboard_on_resume_hides_the_steps_after_the_checkpoint(tmp_path, monkeypatch):
    """TensorBoard's purge_step does for the event files what trim_records does for
    metrics.jsonl (a stand-in writer: the tensorboard package is optional)."""
    import types
    opened = []
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = lambda log_dir, purge_step=None: opened.append((log_dir, purge_step))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    config = types.SimpleNamespace(save_dir=tmp_path)
    train_ddp.open_tensorboard(config, 0)
    train_ddp.open_tensorboard(config, 2)  # records of iterations 1 and 2 stay, 3 on are purged
    assert opened == [(tmp_path, None), (tmp_path, 3)]


def test_resume_takes_the_best_from_best_pt_when_no_later(tmp_path):
    """iter_N.pt is written before the evaluation of iteration N: the best of that
    evaluation is in best.pt only."""
    torch.save(dict(metrics=dict(mIoU=0.5), iter=4), tmp_path / "best.pt")
    older = dict(mIoU=0.3, iter=2)
    assert train_ddp.best_so_far(older, tmp_path, 4) == dict(mIoU=0.5, iter=4)
    assert train_ddp.best_so_far(older, tmp_path, 3) == older  # best.pt of a later iteration than the resume
    assert train_ddp.best_so_far(dict(mIoU=0.6, iter=4), tmp_path, 4) == dict(mIoU=0.6, iter=4)
    (tmp_path / "best.pt").write_bytes(b"corrupt")
    with pytest.raises(data.BadInput, match="best.pt is unreadable"):
        train_ddp.best_so_far(older, tmp_path, 4)


def resume_point_on_rank(rank, init_file, save_dirs, results):
    """One of two gloo ranks, each with its own view of --save-dir: resume_point's answer (or
    its BadInput) into results/RANK.json."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        env = train_ddp.Process(rank, 2, rank, torch.device("cpu"))
        path, checkpoint, best = train_ddp.resume_point(save_dirs[rank], env)
        answer = dict(path=str(path), iter=checkpoint["iter"], weight=checkpoint["model"]["w"].tolist(), best=best)
    except data.BadInput as e:
        answer = dict(error=str(e))
    finally:
        dist.destroy_process_group()
    (results / f"{rank}.json").write_text(json.dumps(answer))


def demo_data_on_rank(rank, init_file, nodes, results):
    """One of three gloo ranks, ranks 1 and 2 on a second node with a cache of its own:
    demo_data's folder into results/RANK.json, and a line in results/writers per write."""
    import torch.distributed as dist
    os.environ["XDG_CACHE_HOME"] = str(nodes[0 if rank == 0 else 1])
    real_make = prepare_data.make_synthetic

    def recorded_make(*args, **kwargs):
        with open(results / "writers", "a") as f:
            f.write(f"{rank}\n")
        return real_make(*args, **kwargs)
    prepare_data.make_synthetic, train_ddp.DEMO_FRAME_SIZE = recorded_make, (16, 32)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3)
    try:
        root = train_ddp.demo_data(train_ddp.Process(rank, 3, 0 if rank < 2 else 1, torch.device("cpu")))
    finally:
        dist.destroy_process_group()
    (results / f"{rank}.json").write_text(json.dumps(str(root)))


def test_demo_data_is_written_once_a_node(tmp_path):
    """--demo across nodes: rank 0 writes the set; a node whose cache is its own gets it from
    its first process alone (two processes writing one folder broke each other's pack)."""
    nodes, results = [tmp_path / "node0", tmp_path / "node1"], tmp_path / "results"
    results.mkdir()
    torch.multiprocessing.spawn(demo_data_on_rank, args=(tmp_path / "init", nodes, results), nprocs=3)
    assert sorted((results / "writers").read_text().split()) == ["0", "1"]
    for rank, node in ((0, nodes[0]), (1, nodes[1]), (2, nodes[1])):
        root = Path(json.loads((results / f"{rank}.json").read_text()))
        assert root.parent == node / "bisenetv2"
        assert data.find_pack(root, "train", data.read_dataset_info(root)) is not None


def test_an_op_one_rank_runs_as_the_reference_is_every_ranks(monkeypatch, capsys):
    """--kernels auto decides per rank: where rank 2's check refused the fused loss, every rank
    takes the loss's reference (keeping the fused BGA), and rank 0 prints rank 2's reason."""
    import kernels
    fused = (kernels.ohem_cross_entropy, kernels.bga_aggregate)
    others = {1: ([True, True], ["kernels: fused CUDA kernels (upsample+CE/OHEM loss, BGA)"]),
              2: ([False, True], ["kernels: the fused loss kernel disagrees with its reference (why)"])}

    def all_gather_object(gathered, mine):
        gathered[:] = [mine, others[1], others[2]]
    monkeypatch.setattr(train_ddp.dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(kernels.loss.EXTENSION, "use_cuda_kernel", None)
    env = train_ddp.Process(0, 3, 0, torch.device("cpu"))
    assert train_ddp.same_ops_on_every_rank(fused, [], env) == (kernels.ohem_cross_entropy_reference,
                                                                kernels.bga_aggregate)
    assert capsys.readouterr().out == (
        "rank 2: kernels: the fused loss kernel disagrees with its reference (why)\n"
        "kernels: the loss op is the PyTorch reference on rank(s) 2, so on every rank\n")
    assert kernels.loss.EXTENSION.use_cuda_kernel is False
    others[2] = others[1]  # all agree: nothing changes, nothing is said
    assert train_ddp.same_ops_on_every_rank(fused, [], env) == fused and capsys.readouterr().out == ""


def test_every_rank_resumes_from_rank_0s_checkpoint(tmp_path):
    """Nodes that do not share --save-dir, or see it late (NFS), list other checkpoints:
    every rank takes rank 0's (state and best), and rank 0's unreadable best.pt is every
    rank's one-line error, not a rank left waiting."""
    node0, node1, results = tmp_path / "node0", tmp_path / "node1", tmp_path / "results"
    for folder in (node0, node1, results):
        folder.mkdir()
    for folder, it in ((node0, 4), (node1, 2)):  # node1's view lags behind
        torch.save(dict(model=dict(w=torch.full((2,), float(it))), optimizer={}, iter=it, config={},
                        best=dict(mIoU=0.1, iter=2)), folder / f"iter_{it}.pt")
    torch.save(dict(metrics=dict(mIoU=0.3), iter=4), node0 / "best.pt")
    save_dirs = [node0, node1]
    torch.multiprocessing.spawn(resume_point_on_rank, args=(tmp_path / "init", save_dirs, results), nprocs=2)
    for rank in (0, 1):
        assert json.loads((results / f"{rank}.json").read_text()) == dict(
            path=str(node0 / "iter_4.pt"), iter=4, weight=[4.0, 4.0], best=dict(mIoU=0.3, iter=4)), rank

    (node0 / "best.pt").write_bytes(b"corrupt")
    torch.multiprocessing.spawn(resume_point_on_rank, args=(tmp_path / "init2", save_dirs, results), nprocs=2)
    for rank in (0, 1):
        answer = json.loads((results / f"{rank}.json").read_text())
        assert answer == dict(error=f"--resume: {node0 / 'best.pt'} is unreadable (UnpicklingError); move it away "
                                    f"to resume"), rank


def test_aug_device_auto_takes_the_gpu_for_png_frames_of_one_size(tmp_path, capsys):
    """--aug-device auto on CUDA without a pack: the GPU augments the batches when the train
    frames share one size (by their headers), the workers otherwise; logged either way."""
    root = make_dataset(tmp_path / "data", num_train=3, size=(40, 60))
    env = train_ddp.Process(0, 1, 0, torch.device("cpu"))
    assert train_ddp.one_frame_size(root, env)
    assert "--aug-device auto: cuda, the 3 train frames are all 40x60" in capsys.readouterr().out
    Image.fromarray(np.zeros((30, 60, 3), np.uint8)).save(root / "train" / "img2.png")
    Image.fromarray(np.zeros((30, 60), np.uint8)).save(root / "train" / "lab2.png")
    assert not train_ddp.one_frame_size(root, env)
    assert (f"--aug-device auto: cpu, the train frames differ in size ({root / 'train' / 'img0.png'} is 40x60, "
            f"{root / 'train' / 'img2.png'} 30x60)") in capsys.readouterr().out
    (root / "train" / "img1.png").write_bytes(b"not a png")  # the headers are read: a bad file stops the start
    with pytest.raises(data.BadInput, match="img1.png: unreadable image"):
        train_ddp.one_frame_size(root, env)


def test_num_workers_auto_shares_the_nodes_cores(monkeypatch, capsys):
    """--num-workers None: the process's cores over the node's processes, one left for each,
    1 to 8; logged."""
    env = train_ddp.Process(0, 1, 0, torch.device("cpu"))
    for cores, processes, workers in ((64, 1, 8), (16, 1, 8), (16, 8, 1), (2, 1, 1), (96, 8, 8), (48, 4, 8),
                                      (24, 4, 5)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
        assert train_ddp.auto_num_workers(env) == workers
        assert (f"--num-workers auto: {workers} ({cores} cores for {processes} process(es) on this node"
                in capsys.readouterr().out)
