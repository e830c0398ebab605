"""Package list (the rest of the metadata is in pyproject.toml).

The repository keeps the command line in ``cli/`` (``python -m cli.main`` works from a checkout);
installed, it is ``surgery.cli``, so nothing but ``surgery`` lands in site-packages. ``fixtures/``
(test data generators) is not installed.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["surgery", "surgery.*"]), "surgery.cli"], package_dir={"surgery.cli": "cli"})
