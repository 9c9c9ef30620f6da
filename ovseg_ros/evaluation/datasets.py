"""Dataset readers: (name, RGB image, label ids with 255 = ignore) from the benchmarks' layouts.

Every reader maps its dataset's labels onto class ids 0..C-1 in the order of the dataset's class
file (config/vocabularies/) with 255 for pixels that are not evaluated, so the metrics need to
know nothing about the dataset. Each reader accepts the official layout (the one mmseg, SCLIP and
NACLIP read) and the flat layout of the sample folders in ../shared/data.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..viz import palette
from .metrics import IGNORE_INDEX

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")

#: Cityscapes labelIds -> train ids (cityscapesScripts' table; unlisted ids are ignored).
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

LabelDecoder = Callable[[Path], np.ndarray]


class DatasetError(ValueError):
    """The dataset root is missing, empty or not in a layout the reader knows."""


@dataclass(frozen=True)
class Item:
    """One evaluation sample: its name and where its image and label files are."""

    name: str
    image: Path
    label: Path


@dataclass(frozen=True)
class Dataset:
    """The samples of one dataset split and how to decode their labels."""

    name: str
    title: str
    root: Path
    layout: str  # which of the accepted layouts was found (for the report)
    items: tuple[Item, ...]
    decode: LabelDecoder

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.items)

    def read(self, item: Item) -> tuple[np.ndarray, np.ndarray]:
        """The HxWx3 uint8 RGB image and HxW int32 label ids; ValueError if unreadable."""
        rgb = read_image(item.image)
        label = self.decode(item.label)
        if label.shape != rgb.shape[:2]:
            raise ValueError(
                f"{item.label} is {label.shape[1]}x{label.shape[0]} but its image {item.image} "
                f"is {rgb.shape[1]}x{rgb.shape[0]}"
            )
        return rgb, label

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(name, rgb, label) for every item, in order."""
        for item in self.items:
            yield (item.name, *self.read(item))


def _open(path: Path) -> Image.Image:
    """Open an image file fully; ValueError naming the file if it cannot be decoded."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    return image


def read_image(path: Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB."""
    return np.array(_open(path).convert("RGB"))  # a writable copy: torch.from_numpy warns otherwise


def read_ids(path: Path) -> np.ndarray:
    """A single-channel label image (palette, grey, 16 bit; or RGB with equal channels) as ids."""
    return _ids(_open(path), path)


def _ids(image: Image.Image, path: Path) -> np.ndarray:
    """The pixel values of an opened label image as int32 ids."""
    data = np.asarray(image)
    if data.ndim == 3:
        # Grey labels saved as RGB are fine; colour-coded ones need a dataset's colour map.
        if not np.all(data[..., :3] == data[..., :1]):
            raise ValueError(
                f"{path}: expected a single-channel label image of class ids, got {image.mode} "
                "colours"
            )
        data = data[..., 0]
    return data.astype(np.int32)


def voc_labels(path: Path, num_classes: int = 21) -> np.ndarray:
    """VOC labels: palette / grey PNGs as indices; RGB-coded ones through the VOC colour map."""
    image = _open(path)
    if image.mode not in ("RGB", "RGBA"):
        return _ids(image, path)
    rgb = np.asarray(image.convert("RGB")).astype(np.int32)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    colors = palette(256).astype(np.int32)
    known = {int((r << 16) | (g << 8) | b): i for i, (r, g, b) in enumerate(colors[:num_classes])}
    r, g, b = colors[IGNORE_INDEX]
    known[int((r << 16) | (g << 8) | b)] = IGNORE_INDEX  # (224, 224, 192): object boundaries
    values, inverse = np.unique(codes, return_inverse=True)
    ids = np.empty(len(values), dtype=np.int32)
    for k, code in enumerate(values.tolist()):
        if code not in known:
            colour = (code >> 16, (code >> 8) & 255, code & 255)
            raise ValueError(f"{path}: colour {colour} is not a VOC class colour or the boundary")
        ids[k] = known[code]
    return ids[inverse.reshape(codes.shape)]


