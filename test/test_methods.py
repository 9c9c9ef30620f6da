"""Last-block methods against their formulas (METHODS.md section 2), written here independently.

Every reference below uses only plain torch ops on the tiny model's weights (ln_1, in_proj,
out_proj, ln_2, mlp, ln_post, proj), never the engine's helpers, so a mistake in the engine's
head splitting, scaling, softmax axis, residual policy or Omega shows up as a mismatch.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIG
from torch import nn

from ovseg_ros.engine import Segmenter, SegmenterConfig, available_methods, create_method
from ovseg_ros.engine.methods import describe_methods, make_params

METHODS = ["clip", "maskclip", "sclip", "clearclip", "naclip"]
GRID = (3, 5)  # a 48 x 80 image with 16-pixel patches


# --- independent reference math ------------------------------------------------------------


def split_heads(t, heads):
    """(B, N, D) -> (B, heads, N, D / heads)."""
    b, n, d = t.shape
    return t.reshape(b, n, heads, d // heads).permute(0, 2, 1, 3)


def merge_heads(t):
    """(B, heads, N, d) -> (B, N, heads * d)."""
    b, h, n, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(b, n, h * d)


def ref_qkv(block, x, heads):
    """Q, K, V of ln_1(x) with the block's in_proj, split into heads."""
    attn = block.attn
    h = block.ln_1(x)
    q, k, v = (h @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)
    return split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)


def ref_out(block, attention, v):
    """O(A) = out_proj(concat_heads(A @ V))."""
    mixed = merge_heads(attention @ v)
    return mixed @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def ref_ffn(block, y):
    """y + MLP(ln_2(y))."""
    return y + block.mlp(block.ln_2(y))


def ref_omega(h, w, sigma):
    """NACLIP's Omega written out with explicit grid coordinates; zero CLS row and column."""
    n = h * w
    omega = torch.zeros(1 + n, 1 + n)
    for a in range(n):
        ya, xa = divmod(a, w)
        for b in range(n):
            yb, xb = divmod(b, w)
            dist2 = (ya - yb) ** 2 + (xa - xb) ** 2
            omega[1 + a, 1 + b] = math.exp(-dist2 / (2 * sigma**2))
    return omega


def reference_last_block(name, backbone, x, grid, sigma=5.0):
    """The last block's output tokens of a method, from METHODS.md section 2."""
    block = backbone.blocks[-1]
    heads = block.attn.num_heads
    q, k, v = ref_qkv(block, x, heads)
    s = q.shape[-1] ** -0.5
    if name == "clip":
        y = x + ref_out(block, torch.softmax(s * q @ k.transpose(-1, -2), dim=-1), v)
        return ref_ffn(block, y)
    if name == "maskclip":
        y = x + (merge_heads(v) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias)
        return ref_ffn(block, y)
    if name == "sclip":
        a = torch.softmax(s * q @ q.transpose(-1, -2), dim=-1) + torch.softmax(
            s * k @ k.transpose(-1, -2), dim=-1
        )
        return ref_ffn(block, x + ref_out(block, a, v))
    if name == "clearclip":
        return ref_out(block, torch.softmax(s * q @ q.transpose(-1, -2), dim=-1), v)
    if name == "naclip":
        scores = s * k @ k.transpose(-1, -2) + ref_omega(*grid, sigma)
        return ref_out(block, torch.softmax(scores, dim=-1), v)
    raise AssertionError(name)


def reference_logits(backbone, y, grid, vocab, scale):
    """scale * normalize(ln_post(patch tokens) @ proj) . t, as (B, Q, h, w)."""
    visual = backbone.visual
    feats = F.normalize(visual.ln_post(y[:, 1:]) @ visual.proj, dim=-1)
    logits = scale * feats @ vocab.embeddings.T  # (B, h*w, Q), patches in row-major order
    b, _, nq = logits.shape
    return logits.permute(0, 2, 1).reshape(b, nq, grid[0], grid[1])


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tiny_backbone):
    """Two normalised random 48 x 80 images (a 3 x 5 patch grid)."""
    g = torch.Generator().manual_seed(1)
    return tiny_backbone.normalize(torch.rand(2, 3, 48, 80, generator=g))


