"""The store lock's heartbeat: a live holder is never taken over, a dead one is after the bound.

Holders are separate processes (forks of conftest's ``forker``) holding a real lock — a local
``flock`` or a lock object on the session's moto S3 server — with a short heartbeat; this
process is the other build, trying to take the lock. A holder "on another host" reports a
made-up host name, so the taker cannot see that its process is gone and has only the
heartbeat to go by (as across machines).
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest

from hoverlay.stores import StoreLockedError
from hoverlay.stores.lock import LOCK_NAME, STALE_BEATS, StoreLock

pytestmark = [pytest.mark.slow, pytest.mark.serial]

#: seconds between the holders' heartbeats: the stale bound is STALE_BEATS of them (4 s). Not
#: less: on a loaded 2-core machine (load 10) a 0.5 s heartbeat's write was seen 3 s late
BEAT = 1.0
BOUND = STALE_BEATS * BEAT

HOLDER = """
import json, socket, sys, time
from hoverlay.stores.lock import StoreLock
if ARGS["host"]:
    socket.gethostname = lambda: ARGS["host"]  # a holder on another machine
lock = StoreLock(ARGS["url"], storage_options=ARGS["options"], heartbeat=ARGS["beat"]).acquire()
print("held", flush=True)
while True:  # a long build: until killed, or asked (by a file) whether it still holds the lock
    time.sleep(0.05)
    try:
        open(ARGS["ask"]).close()
    except FileNotFoundError:
        continue
    try:
        lock.check()
        print("still holds it", flush=True)
    except Exception as exc:
        print(f"lost: {exc}", flush=True)
    break
"""


def _hold(forker: Any, url: str, options: dict[str, Any] | None, tmp_path: Any, host: str | None = None) -> Any:
    child = forker.spawn(code=HOLDER, args={"url": url, "options": options, "beat": BEAT, "host": host,
                                            "ask": str(tmp_path / "ask")}, name="holder")
    assert child.wait_for_line(lambda ln: ln == "held", 60), child.lines()
    return child


def _refused_for(urls: list[str], options: dict[str, Any] | None, seconds: float) -> int:
    """Try to take each lock every 0.3 s for ``seconds``: the number of refusals (all, or fail)."""
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for url in urls:
            lock = StoreLock(url, storage_options=options)
            with pytest.raises(StoreLockedError, match="last heartbeat"):
                lock.acquire()
            n += 1
        time.sleep(0.3)
    return n


def _taken_at(urls: dict[str, str], options: dict[str, Any] | None,
              timeout: float = 60) -> dict[str, tuple[StoreLock, float]]:
    """Try every 0.1 s until each lock is ours: name -> (the lock, time.monotonic() when it was).
    A takeover also checks that the lock it replaced had missed its heartbeats for the bound."""
    deadline = time.monotonic() + timeout
    taken: dict[str, tuple[StoreLock, float]] = {}
    while len(taken) < len(urls):
        for name, url in urls.items():
            if name in taken:
                continue
            lock = StoreLock(url, storage_options=options)
            try:
                lock.acquire()
            except StoreLockedError:
                if time.monotonic() > deadline:
                    raise
                continue
            if lock.took_over is not None:  # its last heartbeat (its clock is ours) was BOUND ago
                assert time.time() - lock.took_over["beat"] > BOUND, lock.took_over
            taken[name] = (lock, time.monotonic())
        time.sleep(0.1)
    return taken


def test_local_lock_heartbeat_names_a_live_holder_and_a_killed_one_frees_it_at_once(forker, tmp_path):
    store = tmp_path / "local.zarr"
    holder = _hold(forker, str(store), None, tmp_path)
    first = json.loads((store / LOCK_NAME).read_text())
    _refused_for([str(store)], None, 2 * BEAT)
    assert json.loads((store / LOCK_NAME).read_text())["beat"] > first["beat"]  # refreshed
    holder.kill()
    assert holder.wait(30) == -signal.SIGKILL
    lock, _ = _taken_at({"local": str(store)}, None, timeout=5)["local"]  # the kernel dropped the flock
    assert lock.took_over is None
    lock.release()


def test_s3_lock_live_holders_are_never_taken_over_dead_or_frozen_ones_are_after_the_bound(
        s3_server, forker, tmp_path, capsys):
    """Two holders, two stores: one on "another host", one on this host. While they beat, both
    are refused for longer than the bound. Then the first is killed (-9) and the second frozen
    (SIGSTOP: alive, as a build cut off from S3, so its process exists): each lock is taken over
    once its last heartbeat is BOUND old — not before, and not much later. Resumed, the frozen
    holder learns it lost its lock (its next commit would raise), and its heartbeat never
    overwrote the new holder's."""
    options = s3_server.options
    urls = {"killed": "s3://hoverlay/lock-elsewhere.zarr", "frozen": "s3://hoverlay/lock-frozen.zarr"}
    holders = {"killed": _hold(forker, urls["killed"], options, tmp_path, host="elsewhere"),
               "frozen": _hold(forker, urls["frozen"], options, tmp_path)}
    n = _refused_for(list(urls.values()), options, BOUND + BEAT)
    holders["killed"].kill()
    holders["frozen"].kill(signal.SIGSTOP)
    stopped = time.monotonic()
    assert holders["killed"].wait(30) == -signal.SIGKILL
    taken: dict[str, tuple[StoreLock, float]] = {}
    try:
        try:
            taken = _taken_at(urls, options)
        finally:
            holders["frozen"].kill(signal.SIGCONT)
        for name, (lock, when) in taken.items():
            assert lock.took_over is not None and lock.took_over["pid"] == holders[name].pid, name
            assert when - stopped < BOUND + 15, (name, when - stopped)  # not before: _taken_at
        assert taken["killed"][0].took_over["host"] == "elsewhere"  # type: ignore[index]
        time.sleep(2 * BEAT)  # the frozen holder's next heartbeat finds the lock another's
        (tmp_path / "ask").touch()
        assert holders["frozen"].wait(30) == 0
        said = holders["frozen"].lines()[-1]
        assert said.startswith("lost: this build lost its lock") and "another build took it over" in said, said
        taken["frozen"][0].check()  # the new holder still holds it
    finally:
        for lock, _ in taken.values():
            lock.release()
    capsys.readouterr()
    print(f"refused {n}x over {BOUND + BEAT:.1f}s while they beat; taken "
          f"{', '.join(f'{k} {w - stopped:.1f}s' for k, (_, w) in taken.items())} after (bound {BOUND:.1f}s)")
