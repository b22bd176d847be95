# cffi hooks into setuptools only through setup(cffi_modules=...);
# everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["csrc/build.py:ffibuilder"])
