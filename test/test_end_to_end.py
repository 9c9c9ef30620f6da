"""End to end on real VOC photos with the real ViT-B/16 architecture (random weights).

Random weights make the labels meaningless, so this checks the contract only: shapes, dtypes,
label range and determinism, at the real model size and the published protocol (short side 336,
NACLIP, whole image and 224/112 sliding windows). `pytest -s` shows the timings.
"""

import cv2
import numpy as np
import pytest

from ovseg_ros.engine import Segmenter, SegmenterConfig

pytestmark = pytest.mark.slow

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]  # fmt: skip
IMAGES = ["0_image.png", "1_image.png"]


def load_rgb(path):
    """A PNG as an HxWx3 uint8 RGB array."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, f"cannot read {path}"
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def voc_segmenter(vitb16_backbone):
    """NACLIP on random ViT-B/16 with the 20 VOC classes and the default background words."""
    config = SegmenterConfig(
        model_name="ViT-B-16", model_pretrained="none", device="cpu", precision="fp32",
        method="naclip", vocabulary=VOC_CLASSES, templates="single", text_cache_dir="none",
        short_side=336, crop=224, stride=112,
    )  # fmt: skip
    return Segmenter(config, backbone=vitb16_backbone)


@pytest.mark.parametrize("mode", ["whole", "slide"])
@pytest.mark.parametrize("name", IMAGES)
def test_voc_image(voc_segmenter, shared_data, name, mode):
    path = shared_data / "voc2012_val_samples" / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    image = load_rgb(path)
    target = cv2.imread(str(path).replace("_image", "_target"), cv2.IMREAD_COLOR)
    assert target is None or target.shape == image.shape

    voc_segmenter.update(mode=mode)
    first = voc_segmenter.segment(image)
    second = voc_segmenter.segment(image)

    assert first.labels.shape == image.shape[:2]
    assert first.labels.dtype == np.uint8
    assert np.all((first.labels < len(VOC_CLASSES)) | (first.labels == 255))
    assert first.confidence.shape == image.shape[:2]
    assert np.all((first.confidence >= 0) & (first.confidence <= 1))
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.confidence, second.confidence)
    summary = first.summary()
    print(
        f"\n{name} {image.shape[1]}x{image.shape[0]} naclip/{mode}: "
        f"timings (ms) {first.timings} / {second.timings}; "
        f"unlabeled {summary['unlabeled_fraction']:.2f}, classes {len(summary['classes'])}"
    )


def test_voc_image_both_modes_agree_on_shape(voc_segmenter, shared_data):
    path = shared_data / "voc2012_val_samples" / IMAGES[0]
    if not path.is_file():
        pytest.skip(f"{path} not found")
    image = load_rgb(path)[:400, :300]  # a non-square crop of the photo
    shapes = set()
    for mode in ("whole", "slide"):
        voc_segmenter.update(mode=mode)
        logits, vocab = voc_segmenter.dense_logits(image)
        assert logits.shape[0] == len(vocab.queries)
        shapes.add(tuple(logits.shape))
    assert shapes == {(len(vocab.queries), 448, 336)}
