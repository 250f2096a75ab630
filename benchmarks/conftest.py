"""Every benchmark result names the code it measured: the git revision (and whether the tree was
dirty, with the changed files) goes into each result's ``extra_info`` (pytest-benchmark's JSON) and
into the header and the last line of the run's output, so that a results file copies it from there.
A run from a dirty tree says so at the end: commit first, or state the uncommitted changes."""

import pytest
from timing import describe_revision, git_revision

# Taken once at the start: the code that runs, not what HEAD is when the run ends.
REVISION = git_revision()


def pytest_report_header(config):
    return f"benchmarks measure {describe_revision(REVISION)}"


@pytest.fixture(autouse=True)
def _record_revision(request):
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info.update(REVISION)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"measured at {describe_revision(REVISION)}")
    if REVISION["git_dirty"]:
        terminalreporter.write_line(
            "a results file from this run must name the dirty tree as above, or rerun after committing for a clean revision",
            yellow=True,
        )
