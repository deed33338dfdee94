"""data.py: the augmentation (CPU and batched on a device, same draws), the sampler, the
loader over PNGs and over a pack, the label tables, the dataset's classes (dataset.json)."""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from datasets import data_config, make_dataset, pack

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
NO_DISTORT = dict(distort_order=[0, 1, 2, 3], distort_apply=[False] * 4, brightness=1.0, contrast=1.0,
                  saturation=1.0, hue=0.0)


def test_scale_set_is_paddleseg_step_scaling():
    config = data_config()
    rng = np.random.default_rng(0)
    seen = {data.draw_augmentation(rng, 100, 200, config)["scaled_size"] for _ in range(400)}
    expected = {(int(round(s * 100)), int(round(s * 200))) for s in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)}
    assert seen == expected


def test_padding_values_and_label_values_preserved():
    image = torch.full((3, 20, 30), 200.0)
    label = torch.from_numpy(np.kron(np.arange(6, dtype=np.uint8).reshape(2, 3), np.ones((10, 10), np.uint8)))
    params = dict(NO_DISTORT, scaled_size=(20, 30), crop_offset=(0, 0), flip=False)
    out_image, out_label = data.augment(image, label, params, (64, 96))
    assert out_image.shape == (3, 64, 96) and out_label.shape == (64, 96)
    # padded bottom/right: image 127.5, cast to uint8 by RandomDistort as PaddleSeg does:
    # 127 -> (127 / 255 - 0.5) / 0.5; label 255
    padding = (torch.tensor(127.0) / 255 - 0.5) / 0.5
    assert torch.all(out_image[:, 20:] == padding) and torch.all(out_image[:, :, 30:] == padding)
    assert torch.all(out_label[20:] == 255) and torch.all(out_label[:, 30:] == 255)
    torch.testing.assert_close(out_image[:, :20, :30], torch.full((3, 20, 30), 200 / 255 * 2 - 1))
    assert torch.equal(out_label[:20, :30], label)
    # nearest resizing never invents label values
    for scale in (0.5, 0.75, 1.25, 2.0):
        params["scaled_size"] = (int(round(20 * scale)), int(round(30 * scale)))
        _, resized = data.augment(image, label, params, (64, 96))
        assert set(resized.unique().tolist()) <= set(range(6)) | {255}


def test_flip_moves_image_and_label_together():
    label = torch.arange(24, dtype=torch.uint8).repeat(16, 1)           # label = column index
    image = (label.float() * 10).expand(3, 16, 24).clone()               # image encodes the column
    for flip in (False, True):
        params = dict(NO_DISTORT, scaled_size=(16, 24), crop_offset=(0, 0), flip=flip)
        out_image, out_label = data.augment(image, label, params, (16, 24))
        pixel = ((out_image + 1) / 2 * 255).round()
        assert torch.equal(pixel[0], out_label.float() * 10)
        assert out_label[0, 0] == (23 if flip else 0)


def test_distort_is_pils_on_paddlesegs_uint8_image():
    """PaddleSeg's RandomDistort casts the image to uint8 (truncating the resize's floats and
    the padding's 127.5) and runs PIL: every op gives PIL's bits, the blends at factors inside
    and outside [0, 1] (PIL's two branches), on odd sizes, the hue at float deltas."""
    from PIL import ImageEnhance
    rng = np.random.default_rng(3)
    # the cast alone: every op skipped, the input truncated as numpy's astype('uint8')
    floats = torch.tensor([[[0.0, 0.99, 127.5, 254.999, 255.0, 255.00002, -1e-6]]]).expand(3, 1, 7)
    np.testing.assert_array_equal(data.distort(floats, NO_DISTORT).numpy(),
                                  np.clip(floats.numpy(), 0, 255).astype(np.uint8))
    for trial in range(12):
        height, width = rng.integers(1, 30, 2)
        photo = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        image = torch.from_numpy(np.asarray(photo).transpose(2, 0, 1).copy()).float()
        for op, name, enhancer in [(0, "brightness", ImageEnhance.Brightness),
                                   (1, "contrast", ImageEnhance.Contrast),
                                   (2, "saturation", ImageEnhance.Color)]:
            factor = float(rng.uniform(0.6, 1.4) if trial else 2.5)  # 2.5: much clipped
            params = dict(NO_DISTORT, distort_apply=[i == op for i in range(4)], **{name: factor})
            theirs = np.asarray(enhancer(photo).enhance(factor)).transpose(2, 0, 1)
            np.testing.assert_array_equal(data.distort(image, params).numpy(), theirs, err_msg=f"{name} {factor}")
    # hue: PaddleSeg adds its float delta to PIL's uint8 HSV hue and numpy casts the sum back
    # to uint8 (truncated, then modulo 256 on x86-64); every colour, greys and both wraps
    colours = np.stack(np.meshgrid(np.arange(0, 256, 5), np.arange(0, 256, 3), np.arange(256),
                                   indexing="ij"), -1).reshape(-1, 256, 3).astype(np.uint8)  # (H, 256, 3)
    image = torch.from_numpy(colours.transpose(2, 0, 1).copy()).float()
    full = dict(distort_order=[3], distort_apply=[False, False, False, True])
    for delta in (18.0, -18.0, 0.0, 17.63, -0.4, -13.07, 5.5):
        hsv = np.array(Image.fromarray(colours).convert("HSV"))
        with np.errstate(invalid="ignore"):
            hsv[:, :, 0] = hsv[:, :, 0] + delta  # PaddleSeg's functional.hue
        theirs = np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB")).transpose(2, 0, 1)
        np.testing.assert_array_equal(data.distort(image, dict(full, hue=delta)).numpy(), theirs, err_msg=str(delta))


