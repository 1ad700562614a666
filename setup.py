"""Ships the C++ sources inside the package; nothing is compiled at install time.

gcoffload builds its extension on first use (see gcoffload/_ext.py), so the
build needs no torch, and `pip install .` never pulls a torch wheel into an
isolated build environment. The one job left for setup.py is copying csrc/
into the built package as gcoffload/csrc.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"


class BuildPyWithSources(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "gcoffload" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(SOURCE_DIR.iterdir()):
            if source.suffix in {".h", ".cpp"}:
                shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildPyWithSources})
