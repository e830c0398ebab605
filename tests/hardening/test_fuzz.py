"""Property-based fuzzing of every parser: mutated real files end in success or a SurgeryError.

The seeds, mutators and checker are bench/reliability.py's (the long run, >= 100,000 inputs, lives
there); here hypothesis drives a few hundred examples per parser (the slow tier, `pytest -m slow`)
so a regression shows, shrunk to a minimal list of mutations. The default tier runs every property
at QUICK examples: the same checks, fewer inputs.
"""

from __future__ import annotations

import json
import struct
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.reliability import MUTATIONS, PARSERS, PICKLE_FRAGMENTS, Env, build_seeds, check, mutate

EXAMPLES = 200  # full strength: the slow tier
QUICK = 25  # the default tier
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
STRENGTHS = [pytest.param(QUICK, id="quick"), pytest.param(EXAMPLES, id="full", marks=pytest.mark.slow)]


def both_tiers(**strategies):
    """``test, test_full = both_tiers(...)(body)``: the property at QUICK examples for the default
    tier, and at EXAMPLES (marked slow) for the slow tier."""
    def make(body):
        return (settings(SETTINGS, max_examples=QUICK)(given(**strategies)(body)),
                pytest.mark.slow(SETTINGS(given(**strategies)(body))))
    return make

mutation_ops = st.lists(
    st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 2**40), st.binary(max_size=16)), min_size=1, max_size=5)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, list[bytes]]:
    return build_seeds(tmp_path_factory.mktemp("seeds"))


@pytest.fixture(scope="module")
def env(tmp_path_factory, seeds) -> Env:
    return Env(tmp_path_factory.mktemp("fuzz"), seeds)


def _assert_handled(outcome: str, detail: str, parser: str, ops) -> None:
    assert outcome in ("ok", "refused"), f"{parser}: {outcome}: {detail} (mutations {ops})"


@pytest.mark.parametrize("parser", PARSERS)
def test_seeds_open(parser, seeds, env):
    """Unmutated seeds are valid: the fuzzing starts from real files, not from noise."""
    for i, data in enumerate(seeds[parser]):
        assert check(parser, data, env, i, do_remap=parser != "rules") == ("ok", ""), parser


@pytest.mark.parametrize("examples", STRENGTHS)
@pytest.mark.parametrize("parser", PARSERS)
def test_mutated_inputs_succeed_or_refuse(parser, examples, seeds, env):
    seen: dict[str, int] = {}

    @settings(SETTINGS, max_examples=examples)
    @given(which=st.integers(0, 7), ops=mutation_ops)
    def run(which, ops):
        k = which % len(seeds[parser])
        data = mutate(seeds[parser][k], parser, ops)
        outcome, detail = check(parser, data, env, k, deep=True, do_remap=(which == 0 and parser != "rules"))
        seen[outcome] = seen.get(outcome, 0) + 1
        _assert_handled(outcome, detail, parser, ops)

    run()
    # the mutations must exercise both paths: some inputs still parse, most are refused
    assert sum(seen.values()) >= examples and seen.get("refused", 0) > 0, seen


# ----------------------------------------------------------------- inputs built from scratch

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
entry = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F7", "", 3]),
    "shape": st.lists(st.integers(-2, 2**64), max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-2, 2**64), max_size=3) | json_values,
})


def _generated_safetensors_headers(header, meta, data, declared, env):
    if meta is not None:
        header["__metadata__"] = meta
    raw = json.dumps(header).encode()
    n = len(raw) if declared is None else declared
    blob = struct.pack("<Q", n) + raw + data
    outcome, detail = check("safetensors", blob, env)
    _assert_handled(outcome, detail, "safetensors", header)


test_generated_safetensors_headers, test_generated_safetensors_headers_full = both_tiers(
    header=st.dictionaries(st.text(max_size=10), entry | json_values, max_size=5),
    meta=st.none() | st.dictionaries(st.sampled_from(["format", "surgery.aliases", "x"]), json_values | st.text(), max_size=3),
    data=st.binary(max_size=64), declared=st.none() | st.integers(0, 2**64 - 1))(_generated_safetensors_headers)


def _generated_shard_indexes(index, env):
    outcome, detail = check("shard-index", json.dumps(index).encode(), env)
    _assert_handled(outcome, detail, "shard-index", index)


