"""ProxyCLIP (METHODS.md section 5) and its proxy models, on tiny random timm ViTs.

The references below are written with plain torch ops on the tiny CLIP's weights and the tiny
VFM's timm module, so a mistake in the adaptive normalisation, the masking, the value resizing,
the padding or the colour conversion shows up as a mismatch. The lifecycle tests check that the
proxy model is loaded only when the method is used, on CLIP's device and dtype, and released on
a switch to a method that does not need it.
"""

import copy
import gc
import logging
import weakref

import cv2
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIG
from pos_reference import official_table

from ovseg_ros import cli
from ovseg_ros.engine import Backbone, ModelLoadError, Segmenter, SegmenterConfig, create_method
from ovseg_ros.engine.clip_loading import _open_clip
from ovseg_ros.engine.methods import available_methods, proxyclip
from ovseg_ros.engine.methods.proxyclip import centred_padding, proxy_attention, resize_values
from ovseg_ros.engine.vfm import VFM_SPECS, VFMSpec, load_vfm, register_vfm

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
DINO8 = register_vfm(VFMSpec("test-tiny-dino8", "vit_base_patch8_224.dino", model_kwargs=TINY_VIT))
DINOV2 = register_vfm(
    VFMSpec(
        "test-tiny-dinov2-reg",
        "vit_base_patch14_reg4_dinov2.lvd142m",
        model_kwargs=TINY_VIT,
        pos_interpolation="bicubic_antialias",
    )
)
#: Only the lifecycle tests use this one, so no other test holds (shares) its loaded model.
LIFE = register_vfm(VFMSpec("test-tiny-life", "vit_base_patch8_224.dino", model_kwargs=TINY_VIT))
OFFLINE = register_vfm(
    VFMSpec(
        "test-tiny-offline",
        "vit_base_patch8_224.dino",
        model_kwargs={**TINY_VIT, "pretrained_cfg_overlay": {"hf_hub_id": "ovseg-test/no-such"}},
    )
)
PARAMS = {"vfm": DINO8.name, "vfm_weights": "none", "pad_multiple": 1}
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


# --- independent reference math ------------------------------------------------------------


def ref_attention(feats, beta=1.2, gamma=3.0):
    """SM of gamma * (S - beta * mean S), entries < 0 masked, the diagonal always kept."""
    b, n, _ = feats.shape
    out = torch.zeros(b, n, n)
    for i in range(b):
        s = feats[i] @ feats[i].T
        scaled = (s - beta * s.mean()) * gamma
        for r in range(n):
            row = scaled[r].clone()
            masked = row < 0
            masked[r] = False
            row[masked] = float("-inf")
            out[i, r] = torch.softmax(row, dim=0)
    return out


def reference_table(proxy, grid):
    """The official positional table of the proxy on a grid, (1, P + h*w, D).

    DINO (facebookresearch/dino interpolate_pos_encoding): bicubic with scale factor (g + 0.1) /
    28, from pos_reference's float64 loop; DINOv2 with registers (interpolate_offset 0,
    antialias): timm's own resize, which is that.
    """
    model = proxy.model
    pos = model.pos_embed.detach()
    gh, gw = model.patch_embed.grid_size
    if tuple(grid) == (gh, gw):
        return pos
    prefix = 0 if model.no_embed_class else 1
    if proxy.spec.pos_interpolation == "bicubic_antialias":
        return timm.layers.resample_abs_pos_embed(pos, grid, (gh, gw), num_prefix_tokens=prefix)
    patches = official_table(pos[0, prefix:].reshape(gh, gw, -1), grid).float()
    return torch.cat([pos[:, :prefix], patches.reshape(1, grid[0] * grid[1], -1)], dim=1)


