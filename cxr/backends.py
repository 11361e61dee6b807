"""One interface over the model files we serve: an eager checkpoint (`.pt`), TorchScript (`.ts`) and ONNX
(`.onnx`, fp32 or int8). Each file carries its own serving config (class names, preprocessing, threshold),
so the handler needs nothing but the file. `predict` takes a preprocessed float batch and returns calibrated
softmax probabilities (logits divided by the checkpoint's fitted temperature) as a NumPy array.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr.checkpoint import load_checkpoint, model_from_checkpoint, serving_config
from cxr.metrics import softmax

CONFIG_KEY = "cxr_config.json"


class TorchBackend:
    """Eager checkpoint or TorchScript module on CPU or CUDA (optionally fp16 on CUDA)."""

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], device: str = "cpu", half: bool = False,
                 name: str = "eager") -> None:
        self.device = torch.device(device)
        self.half = half and self.device.type == "cuda"
        self.model = model.to(self.device).eval()
        if self.half:
            self.model = self.model.half()
        self.config = config
        self.temperature = float(config.get("temperature", 1.0))
        self.name = name

    def predict(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        batch = torch.as_tensor(batch).to(self.device)
        with torch.inference_mode():
            logits = self.model(batch.half() if self.half else batch)
        return torch.softmax(logits.float() / self.temperature, dim=1).cpu().numpy()


class OnnxBackend:
    """ONNX Runtime session: CUDA execution provider when asked and available, CPU otherwise."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 spin: bool = True) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Spinning intra-op threads wait hot for the next run; in a server that also decodes images on the same
        # cores, that burns CPU the preprocessing needs (handler setting `onnx_spin`).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            device_id = int(device.split(":")[1]) if ":" in device else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        metadata = self.session.get_modelmeta().custom_metadata_map
        if CONFIG_KEY not in metadata:
            raise ValueError(f"{path}: ONNX file has no {CONFIG_KEY} metadata (export it with `python -m export`)")
        self.config = json.loads(metadata[CONFIG_KEY])
        self.temperature = float(self.config.get("temperature", 1.0))
        self.name = "onnx"
        self.providers = self.session.get_providers()

    def predict(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        array = batch.numpy() if isinstance(batch, torch.Tensor) else batch
        logits = self.session.run(None, {self.input_name: np.ascontiguousarray(array, dtype=np.float32)})[0]
        return softmax(logits.astype(np.float64) / self.temperature).astype(np.float32)


def load_backend(path: str | os.PathLike, device: str = "cpu", *, threads: int | None = None,
                 half: bool = False, spin: bool = True) -> TorchBackend | OnnxBackend:
    """Pick the runtime from the file name: `.onnx` -> ONNX Runtime, `.ts` -> TorchScript, `.pt` -> checkpoint."""
    path = Path(path)
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    if path.suffix == ".onnx":
        return OnnxBackend(path, device, threads, spin)
    if path.suffix == ".ts":
        extra_files = {CONFIG_KEY: ""}
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra_files)
        if not extra_files[CONFIG_KEY]:
            raise ValueError(f"{path}: TorchScript file has no {CONFIG_KEY} (export it with `python -m export`)")
        return TorchBackend(module, json.loads(extra_files[CONFIG_KEY]), device, half, name="torchscript")
    if path.suffix == ".pt":
        checkpoint = load_checkpoint(path)
        return TorchBackend(model_from_checkpoint(checkpoint), serving_config(checkpoint), device, half)
    raise ValueError(f"{path}: unknown model file type (expected .pt, .ts or .onnx)")
