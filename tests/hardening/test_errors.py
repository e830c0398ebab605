"""Every error a user can reach from the CLI is one line on stderr with exit code 2.

Walks every SurgeryError subclass (surgery.errors, surgery.trainer.*) through
the CLI's handler, checks every registered command is wrapped by it, and feeds each command that
reads a file a corrupt one.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import typer

import surgery
from surgery.errors import SurgeryError


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _all_subclasses(sub)
    return out


def _import_library() -> None:
    """Import every surgery module (cheap ones; they import torch lazily or not at all) so every
    SurgeryError subclass is defined."""
    for m in pkgutil.walk_packages(surgery.__path__, "surgery."):
        importlib.import_module(m.name)


def _instance(cls: type) -> SurgeryError:
    sig = inspect.signature(cls.__init__)
    params = [p for p in list(sig.parameters.values())[1:] if p.default is p.empty
              and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if cls.__init__ is Exception.__init__ or not params:
        return cls("bad.pt: something is wrong\nacross two lines; fix it")
    args = {"path": "bad.pt", "names": ["os.system", "torch.nn.modules.conv.Conv2d"]}
    return cls(*[args.get(p.name, "x") for p in params])


def test_every_error_class_is_known():
    _import_library()
    classes = _all_subclasses(SurgeryError)
    names = {c.__module__ + "." + c.__name__ for c in classes}
    for expected in ("surgery.errors.FormatError", "surgery.errors.UnsafeCheckpointError",
                     "surgery.errors.ManifestError", "surgery.errors.DataError",
                     "surgery.errors.TrainError"):
        assert expected in names, sorted(names)


def test_every_error_class_maps_to_one_line_exit_2(capsys):
    from cli.common import handles_errors

    _import_library()
    classes = sorted(_all_subclasses(SurgeryError) | {SurgeryError}, key=lambda c: c.__qualname__)
    assert len(classes) >= 10
    for cls in classes:
        err = _instance(cls)

        @handles_errors
        def command():
            raise err

        with pytest.raises(typer.Exit) as info:
            command()
        code = info.value.exit_code
        assert code == getattr(cls, "exit_code", 2), cls
        assert code != 0 and code != 1, cls  # 1 is what an unhandled traceback gives
        stderr = capsys.readouterr().err
        assert stderr.startswith("error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr, (cls, stderr)
        assert len(stderr.strip()) > len("error: "), cls


def test_every_command_is_wrapped_by_the_handler():
    from cli.main import app

    cmds = {c.name or c.callback.__name__: c.callback for c in app.registered_commands}
    assert {"inspect", "remap", "adapt", "train"} <= set(cmds)
    for name, fn in cmds.items():
        assert hasattr(fn, "__wrapped__") and fn.__module__.startswith("cli."), f"{name} is not wrapped by handles_errors"
        src = inspect.getsource(inspect.unwrap(fn))
        assert "sys.exit" not in src and "traceback" not in src, name


def test_handler_lets_bugs_through():
    """Only SurgeryError is swallowed: a real bug must stay visible, not look like bad input."""
    from cli.common import handles_errors

    @handles_errors
    def command():
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        command()


@pytest.mark.parametrize("argv", [
    ["inspect", "{bad}"],
    ["inspect", "{bad}", "--json"],
    ["remap", "{bad}", "{tmp}/o.safetensors"],
    ["remap", "{bad}", "{tmp}/o.pt", "--dtype", "bf16"],
    ["diff", "{bad}", "{bad}"],
    ["adapt", "{bad}", "--arch", "resnet18", "--num-classes", "3", "--out", "{tmp}/ad"],
    ["train", "{tmp}", "--data", "{tmp}"],
    ["remap", "{good}", "{tmp}/o.safetensors", "--rules", "{rules}"],
])
def test_cli_commands_on_bad_input(cli, make, tmp_path, argv):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04" + b"\xff" * 200)
    rules = tmp_path / "r.yaml"
    rules.write_text("ops: [{rename: ['(', 'x']}]\n")
    args = [a.format(bad=bad, tmp=tmp_path, good=make("ddp_pt"), rules=rules) for a in argv]
    r = cli(*args)
    assert r.exit_code == 2, (r.exit_code, r.stdout[-500:], r.stderr[-1500:], repr(r.exception))
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in r.stdout + r.stderr, err
