""".ci/gpu, the prepared run for a GPU machine, checked where there is none: a device run is
scarce, so a step that fails on a typo must fail here first."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / ".ci" / "gpu").read_text()


def test_without_a_device_it_stops_with_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = subprocess.run(["bash", str(ROOT / ".ci" / "gpu"), "check"], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f".ci/gpu: {sys.executable} sees no CUDA device (torch.cuda.is_available() is False)"


def test_its_inline_python_runs(extension):
    # the JIT build step's snippet (the kernels are already built: it loads them and times it)
    snippets = re.findall(r'"\$python" -c "\n(.*?)"', SCRIPT, re.S)
    assert snippets, "no inline python in .ci/gpu"
    for code in snippets:
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]


def test_its_commands_parse():
    # kernels.bench's and bench.py's arguments as .ci/gpu passes them
    from kernels import bench as kernels_bench
    import bench
    script = SCRIPT.replace("\\\n", " ")  # continued lines joined
    kernels_args = re.search(r'"\$python" -m kernels\.bench (.*?) --out', script).group(1).split()
    kernels_bench.parse_args(kernels_args)
    bench_args = re.search(r'"\$python" bench\.py (.*?) --out', script).group(1).split()
    bench.parse_args(bench_args)
