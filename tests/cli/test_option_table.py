"""Each option of adapt and train is declared once (a field of AdaptOptions, FreezeOptions or
TrainOptions): the command's flags, the Python keywords and the messages all come from it."""

from __future__ import annotations

import inspect
import json
from dataclasses import fields

import pytest

import surgery
from surgery.adapter.options import AdaptOptions
from surgery.errors import TrainError
from surgery.option_table import SHARED, entries, flat_values
from surgery.trainer.options import TrainOptions

TABLES = {"train": TrainOptions, "adapt": AdaptOptions}


@pytest.mark.parametrize("command", TABLES)
def test_every_flagged_field_is_an_option_of_its_command(cli, command):
    r = cli(command, "--help")
    assert r.exit_code == 0, r.output
    flagged = [e for e in entries(TABLES[command]) if e.flag is not None and not e.flag.argument]
    assert len(flagged) >= 25
    for e in flagged:
        assert e.flag.spelled(e.name) in r.stdout, e.name
        assert e.flag.help.split()[0] in r.stdout, e.name


@pytest.mark.parametrize("name", ["train", "adapt"])
def test_the_python_signature_lists_every_keyword_of_the_table(name):
    params = inspect.signature(getattr(surgery, name)).parameters
    table = TABLES[name]
    for e in entries(table):
        if e.name not in ("adapted", "data"):
            assert e.name in params, e.name
    assert params["seed"].default == 0 and params["batch_size" if name == "train" else "hidden"].default in (32, 512)


