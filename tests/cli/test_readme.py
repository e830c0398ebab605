"""The examples of the README and of the docs/ pages run as shown, against fixtures copied under the
file names they use: text exact, figures from training within the noise the run reports
(tests/cli/readme_claims.py). The README stays a front page whose links all lead somewhere."""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests import REPO
from tests.cli.readme_claims import DOCS, GENERATED, README, line_holds, page_name, pages, validation_images

FILES = {"dp.pth": "dataparallel_pt", "lightning.ckpt": "lightning_ckpt", "resnet18.pth": "resnet18_pt",
         "timm_args.pth": "timm_args_pth"}
FRONT_PAGE_LINES = 260


def _examples(text: str) -> list[tuple[str, list[str]]]:
    """(command line, the output lines shown under it) for every `$ surgery` line in console blocks."""
    out = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        current = None
        for line in block.splitlines():
            if line.startswith("$ surgery "):
                current = (line[2:], [])
                out.append(current)
            elif current is not None and line.strip():
                current[1].append(line.rstrip())
    return out


def _all_examples() -> list[tuple[str, str, list[str]]]:
    """(page, command line, lines shown) over every page, in reading order."""
    return [(page_name(page), command, shown) for page, text in pages() for command, shown in _examples(text)]


def _setup(make, folder: Path) -> None:
    from fixtures.generate import digits_imagefolder

    for name, fixture in FILES.items():
        shutil.copy(make(fixture), folder / name)
    digits_imagefolder(folder / "digits", classes=range(4), per_class=20, size=32)


@pytest.mark.slow
def test_readme_examples_run_as_shown(make, tmp_path, monkeypatch):
    """Each command line runs once, in reading order; every page that shows it is held to that run (the
    README shows a few lines of what a docs/ page shows in full)."""
    _setup(make, tmp_path)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner(env={"NO_COLOR": "1", "COLUMNS": "100"})
    examples = _all_examples()
    assert len(examples) >= 8
    ran: dict[str, tuple[int, str, str]] = {}
    for page, command, shown in examples:
        if command not in ran:
            result = runner.invoke(app, shlex.split(command)[1:])
            ran[command] = (result.exit_code, result.stdout, result.stderr)
        exit_code, stdout, stderr = ran[command]
        expect_error = bool(shown) and shown[0].startswith("error:")
        assert exit_code == (2 if expect_error else 0), (page, command, stdout, stderr)
        printed = stdout + stderr
        actual = [line.rstrip() for line in printed.splitlines()]
        n = validation_images(printed)
        for line in shown:
            if line.strip() == "..." or "━" in line or "┃" in line:
                continue
            why = line_holds(line, actual, n)
            assert why is None, f"{page} shows {line!r} under `{command}`: {why}; the command printed:\n" + "\n".join(actual)


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1] in ci
    assert os.access(REPO / ".ci" / "run", os.X_OK)


@pytest.mark.slow
def test_readme_python_examples_run(make, tmp_path, monkeypatch):
    _setup(make, tmp_path)
    monkeypatch.chdir(tmp_path)
    blocks = [(page, code) for page, text in pages() for code in re.findall(r"```python\n(.*?)```", text, re.S)]
    assert len(blocks) >= 4
    for page, code in blocks:
        exec(compile(code, str(page), "exec"), {"__name__": "readme"})


def test_the_examples_are_collected_from_every_page_that_shows_one():
    """A page's examples are replayed only if the helpers find them: every console block of a page counts."""
    by_page: dict[str, int] = {}
    for page, _, _ in _all_examples():
        by_page[page] = by_page.get(page, 0) + 1
    for page, text in pages():
        commands = len(re.findall(r"^\$ surgery ", "\n".join(re.findall(r"```console\n(.*?)```", text, re.S)), re.M))
        assert by_page.get(page_name(page), 0) == commands, page
    assert {"README.md", "docs/inspect.md", "docs/remap.md", "docs/adapt.md", "docs/train.md",
            "docs/formats.md"} <= set(by_page)
    assert {page_name(p) for p, _ in pages()} == {"README.md"} | {f"docs/{p.name}" for p in DOCS.glob("*.md")
                                                                   if p.name not in GENERATED}


def test_the_front_page_has_an_example_of_every_command():
    from cli.main import COMMANDS

    text = README.read_text()
    shown = {command.split()[1] for command, _ in _examples(text)}
    for name in COMMANDS:
        assert f"`surgery {name}" in text, name
    assert set(COMMANDS) - shown <= {"trust", "demo"}  # demo: the quick start; trust needs a factory folder
    assert ".venv/bin/surgery demo" in text


def test_the_readme_stays_a_front_page_and_links_to_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= FRONT_PAGE_LINES
    linked = set(re.findall(r"\]\((docs/[^)#]+)", text))
    assert linked == {f"docs/{p.name}" for p in DOCS.glob("*.md")}
    for page in linked:
        assert (REPO / page).is_file(), page


