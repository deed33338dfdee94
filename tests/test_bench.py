"""bench.py: the throughput table at tiny shapes (its numbers need a GPU)."""
import re
import subprocess
import sys

import pytest

import bench
from conftest import ROOT
from datasets import make_dataset, pack, table_rows


def run_small_benchmark(tmp_path, size, warmup, workers, flags=()):
    """bench.py on a small packed dataset at tiny shapes (and `flags`) -> the table it wrote."""
    root = make_dataset(tmp_path / "data", size=size)
    pack(root)
    out = tmp_path / "bench.md"
    assert bench.main(["--data-dir", str(root), "--batch-size", "2", "--crop-size", "64", "128", "--iters", "3",
                       "--warmup", str(warmup), "--infer-size", "64", "128", "--infer-iters", "2",
                       "--num-workers", str(workers), "--out", str(out), *flags]) == 0
    return out.read_text()


def test_help_lists_the_benchmark_flags():
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--iters", "--warmup", "--configs", "--infer-size", "--infer-iters", "--image-size", "--out"):
        assert flag in result.stdout


def profiled_kernels(table, name):
    """The --profile section of row `name`: {kernel: us a step}, and the total its heading gives."""
    heading = re.search(rf"^{re.escape(name)}, median step [0-9.]+ ms \(torch\.profiler over {bench.PROFILE_STEPS} "
                        r"steps\): ([0-9.]+) us a step in (\d+) kernels$", table, re.M)
    assert heading, table
    section = table[heading.end():].split("\n\n", 2)[1]  # the blank line, then the kernel table
    rows = [line.split(" | ") for line in section.splitlines()[2:]]
    return {row[0].strip("| `"): float(row[2]) for row in rows}, float(heading.group(1)), int(heading.group(2))


def test_smoke_prints_every_row(tmp_path, capsys):
    """On the CPU: one table with every configuration row (those needing CUDA marked), the
    inference rows and the projection line; --profile's rows with their ops' time a step."""
    table = run_small_benchmark(tmp_path, size=(40, 60), warmup=1, workers=0, flags=["--profile", "baseline", "all"])
    out = capsys.readouterr().out
    assert table in out
    rows = table_rows(table)
    # each measured row is logged as it ends (a run cut short keeps them)
    assert f"bench: baseline: {float(rows['baseline'][1]):.1f} img/s, {float(rows['baseline'][2]):.1f} ms a step" in out
    assert {name for name, *_ in bench.CONFIGS} <= rows.keys()
    for name in ("baseline", "bf16", "channels_last"):  # measured on the CPU
        images_per_s, step_ms = float(rows[name][1]), float(rows[name][2])
        assert images_per_s > 0 and step_ms > 0 and rows[name][3].endswith("%")
    for name in ("gpu-aug", "packed+gpu-aug", "fused-kernels", "packed+fused-kernels", "fused-sgd", "cudnn-benchmark", "all"):
        assert rows[name][1] == "-" and rows[name][5] == "needs CUDA"
    assert float(rows["fp32 eager, NCHW"][0]) > 0
    assert "Projected 160k iterations on 8 GPUs: n/a" in table
    # the profiled row (on the CPU its aten ops, largest first, at most 20); 'all' needs CUDA: no section
    ops, total, count = profiled_kernels(table, "baseline")
    assert 0 < len(ops) <= 20 and len(ops) <= count and sum(ops.values()) <= total * 1.01
    assert list(ops.values()) == sorted(ops.values(), reverse=True) and "aten::convolution" in "".join(ops)
    assert "\nall, median step" not in table


@pytest.mark.parametrize("flags,message", [
    (["--configs", "nope"], "invalid choice: 'nope'"),
    (["--profile", "nope"], "invalid choice: 'nope'"),
    (["--configs", "all", "--profile", "all", "baseline"],
     "--profile baseline: not among --configs (only measured rows are profiled)"),
    (["--batch-size", "1"], "--batch-size must be at least 2 (the context block's BatchNorm of the pooled vector)"),
    (["--io", "--io-frames", "0"], "--io-frames must be at least 1")])
def test_unknown_row_is_a_usage_error(flags, message):
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), *flags], capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]  # after the usage


@pytest.mark.gpu
def test_on_gpu_measures_every_row(tmp_path):
    """On a GPU every row is measured (the fused-kernels rows may report a failed build) and
    the projection line has a number."""
    table = run_small_benchmark(tmp_path, size=(64, 128), warmup=2, workers=1, flags=["--profile", "all"])
    rows = table_rows(table)
    for name, *_ in bench.CONFIGS:
        if not name.endswith("fused-kernels"):
            assert float(rows[name][1]) > 0 and float(rows[name][4]) > 0, rows[name]
    assert "Projected 160k iterations on 8 GPUs: n/a" not in table
    # CUPTI's kernels of the compiled bf16 step: convolutions among them
    kernels, total, count = profiled_kernels(table, "all")
    assert total > 0 and len(kernels) == min(count, 20)


def test_io_table_times_predict_and_evaluation(tmp_path, capsys):
    """--io: predict.py's rows and evaluation's, each a run of N and 4N frames; a row whose
    run fails says so (a corrupt frame: predict.py's exit code 1), the others still run."""
    root = make_dataset(tmp_path / "data", num_train=2, num_val=1, size=(40, 60))
    out = tmp_path / "io.md"
    assert bench.main(["--io", "--data-dir", str(root), "--io-frames", "1", "--out", str(out)]) == 0
    table = out.read_text()
    assert "(frames of 40x60), random weights, 1 and 4 frames a run" in table and table in capsys.readouterr().out
    rows = table_rows(table)
    assert list(rows)[1:] == [label for label, *_ in bench.IO_ROWS] + ["train_ddp.py --eval-only (float32)"]
    for label in ("predict.py", "predict.py --overlay", "train_ddp.py --eval-only (float32)"):
        first, longer, rate, note = rows[label][:4]
        assert float(first) > 0 and float(longer) > 0
        assert (rate, note) == ("-", "the longer run was not slower: too few frames to tell") or float(rate) > 0
    assert rows["predict.py --cuda-graph"][3] == "needs CUDA"
    (root / "train" / "img1.png").write_bytes(b"not a png")
    assert bench.main(["--io", "--data-dir", str(root), "--io-frames", "1", "--out", str(out)]) == 0
    rows = table_rows(out.read_text())
    # the run of 4 frames lists img0, img1, img0, img1
    assert rows["predict.py"][3] == "failed: exit code 1: predict.py: 2 of 4 image(s) skipped"
    assert float(rows["train_ddp.py --eval-only (float32)"][0]) > 0