def reduce_zero_label(decode: LabelDecoder) -> LabelDecoder:
    """Wrap a decoder so 0 becomes ignore and k becomes k-1 (mmseg's reduce_zero_label)."""

    @functools.wraps(decode)
    def wrapped(path: Path) -> np.ndarray:
        ids = decode(path)
        return np.where((ids == 0) | (ids == IGNORE_INDEX), IGNORE_INDEX, ids - 1).astype(np.int32)

    return wrapped


def cityscapes_labels(path: Path) -> np.ndarray:
    """Cityscapes labelTrainIds as they are; labelIds files converted to train ids."""
    ids = read_ids(path)
    if not path.name.endswith("_labelIds.png"):
        return ids
    lut = np.full(max(int(ids.max()) + 1, 256), IGNORE_INDEX, dtype=np.int32)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut[np.clip(ids, 0, None)]


def ignore_value(decode: LabelDecoder, ignore_index: int) -> LabelDecoder:
    """Wrap a decoder so a dataset's own ignore value becomes 255."""
    if ignore_index == IGNORE_INDEX:
        return decode

    @functools.wraps(decode)
    def wrapped(path: Path) -> np.ndarray:
        ids = decode(path)
        return np.where(ids == ignore_index, IGNORE_INDEX, ids).astype(np.int32)

    return wrapped


def _natural(name: str) -> list[str | int]:
    """Sort key that puts '8' before '20' (sample folders number their images)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class Layout:
    """One way a dataset can lie under its root: where images and labels are, how they pair."""

    description: str
    bases: tuple[str, ...]  # folders under the root that may hold the layout ("." = the root)
    image_dir: str
    image_suffixes: tuple[str, ...]  # an image's name ends with one; the rest is its key
    label_dir: str
    label_suffixes: tuple[str, ...]  # key + suffix; the first that exists is used
    split_file: str = ""  # a list of keys, one per line, instead of listing image_dir
    recursive: bool = False  # images in sub-folders (Cityscapes cities)

    def find(self, root: Path) -> list[Item] | None:
        """The items under root, or None where this layout is not there."""
        for base in (root / b for b in self.bases):
            images, labels = base / self.image_dir, base / self.label_dir
            split = base / self.split_file if self.split_file else None
            if not images.is_dir() or not labels.is_dir() or (split and not split.is_file()):
                continue
            items = (
                self._split_items(images, labels, split) if split else self._list(images, labels)
            )
            if items:
                return items
        return None

    def _label(self, folder: Path, key: str) -> Path:
        """The label file of a key: the first suffix that exists (else the first, to report)."""
        candidates = [folder / f"{key}{s}" for s in self.label_suffixes]
        return next((p for p in candidates if p.is_file()), candidates[0])

    def _split_items(self, images: Path, labels: Path, split: Path) -> list[Item]:
        """Items named by a split file (VOC ImageSets)."""
        keys = [k for k in (line.strip() for line in split.read_text().splitlines()) if k]
        return [
            Item(k, images / f"{k}{self.image_suffixes[0]}", self._label(labels, k)) for k in keys
        ]

    def _list(self, images: Path, labels: Path) -> list[Item]:
        """Items found by listing the image folder, in natural order of their names."""
        files = images.rglob("*") if self.recursive else images.iterdir()
        items = []
        for path in files:
            suffix = next(
                (s for s in self.image_suffixes if path.name.lower().endswith(s.lower())), None
            )
            if suffix is None or not path.is_file():
                continue
            key = path.name[: -len(suffix)]
            rel = path.parent.relative_to(images)
            items.append(
                Item(str(rel / key) if rel.parts else key, path, self._label(labels / rel, key))
            )
        return sorted(items, key=lambda item: _natural(item.name))


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark: its layouts, label decoding, class file and protocol settings."""

    name: str
    title: str
    layouts: tuple[Layout, ...]
    decode: LabelDecoder
    vocabulary: str  # shipped class file name
    num_classes: int
    settings: dict[str, object]  # SegmenterConfig fields of the published protocol

    def expected(self) -> str:
        """The accepted layouts in words (for error messages and help)."""
        return "; or ".join(layout.description for layout in self.layouts)

    def open(self, root: str | Path) -> Dataset:
        """Find the samples under root; DatasetError naming the root and the expected layout."""
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetError(
                f"{self.title}: dataset root {root} does not exist or is not a folder; "
                f"expected {self.expected()}"
            )
        for layout in self.layouts:
            items = layout.find(root)
            if items:
                return Dataset(
                    self.name, self.title, root, layout.description, tuple(items), self.decode
                )
        raise DatasetError(
            f"{self.title}: no samples found under {root}; expected {self.expected()}"
        )


