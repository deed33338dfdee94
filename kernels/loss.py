"""Cross-entropy / OHEM on low-resolution logits against full-resolution labels.

    ohem_cross_entropy(logits, labels, thresh=0.7, min_kept=None, ignore_index=255, validate=True,
                       class_weights=None)

logits (N, C, h, w) are bilinearly upsampled to the labels' (H, W) (align_corners=False, in
float32 from the upcast logits), then the per-pixel cross-entropy in float32, then
  thresh=None: the mean over non-ignored pixels (PaddleSeg's CE; 0 when all are ignored);
  else OHEM (CoinCheung/BiSeNet): k = min(min_kept, valid) (min_kept default valid // 16);
      the pixels whose loss exceeds -log(thresh) if at least k do, else the k largest; the
      mean of the kept (0 when none). Ties at the k-th largest value share the remaining
      weight equally, so the loss equals the top-k mean whatever the order of equal values.
With class_weights (C,) the mean is weighted by each pixel's class, sum(w[y] l) / sum(w[y])
over the pixels that count (torch's and PaddleSeg's weighted CE); OHEM selects on the
unweighted losses (how hard a pixel is does not depend on its class's weight).

Two implementations, neither with a host synchronisation (the selection is done with
tensors, not Python numbers); only `validate=True` syncs, to raise on a bad label:
  ohem_cross_entropy_reference: plain PyTorch (F.interpolate, F.cross_entropy, a sort for
      the k-th largest): the oracle.
  ohem_cross_entropy: the per-pixel loss, and the CE mean, are `upsample_cross_entropy`
      (CUDA: the op bisenet_cuda::upsample_ce_forward, csrc/ohem_ce.cu, interpolates on the
      fly, never materialising (N, C, H, W), and its backward writes the low-res gradient
      directly, deterministically; the CE mean of a training step, C <= 20, is one op,
      upsample_ce_forward_grad, the loss and its gradient from the same exps, and so is
      OHEM's, its gradient over the hard pixels used where the selection keeps them; CPU:
      plain PyTorch), and the selection, with the OHEM
      loss, is `ohem_weights_op` (CUDA: bisenet_cuda::ohem_weights, a radix select of the
      k-th largest loss and the weights, counts kept on the device; CPU: the sort-based
      reference). With validate=False a label outside [0, C) that is not ignore_index
      makes the loss NaN instead of raising.
"""
import math

import torch
import torch.nn.functional as F

from .build import Extension, plan_fits

__all__ = ["ohem_cross_entropy", "ohem_cross_entropy_reference", "upsample_cross_entropy",
           "upsample_cross_entropy_backward", "ohem_weights_op", "check_labels", "EXTENSION"]


def check_inputs(logits, labels):
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError("ohem_cross_entropy: logits and labels must be tensors")
    if logits.dim() != 4 or labels.dim() != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"ohem_cross_entropy: logits {tuple(logits.shape)} must be (N, C, h, w) and labels "
                         f"{tuple(labels.shape)} (N, H, W)")
    if labels.dtype not in (torch.int64, torch.uint8):
        raise ValueError(f"ohem_cross_entropy: labels must be int64 or uint8, got {labels.dtype}")
    if logits.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"ohem_cross_entropy: logits must be float32, float64, float16 or bfloat16, got {logits.dtype}")
    if 0 in logits.shape[1:]:
        raise ValueError(f"ohem_cross_entropy: logits {tuple(logits.shape)} have no class or an empty plane")
    if 0 in labels.shape[1:]:
        raise ValueError(f"ohem_cross_entropy: labels {tuple(labels.shape)} have an empty plane")
    if logits.device != labels.device:
        raise ValueError(f"ohem_cross_entropy: logits are on {logits.device} but labels on {labels.device}")