@pytest.fixture(scope="module")
def last_input(tiny_backbone, images):
    """The input tokens of the last block for `images`."""
    x, grid, _ = tiny_backbone.forward_to_last(images)
    assert grid == GRID
    return x


@pytest.fixture(scope="module")
def vocab(tiny_backbone):
    """A real vocabulary (synonyms and background words) encoded by a Segmenter."""
    config = SegmenterConfig(**TINY_CONFIG, vocabulary=["cat; kitten", "dog", "tree"])
    return Segmenter(config, backbone=tiny_backbone).vocabulary


def test_tiny_block_has_no_layer_scale(tiny_backbone):
    # The references above leave out ls_1 / ls_2; that is exact only without layer scale.
    for block in tiny_backbone.blocks:
        assert isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)


# --- each method equals its formula --------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_last_block_matches_formula(name, tiny_backbone, last_input):
    method = create_method(name)
    y, keys = method.last_block(tiny_backbone, last_input, GRID)
    expected = reference_last_block(name, tiny_backbone, last_input, GRID)
    assert y.shape == last_input.shape
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    # The keys handed to refine_logits are the last block's K, per head.
    _, k, _ = ref_qkv(tiny_backbone.blocks[-1], last_input, tiny_backbone.heads)
    torch.testing.assert_close(keys, k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_logits_match_formula(name, tiny_backbone, images, last_input, vocab):
    method = create_method(name)
    logits = method.logits(tiny_backbone, images, vocab)
    y = reference_last_block(name, tiny_backbone, last_input, GRID)
    expected = reference_logits(tiny_backbone, y, GRID, vocab, method.params.logit_scale)
    assert logits.shape == (2, len(vocab.queries), *GRID)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=1e-3, rtol=1e-4)


def test_clip_last_block_is_the_unchanged_block(tiny_backbone, last_input):
    y, _ = create_method("clip").last_block(tiny_backbone, last_input, GRID)
    torch.testing.assert_close(y, tiny_backbone.blocks[-1](last_input), atol=1e-5, rtol=1e-5)


def test_logit_scale_override_scales_logits(tiny_backbone, images, vocab):
    base = create_method("clearclip").logits(tiny_backbone, images, vocab)
    doubled = create_method("clearclip", {"logit_scale": 100}).logits(tiny_backbone, images, vocab)
    torch.testing.assert_close(doubled, 2 * base, atol=1e-4, rtol=1e-5)


# --- NACLIP ---------------------------------------------------------------------------------


def test_naclip_omega_matches_gaussian_window():
    method = create_method("naclip")
    omega = method.omega(GRID, torch.device("cpu"))
    n = GRID[0] * GRID[1]
    assert omega.shape == (1 + n, 1 + n)
    torch.testing.assert_close(omega, ref_omega(*GRID, 5.0), atol=1e-5, rtol=1e-5)
    assert torch.all(omega[0] == 0) and torch.all(omega[:, 0] == 0)
    torch.testing.assert_close(omega[1:, 1:].diagonal(), torch.ones(n))
    torch.testing.assert_close(omega, omega.T)
    assert method.omega(GRID, torch.device("cpu")) is omega  # cached per grid


def test_naclip_omega_follows_sigma():
    omega = create_method("naclip", {"sigma": 1.5}).omega((4, 6), torch.device("cpu"))
    torch.testing.assert_close(omega, ref_omega(4, 6, 1.5), atol=1e-5, rtol=1e-5)


def test_naclip_omega_is_added_unscaled_before_softmax(tiny_backbone, last_input):
    block = tiny_backbone.blocks[-1]
    q, k, v = tiny_backbone.qkv(block, last_input)
    attention = create_method("naclip").attention(q, k, v, GRID)
    s = k.shape[-1] ** -0.5
    omega = ref_omega(*GRID, 5.0)
    torch.testing.assert_close(attention, torch.softmax(s * k @ k.transpose(-1, -2) + omega, -1))
    scaled = torch.softmax(s * (k @ k.transpose(-1, -2) + omega), dim=-1)
    assert not torch.allclose(attention, scaled, atol=1e-4)
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))