_VOC = Layout(
    "VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, "
    "ImageSets/Segmentation/val.txt} (root = VOCdevkit, VOC2012 or their parent)",
    bases=(".", "VOC2012", "VOCdevkit/VOC2012"),
    image_dir="JPEGImages",
    image_suffixes=(".jpg",),
    label_dir="SegmentationClass",
    label_suffixes=(".png",),
    split_file="ImageSets/Segmentation/val.txt",
)
_PAIRS = Layout(
    "<stem>_image.<ext> + <stem>_target.png in one folder",
    bases=(".",),
    image_dir=".",
    image_suffixes=tuple(f"_image{s}" for s in IMAGE_SUFFIXES),
    label_dir=".",
    label_suffixes=("_target.png",),
)
_CONTEXT = Layout(
    "VOCdevkit/VOC2010/{JPEGImages/<id>.jpg, SegmentationClassContext/<id>.png, "
    "ImageSets/SegmentationContext/val.txt} (mmseg's layout; root = VOCdevkit, VOC2010 or "
    "their parent)",
    bases=(".", "VOC2010", "VOCdevkit/VOC2010"),
    image_dir="JPEGImages",
    image_suffixes=(".jpg",),
    label_dir="SegmentationClassContext",
    label_suffixes=(".png",),
    split_file="ImageSets/SegmentationContext/val.txt",
)


def _coco(label_suffix: str, meaning: str) -> Layout:
    """mmseg's COCO-Stuff 164k layout with the given label file suffix."""
    return Layout(
        f"images/val2017/<id>.jpg + annotations/val2017/<id>{label_suffix} ({meaning}; root = "
        "coco_stuff164k or its parent)",
        bases=(".", "coco_stuff164k"),
        image_dir="images/val2017",
        image_suffixes=(".jpg",),
        label_dir="annotations/val2017",
        label_suffixes=(label_suffix,),
    )


_ADE = Layout(
    "ADEChallengeData2016/{images/validation/<id>.jpg, annotations/validation/<id>.png} "
    "(root = ADEChallengeData2016 or its parent)",
    bases=(".", "ADEChallengeData2016"),
    image_dir="images/validation",
    image_suffixes=(".jpg",),
    label_dir="annotations/validation",
    label_suffixes=(".png",),
)
_SAME_STEM = Layout(
    "<stem>.<jpg|jpeg|bmp|tif|tiff|webp|ppm> + <stem>.png in one folder",
    bases=(".",),
    image_dir=".",
    image_suffixes=tuple(s for s in IMAGE_SUFFIXES if s != ".png"),
    label_dir=".",
    label_suffixes=(".png",),
)
_CITY_LABELS = ("_gtFine_labelTrainIds.png", "_gtFine_labelIds.png")
_CITYSCAPES = Layout(
    "leftImg8bit/val/<city>/<id>_leftImg8bit.png + gtFine/val/<city>/<id>_gtFine_labelTrainIds.png"
    " (or _gtFine_labelIds.png, converted; root = cityscapes or its parent)",
    bases=(".", "cityscapes"),
    image_dir="leftImg8bit/val",
    image_suffixes=("_leftImg8bit.png",),
    label_dir="gtFine/val",
    label_suffixes=_CITY_LABELS,
    recursive=True,
)
_CITYSCAPES_FLAT = Layout(
    "a flat folder of <id>_leftImg8bit.png + <id>_gtFine_labelTrainIds.png",
    bases=(".",),
    image_dir=".",
    image_suffixes=("_leftImg8bit.png",),
    label_dir=".",
    label_suffixes=_CITY_LABELS,
)
_FOLDER = Layout(
    "images/<stem>.<ext> + labels/<stem>.png",
    bases=(".",),
    image_dir="images",
    image_suffixes=IMAGE_SUFFIXES,
    label_dir="labels",
    label_suffixes=(".png",),
)