def check_selection(thresh, min_kept):
    """ValueError for an OHEM threshold that is not a probability in (0, 1] (thresh=None: CE)
    or a negative min_kept."""
    if thresh is not None and not 0 < thresh <= 1:
        raise ValueError(f"ohem_cross_entropy: thresh {thresh} must be a probability in (0, 1], or None for CE")
    if min_kept is not None and min_kept < 0:
        raise ValueError(f"ohem_cross_entropy: min_kept {min_kept} must be at least 0, or None for valid // 16")


def check_class_weights(class_weights, num_classes, validate):
    """ValueError unless class_weights is None or a floating tensor (C,) for the logits' C;
    with validate also unless its values are finite, at least 0 and not all 0 (syncs on CUDA)."""
    if class_weights is None:
        return
    if not isinstance(class_weights, torch.Tensor) or not class_weights.is_floating_point() \
            or tuple(class_weights.shape) != (num_classes,):
        described = (f"{class_weights.dtype} {tuple(class_weights.shape)}" if isinstance(class_weights, torch.Tensor)
                     else type(class_weights).__name__)
        raise ValueError(f"ohem_cross_entropy: class_weights must be a floating tensor of shape ({num_classes},), "
                         f"one weight a class, got {described}")
    if validate and not (torch.isfinite(class_weights).all() & (class_weights >= 0).all()
                         & (class_weights > 0).any()):
        raise ValueError(f"ohem_cross_entropy: class_weights must be finite, at least 0 and not all 0, "
                         f"got {class_weights.tolist()}")


def check_labels(labels, num_classes, ignore_index):
    """ValueError naming a label outside [0, C) that is not ignore_index (syncs on CUDA)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(f"labels: value {int(labels[bad][0])} is outside [0, {num_classes}) "
                         f"and not ignore_index {ignore_index}")


def accumulate_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def upsample(logits, size):
    return F.interpolate(logits.to(accumulate_dtype(logits)), size=size, mode="bilinear", align_corners=False)


def pixel_losses(logits, labels, ignore_index=255):
    """-> per-pixel cross-entropy (N, H, W) float32 (0 where ignored) and the valid mask."""
    labels = labels.long()
    valid = labels != ignore_index
    loss = F.cross_entropy(upsample(logits, labels.shape[-2:]), torch.where(valid, labels, 0), reduction="none")
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


def kth_largest_by_sort(values, valid, k):
    """The k-th largest (k >= 1; any value when k == 0) of values[valid], flat tensors."""
    ranked = torch.where(valid, values, torch.full_like(values, -1.0))
    ranked = torch.cat([ranked, ranked.new_full((1,), -1.0)]).sort(descending=True).values  # never empty
    return ranked.index_select(0, (k - 1).clamp(min=0).view(1)).squeeze(0)


def ohem_weights(loss, valid, threshold, min_kept):
    """Per-pixel weights (flattened) whose weighted sum over their sum is the OHEM loss;
    threshold = -log(thresh)."""
    loss, valid = loss.flatten(), valid.flatten()
    num_valid = valid.sum()
    k = num_valid // 16 if min_kept is None else num_valid.clamp(max=min_kept)
    hard = valid & (loss > threshold)
    kth = kth_largest_by_sort(loss, valid, k)
    greater, equal = valid & (loss > kth), valid & (loss == kth)
    share = (k - greater.sum()).to(loss.dtype) / equal.sum().clamp(min=1)
    top_k = greater.to(loss.dtype) + equal.to(loss.dtype) * share
    use_hard = (hard.sum() >= k) | (k == 0)
    return torch.where(use_hard, hard.to(loss.dtype), top_k)


def class_weight_of_pixels(labels, class_weights, ignore_index):
    """Each pixel's class weight, like labels, in class_weights' dtype; 0 where the label is
    ignore_index or outside [0, C)."""
    labels = labels.long()
    num_classes = class_weights.numel()
    inside = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    return torch.where(inside, class_weights[labels.clamp(0, num_classes - 1)], 0)


def mean_loss(loss, labels, ignore_index, class_weights):
    """The mean of the per-pixel loss over the pixels not ignored (0 when none), weighted by
    their class's weight when class_weights is given."""
    if class_weights is None:
        return loss.sum() / (labels != ignore_index).sum().clamp(min=1)
    weights = class_weight_of_pixels(labels, class_weights.to(loss), ignore_index)
    return (loss * weights).sum() / weights.sum().clamp(min=1e-12)