test_generated_shard_indexes, test_generated_shard_indexes_full = both_tiers(
    index=json_values | st.fixed_dictionaries({"weight_map": st.dictionaries(
        st.text(max_size=30), st.sampled_from(["../x.safetensors", "/etc/passwd", "", ".", "legacy.pt",
                                               "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                               "a\x00b", "x" * 300]) | st.text(max_size=20), max_size=4)},
        optional={"metadata": json_values}))(_generated_shard_indexes)


_OPCODES = [bytes([c]) for c in b"()].}NIJKLMqhrgjp0123456789tlde\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x93\x94\x95\x96\x97\x98RbsuaQocXBC"]


def _generated_pickles(parts, proto, env):
    """Opcode soup for data.pkl: whatever the stream, success or a SurgeryError."""
    pkl = proto + b"".join(parts) + b"."
    outcome, detail = check("data.pkl", pkl, env)
    _assert_handled(outcome, detail, "data.pkl", parts)


test_generated_pickles, test_generated_pickles_full = both_tiers(
    parts=st.lists(st.sampled_from(_OPCODES) | st.sampled_from(PICKLE_FRAGMENTS) | st.binary(max_size=9), max_size=40),
    proto=st.sampled_from([b"\x80\x02", b"\x80\x04", b"\x80\x05", b""]))(_generated_pickles)


op_items = st.dictionaries(
    st.sampled_from(["auto", "strip_prefix", "strip-prefix", "add_prefix", "rename", "drop", "keep", "dtype", "nope", "1"]),
    json_values | st.sampled_from(["module.", "(", "a{99999999999}", "^fc\\.=>head.", "x=>\\g<9>", "bf16", "fp12"]),
    min_size=0, max_size=2)


def _generated_rules(doc, yaml, env):
    import yaml as pyyaml

    text = pyyaml.safe_dump(doc).encode() if yaml else json.dumps(doc).encode()
    outcome, detail = check("rules", (b"Y" if yaml else b"J") + text, env)
    _assert_handled(outcome, detail, "rules", doc)


test_generated_rules, test_generated_rules_full = both_tiers(
    doc=json_values | st.fixed_dictionaries({"ops": st.lists(op_items | json_values, max_size=4)},
                                            optional={"select": json_values, "extra": json_values}),
    yaml=st.booleans())(_generated_rules)


@pytest.mark.parametrize("text", [
    "[" * 50_000, '{"ops": [' + "1" * 5000 + "]}", "ops:\n - rename: ['" + "(" * 3000 + "', '']",
    "{1: 2, x: 3}", "ops: [{drop: 'a{4294967296}'}]", "&a [*a, *a]", "!!python/object/apply:os.system ['id']",
])
def test_rules_edge_cases(text, tmp_path):
    from surgery.errors import RuleError
    from surgery.remapping import Rules

    for suffix in (".yaml", ".json"):
        p = tmp_path / f"r{suffix}"
        p.write_text(text)
        try:
            Rules.from_file(p)
        except RuleError as e:
            assert "\n" not in e.one_line()


def test_path_edge_cases(tmp_path):
    """Names the OS rejects are an InputError, not an OSError/ValueError."""
    import surgery
    from surgery.errors import SurgeryError

    link = tmp_path / "loop"
    link.symlink_to(link)
    for p in ("x" * 5000, f"{tmp_path}/{'y' * 300}.pt", link, tmp_path / "nope.pt"):
        with pytest.raises(SurgeryError):
            surgery.open(p)


def test_parsers_are_covered():
    from surgery.formats import FORMATS

    # every readable single-file format and the index have a fuzzed parser (DCP reuses torch-zip + data.pkl)
    assert {"safetensors", "torch-zip", "torch-legacy", "safetensors-index"} <= set(FORMATS)
    assert set(PARSERS) >= {"safetensors", "torch-zip", "torch-legacy", "data.pkl", "shard-index", "rules"}


def test_seed_files_are_real(seeds):
    assert seeds["torch-zip"][0][:4] == b"PK\x03\x04"
    assert seeds["torch-legacy"][0][:2] == b"\x80\x02"


@pytest.mark.parametrize("text", ["[" * 50_000, "- " * 50_000 + "x", "\n".join(" " * i + "a:" for i in range(300)) + " x",
                                  "{a: " * 200 + "1" + "}" * 200])
def test_deeply_nested_yaml_rules_are_refused_before_they_are_built(text, tmp_path):
    # libyaml's composer recurses in C once per level: on Python 3.12 50,000 '[' crashed the
    # interpreter with a segmentation fault; the depth is checked from the parser's events first
    from surgery.errors import RuleError
    from surgery.remapping import Rules

    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(RuleError, match="nested more than 100 deep|exceeded maximum nesting depth") as e:
        Rules.from_file(p)  # (the second: a libyaml with its own limit on flow nesting)
    assert "\n" not in e.value.one_line()


@pytest.mark.parametrize("cls", ["zero-parts", "rank-files"])
def test_lying_folders_saved_by_ranks_are_refused_or_read_never_crash(env, cls):
    """The reliability bench's classes of ZeRO and per-rank folders, 25 inputs each: every one is
    refused in one line or read whole; a folder that lost data is never read (that is "partial")."""
    from bench.reliability import run_input

    outcomes = [run_input(cls, 7, i, env, {})[:2] for i in range(25)]
    bad = [(i, o) for i, o in enumerate(outcomes) if o[0] not in ("ok", "refused")]
    assert not bad, bad
    assert sum(o[0] == "refused" for o in outcomes) >= 10  # the lies are seen, not just the bytes
