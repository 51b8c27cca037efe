"""The C walk of daemon.usage.fdscan (daemon/usage/_fdscan.c)."""

from collections.abc import Sequence

def scan(pids: Sequence[int], targets: Sequence[tuple[int, int]], /) -> list[tuple[int, int]]:
    """(pid, i) for every pid holding an open fd on targets[i] = (st_dev, st_ino); each pair once."""