def ohem_cross_entropy_reference(logits, labels, thresh=0.7, min_kept=None, ignore_index=255, validate=True,
                                 class_weights=None):
    check_inputs(logits, labels)
    check_selection(thresh, min_kept)
    check_class_weights(class_weights, logits.shape[1], validate)
    if validate:
        check_labels(labels, logits.shape[1], ignore_index)
    loss, valid = pixel_losses(logits, labels, ignore_index)
    if thresh is None:
        return mean_loss(loss, labels, ignore_index, class_weights)
    weights = ohem_weights(loss, valid, -math.log(thresh), min_kept)
    if class_weights is not None:
        weights = weights * class_weight_of_pixels(labels, class_weights.to(loss), ignore_index).flatten()
    return (loss.flatten() * weights).sum() / weights.sum().clamp(min=1e-12)


# ---------------------------------------------------------------------------------------
# The references of the ops below: the selection as per-pixel weights, the per-pixel loss,
# the CE mean and the logits' gradient.

def ohem_weights_reference(loss, labels, ignore_index, threshold, min_kept, class_weights=None):
    """ohem_weights (above) for the op's arguments (min_kept < 0: valid // 16), times each
    pixel's class weight when class_weights is given, divided by their sum: (N, H, W) like loss."""
    weights = ohem_weights(loss, labels != ignore_index, threshold, None if min_kept < 0 else min_kept)
    if class_weights is not None:
        weights = weights * class_weight_of_pixels(labels, class_weights, ignore_index).flatten()
    return (weights / weights.sum().clamp(min=1e-12)).view_as(loss)


def ce_mean_reference(loss, labels, ignore_index):
    """(mean, denominator): the mean of loss over the pixels whose label is not ignore_index
    (0 when none) and max(their count, 1), 0-dim in loss's dtype."""
    counted = labels != ignore_index
    denominator = counted.sum().clamp(min=1).to(loss.dtype)
    return torch.where(counted, loss, torch.zeros_like(loss)).sum() / denominator, denominator


def upsample_cross_entropy_reference(logits, labels, ignore_index):
    """(loss, lse), each (N, H, W) in float32 (float64 for float64 logits): the per-pixel
    cross-entropy of the upsampled logits and their log-sum-exp; 0 and 0 where the label is
    ignore_index, NaN and NaN where it is outside [0, C)."""
    num_classes = logits.shape[1]
    up = upsample(logits, labels.shape[-2:])
    labels = labels.long()
    ignored = labels == ignore_index
    bad = ~ignored & ((labels < 0) | (labels >= num_classes))
    lse = torch.logsumexp(up, dim=1)
    picked = up.gather(1, labels.clamp(0, num_classes - 1)[:, None])[:, 0]
    zero, nan = torch.zeros_like(lse), torch.full_like(lse, math.nan)
    loss = torch.where(bad, nan, torch.where(ignored, zero, lse - picked))
    return loss, torch.where(bad, nan, torch.where(ignored, zero, lse))


def upsample_cross_entropy_backward_reference(grad_loss, logits, labels, lse, ignore_index):
    """The logits' gradient: up^T(grad_loss * (softmax(up(logits)) - onehot(label))) over the
    pixels that are not ignored and have a non-zero grad_loss."""
    num_classes = logits.shape[1]
    up = upsample(logits, labels.shape[-2:])
    labels = labels.long()
    counted = (labels != ignore_index) & (grad_loss != 0)
    onehot = F.one_hot(labels.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).to(up.dtype)
    grad_up = torch.where(counted[:, None], grad_loss.to(up.dtype)[:, None] * (torch.exp(up - lse[:, None]) - onehot),
                          torch.zeros_like(up))
    grad = torch.ops.aten.upsample_bilinear2d_backward(grad_up, list(labels.shape[-2:]), list(logits.shape),
                                                       False, None, None)
    return grad.to(logits.dtype).contiguous()


