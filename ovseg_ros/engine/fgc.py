"""CLIPer's fine-grained compensation (FGC): Stable Diffusion self-attention refines a coarse map.

METHODS.md section 4, steps 7-8. The image, squashed to `size` x `size` (512 for SD 2.1-base), is
encoded by the VAE; noise of one scheduler step (index 45 of 50) is added to the latent and the
UNet runs once with the empty prompt. The per-head self-attention maps (n x n, n = 64*64 at 512)
of the named layers are recorded by attention processors, and each map A is

    A <- A / (column max of A + 1e-5);  A[A < thr] = 0;  A <- A / (row sum of A + 1e-5)

The maps of all heads of all layers, in the given layer order and head order, form the chain
A_f = A_1 A_2 ... A_k, and the compensated map is S_f = A_f S_c (S_c resized to the latent-token
grid). The product is applied right to left to the (n, C) map, never formed as an n x n matrix.

`diffusers` (and `transformers`, for the text encoder that embeds the empty prompt) are optional:
they are imported only when a model is loaded, and a missing package or missing weights raise the
engine's ModelLoadError naming what to install or where the weights are expected.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .clip_loading import _hub_reachable
from .clip_weights import ModelLoadError

log = logging.getLogger("ovseg_ros.engine")

#: The published FGC model and the layers whose self-attention CLIPer chains (in this order).
DEFAULT_SD_MODEL = "stabilityai/stable-diffusion-2-1-base"
DEFAULT_LAYERS = (
    "up_blocks.3.attentions.1.transformer_blocks.0.attn1",
    "up_blocks.3.attentions.0.transformer_blocks.0.attn1",
)
#: The sub-folders of a Stable Diffusion folder in diffusers layout that FGC reads.
SD_SUBFOLDERS = ("unet", "vae", "scheduler", "tokenizer", "text_encoder")
INSTALL_HINT = "pip install diffusers==0.42.1 transformers"


def import_diffusers() -> Any:
    """The diffusers module, or ModelLoadError saying how to install it."""
    try:
        import diffusers
    except ImportError as exc:
        raise ModelLoadError(
            "CLIPer's fine-grained compensation (fgc: true) needs the optional package diffusers, "
            f"which is not installed; install it with `{INSTALL_HINT}` or set fgc to false"
        ) from exc
    return diffusers


def import_transformers() -> Any:
    """The transformers module (SD's tokenizer and text encoder), or ModelLoadError."""
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError(
            "CLIPer's fine-grained compensation reads Stable Diffusion's text encoder with the "
            "optional package transformers, which is not installed; install it with "
            f"`{INSTALL_HINT}` or set fgc to false"
        ) from exc
    return transformers


def parse_layers(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Comma-separated module paths (e.g. 'up_blocks.3.attentions.1.transformer_blocks.0.attn1')."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("fgc_layers names no attention layer")
    return tuple(names)


def normalize_attention(attn: torch.Tensor, threshold: float) -> torch.Tensor:
    """Column-max scaling, threshold, row normalisation of (..., n, n) maps (a new float tensor)."""
    a = attn.float() / (attn.float().amax(dim=-2, keepdim=True) + 1e-5)
    a = a.masked_fill_(a < threshold, 0.0)
    return a.div_(a.sum(dim=-1, keepdim=True) + 1e-5)


def chain_attention(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The product maps[0] @ maps[1] @ ... of (..., n, n) matrices (small n: tests, analysis)."""
    out = maps[0]
    for a in maps[1:]:
        out = out @ a
    return out


def apply_chain(maps: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(maps[0] @ ... @ maps[-1]) @ x computed right to left; x is (..., n, C)."""
    for a in reversed(maps):
        x = a @ x
    return x


def _self_attention_probs(attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """softmax(scale * q k^T) per head of a plain diffusers self-attention: (B, heads, n, n)."""
    b, n, _ = hidden.shape
    q = attn.to_q(hidden).float().view(b, n, attn.heads, -1).transpose(1, 2)
    k = attn.to_k(hidden).float().view(b, n, attn.heads, -1).transpose(1, 2)
    return torch.softmax(torch.matmul(q * attn.scale, k.transpose(-1, -2)), dim=-1)


class _CaptureProcessor:
    """Attention processor: records a layer's per-head attention map, then runs the original."""

    def __init__(self, inner: Any, sink: dict[int, torch.Tensor], index: int) -> None:
        """Wrap the layer's processor; maps are written to sink[index]."""
        self.inner = inner
        self.sink = sink
        self.index = index

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Record softmax(scale q k^T) of hidden_states, return the original processor's output."""
        self.sink[self.index] = _self_attention_probs(attn, hidden_states)
        return self.inner(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
        )


class StableDiffusionAttention:
    """One noisy UNet step on an image's VAE latent, recording named self-attention maps."""

    def __init__(
        self,
        vae: nn.Module,
        unet: nn.Module,
        scheduler: Any,
        prompt_embeds: torch.Tensor,
        layers: str | Sequence[str] = DEFAULT_LAYERS,
        *,
        size: int = 512,
        time_step: int = 45,
        num_steps: int = 50,
        seed: int = 0,
    ) -> None:
        """Bind the models (already on their device/dtype) and install the capture processors.

        prompt_embeds is the text encoder's (1, tokens, dim) embedding of the empty prompt.
        """
        self.vae = vae.eval().requires_grad_(False)
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.prompt_embeds = prompt_embeds
        self.layers = parse_layers(layers)
        self.size = size
        self.seed = seed
        scheduler.set_timesteps(num_steps)
        if not -len(scheduler.timesteps) <= time_step < len(scheduler.timesteps):
            raise ValueError(
                f"fgc_time_step {time_step} is outside the scheduler's {len(scheduler.timesteps)} "
                f"timesteps for fgc_num_steps {num_steps}"
            )
        self.timestep = scheduler.timesteps[time_step]
        self._maps: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        for index, name in enumerate(self.layers):
            try:
                layer = unet.get_submodule(name)
            except AttributeError:
                raise ValueError(f"fgc_layers: the UNet has no module {name!r}") from None
            plain = (
                hasattr(layer, "processor")
                and not getattr(layer, "is_cross_attention", True)
                and getattr(layer, "spatial_norm", None) is None
                and getattr(layer, "group_norm", None) is None
                and getattr(layer, "norm_q", None) is None
            )
            if not plain:
                raise ValueError(
                    f"fgc_layers: {name!r} is not a plain self-attention layer (use an attn1 of a "
                    "transformer block, e.g. up_blocks.3.attentions.0.transformer_blocks.0.attn1)"
                )
            layer.set_processor(_CaptureProcessor(layer.processor, self._maps, index))

    @property
    def device(self) -> torch.device:
        """Where the UNet runs."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's dtype."""
        return next(self.unet.parameters()).dtype

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """VAE latents (mean, scaled) of (B, 3, H, W) RGB images in [0, 1], squashed to size^2."""
        x = images.float()
        if x.shape[-2:] != (self.size, self.size):
            shrink = min(x.shape[-2:]) > self.size
            x = F.interpolate(
                x,
                size=(self.size, self.size),
                mode="bilinear",
                align_corners=False,
                antialias=shrink,
            )
        x = (x * 2.0 - 1.0).to(device=self.device, dtype=self.dtype)
        latent = self.vae.encode(x).latent_dist.mean
        return latent * self.vae.config.scaling_factor

    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, heads, n, n) float32 self-attention maps of the named layers, in layer order."""
        latents = self.latents(images)
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        t = self.timestep.to(latents.device).repeat(latents.shape[0])
        noisy = self.scheduler.add_noise(latents, noise, t)
        embeds = self.prompt_embeds.to(latents.device, latents.dtype)
        with self._lock:  # the processors write into one shared dict: one UNet call at a time
            self._maps.clear()
            try:
                self.unet(noisy, t, encoder_hidden_states=embeds.expand(latents.shape[0], -1, -1))
                missing = [n for i, n in enumerate(self.layers) if i not in self._maps]
                if missing:
                    raise RuntimeError(f"the UNet step never ran the attention layers {missing}")
                return [self._maps[i] for i in range(len(self.layers))]
            finally:
                self._maps.clear()

    def compensate(
        self, images: torch.Tensor, coarse: torch.Tensor, threshold: float
    ) -> torch.Tensor:
        """S_f = A_f S_c: (B, C, h, w) coarse maps -> (B, C, s, s) on the attention token grid."""
        maps = self.attention_maps(images)
        n = maps[0].shape[-1]
        side = round(n**0.5)
        if side * side != n or any(m.shape[-1] != n for m in maps):
            raise ValueError(
                f"fgc_layers must all attend over one square token grid; got {n} and "
                f"{[m.shape[-1] for m in maps]} tokens"
            )
        chain = [normalize_attention(m[:, h], threshold) for m in maps for h in range(m.shape[1])]
        maps.clear()
        x = F.interpolate(coarse.float(), size=(side, side), mode="bilinear", align_corners=False)
        b, c = x.shape[:2]
        x = x.flatten(2).transpose(1, 2).to(chain[0].device)  # (B, n, C)
        out = apply_chain(chain, x)
        return out.transpose(1, 2).reshape(b, c, side, side).to(coarse.device)


def _is_local(source: str) -> bool:
    """A source that names a folder (absolute, relative, home) rather than a hub repository id."""
    return source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()


def load_stable_diffusion(
    source: str,
    device: torch.device,
    dtype: torch.dtype,
    layers: str | Sequence[str] = DEFAULT_LAYERS,
    *,
    size: int = 512,
    time_step: int = 45,
    num_steps: int = 50,
    seed: int = 0,
) -> StableDiffusionAttention:
    """Load SD's VAE, UNet, scheduler and the empty-prompt embedding from a folder or hub id.

    source is a local folder in diffusers layout (unet/, vae/, scheduler/, tokenizer/,
    text_encoder/) or a Hugging Face repository id, looked up in the local cache only when the
    hub cannot be reached. The text encoder is dropped once the empty prompt is embedded.
    """
    diffusers = import_diffusers()
    local = _is_local(source)
    if local:
        folder = Path(source).expanduser()
        missing = [s for s in SD_SUBFOLDERS if not (folder / s).is_dir()]
        if not folder.is_dir() or missing:
            problem = (
                f"lacks the sub-folder(s) {', '.join(missing)}"
                if folder.is_dir()
                else "does not exist"
            )
            raise ModelLoadError(
                f"CLIPer's fgc_model folder {str(folder)!r} {problem}; point fgc_model at a local "
                f"copy of {DEFAULT_SD_MODEL} in diffusers layout "
                f"({', '.join(s + '/' for s in SD_SUBFOLDERS)})"
            )
        where: str = str(folder)
    else:
        where = source
    transformers = import_transformers()
    offline = local or not _hub_reachable()
    kwargs: dict[str, Any] = {"local_files_only": offline}
    try:
        scheduler_config = diffusers.DDIMScheduler.load_config(
            where, subfolder="scheduler", **kwargs
        )
        scheduler_cls = getattr(diffusers, scheduler_config.get("_class_name", "DDIMScheduler"))
        scheduler = scheduler_cls.from_config(scheduler_config)
        unet = diffusers.UNet2DConditionModel.from_pretrained(
            where, subfolder="unet", torch_dtype=dtype, **kwargs
        )
        vae = diffusers.AutoencoderKL.from_pretrained(
            where, subfolder="vae", torch_dtype=dtype, **kwargs
        )
        tokenizer = transformers.CLIPTokenizer.from_pretrained(
            where, subfolder="tokenizer", **kwargs
        )
        text_encoder = transformers.CLIPTextModel.from_pretrained(
            where, subfolder="text_encoder", **kwargs
        )
    except Exception as exc:  # noqa: BLE001 - missing files and download errors vary in type
        first = str(exc).splitlines()[0] if str(exc) else ""
        remedy = (
            "check that the folder holds a complete diffusers copy of the model"
            if local
            else "without network it must already be in the Hugging Face cache "
            "(~/.cache/huggingface/hub, or $HF_HOME); download it there beforehand or set "
            "fgc_model to a local diffusers folder"
        )
        raise ModelLoadError(
            f"cannot load Stable Diffusion for CLIPer's FGC from {where!r} "
            f"({exc.__class__.__name__}: {first}); {remedy}"
        ) from exc
    with torch.inference_mode():
        ids = tokenizer(
            "",
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        prompt_embeds = text_encoder(ids)[0].to(device=device, dtype=dtype)
    del text_encoder, tokenizer
    log.info("loaded Stable Diffusion from %s for CLIPer's FGC on %s", where, device)
    return StableDiffusionAttention(
        vae.to(device=device),
        unet.to(device=device),
        scheduler,
        prompt_embeds,
        layers,
        size=size,
        time_step=time_step,
        num_steps=num_steps,
        seed=seed,
    )
