"""Prepare Cityscapes or your own dataset for train_ddp.py, make a small synthetic dataset, pack splits.

    python prepare_data.py --cityscapes_path /data/cityscapes [--num_workers 8] [--separator ,]
    python prepare_data.py --synthetic /tmp/synthetic [--num-images 48]
    python prepare_data.py --images DIR --labels DIR --out ROOT [--label-map 0:0 255:1] [--classes NAME ...]
                           [--val-fraction 0.1 [--seed 0] | --val-images DIR --val-labels DIR] [--ignore-index 255]
    python prepare_data.py --cityscapes_path /data/cityscapes --pack     # then decode once into packed/
    python prepare_data.py --data-dir ROOT --pack                        # pack a prepared dataset


Cityscapes: every gtFine/*/*/*_gtFine_polygons.json becomes *_gtFine_labelTrainIds.png through
cityscapesscripts (as PaddleSeg's convert_cityscapes.py does); a frame with only
*_gtFine_labelIds.png gets its train ids through cityscapesscripts' label table. Outputs that
are already there are skipped, and each PNG is written to a temporary name and renamed, so an
interrupted run leaves no half-written file. If only the official zips are in the folder they
are extracted first. Then sorted train.txt, val.txt and test.txt list `<image> <label>`
relative to the root.

Your own dataset (--images, --labels, --out): images (.png .jpg .jpeg .bmp .tif .tiff) and
one-channel label PNGs, found recursively (hidden files skipped), pair when their paths under
the two folders are equal up to the extension, after the Cityscapes suffixes are taken off the
names (`_leftImg8bit` of an image, `_gtFine_labelTrainIds` of a label). Val is --val-images/
--val-labels, or round(--val-fraction * pairs) pairs (at least one) drawn from the sorted pairs
by a permutation seeded with --seed. Every label is read (in a pool of workers): its size must
be its image's, and each value must be in --label-map (stored value -> train id) or be
--ignore-index; without a map the values are train ids. Colour masks (--label-map R,G,B:ID)
and 16-bit masks (a value above 255 in the map) are checked likewise, then converted once into
train id PNGs under OUT/train_ids/SPLIT/, which the lists name. The classes are --classes, or
class0..classN-1 up to the highest train id (found, or a map's target). Writes OUT/train.txt,
OUT/val.txt (paths relative to OUT, ../ where outside it) and OUT/dataset.json (data.DatasetInfo).

--pack stores each split listed in train.txt / val.txt once more, decoded: ROOT/packed/SPLIT.json
(the index) and two raw .npy arrays beside it, images (N, H, W, 3) uint8 RGB and train ids
(N, H, W) uint8, which train_ddp.py memory-maps instead of decoding PNGs (about 50 ms per
1024x2048 frame and core). The labels are validated while packing. The index holds the
list file's SHA-256 and each source file's size and mtime, so a pack of a list or files that
changed since is detected as stale (data.read_pack raises StalePack); the arrays are written
under fresh names and the index is renamed over the old one last, so a reader sees the old
pack or the new one, never a mix. All frames of a split must have one size (Cityscapes:
1024x2048); otherwise the split is not packed and one line names a frame of another size (the
dataset stays usable: train_ddp.py reads the PNG files). The labels are packed as train ids (the
label map of ROOT/dataset.json applied).

What reading needs (list files, frames, packs, the label table) lives in data.py.
"""
import argparse
import hashlib
import json
import os
import secrets
import shutil
import sys
import zipfile
import zlib
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data import (CITYSCAPES, CITYSCAPES_CLASSES, DATASET_FILE, PACK_FORMAT, BadInput, OneLineErrors, StalePack,
                  atomic_write, cache_dir, check_same_size, describe_labels_key, disallowed_values, file_stamps, hxw,
                  label_id_to_train_id, label_mode_problem, numbered_info, pack_dir, pack_labels_key,
                  read_dataset_info, read_frame, read_label, read_list, read_pack, save_png, stored_values,
                  walk_files, write_dataset_info)

SPLITS = ("train", "val", "test")
ZIPS = ("gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip")


def train_ids_from_polygons(source):
    """-> (H, W) uint8 train ids of a gtFine polygons JSON, drawn by cityscapesscripts;
    BadInput naming the file for JSON it cannot read or a label it does not know (where
    cityscapesscripts would exit the process: a pool worker's exit hung the pool)."""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.helpers.labels import name2label
    from cityscapesscripts.preparation.json2labelImg import createLabelImage
    annotation = Annotation()
    try:
        annotation.fromJsonFile(source)
    except Exception as e:  # (JSON syntax, a missing key, a value of another type)
        raise BadInput(f"{source}: unreadable polygons JSON ({type(e).__name__}: {e})") from None
    for obj in annotation.objects:
        name = obj.label[:-len("group")] if obj.label not in name2label and obj.label.endswith("group") else obj.label
        if not obj.deleted and name not in name2label:
            raise BadInput(f"{source}: label {obj.label!r} is not a Cityscapes label")
    try:
        return np.asarray(createLabelImage(annotation, "trainIds"))
    except Exception as e:  # (a polygon that is not a list of points)
        raise BadInput(f"{source}: cannot draw its polygons ({type(e).__name__}: {e})") from None


