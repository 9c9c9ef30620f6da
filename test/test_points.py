"""~/points: depth decoding, resampling, pairing by stamp, back-projection and the cloud's layout
(pure functions, checked against independent computations), then the node in-process (the
`harness` fixture: real rclpy, DDS on this host) with a registered depth stream.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from rclpy.parameter import Parameter
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header

from ovseg_ros.ros import depth as Dp
from ovseg_ros.ros import points as Pt
from ovseg_ros.ros.camera.messages import depth_to_msg, floor_depth, pinhole_camera_info
from ovseg_ros.ros.params import NodeOptions
from ovseg_ros.viz import class_colors

K = [400.0, 0.0, 319.5, 0.0, 420.0, 239.5, 0.0, 0.0, 1.0]  # fx != fy: x and y are told apart


def depth_msg(depth: np.ndarray, encoding: str, stamp_ns: int = 1_000_000_000) -> Image:
    """A depth Image (16UC1 from millimetres, 32FC1 from metres) stamped stamp_ns."""
    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    msg.header.frame_id = "cam_optical"
    msg.height, msg.width = depth.shape
    msg.encoding = encoding
    dtype = "<u2" if encoding == "16UC1" else "<f4"
    msg.step = msg.width * np.dtype(dtype).itemsize
    msg.data = np.ascontiguousarray(depth, dtype=dtype).tobytes()
    return msg


def info_msg(width: int = 640, height: int = 480, k=K) -> CameraInfo:
    info = CameraInfo()
    info.width, info.height = width, height
    info.k = [float(v) for v in k]
    return info


def options(**changes) -> NodeOptions:
    return NodeOptions(depth_enabled=True).replace(**changes)


def reference_points(z: np.ndarray, k) -> np.ndarray:
    """x, y, z of every pixel through K^-1 (an independent computation: no separable rays)."""
    h, w = z.shape
    v, u = np.mgrid[0:h, 0:w]
    pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size)]).astype(np.float64)
    rays = np.linalg.inv(np.asarray(k, dtype=np.float64).reshape(3, 3)) @ pix
    return (rays * z.ravel()[None, :]).T.reshape(h, w, 3)


def cloud(depth: np.ndarray, labels=None, conf=None, k=K, num_classes=5, stride=1, info_size=None):
    """Build a cloud straight from metres (NaN = invalid) through DepthInput's pieces."""
    h, w = depth.shape if labels is None else labels.shape
    labels = np.zeros((h, w), np.uint8) if labels is None else labels
    conf = np.zeros((h, w), np.uint8) if conf is None else conf
    intr = Pt.intrinsics_for(k, info_size or (w, h), (w, h))
    grid = Dp.sample_grid(depth, w, h, stride)
    msg = Pt.CloudBuilder().message(Header(), grid, labels, conf, intr, num_classes, stride)
    return Pt.cloud_to_array(msg)


def xyz(arr: np.ndarray) -> np.ndarray:
    return np.stack([arr["x"], arr["y"], arr["z"]], axis=-1).astype(np.float64)


# --- back-projection ---------------------------------------------------------------------------


def test_fronto_parallel_plane_matches_the_inverse_of_k():
    z = np.full((480, 640), 2.5, np.float32)
    got = xyz(cloud(z))
    np.testing.assert_allclose(got, reference_points(z, K), rtol=1e-6, atol=1e-6)
    # the corners by hand: (u - cx) / fx * z
    assert got[0, 0, 0] == pytest.approx((0 - 319.5) / 400 * 2.5, rel=1e-6)
    assert got[479, 639, 1] == pytest.approx((479 - 239.5) / 420 * 2.5, rel=1e-6)


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
def test_tilted_floor_lies_on_its_plane(encoding):
    """The sample camera's floor: every valid point is on the plane n . p = h (n = down)."""
    height, pitch = 1.2, 25.0
    mm = floor_depth(640, 480, K, camera_height=height, pitch_deg=pitch)
    data = mm if encoding == "16UC1" else np.where(mm > 0, mm / 1000.0, 0.0).astype(np.float32)
    raw, scale = Dp.depth_array(depth_msg(data, encoding))
    z = Dp.to_metres(raw, scale, max_range=50.0)
    got = xyz(cloud(z))
    valid = np.isfinite(got[..., 2])
    assert valid[-1].all() and not valid[0].any()  # the floor below, nothing at the horizon
    p = math.radians(pitch)
    normal = np.array([0.0, math.cos(p), math.sin(p)])
    distance = got[valid] @ normal
    np.testing.assert_allclose(distance, height, atol=2e-3 * 50)  # 1 mm rounding at <= 50 m
    near = valid & (got[..., 2] < 5.0)
    np.testing.assert_allclose(got[near] @ normal, height, atol=2e-3)
    np.testing.assert_allclose(got[valid], reference_points(z, K)[valid], rtol=1e-5, atol=1e-5)


