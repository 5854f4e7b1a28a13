"""`slope` under torchrun with two CPU processes (gloo on 127.0.0.1), for tests outside tests/distributed."""

from __future__ import annotations

import socket
import subprocess
import sys


def run_slope_on_two_ranks(*args: str) -> None:
    """`torchrun --nproc_per_node 2 -m slope ARGS` on a free local port; fails the test on a non-zero exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "slope", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
