"""The handler's settings: the `handler:` section of an archive's model-config.yaml, typed and checked.

The defaults are the shipped `handlers/model-config.yaml`'s (a test keeps the two equal), so an archive built
with a shorter YAML behaves as the shipped one. A key that is not a setting, a value of the wrong type or an
unknown population mode fails the worker's load, naming the key: a typo must not silently change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# population_check: refuse (422), warn (200 with inside: false), off (not computed).
POPULATION_MODES = ("refuse", "warn", "off")


@dataclass(frozen=True)
class HandlerSettings:
    threads: int | None = 1  # CPU threads per worker (torch or ONNX Runtime); None leaves the runtime's own
    fp16: bool = False  # half precision on CUDA (eager and TorchScript backends)
    max_images_per_request: int = 16
    max_image_bytes: int = 16 * 1024 * 1024
    max_request_pixels: int = 72_000_000  # pixels decoded per request, checked on each header before decoding
    max_request_seconds: float = 10.0  # decode time per request, checked before each image
    min_side: int = 64  # pixels on the short side
    max_aspect_ratio: float = 4.0
    ood_gate: bool = True  # refuse what is not a chest X-ray; false for research use
    population_check: str = "refuse"
    onnx_spin: bool = False  # hot-waiting ONNX Runtime threads starve decoding on a shared CPU

    def __post_init__(self) -> None:
        if self.population_check not in POPULATION_MODES:
            raise ValueError(f"handler setting population_check: {self.population_check!r} is not one of "
                             f"{', '.join(POPULATION_MODES)}")

    @classmethod
    def from_yaml(cls, section: dict[str, Any] | None) -> HandlerSettings:
        """The settings of a model-config.yaml `handler:` section (None or empty: the defaults)."""
        section = dict(section or {})
        defaults = {field.name: field.default for field in fields(cls)}
        for key, value in section.items():
            if key not in defaults:
                raise ValueError(f"unknown handler setting {key!r} in model-config.yaml; the settings are "
                                 f"{', '.join(defaults)}")
            if not _same_kind(value, defaults[key]) and not (key == "threads" and value is None):
                raise ValueError(f"handler setting {key}: {value!r} is not a {type(defaults[key]).__name__}")
        return cls(**section)


def _same_kind(value: Any, default: Any) -> bool:
    """A value fits a setting whose default is `default`: same type, and a whole number where a float goes."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    return isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))
