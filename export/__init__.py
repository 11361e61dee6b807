"""Export a checkpoint to TorchScript, ONNX, ONNX int8 and AOTInductor, each checked against eager PyTorch
(`python -m export`), and pack the exports into TorchServe archives (`python -m export.archive`)."""
