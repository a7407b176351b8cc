"""Maps the repository's top-level folders onto the llmux. namespace.

service/ installs as llmux.service, client/ as llmux.client and shim/ as llmux.shim;
the package list is derived from the tree so that a new subpackage needs no edit here.
"""

from setuptools import find_packages, setup

ROOTS = {"service": "llmux.service", "client": "llmux.client", "shim": "llmux.shim"}

packages = [
    f"{name}{'.' + sub if sub else ''}"
    for folder, name in ROOTS.items()
    for sub in ["", *find_packages(folder)]
]

setup(
    packages=packages,
    package_dir={name: folder for folder, name in ROOTS.items()},
    package_data={name: ["py.typed"] for name in ROOTS.values()},
)