def ref_features(proxy, clip_images, prefix):
    """CLIP-normalised -> RGB -> ImageNet-normalised; last-layer tokens without prefix; L2.

    timm's own forward_features on a copy of the model whose native grid is the input's and whose
    table is the official one for it (so timm does not resize anything).
    """
    rgb = clip_images * CLIP_STD + CLIP_MEAN
    grid = (clip_images.shape[-2] // proxy.patch_size, clip_images.shape[-1] // proxy.patch_size)
    model = copy.deepcopy(proxy.model)
    model.pos_embed = torch.nn.Parameter(reference_table(proxy, grid), requires_grad=False)
    model.patch_embed.grid_size = grid
    tokens = model.forward_features((rgb - IMAGENET_MEAN) / IMAGENET_STD)
    return F.normalize(tokens[:, prefix:], dim=-1)


def ref_logits(backbone, proxy, images, vocab, prefix, scale=40.0):
    """ProxyCLIP's logits on the VFM grid for images whose size needs no padding."""
    x, grid, _ = backbone.forward_to_last(images)
    block = backbone.blocks[-1]
    heads = backbone.heads
    h = block.ln_1(x)
    v = (h @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).chunk(3, dim=-1)[2]
    b, n, d = v.shape
    v = v[:, 1:].reshape(b, grid[0], grid[1], heads, d // heads)
    vh, vw = images.shape[-2] // proxy.patch_size, images.shape[-1] // proxy.patch_size
    per_head = []
    for head in range(heads):
        plane = v[..., head, :].permute(0, 3, 1, 2)  # (B, d/heads, h, w)
        plane = F.interpolate(plane, size=(vh, vw), mode="bilinear", align_corners=False)
        per_head.append(plane.flatten(2).transpose(1, 2))  # (B, vh*vw, d/heads)
    attn = ref_attention(ref_features(proxy, images, prefix))
    mixed = torch.cat([attn @ ph for ph in per_head], dim=-1)  # heads concatenated
    out = mixed @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    feats = F.normalize(backbone.visual.ln_post(out) @ backbone.visual.proj, dim=-1)
    logits = scale * feats @ vocab.embeddings.T
    return logits.transpose(1, 2).reshape(b, -1, vh, vw)


@pytest.fixture(scope="module")
def images(tiny_backbone):
    """Two normalised random 48 x 80 images."""
    g = torch.Generator().manual_seed(7)
    return tiny_backbone.normalize(torch.rand(2, 3, 48, 80, generator=g))


@pytest.fixture(scope="module")
def vocab(tiny_backbone):
    """Synonyms and background words, as the engine builds them."""
    config = SegmenterConfig(**TINY_CONFIG, vocabulary=["cat; kitten", "dog", "tree"])
    return Segmenter(config, backbone=tiny_backbone).vocabulary


# --- building blocks ------------------------------------------------------------------------


def test_proxy_attention_normalisation_and_masking():
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(2, 12, 8, generator=g), dim=-1)
    attn = proxy_attention(feats, 1.2, 3.0)
    assert attn.shape == (2, 1, 12, 12)  # one map shared by every head
    torch.testing.assert_close(attn[:, 0], ref_attention(feats))
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 1, 12))
    # Masked entries are exactly zero: those with S < beta * mean(S) off the diagonal.
    s = feats @ feats.transpose(1, 2)
    below = s < 1.2 * s.mean(dim=(1, 2), keepdim=True)
    below &= ~torch.eye(12, dtype=torch.bool)
    assert below.any() and torch.all(attn[:, 0][below] == 0)
    assert torch.all(attn[:, 0][~below] > 0)


def test_proxy_attention_beta_and_gamma():
    g = torch.Generator().manual_seed(1)
    feats = F.normalize(torch.randn(1, 10, 6, generator=g), dim=-1)
    torch.testing.assert_close(
        proxy_attention(feats, 0.5, 2.0)[:, 0], ref_attention(feats, 0.5, 2.0)
    )
    # beta 0, gamma 1: a softmax of the cosine similarities with negative ones masked.
    s = feats[0] @ feats[0].T
    expected = torch.softmax(s.masked_fill((s < 0) & ~torch.eye(10, dtype=torch.bool), -1e9), -1)
    torch.testing.assert_close(proxy_attention(feats, 0.0, 1.0)[0, 0], expected)


