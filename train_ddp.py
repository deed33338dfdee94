"""Train and evaluate BiSeNetV2 on Cityscapes: PaddleSeg's bisenet_cityscapes_1024x1024_160k.

    python train_ddp.py --demo                                    # synthetic data, CPU, minutes
    python train_ddp.py --data-dir /data/cityscapes --do-eval     # one process
    torchrun --nproc_per_node=4 train_ddp.py --data-dir /data/cityscapes --do-eval   # the recipe
    python train_ddp.py --data-dir /data/cityscapes --eval-only --weights model.pdparams --flip
    python bench.py                                               # throughput (BENCHMARKS.md)

The defaults are the recipe: 160k iterations of 4 crops of 1024x1024 per process on 4 GPUs
(global batch 16), SGD (momentum 0.9, weight decay 5e-4), lr 0.05 with poly(0.9) decay to 0
and no warmup, plain cross-entropy on the main and the 4 auxiliary heads (weight 1 each),
PaddleSeg's augmentation (data.py); on CUDA training runs in bf16 autocast by default, where
PaddleSeg trains in float32 (--amp none). The data dir holds train.txt / val.txt as written by
prepare_data.py, and with `prepare_data.py --pack` a pack of the train split.

Reading order: parse_args; setup_process; resolve_config (every automatic setting, decided
once, printed, saved in every checkpoint); the loss, train_step, evaluation, checkpoints;
train (the loop); main.

Determinism: which samples a step sees and every augmentation draw are functions of
(--seed, iteration), and the torch RNG (dropout) is reseeded from (--seed, iteration, rank)
each step, so `--resume` continues exactly where a run stopped: on the CPU a resumed run ends
bitwise equal to an uninterrupted one.
"""
import argparse
import contextlib
import datetime
import inspect
import json
import math
import os
import re
import signal
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

import data
import kernels
import predict
import prepare_data
from bisenetv2 import BiSeNetV2, load_matching, load_weights
from data import BadInput

DEMO_DEFAULTS = dict(iters=300, batch_size=8, crop_size=[128, 256], lr=0.05, log_iters=20,
                     save_interval=150, do_eval=True, num_workers=2, save_dir="output/demo")
DEMO_FRAME_SIZE = (256, 512)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
NUM_HEADS = 5  # the main head and the auxiliary heads on the stem and stages 3, 4, 5
NEVER = 2**62  # the iteration of a non-finite loss that has not happened