def test_the_readme_gives_both_test_tiers_as_ci_runs_them():
    text = README.read_text()
    section = text[text.index("## Tests"):]
    section = section[:section.index("\n## ")]
    tiers = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    assert [line.split("#")[0].strip() for line in tiers.splitlines()] == ["python -m pytest -q",
                                                                         "python -m pytest -q -m slow"]
    ci = (REPO / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest -q && .venv/bin/python -m pytest -q -m slow" in ci
    assert "-m 'not slow'" in (REPO / "pyproject.toml").read_text()  # what leaves the slow tier out of the first


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for heading in re.findall(r"^#+ (.*)$", text, re.M):
        slug = _slug(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_a_heading_gets_the_anchor_github_gives_it():
    assert _slug("`--lr auto` (the default) and `--find-lr`") == "--lr-auto-the-default-and---find-lr"
    assert _slug("Folders are data, factories are code") == "folders-are-data-factories-are-code"
    assert _slug("`surgery export DIR --format onnx|torchscript|exported`") == \
        "surgery-export-dir---format-onnxtorchscriptexported"


def test_every_relative_link_of_the_docs_resolves():
    """Links between the README, docs/ and bench/README.md lead to a file, and an anchor to one of its headings."""
    md = [README, REPO / "bench" / "README.md", *sorted(DOCS.glob("*.md"))]
    checked = 0
    for page in md:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page_name(page)} links to {target}: no such file"
            if anchor:
                assert anchor in _anchors(dest), f"{page_name(page)} links to {target}: no such heading"
            checked += 1
    assert checked >= 30


def test_a_readme_figure_holds_within_the_noise_the_run_reports_and_text_stays_exact():
    shown = "pretrained best epoch 3 of 3: val acc 0.8900, val loss 0.4100  (out)"
    # 200 images: 4 standard errors of the difference of 0.89 and 0.81 is 0.139
    assert line_holds(shown, ["pretrained best epoch 17 of 3: val acc 0.8100, val loss 0.9000  (out)"], 200) is None
    assert "acc 0.8900 vs 0.6000" in line_holds(shown, ["pretrained best epoch 3 of 3: val acc 0.6000, val loss "
                                                         "0.4100  (out)"], 200)
    assert "loss 0.4100 vs 9.0000" in line_holds(shown, ["pretrained best epoch 3 of 3: val acc 0.8900, val loss "
                                                          "9.0000  (out)"], 200)
    # the count of epochs, a name, the words: exact
    for other in ("pretrained best epoch 3 of 4: val acc 0.8900, val loss 0.4100  (out)",
                  "scratch best epoch 3 of 3: val acc 0.8900, val loss 0.4100  (out)"):
        assert line_holds(shown, [other], 200) == "no printed line has the same text"
    # a range test's row: the lr of the sweep exact, the loss within a decade (or near zero), any bar
    sweep = "  lr 1.00e+00  loss   0.0142  #"
    assert line_holds(sweep, ["  lr 1.00e+00  loss   0.0021  ###"], 16) is None
    assert line_holds(sweep, ["  lr 1.00e+00  loss   1.3000  ###"], 16).startswith("figures beyond")
    assert line_holds(sweep, ["  lr 9.00e-01  loss   0.0142  #"], 16) == "no printed line has the same text"
    assert line_holds("tensors        122 (11.19M parameters, 44.8 MB)", ["tensors        122 (11.19M parameters, 44.9 MB)"],
                      None) == "not printed"


def test_a_verdict_keeps_its_words_and_its_size_stays_within_the_noise():
    shown = "verdict: pretrained wins by 8.0 points (noise +-5.0)"
    assert line_holds(shown, ["verdict: pretrained wins by 14.5 points (noise +-6.2)"], 200) is None
    assert line_holds(shown, ["verdict: pretrained wins by 30.0 points (noise +-6.2)"], 200).startswith("figures beyond")
    assert line_holds(shown, ["verdict: negative transfer: scratch wins by 8.0 points (noise +-5.0); the pretrained "
                              "features do not help this task"], 200) == "no printed line has the same text"
    tie = "verdict: no measurable transfer: +18.8 points is within the noise (+-34.7 on 16 validation images)"
    assert line_holds(tie, ["verdict: no measurable transfer: -6.3 points is within the noise (+-33.0 on 16 "
                            "validation images)"], 16) is None


def test_who_wins_stays_who_wins():
    from tests.cli.readme_claims import same_winner

    assert same_winner((0.97, 0.89), (0.955, 0.81), 200)  # the pretrained run wins beyond the noise on both
    assert not same_winner((0.97, 0.89), (0.90, 0.89), 200)  # a README win the run does not show
    assert not same_winner((0.97, 0.89), (0.80, 0.89), 200)
    assert same_winner((0.97, 0.975), (0.99, 0.95), 200)  # a tie claims only that b does not win
    assert not same_winner((0.97, 0.975), (0.395, 0.955), 200)  # a collapse behind a tied README
    assert same_winner((0.5, 0.9), (0.4, 0.95), 200) and not same_winner((0.5, 0.9), (0.88, 0.9), 200)