def test_proxy_attention_of_a_uniform_image_is_finite():
    feats = F.normalize(torch.ones(1, 9, 4), dim=-1)  # mean(S) = 1 > 1 / beta: all S' < 0
    attn = proxy_attention(feats, 1.2, 3.0)
    torch.testing.assert_close(attn[0, 0], torch.eye(9))


def test_resize_values_drops_cls_and_resizes_each_head():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(2, 3, 1 + 3 * 5, 4, generator=g)
    out = resize_values(v, (3, 5), (6, 10))
    assert out.shape == (2, 3, 60, 4)
    for b in range(2):
        for h in range(3):
            plane = v[b, h, 1:].T.reshape(1, 4, 3, 5)
            up = F.interpolate(plane, size=(6, 10), mode="bilinear", align_corners=False)
            torch.testing.assert_close(out[b, h], up[0].reshape(4, 60).T)
    torch.testing.assert_close(resize_values(v, (3, 5), (3, 5)), v[:, :, 1:])


def test_centred_padding():
    assert centred_padding(336, 448, 112) == (0, 0, 0, 0)
    assert centred_padding(48, 80, 112) == (16, 16, 32, 32)
    assert centred_padding(224, 304, 112) == (16, 16, 0, 0)
    assert centred_padding(50, 51, 8) == (2, 3, 3, 3)


@pytest.mark.parametrize(("spec", "patch", "prefix"), [(DINO8, 8, 1), (DINOV2, 14, 5)])
def test_vfm_features(spec, patch, prefix, tiny_backbone):
    proxy = load_vfm(spec.name, "none", torch.device("cpu"), torch.float32)
    assert proxy.patch_size == patch and proxy.prefix_tokens == prefix
    g = torch.Generator().manual_seed(3)
    clip_images = torch.randn(2, 3, patch * 3, patch * 5, generator=g)
    feats = proxy.features(clip_images)
    assert feats.shape == (2, 15, 32)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2, 15))
    torch.testing.assert_close(feats, ref_features(proxy, clip_images, prefix))
    with pytest.raises(ValueError, match="multiple"):
        proxy.features(clip_images[..., :-1])


@pytest.mark.parametrize("grid", [(3, 5), (6, 10), (42, 42), (14, 14)])
def test_dino_positional_table_is_the_official_sampling(grid):
    proxy = load_vfm(DINO8.name, "none", torch.device("cpu"), torch.float32)
    native = proxy.model.pos_embed
    assert tuple(proxy.model.patch_embed.grid_size) == (28, 28)
    table = proxy.positional_embedding(*grid)
    assert table.shape == (1, 1 + grid[0] * grid[1], 32)
    torch.testing.assert_close(table[:, 0], native[:, 0])  # the CLS row is kept
    expected = official_table(native[0, 1:].reshape(28, 28, -1), grid)
    torch.testing.assert_close(
        table[0, 1:].double(), expected.reshape(-1, 32), atol=2e-6, rtol=1e-5
    )
    # timm's dynamic_img_size (antialiased bicubic by size) samples otherwise.
    timm_table = timm.layers.resample_abs_pos_embed(native, grid, (28, 28), num_prefix_tokens=1)
    assert (timm_table - table).abs().max() > 1e-4
    assert proxy.positional_embedding(*grid) is table  # cached per grid


