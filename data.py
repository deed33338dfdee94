"""The input pipeline of train_ddp.py, bench.py and prepare_data.py, as one library.

    list file -> frames (PNG pairs, or a pack of decoded uint8 arrays)
              -> augmentation (per sample in the DataLoader workers, or batched on the GPU:
                 the same draws either way)
              -> TrainSet, StepSampler, make_loader -> next_batch (batch_to_device) -> the step's tensors

A split is listed in DATA_DIR/SPLIT.txt as `<image> <label>` per line, relative to DATA_DIR
(prepare_data.py writes them). DATA_DIR/dataset.json names the classes (DatasetInfo); without
it the dataset is Cityscapes: train ids 0..18, 255 ignored. A label PNG holds train ids, or
values that the dataset's label map turns into train ids as it is read. A pack
(prepare_data.py --pack) is DATA_DIR/packed/SPLIT.json, an index, and two .npy arrays beside
it, images (N, H, W, 3) and train ids (N, H, W), uint8, read memory-mapped.

Every augmentation draw of a sample is a function of (seed, the sample's position in the
training stream), so a step's batch is the same whichever worker, device or resumed run
makes it.
"""
import argparse
import contextlib
import datetime
import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

class BadInput(Exception):
    """Bad input (a missing or corrupt file, wrong shapes, labels out of range, a stale pack,
    bad weights, a non-finite loss): the scripts' main reports it as one line, exit code 2."""


class OneLineErrors(argparse.ArgumentParser):
    """The scripts' parser: a bad flag is one line and exit code 2, as all bad input (no usage
    block; --help has it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class StalePack(BadInput):
    """The pack of a split no longer matches its list file or its source files."""


def one_line(error):
    """A BadInput's message. Raised in a DataLoader worker, the message carries the worker's
    traceback, whose last line is `data.BadInput: <message>`."""
    return re.sub(r"^data\.\w+: ", "", str(error).strip().splitlines()[-1])


def atomic_write(path, content):
    """Writes `content` (str, bytes, or a function that writes to a binary file) to a
    temporary file beside `path`, fsyncs it and renames it over `path`: a reader, or a
    crash, sees the old file or the new one, never half of one. A write cut short by
    SIGKILL leaves only the hidden `.NAME.tmpPID`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:  # a write (a full disk) names
            raise OSError(e.errno, e.strerror, str(path)) from e                   # no file: the one written
        raise


def save_png(array, path, compress_level=6):
    """An (H, W) or (H, W, 3) uint8 array as a PNG, written atomically (atomic_write).
    compress_level: zlib's, 6 PIL's default; 1 encodes a photo-like image about 4x faster
    (a 1024x2048 overlay: 110 ms, not 490) for a file about 25% larger."""
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG", compress_level=compress_level))


@contextlib.contextmanager
def folder_lock(folder, log=print):
    """Holds FOLDER/.lock while open: one line of JSON {host, pid, start}, written to a
    temporary file and hard-linked to .lock (a link fails where .lock exists, as
    O_CREAT|O_EXCL, and the lock is complete the moment it appears). Creates the folder: one
    that cannot be created or written to is BadInput naming it. A lock held by a live process,
    or by another host, is BadInput naming the holder; one of this host whose process is gone
    is taken over (logged; two runs taking over one stale lock at the same moment are not told
    apart). Removed on leaving (a normal end, an error, a handled signal), if still this one's."""
    folder = Path(folder)
    lock = folder / ".lock"
    mine = json.dumps(dict(host=socket.gethostname(), pid=os.getpid(),
                           start=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))) + "\n"
    tmp = folder / f".lock.tmp{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            tmp.write_text(mine)
            while True:
                try:
                    os.link(tmp, lock)
                    break
                except FileExistsError:
                    take_over_if_gone(lock, log)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise BadInput(f"{folder}: not a folder this run can write to ({e.strerror})") from None
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text() == mine:
                lock.unlink()


def take_over_if_gone(lock, log):
    """Removes `lock` when its process is gone (same host, no such pid); else BadInput naming
    the holder."""
    try:
        holder = json.loads(lock.read_text())
        host, pid, start = holder["host"], int(holder["pid"]), holder["start"]
    except FileNotFoundError:
        return  # released meanwhile
    except (OSError, ValueError, KeyError, TypeError):
        raise BadInput(f"{lock}: unreadable lock; remove it if no run uses {lock.parent}") from None
    alive = host != socket.gethostname()  # another host's process cannot be checked from here
    if not alive:
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            pass
        except PermissionError:  # another user's process
            alive = True
    if alive:
        raise BadInput(f"{lock.parent} is in use by pid {pid} on {host} since {start} ({lock}); "
                       f"wait for that run, choose another folder, or remove the lock if that run is gone")
    log(f"note: taking over {lock}: pid {pid} on this host (started {start}) is gone")
    lock.unlink(missing_ok=True)


def cache_dir():
    """$XDG_CACHE_HOME/bisenetv2 (default ~/.cache/bisenetv2): the synthetic datasets."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bisenetv2"


# ---------------------------------------------------------------------------------------
# The dataset's classes: DATA_DIR/dataset.json, or Cityscapes without one


class DatasetInfo(NamedTuple):
    class_names: tuple      # one str per class; len == number of classes
    colors: tuple           # one (r, g, b) per class
    ignore_index: int       # 0..255, not a train id
    label_map: dict | None  # stored label value (int) -> train id or ignore_index; None: the PNGs hold train ids
    label_ids: tuple | None  # train id -> Cityscapes label id (the official evaluator's files); None elsewhere


def cityscapes_info():
    """The 19 evaluated classes of cityscapesscripts' label table, in train id order."""
    from cityscapesscripts.helpers.labels import trainId2label
    labels = [trainId2label[train_id] for train_id in range(19)]
    return DatasetInfo(tuple(label.name for label in labels), tuple(tuple(label.color) for label in labels),
                       255, None, tuple(label.id for label in labels))