def reference_crop(image, label, params, crop_size):
    """The textbook chain, written out with whole-image ops: F.interpolate the full image,
    pad bottom/right, crop, flip."""
    size = params["scaled_size"]
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].to(torch.uint8)
    pad_h, pad_w = max(crop_size[0] - size[0], 0), max(crop_size[1] - size[1], 0)
    image = F.pad(image, (0, pad_w, 0, pad_h), value=127.5)
    label = F.pad(label, (0, pad_w, 0, pad_h), value=255)
    top, left = params["crop_offset"]
    image = image[:, top:top + crop_size[0], left:left + crop_size[1]]
    label = label[top:top + crop_size[0], left:left + crop_size[1]]
    if params["flip"]:
        image, label = image.flip(-1), label.flip(-1)
    return image, label


@pytest.mark.parametrize("device", DEVICES)
def test_batched_augmentation_equals_whole_image_chain(device):
    """The batch path on `device` against the whole-image chain on the CPU, on the same
    parameters, every sample of a batch with its own draws: the crops, then the distortion
    and normalisation of each crop alone."""
    config = data_config("--crop-size", "48", "64")
    rng = np.random.default_rng(5)
    images = torch.from_numpy(rng.integers(0, 256, (6, 3, 37, 53), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 19, (6, 37, 53), dtype=np.uint8))
    params = [data.draw_augmentation(rng, 37, 53, config) for _ in range(6)]
    params[0]["flip"], params[1]["flip"] = True, False
    crops, crop_labels = data.resized_crops(images.to(device), labels.to(device), params, config.crop_size)
    out_images, out_labels = data.augment_batch(images.to(device), labels.to(device), params, config.crop_size)
    assert out_images.device.type == device and torch.equal(out_labels, crop_labels)
    for b in range(6):
        expected_crop, expected_label = reference_crop(images[b].float(), labels[b], params[b], config.crop_size)
        assert torch.equal(out_labels[b].cpu(), expected_label)
        # the same taps and weights, summed in another order: float32 rounding of values up to
        # 255 (~255 * 2^-24 per op, a few ops)
        torch.testing.assert_close(crops[b].cpu(), expected_crop, atol=1e-4, rtol=0)
        assert set(out_labels[b].unique().tolist()) <= set(range(19)) | {255}
        # (the distortion truncates: a crop's last-bit difference could move a grey level, so it
        # starts from the batch's own crop; each op is IEEE arithmetic, the same bits on a GPU)
        expected = data.normalize(data.distort(crops[b].cpu(), params[b]))
        assert torch.equal(out_images[b].cpu(), expected)


def test_scales_are_paddlesegs_resize_step_scaling():
    """PaddleSeg's count of steps is a floor (0.5..2.0 by 0.4: 4 scales, the last 2.0); step 0
    draws any scale in the range; equal bounds, that scale."""
    def scales(*flags):
        config = data_config(*flags)
        rng = np.random.default_rng(0)
        return {data.draw_augmentation(rng, 100, 200, config)["scaled_size"] for _ in range(400)}
    assert scales() == {(int(round(s * 100)), int(round(s * 200))) for s in np.arange(0.5, 2.01, 0.25)}
    assert scales("--scale-step", "0.4") == {(50, 100), (100, 200), (150, 300), (200, 400)}
    continuous = scales("--scale-step", "0")
    assert len(continuous) > 100 and all(50 <= h <= 200 and 100 <= w <= 400 for h, w in continuous)
    assert scales("--min-scale", "1.5", "--max-scale", "1.5") == {(150, 300)}


