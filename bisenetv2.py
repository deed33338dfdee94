"""BiSeNetV2 for real-time semantic segmentation, layer for layer as PaddleSeg builds it.

Paper: Yu et al., "BiSeNet V2: Bilateral Network with Guided Aggregation for Real-time
Semantic Segmentation", IJCV 2021 (arXiv:2004.02147). The layout follows PaddleSeg 2.x
`paddleseg/models/bisenet.py` (config `bisenet_cityscapes_1024x1024_160k`), so that
PaddleSeg's published weights load with `load_paddleseg` and give PaddleSeg's numbers.

Where each block comes from in the paper:
  DetailBranch     Sec. 4.1 / Table 1 "Detail Branch": wide (64, 64, 128 channels) and
                   shallow, output at 1/8 of the input.
  StemBlock        Fig. 4(a): a fast 4x downsampling with a conv path and a max-pool path.
  GatherExpand     Fig. 5(b), (c): Gather-and-Expansion layers, stride 1 and stride 2,
                   expansion ratio 6. The semantic branch stacks them into stages 3, 4, 5
                   (1/8, 1/16, 1/32 of the input; 32, 64, 128 channels).
  ContextEmbedding Fig. 4(b): global average pooling + residual, on the 1/32 features.
  BGA              Fig. 6: Bilateral Guided Aggregation, the detail branch and the semantic
                   branch guide each other through sigmoid gates.
  SegHead          Fig. 7 / Sec. 4.4 "Booster training strategy": 3x3 conv-BN-ReLU,
                   dropout, 1x1 classifier; the main head after BGA and four auxiliary
                   heads on the stem and stage 3, 4, 5 outputs, used in training only.

PaddleSeg conventions kept here because they change the numbers:
  * Convolutions use Paddle's padding='same': for stride 2 the padding is split
    TensorFlow-style (`pad_same`), e.g. 0 before and 1 after on an even size.
  * The BGA's average pool excludes the padding from the count (Paddle's exclusive=True).
  * The context block's BatchNorm normalises the pooled vector; its last 3x3 conv has a
    bias and no BN; the BGA's output conv has BN but no ReLU.
  * Under a SyncBatchNorm across processes, the context block's two BNs of the pooled
    vector keep the biased batch variance as their running variance, as Paddle's
    SyncBatchNorm does (ContextEmbedding).
  * Initialisation: Kaiming-normal conv weights, conv biases 0, BN weight 1 and bias 0.
  * Every interpolation is bilinear with align_corners=False.
  * BatchNorm epsilon 1e-5, momentum 0.1 (Paddle's 0.9 counts the other way round).

Forward contract:
  eval mode:  model(images) -> logits (N, num_classes, H, W) at the input's size.
  train mode: model(images) -> [main, aux1, aux2, aux3, aux4], each at its own resolution
              (1/8, 1/4, 1/8, 1/16, 1/32 of the input): the loss upsamples them.

Only torch is needed. The fused CUDA kernels of this project plug into the BGA through
`model.bga.aggregate = kernels.bga_aggregate`; the pure-PyTorch `bga_aggregate` below
computes the same function.
"""
import pickle
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BiSeNetV2", "bga_aggregate", "load_paddleseg", "load_weights"]


