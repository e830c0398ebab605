"""`surgery adapt` (the library behind ``surgery.adapt()``): load a checkpoint into a target architecture, swap the head, freeze by policy.

Modules by responsibility: ``arch`` (ARCH -> model factory), ``align`` (checkpoint keys -> model
keys, pure functions over {name: shape}), ``heads`` (find and replace the classifier, MLP head,
input channels), ``freeze`` (policies, presets, groups, BatchNorm policy), ``manifest`` (the
versioned contract with ``surgery train``), ``core`` (``adapt``, ``load_adapted``,
``param_groups``). Importing this package does not import torch.
"""