CITYSCAPES = cityscapes_info()
CITYSCAPES_CLASSES = CITYSCAPES.class_names
DATASET_FILE = "dataset.json"


def label_id_to_train_id():
    """(256,) uint8: Cityscapes label id -> train id (255 for ignored and unknown ids)."""
    table = np.full(256, 255, np.uint8)
    table[list(CITYSCAPES.label_ids)] = np.arange(len(CITYSCAPES.label_ids))
    return table


def train_id_to_label_id():
    """(256,) uint8: train id -> Cityscapes label id, the inverse of label_id_to_train_id
    (for predictions in the official evaluator's labelIds form); 0 for the rest."""
    table = np.zeros(256, np.uint8)
    table[:len(CITYSCAPES.label_ids)] = CITYSCAPES.label_ids
    return table


def fixed_palette():
    """(256, 3) uint8: the PASCAL VOC colour map (index i's bits, three at a time, spread
    over r, g, b from the high bit down): 0 black, 1 (128, 0, 0), 2 (0, 128, 0), 3 (128, 128, 0), ..."""
    palette = np.zeros((256, 3), np.uint8)
    for index in range(256):
        bits = index
        for shift in range(7, -1, -1):
            for channel in range(3):
                palette[index, channel] |= ((bits >> channel) & 1) << shift
            bits >>= 3
    return palette


def numbered_info(num_classes, ignore_index=255, class_names=None):
    """A DatasetInfo without a dataset.json: classes named class0, class1, ... (or
    class_names), fixed_palette's colours, no label map."""
    names = tuple(class_names or (f"class{i}" for i in range(num_classes)))
    return DatasetInfo(names, tuple(map(tuple, fixed_palette()[:len(names)].tolist())), ignore_index, None, None)


def info_for_classes(num_classes=None, ignore_index=255):
    """The dataset without a dataset.json: Cityscapes' for 19 classes (or None), else
    numbered classes."""
    if num_classes in (None, len(CITYSCAPES.class_names)):
        return CITYSCAPES._replace(ignore_index=ignore_index)
    return numbered_info(num_classes, ignore_index)


def dataset_palette(info):
    """(256, 3) uint8: train id -> colour: info.colors for 0..N-1, fixed_palette for the other
    indices, ignore_index black."""
    palette = fixed_palette()
    palette[:len(info.colors)] = info.colors
    palette[info.ignore_index] = 0
    return palette


def dataset_info_from_json(content, source):
    """dataset.json's content -> DatasetInfo; BadInput naming `source` and what is wrong.
    Keys: classes (required), colors (default: fixed_palette), ignore_index (default 255),
    label_map (optional). Cityscapes' 19 classes in its order, ignore index 255 and no label
    map (a checkpoint's or an export's record of Cityscapes) get Cityscapes' label ids."""
    def invalid(what):
        return BadInput(f"{source}: {what}")

    def is_int(value):
        return isinstance(value, int) and not isinstance(value, bool)

    if not isinstance(content, dict):
        raise invalid("expected a JSON object with 'classes'")
    unknown = sorted(set(content) - {"classes", "colors", "ignore_index", "label_map"})
    if unknown:
        raise invalid(f"unknown key {unknown[0]!r} (keys: classes, colors, ignore_index, label_map)")
    names = content.get("classes")
    if not (isinstance(names, list) and 1 <= len(names) <= 255 and all(isinstance(n, str) and n for n in names)):
        raise invalid("'classes' must be a list of 1 to 255 class names")
    num_classes = len(names)
    ignore_index = content.get("ignore_index", 255)
    if not (is_int(ignore_index) and num_classes <= ignore_index <= 255):
        raise invalid(f"'ignore_index' must be an integer in {num_classes}..255 (not one of the "
                      f"{num_classes} train ids), got {ignore_index!r}")
    colors = content.get("colors", fixed_palette()[:num_classes].tolist())
    if not (isinstance(colors, list) and len(colors) == num_classes and all(
            isinstance(c, list) and len(c) == 3 and all(is_int(v) and 0 <= v <= 255 for v in c) for c in colors)):
        raise invalid(f"'colors' must hold one [r, g, b] (0..255) per class, {num_classes} in all")
    label_map = content.get("label_map")
    if label_map is not None:
        if not (isinstance(label_map, dict) and label_map):
            raise invalid("'label_map' must be an object {\"stored value\": train id, ...}")
        for key, value in label_map.items():
            if not (re.fullmatch(r"[0-9]{1,3}", key) and int(key) <= 255):
                raise invalid(f"'label_map' key {key!r} is not a label value 0..255")
            if not (is_int(value) and (0 <= value < num_classes or value == ignore_index)):
                raise invalid(f"'label_map' maps {key} to {value!r}, neither a train id "
                              f"0..{num_classes - 1} nor the ignore index {ignore_index}")
        label_map = {int(key): value for key, value in label_map.items()}
    # Cityscapes' 19 classes in its order, its PNGs of train ids: its label ids (not stored)
    cityscapes = tuple(names) == CITYSCAPES.class_names and ignore_index == 255 and label_map is None
    return DatasetInfo(tuple(names), tuple(tuple(c) for c in colors), ignore_index, label_map,
                       CITYSCAPES.label_ids if cityscapes else None)


