"""The one error family a user can meet.

Every message says what is wrong, where (file or key), and what to do about it. The CLI maps any
SurgeryError to exit code 2 and prints its message on one line; anything else is a bug.
"""

from __future__ import annotations


class SurgeryError(Exception):
    """Base class: bad input or a refused operation, never a bug in surgery itself."""

    exit_code = 2

    def one_line(self) -> str:
        return " ".join(str(self).split())


class InputError(SurgeryError):
    """A path that does not exist, is empty, or is the wrong kind of thing."""


class FormatError(SurgeryError):
    """Bytes that do not form a checkpoint of the format they claim to be."""


class UnsafeCheckpointError(SurgeryError):
    """A pickle that needs globals outside the allowlist; nothing of it was run.

    ``--allow-global`` is suggested only where accepting the names as inert records still gives
    the tensors: ``names`` may carry ``builds_tensors`` (globals that build tensor data by running
    code) and ``tensors_found`` (whether any tensor is left with every name accepted).
    """

    def __init__(self, path: str, names: list[str]):
        self.path = path
        builds = sorted(set(getattr(names, "builds_tensors", ())))
        found = getattr(names, "tensors_found", True)
        self.names = sorted(set(names))
        if builds:
            others = [n for n in self.names if n not in builds]
            also = f" (it also needs {_listed(others)})" if others else ""
            what = (f"its tensors are built by code: {_listed(builds)}{also}. Nothing was executed. surgery never runs "
                    f"such code, and accepting these names as data would lose those tensors; load the file with torch "
                    f"where you trust it and save model.state_dict()")
        elif not found:
            what = (f"the checkpoint needs globals that are not on the weights-only allowlist: {_listed(self.names)}, "
                    f"and even accepted as opaque data they leave no tensor surgery can read. Nothing was executed")
        elif any(n.startswith("torch.nn.modules.") for n in self.names):
            # torch.save(model): many classes; one pattern per package reads the weights
            packages = sorted({n.split(".")[0] for n in self.names})
            allow = " ".join(f"--allow-global '{p}.*'" for p in packages)
            what = (f"this is a whole pickled model (torch.save(model)), which needs its classes: "
                    f"{_listed(self.names)}. Nothing was executed. "
                    f"To read its weights without running its code, accept the classes as opaque data with {allow}")
        else:
            allow = " ".join(f"--allow-global {n}" for n in self.names)
            what = (f"the checkpoint needs globals that are not on the weights-only allowlist: "
                    f"{', '.join(self.names)}. Nothing was executed. If you trust the file, accept them as "
                    f"opaque data with {allow}")
        super().__init__(f"{path}: refusing to unpickle: {what} (surgery never imports or calls them)")


def _listed(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" ... ({len(names)} in all)" if len(names) > 4 else "")


class SelectError(SurgeryError):
    """--select names no container in the checkpoint."""


class RuleError(SurgeryError):
    """A remap rule that cannot be applied: bad regex, bad rules file, colliding names."""


class OutputError(SurgeryError):
    """A destination that cannot or must not be written."""


# ----------------------------------------------------------------------------- training (surgery.trainer)

class DataError(SurgeryError):
    """The training data cannot be used as given: missing, empty, malformed or inconsistent."""


class TrainError(SurgeryError):
    """A training run that cannot start or continue as asked."""


class ResumeError(TrainError):
    """A checkpoint that is missing, unreadable, or belongs to another model or dataset."""


class TrainInterrupted(TrainError):
    """Ctrl-C or SIGTERM: the state of the last finished epoch is in last.pt."""

    exit_code = 130


# ----------------------------------------------------------------------------- adapt

class AdaptError(SurgeryError):
    """An adaptation that cannot be done as asked: bad option, unknown arch, unloadable checkpoint."""


class ArchError(AdaptError):
    """ARCH names no model surgery can build (unknown name, factory that fails to import or run)."""


class TrustError(ArchError):
    """A folder's manifest names code (a factory) and the caller did not pass trust_code."""


class AlignError(AdaptError):
    """The checkpoint's keys cannot be matched to the model unambiguously, or match almost nothing."""


class ManifestError(AdaptError):
    """A manifest.json that is missing, of another schema version, or inconsistent with its weights."""


class DemoError(SurgeryError):
    """The demo cannot run here (a missing optional dependency)."""


class ExportError(SurgeryError):
    """A model that cannot be exported in the asked format, or a missing exporter package."""


class LoggerError(SurgeryError):
    """A logger that cannot start."""


class CodeNeededError(UnsafeCheckpointError):
    """``sanitize``: values the pickle builds by calling globals it knows no data form for; nothing ran."""

    def __init__(self, path: str, names: list[str]):
        self.path = path
        self.names = sorted(set(names))
        allow = " ".join(f"--allow-global {n}" for n in self.names[:4])
        SurgeryError.__init__(self, (
            f"{path}: refusing to sanitize: the pickle builds values by calling {_listed(self.names)}, code that "
            f"surgery never runs. Nothing was executed. Such values cannot be kept as data; if you trust the file, "
            f"{allow} drops them (each listed in the report)"))
