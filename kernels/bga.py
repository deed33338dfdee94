"""Fused Bilateral Guided Aggregation gating of BiSeNetV2 as one op.

    bga_aggregate(detail_keep, sem_up, detail_down, sem_keep)
        = detail_keep * sigmoid(up(sem_up)) + up(detail_down * sigmoid(sem_keep))

detail_keep (N, C, H, W); sem_up, detail_down, sem_keep (N, C, h, w); `up` is bilinear
(align_corners=False) to (H, W), as F.interpolate(size=(H, W)). A drop-in replacement for
`bisenetv2.bga_aggregate`: `model.bga.aggregate = kernels.bga.bga_aggregate`.

On CUDA tensors, when the extension is in use (see `EXTENSION.use_cuda_kernel`),
`bga_aggregate` runs the fused kernels of csrc/bga.cu (two forward kernels, the gate and
the output; two backward, the tiles and the rim) as the ops bisenet_cuda::bga_forward /
bga_backward under a torch.autograd.Function, the ops' fakes registered, so torch.compile sees one op each way; otherwise, and on CPU, the
plain-PyTorch reference below.
The output (and every gradient) is in detail_keep's memory format: channels_last when
detail_keep is channels_last (and not also plain contiguous), else NCHW.
"""
import torch
import torch.nn.functional as F

from .build import Extension, plan_fits

__all__ = ["bga_aggregate", "bga_aggregate_backward", "bga_aggregate_reference",
           "bga_aggregate_backward_reference", "EXTENSION"]

def _output_format(detail_keep):
    """The memory format of the op's outputs: detail_keep's (the kernels' rule too)."""
    if not detail_keep.is_contiguous() and detail_keep.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _well_formed(detail_keep, sem_up, detail_down, sem_keep):
    """check_inputs' conditions in one expression: the common case in a third of the per-input
    checks' host time (a fused step pays it once a call)."""
    if not (isinstance(detail_keep, torch.Tensor) and isinstance(sem_up, torch.Tensor)
            and isinstance(detail_down, torch.Tensor) and isinstance(sem_keep, torch.Tensor)):
        return False
    low = sem_up.shape
    return (detail_keep.dim() == 4 and len(low) == 4 and detail_down.shape == low and sem_keep.shape == low
            and detail_keep.shape[:2] == low[:2] and 0 not in detail_keep.shape[1:] and 0 not in low[1:]
            and detail_keep.dtype.is_floating_point
            and detail_keep.dtype == sem_up.dtype == detail_down.dtype == sem_keep.dtype
            and detail_keep.device == sem_up.device == detail_down.device == sem_keep.device)


def check_inputs(detail_keep, sem_up, detail_down, sem_keep):
    """ValueError naming the offending input unless detail_keep is (N, C, H, W) and the
    other three are one (N, C, h, w) shape, all of one floating dtype on one device."""
    if _well_formed(detail_keep, sem_up, detail_down, sem_keep):
        return
    named = {"detail_keep": detail_keep, "sem_up": sem_up, "detail_down": detail_down,
             "sem_keep": sem_keep}
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"bga_aggregate: {name} must be a tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"bga_aggregate: {name} must be 4D (N, C, H, W), got shape {tuple(tensor.shape)}")
        if 0 in tensor.shape[1:]:
            raise ValueError(f"bga_aggregate: {name} has no channel or an empty plane, shape {tuple(tensor.shape)}")
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"bga_aggregate: {name} must be floating point, got {tensor.dtype}")
    for name in ("sem_up", "detail_down", "sem_keep"):
        tensor = named[name]
        if tensor.shape[:2] != detail_keep.shape[:2]:
            raise ValueError(f"bga_aggregate: {name} {tuple(tensor.shape)} and detail_keep "
                             f"{tuple(detail_keep.shape)} differ in N or C")
        if tensor.shape != sem_up.shape:
            raise ValueError(f"bga_aggregate: {name} {tuple(tensor.shape)} and sem_up "
                             f"{tuple(sem_up.shape)} differ")
    dtypes = {name: tensor.dtype for name, tensor in named.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
        raise ValueError(f"bga_aggregate: inputs must share one dtype, got {listed}")
    devices = {name: tensor.device for name, tensor in named.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} {device}" for name, device in devices.items())
        raise ValueError(f"bga_aggregate: inputs must be on one device, got {listed}")


# ---------------------------------------------------------------------------------------
# Reference (plain PyTorch): the CPU path and the tests' oracle.

def _up(low, size):
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False)


def _up_adjoint(high, low_shape):
    """up^T: the adjoint of _up from low_shape (N, C, h, w) to high's (H, W)."""
    return torch.ops.aten.upsample_bilinear2d_backward(
        high, list(high.shape[-2:]), list(low_shape), False, None, None)


def bga_aggregate_reference(detail_keep, sem_up, detail_down, sem_keep):
    """detail_keep * sigmoid(up(sem_up)) + up(detail_down * sigmoid(sem_keep)), the same
    composition as bisenetv2.bga_aggregate, output in detail_keep's memory format."""
    size = detail_keep.shape[-2:]
    out = detail_keep * torch.sigmoid(_up(sem_up, size)) + _up(detail_down * torch.sigmoid(sem_keep), size)
    return out.contiguous(memory_format=_output_format(detail_keep))