def pad_same(x, kernel_size, stride):
    """Pads x the way Paddle's padding='same' does: output size ceil(size / stride), the
    total padding split with the smaller half first (TensorFlow's SAME).

    Every division here has non-negative operands: a traced size is a tensor, and ONNX
    export turns `//` into Div, which truncates; `-(-size // stride)` would round the
    wrong way in an exported graph."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dim first
        out = (size + stride - 1) // stride
        total = (out - 1) * stride + kernel_size - size  # in [kernel_size - stride, kernel_size - 1]
        if kernel_size < stride:  # only then can it be negative; decided on constants, not sizes
            total = max(total, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class ConvBN(nn.Module):
    """Conv (no bias: a BN follows) + BatchNorm + optional ReLU, with Paddle's 'same' padding.

    PaddleSeg's ConvBNReLU / ConvBN / DepthwiseConvBN. A depthwise conv is groups=in_ch,
    with out_ch a multiple of in_ch (the gather-and-expansion layers expand 6x this way).
    """

    def __init__(self, in_ch, out_ch, kernel_size=3, stride=1, groups=1, relu=True):
        super().__init__()
        self.stride = stride
        # stride 1 and an odd kernel: 'same' is the symmetric kernel_size // 2, which the
        # conv applies itself; stride 2 pads explicitly in forward.
        padding = kernel_size // 2 if stride == 1 else 0
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.relu = relu

    def forward(self, x):
        if self.stride > 1:
            x = pad_same(x, self.conv.kernel_size[0], self.stride)
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class DetailBranch(nn.Module):
    """Wide and shallow: three stages of 3x3 conv-BN-ReLU, each opened by a stride 2 conv.
    (N, 3, H, W) -> (N, 128, H/8, W/8)."""

    def __init__(self, channels=(64, 64, 128)):
        super().__init__()
        c1, c2, c3 = channels
        self.layers = nn.Sequential(
            ConvBN(3, c1, stride=2), ConvBN(c1, c1),                       # stage 1: 1/2
            ConvBN(c1, c2, stride=2), ConvBN(c2, c2), ConvBN(c2, c2),      # stage 2: 1/4
            ConvBN(c2, c3, stride=2), ConvBN(c3, c3), ConvBN(c3, c3),      # stage 3: 1/8
        )

    def forward(self, images):
        return self.layers(images)


class StemBlock(nn.Module):
    """(N, 3, H, W) -> (N, out_ch, H/4, W/4): a conv path and a max-pool path, fused."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv = ConvBN(in_ch, out_ch, stride=2)
        self.conv_reduce = ConvBN(out_ch, out_ch // 2, kernel_size=1)
        self.conv_down = ConvBN(out_ch // 2, out_ch, stride=2)
        self.fuse = ConvBN(out_ch * 2, out_ch)

    def forward(self, images):
        half = self.conv(images)
        conv_path = self.conv_down(self.conv_reduce(half))
        pool_path = F.max_pool2d(half, kernel_size=3, stride=2, padding=1)
        return self.fuse(torch.cat([conv_path, pool_path], dim=1))


class GatherExpand(nn.Module):
    """Gather-and-expansion layer, stride 1: 3x3 conv, 6x depthwise expansion, 1x1
    projection, identity shortcut, ReLU. Shape preserved."""

    def __init__(self, channels, expand=6):
        super().__init__()
        self.conv = ConvBN(channels, channels)
        self.dw_expand = ConvBN(channels, channels * expand, groups=channels, relu=False)
        self.project = ConvBN(channels * expand, channels, kernel_size=1, relu=False)

    def forward(self, x):
        return F.relu(self.project(self.dw_expand(self.conv(x))) + x)


class GatherExpandDown(nn.Module):
    """Gather-and-expansion layer, stride 2: (N, in_ch, h, w) -> (N, out_ch, h/2, w/2).
    The shortcut is a stride 2 depthwise conv and a 1x1 projection."""

    def __init__(self, in_ch, out_ch, expand=6):
        super().__init__()
        mid_ch = in_ch * expand
        self.conv = ConvBN(in_ch, in_ch)
        self.dw_expand_down = ConvBN(in_ch, mid_ch, stride=2, groups=in_ch, relu=False)
        self.dw_expand = ConvBN(mid_ch, mid_ch, groups=mid_ch, relu=False)
        self.project = ConvBN(mid_ch, out_ch, kernel_size=1, relu=False)
        self.shortcut_dw = ConvBN(in_ch, in_ch, stride=2, groups=in_ch, relu=False)
        self.shortcut_project = ConvBN(in_ch, out_ch, kernel_size=1, relu=False)

    def forward(self, x):
        main = self.project(self.dw_expand(self.dw_expand_down(self.conv(x))))
        shortcut = self.shortcut_project(self.shortcut_dw(x))
        return F.relu(main + shortcut)


def synced_processes(bn):
    """How many processes `bn` pools its batch statistics over in this forward: the world of
    a SyncBatchNorm training under torch.distributed, else 1."""
    if not (isinstance(bn, nn.SyncBatchNorm) and bn.training and bn.track_running_stats
            and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size(bn.process_group)


def keep_biased_running_var(bn, old_var, count):
    """Turns the running-variance update `bn` just made from torch's into Paddle's
    SyncBatchNorm's, given the variance before it and the `count` values a channel it
    normalised over. torch keeps (1 - f) old + f var n / (n - 1) (the unbiased variance),
    Paddle's SyncBatchNorm (1 - f) old + f var (the biased one, as the batch was normalised
    with): the same less f var / (n - 1), that is new (1 - 1/n) + old (1 - f) / n."""
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)  # as torch's
    # in place: SyncBatchNorm's backward keeps input, weight, mean, invstd and counts, not the
    # running statistics (a plain BatchNorm2d's keeps them: this is for SyncBatchNorm only)
    with torch.no_grad():
        bn.running_var.mul_(1 - 1 / count).add_(old_var, alpha=(1 - factor) / count)


class ContextEmbedding(nn.Module):
    """Global context on the 1/32 features: pool, BN, 1x1 conv-BN-ReLU, broadcast add,
    then a plain 3x3 conv (with bias, no BN). Shape preserved.

    Its two BatchNorms see one value per image and channel, N of them a process. On several
    GPUs PaddleSeg's layers are Paddle's SyncBatchNorm, whose running variance takes the
    biased batch variance where torch's takes the unbiased one, n / (n - 1) times it: 16/15
    for the recipe's 16 images, so evaluation would divide by a 3% larger deviation. Under a
    SyncBatchNorm that syncs, these two keep Paddle's. (Every other BN averages thousands of
    values a channel, where the two differ by less than 1e-4; on one GPU PaddleSeg's plain
    BatchNorm2D runs cuDNN's update, which is torch's.)"""

    def __init__(self, channels):
        super().__init__()
        self.pool_bn = nn.BatchNorm2d(channels)
        self.pool_conv = ConvBN(channels, channels, kernel_size=1)
        self.out_conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        pooled = x.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        synced = [(bn, synced_processes(bn)) for bn in (self.pool_bn, self.pool_conv.bn)]
        synced = [(bn, processes) for bn, processes in synced if processes > 1]
        old_vars = [bn.running_var.clone() for bn, _ in synced]
        context = self.pool_conv(self.pool_bn(pooled))
        for (bn, processes), old_var in zip(synced, old_vars):
            # every process holds N images (DDP training's equal batches)
            keep_biased_running_var(bn, old_var, pooled.shape[0] * processes)
        return self.out_conv(context + x)


class SemanticBranch(nn.Module):
    """Narrow and deep. Returns the stem (1/4), stage 3 (1/8), stage 4 (1/16) and
    stage 5 (1/32) features, which feed the auxiliary heads, and the context-embedded
    1/32 features, which feed the BGA."""

    def __init__(self, channels=(16, 32, 64, 128), expand=6):
        super().__init__()
        c1, c3, c4, c5 = channels
        self.stem = StemBlock(3, c1)
        self.stage3 = nn.Sequential(GatherExpandDown(c1, c3, expand), GatherExpand(c3, expand))
        self.stage4 = nn.Sequential(GatherExpandDown(c3, c4, expand), GatherExpand(c4, expand))
        self.stage5 = nn.Sequential(GatherExpandDown(c4, c5, expand),
                                    *[GatherExpand(c5, expand) for _ in range(3)])
        self.context = ContextEmbedding(c5)

    def forward(self, images):
        stem_feat = self.stem(images)
        stage3_feat = self.stage3(stem_feat)
        stage4_feat = self.stage4(stage3_feat)
        stage5_feat = self.stage5(stage4_feat)
        return stem_feat, stage3_feat, stage4_feat, stage5_feat, self.context(stage5_feat)


def bga_aggregate(detail_keep, sem_up, detail_down, sem_keep):
    """The BGA's gating, in plain PyTorch:
        detail_keep * sigmoid(up(sem_up)) + up(detail_down * sigmoid(sem_keep))
    detail_keep (N, C, h, w) at 1/8; sem_up, detail_down, sem_keep (N, C, h', w') at 1/32;
    `up` is bilinear (align_corners=False) to (h, w). `kernels.bga_aggregate` is the fused
    CUDA version of this function."""
    size = detail_keep.shape[-2:]
    sem_gate = torch.sigmoid(F.interpolate(sem_up, size=size, mode="bilinear", align_corners=False))
    detail_gated = detail_down * torch.sigmoid(sem_keep)
    return detail_keep * sem_gate + F.interpolate(detail_gated, size=size, mode="bilinear",
                                                  align_corners=False)


class BGA(nn.Module):
    """Bilateral Guided Aggregation. detail_feat (N, C, H/8, W/8) and semantic_feat
    (N, C, H/32, W/32) -> (N, C, H/8, W/8)."""

    def __init__(self, channels=128):
        super().__init__()
        self.detail_keep_dw = ConvBN(channels, channels, groups=channels, relu=False)
        self.detail_keep_pw = nn.Conv2d(channels, channels, 1)
        self.detail_down_conv = ConvBN(channels, channels, stride=2, relu=False)
        self.sem_keep_dw = ConvBN(channels, channels, groups=channels, relu=False)
        self.sem_keep_pw = nn.Conv2d(channels, channels, 1)
        self.sem_up_conv = ConvBN(channels, channels, relu=False)
        self.out_conv = ConvBN(channels, channels, relu=False)
        self.aggregate = bga_aggregate  # replaceable by the fused kernel

    def forward(self, detail_feat, semantic_feat):
        detail_keep = self.detail_keep_pw(self.detail_keep_dw(detail_feat))            # 1/8
        detail_down = F.avg_pool2d(self.detail_down_conv(detail_feat), 3, stride=2,
                                   padding=1, count_include_pad=False)                # 1/32
        sem_keep = self.sem_keep_pw(self.sem_keep_dw(semantic_feat))                   # 1/32
        sem_up = self.sem_up_conv(semantic_feat)                                       # 1/32
        return self.out_conv(self.aggregate(detail_keep, sem_up, detail_down, sem_keep))


class SegHead(nn.Module):
    """3x3 conv-BN-ReLU, dropout 0.1, 1x1 classifier (with bias)."""

    def __init__(self, in_ch, mid_ch, num_classes, dropout=0.1):
        super().__init__()
        self.conv = ConvBN(in_ch, mid_ch)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(mid_ch, num_classes, 1)

    def forward(self, x):
        return self.classifier(self.dropout(self.conv(x)))


class BiSeNetV2(nn.Module):
    """BiSeNetV2 (PaddleSeg's, lambda = 0.25). See the module docstring for the contract."""

    def __init__(self, num_classes=19, detail_channels=(64, 64, 128),
                 semantic_channels=(16, 32, 64, 128), mid_channels=128):
        super().__init__()
        self.num_classes = num_classes
        self.detail = DetailBranch(detail_channels)
        self.semantic = SemanticBranch(semantic_channels)
        self.bga = BGA(mid_channels)
        self.head = SegHead(mid_channels, mid_channels, num_classes)
        # on the stem, stage 3, stage 4 and stage 5 features
        self.aux_heads = nn.ModuleList(SegHead(c, c, num_classes) for c in semantic_channels)
        self.reset_parameters()

    def reset_parameters(self):
        """PaddleSeg's initialisation: Kaiming-normal conv weights (fan_in, gain sqrt(2)),
        BN weight 1 and bias 0, and conv biases 0 (Paddle's default for a bias)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images):
        detail_feat = self.detail(images)
        stem_feat, stage3_feat, stage4_feat, stage5_feat, semantic_feat = self.semantic(images)
        logits = self.head(self.bga(detail_feat, semantic_feat))                      # 1/8
        if self.training:
            aux_feats = (stem_feat, stage3_feat, stage4_feat, stage5_feat)
            return [logits] + [head(feat) for head, feat in zip(self.aux_heads, aux_feats)]
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------
# Loading weights


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """A .pdparams file is a pickle of {name: numpy.ndarray}. Unpickle only numpy arrays
    and plain containers, so that a hostile file cannot run code."""

    allowed = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _describe(error):
    """'TypeName: first line of the message', for one-line error reports; of torch.load's
    weights-only refusal its reason's first sentence, not its advice to load the file unsafely."""
    message = str(error).strip()
    refusal = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n\s*\n|\s*$)", message, re.S)
    if refusal:
        return f"{type(error).__name__}: {' '.join(refusal.group(1).split())} (torch.load with weights_only=True)"
    lines = message.splitlines()
    return type(error).__name__ + (f": {lines[0]}" if lines else "")


def _fit_problems(missing, unexpected, misshaped, shown=4):
    """['missing: a, b, c, d and 12 more', 'unexpected: ...', 'mis-shaped: ...'] for the kinds
    that have names: a few of each, so that the error stays one readable line."""
    return [f"{kind}: " + ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
            for kind, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if names]


def _nonfinite(state, ours):
    """The keys of `state` whose tensor holds NaN or infinity once cast to the dtype of
    `ours`'s tensor of that key, as loading casts it."""
    return [key for key, value in state.items() if isinstance(value, torch.Tensor) and ours[key].is_floating_point()
            and not torch.isfinite(value.to(ours[key].dtype)).all()]


def _refuse_nonfinite(path, names):
    """ValueError naming the first of the tensors `names` that hold NaN or infinity, and how many."""
    if names:
        raise ValueError(f"{path}: NaN or infinity in {len(names)} tensor{'s' if len(names) > 1 else ''}, "
                         f"the first {names[0]}")


def read_pdparams(path):
    """Reads a PaddleSeg .pdparams into {name: numpy.ndarray}; no Paddle needed."""
    try:
        with open(path, "rb") as f:
            state = _NumpyOnlyUnpickler(f).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such weights file") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable PaddleSeg .pdparams ({_describe(e)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a PaddleSeg .pdparams (a {type(state).__name__}, not a dict)")
    # bookkeeping of Paddle's static names, not a tensor
    return {k: v for k, v in state.items() if k != "StructuredToParameterName@@"}