def test_proxy_tables_at_the_native_grid_and_for_dinov2():
    dino = load_vfm(DINO8.name, "none", torch.device("cpu"), torch.float32)
    assert torch.equal(dino.positional_embedding(28, 28), dino.model.pos_embed)
    # DINOv2 with registers: antialiased bicubic by size of the patch rows only (no class row),
    # which is what timm does for it.
    v2 = load_vfm(DINOV2.name, "none", torch.device("cpu"), torch.float32)
    native = v2.model.pos_embed
    assert native.shape[1] == 37 * 37  # no prefix rows
    timm_table = timm.layers.resample_abs_pos_embed(native, (4, 6), (37, 37), num_prefix_tokens=0)
    torch.testing.assert_close(v2.positional_embedding(4, 6), timm_table)
    with pytest.raises(ValueError, match="pos_interpolation"):
        VFMSpec("bad", "vit_base_patch8_224.dino", pos_interpolation="bilinear")


# --- the method ----------------------------------------------------------------------------


def test_logits_match_formula(tiny_backbone, images, vocab):
    method = create_method("proxyclip", PARAMS)
    logits = method.logits(tiny_backbone, images, vocab)
    proxy = method.proxy(tiny_backbone)
    expected = ref_logits(tiny_backbone, proxy, images, vocab, prefix=1)
    assert logits.shape == (2, len(vocab.queries), 6, 10)  # the VFM's 8-pixel grid
    torch.testing.assert_close(logits, expected, atol=1e-3, rtol=1e-4)


def test_logit_scale_and_beta_are_used(tiny_backbone, images, vocab):
    base = create_method("proxyclip", PARAMS).logits(tiny_backbone, images, vocab)
    scaled = create_method("proxyclip", {**PARAMS, "logit_scale": 80}).logits(
        tiny_backbone, images, vocab
    )
    torch.testing.assert_close(scaled, 2 * base, atol=1e-3, rtol=1e-4)
    other = create_method("proxyclip", {**PARAMS, "beta": 0.5}).logits(tiny_backbone, images, vocab)
    assert not torch.allclose(other, base, atol=1e-3)


def test_padding_to_the_published_multiple(tiny_backbone, images, vocab):
    # pad_multiple 56 with 16- and 8-pixel patches: the 48 x 80 input is padded to 112 x 112,
    # centred, and the logits of the border are cut off again.
    padded_method = create_method("proxyclip", {**PARAMS, "pad_multiple": 56})
    out = padded_method.logits(tiny_backbone, images, vocab)
    assert out.shape == (2, len(vocab.queries), 48, 80)
    padded = F.pad(images, (16, 16, 32, 32))
    grid = create_method("proxyclip", PARAMS).logits(tiny_backbone, padded, vocab)
    assert grid.shape[-2:] == (14, 14)
    full = F.interpolate(grid, size=(112, 112), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, full[..., 32:80, 16:96])


def test_dinov2_proxy_with_registers(tiny_backbone, images, vocab):
    # 14-pixel patches: lcm(1, 16, 14) = 112, so the input is padded and the output cropped.
    method = create_method("proxyclip", {**PARAMS, "vfm": DINOV2.name})
    out = method.logits(tiny_backbone, images, vocab)
    assert out.shape == (2, len(vocab.queries), 48, 80)
    assert torch.isfinite(out).all()
    padded = F.pad(images, (16, 16, 32, 32))
    proxy = method.proxy(tiny_backbone)
    grid = ref_logits(tiny_backbone, proxy, padded, vocab, prefix=5)
    full = F.interpolate(grid, size=(112, 112), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, full[..., 32:80, 16:96], atol=1e-3, rtol=1e-4)


def test_published_defaults():
    p = proxyclip.ProxyCLIPParams()
    assert (p.logit_scale, p.beta, p.gamma, p.pad_multiple) == (40.0, 1.2, 3.0, 56)
    assert p.vfm == "dino_vitb8" and p.vfm_weights == "pretrained"
    assert VFM_SPECS["dino_vitb8"].timm_model == "vit_base_patch8_224.dino"
    assert VFM_SPECS["dinov2_vitb14_reg"].timm_model == "vit_base_patch14_reg4_dinov2.lvd142m"
    assert {"proxyclip", "cliptrase"} <= set(available_methods())


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [("vfm", "sam", "unknown proxy model"), ("gamma", 0, "gamma"), ("beta", -1, "beta"),
     ("pad_multiple", 0, "pad_multiple")],
)  # fmt: skip
def test_invalid_parameters(key, value, match):
    with pytest.raises(ValueError, match=match):
        create_method("proxyclip", {key: value})


