"""Build: the pure-Python package always installs, and by default nothing is compiled.

The CUDA kernels (csrc/cuda/) are compiled at run time by NVRTC (flashops/_cuda.py); a built package carries their
sources as flashops/_cuda_sources/ (an editable install reads csrc/cuda/ itself).

``FLASHOPS_BUILD_EXT=1`` also builds the C++ extension ``flashops._C`` ahead of time, from the sources listed in
flashops/_ext.py, with torch's ``CppExtension`` (torch must be importable in the build environment, e.g.
``FLASHOPS_BUILD_EXT=1 pip install --no-build-isolation -e .``). Without it, flashops compiles the same sources
just in time on first use (flashops/_ext.py; docs/install.md).
"""

import ast
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

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


class BuildPyWithCudaSources(build_py):
    """build_py, plus a copy of csrc/cuda/ (.cu and .cuh files) as flashops/_cuda_sources/."""

    def run(self):
        super().run()
        sources = ROOT / "csrc" / "cuda"
        target = Path(self.build_lib) / "flashops" / "_cuda_sources"
        for path in sources.rglob("*"):
            if path.suffix in (".cu", ".cuh"):
                destination = target / path.relative_to(sources)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, destination)


options = _extension_options()
options["cmdclass"] = {**options.get("cmdclass", {}), "build_py": BuildPyWithCudaSources}
setup(**options)