def test_16uc1_and_32fc1_give_the_same_points():
    mm = np.random.default_rng(0).integers(1, 9000, (48, 64)).astype(np.uint16)
    a = Dp.to_metres(*Dp.depth_array(depth_msg(mm, "16UC1")), 100.0)
    b = Dp.to_metres(*Dp.depth_array(depth_msg(mm / np.float32(1000), "32FC1")), 100.0)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_invalid_depth_gives_nan_points():
    metres = np.array([[0.0, np.nan, np.inf, -1.0, 10.5, 3.0, 10.0]], np.float32)
    z = Dp.to_metres(*Dp.depth_array(depth_msg(metres, "32FC1")), max_range=10.0)
    got = cloud(z, k=[100, 0, 3, 0, 100, 0, 0, 0, 1])
    for field in "xyz":
        assert np.isnan(got[field][0, :5]).all(), field
        assert np.isfinite(got[field][0, 5:]).all(), field
    assert got["z"][0, 5] == pytest.approx(3.0) and got["z"][0, 6] == pytest.approx(10.0)
    mm = np.array([[0, 1500, 65535]], np.uint16)
    z16 = Dp.to_metres(*Dp.depth_array(depth_msg(mm, "16UC1")), max_range=10.0)
    assert np.isnan(z16[0, 0]) and z16[0, 1] == pytest.approx(1.5) and np.isnan(z16[0, 2])


def test_depth_decoding_honours_step_and_byte_order():
    mm = np.arange(12, dtype=np.uint16).reshape(3, 4) * 100
    msg = depth_msg(mm, "16UC1")
    msg.is_bigendian = 1
    msg.step = 10  # 2 bytes of padding per row
    rows = np.zeros((3, 10), np.uint8)
    rows[:, :8] = mm.astype(">u2").view(np.uint8).reshape(3, 8)
    msg.data = rows.tobytes()
    raw, scale = Dp.depth_array(msg)
    np.testing.assert_array_equal(raw, mm)
    assert scale == 0.001


@pytest.mark.parametrize(
    ("encoding", "match"),
    [("mono16", "16UC1"), ("rgb8", "not supported")],
)
def test_other_depth_encodings_are_refused_with_the_reason(encoding, match):
    msg = depth_msg(np.ones((2, 2), np.uint16), "16UC1")
    msg.encoding = encoding
    with pytest.raises(Dp.DepthError, match=match):
        Dp.depth_array(msg)


def test_short_depth_buffer_is_refused():
    msg = depth_msg(np.ones((4, 4), np.uint16), "16UC1")
    msg.height = 8
    with pytest.raises(Dp.DepthError, match="does not fit"):
        Dp.depth_array(msg)


# --- resampling and stride ---------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), [((320, 240), (640, 480)), ((1280, 720), (640, 480))])
def test_resampled_depth_is_nearest_neighbour_of_pixel_centres(src, dst):
    """Against the pixel-centre rule computed here: source index floor((i + 0.5) * src / dst).

    (OpenCV's INTER_NEAREST_EXACT follows the same rule from 4.7 on; 4.6, Jazzy's, downscales
    differently, so the reference is computed independently.)
    """
    rng = np.random.default_rng(1)
    raw = rng.integers(1, 60000, (src[1], src[0])).astype(np.uint16)
    got = Dp.sample_grid(raw, *dst)
    rows = np.minimum(((np.arange(dst[1]) + 0.5) * src[1] / dst[1]).astype(int), src[1] - 1)
    cols = np.minimum(((np.arange(dst[0]) + 0.5) * src[0] / dst[0]).astype(int), src[0] - 1)
    np.testing.assert_array_equal(got, raw[rows][:, cols])
    if int(cv2.__version__.split(".")[0]) >= 5:
        want = cv2.resize(raw, dst, interpolation=cv2.INTER_NEAREST_EXACT)
        np.testing.assert_array_equal(got, want)


