"""BiSeNetV2's fused CUDA kernels and their PyTorch references.

    ohem_cross_entropy(logits, labels, thresh=0.7, min_kept=None, ignore_index=255, validate=True,
                       class_weights=None)
    bga_aggregate(detail_keep, sem_up, detail_down, sem_keep)
    load()                      # JIT-build every op's CUDA extension (kernels/build.py)
    select(mode, device, log)   # -> (loss function, BGA function) for train_ddp.py --kernels,
                                #    each CUDA kernel checked first (kernels/check.py)
"""
from . import bga, build, loss
from .bga import bga_aggregate, bga_aggregate_reference
from .loss import ohem_cross_entropy, ohem_cross_entropy_reference

__all__ = ["bga_aggregate", "bga_aggregate_reference", "load", "ohem_cross_entropy",
           "ohem_cross_entropy_reference", "select"]

EXTENSIONS = {"loss": loss.EXTENSION, "bga": bga.EXTENSION}


def load(verbose=False):
    """Builds (once per source version; side by side) and loads every op's extension; raises
    RuntimeError with the cause when one cannot be built."""
    build.load_all(EXTENSIONS.values(), verbose=verbose)


def select(mode, device, log=print):
    """The ops for `train_ddp.py --kernels MODE` on `device`, logging which path is taken.

    torch: the PyTorch references. cuda: the CUDA kernels; a failed build, or a kernel that
    disagrees with its reference on kernels.check's quick cases, is an error. auto: the CUDA
    kernels when the device is a GPU, they build and they pass those checks, else the
    references (per op: the reason is logged)."""
    from . import check
    if mode == "torch" or (mode == "auto" and device.type != "cuda"):
        use_kernels(False)
        log(f"kernels: PyTorch references ({'--kernels torch' if mode == 'torch' else 'no CUDA device'})")
        return ohem_cross_entropy_reference, bga_aggregate_reference
    if device.type != "cuda":
        raise RuntimeError("--kernels cuda needs a CUDA device")
    try:
        load()
    except RuntimeError as e:
        if mode == "cuda":
            raise
        use_kernels(False)
        log(f"kernels: the CUDA extension did not build, using the PyTorch references: {' '.join(str(e).split())[:500]}")
        return ohem_cross_entropy_reference, bga_aggregate_reference
    # each kernel once against its reference before training on it (once per process)
    failed = {}
    for op, name, _, message in check.run_cases(device, check.QUICK):
        if message:
            failed.setdefault(op, f"{name}: {message}")
    if failed and mode == "cuda":
        raise RuntimeError("kernels: the CUDA kernels disagree with their references: " + "; ".join(failed.values()))
    for op, reason in failed.items():
        log(f"kernels: the fused {op} kernel disagrees with its reference ({reason}); using the PyTorch reference")
    for op, extension in EXTENSIONS.items():
        extension.use_cuda_kernel = op not in failed
    loss_fn = ohem_cross_entropy_reference if "loss" in failed else ohem_cross_entropy
    bga_fn = bga_aggregate_reference if "bga" in failed else bga_aggregate
    fused = [what for op, what in (("loss", "upsample+CE/OHEM loss"), ("bga", "BGA")) if op not in failed]
    if fused:
        log(f"kernels: fused CUDA kernels ({', '.join(fused)}), checked against the references")
    return loss_fn, bga_fn


def use_kernels(value):
    """Sets every op's EXTENSION.use_cuda_kernel (see build.Extension)."""
    for extension in EXTENSIONS.values():
        extension.use_cuda_kernel = value
