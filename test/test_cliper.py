"""CLIPer (METHODS.md section 4) against its formulas, written here independently.

The formulas are those of the official code (linsun449/cliper.code): the fp16 bilinear
positional table, one more column/row normalisation of the summed attention per layer, the
thresholded selected layer inside the layer mean, and the labelling of ovs/main_ovs.py and
util/miou.py cam_to_label (upsample first, divide by the upsampled maximum, is_normalize,
score and background thresholds), transcribed below as ref_official_labels.

The references use plain torch ops on the models' weights (ln_1, in_proj, out_proj, mlp, ln_post,
proj; diffusers' to_q / to_k), explicit loops where that is clearer, and never the engine's
helpers. FGC runs on a tiny random UNet2DConditionModel / AutoencoderKL built from a config, so it
takes seconds; Stable Diffusion weights are never needed.
"""

import json
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIG, build_tiny
from pos_reference import official_table

from ovseg_ros.engine import Segmenter, SegmenterConfig, available_methods, create_method
from ovseg_ros.engine import fgc as fgc_lib
from ovseg_ros.engine.backbone import Backbone
from ovseg_ros.engine.clip_loading import _open_clip
from ovseg_ros.engine.clip_weights import ModelLoadError
from ovseg_ros.engine.inference import resized_shape
from ovseg_ros.engine.methods import cliper as cliper_lib
from ovseg_ros.engine.methods import describe_methods, make_params

GRID = (3, 5)  # a 48 x 80 image with 16-pixel patches
VOCAB = ["cat; kitten", "dog", "tree"]
BACKGROUND = ["sky", "wall", "floor"]

# --- independent reference math ------------------------------------------------------------