def test_resampled_depth_uses_k_of_the_label_size():
    """A 320x240 registered depth of a plane, labels at 640x480: points at the label pixels."""
    z_small = np.full((240, 320), 1.5, np.float32)
    got = xyz(cloud(z_small, labels=np.zeros((480, 640), np.uint8)))
    np.testing.assert_allclose(got, reference_points(np.full((480, 640), 1.5), K), atol=1e-5)


def test_k_of_another_size_is_scaled_to_the_labels():
    """camera_info of a 1280x960 image (K doubled, centres scaled) used for 640x480 labels."""
    k_big = [800.0, 0.0, 640.0, 0.0, 840.0, 480.0, 0.0, 0.0, 1.0]
    intr = Pt.intrinsics_for(k_big, (1280, 960), (640, 480))
    assert (intr.fx, intr.fy, intr.cx, intr.cy) == (400.0, 420.0, 319.75, 239.75)
    with pytest.raises(ValueError, match="focal length"):
        Pt.intrinsics_for([0.0] * 9, (0, 0), (640, 480))


@pytest.mark.parametrize("stride", [2, 3, 7])
def test_stride_keeps_every_stride_th_pixel(stride):
    rng = np.random.default_rng(2)
    z = rng.uniform(0.5, 8.0, (480, 640)).astype(np.float32)
    labels = rng.integers(0, 5, (480, 640)).astype(np.uint8)
    conf = rng.integers(0, 256, (480, 640)).astype(np.uint8)
    full = cloud(z, labels, conf)
    thin = cloud(z, labels, conf, stride=stride)
    assert thin.shape == (math.ceil(480 / stride), math.ceil(640 / stride))
    np.testing.assert_array_equal(thin, full[::stride, ::stride])


# --- fields and message --------------------------------------------------------------------------


def test_label_confidence_and_rgb_fields():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, (30, 40)).astype(np.uint8)
    labels[0, :5] = 255
    conf = rng.integers(0, 256, (30, 40)).astype(np.uint8)
    got = cloud(np.ones((30, 40), np.float32), labels, conf, num_classes=4)
    np.testing.assert_array_equal(got["label"], labels)
    np.testing.assert_array_equal(got["confidence"], conf)
    packed = got["rgb"].view(np.uint32)
    colors = class_colors(4).astype(np.uint32)
    table = (colors[:, 0] << 16) | (colors[:, 1] << 8) | colors[:, 2]
    lab = labels != 255
    np.testing.assert_array_equal(packed[lab], table[labels[lab]])
    assert (packed[~lab] == 0x808080).all()


def test_uint16_labels_keep_their_unlabeled_value():
    labels = np.array([[0, 299, 65535]], np.uint16)
    got = cloud(np.ones((1, 3), np.float32), labels, num_classes=300, k=[1, 0, 0, 0, 1, 0, 0, 0, 1])
    assert got["label"].tolist() == [[0, 299, 65535]]
    assert got["rgb"].view(np.uint32)[0, 2] == 0x808080


def test_cloud_message_layout():
    header = Header(frame_id="cam_color_optical_frame")
    header.stamp.sec, header.stamp.nanosec = 12, 345
    z = np.ones((6, 8), np.float32)
    intr = Pt.intrinsics_for(K, (640, 480), (8, 6))
    builder = Pt.CloudBuilder()
    msg = builder.message(
        header, z, np.zeros((6, 8), np.uint8), np.zeros((6, 8), np.uint8), intr, 3
    )
    assert isinstance(msg, PointCloud2)
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (6, 8, 20, 160)
    assert len(msg.data) == 6 * 160 and not msg.is_bigendian and not msg.is_dense
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
        ("x", 0, PointField.FLOAT32, 1),
        ("y", 4, PointField.FLOAT32, 1),
        ("z", 8, PointField.FLOAT32, 1),
        ("rgb", 12, PointField.FLOAT32, 1),
        ("label", 16, PointField.UINT16, 1),
        ("confidence", 18, PointField.UINT8, 1),
    ]
    assert msg.header == header and msg.header is not header
    # a second cloud does not change the first (the builder reuses its buffer)
    first = bytes(msg.data)
    builder.message(header, z * 2, np.ones((6, 8), np.uint8), np.ones((6, 8), np.uint8), intr, 3)
    assert bytes(msg.data) == first


