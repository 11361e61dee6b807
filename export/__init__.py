"""Export a checkpoint to TorchScript, ONNX and ONNX int8, each checked against eager PyTorch (`python -m export`)."""
