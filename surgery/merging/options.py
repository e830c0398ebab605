"""``merge``'s options, each declared once with its flag (:mod:`surgery.option_table`); ``None``
means the method's own default (``check_params`` fills it in and refuses what the method does not take).

Kept apart from the merging code so that ``surgery merge``'s flags cost no import of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import RuleError
from ..option_table import option, shared, text_to_path


def weights_text(text: str | None) -> tuple[float, ...] | None:
    """``--weights 1,1,2`` as numbers (shared by ``average`` and ``merge``)."""
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise RuleError(f"--weights {text!r}: give numbers separated by commas, e.g. 1,1,2") from None


@dataclass(frozen=True)
class MergeOptions:
    """What ``merge`` reads beside the models and how it writes."""

    base: Optional[Path] = option(None, "The checkpoint the models were fine-tuned from (task-arithmetic, ties, "
                                        "dare; slerp's t=0).", parse=text_to_path, show_default=False)
    weights: Optional[tuple[float, ...]] = option(None, "One weight per model, the base excluded (default: 1 each).",
                                                  metavar="W1,W2,...", cli_type=Optional[str], parse=weights_text,
                                                  show_default=False)
    density: Optional[float] = option(None, "ties, dare: the fraction of each task vector kept, in (0, 1].",
                                      show_default=False)
    lam: Optional[float] = option(None, "task-arithmetic, ties, dare: scales the merged task vector (default 1).",
                                  flag="--lambda", show_default=False)
    t: Optional[float] = option(None, "slerp: 0 gives the first (or --base), 1 the other (default 0.5).",
                                short="-t", show_default=False)
    normalize: Optional[bool] = option(None, "Divide by the sum of the weights (ties: of those that agree; default: "
                                             "linear and ties yes, task-arithmetic and dare no).",
                                       flag="--normalize/--no-normalize", show_default=False)
    rescale: Optional[str] = option(None, "dare: scale what is kept by 1/density (the paper), to the delta's l1 "
                                          "norm (mergekit), or not (default density).", metavar="density|l1|none",
                                    show_default=False)
    seed: Optional[int] = option(None, "dare: seed of the random drop (default 0).", show_default=False)
    force: bool = shared("force", False)
    allow_globals: tuple[str, ...] = shared("allow_globals", ())

    @classmethod
    def from_keywords(cls, **keywords: object) -> "MergeOptions":
        given = dict(keywords, allow_globals=tuple(keywords.get("allow_globals") or ()))  # type: ignore[arg-type]
        if given.get("weights") is not None:
            given["weights"] = tuple(given["weights"])  # type: ignore[arg-type]
        if given.get("base") is not None:
            given["base"] = Path(given["base"])  # type: ignore[arg-type]
        return cls(**given)  # type: ignore[arg-type]
