"""How ``remap`` writes: its options, each declared once with its flag (:mod:`surgery.option_table`).

Kept apart from the reading and writing code so that ``surgery remap``'s flags cost no import of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..option_table import option, shared


@dataclass(frozen=True)
class RemapOptions:
    """How ``remap`` writes, each option declared once with its flag (:mod:`surgery.option_table`);
    what it writes is the rules'."""

    format: str = option("", "Write DST as safetensors, pt, folder (sharded safetensors) or dcp (a "
                              "torch.distributed.checkpoint folder); by default DST's suffix says.", metavar="NAME")
    shard_size: str | int = option("5GB", "Largest shard when DST is a folder.", cli_type=str)
    copy_tied: bool = option(False, "Write tied tensors under every name, a copy each, for loaders that ignore "
                                    "surgery's record of ties (safetensors.torch.load_file); by default they are "
                                    "stored once.")
    dry_run: bool = option(False, "Print the old -> new table; write nothing.")
    verify: bool = shared("verify", False)
    verify_roundtrip: bool = option(False, "Apply the inverse plan to the output (names back, tensor ops undone) "
                                           "and prove A -> B -> A bit for bit.")
    force: bool = shared("force", False)
    in_place: bool = option(False, "Allow DST to be SRC (written to a temp file, then renamed).")
    allow_globals: tuple[str, ...] = shared("allow_globals", ())

    @classmethod
    def from_keywords(cls, **keywords: object) -> "RemapOptions":
        return cls(**dict(keywords, allow_globals=tuple(keywords.get("allow_globals") or ())))
