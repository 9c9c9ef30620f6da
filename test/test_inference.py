"""Image -> labels: whole vs slide, windows, input formats, thresholds, background, Result.

Expected labels are recomputed here from `Segmenter.dense_logits` with plain torch ops in the
official codes' order (logits upsampled bilinearly to the frame, softmax over queries, max over a
class's queries, argmax), so the post-processing rules are checked independently of the engine's
own, chunked implementation (labeling.py).
"""

import json

import numpy as np
import pytest
import torch

from ovseg_ros.engine.inference import MAX_TOKENS, dense_maps, resized_shape, window_starts
from ovseg_ros.engine.labeling import label_pixels


def random_image(height, width, seed=0):
    """A deterministic random RGB uint8 image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def class_probabilities(logits, vocab, size=None):
    """(groups, H, W): logits bilinearly to `size`, softmax over queries, max over each group."""
    logits = logits.float()
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        logits = torch.nn.functional.interpolate(
            logits[None], size=size, mode="bilinear", align_corners=False
        )[0]
    prob = torch.softmax(logits, dim=0)
    groups = vocab.num_classes + (1 if vocab.background_words else 0)
    return torch.stack([prob[vocab.query_class == g].max(dim=0).values for g in range(groups)])


def suppress_small_classes(prob, num_classes, area_threshold):
    """SCLIP's area threshold: zero classes covering <= area_threshold of the labelled pixels."""
    winner = prob.argmax(dim=0)
    counts = torch.stack([(winner == c).sum() for c in range(num_classes)]).float()
    out = prob.clone()
    out[:num_classes][counts <= area_threshold * counts.sum()] = 0
    return out


def manual_labels(logits, vocab, prob_threshold=0.0, size=None):
    """Labels and confidence from (Q, H, W) logits: softmax, max over synonyms, argmax, rules."""
    confidence, labels = class_probabilities(logits, vocab, size).max(dim=0)
    unlabeled = (labels >= vocab.num_classes) | (confidence < prob_threshold)
    labels = torch.where(unlabeled, torch.full_like(labels, vocab.unlabeled), labels)
    return labels.numpy(), confidence.numpy()


# --- whole vs slide -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["naclip", "sclip", "maskclip"])
def test_whole_equals_slide_when_the_image_is_one_crop(make_segmenter, method):
    image = random_image(224, 224)
    whole = make_segmenter(method=method, short_side=224, mode="whole")
    slide = make_segmenter(method=method, short_side=224, mode="slide", crop=224, stride=112)
    logits_whole, _ = whole.dense_logits(image)
    logits_slide, _ = slide.dense_logits(image)
    assert logits_whole.shape == (len(whole.vocabulary.queries), 224, 224)
    torch.testing.assert_close(logits_slide, logits_whole, atol=0, rtol=0)


def test_slide_on_an_image_smaller_than_the_crop_equals_whole(make_segmenter):
    image = random_image(50, 70)
    whole = make_segmenter(short_side=60, mode="whole")
    slide = make_segmenter(short_side=60, mode="slide", crop=96, stride=48)
    logits_whole, _ = whole.dense_logits(image)
    assert logits_whole.shape[1:] == resized_shape(50, 70, 60) == (60, 84)
    torch.testing.assert_close(slide.dense_logits(image)[0], logits_whole, atol=0, rtol=0)


def test_slide_differs_from_whole_on_a_larger_image(make_segmenter):
    image = random_image(64, 128)
    whole, _ = make_segmenter(short_side=64, mode="whole").dense_logits(image)
    slide, _ = make_segmenter(short_side=64, mode="slide", crop=32, stride=16).dense_logits(image)
    assert whole.shape == slide.shape == (whole.shape[0], 64, 128)
    assert not torch.allclose(whole, slide)


def test_window_starts_cover_every_pixel():
    for size in range(1, 130):
        for crop in (1, 7, 16, 32, 64):
            for stride in range(1, crop + 1, 3):
                starts = window_starts(size, min(crop, size), stride)
                c = min(crop, size)
                assert starts[0] == 0
                assert starts == sorted(set(starts))
                assert starts[-1] == max(size - c, 0)  # the last window ends at the image end
                assert all(b - a <= stride for a, b in zip(starts, starts[1:], strict=False))
                covered = np.zeros(size, bool)
                for s in starts:
                    covered[s : s + c] = True
                assert covered.all(), (size, crop, stride)


