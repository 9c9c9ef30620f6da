"""Shared fixtures for the engine tests: tiny and ViT-B/16 random backbones, segmenters, data.

The tiny architecture `ovseg-tiny` (vision width 128, 2 heads, 3 layers, patch 16, native grid
4x4, text width 64) ships with the package; it loads in about a second, so most tests use it.
`ViT-B-16` with random weights is the real architecture; only tests marked `slow` build it.
Random weights make every logit meaningless: the tests check formulas and invariants only.
"""

from pathlib import Path

import pytest
import torch

from ovseg_ros.engine import Backbone, Segmenter, SegmenterConfig, build_backbone
from ovseg_ros.engine.clip_loading import _open_clip

torch.set_num_threads(2)

#: Where the sample images with ground truth live: ../shared/data relative to the project root.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

#: Segmenter settings every engine test starts from (tiny model, fast text, no disk cache).
TINY_CONFIG = {
    "model_name": "ovseg-tiny",
    "model_pretrained": "none",
    "device": "cpu",
    "precision": "fp32",
    "templates": "single",
    "text_cache_dir": "none",
}


def sample_data_dir() -> Path:
    """The shared sample-data folder, or skip the calling test when it is absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"sample data not found at {SHARED_DATA} (expected ../shared/data)")
    return SHARED_DATA


def build_tiny(seed: int):
    """A private ovseg-tiny backbone whose random weights come from `seed`.

    build_backbone(..., 'none', ...) always draws seed 0, so other seeds go through open_clip.
    """
    open_clip = _open_clip()  # registers the package's model configurations
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model("ovseg-tiny", pretrained=None)
    model.eval().requires_grad_(False)
    return Backbone(
        model,
        name="ovseg-tiny",
        source=f"random weights (seed {seed})",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


@pytest.fixture(scope="session")
def tiny_backbone():
    """The ovseg-tiny backbone (random weights), shared by the whole session.

    Tests must not modify its weights; build_tiny(seed) gives a private model.
    """
    torch.manual_seed(0)
    return build_backbone("ovseg-tiny", "none", "", "", "cpu", "fp32")


@pytest.fixture(scope="session")
def vitb16_backbone():
    """ViT-B/16 with random weights (seed 0); built only when a slow test asks for it."""
    torch.manual_seed(0)
    return build_backbone("ViT-B-16", "none", "", "", "cpu", "fp32")


@pytest.fixture
def make_segmenter(tiny_backbone):
    """Factory: make_segmenter(**config_overrides) -> Segmenter on the shared tiny backbone."""

    def make(backbone=None, **overrides):
        config = SegmenterConfig(**{**TINY_CONFIG, **overrides})
        return Segmenter(config, backbone=backbone or tiny_backbone)

    return make


@pytest.fixture
def shared_data():
    """Path of ../shared/data (the test is skipped when it is absent)."""
    return sample_data_dir()


@pytest.fixture
def harness():
    """Factory: harness(backbone=..., **parameters) starts the ROS node in-process (nodeharness)."""
    from nodeharness import harness_factory

    yield from harness_factory()
