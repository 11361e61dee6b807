"""What runs beside TorchServe, never inside it: server control, client and CLI, demo page, metrics and
reports, data folders and paths, gRPC stubs. What an archive carries is the `cxr_core` package."""