def test_sampler_shards_ranks_and_resumes():
    full = list(data.StepSampler(10, 2, 0, 2, seed=1, start_iter=0, iters=12))
    other = list(data.StepSampler(10, 2, 1, 2, seed=1, start_iter=0, iters=12))
    resumed = list(data.StepSampler(10, 2, 0, 2, seed=1, start_iter=7, iters=12))
    assert resumed == full[7:]
    # each epoch of 10 positions covers every sample once across the two ranks
    positions = sorted(p for batch in full + other for _, p in batch)
    assert positions == list(range(48))
    first_epoch = [i for batch in full[:3] + other[:3] for i, p in batch if p < 10]
    assert sorted(first_epoch) == list(range(10))


@pytest.mark.parametrize("device", DEVICES)
def test_loader_from_pack_and_on_device_gives_the_png_batches(tmp_path, device):
    """The loader over the pack gives the PNG loader's batches bitwise; with aug_device
    'cuda' (the workers read raw frames, from the pack or the PNGs alike, batch_to_device
    augments the batch on `device`) the draws are the same and the images agree up to float
    rounding."""
    root = make_dataset(tmp_path / "data", num_train=5, size=(37, 53))
    pack(root)
    pairs = data.read_list(root, "train")
    index = data.find_pack(root, "train", data.CITYSCAPES)
    cpu_config = data_config("--crop-size", "48", "64", "--batch-size", "4", "--iters", "3", "--num-workers", "0")
    raw_config = data_config("--crop-size", "48", "64", "--batch-size", "4", "--iters", "3", "--num-workers", "1",
                             device=device, aug_device="cuda")
    png = data.make_loader(pairs, None, data.CITYSCAPES, cpu_config, rank=0, world_size=1, start_iter=0)
    packed = data.make_loader(pairs, index, data.CITYSCAPES, cpu_config, rank=0, world_size=1, start_iter=0)
    raw = data.make_loader(pairs, index, data.CITYSCAPES, raw_config, rank=0, world_size=1, start_iter=0)
    raw_png = data.make_loader(pairs, None, data.CITYSCAPES, raw_config, rank=0, world_size=1, start_iter=0)
    count = 0
    for png_batch, packed_batch, raw_batch, raw_png_batch in zip(png, packed, raw, raw_png):
        count += 1
        assert all(torch.equal(a, b) for a, b in zip(png_batch, packed_batch))
        assert all(torch.equal(a, b) for a, b in zip(raw_batch, raw_png_batch))  # decoded by the workers
        assert raw_batch[0].dtype == torch.uint8 and raw_batch[0].shape == (4, 37, 53, 3)
        images, labels = data.batch_to_device(raw_batch, torch.device(device), raw_config)
        assert images.device.type == device and images.shape == (4, 3, 48, 64)
        assert torch.equal(labels.cpu(), png_batch[1])
        # the same IEEE ops on the same numbers (the contrast's mean is an exact integer sum)
        assert torch.equal(images.cpu(), png_batch[0])
    assert count == 3


def test_label_tables_are_cityscapes_and_inverse():
    from cityscapesscripts.helpers.labels import id2label, trainId2label
    to_train, to_label = data.label_id_to_train_id(), data.train_id_to_label_id()
    assert len(data.CITYSCAPES.class_names) == len(data.CITYSCAPES.colors) == 19
    assert data.CITYSCAPES.ignore_index == 255 and data.CITYSCAPES.label_map is None
    for train_id, name in enumerate(data.CITYSCAPES_CLASSES):
        label = trainId2label[train_id]
        assert label.name == name and data.CITYSCAPES.colors[train_id] == label.color
        assert to_label[train_id] == label.id and to_train[to_label[train_id]] == train_id
    assert sorted(set(to_train.tolist())) == list(range(19)) + [255]
    for label_id, label in id2label.items():  # every other label id is ignored
        if 0 <= label_id < 256 and label.trainId in (-1, 255):
            assert to_train[label_id] == 255
    palette = data.dataset_palette(data.CITYSCAPES)
    assert palette[13].tolist() == [0, 0, 142] and palette[255].tolist() == [0, 0, 0]
    assert palette[19].tolist() == data.fixed_palette()[19].tolist() != [0, 0, 0]


