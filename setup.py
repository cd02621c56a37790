"""Build hook: ship the Hydra configs (conf/) and the studies (sweeps/) inside the package.

The repository's top-level conf/ and sweeps/ stay the source; a wheel carries copies as scaling/conf and
scaling/sweeps, which `scaling.config` finds when the top-level folders are not there (`pip install .`).
Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithConfigs(build_py):
    def run(self):
        super().run()
        for name in ("conf", "sweeps"):
            target = Path(self.build_lib) / "scaling" / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
