"""Cross-entropy / OHEM on low-resolution logits against full-resolution labels.

    ohem_cross_entropy(logits, labels, thresh=0.7, min_kept=None, ignore_index=255, validate=True)

logits (N, C, h, w) are bilinearly upsampled to the labels' (H, W) (align_corners=False, in
float32 from the upcast logits), then the per-pixel cross-entropy in float32, then
  thresh=None: the mean over non-ignored pixels (PaddleSeg's CE; 0 when all are ignored);
  else OHEM (CoinCheung/BiSeNet): k = min(min_kept, valid) (min_kept default valid // 16);
      the pixels whose loss exceeds -log(thresh) if at least k do, else the k largest; the
      mean of the kept (0 when none). Ties at the k-th largest value share the remaining
      weight equally, so the loss equals the top-k mean whatever the order of equal values.

Two implementations, neither with a host synchronisation (the selection is done with
tensors, not Python numbers); only `validate=True` syncs, to raise on a bad label:
  ohem_cross_entropy_reference: plain PyTorch (F.interpolate, F.cross_entropy, a sort for
      the k-th largest): the oracle.
  ohem_cross_entropy: the per-pixel loss is the custom op `bisenet::upsample_cross_entropy`
      (CUDA: csrc/ohem_ce.cu interpolates on the fly, never materialising (N, C, H, W), and
      its backward writes the low-res gradient directly, deterministically; CPU: plain
      PyTorch), and the k-th largest comes from a radix select (4 histogram passes of 8 bits,
      `bisenet_cuda::radix_histogram` on CUDA). With validate=False a label outside [0, C)
      that is not ignore_index makes the loss NaN instead of raising.
"""
import math

import torch
import torch.nn.functional as F

from .build import Extension

__all__ = ["ohem_cross_entropy", "ohem_cross_entropy_reference", "upsample_cross_entropy",
           "upsample_cross_entropy_backward", "check_labels", "EXTENSION"]

# csrc/ohem_ce.cpp (schema, checks, the CPU loops) and csrc/ohem_ce.cu (the CUDA kernels);
# its use_cuda_kernel says whether CUDA tensors get the kernels (kernels.select sets it)
EXTENSION = Extension("bisenet_loss", ["ohem_ce.cpp", "ohem_ce.cu"],
                      ["upsample_ce_forward", "upsample_ce_backward", "radix_histogram"])


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
    ranked = torch.where(valid, values, torch.full_like(values, -1.0)).sort(descending=True).values
    return ranked.index_select(0, (k - 1).clamp(min=0).view(1)).squeeze(0)


def ohem_weights(loss, valid, thresh, min_kept):
    """Per-pixel weights (flattened) whose weighted sum over their sum is the OHEM loss."""
    loss, valid = loss.flatten(), valid.flatten()
    num_valid = valid.sum()
    k = num_valid // 16 if min_kept is None else num_valid.clamp(max=min_kept)
    hard = valid & (loss > -math.log(thresh))
    kth = kth_largest_by_sort(loss, valid, k)
    greater, equal = valid & (loss > kth), valid & (loss == kth)
    share = (k - greater.sum()).to(loss.dtype) / equal.sum().clamp(min=1)
    top_k = greater.to(loss.dtype) + equal.to(loss.dtype) * share
    use_hard = (hard.sum() >= k) | (k == 0)
    return torch.where(use_hard, hard.to(loss.dtype), top_k)


def ohem_cross_entropy_reference(logits, labels, thresh=0.7, min_kept=None, ignore_index=255, validate=True):
    check_inputs(logits, labels)
    if validate:
        check_labels(labels, logits.shape[1], ignore_index)
    loss, valid = pixel_losses(logits, labels, ignore_index)
    if thresh is None:
        return loss.sum() / valid.sum().clamp(min=1)
    weights = ohem_weights(loss, valid, thresh, min_kept)
    return (loss.flatten() * weights).sum() / weights.sum().clamp(min=1e-12)


# ---------------------------------------------------------------------------------------
# Radix select of the k-th largest: 8 bits at a time from the top of the values' bit
# patterns (non-negative floats order like their bits read as integers; excluded entries
# are set to -1.0, a negative pattern, and never counted).

def radix_histogram_reference(bits, prefix, shift):
    """counts (256,) int64 of digit (bits >> shift) & 255 over the entries >= 0 whose bits
    above shift + 8 equal prefix's; bits int32 or int64, prefix a 0-dim int64 tensor."""
    wide = bits.long()
    include = wide >= 0
    if shift + 8 < bits.element_size() * 8:
        include &= (wide >> (shift + 8)) == (prefix >> (shift + 8))
    digit = torch.where(include, (wide >> shift) & 255, torch.full_like(wide, 256))
    counts = torch.zeros(257, dtype=torch.int64, device=bits.device)
    return counts.scatter_add_(0, digit, torch.ones_like(digit))[:256]


@torch.library.custom_op("bisenet::radix_histogram", mutates_args=())
def radix_histogram(bits: torch.Tensor, prefix: torch.Tensor, shift: int) -> torch.Tensor:
    """radix_histogram_reference's counts; the CUDA kernel for int32 bits on a GPU."""
    if bits.dtype == torch.int32 and EXTENSION.runs_kernel(bits):
        return torch.ops.bisenet_cuda.radix_histogram(bits, prefix, shift)
    return radix_histogram_reference(bits, prefix, shift)


