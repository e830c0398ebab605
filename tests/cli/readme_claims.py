"""What the README and the docs/ pages claim about a run, checked so that it holds on any machine.

Text stays exact: names, shapes, counts of tensors and images, key names, architecture guesses,
presets and the words of a verdict. Figures that come from training or timing do not: CPU kernels
differ by instruction set, so a run on another x86-64 machine ends elsewhere even on one thread.
Such a figure holds when a fresh run's is within a few standard errors of the README's, the noise
being what the run itself reports: an accuracy on n validation images has the binomial error
``sqrt(p (1 - p) / n)``, and ``--compare-scratch`` calls a difference of two accuracies noise up to
``2 sqrt((p1 (1 - p1) + p2 (1 - p2)) / n)`` (surgery.trainer.compare.verdict). Who wins must not
change: see :func:`same_winner`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Iterator

from tests import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
# the order a reader follows, which is the order the examples replay in (a page's examples may use the
# folders an earlier page's examples wrote); a page not listed replays after these
DOCS_ORDER = ("inspect", "remap", "adapt", "train", "formats", "python", "benchmarks", "development")
GENERATED = ("RELIABILITY.md",)  # written by bench/reliability.py from one run, not by hand


def pages() -> Iterator[tuple[Path, str]]:
    """(page, its text) for the README and every hand-written docs/ page, in reading order."""
    found = sorted(p for p in DOCS.glob("*.md") if p.name not in GENERATED)
    rank = {name: i for i, name in enumerate(DOCS_ORDER)}
    yield README, README.read_text()
    for page in sorted(found, key=lambda p: (rank.get(p.stem, len(rank)), p.name)):
        yield page, page.read_text()


def page_name(page: Path) -> str:
    return page.relative_to(REPO).as_posix()

NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?"
FEW = 2  # a README accuracy may differ from a fresh run's by FEW noises, i.e. 4 standard errors of the difference
DECADE = 10.0  # an lr or a loss (no sampling noise to derive a bound from) stays within a factor of 10


def noise(a: float, b: float, n: int) -> float:
    """The noise of a difference between two accuracies on n images, as --compare-scratch reports it."""
    from surgery.trainer.compare import verdict

    return verdict(a, b, n).noise


def same_accuracy(shown: float, got: float, n: int) -> bool:
    return abs(shown - got) <= FEW * noise(shown, got, n) + 1e-9


def same_winner(shown: tuple[float, float], got: tuple[float, float], n: int) -> bool:
    """(a, b) accuracies: a README that has a beat b beyond the noise needs a run where a beats b
    beyond its noise; a README where a is within the noise of b (or ahead) needs a run where b does not
    beat a beyond the noise; a README where b wins needs b to win again."""
    from surgery.trainer.compare import verdict

    claim, run = verdict(*shown, n).winner, verdict(*got, n).winner
    return run == claim if claim != "tie" else run != "scratch"


def _within_decade(shown: float, got: float) -> bool:
    return shown == got or (shown > 0 and got > 0 and abs(math.log10(got / shown)) <= math.log10(DECADE))


# (where a measured figure sits in a README line, what kind it is); everything else in a line is exact
MEASURED: list[tuple[str, str]] = [
    (rf"val acc ({NUM})", "acc"), (rf"features ({NUM})", "acc"), (rf"features \(({NUM})\)", "acc"),
    (rf"random ones \(({NUM})\)", "acc"), (rf"scratch run ({NUM})", "acc"),
    (rf"\+-({NUM})", "noise"), (rf"({NUM}) points", "points"),
    (rf"val loss ({NUM})", "loss"), (rf"\bloss +({NUM})", "loss"),
    (rf"lowest at lr ({NUM})", "lr"), (rf"suggested lr ({NUM})", "lr"), (rf"^lr ({NUM}) \(found\)", "lr"),
    (rf"descent centred at lr ({NUM})", "lr"),
    (rf"best epoch ({NUM}) of", "epoch"), (r"(#+)", "bar"), (rf"max \|diff\| ({NUM})", "diff"),
]
EXPORT_ATOL = 1e-4  # what surgery.deploy's check allows between the file's outputs and the model's


def measured_spans(line: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of each measured figure in a README line, in order."""
    spans = {}
    for pattern, kind in MEASURED:
        for m in re.finditer(pattern, line):
            spans.setdefault(m.span(1), kind)
    return sorted((s, e, k) for (s, e), k in spans.items())


def _pattern(line: str, spans: list[tuple[int, int, str]]) -> re.Pattern:
    """The line as a regex: its text exact up to runs of spaces (a figure's width moves the columns),
    each measured figure a group."""
    def text(t: str) -> str:
        return r"\s+".join(re.escape(part) for part in re.split(r"\s+", t))

    out, pos = [], 0
    for start, end, kind in spans:
        out += [text(line[pos:start]), "(#+)" if kind == "bar" else f"({NUM})"]
        pos = end
    out.append(text(line[pos:]))
    return re.compile("".join(out).rstrip())


def _figure_holds(kind: str, shown: str, got: str, n: int | None, noises: tuple[float, float] | None) -> bool:
    """Whether a run's figure says what the README's says. ``noises``: the line's own noise figure,
    the README's and the run's, which bound a difference in points."""
    if kind == "bar":
        return True  # its length follows the loss beside it, which is checked
    a, b = float(shown), float(got)
    checks: dict[str, Callable[[], bool]] = {
        "acc": lambda: n is not None and same_accuracy(a, b, n),
        # a difference of two accuracies: who is ahead is in the verdict's words, which are exact
        "points": lambda: noises is not None and abs(a - b) <= FEW * max(noises),
        "noise": lambda: max(a, b) <= 2 * min(a, b),  # sqrt(p (1 - p)) moves slowly with p
        # a loss near zero (the end of a range test) moves by ratios that say nothing: 0.05 apart is the same
        "loss": lambda: _within_decade(a, b) or abs(a - b) <= 0.05, "lr": lambda: _within_decade(a, b),
        "epoch": lambda: b >= 1, "diff": lambda: 0 <= b <= EXPORT_ATOL,
    }
    return checks[kind]()


def line_holds(shown: str, actual: list[str], n: int | None) -> str | None:
    """None when some printed line says what the README line says (exact text, figures within their
    tolerance); else why not."""
    spans = measured_spans(shown)
    if not spans:
        return None if shown in actual else "not printed"
    pattern, kinds = _pattern(shown, spans), [k for _, _, k in spans]
    figures = pattern.fullmatch(shown.rstrip()).groups()
    candidates = [m.groups() for line in actual if (m := pattern.fullmatch(line.rstrip()))]
    if not candidates:
        return "no printed line has the same text"
    why = []
    for got in candidates:
        noises = next(((float(s), float(g)) for k, s, g in zip(kinds, figures, got) if k == "noise"), None)
        off = [f"{k} {s} vs {g}" for k, s, g in zip(kinds, figures, got)
               if not _figure_holds(k, s, g, n, noises)]
        if not off:
            return None
        why.append("; ".join(off))
    return f"figures beyond their tolerance ({' | '.join(why)}; {n} validation images)"


def validation_images(output: str) -> int | None:
    """How many images a run validated on, as it says itself."""
    m = re.search(r"\b(\d+) val\b|(\d+) validation images|validation on (\d+) images", output)
    return next((int(g) for g in m.groups() if g), None) if m else None