def dataset_info_json(info):
    """DatasetInfo -> dataset.json's content (label_ids are Cityscapes' own, not stored:
    dataset_info_from_json gives them back to Cityscapes' classes)."""
    content = dict(classes=list(info.class_names), colors=[list(c) for c in info.colors],
                   ignore_index=info.ignore_index)
    if info.label_map is not None:
        content["label_map"] = {str(value): train_id for value, train_id in sorted(info.label_map.items())}
    return content


def read_dataset_info(data_dir):
    """-> DatasetInfo of DATA_DIR/dataset.json, or CITYSCAPES when there is none; BadInput
    (one line naming the file and what is wrong) for a corrupt or invalid file."""
    path = Path(data_dir) / DATASET_FILE
    if not path.is_file():
        return CITYSCAPES
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BadInput(f"{path}: unreadable ({type(e).__name__}: {' '.join(str(e).split())})") from None
    return dataset_info_from_json(content, path)


def write_dataset_info(data_dir, info):
    """Writes DATA_DIR/dataset.json atomically; BadInput (and nothing written) for an info
    that read_dataset_info would reject."""
    path = Path(data_dir) / DATASET_FILE
    content = dataset_info_json(info)
    dataset_info_from_json(json.loads(json.dumps(content)), path)
    atomic_write(path, json.dumps(content, indent=1) + "\n")


def dataset_of_weights(weights, dataset_dir=None, num_classes=None):
    """-> (DatasetInfo, where it came from): the classes `weights` predict (their number,
    names, colours): DATASET_DIR's dataset.json when given (a data dir, or the file itself);
    else the dataset a project checkpoint was trained on (its config) or an ONNX export holds
    (its metadata, export.py); else Cityscapes' 19 classes, or num_classes numbered ones.
    BadInput for a missing or invalid dataset.json; a weights file that does not load is left
    to its loader."""
    if dataset_dir:
        root = Path(dataset_dir)
        root = root.parent if root.name == DATASET_FILE else root
        if not (root / DATASET_FILE).is_file():
            raise BadInput(f"--dataset {dataset_dir}: no {DATASET_FILE} there")
        return read_dataset_info(root), str(root / DATASET_FILE)
    saved = None
    try:
        if str(weights).lower().endswith(".onnx"):
            import onnx
            saved = {p.key: p.value for p in onnx.load(str(weights)).metadata_props}.get("dataset")
            saved = saved and json.loads(saved)
        elif not str(weights).lower().endswith(".pdparams"):
            config = torch.load(weights, map_location="cpu", weights_only=True).get("config")
            saved = config.get("dataset") if isinstance(config, dict) else None
    except Exception:  # the weights' own loader names what is wrong with the file
        saved = None
    if saved is not None:
        return dataset_info_from_json(saved, f"{weights} (the dataset it was trained on)"), f"{weights}'s dataset"
    return info_for_classes(num_classes), "--num-classes or Cityscapes (the weights name no dataset)"


def label_table(info):
    """(256,) int16: stored label value -> train id or ignore_index; -1 for a value the
    dataset does not allow (not in the label map nor the ignore index; without a map: not a
    train id nor the ignore index). A value that the map holds is mapped even when it is the
    ignore index (0/255 masks: --label-map 0:0 255:1)."""
    table = np.full(256, -1, np.int16)
    if info.label_map is None:
        table[:len(info.class_names)] = np.arange(len(info.class_names))
    table[info.ignore_index] = info.ignore_index
    for value, train_id in (info.label_map or {}).items():
        table[value] = train_id
    return table


# ---------------------------------------------------------------------------------------
# List files and frames


def parse_list(list_file, text):
    """-> [(line number, image, label)] of a list file's text (separated by spaces or a
    comma; blank lines skipped); BadInput on a bad line or an empty list."""
    entries = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.replace(",", " ").split()
        if len(fields) != 2:
            raise BadInput(f"{list_file}:{line_no}: expected '<image> <label>', got {line.strip()!r}")
        entries.append((line_no, fields[0], fields[1]))
    if not entries:
        raise BadInput(f"{list_file}: empty list")
    return entries


def read_list(data_dir, split):
    """-> [(image path, label path)] of DATA_DIR/SPLIT.txt; BadInput unless every file exists."""
    root = Path(data_dir)
    if not root.is_dir():
        raise BadInput(f"--data-dir {root}: no such directory")
    list_file = root / f"{split}.txt"
    if not list_file.is_file():
        raise BadInput(f"{list_file}: no such list file (prepare_data.py writes it)")
    raw = list_file.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is tolerated
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw[:e.start].count(b"\n") + 1
        raise BadInput(f"{list_file}:{line_no}: not UTF-8 text "
                       f"(byte {raw[e.start]:#04x})") from None
    pairs = []
    for line_no, image, label in parse_list(list_file, text):
        image, label = root / image, root / label
        for path in (image, label):
            if not path.is_file():
                raise BadInput(f"{list_file}:{line_no}: {path} does not exist")
        pairs.append((image, label))
    return pairs


# PIL modes of one channel of integers: what a label may be (its values are checked on reading)
LABEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # read as photos by their top 8 of 16 bits


def walk_files(top, unreadable, keep_folder=lambda folder: True):
    """-> every file under the folder `top` (linked files, not linked folders, as Path.rglob),
    the subfolders keep_folder refuses left out; unreadable(OSError) for each folder that
    cannot be listed (Path.rglob passed over them without a word), but for hidden ones and
    lost+found (a mount point's, root's) below `top`, which it passes over as before
    (prepare_data.py's and predict.py's walks)."""
    def listing_failed(error):
        name = Path(error.filename).name
        if Path(error.filename) == Path(top) or not (name.startswith(".") or name == "lost+found"):
            unreadable(error)
    files = []
    for folder, subfolders, names in os.walk(top, onerror=listing_failed):
        subfolders[:] = [name for name in subfolders if keep_folder(Path(folder) / name)]
        files += [Path(folder) / name for name in names if (Path(folder) / name).is_file()]
    return files


