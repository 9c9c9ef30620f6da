"""ROS-free segmentation engine: open_clip ViT + training-free open-vocabulary methods."""

from .backbone import Backbone, build_backbone
from .clip_weights import ModelLoadError
from .config import DEFAULT_BACKGROUND_WORDS, DEFAULT_VOCABULARY, SegmenterConfig
from .methods import available_methods, create_method, describe_methods
from .segmenter import Result, Segmenter
from .text import Vocabulary, parse_vocabulary

__all__ = [
    "DEFAULT_BACKGROUND_WORDS",
    "DEFAULT_VOCABULARY",
    "Backbone",
    "ModelLoadError",
    "Result",
    "Segmenter",
    "SegmenterConfig",
    "Vocabulary",
    "available_methods",
    "build_backbone",
    "create_method",
    "describe_methods",
    "parse_vocabulary",
]
