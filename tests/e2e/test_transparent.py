"""Transparent capture end to end, in a network namespace (see netns_capture.py). It needs root
and iptables, which `make test` and CI provide: without them this fails rather than skips."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_captured_calls_are_routed_and_guarded_and_the_rest_passes_through():
    assert os.geteuid() == 0, "transparent capture is tested as root, in a network namespace of its own"
    for tool in ("unshare", "iptables", "ip", "curl", "openssl"):
        assert shutil.which(tool), f"{tool} is needed (make test installs iptables; .ci/run the rest)"
    run = subprocess.run(
        ["unshare", "--net", "--mount", sys.executable, str(HERE / "netns_capture.py")],
        capture_output=True, text=True, timeout=120,
    )
    print(run.stdout)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
