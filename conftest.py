"""Session-wide test setup.

Without a GPU, the Triton kernels run in Triton's interpreter. Triton must see TRITON_INTERPRET=1
before `triton.language` is first imported (importing the runtime imports the kernels, which import
triton), or interpreted kernels fail on nested `tl.*` helpers; so it is set here, before any test
module is imported. On a GPU machine the variable is left alone and the kernels compile.
"""
import os
import time
from collections import Counter

import pytest

try:
    import torch
    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")


# --------------------------------------------------------------------------------------------------
# Progress per file under pytest-xdist (`-n`): its controller prints only dots, so it gets one line per
# finished test file with a running count and the time so far. (Without xdist, pyproject's
# console_output_style = "count" prints a line per file.)
# --------------------------------------------------------------------------------------------------
class _FileProgress:
    def __init__(self, config):
        self.config, self.left, self.done, self.total = config, None, 0, 0
        self.start = time.monotonic()

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        if self.left is None:  # every worker collects the same ids
            self.left, self.total = Counter(i.split("::")[0] for i in ids), len(ids)

    def pytest_runtest_logreport(self, report):
        if report.when != "teardown" or self.left is None:  # one teardown report per test
            return
        path = report.nodeid.split("::")[0]
        self.done += 1
        self.left[path] -= 1
        if self.left[path] == 0:
            reporter = self.config.pluginmanager.get_plugin("terminalreporter")
            reporter.write("\n")  # xdist's dots do not tell the reporter a line is open
            reporter.write_line(f"{path} done [{self.done}/{self.total}] {time.monotonic() - self.start:.0f} s")


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist") and getattr(config.option, "numprocesses", None) \
            and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_FileProgress(config), "file-progress")
