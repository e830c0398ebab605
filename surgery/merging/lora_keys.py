"""How LoRA adapters name their tensors, as data: which adapter key is which factor of which
module, and which base tensor that module's weight is.

An adapter key is ``MODULE`` + a role suffix (:data:`ROLES`). MODULE is spelled one of two ways:
dotted, as peft and diffusers write it (``base_model.model.`` + the module's own path, or a
pipeline component's ``unet.``/``text_encoder.``), or flattened with underscores after a kohya
prefix (:data:`KOHYA_PREFIXES`, ``lora_unet_down_blocks_0_attentions_0_proj_in``), which is found
by flattening the base's module paths the same way. Anything else that names LoRA-like parts is
an adapter surgery does not merge, and a plain tensor (peft's ``modules_to_save`` copies, the
biases ``bias="all"`` trains) replaces the base tensor of its name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# suffix -> role; A is lora_A (down), B is lora_B (up); "emb" roles are an nn.Embedding's factors
ROLES: dict[str, str] = {
    r"\.lora_A(?:\.default)?\.weight": "A",  # peft (`.default` is the adapter name older peft kept)
    r"\.lora_B(?:\.default)?\.weight": "B",
    r"\.lora_embedding_A(?:\.default)?": "emb_A",  # peft, nn.Embedding targets
    r"\.lora_embedding_B(?:\.default)?": "emb_B",
    r"\.lora_down\.weight": "A",  # kohya sd-scripts
    r"\.lora_up\.weight": "B",
    r"\.alpha": "alpha",  # kohya: a scalar per module, scale = alpha / rank
    r"\.lora\.down\.weight": "A",  # diffusers' LoRA attention processors
    r"\.lora\.up\.weight": "B",
}
# dotted prefixes an adapter may put before the base's own names; tried after the name as written
DOTTED_PREFIXES = ("base_model.model.", "unet.", "text_encoder.", "text_encoder_2.", "transformer.")
# kohya prefix -> the base prefixes its flattened module names may sit under (diffusers naming)
KOHYA_PREFIXES: dict[str, tuple[str, ...]] = {
    "lora_unet_": ("", "unet."),
    "lora_te_": ("", "text_encoder."),
    "lora_te1_": ("", "text_encoder."),
    "lora_te2_": ("", "text_encoder_2."),
    "lora_transformer_": ("", "transformer."),
}
# peft's wrappers inside a module path: a saved `fc.base_layer.bias` is the base's `fc.bias`
WRAPPER_PARTS = (".modules_to_save.default.", ".modules_to_save.", ".base_layer.", ".original_module.")
# parts of a key that belong to an adapter kind surgery does not merge (DoRA, LoHa, LoKr, IA3, ...)
FOREIGN = re.compile(r"lora_magnitude_vector|dora_scale|hada_|lokr_|ia3_|oft_|boft_|vera_|lora_|\.lora\.|_lora\.")
_ROLE = re.compile("(" + "|".join(f"(?:{s})" for s in ROLES) + ")$")


@dataclass
class Factors:
    """One target module's tensors in the adapter: adapter key by role."""

    module: str  # the module as the adapter names it
    keys: dict[str, str] = field(default_factory=dict)


def classify(keys: list[str]) -> tuple[dict[str, Factors], list[str], list[str]]:
    """Adapter keys -> (module -> its factors, plain tensors, keys of an adapter kind not merged)."""
    modules: dict[str, Factors] = {}
    plain, foreign = [], []
    for key in keys:
        m = _ROLE.search(key)
        if m is None:
            (foreign if FOREIGN.search(key) else plain).append(key)
            continue
        suffix = m.group(1)
        role = next(r for s, r in ROLES.items() if re.fullmatch(s, suffix))
        module = key[: m.start()]
        modules.setdefault(module, Factors(module)).keys[role] = key
    return modules, plain, foreign


def plain_target(key: str) -> str:
    """The base name a plain adapter tensor replaces: peft's wrapper parts and prefix removed."""
    for part in WRAPPER_PARTS:
        key = key.replace(part, ".")
    return key


class BaseNames:
    """Resolves an adapter's module names to the base's tensor names."""

    def __init__(self, names: list[str]):
        self.names = set(names)
        self._flat: dict[str, dict[str, list[str]]] = {}  # base prefix -> flattened module -> modules

    def tensor(self, module: str, leaf: str = "weight") -> str | None:
        """The base tensor ``module.leaf``, under whichever spelling of ``module`` the base uses."""
        for prefix, bases in KOHYA_PREFIXES.items():
            if module.startswith(prefix):
                return self._kohya(module[len(prefix):], bases, leaf)
        for name in self.dotted(module):
            if f"{name}.{leaf}" in self.names:
                return f"{name}.{leaf}"
        return None

    def dotted(self, module: str) -> list[str]:
        """``module`` as written, then without each adapter prefix it starts with."""
        return [module] + [module[len(p):] for p in DOTTED_PREFIXES if module.startswith(p)]

    def plain(self, key: str) -> str | None:
        for name in self.dotted(plain_target(key)):
            if name in self.names:
                return name
        return None

    def _kohya(self, flat: str, bases: tuple[str, ...], leaf: str) -> str | None:
        for base in bases:
            found = self._flattened(base, leaf).get(flat, [])
            if len(found) == 1:
                return found[0]
            if len(found) > 1:  # `a_b.c` and `a.b_c` flatten alike: refuse rather than guess
                return None
        return None

    def _flattened(self, base: str, leaf: str) -> dict[str, list[str]]:
        if base + leaf not in self._flat:
            index: dict[str, list[str]] = {}
            for name in self.names:
                if name.startswith(base) and name.endswith("." + leaf):
                    index.setdefault(name[len(base): -len(leaf) - 1].replace(".", "_"), []).append(name)
            self._flat[base + leaf] = index
        return self._flat[base + leaf]
