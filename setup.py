"""Build lub_fast's C++/CUDA extensions with torch.utils.cpp_extension (ninja).

- ``lub_fast._C``: the CPU kernels (C++), always built.
- ``lub_fast._C_cuda``: the CUDA kernels, built when a CUDA toolkit is found (nvcc, decided by the
  toolkit, not by a visible GPU) and torch itself was built with CUDA; ``LUB_FAST_BUILD_CUDA=0``
  turns it off.
- ``LUB_FAST_NO_EXT=1`` installs pure Python: every op then runs its PyTorch reference.

Torch must already be installed: ``pip install --no-build-isolation .``
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _extensions():
    if os.environ.get("LUB_FAST_NO_EXT", "0") == "1":
        print("lub_fast: LUB_FAST_NO_EXT=1, installing pure Python (PyTorch references only)")
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    # *_core.cpp: torch-free algorithms shared with the CMake/ctest build; *.cpp: torch registration.
    cpu_sources = [s for s in _sources("csrc/**/*.cpp") if "/tests/" not in s and not s.endswith("_cuda.cpp")]
    exts = [
        cpp_extension.CppExtension(
            "lub_fast._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]

    cuda_sources = _sources("csrc/**/*.cu") + _sources("csrc/**/*_cuda.cpp")
    want_cuda = os.environ.get("LUB_FAST_BUILD_CUDA", "1") != "0"
    if want_cuda and cuda_sources:
        if cpp_extension.CUDA_HOME is None:
            print("lub_fast: no CUDA toolkit found (nvcc), building the CPU extension only")
        elif torch.version.cuda is None:
            print(
                f"lub_fast: CUDA toolkit at {cpp_extension.CUDA_HOME} but torch {torch.__version__} "
                "is a CPU build, building the CPU extension only"
            )
        else:
            exts.append(
                cpp_extension.CUDAExtension(
                    "lub_fast._C_cuda",
                    cuda_sources,
                    include_dirs=include_dirs,
                    extra_compile_args={
                        "cxx": ["-O3", "-std=c++17"],
                        "nvcc": ["-O3", "-std=c++17", "-lineinfo",
                                 "--expt-relaxed-constexpr", "-Xptxas=-v"],
                    },
                )
            )
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def _stamped(build_ext):
    """``build_ext`` that records the csrc/ sources it built from (``lub_fast/_build_stamp.py``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_build_stamp", os.path.join(ROOT, "lub_fast", "_build_stamp.py"))
    stamp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stamp)

    class StampedBuildExt(build_ext):
        def run(self):
            super().run()
            stamp.write_stamp(os.path.join(ROOT, "lub_fast"), os.path.join(ROOT, "csrc"))

    return StampedBuildExt


ext_modules, cmdclass = _extensions()
if "build_ext" in cmdclass:
    cmdclass["build_ext"] = _stamped(cmdclass["build_ext"])
setup(ext_modules=ext_modules, cmdclass=cmdclass)