def photo_mode_problem(mode):
    """-> why read_photo (photo_array) refuses images of PIL `mode`, or None."""
    if mode == "F":
        return "32-bit float greyscale (mode F) has no fixed range; save the photo as 8- or 16-bit"
    if mode.startswith("I;") and mode not in WIDE_GREY_MODES:
        return f"greyscale of mode {mode} is not supported; save the photo as 8- or 16-bit"
    return None


def label_mode_problem(mode):
    """-> why read_frame refuses labels of PIL `mode`, or None."""
    return None if mode in LABEL_MODES else f"label image has mode {mode}, expected one channel of label values"


def read_photo(path):
    """-> the image at `path` as (H, W, 3) uint8 RGB, the one rule of training, evaluation,
    packing and predict.py (photo_array). BadInput naming the file for an unreadable image, or
    one photo_array refuses."""
    try:
        with Image.open(path) as im:
            return photo_array(im, path)
    except BadInput:
        raise
    except Exception as e:  # PIL raises several types for truncated or foreign files
        raise BadInput(f"{path}: unreadable image ({type(e).__name__})") from None


def photo_array(im, name):
    """An opened PIL image -> (H, W, 3) uint8 RGB: 8-bit images as PIL's convert('RGB')
    (greyscale and palette expanded, alpha dropped); 16-bit greyscale (PIL modes I;16, I;16B,
    ...) and 32-bit integer greyscale (mode I, how some 16-bit files load) holding 0..65535 by
    their top 8 bits (value >> 8, i.e. the 8-bit image of the same full range) in all three
    channels. BadInput naming `name` for float greyscale (mode F), or mode I values outside
    0..65535; PIL's own errors for a file it cannot decode."""
    if problem := photo_mode_problem(im.mode):
        raise BadInput(f"{name}: {problem}")
    if im.mode not in WIDE_GREY_MODES:
        return np.asarray(im.convert("RGB"))
    values = np.asarray(im)
    if values.min() < 0 or values.max() > 65535:
        raise BadInput(f"{name}: 32-bit greyscale values {values.min()}..{values.max()} are outside 0..65535")
    grey = (values.astype(np.int64) >> 8).astype(np.uint8)  # (H, W)
    return np.repeat(grey[:, :, None], 3, axis=2)           # (H, W, 3)


def hxw(size):
    """A PIL (width, height) size as the messages write sizes: HxW, height first, as --crop-size
    H W and tensors' shapes."""
    return f"{size[1]}x{size[0]}"


def check_same_size(image_path, image_size, label_path, label_size):
    """BadInput unless an image and its label have one (width, height)."""
    if image_size != label_size:
        raise BadInput(f"{image_path}: image is {hxw(image_size)} but its label {label_path} is {hxw(label_size)}")


def check_headers(pairs):
    """Reads only the headers of every listed image and label (not their pixels): BadInput
    naming the first file that does not open, has a mode read_frame refuses, or differs in
    size from its partner. What evaluation checks at start, before training. -> the images'
    (width, height)."""
    image_sizes = []
    for image_path, label_path in pairs:
        sizes = []
        for path, mode_problem in ((image_path, photo_mode_problem), (label_path, label_mode_problem)):
            try:
                with Image.open(path) as im:
                    mode, size = im.mode, im.size
            except Exception as e:
                raise BadInput(f"{path}: unreadable image ({type(e).__name__})") from None
            if problem := mode_problem(mode):
                raise BadInput(f"{path}: {problem}")
            sizes.append(size)
        check_same_size(image_path, sizes[0], label_path, sizes[1])
        image_sizes.append(sizes[0])
    return image_sizes


def read_label(label_path):
    """-> (H, W) uint8: the stored values of a label PNG; BadInput naming the file when it is
    unreadable, has several channels or values beyond 0..255."""
    try:
        with Image.open(label_path) as im:
            mode = im.mode
            label = None if label_mode_problem(mode) else np.array(im)  # writable, for torch
    except Exception as e:
        raise BadInput(f"{label_path}: unreadable image ({type(e).__name__})") from None
    if label is None:
        raise BadInput(f"{label_path}: {label_mode_problem(mode)}")
    if label.dtype != np.uint8:
        if label.min() < 0 or label.max() > 255:
            bad = np.unique(label[(label < 0) | (label > 255)])
            raise BadInput(f"{label_path}: values {bad[:8].tolist()} are beyond the label values 0..255")
        label = label.astype(np.uint8)
    return label


def stored_values(label):
    """(256,) bool: which values occur in a (H, W) uint8 label."""
    return np.bincount(label.ravel(), minlength=256) > 0


def disallowed_values(label_path, present, info):
    """BadInput naming the file and its first values that `info` does not allow (present:
    (256,) bool, stored_values), or None when all are allowed."""
    bad = np.flatnonzero(present & (label_table(info) < 0))
    if not bad.size:
        return None
    if info.label_map is None:
        allowed = f"neither train ids 0..{len(info.class_names) - 1} nor {info.ignore_index}"
    else:
        allowed = f"neither in the label map {sorted(info.label_map)} nor the ignore index {info.ignore_index}"
    return BadInput(f"{label_path}: values {bad[:8].tolist()} are {allowed}")


def read_frame(image_path, label_path, info):
    """-> image (H, W, 3) uint8 RGB (read_photo), label (H, W) uint8 train ids (the stored values through
    label_table(info)). BadInput naming the file for an unreadable image, a label of several
    channels, values the dataset does not allow, or image and label of different sizes."""
    image, label = read_photo(image_path), read_label(label_path)
    check_same_size(image_path, image.shape[1::-1], label_path, label.shape[::-1])
    error = disallowed_values(label_path, stored_values(label), info)
    if error:
        raise error
    if info.label_map is not None:
        label = label_table(info).astype(np.uint8)[label]
    return image, label


