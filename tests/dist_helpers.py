"""Shared helpers for the tests that start several gloo processes."""

import socket
from contextlib import contextmanager

import torch.distributed as dist


def free_port() -> int:
    """A TCP port nothing listens on now, for a test's MASTER_PORT (tests may run side by side)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gloo_group(init_file, rank: int, world_size: int):
    """This process as `rank` of a gloo group whose ranks meet through `init_file` (a path in the test's
    tmp_path: no TCP port to race for), destroyed on the way out, whatever happened inside."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