def paddleseg_names(model):
    """Pairs (paddle_prefix, torch_prefix, kind) for every weighted layer of `model`, where
    kind is 'convbn' (PaddleSeg ConvBN*: conv + BN), 'bn' or 'conv' (with bias)."""
    pairs = []

    def convbn(paddle, ours, depthwise=False):
        pairs.append((paddle + (".depthwise_conv" if depthwise else ""), ours, "convbn"))

    for i in range(len(model.detail.layers)):
        convbn(f"db.convs.{i}", f"detail.layers.{i}")
    convbn("sb.stem.conv", "semantic.stem.conv")
    convbn("sb.stem.left.0", "semantic.stem.conv_reduce")
    convbn("sb.stem.left.1", "semantic.stem.conv_down")
    convbn("sb.stem.fuse", "semantic.stem.fuse")
    for stage, paddle_stage in (("stage3", "stage3"), ("stage4", "stage4"), ("stage5", "stage5_4")):
        for j, layer in enumerate(getattr(model.semantic, stage)):
            paddle, ours = f"sb.{paddle_stage}.{j}", f"semantic.{stage}.{j}"
            if isinstance(layer, GatherExpandDown):
                convbn(f"{paddle}.branch_1.0", f"{ours}.conv")
                convbn(f"{paddle}.branch_1.1", f"{ours}.dw_expand_down", depthwise=True)
                convbn(f"{paddle}.branch_1.2", f"{ours}.dw_expand", depthwise=True)
                convbn(f"{paddle}.branch_1.3", f"{ours}.project")
                convbn(f"{paddle}.branch_2.0", f"{ours}.shortcut_dw", depthwise=True)
                convbn(f"{paddle}.branch_2.1", f"{ours}.shortcut_project")
            else:
                convbn(f"{paddle}.conv.0", f"{ours}.conv")
                convbn(f"{paddle}.conv.1", f"{ours}.dw_expand", depthwise=True)
                convbn(f"{paddle}.conv.2", f"{ours}.project")
    pairs.append(("sb.ce.bn", "semantic.context.pool_bn", "bn"))
    convbn("sb.ce.conv_1x1", "semantic.context.pool_conv")
    pairs.append(("sb.ce.conv_3x3", "semantic.context.out_conv", "conv"))
    convbn("bga.db_branch_keep.0", "bga.detail_keep_dw", depthwise=True)
    pairs.append(("bga.db_branch_keep.1", "bga.detail_keep_pw", "conv"))
    convbn("bga.db_branch_down.0", "bga.detail_down_conv")
    convbn("bga.sb_branch_keep.0", "bga.sem_keep_dw", depthwise=True)
    pairs.append(("bga.sb_branch_keep.1", "bga.sem_keep_pw", "conv"))
    convbn("bga.sb_branch_up", "bga.sem_up_conv")
    convbn("bga.conv", "bga.out_conv")
    heads = [("head", "head")] + [(f"aux_head{i + 1}", f"aux_heads.{i}") for i in range(len(model.aux_heads))]
    for paddle, ours in heads:
        convbn(f"{paddle}.conv_3x3.0", f"{ours}.conv")
        pairs.append((f"{paddle}.conv_1x1", f"{ours}.classifier", "conv"))
    return pairs


