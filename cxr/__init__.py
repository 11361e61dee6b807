"""Code shared by training, export and the serving handler: preprocessing, models, checkpoints, data, metrics.

Only `preprocessing`, `models` and `checkpoint` are needed at serving time; they import nothing from
training and are shipped inside the `.mar` archives.
"""