def test_window_starts_examples():
    assert window_starts(224, 224, 112) == [0]
    assert window_starts(336, 224, 112) == [0, 112]
    assert window_starts(448, 224, 112) == [0, 112, 224]
    assert window_starts(400, 224, 112) == [0, 112, 176]


def test_resized_shape_keeps_aspect():
    assert resized_shape(480, 640, 336) == (336, 448)
    assert resized_shape(640, 480, 336) == (448, 336)
    assert resized_shape(1, 1, 336) == (336, 336)
    assert resized_shape(1080, 1920, 64) == (64, 114)


def test_resized_shape_caps_the_long_side():
    # a strip 7 px high would become 336 x 24048 (31k tokens): the long side stops at 2048
    assert resized_shape(7, 501, 336) == (29, 2048)
    assert resized_shape(5000, 10, 336) == (2048, 4)
    assert resized_shape(100, 100, 3000) == (3000, 3000)  # a short side above the cap wins


@pytest.mark.parametrize(
    "size,short", [((480, 640), 1024), ((100, 100), 3000), ((7, 501), 336), ((1080, 1920), 900)]
)
def test_resized_shape_holds_at_most_max_tokens_patches(size, short):
    h, w = resized_shape(*size, short, patch=16)
    assert -(-h // 16) * -(-w // 16) <= MAX_TOKENS
    assert abs(h / w - size[0] / size[1]) < 0.02 * max(1, size[0] / size[1])  # aspect kept
    unbounded = resized_shape(*size, short)
    assert (h, w) == unbounded or h * w < unbounded[0] * unbounded[1]
    assert resized_shape(480, 640, 336, patch=16) == (336, 448)  # the usual case is untouched


def test_a_whole_pass_never_exceeds_max_tokens(make_segmenter, monkeypatch):
    # A 4:3 frame at short side 1024 would be 64 x 86 = 5504 patches in one pass.
    seg = make_segmenter(short_side=1024, mode="whole")
    seen = []
    original = seg.method.logits

    def spy(backbone, images, vocab):
        seen.append(tuple(images.shape))
        return original(backbone, images, vocab)

    monkeypatch.setattr(seg.method, "logits", spy)
    result = seg.segment(random_image(48, 64))
    assert result.labels.shape == (48, 64)
    ((_, _, h, w),) = seen
    assert (h // 16) * (w // 16) <= MAX_TOKENS


def test_slide_batches_hold_at_most_max_tokens(tiny_backbone, make_segmenter):
    seg = make_segmenter()
    image = torch.zeros(1, 3, 640, 640)
    seen = []

    class Spy:
        has_pixel_step = False

        def token_patch(self, backbone):
            return backbone.patch_size

        def logits(self, backbone, images, vocab):
            seen.append(images.shape[0] * (images.shape[-2] // 16) * (images.shape[-1] // 16))
            return torch.zeros(images.shape[0], 1, images.shape[-2] // 16, images.shape[-1] // 16)

    maps = dense_maps(Spy(), tiny_backbone, image, seg.vocabulary, "slide", 512, 64, 64)
    # 9 crops of 32 x 32 = 1024 patches: 4 per batch (16 asked for), not 9 at once.
    assert maps.grids.shape[0] == 9 and seen == [4096, 4096, 1024]
    assert max(seen) <= MAX_TOKENS


# --- shapes and input formats ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["whole", "slide"])
@pytest.mark.parametrize("size", [(1, 1), (7, 501), (1080, 1920), (33, 17)])
def test_output_shapes_and_dtypes(make_segmenter, mode, size):
    # A small short side keeps the 7 x 501 strip cheap in whole mode (its token count is
    # proportional to the aspect ratio, and attention is quadratic in it).
    seg = make_segmenter(short_side=32, mode=mode, crop=32, stride=16)
    result = seg.segment(random_image(*size))
    assert result.labels.shape == size and result.labels.dtype == np.uint8
    assert result.confidence.shape == size and result.confidence.dtype == np.float32
    assert np.all((result.confidence >= 0) & (result.confidence <= 1))
    n = seg.vocabulary.num_classes
    assert np.all((result.labels < n) | (result.labels == 255))
    assert result.fractions.shape == (n,) and result.scores.shape == (n,)


def test_grayscale_is_replicated(make_segmenter):
    seg = make_segmenter(short_side=48)
    gray = random_image(40, 60)[:, :, 0]
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    expected = seg.segment(rgb)
    for image in (gray, gray[:, :, None]):
        result = seg.segment(image)
        np.testing.assert_array_equal(result.labels, expected.labels)
        np.testing.assert_array_equal(result.confidence, expected.confidence)


def test_rgba_alpha_is_dropped(make_segmenter):
    seg = make_segmenter(short_side=48)
    rgb = random_image(40, 60)
    alpha = np.random.default_rng(9).integers(0, 256, (40, 60, 1), dtype=np.uint8)
    result = seg.segment(np.concatenate([rgb, alpha], axis=2))
    expected = seg.segment(rgb)
    np.testing.assert_array_equal(result.labels, expected.labels)
    np.testing.assert_array_equal(result.confidence, expected.confidence)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((8, 8, 3), np.float32), "uint8"),
        (np.zeros((8, 8, 3), bool), "uint8"),
        (np.zeros((8, 8, 2), np.uint8), "shape"),
        (np.zeros((8, 8, 3, 1), np.uint8), "shape"),
        (np.zeros(8, np.uint8), "shape"),
        (np.zeros((0, 8, 3), np.uint8), "empty"),
        (np.zeros((8, 0), np.uint8), "empty"),
        ([[0, 0, 0]], "numpy array"),
        (None, "numpy array"),
    ],
)
def test_invalid_images_raise(make_segmenter, image, message):
    seg = make_segmenter()
    with pytest.raises(ValueError, match=message):
        seg.segment(image)
    with pytest.raises(ValueError, match=message):
        seg.dense_logits(image)


def test_non_contiguous_image(make_segmenter):
    seg = make_segmenter(short_side=48)
    image = random_image(60, 80)
    np.testing.assert_array_equal(
        seg.segment(image[::-1, ::2]).labels, seg.segment(image[::-1, ::2].copy()).labels
    )


# --- post-processing rules ------------------------------------------------------------------


def test_labels_follow_the_logits(make_segmenter):
    # At short_side = min(H, W) no resizing happens, so labels are computed at logit resolution.
    seg = make_segmenter(vocabulary=["cat; kitten", "dog", "car"], background_words=[])
    seg.update(short_side=40)
    image = random_image(40, 56)
    logits, vocab = seg.dense_logits(image)
    assert logits.shape[1:] == (40, 56)
    labels, confidence = manual_labels(logits, vocab)
    result = seg.segment(image)
    np.testing.assert_array_equal(result.labels, labels)
    np.testing.assert_allclose(result.confidence, confidence, atol=1e-6)
    assert (result.labels != 255).all()


def test_whole_mode_resamples_the_grid_straight_to_the_frame(make_segmenter, tiny_backbone):
    # Official order, whole mode (NACLIP's forward_feature at the original size, CLIPer's
    # main_ovs): grid logits -> one bilinear step to the frame -> softmax -> argmax.
    seg = make_segmenter(
        method="naclip", vocabulary=["cat; kitten", "dog", "car"], background_words=["sky"]
    )
    seg.update(short_side=32)
    image = random_image(48, 96, seed=11)  # model input 32 x 64: no padding, grid 2 x 4
    result = seg.segment(image)
    normed = seg.backbone.normalize(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
    normed = torch.nn.functional.interpolate(
        normed, size=(32, 64), mode="bilinear", align_corners=False, antialias=True
    )
    grid = dense_maps(seg.method, tiny_backbone, normed, seg.vocabulary).grids[0]
    assert grid.shape[-2:] == (2, 4)
    labels, confidence = manual_labels(grid, seg.vocabulary, size=(48, 96))
    np.testing.assert_array_equal(result.labels, labels)
    np.testing.assert_allclose(result.confidence, confidence, atol=1e-5)


def test_whole_mode_samples_each_frame_pixel_at_its_own_position(make_segmenter, tiny_backbone):
    # With padding the grid covers more than the image; a grid holding each cell centre's input
    # x coordinate must come out as each frame pixel centre's input coordinate.
    seg = make_segmenter(method="naclip")
    image = seg.backbone.normalize(torch.zeros(1, 3, 40, 50))  # padded to 48 x 64: grid 3 x 4
    maps = dense_maps(seg.method, tiny_backbone, image, seg.vocabulary)
    assert maps.padded == (48, 64) and maps.grids.shape[-2:] == (3, 4)
    maps.grids = ((torch.arange(4) + 0.5) * 16.0).view(1, 1, 1, 4).expand(1, 1, 3, 4).clone()
    out = maps.whole_to(slice(0, 1), (80, 100))[0]
    expected = (torch.arange(100) + 0.5) * 50 / 100  # input x of each frame pixel centre
    inside = (expected >= 8) & (expected <= 56)  # between the first and last cell centres
    torch.testing.assert_close(out[0, inside], expected[inside].float(), atol=1e-4, rtol=0)


def test_slide_mode_averages_crops_at_the_input_then_resamples_to_the_frame(make_segmenter):
    # NACLIP's forward_slide: crops upsampled to their size, averaged, then to the frame.
    seg = make_segmenter(
        method="naclip", vocabulary=["cat", "dog", "car"], background_words=["sky"]
    )
    seg.update(short_side=32, mode="slide", crop=32, stride=16)
    image = random_image(45, 70, seed=12)
    logits, vocab = seg.dense_logits(image)
    assert logits.shape[1:] == (32, 50)
    labels, confidence = manual_labels(logits, vocab, size=(45, 70))
    result = seg.segment(image)
    np.testing.assert_array_equal(result.labels, labels)
    np.testing.assert_allclose(result.confidence, confidence, atol=1e-5)


@pytest.mark.parametrize("area", [0.0, 0.2])
@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_chunked_labelling_equals_one_pass(make_segmenter, tiny_backbone, mode, area):
    # 40 classes with synonyms and background words, labelled 1, 3 or all queries at a time.
    vocabulary = [f"thing {i}; item {i}" if i % 3 == 0 else f"thing {i}" for i in range(40)]
    seg = make_segmenter(vocabulary=vocabulary, background_words=["sky", "wall"], short_side=32)
    image = seg.backbone.normalize(
        torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    )
    maps = dense_maps(seg.method, tiny_backbone, image, seg.vocabulary, mode, 32, 16, 4)
    per_query = 4 * (2 * 32 * 48 + 2 * 60 * 90)
    outs = [
        label_pixels(maps, (60, 90), area_threshold=area, chunk_bytes=per_query * q)
        for q in (1, 3, 10_000)
    ]
    for out in outs[:2]:
        torch.testing.assert_close(out.labels, outs[2].labels, atol=0, rtol=0)
        torch.testing.assert_close(out.confidence, outs[2].confidence, atol=1e-6, rtol=1e-5)
    one_shot = maps.at_output(slice(None), (60, 90), None)  # every query at once
    prob = class_probabilities(one_shot, seg.vocabulary)
    if area:
        prob = suppress_small_classes(prob, 40, area)
    confidence, labels = prob.max(dim=0)
    labels[(labels >= 40) | (confidence <= 0)] = 255
    torch.testing.assert_close(outs[0].labels, labels.to(torch.int32), atol=0, rtol=0)
    torch.testing.assert_close(outs[0].confidence, confidence, atol=1e-6, rtol=1e-5)


def test_background_words_become_unlabeled(make_segmenter):
    seg = make_segmenter(vocabulary=["cat", "dog"], short_side=40)  # 26 default background words
    image = random_image(40, 56, seed=3)
    logits, vocab = seg.dense_logits(image)
    assert len(vocab.background_words) == 26
    labels, _ = manual_labels(logits, vocab)
    result = seg.segment(image)
    np.testing.assert_array_equal(result.labels, labels)
    assert (result.labels == 255).any()


def test_prob_threshold(make_segmenter):
    seg = make_segmenter(vocabulary=["cat", "dog", "car"], background_words=[], short_side=40)
    image = random_image(40, 56, seed=4)
    logits, vocab = seg.dense_logits(image)
    base = seg.segment(image)
    threshold = float(np.median(base.confidence))
    seg.update(prob_threshold=threshold)
    result = seg.segment(image)
    np.testing.assert_array_equal(result.labels, manual_labels(logits, vocab, threshold)[0])
    assert np.all(result.labels[base.confidence < threshold] == 255)
    np.testing.assert_array_equal(
        result.labels[base.confidence >= threshold], base.labels[base.confidence >= threshold]
    )
    seg.update(prob_threshold=1.0)
    assert (seg.segment(image).labels == 255).all()


def test_area_threshold_in_the_segmenter(make_segmenter):
    seg = make_segmenter(vocabulary=["cat", "dog", "car", "bus"], background_words=[])
    seg.update(short_side=40)
    image = random_image(40, 56, seed=6)
    logits, vocab = seg.dense_logits(image)
    base = seg.segment(image)
    fractions = base.fractions[base.fractions > 0]
    assert len(fractions) >= 2, "the random model labels too few classes for this test"
    threshold = float(np.sort(fractions)[0] + 1e-4)  # just above the smallest class
    seg.update(area_threshold=threshold)
    result = seg.segment(image)

    prob = suppress_small_classes(class_probabilities(logits, vocab), vocab.num_classes, threshold)
    expected = prob.argmax(dim=0).numpy()
    np.testing.assert_array_equal(result.labels, expected)
    smallest = int(np.argmin(np.where(base.fractions > 0, base.fractions, np.inf)))
    assert result.fractions[smallest] == 0
    assert set(np.unique(result.labels)) < set(np.unique(base.labels))


def test_area_threshold_suppressing_every_class_leaves_pixels_unlabeled(make_segmenter):
    seg = make_segmenter(vocabulary=["cat", "dog"], background_words=[], short_side=32)
    seg.update(area_threshold=1.0)  # no class can cover more than all labelled pixels
    result = seg.segment(random_image(32, 32))
    assert (result.labels == 255).all()
    assert result.fractions.sum() == 0


# --- Result ---------------------------------------------------------------------------------


def test_result_summary(make_segmenter):
    seg = make_segmenter(method="naclip", short_side=48)
    result = seg.segment(random_image(48, 64))
    summary = json.loads(json.dumps(result.summary()))
    assert summary["vocabulary_version"] == seg.vocabulary.version == result.version
    assert summary["size"] == [48, 64]
    total = summary["unlabeled_fraction"] + sum(c["fraction"] for c in summary["classes"])
    assert total == pytest.approx(1.0, abs=1e-5)
    assert [c["id"] for c in summary["classes"]] == result.present()
    fractions = [c["fraction"] for c in summary["classes"]]
    assert fractions == sorted(fractions, reverse=True)
    for c in summary["classes"]:
        assert c["name"] == seg.vocabulary.names[c["id"]]
        mask = result.labels == c["id"]
        assert c["fraction"] == pytest.approx(mask.mean(), abs=1e-6)
        assert c["score"] == pytest.approx(result.confidence[mask].mean(), abs=1e-5)
    assert set(summary["timings_ms"]) == {"model", "postprocess", "total"}
    assert all(v >= 0 for v in summary["timings_ms"].values())


def test_segmentation_is_deterministic(make_segmenter):
    seg = make_segmenter(short_side=64, mode="slide", crop=32, stride=16, refine="pamr")
    image = random_image(70, 90, seed=8)
    first, second = seg.segment(image), seg.segment(image)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.confidence, second.confidence)


@pytest.mark.parametrize("area", [0.0, 0.3])
def test_labelling_leaves_the_method_maps_as_they_were(make_segmenter, tiny_backbone, area):
    # At short side = frame size nothing is resampled: the labelling works on a copy.
    seg = make_segmenter(vocabulary=["cat", "dog", "car"], background_words=[], short_side=32)
    image = seg.backbone.normalize(torch.rand(1, 3, 32, 32, generator=torch.Generator()))
    maps = dense_maps(seg.method, tiny_backbone, image, seg.vocabulary, "whole")
    maps.grids = torch.randn(1, 3, 32, 32)  # grids at the frame's size already
    before = maps.grids.clone()
    first = label_pixels(maps, (32, 32), area_threshold=area)
    torch.testing.assert_close(maps.grids, before, atol=0, rtol=0)
    again = label_pixels(maps, (32, 32), area_threshold=area)
    torch.testing.assert_close(first.labels, again.labels, atol=0, rtol=0)


def test_a_long_vocabulary_build_keeps_the_updates_made_meanwhile(make_segmenter):
    seg = make_segmenter()
    vocab = seg.build_vocabulary(["door", "window"])
    seg.update(prob_threshold=0.3, short_side=64)  # while the (long) build ran
    seg.use_vocabulary(vocab, ["door", "window"], seg.config.background_words)
    assert seg.vocabulary is vocab and seg.config.vocabulary == ["door", "window"]
    assert seg.config.prob_threshold == 0.3 and seg.config.short_side == 64


def test_the_token_limit_counts_the_finest_patch_of_the_method(make_segmenter, tiny_backbone):
    from ovseg_ros.engine.methods import create_method

    seg = make_segmenter()
    proxy = create_method("proxyclip", {"vfm_weights": "none"})  # DINO ViT-B/8: patch 8
    assert proxy.token_patch(tiny_backbone) == 8
    seg.check(seg.config.replace(crop=512), seg.method)  # 32 x 32 patches of 16: fine
    with pytest.raises(ValueError, match="4096"):
        seg.check(seg.config.replace(crop=1024), proxy)  # 128 x 128 patches of 8
    with pytest.raises(ValueError, match="at most 512 px"):
        seg.check(seg.config.replace(crop=600), proxy)
    h, w = resized_shape(480, 640, 1024, patch=proxy.token_patch(tiny_backbone))
    assert -(-h // 8) * -(-w // 8) <= MAX_TOKENS


def test_slide_maps_beyond_the_memory_limit_are_refused_with_the_reason(
    make_segmenter, tiny_backbone, monkeypatch
):
    from ovseg_ros.engine import inference

    seg = make_segmenter()
    image = seg.backbone.normalize(torch.rand(1, 3, 64, 128))
    monkeypatch.setattr(inference, "MAX_GRID_BYTES", 1000)
    with pytest.raises(ValueError, match="crops x .* queries would hold"):
        dense_maps(seg.method, tiny_backbone, image, seg.vocabulary, "slide", 32, 8, 4)


@pytest.mark.parametrize(
    ("method", "mode"), [("naclip", "whole"), ("naclip", "slide"), ("pearl", "whole")]
)
def test_a_batch_of_frames_gives_each_frame_its_own_result(make_segmenter, method, mode):
    """segment_batch (the node's camera batching) equals segment() frame by frame, sizes mixed."""
    seg = make_segmenter(method=method, mode=mode, short_side=96, crop=64, stride=48)
    frames = [random_image(72, 96, seed=1), random_image(72, 96, seed=2), random_image(60, 80)]
    batch = seg.segment_batch(frames)
    assert len(batch) == 3
    for frame, result in zip(frames, batch, strict=True):
        alone = seg.segment(frame)
        assert result.vocabulary is alone.vocabulary
        assert result.labels.shape == frame.shape[:2]
        np.testing.assert_array_equal(result.labels, alone.labels)
        np.testing.assert_allclose(result.confidence, alone.confidence, atol=1e-5)
        np.testing.assert_allclose(result.fractions, alone.fractions, atol=1e-6)
    # The two 72x96 frames shared one pass; the 60x80 frame had its own.
    assert batch[0].timings["batch"] == batch[1].timings["batch"] == 2
    assert "batch" not in batch[2].timings
    assert not np.array_equal(batch[0].labels, batch[1].labels)
