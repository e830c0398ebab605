"""`surgery adapt` (the library behind ``surgery.adapt()``): load a checkpoint into a target architecture, swap the head, freeze by policy.

Modules by responsibility, in the order ``adapt()`` (``core``) calls them:

- ``options``: :class:`AdaptOptions`, every option of adapt, validated at once;
- ``arch``: ARCH -> a model factory (torchvision, timm, file or module), and trust checks;
- ``source``: the checkpoint, of three kinds: torchvision weights, a state dict, a path;
- ``build``: what to build, decided on the meta device (spec, input pipeline, head plan), then the
  seeded build; ``heads``: find and replace the classifier, the MLP head, the first conv;
- ``align``: checkpoint keys -> model keys (pure functions over {name: shape});
- ``match``: the match, the coverage checks and the load; ``tensors``: position-embedding
  interpolation and input-conv adaptation;
- ``freeze``: policies, presets, groups, BatchNorm policy and its replay at any epoch;
- ``assemble``: the manifest from every step's decisions; ``manifest``: its schema and reader;
- ``folder``: writing the adapted folder and reading it back (``load_adapted``);
- ``groups``: optimizer parameter groups; ``reports``: the load and adapt reports.

Importing this package, or any module of it but ``heads``, does not import torch.
"""
