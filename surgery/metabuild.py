"""Build a model with every parameter and buffer on the meta device: its structure and shapes at
no memory or init cost. Used by adapt (planning the head before the real build), by reading a
folder back (shapes checked before any allocation) and by the signature table's rebuild."""

from __future__ import annotations

from typing import Any, Callable


def meta_build(fn: Callable[..., Any], kwargs: dict) -> Any:
    """Call the model factory ``fn(**kwargs)`` with every parameter and buffer on the meta
    device: no memory, no init cost.

    ``torch.device('meta')`` as a context is tried first; builders that compute their layout
    with tensors (regnet's block widths call ``.tolist()``) cannot run under it, so for those
    modules are built on the CPU with each parameter and buffer moved to meta as it is
    registered (``torch.empty`` allocates lazily, and initialisers then run on meta tensors).
    """
    import torch

    try:
        with torch.device("meta"):
            return fn(**kwargs)
    except (NotImplementedError, RuntimeError):
        pass
    nn = torch.nn
    reg_p, reg_b = nn.Module.register_parameter, nn.Module.register_buffer

    def register_parameter(self, name, param):
        reg_p(self, name, param)
        if param is not None and param.device.type != "meta":
            p = self._parameters[name]
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    def register_buffer(self, name, tensor, persistent=True):
        reg_b(self, name, tensor, persistent)
        if tensor is not None and tensor.device.type != "meta":
            self._buffers[name] = self._buffers[name].to("meta")

    nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
    try:
        return fn(**kwargs)
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = reg_p, reg_b