def _label_counts(task):
    pair, info = task
    return np.bincount(read_frame(*pair, info)[1].ravel(), minlength=256)


def class_pixel_counts(pairs, pack, info, workers):
    """(classes,) int64: the pixels of each class in a split's labels (train ids), from the
    pack's label array when there is one, else from the PNGs, read by `workers` processes."""
    num_classes = len(info.class_names)
    if pack is not None:
        labels = np.load(pack["labels_path"], mmap_mode="r")
        return sum(np.bincount(frame.ravel(), minlength=256) for frame in labels)[:num_classes].astype(np.int64)
    tasks = [(pair, info) for pair in pairs]
    if workers < 2:
        return sum(map(_label_counts, tasks))[:num_classes].astype(np.int64)
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return sum(pool.imap_unordered(_label_counts, tasks, chunksize=8))[:num_classes].astype(np.int64)


def image_tensor(image):
    """(H, W, 3) uint8 numpy -> (3, H, W) float32 tensor in [0, 255]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()


def normalize(images):
    """[0, 255] float -> PaddleSeg's Normalize(mean 0.5, std 0.5) of x / 255: (x / 255 - 0.5)
    / 0.5, its three float roundings (one new tensor, then in place)."""
    return images.div(255.0).sub_(0.5).div_(0.5)


def normalize_table(device):
    """(256,) float32 on `device`: normalize's value of each uint8 code, computed on the CPU
    (CUDA divides by a scalar as a product with its reciprocal, which rounds differently)."""
    return normalize(torch.arange(256.0)).to(device)


def normalize_photos(photos, table):
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32 (channels_last strides), normalised by
    `table` (normalize_table) on its device: normalize's bits, a quarter of the bytes to copy."""
    if photos.dtype != torch.uint8 or photos.dim() != 4 or photos.shape[-1] != 3:
        raise ValueError(f"photos must be (N, H, W, 3) uint8 RGB, got {tuple(photos.shape)} {photos.dtype}")
    codes = photos.to(table.device).reshape(-1).int()
    return table.index_select(0, codes).view(photos.shape).permute(0, 3, 1, 2)


def eval_sample(pair, info, config):
    """An evaluation frame at full resolution: image (H, W, 3) uint8 RGB (normalize_photos on
    the device), label (H, W) uint8."""
    image, label = read_frame(*pair, info)
    return torch.from_numpy(np.require(image, requirements="W")), torch.from_numpy(label)  # PIL's arrays are read-only


# ---------------------------------------------------------------------------------------
# Packs (reading; prepare_data.pack_split writes them)

PACK_FORMAT = 1
PACK_KEYS = ("count", "height", "width", "num_classes", "ignore_index", "list_sha256", "files", "stamps",
             "images", "labels")  # besides "format" (prepare_data.pack_split writes them)


def pack_dir(data_dir):
    return Path(data_dir) / "packed"


def file_stamps(data_dir, names):
    """[[size, mtime_ns] per file]: what tells a changed source file."""
    return [[stat.st_size, stat.st_mtime_ns] for stat in (Path(data_dir, name).stat() for name in names)]


def pack_labels_key(info):
    """What a pack's train ids depend on besides the files: (number of classes, ignore index,
    label map as in dataset.json or None)."""
    return len(info.class_names), info.ignore_index, dataset_info_json(info).get("label_map")


def describe_labels_key(key):
    """pack_labels_key's tuple in words."""
    num_classes, ignore_index, label_map = key
    return f"{num_classes} classes, ignore index {ignore_index}" + (f", label map {label_map}" if label_map else "")


def read_pack(data_dir, split, info, mmap=True):
    """-> the index of DATA_DIR/packed/SPLIT.json, with `path` (the index), `images_path`,
    `labels_path` and `images` (N, H, W, 3), `labels` (N, H, W): read-only uint8 memory maps
    (None with mmap=False). FileNotFoundError when there is no pack; StalePack naming the
    reason when the list file, a source file or the dataset's classes, ignore index or label
    map (info: DatasetInfo) changed since packing, or the arrays are missing or mis-shaped."""
    root = Path(data_dir)
    index_path = pack_dir(root) / f"{split}.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: no pack")
    try:
        index = json.loads(index_path.read_text())
        assert index["format"] == PACK_FORMAT
    except Exception:
        raise StalePack(f"{index_path}: unreadable or of another format") from None
    if missing := [key for key in PACK_KEYS if key not in index]:
        raise StalePack(f"{index_path}: the index lacks {', '.join(missing)}")
    if not len(index["files"]) == index["count"] == len(index["stamps"]) / 2:  # 2 files per frame
        raise StalePack(f"{index_path}: the index lists {len(index['files'])} frames' files and "
                        f"{len(index['stamps'])} file stamps for {index['count']} frames")
    list_file = root / f"{split}.txt"
    if not list_file.is_file() or hashlib.sha256(list_file.read_bytes()).hexdigest() != index["list_sha256"]:
        raise StalePack(f"{index_path}: {list_file.name} changed since it was packed")
    packed_for = (index["num_classes"], index["ignore_index"], index.get("label_map"))
    if packed_for != pack_labels_key(info):
        raise StalePack(f"{index_path}: packed for {describe_labels_key(packed_for)}, "
                        f"not {describe_labels_key(pack_labels_key(info))}")
    names = [name for pair in index["files"] for name in pair]
    try:
        stamps = file_stamps(root, names)
    except OSError as e:
        raise StalePack(f"{index_path}: a source file is gone ({e.filename})") from None
    changed = [name for name, old, new in zip(names, index["stamps"], stamps) if old != new]
    if changed:
        raise StalePack(f"{index_path}: {changed[0]} changed since it was packed")
    shape = (index["count"], index["height"], index["width"])
    arrays = dict(images_path=pack_dir(root) / index["images"], labels_path=pack_dir(root) / index["labels"])
    for key, expected in (("images", (*shape, 3)), ("labels", shape)):
        try:
            array = np.load(arrays[f"{key}_path"], mmap_mode="r")
        except (OSError, ValueError) as e:
            raise StalePack(f"{index_path}: {index[key]} unreadable ({type(e).__name__})") from None
        if array.shape != expected or array.dtype != np.uint8:
            raise StalePack(f"{index_path}: {index[key]} is {array.dtype} {array.shape}, expected uint8 {expected}")
        arrays[key] = array if mmap else None
    return dict(index, path=index_path, **arrays)


