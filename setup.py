"""Build: the pure-Python packages plus the C++ packing extension ``mllm._C`` (pybind11, no torch ABI)."""
from setuptools import setup

ext_modules = []
try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    if __import__("os").path.exists("csrc/packing.cpp"):
        ext_modules.append(
            Pybind11Extension("mllm._C", ["csrc/packing.cpp"], cxx_std=17, extra_compile_args=["-O3"])
        )
    cmdclass = {"build_ext": build_ext}
except ImportError:  # pybind11 missing: pure-Python install, packing falls back to the reference
    cmdclass = {}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
