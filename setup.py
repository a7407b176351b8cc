"""Maps the repository's top-level folders onto the llmux. namespace.

common/ installs as llmux.common, service/ as llmux.service, client/ as llmux.client and
shim/ as llmux.shim; the package list is derived from the tree so that a new subpackage
needs no edit here.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# a folder left out of the sources is left out of the wheel: the host .deb builds
# from common/, service/ and client/ (packaging/deb/build.sh), the shim's image from
# common/, client/ and shim/ (packaging/Containerfile)
ROOTS = {
    folder: name
    for folder, name in {
        "common": "llmux.common", "service": "llmux.service", "client": "llmux.client",
        "shim": "llmux.shim",
    }.items()
    if (HERE / folder).is_dir()
}

packages = [
    f"{name}{'.' + sub if sub else ''}"
    for folder, name in ROOTS.items()
    for sub in ["", *find_packages(folder)]
]

# folders of data, not code, installed as they are: the operator page (shim/static/), which
# the shim serves from the installed package
DATA = {"llmux.shim.static": ["*.html", "*.js", "*.css"]} if "shim" in ROOTS else {}
packages += list(DATA)

setup(
    packages=packages,
    package_dir={name: folder for folder, name in ROOTS.items()},
    # the shim's OpenAPI description (served at /openapi.json) and the operator page's files
    package_data={**{name: ["py.typed", *(["openapi.json"] if name == "llmux.shim" else [])]
                     for name in ROOTS.values()}, **DATA},
)