def find_pack(data_dir, split, info):
    """-> read_pack's index (arrays not opened), or None when there is no pack. A stale pack
    is bad input: training on it would silently use other data."""
    try:
        return read_pack(data_dir, split, info, mmap=False)
    except FileNotFoundError:
        return None
    except StalePack as e:
        raise BadInput(f"stale pack: {e}; re-run prepare_data.py --pack (or train with --no-pack)") from None


# ---------------------------------------------------------------------------------------
# Augmentation: PaddleSeg's ResizeStepScaling, RandomPaddingCrop, RandomHorizontalFlip,
# RandomDistort, Normalize. The draws are plain numbers made on the host; the same batched
# tensor code applies them per sample in a worker or to a whole batch on the GPU.


def draw_augmentation(rng, height, width, config):
    """Every random choice of one sample's augmentation, in PaddleSeg's order (uses
    config.min_scale, max_scale, scale_step, crop_size)."""
    if config.min_scale == config.max_scale:
        scale = config.min_scale
    elif config.scale_step == 0:  # PaddleSeg's continuous draw
        scale = float(rng.uniform(config.min_scale, config.max_scale))
    else:  # PaddleSeg's count of steps, a floor: 0.5..2.0 by 0.4 is 0.5, 1.0, 1.5, 2.0
        num_scales = int((config.max_scale - config.min_scale) / config.scale_step + 1)
        scale = float(rng.choice(np.linspace(config.min_scale, config.max_scale, num_scales)))
    scaled_h, scaled_w = int(round(scale * height)), int(round(scale * width))
    crop_h, crop_w = config.crop_size
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


def sample_params(position, height, width, config):
    """The draws of the sample at stream `position`: a function of (config.seed, position)."""
    return draw_augmentation(np.random.default_rng([config.seed, position]), height, width, config)


def to_device(tensor, device):
    """A small host tensor on `device` without a CPU-GPU sync point: a copy from pageable
    memory waits for the stream (i.e. for the previous step), one through pinned memory with
    non_blocking=True does not (the augmentation on the GPU is part of the sync-free step)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def luminance(image):
    """PIL's convert('L') of integer-valued RGB images (..., 3, H, W) in [0, 255] -> (..., 1,
    H, W): (19595 r + 38470 g + 7471 b + 2^15) >> 16, ITU-R 601-2 in 16-bit fixed point. In
    float32 every partial sum is an integer below 2^24, so the result is PIL's to the bit."""
    red, green, blue = image.unbind(-3)
    return torch.floor((red * 19595 + green * 38470 + blue * 7471 + 32768) / 65536).unsqueeze(-3)


def blend(base, images, factor):
    """PIL's Image.blend(base, images, factor) of uint8 images, in float32: base + factor *
    (images - base), clipped to [0, 255] and truncated (PIL's C: one float rounding each for
    the product and the sum, then the cast to UINT8)."""
    return (base + factor * (images - base)).clamp(0, 255).floor()


# Which of (value, p, q, t) each RGB channel takes in each sixth of the hue circle (Pillow's
# hsv2rgb, colorsys's order).
HSV_SECTOR_CHANNELS = ((0, 3, 1), (2, 0, 1), (1, 0, 3), (1, 2, 0), (3, 1, 0), (0, 1, 2))


