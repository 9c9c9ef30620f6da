"""Backbone: positional-embedding interpolation, the dense runner vs open_clip, devices, loading.

Loading is clip_loading.py (devices, open_clip, the hub) and clip_weights.py (weights files).

Positional tables are checked against float64 loops of the official sampling (pos_reference.py).
The runner is validated against open_clip itself: at the native input size, embed() must equal
`visual._embeds` and running every block then ln_post[CLS] @ proj must equal `encode_image`.
Checkpoint tests save the tiny model in each supported format and reload it; weights that do not
fit (activation, shape, unreadable files) are saved random state dicts of tiny architectures
registered here, and each refusal must be one line.
"""

import copy
import json
import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny
from pos_reference import bilinear_size, official_table

from ovseg_ros.engine import (
    ModelLoadError,
    Segmenter,
    SegmenterConfig,
    build_backbone,
    clip_loading,
)
from ovseg_ros.engine.clip_loading import _open_clip, load_clip, resolve_device, resolve_dtype
from ovseg_ros.engine.clip_weights import tag_quick_gelu

NO_CUDA = not torch.cuda.is_available()


# --- positional embedding -------------------------------------------------------------------


def test_native_grid_returns_the_model_table(tiny_backbone):
    assert tiny_backbone.native_grid == (4, 4)
    table = tiny_backbone.positional_embedding(4, 4)
    assert torch.equal(table, tiny_backbone.visual.positional_embedding)


@pytest.mark.parametrize("grid", [(3, 7), (1, 1), (13, 2), (4, 5), (8, 8)])
def test_interpolated_table_shapes_and_cls_row(tiny_backbone, grid):
    h, w = grid
    table = tiny_backbone.positional_embedding(h, w)
    native = tiny_backbone.visual.positional_embedding
    assert table.shape == (1 + h * w, tiny_backbone.width)
    assert table.dtype == native.dtype
    assert torch.equal(table[0], native[0])
    assert torch.isfinite(table).all()


@pytest.mark.parametrize("grid", [(6, 3), (3, 7), (13, 2), (8, 8), (21, 28), (1, 1)])
def test_interpolation_is_the_official_scale_factor_sampling(tiny_backbone, grid):
    # SCLIP / NACLIP / ClearCLIP / ProxyCLIP / CLIPtrase: F.interpolate(scale_factor=((h + 0.1)
    # / 4, (w + 0.1) / 4), bicubic), sampled with that scale; the reference is a float64 loop.
    native = tiny_backbone.visual.positional_embedding
    table = native[1:].reshape(4, 4, -1)
    expected = official_table(table, grid).reshape(grid[0] * grid[1], -1)
    ours = tiny_backbone.positional_embedding(*grid)
    torch.testing.assert_close(ours[1:].double(), expected, atol=2e-6, rtol=1e-5)


