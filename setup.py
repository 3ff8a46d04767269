"""Build: the pure-Python package always installs, and by default nothing is compiled.

``FLASHOPS_BUILD_EXT=1`` also builds the C++ extension ``flashops._C`` ahead of time, from the sources listed in
flashops/_ext.py, with torch's ``CppExtension`` (torch must be importable in the build environment, e.g.
``FLASHOPS_BUILD_EXT=1 pip install --no-build-isolation -e .``). Without it, flashops compiles the same sources
just in time on first use (flashops/_ext.py; docs/install.md).
"""

import ast
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _ext_constant(name: str):
    """A literal constant of flashops/_ext.py, read without importing the package (that needs torch)."""
    tree = ast.parse((ROOT / "flashops" / "_ext.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"flashops/_ext.py defines no constant {name}")


def _extension_options() -> dict:
    if os.environ.get("FLASHOPS_BUILD_EXT", "").strip() in ("", "0"):
        return {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # The rule of flashops/_ext.py: at::parallel_for needs OpenMP in the extension when torch's backend is OpenMP.
    openmp = []
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        openmp = ["/openmp"] if sys.platform == "win32" else (["-fopenmp"] if sys.platform.startswith("linux") else [])
    extension = CppExtension(
        "flashops._C",
        sources=list(_ext_constant("SOURCES")),
        extra_compile_args=list(_ext_constant("CFLAGS")) + openmp,
        extra_link_args=openmp,
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**_extension_options())
