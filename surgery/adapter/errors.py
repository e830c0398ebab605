"""Errors of `surgery adapt`: all SurgeryError, so the CLI maps them to exit code 2."""

from __future__ import annotations

from ..errors import SurgeryError


class AdaptError(SurgeryError):
    """An adaptation that cannot be done as asked: bad option, unknown arch, unloadable checkpoint."""


class ArchError(AdaptError):
    """ARCH names no model surgery can build (unknown name, factory that fails to import or run)."""


class AlignError(AdaptError):
    """The checkpoint's keys cannot be matched to the model's unambiguously, or match almost nothing."""


class ManifestError(AdaptError):
    """A manifest.json that is missing, of another schema version, or inconsistent with its weights."""
