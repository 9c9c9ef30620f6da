"""`ovseg eval`: mIoU of a method on a benchmark (or a folder of labelled images)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from ..commands.config import add_config_arguments, config_from_args, load_segmenter
from ..engine import SegmenterConfig
from .cliprc_protocol import CLIPRC_PROTOCOLS
from .datasets import DATASETS, DatasetSpec, dataset_names, folder_spec
from .metrics import IGNORE_INDEX
from .runner import evaluate, to_markdown, write_report
from .vocabularies import EvalVocabulary, available_vocabularies, resolve_vocabulary

#: The common protocol of METHODS.md section 1 that every preset starts from: sliding windows of
#: 224 with stride 112 (the engine's crop/stride defaults) and the 80 ImageNet templates.
PROTOCOL: dict[str, object] = {"mode": "slide", "templates": "imagenet80"}

#: Where a method's official configs change a preset: method -> dataset -> settings, with
#: "method_params" merged under the --param flags. PEARL (PGSmall/PEARL configs/cfg_*.py): VOC21
#: and VOC20 on the whole image (slide_crop 0), COCO-Stuff at 336, alpha_kk 0.3 for ADE20K and
#: Cityscapes, TLP grid 224 for Cityscapes; its other settings are the common protocol's.
METHOD_PROTOCOLS: dict[str, dict[str, dict[str, object]]] = {
    "pearl": {
        "voc21": {"mode": "whole"},
        "voc20": {"mode": "whole"},
        "coco_stuff": {"short_side": 336},
        "cityscapes": {"method_params": {"alpha_kk": 0.3, "grid": 224}},
        "ade20k": {"method_params": {"alpha_kk": 0.3}},
    },
    "cliprc": CLIPRC_PROTOCOLS,
}

EPILOG = """\
presets (short side; published protocol settings; flags given override them):
  voc21 336, prob threshold 0.1     voc20 336        context60 336, prob threshold 0.1
  context59 336     coco_object 336, prob threshold 0.1     coco_stuff 448
  cityscapes 560    ade20k 336      folder (a class file: --vocabulary FILE, or ROOT/classes.txt)
every preset: slide 224/112, imagenet80 templates, the class file of the same name
--method pearl (its configs): voc21 and voc20 whole image, coco_stuff 336,
  ade20k alpha_kk 0.3, cityscapes alpha_kk 0.3 and grid 224
--method cliprc (its configs): every dataset short side 512, slide 512/426
"""


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `eval` sub-command to the `ovseg` parser."""
    parser = subparsers.add_parser(
        "eval",
        help="mIoU of a method on a benchmark or a folder of labelled images",
        description="Segment the images of a dataset, compare with its labels at their original "
        "resolution and print per-class IoU / Acc, mIoU, mAcc and aAcc (METHODS.md section 1).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", required=True, choices=dataset_names(), help="benchmark")
    parser.add_argument("--root", required=True, help="dataset folder (see the layouts in README)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images [all]")
    parser.add_argument("--out", help="write eval.json and eval.md here [print only]")
    parser.add_argument(
        "--save-predictions",
        action="store_true",
        help="also write OUT/predictions/<name>.png (prediction beside ground truth)",
    )
    parser.add_argument(
        "--ignore-index",
        type=int,
        default=IGNORE_INDEX,
        help="folder dataset: label value that is not evaluated [255]",
    )
    parser.add_argument(
        "--reduce-zero-label",
        action="store_true",
        help="folder dataset: label 0 is not evaluated and k means class k-1 (as ADE20K)",
    )
    parser.add_argument(
        "--fallback-random",
        action="store_true",
        help="if the weights cannot be loaded, warn and use random weights",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_config_arguments(parser)
    for action in parser._actions:  # the engine's --vocabulary flag takes a class file here
        if action.dest == "vocabulary":
            action.help = (
                "class file: a shipped name "
                f"({', '.join(available_vocabularies())}) or a path; or the class lines "
                "themselves ('background: sky; wall', 'cat', 'tv; screen') [the dataset's]"
            )
    parser.set_defaults(func=cmd_eval)
    return parser


def eval_vocabulary(args: argparse.Namespace) -> EvalVocabulary:
    """The class file: --vocabulary, else the preset's, else ROOT/classes.txt for a folder."""
    if getattr(args, "vocabulary", None):
        return resolve_vocabulary(args.vocabulary)
    if args.dataset != "folder":
        return resolve_vocabulary([DATASETS[args.dataset].vocabulary])
    classes = Path(args.root).expanduser() / "classes.txt"
    if not classes.is_file():
        raise ValueError(
            f"--dataset folder needs a class file: --vocabulary FILE, or {classes} "
            "(one class per line in label order)"
        )
    return resolve_vocabulary([str(classes)])


def dataset_spec(args: argparse.Namespace, vocabulary: EvalVocabulary) -> DatasetSpec:
    """The preset, or the folder reader sized by the class file; class counts must agree."""
    if args.dataset == "folder":
        return folder_spec(vocabulary.num_classes, args.ignore_index, args.reduce_zero_label)
    spec = DATASETS[args.dataset]
    if vocabulary.num_classes != spec.num_classes:
        raise ValueError(
            f"vocabulary {vocabulary.source} has {vocabulary.num_classes} classes but "
            f"{spec.title} has {spec.num_classes}"
        )
    return spec


def eval_config(
    args: argparse.Namespace, spec: DatasetSpec, vocabulary: EvalVocabulary
) -> SegmenterConfig:
    """Engine defaults < protocol < preset < method's preset < class file < flags given."""
    # --vocabulary names the class file here, so it is no engine field given on the command line.
    flags = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "vocabulary"})
    given = config_from_args(flags)  # validates the flags and parses --param
    explicit = set(vars(flags)) & {f.name for f in dataclasses.fields(SegmenterConfig)}
    method_preset = dict(METHOD_PROTOCOLS.get(given.method, {}).get(spec.name, {}))
    params = dict(method_preset.pop("method_params", {}))  # type: ignore[call-overload]
    preset: dict[str, object] = {
        **PROTOCOL,
        **spec.settings,
        **method_preset,
        "vocabulary": vocabulary.engine_entries(),
        "background_words": vocabulary.background_words,
    }
    if params:
        preset["method_params"] = {**params, **given.method_params}
    return given.replace(**{k: v for k, v in preset.items() if k not in explicit})


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate, print the Markdown table, write eval.json / eval.md with --out."""
    if args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    if args.save_predictions and not args.out:
        raise ValueError("--save-predictions needs --out")
    vocabulary = eval_vocabulary(args)
    spec = dataset_spec(args, vocabulary)
    dataset = spec.open(args.root)  # before the model loads: a wrong root fails fast
    cfg = eval_config(args, spec, vocabulary)
    start = time.perf_counter()
    segmenter = load_segmenter(cfg, args.fallback_random)
    setup_seconds = time.perf_counter() - start
    out = Path(args.out) if args.out else None
    report = evaluate(
        segmenter,
        dataset,
        vocabulary,
        limit=args.limit or None,
        progress=not args.quiet,
        predictions_dir=out / "predictions" if out and args.save_predictions else None,
    )
    report["setup_seconds"] = round(setup_seconds, 3)  # model loading + prompt encoding
    print(to_markdown(report), end="")
    if out is not None:
        json_path, md_path = write_report(report, out)
        print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    if report["images"] == 0:
        print("error: no image could be evaluated", file=sys.stderr)
        return 1
    return 1 if report["failed"] else 0
