import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# PaddleSeg's outputs and sample data: ../shared/fixtures, or a copy named by BISENET_FIXTURES
# (a GPU machine that gets the checkout alone: .ci/gpu uses .fixtures/ when present)
SHARED = Path(os.environ.get("BISENET_FIXTURES", ROOT.parent / "shared" / "fixtures"))
sys.path.insert(0, str(ROOT))


def shared_fixture(*parts):
    """Path to a file of the fixtures (SHARED); skips the test when they are not present."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: minutes on a CPU (learning, torchrun runs); CI runs them")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- the CUDA extension (tests/test_kernels_*.py) ----------------------------------------

def same_bits_extension():
    """The test ops same_bits_math and same_bits_divide (csrc/same_bits.cpp, .cu): same_bits.h's
    functions on both devices. .ci/gpu builds them beside the ops' extensions."""
    from kernels.build import Extension
    return Extension("bisenet_same_bits", ["same_bits.cpp", "same_bits.cu"], ["same_bits_math", "same_bits_divide"])


@pytest.fixture(scope="session")
def extension():
    """torch.ops.bisenet_cuda with every op's extension loaded (kernels.load()), and the
    same_bits test ops; skips when they cannot be built, unless BISENET_REQUIRE_KERNELS=1
    (CI), where that fails the test."""
    import torch
    try:
        import kernels
        from kernels.build import load_all
        load_all([*kernels.EXTENSIONS.values(), same_bits_extension()])  # side by side where the cores allow
    except Exception as error:
        if os.environ.get("BISENET_REQUIRE_KERNELS") == "1":
            pytest.fail(f"BISENET_REQUIRE_KERNELS=1 but the kernels did not build: {error!r}")
        pytest.skip(f"kernels extension unavailable: {error!r}")
    return torch.ops.bisenet_cuda


@pytest.fixture
def cuda_kernel(extension, monkeypatch):
    """The extension, with every op of the package sending CUDA tensors to its kernels."""
    import kernels
    for op_extension in kernels.EXTENSIONS.values():
        monkeypatch.setattr(op_extension, "use_cuda_kernel", True)
    return extension


@pytest.fixture
def cpu_loops(extension, monkeypatch):
    """The extension, with every op of the package sending CPU tensors too down its kernel
    path (its autograd.Function and torch.ops.bisenet_cuda's op), where the C++ CPU loops run:
    the path CUDA tensors take, with the kernels' arithmetic, on a machine without a GPU."""
    import kernels
    for op_extension in kernels.EXTENSIONS.values():
        monkeypatch.setattr(op_extension, "cpu_loops", True)
    return extension


@pytest.fixture
def no_tf32():
    """float32 convolutions and matmuls on CUDA, not TF32 (torch's cuDNN default), restored
    after the test. Set and restored by hand: torch.backends' flags are computed attributes,
    which pytest's monkeypatch (9.x) deletes on undo, an AttributeError."""
    import torch
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(params=["reference", "kernels"])
def fused_path(request):
    """An op on the CPU as it runs there (its reference), and down its kernels' path (the
    autograd.Function and the C++ ops, their CPU loops running: cpu_loops)."""
    if request.param == "kernels":
        request.getfixturevalue("cpu_loops")
    return request.param


def dispatched_ops(step):
    """The ops (their names, in order) that step() dispatches below autograd: on a GPU each is
    a kernel launch, or a view. A tiling plan the op asks for (once a size, on the host: the
    *_plan ops, no tensors) is left out."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recording(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not str(func).endswith("_plan.default"):
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recording() as recording:
        step()
    return recording.ops


def poison_cuda_cache(nbytes):
    """Hand freed NaN-filled blocks to the caching allocator, so that an output a kernel
    forgot to write comes back as NaN instead of a lucky zero."""
    import torch
    for size in (nbytes, 4 * nbytes):
        torch.full((size // 4 + 1,), float("nan"), device="cuda")
    torch.cuda.synchronize()


# Seeded random cases of the two ops, for the sweeps of test_kernels_loss, test_kernels_bga and
# test_kernels_same_bits.

def random_loss_shapes(count, seed):
    """count seeded (n, c, low, high, tile, seed) cases of the loss: sides from 1, upscales
    from 1 to 32 and between (high-res sides within 130), downscales, C on both sides of the
    forward with gradient's 20, the automatic tile and small explicit ones."""
    rng = random.Random(seed)
    for _ in range(count):
        c = rng.choice([1, 2, 5, 19, 20, 21, 40])
        low = (rng.randint(1, 12), rng.randint(1, 12))
        factor = rng.choice([0.5, 1, 1.7, 2, 3, 4, 8, 16, 32])
        high = tuple(max(1, min(130, round(side * factor) + rng.randint(-1, 1))) for side in low)
        tile = rng.choice([(0, 0), (0, 0), (1, 1), (1, 2), (2, 1), (rng.randint(1, 6), rng.randint(1, 6))])
        yield rng.randint(1, 2), c, low, high, tile, rng.randrange(2 ** 31)


def random_bga_shapes(count, seed):
    """count seeded (shape, low_hw, channels_last, tile, seed) cases of the BGA: channels from
    1 (odd counts: channels_last's groups of 16 cut short), sides from 1, upscales 1 to 4 and
    between, downscales, the automatic tile and small explicit ones."""
    rng = random.Random(seed)
    for _ in range(count):
        low_hw = (rng.randint(1, 9), rng.randint(1, 9))
        factor = rng.choice([0.5, 1, 1.5, 2, 2.5, 4])
        high = tuple(max(1, round(side * factor) + rng.randint(-1, 1)) for side in low_hw)
        shape = (rng.randint(1, 2), rng.choice([1, 3, 8, 16, 17, 40])) + high
        tile = rng.choice([(0, 0), (0, 0), (1, 1), (1, 2), (rng.randint(1, 5), rng.randint(1, 5))])
        yield shape, low_hw, rng.random() < 0.5, tile, rng.randrange(2 ** 31)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def kernel_device(request):
    """Each test body once on the CPU with the C++ loops in the ops' kernel path (the cpu_loops
    fixture) and once on the GPU (marked gpu) with the CUDA kernels in use (cuda_kernel), as
    pytorch/extension-cpp's tests run one body per device."""
    request.getfixturevalue("cuda_kernel" if request.param == "cuda" else "cpu_loops")
    return torch_device(request.param)


def torch_device(name):
    import torch
    return torch.device(name)