def shift_hue(images, delta):
    """PaddleSeg's hue op, to PIL's bits: PIL's convert('HSV') of integer-valued RGB images
    (n, 3, H, W) in [0, 255], the uint8 hue plus delta ((n, 1, 1) float64) cast back to uint8
    as numpy does on x86-64 (truncated toward zero, then modulo 256), PIL's HSV -> RGB.
    Pillow's C (Convert.c: rgb2hsv_row, hsv2rgb) mixes float variables and double arithmetic:
    here every step is float64, rounded to float32 where C stores a float (exact: a float
    op's double result rounded to float is the float op's). Divisions are by device tensors:
    CUDA divides by a Python number as a multiply by its reciprocal."""
    def as_float(x):  # a C float variable
        return x.float().double()

    def constant(value):
        return torch.full((), value, dtype=torch.float64, device=images.device)

    red, green, blue = images.double().unbind(-3)
    value, low = torch.maximum(red, torch.maximum(green, blue)), torch.minimum(red, torch.minimum(green, blue))
    grey = value == low
    span = torch.where(grey, 1.0, value - low)
    saturation = as_float(span / torch.where(value > 0, value, 1.0))
    to_red, to_green, to_blue = (as_float((value - channel) / span) for channel in (red, green, blue))
    hue = torch.where(red == value, as_float(to_blue - to_green),
                      torch.where(green == value, as_float(2.0 + to_red - to_blue), as_float(4.0 + to_green - to_red)))
    hue = as_float(torch.fmod(hue / constant(6.0) + 1.0, 1.0))
    hue_byte = torch.where(grey, 0.0, torch.trunc(hue * 255.0).clamp(0, 255))
    saturation_byte = torch.where(grey, 0.0, torch.trunc(saturation * 255.0).clamp(0, 255))
    hue_byte = torch.remainder(torch.trunc(hue_byte + delta), 256.0)  # numpy's float64 -> uint8
    position = hue_byte * 6.0 / constant(255.0)                        # 0..6: the sector and where in it
    sector = torch.floor(position)
    within = as_float(position - sector)
    saturation_fraction = as_float(saturation_byte / constant(255.0))
    # C's round() of x >= 0: floor(x + 0.5) differs only within 2^-54 below a half, where no
    # p, q or t comes (checked over every colour)
    c_round = lambda x: torch.floor(x + 0.5).clamp(0, 255)
    p = c_round(value * (1.0 - saturation_fraction))
    q = c_round(value * (1.0 - as_float(saturation_fraction * within)))
    t = c_round(value * (1.0 - saturation_fraction * (1.0 - within)))
    candidates = torch.stack([value, p, q, t], -3)                                  # (n, 4, H, W)
    table = to_device(torch.tensor(HSV_SECTOR_CHANNELS), images.device)             # (6, 3)
    choice = table[sector.long() % 6].movedim(-1, -3)                                # (n, 3, H, W)
    rgb = candidates.gather(-3, choice)
    return torch.where((saturation_byte == 0).unsqueeze(-3), value.unsqueeze(-3), rgb).float()


DISTORT_FACTORS = ("brightness", "contrast", "saturation", "hue")


def distort_op(op, images, factor):
    """RandomDistort's op `op` on integer-valued images (n, 3, H, W) in [0, 255], to PIL's
    bits (ImageEnhance; the hue as PaddleSeg shifts PIL's HSV); factor (n, 1, 1, 1) float64,
    as numpy draws it (PIL's blends take it as a C float)."""
    if op == 3:
        return shift_hue(images, factor[:, 0])
    factor = factor.float()
    if op == 0:    # brightness: blend with black
        return blend(0.0, images, factor)
    if op == 1:    # contrast: blend with each image's mean grey level, rounded (PIL's int(mean + 0.5))
        grey = luminance(images)
        pixels = grey.shape[-2] * grey.shape[-1]
        total = grey.sum((-3, -2, -1), keepdim=True, dtype=torch.float64).long()  # exact: integers < 2^53
        return blend(((2 * total + pixels) // (2 * pixels)).to(images.dtype), images, factor)
    return blend(luminance(images), images, factor)  # saturation: blend with the grey image


def distort_batch(images, params_list):
    """PaddleSeg's RandomDistort on float RGB images (B, 3, H, W) in [0, 255], one params
    dict per image, on PaddleSeg's uint8 image: the input truncated to integers first (its
    astype('uint8'), applied or not: the padding's 127.5 becomes 127), then the ops, each to
    PIL's bits (distort_op). Batched: at each of the 4 places of the random order, each op
    runs once on the images that have it there and applied (chosen on the host from the
    params)."""
    batch = images.shape[0]
    images = images.clamp(0, 255).floor()
    factors = to_device(torch.tensor([[p.get(name, 0.0) for name in DISTORT_FACTORS] for p in params_list],
                                     dtype=torch.float64), images.device)            # (B, 4)
    for place in range(max(len(p["distort_order"]) for p in params_list)):
        for op in range(4):
            chosen = [b for b, p in enumerate(params_list) if place < len(p["distort_order"])
                      and p["distort_order"][place] == op and p["distort_apply"][op]]
            if not chosen:
                continue
            if len(chosen) == batch:
                images = distort_op(op, images, factors[:, op].view(batch, 1, 1, 1))
                continue
            index = to_device(torch.tensor(chosen), images.device)
            factor = factors[index, op].view(len(chosen), 1, 1, 1)
            images.index_copy_(0, index, distort_op(op, images[index], factor))
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
    a GPU, one op at a time)."""
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


def resized_crops(images, labels, params_list, crop_size, ignore_index=255):
    """images (B, 3, H, W) in [0, 255] (uint8 or float), labels (B, H, W) uint8, on any
    device; one params dict per sample (draw_augmentation) -> float32 images (B, 3, h, w)
    in [0, 255] and uint8 labels (B, h, w), (h, w) = crop_size: ResizeStepScaling,
    RandomPaddingCrop and RandomHorizontalFlip.

    The resize is computed for the crop window only: gathers along rows, then columns, with
    the taps of `F.interpolate(bilinear / nearest, align_corners=False)` (cv2's INTER_LINEAR /
    INTER_NEAREST, as PaddleSeg resizes: no antialiasing). Padding: image 127.5, label 255."""
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
    out = torch.where(inside[:, None], out, torch.full_like(out, 127.5))
    label_rows = labels.gather(1, y_near[:, :, None].expand(batch, crop_h, width))
    out_labels = label_rows.gather(2, x_near[:, None, :].expand(batch, crop_h, crop_w))
    out_labels = torch.where(inside, out_labels, torch.full_like(out_labels, ignore_index))
    return out, out_labels


def augment_batch(images, labels, params_list, crop_size, ignore_index=255):
    """PaddleSeg's training augmentation of a batch: resized_crops, then RandomDistort and
    Normalize -> normalised float32 images (B, 3, h, w) and uint8 labels (B, h, w)."""
    crops, out_labels = resized_crops(images, labels, params_list, crop_size, ignore_index)
    return normalize(distort_batch(crops, params_list)), out_labels


def augment(image, label, params, crop_size, ignore_index=255):
    """One sample: image (3, H, W), label (H, W) -> augment_batch's result for it."""
    images, labels = augment_batch(image[None], label[None], [params], crop_size, ignore_index)
    return images[0], labels[0]


# ---------------------------------------------------------------------------------------
# Dataset, sampler, loader


class TrainSet(torch.utils.data.Dataset):
    """Items are addressed by (index, stream position); the position seeds the sample's
    augmentation.

    Frames come from the PNGs of `pairs` (train ids through the label map of `info`, a
    DatasetInfo) or, given `pack` (find_pack's index), from its memory-mapped arrays (opened
    lazily in each worker). raw=False: the item is the augmented sample (image (3, h, w)
    float32, label (h, w) uint8). raw=True: the frame, image (H, W, 3) uint8, label (H, W)
    uint8, and the position, for batch_to_device to augment the whole batch on the training
    device."""

    def __init__(self, pairs, info, config, pack=None, raw=False):
        self.pairs, self.info, self.config, self.raw = pairs, info, config, raw
        self.pack_files = None if pack is None else (pack["images_path"], pack["labels_path"])
        self.length = len(pairs) if pack is None else pack["count"]
        self._arrays = None

    def __len__(self):
        return self.length

    def frame(self, index):
        """-> image (H, W, 3) uint8, label (H, W) uint8 numpy arrays of frame `index`."""
        if self.pack_files is None:
            return read_frame(*self.pairs[index], self.info)
        if self._arrays is None:
            self._arrays = [np.load(path, mmap_mode="r") for path in self.pack_files]
        images, labels = self._arrays
        return np.array(images[index]), np.array(labels[index])  # copies out of the page cache

    def __getitem__(self, item):
        index, position = item
        image, label = self.frame(index)
        if self.raw:
            return torch.from_numpy(image), torch.from_numpy(label), position
        params = sample_params(position, image.shape[0], image.shape[1], self.config)
        return augment(image_tensor(image), torch.from_numpy(label), params, self.config.crop_size,
                       self.config.ignore_index)


def collate_raw(items):
    """TrainSet(raw=True) items -> images (B, H, W, 3) uint8, labels (B, H, W) uint8,
    positions (B,) int64. The frames of a batch must have one size."""
    sizes = {tuple(image.shape) for image, _, _ in items}
    if len(sizes) > 1:
        raise BadInput(f"--aug-device cuda needs frames of one size, a batch has {sorted(sizes)}")
    # default_collate stacks straight into shared memory in a worker process
    return torch.utils.data.default_collate(items)


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


def make_loader(pairs, pack, info, config, rank, world_size, start_iter):
    """The DataLoader of this rank's host batches for iterations start_iter .. config.iters - 1
    (info: read_dataset_info's DatasetInfo; uses config.seed, batch_size, num_workers, aug_device,
    device and the augmentation's settings). aug_device 'cuda': the workers only read raw uint8
    frames (collate_raw)."""
    raw = config.aug_device == "cuda"
    dataset = TrainSet(pairs, info, config, pack=pack, raw=raw)
    sampler = StepSampler(len(dataset), config.batch_size, rank, world_size, config.seed, start_iter, config.iters)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=config.num_workers, collate_fn=collate_raw if raw else None,
        pin_memory=torch.device(config.device).type == "cuda", worker_init_fn=leave_process_group,
        prefetch_factor=4 if config.num_workers > 0 else None)


