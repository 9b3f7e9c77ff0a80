"""Every request a fuzzer once found harmful, replayed against the current server.

`fuzz/api/regressions/*.jsonl` are reproducers written by fuzz/api (`--replay`
format): the chain crash of issue 17 finding 1, the LZ4 engine state that leaked
from one tenant's failed frame into the next job, and a Submit stream past its
deadline that ended OK (or UNKNOWN) with its jobs unanswered, and the negative
`grpc-timeout` that crashed the grpc-swift edge. Each must now replay
cleanly, in embedded and daemon mode.
"""
import glob
import os
import subprocess
import sys

import pytest

from conftest import ROOT, server_binary

CASES = sorted(glob.glob(os.path.join(ROOT, "fuzz", "api", "regressions", "*.jsonl")))


@pytest.mark.parametrize("path", CASES, ids=[os.path.basename(p)[:-6] for p in CASES])
def test_a_past_fuzz_finding_no_longer_reproduces(path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "fuzz", "api", "api_fuzz.py"), "--replay", path,
                        "--target", "both", "--binary", server_binary()],
                       capture_output=True, timeout=600)
    out = (p.stdout + p.stderr).decode(errors="replace")
    assert p.returncode == 0, out[-3000:]
    assert "not reproduced" in out, out[-3000:]


def test_there_are_regressions_to_replay():
    assert len(CASES) >= 3
