"""Builds the native helpers (llm_datadist_torch._C) against the torch already installed.

Install with `pip install --no-build-isolation -e .`: torch is deliberately not a build
requirement, so the extension always matches the runtime torch.
"""
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent


def _csrc(pattern):
    # Found from this file's directory but handed over relative to it: setuptools rejects
    # absolute paths in setup() arguments.
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob(pattern))


setup(
    ext_modules=[
        CppExtension(
            "llm_datadist_torch._C",
            _csrc("*.cpp"),
            depends=_csrc("*.h"),  # a header edit rebuilds the extension
            include_dirs=["csrc"],
            # -g0: the inherited -g nearly doubles build time and bloats the .so 15x.
            # -fvisibility=hidden: what pybind11 expects of module code (only PyInit_ is exported).
            # No -std: torch adds the standard its headers need (C++20 for torch 2.13, whose
            # headers warn under C++17).
            extra_compile_args=["-O2", "-g0", "-fvisibility=hidden"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)},
)
