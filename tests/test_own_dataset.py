"""Your own dataset: prepare_data.py --images/--labels/--out (pairing, split, label scan,
dataset.json), the label map applied as labels are read and packed, bad input through the
command line."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import prepare_data
from conftest import ROOT
from datasets import make_binary_folders


def prepare(*argv):
    return subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), *map(str, argv)],
                          capture_output=True, text=True)


def prepare_here(*argv):
    """prepare_data.py's main in this process (the setup of a test; bad input goes through
    the command line)."""
    assert prepare_data.main(list(map(str, argv))) == 0


def assert_one_line_error(result, *fragments):
    """Exit code 2 and the error in one line, the last (after the progress lines, if any)."""
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("prepare_data.py: error: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in error, error


def list_pairs(root, split):
    return [line.split(" ") for line in (root / f"{split}.txt").read_text().splitlines()]


def test_binary_masks_become_train_ids_and_pack(tmp_path):
    images, masks = make_binary_folders(tmp_path / "mine", n=10)
    out = tmp_path / "prepared"
    result = prepare("--images", images, "--labels", masks, "--out", out, "--label-map", "0:0", "255:1",
                     "--val-fraction", "0.2", "--seed", "3", "--num-workers", "2", "--pack")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "frames: train 8, val 2"
    train, val = list_pairs(out, "train"), list_pairs(out, "val")
    # paths relative to the root, here leading out of it; sorted; a split of all ten frames
    assert train == sorted(train) and val == sorted(val)
    assert all(image.startswith("../mine/images/") and label.startswith("../mine/masks/")
               for image, label in train + val)
    stems = sorted(image.split("/")[-1] for image, _ in train + val)
    assert stems == [f"frame{i:03d}.jpg" for i in range(10)]
    assert all(image.split("/")[-1][:-4] == label.split("/")[-1][:-4] for image, label in train + val)
    assert ["../mine/images/more/frame009.jpg", "../mine/masks/more/frame009.png"] in train + val
    assert json.loads((out / "dataset.json").read_text()) == dict(
        classes=["class0", "class1"], colors=[[0, 0, 0], [128, 0, 0]], ignore_index=255,
        label_map={"0": 0, "255": 1})
    info = data.read_dataset_info(out)
    assert info == data.DatasetInfo(("class0", "class1"), ((0, 0, 0), (128, 0, 0)), 255, {0: 0, 255: 1}, None)
    for split in ("train", "val"):
        pack = data.read_pack(out, split, info)
        for i, (image_path, label_path) in enumerate(data.read_list(out, split)):
            image, label = data.read_frame(image_path, label_path, info)
            stored = np.asarray(Image.open(label_path))
            np.testing.assert_array_equal(label, (stored == 255).astype(np.uint8))  # train ids 0/1
            assert {0, 1} == set(np.unique(label).tolist())
            np.testing.assert_array_equal(pack["images"][i], image)
            np.testing.assert_array_equal(pack["labels"][i], label)
    # the split is a function of --seed: the same seed, the same lists
    prepare_here("--images", images, "--labels", masks, "--out", tmp_path / "again", "--label-map", "0:0",
                 "255:1", "--val-fraction", "0.2", "--seed", "3", "--num-workers", "1")
    assert list_pairs(tmp_path / "again", "val") == val


def test_classes_and_val_folders(tmp_path):
    """--classes names the classes; --val-images/--val-labels give val; no map: the PNGs hold
    train ids; a value beyond --classes is named."""
    images, masks = make_binary_folders(tmp_path / "train", n=3)
    val_images, val_masks = make_binary_folders(tmp_path / "val", n=2, seed=1)
    for folder in (masks, val_masks):
        for path in folder.rglob("*.png"):
            stored = np.asarray(Image.open(path))
            Image.fromarray(np.where(stored == 255, 2, 0).astype(np.uint8)).save(path)  # train ids 0 and 2
    out = tmp_path / "out"
    common = ["--images", images, "--labels", masks, "--val-images", val_images, "--val-labels", val_masks,
              "--out", out, "--num-workers", "1"]
    prepare_here(*common, "--classes", "background", "road", "car")
    assert len(data.read_list(out, "train")) == 3 and len(data.read_list(out, "val")) == 2
    info = data.read_dataset_info(out)
    assert info.class_names == ("background", "road", "car") and info.label_map is None
    palette = data.dataset_palette(info)  # the classes' colours, then the fixed palette, ignore black
    assert palette[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]] and not palette[255].any()
    _, label = data.read_frame(*data.read_list(out, "val")[0], info)
    assert set(np.unique(label).tolist()) == {0, 2}
    assert_one_line_error(prepare(*common, "--classes", "background", "road"), "frame000.png: values [2] are "
                          "neither train ids 0..1 nor 255")


def test_unpaired_files_are_named(tmp_path):
    images, masks = make_binary_folders(tmp_path / "mine", n=6)
    (masks / "frame004.png").unlink()
    (images / "frame001.jpg").rename(images / "frame001_copy.jpg")
    out = tmp_path / "out"
    assert_one_line_error(prepare("--images", images, "--labels", masks, "--out", out),
                          "3 unpaired file(s):", "frame001_copy.jpg", "frame004.jpg", "frame001.png")
    assert not out.exists()


def test_unmapped_label_value_is_named(tmp_path):
    images, masks = make_binary_folders(tmp_path / "mine", n=4)
    stored = np.asarray(Image.open(masks / "frame002.png")).copy()
    stored[0, 0] = 7
    Image.fromarray(stored).save(masks / "frame002.png")
    out = tmp_path / "out"
    assert_one_line_error(prepare("--images", images, "--labels", masks, "--out", out, "--label-map", "0:0", "255:1"),
                          "frame002.png: values [7] are neither in the label map [0, 255] nor the ignore index 255")
    assert not (out / "train.txt").exists() and not (out / "dataset.json").exists()


def test_image_and_mask_of_other_sizes_are_named(tmp_path):
    images, masks = make_binary_folders(tmp_path / "mine", n=4)
    Image.fromarray(np.zeros((24, 30), np.uint8)).save(masks / "frame001.png")
    out = tmp_path / "out"
    assert_one_line_error(prepare("--images", images, "--labels", masks, "--out", out, "--label-map", "0:0", "255:1"),
                          "frame001.jpg: image is 24x32 but its label", "frame001.png is 24x30")
    assert not (out / "train.txt").exists()


def test_class_count_mistakes_are_named(tmp_path):
    """0/255 masks without a map: one class; a map to a class beyond --classes."""
    images, masks = make_binary_folders(tmp_path / "mine", n=4)
    with pytest.raises(data.BadInput, match="one class .* need --label-map 0:0 255:1"):  # 255 ignored: one class left
        prepare_data.prepare_folders(images, masks, tmp_path / "out", num_workers=1, log=lambda *a: None)
    assert_one_line_error(prepare("--images", images, "--labels", masks, "--out", tmp_path / "out",
                                  "--classes", "background", "object", "--label-map", "0:0", "255:2"),
                          "--label-map 255:2: class 2, but there are 2 classes (0..1)")


def test_pack_of_frames_of_several_sizes_is_refused_and_png_reading_stays(tmp_path):
    images, masks = make_binary_folders(tmp_path / "mine", n=4)
    Image.fromarray(np.zeros((20, 32, 3), np.uint8)).save(images / "frame002.jpg")
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(masks / "frame002.png")
    out = tmp_path / "out"
    prepare_here("--images", images, "--labels", masks, "--out", out, "--label-map", "0:0", "255:1",
                 "--val-images", images, "--val-labels", masks, "--num-workers", "1")
    assert_one_line_error(prepare("--data-dir", out, "--pack"), "train.txt: not packed: frames differ in size",
                          "frame000.jpg is 24x32, ", "frame002.jpg is 20x32: 1 of 4 frames differ",
                          "stays usable unpacked")
    assert not list((out / "packed").glob("*.npy"))
    info = data.read_dataset_info(out)
    assert data.find_pack(out, "train", info) is None
    sizes = {data.read_frame(*pair, info)[1].shape for pair in data.read_list(out, "train")}
    assert sizes == {(24, 32), (20, 32)}


def test_a_value_not_in_the_map_at_load_time_is_named(tmp_path):
    """A mask changed after prepare_data.py: packing (and reading) names the file and the value."""
    images, masks = make_binary_folders(tmp_path / "mine", n=4)
    out = tmp_path / "out"
    prepare_here("--images", images, "--labels", masks, "--out", out, "--label-map", "0:0", "255:1",
                 "--val-fraction", "0.5", "--num-workers", "1")
    label = out / data.read_list(out, "train")[1][1]
    stored = np.asarray(Image.open(label)).copy()
    stored[3, 4] = 1
    Image.fromarray(stored).save(label)
    assert_one_line_error(prepare("--data-dir", out, "--pack", "--num-workers", "1"),
                          f"{label.name}: values [1] are neither in the label map [0, 255] nor the ignore index 255")
    with pytest.raises(data.BadInput, match=rf"{label.name}: values \[1\]"):
        data.read_frame(*data.read_list(out, "train")[1], data.read_dataset_info(out))


def test_corrupt_dataset_json_is_named(tmp_path):
    images, masks = make_binary_folders(tmp_path / "mine", n=4)
    out = tmp_path / "out"
    prepare_here("--images", images, "--labels", masks, "--out", out, "--label-map", "0:0", "255:1",
                 "--num-workers", "1")
    content = json.loads((out / "dataset.json").read_text())
    (out / "dataset.json").write_text(json.dumps(dict(content, label_map={"0": 0, "255": 5})))
    assert_one_line_error(prepare("--data-dir", out, "--pack"),
                          "dataset.json: 'label_map' maps 255 to 5, neither a train id 0..1 nor the ignore index 255")
    (out / "dataset.json").write_text('{"classes": ["a", "b"],')
    with pytest.raises(data.BadInput, match="dataset.json: unreadable \\(JSONDecodeError"):
        data.read_dataset_info(out)


def colour_and_wide_masks(root, n=4, size=(20, 28)):
    """Photos with RGB colour masks (black, a road colour, a person colour) and the same
    masks as 16-bit greyscale (0, 1000, 2000). -> (images, colour masks, 16-bit masks, train ids)."""
    rng = np.random.default_rng(1)
    colours = np.array([(0, 0, 0), (128, 64, 128), (220, 20, 60)], np.uint8)
    folders = [root / name for name in ("images", "colour", "wide")]
    for folder in folders:
        folder.mkdir(parents=True)
    train_ids = {}
    for i in range(n):
        ids = rng.integers(0, 3, (size[0] // 4, size[1] // 4)).repeat(4, 0).repeat(4, 1).astype(np.uint8)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folders[0] / f"f{i}.png")
        Image.fromarray(colours[ids]).save(folders[1] / f"f{i}.png")
        Image.fromarray((ids.astype(np.uint16) * 1000)).save(folders[2] / f"f{i}.png")
        train_ids[f"f{i}.png"] = ids
    return (*folders, train_ids)


def test_colour_and_16_bit_masks_are_converted_to_train_ids(tmp_path):
    images, colour, wide, expected = colour_and_wide_masks(tmp_path)
    out = tmp_path / "rgb"
    result = prepare("--images", images, "--labels", colour, "--out", out, "--label-map", "0,0,0:0", "128,64,128:1",
                     "220,20,60:2", "--classes", "background", "road", "person", "--val-fraction", "0.25")
    assert result.returncode == 0, result.stderr
    info = data.read_dataset_info(out)
    assert info.class_names == ("background", "road", "person") and info.label_map is None
    for split in ("train", "val"):
        for image, label in list_pairs(out, split):
            assert label == f"train_ids/{split}/{image.split('/')[-1]}"  # the converted masks, train ids
            _, ids = data.read_frame(out / image, out / label, info)
            np.testing.assert_array_equal(ids, expected[image.split("/")[-1]])
    # 16-bit masks; 2000 is not trained on
    for _ in range(2):  # OUT/train_ids is in --labels: the rerun leaves it out of the pairs
        result = prepare("--images", images, "--labels", wide, "--out", wide, "--label-map", "0:0", "1000:1",
                         "2000:255")
        assert result.returncode == 0, result.stderr
    out = wide
    image, label = list_pairs(out, "train")[0]
    _, ids = data.read_frame(out / image, out / label, data.read_dataset_info(out))
    want = expected[image.split("/")[-1]]
    np.testing.assert_array_equal(ids, np.where(want == 2, 255, want))
    # a colour the map lacks: one line naming the mask and the colour, nothing written
    out = tmp_path / "partial"
    assert_one_line_error(prepare("--images", images, "--labels", colour, "--out", out, "--label-map", "0,0,0:0",
                                  "128,64,128:1"), "f0.png", "220,20,60", "neither in --label-map")
    assert not out.exists()
    assert prepare("--images", images, "--labels", colour, "--out", out, "--label-map", "0,0,0:0",
                   "1000:1").returncode == 2  # colours and grey values do not mix


def test_converted_masks_never_overwrite_the_masks_they_read(tmp_path):
    """--labels DATA/labels/train with --out DATA: the converted masks go to DATA/train_ids
    (they went to DATA/labels/SPLIT/, here the colour masks themselves); an input in the
    conversion folder is one line, the conversion folder in an input is left out of the
    pairs (a rerun paired its own output); a run that fails its list lines leaves the converted
    masks the old lists name (they were rewritten before the check)."""
    images, colour, _, expected = colour_and_wide_masks(tmp_path / "data")
    shutil.move(colour, tmp_path / "data" / "labels")
    (tmp_path / "data" / "labels" / "train").mkdir()
    for mask in (tmp_path / "data" / "labels").glob("*.png"):
        shutil.move(mask, tmp_path / "data" / "labels" / "train")
    (tmp_path / "data" / "images" / "train").mkdir()
    for photo in images.glob("*.png"):
        shutil.move(photo, images / "train")
    originals = {path: path.read_bytes() for path in (tmp_path / "data" / "labels").rglob("*.png")}
    colour_map = ["--label-map", "0,0,0:0", "128,64,128:1", "220,20,60:2"]
    common = ["--images", images / "train", "--labels", tmp_path / "data" / "labels" / "train", *colour_map]
    result = prepare(*common, "--out", tmp_path / "data")
    assert result.returncode == 0, result.stderr
    assert {path: path.read_bytes() for path in (tmp_path / "data" / "labels").rglob("*.png")} == originals
    assert prepare(*common, "--out", tmp_path / "data").returncode == 0  # a rerun reads no output of its own
    assert_one_line_error(prepare("--images", images / "train", "--labels", tmp_path / "data" / "train_ids",
                                  *colour_map, "--out", tmp_path / "data"), "the converted masks go to",
                          "which holds --labels")
    converted = {path: path.read_bytes() for path in (tmp_path / "data" / "train_ids").rglob("*.png")}
    assert len(converted) == len(expected)
    # a new pair whose name a list cannot hold, and another map: refused, nothing rewritten
    shutil.copy(images / "train" / "f0.png", images / "train" / "new one.png")
    shutil.copy(tmp_path / "data" / "labels" / "train" / "f0.png", tmp_path / "data" / "labels" / "train" / "new one.png")
    swapped = ["--label-map", "0,0,0:0", "128,64,128:2", "220,20,60:1"]
    assert_one_line_error(prepare("--images", images / "train", "--labels", tmp_path / "data" / "labels" / "train",
                                  *swapped, "--out", tmp_path / "data"), "a space or comma in the path")
    assert {path: path.read_bytes() for path in (tmp_path / "data" / "train_ids").rglob("*.png")} == converted


def test_a_folder_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    """Path.rglob skipped an unreadable subfolder without a word (its pairs missing); hidden
    ones and lost+found it passed over, as before."""
    images, masks = make_binary_folders(tmp_path, 4)
    scandir = os.scandir

    def refusing(path="."):
        if Path(path) == blocked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", refusing)
    (masks / "more" / "lost+found").mkdir()
    blocked = masks / "more" / "lost+found"  # a mount point's: passed over, as rglob did
    assert len(prepare_data.find_pairs(images, masks)) == 4
    blocked = masks / "more"
    with pytest.raises(data.BadInput, match="--labels: .*masks/more: cannot read the folder"):
        prepare_data.find_pairs(images, masks)
