"""Method registry; importing this package registers every built-in method."""

from . import (
    cliper,  # noqa: F401 - registers CLIPer
    cliprc,  # noqa: F401 - registers CLIP-RC
    cliptrase,  # noqa: F401 - registers CLIPtrase
    last_block,  # noqa: F401 - registers the last-block methods
    pearl,  # noqa: F401 - registers PEARL
    proxyclip,  # noqa: F401 - registers ProxyCLIP
)
from .base import (
    Method,
    MethodParams,
    available_methods,
    create_method,
    describe_methods,
    make_params,
    method_class,
    register,
)

__all__ = [
    "Method",
    "MethodParams",
    "available_methods",
    "create_method",
    "describe_methods",
    "make_params",
    "method_class",
    "register",
]
