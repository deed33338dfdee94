"""Export BiSeNetV2 to ONNX.

    python export.py --weights W --out model.onnx [--size H W] [--dynamic] [--argmax] [--photos] [--opset N]

W is one of this project's checkpoints or a PaddleSeg `.pdparams`. The graph is the eval-mode
model: input `images` (N, 3, H, W) float32, normalised as predict.py does ((rgb / 255 - 0.5)
/ 0.5), or with --photos (N, H, W, 3) uint8 RGB photos, normalised in the graph (a lookup
in a table of those 256 values: the same bits, no pass over the image before the runtime);
output `logits` (N, num_classes, H, W) float32, the main head upsampled to the input, or
with --argmax `train_ids` (N, H, W) uint8. --size is the example input (default 512 1024)
and, without --dynamic, the graph's fixed size with batch 1; --dynamic makes batch, height
and width symbolic, so one export serves every size.

The exporter is torch.export's (`torch.onnx.export(dynamo=True)`, torch's default since 2.9;
it needs `onnxscript`): it records sizes symbolically and keeps the size arithmetic exact,
while the TorchScript exporter is deprecated. It writes opset 18 and above. The model is
exported with the plain-PyTorch BGA (the fused CUDA kernels are never exported). The file
is checked with `onnx.checker` (full check, with shape inference) before it replaces --out.
The classes (names, colours, ignore index: dataset.json's content, from the checkpoint's
config, --dataset, or Cityscapes') go into the model's metadata entry "dataset", where
predict.py finds them.
"""
import copy
import json
import os
import sys
from pathlib import Path

import torch

import data
from bisenetv2 import BiSeNetV2, bga_aggregate, load_weights

MIN_OPSET = 18  # the lowest opset torch.export's ONNX translation writes without conversion


def max_opset():
    import onnx
    return onnx.defs.onnx_opset_version()


class Photos(torch.nn.Module):
    """(N, H, W, 3) uint8 RGB photos -> `model` of their normalised (N, 3, H, W) float32
    images, by data.normalize_photos with the table of data.normalize_table (a Gather in ONNX)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.register_buffer("normalized", data.normalize_table("cpu"))  # (256,) float32

    def forward(self, photos):
        # contiguous NCHW: the exporter's shape guards on the permuted strides would pin the batch
        return self.model(data.normalize_photos(photos, self.normalized).contiguous())


class TrainIds(torch.nn.Module):
    """images -> (N, H, W) uint8 train ids: the argmax of the model's logits over classes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(images).argmax(1).to(torch.uint8)


def export_onnx(model, out, size=(512, 1024), dynamic=False, argmax=False, opset=MIN_OPSET, dataset=None,
                photos=False, log=print):
    """Exports the eval-mode graph of `model` (a BiSeNetV2; a float32 CPU copy is exported,
    with the plain-PyTorch BGA; with `photos` its input is (N, H, W, 3) uint8, normalised in
    the graph) to the ONNX file `out`, with `dataset` (a data.DatasetInfo:
    class names, colours) as dataset.json's content in the metadata entry "dataset"; checks
    it with onnx.checker and only then renames it over `out`. -> Path(out)."""
    import onnx
    model = copy.deepcopy(model).float().cpu().eval()
    if model.bga.aggregate is not bga_aggregate:
        log("the BGA is exported as the plain-PyTorch bga_aggregate, not the fused kernel")
        model.bga.aggregate = bga_aggregate
    graph = TrainIds(model).eval() if argmax else model
    graph = Photos(graph).eval() if photos else graph
    output_name = "train_ids" if argmax else "logits"
    images = torch.zeros(1, *size, 3, dtype=torch.uint8) if photos else torch.zeros(1, 3, *size)
    height_dim, width_dim = (1, 2) if photos else (2, 3)
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim
        dynamic_shapes = ({0: dim("batch"), height_dim: dim("height"), width_dim: dim("width")},)  # the one input's
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        torch.onnx.export(graph, (images,), str(tmp), dynamo=True, opset_version=opset,
                          input_names=["images"], output_names=[output_name],
                          dynamic_shapes=dynamic_shapes, external_data=False, verbose=False)
        if dataset is not None:
            exported = onnx.load(str(tmp))
            exported.metadata_props.add(key="dataset", value=json.dumps(data.dataset_info_json(dataset)))
            onnx.save(exported, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    height, width = ("H", "W") if dynamic else size
    shape = f"{'N' if dynamic else 1} x {height} x {width} x 3 uint8" if photos else \
        f"{'N' if dynamic else 1} x 3 x {height} x {width}"
    log(f"wrote {out}: opset {opset}, images {shape} -> {output_name}, onnx.checker passed")
    return out


def parse_args(argv=None):
    parser = data.OneLineErrors(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="project checkpoint (.pt) or PaddleSeg .pdparams")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"),
                        help="input height and width (the fixed size without --dynamic)")
    parser.add_argument("--dynamic", action="store_true", help="symbolic batch, height and width")
    parser.add_argument("--argmax", action="store_true", help="output uint8 train ids instead of logits")
    parser.add_argument("--photos", action="store_true",
                        help="input (N, H, W, 3) uint8 RGB photos, normalised in the graph, instead of normalised "
                             "(N, 3, H, W) float32 images")
    parser.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset (default {MIN_OPSET})")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="None: as many as the checkpoint's dataset (or --dataset's) has, else 19")
    parser.add_argument("--dataset", help="a data dir (or its dataset.json) whose classes to record in the export; "
                                          "default: the checkpoint's dataset, else Cityscapes'")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    def bad_input(message):
        print(f"export.py: error: {message}", file=sys.stderr)
        return 2

    if min(args.size) < 1:
        return bad_input(f"--size {args.size[0]} {args.size[1]}: height and width must be positive")
    if args.num_classes is not None and not 1 <= args.num_classes <= 255:  # train_ddp.py's range
        return bad_input(f"--num-classes {args.num_classes}: must be in 1..255")
    out = Path(args.out)
    if out.is_dir():
        return bad_input(f"--out {out}: a folder, not the .onnx file to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way
        return bad_input(f"--out {out}: cannot make its folder ({e.strerror or e})")
    if not MIN_OPSET <= args.opset <= max_opset():
        return bad_input(f"--opset {args.opset}: unsupported; the exporter writes opsets "
                         f"{MIN_OPSET} to {max_opset()}")
    try:
        dataset, source = data.dataset_of_weights(args.weights, args.dataset, args.num_classes)
    except data.BadInput as e:
        return bad_input(str(e))
    if args.num_classes not in (None, len(dataset.class_names)):
        return bad_input(f"--num-classes {args.num_classes}, but the dataset has {len(dataset.class_names)} classes")
    model = BiSeNetV2(len(dataset.class_names))
    try:
        load_weights(model, args.weights)
    except (OSError, ValueError) as e:
        return bad_input(f"--weights: {e}")
    print(f"export.py: classes: {len(dataset.class_names)} from {source}", file=sys.stderr)
    try:  # the export goes to a temporary file first: a failed write leaves --out as it was
        export_onnx(model, out, tuple(args.size), args.dynamic, args.argmax, args.opset, dataset, args.photos,
                    log=lambda line: print(f"export.py: {line}", file=sys.stderr))
    except OSError as e:  # a full disk, no permission
        return bad_input(f"--out {out}: cannot write it ({e.strerror or e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
