"""Segment images with BiSeNetV2, and the fast inference path.

    python predict.py --weights W --input IMG_OR_DIR --out DIR [--overlay] [--label-ids DIR] [--batch-size N]
                      [--compile] [--cuda-graph] [--slide H W [--stride H W]] [--flip] [--scales S ...]

W is one of this project's checkpoints (train_ddp.py's iter_N.pt / best.pt), a PaddleSeg
`.pdparams` (e.g. bisenet_cityscapes_1024x1024_160k/model.pdparams) or an ONNX export
(export.py's `.onnx`, run with onnxruntime). For every image NAME.ext it writes
NAME_trainIds.png (uint8 train ids, the input's size) and NAME_color.png (the
dataset's colours: Cityscapes', or those of the dataset.json the checkpoint was trained
with or --dataset names); --overlay adds NAME_overlay.png, the palette blended over the photo.
--label-ids DIR also writes DIR/NAME.png, Cityscapes' label ids, one PNG a frame as the
official evaluator and the test server take them (training's --pred-dir writes the same).
A folder is searched recursively (except --out and --label-ids, when inside) and its
sub-folders are mirrored under --out; two images whose outputs would share a name (street.png and
street.jpg in one folder) stop the run before any work, naming both. Consecutive images of
one size go through the model together, up to --batch-size at a time, while threads read
the next images and write the last outputs. Images are read as
in training (data.read_photo: 8-bit as RGB, 16-bit greyscale by its top 8 bits, float
refused); preprocessing is PaddleSeg's: RGB, / 255, mean 0.5, std 0.5.

PyTorch weights run on CUDA when available, in bf16 (BatchNorm folded into the convs, then
model and activations in bf16; --fp32 keeps float32) and channels_last; --compile adds
torch.compile, --cuda-graph replays a CUDA graph per input shape. On the CPU: float32,
eager. --slide H W segments each image window by window (every --stride, default half a
window), the logits of overlapping windows averaged, as PaddleSeg's slide_inference.
--flip and --scales 0.75 1.0 1.25 average the logits of the flipped image and of each scale
at the image's size, as PaddleSeg's aug_pred (the same function as training's evaluation).
`.onnx` weights run on onnxruntime's CUDA provider when the installed onnxruntime has one
(not with --device cpu), else on its CPU provider. An unreadable image, or one that does not fit
a fixed-size export, or a folder that cannot be listed, is reported and skipped; the exit code is
then 1. Bad weights or arguments (a --device that is not here or not cpu or cuda, an --out that
is a file): one line and exit code 2.
"""
import collections
import copy
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
from bisenetv2 import BiSeNetV2, ConvBN, load_weights

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def preprocess(photos):
    """PIL images of one size -> (N, 3, H, W) float32, normalised (in torch's threads, on
    the uint8 image made NCHW first); each made RGB by predict.py's and training's rule
    (data.photo_array: 16-bit greyscale by its top 8 bits), ValueError naming one it refuses."""
    try:
        rgb = [data.photo_array(photo, getattr(photo, "filename", "") or f"photos[{i}]")
               for i, photo in enumerate(photos)]
    except data.BadInput as e:
        raise ValueError(str(e)) from None
    rgb = torch.from_numpy(np.stack(rgb))  # (N, H, W, 3) uint8
    return data.normalize(rgb.permute(0, 3, 1, 2).contiguous().float())


# ---------------------------------------------------------------------------------------
# The fast PyTorch inference path


