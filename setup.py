"""Build script for the ovseg_ros ament_python package (colcon and pip both use it)."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE_NAME = "ovseg_ros"

setup(
    name=PACKAGE_NAME,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    package_data={"ovseg_ros.engine": ["model_configs/*.json"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE_NAME}"]),
        (f"share/{PACKAGE_NAME}", ["package.xml"]),
        (f"share/{PACKAGE_NAME}/launch", glob("launch/*.py")),
        (
            f"share/{PACKAGE_NAME}/config",
            glob("config/*.yaml") + glob("config/*.rviz") + glob("config/*.xml"),
        ),
        (f"share/{PACKAGE_NAME}/config/vocabularies", glob("config/vocabularies/*.txt")),
    ],
    # Runtime dependencies come from rosdep (package.xml) or requirements.txt, not from pip here.
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="ovseg_ros maintainers",
    maintainer_email="maintainers@ovseg-ros.invalid",
    description="Open-vocabulary semantic segmentation for ROS 2 with CLIP.",
    license="Apache-2.0",
    # `tests_require` is gone from setuptools; current ros2 pkg templates use this extra.
    extras_require={"test": ["pytest"], "fgc": ["diffusers==0.42.1", "transformers"]},
    entry_points={
        "console_scripts": [
            "ovseg = ovseg_ros.cli:main",
            "ovseg_node = ovseg_ros.ros.runner:main",
            "ovseg_lifecycle_node = ovseg_ros.ros.runner:main_lifecycle",
            "set_vocabulary = ovseg_ros.ros.set_vocabulary:main",
            "sample_camera = ovseg_ros.ros.sample_camera:main",
        ],
    },
)