# --- weights --------------------------------------------------------------------------------


def test_pretrained_offline_names_tag_cache_and_fix(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as info:
        load_vfm(OFFLINE.name, "pretrained", torch.device("cpu"), torch.float32)
    message = str(info.value)
    assert "'vit_base_patch8_224.dino'" in message
    assert str(constants.HF_HUB_CACHE) in message
    assert "vfm_weights" in message and "local checkpoint file" in message


def test_local_checkpoint_file(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        source = timm.create_model(
            "vit_base_patch8_224.dino", pretrained=False, num_classes=0, **TINY_VIT
        )
    path = tmp_path / "tiny_dino.pth"
    torch.save(source.state_dict(), path)
    proxy = load_vfm(DINO8.name, str(path), torch.device("cpu"), torch.float32)
    assert proxy.source == "checkpoint tiny_dino.pth"
    for key, value in source.state_dict().items():
        torch.testing.assert_close(proxy.model.state_dict()[key], value)


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(ModelLoadError, match="neither 'pretrained', 'none' nor an existing file"):
        load_vfm(DINO8.name, str(tmp_path / "missing.pth"), torch.device("cpu"), torch.float32)
    wrong = tmp_path / "wrong.pth"
    torch.save({"something": torch.zeros(3)}, wrong)
    with pytest.raises(ModelLoadError, match="does not load into vit_base_patch8_224.dino"):
        load_vfm(DINO8.name, str(wrong), torch.device("cpu"), torch.float32)


def test_random_weights_warn_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="ovseg_ros.engine"):
        proxy = load_vfm(DINO8.name, "none", torch.device("cpu"), torch.float32)
    assert "RANDOM weights" in caplog.text
    assert proxy.source == "random weights (seed 0)"
    again = load_vfm(DINO8.name, "none", torch.device("cpu"), torch.float32)
    for a, b in zip(proxy.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)  # seeded: reproducible


# --- lifecycle ------------------------------------------------------------------------------

LIFE_PARAMS = {"vfm": LIFE.name, "vfm_weights": "none"}


@pytest.fixture
def load_count(monkeypatch):
    """Count the proxy models actually built (not taken from the shared cache)."""
    gc.collect()
    calls = []
    real = proxyclip.load_vfm

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(proxyclip, "load_vfm", counting)
    return calls


def frame():
    """A small random RGB frame."""
    return np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)


def test_vfm_loaded_only_when_used_and_released_on_switch(make_segmenter, load_count):
    seg = make_segmenter(method="naclip", short_side=48)
    seg.segment(frame())
    assert load_count == []
    seg.set_method("proxyclip", LIFE_PARAMS)
    assert load_count == [LIFE.name]  # loaded by set_method, before any frame
    method = seg.method
    assert method.loaded
    proxy = method.proxy(seg.backbone)
    assert proxy.device == seg.backbone.device and proxy.dtype == seg.backbone.dtype
    result = seg.segment(frame())
    seg.segment(frame())
    assert load_count == [LIFE.name]  # once
    assert result.timings["vfm"] > 0
    alive = weakref.ref(proxy)
    del proxy
    seg.set_method("naclip")
    assert not method.loaded
    gc.collect()
    assert alive() is None  # its memory is gone


def test_parameter_change_reuses_the_loaded_vfm(make_segmenter, load_count):
    seg = make_segmenter(method="proxyclip", method_params=LIFE_PARAMS, short_side=48)
    assert load_count == [LIFE.name]  # the initial method is prepared too
    first = seg.method
    seg.set_method("proxyclip", {**LIFE_PARAMS, "beta": 1.0})
    assert load_count == [LIFE.name]
    assert not first.loaded and seg.method.loaded
    seg.segment(frame())


