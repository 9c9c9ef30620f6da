"""Backbone: positional-embedding interpolation, the dense runner vs open_clip, devices, loading.

The runner is validated against open_clip itself: at the native input size, embed() must equal
`visual._embeds` and running every block then ln_post[CLS] @ proj must equal `encode_image`.
Checkpoint tests save the tiny model in each supported format and reload it.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import build_tiny

from ovseg_ros.engine import ModelLoadError, Segmenter, SegmenterConfig, build_backbone
from ovseg_ros.engine.backbone import resolve_device, resolve_dtype

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


def test_interpolation_is_bicubic_over_the_patch_grid(tiny_backbone):
    # A reference with torch's bicubic resize of the 4 x 4 table laid out as an image.
    native = tiny_backbone.visual.positional_embedding
    image = native[1:].reshape(4, 4, -1).permute(2, 0, 1).unsqueeze(0)
    resized = torch.nn.functional.interpolate(image, size=(6, 3), mode="bicubic")
    expected = resized[0].permute(1, 2, 0).reshape(18, -1)
    torch.testing.assert_close(tiny_backbone.positional_embedding(6, 3)[1:], expected)


def test_positional_table_is_cached(tiny_backbone):
    first = tiny_backbone.positional_embedding(3, 7)
    assert tiny_backbone.positional_embedding(3, 7) is first
    assert tiny_backbone.positional_embedding(7, 3) is not first


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


def test_garbage_checkpoint_cannot_be_read(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"definitely not a torch file" * 10)
    with pytest.raises(ModelLoadError, match="cannot read"):
        build_backbone("ovseg-tiny", "none", str(path), "", "cpu", "fp32")


def test_checkpoint_of_another_architecture(tmp_path, tiny_backbone):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    with pytest.raises(ModelLoadError, match="does not fit model.name 'ViT-B-32'"):
        build_backbone("ViT-B-32", "none", str(path), "", "cpu", "fp32")


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
        {"model.name": "ovseg-tiny", "input.short_side": 224, "method_params.sigma": 3.0}
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
