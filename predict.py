"""Segment images with BiSeNetV2.

    python predict.py --weights W --input IMG_OR_DIR --out DIR [--overlay]

W is one of this project's checkpoints (train_ddp.py's iter_N.pt / best.pt) or a PaddleSeg
`.pdparams` (e.g. bisenet_cityscapes_1024x1024_160k/model.pdparams). For every image NAME.ext
it writes NAME_trainIds.png (uint8 Cityscapes train ids, the input's size) and NAME_color.png
(Cityscapes palette); --overlay adds NAME_overlay.png, the palette blended over the photo.
A folder is searched recursively and its sub-folders are mirrored under --out.
Preprocessing is PaddleSeg's: RGB, / 255, mean 0.5, std 0.5. CUDA with bf16 autocast when
available, else CPU in float32. An unreadable image is reported and skipped; the exit code is
then 1.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bisenetv2 import BiSeNetV2, load_weights

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def cityscapes_palette(num_classes=19):
    """(256, 3) uint8: train id -> Cityscapes colour; 255 (ignore) and unknown ids black."""
    from cityscapesscripts.helpers.labels import trainId2label
    palette = np.zeros((256, 3), np.uint8)
    for train_id in range(num_classes):
        if train_id in trainId2label:
            palette[train_id] = trainId2label[train_id].color
    return palette


def preprocess(image):
    """PIL image -> (1, 3, H, W) float32, PaddleSeg's normalisation: (rgb / 255 - 0.5) / 0.5."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy((rgb / 255.0 - 0.5) / 0.5).permute(2, 0, 1)[None].contiguous()


@torch.no_grad()
def predict_train_ids(model, image, device, bf16):
    """-> (H, W) uint8 numpy array of train ids, the argmax of the model's logits."""
    images = preprocess(image).to(device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(images)
    return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


def find_images(input_path):
    """-> list of (image path, output stem relative to --out)."""
    if input_path.is_file():
        return [(input_path, Path(input_path.stem))]
    files = sorted(p for p in input_path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p, p.relative_to(input_path).with_suffix("")) for p in files]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="project checkpoint (.pt) or PaddleSeg .pdparams")
    parser.add_argument("--input", required=True, help="an image or a folder of images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overlay", action="store_true", help="also write NAME_overlay.png")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay: weight of the palette")
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    bf16 = device.type == "cuda" and not args.fp32
    input_path, out_dir = Path(args.input), Path(args.out)
    if not input_path.exists():
        sys.exit(f"predict.py: --input {input_path}: no such file or folder")
    images = find_images(input_path)
    if not images:
        sys.exit(f"predict.py: --input {input_path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it")

    model = BiSeNetV2(args.num_classes)
    try:
        load_weights(model, args.weights)
    except (OSError, ValueError) as e:
        sys.exit(f"predict.py: --weights: {e}")
    model.to(device).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    palette = cityscapes_palette(args.num_classes)
    print(f"predict.py: {len(images)} image(s) on {device}{' (bf16 autocast)' if bf16 else ''} -> {out_dir}",
          file=sys.stderr)

    failed = 0
    start = time.perf_counter()
    for index, (image_path, stem) in enumerate(images, 1):
        try:
            with Image.open(image_path) as image:
                image.load()
                photo = image.convert("RGB")
        except Exception as e:  # PIL raises several types for truncated or foreign files
            print(f"predict.py: skipping {image_path}: unreadable image ({type(e).__name__}: {e})", file=sys.stderr)
            failed += 1
            continue
        train_ids = predict_train_ids(model, photo, device, bf16)
        target = out_dir / stem
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(train_ids).save(f"{target}_trainIds.png")
        color = palette[train_ids]  # (H, W, 3)
        Image.fromarray(color).save(f"{target}_color.png")
        if args.overlay:
            blend = (1 - args.alpha) * np.asarray(photo, np.float32) + args.alpha * color
            Image.fromarray(blend.round().clip(0, 255).astype(np.uint8)).save(f"{target}_overlay.png")
        if len(images) > 1:
            elapsed = time.perf_counter() - start
            print(f"[{index}/{len(images)}] {image_path.name}  {elapsed / index:.2f} s/image", file=sys.stderr)
    if failed:
        print(f"predict.py: {failed} of {len(images)} image(s) could not be read", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