# --- pairing by stamp ----------------------------------------------------------------------------

MS = 1_000_000


def test_pairing_takes_the_closest_depth_within_the_tolerance():
    pairing = Dp.DepthPairing()
    for t in (100, 133, 166):
        pairing.add_depth(t * MS, f"d{t}")
    pairing.add_color(140 * MS)
    pairing.hold(140 * MS)
    assert pairing.release(140 * MS, 10 * MS) == "d133"
    pairing.add_color(200 * MS)
    pairing.hold(200 * MS)
    assert pairing.release(200 * MS, 20 * MS) is None  # 34 ms away: a miss


def test_depth_arriving_after_its_frame_is_still_paired():
    """The depth partner comes in while the frame is segmented: the frame never waited."""
    pairing = Dp.DepthPairing()
    pairing.add_depth(0 + 1, "stale")
    pairing.add_color(500 * MS)
    pairing.hold(500 * MS)
    for t in range(501, 530):  # newer colour frames replace it in the slot meanwhile
        pairing.add_color(t * MS)
    pairing.add_depth(502 * MS, "late")
    assert pairing.release(500 * MS, 5 * MS) == "late"


def test_pairing_is_bounded_and_forgets_older_frames():
    pairing = Dp.DepthPairing()
    for t in range(1000):
        pairing.add_depth(t * MS, t)
        pairing.add_color(t * MS)
    assert len(pairing._partners) <= Dp.WAITING_COLOR
    assert len(pairing._recent) <= Dp.RECENT_DEPTH
    pairing.hold(999 * MS)
    assert pairing.release(999 * MS, 0) == 999
    assert not pairing._partners


def test_unstamped_frames_take_the_newest_depth():
    pairing = Dp.DepthPairing()
    assert pairing.release(0, 0) is None
    pairing.add_depth(0, "a")
    pairing.add_depth(0, "b")
    pairing.hold(0)
    assert pairing.release(0, 0) == "b"


def test_depth_input_counts_what_it_could_not_make():
    d = Dp.DepthInput()
    header = depth_msg(np.ones((4, 4), np.uint16), "16UC1").header
    labels = np.zeros((4, 4), np.uint8)
    d.on_color(header)
    d.hold(header)
    assert d.cloud(header, labels, labels, 2, info_msg(4, 4), options()) is None
    assert d.missing == 1 and "depth.tolerance" in d.problem
    d.on_depth(depth_msg(np.ones((4, 4), np.uint16) * 1000, "16UC1"))
    d.on_color(header)
    d.hold(header)
    assert d.cloud(header, labels, labels, 2, None, options()) is None
    assert d.unusable == 1 and "camera_info" in d.problem
    d.on_color(header)
    d.hold(header)
    msg = d.cloud(header, labels, labels, 2, None, options(depth_camera_info="depth"))
    assert msg is None and "depth/camera_info" in d.problem
    d.depth_info = info_msg(4, 4, [2, 0, 1.5, 0, 2, 1.5, 0, 0, 1])
    d.on_color(header)
    d.hold(header)
    msg = d.cloud(header, labels, labels, 2, None, options(depth_camera_info="depth"))
    assert msg is not None and d.published == 1
    assert np.allclose(Pt.cloud_to_array(msg)["z"], 1.0)


# --- the sample camera's depth -------------------------------------------------------------------


def test_sample_camera_floor_depth_is_registered_16uc1():
    info = pinhole_camera_info(320, 240, Header())
    mm = floor_depth(320, 240, info.k)
    assert mm.dtype == np.uint16 and mm.shape == (240, 320)
    msg = depth_to_msg(mm, Header(frame_id="camera"))
    assert (msg.encoding, msg.width, msg.height, msg.step) == ("16UC1", 320, 240, 640)
    rows = mm[:, 0].astype(float)
    assert rows[-1] > 0 and (np.diff(rows[rows > 0]) <= 0).all()  # nearer towards the bottom
    fy, cy = info.k[4], info.k[5]
    v = 200
    expected = 1000.0 / (math.cos(math.radians(30)) * (v - cy) / fy + math.sin(math.radians(30)))
    assert mm[v, 10] == round(expected)


