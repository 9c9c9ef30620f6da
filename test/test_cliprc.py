"""CLIP-RC (engine/methods/cliprc.py, cliprc_net.py, cliprc_checkpoint.py) on random checkpoints.

The fixture writes a checkpoint the way the released files are laid out: an mmcv dict with meta
and a state_dict whose keys and shapes follow the official module definitions
(CLIPVisionTransformerWithRLB, CLIPTextEncoder, ATMSingleHeadSeg with its TPN decoder layers and
training-only RecoveryDecoder), listed here independently of the package by official_shapes().
Tiny sizes keep it fast; one test checks the key list and shapes of the real ViT-B/16 variants on
the meta device. Each block is checked against plain-torch reference code written from the
official forward passes (seq-first nn.MultiheadAttention with the additive mask, loops over the
bridges), so a mistake in the prompt insertion, the bridge mask, the token combination, the map
fusion or the calibration shows up as a mismatch. Random weights: the labels mean nothing.
"""

import logging
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIG

from ovseg_ros import cli
from ovseg_ros.engine import ModelLoadError, Segmenter, SegmenterConfig, create_method
from ovseg_ros.engine import cliprc_checkpoint as ckpt
from ovseg_ros.engine.cliprc_net import (
    CLIPRCNet,
    calibrated_scores,
    combine_tokens,
    fuse_attention_maps,
    region_mask,
)
from ovseg_ros.engine.methods.cliprc import seen_queries
from ovseg_ros.engine.templates import get_templates
from ovseg_ros.evaluation.cli import METHOD_PROTOCOLS

#: Tiny sizes: vision width 128 (2 heads), 3 layers, 64 px native input (4 x 4 grid), 3 prompt
#: tokens, 2 x 2 bridges, embeddings 32, text width 64 (1 layer), 2 decoder layers.
TINY = dict(
    width=128, patch=16, layers=3, grid=4, tokens=3, bridges=4, embed=32, text_width=64,
    text_layers=1, context=77, vocab=49408, dec_layers=2, dec_ffn=128,
)  # fmt: skip
VOC_CONFIG = (
    "base_class = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]\n"
    "novel_class = [15, 16, 17, 18, 19]\n"
    "both_class = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]\n"
    "model = dict(type='CLIPRC', base_class=base_class, novel_class=novel_class)\n"
)
VOCAB = ["cat; kitten", "dog", "dining table", "sofa; couch"]


