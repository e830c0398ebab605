"""Reading a LoRA adapter: its folder or file, its config, and each target's rank and scale.

A peft folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``, read with surgery's restricted pickle reader); a kohya or diffusers LoRA
is one ``.safetensors`` file whose ``.alpha`` tensors give the scale (``alpha / rank``; 1 where a
module has none, for the prefixes of :data:`ALPHA_IS_RANK`). peft's scale is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``), r and lora_alpha taken from ``rank_pattern`` / ``alpha_pattern`` where a pattern
matches the module's path as peft matches it.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import InputError
from ..formats import open_checkpoint
from ..io import check_source

CONFIG = "adapter_config.json"
DIFFUSERS_METADATA = "lora_adapter_metadata"  # diffusers' LoRA config, kept in a .safetensors file's metadata
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# config fields whose non-default value asks for something other than a plain LoRA merge
REFUSED: dict[str, str] = {
    "use_dora": "DoRA (use_dora) rescales each column by a learned magnitude",
    "lora_bias": "lora_bias trains a bias on lora_B",
    "use_qalora": "QALoRA (use_qalora) pools its inputs",
    "layer_replication": "layer_replication builds layers the base does not have",
    "target_parameters": "target_parameters wraps bare parameters, not modules",
    "trainable_token_indices": "trainable_token_indices trains single embedding rows",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after its tokens",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) has its own layout",
}

# init_lora_weights values whose init subtracts the adapter's start from the base weights: the adapter
# is relative to that rewritten base, not to the checkpoint it was made from
REWRITES_BASE = ("pissa", "corda", "olora", "loftq", "lora_ga")

# a file with no adapter_config.json and no `.alpha` tensor: modules under these prefixes (kohya's,
# diffusers' pipeline components) have alpha = rank, scale 1, as kohya and diffusers load them
ALPHA_IS_RANK = ("lora_", "unet.", "text_encoder.", "text_encoder_2.", "transformer.")


@dataclass
class Adapter:
    path: Path
    ckpt: Checkpoint
    config: dict[str, Any] | None  # None: a kohya/diffusers file with no adapter_config.json

    @property
    def fan_in_fan_out(self) -> bool:
        return bool((self.config or {}).get("fan_in_fan_out"))

    def refusals(self) -> list[str]:
        """Why this config is not a LoRA surgery merges (an empty list when it is)."""
        if self.config is None:
            return self._metadata_refusals()
        kind = self.config.get("peft_type", "LORA")
        if kind != "LORA":
            return [f"{self.path}: peft_type {kind!r} is not LoRA; merge it with peft's merge_and_unload()"]
        problems = [f"{self.path}: {why}; merge it with peft's merge_and_unload()"
                    for key, why in REFUSED.items() if self.config.get(key) not in (None, False, [], {}, "")]
        init = self.config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(REWRITES_BASE):
            problems.append(f"{self.path}: init_lora_weights {init!r} trained against a base peft rewrote (the "
                            f"original minus the adapter's start); merge it into that base with peft, or save it "
                            f"with path_initial_model_for_weight_conversion for a LoRA of the original base")
        return problems

    def _metadata_refusals(self) -> list[str]:
        """diffusers keeps each component's LoRA config in the file's ``lora_adapter_metadata``: where it
        gives a scale other than 1 (alpha not r, patterns, rsLoRA), merging at scale 1 would be wrong."""
        try:
            meta = json.loads(self.ckpt.metadata.get(DIFFUSERS_METADATA) or "{}")
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            return [f"{self.path}: its {DIFFUSERS_METADATA} is not a JSON object; fix or remove it"]
        prefixes = sorted({k.rpartition(".")[0] + "." for k in meta if k.endswith(".r")})
        odd = [f"{p!r} r={meta[p + 'r']}, lora_alpha={meta.get(p + 'lora_alpha')}" for p in prefixes
               if meta.get(p + "lora_alpha", meta[p + "r"]) != meta[p + "r"] or meta.get(p + "use_rslora")
               or meta.get(p + "rank_pattern") or meta.get(p + "alpha_pattern")]
        if not odd:
            return []
        return [f"{self.path}: its {DIFFUSERS_METADATA} gives {'; '.join(odd)} (or rank/alpha patterns, rsLoRA), a "
                f"scale surgery does not read from a file; put it in a folder as adapter_model.safetensors beside an "
                f"{CONFIG} with that r and lora_alpha"]

    def scale(self, module: str, rank: int, alpha_key: str | None) -> tuple[float | None, str | None]:
        """(scale, None) for a target module, or (None, why not)."""
        if alpha_key is not None:
            alpha = self.ckpt.tensor(alpha_key)
            if alpha.numel() != 1:
                return None, f"{alpha_key!r} holds {alpha.numel()} values, not one alpha"
            value = float(alpha.double())
            if not math.isfinite(value):  # it would turn every merged weight of the module into NaN or inf
                return None, f"{alpha_key!r} is {value}, not a finite alpha"
            return value / rank, None
        if self.config is None:
            if module.startswith(ALPHA_IS_RANK):
                return 1.0, None
            beside = self.path.parent / CONFIG
            hint = f"; pass the folder {self.path.parent}, whose {CONFIG} gives it" if beside.is_file() else ""
            return None, f"{module!r}: no adapter_config.json and no {module}.alpha tensor gives its scale{hint}"
        path = module.removeprefix("base_model.model.")
        r = _pattern(self.config.get("rank_pattern") or {}, path, self.config.get("r", 8))
        alpha = _pattern(self.config.get("alpha_pattern") or {}, path, self.config.get("lora_alpha", 8))
        if int(r) != rank:
            return None, f"{module!r}: adapter_config.json gives r={r} but its lora_A has rank {rank}"
        return (alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r), None


def _pattern(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """peft's get_pattern_key: the first pattern that matches the end of the module's path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _check_config(path: Path, config: dict[str, Any]) -> None:
    """The fields the merge computes with hold what peft writes: one error listing what does not."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    problems = [f"{k} is {config[k]!r}, not a positive number" for k in ("r", "lora_alpha")
                if k in config and not number(config[k])]
    for k in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(k) or {}
        if not isinstance(patterns, dict):
            problems.append(f"{k} is a {type(patterns).__name__}, not an object of pattern: number")
            continue
        for pat, v in patterns.items():
            try:
                re.compile(pat)
            except re.error as e:
                problems.append(f"{k} pattern {pat!r} is not a regular expression ({e})")
            if not number(v):
                problems.append(f"{k}[{pat!r}] is {v!r}, not a positive number")
    if problems:
        raise InputError(f"{path}: " + "; ".join(problems) + "; fix the config peft wrote")


def open_adapter(path: str | os.PathLike, allow_globals: tuple[str, ...] = ()) -> Adapter:
    """A peft adapter folder, or a single LoRA weights file."""
    p = Path(path)
    check_source(p)
    if not p.is_dir():
        return Adapter(p, open_checkpoint(p, allow_globals=allow_globals), None)
    weights = [p / w for w in WEIGHTS if (p / w).is_file()]
    if not weights:
        raise InputError(f"{p}: no {' or '.join(WEIGHTS)} in the adapter folder; pass a peft adapter folder "
                         f"(save_pretrained) or a LoRA .safetensors file")
    config = None
    if (p / CONFIG).is_file():
        try:
            config = json.loads((p / CONFIG).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"{p / CONFIG}: not valid JSON ({e}); it is the adapter's config, peft writes it") from None
        if not isinstance(config, dict):
            raise InputError(f"{p / CONFIG}: holds a {type(config).__name__}, not the object peft writes")
        _check_config(p / CONFIG, config)
    return Adapter(p, open_checkpoint(weights[0], allow_globals=allow_globals), config)