def fold_batchnorm(model):
    """An eval-mode copy of `model` with every ConvBN's BatchNorm folded into its conv
    (weight * gamma / sqrt(var + eps), bias beta - mean * gamma / sqrt(var + eps)): the
    same function, one pass over memory fewer per layer, and no BN statistics to round
    when the copy is cast to bf16."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, ConvBN):
            module.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = torch.nn.Identity()
    return model


AUTOTUNED_SIZES = 2  # cudnn.benchmark autotunes each new input size; past this many it is turned off


def past_autotuned_sizes(sizes, size):
    """cudnn.benchmark autotunes every new input size (seconds each, and memory): `size` (H, W)
    joins `sizes`, the ones it autotuned for; past AUTOTUNED_SIZES of them it is turned off.
    -> True when this call turned it off (the caller says so)."""
    if not torch.backends.cudnn.benchmark or size in sizes:
        return False
    sizes.add(size)
    if len(sizes) <= AUTOTUNED_SIZES:
        return False
    torch.backends.cudnn.benchmark = False
    return True


class Predictor:
    """The fast inference path for an eval-mode BiSeNetV2:
    images (N, 3, H, W) float32, normalised (preprocess), or (N, H, W, 3) uint8 RGB photos
    (normalised on `device` by a table of data.normalize's 256 values: the same bits, a quarter
    of the bytes to copy there and no pass over them on the host), on any device -> on
    `device`, either (N, H, W) uint8 train ids (output='train_ids', the argmax in the same
    graph) or the (N, C, H, W) logits in `dtype` (output='logits').

    dtype          torch.float32: the model as given (on CUDA, cuDNN may use TF32);
                   torch.bfloat16: BatchNorm folded into the convs in float32, then weights
                   and activations in bf16
    channels_last  model and input in channels_last (NHWC) memory format
    compile        torch.compile, shape-specialised: each new input shape compiles again
                   (past torch._dynamo's recompile limit, 8, torch warns and runs eagerly)
    cuda_graph     CUDA only: the first call at an input shape (and dtype) warms up on a
                   side stream and captures one CUDA graph, later calls at that shape copy
                   the input in and replay it; a new shape recaptures (and is logged). The
                   returned tensor is then the graph's output buffer, overwritten by the
                   next call: clone it to keep it.
    On CUDA it turns on torch.backends.cudnn.benchmark (a process-wide setting), which
    autotunes every new input size (seconds each): past AUTOTUNED_SIZES sizes (a folder of
    photos of many sizes) it turns it off again, logged, as training's evaluation does.
    """

    def __init__(self, model, device, dtype=torch.float32, channels_last=False, compile=False,
                 cuda_graph=False, output="train_ids", log=print):
        device = torch.device(device)
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, not {device}")
        if output not in ("train_ids", "logits"):
            raise ValueError(f"output must be 'train_ids' or 'logits', not {output!r}")
        model = fold_batchnorm(model) if dtype == torch.bfloat16 else copy.deepcopy(model).eval()
        self.model = model.to(device=device, dtype=dtype)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.device, self.dtype, self.output, self.log = device, dtype, output, log
        self.normalized = data.normalize_table(device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one input shape at a time: autotune each once
        self.forward = torch.compile(self.eager_forward, dynamic=False) if compile else self.eager_forward
        self.cuda_graph = cuda_graph
        self.graph = None  # (input shape and dtype, static input, CUDAGraph, static output)
        self.sizes = set()  # the input sizes (H, W) cudnn.benchmark autotuned for

    def prepare(self, images):
        """-> images on the device, float32 and normalised (a uint8 (N, H, W, 3) batch: by
        the table, into (N, 3, H, W) with channels_last strides)."""
        if images.dtype != torch.uint8:
            return images.to(self.device)
        try:
            return data.normalize_photos(images, self.normalized)
        except ValueError as e:
            raise ValueError(f"Predictor: {e}") from None

    def eager_forward(self, images):
        images = self.prepare(images).to(self.dtype, memory_format=self.memory_format)
        logits = self.model(images)
        return logits.argmax(1).to(torch.uint8) if self.output == "train_ids" else logits

    @torch.no_grad()
    def __call__(self, images):
        size = images.shape[1:3] if images.dtype == torch.uint8 else images.shape[-2:]  # (N, H, W, 3) or (N, 3, H, W)
        if past_autotuned_sizes(self.sizes, size):
            self.log(f"predictor: {len(self.sizes)} input sizes ({size[0]}x{size[1]} the last): cudnn.benchmark "
                     "off (it autotunes every new size, seconds each)")
        if not self.cuda_graph:
            return self.forward(images)
        with torch.cuda.device(self.device):  # capture and replay use the current device's stream: this one's
            key = (tuple(images.shape), images.dtype)
            if self.graph is None or self.graph[0] != key:
                self.graph = None  # free the old graph's memory before capturing the new one
                self.graph = self.capture(images, key)
            _, static_images, graph, static_output = self.graph
            static_images.copy_(images, non_blocking=True)
            graph.replay()
        return static_output

    def capture(self, images, key):
        self.log(f"predictor: capturing a CUDA graph for input {key[0]} {key[1]}")
        static_images = images.to(self.device, copy=True)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # cuDNN autotuning, compilation and lazy init, outside the capture
            for _ in range(3):
                self.forward(static_images)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.forward(static_images)
        return key, static_images, graph, static_output


class OnnxPredictor:
    """An ONNX export (export.py) run by onnxruntime: images (N, 3, H, W) float32, normalised,
    or (N, H, W, 3) uint8 RGB photos (normalised here, or by the graph of an export with
    --photos, which takes photos only) -> (N, H, W) uint8 train ids as a numpy array, whether
    the graph outputs logits or train ids.
    `fixed_size` is the graph's (H, W), None when symbolic; `batch` is its fixed batch
    size, None when symbolic; `num_classes` is the number of classes it predicts: its logits'
    channels, or for an export of train ids (--argmax) the classes its metadata records
    (export.py), None when it records none. device None: onnxruntime's CUDA provider when it
    has one, else the CPU (the log line names the provider); a CUDA device requires the CUDA
    provider. Raises ValueError when the file is not a readable export, or when `num_classes`
    is given and the export's number is known and another."""

    def __init__(self, path, device=None, log=print, num_classes=None):
        import onnxruntime
        available = onnxruntime.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device is not None and device.type == "cuda" and "CUDAExecutionProvider" not in available:
            raise ValueError(f"{path}: --device {device}: this onnxruntime has no CUDA provider "
                             f"(it has {', '.join(available)})")
        if (device is None or device.type == "cuda") and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        if not Path(path).is_file():
            raise ValueError(f"{path}: no such ONNX file")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=providers)
        except Exception as e:  # onnxruntime raises its own types for unreadable models
            raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs) != 1 \
                or len(outputs[0].shape) not in (3, 4):
            raise ValueError(f"{path}: not a BiSeNetV2 export (one 4-d input, one output of train "
                             f"ids or logits)")
        self.input_name = inputs[0].name
        self.takes_photos = inputs[0].type == "tensor(uint8)"  # export.py --photos: (N, H, W, 3) uint8
        if self.takes_photos:
            batch, height, width, channels = inputs[0].shape  # ints, or names where symbolic
            if channels != 3:
                raise ValueError(f"{path}: not a BiSeNetV2 export (a uint8 input must be (N, H, W, 3) photos)")
        else:
            batch, _, height, width = inputs[0].shape
        self.batch = batch if isinstance(batch, int) else None
        self.fixed_size = (height, width) if isinstance(height, int) and isinstance(width, int) else None
        self.outputs_logits = len(outputs[0].shape) == 4
        classes = outputs[0].shape[1] if self.outputs_logits else None  # an int, or a name where symbolic
        self.num_classes = classes if isinstance(classes, int) else self.recorded_classes(path)
        if None not in (num_classes, self.num_classes) and num_classes != self.num_classes:
            raise ValueError(f"{path}: an export of {self.num_classes} classes, not {num_classes}")
        self.normalized = data.normalize_table("cpu")  # for uint8 photos to a float export
        log(f"predictor: onnxruntime {onnxruntime.__version__} on {self.session.get_providers()[0]}, "
            f"input {inputs[0].shape}, output {outputs[0].name} {outputs[0].shape}")

    def recorded_classes(self, path):
        """-> the number of classes the export's metadata entry "dataset" names, None without one."""
        saved = self.session.get_modelmeta().custom_metadata_map.get("dataset")
        if not saved:
            return None
        try:
            recorded = data.dataset_info_from_json(json.loads(saved), f"{path}: its metadata entry 'dataset'")
        except json.JSONDecodeError:
            raise ValueError(f"{path}: its metadata entry 'dataset' is not JSON") from None
        except data.BadInput as e:
            raise ValueError(str(e)) from None
        return len(recorded.class_names)

    def __call__(self, images):
        if self.takes_photos:
            if images.dtype != torch.uint8:
                raise ValueError(f"this export (--photos) takes (N, H, W, 3) uint8 RGB photos, not {images.dtype}")
            images = np.ascontiguousarray(np.asarray(images))
        else:
            if images.dtype == torch.uint8:
                images = data.normalize_photos(images, self.normalized)
            images = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
        output = self.session.run(None, {self.input_name: images})[0]
        return output.argmax(1).astype(np.uint8) if self.outputs_logits else output.astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Timing the inference paths (for the benchmark; no test times anything)

