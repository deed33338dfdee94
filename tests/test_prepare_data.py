"""prepare_data.py: polygons and labelIds conversion, lists, reruns, zips, bad input."""
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

import data
import prepare_data
from conftest import ROOT, shared_fixture


def read_list(root, split):
    return [line.split(" ") for line in (root / f"{split}.txt").read_text().splitlines()]


def test_synthetic_polygons_path(tmp_path):
    from cityscapesscripts.preparation.json2labelImg import json2labelImg
    root = tmp_path / "synthetic"
    counts = prepare_data.make_synthetic(root, num_images=6, size=(64, 128), num_workers=1)
    assert counts == {"train": 6, "val": 8}
    for split in ("train", "val"):
        entries = read_list(root, split)
        assert entries == sorted(entries) and len(entries) == counts[split]
        for image, label in entries:
            assert (root / image).is_file() and image.endswith("_leftImg8bit.png")
            train_ids = np.asarray(Image.open(root / label))
            assert train_ids.shape == (64, 128)
            assert set(np.unique(train_ids)) <= set(range(19)) | {255}
    # the labels are cityscapesscripts' own rendering of the polygons
    image, label = read_list(root, "val")[0]
    polygons = root / label.replace("_labelTrainIds.png", "_polygons.json")
    json2labelImg(str(polygons), str(tmp_path / "theirs.png"), "trainIds")
    np.testing.assert_array_equal(np.asarray(Image.open(root / label)), np.asarray(Image.open(tmp_path / "theirs.png")))
    # street-like: a scene carries many classes, all of them over the dataset
    seen = set()
    for _, label in read_list(root, "train") + read_list(root, "val"):
        seen |= set(np.unique(np.asarray(Image.open(root / label))).tolist())
    assert len(seen - {255}) >= 15


def test_label_ids_path_and_rerun_is_noop(tmp_path):
    from cityscapesscripts.helpers.labels import id2label
    root = tmp_path / "cityscapes"
    shutil.copytree(shared_fixture("cityscapes_sample"), root)
    assert prepare_data.prepare_cityscapes(root, num_workers=1) == {"val": 1}
    ((image, label),) = read_list(root, "val")
    label_ids = np.asarray(Image.open(root / label.replace("labelTrainIds", "labelIds")))
    expected = np.vectorize(lambda i: 255 if id2label[i].trainId in (-1, 255) else id2label[i].trainId)(label_ids)
    np.testing.assert_array_equal(np.asarray(Image.open(root / label)), expected)
    mtime, listing = (root / label).stat().st_mtime_ns, (root / "val.txt").read_text()
    assert prepare_data.prepare_cityscapes(root, num_workers=1) == {"val": 1}
    assert (root / label).stat().st_mtime_ns == mtime and (root / "val.txt").read_text() == listing
    prepare_data.prepare_cityscapes(root, num_workers=1, separator=",")
    assert (root / "val.txt").read_text() == listing.replace(" ", ",")


def test_frame_without_label_is_named(tmp_path):
    root = tmp_path / "cityscapes"
    shutil.copytree(shared_fixture("cityscapes_sample"), root)
    for path in root.glob("gtFine/val/*/*"):
        path.unlink()
    with pytest.raises(data.BadInput, match="frankfurt_000000_000294_leftImg8bit.png: no label"):
        prepare_data.prepare_cityscapes(root, num_workers=1)
    assert not (root / "val.txt").exists()


def test_image_and_label_sizes_must_match(tmp_path):
    root = tmp_path / "cityscapes"
    shutil.copytree(shared_fixture("cityscapes_sample"), root)
    label_ids = next(root.glob("gtFine/val/*/*_labelIds.png"))
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(label_ids)
    with pytest.raises(data.BadInput, match="128x256 but its label"):
        prepare_data.prepare_cityscapes(root, num_workers=1)


def test_official_zips_are_extracted(tmp_path):
    source = shared_fixture("cityscapes_sample")
    root = tmp_path / "zipped"
    root.mkdir()
    for name, folder in zip(prepare_data.ZIPS, ("gtFine", "leftImg8bit")):
        with zipfile.ZipFile(root / name, "w") as archive:
            for path in (source / folder).rglob("*"):
                archive.write(path, path.relative_to(source))
    assert prepare_data.prepare_cityscapes(root, num_workers=1) == {"val": 1}
    assert len(read_list(root, "val")) == 1


