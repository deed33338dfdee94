"""Train and evaluate BiSeNetV2 on Cityscapes: PaddleSeg's bisenet_cityscapes_1024x1024_160k.

    python train_ddp.py --demo                                    # synthetic data, CPU, minutes
    python train_ddp.py --data-dir /data/cityscapes --do-eval     # one process
    torchrun --nproc_per_node=8 train_ddp.py --data-dir /data/cityscapes --do-eval
    python train_ddp.py --data-dir /data/cityscapes --eval-only --weights model.pdparams --flip

The defaults are the seed's recipe: 160k iterations of 4 crops of 1024x1024 per process, SGD
(momentum 0.9, weight decay 5e-4), lr 0.05 with poly(0.9) decay to 0 and no warmup, plain
cross-entropy on the main and the 4 auxiliary heads (weight 1 each); augmentation
ResizeStepScaling(0.5, 2.0, 0.25), RandomPaddingCrop (image padded 127.5, label 255),
horizontal flip, RandomDistort (brightness, contrast, saturation 0.4, hue 18, each p 0.5, in
random order), normalize mean 0.5 std 0.5. The data dir holds train.txt / val.txt as written
by prepare_data.py.

Speed (see BENCHMARKS.md): with `prepare_data.py --pack` the train split is read from
memory-mapped uint8 arrays instead of decoding PNGs ("data: packed ..." in the log; a pack
whose list or files changed since is an error), and on CUDA the workers then only gather raw
frames while the main process augments the whole batch on the GPU (--aug-device) with the
same seeded draws. On CUDA the step runs in bf16 autocast, channels_last, with fused SGD and
cudnn.benchmark (--no-channels-last, --amp none, ... turn them off); --compile adds
torch.compile. `python train_ddp.py --benchmark` measures these variants against an eager
baseline and prints one markdown table.

Determinism: which samples a step sees and every augmentation draw are functions of
(--seed, iteration), and the torch RNG (dropout) is reseeded from (--seed, iteration, rank)
each step, so `--resume` continues exactly where a run stopped: on the CPU a resumed run ends
bitwise equal to an uninterrupted one.
"""
import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from bisenetv2 import BiSeNetV2, load_weights

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "train", "motorcycle", "bicycle")


class UserError(Exception):
    """Bad input or a stopped run: reported as one line, exit code 2."""


# ---------------------------------------------------------------------------------------
# Configuration

