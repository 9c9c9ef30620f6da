"""The pieces of `sample_camera`, the stand-in camera for the ovseg node and its monitor.

Each is testable without DDS except the node: ``sources`` (frames of each kind of source,
resized), ``messages`` (the Image / CompressedImage / CameraInfo / depth messages it publishes),
``monitor`` (window counters, percentiles, class shares, the printed lines, the overlay files),
``node`` (SampleCameraNode: wires them to rclpy) and ``environment`` (DDS settings made before
rclpy starts). The command line is ``ovseg_ros.ros.sample_camera``.
"""

#: The program name: prefix of its messages and default name of its node.
PROG = "sample_camera"
