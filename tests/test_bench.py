"""bench.py: the throughput table at tiny shapes (its numbers need a GPU)."""
import subprocess
import sys

import pytest

import bench
from conftest import ROOT
from datasets import make_dataset, pack, table_rows


def run_small_benchmark(tmp_path, size, warmup, workers):
    """bench.py on a small packed dataset at tiny shapes -> the table it wrote."""
    root = make_dataset(tmp_path / "data", size=size)
    pack(root)
    out = tmp_path / "bench.md"
    assert bench.main(["--data-dir", str(root), "--batch-size", "2", "--crop-size", "64", "128", "--iters", "3",
                       "--warmup", str(warmup), "--infer-size", "64", "128", "--infer-iters", "2",
                       "--num-workers", str(workers), "--out", str(out)]) == 0
    return out.read_text()


def test_help_lists_the_benchmark_flags():
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--iters", "--warmup", "--configs", "--infer-size", "--infer-iters", "--image-size", "--out"):
        assert flag in result.stdout


def test_smoke_prints_every_row(tmp_path, capsys):
    """On the CPU: one table with every configuration row (those needing CUDA marked), the
    inference rows and the projection line."""
    table = run_small_benchmark(tmp_path, size=(40, 60), warmup=1, workers=0)
    out = capsys.readouterr().out
    assert table in out
    rows = table_rows(table)
    # each measured row is logged as it ends (a run cut short keeps them)
    assert f"bench: baseline: {float(rows['baseline'][1]):.1f} img/s, {float(rows['baseline'][2]):.1f} ms a step" in out
    assert {name for name, *_ in bench.CONFIGS} <= rows.keys()
    for name in ("baseline", "bf16", "channels_last"):  # measured on the CPU
        images_per_s, step_ms = float(rows[name][1]), float(rows[name][2])
        assert images_per_s > 0 and step_ms > 0 and rows[name][3].endswith("%")
    for name in ("packed+gpu-aug", "fused-kernels", "packed+fused-kernels", "fused-sgd", "cudnn-benchmark", "all"):
        assert rows[name][1] == "-" and rows[name][5] == "needs CUDA"
    assert float(rows["fp32 eager, NCHW"][0]) > 0
    assert "Projected 160k iterations on 8 GPUs: n/a" in table


def test_unknown_row_is_a_usage_error():
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--configs", "nope"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "invalid choice: 'nope'" in result.stderr


@pytest.mark.gpu
def test_on_gpu_measures_every_row(tmp_path):
    """On a GPU every row is measured (the fused-kernels rows may report a failed build) and
    the projection line has a number."""
    table = run_small_benchmark(tmp_path, size=(64, 128), warmup=2, workers=1)
    rows = table_rows(table)
    for name, *_ in bench.CONFIGS:
        if not name.endswith("fused-kernels"):
            assert float(rows[name][1]) > 0 and float(rows[name][4]) > 0, rows[name]
    assert "Projected 160k iterations on 8 GPUs: n/a" not in table
