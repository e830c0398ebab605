"""What `surgery inspect` and `surgery diff` say about checkpoints, without loading them.

- ``inspect_report``: :func:`inspect` and its :class:`InspectReport` (``surgery inspect``);
- ``key_analysis``: the module tree, the remap it suggests, dtype totals (inspect's analyses of names);
- ``arch_guess``: which torchvision or timm architecture a checkpoint fits, from names and shapes;
- ``diff_report``: :func:`diff` of two checkpoints (``surgery diff``);
- ``zoo_scan``: many checkpoints in one process (``surgery inspect DIR``, ``surgery.scan``).

No torch here except where tensor values are read (``diff`` with ``values``).
"""
