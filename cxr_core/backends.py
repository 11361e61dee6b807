"""One interface over the model files we serve: an eager checkpoint (`.pt`), TorchScript (`.ts`), ONNX
(`.onnx`, fp32 or int8) and AOTInductor packages (`.pt2`). Each file carries its own serving config (class
names, preprocessing, threshold), so the handler needs nothing but the file. `run` takes a preprocessed float
batch and returns calibrated softmax probabilities (logits divided by the checkpoint's fitted temperature)
and the population check's scores (None for a model without one: cxr_core.population), as NumPy arrays;
`predict` only the probabilities.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_core.checkpoint import ServingConfig, load_checkpoint, model_from_checkpoint
from cxr_core.decision import calibrated_probabilities
from cxr_core.population import CHECKPOINT_KEY, CheckedModel
from cxr_core.variants import variant_of

CONFIG_KEY = "cxr_config.json"


Prediction = tuple[np.ndarray, np.ndarray | None]  # (probabilities, population scores or None)


def embedded_config(metadata: dict[str, str], path: str | os.PathLike, kind: str) -> ServingConfig:
    """The serving config an exported file carries in its metadata (`python -m export` writes it)."""
    if CONFIG_KEY not in metadata:
        raise ValueError(f"{path}: {kind} has no {CONFIG_KEY} metadata (export it with `python -m export`)")
    return ServingConfig.from_dict(json.loads(metadata[CONFIG_KEY]))


def _prediction(output: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor], temperature: float
                ) -> Prediction:
    """A torch model's output (logits, or logits and population scores) as the backends answer it."""
    logits, population = output if isinstance(output, (tuple, list)) else (output, None)
    probabilities = calibrated_probabilities(logits.float().cpu().numpy(), temperature)
    return probabilities, None if population is None else population.float().cpu().numpy()


class Backend:
    """What every runtime answers: `run` -> (probabilities, population scores or None); `predict` is the
    probabilities alone (timings and parity checks)."""

    def run(self, batch: torch.Tensor | np.ndarray) -> Prediction:
        raise NotImplementedError

    def predict(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.run(batch)[0]


class TorchBackend(Backend):
    """Eager checkpoint or TorchScript module on CPU or CUDA (optionally fp16 on CUDA). `model` is the
    classifier (Grad-CAM hooks it); `network` what runs: the classifier fused with its population check when
    `check` is given (an exported TorchScript module already returns both)."""

    def __init__(self, model: torch.nn.Module, config: ServingConfig, device: str = "cpu", half: bool = False,
                 name: str = "eager", check: dict[str, Any] | None = None) -> None:
        self.device = torch.device(device)
        self.half = half and self.device.type == "cuda"
        self.model = model.to(self.device).eval()
        self.network = CheckedModel(self.model, check).to(self.device).eval() if check else self.model
        if self.half:
            self.network = self.network.half()
        self.config = config
        self.name = name

    def run(self, batch: torch.Tensor | np.ndarray) -> Prediction:
        batch = torch.as_tensor(batch).to(self.device)
        with torch.inference_mode():
            output = self.network(batch.half() if self.half else batch)
        return _prediction(output, self.config.temperature)


class OnnxBackend(Backend):
    """ONNX Runtime session: CUDA execution provider when asked and available, CPU otherwise."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 spin: bool = True, name: str = "onnx") -> None:
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
        self.config = embedded_config(self.session.get_modelmeta().custom_metadata_map, path, "ONNX file")
        self.name = name
        self.providers = self.session.get_providers()

    def run(self, batch: torch.Tensor | np.ndarray) -> Prediction:
        array = batch.numpy() if isinstance(batch, torch.Tensor) else batch
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(array, dtype=np.float32)})
        population = outputs[1].astype(np.float32) if len(outputs) > 1 else None  # second output: the check
        return calibrated_probabilities(outputs[0], self.config.temperature), population


class AotiBackend(Backend):
    """A torch.export + AOTInductor package (`.pt2`): compiled kernels, no Python model code; the config is in
    its metadata. It returns (logits, population) when the model has a check, like the other files."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", name: str = "aotinductor") -> None:
        import torch._inductor

        self.device = torch.device(device)
        index = self.device.index if self.device.type == "cuda" and self.device.index is not None else -1
        self.runner = torch._inductor.aoti_load_package(str(path), device_index=index)
        self.config = embedded_config(self.runner.get_metadata(), path, "AOTInductor package")
        self.name = name

    def run(self, batch: torch.Tensor | np.ndarray) -> Prediction:
        batch = torch.as_tensor(batch, dtype=torch.float32).to(self.device).contiguous()
        with torch.inference_mode():
            output = self.runner(batch)
        return _prediction(output, self.config.temperature)


def load_backend(path: str | os.PathLike, device: str = "cpu", *, threads: int | None = None,
                 half: bool = False, spin: bool = True) -> Backend:
    """Pick the runtime from the file name (`cxr_core.variants`): ONNX Runtime, TorchScript or the checkpoint."""
    path = Path(path)
    variant = variant_of(path)
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    if variant.runtime == "onnxruntime":
        return OnnxBackend(path, device, threads, spin, name=variant.label)
    if variant.runtime == "aotinductor":
        return AotiBackend(path, device, name=variant.label)
    if variant.name == "ts":
        extra_files = {CONFIG_KEY: ""}
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra_files)
        config = embedded_config({key: text for key, text in extra_files.items() if text}, path, "TorchScript file")
        return TorchBackend(module, config, device, half, name=variant.label)
    checkpoint = load_checkpoint(path)
    return TorchBackend(model_from_checkpoint(checkpoint), ServingConfig.from_checkpoint(checkpoint), device, half,
                        check=checkpoint.get(CHECKPOINT_KEY))
