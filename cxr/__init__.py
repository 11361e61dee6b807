"""Code shared by training, export and serving: preprocessing, models, checkpoints, backends, data, metrics.

Two layers in one package. What the serving handler imports (read off its import lines by
`export.archive.serving_modules`: preprocessing, models, checkpoint, backends, decision, inputs, variants,
gate, explain) is copied into every `.mar` archive and imports nothing else of the project. The rest (metrics and
reports, data, paths, server, client, cli, lifecycle, demo, healthcheck) runs beside TorchServe, never inside it.
"""
