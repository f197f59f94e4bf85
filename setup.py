"""Package layout: `specsa` lives in python/specsa, `specsa.kernels` in the top-level kernels/.

Kept in setup.py because setuptools' static `packages.find` cannot rename a discovered
top-level folder (kernels/ -> specsa.kernels); everything else is in pyproject.toml.
"""
from setuptools import find_packages, setup

_kernels = find_packages(".", include=["kernels", "kernels.*"])
# specsa.assets.tinytok is a data folder (the demo tokenizer's JSON files, no __init__.py):
# listed so setuptools ships it without its "absent from the packages configuration" warning
setup(
    packages=find_packages("python") + ["specsa.assets.tinytok"]
    + ["specsa." + p for p in _kernels],
    package_dir={"specsa": "python/specsa", "specsa.kernels": "kernels"},
)