INFERENCE_ROWS = (  # label, Predictor settings
    ("fp32 eager, NCHW", dict(dtype=torch.float32)),
    ("bf16 channels_last", dict(dtype=torch.bfloat16, channels_last=True)),
    ("bf16 channels_last compiled", dict(dtype=torch.bfloat16, channels_last=True, compile=True)),
    ("bf16 channels_last CUDA graph", dict(dtype=torch.bfloat16, channels_last=True, cuda_graph=True)),
    ("bf16 channels_last compiled + CUDA graph",
     dict(dtype=torch.bfloat16, channels_last=True, compile=True, cuda_graph=True)),
)


def slide_windows(height, width, window, stride=None):
    """PaddleSeg's slide_inference grid over an (height, width) image: windows of `window`
    (H, W) every `stride` (H, W; None: half the window), the last row and column moved back
    to end at the border (clipped to the image when it is smaller). -> [(top, bottom, left, right)].
    ValueError for a stride longer than the window: the pixels between windows would get no
    prediction (PaddleSeg's slide_inference raises likewise)."""
    stride = stride or [max(1, side // 2) for side in window]
    if stride[0] > window[0] or stride[1] > window[1]:
        raise ValueError(f"stride {tuple(stride)} is longer than the window {tuple(window)}: "
                         "the pixels between windows would get no prediction")
    def starts(size, win, step):
        count = 1 if size <= win else math.ceil((size - win) / step) + 1
        return [(max(min(i * step + win, size) - win, 0), min(i * step + win, size)) for i in range(count)]
    return [(top, bottom, left, right) for top, bottom in starts(height, window[0], stride[0])
            for left, right in starts(width, window[1], stride[1])]


def slide_logits(logits_fn, images, window, stride=None):
    """Sliding-window inference: logits_fn (images (N, 3, h, w) -> logits (N, C, h, w)) on
    each window of images (N, 3, H, W); each pixel's logits summed over the windows that
    cover it, divided by their count, in float32 (PaddleSeg's slide_inference). -> (N, C, H, W)."""
    height, width = images.shape[-2:]
    total = count = None
    for top, bottom, left, right in slide_windows(height, width, window, stride):
        logits = logits_fn(images[:, :, top:bottom, left:right]).float()
        if total is None:
            total = logits.new_zeros(logits.shape[:2] + (height, width))
            count = logits.new_zeros(1, 1, height, width)
        total[:, :, top:bottom, left:right] += logits
        count[:, :, top:bottom, left:right] += 1
    return total / count


def infer(model, image, scales, flip, slide=None, stride=None):
    """PaddleSeg's aug_inference (2.8 onward): the logits of each scale (and flip), resized
    to the input size, averaged; plain logits when there is a single scale 1.0 and no flip
    (PaddleSeg 2.7 and before summed softmaxes). With slide (H, W) every forward pass is a sliding-window one (slide_logits; stride None: half a window). Training's
    evaluation and predict.py's --flip, --scales and --slide."""
    height, width = image.shape[-2:]
    if slide:
        whole_model = model
        model = lambda images: slide_logits(whole_model, images, slide, stride)  # noqa: E731
    if list(scales) == [1.0] and not flip:
        return model(image)
    total = 0
    for scale in scales:
        size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))  # PaddleSeg's rounding
        scaled = image if size == (height, width) else F.interpolate(image, size=size, mode="bilinear",
                                                                      align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            logits = model(scaled.flip(-1) if flipped else scaled)
            logits = logits.flip(-1) if flipped else logits
            logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
            total = total + logits
    return total / (len(scales) * (2 if flip else 1))


def inference_fps(run, images, iters=50, warmup=10):
    """-> images/s of run(images) over `iters` calls after `warmup` calls (compilation, cuDNN
    autotuning and graph capture happen there). With `images` a CUDA tensor, timed with CUDA
    events around the measured calls (launch gaps included); otherwise by the host clock."""
    for _ in range(warmup):
        run(images)
    if isinstance(images, torch.Tensor) and images.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            run(images)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        begin = time.perf_counter()
        for _ in range(iters):
            run(images)
        seconds = time.perf_counter() - begin
    return iters * images.shape[0] / seconds


def inference_table(model, device, sizes=((1024, 2048), (512, 1024)), batch=1, iters=50, warmup=10,
                    onnx_iters=3, log=print):
    """-> a markdown table of images/s of the eval-mode logits at each (H, W) in `sizes`,
    `batch` images per call: every INFERENCE_ROWS path on `device` (on a CPU only fp32
    eager runs, the others are noted as needing CUDA), then onnxruntime on the CPU (one
    --dynamic export of `model`, `onnx_iters` calls after one warm-up)."""
    import tempfile
    from export import export_onnx
    device = torch.device(device)
    sizes_head = " | ".join(f"{h}x{w} images/s | ms/batch" for h, w in sizes)
    lines = [f"| inference, batch {batch}, eval-mode logits | {sizes_head} | note |",
             "| --- |" + " ---: | ---: |" * len(sizes) + " --- |"]

    def row(label, measure):  # measure(size) -> images/s
        cells, note = [], ""
        for size in sizes:
            try:
                fps = measure(size)
                cells += [f"{fps:.1f}", f"{1000 * batch / fps:.2f}"]
            except RuntimeError as e:
                cells += ["-", "-"]
                note = f"failed: {' '.join(str(e).split())[:160]}"
        lines.append(f"| {label} | {' | '.join(cells)} | {note} |")

    for label, settings in INFERENCE_ROWS:
        if device.type != "cuda" and settings != dict(dtype=torch.float32):
            lines.append(f"| {label} |" + " - | - |" * len(sizes) + " needs CUDA |")
            continue
        log(f"inference_table: {label}")
        predictor = Predictor(model, device, output="logits", log=log, **settings)
        row(label, lambda size: inference_fps(predictor, torch.randn(batch, 3, *size, device=device),
                                              iters, warmup))
        predictor = None  # released before empty_cache (the row's lambda has run)
        if settings.get("compile"):
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as folder:
        log("inference_table: onnxruntime on the CPU")
        runner = OnnxPredictor(export_onnx(model, Path(folder) / "model.onnx", sizes[0], dynamic=True, log=log),
                               log=log)
        run = lambda images: runner.session.run(None, {runner.input_name: images})
        row("onnxruntime CPU, fp32", lambda size: inference_fps(
            run, np.random.randn(batch, 3, *size).astype(np.float32), onnx_iters, warmup=1))
    return "\n".join(lines) + "\n"


def find_images(input_path, *out_dirs):
    """-> (images, unreadable): images a list of (image path, output stem relative to --out),
    nothing under any of `out_dirs` (when --out or --label-ids is inside --input, this tool's
    own outputs are never inputs); unreadable the (folder, OSError) of each folder that could
    not be listed (data.walk_files: Path.rglob skipped them silently)."""
    if input_path.is_file():
        return [(input_path, Path(input_path.stem))], []
    out_dirs = [out_dir.resolve() for out_dir in out_dirs]

    def outside(path):
        return not any(path.resolve().is_relative_to(out_dir) for out_dir in out_dirs)

    unreadable = []
    files = data.walk_files(input_path, lambda error: unreadable.append((error.filename, error)),
                            outside)  # (the outputs are not walked)
    files = sorted(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and outside(p))
    return [(p, p.relative_to(input_path).with_suffix("")) for p in files], unreadable


def label_path(label_dir, stem):
    """--label-ids' file for an image's output stem: DIR/STEM.png (the image's name and folder)."""
    return label_dir / stem.parent / f"{stem.name}.png"


def same_output(images):
    """-> two image paths that would write the same outputs (street.png and street.jpg in
    one folder), or None."""
    seen = {}
    for path, stem in images:
        if stem in seen:
            return seen[stem], path
        seen[stem] = path
    return None


def parse_args(argv=None):
    parser = data.OneLineErrors(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True,
                        help="project checkpoint (.pt), PaddleSeg .pdparams or ONNX export (.onnx)")
    parser.add_argument("--input", required=True, help="an image or a folder of images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overlay", action="store_true", help="also write NAME_overlay.png")
    parser.add_argument("--label-ids", metavar="DIR",
                        help="also write each prediction as Cityscapes' label ids to DIR/NAME.png, mirrored as --out: "
                             "one PNG a frame, as the official evaluator and the test server take them (Cityscapes' "
                             "classes only)")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay: weight of the palette, 0 to 1")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="None: as many as --dataset's or the checkpoint's dataset has, else 19")
    parser.add_argument("--dataset", help="a data dir (or its dataset.json) whose classes' colours to draw; "
                                          "default: the checkpoint's dataset, else Cityscapes'")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=1, help="images of one size per forward pass")
    parser.add_argument("--fp32", action="store_true", help="float32 on CUDA (default bf16)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--cuda-graph", action="store_true", help="replay a CUDA graph per input shape")
    parser.add_argument("--slide", type=int, nargs=2, metavar=("H", "W"),
                        help="sliding-window inference with windows of H x W (PaddleSeg's slide_inference)")
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"),
                        help="--slide: the windows' step, at most the window (default: half the window)")
    parser.add_argument("--flip", action="store_true",
                        help="add the horizontally flipped image's prediction (logits averaged, PaddleSeg's aug_pred)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                        help="predict at these scales of the image, logits averaged at its size (PaddleSeg's aug_pred)")
    return parser.parse_args(argv)


def load_runner(args, num_classes, device, log):
    """-> (run, fixed_size, most_per_call): run maps (N, H, W, 3) uint8 RGB photos to (N, H, W)
    uint8 train ids (numpy); fixed_size is the (H, W) every image must have, or None. Raises
    OSError or ValueError for unreadable weights, or weights of another number of classes."""
    if args.weights.lower().endswith(".onnx"):
        runner = OnnxPredictor(args.weights, None if args.device == "auto" else device, log, num_classes)
        if runner.num_classes is None:
            log(f"the export records no number of classes (train ids, no metadata): its ids are taken as "
                f"{num_classes} classes, unchecked")
        most = min(runner.batch or args.batch_size, args.batch_size)
        if most < args.batch_size:
            log(f"the export's batch size is fixed at {runner.batch}: images go {most} at a time")
        return runner, runner.fixed_size, most
    model = load_weights(BiSeNetV2(num_classes), args.weights)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda and not args.fp32 else torch.float32
    predictor = Predictor(model, device, dtype, channels_last=cuda, compile=args.compile,
                          cuda_graph=args.cuda_graph, log=log)
    log(f"PyTorch on {device}: {str(dtype).removeprefix('torch.')}, "
        f"{'channels_last, cudnn.benchmark' if cuda else 'NCHW'}"
        f"{', compiled' if args.compile else ''}{', CUDA graphs' if args.cuda_graph else ''}")
    augmented = args.flip or args.scales != [1.0]
    if not (args.slide or augmented):
        return (lambda images: predictor(images).cpu().numpy()), None, args.batch_size
    predictor.output = "logits"
    if args.slide:
        log(f"sliding windows of {args.slide[0]}x{args.slide[1]} every "
            + (f"{args.stride[0]}x{args.stride[1]}" if args.stride else "half a window"))
    if augmented:
        log(f"logits averaged over scales {' '.join(map(str, args.scales))}" + (", each flipped too" if args.flip else ""))
    return (lambda images: infer(predictor, predictor.prepare(images), args.scales, args.flip, args.slide,
                                 args.stride).argmax(1).to(torch.uint8).cpu().numpy()), None, args.batch_size


def read_ahead(pool, fn, items, ahead):
    """fn(item) for each item in order, each computed in `pool` while the `ahead` before it
    are consumed (a bounded read-ahead: Executor.map would start them all at once)."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def read_photo(path):
    """-> the image as an (H, W, 3) uint8 RGB array, by training's rule (data.read_photo:
    16-bit greyscale by its top 8 bits); OSError naming the file and why it is refused."""
    try:
        return data.read_photo(path)
    except data.BadInput as e:
        raise OSError(str(e)) from None


def main(argv=None):
    args = parse_args(argv)
    log = lambda line: print(f"predict.py: {line}", file=sys.stderr)

    def bad_input(message):
        print(f"predict.py: error: {message}", file=sys.stderr)
        return 2

    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                              else args.device)
    except RuntimeError:
        return bad_input(f"--device {args.device}: not a device (auto, cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):  # (mps, xpu, meta: not a path this runs, nor onnxruntime's)
        return bad_input(f"--device {args.device}: not a device predict.py runs on (auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        return bad_input(f"--device {args.device}: no CUDA device here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return bad_input(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    input_path, out_dir = Path(args.input), Path(args.out)
    if args.batch_size < 1:
        return bad_input(f"--batch-size {args.batch_size}: must be positive")
    if args.num_classes is not None and not 1 <= args.num_classes <= 255:  # train_ddp.py's range
        return bad_input(f"--num-classes {args.num_classes}: must be in 1..255")
    if not 0 <= args.alpha <= 1:  # (NaN fails it too)
        return bad_input(f"--alpha {args.alpha}: must be between 0 and 1")
    if not all(math.isfinite(scale) and scale > 0 for scale in args.scales):
        return bad_input(f"--scales {' '.join(map(str, args.scales))}: each must be finite and positive")
    if args.cuda_graph and len(set(args.scales)) > 1:  # one graph is kept: each call would capture again
        return bad_input("--cuda-graph keeps one graph per input size; --scales needs one per scale")
    if args.cuda_graph and device.type != "cuda":
        return bad_input(f"--cuda-graph needs a CUDA device, not {device}")
    if args.weights.lower().endswith(".onnx") and (args.compile or args.cuda_graph or args.fp32 or args.slide
                                                   or args.flip or args.scales != [1.0]):
        return bad_input("--compile, --cuda-graph, --fp32, --slide, --flip and --scales are for PyTorch weights, "
                         "not an .onnx")
    for flag, size in (("--slide", args.slide), ("--stride", args.stride)):
        if size is not None and min(size) < 1:
            return bad_input(f"{flag} {size[0]} {size[1]}: must be positive")
    if args.stride and not args.slide:
        return bad_input("--stride needs --slide")
    if args.stride and (args.stride[0] > args.slide[0] or args.stride[1] > args.slide[1]):
        return bad_input(f"--stride {args.stride[0]} {args.stride[1]}: longer than --slide {args.slide[0]} "
                         f"{args.slide[1]}, the pixels between windows would get no prediction")
    if not input_path.exists():
        return bad_input(f"--input {input_path}: no such file or folder")
    label_dir = Path(args.label_ids) if args.label_ids else None
    if label_dir and out_dir.resolve().is_relative_to(label_dir.resolve()):
        return bad_input(f"--label-ids {label_dir}: holds --out {out_dir}; the evaluator takes one PNG a frame "
                         "in it")
    for flag, folder in (("--out", out_dir), ("--label-ids", label_dir)) if input_path.is_dir() else ():
        if folder and input_path.resolve().is_relative_to(folder.resolve()):
            return bad_input(f"{flag} {folder}: is --input {input_path} or holds it, and no file under it is read "
                             "as input (a rerun would read the outputs); choose a folder apart or inside --input")
        if folder and folder.resolve().is_relative_to(input_path.resolve()):
            log(f"{flag} {folder} is inside --input: the files under it are not read")
    images, unreadable = find_images(input_path, out_dir, *([label_dir] if label_dir else []))
    unread = [f"{folder} cannot be read ({error.strerror or error})" for folder, error in unreadable]
    if not images:
        return bad_input(f"--input {input_path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it"
                         + (f"; {unread[0]}" if unread else ""))
    for line in unread:
        log(f"skipping a folder: {line}")
    for image_path, stem in images if label_dir else ():
        if label_path(label_dir, stem).resolve() == image_path.resolve():
            return bad_input(f"--label-ids {label_dir}: would overwrite the input {image_path}")
    if clash := same_output(images):
        return bad_input(f"{clash[0]} and {clash[1]} would write the same outputs "
                         f"({clash[0].with_suffix('').name}_trainIds.png); rename one")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way
        return bad_input(f"--out {out_dir}: not a folder this can write to ({e.strerror})")
    try:
        dataset, source = data.dataset_of_weights(args.weights, args.dataset, args.num_classes)
        num_classes = len(dataset.class_names)
        if args.num_classes not in (None, num_classes):
            names = ", ".join(dataset.class_names[:4]) + (", ..." if num_classes > 4 else "")
            return bad_input(f"--num-classes {args.num_classes}, but the dataset has {num_classes} classes "
                             f"({names})")
        run, fixed_size, most_per_call = load_runner(args, num_classes, device, log)
    except data.BadInput as e:
        return bad_input(str(e))
    except (OSError, ValueError) as e:
        return bad_input(f"--weights: {e}")
    log(f"classes: {num_classes} from {source}")
    if label_dir and dataset.label_ids is None:
        return bad_input(f"--label-ids: the classes from {source} have no Cityscapes label ids")
    try:
        if label_dir:
            label_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way
        return bad_input(f"--label-ids {label_dir}: not a folder this can write to ({e.strerror})")
    palette = data.dataset_palette(dataset)
    label_ids = np.array(dataset.label_ids or (), np.uint8)  # train id -> Cityscapes label id
    log(f"{len(images)} image(s) -> {out_dir}")

    failed, done = 0, 0
    start = time.perf_counter()

    def save(array, path, flag="--out", **png):  # a rerun's file replaced whole or not at all (a full disk: BadInput)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data.save_png(array, path, **png)
        except OSError as e:
            raise data.BadInput(f"{flag}: cannot write {path} ({e.strerror or e})") from None

    def write_outputs(ids, target, photo):  # in a thread of the pool
        save(ids, target.with_name(f"{target.name}_trainIds.png"))
        if label_dir:
            save(label_ids[ids], label_path(label_dir, target.relative_to(out_dir)), flag="--label-ids")
        color = np.take(palette, ids, axis=0)  # (H, W, 3); palette[ids] takes 3x as long
        save(color, target.with_name(f"{target.name}_color.png"))
        if args.overlay:
            # (1 - alpha) photo + alpha color in float32, in place (5x faster than float64's
            # temporaries), rounded: a convex blend of 0..255 needs no clip
            blend = np.multiply(photo, np.float32(1 - args.alpha), dtype=np.float32)
            blend += np.multiply(color, np.float32(args.alpha), dtype=np.float32)
            # photo-like: zlib's fastest level, or its encoding bounds the run (4x the time for 20% less)
            save(np.rint(blend, out=blend).astype(np.uint8), target.with_name(f"{target.name}_overlay.png"),
                 compress_level=1)

    # decoding the images and encoding the PNGs take longer than a GPU's forward pass: threads
    # of a pool read ahead and write behind (PIL and zlib release the GIL), in bounded numbers
    threads = min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="predict-io")
    writes = collections.deque()

    def write(batch):  # batch: [(path, stem, photo)], photos of one size
        nonlocal done
        train_ids = run(torch.from_numpy(np.stack([photo for _, _, photo in batch])))  # (N, H, W) uint8
        for (image_path, stem, photo), ids in zip(batch, train_ids):
            writes.append(pool.submit(write_outputs, ids, out_dir / stem, photo))
            done += 1
            if len(images) > 1:
                elapsed = time.perf_counter() - start
                print(f"[{done + failed}/{len(images)}] {image_path.name}  {elapsed / done:.2f} s/image",
                      file=sys.stderr)
        while len(writes) > 2 * threads:  # a failed write raises here (BadInput)
            writes.popleft().result()

    def read(path):  # -> the photo, or the OSError that refuses it
        try:
            return read_photo(path)
        except OSError as e:
            return e

    batch = []
    try:
        for (image_path, stem), photo in zip(images, read_ahead(pool, read, [path for path, _ in images], threads)):
            if isinstance(photo, OSError):
                log(f"skipping {photo}")
                failed += 1
                continue
            if fixed_size is not None and photo.shape[:2] != tuple(fixed_size):
                log(f"skipping {image_path}: {photo.shape[0]}x{photo.shape[1]}, but the export's input is fixed at "
                    f"{fixed_size[0]}x{fixed_size[1]} (export with --dynamic for any size)")
                failed += 1
                continue
            if batch and (batch[0][2].shape != photo.shape or len(batch) == most_per_call):
                write(batch)
                batch = []
            batch.append((image_path, stem, photo))
        if batch:
            write(batch)
        while writes:
            writes.popleft().result()
    except data.BadInput as e:  # no room for the outputs: every later image would fail alike
        return bad_input(str(e))
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure, the writes not started are dropped
    if unreadable:
        log(f"{len(unreadable)} folder(s) not read: their images were not segmented")
    if failed:
        log(f"{failed} of {len(images)} image(s) skipped")
    return 1 if failed or unreadable else 0


if __name__ == "__main__":
    sys.exit(main())
