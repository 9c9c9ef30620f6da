"""CLIP-RC's evaluation protocol for `ovseg eval --method cliprc` (its configs' test settings).

configs/_base_/datasets/voc12_20_512x512.py and cocostuff_512x512.py resize the test image with
img_scale (2048, 512), keep_ratio (short side 512, long side at most 2048); the model configs test
with slide windows of 512 and stride 426 (test_cfg). The authors evaluate PASCAL VOC without
background (voc20) and COCO-Stuff 164K (coco_stuff); every other dataset (and a folder) gets the
same settings, since the network was trained on 512 x 512 crops. CLIP-RC encodes the vocabulary
with its own text encoder and templates (the method's templates parameter), so the engine's
template set is not used: 'single' keeps the engine's own encoding of the classes short.
"""

from __future__ import annotations

from .datasets import dataset_names

#: The settings every dataset gets with --method cliprc.
SETTINGS: dict[str, object] = {
    "short_side": 512,
    "mode": "slide",
    "crop": 512,
    "stride": 426,
    "templates": "single",
}

#: dataset -> settings, in the shape of evaluation.cli.METHOD_PROTOCOLS.
CLIPRC_PROTOCOLS: dict[str, dict[str, object]] = {name: dict(SETTINGS) for name in dataset_names()}