def test_cloud_of_the_node_options():
    """The cloud honours depth.max_range and points.stride as set at run time."""
    d = Dp.DepthInput()
    mm = floor_depth(64, 48, [40, 0, 31.5, 0, 40, 23.5, 0, 0, 1])
    msg_in = depth_msg(mm, "16UC1")
    d.on_depth(msg_in)
    d.on_color(msg_in.header)
    d.hold(msg_in.header)
    labels = np.zeros((48, 64), np.uint8)
    opts = options(points_stride=4, depth_max_range=3.0)
    msg = d.cloud(
        msg_in.header,
        labels,
        labels,
        1,
        info_msg(64, 48, [40, 0, 31.5, 0, 40, 23.5, 0, 0, 1]),
        opts,
    )
    arr = Pt.cloud_to_array(msg)
    assert arr.shape == (12, 16)
    z = arr["z"]
    assert np.nanmax(z) <= 3.0 and np.isnan(z).any()


# --- the node, in-process ------------------------------------------------------------------------


def _by_stamp(received: list) -> dict:
    return {(m.header.stamp.sec, m.header.stamp.nanosec): m for _, m in received}


def _keys(received: list) -> set:
    return set(_by_stamp(received))


class RgbdCamera:
    """The peer as an RGB-D camera: image, camera_info and a registered depth, one header."""

    def __init__(self, h, width: int = 320, height: int = 240, depth_size=None):
        from nodeharness import sample_frame

        from ovseg_ros.ros.encode import rgb_to_msg

        self.h = h
        self.rgb = rgb_to_msg(sample_frame(width, height), None)
        self.info = pinhole_camera_info(width, height, Header())
        dw, dh = depth_size or (width, height)
        self.depth_mm = floor_depth(dw, dh, pinhole_camera_info(dw, dh, Header()).k)
        self.image_pub = h.publisher("image")
        self.info_pub = h.publisher("camera_info", CameraInfo)
        self.depth_pub = h.publisher("depth")
        self.with_depth = True
        self.sent = 0

    def publish(self) -> None:
        self.h.stamp(self.rgb)
        self.info.header = self.rgb.header
        self.info_pub.publish(self.info)
        self.image_pub.publish(self.rgb)
        if self.with_depth:  # after the colour frame, as a separate driver thread may
            self.depth_pub.publish(depth_to_msg(self.depth_mm, self.rgb.header))
        self.sent += 1


def test_node_publishes_the_aligned_cloud(harness, tiny_backbone):
    """~/points of a frame: same header as ~/labels, label / confidence equal pixel for pixel,
    x, y, z on the floor the depth shows (through the colour camera_info's K)."""
    from ovseg_ros.ros.decode import msg_to_array

    h = harness(backbone=tiny_backbone, depth__enabled=True)
    camera = RgbdCamera(h)
    labels = h.collect("/ovseg/labels")
    confidence = h.collect("/ovseg/confidence")
    points = h.collect("/ovseg/points", PointCloud2)

    def complete() -> bool:
        return bool(_keys(labels) & _keys(confidence) & _keys(points))

    assert h.stream(camera.publish, complete, timeout=60), (len(labels), len(points))
    stamp = sorted(_keys(labels) & _keys(confidence) & _keys(points))[-1]
    lab, conf, pts = (_by_stamp(r)[stamp] for r in (labels, confidence, points))
    assert pts.header == lab.header and pts.header.frame_id == "camera_optical"
    assert (pts.width, pts.height) == (lab.width, lab.height) == (320, 240)
    arr = Pt.cloud_to_array(pts)
    np.testing.assert_array_equal(arr["label"], msg_to_array(lab))
    np.testing.assert_array_equal(arr["confidence"], msg_to_array(conf))
    z = np.where(camera.depth_mm > 0, camera.depth_mm / 1000.0, np.nan)
    z[z > 10.0] = np.nan  # depth.max_range
    want = reference_points(z, camera.info.k)
    np.testing.assert_allclose(xyz(arr), want, rtol=1e-5, atol=1e-5)
    assert np.isfinite(arr["z"]).all()  # the whole view is floor, nearer than max_range
    values = {kv.key: kv.value for kv in h.node.diagnostics().values}
    assert int(values["camera: points published"]) >= 1
    assert int(values["camera: depth images received"]) >= 1


