"""ROS 2 layer: the node, its worker thread and message conversions."""
