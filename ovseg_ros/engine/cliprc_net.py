"""CLIP-RC's network for inference (Zhang et al., CVPR 2024), in plain PyTorch.

Written from the official code (uyzhang/CLIP-RC: models/backbone/img_encoder_rlb.py,
text_encoder.py, models/decode_heads/decode_seg.py and utils.py); module and parameter names
mirror it, so the released mmseg `state_dict` (`backbone.*`, `text_encoder.*`, `decode_head.*`)
loads into `CLIPRCNet` key for key. Only the test path is here: no dropout, drop-path, losses or
the training-only recovery decoder.

Image encoder (`backbone`): CLIP's ViT with
- tokens [CLS, T prompt tokens, h*w patches, R region-level bridge tokens]. The CLS token is
  class_embedding + (pos_0 + class_embedding): the official code adds the class embedding twice.
  The patch positions are the checkpoint's table (trained at 512 px: a 32 x 32 grid) resized
  bilinearly to h x w. The bridge tokens (a sqrt(R) x sqrt(R) layout) get no position; ln_pre
  runs on everything but the prompts, which are inserted after it as prompt_proj(prompt).
- deep prompts (VPT): before block i > 0 the prompt tokens are replaced by
  prompt_proj(deep_prompt_embeddings[i - 1]).
- an additive attention mask (region_mask): nobody but a bridge token's own region sees it; a
  bridge token sees only its region's patches and itself.
- after the blocks prompt_norm on all tokens but the bridge ones, then ln_post and proj; CLS,
  patch and bridge embeddings are L2-normalised.

Decode head (`decode_head`, ATM-style, use_proj False): queries combine_tokens(bridge, CLS,
text) -> q_proj; the patch tokens concatenated with the bilinearly upsampled bridge map and the
CLS token -> lateral_proj; `num_layers` paired decoder layers update queries (attending to the
patches) and patches (attending to the queries) from the same previous pair; the masks
q . patch^T of the R x C queries are averaged over the bridges (fuse_attention_maps).

Text encoder (`text_encoder`): CLIP's text transformer (frozen in training), built as open_clip's
TextTransformer, whose parameter names are the same.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: The decode head's attention heads: fixed by the configs (num_heads=8), not in the weights.
DECODER_HEADS = 8


@dataclass(frozen=True)
class CLIPRCArch:
    """Sizes of a CLIP-RC network (all readable from a checkpoint but DECODER_HEADS)."""

    width: int = 768  # vision transformer width
    patch: int = 16
    layers: int = 12
    grid: int = 32  # native patch grid of the positional table (input_resolution / patch)
    prompt_tokens: int = 10  # VPT tokens per layer (VOC configs 10, COCO-Stuff 100)
    bridges: int = 16  # region-level bridge tokens (region_level_bridge_size), a square
    embed_dim: int = 512  # output_dim of the image encoder = text embedding = decoder width
    text_width: int = 512
    text_layers: int = 12
    context: int = 77
    vocab_size: int = 49408
    decoder_layers: int = 3
    decoder_ffn: int = 2048

    @property
    def vision_heads(self) -> int:
        """CLIP's convention: 64-wide heads."""
        return max(1, self.width // 64)

    @property
    def text_heads(self) -> int:
        """CLIP's convention: 64-wide heads."""
        return max(1, self.text_width // 64)

    @property
    def bridge_side(self) -> int:
        """The bridges' layout is bridge_side x bridge_side."""
        return math.isqrt(self.bridges)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (CLIP's, for fp16/bf16 inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise in float32, return in the input dtype."""
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        out = F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation CLIP's OpenAI weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the activation."""
        return x * torch.sigmoid(1.702 * x)


class ResidualBlock(nn.Module):
    """CLIP's pre-norm block with an additive attention mask (names as the official code)."""

    def __init__(self, width: int, heads: int) -> None:
        """nn.MultiheadAttention holds the weights under CLIP's names; the maths is below."""
        super().__init__()
        self.heads = heads
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, width * 4)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(width * 4, width)),
                ]
            )
        )
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x + attn(ln_1 x) with the additive mask, then x + MLP(ln_2 x); x is (B, N, D)."""
        b, n, _ = x.shape
        qkv = F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.attn.out_proj(out.transpose(1, 2).reshape(b, n, -1))
        return x + self.mlp(self.ln_2(x))


class _Blocks(nn.Module):
    """Holds the blocks as `resblocks` (the official key path transformer.resblocks.N)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        """Create the blocks."""
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads) for _ in range(layers))


