"""Local helper processes (S3 server, Ray nodes, Prefect server): free loopback ports,
liveness by PID, and stopping exactly the processes resflow started, by PID."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import time


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, low: int = 20000, high: int = 45000, avoid: set[int] = frozenset(),
               spacing: tuple[int, ...] = (0,)) -> list[int]:
    """`count` distinct ports P, each with every P + offset in `spacing` free too."""
    rng = secrets.SystemRandom()
    chosen: list[int] = []
    for _ in range(2000):
        port = rng.randrange(low, high)
        wanted = [port + offset for offset in spacing]
        taken = set(avoid) | {p + o for p in chosen for o in spacing}
        if any(p in taken for p in wanted) or not all(port_free(p) for p in wanted):
            continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise RuntimeError(f"found no {count} free loopback port(s) between {low} and {high}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return True


def stop_pid(pid: int, timeout: float = 60.0, hard: bool = False) -> None:
    """SIGTERM the process group led by `pid` (our services start in their own session),
    wait for the leader to exit, then SIGKILL; `hard` kills at once, as a crash would."""
    if not pid_alive(pid):
        return
    sig = signal.SIGKILL if hard else signal.SIGTERM
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        time.sleep(0.2)


def wait_until(check, timeout: float, what: str, interval: float = 0.5, alive=lambda: True) -> None:
    """Poll `check()` until true; fail after `timeout` s, or at once when `alive()` turns false."""
    deadline = time.monotonic() + timeout
    while not check():
        if not alive():
            raise RuntimeError(f"{what}: the process exited before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(interval)


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below `pid`, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(entry))
        except OSError:
            continue
    found, stack = [], list(parents.get(pid, []))
    while stack:
        child = stack.pop()
        try:
            with open(f"/proc/{child}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        found.append((child, command))
        stack.extend(parents.get(child, []))
    return found


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    members.append(int(entry))
            except OSError:
                continue
    return members


def kill_group(pgid: int, timeout: float = 15.0) -> None:
    """SIGKILL what is left of a process group whose leader may already be gone (a node
    whose raylet was killed leaves its agents behind, holding their ports)."""
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.2)
