import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "fixtures"
sys.path.insert(0, str(ROOT))


def shared_fixture(*parts):
    """Path to ../shared/fixtures/...; skips the test when the checkout has no ../shared."""
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

@pytest.fixture(scope="session")
def extension():
    """torch.ops.bisenet_cuda after kernels.build.load(); skips when it cannot be built,
    unless BISENET_REQUIRE_KERNELS=1 (CI), where that fails the test."""
    import torch
    try:
        from kernels import build
        build.load()
    except Exception as error:
        if os.environ.get("BISENET_REQUIRE_KERNELS") == "1":
            pytest.fail(f"BISENET_REQUIRE_KERNELS=1 but the kernels did not build: {error!r}")
        pytest.skip(f"kernels extension unavailable: {error!r}")
    return torch.ops.bisenet_cuda


@pytest.fixture
def cuda_kernel(extension, monkeypatch):
    """The extension, with every op of the package sending CUDA tensors to its kernels."""
    from kernels import bga
    monkeypatch.setattr(bga, "use_cuda_kernel", True)
    return extension


def poison_cuda_cache(nbytes):
    """Hand freed NaN-filled blocks to the caching allocator, so that an output a kernel
    forgot to write comes back as NaN instead of a lucky zero."""
    import torch
    for size in (nbytes, 4 * nbytes):
        torch.full((size // 4 + 1,), float("nan"), device="cuda")
    torch.cuda.synchronize()
