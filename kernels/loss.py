"""Cross-entropy / OHEM on low-resolution logits against full-resolution labels.

    ohem_cross_entropy(logits, labels, thresh=0.7, min_kept=None, ignore_index=255)

logits (N, C, h, w) are bilinearly upsampled to the labels' (H, W) (align_corners=False, in
float32 from the upcast logits), then the per-pixel cross-entropy in float32, then
  thresh=None: the mean over non-ignored pixels (PaddleSeg's CE; 0 when all are ignored);
  else OHEM (CoinCheung/BiSeNet): k = min(min_kept, valid) (min_kept default valid // 16);
      the pixels whose loss exceeds -log(thresh) if at least k do, else the k largest; the
      mean of the kept (0 when none). Ties at the k-th largest value share the remaining
      weight equally, so the loss equals the top-k mean whatever the order of equal values.
This is the plain-PyTorch reference: the CPU path and the oracle of the fused kernel. It
has no host synchronisation (the selection is done with tensors, not Python numbers).
"""
import math

import torch
import torch.nn.functional as F


def check_labels(labels, num_classes, ignore_index):
    """ValueError naming a label outside [0, C) that is not ignore_index (syncs on CUDA)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(f"labels: value {int(labels[bad][0])} is outside [0, {num_classes}) "
                         f"and not ignore_index {ignore_index}")


def pixel_losses(logits, labels, ignore_index=255):
    """-> per-pixel cross-entropy (N, H, W) float32 (0 where ignored) and the valid mask."""
    if logits.dim() != 4 or labels.dim() != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"ohem_cross_entropy: logits {tuple(logits.shape)} must be (N, C, h, w) and labels "
                         f"{tuple(labels.shape)} (N, H, W)")
    if labels.dtype not in (torch.int64, torch.uint8):
        raise ValueError(f"ohem_cross_entropy: labels must be int64 or uint8, got {labels.dtype}")
    labels = labels.long()
    upsampled = F.interpolate(logits.float() if logits.dtype != torch.float64 else logits,
                              size=labels.shape[-2:], mode="bilinear", align_corners=False)
    valid = labels != ignore_index
    loss = F.cross_entropy(upsampled, torch.where(valid, labels, 0), reduction="none")
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


def ohem_weights(loss, valid, thresh, min_kept):
    """Per-pixel weights (flattened) whose weighted sum over their sum is the OHEM loss."""
    loss, valid = loss.flatten(), valid.flatten()
    num_valid = valid.sum()
    k = num_valid // 16 if min_kept is None else num_valid.clamp(max=min_kept)
    hard = valid & (loss > -math.log(thresh))
    ranked = torch.where(valid, loss, torch.full_like(loss, -1.0)).sort(descending=True).values
    kth = ranked[(k - 1).clamp(min=0)]
    greater, equal = valid & (loss > kth), valid & (loss == kth)
    share = (k - greater.sum()).to(loss.dtype) / equal.sum().clamp(min=1)
    top_k = greater.to(loss.dtype) + equal.to(loss.dtype) * share
    use_hard = (hard.sum() >= k) | (k == 0)
    return torch.where(use_hard, hard.to(loss.dtype), top_k)


def ohem_cross_entropy_reference(logits, labels, thresh=0.7, min_kept=None, ignore_index=255, validate=True):
    if validate:
        check_labels(labels, logits.shape[1], ignore_index)
    loss, valid = pixel_losses(logits, labels, ignore_index)
    if thresh is None:
        return loss.sum() / valid.sum().clamp(min=1)
    weights = ohem_weights(loss, valid, thresh, min_kept)
    return (loss.flatten() * weights).sum() / weights.sum().clamp(min=1e-12)


ohem_cross_entropy = ohem_cross_entropy_reference