def test_dataset_info_round_trip_label_table_and_validation(tmp_path):
    assert data.read_dataset_info(tmp_path) is data.CITYSCAPES  # no dataset.json
    info = data.DatasetInfo(("background", "object"), ((1, 2, 3), (4, 5, 6)), 200, {0: 0, 255: 1, 7: 200}, None)
    data.write_dataset_info(tmp_path, info)
    assert data.read_dataset_info(tmp_path) == info
    table = data.label_table(info)
    assert table[[0, 255, 7, 200]].tolist() == [0, 1, 200, 200]  # 200: the ignore index, allowed unmapped
    assert (table < 0).sum() == 256 - 4
    assert data.label_table(data.CITYSCAPES)[[0, 18, 19, 254, 255]].tolist() == [0, 18, -1, -1, 255]
    # reading applies the table; a value it does not allow is named with the file
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(np.array([[0, 255, 7], [200, 0, 0]], np.uint8)).save(tmp_path / "label.png")
    _, label = data.read_frame(tmp_path / "image.png", tmp_path / "label.png", info)
    assert label.tolist() == [[0, 1, 200], [200, 0, 0]] and label.dtype == np.uint8
    with pytest.raises(data.BadInput, match=r"label.png: values \[7, 200\] are neither train ids 0..1 nor 255"):
        data.read_frame(tmp_path / "image.png", tmp_path / "label.png", info._replace(ignore_index=255, label_map=None))
    # what is wrong with a dataset.json is named, and write_dataset_info writes nothing bad
    path = tmp_path / "dataset.json"
    for content, message in [
            ([1], "expected a JSON object"),
            ({"classes": []}, "'classes' must be a list of 1 to 255"),
            ({"classes": ["a"], "colour": []}, "unknown key 'colour'"),
            ({"classes": ["a", "b"], "ignore_index": 1}, "'ignore_index' must be an integer in 2..255"),
            ({"classes": ["a"], "colors": [[1, 2]]}, "'colors' must hold one"),
            ({"classes": ["a"], "label_map": {"256": 0}}, "'label_map' key '256' is not a label value"),
            ({"classes": ["a"], "label_map": {"3": 1}}, "'label_map' maps 3 to 1, neither a train id 0..0")]:
        path.write_text(json.dumps(content))
        with pytest.raises(data.BadInput, match=f"dataset.json: {re.escape(message)}"):
            data.read_dataset_info(tmp_path)
    path.unlink()
    with pytest.raises(data.BadInput, match="'ignore_index' must be"):
        data.write_dataset_info(tmp_path, info._replace(ignore_index=1))
    assert not path.exists()
    assert json.loads(json.dumps(data.dataset_info_json(data.CITYSCAPES)))["classes"][0] == "road"
    # Cityscapes as a checkpoint or an export records it comes back whole, its label ids too
    assert data.dataset_info_from_json(data.dataset_info_json(data.CITYSCAPES), "x") == data.CITYSCAPES
    for changed in (data.CITYSCAPES._replace(ignore_index=254), data.CITYSCAPES._replace(label_map={7: 0}),
                    data.CITYSCAPES._replace(class_names=("car",) + data.CITYSCAPES.class_names[1:])):
        assert data.dataset_info_from_json(data.dataset_info_json(changed), "x").label_ids is None


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "state.bin"
    data.atomic_write(path, "good")

    def fails(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        data.atomic_write(path, fails)
    assert path.read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_photos_16_bit_greyscale_by_their_top_8_bits_in_frames_and_packs(tmp_path):
    """The one rule of data.read_photo, in read_frame and in a pack: a 16-bit greyscale photo
    is the 8-bit greyscale image of value >> 8 (PIL's own convert('RGB') would clip it to
    255); 32-bit integers beyond 16 bits and float photos are refused by name. A label may be
    16-bit while its values are train ids."""
    root = make_dataset(tmp_path / "data", num_train=2)
    wide = np.random.default_rng(0).integers(0, 65536, (40, 60)).astype(np.uint16)
    expected = np.repeat((wide >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    Image.fromarray(wide).save(root / "train" / "img0.png")
    assert Image.open(root / "train" / "img0.png").mode == "I;16"
    assert not np.array_equal(np.asarray(Image.open(root / "train" / "img0.png").convert("RGB")), expected)
    label = np.asarray(Image.open(root / "train" / "lab0.png"))
    Image.fromarray(label.astype(np.uint16)).save(root / "train" / "lab0.png")  # a 16-bit label of train ids
    image, read_label = data.read_frame(root / "train" / "img0.png", root / "train" / "lab0.png", data.CITYSCAPES)
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(read_label, label)
    pack(root)  # decodes through read_frame
    np.testing.assert_array_equal(data.read_pack(root, "train", data.CITYSCAPES)["images"][0], expected)
    Image.fromarray(np.full((40, 60), 70000, np.int32)).save(root / "train" / "img1.tif")
    with pytest.raises(data.BadInput, match=r"img1.tif: 32-bit greyscale values 70000..70000 are outside 0..65535"):
        data.read_photo(root / "train" / "img1.tif")
    Image.fromarray(np.zeros((40, 60), np.float32)).save(root / "train" / "img1.tif")
    with pytest.raises(data.BadInput, match=r"img1.tif: 32-bit float greyscale \(mode F\)"):
        data.read_photo(root / "train" / "img1.tif")
    Image.fromarray(np.full((40, 60), 300, np.uint16)).save(root / "train" / "lab1.png")
    with pytest.raises(data.BadInput, match=r"lab1.png: values \[300\] are beyond the label values 0..255"):
        data.read_frame(root / "train" / "img1.png", root / "train" / "lab1.png", data.CITYSCAPES)
