"""Fine-tuning an adapted model. One module per step of a run:

- ``runner``: :func:`train` (the public signature) and the orchestration: options, prepare, cache,
  lr, epochs, outputs.
- ``options``: the validated :class:`TrainOptions`; ``resume``: which checkpoint, its arguments
  back, its tensors back; ``prepare``: checks, OUT, seeding, device, loaders, optimizer (a ``Run``).
- ``loop``: the epoch loop; ``predictions``: the one prediction loop (validation, confusion matrix,
  ``evaluate``); ``cache``: the feature cache; ``device``: device and autocast.
- ``data``, ``optim``, ``state``, ``outputs``, ``plots``, ``distributed``: data, optimizer groups and
  schedule, checkpoints, OUT's files, figures, several processes (and the torchrun relaunch).
- ``evaluate``: ``evaluate()`` and ``predict()``; ``lr_find`` and ``compare``: the range test and
  the from-scratch comparison.

Importing this package is cheap: torch, torchvision and matplotlib are imported only by the
modules that need them.
"""
