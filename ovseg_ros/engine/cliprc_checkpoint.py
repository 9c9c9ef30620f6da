"""CLIP-RC checkpoints: reading the released mmseg files, their setting and training classes.

The authors release six checkpoints (README of uyzhang/CLIP-RC, "Pretrained models"): PASCAL VOC
2012 (20 classes, no background) and COCO-Stuff 164K (171 classes), each inductive (zero-shot,
trained on the seen classes), transductive (zero-shot plus self-training on unlabelled unseen
pixels) and fully supervised. A file is an mmcv checkpoint: {'meta': {...}, 'state_dict': {...}}
(a bare state dict also loads) with keys backbone.*, text_encoder.* and decode_head.*; the
architecture is read from the tensor shapes (cliprc_net.CLIPRCArch).

The setting decides the calibration of the official test path (decode_seg.semantic_inference):
the seen classes' sigmoid scores are lowered by 0.1 in the inductive setting; the transductive
configs (self_training=True) pass no weight. It is read, in this order, from the parameter, the
config text mmseg stores in meta['config'] (self_training, novel_class, base_class), the
experiment or file name (configs: clip_rc_zero_... inductive, ..._st transductive, clip_rc_fully_
...), and the dataset from meta['CLASSES'] or the prompt count (VOC configs 10, COCO-Stuff 100).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .clip_weights import ModelLoadError
from .cliprc_net import CLIPRCArch, CLIPRCNet

log = logging.getLogger("ovseg_ros.engine")

#: ZeroPascalVOCDataset20.CLASSES (configs/_base_/datasets/dataloader/voc12.py), label order.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

#: ZeroCOCOStuffDataset.CLASSES (configs/_base_/datasets/dataloader/coco_stuff.py), label order.
COCO_STUFF_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "banner", "blanket",
    "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard",
    "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other",
    "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light",
    "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip

#: The zero-shot configs' novel_class indices (configs/voc12/*_zero_*, configs/coco/*_zero_*).
UNSEEN: dict[str, tuple[int, ...]] = {
    "voc": (15, 16, 17, 18, 19),
    "coco_stuff": (19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160),
}
CLASSES: dict[str, tuple[str, ...]] = {"voc": VOC_CLASSES, "coco_stuff": COCO_STUFF_CLASSES}
#: Prompt tokens of each dataset's configs (num_tokens): tells the dataset when nothing else does.
PROMPT_TOKENS: dict[int, str] = {10: "voc", 100: "coco_stuff"}
#: The text embeddings of the configs (load_text_embedding, made by the authors' notebook):
#: VOC one template without a full stop, COCO-Stuff 15 templates (engine/templates.py).
DATASET_TEMPLATES: dict[str, str] = {"voc": "cliprc_single", "coco_stuff": "cliprc_multi"}
MODES = ("inductive", "transductive", "fully")
SETTINGS = tuple(f"{d}_{m}" for d in CLASSES for m in MODES)
#: Test-time calibration weight per mode (decode_seg.forward: 0.1 unless self_training). Fully
#: supervised lowers every dataset class alike, which changes no label; here it is 0, so that
#: words outside the training set (background words, new classes) are not favoured.
CALIBRATION: dict[str, float] = {"inductive": 0.1, "transductive": 0.0, "fully": 0.0}

DOWNLOAD = (
    "download one of the authors' checkpoints (PASCAL VOC 2012 or COCO-Stuff 164K; inductive, "
    "transductive or fully supervised: the Google Drive links under 'Pretrained models' in the "
    "README of https://github.com/uyzhang/CLIP-RC) and set the method parameter checkpoint "
    "to the .pth file (node: method_params.cliprc.checkpoint; CLI: --param checkpoint=PATH)"
)


@dataclass(frozen=True)
class Setting:
    """Which released model a checkpoint is: dataset, mode, its training classes, and why."""

    dataset: str  # voc | coco_stuff
    mode: str  # inductive | transductive | fully
    training: tuple[str, ...]  # the seen classes' names (all classes when fully supervised)
    source: str  # where dataset and mode were read

    @property
    def name(self) -> str:
        """dataset_mode, as the setting parameter spells it."""
        return f"{self.dataset}_{self.mode}"


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, meta) of a checkpoint file; ModelLoadError in one sentence otherwise."""
    where = f"method_params.checkpoint {path!r}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelLoadError(f"{where} is not a file; {DOWNLOAD}")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        text = str(exc)
        unsafe = re.search(r"GLOBAL ([\w.]+)", text)
        if unsafe:
            raise ModelLoadError(
                f"{where} holds pickled Python objects ({unsafe.group(1)}) besides tensors and "
                "is not loaded that way for safety; re-save it as {'state_dict': "
                "torch.load(path)['state_dict']} with torch.save"
            ) from exc
        lines = [line.strip() for line in text.split("WeightsUnpickler error:")[-1].splitlines()]
        first = next((line for line in lines if line), exc.__class__.__name__)
        first = first.split(". ")[0].rstrip(".")[:160]  # torch's advice after the cause
        raise ModelLoadError(
            f"{where} is not a readable PyTorch checkpoint ({exc.__class__.__name__}: {first}); "
            "copy the file again"
        ) from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{where} holds a {type(data).__name__}, not a CLIP-RC checkpoint")
    state = data.get("state_dict", data)
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    if not isinstance(state, dict) or not any(
        isinstance(k, str) and k.startswith("decode_head.") for k in state
    ):
        raise ModelLoadError(
            f"{where} is not a CLIP-RC checkpoint: it has no decode_head.* weights (an mmseg "
            "state_dict with backbone.*, text_encoder.* and decode_head.* keys is needed)"
        )
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, meta


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    """How many indices N the keys matching pattern (with one (\\d+) group) have."""
    found = {int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k))}
    return max(found) + 1 if found else 0