def test_a_misspelt_keyword_is_a_type_error_with_the_nearest_name(tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'; did you mean 'epochs'"):
        surgery.train(tmp_path, tmp_path, epoch=3, out=tmp_path / "run")
    with pytest.raises(TypeError, match="unexpected keyword argument 'freeze_untill'; did you mean 'freeze_until'"):
        surgery.adapt(None, arch="resnet18", num_classes=3, freeze_untill="layer3")


def test_options_and_keywords_combine_and_are_checked_once():
    base = AdaptOptions.create(arch="resnet18", num_classes=3, freeze="head-only", mean="0.5,0.5,0.5")
    flat = flat_values(base)
    assert flat["freeze"] == "head-only" and "freezing" not in flat
    again = AdaptOptions.from_keywords(**dict(flat, bn="train"))
    assert again.freezing.bn == "train" and again.freezing.freeze == "head-only" and again.mean == (0.5, 0.5, 0.5)
    with pytest.raises(TypeError, match="options must be TrainOptions or None"):
        surgery.train("a", "b", options=base, out="c")


def test_python_callers_read_keywords_and_the_shell_reads_flags(cli, tmp_path):
    with pytest.raises(TrainError, match=r"batch_size must be a positive integer"):
        surgery.train(tmp_path, tmp_path, out=tmp_path / "run", epochs=1, lr=0.1, batch_size=0)
    r = cli("train", tmp_path, "--data", tmp_path, "--out", tmp_path / "run", "--batch-size", "0")
    assert r.exit_code == 2 and "--batch-size must be a positive integer" in r.stderr, r.stderr
    r = cli("train", tmp_path, "--data", tmp_path, "--out", tmp_path / "run", "--lr", "fast")
    assert r.exit_code == 2 and "--lr 'fast': give a number (e.g. 3e-3) or auto" in r.stderr, r.stderr


def test_a_negated_flag_turns_its_option_off():
    from cli.common import option_values

    given = option_values(TrainOptions, {"no_flip": True, "no_amp": False, "no_guard": True, "lr": "3e-3",
                                         "epochs": 4, "resume": None})
    assert given == {"flip": False, "amp": True, "guard": False, "lr": 3e-3, "epochs": 4, "resume": None}


def test_shared_flags_read_the_same_in_every_command(cli):
    for command in ("inspect", "remap", "diff", "adapt", "advise", "train", "evaluate", "predict", "export", "trust"):
        r = cli(command, "--help")
        assert r.exit_code == 0, (command, r.output)
        assert SHARED["as_json"].help in r.stdout, command
    for command in ("inspect", "remap", "adapt"):
        assert SHARED["select"].help in cli(command, "--help").stdout, command


def test_a_field_without_a_flag_is_for_python_only():
    names = {f.name for f in fields(AdaptOptions)}
    assert {"rules", "interpolate", "class_names", "seed"} <= names
    assert all(e.flag is None for e in entries(AdaptOptions) if e.name in ("rules", "interpolate", "class_names"))


def test_one_field_is_one_new_option_everywhere(cli, tmp_path):
    """--momentum was added as one field with its check: the flag, the keyword and the message follow."""
    assert "--momentum" in cli("train", "--help").stdout
    assert inspect.signature(surgery.train).parameters["momentum"].default == 0.9
    r = cli("train", tmp_path, "--data", tmp_path, "--out", tmp_path / "run", "--momentum", "1.5")
    assert r.exit_code == 2 and "--momentum must be in [0, 1), got 1.5" in r.stderr, r.stderr
    with pytest.raises(TrainError, match=r"momentum must be in \[0, 1\), got -0.1"):
        surgery.train(tmp_path, tmp_path, out=tmp_path / "run", epochs=1, momentum=-0.1)


@pytest.mark.parametrize("args, match", [
    (["--depth", "-1"], "--depth"), (["--depth", "two"], "--depth"), (["--depth", "1.5"], "--depth"),
    (["--workers", "0"], "--workers"),
])
def test_values_of_the_wrong_type_get_typers_errors(cli, make, args, match):
    r = cli("inspect", make("plain_pt"), *args)
    assert r.exit_code == 2 and "Invalid value" in r.stderr and match in r.stderr, r.stderr


@pytest.mark.parametrize("args", [["--depth", "0"], ["--depth", "007"], ["--workers", "1", "--json"]])
def test_plain_values_work(cli, make, args):
    r = cli("inspect", make("plain_pt"), *args)
    assert r.exit_code == 0, r.stderr
    if "--json" in args:
        assert json.loads(r.stdout)["schema"] == "surgery.inspect/1"


def test_an_options_object_built_by_hand_is_checked_like_keywords(tmp_path):
    from surgery.errors import AdaptError

    with pytest.raises(AdaptError, match="num_classes must be a positive integer, got 0"):
        surgery.adapt(None, surgery.AdaptOptions(arch="resnet18", num_classes=0), out=tmp_path / "a")
    with pytest.raises(AdaptError, match="mean='abc': give one number per input channel"):
        surgery.adapt(None, surgery.AdaptOptions(arch="resnet18", num_classes=3, mean="abc"))
    assert surgery.RemapOptions.from_keywords(allow_globals=["a.B"]).allow_globals == ("a.B",)


def test_required_keywords_are_named_as_keywords(tmp_path):
    from surgery.errors import AdaptError

    with pytest.raises(AdaptError, match="^arch is required"):
        surgery.adapt(None, num_classes=3)
    with pytest.raises(AdaptError, match="^num_classes is required"):
        surgery.adapt(None, arch="resnet18")
    with pytest.raises(TrainError, match="^out is required"):
        surgery.train(tmp_path, tmp_path, epochs=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'adapted'"):
        surgery.train(tmp_path, tmp_path, adapted=tmp_path / "elsewhere", out=tmp_path / "run", epochs=1)


def test_momentum_without_sgd_is_said_to_do_nothing():
    said = TrainOptions(epochs=1, momentum=0.5).warnings()
    assert any("--momentum 0.5 has no effect" in w for w in said)
    assert not TrainOptions(epochs=1, momentum=0.5, optimizer="sgd").warnings()


def test_keyword_text_rewrites_flags_joined_by_a_slash_and_keeps_text_values():
    from surgery.flag_names import keyword_text

    params = inspect.signature(surgery.train).parameters
    assert keyword_text("--mixup/--cutmix mix whole images", params) == "mixup/cutmix mix whole images"
    assert keyword_text("--augment must be one of none, light", params) == "augment must be one of none, light"
    assert keyword_text("see data/--x or --resume", params) == "see data/--x or resume=True"