def test_cli_errors_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--cityscapes_path",
                             str(tmp_path / "absent")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "absent" in result.stderr
    # numbers and separators the commands cannot use are named before anything is written
    for flags, named in ((["--num-images", "0"], "--num-images must be at least 1, got 0"),
                         (["--num-workers", "-1"], "--num-workers must be at least 1, got -1"),
                         (["--separator", ";"], "--separator must be ' ' or ',', got ';'"),
                         (["--separator", ","], "--separator is for --cityscapes_path's lists"),
                         (["--seed", "-1"], "--seed must be in 0..4294967295, got -1")):
        result = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--synthetic", str(tmp_path / "syn"),
                                 *flags], capture_output=True, text=True)
        assert result.returncode == 2 and named in result.stderr.strip().splitlines()[-1], result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "syn").exists()
    # an output folder with a file in its place or above it: one line, nothing made
    (tmp_path / "file.png").write_bytes(b"x")
    for flags in (["--synthetic", str(tmp_path / "file.png")], ["--synthetic", str(tmp_path / "file.png" / "sub")],
                  ["--images", str(tmp_path), "--labels", str(tmp_path), "--out", str(tmp_path / "file.png")]):
        result = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), *flags], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"{flags[-1]}: {tmp_path / 'file.png'} is a file, not a folder" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.png"]
    # a bad flag value argparse catches is one line too, without the usage block
    result = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--synthetic", str(tmp_path / "s"),
                             "--num-images", "two"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--num_images: invalid int value" in result.stderr


# --- --pack -----------------------------------------------------------------------------

def write_frames(root, split, labels, size=(20, 30)):
    """Random photos with the given (H, W) uint8 labels; the split's list file."""
    rng = np.random.default_rng(len(labels))
    lines = []
    for i, label in enumerate(labels):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        Image.fromarray(label).save(folder / f"lab{i}.png")
        lines.append(f"{split}/img{i}.png {split}/lab{i}.png")
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_pack_holds_the_decoded_frames_and_detects_staleness(tmp_path):
    root = tmp_path / "synthetic"
    assert prepare_data.main(["--synthetic", str(root), "--num-images", "3", "--pack", "--num-workers", "2"]) == 0
    assert not (root / "dataset.json").exists() and data.read_dataset_info(root) is data.CITYSCAPES
    for split, count in (("train", 3), ("val", 8)):
        pack = data.read_pack(root, split, data.CITYSCAPES)
        assert pack["images"].shape == (count, 256, 512, 3) and pack["labels"].shape == (count, 256, 512)
        assert [tuple(p) for p in pack["files"]] == [tuple(p) for p in read_list(root, split)]
        for i, (image, label) in enumerate(read_list(root, split)):
            np.testing.assert_array_equal(pack["images"][i], np.asarray(Image.open(root / image).convert("RGB")))
            np.testing.assert_array_equal(pack["labels"][i], np.asarray(Image.open(root / label)))
    # a rerun keeps the fresh pack; a changed list file or source file makes it stale
    index = root / "packed" / "train.json"
    mtime = index.stat().st_mtime_ns
    prepare_data.pack_split(root, "train", log=lambda *a: None)
    assert index.stat().st_mtime_ns == mtime
    listing = (root / "train.txt").read_text()
    (root / "train.txt").write_text("\n".join(listing.splitlines()[:2]) + "\n")
    with pytest.raises(data.StalePack, match="train.txt changed"):
        data.read_pack(root, "train", data.CITYSCAPES)
    prepare_data.pack_split(root, "train", num_workers=1, log=lambda *a: None)
    assert data.read_pack(root, "train", data.CITYSCAPES)["images"].shape[0] == 2
    assert len(list((root / "packed").glob("train.*.npy"))) == 2  # the replaced arrays are gone
    label = root / read_list(root, "train")[0][1]
    Image.fromarray(np.zeros((256, 512), np.uint8)).save(label)
    with pytest.raises(data.StalePack, match=label.name):
        data.read_pack(root, "train", data.CITYSCAPES)
    binary = data.DatasetInfo(("a", "b"), ((0, 0, 0), (9, 9, 9)), 255, {0: 0, 255: 1}, None)
    with pytest.raises(data.StalePack, match=r"packed for 19 classes, ignore index 255, not 2 classes, ignore "
                                             r"index 255, label map \{'0': 0, '255': 1\}"):
        data.read_pack(root, "val", binary)


