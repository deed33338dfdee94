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
    invocations = re.findall(r'"\$python" -m kernels\.bench (.*?)(?: --out .*)?$', script, re.M)
    # the timed tables (with compile; the host's part; the tiles; every head), the static sizes,
    # the pass under ncu
    assert len(invocations) == 6
    for kernels_args in invocations:
        kernels_bench.parse_args(kernels_args.split())
    bench_invocations = re.findall(r'"\$python" bench\.py (.*?) --out', script)
    assert len(bench_invocations) == 2  # the training rows and inference; --io
    for bench_args in bench_invocations:
        bench.parse_args(bench_args.split())


def run_steps(tmp_path, budget, steps):
    """The script's phase budget and step() (cut out of it), then `steps`, in bash."""
    start = SCRIPT.index("# the phase's time budget")
    end = SCRIPT.index("\n}\n", SCRIPT.index("step() {")) + 3
    script = f"out={tmp_path}; summary={tmp_path}/summary.txt; failed=0\n{SCRIPT[start:end]}{steps}\necho failed=$failed\n"
    return subprocess.run(["bash", "-c", script], env={**os.environ, "GPU_BUDGET": budget}, capture_output=True,
                          text=True, timeout=60)


def test_steps_keep_to_the_phase_budget(tmp_path):
    # a step's limit is cut to what the budget has left; a failure is reported with its rc
    result = run_steps(tmp_path, "20", 'step "quick" quick.log 600 true\nstep "fails" fails.log 600 false\n')
    quick, fails = (tmp_path / "summary.txt").read_text().splitlines()
    assert re.fullmatch(r"quick +ok  \(\d+s of (19|20)s, quick\.log\)", quick)
    assert "FAILED rc=1" in fails and result.stdout.strip().endswith("failed=1")
    # a step the budget leaves under 10 s for is skipped, and the phase fails
    result = run_steps(tmp_path, "5", 'step "late" late.log 600 true\n')
    assert "late" in result.stdout and "SKIPPED: the phase's 5s budget is spent (GPU_BUDGET)" in result.stdout
    assert result.stdout.strip().endswith("failed=1") and not (tmp_path / "late.log").exists()
    result = run_steps(tmp_path, "5m", "")
    assert result.returncode == 2 and result.stderr.strip() == ".ci/gpu: GPU_BUDGET must be whole seconds, got '5m'"


def test_a_kernel_that_never_returns_stops_the_check_phase(tmp_path):
    # kernels.check running out of time skips every later step (each would wait on the hung
    # kernel as long); failing in time does not
    start = SCRIPT.index('  if [ "$last_rc" -eq 124 ]')
    guard = SCRIPT[start:SCRIPT.index("  fi\n", start) + 5]
    result = run_steps(tmp_path, "60", f'step "kernels.check" check.log 1 sleep 30\n{guard}'
                                       'step "pytest" pytest.log 60 true\n')
    hung, skipped = (tmp_path / "summary.txt").read_text().splitlines()
    assert "FAILED rc=124" in hung and result.stdout.strip().endswith("failed=1")
    assert skipped.startswith("pytest") and "SKIPPED: kernels.check ran out of time" in skipped
    assert not (tmp_path / "pytest.log").exists()
    (tmp_path / "summary.txt").unlink()
    run_steps(tmp_path, "60", f'step "kernels.check" check.log 60 false\n{guard}step "pytest" pytest.log 60 true\n')
    assert re.match(r"pytest +ok", (tmp_path / "summary.txt").read_text().splitlines()[1])