DEMO_DEFAULTS = dict(iters=300, batch_size=8, crop_size=[128, 256], lr=0.05, log_iters=20,
                     save_interval=150, do_eval=True, num_workers=2, save_dir="output/demo")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data-dir", help="Cityscapes root with train.txt / val.txt (see prepare_data.py)")
    add("--demo", action="store_true",
        help="make a synthetic Cityscapes-layout dataset in the cache and train on it briefly: "
             + ", ".join(f"{k}={v}" for k, v in DEMO_DEFAULTS.items()))
    # schedule and optimiser
    add("--iters", type=int, default=160000)
    add("--batch-size", type=int, default=4, help="images per process")
    add("--crop-size", type=int, nargs=2, default=[1024, 1024], metavar=("H", "W"))
    add("--lr", type=float, default=0.05)
    add("--momentum", type=float, default=0.9)
    add("--weight-decay", type=float, default=5e-4)
    add("--power", type=float, default=0.9, help="poly decay exponent")
    add("--warmup-iters", type=int, default=0, help="linear warmup from 0")
    # loss
    add("--loss", choices=("ce", "ohem"), default="ce")
    add("--ohem-thresh", type=float, default=0.7, help="ohem: keep pixels with p(label) < this")
    add("--ohem-min-kept", type=int, default=None, help="ohem: at least this many (default valid // 16)")
    add("--aux-weight", type=float, default=1.0, help="weight of each of the 4 auxiliary losses")
    add("--num-classes", type=int, default=19)
    add("--ignore-index", type=int, default=255)
    # augmentation
    add("--min-scale", type=float, default=0.5)
    add("--max-scale", type=float, default=2.0)
    add("--scale-step", type=float, default=0.25)
    # system
    add("--amp", choices=("bf16", "fp16", "none"), default=None, help="default: bf16 on CUDA, none on CPU")
    add("--no-sync-bn", action="store_true", help="plain BN per process under DDP")
    add("--kernels", choices=("auto", "cuda", "torch"), default="auto",
        help="fused CUDA loss and BGA kernels (auto: when they build on a GPU machine)")
    add("--num-workers", type=int, default=4, help="DataLoader workers per process")
    # input pipeline and step speed (None: resolved at start, printed in the config line)
    add("--no-pack", action="store_true", help="read the PNGs even when DATA_DIR/packed/ holds a fresh "
        "pack (prepare_data.py --pack)")
    add("--aug-device", choices=("auto", "cpu", "cuda"), default="auto",
        help="cpu: decode/read and augment each sample in the DataLoader workers; cuda: the workers only "
             "read uint8 frames, the main process augments the whole batch on the GPU (same draws); "
             "auto: cuda when training on CUDA from a packed split")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="model and input in channels_last memory format (default: on with CUDA)")
    add("--compile", action="store_true", help="torch.compile the model and the loss")
    add("--fused-sgd", action=argparse.BooleanOptionalAction, default=None,
        help="SGD's fused CUDA implementation (default: on with CUDA when available)")
    add("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=None,
        help="cudnn.benchmark autotuning (default: on with CUDA)")
    # throughput benchmark
    add("--benchmark", action="store_true",
        help="measure training throughput of the step's variants and inference FPS; print one table")
    add("--benchmark-iters", type=int, default=200, help="measured iterations per configuration")
    add("--benchmark-warmup", type=int, default=20, help="iterations before measuring")
    add("--benchmark-configs", nargs="+", default=None, metavar="NAME",
        help="only these rows (default: all; see BENCHMARKS.md)")
    add("--benchmark-infer-size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    add("--benchmark-infer-iters", type=int, default=50)
    add("--benchmark-image-size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"),
        help="frame size of the synthetic dataset the benchmark makes when no --data-dir is given")
    add("--benchmark-out", help="also write the table to this file")
    add("--seed", type=int, default=0)
    # bookkeeping
    add("--save-dir", "--save_dir", default="output")
    add("--save-interval", "--save_interval", type=int, default=500)
    add("--keep-checkpoints", type=int, default=5)
    add("--log-iters", type=int, default=10)
    add("--resume", action="store_true", help="continue from the newest complete checkpoint in --save-dir")
    add("--tensorboard", "--use_vdl", action="store_true", help="TensorBoard scalars in --save-dir")
    # evaluation
    add("--do-eval", "--do_eval", action="store_true", help="evaluate on val at every --eval-interval")
    add("--eval-interval", type=int, default=None, help="default: --save-interval")
    add("--eval-only", action="store_true", help="evaluate --weights on val and exit")
    add("--weights", help="initial weights: a checkpoint of this project or a PaddleSeg .pdparams")
    add("--pred-dir", help="evaluation writes each prediction here as a Cityscapes labelIds PNG")
    add("--flip", action="store_true", help="evaluation: add horizontally flipped inference")
    add("--scales", type=float, nargs="+", default=[1.0], help="evaluation: inference scales")
    if argv is None:
        argv = sys.argv[1:]
    if "--demo" in argv:
        parser.set_defaults(**DEMO_DEFAULTS)
    args = parser.parse_args(argv)
    if args.eval_interval is None:
        args.eval_interval = args.save_interval
    for name in ("iters", "batch_size", "save_interval", "eval_interval", "log_iters", "keep_checkpoints",
                 "benchmark_iters", "benchmark_infer_iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.benchmark_warmup < 0:
        parser.error("--benchmark-warmup must be at least 0")
    if args.eval_only and not args.weights:
        parser.error("--eval-only needs --weights")
    if not args.demo and not args.data_dir and not args.benchmark:
        parser.error("--data-dir is required (or --demo)")
    return args


# ---------------------------------------------------------------------------------------
# Data: list files, decoding, augmentation


def read_list(data_dir, split):
    """-> [(image path, label path)] from DATA_DIR/SPLIT.txt (`<image> <label>` relative to
    the root; separated by spaces or a comma). Every file must exist."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"--data-dir {root}: no such directory")
    list_file = root / f"{split}.txt"
    if not list_file.is_file():
        raise UserError(f"{list_file}: no such list file (run prepare_data.py --cityscapes_path {root})")
    import prepare_data
    try:
        entries = prepare_data.parse_list(list_file, list_file.read_text())
    except prepare_data.PrepareError as e:
        raise UserError(str(e)) from None
    pairs = []
    for line_no, image, label in entries:
        image, label = root / image, root / label
        for path in (image, label):
            if not path.is_file():
                raise UserError(f"{list_file}:{line_no}: {path} does not exist")
        pairs.append((image, label))
    return pairs


class DataError(Exception):
    """A corrupt or inconsistent sample; raised in DataLoader workers."""


def load_frame(image_path, label_path, num_classes, ignore_index):
    """-> image (H, W, 3) uint8 RGB, label (H, W) uint8 train ids (or ignore), as numpy;
    DataError naming the file (prepare_data.decode_frame's checks)."""
    import prepare_data
    try:
        return prepare_data.decode_frame(image_path, label_path, num_classes, ignore_index)
    except prepare_data.PrepareError as e:
        raise DataError(str(e)) from None


def image_tensor(image):
    """(H, W, 3) uint8 numpy -> (3, H, W) float32 tensor in [0, 255]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()


def load_pair(image_path, label_path, num_classes, ignore_index):
    """-> image (3, H, W) float32 RGB in [0, 255], label (H, W) uint8 train ids (or ignore)."""
    image, label = load_frame(image_path, label_path, num_classes, ignore_index)
    return image_tensor(image), torch.from_numpy(label)


def draw_augmentation(rng, height, width, args):
    """Draws every random choice of one sample's augmentation, in PaddleSeg's order.
    The parameters are plain numbers, so the same draws can be applied anywhere."""
    num_scales = int(round((args.max_scale - args.min_scale) / args.scale_step)) + 1
    scale = float(rng.choice(np.linspace(args.min_scale, args.max_scale, num_scales)))
    scaled_h, scaled_w = int(round(scale * height)), int(round(scale * width))
    crop_h, crop_w = args.crop_size
    padded_h, padded_w = max(scaled_h, crop_h), max(scaled_w, crop_w)
    return dict(
        scaled_size=(scaled_h, scaled_w),
        crop_offset=(int(rng.integers(padded_h - crop_h + 1)), int(rng.integers(padded_w - crop_w + 1))),
        flip=bool(rng.uniform() < 0.5),
        # RandomDistort: four ops in random order, each applied with probability 0.5
        distort_order=[int(i) for i in rng.permutation(4)],
        distort_apply=[bool(rng.uniform() < 0.5) for _ in range(4)],
        brightness=float(rng.uniform(0.6, 1.4)),
        contrast=float(rng.uniform(0.6, 1.4)),
        saturation=float(rng.uniform(0.6, 1.4)),
        hue=float(rng.uniform(-18, 18)),
    )


def to_device(tensor, device):
    """A small host tensor on `device` without a host synchronisation: through pinned
    memory and an asynchronous copy on CUDA (a plain copy from pageable memory waits for
    the stream, i.e. for the previous step)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def luminance(image):
    """ITU-R 601-2 luma, as PIL's convert('L'): (..., 3, H, W) -> (..., 1, H, W)."""
    weights = to_device(torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype), image.device).view(3, 1, 1)
    return (image * weights).sum(-3, keepdim=True)


def shift_hue(image, delta):
    """Rotates the hue of RGB images (..., 3, H, W) in [0, 255] by delta/256 of a turn
    (delta a number or a tensor broadcasting against (..., H, W)); PIL's HSV hue is a
    uint8, so PaddleSeg's hue delta of up to 18 is about 25 degrees."""
    rgb = image / 255.0
    maxc, _ = rgb.max(-3)
    minc, _ = rgb.min(-3)
    span = maxc - minc
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    r, g, b = rgb.unbind(-3)
    hue = torch.where(maxc == r, (g - b) / safe_span,
                      torch.where(maxc == g, 2.0 + (b - r) / safe_span, 4.0 + (r - g) / safe_span))
    hue = torch.where(span > 0, hue / 6.0, torch.zeros_like(hue))
    hue = torch.remainder(hue + delta / 256.0, 1.0)
    saturation = torch.where(maxc > 0, span / torch.where(maxc > 0, maxc, torch.ones_like(maxc)),
                             torch.zeros_like(maxc))
    # HSV -> RGB: channel n gets v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    k = torch.remainder(torch.stack([5.0 + hue * 6, 3.0 + hue * 6, 1.0 + hue * 6], -3), 6.0)
    ramp = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return (maxc.unsqueeze(-3) * (1 - saturation.unsqueeze(-3) * ramp)) * 255.0


DISTORT_FACTORS = ("brightness", "contrast", "saturation", "hue")


def distort_op(op, images, factor):
    """RandomDistort's op `op` on images (n, 3, H, W); factor (n, 1, 1, 1) float32."""
    if op == 0:    # brightness: blend with black
        return images * factor
    if op == 1:    # contrast: blend with each image's mean grey level
        mean = luminance(images).mean((-3, -2, -1), keepdim=True)
        return mean + factor * (images - mean)
    if op == 2:    # saturation: blend with the grey image
        grey = luminance(images)
        return grey + factor * (images - grey)
    return shift_hue(images, factor[:, 0])


def distort_batch(images, params_list):
    """PaddleSeg's RandomDistort on float RGB images (B, 3, H, W) in [0, 255], one params
    dict per image, with PIL ImageEnhance's formulas (in float: no uint8 rounding between
    the ops). Batched: at each of the 4 places of the random order, each op runs once on
    the images that have it there and applied; the choice is made on the host from the
    params, so there is no host synchronisation."""
    batch = images.shape[0]
    factors = to_device(torch.tensor([[p.get(name, 0.0) for name in DISTORT_FACTORS] for p in params_list],
                                     dtype=torch.float32), images.device)            # (B, 4)
    copied = False
    for place in range(max(len(p["distort_order"]) for p in params_list)):
        for op in range(4):
            chosen = [b for b, p in enumerate(params_list) if place < len(p["distort_order"])
                      and p["distort_order"][place] == op and p["distort_apply"][op]]
            if not chosen:
                continue
            if len(chosen) == batch:
                factor = factors[:, op].view(batch, 1, 1, 1)
                images = distort_op(op, images, factor).clamp(0, 255)
                continue
            if not copied:  # the caller's tensor stays untouched; then updated in place
                images, copied = images.clone(), True
            index = to_device(torch.tensor(chosen), images.device)
            factor = factors[index, op].view(len(chosen), 1, 1, 1)
            images.index_copy_(0, index, distort_op(op, images[index], factor).clamp(0, 255))
    return images


def distort(image, params):
    """One image (3, H, W): distort_batch's result for it."""
    return distort_batch(image[None], [params])[0]


def crop_taps(offsets, scaled_sizes, in_size, crop, flips, device):
    """Source taps of the resize -> pad -> crop -> flip chain along one axis, for a batch.

    offsets, scaled_sizes: per sample; flips: per sample or None. -> bilinear taps i0, i1
    (B, crop) int64 and weights w0, w1 (B, crop) float32 (PyTorch's/cv2's align_corners=False
    formula, clamped at 0), the nearest tap (B, crop) (PyTorch's 'nearest', i.e. cv2's
    INTER_NEAREST: floor(dst * in / out) in float32) and `inside` (B, crop): False in the
    bottom/right padding. Computed on the host in float32 (the same IEEE operations as on
    a GPU, one op at a time) and moved to `device` without a host synchronisation."""
    dst = torch.arange(crop)
    rows = []
    for b, (offset, scaled) in enumerate(zip(offsets, scaled_sizes)):
        pos = offset + (crop - 1 - dst if flips is not None and flips[b] else dst)  # in the scaled image
        scale = torch.tensor(float(in_size), dtype=torch.float32) / scaled   # float32, as ATen
        src = ((pos.float() + 0.5) * scale - 0.5).clamp(min=0)
        i0 = src.long().clamp(max=in_size - 1)
        i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
        w1 = src - i0.float()
        nearest = (pos.float() * scale).floor().long().clamp(max=in_size - 1)
        inside = pos < scaled
        rows.append((i0, i1, 1 - w1, w1, nearest.where(inside, 0), inside))
    return [to_device(torch.stack(column), device) for column in zip(*rows)]


def augment_batch(images, labels, params_list, crop_size, ignore_index=255):
    """images (B, 3, H, W) in [0, 255] (uint8 or float), labels (B, H, W) uint8, on any
    device; one params dict per sample (draw_augmentation) -> normalised float32 images
    (B, 3, h, w) and uint8 labels (B, h, w), (h, w) = crop_size.

    ResizeStepScaling, RandomPaddingCrop, RandomHorizontalFlip, RandomDistort, Normalize(0.5,
    0.5). The resize is computed for the crop window only: gathers along rows, then columns,
    with the taps of `F.interpolate(bilinear / nearest, align_corners=False)` (cv2's
    INTER_LINEAR / INTER_NEAREST, as PaddleSeg resizes: no antialiasing)."""
    batch, _, height, width = images.shape
    crop_h, crop_w = crop_size
    device = images.device
    tops, lefts = zip(*(p["crop_offset"] for p in params_list))
    scaled_hs, scaled_ws = zip(*(p["scaled_size"] for p in params_list))
    y0, y1, wy0, wy1, y_near, y_in = crop_taps(tops, scaled_hs, height, crop_h, None, device)
    x0, x1, wx0, wx1, x_near, x_in = crop_taps(lefts, scaled_ws, width, crop_w,
                                               [p["flip"] for p in params_list], device)
    # (uint8 rows are gathered first, then converted: the same numbers as converting first)
    rows = lambda idx: images.gather(2, idx[:, None, :, None].expand(batch, 3, crop_h, width)).float()
    blended_rows = wy0[:, None, :, None] * rows(y0) + wy1[:, None, :, None] * rows(y1)  # (B, 3, h, W)
    cols = lambda idx: blended_rows.gather(3, idx[:, None, None, :].expand(batch, 3, crop_h, crop_w))
    out = wx0[:, None, None, :] * cols(x0) + wx1[:, None, None, :] * cols(x1)           # (B, 3, h, w)
    inside = y_in[:, :, None] & x_in[:, None, :]                                       # (B, h, w)
    out = torch.where(inside[:, None], out, torch.full_like(out, 127.5))  # image padding 127.5
    label_rows = labels.gather(1, y_near[:, :, None].expand(batch, crop_h, width))
    out_labels = label_rows.gather(2, x_near[:, None, :].expand(batch, crop_h, crop_w))
    out_labels = torch.where(inside, out_labels, torch.full_like(out_labels, ignore_index))
    out = distort_batch(out, params_list)
    return (out / 255.0 - 0.5) / 0.5, out_labels


def augment(image, label, params, crop_size, ignore_index=255):
    """One sample: image (3, H, W), label (H, W) -> augment_batch's result for it."""
    images, labels = augment_batch(image[None], label[None], [params], crop_size, ignore_index)
    return images[0], labels[0]


def sample_params(position, height, width, args):
    """The augmentation draws of the sample at stream `position`: a function of (--seed,
    position) only, whichever process, worker or device makes the batch."""
    return draw_augmentation(np.random.default_rng([args.seed, position]), height, width, args)


class TrainSet(torch.utils.data.Dataset):
    """Items are addressed by (index, stream position); the position seeds the sample's
    augmentation, so a step's batch is the same whichever worker or run makes it.

    Frames come from the PNGs of `pairs` or, given `pack` (prepare_data.read_pack's index),
    from its memory-mapped arrays (opened lazily in each worker). raw=False: the item is
    the augmented sample (image (3, h, w) float32, label (h, w) uint8). raw=True: the
    decoded frame, image (H, W, 3) uint8, label (H, W) uint8, and the position, for
    augment_on_device to augment the whole batch on the training device."""

    def __init__(self, pairs, args, pack=None, raw=False):
        self.pairs, self.args, self.raw = pairs, args, raw
        self.pack_files = None if pack is None else (pack["images_path"], pack["labels_path"])
        self.length = len(pairs) if pack is None else pack["count"]
        self._arrays = None

    def __len__(self):
        return self.length

    def frame(self, index):
        """-> image (H, W, 3) uint8, label (H, W) uint8 numpy arrays of frame `index`."""
        if self.pack_files is None:
            return load_frame(*self.pairs[index], self.args.num_classes, self.args.ignore_index)
        if self._arrays is None:
            self._arrays = [np.load(path, mmap_mode="r") for path in self.pack_files]
        images, labels = self._arrays
        return np.array(images[index]), np.array(labels[index])  # copies out of the page cache

    def __getitem__(self, item):
        index, position = item
        image, label = self.frame(index)
        if self.raw:
            return torch.from_numpy(image), torch.from_numpy(label), position
        params = sample_params(position, image.shape[0], image.shape[1], self.args)
        return augment(image_tensor(image), torch.from_numpy(label), params, self.args.crop_size,
                       self.args.ignore_index)


def collate_raw(items):
    """TrainSet(raw=True) items -> images (B, H, W, 3) uint8, labels (B, H, W) uint8,
    positions (B,) int64. The frames of a batch must have one size."""
    sizes = {tuple(image.shape) for image, _, _ in items}
    if len(sizes) > 1:
        raise DataError(f"--aug-device cuda needs frames of one size, a batch has {sorted(sizes)}")
    # default_collate stacks straight into shared memory in a worker process
    images, labels, positions = torch.utils.data.default_collate(items)
    return images, labels, positions


def augment_on_device(images, labels, positions, args):
    """A raw batch already on the training device (collate_raw's images and labels;
    positions as a host tensor) -> augment_batch's normalised images (B, 3, h, w) and
    labels (B, h, w), with the same draws as TrainSet's per-sample path. No host sync:
    the parameters are drawn on the host from the positions."""
    height, width = images.shape[1:3]
    params = [sample_params(p, height, width, args) for p in positions.tolist()]
    images = images.permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W): coalesced row gathers
    return augment_batch(images, labels, params, args.crop_size, args.ignore_index)