def make_parser():
    parser = data.OneLineErrors(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("data").add_argument
    group("--data-dir", help="Cityscapes root with train.txt / val.txt (see prepare_data.py)")
    group("--demo", action="store_true",
          help="make a synthetic Cityscapes-layout dataset in the cache and train on it briefly: "
               + ", ".join(f"{k}={v}" for k, v in DEMO_DEFAULTS.items()))
    group("--no-pack", action="store_true", help="read the PNGs even when DATA_DIR/packed/ holds a fresh pack")
    group("--num-workers", type=int, default=None,
          help="DataLoader workers per process; None: this node's cores (the process's CPU affinity) over its "
               "processes, less one for the process itself, 1 to 8")
    group = parser.add_argument_group("schedule and optimiser").add_argument
    group("--iters", type=int, default=160000)
    group("--batch-size", type=int, default=4, help="images per process")
    group("--crop-size", type=int, nargs=2, default=[1024, 1024], metavar=("H", "W"))
    group("--lr", type=float, default=0.05)
    group("--momentum", type=float, default=0.9)
    group("--weight-decay", type=float, default=5e-4)
    group("--power", type=float, default=0.9, help="poly decay exponent")
    group("--warmup-iters", type=int, default=0, help="linear warmup from 0, then the decay over the rest")
    group("--seed", type=int, default=0)
    group = parser.add_argument_group("loss").add_argument
    group("--loss", choices=("ce", "ohem"), default="ce")
    group("--ohem-thresh", type=float, default=0.7, help="ohem: keep pixels with p(label) < this")
    group("--ohem-min-kept", type=int, default=None, help="ohem: at least this many (default valid // 16)")
    group("--aux-weight", type=float, default=1.0, help="weight of each of the 4 auxiliary losses")
    group("--class-weights", nargs="+", metavar="W",
          help="a loss weight per class (CE and OHEM: the class-weighted mean), or 'auto': median frequency "
               "balancing from the training labels (median_frequency_weights)")
    group("--num-classes", type=int, default=None,
          help="None: DATA_DIR/dataset.json's classes, or Cityscapes' 19 without one")
    group("--ignore-index", type=int, default=None, help="None: dataset.json's, or 255")
    group = parser.add_argument_group("augmentation").add_argument
    group("--min-scale", type=float, default=0.5)
    group("--max-scale", type=float, default=2.0)
    group("--scale-step", type=float, default=0.25,
          help="the scales from --min-scale by this step, as many as fit (PaddleSeg's ResizeStepScaling); "
               "0: uniform in [--min-scale, --max-scale]")
    group("--aug-device", choices=("auto", "cpu", "cuda"), default="auto",
          help="cpu: augment each sample in the DataLoader workers; cuda: the workers only read uint8 "
               "frames, the main process augments the whole batch on the GPU (same draws); auto: cuda when "
               "training on CUDA from a pack, or from PNG frames of one size")
    group = parser.add_argument_group("speed (None: decided at start from the device)").add_argument
    group("--amp", choices=("bf16", "fp16", "none"), default=None, help="training autocast; None: bf16 on CUDA")
    group("--channels-last", action=argparse.BooleanOptionalAction, default=None,
          help="model and input in channels_last memory format (None: on with CUDA)")
    group("--fused-sgd", action=argparse.BooleanOptionalAction, default=None,
          help="SGD's fused CUDA implementation (None: on with CUDA when available)")
    group("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=None,
          help="cudnn.benchmark autotuning (None: on with CUDA)")
    group("--compile", action="store_true", help="torch.compile the model and the loss")
    group("--kernels", choices=("auto", "cuda", "torch"), default="auto",
          help="fused CUDA loss and BGA kernels (auto: when they build on a GPU machine)")
    group("--no-sync-bn", action="store_true", help="plain BN per process under DDP")
    group = parser.add_argument_group("evaluation").add_argument
    group("--do-eval", "--do_eval", action="store_true", help="evaluate on val at every --eval-interval")
    group("--eval-interval", type=int, default=None, help="None: --save-interval")
    group("--eval-only", action="store_true", help="evaluate --weights on val and exit")
    group("--weights", help="initial weights: a checkpoint of this project or a PaddleSeg .pdparams")
    group("--init-only", action="store_true",
          help="with --weights: load only the tensors whose name and shape fit (a fine-tune to another number "
               "of classes: the heads' last convs stay freshly initialised, each one logged)")
    group("--eval-amp", choices=("none", "bf16"), default="none",
          help="evaluation autocast; none: float32, as PaddleSeg evaluates its published 73.19")
    group("--pred-dir", help="evaluation writes each prediction here as a PNG of Cityscapes label ids "
                             "(of train ids for a dataset other than Cityscapes)")
    group("--flip", action="store_true", help="evaluation: add horizontally flipped inference")
    group("--scales", type=float, nargs="+", default=[1.0], help="evaluation: inference scales")
    group("--slide", type=int, nargs=2, metavar=("H", "W"),
          help="evaluation: sliding-window inference with windows of H x W (PaddleSeg's slide_inference)")
    group("--stride", type=int, nargs=2, metavar=("H", "W"),
          help="--slide: the windows' step, at most the window (default: half)")
    group = parser.add_argument_group("bookkeeping").add_argument
    group("--save-dir", "--save_dir", default="output")
    group("--save-interval", "--save_interval", type=int, default=500)
    group("--keep-checkpoints", type=int, default=5)
    group("--log-iters", type=int, default=10)
    group("--resume", action="store_true", help="continue from the newest complete checkpoint in --save-dir")
    group("--tensorboard", "--use_vdl", action="store_true", help="TensorBoard scalars in --save-dir")
    return parser


def class_weights_ok(values):
    if values is None or values == ["auto"]:
        return True
    try:
        weights = [float(v) for v in values]
    except ValueError:
        return False
    return all(math.isfinite(w) and w >= 0 for w in weights) and any(w > 0 for w in weights)


def parse_args(argv=None):
    parser = make_parser()
    argv = sys.argv[1:] if argv is None else argv
    if "--demo" in argv:
        parser.set_defaults(**DEMO_DEFAULTS)
    args = parser.parse_args(argv)
    at_least_1 = ("iters", "batch_size", "save_interval", "log_iters", "keep_checkpoints", "eval_interval")
    rules = [(name, "at least 1", getattr(args, name) is None or getattr(args, name) >= 1) for name in at_least_1]
    rules += [("lr", "finite and positive", math.isfinite(args.lr) and args.lr > 0),  # (NaN fails every comparison)
              ("momentum", "in [0, 1)", 0 <= args.momentum < 1),
              ("weight_decay", "finite and at least 0", 0 <= args.weight_decay < math.inf),
              ("power", "finite and at least 0", 0 <= args.power < math.inf),
              ("warmup_iters", "at least 0 and below --iters", 0 <= args.warmup_iters < max(args.iters, 1)),
              ("seed", "in 0..4294967295", 0 <= args.seed < 2**32),  # (numpy's seeds are non-negative)
              ("ohem_thresh", "in (0, 1] (a probability)", 0 < args.ohem_thresh <= 1),
              ("ohem_min_kept", "at least 0", args.ohem_min_kept is None or args.ohem_min_kept >= 0),
              ("aux_weight", "finite and at least 0", 0 <= args.aux_weight < math.inf),
              ("max_scale", "finite", math.isfinite(args.max_scale)),
              ("crop_size", "positive", min(args.crop_size) > 0),
              ("num_workers", "at least 0", args.num_workers is None or args.num_workers >= 0),
              ("scale_step", "finite and at least 0 (0: any scale in the range)", 0 <= args.scale_step < math.inf),
              ("scales", "finite and positive", all(math.isfinite(s) and s > 0 for s in args.scales)),
              ("min_scale", "positive and at most --max-scale", 0 < args.min_scale <= args.max_scale),
              ("num_classes", "in 1..255", args.num_classes is None or 1 <= args.num_classes <= 255),
              ("ignore_index", "in 0..255", args.ignore_index is None or 0 <= args.ignore_index <= 255),
              ("slide", "positive", args.slide is None or min(args.slide) > 0),
              ("stride", "positive and at most --slide, with --slide", args.stride is None or (
                  args.slide and min(args.stride) > 0 and all(s <= w for s, w in zip(args.stride, args.slide)))),
              ("class_weights", "'auto' or non-negative numbers, not all 0", class_weights_ok(args.class_weights))]
    for name, rule, ok in rules:
        if not ok:
            value = getattr(args, name)
            value = " ".join(map(str, value)) if isinstance(value, list) else value
            parser.error(f"--{name.replace('_', '-')} must be {rule}, got {value}")
    if args.eval_only and not args.weights:
        parser.error("--eval-only needs --weights")
    if args.init_only and (not args.weights or args.eval_only):
        parser.error("--init-only needs --weights, for training")
    if not args.demo and not args.data_dir:
        parser.error("--data-dir is required (or --demo)")
    return args


# ---------------------------------------------------------------------------------------
# The process and the resolved configuration


class Process(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    main = property(lambda self: self.rank == 0)  # rank 0 logs and writes for all

    def log(self, *parts):
        if self.main:
            print(*parts, flush=True)


def setup_process():
    """-> Process: rank, world size and device from torchrun's environment (one process
    without it); joins the process group (NCCL on GPUs, gloo on CPU). cleanup_process undoes it."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Process(int(os.environ.get("RANK", 0)), world_size, local_rank, device)


def cleanup_process():
    if dist.is_initialized():
        dist.destroy_process_group()


class Config(types.SimpleNamespace):
    """The run's settings after resolve_config: read-only."""

    def __setattr__(self, name, value):
        raise AttributeError(f"the config is resolved once and not changed afterwards (tried to set {name})")


def resolve_config(args, env):
    """Every automatic setting, decided once from the flags and the device; each choice is
    in the printed config. -> (Config, (loss function, BGA function) of --kernels)."""
    cuda = env.device.type == "cuda"
    data_dir = args.data_dir
    if args.demo and not data_dir:
        data_dir = str(demo_data(env))
    dataset = resolve_dataset(args, data_dir, env)
    pack = None
    if not args.no_pack and not args.eval_only:
        pack = data.find_pack(data_dir, "train", dataset)
    aug_device = args.aug_device
    if aug_device == "auto":
        aug_device = "cuda" if cuda and not args.eval_only and (pack or one_frame_size(data_dir, env)) else "cpu"
    fused_sgd_available = "fused" in inspect.signature(torch.optim.SGD).parameters
    fused_sgd = cuda and fused_sgd_available if args.fused_sgd is None else args.fused_sgd
    for flag, wanted in (("--aug-device cuda", aug_device == "cuda"), ("--fused-sgd", fused_sgd)):
        if wanted and not cuda:
            raise BadInput(f"{flag} needs a CUDA device")
    try:
        selection_log = []  # another rank's, which rank 0 prints where it differs
        ops = kernels.select(args.kernels, device=env.device, log=env.log if env.main else selection_log.append)
    except RuntimeError as e:  # --kernels cuda without a build: one line
        raise BadInput(f"--kernels {args.kernels}: {' '.join(str(e).split())}") from None
    ops = same_ops_on_every_rank(ops, selection_log, env)
    sync_bn = env.world_size > 1 and not args.no_sync_bn
    if sync_bn and not cuda:
        env.log("note: SyncBatchNorm needs CUDA; plain per-process BatchNorm on CPU")
        sync_bn = False
    if not args.eval_only and args.batch_size * (env.world_size if sync_bn else 1) < 2:
        raise BadInput(f"--batch-size {args.batch_size}: the context block's BatchNorm normalises one pooled value "
                       "per channel and crop, so it needs at least 2 crops"
                       + (" a process (without SyncBatchNorm)" if env.world_size > 1 else
                          " a step (or several processes with SyncBatchNorm)"))
    num_workers = args.num_workers if args.num_workers is not None else 0 if args.eval_only else auto_num_workers(env)
    class_weights = resolve_class_weights(args, data_dir, dataset, pack, num_workers, env)
    settings = {k: v for k, v in vars(args).items() if k not in ("no_pack", "no_sync_bn")}
    config = Config(**dict(
        settings, dataset=dataset, num_classes=len(dataset.class_names), ignore_index=dataset.ignore_index,
        class_weights=class_weights, num_workers=num_workers, device=str(env.device), world_size=env.world_size,
        global_batch=args.batch_size * env.world_size, data_dir=data_dir,
        pack=str(pack["path"]) if pack else None, aug_device=aug_device, fused_sgd=fused_sgd,
        amp=args.amp or ("bf16" if cuda else "none"),
        channels_last=cuda if args.channels_last is None else args.channels_last,
        cudnn_benchmark=cuda if args.cudnn_benchmark is None else args.cudnn_benchmark,
        kernels=kernels_in_use(ops),
        sync_bn=sync_bn, eval_interval=args.eval_interval or args.save_interval))
    torch.backends.cudnn.benchmark = config.cudnn_benchmark
    return config, ops


def demo_data(env):
    """--demo's synthetic set in the cache folder (prepare_data.synthetic_in_cache): rank 0
    writes it while the others wait, then each other node's first process where that node's
    cache is its own (a no-op where it sees rank 0's), so that no two processes write one folder."""
    def in_cache():
        return prepare_data.synthetic_in_cache(DEMO_FRAME_SIZE, 48, log=env.log)
    if env.world_size > 1:
        for writer in (env.main, env.local_rank == 0 and not env.main):
            if writer:
                in_cache()
            dist.barrier()
    return in_cache()


def auto_num_workers(env):
    """--num-workers None: the cores this process may run on (its CPU affinity) shared by the
    node's processes (torchrun's LOCAL_WORLD_SIZE), one left for each process itself, 1 to 8
    (decoding a 1024x2048 PNG pair takes a core about 50 ms, and 8 feed some 160 frames/s).
    Logged."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    workers = min(8, max(1, cores // processes - 1))
    env.log(f"--num-workers auto: {workers} ({cores} cores for {processes} process(es) on this node, one left for "
            "each, at most 8)")
    return workers


def one_frame_size(data_dir, env):
    """--aug-device auto without a pack: whether the train frames share one size (by their
    headers, data.check_headers: some 50 us a pair, and a bad file stops the run now), so that
    the batches can be augmented on the GPU (the workers only decode: half their time a
    frame). Logged either way."""
    pairs = data.read_list(data_dir, "train")
    sizes = data.check_headers(pairs)
    if (other := next((i for i, size in enumerate(sizes) if size != sizes[0]), None)) is not None:
        env.log(f"--aug-device auto: cpu, the train frames differ in size ({pairs[0][0]} is {data.hxw(sizes[0])}, "
                f"{pairs[other][0]} {data.hxw(sizes[other])}); a batch augmented on the "
                "GPU needs one size")
        return False
    if pairs:
        env.log(f"--aug-device auto: cuda, the {len(pairs)} train frames are all {data.hxw(sizes[0])}: the "
                "workers decode, the GPU augments each batch")
    return bool(pairs)


def median_frequency_weights(counts):
    """Median frequency balancing (Eigen and Fergus 2015, as SegNet weights its loss): a
    class's weight is median(f) / f_c, f_c its share of the labelled pixels and the median
    over the classes present; a class absent from the labels weighs 0."""
    freq = np.asarray(counts, np.float64) / max(int(np.sum(counts)), 1)
    present = freq > 0
    if not present.any():
        raise BadInput("--class-weights auto: the training labels hold no labelled pixel")
    weights = np.where(present, np.median(freq[present]) / np.where(present, freq, 1), 0.0)
    return [round(float(w), 6) for w in weights]


def resolve_dataset(args, data_dir, env):
    """The dataset's classes (data.DatasetInfo): DATA_DIR/dataset.json, whose number of
    classes and ignore index --num-classes and --ignore-index may repeat but not contradict;
    without one, Cityscapes' 19 classes, or --num-classes numbered ones (data.numbered_info)."""
    path = Path(data_dir) / data.DATASET_FILE
    if path.is_file():
        dataset, source = data.read_dataset_info(data_dir), path
        for flag, given, own in (("--num-classes", args.num_classes, len(dataset.class_names)),
                                 ("--ignore-index", args.ignore_index, dataset.ignore_index)):
            if given is not None and given != own:
                raise BadInput(f"{flag} {given}, but {path} says {own} (leave the flag out)")
    else:
        dataset = data.info_for_classes(args.num_classes, 255 if args.ignore_index is None else args.ignore_index)
        source = "Cityscapes' classes" if dataset.label_ids else "--num-classes, no dataset.json"
    env.log(f"dataset: {len(dataset.class_names)} classes ({source}), ignore index {dataset.ignore_index}")
    return dataset


def resolve_class_weights(args, data_dir, dataset, pack, num_workers, env):
    """--class-weights as numbers (one per class), 'auto' counted from the training labels
    on rank 0 and sent to the others, or None."""
    if args.class_weights is None or args.eval_only:
        return None
    if args.class_weights != ["auto"]:
        weights, num_classes = [float(w) for w in args.class_weights], len(dataset.class_names)
        if len(weights) != num_classes:
            raise BadInput(f"--class-weights: {len(weights)} weights for {num_classes} classes")
        return weights
    weights = [None]
    if env.main:
        start = time.perf_counter()
        counts = data.class_pixel_counts(data.read_list(data_dir, "train"),
                                         pack and data.read_pack(data_dir, "train", dataset), dataset,
                                         num_workers)
        weights = [median_frequency_weights(counts)]
        env.log(f"--class-weights auto: median frequency balancing over {int(counts.sum())} labelled pixels "
                f"({time.perf_counter() - start:.1f} s): {weights[0]}")
    if dist.is_initialized():
        dist.broadcast_object_list(weights, src=0)
    return weights[0]


def same_ops_on_every_rank(ops, selection_log, env):
    """--kernels auto decides on each rank (its build, its checks): an op that any rank runs as
    the PyTorch reference is every rank's reference, so that every rank computes the same
    thing; rank 0 logs the selection of each rank that fell back (selection_log: a rank's
    kernels.select lines). -> (loss function, BGA function)."""
    if env.world_size == 1:
        return ops
    references = (kernels.ohem_cross_entropy_reference, kernels.bga_aggregate_reference)
    every_rank = [None] * env.world_size
    dist.all_gather_object(every_rank, ([op is not reference for op, reference in zip(ops, references)],
                                        selection_log))
    agreed, shown = [], set()
    for i, (name, op, reference) in enumerate(zip(kernels.EXTENSIONS, ops, references)):
        refusing = [rank for rank, (fused, _) in enumerate(every_rank) if not fused[i]]
        if refusing and len(refusing) < env.world_size:
            for rank in sorted(set(refusing) - shown):
                for line in every_rank[rank][1]:
                    env.log(f"rank {rank}: {line}")
            shown.update(refusing)
            env.log(f"kernels: the {name} op is the PyTorch reference on rank(s) {', '.join(map(str, refusing))}, "
                    "so on every rank")
            kernels.EXTENSIONS[name].use_cuda_kernel = False
        agreed.append(reference if refusing else op)
    return tuple(agreed)


def kernels_in_use(ops):
    """'cuda' (both fused), 'torch' (both references), or which op is which (kernels.select
    falls back per op when one disagrees with its reference)."""
    loss_fn, bga_fn = ops
    fused = dict(loss=loss_fn is not kernels.ohem_cross_entropy_reference,
                 bga=bga_fn is not kernels.bga_aggregate_reference)
    if all(fused.values()) or not any(fused.values()):
        return "cuda" if fused["loss"] else "torch"
    return ", ".join(f"{op} {'cuda' if on else 'torch'}" for op, on in fused.items())


RESOLVED = ("device", "world_size", "global_batch", "pack", "sync_bn")  # settings that are not flags
# the flags of the recipe's computation (their defaults are its values; the global batch and
# the precision are compared apart)
RECIPE = ("iters", "crop_size", "lr", "momentum", "weight_decay", "power", "warmup_iters", "loss", "aux_weight",
          "class_weights", "min_scale", "max_scale", "scale_step")


def format_config(config):
    """The config grouped as in --help, one setting per line."""
    groups = [("run", RESOLVED)] + [(group.title, [action.dest for action in group._group_actions])
                                    for group in make_parser()._action_groups[2:]]
    lines = ["config (saved in every checkpoint):"]
    for title, names in groups:
        lines.append(f"  {title}")
        lines += [f"    {name:<18} {getattr(config, name)}" for name in names if hasattr(config, name)]
    defaults = make_parser()  # whose defaults are the recipe's
    differences = [] if config.global_batch in (16, 32) else [f"global batch {config.global_batch}"]
    differences += [f"{name} {getattr(config, name)}" for name in RECIPE
                    if getattr(config, name) != defaults.get_default(name)]
    if config.world_size > 1 and not config.sync_bn:
        differences.append("BatchNorm per process (the recipe's is synced: SyncBatchNorm)")
    if config.amp != "none":
        differences.append(f"amp {config.amp} (PaddleSeg trains in float32: --amp none)")
    if not config.eval_only:  # (evaluation alone trains nothing)
        lines.append(f"global batch {config.global_batch} = {config.world_size} process(es) x {config.batch_size}; "
                     f"PaddleSeg's recipe: 16 = 4 GPUs x 4 (73.19% mIoU) or 32 = 8 GPUs x 4 (73.45%), at lr 0.05"
                     + ("" if not differences else "; this run is not the recipe: " + ", ".join(differences)))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Model, loss, step


def build_model(config, env, bga_fn):
    """BiSeNetV2 on the device with the selected BGA op, --weights, channels_last, SyncBN."""
    torch.manual_seed(config.seed)
    model = BiSeNetV2(config.num_classes)
    model.bga.aggregate = bga_fn
    if config.weights:
        try:
            skipped = load_matching(model, config.weights) if config.init_only else []
            if not config.init_only:
                load_weights(model, config.weights)
        except (OSError, ValueError) as e:  # another number of classes: say how to fine-tune from them
            hint = " (--init-only loads the tensors that fit)" if "mis-shaped: " in str(e) else ""
            raise BadInput(f"--weights: {e}{hint}") from None
        env.log(f"initial weights: {config.weights}")
        for name in skipped:
            env.log(f"  --init-only: {name} {tuple(model.state_dict()[name].shape)} does not fit: freshly initialised")
    model.to(env.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if config.sync_bn else model


class SegmentationLoss(torch.nn.Module):
    """The loss over the five heads: each head's logits are bilinearly upsampled to the
    labels inside loss_fn (plain CE or OHEM). -> per-head losses (5,) and their weighted sum
    (1 for the main head, --aux-weight for the others)."""

    def __init__(self, loss_fn, config):
        super().__init__()
        self.loss_fn, self.ignore_index = loss_fn, config.ignore_index
        self.thresh = config.ohem_thresh if config.loss == "ohem" else None
        self.min_kept = config.ohem_min_kept
        self.register_buffer("head_weights", torch.tensor([1.0] + [config.aux_weight] * (NUM_HEADS - 1)))
        self.register_buffer("class_weights", None if config.class_weights is None else
                             torch.tensor(config.class_weights, dtype=torch.float32))

    def forward(self, outputs, labels):
        # validate=False: the loader has checked the labels (checking here would be a CPU-GPU sync point)
        losses = torch.stack([self.loss_fn(out, labels, thresh=self.thresh, min_kept=self.min_kept,
                                           ignore_index=self.ignore_index, validate=False,
                                           class_weights=self.class_weights) for out in outputs])
        return losses, (losses * self.head_weights).sum()


def build_training(config, env, ops):
    """-> model (whose state is saved), step_model (what the step calls: DDP-wrapped and
    compiled as configured), criterion, optimizer, scaler (active with --amp fp16 only)."""
    loss_fn, bga_fn = ops
    model = build_model(config, env, bga_fn)
    criterion = SegmentationLoss(loss_fn, config).to(env.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, **({"fused": True} if config.fused_sgd else {}))
    scaler = torch.amp.GradScaler(env.device.type, enabled=config.amp == "fp16")
    step_model = model
    if env.world_size > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    if config.compile:
        step_model, criterion = torch.compile(step_model), torch.compile(criterion)
    return model, step_model, criterion, optimizer, scaler


def train_step(model, criterion, optimizer, scaler, images, labels, lr, seed, amp_dtype):
    """One SGD step -> per-head losses (5,) and their weighted total, detached, on the
    device. No CPU-GPU sync point of its own: lr is a Python number and the seed is set on the
    host (torch's SyncBatchNorm, with several GPUs, has one in each layer's forward: it drops
    empty processes' statistics with a boolean mask, pytorch issue 78656)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(seed)  # the dropout draws
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        outputs = model(images)
    losses, loss = criterion(outputs, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return losses.detach(), loss.detach()


def lr_at(it, config):
    """The lr of iteration `it` (from 0): poly decay to 0 (PaddleSeg's PolynomialDecay, end_lr
    0), after an optional linear warmup from 0 (PaddleSeg's LinearWarmup, warmup_start_lr 0),
    the decay then running over the iterations after the warmup, as PaddleSeg's does."""
    if it < config.warmup_iters:
        return config.lr * it / config.warmup_iters
    return config.lr * (1 - (it - config.warmup_iters) / (config.iters - config.warmup_iters)) ** config.power


def step_seed(*keys):
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


# ---------------------------------------------------------------------------------------
# Evaluation


class ConfusionMatrix:
    """Rows ground truth, columns prediction (torchvision's references/segmentation
    ConfusionMatrix): update per image, reduce_from_all_processes, compute."""

    def __init__(self, num_classes, ignore_index, device):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred, label):
        n = self.num_classes
        valid = label != self.ignore_index
        index = label[valid].long() * n + pred[valid].long()       # (valid pixels,)
        self.mat += torch.bincount(index, minlength=n * n).view(n, n)

    def reduce_from_all_processes(self):
        if dist.is_initialized():
            dist.all_reduce(self.mat)

    def compute(self):
        """mIoU over the classes that occur in the ground truth or the predictions (as the
        official Cityscapes evaluator averages), pixel accuracy, per-class IoU (None: absent)."""
        confusion = self.mat.cpu().double()
        true_pos = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - true_pos
        present = union > 0
        iou = true_pos / union.clamp(min=1)
        return dict(mIoU=float(iou[present].mean()) if present.any() else 0.0,
                    pixel_acc=float(true_pos.sum() / confusion.sum().clamp(min=1)),
                    class_IoU=[float(v) if p else None for v, p in zip(iou.tolist(), present.tolist())])


@torch.no_grad()
def evaluate(model, pairs, config, env):
    """Full-resolution evaluation, batch 1, sharded over the processes, in float32 unless
    --eval-amp bf16. -> metrics dict (identical on every rank)."""
    was_training = model.training
    model.eval()
    confusion = ConfusionMatrix(config.num_classes, config.ignore_index, env.device)
    label_ids = np.array(config.dataset.label_ids or range(config.num_classes), np.uint8)  # train id -> PNG value
    amp_dtype = AMP_DTYPES[config.eval_amp]
    normalized = data.normalize_table(env.device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    shard = pairs[env.rank::env.world_size]
    pred_files = prediction_files(pairs, config.pred_dir)[env.rank::env.world_size] if config.pred_dir else None
    start, sizes, autotuning = time.perf_counter(), set(), torch.backends.cudnn.benchmark
    threads = min(4, os.cpu_count() or 1)  # decoding a full-resolution frame outlasts its forward pass: read ahead
    with ThreadPoolExecutor(threads, thread_name_prefix="eval-read") as pool, restored_autotuning(autotuning):
        samples = predict.read_ahead(pool, lambda pair: data.eval_sample(pair, config.dataset, config), shard, threads)
        for count, (pair, (image, label)) in enumerate(zip(shard, samples), 1):
            if predict.past_autotuned_sizes(sizes, tuple(image.shape[:2])):  # (restored after the evaluation)
                print(f"rank {env.rank}: evaluation: val frames of more than {predict.AUTOTUNED_SIZES} sizes: "
                      "cudnn.benchmark off for it", flush=True)
            # uint8 to the device, normalised there: a quarter of the bytes, no float pass on the host
            image = data.normalize_photos(image[None], normalized).contiguous(memory_format=memory_format)
            with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                pred = predict.infer(model, image, config.scales, config.flip, config.slide, config.stride).argmax(1)[0]
            confusion.update(pred, label.to(env.device))
            if config.pred_dir:
                out = pred_files[count - 1]
                written = label_ids[pred.cpu().numpy()]
                try:  # a full disk: one line (torchrun then stops the other processes)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    data.save_png(written, out)
                except OSError as e:
                    raise BadInput(f"--pred-dir: cannot write {out} ({e.strerror or e})") from None
            if env.main and (count % 100 == 0 or count == len(shard)):
                print(f"eval [{count}/{len(shard)}] {(time.perf_counter() - start) / count:.3f} s/image", flush=True)
    confusion.reduce_from_all_processes()
    model.train(was_training)
    return confusion.compute()


@contextlib.contextmanager
def restored_autotuning(autotuning):
    """cudnn.benchmark set back to `autotuning` on leaving, whatever happened."""
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = autotuning


def prediction_files(pairs, pred_dir):
    """--pred-dir's file for each val frame: its image's path below the deepest folder that
    holds every image's folder, as .png (Cityscapes: below leftImg8bit/val, CITY/NAME.png,
    where predict.py --input leftImg8bit/val --label-ids DIR writes it). The paths are made
    absolute and their '..' folded first, so every file lies under pred_dir."""
    images = [Path(os.path.abspath(image)) for image, _ in pairs]  # abspath folds '..' (resolve() would follow links)
    common = Path(os.path.commonpath([image.parent.parent for image in images]))
    return [Path(pred_dir) / image.relative_to(common).with_suffix(".png") for image in images]


def read_val_list(config):
    """The val pairs, every file's header checked (data.check_headers), and --pred-dir made: a
    bad val file, two frames that would write one prediction or a --pred-dir that cannot be
    made stops the run at start, not at its first evaluation."""
    pairs = data.read_list(config.data_dir, "val")
    data.check_headers(pairs)
    if config.pred_dir:
        written, inputs = {}, {path.resolve() for pair in pairs for path in pair}
        for (image, _), file in zip(pairs, prediction_files(pairs, config.pred_dir)):
            target = file.resolve()
            if target in inputs:  # --pred-dir the val images' folder
                raise BadInput(f"--pred-dir {config.pred_dir}: would overwrite the val file {file}")
            if target in written:  # a.jpg and a.png in one folder
                raise BadInput(f"--pred-dir: {written[target]} and {image} would both write {file}; rename one")
            written[target] = image
        try:
            Path(config.pred_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInput(f"--pred-dir {config.pred_dir}: cannot make it ({e.strerror or e})") from None
    return pairs


def format_metrics(metrics, class_names):
    width = max(14, *map(len, class_names))
    lines = [f"{'class':>{width}}  IoU"]
    lines += [f"{name:>{width}}  {'  -' if iou is None else f'{100 * iou:5.2f}'}"
              for name, iou in zip(class_names, metrics["class_IoU"])]
    lines.append(f"{'mIoU':>{width}}  {100 * metrics['mIoU']:5.2f}   pixel acc {100 * metrics['pixel_acc']:.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Checkpoints: SAVE_DIR/iter_N.pt (newest --keep-checkpoints kept) and best.pt


def list_checkpoints(save_dir, up_to=NEVER):
    """iter_N.pt in save_dir with N <= up_to, newest first."""
    found = [(int(m[1]), p) for p in Path(save_dir).glob("iter_*.pt") if (m := re.fullmatch(r"iter_(\d+)\.pt", p.name))]
    return [path for it, path in sorted(found, reverse=True) if it <= up_to]


def newest_checkpoint(save_dir):
    """-> (path, checkpoint) of the newest checkpoint that loads, or (None, None);
    unreadable ones are reported and passed over."""
    for path in list_checkpoints(save_dir):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(checkpoint, dict) or not {"model", "optimizer", "iter", "config"} <= checkpoint.keys():
                raise ValueError("not a training checkpoint of this project")
            return path, checkpoint
        except Exception as e:
            print(f"warning: skipping unreadable checkpoint {path} ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr)
    return None, None


# the settings a resumed run must share with its checkpoint: each changes what training computes
COMPUTATION = ("iters", "batch_size", "crop_size", "lr", "momentum", "weight_decay", "power", "warmup_iters", "seed",
               "loss", "ohem_thresh", "ohem_min_kept", "aux_weight", "class_weights", "num_classes", "ignore_index",
               "min_scale", "max_scale", "scale_step", "world_size", "aug_device", "amp", "channels_last", "fused_sgd",
               "kernels", "compile", "sync_bn")


def check_same_computation(saved, config, path):
    """BadInput listing each COMPUTATION setting where `config` differs from the checkpoint's."""
    changed = [f"{name} {saved.get(name)} -> {getattr(config, name)}"
               for name in COMPUTATION if saved.get(name) != getattr(config, name)]
    if changed:
        raise BadInput(f"--resume: {path} was trained with other settings (saved -> given): {', '.join(changed)}; "
                       f"resume with the saved ones or choose another --save-dir")


def saved_config(config):
    """The config as a checkpoint holds it: plain values (weights_only loading), the dataset
    as dataset.json's content (predict.py and export.py read it from there)."""
    return dict(vars(config), dataset=data.dataset_info_json(config.dataset))


def best_so_far(best, save_dir, start_iter):
    """The best evaluation up to start_iter: the checkpoint's `best`, or best.pt's when that
    is better and not later (iter_N.pt is written before the evaluation of iteration N)."""
    path = Path(save_dir) / "best.pt"
    if not path.is_file():
        return best
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        saved = dict(mIoU=saved["metrics"]["mIoU"], iter=saved["iter"])
    except Exception as e:
        raise BadInput(f"--resume: {path} is unreadable ({type(e).__name__}); move it away to resume") from None
    return saved if saved["iter"] <= start_iter and saved["mIoU"] > best["mIoU"] else best


def resume_point(save_dir, env):
    """-> (path, checkpoint, best) of rank 0's newest checkpoint in save_dir, or (None, None,
    None), sent to every rank (a BadInput on rank 0 is raised on every rank): all ranks start
    from one iteration and one state, also where the nodes do not share --save-dir or see it
    late (NFS caches listings), which would otherwise train diverged models, then hang."""
    found = [None, None, None, None]  # path, checkpoint, best, rank 0's BadInput
    if env.main:
        try:
            path, checkpoint = newest_checkpoint(save_dir)
            if checkpoint is not None:
                found[:3] = [path, checkpoint, best_so_far(checkpoint["best"], save_dir, checkpoint["iter"])]
        except BadInput as e:
            found[3] = str(e)
    if dist.is_initialized():  # about 20 MB: the model and the optimizer's momentum
        dist.broadcast_object_list(found, src=0)
    if found[3] is not None:
        raise BadInput(found[3])
    return tuple(found[:3])


def save_on_master(obj, path, env):
    """Rank 0 writes `obj` (a checkpoint, with its "iter") atomically; a failed write (a full
    disk) leaves no partial file and stops the run naming the path and the last good checkpoint."""
    if env.main:
        try:
            data.atomic_write(path, lambda f: torch.save(obj, f))
        except OSError as e:
            stop_before_saving(f"cannot write {path} ({e.strerror or e})", obj["iter"], path.parent)


# ---------------------------------------------------------------------------------------
# Training


def open_tensorboard(config, start_iter):
    """A writer in --save-dir; on resume, TensorBoard hides the steps after start_iter that an
    interrupted run had logged (purge_step), as trim_records drops them from metrics.jsonl."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise BadInput("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(config.save_dir, purge_step=start_iter + 1 if start_iter else None)


def write_record(record, save_dir, tensorboard):
    """A line of SAVE_DIR/metrics.jsonl, and TensorBoard scalars when it is open (rank 0 only)."""
    with open(Path(save_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if tensorboard:
        for key, value in record.items():
            if key != "iter":
                tensorboard.add_scalar(key, value, record["iter"])
        tensorboard.flush()


def read_records(lines):
    """(line, record) for the lines of a metrics.jsonl; a line cut short by a kill is left out."""
    records = []
    for line in lines:
        try:
            if isinstance(record := json.loads(line), dict) and isinstance(record.get("iter"), int):
                records.append((line, record))
        except ValueError:
            pass
    return records


def evaluated(save_dir, it, env):
    """Whether SAVE_DIR/metrics.jsonl holds the evaluation of iteration `it` (rank 0's file,
    its answer sent to every rank)."""
    found = [False]
    if env.main and (path := Path(save_dir) / "metrics.jsonl").is_file():
        found[0] = any(record["iter"] == it and "mIoU" in record
                       for _, record in read_records(path.read_text().splitlines()))
    if dist.is_initialized():
        dist.broadcast_object_list(found, src=0)
    return found[0]


def trim_records(save_dir, up_to, log):
    """Drops the records of SAVE_DIR/metrics.jsonl after iteration `up_to` (a resumed run
    writes them again) and any line cut short by a kill; rewritten atomically, logged."""
    path = Path(save_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line + "\n" for line, record in read_records(lines) if record["iter"] <= up_to]
    if len(kept) < len(lines):
        data.atomic_write(path, "".join(kept))
        log(f"{path}: dropped {len(lines) - len(kept)} record(s) after iteration {up_to}")


def stop_before_saving(problem, done, save_dir):
    last = list_checkpoints(save_dir, up_to=done)
    raise BadInput(f"{problem}; stopped, last good checkpoint: {last[0] if last else 'none'}")


def check_finite(first_bad_iter, done, save_dir, env):
    """Stops the run (every rank) if any rank saw a non-finite loss; names the iteration."""
    if env.world_size > 1:
        dist.all_reduce(first_bad_iter, op=dist.ReduceOp.MIN)
    if (bad := int(first_bad_iter)) < NEVER:
        stop_before_saving(f"non-finite loss at iteration {bad}", done, save_dir)


def check_weights_finite(model, done, save_dir, env):
    """Before a checkpoint or an evaluation: stops the run (every rank) unless every parameter
    and buffer on every rank is finite. Reduced on the device, read once."""
    state = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}
    finite = torch.stack([torch.isfinite(t).all() for t in state.values()]).all().long()
    if env.world_size > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite:
        bad = next((name for name, t in state.items() if not torch.isfinite(t).all()), "on another rank")
        stop_before_saving(f"non-finite weights ({bad}) at iteration {done}, not saved", done, save_dir)


class StopSignals:
    """While open, SIGTERM and SIGINT only record themselves in `received`; the loop reads it
    at its log point, saves and stops. Closing restores the previous handlers."""

    def __enter__(self):
        self.received = 0
        self.previous = {sig: signal.signal(sig, self.record) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def record(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def agreed_stop(signals, env):
    """-> the stop signal any rank received, or 0: the same on every rank. Called at the log
    point only, where the loop syncs anyway, so a stop costs no per-step sync (and waits up to
    --log-iters steps)."""
    if env.world_size == 1:
        return signals.received
    received = torch.tensor(signals.received, device=env.device)
    dist.all_reduce(received, op=dist.ReduceOp.MAX)
    return int(received)


def evaluate_and_record(model, val_pairs, config, env, done, best, tensorboard):
    """The evaluation of iteration `done`: its table logged, a metrics.jsonl record,
    eval_metrics.json, and best.pt when it beats `best`. -> the best so far."""
    if env.world_size > 1:  # BN running statistics: the last step left each rank its own crops' (without
        for buffer in model.buffers():  # SyncBatchNorm); evaluate rank 0's, the checkpoint's
            dist.broadcast(buffer, src=0)
    metrics = evaluate(model, val_pairs, config, env)
    env.log(format_metrics(metrics, config.dataset.class_names))
    save_dir = Path(config.save_dir)
    if env.main:
        write_record(dict(iter=done, mIoU=metrics["mIoU"], pixel_acc=metrics["pixel_acc"]), save_dir, tensorboard)
        data.atomic_write(save_dir / "eval_metrics.json", json.dumps(dict(iter=done, **metrics), indent=2))
    if metrics["mIoU"] > best["mIoU"]:
        best = dict(mIoU=metrics["mIoU"], iter=done)
        save_on_master(dict(model=model.state_dict(), iter=done, metrics=metrics, config=saved_config(config)),
                       save_dir / "best.pt", env)
    env.log(f"best mIoU {100 * best['mIoU']:.2f} at iteration {best['iter']}")
    return best


def train(config, env, ops, signals):
    """-> 0 when the run completed, else the signal that stopped it after a checkpoint."""
    pairs = data.read_list(config.data_dir, "train")
    pack = data.find_pack(config.data_dir, "train", config.dataset) if config.pack else None
    env.log(f"data: packed {pack['path']}" if pack else f"data: PNG files ({config.data_dir}/train.txt)")
    val_pairs = read_val_list(config) if config.do_eval else None
    save_dir = Path(config.save_dir)
    if not config.resume and (held := list_checkpoints(save_dir) + list(save_dir.glob("best.pt"))):
        raise BadInput(f"--save-dir {save_dir} holds checkpoints of another run ({held[0].name}); "
                       f"continue it with --resume or choose another --save-dir")
    save_dir.mkdir(parents=True, exist_ok=True)
    if env.main:  # a write cut short by a kill leaves only its hidden temporary file
        for leftover in save_dir.glob(".*.pt.tmp*"):
            leftover.unlink(missing_ok=True)

    model, step_model, criterion, optimizer, scaler = build_training(config, env, ops)
    start_iter, best = 0, dict(mIoU=-1.0, iter=None)
    if config.resume:
        path, checkpoint, resumed_best = resume_point(save_dir, env)
        if checkpoint is None:
            env.log(f"--resume: no checkpoint in {save_dir}; starting from scratch")
        else:
            check_same_computation(checkpoint["config"], config, path)
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scaler.load_state_dict(checkpoint["scaler"])
            start_iter, best = checkpoint["iter"], resumed_best
            env.log(f"resumed from {path} at iteration {start_iter}")
    if env.main:
        trim_records(save_dir, start_iter, env.log)
    batches = iter(data.make_loader(pairs, pack, config.dataset, config, env.rank, env.world_size, start_iter))
    tensorboard = open_tensorboard(config, start_iter) if config.tensorboard and env.main else None
    amp_dtype, cuda = AMP_DTYPES[config.amp], env.device.type == "cuda"

    if start_iter == config.iters and config.do_eval and not evaluated(save_dir, start_iter, env):
        env.log(f"nothing left to train after iteration {start_iter}; evaluating it (a stop there skipped that)")
        best = evaluate_and_record(model, val_pairs, config, env, start_iter, best, tensorboard)

    loss_sum = torch.zeros(1 + NUM_HEADS, device=env.device)  # total and per head, summed over the log window
    first_bad_iter = torch.full((), NEVER, dtype=torch.int64, device=env.device)  # of a non-finite loss
    window_start, window_iters, reader_time = time.perf_counter(), 0, 0.0
    run_start, run_start_iter = time.perf_counter(), start_iter
    stop = 0  # the signal all ranks stop on, read at the log point
    model.train()
    for it in range(start_iter, config.iters):
        images, labels, waited = data.next_batch(batches, env.device, config)
        reader_time += waited
        lr = lr_at(it, config)
        losses, loss = train_step(step_model, criterion, optimizer, scaler, images, labels, lr,
                                  step_seed(config.seed, it, env.rank), amp_dtype)
        loss_sum += torch.cat([loss[None], losses])
        first_bad_iter = torch.where(torch.isfinite(loss), first_bad_iter, first_bad_iter.clamp(max=it + 1))
        window_iters += 1
        done = it + 1
        is_save = done % config.save_interval == 0 or done == config.iters
        is_eval = config.do_eval and (done % config.eval_interval == 0 or done == config.iters)
        if done % config.log_iters == 0 or is_save or is_eval:
            check_finite(first_bad_iter, done, save_dir, env)  # a CPU-GPU sync point: the loop's one, SyncBN's aside
            if stop := agreed_stop(signals, env):  # save now; an evaluation due now would delay that
                is_save, is_eval = True, False
            if is_save or is_eval:  # nothing non-finite is evaluated or written
                check_weights_finite(model, done, save_dir, env)
            loss_mean, *head_means = (loss_sum / window_iters).tolist()
            now = time.perf_counter()
            batch_cost = (now - window_start) / window_iters
            eta = datetime.timedelta(seconds=round((now - run_start) / (done - run_start_iter) * (config.iters - done)))
            peak_mb = torch.cuda.max_memory_allocated(env.device) / 2**20 if cuda else 0.0
            record = dict(iter=done, loss=loss_mean, loss_main=head_means[0],
                          **{f"loss_aux{i}": v for i, v in enumerate(head_means[1:], 1)}, lr=lr, batch_cost=batch_cost,
                          reader_cost=reader_time / window_iters, images_per_s=config.global_batch / batch_cost,
                          peak_mem_mb=peak_mb)
            env.log(f"iter {done}/{config.iters}  loss {loss_mean:.4f} [{' '.join(f'{v:.3f}' for v in head_means)}]  "
                    f"lr {lr:.6f}  batch_cost {batch_cost:.4f}s  reader_cost {record['reader_cost']:.4f}s  "
                    f"{record['images_per_s']:.1f} img/s  ETA {eta}  mem {peak_mb:.0f}MB")
            if env.main:
                write_record(record, save_dir, tensorboard)
            loss_sum.zero_()
            window_iters, reader_time = 0, 0.0
        # the checkpoint first: an evaluation that fails (memory, a bad val file) loses no training
        if is_save:
            save_on_master(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                                iter=done, best=best, config=saved_config(config)), save_dir / f"iter_{done}.pt", env)
            if env.main:
                for old in list_checkpoints(save_dir, up_to=done)[config.keep_checkpoints:]:  # later ones stay
                    old.unlink(missing_ok=True)
        if is_eval:
            best = evaluate_and_record(model, val_pairs, config, env, done, best, tensorboard)
        if done % config.log_iters == 0 or is_save or is_eval:
            window_start = time.perf_counter()  # evaluation and saving stay out of batch_cost
        if stop:
            break
    if env.world_size > 1:
        dist.barrier()  # no rank leaves before rank 0 has written
    if stop:
        env.log(f"stopped at iteration {done} ({signal.Signals(stop).name}), checkpoint "
                f"{save_dir / f'iter_{done}.pt'}; resume with --resume")
        return stop
    env.log(f"done: {config.iters} iterations, checkpoints in {save_dir}")
    return 0


def eval_only(config, env, ops):
    pairs = read_val_list(config)
    out = Path(config.save_dir) / "eval_metrics.json"

    def cannot_write(e):
        return BadInput(f"--save-dir {config.save_dir}: cannot write {out.name} there ({e.strerror or e})")
    if env.main:
        try:  # before the evaluation, which an unusable --save-dir would waste
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise cannot_write(e) from None
    metrics = evaluate(build_model(config, env, ops[1]), pairs, config, env)
    env.log(format_metrics(metrics, config.dataset.class_names))
    if env.main:
        try:
            data.atomic_write(out, json.dumps(dict(weights=str(config.weights), **metrics), indent=2))
        except OSError as e:  # a full disk
            raise cannot_write(e) from None
        env.log(f"wrote {out}")


def worker_died(error):
    """-> one line for the RuntimeError of a DataLoader worker that died (killed by a signal,
    most often the kernel's out-of-memory killer), or None for any other error."""
    lines = str(error).strip().splitlines()
    if not lines or not lines[0].startswith("DataLoader worker"):
        return None
    return (f"{lines[0].rstrip(' .')}; the out-of-memory killer is the usual cause: lower --num-workers or "
            f"--batch-size; resume with --resume")


def main(argv=None):
    args = parse_args(argv)
    env = setup_process()
    try:
        config, ops = resolve_config(args, env)
        env.log(format_config(config))
        env.log(f"torch {torch.__version__}")
        if config.eval_only:
            eval_only(config, env, ops)
        else:
            # rank 0 holds SAVE_DIR/.lock for the run's life: a second run on the dir stops at start
            lock = data.folder_lock(config.save_dir, log=env.log) if env.main else contextlib.nullcontext()
            with lock, StopSignals() as signals:
                if stopped := train(config, env, ops, signals):
                    return 128 + stopped  # the shell's code for a process ended by that signal
    except BadInput as e:
        print(f"train_ddp.py: error: {data.one_line(e)}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:
        if not (line := worker_died(e)):
            raise
        print(f"train_ddp.py: error: {line}", file=sys.stderr, flush=True)
        return 2
    finally:
        cleanup_process()
    return 0


if __name__ == "__main__":
    sys.exit(main())
