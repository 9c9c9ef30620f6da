"""Fast paths: int8 quantisation, torch.compile, threads, staging uploads, the cheap upsampler and
the device-side reductions (the GPU paths run the same code on the CPU here)."""

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIG

from ovseg_ros.engine import Segmenter, SegmenterConfig, build_backbone
from ovseg_ros.engine.inference import HostStaging, to_tensor
from ovseg_ros.engine.labeling import upsample_bilinear
from ovseg_ros.samples import sample_images
from ovseg_ros.viz import class_mask, colorize, confidence_u8, overlay, palette


@pytest.fixture(scope="module")
def photos():
    """Three real photos at a small size (label agreement needs structure, not noise)."""
    import cv2

    return [cv2.resize(img, (96, 64)) for _, img in sample_images()[:3]]


def agreement(a: Segmenter, b: Segmenter, images) -> float:
    """Fraction of pixels labelled alike by two segmenters over the images."""
    same = [np.mean(a.segment(im).labels == b.segment(im).labels) for im in images]
    return float(np.mean(same))


# --- int8 --------------------------------------------------------------------------------------


def test_int8_quantises_the_vision_mlps_and_keeps_labels(photos, make_segmenter):
    seg = Segmenter(SegmenterConfig(**TINY_CONFIG, quantize="int8"))
    dynamic_linear = torch.ao.nn.quantized.dynamic.Linear
    quantized = [m for m in seg.backbone.visual.modules() if isinstance(m, dynamic_linear)]
    # 3 blocks x (c_fc, c_proj); the text tower stays fp32 (text embeddings are cached by weights).
    assert len(quantized) == 6
    text_tower = seg.backbone.model.transformer.modules()
    assert not any(isinstance(m, dynamic_linear) for m in text_tower)
    assert seg.backbone.quantized and "int8 dynamic (10 linear layers)" in seg.backbone.source
    # The blocks before the last also run int8 attention projections (2 blocks x qkv, out).
    assert len(seg.backbone._int8_attention) == 2
    assert all(isinstance(m, dynamic_linear) for p in seg.backbone._int8_attention for m in p)
    assert agreement(seg, make_segmenter(), photos) > 0.95


def test_int8_trunk_computes_the_blocks_forward(tiny_backbone):
    q = build_backbone("ovseg-tiny", "none", "", "", "cpu", "fp32", quantize="int8")
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, _, _ = tiny_backbone.forward_to_last(images)
        got, _, _ = q.forward_to_last(images)
        # Same weights (seed 0), int8 projections: close to fp32, not equal.
        rel = (got - expected).norm() / expected.norm()
        assert 0 < rel < 0.05
        # The fp32 weights are still there for the methods and the capturing paths.
        captured, _, _ = q.forward_to_last(images, capture_attention=True)
        block0 = q.blocks[0].attn
        assert block0.in_proj_weight.dtype == torch.float32
        assert (captured - expected).norm() / expected.norm() < 0.05


@pytest.mark.parametrize("precision", ["bf16"])
def test_int8_refuses_other_precisions_before_loading(precision):
    with pytest.raises(ValueError, match="model.quantize int8 runs on the CPU in fp32"):
        build_backbone("ovseg-tiny", "none", "", "", "cpu", precision, quantize="int8")


def test_int8_is_a_config_choice():
    with pytest.raises(ValueError, match="model.quantize must be one of"):
        SegmenterConfig(**TINY_CONFIG, quantize="int4").validate()
    with pytest.raises(ValueError, match="cannot be changed with update"):
        Segmenter(SegmenterConfig(**TINY_CONFIG)).update(quantize="int8")


# --- compile -----------------------------------------------------------------------------------


def test_compiled_trunk_serves_the_frames_and_matches_eager(photos, make_segmenter):
    seg = Segmenter(SegmenterConfig(**TINY_CONFIG, compile="default"))
    assert seg.backbone.compile_mode == "default"
    compiled = seg.backbone._trunk
    assert compiled is not seg.backbone._run_trunk
    calls = []
    seg.backbone._trunk = lambda x: (calls.append(x.shape), compiled(x))[1]
    assert agreement(seg, make_segmenter(), photos[:1]) == 1.0
    assert calls, "segment() did not go through the compiled trunk"
    seg.backbone.compile_trunk("none")
    assert seg.backbone._trunk == seg.backbone._run_trunk


def test_capturing_methods_bypass_the_compiled_trunk(tiny_backbone):
    calls = []
    original = tiny_backbone._trunk
    tiny_backbone._trunk = lambda x: (calls.append(1), original(x))[1]
    try:
        images = torch.zeros(1, 3, 64, 64)
        tiny_backbone.forward_to_last(images, capture_attention=True)
        assert not calls
        tiny_backbone.forward_to_last(images)
        assert calls == [1]
    finally:
        tiny_backbone._trunk = original


# --- threads -----------------------------------------------------------------------------------


def test_threads_setting_applies_to_torch(tiny_backbone):
    before = torch.get_num_threads()
    try:
        Segmenter(SegmenterConfig(**TINY_CONFIG, threads=1), backbone=tiny_backbone)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    Segmenter(SegmenterConfig(**TINY_CONFIG), backbone=tiny_backbone)  # 0 leaves it alone
    assert torch.get_num_threads() == before


