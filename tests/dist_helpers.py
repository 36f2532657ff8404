"""Shared helpers for the tests that start several gloo processes."""

import socket


def free_port() -> int:
    """A TCP port nothing listens on now, for a test's MASTER_PORT (tests may run side by side)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