# ---------------------------------------------------------------------------------------
# The ops: the CUDA kernels (torch.ops.bisenet_cuda, csrc/) under torch.autograd.Functions,
# or the references. Functions, not Python custom ops around the C++ ops: that layer cost
# about 60 us of host time a forward + backward (CPU loops on tiny tensors standing in for
# the kernels), which at the smaller heads is a good part of the kernels' own GPU time;
# torch.compile traces the Functions and the C++ ops' fakes below.

def _register_fakes():
    """The C++ ops' fake implementations (output shapes and dtypes), for torch.compile;
    EXTENSION.load() calls this once the library defines the ops."""
    @torch.library.register_fake("bisenet_cuda::upsample_ce_forward")
    def _(logits, labels, ignore_index, with_mean=True):
        check_inputs(logits, labels)
        dtype = accumulate_dtype(logits)
        mean_shape = () if with_mean else (0,)
        return (labels.new_empty(labels.shape, dtype=dtype), labels.new_empty(labels.shape, dtype=dtype),
                labels.new_empty(mean_shape, dtype=dtype), labels.new_empty(mean_shape, dtype=dtype))

    @torch.library.register_fake("bisenet_cuda::upsample_ce_backward")
    def _(grad_loss, logits, labels, lse, ignore_index, band=0, chunk=0, grad_sum=None, sum_weight=None,
          grad_scale=None, sum_divisor=None):
        check_inputs(logits, labels)
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

    @torch.library.register_fake("bisenet_cuda::upsample_ce_forward_grad")
    def _(logits, labels, ignore_index, band=0, chunk=0, threshold=None):
        check_inputs(logits, labels)
        dtype = accumulate_dtype(logits)
        return (labels.new_empty(labels.shape, dtype=dtype), labels.new_empty(labels.shape, dtype=dtype),
                labels.new_empty((), dtype=dtype), labels.new_empty((), dtype=dtype),
                logits.new_empty(logits.shape, dtype=dtype))

    @torch.library.register_fake("bisenet_cuda::ohem_weights")
    def _(loss, labels, ignore_index, threshold, min_kept, class_weights=None):
        return torch.empty_like(loss, memory_format=torch.contiguous_format), loss.new_empty(()), loss.new_empty(())


# csrc/ohem_ce.cpp (schema, checks, the CPU loops) and csrc/ohem_ce.cu (the CUDA kernels);
# its use_cuda_kernel says whether CUDA tensors get the kernels (kernels.select sets it)
EXTENSION = Extension("bisenet_loss", ["ohem_ce.cpp", "ohem_ce.cu"],
                      ["upsample_ce_forward", "upsample_ce_backward", "upsample_ce_forward_grad", "ohem_weights"],
                      register_fakes=_register_fakes)

# The most classes the forward with gradient takes (csrc/ohem_ce_math.h: kCeFusedMostClasses),
# and the most shared memory a tile takes (kCeMaxSharedBytes).
FUSED_GRAD_MOST_CLASSES = 20
KERNEL_MOST_SHARED_BYTES = 96 * 1024


