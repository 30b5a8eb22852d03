"""pytest setup of benchmarks/: these are pytest-benchmark timings, not tests. They are outside the suite's testpaths
(tests/), and even when collected explicitly they only run with ``--benchmark-only`` (or ``--benchmark-enable`` /
LPT_BENCH=1); otherwise each is reported as skipped with that hint."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import bench_ops` under any import mode


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a pytest-benchmark timing of benchmarks/ (not part of the test suite)")


def pytest_collection_modifyitems(config, items):
    wanted = (config.getoption("benchmark_only", False) or config.getoption("benchmark_enable", False)
              or os.environ.get("LPT_BENCH") == "1")
    if wanted:
        return
    skip = pytest.mark.skip(reason="benchmark: run with `pytest benchmarks/ --benchmark-only`")
    for item in items:
        if item.get_closest_marker("bench") is not None:
            item.add_marker(skip)
