"""The compiled parts of the hot path, each with a Python reference it must agree with:
the packet contract's fast path (distributor/ingest/_packet_scan.c, reference contract.parse_packet_python)
and routing's per-packet arithmetic (distributor/delivery/_weighted_pick.c, reference routing.best_index).

``optional``: without a C compiler the install still succeeds and the references run alone (same
answers, more CPU per packet); scripts/venv.sh installs gcc where it can.
"""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror=implicit"]

setup(ext_modules=[
    Extension("distributor.ingest._packet_scan", ["distributor/ingest/_packet_scan.c"], optional=True,
              extra_compile_args=FLAGS),
    Extension("distributor.delivery._weighted_pick", ["distributor/delivery/_weighted_pick.c"], optional=True,
              extra_compile_args=FLAGS),
])