def test_pack_rejects_bad_labels_and_mixed_sizes(tmp_path):
    good = np.full((20, 30), 3, np.uint8)
    good[0] = 255
    bad = good.copy()
    bad[5, 5] = 40
    write_frames(tmp_path, "train", [good, bad])
    with pytest.raises(data.BadInput, match=r"lab1.png: values \[40\]"):
        prepare_data.pack_split(tmp_path, "train", num_workers=1, log=lambda *a: None)
    assert not (tmp_path / "packed" / "train.json").exists() and not list((tmp_path / "packed").glob("*.npy"))
    write_frames(tmp_path, "train", [good, np.zeros((21, 30), np.uint8)])
    with pytest.raises(data.BadInput, match=r"train.txt: not packed: frames differ in size \(train/img0.png is "
                                            r"20x30, train/img1.png is 21x30: 1 of 2 .* stays usable unpacked"):
        prepare_data.pack_split(tmp_path, "train", num_workers=2, log=lambda *a: None)
    assert not list((tmp_path / "packed").glob("*.npy"))
    result = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--cityscapes_path", str(tmp_path),
                             "--pack"], capture_output=True, text=True)
    assert result.returncode == 2  # no leftImg8bit/: a one-line error
    assert result.stderr.strip().count("\n") == 0


def one_frame_tree(root, label_ids=None, polygons=None, split="train"):
    """A Cityscapes tree of one 20x30 frame with its labelIds array or polygons JSON text."""
    (root / "leftImg8bit" / split / "c").mkdir(parents=True)
    (root / "gtFine" / split / "c").mkdir(parents=True)
    Image.new("RGB", (30, 20)).save(root / "leftImg8bit" / split / "c" / "c_000000_000019_leftImg8bit.png")
    gt = root / "gtFine" / split / "c" / "c_000000_000019_gtFine_"
    if label_ids is not None:
        Image.fromarray(label_ids).save(f"{gt}labelIds.png")
    if polygons is not None:
        (root / f"{gt}polygons.json").write_text(polygons)
    return root