def train_ids_from_label_ids(source):
    """-> (H, W) uint8 train ids of a gtFine labelIds PNG; BadInput naming the file when it is
    unreadable, not one channel, or holds values that are no Cityscapes label id (0..33)."""
    label_ids = read_label(source)
    beyond = np.flatnonzero(stored_values(label_ids)[34:]) + 34
    if beyond.size:
        raise BadInput(f"{source}: values {beyond[:8].tolist()} are not Cityscapes label ids (0..33)")
    return label_id_to_train_id()[label_ids]


def convert_one(task):
    """(source, target) -> None: writes target's train ids from polygons or labelIds (in a
    pool worker: an exit of the process becomes BadInput naming the file)."""
    source, target = task
    stamp = os.stat(source)  # before reading: a source replaced meanwhile leaves the next run a difference
    try:
        if source.endswith("_polygons.json"):
            train_ids = train_ids_from_polygons(source)
        else:
            train_ids = train_ids_from_label_ids(source)
    except SystemExit as e:
        raise BadInput(f"{source}: the conversion exited ({e.code})") from None
    save_png(train_ids.astype(np.uint8), target)
    os.utime(target, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # converted from this version of the source


def converted_from(source, target):
    """Whether target holds the train ids of this version of source: it carries the source's
    modification time (convert_one stamps it), or on a filesystem of whole seconds (a source
    linked from a finer one) that time rounded down to its second. A source replaced by an
    older file (unzip, cp -p) or dated ahead of the clock is converted again, once."""
    if not target.is_file():
        return False
    if source is None:
        return True
    source_ns, target_ns = source.stat().st_mtime_ns, target.stat().st_mtime_ns
    return target_ns == source_ns or (target_ns % 10**9 == 0 and target_ns == source_ns // 10**9 * 10**9)


def extract_zips(root):
    """Extracts the Cityscapes zips under root: each into a hidden folder first, its top-level
    entries (leftImg8bit/, gtFine/, ...) then renamed into place, so an interrupted extraction
    leaves no folder half-written and a rerun extracts that zip again; a zip whose entries are
    all in place is skipped. BadInput naming a zip that cannot be read."""
    for name in ZIPS:
        staging = root / f".extracting_{name}"
        shutil.rmtree(staging, ignore_errors=True)  # an interrupted run's
        try:
            with zipfile.ZipFile(root / name) as archive:
                members = archive.infolist()
                tops = sorted({member.filename.split("/")[0] for member in members})
                if all((root / top).exists() for top in tops):
                    continue
                for i, member in enumerate(members, 1):
                    archive.extract(member, staging)
                    if i % 1000 == 0 or i == len(members):
                        print(f"extracting {name}: {i}/{len(members)}", file=sys.stderr, flush=True)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise BadInput(f"{root / name}: unreadable zip ({type(e).__name__}: {e})") from None
        except BaseException:  # (an interruption, a full disk: no hidden copy left behind)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for top in tops:
            if not (root / top).exists():
                (staging / top).rename(root / top)
        shutil.rmtree(staging)


def find_frames(root, split):
    """-> sorted [(image, label target, label source)] of one split."""
    frames = []
    for image in sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
        stem = image.name[:-len("_leftImg8bit.png")]
        gt = root / "gtFine" / split / image.parent.name
        target = gt / f"{stem}_gtFine_labelTrainIds.png"
        polygons, label_ids = gt / f"{stem}_gtFine_polygons.json", gt / f"{stem}_gtFine_labelIds.png"
        source = polygons if polygons.is_file() else label_ids if label_ids.is_file() else None
        if source is None and not target.is_file():
            raise BadInput(f"{image}: no label for this frame (neither {polygons.name} nor {label_ids.name})")
        frames.append((image, target, source))
    return frames


def prepare_cityscapes(root, num_workers=None, separator=" "):
    """Writes the train-id PNGs and the list files under root. -> {split: frame count}."""
    root = Path(root)
    if not root.is_dir():
        raise BadInput(f"--cityscapes_path {root}: no such directory")
    if all((root / z).is_file() for z in ZIPS) and not all((root / d).is_dir() for d in ("leftImg8bit", "gtFine")):
        extract_zips(root)
    if not (root / "leftImg8bit").is_dir():
        raise BadInput(f"{root}: no leftImg8bit/ folder (nor {' and '.join(ZIPS)})")
    frames = {split: find_frames(root, split) for split in SPLITS}
    if not any(frames.values()):
        raise BadInput(f"{root}: no frames at leftImg8bit/SPLIT/CITY/*_leftImg8bit.png (SPLIT {', '.join(SPLITS)})")
    # a target is written again when its source changed (a --synthetic run over another)
    tasks = [(str(source), str(target)) for split in SPLITS for _, target, source in frames[split]
             if not converted_from(source, target)]
    if tasks:
        with Pool(num_workers or os.cpu_count()) as pool:
            for done, _ in enumerate(pool.imap_unordered(convert_one, tasks, chunksize=8), 1):
                if done % 100 == 0 or done == len(tasks):
                    print(f"train ids: {done}/{len(tasks)}", file=sys.stderr, flush=True)
    counts = {}
    for split in SPLITS:
        if not frames[split]:
            continue
        lines = []
        for image, target, _ in frames[split]:
            with Image.open(image) as im, Image.open(target) as lab:
                if im.size != lab.size:
                    raise BadInput(f"{image}: image is {hxw(im.size)} but its label {target} is {hxw(lab.size)}")
            lines.append(f"{image.relative_to(root)}{separator}{target.relative_to(root)}")
        list_file = root / f"{split}.txt"
        atomic_write(list_file, "\n".join(lines) + "\n")
        counts[split] = len(lines)
        print(f"{split}: {len(lines)} frames -> {list_file}", file=sys.stderr)
    return counts


# ---------------------------------------------------------------------------------------
# Your own dataset: a folder of images and a folder of label PNGs

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit", "_gtFine_labelTrainIds"  # Cityscapes' names pair too


def files_by_key(folder, extensions, suffix, flag, skip=None):
    """-> {pairing key: path} of the files under `folder` (recursive, hidden files and the
    folder `skip` left out) with one of `extensions` (any case). The key is the path under
    `folder` without the extension and without `suffix` at the end of the name. BadInput
    naming a folder that cannot be read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"{flag} {folder}: no such directory")
    def unreadable(error):
        raise BadInput(f"{flag}: {error.filename}: cannot read the folder ({error.strerror})")
    skip = skip and Path(skip).resolve()
    found = {}
    for path in sorted(walk_files(folder, unreadable, lambda subfolder: subfolder.resolve() != skip)):
        if path.name.startswith(".") or path.suffix.lower() not in extensions:
            continue
        key = path.relative_to(folder).with_suffix("").as_posix()
        key = key[:-len(suffix)] if key.endswith(suffix) else key
        if key in found:
            raise BadInput(f"{found[key]} and {path}: two files under {flag} pair as {key!r}; keep one")
        found[key] = path
    return found


def find_pairs(images_dir, labels_dir, image_flag="--images", label_flag="--labels", skip=None):
    """-> [(image, label)] sorted by key: images and label PNGs at the same path under their
    folders up to the extension (and the Cityscapes suffixes); BadInput naming the first few
    unpaired files and their count, or for no pairs at all."""
    images = files_by_key(images_dir, IMAGE_EXTENSIONS, IMAGE_SUFFIX, image_flag, skip)
    labels = files_by_key(labels_dir, (".png",), LABEL_SUFFIX, label_flag, skip)
    unpaired = [images[key] for key in sorted(images.keys() - labels.keys())]
    unpaired += [labels[key] for key in sorted(labels.keys() - images.keys())]
    if unpaired:
        raise BadInput(f"{len(unpaired)} unpaired file(s): {', '.join(map(str, unpaired[:3]))}"
                       f"{', ...' if len(unpaired) > 3 else ''} (an image and its label need the same path "
                       f"under {image_flag} and {label_flag} up to the extension)")
    if not images:
        raise BadInput(f"{image_flag} {images_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [(images[key], labels[key]) for key in sorted(images)]


def scan_pair(pair):
    """(image, label) -> (256,) bool of the label's stored values; BadInput naming the file for
    an unreadable label or image, or sizes that differ (run in a worker process)."""
    image, label = pair
    values = read_label(label)
    check_same_size(image, image_size(image), label, values.shape[::-1])
    return stored_values(values)


def check_map_targets(label_map, num_classes, ignore_index):
    """BadInput naming a --label-map entry whose train id is neither a class nor the ignore index."""
    for value, train_id in sorted((label_map or {}).items()):
        if train_id >= num_classes and train_id != ignore_index:
            raise BadInput(f"--label-map {mask_value_text(value)}:{train_id}: class {train_id}, but there are "
                           f"{num_classes} classes (0..{num_classes - 1}) and the ignore index is {ignore_index}")


# ---------------------------------------------------------------------------------------
# Masks that need converting: colours (--label-map R,G,B:ID) or values above 255 (16-bit
# masks). They are rewritten once as train id PNGs under OUT/train_ids/, which the lists name.

def mask_value_text(value):
    """A --label-map source as written: 255, or 128,64,128 for a colour."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def read_mask_codes(path, colour):
    """-> (H, W) int64: a mask's stored values, colours as r * 65536 + g * 256 + b (colour
    masks: RGB, RGBA or palette images) or greyscale values 0..65535 (8- or 16-bit, one
    channel). BadInput naming the file when it is unreadable or of the other kind."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            if colour:
                return np.asarray(im.convert("RGB"), np.int64) @ np.array([65536, 256, 1])
            values = None if label_mode_problem(mode) else np.asarray(im).astype(np.int64)
    except Exception as e:
        raise BadInput(f"{path}: unreadable image ({type(e).__name__})") from None
    if values is None:
        raise BadInput(f"{path}: label image has mode {mode}; colour masks need colours in --label-map "
                       f"(R,G,B:ID)")
    return values


def code_of(value):
    return value[0] * 65536 + value[1] * 256 + value[2] if isinstance(value, tuple) else value


def text_of_code(code, colour):
    return f"{code >> 16},{(code >> 8) & 255},{code & 255}" if colour else str(code)


def scan_mask(task):
    """(image, mask, colour) -> the mask's distinct codes; BadInput naming the file for an
    unreadable one, or a size other than its image's (run in a worker process)."""
    image, mask, colour = task
    codes = read_mask_codes(mask, colour)
    check_same_size(image, image_size(image), mask, codes.shape[::-1])
    return np.unique(codes)


def convert_mask(task):
    """(mask, out, colour, sources, train_ids) -> writes the mask's train ids (every code is
    one of `sources`, checked before) to `out` as a PNG, atomically."""
    mask, out, colour, sources, train_ids = task
    codes = read_mask_codes(mask, colour)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(train_ids[np.searchsorted(sources, codes)].astype(np.uint8), out)


class MaskConversion:
    """--label-map with colours or values above 255: every mask checked against the map
    (check, in worker processes; grey values may also be the ignore index), then rewritten
    as train id PNGs under OUT/train_ids/SPLIT/ at its path under its label folder (targets,
    then write). Nothing is written before every mask and every list line has passed."""

    def __init__(self, label_map, ignore_index):
        self.colour = isinstance(next(iter(label_map)), tuple)
        self.mapping = {code_of(value): train_id for value, train_id in label_map.items()}
        if not self.colour:
            self.mapping.setdefault(ignore_index, ignore_index)
        self.sources = np.array(sorted(self.mapping))
        self.train_ids = np.array([self.mapping[code] for code in self.sources])
        self.allowed = "--label-map" + ("" if self.colour else f" nor the ignore index {ignore_index}")

    def check(self, splits, num_workers):
        """-> (256,) bool of the train ids the masks hold; BadInput naming a mask and its
        values that the map does not hold."""
        masks = [(image, mask, self.colour) for pairs in splits.values() for image, mask in pairs]
        with Pool(min(num_workers or os.cpu_count(), len(masks))) as pool:
            found = list(pool.imap(scan_mask, masks, chunksize=8))
        present = np.zeros(256, bool)
        for (_, mask, _), codes in zip(masks, found):
            unknown = [text_of_code(code, self.colour) for code in codes.tolist() if code not in self.mapping]
            if unknown:
                raise BadInput(f"{mask}: values {unknown[:8]} are neither in {self.allowed}")
            present[[self.mapping[code] for code in codes.tolist()]] = True
        return present

    @staticmethod
    def folder(out, inputs):
        """-> OUT/train_ids, where the converted masks go; BadInput where one of `inputs` ({flag:
        folder}) is that folder or lies in it (the conversion would write over what it reads).
        Where that folder lies in an input, find_pairs leaves it out."""
        folder = Path(out) / "train_ids"
        for flag, source in inputs.items():
            if Path(source).resolve() == folder.resolve() or folder.resolve() in Path(source).resolve().parents:
                raise BadInput(f"--out {out}: the converted masks go to {folder}, which holds {flag} {source}; "
                               f"choose another --out")
        return folder

    @staticmethod
    def targets(splits, label_dirs, folder):
        """-> splits with each mask replaced by its train id PNG's path under folder/SPLIT/."""
        return {split: [(image, folder / split / mask.relative_to(label_dirs[split]).with_suffix(".png"))
                        for image, mask in pairs] for split, pairs in splits.items()}

    def write(self, splits, converted, num_workers, log):
        """Writes each mask of `splits` as its train id PNG at its place in `converted`."""
        tasks = [(mask, target, self.colour, self.sources, self.train_ids)
                 for split in splits for (_, mask), (_, target) in zip(splits[split], converted[split])]
        with Pool(min(num_workers or os.cpu_count(), len(tasks))) as pool:
            list(pool.imap(convert_mask, tasks, chunksize=8))
        log(f"masks: {len(tasks)} converted to train ids under {Path(os.path.commonpath([t[1] for t in tasks]))}")


def dataset_info_for(present, classes, label_map, ignore_index):
    """The DatasetInfo of the flags and the label values found (present: (256,) bool over all
    labels). Classes: --classes, or as many as the highest train id + 1 (of the values found,
    mapped, and of the map's targets); BadInput naming the flag for a map to a class beyond
    --classes or an ignore index among the train ids."""
    if label_map is None:
        train_ids = set(np.flatnonzero(present).tolist())
    else:
        train_ids = {label_map[v] for v in np.flatnonzero(present).tolist() if v in label_map}
        train_ids |= set(label_map.values())
    train_ids.discard(ignore_index)
    if classes is None:
        if not train_ids:
            raise BadInput(f"the labels hold no train ids (every value is --ignore-index {ignore_index})")
        classes = numbered_info(max(train_ids) + 1).class_names
        if len(classes) == 1:
            raise BadInput(f"the labels hold one train id, 0, besides --ignore-index {ignore_index}: one class "
                           f"(masks storing 0 and 255 need --label-map 0:0 255:1; or name the classes: --classes)")
    num_classes = len(classes)
    check_map_targets(label_map, num_classes, ignore_index)
    if ignore_index < num_classes:
        raise BadInput(f"--ignore-index {ignore_index} is one of the {num_classes} train ids 0..{num_classes - 1}")
    return numbered_info(num_classes, ignore_index, classes)._replace(label_map=label_map)


def list_line(root, image, label):
    """`<image> <label>` relative to root (../ for files outside it); BadInput for a path that
    a list file cannot hold (its fields are separated by spaces or a comma)."""
    names = [os.path.relpath(path, root) for path in (image, label)]
    for name in names:
        if any(c.isspace() or c == "," for c in name):
            raise BadInput(f"{name}: a space or comma in the path; list files separate their fields "
                           f"by them (rename it)")
    return " ".join(names)


def prepare_folders(images, labels, out, val_fraction=None, val_images=None, val_labels=None, seed=0,
                    classes=None, label_map=None, ignore_index=255, num_workers=None, log=print):
    """Pairs the images and labels, splits them, checks every label, writes OUT/train.txt,
    OUT/val.txt and OUT/dataset.json. -> {split: frame count}."""
    out = Path(out)
    converting = bool(label_map) and (isinstance(next(iter(label_map)), tuple) or max(label_map) > 255)
    inputs = {"--images": images, "--labels": labels, "--val-images": val_images, "--val-labels": val_labels}
    converted_dir = MaskConversion.folder(out, {f: d for f, d in inputs.items() if d}) if converting else None
    pairs = find_pairs(images, labels, skip=converted_dir)
    if val_images:
        splits = dict(train=pairs, val=find_pairs(val_images, val_labels, "--val-images", "--val-labels",
                                                  converted_dir))
        log(f"pairs: train {len(pairs)} from {images}, val {len(splits['val'])} from {val_images}")
    else:
        val_fraction = 0.1 if val_fraction is None else val_fraction
        num_val = max(1, round(val_fraction * len(pairs)))
        if num_val >= len(pairs):
            raise BadInput(f"--val-fraction {val_fraction} of {len(pairs)} pairs leaves {num_val} for val "
                           f"and {len(pairs) - num_val} for train; each split needs at least one")
        in_val = np.zeros(len(pairs), bool)
        in_val[np.random.default_rng(seed).permutation(len(pairs))[:num_val]] = True
        splits = dict(train=[p for p, v in zip(pairs, in_val) if not v], val=[p for p, v in zip(pairs, in_val) if v])
        log(f"pairs: {len(pairs)}, val {num_val} of them (--val-fraction {val_fraction}, --seed {seed})")
    conversion = None
    if converting:
        conversion = MaskConversion(label_map, ignore_index)
        converted = conversion.targets(splits, dict(train=Path(labels), val=Path(val_labels or labels)), converted_dir)
        present = conversion.check(splits, num_workers)
        present[[t for t in label_map.values() if t != ignore_index]] = True  # every class the map names
        info = dataset_info_for(present, classes, None, ignore_index)
        check_map_targets(label_map, len(info.class_names), ignore_index)
    else:
        everything = splits["train"] + splits["val"]
        with Pool(min(num_workers or os.cpu_count(), len(everything))) as pool:
            present = list(pool.imap(scan_pair, [(str(i), str(l)) for i, l in everything], chunksize=8))
        info = dataset_info_for(np.any(present, axis=0), classes, label_map, ignore_index)
        for (_, label), values in zip(everything, present):
            error = disallowed_values(label, values, info)
            if error:
                raise error
    listed = converted if conversion else splits
    lines = {split: [list_line(out, *pair) for pair in split_pairs] for split, split_pairs in listed.items()}
    out.mkdir(parents=True, exist_ok=True)
    if conversion:  # (after every check: a failed run leaves the masks its old lists name)
        conversion.write(splits, converted, num_workers, log)
    write_dataset_info(out, info)
    for split, split_lines in lines.items():
        atomic_write(out / f"{split}.txt", "\n".join(split_lines) + "\n")
    names = ", ".join(info.class_names[:8]) + (", ..." if len(info.class_names) > 8 else "")
    log(f"classes: {len(info.class_names)} ({names}), ignore index {info.ignore_index}"
        f"{f', label map {label_map}' if label_map else ''} -> {out / DATASET_FILE}")
    return {split: len(split_lines) for split, split_lines in lines.items()}


# ---------------------------------------------------------------------------------------
# A synthetic street scene dataset: shapes and textures carry the 19 classes

def box(x0, y0, x1, y1):
    return [(int(x0), int(y0)), (int(x1), int(y0)), (int(x1), int(y1)), (int(x0), int(y1))]


def blob(rng, cx, cy, rx, ry, points=10):
    angles = np.sort(rng.uniform(0, 2 * np.pi, points))
    radius = rng.uniform(0.7, 1.0, points)
    return [(int(cx + rx * r * np.cos(a)), int(cy + ry * r * np.sin(a))) for a, r in zip(angles, radius)]


def street_scene(rng, height, width):
    """-> list of (class name, polygon), back to front, for one street scene of the given
    size (laid out on a 256x512 canvas, then scaled)."""
    objects = street_scene_256x512(rng)
    sy, sx = height / 256, width / 512
    return [(name, [(int(x * sx), int(y * sy)) for x, y in polygon]) for name, polygon in objects]


def street_scene_256x512(rng):
    height, width = 256, 512
    horizon = int(height * rng.uniform(0.35, 0.5))
    vanish_x = width * rng.uniform(0.35, 0.65)
    objects = [("sky", box(0, 0, width - 1, horizon + 5))]
    x = -rng.integers(0, 30)
    while x < width:  # a row of buildings, walls and fences below the horizon line
        w = rng.integers(width // 10, width // 4)
        top = rng.integers(height // 20, horizon)
        objects.append(("building", box(x, top, x + w, horizon + 10)))
        x += w + rng.integers(0, 10)
    for _ in range(rng.integers(1, 3)):
        x0 = rng.uniform(0, width * 0.8)
        objects.append((str(rng.choice(["wall", "fence"])),
                        box(x0, horizon - rng.integers(8, 25), x0 + rng.uniform(40, 120), horizon + 10)))
    for _ in range(rng.integers(2, 5)):  # trees
        objects.append(("vegetation", blob(rng, rng.uniform(0, width), horizon - rng.uniform(0, 30),
                                           rng.uniform(20, 50), rng.uniform(20, 45))))
    objects.append(("terrain", box(0, horizon, width - 1, height - 1)))
    road_left, road_right = width * rng.uniform(-0.3, 0.15), width * rng.uniform(0.85, 1.3)
    walk = width * rng.uniform(0.15, 0.3)
    objects.append(("sidewalk", [(int(vanish_x - 12), horizon), (int(vanish_x + 12), horizon),
                                 (int(road_right + walk), height - 1), (int(road_left - walk), height - 1)]))
    objects.append(("road", [(int(vanish_x - 4), horizon), (int(vanish_x + 4), horizon),
                             (int(road_right), height - 1), (int(road_left), height - 1)]))
    for _ in range(rng.integers(1, 4)):  # poles with a light or a sign
        px, base = rng.uniform(0, width), rng.uniform(horizon + 10, height * 0.8)
        top = base - rng.uniform(60, 110)
        objects.append(("pole", box(px, top, px + rng.integers(3, 6), base)))
        if rng.uniform() < 0.5:
            objects.append(("traffic light", box(px - 4, top - 20, px + 8, top)))
        else:
            objects.append(("traffic sign", blob(rng, px + 2, top - 8, 10, 10, points=6)))
    vehicles = {"car": (50, 25), "truck": (80, 45), "bus": (110, 50), "train": (160, 55),
                "motorcycle": (22, 20), "bicycle": (22, 18)}
    for _ in range(rng.integers(2, 6)):  # traffic, larger when nearer
        name = str(rng.choice(list(vehicles)))
        base = rng.uniform(horizon + 20, height - 5)
        depth = (base - horizon) / (height - horizon)
        w, h = (s * (0.4 + depth) for s in vehicles[name])
        x0 = rng.uniform(road_left, road_right - w)
        objects.append((name, box(x0, base - h, x0 + w, base)))
        if name in ("motorcycle", "bicycle"):
            objects.append(("rider", blob(rng, x0 + w / 2, base - h - 10 * (0.4 + depth), 5 * (0.4 + depth),
                                          12 * (0.4 + depth), points=8)))
    for _ in range(rng.integers(1, 5)):  # pedestrians on the sidewalk
        base = rng.uniform(horizon + 15, height - 5)
        scale = 0.4 + (base - horizon) / (height - horizon)
        x = rng.uniform(0, width)
        objects.append(("person", blob(rng, x, base - 18 * scale, 5 * scale, 18 * scale, points=8)))
    return objects


def render_scene(rng, objects, height, width):
    """Rasterises the polygons as json2labelImg does and paints each class with its own
    colour and texture. -> (H, W, 3) uint8 RGB."""
    class_map = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(class_map)
    for name, polygon in objects:
        draw.polygon(polygon, fill=CITYSCAPES_CLASSES.index(name))
    class_map = np.asarray(class_map)
    palette = np.array([*CITYSCAPES.colors, (0, 0, 0)], np.float32)
    palette[:-1] += rng.normal(0, 12, (len(CITYSCAPES_CLASSES), 3))  # per-image colour shifts
    image = palette[np.minimum(class_map, len(CITYSCAPES_CLASSES))]
    ys, xs = np.mgrid[0:height, 0:width]
    stripes = np.sin(xs * rng.uniform(0.3, 0.8)) * 18          # fences, buildings' windows
    windows = ((ys // 6 + xs // 6) % 2) * 25
    texture = {CITYSCAPES_CLASSES.index("building"): windows, CITYSCAPES_CLASSES.index("fence"): stripes,
               CITYSCAPES_CLASSES.index("vegetation"): rng.normal(0, 20, (height, width)),
               CITYSCAPES_CLASSES.index("road"): rng.normal(0, 6, (height, width)),
               CITYSCAPES_CLASSES.index("sky"): (ys / height) * 40}
    for train_id, pattern in texture.items():
        image[class_map == train_id] += pattern[class_map == train_id][:, None]
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_synthetic(root, num_images=48, seed=0, size=(256, 512), num_workers=None):
    """Writes a Cityscapes-layout dataset (train: num_images frames, val: max(8, num_images
    // 4)) with polygon annotations, then prepares it. -> {split: frame count}."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    height, width = size
    for split, count in (("train", num_images), ("val", max(8, num_images // 4))):
        for i in range(count):
            city = f"synth{i % 3}"
            stem = f"{city}_{i:06d}_000019"
            objects = street_scene(rng, height, width)
            image_dir, gt_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            annotation = dict(imgHeight=height, imgWidth=width,
                              objects=[dict(label=name, polygon=[list(p) for p in polygon]) for name, polygon in objects])
            (gt_dir / f"{stem}_gtFine_polygons.json").write_text(json.dumps(annotation))
            save_png(render_scene(rng, objects, height, width), image_dir / f"{stem}_leftImg8bit.png")
    return prepare_cityscapes(root, num_workers=num_workers)


# ---------------------------------------------------------------------------------------
# Packed splits: decoded uint8 arrays, memory-mappable (data.read_pack reads them)


def pack_one(task):
    """Decodes frame `index` into the open .npy files (run in a worker process)."""
    images_file, labels_file, index, image_path, label_path, info = task
    image, label = read_frame(image_path, label_path, info)
    images = np.load(images_file, mmap_mode="r+")
    labels = np.load(labels_file, mmap_mode="r+")
    if image.shape != images.shape[1:]:
        raise BadInput(f"{image_path}: image is {image.shape[0]}x{image.shape[1]} but the split's first "
                       f"frame is {images.shape[1]}x{images.shape[2]}; --pack needs one size per split")
    images[index] = image
    labels[index] = label
    images.flush()
    labels.flush()


def image_size(path):
    """-> (width, height) from the file's header; BadInput naming an unreadable file."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise BadInput(f"{path}: unreadable image ({type(e).__name__})") from None


def check_one_size(root, split, pairs):
    """BadInput naming the frames of another size than the split's first: a pack holds one size."""
    sizes = [image_size(root / image) for image, _ in pairs]
    differ = [i for i, size in enumerate(sizes) if size != sizes[0]]
    if differ:
        named = ", ".join(f"{pairs[i][0]} is {hxw(sizes[i])}" for i in differ[:3])
        raise BadInput(f"{root / split}.txt: not packed: frames differ in size ({pairs[0][0]} is {hxw(sizes[0])}, "
                       f"{named}{', ...' if len(differ) > 3 else ''}: {len(differ)} of {len(pairs)} "
                       f"frames differ from the first); a pack needs one size per split; the dataset stays usable "
                       f"unpacked (train_ddp.py reads its PNG files)")


def pack_split(root, split, num_workers=None, log=print):
    """Decodes the frames listed in ROOT/SPLIT.txt into ROOT/packed/, labels as train ids
    (the label map of ROOT/dataset.json applied; see the module doc). Skips the work when a
    fresh pack is there. -> path of the index."""
    root = Path(root)
    info = read_dataset_info(root)
    pairs = [(os.path.relpath(image, root), os.path.relpath(label, root)) for image, label in read_list(root, split)]
    content = (root / f"{split}.txt").read_bytes()
    out = pack_dir(root)
    out.mkdir(exist_ok=True)
    index_path = out / f"{split}.json"
    try:
        read_pack(root, split, info, mmap=False)
        log(f"{split}: pack is up to date: {index_path}")
        return index_path
    except (FileNotFoundError, StalePack):
        pass
    source = root / DATASET_FILE if (root / DATASET_FILE).is_file() else f"no {DATASET_FILE}: Cityscapes"
    log(f"{split}: packing train ids of {describe_labels_key(pack_labels_key(info))} ({source})")
    check_one_size(root, split, pairs)
    first_image, first_label = read_frame(root / pairs[0][0], root / pairs[0][1], info)
    height, width = first_label.shape
    token = secrets.token_hex(4)
    names = dict(images=f"{split}.{token}.images.npy", labels=f"{split}.{token}.labels.npy")
    images_file, labels_file = out / names["images"], out / names["labels"]
    try:
        images = np.lib.format.open_memmap(images_file, "w+", np.uint8, (len(pairs), height, width, 3))
        labels = np.lib.format.open_memmap(labels_file, "w+", np.uint8, (len(pairs), height, width))
        images[0], labels[0] = first_image, first_label
        del images, labels
        tasks = [(str(images_file), str(labels_file), i, str(root / image), str(root / label), info)
                 for i, (image, label) in enumerate(pairs) if i > 0]
        workers = min(num_workers or os.cpu_count(), max(len(tasks), 1))
        if workers > 1:
            with Pool(workers) as pool:
                for done, _ in enumerate(pool.imap_unordered(pack_one, tasks, chunksize=4), 2):
                    if done % 100 == 0 or done == len(pairs):
                        log(f"{split}: packed {done}/{len(pairs)}")
        else:
            for task in tasks:
                pack_one(task)
        for path in (images_file, labels_file):
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        num_classes, ignore_index, label_map = pack_labels_key(info)
        index = dict(format=PACK_FORMAT, split=split, count=len(pairs), height=height, width=width,
                     num_classes=num_classes, ignore_index=ignore_index, label_map=label_map,
                     list_sha256=hashlib.sha256(content).hexdigest(), files=[list(p) for p in pairs],
                     stamps=file_stamps(root, [name for pair in pairs for name in pair]), **names)
        atomic_write(index_path, json.dumps(index) + "\n")
    except BaseException:
        images_file.unlink(missing_ok=True)
        labels_file.unlink(missing_ok=True)
        raise
    for old in out.glob(f"{split}.*.npy"):  # arrays of the replaced pack
        if old.name not in names.values():
            old.unlink(missing_ok=True)
    log(f"{split}: {len(pairs)} frames of {height}x{width} packed -> {index_path}")
    return index_path


def synthetic_in_cache(size, num_images, log=print):
    """-> DATA_DIR of a synthetic dataset of `size` (H, W) frames in the cache folder
    (data.cache_dir()), written on first use, its train split packed (a no-op when fresh)."""
    root = cache_dir() / f"synthetic_cityscapes_{size[0]}x{size[1]}"
    if not (root / "train.txt").is_file() or not (root / "val.txt").is_file():
        log(f"writing a synthetic Cityscapes-layout dataset of {size[0]}x{size[1]} frames to {root}")
        make_synthetic(root, num_images=num_images, size=tuple(size))
    pack_split(root, "train", log=lambda *a: None)
    return root


def label_map_entry(text):
    """--label-map's SRC:DST -> (SRC, DST): SRC a stored value 0..65535 or a colour R,G,B
    (a tuple), DST a train id or the ignore index, 0..255."""
    try:
        source, target = text.split(":")
        source = tuple(int(v) for v in source.split(",")) if "," in source else int(source)
        target = int(target)
        assert 0 <= target <= 255
        assert len(source) == 3 and all(0 <= v <= 255 for v in source) if isinstance(source, tuple) \
            else 0 <= source <= 65535
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"expected SRC:DST, a stored label value (0..65535) or colour (R,G,B) : "
                                         f"a train id (0..255); got {text!r}") from None
    return source, target


def check_output_folder(flag, folder):
    """An output folder that cannot be made (a file in its place or above it, no permission)
    is one line before any work; nothing is made here."""
    existing = Path(folder).absolute()
    while not existing.exists():  # the nearest part of it that exists
        existing = existing.parent
    if not existing.is_dir():
        raise BadInput(f"{flag} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"{flag} {folder}: {existing} is not writable")


def main(argv=None):
    parser = OneLineErrors(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cityscapes_path", "--cityscapes-path", help="Cityscapes root (leftImg8bit/, gtFine/)")
    parser.add_argument("--synthetic", metavar="DIR", help="write and prepare a synthetic dataset here")
    parser.add_argument("--images", metavar="DIR", help="your dataset: its images (with --labels, --out)")
    parser.add_argument("--data-dir", "--data_dir", metavar="ROOT", help="pack a prepared dataset (with --pack)")
    parser.add_argument("--num-images", "--num_images", type=int, default=48, help="--synthetic: train frames")
    parser.add_argument("--seed", type=int, default=0, help="--synthetic, --val-fraction: random seed")
    parser.add_argument("--num_workers", "--num-workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--separator", default=" ", help="between image and label in --cityscapes_path's lists (' ' or ',')")
    parser.add_argument("--pack", action="store_true",
                        help="then decode train and val into ROOT/packed/ (uint8 arrays train_ddp.py memory-maps)")
    own = parser.add_argument_group("your own dataset (--images)")
    own.add_argument("--labels", metavar="DIR", help="label PNGs, at the images' paths up to the extension")
    own.add_argument("--out", metavar="ROOT", help="where train.txt, val.txt and dataset.json go")
    own.add_argument("--val-fraction", type=float, help="of the pairs, drawn with --seed, for val (default 0.1)")
    own.add_argument("--val-images", metavar="DIR", help="val from these folders instead (with --val-labels)")
    own.add_argument("--val-labels", metavar="DIR")
    own.add_argument("--classes", nargs="+", metavar="NAME", help="class names, train id order "
                     "(default: class0.. up to the highest train id found)")
    own.add_argument("--label-map", nargs="+", type=label_map_entry, metavar="SRC:DST",
                     help="stored label value -> train id (or the ignore index), e.g. 0:0 255:1, or a "
                          "colour of RGB masks, e.g. 128,64,128:0; every other value must be the ignore index")
    own.add_argument("--ignore-index", type=int, default=255, help="the label value not trained on")
    args = parser.parse_args(argv)
    modes = [args.cityscapes_path, args.synthetic, args.images, args.data_dir]
    if sum(bool(mode) for mode in modes) != 1:
        parser.error("give one of --cityscapes_path, --synthetic, --images and --data-dir")
    if args.data_dir and not args.pack:
        parser.error("--data-dir is for packing a prepared dataset: add --pack")
    own_flags = ("labels", "out", "val_fraction", "val_images", "val_labels", "classes", "label_map")
    if not args.images and any(getattr(args, name) is not None for name in own_flags):
        parser.error("--labels, --out, --val-*, --classes and --label-map go with --images")
    if args.images and not (args.labels and args.out):
        parser.error("--images needs --labels and --out")
    if bool(args.val_images) != bool(args.val_labels) or (args.val_images and args.val_fraction is not None):
        parser.error("give --val-images with --val-labels, or --val-fraction")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.synthetic and args.num_images < 1:
        parser.error(f"--num-images must be at least 1, got {args.num_images}")
    if args.num_workers is not None and args.num_workers < 1:
        parser.error(f"--num-workers must be at least 1, got {args.num_workers}")
    if not 0 <= args.seed < 2**32:  # (numpy's seeds are non-negative)
        parser.error(f"--seed must be in 0..4294967295, got {args.seed}")
    if args.separator not in (" ", ","):
        parser.error(f"--separator must be ' ' or ',', got {args.separator!r}")
    if args.separator != " " and not args.cityscapes_path:  # (the other lists are written with a space)
        parser.error("--separator is for --cityscapes_path's lists")
    if not 0 <= args.ignore_index <= 255:
        parser.error(f"--ignore-index must be in 0..255, got {args.ignore_index}")
    label_map = dict(args.label_map) if args.label_map else None
    if args.label_map and len(label_map) < len(args.label_map):
        parser.error("--label-map names a stored value twice")
    if args.label_map and len({isinstance(source, tuple) for source in label_map}) > 1:
        parser.error("--label-map mixes colours (R,G,B) and grey values: masks are one or the other")
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    try:
        for flag, folder in (("--synthetic", args.synthetic), ("--out", args.out)):
            if folder:
                check_output_folder(flag, folder)
        if args.synthetic:
            counts = make_synthetic(args.synthetic, args.num_images, args.seed, num_workers=args.num_workers)
        elif args.images:
            counts = prepare_folders(args.images, args.labels, args.out, args.val_fraction, args.val_images,
                                     args.val_labels, args.seed, args.classes, label_map, args.ignore_index,
                                     args.num_workers, log=log)
        elif args.cityscapes_path:
            counts = prepare_cityscapes(args.cityscapes_path, args.num_workers, args.separator)
        else:
            counts = {split: len(read_list(args.data_dir, split)) for split in ("train", "val")
                      if (Path(args.data_dir) / f"{split}.txt").is_file()}
            if not counts:
                raise BadInput(f"--data-dir {args.data_dir}: no train.txt or val.txt to pack")
        if args.pack:
            root = args.synthetic or args.out or args.cityscapes_path or args.data_dir
            for split in ("train", "val"):
                if (Path(root) / f"{split}.txt").is_file():
                    pack_split(root, split, num_workers=args.num_workers, log=log)
    except BadInput as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be written (a full disk; atomic_write names it): one line
        print(f"prepare_data.py: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    print("frames: " + ", ".join(f"{split} {n}" for split, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
