"""PAMR (pixel-adaptive mask refinement): invariants and its pull toward colour edges."""

import torch

from ovseg_ros.engine.refine import pamr


def split_image(height=48, width=64, edge=32):
    """(1, 3, H, W) image: black left of column `edge`, white from it on."""
    image = torch.zeros(1, 3, height, width)
    image[..., edge:] = 1.0
    return image


def offset_logits(height=48, width=64, boundary=38):
    """(1, 2, H, W) logits: class 0 left of `boundary`, class 1 from it on (margin 1)."""
    logits = torch.zeros(1, 2, height, width)
    logits[:, 0, :, :boundary] = 1.0
    logits[:, 1, :, boundary:] = 1.0
    return logits


def mislabelled(logits, edge=32):
    """Pixels whose argmax disagrees with the colour edge (class 1 = white side)."""
    truth = torch.zeros(logits.shape[-2:], dtype=torch.long)
    truth[:, edge:] = 1
    return int((logits[0].argmax(dim=0) != truth).sum())


def test_constant_map_stays_constant():
    image = torch.rand(1, 3, 40, 50, generator=torch.Generator().manual_seed(0))
    logits = torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1).expand(1, 3, 40, 50).contiguous()
    torch.testing.assert_close(pamr(image, logits), logits, atol=1e-5, rtol=1e-5)


def test_zero_iterations_is_identity():
    image, logits = split_image(), offset_logits()
    assert pamr(image, logits, iterations=0) is logits


def test_labels_move_toward_the_colour_edge():
    image, logits = split_image(), offset_logits(boundary=38)
    before = mislabelled(logits)
    assert before == 48 * 6
    refined = pamr(image, logits)
    assert refined.shape == logits.shape and refined.dtype == logits.dtype
    assert mislabelled(refined) < before // 2
    # Pixels far from both boundaries keep their label.
    assert torch.all(refined[0, :, :, :24].argmax(dim=0) == 0)
    assert torch.all(refined[0, :, :, 48:].argmax(dim=0) == 1)


def test_labels_move_toward_the_edge_from_the_other_side():
    image, logits = split_image(), offset_logits(boundary=27)
    before = mislabelled(logits)
    assert mislabelled(pamr(image, logits)) < before // 2


def test_weights_are_a_convex_combination():
    # Each iteration averages neighbours, so values stay within the input's range.
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 30, 30, generator=g)
    logits = torch.randn(1, 4, 30, 30, generator=g)
    out = pamr(image, logits, iterations=3)
    assert out.min() >= logits.min() - 1e-5 and out.max() <= logits.max() + 1e-5


def test_affinity_comes_from_the_image():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 3, 40, 40, generator=g)
    a = pamr(torch.rand(1, 3, 40, 40, generator=g), logits, iterations=2)
    b = pamr(torch.rand(1, 3, 40, 40, generator=g), logits, iterations=2)
    assert not torch.allclose(a, b, atol=1e-4)
    # Scaling the image changes nothing: the affinity is normalised by the local std.
    image = torch.rand(1, 3, 40, 40, generator=g)
    torch.testing.assert_close(
        pamr(image, logits, iterations=2), pamr(image * 0.5, logits, iterations=2)
    )


def test_more_iterations_smooth_more():
    g = torch.Generator().manual_seed(3)
    image = torch.zeros(1, 3, 32, 32)  # uniform image: plain averaging
    logits = torch.randn(1, 2, 32, 32, generator=g)
    spread = [float(pamr(image, logits, iterations=n).std()) for n in (0, 1, 5)]
    assert spread[0] > spread[1] > spread[2]
