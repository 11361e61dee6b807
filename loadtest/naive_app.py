"""The baseline we compare against: what a user would hand-roll. FastAPI + uvicorn, the same checkpoint in eager
PyTorch, one request at a time (an `async` endpoint that runs the model inline), full-size decoding.

    CXR_CHECKPOINT=models/pneumonia/model.pt uvicorn loadtest.naive_app:app --host 127.0.0.1 --port 8090

Only `make bench` starts it (on a free loopback port); it is not part of the served product.
"""

from __future__ import annotations

import io
import os

import torch
from fastapi import FastAPI, HTTPException, Request
from PIL import Image

from cxr_core.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_config
from cxr_core.preprocessing import EvalPreset

torch.set_num_threads(int(os.environ.get("CXR_THREADS", "2")))
_checkpoint = load_checkpoint(os.environ.get("CXR_CHECKPOINT", "models/pneumonia/model.pt"))
_model = model_from_checkpoint(_checkpoint)
_preset = EvalPreset(preprocess_config(_checkpoint))
_classes = _checkpoint["class_names"]
_temperature = float(_checkpoint.get("temperature", 1.0))
app = FastAPI()


@app.post("/predict")
async def predict(request: Request) -> dict:
    body = await request.body()
    try:
        image = Image.open(io.BytesIO(body)).convert("L")
    except Exception as error:  # noqa: BLE001
        raise HTTPException(status_code=400, detail=f"not an image: {error}") from error
    with torch.inference_mode():
        probabilities = torch.softmax(_model(_preset(image)[None]) / _temperature, dim=1)[0].tolist()
    label = _classes[max(range(len(_classes)), key=probabilities.__getitem__)]
    return {"label": label, "probabilities": dict(zip(_classes, probabilities, strict=True))}