class StepSampler(torch.utils.data.Sampler):
    """Yields this rank's batches for iterations start_iter .. iters - 1.

    The training stream is the concatenation of per-epoch permutations (seeded by seed and
    epoch); iteration i consumes positions [i * G, (i + 1) * G), G = batch * world size, and
    rank r takes the r-th slice of batch size. Each item is (dataset index, position)."""

    def __init__(self, num_samples, batch_size, rank, world_size, seed, start_iter, iters):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_iter, self.iters = start_iter, iters
        self._epoch, self._order = None, None

    def index_at(self, position):
        epoch = position // self.num_samples
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_samples, generator=generator)
        return int(self._order[position % self.num_samples])

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        for it in range(self.start_iter, self.iters):
            first = it * global_batch + self.rank * self.batch_size
            yield [(self.index_at(p), p) for p in range(first, first + self.batch_size)]

    def __len__(self):
        return self.iters - self.start_iter


def load_eval_sample(pair, args):
    image, label = load_pair(*pair, args.num_classes, args.ignore_index)
    return (image / 255.0 - 0.5) / 0.5, label


# ---------------------------------------------------------------------------------------
# Loss


def segmentation_losses(outputs, labels, loss_fn, args):
    """-> (N_heads,) float32 losses of the main head and the auxiliary heads, each computed
    on the head's logits bilinearly upsampled to the labels' size."""
    thresh = args.ohem_thresh if args.loss == "ohem" else None
    # validate=False: the loader has checked the labels, and the step stays free of host syncs
    return torch.stack([loss_fn(out, labels, thresh=thresh, min_kept=args.ohem_min_kept,
                                ignore_index=args.ignore_index, validate=False) for out in outputs])