def test_release_waits_for_frames_in_flight(make_segmenter, load_count):
    seg = make_segmenter(method="proxyclip", method_params=LIFE_PARAMS, short_side=48)
    old = seg.method
    with seg._frame() as (_, in_use, _):  # a frame that started before the switch
        assert in_use is old
        seg.set_method("naclip")
        assert seg.method is not old
        assert old.loaded  # still serving that frame
    assert not old.loaded


def test_failed_load_keeps_the_current_method(make_segmenter, tmp_path):
    seg = make_segmenter(method="naclip", short_side=48)
    with pytest.raises(ModelLoadError):
        seg.set_method("proxyclip", {"vfm": LIFE.name, "vfm_weights": str(tmp_path / "x.pth")})
    assert seg.config.method == "naclip" and seg.method.name == "naclip"
    seg.segment(frame())


def test_vfm_follows_the_backbone_dtype(vocab):
    model = _open_clip().create_model("ovseg-tiny", pretrained=None).eval().requires_grad_(False)
    backbone = Backbone(
        model, name="ovseg-tiny", source="random", device=torch.device("cpu"), dtype=torch.bfloat16
    )
    method = create_method("proxyclip", PARAMS)
    method.prepare(backbone)
    proxy = method.proxy(backbone)
    assert proxy.dtype == torch.bfloat16
    assert next(proxy.model.parameters()).dtype == torch.bfloat16
    images = backbone.normalize(torch.rand(1, 3, 48, 80))
    logits = method.logits(backbone, images, vocab)
    assert logits.shape == (1, len(vocab.queries), 6, 10) and torch.isfinite(logits).all()
    method.release()
    assert not method.loaded


def test_cli_segment_and_methods(tmp_path, capsys):
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (40, 70, 3), np.uint8))
    tiny = ["--model", "ovseg-tiny", "--pretrained", "none", "--templates", "single"]
    tiny += ["--text-cache-dir", "off", "-q", "--out", str(tmp_path / "out")]
    for method, params in (
        ("proxyclip", ["--param", f"vfm={DINO8.name}", "--param", "vfm_weights=none"]),
        ("cliptrase", ["--param", "eps=1.0"]),
    ):
        assert cli.main(["segment", str(image), "--method", method, *params, *tiny]) == 0
        labels = cv2.imread(str(tmp_path / "out" / "a_labels.png"), cv2.IMREAD_UNCHANGED)
        assert labels.shape == (40, 70)
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "proxyclip" in out and "beta=1.2" in out
    assert "cliptrase" in out and "eps_336=1.1" in out


# --- the real architectures -----------------------------------------------------------------


@pytest.mark.slow
def test_vitb16_with_dino_b8_end_to_end(vitb16_backbone):
    config = SegmenterConfig(
        **{**TINY_CONFIG, "model_name": "ViT-B-16"},
        method="proxyclip",
        method_params={"vfm_weights": "none"},  # the real DINO ViT-B/8 architecture
        short_side=224,
        vocabulary=["cat", "dog; puppy", "tree"],
    )
    seg = Segmenter(config, backbone=vitb16_backbone)
    assert seg.method.proxy(vitb16_backbone).patch_size == 8
    # 224 x 224 needs no padding; 224 x 299 (304 for CLIP) is padded to 224 x 336 and cropped.
    for size in ((200, 200), (240, 320)):
        image = np.random.default_rng(2).integers(0, 256, (*size, 3), dtype=np.uint8)
        result = seg.segment(image)
        assert result.labels.shape == size
        assert set(np.unique(result.labels)) <= set(range(3)) | {255}
        assert 0 < result.timings["vfm"] < result.timings["model"]
    seg.set_method("naclip")
