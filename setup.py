"""The one compiled part: the packet contract's fast path (distributor/ingest/_packet_scan.c).

``optional``: without a C compiler the install still succeeds and the contract runs in Python
alone (same answers, more CPU per packet); scripts/venv.sh installs gcc where it can.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("distributor.ingest._packet_scan", ["distributor/ingest/_packet_scan.c"], optional=True,
              extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror=implicit"]),
])
