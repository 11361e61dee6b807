"""The shipped core: everything a `.mar` archive carries beside the handler and the model file, and nothing
else (export.archive packs this package whole).

It imports nothing of the project outside itself, so what runs inside TorchServe is exactly this:
preprocessing (decoding and the presets shared with training), models, checkpoint (+ ServingConfig), backends
(eager, TorchScript, ONNX Runtime, AOTInductor), variants, decision (temperature, threshold), gate,
population (the population check and its verdict), explain (Grad-CAM), settings (the handler's typed
settings), policy (every admission and refusal rule, in order), inputs (a batch on its way through the
handler) and served (a model file loaded once, ready to answer). What runs beside the server (server
control, client, CLI, demo page, metrics, reports, data) is the `cxr` package. Two modules keep their
training halves on purpose: `preprocessing` holds the training preset beside the serving one (one definition
of preprocessing, so the two cannot drift) and `checkpoint` writes what it reads (one checkpoint format).
"""