def run_packages_block(tmp_path, workdir):
    """The script's block that installs .whl/ when python3 cannot import cityscapesscripts,
    cut out and run in `workdir` with a python3 that cannot (a shadowing package raises)."""
    hide = tmp_path / "hide" / "cityscapesscripts"
    hide.mkdir(parents=True, exist_ok=True)
    (hide / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    start = SCRIPT.index("# cityscapesscripts (data.py")
    end = SCRIPT.index("# the fixtures, when")
    script = (f"out={tmp_path}; summary={tmp_path}/summary.txt; failed=0; python={sys.executable}\n"
              f"{SCRIPT[start:end]}\necho failed=$failed\n"
              '"$python" -c "import cityscapesscripts.helpers.annotation as a; print(a.__file__)"\n')
    env = {**os.environ, "PYTHONPATH": str(hide.parent), "TMPDIR": str(tmp_path)}
    return subprocess.run(["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)


def test_missing_packages_come_from_the_wheels_folder(tmp_path):
    workdir = tmp_path / "checkout"
    workdir.mkdir()
    result = run_packages_block(tmp_path, workdir)
    assert "cannot import cityscapesscripts (and its pyquaternion), and .whl/ has no wheels: run '.ci/gpu wheels'" \
        in result.stdout and "failed=1" in result.stdout
    # a stand-in wheel of the package (pure Python, as the real one)
    import zipfile
    files = {"cityscapesscripts/__init__.py": "", "cityscapesscripts/helpers/__init__.py": "",
             "cityscapesscripts/helpers/annotation.py": "",
             "cityscapesscripts-0.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: cityscapesscripts\nVersion: 0.0\n",
             "cityscapesscripts-0.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                      "Tag: py3-none-any\n"}
    files["cityscapesscripts-0.0.dist-info/RECORD"] = "".join(f"{name},,\n" for name in files) + \
        "cityscapesscripts-0.0.dist-info/RECORD,,\n"
    (workdir / ".whl").mkdir()
    with zipfile.ZipFile(workdir / ".whl" / "cityscapesscripts-0.0-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    result = run_packages_block(tmp_path, workdir)
    assert "python packages: installed from .whl/ into" in result.stdout and "failed=0" in result.stdout, result.stderr
    assert result.stdout.strip().endswith(str(tmp_path / "bisenet-site" / "cityscapesscripts" / "helpers" / "annotation.py"))


def run_phase(tmp_path, phase, root=ROOT, **environment):
    """`.ci/gpu PHASE` end to end on this machine (in the checkout `root`, with `environment`
    added), with stand-ins for the GPU machine's tools (a python3 that sees a device;
    nvidia-smi, nvcc, compute-sanitizer, ncu), each recording its calls, the kernels' cache
    and the architectures it was given. -> (result, the summary's step names, the calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls.txt"
    for tool in ("python3", "nvidia-smi", "nvcc", "compute-sanitizer", "ncu"):
        (bin_dir / tool).write_text(f'#!/bin/bash\necho "{tool} $* (cache $BISENET_KERNELS_CACHE, '
                                    f'arch $TORCH_CUDA_ARCH_LIST)" >> {calls}\n')
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    out = tmp_path / phase
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python3"),
           "OUT": str(out), "GPU_BUDGET": "300"}
    env.pop("BISENET_KERNELS_CACHE", None)
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    env.update(environment)
    result = subprocess.run(["bash", str(root / ".ci" / "gpu"), phase], env=env, capture_output=True, text=True,
                            timeout=120)
    summary = (out / f"summary-{phase}.txt").read_text().splitlines()
    steps = [m.group(1) for line in summary[:-1] if (m := re.match(r"(.*?) +(ok|FAILED|SKIPPED)", line))]
    assert summary[-1] == f"--- .ci/gpu {phase}: passed; logs in {out}", summary
    return result, steps, calls.read_text().splitlines()


KERNEL_CHECKS = ["versions", "JIT build", "kernels.check", "pytest -m gpu (kernels)", "compute-sanitizer memcheck",
                 "compute-sanitizer racecheck", "compute-sanitizer initcheck", "compute-sanitizer synccheck"]
KERNEL_TABLES = ["kernels.bench (batch 4)", "kernels.bench (every head, 4 and 8)", "kernels.bench --host",
                 "kernels.bench --tiles", "kernels.bench --sass"]
TRAINING_AND_COUNTERS = ["bench.py", "bench.py --io", "ncu (the fused kernels)"]


@pytest.mark.parametrize("phase,groups", [
    ("check", KERNEL_CHECKS + ["pytest -m gpu (the rest)"]),
    ("bench", KERNEL_TABLES + TRAINING_AND_COUNTERS),
    # one process for both phases: the kernels' checks and tables before the other tests, bench.py, ncu
    ("all", KERNEL_CHECKS + KERNEL_TABLES + ["pytest -m gpu (the rest)"] + TRAINING_AND_COUNTERS),
    ("training", ["versions", "JIT build"] + TRAINING_AND_COUNTERS)])  # what 'all' leaves last: a second call
def test_each_phase_runs_its_steps_in_order(tmp_path, phase, groups):
    result, steps, calls = run_phase(tmp_path, phase)
    assert result.returncode == 0, result.stdout + result.stderr
    assert steps == groups
    # kernels.check alone, then under each of compute-sanitizer's four tools
    checks = [call.split(" --tool ")[-1].split()[0] if call.startswith("compute-sanitizer") else "alone"
              for call in calls if "-m kernels.check" in call]
    assert checks == ([] if phase in ("bench", "training") else
                      ["alone", "memcheck", "racecheck", "initcheck", "synccheck"])


def test_prebuilt_libraries_travel_alone_and_are_used(tmp_path):
    """`.ci/gpu prebuild` (a stand-in python3 playing the builds: each writes its library,
    objects and ninja files) keeps the libraries alone in .kernels-cache/; a phase in a checkout
    that carries that folder gives it to every step as the kernels' cache."""
    checkout = tmp_path / "checkout"
    (checkout / ".ci").mkdir(parents=True)
    (checkout / ".ci" / "gpu").write_text(SCRIPT)
    builder = tmp_path / "builder"
    builder.write_text('#!/bin/bash\n'
                       'if [[ "$2" == *__version__* ]]; then echo "2.11.0+cu130 CUDA 13.0"; exit 0; fi\n'
                       'folder=$BISENET_KERNELS_CACHE/bisenet_$3_0123456789abcdef\n'
                       'mkdir -p $folder && cd $folder && touch $(basename $folder).so $3.o $3.cuda.o build.ninja .ninja_log\n')
    builder.chmod(0o755)
    env = {**os.environ, "PYTHON": str(builder)}
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    script = ["bash", str(checkout / ".ci" / "gpu"), "prebuild"]
    result = subprocess.run(script, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == (
        ".ci/gpu prebuild: set TORCH_CUDA_ARCH_LIST to the GPU machine's architecture (9.0 for an H100 or H200)")
    result = subprocess.run(script, env={**env, "TORCH_CUDA_ARCH_LIST": "9.0"}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "prebuilt for torch 2.11.0+cu130 CUDA 13.0, TORCH_CUDA_ARCH_LIST=9.0: " in result.stdout
    cache = checkout / ".kernels-cache"
    assert sorted(str(path.relative_to(cache)) for path in cache.rglob("*") if path.is_file()) == [
        f"bisenet_{name}_0123456789abcdef/bisenet_{name}_0123456789abcdef.so" for name in ("bga", "loss", "same_bits")]
    # an image's TORCH_CUDA_ARCH_LIST is not the phases' (they build for the GPU they run on)
    result, steps, calls = run_phase(tmp_path, "check", root=checkout, TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0")
    assert steps[:2] == ["versions", "JIT build"]
    given = [call for call in calls if "(cache " in call]  # a call's last line (python3 -c's code has several)
    assert given and all(call.endswith(f"(cache {cache}, arch )") for call in given), given
    assert (tmp_path / "check" / "summary-check.txt").read_text().startswith(
        "kernels: the libraries of .kernels-cache/ where their key matches this machine's (.ci/gpu prebuild)\n"
        "kernels: TORCH_CUDA_ARCH_LIST=8.0;9.0;10.0 unset: the build targets this machine's GPU\n")
