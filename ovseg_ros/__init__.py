"""Open-vocabulary semantic segmentation with CLIP, as a library, a CLI and a ROS 2 node."""

__version__ = "0.1.0"
