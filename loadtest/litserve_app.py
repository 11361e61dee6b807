"""The baseline a skilled user builds in an afternoon: LitServe around this project's own ONNX model,
with LitServe's dynamic batching (8 requests / 10 ms), ONNX Runtime on 2 threads, JPEG draft-mode decoding,
images sent as base64 JSON `{"image": ...}` (LitServe reads JSON or forms, not raw bodies, and its form
uploads do not cross to its inference process). No token, no gate, no population check, no per-image error
handling: what we compare our stack's speed against.

    CXR_ONNX=runs/export-pneumonia/model.onnx python -m loadtest.litserve_app --port 8091

Only `make bench` starts it (on a free loopback port); it is not part of the served product.
"""

from __future__ import annotations

import argparse
import base64
import os

import litserve as ls
import numpy as np

from cxr_core.backends import embedded_config
from cxr_core.preprocessing import EvalPreset


class XrayAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("CXR_THREADS", "2"))
        self.session = ort.InferenceSession(os.environ["CXR_ONNX"], sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.config = embedded_config(self.session.get_modelmeta().custom_metadata_map, os.environ["CXR_ONNX"],
                                      "ONNX file")
        self.preset = EvalPreset(self.config.preprocessing)  # decodes JPEGs in draft mode at 2x the input size

    def decode_request(self, request: dict) -> np.ndarray:
        return self.preset.load(base64.b64decode(request["image"])).numpy()

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        logits = self.session.run(None, {self.input_name: batch})[0] / self.config.temperature
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, probabilities: np.ndarray) -> dict:
        label = int(self.config.decide(probabilities[None])[0])
        return {"label": self.config.class_names[label],
                "probabilities": dict(zip(self.config.class_names, map(float, probabilities), strict=True))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8091)
    args = parser.parse_args()
    server = ls.LitServer(XrayAPI(max_batch_size=8, batch_timeout=0.01), accelerator="cpu", workers_per_device=1,
                          timeout=60)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