class _UpsampleCrossEntropyKernels(torch.autograd.Function):
    """upsample_cross_entropy's kernels: forward (loss, lse, mean, denominator), backward the
    logits' gradient from the loss's and the mean's.

    with_grad (the CE mean of a training step, C <= FUSED_GRAD_MOST_CLASSES): the forward is
    upsample_ce_forward_grad, which also returns grad_sum, the gradient of the counted pixels'
    summed losses, from the same exps (one kernel where a step took two, each evaluating
    every class of every pixel); the mean's gradient is then grad_sum times grad_mean /
    denominator in the logits' dtype (the backward op without grad_loss, given grad_mean and
    the denominator: one elementwise kernel, which divides), and only a gradient of the
    per-pixel loss runs the gather."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, with_mean, with_grad):
        if with_grad:
            loss, lse, mean, denominator, grad_sum = torch.ops.bisenet_cuda.upsample_ce_forward_grad(
                logits, labels, ignore_index)
        else:
            loss, lse, mean, denominator = torch.ops.bisenet_cuda.upsample_ce_forward(logits, labels, ignore_index,
                                                                                      with_mean)
            grad_sum = None
        ctx.mark_non_differentiable(lse, denominator)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zero-filled
        ctx.save_for_backward(logits, labels, lse, denominator, grad_sum)
        ctx.ignore_index, ctx.with_mean = ignore_index, with_mean
        return loss, lse, mean, denominator

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_lse, grad_mean, grad_denominator):
        logits, labels, lse, denominator, grad_sum = ctx.saved_tensors
        grad = None
        if grad_mean is not None and ctx.with_mean:  # without the mean, its (0,) gradient is nothing
            if grad_sum is not None and grad_loss is None:  # a training step's CE mean: one op, which divides
                return (torch.ops.bisenet_cuda.upsample_ce_backward(None, logits, labels, lse, ctx.ignore_index,
                                                                    0, 0, grad_sum, grad_mean, None, denominator),
                        None, None, None, None)
            share = grad_mean / denominator  # each counted pixel's (the kernels skip the rest)
            if grad_sum is not None:
                grad = grad_sum * share
            else:
                grad_loss = share.expand(labels.shape) if grad_loss is None else grad_loss + share
        if grad_loss is not None:
            per_pixel = _gather(grad_loss.to(lse.dtype), logits, labels, lse, ctx.ignore_index)
            grad = per_pixel if grad is None else grad + per_pixel
        if grad is None:  # only lse was used
            return None, None, None, None, None
        return grad.to(logits.dtype), None, None, None, None


def _with_grad(logits, labels, gather=False):
    """Whether the loss's forward also computes its gradient (upsample_ce_forward_grad): the
    logits need one, C <= FUSED_GRAD_MOST_CLASSES and its tiles fit (gather: the backward
    gather's too)."""
    if not (logits.requires_grad and torch.is_grad_enabled() and logits.shape[1] <= FUSED_GRAD_MOST_CLASSES):
        return False
    return _tiles_fit(logits, labels, forward=True) and (not gather or _tiles_fit(logits, labels, forward=False))


_FITS = {}  # (logits' shape, labels' shape, dtype, device, forward) -> whether the tiles fit: asked once
_INSTEAD = {forward: f"the loss's {'forward with gradient' if forward else 'backward'} for these sizes runs the "
                     "PyTorch reference" for forward in (True, False)}


def _tiles_fit(logits, labels, forward):
    """Whether a tile of the forward with gradient (forward=True) or of the backward's gather
    fits a block's shared memory for these sizes on this device. A tile holds at least one
    low-res pixel's reach, so from an upscale of about 48 (float32; 40 within sm_75's 64
    KiB, 34 in float64) no tile of the gather fits, from about 76 (58) none of the forward
    with gradient: such a step runs the PyTorch reference, with a warning once a size. Not
    asked under torch.compile (its sizes may be symbolic): there such sizes raise, as the ops do."""
    if torch.compiler.is_compiling():
        return True
    return plan_fits(_FITS, (logits.shape, labels.shape, logits.dtype, logits.device, forward), _INSTEAD[forward],
                     _ask_plan, logits, labels, forward)


def _ask_plan(logits, labels, forward):
    budget = None  # the CPU loops': KERNEL_MOST_SHARED_BYTES
    if logits.is_cuda:  # as the launchers take it
        optin = torch.cuda.get_device_properties(logits.device).shared_memory_per_block_optin
        budget = min(KERNEL_MOST_SHARED_BYTES, optin)
    size = [1, logits.shape[1], *labels.shape[1:]]  # (N, C, H, W): the plan is a sample's
    torch.ops.bisenet_cuda.upsample_ce_backward_plan(size, list(logits.shape[2:]), accumulate_dtype(logits),
                                                     shared_budget=budget, forward=forward)


def _upsample_cross_entropy(logits, labels, ignore_index, with_mean):
    """upsample_cross_entropy for checked inputs."""
    if EXTENSION.runs_kernel(logits):
        return _UpsampleCrossEntropyKernels.apply(logits, labels, ignore_index, with_mean,
                                                  with_mean and _with_grad(logits, labels))
    loss, lse = upsample_cross_entropy_reference(logits, labels, ignore_index)
    if not with_mean:
        return loss, lse, loss.new_empty(0), loss.new_empty(0)
    return (loss, lse) + ce_mean_reference(loss, labels, ignore_index)


def upsample_cross_entropy(logits, labels, ignore_index, with_mean=True):
    """(loss, lse, mean, denominator): per pixel (see upsample_cross_entropy_reference), and
    the mean of loss over the pixels not ignored with max(their count, 1) (ce_mean_reference;
    on CUDA the forward kernel's blocks and one small kernel, in a fixed order, where torch's
    would take five kernels), or with with_mean=False (OHEM) two empty (0,) tensors, nothing
    computed. Differentiable in loss and mean; the kernels where EXTENSION.runs_kernel says
    so (their backward: upsample_cross_entropy_backward's kernel; where the mean needs a
    gradient and C <= 20, the forward with gradient: _UpsampleCrossEntropyKernels), else the
    reference."""
    check_inputs(logits, labels)
    return _upsample_cross_entropy(logits, labels, ignore_index, with_mean)


def upsample_cross_entropy_backward(grad_loss, logits, labels, lse, ignore_index):
    """The gradient of the logits (N, C, h, w), NCHW, for the per-pixel loss gradient: the
    backward kernel, or the reference."""
    check_inputs(logits, labels)
    grad_loss = grad_loss.to(lse.dtype)
    if EXTENSION.runs_kernel(logits):
        return _gather(grad_loss, logits, labels, lse, ignore_index)
    return upsample_cross_entropy_backward_reference(grad_loss, logits, labels, lse, ignore_index)


def _gather(grad_loss, logits, labels, lse, ignore_index):
    """The backward kernel's gradient of the logits, or the reference's where its tiles do not fit."""
    if _tiles_fit(logits, labels, forward=False):
        return torch.ops.bisenet_cuda.upsample_ce_backward(grad_loss, logits, labels, lse, ignore_index)
    return upsample_cross_entropy_backward_reference(grad_loss, logits, labels, lse, ignore_index)


class _OhemWeightsKernels(torch.autograd.Function):
    """ohem_weights_op's kernels; the value's gradient in loss is weights times the incoming
    one (the selection is a constant)."""

    @staticmethod
    def forward(ctx, loss, labels, ignore_index, threshold, min_kept, class_weights):
        weights, value, _ = torch.ops.bisenet_cuda.ohem_weights(loss, labels, ignore_index, threshold, min_kept,
                                                                class_weights)
        ctx.mark_non_differentiable(weights)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(weights)
        return weights, value

    @staticmethod
    def backward(ctx, grad_weights, grad_value):
        (weights,) = ctx.saved_tensors
        grad_loss = None if grad_value is None else weights * grad_value
        return grad_loss, None, None, None, None, None


def ohem_weights_op(loss, labels, ignore_index, threshold, min_kept, class_weights=None):
    """(weights, value): the weights of each pixel's loss in the OHEM loss (see the module
    docstring) and the OHEM loss, sum(weights * loss), 0-dim; loss (N, H, W) float32 or
    float64; class_weights (C,) in loss's dtype, or None. value is differentiable in loss
    (its gradient: weights times the incoming one; the selection is a constant), weights
    are not. On CUDA (EXTENSION.runs_kernel) a radix select of the k-th largest loss and the
    weights, counts kept on the device (csrc/ohem_ce.cu); else the sort-based reference."""
    if EXTENSION.runs_kernel(loss):
        return _OhemWeightsKernels.apply(loss, labels, ignore_index, threshold, min_kept, class_weights)
    weights = ohem_weights_reference(loss.detach(), labels, ignore_index, threshold, min_kept,
                                     None if class_weights is None else class_weights.detach())
    return weights, (loss * weights).sum()  # the selection a constant, as the kernels' backward


class _OhemCrossEntropyKernels(torch.autograd.Function):
    """The OHEM loss of a training step (no class weights, C <= FUSED_GRAD_MOST_CLASSES) on the
    kernels: the forward with gradient over the hard pixels (loss > threshold: hard_sum, the
    gradient of their summed losses), then the selection, whose third output hard_weight is
    each hard pixel's weight where it took the hard branch, else 0. The backward op then gives
    hard_sum times hard_weight times the incoming gradient where hard_weight is not 0 (its
    gather's blocks write that instead: one exp a class and pixel in the whole step), else the gather of
    weights times it (the top-k branch); the op multiplies by the incoming gradient itself
    (grad_scale), so the backward is that one op."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, threshold, min_kept):
        ops = torch.ops.bisenet_cuda
        loss, lse, _, _, hard_sum = ops.upsample_ce_forward_grad(logits, labels, ignore_index, 0, 0, threshold)
        weights, value, hard_weight = ops.ohem_weights(loss, labels, ignore_index, threshold, min_kept)
        ctx.save_for_backward(logits, labels, lse, weights, hard_sum, hard_weight)
        ctx.ignore_index = ignore_index
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value):
        logits, labels, lse, weights, hard_sum, hard_weight = ctx.saved_tensors
        grad = torch.ops.bisenet_cuda.upsample_ce_backward(weights, logits, labels, lse, ctx.ignore_index, 0, 0,
                                                           hard_sum, hard_weight, grad_value)
        return grad, None, None, None, None


def ohem_cross_entropy(logits, labels, thresh=0.7, min_kept=None, ignore_index=255, validate=True,
                       class_weights=None):
    """See the module docstring. validate=True raises a ValueError on a bad label (a host
    sync); validate=False trusts the labels (a bad one makes the loss NaN).

    CE (thresh=None) without class weights: the mean the loss op returns. OHEM: two custom
    ops, the per-pixel losses (never (N, C, H, W)) and the OHEM weights (the selection) with
    sum(weights * loss), whose backward hands the loss op weights times the incoming
    gradient; on the kernels, where the logits need a gradient, no class weights and C <= 20,
    one Function over the forward with the hard pixels' gradient and the selection
    (_OhemCrossEntropyKernels). A pixel's NaN
    loss (a bad label) makes the sum NaN whatever its weight. Where a rounding leaves a
    valid pixel's loss a hair below 0, the CUDA selection ranks it as 0."""
    check_inputs(logits, labels)
    check_selection(thresh, min_kept)
    check_class_weights(class_weights, logits.shape[1], validate)
    if validate:
        check_labels(labels, logits.shape[1], ignore_index)
    min_kept = -1 if min_kept is None else int(min_kept)
    if thresh is not None and class_weights is None and EXTENSION.runs_kernel(logits) \
            and _with_grad(logits, labels, gather=True):
        return _OhemCrossEntropyKernels.apply(logits, labels, ignore_index, -math.log(thresh), min_kept)
    with_mean = thresh is None and class_weights is None
    loss, _, mean, _ = _upsample_cross_entropy(logits, labels, ignore_index, with_mean)
    if with_mean:
        return mean
    if thresh is None:
        return mean_loss(loss, labels, ignore_index, class_weights)
    if class_weights is not None:
        class_weights = class_weights.to(loss)
    _, value = ohem_weights_op(loss, labels, ignore_index, -math.log(thresh), min_kept, class_weights)
    return value