@radix_histogram.register_fake
def _(bits, prefix, shift):
    return bits.new_empty(256, dtype=torch.int64)


def kth_largest_by_radix(values, valid, k):
    """kth_largest_by_sort's result without a sort: values float32 (4 passes) or float64
    (8). valid=None counts every entry (then all must be >= 0)."""
    int_dtype, width = (torch.int64, 64) if values.dtype == torch.float64 else (torch.int32, 32)
    if valid is not None:
        values = torch.where(valid, values, torch.full_like(values, -1.0))
    bits = values.view(int_dtype)
    prefix = torch.zeros((), dtype=torch.int64, device=values.device)
    remaining = k.clamp(min=1)  # the rank still to find inside the bins matching prefix
    for shift in range(width - 8, -1, -8):
        counts = radix_histogram(bits, prefix, shift)            # (256,)
        at_least = counts.flip(0).cumsum(0).flip(0)              # at_least[d]: entries with digit >= d
        digit = ((at_least >= remaining).sum() - 1).clamp(min=0)  # the largest d with at_least[d] >= remaining
        above = at_least.index_select(0, digit.view(1)) - counts.index_select(0, digit.view(1))
        remaining = remaining - above.squeeze(0)
        prefix = prefix | (digit << shift)
    return prefix.to(int_dtype).view(values.dtype)


# ---------------------------------------------------------------------------------------
# The fused path: the per-pixel loss as one custom op.

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


@torch.library.custom_op("bisenet::upsample_cross_entropy", mutates_args=())
def upsample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                           ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) per pixel; see upsample_cross_entropy_reference. lse is not differentiable."""
    check_inputs(logits, labels)
    if EXTENSION.runs_kernel(logits):
        loss, lse = torch.ops.bisenet_cuda.upsample_ce_forward(logits, labels, ignore_index)
        return loss, lse
    return upsample_cross_entropy_reference(logits, labels, ignore_index)


@upsample_cross_entropy.register_fake
def _(logits, labels, ignore_index):
    check_inputs(logits, labels)
    dtype = accumulate_dtype(logits)
    return labels.new_empty(labels.shape, dtype=dtype), labels.new_empty(labels.shape, dtype=dtype)


@torch.library.custom_op("bisenet::upsample_cross_entropy_backward", mutates_args=())
def upsample_cross_entropy_backward(grad_loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                                    lse: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The gradient of the logits (N, C, h, w), NCHW, for the per-pixel loss gradient."""
    check_inputs(logits, labels)
    grad_loss = grad_loss.to(lse.dtype)
    if EXTENSION.runs_kernel(logits):
        return torch.ops.bisenet_cuda.upsample_ce_backward(grad_loss, logits, labels, lse, ignore_index)
    return upsample_cross_entropy_backward_reference(grad_loss, logits, labels, lse, ignore_index)


@upsample_cross_entropy_backward.register_fake
def _(grad_loss, logits, labels, lse, ignore_index):
    check_inputs(logits, labels)
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, labels, output[1])
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_loss, grad_lse):
    logits, labels, lse = ctx.saved_tensors
    return upsample_cross_entropy_backward(grad_loss, logits, labels, lse, ctx.ignore_index), None, None


upsample_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def ohem_cross_entropy(logits, labels, thresh=0.7, min_kept=None, ignore_index=255, validate=True):
    """See the module docstring. validate=True raises a ValueError on a bad label (a host
    sync); validate=False trusts the labels (a bad one makes the loss NaN).

    The same selection as ohem_weights, written to keep little at full resolution: the
    ignored pixels' losses are 0 (so the k-th largest of all pixels is the k-th largest of
    the valid ones, for k <= valid), and autograd keeps two boolean masks, not weights."""
    check_inputs(logits, labels)
    if validate:
        check_labels(labels, logits.shape[1], ignore_index)
    loss, _ = upsample_cross_entropy(logits, labels, ignore_index)
    valid = labels != ignore_index
    if thresh is None:
        return loss.sum() / valid.sum().clamp(min=1)
    flat, valid = loss.detach().flatten(), valid.flatten()
    num_valid = valid.sum()
    k = num_valid // 16 if min_kept is None else num_valid.clamp(max=min_kept)
    hard = valid & (flat > -math.log(thresh))
    num_hard = hard.sum()
    kth = kth_largest_by_radix(flat, None, k)
    greater = flat > kth                      # kth >= 0 = an ignored pixel's loss
    tied = valid & (flat == kth)
    use_hard = (num_hard >= k) | (k == 0)
    kept = torch.where(use_hard, hard, greater)
    tied = tied & ~use_hard
    share = (k - greater.sum()).to(flat.dtype) / tied.sum().clamp(min=1)  # the weight of a tied pixel
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    flat_loss = loss.flatten()
    total = torch.where(kept, flat_loss, zero).sum() + share * torch.where(tied, flat_loss, zero).sum()
    value = total / torch.where(use_hard, num_hard, k).clamp(min=1)
    # a NaN pixel (bad label) need not be kept: the loss still says so
    return torch.where(torch.isnan(flat).any(), torch.full_like(value, math.nan), value)