def heads_of(t, heads):
    """(B, N, D) -> (B, heads, N, D / heads)."""
    b, n, d = t.shape
    return t.reshape(b, n, heads, d // heads).permute(0, 2, 1, 3)


def ref_embed(backbone, images, style="bilinear_fp16"):
    """conv1 patches + CLS, plus the positional table (official CLIPer: bilinear, fp16), ln_pre."""
    visual = backbone.visual
    x = visual.conv1(images)
    h, w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    native = visual.positional_embedding
    gh, gw = backbone.native_grid
    if style == "bilinear_fp16":
        # CLIPer's upsample_pos_emb as written (test_backbone pins the op against a float64
        # loop; fp16 rounding of that loop's values would differ in a few elements by one step).
        grid = native[1:].T.reshape(1, -1, gh, gw)
        patches = F.interpolate(grid, size=(h, w), mode="bilinear")[0].reshape(-1, h * w).T
        table = torch.cat([native[:1], patches]).half().float()
    elif (h, w) == (gh, gw):
        table = native
    else:
        patches = official_table(native[1:].reshape(gh, gw, -1), (h, w)).reshape(h * w, -1)
        table = torch.cat([native[:1].double(), patches]).float()
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    return visual.ln_pre(torch.cat([cls, x], dim=1) + table)


def ref_blocks(backbone, images, style="bilinear_fp16"):
    """Every block's input F^1..F^L and the per-head attention of blocks 1..L-1, by hand."""
    x = ref_embed(backbone, images, style)
    inputs, attentions = [], []
    for block in backbone.blocks[:-1]:
        inputs.append(x)
        attn = block.attn
        q, k, v = (block.ln_1(x) @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (heads_of(t, attn.num_heads) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        attentions.append(a)
        mixed = (a @ v).permute(0, 2, 1, 3).reshape(x.shape)
        x = x + mixed @ attn.out_proj.weight.T + attn.out_proj.bias
        x = x + block.mlp(block.ln_2(x))
    inputs.append(x)
    return inputs, attentions


def ref_fuse(attentions, times=1):
    """The fused attention after `times` column-then-row normalisations, in float64."""
    m = sum(a.double() for a in attentions)
    for _ in range(times):
        col = m.sum(dim=2, keepdim=True)  # sum over rows i: one value per column j
        m = m / col
        m = m / m.sum(dim=3, keepdim=True)
    sym = 0.5 * (m + m.transpose(2, 3))
    centred = sym - sym.sum(dim=2, keepdim=True) / sym.shape[2]
    pos = torch.where(centred > 0, centred, torch.zeros_like(centred))
    return (pos / pos.sum(dim=3, keepdim=True)).float(), sym.float()


def ref_reproject(backbone, feature_sets, fused):
    """For each F^n: normalize(ln_post(out_proj(Ã V_L(ln_1^L(F^n)))) @ proj) on the patches."""
    block = backbone.blocks[-1]
    attn = block.attn
    width = backbone.width
    out = []
    for f in feature_sets:
        v = block.ln_1(f) @ attn.in_proj_weight[2 * width :].T + attn.in_proj_bias[2 * width :]
        v = heads_of(v, attn.num_heads)
        mixed = (fused @ v).permute(0, 2, 1, 3).reshape(f.shape)
        y = mixed @ attn.out_proj.weight.T + attn.out_proj.bias
        feats = backbone.visual.ln_post(y[:, 1:]) @ backbone.visual.proj
        out.append(F.normalize(feats, dim=-1))
    return torch.stack(out)  # (L, B, hw, D)


def ref_probabilities(features, vocab, scale):
    """softmax over [fg queries; background words; normalised mean fg] of scale * cos; fg kept."""
    fg_rows = [i for i, c in enumerate(vocab.query_class.tolist()) if c < vocab.num_classes]
    bg_rows = [i for i, c in enumerate(vocab.query_class.tolist()) if c >= vocab.num_classes]
    emb = vocab.embeddings
    mean_fg = emb[fg_rows].mean(dim=0)
    mean_fg = mean_fg / mean_fg.norm()
    text = torch.cat([emb[fg_rows], emb[bg_rows], mean_fg[None]])
    prob = torch.softmax(scale * torch.einsum("lbpd,qd->lbqp", features, text), dim=2)
    return prob[:, :, : len(fg_rows)]  # (L, B, Qfg, hw)


def ref_threshold(selected, thr):
    """S zeroed below thr x its spatial max, query by query."""
    s = selected.clone()
    for bi in range(s.shape[0]):
        for qi in range(s.shape[1]):
            s[bi, qi][s[bi, qi] < thr * s[bi, qi].max()] = 0
    return s


def ref_mix(s, fused):
    """S'_j = sum_i S_i mean_h(Ã)_ij over the patches."""
    a = fused.mean(dim=1)[:, 1:, 1:]
    out = torch.zeros_like(s)
    for j in range(s.shape[-1]):
        out[:, :, j] = (s * a[:, None, :, j]).sum(dim=-1)
    return out


def ref_propagate(selected, fused, thr):
    """S'_j = sum_i S_i mean_h(Ã)_ij over patches, S zeroed below thr x its spatial max."""
    return ref_mix(ref_threshold(selected, thr), fused)


def ref_coarse(backbone, images, vocab, scale, select, thr, early_ln_1=False):
    """S_c as the official code computes it, (B, Qfg, h*w), and the propagation's Ã.

    Layer k (1..L) reprojects with Ã after k normalisations, the propagation uses Ã after L;
    the thresholded selected layer also enters the layer mean.
    """
    inputs, attentions = ref_blocks(backbone, images)
    if early_ln_1:  # the official code's features: ln_1 of block n for n < L
        blocks = backbone.blocks[:-1]
        inputs = [b.ln_1(x) for b, x in zip(blocks, inputs[:-1], strict=True)] + [inputs[-1]]
    layers = len(inputs)
    fused = [ref_fuse(attentions, k + 1)[0] for k in range(layers)]
    feats = torch.cat([ref_reproject(backbone, [x], a) for x, a in zip(inputs, fused, strict=True)])
    probs = ref_probabilities(feats, vocab, scale)
    probs[select] = ref_threshold(probs[select], thr)
    return ref_mix(probs[select], fused[-1]) + probs.mean(dim=0), fused[-1]


def ref_official_labels(final, score, size, score_thr, bkg_thr, is_normalize):
    """ovs/main_ovs.py + util/miou.py cam_to_label, transcribed: (B, H, W) 0 = bg, j + 1 = fg j.

    final: (B, Qfg, h, w) map (S_c, or S_f with FGC); score: (B, Qfg).
    """
    up = F.interpolate(final, size=size, mode="bilinear", align_corners=False)
    pred = up / (up.amax(dim=(-1, -2), keepdim=True) + 1e-5) * score[..., None, None]
    b, c = pred.shape[:2]
    cam = pred.reshape(b, c, -1).clone()
    gate = (score > score_thr)[..., None].float()
    if is_normalize:
        cam = cam - cam.amin(dim=-1, keepdim=True)
        cam = cam / (cam.amax(dim=-1, keepdim=True) + 1e-6)
    if bkg_thr > 0:
        cam[cam < bkg_thr] = 0
        value, index = (gate * cam).max(dim=1)
        label = index + 1
        label[value == 0] = 0
    else:
        valid = gate * cam
        valid = torch.cat([(1 - valid.amax(dim=1, keepdim=True)) ** 2, valid], dim=1)
        label = valid.argmax(dim=1)
    return label.reshape(b, *size)


def as_classes(official, vocab):
    """Official labels (0 = background, j + 1 = foreground query j) as class ids / unlabeled."""
    fg_class = vocab.query_class[vocab.query_class < vocab.num_classes]
    table = torch.cat([torch.tensor([vocab.unlabeled]), fg_class])
    return table[official]


def full_grid(values, vocab):
    """(B, Qfg, h, w) foreground maps -> (B, Q, h, w) with zeros for the background words."""
    fg = vocab.query_class < vocab.num_classes
    out = values.new_zeros((values.shape[0], len(fg), *values.shape[-2:]))
    out[:, fg] = values
    return out


def pixel_step_labels(method, grid, vocab, size, chunks=None):
    """Labels of (B, Q, h, w) logits() maps: upsample, pixel_logits per query chunk, argmax."""
    up = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    chunks = chunks or [slice(None)]
    logits = torch.stack(
        [
            torch.cat([method.pixel_logits(u[c], g[c], c, vocab) for c in chunks])
            for u, g in zip(up, grid, strict=True)
        ]
    )
    return segmenter_labels(logits, vocab), logits


def segmenter_labels(logits, vocab):
    """What the Segmenter makes of logits: best query's class, background words -> unlabeled."""
    labels = vocab.query_class[logits.argmax(dim=1)]
    labels[labels >= vocab.num_classes] = vocab.unlabeled
    return labels


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tiny_backbone):
    """Two normalised random 48 x 80 images (a 3 x 5 patch grid)."""
    g = torch.Generator().manual_seed(3)
    return tiny_backbone.normalize(torch.rand(2, 3, 48, 80, generator=g))


@pytest.fixture(scope="module")
def vocab(tiny_backbone):
    """Classes with a synonym, and background words."""
    config = SegmenterConfig(**TINY_CONFIG, vocabulary=VOCAB, background_words=BACKGROUND)
    return Segmenter(config, backbone=tiny_backbone).vocabulary


@pytest.fixture(scope="module")
def captured(tiny_backbone, images):
    """The engine's captured block inputs and attention maps."""
    _, grid, cap = tiny_backbone.forward_to_last(
        images, capture_inputs=True, capture_attention=True
    )
    assert grid == GRID
    return cap


# --- early-layer fusion: each building block ----------------------------------------------


def test_block_capture_matches_hand_forward(tiny_backbone, images, captured):
    inputs, attentions = ref_blocks(tiny_backbone, images, style="bicubic")
    assert len(captured.inputs) == tiny_backbone.num_layers == len(inputs)
    for ours, ref in zip(captured.inputs, inputs, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for ours, ref in zip(captured.attentions, attentions, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    # CLIPer's own runner keeps the inputs and sums the maps on the fly, with its own table.
    inputs, attentions = ref_blocks(tiny_backbone, images)
    feats, total, grid = cliper_lib.run_early_blocks(tiny_backbone, images, "bilinear_fp16")
    assert grid == GRID and len(feats) == tiny_backbone.num_layers
    for ours, ref in zip(feats, inputs, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, sum(attentions), atol=1e-6, rtol=1e-5)


def test_cliper_uses_the_fp16_bilinear_table_by_default(tiny_backbone, images, vocab):
    # The official CLIPer table (bilinear, fp16) differs from the common bicubic one, and the
    # parameter pos_interpolation switches between them.
    official, _ = create_method("cliper").coarse(tiny_backbone, images, vocab)
    bicubic, _ = create_method("cliper", {"pos_interpolation": "bicubic"}).coarse(
        tiny_backbone, images, vocab
    )
    assert not torch.allclose(official, bicubic, atol=1e-6)
    assert make_params("cliper").pos_interpolation == "bilinear_fp16"


def test_fused_attention_matches_formula(captured):
    fused = cliper_lib.fuse_attention(captured.attentions)
    expected, _ = ref_fuse(captured.attentions)
    assert fused.shape == captured.attentions[0].shape  # per head, CLS included
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, expected, atol=1e-6, rtol=1e-5)


def test_fused_attention_properties(captured):
    fused = cliper_lib.fuse_attention(captured.attentions)
    assert torch.all(fused >= 0)
    torch.testing.assert_close(fused.sum(dim=-1), torch.ones(fused.shape[:-1]))
    assert torch.count_nonzero(fused == 0) > 0  # the centring removed below-mean entries
    # Before the centring the map is the symmetrised normalised attention.
    _, sym = ref_fuse(captured.attentions)
    torch.testing.assert_close(sym, sym.transpose(-1, -2))
    # Centring by column means (then renormalising rows) does not keep the symmetry, and the
    # fused map is not a plain average of the inputs.
    assert not torch.allclose(fused, fused.transpose(-1, -2), atol=1e-4)
    mean_attn = torch.stack(captured.attentions).mean(0)
    assert not torch.allclose(fused, mean_attn, atol=1e-3)


def test_fused_attention_on_a_hand_example():
    # One head, two "blocks": M = A1 + A2 worked out on paper.
    a1 = torch.tensor([[[[0.5, 0.5, 0.0], [0.2, 0.6, 0.2], [0.0, 0.1, 0.9]]]])
    a2 = torch.tensor([[[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]])
    m = (a1 + a2)[0, 0].double()
    m = m / m.sum(0)  # columns sum to 1
    m = m / m.sum(1, keepdim=True)  # rows sum to 1
    m = (m + m.T) / 2
    m = (m - m.mean(0)).clamp(min=0)
    m = m / m.sum(1, keepdim=True)
    torch.testing.assert_close(cliper_lib.fuse_attention([a1, a2])[0, 0], m.float())


def test_each_layer_gets_one_more_normalisation(captured):
    # The official custom_attn divides the summed map in place on each of its L calls: layer k
    # uses the map after k column/row normalisations; the map is left normalised L times.
    layers = 3
    total = sum(a.float() for a in captured.attentions)
    maps = list(cliper_lib.fused_attention_per_layer(total, layers))
    assert len(maps) == layers
    for k, fused in enumerate(maps, start=1):
        expected, _ = ref_fuse(captured.attentions, times=k)
        torch.testing.assert_close(fused, expected, atol=1e-6, rtol=1e-5)
    # The counts matter: one normalisation is not two or three (Sinkhorn steps move the map).
    once, _ = ref_fuse(captured.attentions, times=1)
    assert not torch.allclose(maps[1], once, atol=1e-5)
    assert not torch.allclose(maps[2], maps[1], atol=1e-6)
    # The side effect on the summed map: normalised `layers` times, so rows and columns sum to
    # about 1 (exactly for the rows, the last step).
    torch.testing.assert_close(total.sum(-1), torch.ones(total.shape[:-1]))
    m = sum(a.double() for a in captured.attentions)
    for _ in range(layers):
        m = m / m.sum(2, keepdim=True)
        m = m / m.sum(3, keepdim=True)
    torch.testing.assert_close(total.double(), m, atol=1e-6, rtol=1e-5)


def test_reprojection_uses_last_blocks_v_for_every_layer(tiny_backbone, captured):
    fused = cliper_lib.fuse_attention(captured.attentions)
    feats = cliper_lib.reproject(tiny_backbone, captured.inputs, fused)
    expected = ref_reproject(tiny_backbone, captured.inputs, fused)
    n = GRID[0] * GRID[1]
    assert feats.shape == (tiny_backbone.num_layers, 2, n, tiny_backbone.embed_dim)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(feats.shape[:-1]))
    # No residual and no FFN: the re-projection is not the last block's normal output.
    normal = tiny_backbone.project(tiny_backbone.blocks[-1](captured.inputs[-1])[:, 1:])
    assert not torch.allclose(feats[-1], normal, atol=1e-3)
    # One map per layer: each feature set with its own map.
    total = sum(a.float() for a in captured.attentions)
    maps = list(cliper_lib.fused_attention_per_layer(total, len(captured.inputs)))
    per_layer = cliper_lib.reproject(tiny_backbone, captured.inputs, maps)
    for k, (x, a) in enumerate(zip(captured.inputs, maps, strict=True)):
        torch.testing.assert_close(
            per_layer[k], ref_reproject(tiny_backbone, [x], a)[0], atol=1e-5, rtol=1e-4
        )


def test_layer_probabilities_include_background_and_mean_query(tiny_backbone, captured, vocab):
    fused = cliper_lib.fuse_attention(captured.attentions)
    feats = cliper_lib.reproject(tiny_backbone, captured.inputs, fused)
    probs = cliper_lib.layer_probabilities(feats, vocab, 100.0)
    num_fg = int((vocab.query_class < vocab.num_classes).sum())
    assert num_fg == 4  # cat, kitten, dog, tree
    assert probs.shape == (tiny_backbone.num_layers, 2, num_fg, GRID[0] * GRID[1])
    torch.testing.assert_close(probs, ref_probabilities(feats, vocab, 100.0), atol=1e-5, rtol=1e-4)
    # Background words and the mean query take part in the softmax, so fg mass is below 1.
    assert torch.all(probs.sum(dim=2) < 1.0)


def test_select_layer_and_logit_scale_follow_depth():
    assert cliper_lib.resolve_select_layer(0, 12) == -1  # ViT-B/16
    assert cliper_lib.resolve_select_layer(0, 24) == -2  # ViT-L/14
    assert cliper_lib.resolve_select_layer(-3, 12) == -3
    assert cliper_lib.resolve_select_layer(1, 12) == 0  # block 1's input
    assert cliper_lib.resolve_select_layer(12, 12) == 11
    for bad in (13, -13):
        with pytest.raises(ValueError, match="select_layer"):
            cliper_lib.resolve_select_layer(bad, 12)
    assert cliper_lib.resolve_logit_scale(0, 12) == 100.0
    assert cliper_lib.resolve_logit_scale(0, 24) == 50.0
    assert cliper_lib.resolve_logit_scale(70, 24) == 70.0


def test_propagation_matches_formula(captured):
    fused = cliper_lib.fuse_attention(captured.attentions)
    g = torch.Generator().manual_seed(0)
    selected = torch.rand(2, 4, GRID[0] * GRID[1], generator=g)
    out = cliper_lib.propagate(selected, fused, 0.6)
    torch.testing.assert_close(out, ref_propagate(selected, fused, 0.6), atol=1e-6, rtol=1e-5)
    # Threshold 0 propagates the whole map; the threshold does change the result.
    full = cliper_lib.propagate(selected, fused, 0.0)
    torch.testing.assert_close(full, selected @ fused.mean(dim=1)[:, 1:, 1:])
    assert not torch.allclose(out, full)


def test_thresholded_layer_enters_the_layer_mean(captured):
    # The official code zeroes seg[select_layer] in place before seg.mean(0).
    fused = cliper_lib.fuse_attention(captured.attentions)
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(3, 2, 4, GRID[0] * GRID[1], generator=g)
    before = probs.clone()
    for select in (-1, 0):
        s_c = cliper_lib.coarse_map(probs, fused, select, 0.5)
        cut = ref_threshold(probs[select], 0.5)
        layers = [cut if i == select % 3 else probs[i] for i in range(3)]
        expected = ref_mix(cut, fused) + sum(layers) / 3
        torch.testing.assert_close(s_c, expected, atol=1e-6, rtol=1e-5)
        unthresholded_mean = ref_mix(cut, fused) + probs.mean(0)
        assert not torch.allclose(s_c, unthresholded_mean, atol=1e-4)
    assert torch.equal(probs, before)  # the caller's tensor is not modified


@pytest.mark.parametrize(("select_layer", "index"), [(0, -1), (-2, -2), (2, 1)])
def test_coarse_map_matches_formula(select_layer, index, tiny_backbone, images, vocab):
    method = create_method("cliper", {"select_layer": select_layer})
    s_c, grid = method.coarse(tiny_backbone, images, vocab)
    assert grid == GRID
    expected, _ = ref_coarse(tiny_backbone, images, vocab, 100.0, index, 0.2)
    torch.testing.assert_close(s_c.flatten(2), expected, atol=1e-5, rtol=1e-4)


def test_selected_layer_matters(tiny_backbone, images, vocab):
    last, _ = create_method("cliper", {"select_layer": -1}).coarse(tiny_backbone, images, vocab)
    other, _ = create_method("cliper", {"select_layer": -2}).coarse(tiny_backbone, images, vocab)
    assert not torch.allclose(last, other, atol=1e-4)


def test_early_ln_1_feeds_the_official_feature_sets(images):
    # ln_1 of block n on F^n (n < L), as the official forward_transformer stores; it matters once
    # the LayerNorm parameters are not (1, 0), as in trained weights.
    bb = build_tiny(seed=9)
    with torch.no_grad():
        for block in bb.blocks:
            block.ln_1.weight.add_(0.3 * torch.randn(block.ln_1.weight.shape))
            block.ln_1.bias.add_(0.3 * torch.randn(block.ln_1.bias.shape))
    config = SegmenterConfig(**TINY_CONFIG, vocabulary=VOCAB, background_words=BACKGROUND)
    vocab = Segmenter(config, backbone=bb).vocabulary
    official, _ = create_method("cliper", {"early_ln_1": True}).coarse(bb, images, vocab)
    expected, _ = ref_coarse(bb, images, vocab, 100.0, -1, 0.2, early_ln_1=True)
    torch.testing.assert_close(official.flatten(2), expected, atol=1e-5, rtol=1e-4)
    documented, _ = create_method("cliper", {"early_ln_1": False}).coarse(bb, images, vocab)
    assert not torch.allclose(documented, official, atol=1e-4)
    assert make_params("cliper").early_ln_1 is True  # the official code's features by default
    default, _ = create_method("cliper").coarse(bb, images, vocab)
    torch.testing.assert_close(default, official)


# --- labelling ------------------------------------------------------------------------------

LABEL_RULES = [
    (0.7, 0.6, True),  # VOC21 (the defaults)
    (0.3, 0.6, True),
    (0.45, 0.45, False),  # Pascal Context-60
    (0.0, 0.001, False),  # VOC20
    (0.3, 0.0, True),  # bkg_thre 0: the (1 - max)^2 background rule
    (0.0, 0.0, False),
]


def random_coarse(seed, shape=(2, 4, *GRID)):
    """Coarse maps whose query scores straddle the thresholds (1.2, 0.5, 0.9, 0.2 at most)."""
    g = torch.Generator().manual_seed(seed)
    peak = torch.tensor([1.2, 0.5, 0.9, 0.2])[:, None, None]
    return torch.rand(*shape, generator=g) * peak


@pytest.mark.parametrize(("score_thr", "bkg_thr", "is_normalize"), LABEL_RULES)
def test_pixel_step_reproduces_the_official_labelling(score_thr, bkg_thr, is_normalize, vocab):
    coarse = random_coarse(5)
    params = {"score_threshold": score_thr, "bkg_thre": bkg_thr, "is_normalize": is_normalize}
    method = create_method("cliper", params)
    grid = full_grid(cliper_lib.grid_values(coarse), vocab)
    labels, logits = pixel_step_labels(method, grid, vocab, (48, 80))
    assert logits.shape == (2, len(vocab.queries), 48, 80) and torch.isfinite(logits).all()
    official = ref_official_labels(
        coarse, coarse.amax(dim=(-1, -2)), (48, 80), score_thr, bkg_thr, is_normalize
    )
    expected = as_classes(official, vocab)
    torch.testing.assert_close(labels, expected)
    assert 0 < (expected == vocab.unlabeled).float().mean() < 1 or bkg_thr == 0.001
    # Query chunks (the engine bounds memory that way) give the same logits.
    chunked_labels, chunked = pixel_step_labels(
        method, grid, vocab, (48, 80), chunks=[slice(0, 2), slice(2, 5), slice(5, 7)]
    )
    torch.testing.assert_close(chunked, logits)


def test_labelling_upsamples_before_dividing_by_the_maximum():
    # main_ovs.py: the UPSAMPLED map is divided by its own maximum (+1e-5), times the score.
    grid = torch.tensor([[[0.0, 1.0, 0.2], [0.4, 0.3, 0.0]]])
    up = F.interpolate(grid[None], size=(5, 8), mode="bilinear", align_corners=False)[0]
    assert up.max() < grid.max()  # bilinear upsampling lowers this peak
    score = torch.tensor([0.8])
    values = cliper_lib.label_values(up, score, 0.0, is_normalize=False)
    torch.testing.assert_close(values, up / (up.max() + 1e-5) * 0.8)
    grid_first = F.interpolate(
        (grid / (grid.max() + 1e-5) * 0.8)[None], size=(5, 8), mode="bilinear"
    )[0]
    assert not torch.allclose(values, grid_first, atol=1e-3)
    assert values.max() == pytest.approx(0.8 * up.max().item() / (up.max().item() + 1e-5))


def test_is_normalize_is_a_min_max_normalisation_per_query():
    # util/miou.py cam_to_label with is_normalize: V -= min V; V /= max V + 1e-6, per query,
    # before the score gate; the score then only gates (V reaches ~1 for every kept query).
    up = torch.tensor([[[0.2, 0.4], [0.6, 1.0]], [[0.1, 0.1], [0.3, 0.5]], [[1, 2], [3, 4.0]]])
    score = torch.tensor([0.9, 0.75, 0.2])
    values = cliper_lib.label_values(up, score, 0.7, is_normalize=True)
    for q in range(2):
        v = up[q] / (up[q].max() + 1e-5) * score[q]
        v = v - v.min()
        torch.testing.assert_close(values[q], v / (v.max() + 1e-6))
    assert torch.all(values[2] == 0)  # score 0.2 is not above 0.7
    torch.testing.assert_close(values[:2].amax(dim=(-1, -2)), torch.ones(2), atol=1e-5, rtol=0)
    plain = cliper_lib.label_values(up, score, 0.7, is_normalize=False)
    assert plain[1].max() < 0.76 and values[1].max() > 0.99


def background_vocab_labels(method, values_per_query, vocab):
    """Labels from pixel_logits of hand-made foreground values (scores 1, no upsampling)."""
    fg = int((vocab.query_class < vocab.num_classes).sum())
    grid = torch.zeros(len(vocab.query_class), 1, len(values_per_query[0]))
    grid[:fg] = torch.tensor(values_per_query, dtype=torch.float32)[:, None, :]
    logits = method.pixel_logits(grid.clone(), grid, slice(None), vocab)
    return segmenter_labels(logits[None], vocab)[0, 0]


def test_background_rules_at_their_thresholds(vocab):
    # One query at 1 everywhere-max, so V = value / (1 + 1e-5) with is_normalize off; the other
    # queries are 0. bkg_thre 0.6: values below are zeroed, a pixel with nothing left is
    # background. bkg_thre 0: background where (1 - max V)^2 >= max V, i.e. max V <= 0.382.
    u = vocab.unlabeled
    cat = int(vocab.query_class[0])
    method = create_method("cliper", {"score_threshold": 0.0, "bkg_thre": 0.6, "is_normalize": 0})
    row = [1.0, 0.6 * (1 + 1e-5) * 1.0001, 0.6 * (1 + 1e-5) * 0.9999, 0.0]
    labels = background_vocab_labels(method, [row, [0] * 4, [0] * 4, [0] * 4], vocab)
    assert labels.tolist() == [cat, cat, u, u]
    square = create_method("cliper", {"score_threshold": 0.0, "bkg_thre": 0.0, "is_normalize": 0})
    level = (3 - 5**0.5) / 2
    row = [1.0, level * (1 + 1e-5) * 1.0001, level * (1 + 1e-5) * 0.9999, 0.0]
    labels = background_vocab_labels(square, [row, [0] * 4, [0] * 4, [0] * 4], vocab)
    assert labels.tolist() == [cat, cat, u, u]
    m = torch.tensor(row[1:3]) / (1 + 1e-5)
    assert ((1 - m) ** 2 >= m).tolist() == [False, True]  # the official comparison


def test_value_at_the_threshold_keeps_its_class(vocab):
    # cam_to_label zeroes values BELOW bkg_thre: a value equal to it keeps the class, whatever
    # the engine's tie-breaking (the background logit sits one float below log(bkg_thre)).
    values = torch.tensor([[[0.6, 0.59999996]]])
    logits = cliper_lib.foreground_logits(values, 0.6)
    base = cliper_lib.background_logit(0.6)
    assert logits[0, 0, 0] > base > logits[0, 0, 1]
    assert base == float(torch.nextafter(torch.log(torch.tensor(0.6)), torch.tensor(-1.0)))


def test_without_background_words_the_best_class_wins(tiny_backbone):
    config = SegmenterConfig(**TINY_CONFIG, vocabulary=["a", "b", "c"], background_words=[])
    vocab = Segmenter(config, backbone=tiny_backbone).vocabulary
    method = create_method("cliper", {"score_threshold": 0.0, "bkg_thre": 0.9, "is_normalize": 0})
    values = [[0.1, 0.5, 1.0], [0.3, 0.2, 0.0], [0.2, 0.1, 0.5]]
    labels = background_vocab_labels(method, values, vocab)
    # Below bkg_thre everywhere but column 3: the order of the values still decides.
    assert labels.tolist() == [1, 0, 0]


def test_fgc_maps_carry_the_half_half_score(vocab):
    # With FGC the final map is S_f and the score 0.5 max S_f + 0.5 max S_c (ovs/pipeline.py):
    # logits() returns S_f scaled so that its grid maximum is that score.
    coarse = random_coarse(6, (1, 4, *GRID))
    refined = torch.rand(1, 4, 8, 8, generator=torch.Generator().manual_seed(7)) * 2
    score = 0.5 * refined.amax(dim=(-1, -2)) + 0.5 * coarse.amax(dim=(-1, -2))
    values = cliper_lib.grid_values(coarse, refined)
    torch.testing.assert_close(values.amax(dim=(-1, -2)), score)
    torch.testing.assert_close(cliper_lib.class_scores(coarse, refined), score)
    torch.testing.assert_close(
        values / score[..., None, None], refined / refined.amax((-1, -2), True)
    )
    for rules in LABEL_RULES:
        params = dict(zip(("score_threshold", "bkg_thre", "is_normalize"), rules, strict=True))
        method = create_method("cliper", params)
        labels, _ = pixel_step_labels(method, full_grid(values, vocab), vocab, (48, 80))
        official = ref_official_labels(refined, score, (48, 80), *rules)
        torch.testing.assert_close(labels, as_classes(official, vocab))


def test_method_logits_end_to_end(tiny_backbone, images, vocab):
    params = {"score_threshold": 0.0, "bkg_thre": 0.5}
    method = create_method("cliper", params)
    grid = method.logits(tiny_backbone, images, vocab)
    assert grid.shape == (2, len(vocab.queries), *GRID) and grid.dtype == torch.float32
    assert method.has_pixel_step
    coarse, _ = ref_coarse(tiny_backbone, images, vocab, 100.0, -1, 0.2)
    coarse = coarse.reshape(2, 4, *GRID)
    fg = vocab.query_class < vocab.num_classes
    torch.testing.assert_close(grid[:, fg], coarse, atol=1e-5, rtol=1e-4)
    assert torch.all(grid[:, ~fg] == 0)
    labels, _ = pixel_step_labels(method, grid, vocab, (48, 80))
    official = ref_official_labels(coarse, coarse.amax(dim=(-1, -2)), (48, 80), 0.0, 0.5, True)
    torch.testing.assert_close(labels, as_classes(official, vocab))


def test_segmenter_runs_cliper(make_segmenter):
    seg = make_segmenter(
        method="cliper",
        vocabulary=VOCAB,
        background_words=BACKGROUND,
        method_params={"score_threshold": 0.0, "bkg_thre": 0.3},
        short_side=64,
    )
    frame = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    result = seg.segment(frame)
    assert result.labels.shape == (50, 70)
    assert set(np.unique(result.labels)) <= {0, 1, 2, 255}
    assert np.all((result.confidence >= 0) & (result.confidence <= 1))
    seg.update(mode="slide", crop=32, stride=16)
    assert seg.segment(frame).labels.shape == (50, 70)


def test_segmenter_labels_are_the_official_labels(make_segmenter):
    # Through Segmenter.segment: a 48 x 64 frame at short side 48 is the model input itself, so
    # the one bilinear upsampling of the official code is the engine's.
    rules = {"score_threshold": 0.3, "bkg_thre": 0.6, "is_normalize": True}
    seg = make_segmenter(
        method="cliper", vocabulary=VOCAB, background_words=BACKGROUND, method_params=rules,
        short_side=48,
    )  # fmt: skip
    frame = np.random.default_rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    image = seg.backbone.normalize(torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255)
    with torch.inference_mode():
        s_c, _ = seg.method.coarse(seg.backbone, image, seg.vocabulary)
    official = ref_official_labels(s_c, s_c.amax(dim=(-1, -2)), (48, 64), 0.3, 0.6, True)
    expected = as_classes(official, seg.vocabulary)[0].numpy()
    assert 0 < (expected == 255).mean() < 1
    np.testing.assert_array_equal(seg.segment(frame).labels, expected)


def test_cliper_without_background_words_warns_once(make_segmenter, caplog):
    seg = make_segmenter(method="cliper", vocabulary=VOCAB, background_words=[])
    frame = np.zeros((32, 32, 3), dtype=np.uint8)
    with caplog.at_level("WARNING", logger="ovseg_ros.engine"):
        seg.segment(frame)
        seg.segment(frame)
    assert sum("no background words" in r.message for r in caplog.records) == 1


# --- a deeper tower picks ViT-L's settings --------------------------------------------------


@pytest.fixture(scope="module")
def deep_backbone(tmp_path_factory):
    """A 13-block tiny ViT (deeper than ViT-B), to check the automatic ViT-L settings."""
    folder = tmp_path_factory.mktemp("deep_config")
    cfg = {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": 13, "width": 64, "head_width": 32,
                       "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1,
                     "layers": 1},
    }  # fmt: skip
    (folder / "ovseg-test-deep.json").write_text(json.dumps(cfg))
    open_clip = _open_clip()
    open_clip.add_model_config(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = open_clip.create_model("ovseg-test-deep", pretrained=None)
    model.eval().requires_grad_(False)
    return Backbone(
        model, name="ovseg-test-deep", source="random", device=torch.device("cpu"),
        dtype=torch.float32,
    )  # fmt: skip


def test_deep_tower_uses_second_to_last_layer_and_scale_50(deep_backbone):
    config = SegmenterConfig(
        **{**TINY_CONFIG, "model_name": "ovseg-test-deep"}, vocabulary=VOCAB,
        background_words=BACKGROUND,
    )  # fmt: skip
    vocab = Segmenter(config, backbone=deep_backbone).vocabulary
    g = torch.Generator().manual_seed(4)
    imgs = deep_backbone.normalize(torch.rand(1, 3, 32, 48, generator=g))
    s_c, _ = create_method("cliper").coarse(deep_backbone, imgs, vocab)
    expected, _ = ref_coarse(deep_backbone, imgs, vocab, 50.0, -2, 0.2)
    torch.testing.assert_close(s_c.flatten(2), expected, atol=1e-5, rtol=1e-4)


# --- registry and parameters ----------------------------------------------------------------


def test_cliper_is_registered_with_published_defaults():
    assert "cliper" in available_methods()
    described = {d["name"]: d for d in describe_methods()}["cliper"]
    assert described["summary"]
    p = described["params"]
    assert p["logit_scale"] == 0.0 and p["select_layer"] == 0  # auto: 100 / -1 for ViT-B
    assert p["attention_thr"] == 0.2
    assert (p["score_threshold"], p["bkg_thre"], p["is_normalize"]) == (0.7, 0.6, True)  # VOC21
    assert p["pos_interpolation"] == "bilinear_fp16" and p["early_ln_1"] is True
    assert p["fgc"] is False
    assert p["fgc_model"] == "stabilityai/stable-diffusion-2-1-base"
    assert p["fgc_layers"].split(",") == [
        "up_blocks.3.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.3.attentions.0.transformer_blocks.0.attn1",
    ]
    assert (p["fgc_size"], p["fgc_time_step"], p["fgc_num_steps"]) == (512, 45, 50)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("attention_thr", -0.1),
        ("score_threshold", float("nan")),
        ("bkg_thre", -1),
        ("logit_scale", -5),
        ("fgc_size", 500),
        ("fgc_num_steps", 0),
        ("fgc_layers", " , "),
        ("fgc_model", ""),
        ("pos_interpolation", "nearest"),
    ],
)
def test_invalid_parameters_raise(key, value):
    with pytest.raises(ValueError, match=key.split("_")[0]):
        make_params("cliper", {key: value})


def test_string_overrides_are_coerced():
    p = make_params("cliper", {"fgc": "true", "select_layer": "-2", "bkg_thre": "0.45"})
    assert p.fgc is True and p.select_layer == -2 and p.bkg_thre == 0.45
    p = make_params("cliper", {"is_normalize": "false", "early_ln_1": "on"})
    assert p.is_normalize is False and p.early_ln_1 is True


# --- FGC on a tiny random Stable Diffusion ---------------------------------------------------

TINY_LAYERS = (
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
)
TINY_SIZE = 32  # VAE factor 2 -> 16 x 16 latent -> 256 tokens in the last up block


def tiny_sd_parts(seed=0):
    """A tiny random VAE, UNet and PNDM scheduler (SD 2.1-base's scheduler type)."""
    diffusers = pytest.importorskip("diffusers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=12,
            attention_head_dim=2,
            norm_num_groups=4,
        )
        vae = diffusers.AutoencoderKL(
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=4,
            layers_per_block=1,
        )
        embeds = torch.randn(1, 7, 12)
    scheduler = diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    return vae.eval(), unet.eval(), scheduler, embeds


@pytest.fixture(scope="module")
def tiny_sd():
    """StableDiffusionAttention over the tiny parts, chaining the last up block's two attn1."""
    vae, unet, scheduler, embeds = tiny_sd_parts()
    return fgc_lib.StableDiffusionAttention(
        vae, unet, scheduler, embeds, ",".join(TINY_LAYERS), size=TINY_SIZE
    )


def record_inputs(unet, names):
    """Forward pre-hooks keeping each named attention's hidden_states; returns (store, handles)."""
    store, handles = {}, []
    for name in names:
        module = unet.get_submodule(name)

        def hook(mod, args, kwargs, name=name):
            store[name] = args[0] if args else kwargs["hidden_states"]

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return store, handles


def ref_attention_probs(module, hidden):
    """softmax(q k^T / sqrt(d)) per head from the module's to_q / to_k: (B, heads, n, n)."""
    heads = module.heads
    q = heads_of(module.to_q(hidden), heads)
    k = heads_of(module.to_k(hidden), heads)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def ref_normalize(a, thr):
    """Divide by column max (+1e-5), zero below thr, divide by row sum (+1e-5), one map."""
    col_max = torch.stack([a[:, j].max() for j in range(a.shape[1])])
    a = a / (col_max[None, :] + 1e-5)
    a = torch.where(a < thr, torch.zeros_like(a), a)
    return a / (a.sum(dim=1, keepdim=True) + 1e-5)


def test_tiny_sd_timestep_is_index_45_of_50(tiny_sd):
    assert len(tiny_sd.scheduler.timesteps) == 51  # PNDM (PLMS) repeats one step
    assert int(tiny_sd.timestep) == int(tiny_sd.scheduler.timesteps[45])


def test_latents_are_scaled_vae_means(tiny_sd):
    g = torch.Generator().manual_seed(7)
    rgb = torch.rand(1, 3, 40, 56, generator=g)
    squashed = F.interpolate(rgb, size=(TINY_SIZE, TINY_SIZE), mode="bilinear", antialias=True)
    with torch.inference_mode():
        expected = tiny_sd.vae.encode(squashed * 2 - 1).latent_dist.mean
        latents = tiny_sd.latents(rgb)
    torch.testing.assert_close(latents, expected * tiny_sd.vae.config.scaling_factor)
    assert latents.shape == (1, 4, 16, 16)


def test_captured_maps_are_the_layers_self_attention(tiny_sd):
    rgb = torch.rand(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(8))
    store, handles = record_inputs(tiny_sd.unet, TINY_LAYERS)
    try:
        with torch.inference_mode():
            maps = tiny_sd.attention_maps(rgb)
    finally:
        for h in handles:
            h.remove()
    assert len(maps) == 2
    for name, m in zip(TINY_LAYERS, maps, strict=True):
        module = tiny_sd.unet.get_submodule(name)
        assert m.shape == (2, module.heads, 256, 256)
        with torch.inference_mode():
            expected = ref_attention_probs(module, store[name])
        torch.testing.assert_close(m, expected, atol=1e-5, rtol=1e-4)


def test_capture_leaves_the_unet_output_unchanged():
    vae, unet, scheduler, embeds = tiny_sd_parts()
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        before = unet(latents, 101, encoder_hidden_states=embeds).sample
        fgc_lib.StableDiffusionAttention(vae, unet, scheduler, embeds, ",".join(TINY_LAYERS))
        after = unet(latents, 101, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(after, before)


def test_normalize_attention_matches_formula():
    g = torch.Generator().manual_seed(10)
    a = torch.softmax(torch.randn(2, 12, 12, generator=g) * 3, dim=-1)
    out = fgc_lib.normalize_attention(a, 0.3)
    for i in range(2):
        torch.testing.assert_close(out[i], ref_normalize(a[i], 0.3))
    assert torch.all(out >= 0)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 12), atol=1e-4, rtol=0)