def test_missing_depth_is_counted_and_never_blocks_colour(harness, tiny_backbone):
    h = harness(backbone=tiny_backbone, depth__enabled=True)
    camera = RgbdCamera(h)
    camera.with_depth = False
    labels = h.collect("/ovseg/labels")
    points = h.collect("/ovseg/points", PointCloud2)
    depth = h.node.cameras[""].depth
    # (the first labels may go out before the points subscription is matched: not wanted yet)
    assert h.stream(camera.publish, lambda: len(labels) >= 2 and depth.missing >= 2, timeout=60)
    assert not points and depth.published == 0
    status = h.node.diagnostics()
    values = {kv.key: kv.value for kv in status.values}
    assert int(values["camera: points not made: no depth within depth.tolerance"]) >= 2
    assert status.level == b"\x01" and "depth.tolerance" in status.message
    # depth comes: clouds follow, the counter stays
    camera.with_depth = True
    assert h.stream(camera.publish, lambda: len(points) >= 1, timeout=60)


def test_depth_of_another_resolution_and_stride(harness, tiny_backbone):
    """A 160x120 depth for 320x240 frames, points.stride 4 set at run time: an 80x60 cloud."""
    h = harness(backbone=tiny_backbone, depth__enabled=True)
    camera = RgbdCamera(h, depth_size=(160, 120))
    points = h.collect("/ovseg/points", PointCloud2)
    result = h.set_parameters(Parameter("points.stride", value=4))
    assert result[0].successful, result[0].reason
    assert h.stream(camera.publish, lambda: len(points) >= 1, timeout=60)
    arr = Pt.cloud_to_array(points[-1][1])
    assert arr.shape == (60, 80)
    z = np.where(camera.depth_mm > 0, camera.depth_mm / 1000.0, np.nan)
    z = Dp.sample_grid(z, 320, 240)
    want = reference_points(z, camera.info.k)[::4, ::4]
    np.testing.assert_allclose(xyz(arr), want, rtol=1e-5, atol=1e-5)


def test_depth_is_off_by_default(harness, tiny_backbone):
    h = harness(backbone=tiny_backbone)
    assert h.node.cameras[""].depth is None and h.node.cameras[""].publisher("points") is None
    names = {n for n, _ in h.node.get_topic_names_and_types()}
    assert "/ovseg/points" not in names and "/depth" not in names


# --- the nav2 example ----------------------------------------------------------------------------

#: What semantic_segmentation_layer declares per observation source and per class type.
LAYER_SOURCE_KEYS = {
    "segmentation_topic",
    "confidence_topic",
    "labels_topic",
    "pointcloud_topic",
    "observation_persistence",
    "expected_update_rate",
    "class_types",
    "max_obstacle_distance",
    "min_obstacle_distance",
    "tile_map_decay_time",
    "visualize_tile_map",
    "use_cost_selection",
}
LAYER_CLASS_KEYS = {
    "classes",
    "base_cost",
    "max_cost",
    "mark_confidence",
    "samples_to_max_cost",
    "dominant_priority",
}


def test_nav2_example_config_matches_the_node_and_the_layer():
    from pathlib import Path

    import yaml

    from ovseg_ros.engine.text import parse_vocabulary
    from ovseg_ros.ros.param_table import parameter_specs

    config = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "config" / "nav2_semantic_layer.yaml").read_text()
    )
    node = config["/**/ovseg"]["ros__parameters"]
    specs = {s.name: s for s in parameter_specs()}
    for name, value in node.items():
        assert name in specs, name
        assert type(value) is type(specs[name].default), name
    assert node["depth.enabled"] is True and node["points.stride"] == 1
    assert node["output.qos"] == "sensor_data"
    costmap = config["local_costmap"]["local_costmap"]["ros__parameters"]
    layer = costmap["semantic_segmentation_layer"]
    assert layer["plugin"] == "semantic_segmentation_layer::SemanticSegmentationLayer"
    source = layer[layer["observation_sources"]]
    assert set(source) - set(source["class_types"]) <= LAYER_SOURCE_KEYS
    assert source["segmentation_topic"] == "/ovseg/labels"
    assert source["confidence_topic"] == "/ovseg/confidence"
    assert source["labels_topic"] == "/ovseg/label_info"
    assert source["pointcloud_topic"] == "/ovseg/points"
    named = []
    for class_type in source["class_types"]:
        assert set(source[class_type]) == LAYER_CLASS_KEYS, class_type
        named += source[class_type]["classes"]
    # LabelInfo carries each class's name (its first entry); each is in exactly one class type
    names = [c.name for c in parse_vocabulary(node["vocabulary"])]
    assert sorted(named) == sorted(names)