def test_official_sampling_is_not_a_resize_by_size(tiny_backbone):
    # The +0.1 scale factor samples slightly differently from size=(h, w) (up to 0.065 cells at
    # the far edge of a 21 x 28 grid from 14 x 14): the old engine's table is not the official one.
    native = tiny_backbone.visual.positional_embedding
    image = native[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    by_size = F.interpolate(image, size=(21, 28), mode="bicubic", align_corners=False)
    by_size = by_size[0].permute(1, 2, 0).reshape(21 * 28, -1)
    ours = tiny_backbone.positional_embedding(21, 28)[1:]
    assert (ours - by_size).abs().max() > 1e-3
    # ... while the scale used by the official call, recomputed from the sizes, gives size=.
    recomputed = F.interpolate(
        image, scale_factor=(21.1 / 4, 28.1 / 4), mode="bicubic", recompute_scale_factor=True
    )
    torch.testing.assert_close(recomputed[0].permute(1, 2, 0).reshape(21 * 28, -1), by_size)


@pytest.mark.parametrize("grid", [(4, 4), (6, 3), (21, 28)])
def test_cliper_table_is_bilinear_rounded_through_fp16(tiny_backbone, grid):
    # CLIPer's upsample_pos_emb: F.interpolate(size=grid, mode='bilinear'), then .half(), at
    # every grid (the native one too, where the resize is a copy), CLS row included.
    native = tiny_backbone.visual.positional_embedding
    table = tiny_backbone.positional_embedding(*grid, style="bilinear_fp16")
    patches = bilinear_size(native[1:].reshape(4, 4, -1), grid).reshape(grid[0] * grid[1], -1)
    expected = torch.cat([native[:1].double(), patches]).half().float()
    assert table.dtype == native.dtype
    # fp16 rounding of values that agree to 1e-7: at most one fp16 step apart, mostly equal.
    step = expected.abs().clamp_min(2**-14) * 2**-10
    assert torch.all((table - expected).abs() <= step)
    assert (table == expected).float().mean() > 0.99
    assert torch.equal(table, table.half().float())
    if grid == (4, 4):
        assert torch.equal(table, native.half().float())


def test_positional_style_is_checked(tiny_backbone):
    with pytest.raises(ValueError, match="style"):
        tiny_backbone.positional_embedding(3, 3, style="nearest")


# --- the runner against open_clip ----------------------------------------------------------


@pytest.fixture(scope="module")
def native_images(tiny_backbone):
    """Two normalised random 64 x 64 images (the tiny model's native input size)."""
    g = torch.Generator().manual_seed(2)
    return tiny_backbone.normalize(torch.rand(2, 3, 64, 64, generator=g))


def test_embed_equals_open_clip(tiny_backbone, native_images):
    tokens, grid = tiny_backbone.embed(native_images)
    assert grid == (4, 4)
    torch.testing.assert_close(tokens, tiny_backbone.visual._embeds(native_images))


def test_full_forward_equals_encode_image(tiny_backbone, native_images):
    bb = tiny_backbone
    x, grid, _ = bb.forward_to_last(native_images)
    x = bb.blocks[-1](x)
    pooled = bb.visual.ln_post(x[:, 0]) @ bb.visual.proj
    expected = bb.model.encode_image(native_images)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    # project() is the same map, L2-normalised, applied to every token.
    torch.testing.assert_close(
        bb.project(x)[:, 0], torch.nn.functional.normalize(expected, dim=-1), atol=1e-5, rtol=1e-5
    )


def test_normalize_uses_clip_mean_and_std(tiny_backbone):
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    out = tiny_backbone.normalize(mean.expand(1, 3, 2, 2).clone())
    torch.testing.assert_close(out, torch.zeros(1, 3, 2, 2), atol=1e-6, rtol=0)


def test_backbone_attributes(tiny_backbone):
    bb = tiny_backbone
    assert (bb.patch_size, bb.width, bb.heads, bb.num_layers, bb.embed_dim) == (16, 128, 2, 3, 64)
    assert bb.device == torch.device("cpu") and bb.dtype == torch.float32
    assert bb.source.startswith("random weights")
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert not bb.model.training


# --- devices and precisions -----------------------------------------------------------------


def test_resolve_device_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_resolve_device_auto_is_cpu_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_resolve_device_cuda_without_gpu_raises(device):
    with pytest.raises(ValueError, match="no CUDA"):
        resolve_device(device)


@pytest.mark.parametrize("device", ["gpu", "mps", ""])
def test_resolve_device_rejects_unknown(device):
    with pytest.raises(ValueError, match="device"):
        resolve_device(device)


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("fp32", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        resolve_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="precision"):
        resolve_dtype("fp64", cpu)


def test_bf16_backbone_segments_on_cpu():
    torch.manual_seed(0)
    bb = build_backbone("ovseg-tiny", "none", "", "", "cpu", "bf16")
    assert bb.dtype == torch.bfloat16
    assert bb.positional_embedding(3, 5).dtype == torch.bfloat16
    config = SegmenterConfig(
        model_name="ovseg-tiny", model_pretrained="none", device="cpu", precision="bf16",
        templates="single", text_cache_dir="none", short_side=48,
    )  # fmt: skip
    result = Segmenter(config, backbone=bb).segment(np.full((40, 70, 3), 90, np.uint8))
    assert result.labels.shape == (40, 70) and result.labels.dtype == np.uint8
    assert np.isfinite(result.confidence).all()


# --- load errors ----------------------------------------------------------------------------


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="open_clip") as info:
        build_backbone("ViT-Nope-99", "none", "", "", "cpu", "fp32")
    assert "ViT-Nope-99" in str(info.value)