def test_chain_is_applied_in_layer_then_head_order():
    g = torch.Generator().manual_seed(11)
    maps = [torch.rand(6, 6, generator=g) for _ in range(4)]
    x = torch.rand(6, 3, generator=g)
    product = maps[0] @ maps[1] @ maps[2] @ maps[3]
    torch.testing.assert_close(fgc_lib.chain_attention(maps), product)
    torch.testing.assert_close(fgc_lib.apply_chain(maps, x), product @ x)
    assert not torch.allclose(fgc_lib.apply_chain(maps[::-1], x), product @ x)


def test_compensation_matches_formula(tiny_sd):
    rgb = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(12))
    coarse = torch.rand(1, 3, 4, 5, generator=torch.Generator().manual_seed(13))
    store, handles = record_inputs(tiny_sd.unet, TINY_LAYERS)
    try:
        with torch.inference_mode():
            out = tiny_sd.compensate(rgb, coarse, 0.2)
    finally:
        for h in handles:
            h.remove()
    assert out.shape == (1, 3, 16, 16)
    chain = []
    with torch.inference_mode():
        for name in TINY_LAYERS:  # layer order, then head order
            module = tiny_sd.unet.get_submodule(name)
            probs = ref_attention_probs(module, store[name])[0]
            chain += [ref_normalize(probs[h], 0.2) for h in range(module.heads)]
    a_f = chain[0]
    for a in chain[1:]:
        a_f = a_f @ a
    s_c = F.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
    expected = (a_f @ s_c[0].flatten(1).T).T.reshape(1, 3, 16, 16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    # The noise is seeded: the same frame gives the same map.
    with torch.inference_mode():
        torch.testing.assert_close(tiny_sd.compensate(rgb, coarse, 0.2), out)


def test_bad_fgc_layers_are_rejected():
    vae, unet, scheduler, embeds = tiny_sd_parts()
    with pytest.raises(ValueError, match="no module"):
        fgc_lib.StableDiffusionAttention(vae, unet, scheduler, embeds, "up_blocks.9.attn1")
    cross = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    with pytest.raises(ValueError, match="not a plain self-attention"):
        fgc_lib.StableDiffusionAttention(vae, unet, scheduler, embeds, cross)


def test_cliper_with_fgc_through_segmenter(make_segmenter, monkeypatch):
    loads = []

    def fake_load(source, device, dtype, layers, **kwargs):
        loads.append((source, layers, kwargs))
        vae, unet, scheduler, embeds = tiny_sd_parts()
        return fgc_lib.StableDiffusionAttention(
            vae, unet, scheduler, embeds, ",".join(TINY_LAYERS), size=TINY_SIZE
        )

    monkeypatch.setattr(fgc_lib, "load_stable_diffusion", fake_load)
    # is_normalize off: the tiny random UNet's S_f is flat to 1e-6, so min-max normalising it
    # would compare float rounding noise (and FGC's labels are exact to a relative 1e-5 only).
    params = {"score_threshold": 0.0, "bkg_thre": 0.3, "is_normalize": False}
    seg = make_segmenter(
        method="cliper",
        vocabulary=VOCAB,
        background_words=BACKGROUND,
        method_params=params,
        short_side=48,  # a 48 x 64 frame is used as it is
    )
    frame = np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    plain = seg.dense_logits(frame)[0]
    assert loads == []  # fgc off: no auxiliary model
    seg.set_method("cliper", {**params, "fgc": True, "fgc_model": "/models/sd21"})
    method = seg.method
    refined = seg.dense_logits(frame)[0]
    assert len(loads) == 1 and loads[0][0] == "/models/sd21"
    assert loads[0][2] == {"size": 512, "time_step": 45, "num_steps": 50, "seed": 0}
    assert refined.shape == plain.shape and torch.isfinite(refined).all()
    assert not torch.allclose(refined, plain)
    result = seg.segment(frame)
    assert result.labels.shape == (48, 64)
    assert 0 < result.timings["fgc"] <= result.timings["model"]
    assert len(loads) == 1  # loaded once, reused
    # The labelling of the FGC path is the official one on S_f with the half-half score.
    image = seg.backbone.normalize(torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255)
    vocab = seg.vocabulary
    with torch.inference_mode():
        s_c, _ = method.coarse(seg.backbone, image, vocab)
        s_f = method.fgc_model(seg.backbone).compensate(
            (image * seg.backbone.std + seg.backbone.mean).clamp(0, 1), s_c, 0.2
        )
        grid = method.logits(seg.backbone, image, vocab)[0]
    score = 0.5 * s_f.amax(dim=(-1, -2)) + 0.5 * s_c.amax(dim=(-1, -2))
    official = ref_official_labels(s_f, score, (48, 64), 0.0, 0.3, False)
    expected = as_classes(official, vocab)[0]
    # The pixel step on the maps at the model input (which is the frame here) ...
    pixel = method.pixel_logits(refined, grid, slice(None), vocab)
    torch.testing.assert_close(segmenter_labels(pixel[None], vocab)[0], expected)
    # ... and Segmenter.segment.
    np.testing.assert_array_equal(result.labels, expected.numpy())
    # Switching FGC off releases the Stable Diffusion model of the method swapped out.
    assert method._fgc is not None
    seg.set_method("cliper", params)
    assert method._fgc is None and seg.method._fgc is None
    assert len(loads) == 1


def test_prepare_loads_fgc_only_when_enabled(tiny_backbone, monkeypatch):
    calls = []
    monkeypatch.setattr(fgc_lib, "load_stable_diffusion", lambda *a, **k: calls.append(a))
    create_method("cliper").prepare(tiny_backbone)
    assert calls == []
    create_method("cliper", {"fgc": True}).prepare(tiny_backbone)
    assert len(calls) == 1


def test_missing_diffusers_is_a_clear_error(tiny_backbone, images, vocab, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` -> ImportError
    method = create_method("cliper", {"fgc": True})
    with pytest.raises(ModelLoadError, match="diffusers") as info:
        method.prepare(tiny_backbone)
    message = str(info.value)
    assert "pip install diffusers" in message and "fgc" in message
    with pytest.raises(ModelLoadError, match="diffusers"):
        method.logits(tiny_backbone, images, vocab)
    # Without FGC the method does not need diffusers.
    logits = create_method("cliper").logits(tiny_backbone, images, vocab)
    assert torch.isfinite(logits).all()


def test_missing_weights_folder_is_a_clear_error(tmp_path):
    pytest.importorskip("diffusers")
    missing = tmp_path / "sd21"
    with pytest.raises(ModelLoadError, match="sd21") as info:
        fgc_lib.load_stable_diffusion(str(missing), torch.device("cpu"), torch.float32)
    assert "fgc_model" in str(info.value) and "does not exist" in str(info.value)
    missing.mkdir()
    (missing / "unet").mkdir()
    with pytest.raises(
        ModelLoadError, match="lacks the sub-folder.s. vae, scheduler, tokenizer, text_encoder"
    ):
        fgc_lib.load_stable_diffusion(str(missing), torch.device("cpu"), torch.float32)


def test_missing_transformers_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    for sub in fgc_lib.SD_SUBFOLDERS:
        (tmp_path / sub).mkdir()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelLoadError, match="transformers") as info:
        fgc_lib.load_stable_diffusion(str(tmp_path), torch.device("cpu"), torch.float32)
    assert "pip install" in str(info.value)


class _FakeTokenizer:
    """Stands in for transformers.CLIPTokenizer: the empty prompt as 7 fixed token ids."""

    model_max_length = 7
    calls: list = []

    @classmethod
    def from_pretrained(cls, where, subfolder, **kwargs):
        cls.calls.append((where, subfolder, kwargs))
        return cls()

    def __call__(self, text, padding, max_length, truncation, return_tensors):
        assert text == "" and padding == "max_length" and max_length == 7
        return types.SimpleNamespace(input_ids=torch.arange(7)[None])


class _FakeTextEncoder:
    """Stands in for transformers.CLIPTextModel: a fixed embedding per token id."""

    @classmethod
    def from_pretrained(cls, where, subfolder, **kwargs):
        _FakeTokenizer.calls.append((where, subfolder, kwargs))
        return cls()

    def __call__(self, ids):
        table = torch.linspace(-1, 1, 7 * 12).view(7, 12)
        return (table[ids],)


def test_loader_reads_a_diffusers_folder(tmp_path, monkeypatch):
    vae, unet, scheduler, _ = tiny_sd_parts()
    for name, part in (("unet", unet), ("vae", vae), ("scheduler", scheduler)):
        part.save_pretrained(tmp_path / name)
    for name in ("tokenizer", "text_encoder"):
        (tmp_path / name).mkdir()
    fake = types.ModuleType("transformers")
    fake.CLIPTokenizer, fake.CLIPTextModel = _FakeTokenizer, _FakeTextEncoder
    monkeypatch.setitem(sys.modules, "transformers", fake)
    _FakeTokenizer.calls.clear()
    sd = fgc_lib.load_stable_diffusion(
        str(tmp_path), torch.device("cpu"), torch.float32, ",".join(TINY_LAYERS), size=TINY_SIZE
    )
    assert [c[1] for c in _FakeTokenizer.calls] == ["tokenizer", "text_encoder"]
    assert all(c[2]["local_files_only"] for c in _FakeTokenizer.calls)  # a folder: no hub
    assert type(sd.scheduler).__name__ == "PNDMScheduler"  # the class named in its config
    torch.testing.assert_close(sd.prompt_embeds, _FakeTextEncoder()(torch.arange(7)[None])[0])
    for ours, saved in zip(sd.unet.parameters(), unet.parameters(), strict=True):
        torch.testing.assert_close(ours, saved)
    coarse = torch.rand(1, 2, 3, 4, generator=torch.Generator().manual_seed(14))
    with torch.inference_mode():
        out = sd.compensate(torch.rand(1, 3, 40, 40), coarse, 0.2)
    assert out.shape == (1, 2, 16, 16) and torch.isfinite(out).all()


def test_incomplete_weights_folder_names_the_folder(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    for sub in fgc_lib.SD_SUBFOLDERS:
        (tmp_path / sub).mkdir()  # the layout is there, the files are not
    fake = types.ModuleType("transformers")
    fake.CLIPTokenizer, fake.CLIPTextModel = _FakeTokenizer, _FakeTextEncoder
    monkeypatch.setitem(sys.modules, "transformers", fake)
    with pytest.raises(ModelLoadError, match="cannot load Stable Diffusion") as info:
        fgc_lib.load_stable_diffusion(str(tmp_path), torch.device("cpu"), torch.float32)
    assert str(tmp_path) in str(info.value) and "complete diffusers copy" in str(info.value)


# --- the real ViT-B/16 architecture ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("frame_size", "short_side"), [((240, 320), 224), ((480, 640), 336)])
def test_vitb16_end_to_end(frame_size, short_side, vitb16_backbone):
    config = SegmenterConfig(
        **TINY_CONFIG | {"model_name": "ViT-B-16"},
        method="cliper",
        short_side=short_side,
        vocabulary=VOCAB,
        background_words=BACKGROUND,
        method_params={"score_threshold": 0.0, "bkg_thre": 0.3},
    )
    seg = Segmenter(config, backbone=vitb16_backbone)
    frame = np.random.default_rng(3).integers(0, 256, (*frame_size, 3), dtype=np.uint8)
    logits, vocab = seg.dense_logits(frame)
    h, w = resized_shape(*frame_size, short_side)
    assert logits.shape == (len(vocab.queries), h, w) and torch.isfinite(logits).all()
    result = seg.segment(frame)
    assert result.labels.shape == frame_size
    # The coarse map on ViT-B/16: select_layer -1, logit_scale 100, against the reference.
    image = vitb16_backbone.normalize(torch.rand(1, 3, 32, 48, generator=torch.Generator()))
    with torch.inference_mode():
        s_c, grid = seg.method.coarse(vitb16_backbone, image, vocab)
        expected, _ = ref_coarse(vitb16_backbone, image, vocab, 100.0, -1, 0.2)
    assert grid == (2, 3)
    torch.testing.assert_close(s_c.flatten(2), expected, atol=1e-4, rtol=1e-3)