def bga_aggregate_backward_reference(grad_out, detail_keep, sem_up, detail_down, sem_keep):
    """The four input gradients of bga_aggregate, written out:
        s = sigmoid(up(sem_up)), gate = sigmoid(sem_keep)
        grad_detail_keep = g * s
        grad_sem_up      = up^T(g * detail_keep * s * (1 - s))
        grad_detail_down = up^T(g) * gate
        grad_sem_keep    = up^T(g) * detail_down * gate * (1 - gate)"""
    fmt = _output_format(detail_keep)
    sem_gate = torch.sigmoid(_up(sem_up, detail_keep.shape[-2:]))
    gate = torch.sigmoid(sem_keep)
    up_t_grad = _up_adjoint(grad_out, sem_up.shape)
    grads = (grad_out * sem_gate,
             _up_adjoint(grad_out * detail_keep * sem_gate * (1 - sem_gate), sem_up.shape),
             up_t_grad * gate,
             up_t_grad * detail_down * gate * (1 - gate))
    return tuple(grad.contiguous(memory_format=fmt) for grad in grads)


# ---------------------------------------------------------------------------------------
# The op: the CUDA kernels (torch.ops.bisenet_cuda.bga_forward / bga_backward, one call each
# way) under a torch.autograd.Function, or the reference. A Function, not a Python custom op
# around the C++ ops: that layer cost about 60 us of host time a forward + backward (CPU
# loops on tiny tensors standing in for the kernels), as much as the kernels' GPU time at
# the benchmark's shapes; torch.compile traces the Function and the ops' fakes below.

def _empty_like_output(tensor, fmt):
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device, memory_format=fmt)


def _register_fakes():
    """The C++ ops' fake implementations (output shapes, dtypes, memory formats), for
    torch.compile; EXTENSION.load() calls this once the library defines the ops."""
    @torch.library.register_fake("bisenet_cuda::bga_forward")
    def _(detail_keep, sem_up, detail_down, sem_keep):
        check_inputs(detail_keep, sem_up, detail_down, sem_keep)
        return _empty_like_output(detail_keep, _output_format(detail_keep))

    @torch.library.register_fake("bisenet_cuda::bga_backward")
    def _(grad_out, detail_keep, sem_up, detail_down, sem_keep, tile_h=0, tile_w=0, lanes=0):
        check_inputs(detail_keep, sem_up, detail_down, sem_keep)
        fmt = _output_format(detail_keep)
        return (_empty_like_output(detail_keep, fmt), _empty_like_output(sem_up, fmt),
                _empty_like_output(sem_up, fmt), _empty_like_output(sem_up, fmt))


# csrc/bga.cpp (schema, checks, the CPU loops) and csrc/bga.cu (the CUDA kernels); its
# use_cuda_kernel says whether CUDA tensors get the kernels (kernels.select sets it)
EXTENSION = Extension("bisenet_bga", ["bga.cpp", "bga.cu"], ["bga_forward", "bga_backward", "bga_backward_plan"],
                      register_fakes=_register_fakes)


class _BgaKernels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, detail_keep, sem_up, detail_down, sem_keep):
        ctx.save_for_backward(detail_keep, sem_up, detail_down, sem_keep)
        return torch.ops.bisenet_cuda.bga_forward(detail_keep, sem_up, detail_down, sem_keep)

    @staticmethod
    @torch.autograd.function.once_differentiable  # (a gradient of the gradient: an error, not zeros)
    def backward(ctx, grad_out):
        return tuple(torch.ops.bisenet_cuda.bga_backward(grad_out, *ctx.saved_tensors))


_FITS = {}  # (detail_keep's shape and strides, sem_up's shape, dtype) -> whether the backward's tiles fit


def _backward_fits(detail_keep, sem_up):
    """Whether a tile of the backward kernel fits a block's shared memory for these sizes: it
    holds at least one low-res pixel's reach, so from an upscale of about 52 (NCHW float32, 36
    in float64; channels_last about 690, 410) none does, and such a call runs the reference,
    with a warning once a size. Not asked under torch.compile (its sizes may be symbolic):
    there such sizes raise, as the op does."""
    if torch.compiler.is_compiling():
        return True
    return plan_fits(_FITS, (detail_keep.shape, detail_keep.stride(), sem_up.shape, detail_keep.dtype),
                     "bga_aggregate runs the PyTorch reference for these sizes", _ask_plan, detail_keep, sem_up)


def _ask_plan(detail_keep, sem_up):
    channels_last = _output_format(detail_keep) == torch.channels_last
    torch.ops.bisenet_cuda.bga_backward_plan([1, *detail_keep.shape[1:]], list(sem_up.shape[2:]), channels_last,
                                             detail_keep.dtype)


def bga_aggregate(detail_keep, sem_up, detail_down, sem_keep):
    """detail_keep * sigmoid(up(sem_up)) + up(detail_down * sigmoid(sem_keep)); see the
    module docstring. The CUDA kernels where EXTENSION.runs_kernel says so, else the reference."""
    check_inputs(detail_keep, sem_up, detail_down, sem_keep)
    if EXTENSION.runs_kernel(detail_keep) and _backward_fits(detail_keep, sem_up):
        return _BgaKernels.apply(detail_keep, sem_up, detail_down, sem_keep)
    return bga_aggregate_reference(detail_keep, sem_up, detail_down, sem_keep)


def bga_aggregate_backward(grad_out, detail_keep, sem_up, detail_down, sem_keep):
    """(grad_detail_keep, grad_sem_up, grad_detail_down, grad_sem_keep) of bga_aggregate
    for the output gradient grad_out (N, C, H, W): the backward kernel, or the reference."""
    check_inputs(detail_keep, sem_up, detail_down, sem_keep)
    grad_out = grad_out.to(detail_keep.dtype)
    if EXTENSION.runs_kernel(detail_keep) and _backward_fits(detail_keep, sem_up):
        return tuple(torch.ops.bisenet_cuda.bga_backward(grad_out, detail_keep, sem_up, detail_down, sem_keep))
    return bga_aggregate_backward_reference(grad_out, detail_keep, sem_up, detail_down, sem_keep)
