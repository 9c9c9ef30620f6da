"""Dataset readers: the shared samples, synthetic official layouts, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ovseg_ros.evaluation.datasets import (
    DATASETS,
    DatasetError,
    cityscapes_labels,
    folder_spec,
    read_ids,
    voc_labels,
)
from ovseg_ros.evaluation.metrics import IGNORE_INDEX
from ovseg_ros.viz import palette

H, W = 6, 8


def write_image(path, size=(H, W), seed=0):
    """A small random RGB image (JPEG or PNG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def write_label(path, ids, mode="L"):
    """A label PNG: grey ids ('L'), palette indices with the VOC palette ('P') or 16 bit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(ids)
    if mode == "P":
        image = Image.fromarray(ids.astype(np.uint8), mode="P")
        image.putpalette(palette(256).reshape(-1).tolist())
    elif mode == "I;16":
        image = Image.fromarray(ids.astype(np.uint16))
    else:
        image = Image.fromarray(ids.astype(np.uint8))
    image.save(path)


def ids_with(*values):
    """An HxW label map that holds each of values in turn."""
    flat = np.resize(np.array(values), H * W)
    return flat.reshape(H, W)


# -- the shared samples (../shared/data) -------------------------------------------------------


def test_voc_samples_rgb_coded(shared_data):
    ds = DATASETS["voc21"].open(shared_data / "voc2012_val_samples")
    assert len(ds) == 14 and "_target.png" in ds.layout
    names = [item.name for item in ds.items]
    assert names[:5] == ["0", "1", "8", "20", "23"]  # natural order of the names
    seen = set()
    for _name, rgb, label in ds:
        assert rgb.dtype == np.uint8 and rgb.shape == (*label.shape, 3)
        seen |= set(np.unique(label).tolist())
    assert IGNORE_INDEX in seen and 0 in seen and seen <= set(range(21)) | {IGNORE_INDEX}
    _, label = ds.read(ds.items[names.index("0")])
    assert set(np.unique(label).tolist()) == {0, 1, IGNORE_INDEX}  # background, aeroplane, edge


def test_voc20_samples_drop_background(shared_data):
    ds21 = DATASETS["voc21"].open(shared_data / "voc2012_val_samples")
    ds20 = DATASETS["voc20"].open(shared_data / "voc2012_val_samples")
    _, l21 = ds21.read(ds21.items[0])
    _, l20 = ds20.read(ds20.items[0])
    assert np.all(l20[l21 == 0] == IGNORE_INDEX)
    fg = (l21 > 0) & (l21 != IGNORE_INDEX)
    np.testing.assert_array_equal(l20[fg], l21[fg] - 1)


def test_ade_samples_reduce_zero_label(shared_data):
    root = shared_data / "ade20k_val_samples"
    ds = DATASETS["ade20k"].open(root)
    assert [i.name for i in ds.items] == [f"ADE_val_0000000{k}" for k in (1, 2, 3)]
    rgb, label = ds.read(ds.items[0])
    raw = np.asarray(Image.open(root / "ADE_val_00000001.png")).astype(int)
    np.testing.assert_array_equal(label, np.where(raw == 0, IGNORE_INDEX, raw - 1))
    assert label.max() == IGNORE_INDEX and label[label != IGNORE_INDEX].max() < 150


def test_cityscapes_sample_and_label_id_conversion(shared_data):
    root = shared_data / "cityscapes_val_sample"
    ds = DATASETS["cityscapes"].open(root)
    assert len(ds) == 1 and ds.items[0].name == "frankfurt_000000_000294"
    rgb, label = ds.read(ds.items[0])
    assert rgb.shape == (128, 256, 3)
    train_ids = root / "frankfurt_000000_000294_gtFine_labelTrainIds.png"
    np.testing.assert_array_equal(label, np.asarray(Image.open(train_ids)))
    converted = cityscapes_labels(root / "frankfurt_000000_000294_gtFine_labelIds.png")
    # The downscaled sample's two label files were resized separately: 77 edge pixels differ.
    assert np.mean(converted == label) > 0.99


# -- synthetic official layouts ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_voc_official_layout_palette_pngs_and_split(tmp_path, where):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for i, key in enumerate(["2007_000001", "2007_000002", "2007_000003"]):
        write_image(base / "JPEGImages" / f"{key}.jpg", seed=i)
        write_label(base / "SegmentationClass" / f"{key}.png", ids_with(0, 15, 255, i), "P")
    split = base / "ImageSets" / "Segmentation" / "val.txt"
    split.parent.mkdir(parents=True)
    split.write_text("2007_000001\n2007_000003\n")  # 000002 is not in the val split
    root = tmp_path / where
    ds = DATASETS["voc21"].open(root)
    assert [i.name for i in ds.items] == ["2007_000001", "2007_000003"]
    assert "SegmentationClass" in ds.layout
    _, label = ds.read(ds.items[1])
    assert set(np.unique(label).tolist()) == {0, 2, 15, IGNORE_INDEX}
    _, label20 = DATASETS["voc20"].open(root).read(ds.items[1])
    assert set(np.unique(label20).tolist()) == {1, 14, IGNORE_INDEX}


def test_voc_rgb_label_with_an_unknown_colour_names_file_and_colour(tmp_path):
    rgb = palette(256)[ids_with(0, 1, 255)]
    rgb[0, 0] = (1, 2, 3)
    path = tmp_path / "x_target.png"
    Image.fromarray(rgb).save(path)
    with pytest.raises(ValueError, match=r"x_target.png: colour \(1, 2, 3\)"):
        voc_labels(path)
    rgb[0, 0] = palette(256)[30]  # a palette colour, but no VOC class
    Image.fromarray(rgb).save(path)
    with pytest.raises(ValueError, match=r"colour \(\d+, \d+, \d+\) is not a VOC class"):
        voc_labels(path)


def test_context_mmseg_layout_60_keeps_background_59_drops_it(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    write_image(base / "JPEGImages" / "2008_000008.jpg")
    write_image(base / "JPEGImages" / "2008_000009.jpg")  # not in the Context split
    write_label(base / "SegmentationClassContext" / "2008_000008.png", ids_with(0, 1, 59))
    split = base / "ImageSets" / "SegmentationContext" / "val.txt"
    split.parent.mkdir(parents=True)
    split.write_text("2008_000008\n")
    ds60 = DATASETS["context60"].open(tmp_path)
    _, l60 = ds60.read(ds60.items[0])
    ds59 = DATASETS["context59"].open(base)
    assert len(ds59) == 1
    _, l59 = ds59.read(ds59.items[0])
    assert set(np.unique(l60).tolist()) == {0, 1, 59}
    assert set(np.unique(l59).tolist()) == {0, 58, IGNORE_INDEX}


@pytest.mark.parametrize(
    ("name", "suffix", "values", "expected"),
    [
        ("coco_stuff", "_labelTrainIds.png", (0, 170, 255), {0, 170, IGNORE_INDEX}),
        ("coco_object", "_instanceTrainIds.png", (0, 80, 255), {0, 80, IGNORE_INDEX}),
    ],
)
def test_coco_layouts(tmp_path, name, suffix, values, expected):
    base = tmp_path / "coco_stuff164k"
    write_image(base / "images" / "val2017" / "000000000139.jpg")
    write_label(base / "annotations" / "val2017" / f"000000000139{suffix}", ids_with(*values))
    ds = DATASETS[name].open(tmp_path)
    assert [i.name for i in ds.items] == ["000000000139"]
    _, label = ds.read(ds.items[0])
    assert set(np.unique(label).tolist()) == expected


def test_ade_official_layout(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    write_image(base / "images" / "validation" / "ADE_val_00000001.jpg")
    write_label(base / "annotations" / "validation" / "ADE_val_00000001.png", ids_with(0, 1, 150))
    ds = DATASETS["ade20k"].open(tmp_path)
    _, label = ds.read(ds.items[0])
    assert set(np.unique(label).tolist()) == {0, 149, IGNORE_INDEX}


def test_cityscapes_official_layout_with_cities_and_label_ids_fallback(tmp_path):
    for city, key, labels in [
        ("frankfurt", "frankfurt_000000_000294", "_gtFine_labelTrainIds.png"),
        ("lindau", "lindau_000000_000019", "_gtFine_labelIds.png"),
    ]:
        write_image(tmp_path / "leftImg8bit" / "val" / city / f"{key}_leftImg8bit.png")
        ids = ids_with(0, 18, 255) if "Train" in labels else ids_with(7, 33, 1)
        write_label(tmp_path / "gtFine" / "val" / city / f"{key}{labels}", ids)
    ds = DATASETS["cityscapes"].open(tmp_path)
    assert [i.name for i in ds.items] == [
        "frankfurt/frankfurt_000000_000294",
        "lindau/lindau_000000_000019",
    ]
    labels = [set(np.unique(ds.read(item)[1]).tolist()) for item in ds.items]
    assert labels == [{0, 18, IGNORE_INDEX}, {0, 18, IGNORE_INDEX}]  # road 7 -> 0, bicycle 33 -> 18


# -- the plain folder reader -------------------------------------------------------------------


def test_folder_images_and_labels_subfolders(tmp_path):
    write_image(tmp_path / "images" / "a.jpg")
    write_image(tmp_path / "images" / "b.png", seed=1)
    write_label(tmp_path / "labels" / "a.png", ids_with(0, 1))
    write_label(tmp_path / "labels" / "b.png", ids_with(2, 255))
    ds = folder_spec(3).open(tmp_path)
    assert [i.name for i in ds.items] == ["a", "b"] and ds.layout.startswith("images/")
    assert set(np.unique(ds.read(ds.items[1])[1]).tolist()) == {2, IGNORE_INDEX}


def test_folder_image_target_pairs_and_same_stem(tmp_path):
    write_image(tmp_path / "p" / "x_image.jpg")
    write_label(tmp_path / "p" / "x_target.png", ids_with(0, 1))
    write_image(tmp_path / "s" / "y.jpg")
    write_label(tmp_path / "s" / "y.png", ids_with(0, 1))
    (tmp_path / "s" / "classes.txt").write_text("a\nb\n")
    assert [i.name for i in folder_spec(2).open(tmp_path / "p").items] == ["x"]
    assert [i.name for i in folder_spec(2).open(tmp_path / "s").items] == ["y"]


def test_folder_ignore_index_and_reduce_zero(tmp_path):
    write_image(tmp_path / "y.jpg")
    write_label(tmp_path / "y.png", ids_with(0, 1, 2, 9))
    ds = folder_spec(3, ignore_index=9).open(tmp_path)
    _, label = ds.read(ds.items[0])
    assert set(np.unique(label).tolist()) == {0, 1, 2, IGNORE_INDEX}
    ds = folder_spec(2, ignore_index=9, reduce_zero=True).open(tmp_path)
    assert set(np.unique(ds.read(ds.items[0])[1]).tolist()) == {0, 1, IGNORE_INDEX}


def test_sixteen_bit_and_grey_rgb_labels_are_ids(tmp_path):
    write_label(tmp_path / "a.png", ids_with(0, 300), "I;16")
    assert set(np.unique(read_ids(tmp_path / "a.png")).tolist()) == {0, 300}
    grey = np.repeat(ids_with(3, 4)[..., None].astype(np.uint8), 3, axis=2)
    Image.fromarray(grey).save(tmp_path / "b.png")
    assert set(np.unique(read_ids(tmp_path / "b.png")).tolist()) == {3, 4}


# -- bad inputs ----------------------------------------------------------------------------------


def test_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"missing does not exist.*JPEGImages"):
        DATASETS["voc21"].open(tmp_path / "missing")


def test_empty_root_names_path_and_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"no samples found under .*ADEChallengeData2016"):
        DATASETS["ade20k"].open(tmp_path)


def test_unreadable_image_missing_label_and_size_mismatch_are_value_errors(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    write_label(tmp_path / "a.png", ids_with(0))
    write_image(tmp_path / "b.jpg")  # no label
    write_image(tmp_path / "c.jpg", size=(H + 1, W))
    write_label(tmp_path / "c.png", ids_with(0))
    ds = folder_spec(1).open(tmp_path)
    errors = {}
    for item in ds.items:
        with pytest.raises(ValueError) as info:
            ds.read(item)
        errors[item.name] = str(info.value)
    assert "cannot read" in errors["a"] and "a.jpg" in errors["a"]
    assert "b.png" in errors["b"]
    assert "is 8x6 but its image" in errors["c"]


def test_colour_label_where_ids_are_expected(tmp_path):
    Image.fromarray(palette(256)[ids_with(1, 2)]).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="single-channel"):
        read_ids(tmp_path / "a.png")