def leave_process_group(worker_id):
    """A Ctrl-C or a SIGTERM to the process group is the main process's to handle (it saves and
    stops); a worker it killed would fail the batch in flight. In a group of its own, a worker
    still ends when the DataLoader signals it directly."""
    os.setpgrp()


COPY_STREAMS = {}  # device -> the side stream that copies batches in


def copy_batch_in(tensors, device):
    """Host (pinned) batch tensors -> `device`. On CUDA the copies run on a side stream that
    the current stream then waits for: the host runs ahead of the GPU, so the next batch's
    copy overlaps the previous step's kernels instead of queueing behind them.
    record_stream keeps the allocator from reusing the copies' memory too early."""
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


def batch_to_device(batch, device, config):
    """A make_loader batch -> the step's normalised images (B, 3, h, w) (channels_last when
    config.channels_last) and labels (B, h, w) on `device`. With aug_device 'cuda' the raw
    frames are augmented there, the whole batch at once, with TrainSet's draws."""
    if config.aug_device == "cuda":
        images, labels, positions = batch
        images, labels = copy_batch_in((images, labels), device)
        height, width = images.shape[1:3]
        params = [sample_params(p, height, width, config) for p in positions.tolist()]
        images = images.permute(0, 3, 1, 2).contiguous()  # (B, H, W, 3) -> (B, 3, H, W): coalesced row gathers
        images, labels = augment_batch(images, labels, params, config.crop_size, config.ignore_index)
    else:
        images, labels = copy_batch_in(batch, device)
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def next_batch(batches, device, config):
    """The next batch of a make_loader iterator on `device` (batch_to_device) -> images,
    labels, and the seconds the host waited for the loader (the reader cost)."""
    start = time.perf_counter()
    try:
        batch = next(batches)
    except Exception as e:
        # the run is over: stop the workers now, which also stops torch's SIGCHLD handler from
        # raising again, anywhere in the unwinding, for a worker that died
        if shutdown := getattr(batches, "_shutdown_workers", None):
            shutdown()
        if isinstance(e, (ConnectionError, EOFError)):  # a worker died too recently for the DataLoader's check
            raise RuntimeError(f"DataLoader worker exited while handing over a batch ({type(e).__name__})") from e
        raise
    waited = time.perf_counter() - start
    return *batch_to_device(batch, device, config), waited