def paddleseg_state(model, path):
    """-> (state, problems): the tensors of a PaddleSeg `.pdparams` under `model`'s names, in
    float64, each conv bias that feeds a BatchNorm folded into the BN's running mean
    (BN(conv(x) + b) == BN'(conv(x)) with mean' = mean - b), and a list of what does not fit
    `model` ("missing: ...", "unexpected: ...", "mis-shaped: ..."); a tensor that is missing
    or mis-shaped is absent from state. ValueError naming a tensor of state that is not a
    numeric array, or the first that holds NaN or infinity (by its PaddleSeg name)."""
    import numpy as np  # (the model itself needs only torch)
    paddle_state = read_pdparams(path)
    ours = model.state_dict()
    new_state, used = {}, set()
    missing, misshaped, nonfinite = [], [], []

    def take(paddle_key, torch_key):
        used.add(paddle_key)
        if paddle_key not in paddle_state:
            missing.append(paddle_key)
            return None
        array = paddle_state[paddle_key]
        numpy = isinstance(array, (np.ndarray, np.generic))
        if not (numpy and array.dtype.kind in "biuf"):
            what = f"dtype {array.dtype}" if numpy else f"a {type(array).__name__}"
            raise ValueError(f"{path}: {paddle_key} is not a numeric array ({what})")
        value = torch.as_tensor(array).double()
        if tuple(value.shape) != tuple(ours[torch_key].shape):
            misshaped.append(f"{paddle_key} {tuple(value.shape)} (expected {tuple(ours[torch_key].shape)})")
            return None
        if not torch.isfinite(value.to(ours[torch_key].dtype)).all():
            nonfinite.append(paddle_key)
        return value

    def take_bn(paddle, ours_bn, conv_bias=None):
        for paddle_name, torch_name in (("weight", "weight"), ("bias", "bias"),
                                        ("_mean", "running_mean"), ("_variance", "running_var")):
            value = take(f"{paddle}.{paddle_name}", f"{ours_bn}.{torch_name}")
            if value is not None and torch_name == "running_mean" and conv_bias is not None:
                value = value - conv_bias
            new_state[f"{ours_bn}.{torch_name}"] = value

    for paddle, torch_prefix, kind in paddleseg_names(model):
        if kind == "convbn":
            new_state[f"{torch_prefix}.conv.weight"] = take(f"{paddle}._conv.weight", f"{torch_prefix}.conv.weight")
            conv_bias = None
            if f"{paddle}._conv.bias" in paddle_state:  # PaddleSeg's convs carry a bias by default
                conv_bias = take(f"{paddle}._conv.bias", f"{torch_prefix}.bn.bias")
            take_bn(f"{paddle}._batch_norm", f"{torch_prefix}.bn", conv_bias)
        elif kind == "bn":
            take_bn(paddle, torch_prefix)
        else:
            for name in ("weight", "bias"):
                new_state[f"{torch_prefix}.{name}"] = take(f"{paddle}.{name}", f"{torch_prefix}.{name}")

    unexpected = sorted(set(paddle_state) - used)
    problems = _fit_problems(missing, unexpected, misshaped)
    new_state = {key: value for key, value in new_state.items() if value is not None}
    _refuse_nonfinite(path, nonfinite or _nonfinite(new_state, ours))  # the latter: a folded mean past the dtype
    return new_state, problems