# NACLIP's and SCLIP's configs threshold the class probability where the gt has a background.
_WITH_BACKGROUND = {"short_side": 336, "prob_threshold": 0.1}

#: The eight benchmarks of METHODS.md section 8 (the plain folder reader is folder_spec()).
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "voc21",
            "PASCAL VOC 2012 (21 classes)",
            (_VOC, _PAIRS),
            voc_labels,
            "voc21",
            21,
            _WITH_BACKGROUND,
        ),
        DatasetSpec(
            "voc20",
            "PASCAL VOC 2012 without background (20 classes)",
            (_VOC, _PAIRS),
            reduce_zero_label(voc_labels),
            "voc20",
            20,
            {"short_side": 336},
        ),
        DatasetSpec(
            "context60",
            "PASCAL Context (60 classes)",
            (_CONTEXT,),
            read_ids,
            "context60",
            60,
            _WITH_BACKGROUND,
        ),
        DatasetSpec(
            "context59",
            "PASCAL Context without background (59 classes)",
            (_CONTEXT,),
            reduce_zero_label(read_ids),
            "context59",
            59,
            {"short_side": 336},
        ),
        DatasetSpec(
            "coco_object",
            "COCO-Object (81 classes)",
            (
                _coco(
                    "_instanceTrainIds.png", "0 = background, 1..80, as cvt_coco_object.py writes"
                ),
            ),
            read_ids,
            "coco_object",
            81,
            _WITH_BACKGROUND,
        ),
        DatasetSpec(
            "coco_stuff",
            "COCO-Stuff 164k (171 classes)",
            (_coco("_labelTrainIds.png", "0..170, 255 = ignore, as mmseg's converter writes"),),
            read_ids,
            "coco_stuff",
            171,
            {"short_side": 448},
        ),
        DatasetSpec(
            "cityscapes",
            "Cityscapes (19 classes)",
            (_CITYSCAPES, _CITYSCAPES_FLAT),
            cityscapes_labels,
            "cityscapes",
            19,
            {"short_side": 560},
        ),
        DatasetSpec(
            "ade20k",
            "ADE20K (150 classes)",
            (_ADE, _SAME_STEM),
            reduce_zero_label(read_ids),
            "ade20k",
            150,
            {"short_side": 336},
        ),
    )
}


def folder_spec(
    num_classes: int, ignore_index: int = IGNORE_INDEX, reduce_zero: bool = False
) -> DatasetSpec:
    """A plain folder of image + label PNG pairs whose ids follow a class file."""
    decode = ignore_value(read_ids, ignore_index)
    if reduce_zero:
        decode = reduce_zero_label(decode)
    return DatasetSpec(
        "folder", "image + label folder", (_FOLDER, _PAIRS, _SAME_STEM), decode, "", num_classes, {}
    )


def dataset_names() -> list[str]:
    """The --dataset choices."""
    return [*DATASETS, "folder"]