def region_bounds(size: int, side: int) -> list[tuple[int, int]]:
    """[start, end) of each of `side` regions along an axis of `size` patches.

    floor(i * size / side): at the released 32-patch grid with 4 x 4 bridges these are the
    official stride-8 regions; on other grids every patch still belongs to one region.
    """
    return [(i * size // side, (i + 1) * size // side) for i in range(side)]


def region_mask(grid: tuple[int, int], prompt_tokens: int, side: int) -> torch.Tensor:
    """(N, N) additive float mask for [CLS, prompts, h*w patches, side^2 bridges] (0 or -inf).

    Everything attends to everything except: no token attends to a bridge and a bridge attends
    to nothing, but for a bridge and the patches of its region (both ways) and the bridge itself.
    """
    h, w = grid
    first = 1 + prompt_tokens  # index of the first patch token
    bridges = side * side
    n = first + h * w + bridges
    mask = torch.zeros(n, n)
    mask[:, n - bridges :] = float("-inf")
    mask[n - bridges :, :] = float("-inf")
    patch_index = torch.arange(h * w).view(h, w) + first
    for i, (y0, y1) in enumerate(region_bounds(h, side)):
        for j, (x0, x1) in enumerate(region_bounds(w, side)):
            bridge = n - bridges + i * side + j
            members = patch_index[y0:y1, x0:x1].flatten()
            mask[bridge, members] = 0.0
            mask[members, bridge] = 0.0
            mask[bridge, bridge] = 0.0
    return mask


class ImageEncoder(nn.Module):
    """CLIPVisionTransformerWithRLB's test path (module docstring)."""

    def __init__(self, arch: CLIPRCArch) -> None:
        """Parameters under the official names; random values until a checkpoint loads."""
        super().__init__()
        self.arch = arch
        width, scale = arch.width, arch.width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=arch.patch, stride=arch.patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(arch.grid**2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.region_level_bridge = nn.Parameter(scale * torch.randn(arch.bridges, width))
        self.transformer = _Blocks(width, arch.layers, arch.vision_heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, arch.embed_dim))
        val = math.sqrt(6.0 / float(3 * arch.patch * arch.patch + width))  # the official init
        self.prompt_embeddings = nn.Parameter(
            torch.empty(1, arch.prompt_tokens, width).uniform_(-val, val)
        )
        self.deep_prompt_embeddings = nn.Parameter(
            torch.empty(arch.layers - 1, arch.prompt_tokens, width).uniform_(-val, val)
        )
        self.prompt_proj = nn.Linear(width, width)
        self.prompt_norm = LayerNorm(width, eps=1e-6)
        self._cache: dict[tuple, torch.Tensor] = {}

    def _cached(self, key: tuple, make) -> torch.Tensor:
        """A per-grid table (positions, mask), computed once per grid, device and dtype."""
        table = self._cache.get(key)
        if table is None:
            table = make()
            self._cache[key] = table
        return table

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1 + h*w, D): [pos_0 + class_embedding, patch table resized bilinearly to grid]."""
        pos = self.positional_embedding

        def make() -> torch.Tensor:
            g = self.arch.grid
            patches = pos[1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
            if tuple(grid) != (g, g):
                patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
            patches = patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
            cls = pos[:1].float() + self.class_embedding.float()
            return torch.cat([cls, patches]).to(pos.dtype)

        return self._cached(("pos", tuple(grid), pos.device, pos.dtype), make)

    def mask(self, grid: tuple[int, int]) -> torch.Tensor:
        """The region mask of a grid, on the weights' device and dtype."""
        ref = self.positional_embedding
        a = self.arch

        def make() -> torch.Tensor:
            return region_mask(grid, a.prompt_tokens, a.bridge_side).to(ref.device, ref.dtype)

        return self._cached(("mask", tuple(grid), ref.device, ref.dtype), make)

    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The first block's input [CLS, prompts, patches, bridges] of normalised images."""
        x = self.conv1(images.to(self.conv1.weight.dtype))
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(b, 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positions((h, w))
        x = torch.cat([x, self.region_level_bridge.to(x.dtype).expand(b, -1, -1)], dim=1)
        x = self.ln_pre(x)
        prompts = self.prompt_proj(self.prompt_embeddings).expand(b, -1, -1)
        return torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1), (h, w)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(patches (B, E, h, w), CLS (B, E), bridges (B, E, s, s)), each L2-normalised."""
        x, grid = self.tokens(images)
        b = x.shape[0]
        t, r = self.arch.prompt_tokens, self.arch.bridges
        mask = self.mask(grid)
        for i, block in enumerate(self.transformer.resblocks):
            if i > 0:
                deep = self.prompt_proj(self.deep_prompt_embeddings[i - 1]).expand(b, -1, -1)
                x = torch.cat([x[:, :1], deep, x[:, 1 + t :]], dim=1)
            x = block(x, mask)
        x = torch.cat([self.prompt_norm(x[:, :-r]), x[:, -r:]], dim=1)
        x = self.ln_post(x) @ self.proj
        x = F.normalize(x.float(), dim=-1)
        side = self.arch.bridge_side
        patches = x[:, 1 + t : -r].transpose(1, 2).reshape(b, -1, *grid)
        bridges = x[:, -r:].transpose(1, 2).reshape(b, -1, side, side)
        return patches, x[:, 0], bridges


class CrossAttention(nn.Module):
    """The decoder layers' attention (ATM's Attention: separate q, k, v with bias, proj)."""

    def __init__(self, dim: int, heads: int) -> None:
        """Linear maps under the official names."""
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """proj(concat_heads(softmax(q k^T / sqrt(d)) v)) of (B, Nq, D) over (B, Nk, D)."""
        b, nq, d = x.shape
        nk = memory.shape[1]
        q = self.q(x).view(b, nq, self.heads, -1).transpose(1, 2)
        k = self.k(memory).view(b, nk, self.heads, -1).transpose(1, 2)
        v = self.v(memory).view(b, nk, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, nq, d))


class DecoderLayer(nn.Module):
    """TPN_DecoderLayer's forward: cross-attention, norm2, ReLU FFN, norm3 (post-norm).

    Its unused self-attention and norm1 (in the checkpoints) are not built.
    """

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        """Layers under the official names."""
        super().__init__()
        self.multihead_attn = CrossAttention(dim, heads)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x attends to memory; residual, norm, feed-forward, residual, norm."""
        x = self.norm2(x + self.multihead_attn(x, memory))
        return self.norm3(x + self.linear2(F.relu(self.linear1(x))))


