"""Fine-tuning an adapted model: data (``surgery.trainer.data``), plots (``surgery.trainer.plots``).

Importing this package is cheap: torch, torchvision and matplotlib are imported only by the
modules and functions that need them.
"""
