"""Small datasets and configs the tests share."""
import shutil
import types
from pathlib import Path

import numpy as np
from PIL import Image

import prepare_data
import train_ddp
from conftest import shared_fixture


def make_dataset(root, num_train=4, num_val=2, size=(40, 60), num_classes=19, seed=0):
    """A tiny dataset in the list-file layout: random photos, labels of random blocks."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("val", num_val)):
        lines = []
        for i in range(count):
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            label = rng.integers(0, num_classes, (size[0] // 10 + 1, size[1] // 10 + 1)).astype(np.uint8)
            label = np.kron(label, np.ones((10, 10), np.uint8))[:size[0], :size[1]]
            label[:3] = 255
            folder = Path(root) / split
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"img{i}.png")
            Image.fromarray(label).save(folder / f"lab{i}.png")
            lines.append(f"{split}/img{i}.png {split}/lab{i}.png")
        (Path(root) / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return Path(root)


def make_binary_folders(root, n=8, size=(24, 32), seed=0):
    """A small 2-class dataset as annotation tools often write one: ROOT/images/frameNNN.jpg
    photos and ROOT/masks/frameNNN.png masks storing 0 (background) and 255 (the object: a
    brighter rectangle); the last frame in a subfolder of each. -> (images dir, masks dir)."""
    rng = np.random.default_rng(seed)
    height, width = size
    images, masks = Path(root) / "images", Path(root) / "masks"
    for i in range(n):
        folder = "more/" if i == n - 1 else ""
        (images / folder).mkdir(parents=True, exist_ok=True)
        (masks / folder).mkdir(parents=True, exist_ok=True)
        mask = np.zeros(size, np.uint8)
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        mask[top:top + height // 2, left:left + width // 2] = 255
        photo = rng.integers(0, 100, (*size, 3)).astype(np.uint8)
        photo[mask == 255] += 120
        Image.fromarray(photo).save(images / f"{folder}frame{i:03d}.jpg", quality=95)
        Image.fromarray(mask).save(masks / f"{folder}frame{i:03d}.png")
    return images, masks


def pack(root):
    for split in ("train", "val"):
        prepare_data.pack_split(root, split, num_workers=1, log=lambda *a: None)


def sample_dataset(tmp_path):
    """The real Cityscapes frame of ../shared as both train and val, train ids derived from
    its labelIds with cityscapesscripts' table."""
    root = tmp_path / "cityscapes"
    shutil.copytree(shared_fixture("cityscapes_sample"), root)
    label_ids = next(root.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    train_ids = label_ids.with_name(label_ids.name.replace("labelIds", "labelTrainIds"))
    from cityscapesscripts.helpers.labels import id2label
    table = np.full(256, 255, np.uint8)  # written out here, not data.label_id_to_train_id: an independent check
    for label_id, label in id2label.items():
        if 0 <= label_id < 256 and label.trainId not in (255, -1):
            table[label_id] = label.trainId
    Image.fromarray(table[np.asarray(Image.open(label_ids))]).save(train_ids)
    image = next(root.glob("leftImg8bit/val/*/*.png"))
    line = f"{image.relative_to(root)} {train_ids.relative_to(root)}\n"
    (root / "train.txt").write_text(line)
    (root / "val.txt").write_text(line)
    return root


def data_config(*argv, **settings):
    """What data.py reads from a config: train_ddp's defaults for `argv`, then `settings`
    (device, aug_device, channels_last, ... as resolve_config would set them)."""
    args = train_ddp.parse_args(["--data-dir", "unused", *argv])
    defaults = dict(device="cpu", aug_device="cpu", channels_last=False, num_classes=args.num_classes or 19,
                    ignore_index=255 if args.ignore_index is None else args.ignore_index)
    return types.SimpleNamespace(**{**vars(args), **defaults, **settings})


def table_rows(table):
    """A markdown table -> {first cell: [the other cells]}."""
    return {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| ---")}