def official_shapes(
    width, patch, layers, grid, tokens, bridges, embed, text_width, text_layers, context, vocab,
    dec_layers, dec_ffn,
):  # fmt: skip
    """Key -> shape of an mmseg CLIP-RC state_dict, from the official module definitions."""
    shapes = {
        "backbone.conv1.weight": (width, 3, patch, patch),
        "backbone.class_embedding": (width,),
        "backbone.positional_embedding": (grid * grid + 1, width),
        "backbone.ln_pre.weight": (width,),
        "backbone.ln_pre.bias": (width,),
        "backbone.region_level_bridge": (bridges, width),
        "backbone.ln_post.weight": (width,),
        "backbone.ln_post.bias": (width,),
        "backbone.proj": (width, embed),
        "backbone.prompt_embeddings": (1, tokens, width),
        "backbone.deep_prompt_embeddings": (layers - 1, tokens, width),
        "backbone.prompt_proj.weight": (width, width),
        "backbone.prompt_proj.bias": (width,),
        "backbone.prompt_norm.weight": (width,),
        "backbone.prompt_norm.bias": (width,),
        "text_encoder.positional_embedding": (context, text_width),
        "text_encoder.text_projection": (text_width, embed),
        "text_encoder.token_embedding.weight": (vocab, text_width),
        "text_encoder.ln_final.weight": (text_width,),
        "text_encoder.ln_final.bias": (text_width,),
        "decode_head.lateral_proj.weight": (embed, 3 * embed),
        "decode_head.lateral_proj.bias": (embed,),
        "decode_head.q_proj.weight": (embed, 2 * embed),
        "decode_head.q_proj.bias": (embed,),
    }

    def clip_block(prefix, w):
        shapes.update(
            {
                f"{prefix}.attn.in_proj_weight": (3 * w, w),
                f"{prefix}.attn.in_proj_bias": (3 * w,),
                f"{prefix}.attn.out_proj.weight": (w, w),
                f"{prefix}.attn.out_proj.bias": (w,),
                f"{prefix}.ln_1.weight": (w,),
                f"{prefix}.ln_1.bias": (w,),
                f"{prefix}.mlp.c_fc.weight": (4 * w, w),
                f"{prefix}.mlp.c_fc.bias": (4 * w,),
                f"{prefix}.mlp.c_proj.weight": (w, 4 * w),
                f"{prefix}.mlp.c_proj.bias": (w,),
                f"{prefix}.ln_2.weight": (w,),
                f"{prefix}.ln_2.bias": (w,),
            }
        )

    def tpn_layer(prefix, d, ffn):  # nn.TransformerDecoderLayer minus multihead_attn, + Attention
        shapes.update(
            {
                f"{prefix}.self_attn.in_proj_weight": (3 * d, d),
                f"{prefix}.self_attn.in_proj_bias": (3 * d,),
                f"{prefix}.self_attn.out_proj.weight": (d, d),
                f"{prefix}.self_attn.out_proj.bias": (d,),
                f"{prefix}.linear1.weight": (ffn, d),
                f"{prefix}.linear1.bias": (ffn,),
                f"{prefix}.linear2.weight": (d, ffn),
                f"{prefix}.linear2.bias": (d,),
                **{f"{prefix}.norm{i}.{p}": (d,) for i in (1, 2, 3) for p in ("weight", "bias")},
                **{
                    f"{prefix}.multihead_attn.{m}.{p}": (d, d) if p == "weight" else (d,)
                    for m in ("q", "k", "v", "proj")
                    for p in ("weight", "bias")
                },
            }
        )

    for i in range(layers):
        clip_block(f"backbone.transformer.resblocks.{i}", width)
    for i in range(text_layers):
        clip_block(f"text_encoder.transformer.resblocks.{i}", text_width)
    for i in range(dec_layers):
        tpn_layer(f"decode_head.decoder_q.layers.{i}", embed, dec_ffn)
        tpn_layer(f"decode_head.decoder_v.layers.{i}", embed, dec_ffn)
    tpn_layer("decode_head.recovery_decoder.decouple_q.0", embed, 4 * embed)
    tpn_layer("decode_head.recovery_decoder.decouple_v.0", embed, 4 * embed)
    for name, out in (("q_in", 1), ("k_in", 1), ("q_out", 2), ("k_out", 1)):
        shapes[f"decode_head.recovery_decoder.linear_{name}.weight"] = (out * embed, embed)
        shapes[f"decode_head.recovery_decoder.linear_{name}.bias"] = (out * embed,)
    return shapes


def random_state(shapes, seed=0):
    """Random tensors of those shapes; norm weights near 1 so that signals stay in range."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=g) * 0.2
        if ("norm" in key or "ln_" in key) and key.endswith("weight"):
            t = 1.0 + 0.5 * t
        state[key] = t
    return state


def save_checkpoint(path, state, meta=None):
    """An mmcv checkpoint file as the released ones: {'meta': ..., 'state_dict': ...}."""
    torch.save({"meta": meta or {}, "state_dict": state}, path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_state():
    """The tiny random state dict (official keys and shapes).

    The decoder layers' last norms are scaled down so that the mask logits spread around 0
    rather than saturate the sigmoid (random weights otherwise give logits of 5 to 10).
    """
    state = random_state(official_shapes(**TINY))
    for key in state:
        if key.startswith("decode_head.decoder_") and ".norm3." in key:
            state[key] = state[key] * (0.5 if key.endswith("weight") else 0.0)
    return state


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_state):
    """A tiny VOC inductive checkpoint with the meta mmseg writes (config text, CLASSES)."""
    meta = {
        "config": VOC_CONFIG,
        "CLASSES": list(ckpt.VOC_CLASSES),
        "exp_name": "clip_rc_zero_vit-b_512x512_40k_voc_10_16.py",
    }
    return save_checkpoint(tmp_path_factory.mktemp("cliprc") / "voc_zero.pth", tiny_state, meta)


@pytest.fixture(scope="module")
def tiny_net(tiny_ckpt):
    """The tiny checkpoint's network (float32, CPU, eval)."""
    net, _ = ckpt.load_network(tiny_ckpt)
    return net.eval()