def test_unknown_pretrained_tag_lists_tags():
    with pytest.raises(ModelLoadError, match="not a known tag") as info:
        build_backbone("ViT-B-16", "no-such-tag", "", "", "cpu", "fp32")
    assert "openai" in str(info.value) and "laion2b_s34b_b88k" in str(info.value)


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "missing.pt"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        build_backbone("ovseg-tiny", "none", str(path), "", "cpu", "fp32")
    assert str(path) in str(info.value)


def load_error(path, name="ovseg-tiny", pretrained="none"):
    """The ModelLoadError message of loading path as name; it must be one line."""
    with pytest.raises(ModelLoadError) as info:
        build_backbone(name, pretrained, str(path), "", "cpu", "fp32")
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_garbage_checkpoint_is_one_sentence(tmp_path):
    # torch's own error is a multi-line weights_only advice; the user gets one sentence.
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"definitely not a torch file" * 10)
    message = load_error(path)
    assert "is not a weights file torch can read" in message and str(path) in message
    assert "weights_only" not in message and "Weights only" not in message


def test_pickled_objects_are_one_sentence(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a whole module, not a state dict
    message = load_error(path)
    assert "pickled Python objects (torch.nn.modules.linear.Linear)" in message
    assert "state_dict()" in message and "weights_only" not in message


@pytest.mark.parametrize("kind", ["empty", "truncated"])
def test_empty_or_truncated_checkpoint(tmp_path, tiny_backbone, kind):
    path = tmp_path / "cut.pt"
    if kind == "empty":
        path.touch()
        assert "is an empty file" in load_error(path)
    else:
        torch.save(tiny_backbone.model.state_dict(), path)
        path.write_bytes(path.read_bytes()[:5000])
        assert "is truncated or corrupt" in load_error(path)


def test_checkpoint_directory_says_it_is_a_directory(tmp_path, tiny_backbone):
    folder = tmp_path / "weights"
    folder.mkdir()
    message = load_error(folder)
    assert "is a directory, not a weights file" in message and "does not exist" not in message
    torch.save(tiny_backbone.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    assert "(it holds open_clip_pytorch_model.bin)" in load_error(folder)


def test_safetensors_checkpoint(tmp_path, tiny_backbone):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}, path)
    loaded = build_backbone("ovseg-tiny", "none", str(path), "", "cpu", "fp32")
    for a, b in zip(loaded.model.parameters(), tiny_backbone.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_of_another_architecture(tmp_path, tiny_backbone):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    message = load_error(path, "ViT-B-32")
    assert "does not fit model.name 'ViT-B-32'" in message
    # One sentence naming both shapes and an architecture that fits.
    assert "width 128, patch 16, 64 px, 3 layers, 64-d embedding" in message
    assert "width 768, patch 32, 224 px, 12 layers, 512-d embedding" in message
    assert "set model.name to an architecture of that shape (ovseg-tiny" in message


def test_non_tensor_checkpoint(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ModelLoadError, match="no state dict"):
        build_backbone("ovseg-tiny", "none", str(path), "", "cpu", "fp32")


def test_pretrained_offline_names_tag_cache_and_checkpoint(tmp_path, monkeypatch):
    # The sandbox has no network; force open_clip's hub off anyway so the test never downloads.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass
    with pytest.raises(ModelLoadError) as info:
        build_backbone("ViT-B-16", "openai", "", str(tmp_path), "cpu", "fp32")
    message = str(info.value)
    assert "openai" in message and str(tmp_path) in message and "model.checkpoint" in message


def test_non_vit_model_is_rejected():
    with pytest.raises(ModelLoadError, match="VisionTransformer"):
        build_backbone("RN50", "none", "", "", "cpu", "fp32")


# --- weights that do not fit the architecture: activation and shape ------------------------

#: Tiny GELU / QuickGELU twins (open_clip's ViT-B-16 / ViT-B-16-quickgelu pattern), another input
#: size, and a QuickGELU-only architecture whose text tower is wider.
ACT_VISION = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16}
ACT_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}
ACT_CONFIGS = {
    "ovseg-test-act": {"embed_dim": 32, "vision_cfg": ACT_VISION, "text_cfg": ACT_TEXT},
    "ovseg-test-act-quickgelu": {
        "embed_dim": 32, "quick_gelu": True, "vision_cfg": ACT_VISION, "text_cfg": ACT_TEXT,
    },
    "ovseg-test-act-48": {
        "embed_dim": 32, "vision_cfg": {**ACT_VISION, "image_size": 48}, "text_cfg": ACT_TEXT,
    },
    "ovseg-test-wide-text": {
        "embed_dim": 32, "quick_gelu": True, "vision_cfg": ACT_VISION,
        "text_cfg": {**ACT_TEXT, "width": 48},
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def act_models(tmp_path_factory):
    """The test architectures registered with open_clip, and one random model of each."""
    folder = tmp_path_factory.mktemp("act_configs")
    for name, cfg in ACT_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip = _open_clip()
    open_clip.add_model_config(folder)
    models = {}
    for seed, name in enumerate(ACT_CONFIGS):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(20 + seed)
            models[name] = open_clip.create_model(name, pretrained=None).eval()
    return models


@pytest.fixture
def fake_tags(monkeypatch):
    """Registry tags of the test architectures: fake_gelu (GELU) and fake_quick (QuickGELU)."""
    registry = _open_clip().pretrained._PRETRAINED
    gelu = {"hf_hub": "ovseg/fake-gelu/", "url": ""}
    quick = {"hf_hub": "ovseg/fake-quick/", "url": "", "quick_gelu": True}
    monkeypatch.setitem(registry, "ovseg-test-act", {"fake_gelu": gelu, "fake_quick": quick})
    monkeypatch.setitem(registry, "ovseg-test-act-quickgelu", {"fake_quick": quick})


def activation_of(backbone):
    """The class name of the image tower's MLP activation."""
    return type(backbone.blocks[0].mlp.gelu).__name__


def same_image_features(backbone, model):
    """Whether a loaded backbone computes the same image features as the model saved."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    return torch.allclose(backbone.model.encode_image(x), model.encode_image(x), atol=1e-6)


def save(model, path):
    """torch.save a model's state dict to path (parents created); return path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def test_registry_gives_each_tags_activation():
    open_clip = _open_clip()
    assert tag_quick_gelu(open_clip, "ViT-B-16", "openai") is True
    assert tag_quick_gelu(open_clip, "ViT-B-16", "laion2b_s34b_b88k") is False
    assert tag_quick_gelu(open_clip, "ViT-B-16-quickgelu", "metaclip_400m") is True
    assert tag_quick_gelu(open_clip, "ViT-B-16-quickgelu", "laion2b_s34b_b88k") is False  # twin's
    assert tag_quick_gelu(open_clip, "ViT-B-16", "no-such-tag") is None


def test_quickgelu_weights_in_a_plain_state_dict_need_an_explicit_choice(tmp_path, act_models):
    # An open_clip state dict carries no activation; ovseg-test-act has a QuickGELU twin, so
    # the GELU name alone is no choice: refused, naming the twin and the tag alternative.
    path = save(act_models["ovseg-test-act-quickgelu"], tmp_path / "weights.pt")
    for pretrained in ("none", "openai"):  # 'openai' is no tag of this architecture
        message = load_error(path, "ovseg-test-act", pretrained)
        assert "does not say whether its weights were trained with QuickGELU" in message
        assert "set model.name to 'ovseg-test-act-quickgelu' for QuickGELU weights" in message


def test_quickgelu_name_is_an_explicit_choice(tmp_path, act_models):
    path = save(act_models["ovseg-test-act-quickgelu"], tmp_path / "weights.pt")
    loaded = build_backbone("ovseg-test-act-quickgelu", "none", str(path), "", "cpu", "fp32")
    assert activation_of(loaded) == "QuickGELU"
    assert same_image_features(loaded, act_models["ovseg-test-act-quickgelu"])


def test_tag_confirms_the_names_activation(tmp_path, act_models, fake_tags):
    path = save(act_models["ovseg-test-act"], tmp_path / "weights.pt")
    loaded = build_backbone("ovseg-test-act", "fake_gelu", str(path), "", "cpu", "fp32")
    assert activation_of(loaded) == "GELU"
    assert same_image_features(loaded, act_models["ovseg-test-act"])


def test_tag_disagreeing_with_the_name_is_refused(tmp_path, act_models, fake_tags):
    path = save(act_models["ovseg-test-act-quickgelu"], tmp_path / "weights.pt")
    message = load_error(path, "ovseg-test-act", "fake_quick")
    assert "model.name 'ovseg-test-act' (GELU) disagrees with model.pretrained 'fake_quick'" in (
        message
    )
    assert "set model.name to 'ovseg-test-act-quickgelu'" in message


def test_open_clip_config_beside_the_file_sets_the_activation(tmp_path, act_models, caplog):
    # open_clip's folder layout (and the Hugging Face repositories): the config says QuickGELU.
    folder = tmp_path / "repo"
    path = save(act_models["ovseg-test-act-quickgelu"], folder / "open_clip_pytorch_model.bin")
    config = {"model_cfg": ACT_CONFIGS["ovseg-test-act-quickgelu"]}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="ovseg_ros.engine"):
        loaded = build_backbone("ovseg-test-act", "none", str(path), "", "cpu", "fp32")
    assert activation_of(loaded) == "QuickGELU"
    assert same_image_features(loaded, act_models["ovseg-test-act-quickgelu"])
    assert (
        "model.checkpoint open_clip_pytorch_model.bin (described by the open_clip_config.json "
        "beside it), trained with QuickGELU: building model.name ovseg-test-act with QuickGELU "
        "(as ovseg-test-act-quickgelu)"
    ) in caplog.text


@pytest.mark.parametrize(
    ("repo", "name", "saved", "built"),
    [
        ("models--ovseg--fake-quick", "ovseg-test-act", "ovseg-test-act-quickgelu", "QuickGELU"),
        ("models--ovseg--fake-gelu", "ovseg-test-act-quickgelu", "ovseg-test-act", "GELU"),
    ],
)
def test_hub_cache_path_names_the_registry_tag(
    tmp_path, act_models, fake_tags, caplog, repo, name, saved, built
):
    path = tmp_path / "hub" / repo / "snapshots" / "0123abc" / "open_clip_pytorch_model.bin"
    save(act_models[saved], path)
    with caplog.at_level(logging.INFO, logger="ovseg_ros.engine"):
        loaded = build_backbone(name, "none", str(path), "", "cpu", "fp32")
    assert activation_of(loaded) == built
    assert same_image_features(loaded, act_models[saved])
    assert "(the open_clip download ovseg-test-act" in caplog.text
    if built == "GELU":  # a GELU twin exists: used instead of the QuickGELU name
        assert "trained with GELU: using ovseg-test-act instead of model.name" in caplog.text


def test_another_input_size_is_refused_not_resized(tmp_path, act_models):
    # open_clip's own loader would resize the 3 x 3 positional table to 2 x 2 without a word.
    path = save(act_models["ovseg-test-act-48"], tmp_path / "weights.pt")
    message = load_error(path, "ovseg-test-act-quickgelu")
    assert "the file holds a ViT of width 64, patch 16, 48 px, 2 layers" in message
    assert "ovseg-test-act-quickgelu is width 64, patch 16, 32 px" in message
    assert "(ovseg-test-act-48)" in message


def test_text_tower_mismatch_is_one_sentence(tmp_path, act_models):
    path = save(act_models["ovseg-test-wide-text"], tmp_path / "weights.pt")
    message = load_error(path, "ovseg-test-act-quickgelu")
    assert "does not fit model.name 'ovseg-test-act-quickgelu'" in message
    assert "tensors differ in shape (e.g. positional_embedding: file (77, 48)" in message


def test_openai_file_is_quickgelu_with_an_info_line(tmp_path, tiny_backbone, act_models, caplog):
    path = tmp_path / "openai.pt"
    torch.save(openai_state_dict(tiny_backbone.model, half=False), path)
    with caplog.at_level(logging.INFO, logger="ovseg_ros.engine"):
        loaded = build_backbone("ovseg-test-act", "none", str(path), "", "cpu", "fp32")
    assert activation_of(loaded) == "QuickGELU" and loaded.width == 128
    assert (
        "OpenAI CLIP state dict, architecture read from the file (ViT of width 128, patch 16, "
        "64 px, 3 layers, 64-d embedding, QuickGELU)"
    ) in caplog.text


@pytest.mark.parametrize(
    ("name", "tag", "arch", "force"),
    [
        ("ovseg-test-act", "fake_quick", "ovseg-test-act", True),  # as ViT-B-16 + openai
        ("ovseg-test-act", "fake_gelu", "ovseg-test-act", False),
        ("ovseg-test-act-quickgelu", "fake_quick", "ovseg-test-act-quickgelu", False),
    ],
)
def test_pretrained_tag_builds_its_activation(
    monkeypatch, act_models, fake_tags, caplog, name, tag, arch, force
):
    # open_clip itself only warns when the tag's activation is not the architecture's.
    open_clip = _open_clip()
    calls = []

    def create_model(model_name, pretrained=None, **kwargs):
        calls.append((model_name, pretrained, kwargs.get("force_quick_gelu", False)))
        return act_models["ovseg-test-act"]  # no download

    monkeypatch.setattr(open_clip, "create_model", create_model)
    monkeypatch.setattr(clip_loading, "_hub_reachable", lambda timeout=3.0: False)
    with caplog.at_level(logging.INFO, logger="ovseg_ros.engine"):
        _, source = load_clip(name, tag)
    assert calls == [(arch, tag, force)]
    if force:
        assert source == f"pretrained {tag} (QuickGELU)"
        assert f"model.pretrained '{tag}', trained with QuickGELU: building model.name" in (
            caplog.text
        )


# --- checkpoint round trips -----------------------------------------------------------------


@pytest.fixture(scope="module")
def probe_images():
    """A raw image batch for encode_image and an RGB frame for a Segmenter."""
    g = torch.Generator().manual_seed(3)
    batch = torch.randn(2, 3, 64, 64, generator=g)
    frame = (torch.rand(50, 90, 3, generator=g) * 255).to(torch.uint8).numpy()
    return batch, frame


def segmenter_logits(backbone, frame):
    """Segmenter logits of a frame (text embeddings come from the backbone's own text tower)."""
    config = SegmenterConfig(
        model_name="ovseg-tiny", model_pretrained="none", device="cpu", precision="fp32",
        templates="single", text_cache_dir="none", short_side=64,
    )  # fmt: skip
    return Segmenter(config, backbone=backbone).dense_logits(frame)[0]


def assert_same_model(loaded, original, probe_images, atol=1e-6):
    """encode_image, encode_text and Segmenter logits of two backbones agree."""
    batch, frame = probe_images
    tokens = torch.randint(1, 49000, (2, 77))
    torch.testing.assert_close(
        loaded.model.encode_image(batch), original.model.encode_image(batch), atol=atol, rtol=0
    )
    torch.testing.assert_close(
        loaded.model.encode_text(tokens), original.model.encode_text(tokens), atol=atol, rtol=0
    )
    torch.testing.assert_close(
        segmenter_logits(loaded, frame),
        segmenter_logits(original, frame),
        atol=atol * 100,  # logits are 40 * cosine
        rtol=0,
    )


def test_open_clip_state_dict_round_trip(tmp_path, tiny_backbone, probe_images):
    path = tmp_path / "tiny_open_clip.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    loaded = build_backbone("ovseg-tiny", "none", str(path), "", "cpu", "fp32")
    assert loaded.source == "open_clip checkpoint tiny_open_clip.pt"
    assert_same_model(loaded, tiny_backbone, probe_images)


def test_wrapped_state_dict_round_trip(tmp_path, tiny_backbone, probe_images):
    # Training checkpoints wrap the weights: {"state_dict": {"module.visual...": ...}}.
    state = {"module." + k: v for k, v in tiny_backbone.model.state_dict().items()}
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": state}, path)
    loaded = build_backbone("ovseg-tiny", "none", str(path), "", "cpu", "fp32")
    assert_same_model(loaded, tiny_backbone, probe_images)


def openai_state_dict(model, half):
    """The model's weights as OpenAI's CLIP state dict: extra size keys, fp16 where OpenAI is."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if half:
        for key, value in state.items():
            is_matrix = key.endswith(("weight", "in_proj_bias", "proj")) and value.ndim >= 1
            if is_matrix and "ln_" not in key and "embedding" not in key:
                state[key] = value.half()
    state["input_resolution"] = torch.tensor(64)
    state["context_length"] = torch.tensor(77)
    state["vocab_size"] = torch.tensor(49408)
    return state


def test_openai_state_dict_round_trip(tmp_path, tiny_backbone, probe_images):
    path = tmp_path / "openai_fp32.pt"
    torch.save(openai_state_dict(tiny_backbone.model, half=False), path)
    loaded = build_backbone("ovseg-tiny", "none", str(path), "", "cpu", "fp32")
    assert loaded.source == "OpenAI checkpoint openai_fp32.pt"
    assert loaded.native_grid == (4, 4) and loaded.heads == 2
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert_same_model(loaded, tiny_backbone, probe_images)


def test_openai_fp16_state_dict_round_trip(tmp_path, tiny_backbone, probe_images):
    path = tmp_path / "openai_fp16.pt"
    state = openai_state_dict(tiny_backbone.model, half=True)
    assert state["visual.conv1.weight"].dtype == torch.float16
    torch.save(state, path)
    loaded = build_backbone("ovseg-tiny", "none", str(path), "", "cpu", "fp32")
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert_same_model(loaded, tiny_backbone, probe_images, atol=3e-3)


def test_openai_jit_archive_round_trip(tmp_path, tiny_backbone, probe_images):
    # OpenAI's release is a TorchScript archive whose state dict holds the weights under the same
    # names plus input_resolution / context_length / vocab_size, and no attention-mask buffer.
    model = copy.deepcopy(tiny_backbone.model)
    model.attn_mask = model._buffers.pop("attn_mask")  # a constant, as in OpenAI's archive
    del model.context_length, model.vocab_size
    for key, value in (("input_resolution", 64), ("context_length", 77), ("vocab_size", 49408)):
        model.register_buffer(key, torch.tensor(value))
    example = (torch.zeros(1, 3, 64, 64), torch.zeros(1, 77, dtype=torch.long))
    path = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, example, check_trace=False).save(str(path))
        loaded = build_backbone("ovseg-tiny", "none", str(path), "", "cpu", "fp32")
    assert loaded.source == "OpenAI checkpoint ViT-tiny.pt"
    assert_same_model(loaded, tiny_backbone, probe_images)


def test_checkpoint_overrides_pretrained(tmp_path, tiny_backbone, probe_images):
    other = build_tiny(seed=7)
    assert not torch.equal(other.visual.proj, tiny_backbone.visual.proj)
    path = tmp_path / "seed7.pt"
    torch.save(other.model.state_dict(), path)
    loaded = build_backbone("ovseg-tiny", "no-such-tag", str(path), "", "cpu", "fp32")
    assert_same_model(loaded, other, probe_images)


def test_random_weights_are_reproducible(tiny_backbone):
    # 'none' always draws the same weights, so cached text embeddings of a random model stay valid.
    torch.manual_seed(123)
    again = build_backbone("ovseg-tiny", "none", "", "", "cpu", "fp32")
    for a, b in zip(again.model.parameters(), tiny_backbone.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_config_from_dotted_parameter_names():
    from ovseg_ros.engine import SegmenterConfig

    cfg = SegmenterConfig.from_params(
        {
            "model.name": "ovseg-tiny",
            "input.short_side": 224,
            "method": "naclip",
            "method_params.sigma": 3.0,
        }
    )
    assert (cfg.model_name, cfg.short_side, cfg.method_params) == (
        "ovseg-tiny",
        224,
        {"sigma": 3.0},
    )
    with pytest.raises(ValueError, match="unknown parameter"):
        SegmenterConfig.from_params({"input.shortside": 224})
    with pytest.raises(ValueError, match="input.short_side"):
        SegmenterConfig.from_params({"input.short_side": 4})
