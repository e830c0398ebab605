"""The test suite mirrors the package: one folder per subpackage, plus cli/ and hardening/."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the repository root