def tiny_segmenter(path, tiny_backbone, **overrides):
    """A Segmenter running cliprc from a checkpoint file on the shared tiny backbone."""
    params = {"checkpoint": path, **overrides.pop("method_params", {})}
    settings = {"method": "cliprc", "method_params": params, "vocabulary": VOCAB}
    settings["background_words"] = []  # random weights: words would win everywhere
    config = SegmenterConfig(**{**TINY_CONFIG, **settings, **overrides})
    return Segmenter(config, backbone=tiny_backbone)


# --- independent reference code (official forward passes) ----------------------------------


def ref_mask(h, w, tokens, side):
    """The official gen_attention_mask (square grid, stride h // side), written as loops."""
    n = 1 + tokens + h * w + side * side
    mask = torch.zeros(n, n)
    mask[:, -side * side :] = float("-inf")
    mask[-side * side :, :] = float("-inf")
    stride = h // side
    for i in range(side):
        for j in range(side):
            bridge = n - side * side + i * side + j
            mask[bridge, bridge] = 0
            for y in range(i * stride, (i + 1) * stride):
                for x in range(j * stride, (j + 1) * stride):
                    p = 1 + tokens + y * w + x
                    mask[bridge, p] = mask[p, bridge] = 0
    return mask


def ref_encoder(state, images, heads):
    """CLIPVisionTransformerWithRLB.forward at its native grid, seq-first with nn.MHA."""
    s = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    width = s["conv1.weight"].shape[0]
    tokens = s["prompt_embeddings"].shape[1]
    r = s["region_level_bridge"].shape[0]
    side = math.isqrt(r)
    x = F.conv2d(images, s["conv1.weight"], stride=s["conv1.weight"].shape[-1])
    b, _, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s["class_embedding"].expand(b, 1, -1), x], dim=1)
    pos = s["positional_embedding"].clone()
    pos[0] = pos[0] + s["class_embedding"]
    x = torch.cat([x + pos, s["region_level_bridge"].expand(b, -1, -1)], dim=1)

    def ln(t, name, eps=1e-5):
        return F.layer_norm(t, (width,), s[f"{name}.weight"], s[f"{name}.bias"], eps)

    def prompt(p):
        return p @ s["prompt_proj.weight"].T + s["prompt_proj.bias"]

    x = ln(x, "ln_pre")
    x = torch.cat([x[:, :1], prompt(s["prompt_embeddings"]).expand(b, -1, -1), x[:, 1:]], dim=1)
    x = x.permute(1, 0, 2)  # seq-first, as the official Transformer
    mask = ref_mask(h, w, tokens, side)
    layers = s["deep_prompt_embeddings"].shape[0] + 1
    for i in range(layers):
        if i > 0:
            deep = prompt(s["deep_prompt_embeddings"][i - 1]).expand(b, -1, -1).permute(1, 0, 2)
            x = torch.cat([x[:1], deep, x[1 + tokens :]], dim=0)
        pre = f"transformer.resblocks.{i}"
        mha = torch.nn.MultiheadAttention(width, heads)
        mha.load_state_dict(
            {k.split(".attn.", 1)[1]: v for k, v in s.items() if k.startswith(f"{pre}.attn.")}
        )
        y = ln(x, f"{pre}.ln_1")
        x = x + mha(y, y, y, need_weights=False, attn_mask=mask)[0]
        y = ln(x, f"{pre}.ln_2") @ s[f"{pre}.mlp.c_fc.weight"].T + s[f"{pre}.mlp.c_fc.bias"]
        y = y * torch.sigmoid(1.702 * y)
        x = x + y @ s[f"{pre}.mlp.c_proj.weight"].T + s[f"{pre}.mlp.c_proj.bias"]
    x = torch.cat([ln(x[:-r], "prompt_norm", 1e-6), x[-r:]], dim=0).permute(1, 0, 2)
    x = ln(x, "ln_post") @ s["proj"]
    patches = x[:, 1 + tokens : -r].reshape(b, h, w, -1).permute(0, 3, 1, 2)
    bridges = x[:, -r:].reshape(b, side, side, -1).permute(0, 3, 1, 2)
    return (
        F.normalize(patches, dim=1),
        F.normalize(x[:, 0], dim=-1),
        F.normalize(bridges, dim=1),
    )


