"""Thin build_ext: compiles the Cython sources in ext/ into agent._native.*.

Set FERRY_ANNOTATE=1 to write Cython's HTML annotation beside each source.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

NATIVE_FLAGS = ["-O3", "-march=native", "-fno-strict-aliasing"]


def native(name: str, libraries: list[str] | None = None) -> Extension:
    """One extension module agent._native.NAME built from ext/NAME.pyx."""
    return Extension(
        f"agent._native.{name}",
        [f"ext/{name}.pyx"],
        include_dirs=["ext"],
        libraries=libraries or [],
        extra_compile_args=NATIVE_FLAGS + ["-pthread"],
        extra_link_args=["-pthread"],
    )


# C libraries each extension links against, beyond libc; every ext/NAME.pyx is built.
LIBRARIES = {"codec": ["xxhash"]}
EXTENSIONS = [
    native(name, LIBRARIES.get(name))
    for name in sorted(os.path.splitext(f)[0] for f in os.listdir("ext") if f.endswith(".pyx"))
]

setup(
    ext_modules=cythonize(
        EXTENSIONS,
        language_level=3,
        annotate=bool(os.environ.get("FERRY_ANNOTATE")),
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
