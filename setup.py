"""Build: the pure-Python packages plus the C++ packing extension ``mllm._C`` (pybind11, no torch ABI)."""
import os
import warnings

from setuptools import setup

# setuptools resolves sources, packages and --inplace against the working directory: run from elsewhere
# (`python /path/to/setup.py build_ext --inplace`) it found no csrc/ and built nothing, exit 0. Relative paths given
# on the command line (e.g. `-d dist`) are therefore taken from this folder too
os.chdir(os.path.dirname(os.path.abspath(__file__)))

ext_modules = []
try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    if os.path.exists("csrc/packing.cpp"):
        ext_modules.append(
            Pybind11Extension("mllm._C", ["csrc/packing.cpp"], cxx_std=17, extra_compile_args=["-O3"])
        )
    else:  # a source tree without csrc/ (a partial copy): say so rather than build nothing silently
        warnings.warn("csrc/packing.cpp not found next to setup.py: mllm._C is not built, packing uses the "
                      "pure-Python reference")
    cmdclass = {"build_ext": build_ext}
except ImportError:  # pybind11 missing: pure-Python install, packing falls back to the reference
    cmdclass = {}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