def arch_from_state(state: dict[str, torch.Tensor], where: str) -> CLIPRCArch:
    """The sizes of the network a state dict holds; ModelLoadError naming what is missing."""
    needed = (
        "backbone.conv1.weight",
        "backbone.positional_embedding",
        "backbone.prompt_embeddings",
        "backbone.region_level_bridge",
        "backbone.proj",
        "text_encoder.token_embedding.weight",
        "text_encoder.positional_embedding",
        "decode_head.decoder_q.layers.0.linear1.weight",
    )
    missing = [k for k in needed if k not in state]
    if missing:
        marker = "backbone.region_level_bridge" in state or "decode_head.q_proj.weight" in state
        what = "lacks" if marker else "is not a CLIP-RC checkpoint: it has no"
        raise ModelLoadError(f"{where} {what} {missing[0]} ({len(missing)} key(s) of {needed})")
    if "decode_head.input_proj_1.weight" in state:
        raise ModelLoadError(
            f"{where} is a CLIP-RC variant with use_proj=True (decode_head.input_proj_1), which "
            "no released config uses and this implementation does not support"
        )
    conv = state["backbone.conv1.weight"]
    pos_rows = state["backbone.positional_embedding"].shape[0] - 1
    grid = int(round(pos_rows**0.5))
    bridges = state["backbone.region_level_bridge"].shape[0]
    prompts = state["backbone.prompt_embeddings"]
    if grid * grid != pos_rows or int(round(bridges**0.5)) ** 2 != bridges:
        raise ModelLoadError(
            f"{where} has a positional table of {pos_rows} patches or {bridges} bridge tokens; "
            "CLIP-RC needs square numbers of both"
        )
    if prompts.dim() != 3 or prompts.shape[2] != conv.shape[0]:
        raise ModelLoadError(
            f"{where} has backbone.prompt_embeddings of shape {tuple(prompts.shape)}; "
            f"(1, tokens, {conv.shape[0]}) is needed"
        )
    return CLIPRCArch(
        width=conv.shape[0],
        patch=conv.shape[-1],
        layers=_count(state, r"backbone\.transformer\.resblocks\.(\d+)\.ln_1\.weight"),
        grid=grid,
        prompt_tokens=prompts.shape[1],
        bridges=bridges,
        embed_dim=state["backbone.proj"].shape[1],
        text_width=state["text_encoder.token_embedding.weight"].shape[1],
        text_layers=_count(state, r"text_encoder\.transformer\.resblocks\.(\d+)\.ln_1\.weight"),
        context=state["text_encoder.positional_embedding"].shape[0],
        vocab_size=state["text_encoder.token_embedding.weight"].shape[0],
        decoder_layers=_count(state, r"decode_head\.decoder_q\.layers\.(\d+)\.linear1\.weight"),
        decoder_ffn=state["decode_head.decoder_q.layers.0.linear1.weight"].shape[0],
    )


