"""open_clip loading (tags, local checkpoints, OpenAI .pt) and the dense ViT block runner."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("ovseg_ros.engine")

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False
_register_lock = threading.Lock()


class ModelLoadError(RuntimeError):
    """The model or its weights could not be loaded; the message says why and what to do."""


def _open_clip():
    """Import open_clip once and register the package's own model configurations."""
    global _registered
    import open_clip

    with _register_lock:
        if not _registered:
            open_clip.add_model_config(_CONFIG_DIR)
            _registered = True
    return open_clip


def resolve_device(device: str) -> torch.device:
    """Turn 'auto' / 'cpu' / 'cuda' / 'cuda:N' into a torch.device, checking it exists."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} does not exist: {torch.cuda.device_count()} GPU(s) visible"
            )
    elif dev.type != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return dev


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Pick the compute dtype: auto = fp16 on CUDA, fp32 on CPU; reject unsupported pairs."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device; use fp32 (or bf16) on the CPU")
        return torch.float16
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU does not support bf16; use fp16 or fp32")
        return torch.bfloat16
    raise ValueError(f"precision must be one of auto, fp32, fp16, bf16, got {precision!r}")


def _is_jit_archive(path: Path) -> bool:
    """True for a TorchScript archive (the original OpenAI CLIP release format)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _load_checkpoint_model(open_clip, name: str, path: Path) -> tuple[nn.Module, str]:
    """Build a model from a local file: OpenAI JIT / state dict, or an open_clip state dict."""
    from open_clip.model import build_model_from_openai_state_dict

    if not path.is_file():
        raise ModelLoadError(
            f"model.checkpoint {str(path)!r} does not exist; give the path of an open_clip state "
            "dict or an OpenAI CLIP .pt file, or set model.checkpoint to '' to use "
            "model.pretrained"
        )
    try:
        if _is_jit_archive(path):
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
            fmt = "OpenAI JIT archive"
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            fmt = "state dict"
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ModelLoadError(
            f"cannot read model.checkpoint {str(path)!r} ({exc.__class__.__name__}: {exc}); it "
            "must be a torch file holding an open_clip state dict or an OpenAI CLIP model"
        ) from exc
    if not isinstance(state, dict):
        raise ModelLoadError(f"model.checkpoint {str(path)!r} holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    openai_format = fmt.startswith("OpenAI") or "input_resolution" in state
    try:
        if openai_format:
            model = build_model_from_openai_state_dict(dict(state), cast_dtype=torch.float32)
            model.float()
            # open_clip's builder rounds the weights through fp16; reload them at full precision.
            sizes = ("input_resolution", "context_length", "vocab_size")
            model.load_state_dict({k: v for k, v in state.items() if k not in sizes})
            return model, f"OpenAI checkpoint {path.name}"
        model = open_clip.create_model(name, pretrained=None)
        open_clip.load_checkpoint(model, str(path))
        return model, f"open_clip checkpoint {path.name}"
    except (RuntimeError, KeyError, ValueError, AssertionError) as exc:
        raise ModelLoadError(
            f"model.checkpoint {str(path)!r} does not fit model.name {name!r} ({exc}); set "
            "model.name to the architecture the file was trained with"
        ) from exc


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the weights hub's host name resolves (a dead network fails at once here)."""
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.getaddrinfo(host, 443)
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


@contextlib.contextmanager
def _offline_unless_reachable():
    """Use only the local weights cache when the hub cannot be reached (no minute of retries)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    if constants.HF_HUB_OFFLINE or _hub_reachable():
        yield
        return
    log.info("weights hub unreachable: looking in the local cache only")
    with _register_lock:
        constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = False


def load_clip(
    name: str, pretrained: str, checkpoint: str = "", cache_dir: str = ""
) -> tuple[nn.Module, str]:
    """Create an open_clip model (fp32, CPU, eval) and say where its weights came from."""
    open_clip = _open_clip()
    if name not in open_clip.list_models():
        raise ModelLoadError(
            f"model.name {name!r} is not an open_clip architecture; e.g. ViT-B-16, ViT-L-14 "
            "(open_clip.list_models() lists them all)"
        )
    if checkpoint:
        model, source = _load_checkpoint_model(open_clip, name, Path(checkpoint).expanduser())
    elif pretrained.lower() in ("", "none"):
        log.warning(
            "model.pretrained is 'none': %s runs with RANDOM weights; its segmentations are "
            "meaningless (use this for smoke tests only)",
            name,
        )
        # A fixed seed makes random weights (and so their cached text embeddings) reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(name, pretrained=None)
        source = "random weights (seed 0)"
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ModelLoadError(
                f"model.pretrained {pretrained!r} is not a known tag for {name}; known tags: "
                f"{tags or 'none'}; or set model.checkpoint to a local weights file"
            )
        where = cache_dir or "open_clip's default cache (~/.cache/huggingface or ~/.cache/clip)"
        try:
            with _offline_unless_reachable():
                model = open_clip.create_model(
                    name, pretrained=pretrained, cache_dir=cache_dir or None
                )
        except Exception as exc:  # noqa: BLE001 - download failures come in many types
            raise ModelLoadError(
                f"cannot load the weights of {name} / {pretrained}: {exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}. The first use downloads them "
                f"into {where}; without network, copy them there beforehand, or set "
                "model.checkpoint to a local open_clip or OpenAI CLIP weights file"
            ) from exc
        source = f"pretrained {pretrained}"
    model.eval().requires_grad_(False)
    return model, source


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
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
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

    def positional_embedding(self, h: int, w: int) -> torch.Tensor:
        """The (1 + h*w, D) positional table for an h x w grid: bicubic, cached per grid."""
        key = (h, w)
        table = self._pos_cache.get(key)
        if table is not None:
            return table
        pos = self.visual.positional_embedding
        if (h, w) == self.native_grid:
            table = pos.detach()
        else:
            gh, gw = self.native_grid
            cls_pos, patch_pos = pos[:1].float(), pos[1:].float()
            grid = patch_pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            patch_pos = grid.permute(0, 2, 3, 1).reshape(h * w, -1)
            table = torch.cat([cls_pos, patch_pos]).to(self.dtype)
        with self._pos_lock:
            self._pos_cache[key] = table
        return table

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) float RGB in [0,1] -> CLIP-normalised input in the model dtype."""
        return ((images - self.mean) / self.std).to(self.dtype)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify normalised images (H, W multiples of the patch) into tokens [CLS]+patches."""
        x = self.visual.conv1(images)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = self.visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(h, w)
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