def test_bad_label_sources_are_named(tmp_path):
    """A polygons JSON or labelIds PNG that cannot be converted: one line naming it, exit 2, no
    list (a label cityscapesscripts does not know made its worker exit and hung the pool; a
    16-bit value was a traceback; an RGB labelIds or an id beyond 33 was written as ignored)."""
    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 34, (20, 30), dtype=np.uint8)).save(truncated)
    cases = {"unknown label": (None, '{"imgHeight": 20, "imgWidth": 30, "objects": '
                                     '[{"label": "zzz", "polygon": [[0, 0], [5, 0], [5, 5]]}]}',
                               "label 'zzz' is not a Cityscapes label"),
             "cut json": (None, '{"imgHeight": 20, "imgW', "unreadable polygons JSON (JSONDecodeError"),
             "missing key": (None, '{"imgHeight": 20, "objects": []}', "unreadable polygons JSON (KeyError"),
             "16-bit": (np.full((20, 30), 1000, np.uint16), None, "values [1000] are beyond"),
             "rgb": (np.full((20, 30, 3), 7, np.uint8), None, "label image has mode RGB"),
             "id 200": (np.full((20, 30), 200, np.uint8), None, "values [200] are not Cityscapes label ids"),
             "truncated": (None, None, "unreadable image")}
    for name, (label_ids, polygons, message) in cases.items():
        root = one_frame_tree(tmp_path / name.replace(" ", "_"), label_ids, polygons)
        if name == "truncated":
            gt = next(root.glob("gtFine/train/c")) / "c_000000_000019_gtFine_labelIds.png"
            gt.write_bytes(truncated.read_bytes()[:len(truncated.read_bytes()) // 2])
        result = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--cityscapes_path", str(root),
                                 "--num-workers", "2"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (name, result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        assert message in last and "c_000000_000019_gtFine_" in last, (name, result.stderr)
        assert "Traceback" not in result.stderr and not (root / "train.txt").exists()


def test_a_changed_source_is_converted_again(tmp_path):
    """--synthetic over an earlier one (another seed) rewrites polygons whose old train ids
    stayed, no longer theirs; now a target carries its source's modification time and is
    written again when they differ: a source replaced by an older file too, and only once."""
    from cityscapesscripts.preparation.json2labelImg import json2labelImg
    root = tmp_path / "synthetic"
    prepare_data.make_synthetic(root, num_images=2, size=(32, 64), num_workers=1)
    prepare_data.make_synthetic(root, num_images=2, seed=1, size=(32, 64), num_workers=1)
    for _, label in read_list(root, "train") + read_list(root, "val"):
        json2labelImg(str(root / label.replace("_labelTrainIds.png", "_polygons.json")), str(tmp_path / "t.png"),
                      "trainIds")
        np.testing.assert_array_equal(np.asarray(Image.open(root / label)), np.asarray(Image.open(tmp_path / "t.png")))
    _, label = read_list(root, "train")[0]
    polygons = root / label.replace("_labelTrainIds.png", "_polygons.json")
    earlier = root / read_list(root, "train")[1][1].replace("_labelTrainIds.png", "_polygons.json")
    polygons.write_bytes(earlier.read_bytes())  # another frame's polygons, dated 2001 (as cp -p, unzip keep dates)
    os.utime(polygons, (978307200, 978307200))
    prepare_data.prepare_cityscapes(root, num_workers=1)
    json2labelImg(str(polygons), str(tmp_path / "t.png"), "trainIds")
    np.testing.assert_array_equal(np.asarray(Image.open(root / label)), np.asarray(Image.open(tmp_path / "t.png")))
    # a target on a filesystem of whole seconds carries its stamp rounded down: not converted again
    os.utime(polygons, ns=(0, 978307201 * 10**9 + 5 * 10**8))  # another second, and a half
    prepare_data.prepare_cityscapes(root, num_workers=1)
    assert (root / label).stat().st_mtime_ns == 978307201 * 10**9 + 5 * 10**8
    os.utime(root / label, ns=(0, 978307201 * 10**9))
    stamps = {path: path.stat().st_mtime_ns for path in root.glob("gtFine/*/*/*_labelTrainIds.png")}
    prepare_data.prepare_cityscapes(root, num_workers=1)  # nothing to convert
    assert {path: path.stat().st_mtime_ns for path in root.glob("gtFine/*/*/*_labelTrainIds.png")} == stamps


def test_a_tree_without_frames_is_refused(tmp_path):
    (tmp_path / "leftImg8bit" / "train" / "x").mkdir(parents=True)
    with pytest.raises(data.BadInput, match="no frames at leftImg8bit/SPLIT/CITY/"):
        prepare_data.prepare_cityscapes(tmp_path, num_workers=1)


def test_interrupted_or_corrupt_zips(tmp_path, monkeypatch):
    """An extraction stopped part way leaves no half-written folder, so a rerun extracts it all
    (a rerun took the partial tree as it was); an unreadable zip is named in one line."""
    source = one_frame_tree(tmp_path / "source", label_ids=np.full((20, 30), 7, np.uint8))
    one_frame_tree(source, label_ids=np.full((20, 30), 7, np.uint8), split="val")
    root = tmp_path / "zipped"
    root.mkdir()
    for name, folder in zip(prepare_data.ZIPS, ("gtFine", "leftImg8bit")):
        with zipfile.ZipFile(root / name, "w") as archive:
            for path in sorted((source / folder).rglob("*")):
                archive.write(path, path.relative_to(source))
    extract, calls = zipfile.ZipFile.extract, []

    def interrupted(self, member, path=None, pwd=None):
        calls.append(member)
        if "leftImg8bit" in self.filename and len(calls) > 8:  # the third of its 6
            raise KeyboardInterrupt
        return extract(self, member, path, pwd)
    monkeypatch.setattr(zipfile.ZipFile, "extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_data.prepare_cityscapes(root, num_workers=1)
    assert (root / "gtFine").is_dir() and not (root / "leftImg8bit").exists()
    assert not list(root.glob(".extracting_*"))  # no hidden partial copy left behind
    monkeypatch.setattr(zipfile.ZipFile, "extract", extract)
    assert prepare_data.prepare_cityscapes(root, num_workers=1) == {"train": 1, "val": 1}
    assert not list(root.glob(".extracting_*"))
    shutil.rmtree(root / "leftImg8bit")
    (root / prepare_data.ZIPS[1]).write_bytes((root / prepare_data.ZIPS[1]).read_bytes()[:500])
    with pytest.raises(data.BadInput, match="leftImg8bit_trainvaltest.zip: unreadable zip"):
        prepare_data.prepare_cityscapes(root, num_workers=1)