def test_naclip_sigma_changes_output(tiny_backbone, last_input):
    default, _ = create_method("naclip").last_block(tiny_backbone, last_input, GRID)
    narrow, _ = create_method("naclip", {"sigma": 0.5}).last_block(tiny_backbone, last_input, GRID)
    assert not torch.allclose(default, narrow, atol=1e-4)
    expected = reference_last_block("naclip", tiny_backbone, last_input, GRID, sigma=0.5)
    torch.testing.assert_close(narrow, expected, atol=1e-5, rtol=1e-5)


# --- SCLIP, ClearCLIP, MaskCLIP specifics ---------------------------------------------------


def test_sclip_attention_rows_sum_to_two(tiny_backbone, last_input):
    q, k, v = tiny_backbone.qkv(tiny_backbone.blocks[-1], last_input)
    attention = create_method("sclip").attention(q, k, v, GRID)
    assert attention.shape == (2, tiny_backbone.heads, 16, 16)
    torch.testing.assert_close(attention.sum(-1), torch.full(attention.shape[:-1], 2.0))


def test_clearclip_drops_the_residual(tiny_backbone, last_input):
    plain, _ = create_method("clearclip").last_block(tiny_backbone, last_input, GRID)
    with_residual, _ = create_method("clearclip", {"keep_residual": True}).last_block(
        tiny_backbone, last_input, GRID
    )
    torch.testing.assert_close(with_residual - plain, last_input, atol=1e-5, rtol=1e-5)


