"""The model variants we export, archive and serve: one table, one name per variant.

The name is the one users see in archive file names (`pneumonia_ts.mar`) and pass on command lines
(`--formats ts`, `--default onnx`); `label` is the word reports print; `file_name` is what `python -m export`
writes and what an archive carries; `runtime` is what loads it; `exact` says whether it must give eager's
probabilities (fp32) or only keep its labels and AUC (int8).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    file_name: str
    runtime: str
    exact: bool = True


VARIANTS = {variant.name: variant for variant in (
    Variant("eager", "eager", "model.pt", "torch"),
    Variant("ts", "torchscript", "model.ts", "torch"),
    Variant("onnx", "onnx", "model.onnx", "onnxruntime"),
    Variant("int8", "int8", "model.int8.onnx", "onnxruntime", exact=False),
    # torch.export + AOTInductor: compiled C++ for this machine's CPU (or GPU), what replaces TorchScript.
    Variant("aoti", "aotinductor", "model.pt2", "aotinductor"),
)}
EXPORTED = [name for name in VARIANTS if name != "eager"]  # eager is the checkpoint itself


def variant_of(path: str | Path) -> Variant:
    """The variant a model file is, from its name (`model.int8.onnx` -> int8, any other `.onnx` -> onnx)."""
    name = Path(path).name
    for variant in VARIANTS.values():
        if name == variant.file_name:
            return variant
    suffixes = {".pt": "eager", ".ts": "ts", ".onnx": "onnx", ".pt2": "aoti"}
    suffix = Path(name).suffix
    if suffix not in suffixes:
        raise ValueError(f"{path}: unknown model file type (expected .pt, .ts, .onnx or .pt2)")
    return VARIANTS["int8" if name.endswith(".int8.onnx") else suffixes[suffix]]