def load_weights(net: CLIPRCNet, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy a state dict into net; ModelLoadError for a missing key or a shape mismatch.

    Keys the test path does not use (the decoder layers' self-attention and norm1, the recovery
    decoder of training) are ignored, as are others the network does not have.
    """
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ModelLoadError(
            f"{where} lacks {len(missing)} CLIP-RC weight(s), e.g. {missing[0]}; it is "
            "incomplete or from another model"
        )
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ModelLoadError(
                f"{where} has {key} of shape {tuple(state[key].shape)} where the network read "
                f"from its other weights needs {tuple(value.shape)}"
            )
    net.load_state_dict({k: state[k].float() for k in expected}, strict=True, assign=True)


def _dataset(meta: dict[str, Any], arch: CLIPRCArch, hint: str) -> tuple[str | None, str]:
    """The dataset of a checkpoint and where it was read (None if nothing tells)."""
    classes = meta.get("CLASSES")
    if isinstance(classes, list | tuple):
        for name, known in CLASSES.items():
            if len(classes) == len(known):
                return name, "checkpoint meta"
    text = str(meta.get("config", ""))
    count = re.search(r"both_class\s*=\s*\[([\d,\s]*)\]", text)
    if count:
        n = len([v for v in count.group(1).split(",") if v.strip()])
        for name, known in CLASSES.items():
            if n == len(known):
                return name, "checkpoint meta"
    if "coco" in hint:
        return "coco_stuff", "file name"
    if "voc" in hint:
        return "voc", "file name"
    if arch.prompt_tokens in PROMPT_TOKENS:
        return PROMPT_TOKENS[arch.prompt_tokens], "prompt count"
    return None, ""


def _mode(meta: dict[str, Any], hint: str) -> tuple[str | None, str]:
    """The training mode of a checkpoint and where it was read (None if nothing tells)."""
    text = str(meta.get("config", ""))
    if text:
        if re.search(r"self_training\s*=\s*True", text):
            return "transductive", "checkpoint meta"
        novel = re.search(r"novel_class\s*=\s*\[([\d,\s]*)\]", text)
        if novel:
            return ("inductive" if novel.group(1).strip() else "fully"), "checkpoint meta"
    if "fully" in hint:
        return "fully", "file name"
    if re.search(r"(_st\b|_st\.|transductive)", hint):
        return "transductive", "file name"
    if re.search(r"(zero|inductive)", hint):
        return "inductive", "file name"
    return None, ""


def _base_classes(meta: dict[str, Any], dataset: str) -> tuple[str, ...] | None:
    """The seen classes named by meta['config'] (base_class indices), if it has them."""
    found = re.search(r"base_class\s*=\s*\[([\d,\s]*)\]", str(meta.get("config", "")))
    if not found:
        return None
    names = CLASSES[dataset]
    ids = [int(v) for v in found.group(1).split(",") if v.strip()]
    if not ids or max(ids) >= len(names):
        return None
    return tuple(names[i] for i in ids)


def detect_setting(
    meta: dict[str, Any], path: str, arch: CLIPRCArch, requested: str = "auto"
) -> Setting:
    """The checkpoint's setting: `requested` unless 'auto', else read from the file (docstring).

    A mode nothing tells is taken as inductive (the paper's main setting), with a warning.
    """
    hint = f"{meta.get('exp_name', '')} {Path(path).name}".lower()
    if requested != "auto":
        dataset, mode = requested.rsplit("_", 1)
        source = "parameter"
    else:
        dataset, d_source = _dataset(meta, arch, hint)
        mode, m_source = _mode(meta, hint)
        if dataset is None:
            dataset, d_source = "voc", "assumed"
        if mode is None:
            mode, m_source = "inductive", "assumed"
            log.warning(
                "cliprc: %s does not say whether it is an inductive, transductive or fully "
                "supervised checkpoint; assuming inductive (training classes lowered by %.2f). "
                "Set method_params.cliprc.setting (e.g. %s_transductive) if it is not",
                path or "the network",
                CALIBRATION["inductive"],
                dataset,
            )
        source = d_source if d_source == m_source else f"{d_source} / {m_source}"
    names = CLASSES[dataset]
    if mode == "fully":
        training = names
    else:
        training = _base_classes(meta, dataset) or tuple(
            n for i, n in enumerate(names) if i not in UNSEEN[dataset]
        )
    return Setting(dataset, mode, training, source)


def official_arch(dataset: str) -> CLIPRCArch:
    """The released architecture: ViT-B/16 at 512 px, 16 bridges, the dataset's prompt count."""
    tokens = {v: k for k, v in PROMPT_TOKENS.items()}[dataset]
    return CLIPRCArch(prompt_tokens=tokens)


def random_network(dataset: str) -> CLIPRCNet:
    """The released architecture with random weights (seed 0), for smoke tests only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CLIPRCNet(official_arch(dataset))


def load_network(path: str) -> tuple[CLIPRCNet, dict[str, Any]]:
    """The network of a checkpoint file (float32, CPU) and the file's meta."""
    where = f"method_params.checkpoint {path!r}"
    state, meta = read_checkpoint(path)
    arch = arch_from_state(state, where)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        net = CLIPRCNet(arch)
    load_weights(net, state, where)
    text = net.text_encoder  # its causal mask is a non-persistent buffer: not in the file
    text.register_buffer("attn_mask", text.build_causal_mask(), persistent=False)
    return net, meta