# --- staging upload ----------------------------------------------------------------------------


def test_staging_reuses_one_buffer_per_thread_and_size():
    staging = HostStaging(pin=False)
    a = staging.buffer((4, 5, 3))
    assert staging.buffer((4, 5, 3)) is a
    b = staging.buffer((6, 5, 3))
    assert b is not a and tuple(b.shape) == (6, 5, 3)
    other = []
    thread = threading.Thread(target=lambda: other.append(staging.buffer((6, 5, 3))))
    thread.start()
    thread.join()
    assert other[0] is not b


def test_staging_upload_equals_to_tensor_on_cpu():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    cpu = torch.device("cpu")
    torch.testing.assert_close(HostStaging(pin=False).upload(rgb, cpu), to_tensor(rgb, cpu))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_staging_upload_goes_through_pinned_memory_on_cuda():
    staging = HostStaging()
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = staging.upload(rgb, torch.device("cuda"))
    assert staging.buffer(rgb.shape).is_pinned()
    torch.testing.assert_close(out.cpu(), to_tensor(rgb, torch.device("cpu")))


# --- upsampling and reductions -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((1, 41, 21, 28), (336, 448)),  # a 640x480 frame's patch grid
        ((3, 5, 14, 14), (224, 224)),  # a batch of slide crops
        ((1, 2, 7, 9), (13, 300)),  # odd factors
        ((1, 1, 1, 1), (5, 7)),
        ((1, 3, 20, 30), (10, 15)),  # shrinking: F.interpolate
        ((1, 2, 70, 70), (140, 140)),  # large input: F.interpolate
    ],
)
def test_upsample_bilinear_matches_interpolate(shape, size):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample_bilinear(x, size), expected, atol=1e-5, rtol=1e-5)


def test_vocabulary_group_sizes_follow_synonyms_and_background(make_segmenter):
    seg = make_segmenter(vocabulary=["cat", "tv; television; screen"], background_words=["sky"])
    assert seg.vocabulary.group_sizes == (1, 3, 1)
    seg.set_vocabulary(["cat", "dog"], background_words=[])
    assert seg.vocabulary.group_sizes == (1, 1)


def test_result_statistics_agree_with_the_label_map(make_segmenter, photos):
    seg = make_segmenter(vocabulary=["cat", "dog; puppy", "person"], prob_threshold=0.4)
    result = seg.segment(photos[0])
    labels = result.labels
    n = result.vocabulary.num_classes
    counts = np.array([(labels == c).sum() for c in range(n)])
    np.testing.assert_allclose(result.fractions, counts / labels.size, rtol=1e-6)
    # Exact counts, as the overlay takes them instead of counting again.
    assert result.counts.dtype == np.int64
    np.testing.assert_array_equal(result.counts, counts)
    for c in range(n):
        expected = result.confidence[labels == c].mean() if counts[c] else 0.0
        assert result.scores[c] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert labels.dtype == np.uint8


# --- output conversions ------------------------------------------------------------------------


def test_confidence_u8_rounds_like_numpy():
    conf = np.random.default_rng(0).random((48, 64), dtype=np.float32)
    conf[0, :4] = [0.0, 1.0, 0.5 / 255, 1.5 / 255]
    expected = np.clip(np.rint(conf * 255.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(confidence_u8(conf), expected)
    np.testing.assert_array_equal(confidence_u8(conf.astype(np.float64)), expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_class_mask_is_0_or_255(dtype):
    labels = np.random.default_rng(0).integers(0, 4, (9, 11)).astype(dtype)
    labels[0, 0] = np.iinfo(dtype).max
    for cid in range(4):
        np.testing.assert_array_equal(
            class_mask(labels, cid), np.where(labels == cid, 255, 0).astype(np.uint8)
        )
    assert not class_mask(labels, 300).any()


def test_lookup_table_colorize_matches_a_gather():
    labels = np.random.default_rng(0).integers(0, 30, (20, 30)).astype(np.uint8)
    labels[::3] = 255
    colors = palette(30)
    expected = np.where((labels == 255)[..., None], 0, colors[np.minimum(labels, 29)])
    np.testing.assert_array_equal(colorize(labels, colors), expected)
    with pytest.raises(ValueError, match="contains class 29"):
        colorize(labels, palette(29))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_frame_path_agrees_with_the_cpu(photos, make_segmenter, precision):
    gpu = Segmenter(SegmenterConfig(**{**TINY_CONFIG, "device": "cuda", "precision": precision}))
    result = gpu.segment(photos[0])
    assert result.labels.dtype == np.uint8 and result.confidence.dtype == np.float32
    assert 0 < result.timings["model"] <= result.timings["total"]
    assert agreement(gpu, make_segmenter(), photos) > 0.9


def test_overlay_and_colorize_take_strided_views():
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (20, 60)).astype(np.uint8)[:, ::2]  # a strided view
    rgb = bgr[:, :, ::-1]  # negative strides, as a BGR->RGB view
    out = overlay(rgb, labels, palette(3), alpha=0.5)
    expected = overlay(rgb.copy(), labels.copy(), palette(3), alpha=0.5)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(colorize(labels, palette(3)), palette(3)[labels])