class _Layers(nn.Module):
    """Holds decoder layers as `layers` (the official key path decoder_q.layers.N)."""

    def __init__(self, count: int, dim: int, heads: int, ffn: int) -> None:
        """Create the layers."""
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn) for _ in range(count))


def combine_tokens(bridges: torch.Tensor, cls: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, R*C, 2E) queries [(bridge_l + CLS) * text_c, text_c], bridge-major (index l*C + c).

    bridges (B, E, s, s), cls (B, E), text (C, E).
    """
    b, e = cls.shape
    regions = bridges.reshape(b, e, -1).transpose(1, 2) + cls[:, None]  # (B, R, E)
    r, c = regions.shape[1], text.shape[0]
    mixed = regions[:, :, None, :] * text[None, None]  # (B, R, C, E)
    plain = text[None, None].expand(b, r, c, e)
    return torch.cat([mixed, plain], dim=-1).reshape(b, r * c, 2 * e)


def fuse_attention_maps(maps: torch.Tensor, classes: int) -> torch.Tensor:
    """(B, R*C, h, w) bridge-major per-query maps -> (B, C, h, w): the mean over the R bridges."""
    b, n, h, w = maps.shape
    return maps.view(b, n // classes, classes, h, w).mean(dim=1)


class DecodeHead(nn.Module):
    """ATMSingleHeadSeg's test path with use_proj False (module docstring)."""

    def __init__(self, arch: CLIPRCArch) -> None:
        """Layers under the official names."""
        super().__init__()
        dim = arch.embed_dim
        self.decoder_q = _Layers(arch.decoder_layers, dim, DECODER_HEADS, arch.decoder_ffn)
        self.decoder_v = _Layers(arch.decoder_layers, dim, DECODER_HEADS, arch.decoder_ffn)
        self.lateral_proj = nn.Linear(dim * 3, dim)
        self.q_proj = nn.Linear(dim * 2, dim)

    def forward(
        self, patches: torch.Tensor, cls: torch.Tensor, bridges: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        """(B, C, h, w) mask logits of the C text embeddings (C, E) on the patch grid."""
        b, e, h, w = patches.shape
        lateral = patches.flatten(2).transpose(1, 2)  # (B, hw, E)
        q = self.q_proj(combine_tokens(bridges, cls, text))
        up = F.interpolate(bridges, size=(h, w), mode="bilinear", align_corners=False)
        up = up.flatten(2).transpose(1, 2)
        lateral = self.lateral_proj(torch.cat([up, cls[:, None].expand(b, h * w, e), lateral], -1))
        for layer_q, layer_v in zip(self.decoder_q.layers, self.decoder_v.layers, strict=True):
            q, lateral = layer_q(q, lateral), layer_v(lateral, q)  # both from the previous pair
        maps = (q @ lateral.transpose(1, 2)).view(b, -1, h, w)
        return fuse_attention_maps(maps, text.shape[0])


def build_text_encoder(arch: CLIPRCArch) -> nn.Module:
    """CLIP's text transformer (QuickGELU) as open_clip's TextTransformer: the official names."""
    from open_clip.transformer import TextTransformer

    return TextTransformer(
        context_length=arch.context,
        vocab_size=arch.vocab_size,
        width=arch.text_width,
        heads=arch.text_heads,
        layers=arch.text_layers,
        output_dim=arch.embed_dim,
        act_layer=QuickGELU,
    )


class CLIPRCNet(nn.Module):
    """The three parts under the mmseg prefixes: backbone, text_encoder, decode_head."""

    def __init__(self, arch: CLIPRCArch) -> None:
        """Build a network of the given sizes (random weights until a state dict loads)."""
        super().__init__()
        self.arch = arch
        self.backbone = ImageEncoder(arch)
        self.text_encoder = build_text_encoder(arch)
        self.decode_head = DecodeHead(arch)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) float32 mask logits (before the sigmoid) of (B, 3, H, W) images.

        images are normalised as the configs do (ImageNet mean/std on RGB in 0..255), H and W
        multiples of the patch; text (C, E) L2-normalised class embeddings.
        """
        patches, cls, bridges = self.backbone(images)
        head_dtype = self.decode_head.q_proj.weight.dtype
        return self.decode_head(
            patches.to(head_dtype), cls.to(head_dtype), bridges.to(head_dtype), text.to(head_dtype)
        ).float()


def calibrated_scores(logits: torch.Tensor, seen: torch.Tensor, weight: float) -> torch.Tensor:
    """The official test rule: sigmoid(logits) - weight on the training (seen) classes.

    logits (..., C, H, W); seen a (C,) bool mask of the classes to lower.
    """
    scores = torch.sigmoid(logits.float())
    if weight:
        scores = scores - (weight * seen.to(scores.device, scores.dtype)).view(-1, 1, 1)
    return scores