# ---------------------------------------------------------------------------------------
# Evaluation


def confusion_matrix(pred, label, num_classes, ignore_index):
    """(num_classes, num_classes) int64: rows ground truth, columns prediction."""
    valid = label != ignore_index
    index = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def metrics_from_confusion(confusion):
    """mIoU over the classes that occur in the ground truth or the predictions (as the
    official Cityscapes evaluator averages), pixel accuracy, per-class IoU (None: absent)."""
    confusion = confusion.double()
    true_pos = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_pos
    present = union > 0
    iou = true_pos / union.clamp(min=1)
    class_iou = [float(v) if p else None for v, p in zip(iou.tolist(), present.tolist())]
    return dict(mIoU=float(iou[present].mean()) if present.any() else 0.0,
                pixel_acc=float(true_pos.sum() / confusion.sum().clamp(min=1)),
                class_IoU=class_iou)


@torch.no_grad()
def predict_logits_sum(model, image, scales, flip):
    """PaddleSeg's aug_inference: softmax summed over scales (and flips) at the input size;
    plain logits when there is a single scale 1.0 and no flip."""
    height, width = image.shape[-2:]
    if list(scales) == [1.0] and not flip:
        return model(image)
    total = 0
    for scale in scales:
        size = (int(height * scale + 0.5), int(width * scale + 0.5))
        scaled = image if size == (height, width) else F.interpolate(image, size=size, mode="bilinear",
                                                                      align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            logits = model(scaled.flip(-1) if flipped else scaled)
            logits = logits.flip(-1) if flipped else logits
            logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
            total = total + logits.softmax(1)
    return total


def train_id_to_label_id(num_classes):
    from cityscapesscripts.helpers.labels import trainId2label
    table = np.zeros(256, np.uint8)
    for train_id in range(num_classes):
        table[train_id] = trainId2label[train_id].id
    return table


@torch.no_grad()
def evaluate(model, pairs, args, env):
    """Full-resolution evaluation, batch 1, sharded over the processes; the confusion
    matrix is summed across them. -> metrics dict (identical on every rank)."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(args.num_classes, args.num_classes, dtype=torch.int64, device=env.device)
    to_label_ids = train_id_to_label_id(args.num_classes) if args.pred_dir else None
    shard = pairs[env.rank::env.world_size]
    start = time.perf_counter()
    for count, pair in enumerate(shard, 1):
        try:
            image, label = load_eval_sample(pair, args)
        except DataError as e:
            raise UserError(str(e)) from None
        image = image[None].to(env.device, non_blocking=True)
        if args.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.autocast(env.device.type, dtype=env.amp_dtype, enabled=env.amp_dtype is not None):
            scores = predict_logits_sum(model, image, args.scales, args.flip)
        pred = scores.argmax(1)[0]
        confusion += confusion_matrix(pred, label.to(env.device), args.num_classes, args.ignore_index)
        if args.pred_dir:
            image_path = pair[0]
            out = Path(args.pred_dir) / image_path.parent.name / image_path.name
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_label_ids[pred.cpu().numpy()]).save(out)
        if env.rank == 0 and (count % 100 == 0 or count == len(shard)):
            print(f"eval [{count}/{len(shard)}] {(time.perf_counter() - start) / count:.3f} s/image", flush=True)
    if env.world_size > 1:
        dist.all_reduce(confusion)
    model.train(was_training)
    return metrics_from_confusion(confusion.cpu())


def format_metrics(metrics, num_classes):
    names = CITYSCAPES_CLASSES if num_classes == len(CITYSCAPES_CLASSES) else [str(i) for i in range(num_classes)]
    lines = [f"{'class':>14}  IoU"]
    for name, iou in zip(names, metrics["class_IoU"]):
        lines.append(f"{name:>14}  {'  -' if iou is None else f'{100 * iou:5.2f}'}")
    lines.append(f"{'mIoU':>14}  {100 * metrics['mIoU']:5.2f}   pixel acc {100 * metrics['pixel_acc']:.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Checkpoints


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`:
    a reader (or a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_iter(path):
    try:
        return int(path.stem.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def list_checkpoints(save_dir):
    """iter_N.pt in save_dir, newest first."""
    return sorted((p for p in Path(save_dir).glob("iter_*.pt") if checkpoint_iter(p) >= 0),
                  key=checkpoint_iter, reverse=True)


def read_checkpoint(path):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not {"model", "optimizer", "iter", "args"} <= checkpoint.keys():
        raise ValueError("not a training checkpoint of this project")
    return checkpoint


def newest_checkpoint(save_dir):
    """The newest checkpoint that loads; unreadable ones are reported and passed over."""
    for path in list_checkpoints(save_dir):
        try:
            return path, read_checkpoint(path)
        except Exception as e:
            print(f"warning: skipping unreadable checkpoint {path} ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr)
    return None, None


# ---------------------------------------------------------------------------------------
# Processes, devices, kernels


class Env:
    """Where this process runs: rank, world size, device, autocast dtype."""

    def __init__(self, args):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    device_id=self.device if self.device.type == "cuda" else None)
        amp = args.amp or ("bf16" if self.device.type == "cuda" else "none")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
        args.amp = amp

    @property
    def main(self):
        return self.rank == 0

    def log(self, *parts):
        if self.main:
            print(*parts, flush=True)

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()


def select_ops(mode, env):
    """-> (loss function, BGA function), the fused CUDA kernels or the PyTorch reference."""
    import kernels
    try:
        return kernels.select(mode, device=env.device, log=env.log)
    except RuntimeError as e:  # --kernels cuda and no build: loud, one line
        raise UserError(f"--kernels {mode}: {' '.join(str(e).split())}") from None


def load_weights_or_fail(model, path):
    try:
        load_weights(model, path)
    except (OSError, ValueError) as e:
        raise UserError(f"--weights: {e}") from None


# ---------------------------------------------------------------------------------------
# Training


def lr_at(it, args):
    """Poly decay to 0 over --iters (PaddleSeg's PolynomialDecay, end_lr 0), after an
    optional linear warmup from 0."""
    if it < args.warmup_iters:
        return args.lr * it / args.warmup_iters
    return args.lr * (1 - it / args.iters) ** args.power


def step_seed(*keys):
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


class MetricsLog:
    """metrics.jsonl (and TensorBoard when asked) in the save dir, rank 0 only."""

    def __init__(self, args, env):
        self.active = env.main
        self.writer = None
        if self.active and args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(args.save_dir)
        self.path = Path(args.save_dir) / "metrics.jsonl"

    def write(self, record, step):
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iter":
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()


def find_pack(args, split="train"):
    """-> prepare_data.read_pack's index of DATA_DIR/packed/SPLIT (arrays not opened), or
    None when there is none or --no-pack. A stale pack (its list or a source file changed
    since packing) is an error: training on it would silently use other data."""
    import prepare_data
    if args.no_pack:
        return None
    try:
        return prepare_data.read_pack(args.data_dir, split, args.num_classes, args.ignore_index, mmap=False)
    except FileNotFoundError:
        return None
    except prepare_data.StalePack as e:
        raise UserError(f"stale pack: {e}; re-run prepare_data.py --pack (or train with --no-pack)") from None


def resolve_speed_flags(args, env, packed):
    """Fills the None/auto speed flags from the device (see parse_args); all on for CUDA
    except --compile, all off on the CPU."""
    cuda = env.device.type == "cuda"
    if args.aug_device == "auto":
        args.aug_device = "cuda" if cuda and packed else "cpu"
    if args.aug_device == "cuda" and not cuda:
        raise UserError("--aug-device cuda needs a CUDA device")
    for name in ("channels_last", "cudnn_benchmark"):
        if getattr(args, name) is None:
            setattr(args, name, cuda)
    if args.fused_sgd is None:
        args.fused_sgd = cuda and fused_sgd_available()
    if args.fused_sgd and not cuda:
        raise UserError("--fused-sgd needs a CUDA device")
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)


def fused_sgd_available():
    import inspect
    return "fused" in inspect.signature(torch.optim.SGD).parameters


def build_model(args, env):
    """-> (model on the device, loss function): BiSeNetV2 with the selected BGA op, the
    initial weights, channels_last and SyncBatchNorm as configured."""
    torch.manual_seed(args.seed)
    model = BiSeNetV2(args.num_classes)
    loss_fn, bga_fn = select_ops(args.kernels, env)
    model.bga.aggregate = bga_fn
    if args.weights:
        load_weights_or_fail(model, args.weights)
        env.log(f"initial weights: {args.weights}")
    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    sync_bn = env.world_size > 1 and not args.no_sync_bn
    if sync_bn and env.device.type != "cuda":
        env.log("note: SyncBatchNorm needs CUDA; plain per-process BatchNorm on CPU")
        sync_bn = False
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, loss_fn


def make_optimizer(model, args):
    fused = dict(fused=True) if args.fused_sgd else {}
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay, **fused)


def step_functions(model, args, env):
    """-> (the model the step calls: DDP-wrapped and compiled as configured, the losses
    function: segmentation_losses, compiled with --compile)."""
    step_model = model
    if env.world_size > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    losses_fn = segmentation_losses
    if args.compile:
        step_model = torch.compile(step_model)
        losses_fn = torch.compile(segmentation_losses)
    return step_model, losses_fn


def make_train_loader(pairs, pack, args, env, start_iter):
    """The DataLoader of this rank's batches for iterations start_iter .. --iters - 1."""
    raw = args.aug_device == "cuda"
    dataset = TrainSet(pairs, args, pack=pack, raw=raw)
    sampler = StepSampler(len(dataset), args.batch_size, env.rank, env.world_size, args.seed,
                          start_iter, args.iters)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=args.num_workers, collate_fn=collate_raw if raw else None,
        pin_memory=env.device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if args.num_workers > 0 else None)


def next_batch(batches):
    try:
        return next(batches)
    except DataError as e:  # re-raised from a worker with its traceback in the message
        raise UserError(str(e).strip().splitlines()[-1].removeprefix(f"{DataError.__module__}.")
                        .removeprefix("DataError: ")) from None


COPY_STREAMS = {}  # device -> the side stream that copies batches in


def copy_batch_in(tensors, device):
    """Host (pinned) batch tensors -> `device`. On CUDA the copies run on a side stream that
    the current stream then waits for: since the step never synchronises, the host runs
    ahead and the next batch's copy overlaps the previous step's kernels instead of
    queueing behind them. record_stream keeps the allocator from reusing the copies' memory
    before the current stream is done with it."""
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    stream = COPY_STREAMS.setdefault(device, torch.cuda.Stream(device))
    with torch.cuda.stream(stream):
        copies = [t.to(device, non_blocking=True) for t in tensors]
    current = torch.cuda.current_stream(device)
    current.wait_stream(stream)
    for copy in copies:
        copy.record_stream(current)
    return copies


def batch_to_device(batch, args, env):
    """A loader batch -> the step's images (B, 3, h, w) and labels (B, h, w) on the device;
    with --aug-device cuda the raw frames are augmented there. No host synchronisation."""
    if args.aug_device == "cuda":
        images, labels, positions = batch
        images, labels = copy_batch_in((images, labels), env.device)
        images, labels = augment_on_device(images, labels, positions, args)
    else:
        images, labels = copy_batch_in(batch, env.device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def train_step(step_model, losses_fn, optimizer, scaler, images, labels, loss_fn, head_weights, lr, seed,
               args, env):
    """One SGD step; -> per-head losses (N_heads,) and the weighted total, detached, on the
    device. No host synchronisation: lr is a Python number, the seed is set on the host."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(seed)  # dropout draws, exact on resume
    with torch.autocast(env.device.type, dtype=env.amp_dtype, enabled=env.amp_dtype is not None):
        outputs = step_model(images)
    losses = losses_fn(outputs, labels, loss_fn, args)
    loss = (losses * head_weights).sum()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return losses.detach(), loss.detach()


NUM_HEADS = 5


def head_weights_on(device, args):
    """(N_heads,) float32: 1 for the main head, --aux-weight for the auxiliary ones."""
    return to_device(torch.tensor([1.0] + [args.aux_weight] * (NUM_HEADS - 1)), device)


def train(args, env):
    pairs = read_list(args.data_dir, "train")
    pack = find_pack(args)
    env.log(f"data: packed {pack['path']}" if pack else f"data: PNG files ({args.data_dir}/train.txt)")
    env.log(f"augmentation: {'batched on the GPU in the main process' if args.aug_device == 'cuda' else 'per sample in the DataLoader workers'}")
    val_pairs = read_list(args.data_dir, "val") if args.do_eval else None
    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    if env.main:  # a write cut short by a kill leaves only its hidden temporary file
        for leftover in save_dir.glob(".*.pt.tmp*"):
            leftover.unlink(missing_ok=True)

    model, loss_fn = build_model(args, env)
    optimizer = make_optimizer(model, args)
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.amp_dtype == torch.float16)

    start_iter, best = 0, dict(mIoU=-1.0, iter=None)
    if args.resume:
        path, checkpoint = newest_checkpoint(save_dir)
        if checkpoint is None:
            env.log(f"--resume: no checkpoint in {save_dir}; starting from scratch")
        else:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scaler.load_state_dict(checkpoint["scaler"])
            start_iter, best = checkpoint["iter"], checkpoint["best"]
            env.log(f"resumed from {path} at iteration {start_iter}")

    step_model, losses_fn = step_functions(model, args, env)
    loader = make_train_loader(pairs, pack, args, env, start_iter)
    log = MetricsLog(args, env)

    def save(it):
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                     scaler=scaler.state_dict(), iter=it, best=best, args=vars(args))
        atomic_save(state, save_dir / f"iter_{it}.pt")
        for old in list_checkpoints(save_dir)[args.keep_checkpoints:]:
            old.unlink(missing_ok=True)

    head_weights = head_weights_on(env.device, args)
    loss_sum = torch.zeros(NUM_HEADS, device=env.device)   # summed over the log window, on device
    first_bad_iter = torch.full((), -1, dtype=torch.int64, device=env.device)
    window_start, window_iters, reader_time = time.perf_counter(), 0, 0.0
    run_start, run_start_iter = time.perf_counter(), start_iter
    model.train()
    batches = iter(loader)
    for it in range(start_iter, args.iters):
        fetch_start = time.perf_counter()
        batch = next_batch(batches)
        reader_time += time.perf_counter() - fetch_start
        images, labels = batch_to_device(batch, args, env)
        lr = lr_at(it, args)
        losses, loss = train_step(step_model, losses_fn, optimizer, scaler, images, labels, loss_fn, head_weights,
                                  lr, step_seed(args.seed, it, env.rank), args, env)

        loss_sum += losses
        first_bad_iter = torch.where((first_bad_iter < 0) & ~torch.isfinite(loss),
                                     torch.full_like(first_bad_iter, it + 1), first_bad_iter)
        window_iters += 1
        done = it + 1
        is_save = done % args.save_interval == 0 or done == args.iters
        is_eval = args.do_eval and (done % args.eval_interval == 0 or done == args.iters)
        if done % args.log_iters == 0 or is_save or is_eval:
            # the only host synchronisation: losses and the non-finite check
            check_finite(first_bad_iter, save_dir, env)
            mean_losses = (loss_sum / window_iters).tolist()
            now = time.perf_counter()
            batch_cost = (now - window_start) / window_iters
            images_per_s = args.batch_size * env.world_size / batch_cost
            eta = (now - run_start) / (done - run_start_iter) * (args.iters - done)
            peak_mb = torch.cuda.max_memory_allocated(env.device) / 2**20 if env.device.type == "cuda" else 0.0
            record = dict(iter=done, loss=sum(w * l for w, l in zip(head_weights.tolist(), mean_losses)),
                          loss_main=mean_losses[0], **{f"loss_aux{i}": mean_losses[i] for i in range(1, NUM_HEADS)},
                          lr=lr, batch_cost=batch_cost, reader_cost=reader_time / window_iters,
                          images_per_s=images_per_s, peak_mem_mb=peak_mb)
            env.log(f"iter {done}/{args.iters}  loss {record['loss']:.4f} "
                    f"[{' '.join(f'{v:.3f}' for v in mean_losses)}]  lr {lr:.6f}  "
                    f"batch_cost {batch_cost:.4f}s  reader_cost {record['reader_cost']:.4f}s  "
                    f"{images_per_s:.1f} img/s  ETA {datetime.timedelta(seconds=round(eta))}  "
                    f"mem {peak_mb:.0f}MB")
            log.write(record, done)
            loss_sum.zero_()
            window_iters, reader_time = 0, 0.0
        if is_eval:
            metrics = evaluate(model, val_pairs, args, env)
            env.log(format_metrics(metrics, args.num_classes))
            log.write(dict(iter=done, mIoU=metrics["mIoU"], pixel_acc=metrics["pixel_acc"]), done)
            if env.main:
                write_json(save_dir / "eval_metrics.json", dict(iter=done, **metrics))
            if metrics["mIoU"] > best["mIoU"]:
                best = dict(mIoU=metrics["mIoU"], iter=done)
                if env.main:
                    atomic_save(dict(model=model.state_dict(), iter=done, metrics=metrics, args=vars(args)),
                                save_dir / "best.pt")
            env.log(f"best mIoU {100 * best['mIoU']:.2f} at iteration {best['iter']}")
        if is_save and env.main:
            save(done)
        if done % args.log_iters == 0 or is_save or is_eval:
            window_start = time.perf_counter()  # evaluation and saving stay out of batch_cost
    if env.world_size > 1:
        dist.barrier()
    env.log(f"done: {args.iters} iterations, checkpoints in {save_dir}")


def check_finite(first_bad_iter, save_dir, env):
    """Stops the run (every rank) if any rank saw a non-finite loss; names the iteration."""
    bad = torch.where(first_bad_iter >= 0, first_bad_iter, torch.full_like(first_bad_iter, 2**62))
    if env.world_size > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
    bad = int(bad)
    if bad < 2**62:
        last = list_checkpoints(save_dir)
        raise UserError(f"non-finite loss at iteration {bad}; stopped, last good checkpoint: "
                        f"{last[0] if last else 'none'}")


def write_json(path, obj):
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def eval_only(args, env):
    pairs = read_list(args.data_dir, "val")
    model = BiSeNetV2(args.num_classes)
    _, bga_fn = select_ops(args.kernels, env)
    model.bga.aggregate = bga_fn
    load_weights_or_fail(model, args.weights)
    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    metrics = evaluate(model, pairs, args, env)
    env.log(format_metrics(metrics, args.num_classes))
    if env.main:
        Path(args.save_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.save_dir) / "eval_metrics.json", dict(weights=str(args.weights), **metrics))
        env.log(f"wrote {Path(args.save_dir) / 'eval_metrics.json'}")


def demo_data_dir():
    """The demo's synthetic dataset in the cache, made on first use; its train split packed."""
    import prepare_data
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bisenetv2" / "synthetic_cityscapes"
    if not (cache / "train.txt").is_file() or not (cache / "val.txt").is_file():
        print(f"demo: writing a synthetic Cityscapes-layout dataset to {cache}", flush=True)
        prepare_data.make_synthetic(cache)
    prepare_data.pack_split(cache, "train", log=lambda *a: None)  # a no-op when fresh
    return str(cache)


# ---------------------------------------------------------------------------------------
# Throughput benchmark (python train_ddp.py --benchmark; see BENCHMARKS.md)

BASELINE = dict(packed=False, aug_device="cpu", amp="none", channels_last=False, kernels="torch",
                fused_sgd=False, cudnn_benchmark=False, compile=False)
ALL_ON = dict(packed=True, aug_device="cuda", amp="bf16", channels_last=True, kernels="auto",
              fused_sgd=True, cudnn_benchmark=True, compile=True)
# (row name, what it changes against the baseline, the changed settings)
BENCHMARK_CONFIGS = [
    ("baseline", "eager fp32, NCHW, --kernels torch, PNG decode + per-sample aug in workers", {}),
    ("packed+gpu-aug", "memory-mapped pack, workers gather uint8, batch augmented on the GPU",
     dict(packed=True, aug_device="cuda")),
    ("bf16", "bf16 autocast", dict(amp="bf16")),
    ("channels_last", "model and input channels_last", dict(channels_last=True)),
    ("fused-kernels", "--kernels cuda (fused loss and BGA)", dict(kernels="cuda")),
    ("fused-sgd", "SGD(fused=True)", dict(fused_sgd=True)),
    ("cudnn-benchmark", "cudnn.benchmark", dict(cudnn_benchmark=True)),
    ("compile", "torch.compile of model and loss", dict(compile=True)),
    ("all", "all of the above together (--kernels auto: the references if the build fails)", ALL_ON),
]
ASSUMED_MULTI_GPU_OVERHEAD = 1.15  # 8-GPU step time / 1-GPU step time: an estimate (BENCHMARKS.md), not measured


def benchmark_data(args, env):
    """-> (data dir, pack index or None, note). Without --data-dir: a synthetic dataset of
    --benchmark-image-size frames in the cache, packed."""
    import prepare_data
    if args.data_dir:
        try:
            return args.data_dir, find_pack(args), ""
        except UserError as e:
            return args.data_dir, None, str(e)
    height, width = args.benchmark_image_size
    cache = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bisenetv2"
             / f"synthetic_cityscapes_{height}x{width}")
    if not (cache / "train.txt").is_file():
        env.log(f"benchmark: writing a synthetic {width}x{height} dataset to {cache}")
        prepare_data.make_synthetic(cache, num_images=16, size=(height, width))
    prepare_data.pack_split(cache, "train", args.num_classes, args.ignore_index, log=env.log)
    args.data_dir = str(cache)
    return str(cache), find_pack(args), ""


def needs_cuda(settings):
    """Why a configuration is not run on the CPU (None: it runs)."""
    if settings["kernels"] == "cuda" or settings["fused_sgd"] or settings["cudnn_benchmark"]:
        return "needs CUDA"
    if settings["compile"]:
        return "not run on CPU (compiling the training step takes minutes there)"
    return None


def run_config(args, env, settings, pairs, pack):
    """Trains a fresh model for --benchmark-warmup + --benchmark-iters iterations with
    `settings` through train's own pieces (loader, batch_to_device, train_step). -> dict:
    images/s (measured iterations, wall clock, synchronised at both ends), median step ms
    (CUDA events between step starts on a GPU, the host clock on the CPU), reader share
    (time the host waited for the loader / wall time), peak memory MiB (CUDA)."""
    import copy
    args = copy.copy(args)
    for key, value in settings.items():
        if key != "packed":
            setattr(args, key, value)
    args.iters = args.benchmark_warmup + args.benchmark_iters
    env.amp_dtype = {"bf16": torch.bfloat16, "none": None}[args.amp]
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    cuda = env.device.type == "cuda"
    model, loss_fn = build_model(args, env)
    optimizer = make_optimizer(model, args)
    scaler = torch.amp.GradScaler(env.device.type, enabled=False)
    step_model, losses_fn = step_functions(model, args, env)
    loader = make_train_loader(pairs, pack if settings["packed"] else None, args, env, 0)
    head_weights = head_weights_on(env.device, args)
    model.train()
    batches = iter(loader)
    starts, reader_wait = [], 0.0
    for it in range(args.iters):
        if it == args.benchmark_warmup:
            if cuda:
                torch.cuda.synchronize(env.device)
                torch.cuda.reset_peak_memory_stats(env.device)
            start, reader_wait = time.perf_counter(), 0.0
        if it >= args.benchmark_warmup:
            if cuda:
                starts.append(torch.cuda.Event(enable_timing=True))
                starts[-1].record()
            else:
                starts.append(time.perf_counter())
        fetch_start = time.perf_counter()
        batch = next_batch(batches)
        reader_wait += time.perf_counter() - fetch_start
        images, labels = batch_to_device(batch, args, env)
        train_step(step_model, losses_fn, optimizer, scaler, images, labels, loss_fn, head_weights,
                   lr_at(it, args), step_seed(args.seed, it, env.rank), args, env)
    if cuda:
        starts.append(torch.cuda.Event(enable_timing=True))
        starts[-1].record()
        torch.cuda.synchronize(env.device)
        steps_ms = [a.elapsed_time(b) for a, b in zip(starts, starts[1:])]
    else:
        starts.append(time.perf_counter())
        steps_ms = [1000 * (b - a) for a, b in zip(starts, starts[1:])]
    wall = time.perf_counter() - start
    import kernels
    result = dict(fused_kernels=model.bga.aggregate is not kernels.bga_aggregate_reference,
                  images_per_s=args.benchmark_iters * args.batch_size / wall,
                  step_ms=float(np.median(steps_ms)), reader_share=reader_wait / wall,
                  peak_mib=torch.cuda.max_memory_allocated(env.device) / 2**20 if cuda else None)
    del batches, loader, step_model, model, optimizer
    if args.compile:
        torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    return result


@torch.no_grad()
def inference_fps(args, env, dtype, channels_last, compiled):
    """-> images/s of the eval-mode model (main head upsampled to the input) at
    1x3x--benchmark-infer-size, after 3 warm-up calls (more when compiled)."""
    torch.backends.cudnn.benchmark = env.device.type == "cuda"
    model = BiSeNetV2(args.num_classes).to(env.device).eval()
    image = torch.randn(1, 3, *args.benchmark_infer_size, device=env.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    run = torch.compile(model) if compiled else model
    sync = (lambda: torch.cuda.synchronize(env.device)) if env.device.type == "cuda" else (lambda: None)
    with torch.autocast(env.device.type, dtype=dtype, enabled=dtype is not None):
        for _ in range(10 if compiled else 3):
            run(image)
        sync()
        start = time.perf_counter()
        for _ in range(args.benchmark_infer_iters):
            run(image)
        sync()
    if compiled:
        torch._dynamo.reset()
    return args.benchmark_infer_iters / (time.perf_counter() - start)


def benchmark(args, env):
    """Runs each BENCHMARK_CONFIGS row and the inference variants in this process and prints
    one markdown table (also to --benchmark-out). -> exit code 0."""
    if env.world_size > 1:
        raise UserError("--benchmark runs in one process (one GPU)")
    cuda = env.device.type == "cuda"
    data_dir, pack, pack_note = benchmark_data(args, env)
    pairs = read_list(data_dir, "train")
    names = [name for name, _, _ in BENCHMARK_CONFIGS]
    unknown = set(args.benchmark_configs or []) - set(names)
    if unknown:
        raise UserError(f"--benchmark-configs: unknown {sorted(unknown)}; rows are {', '.join(names)}")
    device_name = torch.cuda.get_device_name(env.device) if cuda else f"CPU ({os.cpu_count()} cores)"
    lines = [f"## `train_ddp.py --benchmark`: {device_name}",
             "",
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
             f"{args.batch_size} crops of {args.crop_size[0]}x{args.crop_size[1]} per step, data {data_dir} "
             f"({'packed' if pack else 'no fresh pack'}), {args.num_workers} DataLoader workers, "
             f"{args.benchmark_iters} measured iterations after {args.benchmark_warmup} warm-up",
             "",
             "| config | change against the baseline | images/s | step ms (median) | reader share | peak MiB | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    results = {}
    for name, what, change in BENCHMARK_CONFIGS:
        if args.benchmark_configs and name not in args.benchmark_configs:
            continue
        settings = dict(BASELINE, **change)
        note = None if cuda else needs_cuda(settings)
        if note is None and settings["packed"] and pack is None:
            note = pack_note or "no pack of the train split: run prepare_data.py --pack"
        if note is None:
            try:
                env.log(f"benchmark: {name} ...")
                results[name] = result = run_config(args, env, settings, pairs, pack)
                note = "" if cuda or not settings["aug_device"] == "cuda" else "aug batched on the CPU (no CUDA)"
                if settings["kernels"] != "torch":
                    note += ("kernels: fused CUDA loss and BGA" if result["fused_kernels"]
                             else "kernels: PyTorch references (no build)")
            except (UserError, RuntimeError) as e:
                note = f"failed: {' '.join(str(e).split())[:160]}"
        if name not in results:
            lines.append(f"| {name} | {what} | - | - | - | - | {note} |")
            continue
        peak = "-" if result["peak_mib"] is None else f"{result['peak_mib']:.0f}"
        lines.append(f"| {name} | {what} | {result['images_per_s']:.1f} | {result['step_ms']:.1f} | "
                     f"{100 * result['reader_share']:.0f}% | {peak} | {note} |")
    height, width = args.benchmark_infer_size
    lines += ["", f"| inference 1x3x{height}x{width}, eval mode | images/s | ms/image | note |",
              "| --- | ---: | ---: | --- |"]
    for label, dtype, channels_last, compiled in (("fp32 eager, NCHW", None, False, False),
                                                  ("bf16 channels_last", torch.bfloat16, True, False),
                                                  ("bf16 channels_last compiled", torch.bfloat16, True, True)):
        if (compiled or dtype is not None) and not cuda:
            lines.append(f"| {label} | - | - | {'needs CUDA' if not compiled else 'not run on CPU'} |")
            continue
        try:
            fps = inference_fps(args, env, dtype, channels_last, compiled)
            lines.append(f"| {label} | {fps:.1f} | {1000 / fps:.2f} |  |")
        except RuntimeError as e:
            lines.append(f"| {label} | - | - | failed: {' '.join(str(e).split())[:160]} |")
    lines.append("")
    if "all" in results:
        hours = 160000 * results["all"]["step_ms"] / 1000 * ASSUMED_MULTI_GPU_OVERHEAD / 3600
        lines.append(f"Projected 160k iterations on 8 GPUs (4 crops each): {hours:.1f} h = 160000 x "
                     f"{results['all']['step_ms']:.1f} ms (the 'all' median step) x {ASSUMED_MULTI_GPU_OVERHEAD} "
                     f"(assumed: DDP all-reduce and SyncBatchNorm are not measured on one GPU).")
    else:
        lines.append("Projected 160k iterations on 8 GPUs: n/a (the 'all' row was not measured).")
    table = "\n".join(lines) + "\n"
    print(table, flush=True)
    if args.benchmark_out:
        out = Path(args.benchmark_out)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        tmp.write_text(table)
        os.replace(tmp, out)
    return 0


def main(argv=None):
    args = parse_args(argv)
    env = None
    try:
        env = Env(args)
        if args.demo and not args.data_dir:
            if env.main:
                args.data_dir = demo_data_dir()
            if env.world_size > 1:
                dist.barrier()
            args.data_dir = args.data_dir or demo_data_dir()
        if args.benchmark:
            return benchmark(args, env)
        resolve_speed_flags(args, env, packed=not args.eval_only and find_pack(args) is not None)
        env.log("config: " + json.dumps(vars(args), sort_keys=True))
        env.log(f"processes {env.world_size}, device {env.device}, autocast {args.amp}, torch {torch.__version__}")
        if args.eval_only:
            eval_only(args, env)
        else:
            train(args, env)
    except UserError as e:
        print(f"train_ddp.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if env is not None:
            env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
