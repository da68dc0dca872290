"""The head registry: ``model.head.name`` -> a :class:`~fsl_med.models.heads.base.FewShotHead` class, built by
:func:`create_head` (as encoders by :func:`fsl_med.models.encoders.create_encoder`)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, TypeVar

from fsl_med.config import unknown_head
from fsl_med.models.heads.base import FewShotHead

_REGISTRY: dict[str, type[FewShotHead]] = {}
H = TypeVar("H", bound=type[FewShotHead])


def register_head(cls: H) -> H:
    """Class decorator: add a head under ``cls.name``. ValueError for an empty name or one taken by another class."""
    if not cls.name:
        raise ValueError(f"head class {cls.__name__} has no name")
    old = _REGISTRY.get(cls.name)
    if old is not None and old is not cls:
        raise ValueError(f"head name {cls.name!r} is already registered by {old.__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def list_heads() -> list[str]:
    """Names of the registered heads, in registration order."""
    return list(_REGISTRY)


def get_head_class(name: str) -> type[FewShotHead]:
    """The class registered as ``name``; ConfigError naming ``model.head.name``, the closest name and all names."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise unknown_head(name, list_heads())
    return cls


def create_head(name: str, feature_size: int = 32, scale: float = 20.0, mask_pooling: str = "nearest",
                options: Mapping[str, Any] | Any | None = None, in_channels: int = 0,
                pooled_channels: int = 0) -> FewShotHead:
    """Build head ``name``; ``options`` are its config section (``model.head.<name>``: a mapping or dataclass, keys as
    the head's keyword arguments; missing keys keep the head's defaults). ``in_channels`` / ``pooled_channels``: the
    encoder's main-map channels and pooled-vector size, passed to a head whose constructor takes them (heads with
    learned layers over features)."""
    cls = get_head_class(name)
    if options is not None and dataclasses.is_dataclass(options):
        options = dataclasses.asdict(options)
    kwargs = dict(options or {})
    params = inspect.signature(cls.__init__).parameters
    for key, value in (("in_channels", in_channels), ("pooled_channels", pooled_channels)):
        if key in params:
            kwargs[key] = int(value)
    return cls(feature_size=feature_size, scale=scale, mask_pooling=mask_pooling, **kwargs)
