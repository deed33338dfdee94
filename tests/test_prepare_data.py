"""prepare_data.py: polygons and labelIds conversion, lists, reruns, zips, bad input."""
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
                         (["--separator", ","], "--separator is for --cityscapes_path's lists")):
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
