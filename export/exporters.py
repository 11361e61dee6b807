"""Writers for each served format. Every file embeds the checkpoint's serving config (`cxr_config.json`)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from cxr_core.backends import CONFIG_KEY


def example_input(config: dict[str, Any], batch_size: int = 2) -> torch.Tensor:
    size, channels = config["preprocessing"]["image_size"], config["preprocessing"]["channels"]
    return torch.randn(batch_size, channels, size, size)


def export_torchscript(model: torch.nn.Module, config: dict[str, Any], path: str | os.PathLike) -> Path:
    """Trace the eval-mode model (CNNs have no data-dependent control flow) and embed the config."""
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), example_input(config))
    traced = torch.jit.freeze(traced)
    torch.jit.save(traced, str(path), _extra_files={CONFIG_KEY: json.dumps(config)})
    return Path(path)


def _set_metadata(model: onnx.ModelProto, config: dict[str, Any]) -> None:
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = CONFIG_KEY, json.dumps(config)


# Stated here, not left to the exporter's default, so the file (and what the docs say of it) does not change
# with the torch version.
ONNX_OPSET = 20


def export_onnx(model: torch.nn.Module, config: dict[str, Any], path: str | os.PathLike) -> Path:
    """Export with a dynamic batch axis at opset ONNX_OPSET, embed the config, run onnx.checker. A model with
    a population check (cxr_core.population.CheckedModel) gets a second output, `population`."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = example_input(config)
    with torch.no_grad():
        outputs = model.eval()(example)
        names = ["logits", "population"] if isinstance(outputs, tuple) else ["logits"]
        torch.onnx.export(
            model, (example,), str(path), input_names=["input"], output_names=names,
            dynamic_shapes=({0: batch},), opset_version=ONNX_OPSET, verbose=False,
        )
    exported = onnx.load(str(path))
    _set_metadata(exported, config)
    onnx.checker.check_model(exported, full_check=True)
    onnx.save(exported, str(path))
    return Path(path)


def export_aoti(model: torch.nn.Module, config: dict[str, Any], path: str | os.PathLike,
                max_batch: int = 64) -> Path:
    """torch.export with a dynamic batch axis, compiled by AOTInductor (weights frozen into the kernels) into a
    `.pt2` package with the config in its metadata. Needs a C++ compiler (g++) now, none at load time; the
    package is built for this machine's CPU instruction set (or its GPU when `model` is on CUDA)."""
    import torch._inductor

    batch = torch.export.Dim("batch", min=1, max=max_batch)
    example = example_input(config).to(next(model.parameters()).device)
    with torch.no_grad():
        exported = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
        torch._inductor.aoti_compile_and_package(
            exported, package_path=str(path),
            inductor_configs={"aot_inductor.metadata": {CONFIG_KEY: json.dumps(config)}, "freezing": True})
    return Path(path)


class _CalibrationReader:
    """Feeds ONNX Runtime's static quantizer one preprocessed training batch at a time."""

    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self.input_name = input_name
        self.batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:  # pragma: no cover - not used by the MinMax calibrator
        pass


def nodes_outside_logits(graph: onnx.GraphProto) -> list[str]:
    """The nodes the `logits` output does not depend on: the population check's own (kept in fp32, so int8
    changes its score only through the feature maps it reads)."""
    producers = {output: node for node in graph.node for output in node.output}
    needed, pending = set(), [graph.output[0].name]
    while pending:
        node = producers.get(pending.pop())
        if node is not None and node.name not in needed:
            needed.add(node.name)
            pending.extend(node.input)
    return [node.name for node in graph.node if node.name not in needed]


def quantize_onnx_int8(fp32_path: str | os.PathLike, path: str | os.PathLike, calibration: np.ndarray,
                       batch_size: int = 16) -> Path:
    """ONNX Runtime static int8 quantization (QDQ, per-channel int8 weights, uint8 activations).

    The stem convolution and the classifier stay in fp32: quantizing them flipped 1.3% of the validation
    labels of the default ResNet-18 at its threshold, keeping them fp32 flips 0.2% for the same speed-up. So do
    the population check's nodes (`nodes_outside_logits`).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = onnx.load(str(fp32_path))
    config = json.loads({p.key: p.value for p in source.metadata_props}[CONFIG_KEY])
    input_name = source.graph.input[0].name
    batches = [np.ascontiguousarray(calibration[i:i + batch_size], dtype=np.float32)
               for i in range(0, len(calibration), batch_size)]
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared)).graph
        stem = next(node.name for node in graph.node if node.op_type == "Conv")
        classifier = [node.name for node in graph.node if node.op_type in ("Gemm", "MatMul")]
        quantize_static(
            str(prepared), str(path), _CalibrationReader(input_name, batches), quant_format=QuantFormat.QDQ,
            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=[stem, *classifier, *nodes_outside_logits(graph)],
        )
    quantized = onnx.load(str(path))
    _set_metadata(quantized, config)
    onnx.checker.check_model(quantized)
    onnx.save(quantized, str(path))
    return Path(path)
