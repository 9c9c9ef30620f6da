"""The dense ViT block runner (Backbone) over an open_clip model, and its positional tables.

The model itself is loaded by clip_loading (weights files and their fit: clip_weights);
build_backbone loads it and wraps it for the chosen device, precision and fast paths.

Positional embeddings. Off the native grid the (gh x gw) patch table is resampled the way the
official codes of SCLIP, ClearCLIP, NACLIP, ProxyCLIP and CLIPtrase (and DINO's) do it:
``F.interpolate(table, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode='bicubic')`` with the
default ``recompute_scale_factor`` (the kernel samples with that scale factor, source coordinate
``(i + 0.5) * gh / (h + 0.1) - 0.5``, not with ``gh / h``); the output size is
``floor(gh * (h + 0.1) / gh) = h``, the +0.1 only guarding that floor. At the native grid the
model's table is used as it is. This differs from ``F.interpolate(size=(h, w))`` by up to 0.065
cells at the far edge. CLIPer's official code resizes its table bilinearly by size and rounds it
through fp16; ``positional_embedding(h, w, style="bilinear_fp16")`` gives that table (CLIPer's
default). Tables are cached per grid and style. One deliberate difference: the CLIP codes keep
the unresized table for any grid with the native number of patches (e.g. 7 x 28 for 14 x 14); the
engine resamples every grid but the native one.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .clip_loading import load_clip, resolve_device, resolve_dtype
from .clip_weights import ModelLoadError

#: Added to the target grid by the official codes before dividing by the native grid: the
#: scale factor whose floor(native * scale) is the target size (see the module docstring).
POS_OFFSET = 0.1
#: Positional-table styles: the official bicubic sampling, CLIPer's bilinear table in fp16, and
#: the antialiased bicubic resize by size (DINOv2 with registers, timm).
POS_STYLES = ("bicubic", "bilinear_fp16", "bicubic_antialias")


def resample_positions(grid: torch.Tensor, size: tuple[int, int], style: str) -> torch.Tensor:
    """(1, D, gh, gw) float positional grid -> (1, D, h, w) with the official sampling of style.

    'bicubic': scale factor ((h + 0.1) / gh, (w + 0.1) / gw), used by the kernel as given;
    'bilinear_fp16': bilinear by size (the fp16 rounding is the caller's); 'bicubic_antialias':
    antialiased bicubic by size.
    """
    h, w = size
    gh, gw = grid.shape[-2:]
    if style == "bicubic":
        # recompute_scale_factor=False (the default): the kernel maps output pixel i to source
        # (i + 0.5) / scale - 0.5 with this very scale, which is what the official codes sample.
        out = F.interpolate(
            grid,
            scale_factor=((h + POS_OFFSET) / gh, (w + POS_OFFSET) / gw),
            mode="bicubic",
            align_corners=False,
            recompute_scale_factor=False,
        )
    elif style == "bilinear_fp16":
        out = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    elif style == "bicubic_antialias":
        out = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    else:
        raise ValueError(f"positional-table style must be one of {POS_STYLES}, got {style!r}")
    if tuple(out.shape[-2:]) != (h, w):  # the official codes assert the same
        raise RuntimeError(f"positional table resampled to {tuple(out.shape[-2:])}, not {size}")
    return out


@dataclass
class BlockCapture:
    """What the block runner recorded: each block's input and per-head attention (if asked)."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    attentions: list[torch.Tensor] = field(default_factory=list)


class Backbone:
    """A CLIP ViT prepared for dense prediction: any input size, last block exposed."""

    def __init__(
        self, model: nn.Module, *, name: str, source: str, device: torch.device, dtype: torch.dtype
    ) -> None:
        """Move the model to device/dtype and check its vision tower is a standard ViT."""
        visual = getattr(model, "visual", None)
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None or not hasattr(visual, "conv1"):
            raise ModelLoadError(
                f"{name} has no open_clip VisionTransformer; dense methods need a ViT "
                "(e.g. ViT-B-16)"
            )
        if getattr(visual, "attn_pool", None) is not None or not all(
            isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks
        ):
            raise ModelLoadError(
                f"{name} uses custom attention blocks or attention pooling, which the dense "
                "methods do not support; use a standard CLIP ViT (e.g. ViT-B-16)"
            )
        self.model = model.to(device=device, dtype=dtype)
        self.visual = visual
        self.blocks = blocks
        self.name = name
        self.source = source
        self.device = device
        self.dtype = dtype
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.native_grid = tuple(int(g) for g in visual.grid_size)
        self.width = int(visual.conv1.out_channels)
        self.heads = int(blocks[-1].attn.num_heads)
        self.embed_dim = int(visual.proj.shape[1]) if visual.proj is not None else self.width
        mean = getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self.mean = torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self._pos_cache: dict[tuple[int, int, str], torch.Tensor] = {}
        self._pos_lock = threading.Lock()
        self.quantized = False
        self._int8_attention: list[tuple[nn.Module, nn.Module]] = []
        self.compile_mode = "none"
        self._trunk = self._run_trunk

    def quantize_int8(self) -> int:
        """Make the vision tower's linear layers dynamic int8 for the CPU; return how many.

        CPU and fp32 only (the int8 kernels are CPU kernels that take fp32 activations). Every
        block's MLP becomes int8. The blocks before the last also get int8 copies of their
        attention projections, used by the shared forward (_run_trunk); the fp32 weights stay,
        because the methods and the capturing paths read them directly.
        """
        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise ValueError(
                "model.quantize int8 runs on the CPU in fp32; set device cpu and precision fp32 "
                "(or auto), or model.quantize none"
            )
        engine = torch.backends.quantized.engine
        engines = torch.backends.quantized.supported_engines
        if engine == "none" or engine not in engines:
            preferred = [e for e in ("x86", "fbgemm", "qnnpack") if e in engines]
            if not preferred:
                raise ValueError(
                    f"this torch build has no int8 CPU kernels (engines {engines}); set "
                    "model.quantize none"
                )
            torch.backends.quantized.engine = preferred[0]
        with warnings.catch_warnings():
            # torch.ao.quantization announces its move to torchao; the eager API still works.
            warnings.simplefilter("ignore")
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
            from torch.ao.quantization import quantize_dynamic

            count = sum(type(m) is nn.Linear for m in self.visual.modules())
            quantize_dynamic(self.visual, {nn.Linear}, dtype=torch.qint8, inplace=True)
            projections = []
            for block in self.blocks[:-1]:
                attn: nn.MultiheadAttention = block.attn
                qkv = nn.Linear(self.width, 3 * self.width, bias=attn.in_proj_bias is not None)
                qkv.weight, qkv.bias = attn.in_proj_weight, attn.in_proj_bias
                out = nn.Linear(self.width, self.width, bias=attn.out_proj.bias is not None)
                out.weight, out.bias = attn.out_proj.weight, attn.out_proj.bias
                for lin in (qkv, out):
                    lin.qconfig = torch.ao.quantization.default_dynamic_qconfig
                projections.append((DynamicLinear.from_float(qkv), DynamicLinear.from_float(out)))
        self._int8_attention = projections
        self.quantized = True
        return count + 2 * len(projections)

    def compile_trunk(self, mode: str) -> None:
        """torch.compile the blocks before the last (the part every method shares)."""
        if mode == "none":
            self._trunk, self.compile_mode = self._run_trunk, "none"
            return
        kwargs = {} if mode == "default" else {"mode": mode}
        # dynamic=False: one graph per frame size (a camera keeps its size), no shape guards
        # that would slow every frame; a new size compiles once.
        self._trunk = torch.compile(self._run_trunk, dynamic=False, **kwargs)
        self.compile_mode = mode

    def _run_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks 1..L-1 with their normal forward (int8 attention projections if quantized)."""
        if self._int8_attention:
            for block, (qkv, out) in zip(self.blocks[:-1], self._int8_attention, strict=True):
                x = self._int8_block(block, qkv, out, x)
            return x
        for block in self.blocks[:-1]:
            x = block(x)
        return x

    def _int8_block(
        self, block: nn.Module, qkv: nn.Module, out: nn.Module, x: torch.Tensor
    ) -> torch.Tensor:
        """A block's normal forward with int8 projections: x + attn(ln_1 x), then x + MLP."""
        b, n, _ = x.shape
        q, k, v = qkv(block.ln_1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        x = x + block.ls_1(out(attended))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks in the vision tower."""
        return len(self.blocks)

    def positional_embedding(self, h: int, w: int, style: str = "bicubic") -> torch.Tensor:
        """The (1 + h*w, D) positional table for an h x w grid, in the model dtype, cached.

        style 'bicubic' (default): the model's table at the native grid, else the official
        +0.1 scale-factor bicubic resampling (module docstring); 'bilinear_fp16': CLIPer's
        table, resized bilinearly by size (the native grid too, where that is a copy) and rounded
        through fp16 as its code does; 'bicubic_antialias': antialiased bicubic by size.
        """
        key = (h, w, style)
        table = self._pos_cache.get(key)
        if table is not None:
            return table
        if style not in POS_STYLES:
            raise ValueError(f"positional-table style must be one of {POS_STYLES}, got {style!r}")
        pos = self.visual.positional_embedding
        if (h, w) == self.native_grid and style != "bilinear_fp16":
            table = pos.detach()
        else:
            gh, gw = self.native_grid
            cls_pos, patch_pos = pos[:1].float(), pos[1:].float()
            grid = patch_pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
            grid = resample_positions(grid, (h, w), style)
            patch_pos = grid.permute(0, 2, 3, 1).reshape(h * w, -1)
            table = torch.cat([cls_pos, patch_pos])
            if style == "bilinear_fp16":
                # CLIPer's upsample_pos_emb returns emb.half(), CLS row included.
                table = table.half()
            table = table.to(self.dtype)
        with self._pos_lock:
            self._pos_cache[key] = table
        return table

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) float RGB in [0,1] -> CLIP-normalised input in the model dtype."""
        return ((images - self.mean) / self.std).to(self.dtype)

    def embed(
        self, images: torch.Tensor, pos_style: str = "bicubic"
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify normalised images (H, W multiples of the patch) into tokens [CLS]+patches.

        pos_style picks the positional table (see positional_embedding).
        """
        x = self.visual.conv1(images)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = self.visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(h, w, pos_style)
        return self.visual.ln_pre(x), (h, w)

    def qkv(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Q, K, V of a block (applied to ln_1(x)) as (B, heads, N, head_dim)."""
        attn: nn.MultiheadAttention = block.attn
        h = block.ln_1(x)
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        b, n, _ = qkv.shape
        qkv = qkv.view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attention_output(
        self, block: nn.Module, attn: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """out_proj(concat_heads(A @ V)); attn is (B or 1, heads or 1, N, N)."""
        out = torch.matmul(attn.to(v.dtype), v)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, -1)
        return block.attn.out_proj(out)

    def run_block_capturing(
        self, block: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A block's normal forward computed by hand, returning its per-head softmax(QK^T)."""
        q, k, v = self.qkv(block, x)
        scale = q.shape[-1] ** -0.5
        attn = torch.softmax(torch.matmul(q * scale, k.transpose(-1, -2)).float(), dim=-1)
        x = x + block.ls_1(self.attention_output(block, attn, v))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x, attn

    def forward_to_last(
        self, images: torch.Tensor, capture_inputs: bool = False, capture_attention: bool = False
    ) -> tuple[torch.Tensor, tuple[int, int], BlockCapture]:
        """Run blocks 1..L-1 on normalised images; return the last block's input and the grid."""
        x, grid = self.embed(images)
        cap = BlockCapture()
        if not (capture_inputs or capture_attention):
            return self._trunk(x), grid, cap
        for block in self.blocks[:-1]:
            if capture_inputs:
                cap.inputs.append(x)
            if capture_attention:
                x, attn = self.run_block_capturing(block, x)
                cap.attentions.append(attn)
            else:
                x = block(x)
        if capture_inputs:
            cap.inputs.append(x)
        return x, grid, cap

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post then proj: tokens (B, N, width) -> L2-normalised features (B, N, embed_dim)."""
        x = self.visual.ln_post(tokens)
        if self.visual.proj is not None:
            x = x @ self.visual.proj
        return F.normalize(x.float(), dim=-1)


def build_backbone(
    name: str,
    pretrained: str,
    checkpoint: str,
    cache_dir: str,
    device: str,
    precision: str,
    quantize: str = "none",
    compile_mode: str = "none",
) -> Backbone:
    """Load an open_clip ViT and wrap it for dense inference on the chosen device/precision.

    quantize 'int8' makes the ViT's linear layers dynamic int8 (CPU); compile_mode other than
    'none' compiles the shared blocks with torch.compile (that mode).
    """
    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)
    if quantize == "int8" and (dev.type != "cpu" or dtype != torch.float32):
        # Checked before loading: a wrong pair should not cost a model load to find out.
        raise ValueError(
            f"model.quantize int8 runs on the CPU in fp32, not on {dev} in "
            f"{str(dtype).removeprefix('torch.')}; set device cpu and precision fp32 (or auto), "
            "or model.quantize none"
        )
    model, source = load_clip(name, pretrained, checkpoint, cache_dir)
    backbone = Backbone(model, name=name, source=source, device=dev, dtype=dtype)
    if quantize == "int8":
        count = backbone.quantize_int8()
        backbone.source += f", int8 dynamic ({count} linear layers)"
    if compile_mode != "none":
        backbone.compile_trunk(compile_mode)
    return backbone


def default_cache_root() -> Path:
    """~/.cache/ovseg_ros (or $XDG_CACHE_HOME/ovseg_ros)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ovseg_ros"