def test_maskclip_identity_attention_without_residual_and_ffn(tiny_backbone, last_input):
    method = create_method("maskclip", {"keep_residual": False, "keep_ffn": False})
    y, _ = method.last_block(tiny_backbone, last_input, GRID)
    block = tiny_backbone.blocks[-1]
    _, _, v = ref_qkv(block, last_input, tiny_backbone.heads)
    expected = merge_heads(v) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_maskclip_prompt_denoising(tiny_backbone, images, vocab):
    image = images[:1]
    base = create_method("maskclip").logits(tiny_backbone, image, vocab)
    prob = torch.softmax(base.flatten(2), dim=1)  # (1, Q, hw): softmax over the queries
    spatial_max = prob.max(dim=2).values[0]
    levels = spatial_max.sort().values
    thresh = float((levels[len(levels) // 2 - 1] + levels[len(levels) // 2]) / 2)
    kept = spatial_max >= thresh
    assert 0 < int(kept.sum()) < len(kept)

    out = create_method("maskclip", {"pd_thresh": thresh}).logits(tiny_backbone, image, vocab)
    out = out.flatten(2)[0]
    # Kept queries: their log-probabilities, untouched. Dropped queries: log(1e-6) everywhere.
    torch.testing.assert_close(out[kept], torch.log(prob[0, kept].clamp_min(1e-6)))
    torch.testing.assert_close(out[~kept], torch.full_like(out[~kept], math.log(1e-6)))
    # A softmax over the output renormalises the kept queries' probabilities.
    renormalised = prob[0, kept] / prob[0, kept].sum(dim=0, keepdim=True)
    torch.testing.assert_close(torch.softmax(out, dim=0)[kept], renormalised, atol=1e-4, rtol=0)


def test_maskclip_key_smoothing(tiny_backbone, images, last_input, vocab):
    # logit_scale 10 keeps every pixel's best probability below ks_thresh = 1.0.
    params = {"logit_scale": 10.0}
    base = create_method("maskclip", params).logits(tiny_backbone, images, vocab)
    prob = torch.softmax(base.flatten(2), dim=1)  # (B, Q, hw)
    assert torch.all(prob.max(dim=1).values < 1.0)

    out = create_method("maskclip", {**params, "ks_thresh": 1.0}).logits(
        tiny_backbone, images, vocab
    )
    _, k, _ = ref_qkv(tiny_backbone.blocks[-1], last_input, tiny_backbone.heads)
    keys = F.normalize(merge_heads(k)[:, 1:], dim=-1)  # (B, hw, D) patch keys, heads joined
    cos = keys @ keys.transpose(1, 2)  # cos(k_i, k_j)
    smoothed = torch.einsum("bij,bqj->bqi", cos, prob)  # sum_j cos(k_i, k_j) p_j
    expected = torch.log(smoothed.clamp_min(1e-6)).reshape(out.shape)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_maskclip_refinements_off_by_default(tiny_backbone, images, vocab):
    params = create_method("maskclip").params
    assert params.ks_thresh == 0 and params.pd_thresh == 0
    logits = torch.randn(1, 3, 2, 2)
    assert create_method("maskclip").refine_logits(logits, None) is logits


# --- registry and hyper-parameters ---------------------------------------------------------


def test_registry_lists_the_five_methods():
    assert set(METHODS) <= set(available_methods())
    assert available_methods() == sorted(available_methods())
    described = {d["name"]: d for d in describe_methods()}
    assert set(METHODS) <= set(described)
    assert described["naclip"]["params"]["sigma"] == 5.0
    assert all(d["summary"] for d in described.values())


@pytest.mark.parametrize(
    ("name", "scale", "residual", "ffn"),
    [
        ("clip", 100.0, True, True),
        ("maskclip", 100.0, True, True),
        ("sclip", 40.0, True, True),
        ("clearclip", 50.0, False, False),
        ("naclip", 40.0, False, False),
    ],
)
def test_published_defaults(name, scale, residual, ffn):
    params = create_method(name).params
    assert params.logit_scale == scale
    assert params.keep_residual is residual
    assert params.keep_ffn is ffn


def test_naclip_default_sigma_is_five():
    assert create_method("naclip").params.sigma == 5.0


def test_unknown_method_lists_known_names():
    with pytest.raises(ValueError, match="unknown method 'nope'") as info:
        create_method("nope")
    for name in METHODS:
        assert name in str(info.value)


def test_unknown_parameter_names_valid_ones():
    with pytest.raises(ValueError, match="no parameter 'alpha'") as info:
        create_method("naclip", {"alpha": 1})
    for valid in ("logit_scale", "sigma", "keep_residual", "keep_ffn"):
        assert valid in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("False", False), ("on", True), ("0", False), (1, True), (False, False)],
)
def test_bool_parameters_are_coerced(value, expected):
    assert make_params("clip", {"keep_ffn": value}).keep_ffn is expected


def test_float_parameters_are_coerced():
    params = make_params("naclip", {"sigma": "3", "logit_scale": 60})
    assert params.sigma == 3.0 and isinstance(params.sigma, float)
    assert params.logit_scale == 60.0 and isinstance(params.logit_scale, float)


@pytest.mark.parametrize(
    ("key", "value"),
    [("sigma", "wide"), ("sigma", None), ("keep_ffn", "maybe"), ("keep_ffn", 2)],
)
def test_invalid_parameter_values_raise(key, value):
    with pytest.raises(ValueError, match=key):
        make_params("naclip", {key: value})


@pytest.mark.parametrize("sigma", [0, -1.0, "0", float("nan"), float("inf")])
def test_naclip_sigma_must_be_positive(sigma):
    with pytest.raises(ValueError, match="sigma"):
        create_method("naclip", {"sigma": sigma})


def test_overrides_do_not_leak_between_instances():
    create_method("naclip", {"sigma": 2.0})
    assert create_method("naclip").params.sigma == 5.0


# --- the block runner -----------------------------------------------------------------------


def test_run_block_capturing_equals_block_forward(tiny_backbone, last_input):
    for block in tiny_backbone.blocks:
        y, attention = tiny_backbone.run_block_capturing(block, last_input)
        torch.testing.assert_close(y, block(last_input), atol=1e-5, rtol=1e-5)
        assert attention.shape == (2, tiny_backbone.heads, 16, 16)
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))


def test_forward_to_last_captures_every_block(tiny_backbone, images, last_input):
    x, grid, capture = tiny_backbone.forward_to_last(
        images, capture_inputs=True, capture_attention=True
    )
    assert grid == GRID
    assert len(capture.inputs) == tiny_backbone.num_layers
    assert len(capture.attentions) == tiny_backbone.num_layers - 1
    torch.testing.assert_close(capture.inputs[-1], x)
    torch.testing.assert_close(x, last_input, atol=1e-5, rtol=1e-5)
