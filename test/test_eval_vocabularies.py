"""Benchmark class files: the eight shipped ones, the file format, background handling."""

from __future__ import annotations

import numpy as np
import pytest

from ovseg_ros.engine.config import DEFAULT_BACKGROUND_WORDS
from ovseg_ros.evaluation.datasets import DATASETS
from ovseg_ros.evaluation.metrics import IGNORE_INDEX
from ovseg_ros.evaluation.vocabularies import (
    available_vocabularies,
    load_vocabulary,
    parse_lines,
    resolve_vocabulary,
)

COUNTS = {
    "voc21": 21,
    "voc20": 20,
    "context60": 60,
    "context59": 59,
    "coco_object": 81,
    "coco_stuff": 171,
    "cityscapes": 19,
    "ade20k": 150,
}
VOC_ORDER = (
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse "
    "motorbike person pottedplant sheep sofa train tvmonitor"
).split()
CITYSCAPES_ORDER = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
]  # fmt: skip


@pytest.mark.parametrize(("name", "count"), COUNTS.items())
def test_all_eight_files_load_with_the_dataset_class_count(name, count):
    vocab = load_vocabulary(name)
    assert vocab.num_classes == count == DATASETS[name].num_classes
    assert DATASETS[name].vocabulary == name
    has_background = name in ("voc21", "context60", "coco_object")
    assert (vocab.background == 0) if has_background else (vocab.background is None)
    # The engine gets every class but the background one, each with at least one query.
    assert len(vocab.engine_entries()) == count - has_background
    assert all(vocab.queries[i] for i in vocab.engine_ids())


def test_shipped_names_are_listed():
    assert set(COUNTS) <= set(available_vocabularies())


def test_voc21_background_words_and_synonyms_follow_the_papers():
    vocab = load_vocabulary("voc21")
    assert list(vocab.names) == VOC_ORDER
    assert vocab.background_words == list(DEFAULT_BACKGROUND_WORDS)  # METHODS.md section 1
    person = vocab.queries[VOC_ORDER.index("person")]
    assert person[0] == "person" and "person in jacket" in person and len(person) == 7
    tv = vocab.queries[VOC_ORDER.index("tvmonitor")]
    assert tv == ("television monitor", "tv monitor", "monitor", "television", "screen")
    assert vocab.queries[VOC_ORDER.index("boat")] == ("ship",)
    assert vocab.engine_entries()[0] == "aeroplane"


def test_voc20_and_context_orders():
    assert list(load_vocabulary("voc20").names) == VOC_ORDER[1:]
    c60, c59 = load_vocabulary("context60"), load_vocabulary("context59")
    assert c60.names[1:] == c59.names and c60.background_words == ["background"]
    assert list(load_vocabulary("cityscapes").names) == CITYSCAPES_ORDER


def test_coco_object_background_word_shared_with_a_class_is_allowed():
    vocab = load_vocabulary("coco_object")
    assert "bed" in vocab.background_words and "bed" in vocab.names
    assert "body" in vocab.queries[1]


def test_ade20k_names_follow_object_info(shared_data):
    rows = (shared_data / "ade20k_val_samples" / "objectInfo150.txt").read_text().splitlines()[1:]
    official = [row.split("\t")[4].split(",")[0].strip() for row in rows]
    names = list(load_vocabulary("ade20k").names)
    different = [(i, a, b) for i, (a, b) in enumerate(zip(names, official, strict=True)) if a != b]
    assert different == [(89, "television receiver", "television")]  # mmseg's name for it


def test_unlabeled_maps_to_the_background_class_or_is_a_miss():
    labels = np.array([[0, 1], [255, 19]], dtype=np.uint8)
    with_bg = load_vocabulary("voc21").to_dataset(labels, 255)
    assert with_bg.tolist() == [[1, 2], [0, 20]]
    without = load_vocabulary("voc20").to_dataset(labels, 255)
    assert without.tolist() == [[0, 1], [IGNORE_INDEX, 19]]


def test_background_in_the_middle_and_display_names():
    vocab = parse_lines(["# c", "", "cat: kitty; cat", "background: sky", "dog"], "t", "t")
    assert vocab.names == ("cat", "background", "dog") and vocab.background == 1
    assert vocab.engine_entries() == ["kitty; cat", "dog"]
    assert vocab.to_dataset(np.array([0, 1, 255]), 255).tolist() == [0, 2, 1]


def test_background_class_without_words_keeps_its_id():
    vocab = parse_lines(["background:", "cat"], "t", "t")
    assert vocab.background == 0 and vocab.background_words == []


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["cat", "dog; cat"], "line 2: query 'cat' is also used by class 0"),
        (["background: sky", "background: wall", "cat"], "second background"),
        (["cat;", "dog"], "line 1: empty query"),
        ([": cat"], "empty class name"),
        (["# nothing"], "no classes"),
        (["background: sky"], "no classes"),
    ],
)
def test_bad_class_files_name_the_line(lines, message):
    with pytest.raises(ValueError, match=message):
        parse_lines(lines, "t", "classes.txt")


def test_resolve_by_name_path_or_inline_lines(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("background: sky\ncat\n")
    assert resolve_vocabulary(["voc21"]).name == "voc21"
    assert resolve_vocabulary([str(path)]).names == ("background", "cat")
    inline = resolve_vocabulary(["background: sky; wall", "cat", "tv; screen"])
    assert inline.source == "inline" and inline.names == ("background", "cat", "tv")
    with pytest.raises(ValueError, match="no vocabulary called 'nope'; known: .*voc21"):
        resolve_vocabulary(["nope"])
    with pytest.raises(ValueError, match="not found"):
        resolve_vocabulary([str(tmp_path / "missing.txt")])