def load_paddleseg(model, path):
    """Loads PaddleSeg BiSeNetV2 weights (`.pdparams`, e.g. PaddleSeg's
    bisenet_cityscapes_1024x1024_160k/model.pdparams) into `model`: PaddleSeg's names mapped
    to ours, conv biases folded (paddleseg_state). Strict: raises ValueError naming the
    missing, unexpected or mis-shaped tensors (a few of each kind, and how many more), and the
    model is left untouched; likewise for a tensor holding NaN or infinity. Returns the model.
    """
    state, problems = paddleseg_state(model, path)
    if problems:
        raise ValueError(f"{path}: not a PaddleSeg BiSeNetV2 with {model.num_classes} classes; "
                         + "; ".join(problems))
    for key, value in model.state_dict().items():
        state[key] = value if key.endswith("num_batches_tracked") else state[key].to(value.dtype)
    model.load_state_dict(state, strict=True)
    return model


def checkpoint_state(path):
    """The model state dict of one of this project's checkpoints (a dict with a 'model'
    state dict, or a bare state dict; read with weights_only=True), DDP's prefix removed."""
    path = str(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such weights file") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({_describe(e)})") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a checkpoint (no model state dict in it)")
    return {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP


def load_weights(model, path):
    """Loads either a PaddleSeg `.pdparams` or one of this project's checkpoints, strictly
    (ValueError for tensors that do not fit or hold NaN or infinity; the model left untouched).
    Returns the model."""
    if str(path).lower().endswith(".pdparams"):
        return load_paddleseg(model, path)
    state = checkpoint_state(path)
    ours = model.state_dict()
    problems = _fit_problems(
        [key for key in ours if key not in state], [key for key in state if key not in ours],
        [f"{key} {tuple(value.shape)} (expected {tuple(ours[key].shape)})" for key, value in state.items()
         if key in ours and isinstance(value, torch.Tensor) and value.shape != ours[key].shape])
    if problems:
        raise ValueError(f"{path}: does not fit BiSeNetV2({model.num_classes}): " + "; ".join(problems))
    _refuse_nonfinite(path, _nonfinite(state, ours))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: does not fit BiSeNetV2({model.num_classes}): "
                         + " ".join(str(e).split())) from None
    return model


def load_matching(model, path):
    """Loads, from a PaddleSeg `.pdparams` or a project checkpoint, every tensor whose name
    and shape match `model`'s and leaves the others as they are: a fine-tune from weights
    trained with another number of classes (only the heads' last convs differ). -> the
    names of `model`'s tensors left as they were. ValueError when no tensor fits, or one that
    fits holds NaN or infinity."""
    ours = model.state_dict()
    state = paddleseg_state(model, path)[0] if str(path).lower().endswith(".pdparams") else checkpoint_state(path)
    fits = {key: value.to(ours[key].dtype) for key, value in state.items()
            if key in ours and isinstance(value, torch.Tensor) and value.shape == ours[key].shape}
    if not any(key.endswith(".weight") for key in fits):
        raise ValueError(f"{path}: no tensor of it fits BiSeNetV2({model.num_classes})")
    _refuse_nonfinite(path, _nonfinite(fits, ours))
    model.load_state_dict(fits, strict=False)
    return sorted(key for key in ours if key not in fits and not key.endswith("num_batches_tracked"))