def ref_decode_head(state, patches, cls, bridges, text, heads=8):
    """ATMSingleHeadSeg.forward (use_proj False), its combine_token and fusion_attn_map."""
    s = {k[len("decode_head.") :]: v for k, v in state.items() if k.startswith("decode_head.")}

    def lin(t, name):
        return t @ s[f"{name}.weight"].T + s[f"{name}.bias"]

    def attention(x, mem, pre):  # utils.Attention: q, k, v with bias, softmax(q k^T * scale)
        b, nq, c = x.shape
        q = lin(x, f"{pre}.q").reshape(b, nq, heads, -1).permute(0, 2, 1, 3)
        k = lin(mem, f"{pre}.k").reshape(b, -1, heads, c // heads).permute(0, 2, 1, 3)
        v = lin(mem, f"{pre}.v").reshape(b, -1, heads, c // heads).permute(0, 2, 1, 3)
        a = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
        return lin((a @ v).transpose(1, 2).reshape(b, nq, c), f"{pre}.proj")

    def layer(x, mem, pre):  # TPN_DecoderLayer.forward (ReLU, post-norm)
        d = x.shape[-1]
        x = F.layer_norm(x + attention(x, mem, f"{pre}.multihead_attn"), (d,),
                         s[f"{pre}.norm2.weight"], s[f"{pre}.norm2.bias"])  # fmt: skip
        y = lin(F.relu(lin(x, f"{pre}.linear1")), f"{pre}.linear2")
        return F.layer_norm(x + y, (d,), s[f"{pre}.norm3.weight"], s[f"{pre}.norm3.bias"])

    b, d, h, w = patches.shape
    c = text.shape[0]
    rl = bridges.reshape(b, d, -1).transpose(1, 2)
    rn = rl.shape[1]
    q = torch.zeros(b, rn * c, 2 * d)
    for i in range(rn):  # combine_token, bridge-major
        for j in range(c):
            q[:, i * c + j, :d] = (rl[:, i] + cls) * text[j]
            q[:, i * c + j, d:] = text[j]
    q = lin(q, "q_proj")
    up = F.interpolate(bridges, size=(h, w), mode="bilinear", align_corners=False)
    lateral = torch.cat(
        [up.reshape(b, d, -1).transpose(1, 2), cls[:, None].expand(b, h * w, d),
         patches.flatten(2).transpose(1, 2)], dim=-1,
    )  # fmt: skip
    lateral = lin(lateral, "lateral_proj")
    layers = 1 + max(int(k.split(".")[2]) for k in s if k.startswith("decoder_q.layers."))
    for i in range(layers):
        q, lateral = (
            layer(q, lateral, f"decoder_q.layers.{i}"),
            layer(lateral, q, f"decoder_v.layers.{i}"),
        )
    attn = (q @ lateral.transpose(-2, -1)).transpose(-1, -2)
    attn = attn.transpose(1, 2).reshape(b, -1, h, w)
    fused = attn[:, :c].clone()
    for i in range(1, rn):  # fusion_attn_map
        fused += attn[:, i * c : (i + 1) * c]
    return fused / (attn.shape[1] / c)


# --- checkpoint: keys, shapes, loading --------------------------------------------------------


@pytest.mark.parametrize("dataset", ["voc", "coco_stuff"])
def test_released_vitb16_key_list_and_shapes(dataset):
    tokens = {"voc": 10, "coco_stuff": 100}[dataset]
    shapes = official_shapes(768, 16, 12, 32, tokens, 16, 512, 512, 12, 77, 49408, 3, 2048)
    state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    arch = ckpt.arch_from_state(state, "x")
    assert arch == ckpt.official_arch(dataset)
    assert (arch.vision_heads, arch.text_heads, arch.bridge_side) == (12, 8, 4)
    with torch.device("meta"):
        net = CLIPRCNet(arch)
    mine = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert all(shapes[k] == v for k, v in mine.items())
    unused = set(shapes) - set(mine)
    assert unused and all(
        ".self_attn." in k or ".norm1." in k or ".recovery_decoder." in k for k in unused
    )


def test_tiny_checkpoint_loads_every_weight(tiny_ckpt, tiny_state, tiny_net):
    arch = tiny_net.arch
    assert (arch.width, arch.layers, arch.grid, arch.prompt_tokens, arch.bridges) == (
        128, 3, 4, 3, 4,
    )  # fmt: skip
    for key, value in tiny_net.state_dict().items():
        torch.testing.assert_close(value, tiny_state[key], rtol=0, atol=0)


def test_round_trip(tmp_path, tiny_net):
    path = save_checkpoint(tmp_path / "again.pth", tiny_net.state_dict())
    again, meta = ckpt.load_network(path)
    images = torch.randn(1, 3, 64, 96)
    text = F.normalize(torch.randn(3, 32), dim=-1)
    with torch.inference_mode():
        torch.testing.assert_close(again.eval()(images, text), tiny_net(images, text))
    assert meta == {}


# --- blocks against the official forward ------------------------------------------------------


@pytest.mark.parametrize(("grid", "tokens", "side"), [(4, 3, 2), (8, 2, 4), (32, 10, 4)])
def test_region_mask_is_the_official_one_on_divisible_grids(grid, tokens, side):
    torch.testing.assert_close(
        region_mask((grid, grid), tokens, side), ref_mask(grid, grid, tokens, side)
    )


def test_region_mask_on_other_grids_gives_every_patch_one_bridge():
    h, w, tokens, side = 7, 10, 2, 4
    mask = region_mask((h, w), tokens, side)
    n = 1 + tokens + h * w + side * side
    bridges = mask[1 + tokens : n - side * side, n - side * side :]
    assert ((bridges == 0).sum(dim=1) == 1).all()  # each patch sees exactly its bridge
    assert (mask[n - side * side :].diagonal(offset=n - side * side) == 0).all()
    assert torch.isinf(mask[: 1 + tokens, n - side * side :]).all()  # CLS, prompts: no bridge


def test_image_encoder_prompts_bridges_and_outputs_match_the_official_forward(tiny_state, tiny_net):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        mine = tiny_net.backbone(images)
        tokens, grid = tiny_net.backbone.tokens(images)
    ref = ref_encoder(tiny_state, images, heads=2)
    for a, b in zip(mine, ref, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # Prompt insertion: [CLS, prompt_proj(prompts), patches, bridges] after ln_pre (not prompts).
    proj = tiny_state["backbone.prompt_proj.weight"]
    prompts = tiny_state["backbone.prompt_embeddings"][0] @ proj.T
    prompts = prompts + tiny_state["backbone.prompt_proj.bias"]
    assert grid == (4, 4) and tokens.shape == (2, 1 + 3 + 16 + 4, 128)
    torch.testing.assert_close(tokens[0, 1:4], prompts)
    ln_pre = (tiny_state["backbone.ln_pre.weight"], tiny_state["backbone.ln_pre.bias"])
    bridges = F.layer_norm(tiny_state["backbone.region_level_bridge"], (128,), *ln_pre)
    torch.testing.assert_close(tokens[0, -4:], bridges)


def test_positions_resize_bilinearly_and_add_the_class_embedding_twice(tiny_state, tiny_net):
    pos = tiny_state["backbone.positional_embedding"]
    table = tiny_net.backbone.positions((6, 8))
    grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 8), mode="bilinear").permute(0, 2, 3, 1).reshape(48, -1)
    torch.testing.assert_close(table[1:], ref)
    torch.testing.assert_close(table[0], pos[0] + tiny_state["backbone.class_embedding"])


def test_combine_tokens_and_attention_map_fusion():
    g = torch.Generator().manual_seed(2)
    b, e, side, c = 2, 6, 2, 3
    bridges, cls = torch.randn(b, e, side, side, generator=g), torch.randn(b, e, generator=g)
    text = torch.randn(c, e, generator=g)
    q = combine_tokens(bridges, cls, text)
    assert q.shape == (b, side * side * c, 2 * e)
    for i in range(side * side):
        region = bridges[:, :, i // side, i % side]
        for j in range(c):
            torch.testing.assert_close(q[:, i * c + j, :e], (region + cls) * text[j])
            torch.testing.assert_close(q[:, i * c + j, e:], text[j].expand(b, e))
    maps = torch.randn(b, side * side * c, 5, 7, generator=g)
    expected = sum(maps[:, i * c : (i + 1) * c] for i in range(side * side)) / (side * side)
    torch.testing.assert_close(fuse_attention_maps(maps, c), expected)


def test_decode_head_matches_the_official_forward(tiny_state, tiny_net):
    g = torch.Generator().manual_seed(3)
    patches = F.normalize(torch.randn(2, 32, 3, 5, generator=g), dim=1)
    cls = F.normalize(torch.randn(2, 32, generator=g), dim=-1)
    bridges = F.normalize(torch.randn(2, 32, 2, 2, generator=g), dim=1)
    text = F.normalize(torch.randn(4, 32, generator=g), dim=-1)
    with torch.inference_mode():
        mine = tiny_net.decode_head(patches, cls, bridges, text)
    ref = ref_decode_head(tiny_state, patches, cls, bridges, text)
    assert mine.shape == (2, 4, 3, 5)
    torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)


def test_calibration_lowers_training_classes_only():
    logits = torch.randn(2, 3, 4, 5)
    seen = torch.tensor([True, False, True])
    out = calibrated_scores(logits, seen, 0.1)
    expected = torch.sigmoid(logits) - 0.1 * seen.float().view(-1, 1, 1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(calibrated_scores(logits[0], seen, 0.0), torch.sigmoid(logits[0]))


def test_training_classes_match_names_and_synonyms(tiny_backbone):
    vocab = Segmenter(
        SegmenterConfig(
            **TINY_CONFIG, vocabulary=["Dining Table", "tv; TV-Monitor", "lamp", "sofa"],
            background_words=["cat", "wall"],
        ),
        backbone=tiny_backbone,
    ).vocabulary  # fmt: skip
    seen = seen_queries(vocab, ckpt.VOC_CLASSES[:15] + ("tvmonitor",))
    # diningtable, both synonyms of tv (tvmonitor), not lamp nor sofa (unseen), cat but not wall
    assert seen.tolist() == [True, True, True, False, False, True, False]


# --- setting ------------------------------------------------------------------------------------


def test_setting_from_the_checkpoint_meta(tiny_ckpt, tiny_net):
    _, meta = ckpt.read_checkpoint(tiny_ckpt)
    s = ckpt.detect_setting(meta, tiny_ckpt, tiny_net.arch)
    assert (s.name, s.source) == ("voc_inductive", "checkpoint meta")
    assert s.training == ckpt.VOC_CLASSES[:15]
    st = {**meta, "config": VOC_CONFIG + "model = dict(self_training=True)\n"}
    assert ckpt.detect_setting(st, "", tiny_net.arch).mode == "transductive"
    fully = {"config": "novel_class = []\nboth_class = [" + ", ".join(map(str, range(171))) + "]"}
    s = ckpt.detect_setting(fully, "", tiny_net.arch)
    assert s.name == "coco_stuff_fully" and len(s.training) == 171


def test_setting_from_the_file_name_prompt_count_or_parameter(tiny_net, caplog):
    arch = ckpt.official_arch("coco_stuff")
    s = ckpt.detect_setting(
        {}, "/x/clip_rc_zero_vit-b_512x512_40k_coco_stuff164k_100_16_st.pth", arch
    )
    assert (s.name, s.source) == ("coco_stuff_transductive", "file name")
    assert len(s.training) == 171 - 15 and "tree" not in s.training
    assert ckpt.detect_setting({}, "/x/fully.pth", arch).name == "coco_stuff_fully"
    s = ckpt.detect_setting({}, "/x/model.pth", arch, "voc_transductive")
    assert (s.name, s.source) == ("voc_transductive", "parameter")
    with caplog.at_level(logging.WARNING):
        s = ckpt.detect_setting({}, "/x/model.pth", arch)
    assert s.name == "coco_stuff_inductive" and "setting" in caplog.text


# --- wrong files -----------------------------------------------------------------------------


def test_wrong_files_get_one_sentence(tmp_path, tiny_state):
    def error(path):
        with pytest.raises(ModelLoadError) as caught:
            ckpt.load_network(str(path))
        message = str(caught.value)
        assert "\n" not in message and ". " not in message.replace("e.g. ", ""), message
        return message

    assert "not a file" in error(tmp_path / "missing.pth")
    assert "github.com/uyzhang/CLIP-RC" in error(tmp_path / "missing.pth")
    (tmp_path / "text.pth").write_text("hello")
    assert "not a readable PyTorch checkpoint" in error(tmp_path / "text.pth")
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    assert "not a CLIP-RC checkpoint" in error(tmp_path / "other.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    assert "not a CLIP-RC checkpoint" in error(tmp_path / "list.pth")
    partial = {k: v for k, v in tiny_state.items() if "decoder_v.layers.1.linear2" not in k}
    message = error(save_checkpoint(tmp_path / "partial.pth", partial))
    assert "lacks 2 CLIP-RC weight(s)" in message and "decoder_v.layers.1.linear2" in message
    bad = dict(tiny_state, **{"decode_head.q_proj.weight": torch.zeros(32, 63)})
    message = error(save_checkpoint(tmp_path / "bad.pth", bad))
    assert "decode_head.q_proj.weight of shape (32, 63)" in message and "(32, 64)" in message
    good = save_checkpoint(tmp_path / "cut.pth", tiny_state)
    data = open(good, "rb").read()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    assert "not a readable PyTorch checkpoint" in error(tmp_path / "cut.pth")


def test_no_checkpoint_refuses_with_where_to_download(vitb16_state_free_backbone):
    method = create_method("cliprc")
    with pytest.raises(ModelLoadError, match="method_params.cliprc.checkpoint") as caught:
        method.prepare(vitb16_state_free_backbone)
    assert "Pretrained models" in str(caught.value) and "\n" not in str(caught.value)


@pytest.fixture
def vitb16_state_free_backbone(tiny_backbone):
    """A backbone that claims pretrained weights (so no random CLIP-RC fallback applies)."""

    class Pretrained:
        device, dtype, patch_size = tiny_backbone.device, tiny_backbone.dtype, 16
        source = "pretrained openai"

    return Pretrained()


def test_random_network_with_a_loud_warning(tiny_backbone, monkeypatch, caplog):
    tiny = ckpt.arch_from_state(random_state(official_shapes(**TINY)), "x")
    monkeypatch.setattr(ckpt, "official_arch", lambda dataset: tiny)  # ViT-B/16 is slow to build
    for params in ({"checkpoint": "none"}, {}):  # explicit, or model.pretrained none
        method = create_method("cliprc", params)
        with caplog.at_level(logging.WARNING):
            method.prepare(tiny_backbone)
        assert "RANDOM CLIP-RC network" in caplog.text
        assert method.loaded and method.setting.name == "voc_inductive"
        method.release()
        assert not method.loaded


# --- through the engine ------------------------------------------------------------------------


def test_parameters_and_registry():
    p = create_method("cliprc").params
    assert (p.checkpoint, p.setting, p.calibration, p.templates) == ("", "auto", -1.0, "auto")
    for bad in ({"setting": "voc"}, {"templates": "x"}, {"logit_scale": 0}):
        with pytest.raises(ValueError, match="cliprc"):
            create_method("cliprc", bad)
    assert get_templates("cliprc_single") == ("a photo of a {}",)
    assert len(get_templates("cliprc_multi")) == 15
    assert METHOD_PROTOCOLS["cliprc"]["voc20"] == {
        "short_side": 512, "mode": "slide", "crop": 512, "stride": 426, "templates": "single",
    }  # fmt: skip


def test_segmenter_whole_and_slide(tiny_ckpt, tiny_backbone, tiny_net):
    seg = tiny_segmenter(tiny_ckpt, tiny_backbone, short_side=64)
    method = seg.method
    assert method.setting.name == "voc_inductive" and method.calibration() == 0.1
    assert method.templates() == "cliprc_single"
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), np.uint8)
    result = seg.segment(image)
    assert result.labels.shape == (60, 90) and result.timings["cliprc"] > 0
    logits, vocab = seg.dense_logits(image)
    assert logits.shape == (len(vocab.queries), 64, 96)

    # Whole mode: the logits are the network's on the CLIP-RC-normalised input, with the text
    # of the checkpoint's encoder; labels are the official rule's argmax.
    emb, seen = method.text_for(vocab)
    expected_text = method.network(tiny_backbone).text.encode(vocab.queries, "cliprc_single")
    torch.testing.assert_close(emb, expected_text)
    rgb = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    rgb = F.interpolate(rgb, size=(64, 96), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(ckpt_mean()).view(1, 3, 1, 1)
    std = torch.tensor(ckpt_std()).view(1, 3, 1, 1)
    with torch.inference_mode():
        grid = tiny_net((rgb - mean) / std, emb)
        raw = method.logits(tiny_backbone, tiny_backbone.normalize(rgb), vocab)
    torch.testing.assert_close(raw, grid, atol=1e-4, rtol=1e-4)

    # Slide mode (crop 64, stride 48 on 64 x 96: two windows) against the official slide rule:
    # per window sigmoid - 0.1 on training classes, windows averaged, resized, argmax.
    seg.update(mode="slide", crop=64, stride=48)
    result = seg.segment(image)
    maps, _ = seg.dense_logits(image)
    with torch.inference_mode():
        scores = torch.zeros(len(vocab.queries), 64, 96)
        for x0 in (0, 32):
            crop = tiny_net((rgb[..., x0 : x0 + 64] - mean) / std, emb)
            up = F.interpolate(crop, size=(64, 64), mode="bilinear", align_corners=False)
            scores[:, :, x0 : x0 + 64] += calibrated_scores(up, seen, 0.1)[0]
        scores[:, :, 32:64] /= 2
    assert seen.tolist() == [True, True, True, True, False, False]  # sofa is unseen in VOC
    torch.testing.assert_close(maps, 10.0 * scores, atol=1e-4, rtol=1e-4)  # logit_scale 10
    scores = F.interpolate(scores[None], size=(60, 90), mode="bilinear")[0]
    labels = vocab.query_class[scores.argmax(dim=0)].numpy()
    labels[labels >= vocab.num_classes] = 255
    assert (result.labels == labels).mean() > 0.999
    # logit_scale changes the confidence, not the labels.
    seg.set_method("cliprc", {"checkpoint": tiny_ckpt, "logit_scale": 3.0})
    again = seg.segment(image)
    assert (again.labels == result.labels).mean() > 0.999
    assert again.confidence.mean() < result.confidence.mean()


def ckpt_mean():
    """The configs' img_norm_cfg mean on 0..1."""
    return [123.675 / 255, 116.28 / 255, 103.53 / 255]


def ckpt_std():
    """The configs' img_norm_cfg std on 0..1."""
    return [58.395 / 255, 57.12 / 255, 57.375 / 255]


def test_network_shared_and_released(tiny_ckpt, tiny_backbone):
    seg = tiny_segmenter(tiny_ckpt, tiny_backbone, short_side=64)
    first = seg.method
    loaded = first.network(tiny_backbone)
    seg.set_method("cliprc", {"checkpoint": tiny_ckpt, "calibration": 0.0})
    assert seg.method.network(tiny_backbone) is loaded  # a parameter change reuses the network
    assert not first.loaded  # the old instance let go of it
    assert seg.method.calibration() == 0.0
    seg.set_method("naclip")
    import gc
    import weakref

    ref = weakref.ref(loaded)
    del loaded
    gc.collect()
    assert ref() is None  # freed with its last user


def test_templates_and_training_classes_overrides(tiny_ckpt, tiny_backbone):
    seg = tiny_segmenter(
        tiny_ckpt, tiny_backbone, short_side=64,
        method_params={"templates": "cliprc_multi", "training_classes": "dog, sofa",
                       "setting": "voc_transductive"},
    )  # fmt: skip
    method = seg.method
    assert method.templates() == "cliprc_multi" and method.calibration() == 0.0
    _, seen = method.text_for(seg.vocabulary)
    assert seen.tolist()[:5] == [False, False, True, False, True]  # cat kitten dog table sofa
    seg.set_method("cliprc", {"checkpoint": tiny_ckpt, "training_classes": "none"})
    assert not seg.method.text_for(seg.vocabulary)[1].any()


def test_sample_image_end_to_end_and_cli(tiny_ckpt, tiny_backbone, shared_data, tmp_path):
    path = shared_data / "voc2012_val_samples" / "0_image.png"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    seg = tiny_segmenter(tiny_ckpt, tiny_backbone, short_side=96, mode="slide", crop=64, stride=48)
    result = seg.segment(image)
    assert result.labels.shape == image.shape[:2]
    assert set(np.unique(result.labels)) <= set(range(len(VOCAB))) | {255}
    args = ["segment", str(path), "--method", "cliprc", "--param", f"checkpoint={tiny_ckpt}"]
    args += ["--model", "ovseg-tiny", "--pretrained", "none", "--templates", "single"]
    args += ["--text-cache-dir", "off", "-q", "--short-side", "64", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    labels = cv2.imread(str(tmp_path / "0_image_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == image.shape[:2]
