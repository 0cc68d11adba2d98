"""The suite's clean-up of DeepSpeed's CPU all-reduce buffers (tests/conftest.py): what a finished run left in
/dev/shm goes, what a live rank maps or another run just made stays."""

from __future__ import annotations

import mmap
import os
import time
import uuid

import pytest
from conftest import SHM, stale_shm_buffers

pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm on this machine")


def _buffer(age: float):
    path = SHM / f"deepspeed_allreduce_buffer_test_{uuid.uuid4().hex[:8]}_0"
    path.write_bytes(b"\0" * 4096)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_a_left_buffer_is_stale_a_mapped_or_new_one_is_not() -> None:
    left, mapped, new = _buffer(120), _buffer(120), _buffer(0)
    try:
        with open(mapped, "r+b") as f, mmap.mmap(f.fileno(), 4096) as live:
            stale = stale_shm_buffers(since=time.time() - 3600)
            assert left in stale
            assert mapped not in stale and new not in stale
            live[0] = 1
        assert left in stale_shm_buffers(since=time.time() - 3600)
        assert left not in stale_shm_buffers(since=time.time())  # made before the session: not its to remove
    finally:
        for path in (left, mapped, new):
            path.unlink(missing_ok=True)
