"""BiSeNetV2's fused CUDA kernels and their PyTorch references.

    ohem_cross_entropy(logits, labels, thresh=0.7, min_kept=None, ignore_index=255, validate=True)
    bga_aggregate(detail_keep, sem_up, detail_down, sem_keep)
    load()                      # JIT-build the CUDA extension (kernels/build.py)
    select(mode, device, log)   # -> (loss function, BGA function) for train_ddp.py --kernels
"""
from .bga import bga_aggregate, bga_aggregate_reference
from .build import load
from .loss import ohem_cross_entropy, ohem_cross_entropy_reference

__all__ = ["bga_aggregate", "bga_aggregate_reference", "load", "ohem_cross_entropy",
           "ohem_cross_entropy_reference", "select"]


def select(mode, device, log=print):
    """The ops for `train_ddp.py --kernels MODE` on `device`, logging which path is taken.

    torch: the PyTorch references. cuda: the CUDA kernels; a failed build is an error.
    auto: the CUDA kernels when the device is a GPU and they build, else the references
    (the reason is logged)."""
    from . import bga
    if mode == "torch" or (mode == "auto" and device.type != "cuda"):
        bga.use_cuda_kernel = False
        log(f"kernels: PyTorch references ({'--kernels torch' if mode == 'torch' else 'no CUDA device'})")
        return ohem_cross_entropy_reference, bga_aggregate_reference
    if device.type != "cuda":
        raise RuntimeError("--kernels cuda needs a CUDA device")
    try:
        load()
    except RuntimeError as e:
        if mode == "cuda":
            raise
        bga.use_cuda_kernel = False
        log(f"kernels: the CUDA extension did not build, using the PyTorch references: {' '.join(str(e).split())[:500]}")
        return ohem_cross_entropy_reference, bga_aggregate_reference
    bga.use_cuda_kernel = True
    log("kernels: fused CUDA kernels (upsample+CE/OHEM loss, BGA)")
    return ohem_cross_entropy, bga_aggregate
