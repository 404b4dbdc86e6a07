"""Scale-out for real: a Dask cluster of separate CLI processes building into an S3 server.

The session's moto S3 server (conftest ``s3_server``), a ``dask scheduler`` and two ``dask
worker`` processes (the venv's CLI programs) run for this module. The images exist only in
the bucket: workers read them by URL and write their partitions straight into the store, so
they never need the client's files. Every build is compared with a local threaded build of
the same images (``reference``, read once), row by row and bit by bit. Faults: the client
killed (-9) at three points; the S3 server paused (SIGSTOP) briefly, then past the requests'
bound, and a worker killed while it runs a partition of the rerun; a second build polling a
live build's lock; and two processes racing for the store lock. Builds that must be separate
processes (killed, failing) are forks of conftest's ``forker``, which imported everything once.

Sizes: 6 images of 64 px, one per partition (``--chunk 1``), one layer: two waves (4 + 2
partitions on two workers), so there is a first commit before the last. moto answers a
request in 10-20 ms here, and a build's cost is its requests (~500 for these 6 images), so
every image, partition and layer counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conftest import write_generated_images

pytest.importorskip("s3fs")
pytest.importorskip("distributed")

from s3cluster import BIN, HERE, wait_port  # noqa: E402

from hoverlay.cli import main  # noqa: E402
from hoverlay.errors import EXIT_CODES, EXIT_ERROR  # noqa: E402
from hoverlay.stores import open_store  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.serial]

N_IMAGES = 6
MODEL = ["--model", "python:test_cluster:counted_tiny_model", "--layers", "3", "--size", "64",
         "--chunk", "1", "--batch-size", "1"]
LAYERS = ("3",)  # one layer: each costs a build two arrays and an index (test_build covers several)
#: the heartbeat of the build whose lock is polled (the default is 30 s); 1 s, not less: on a
#: loaded 2-core machine a 0.5 s heartbeat's write was seen 3 s late (tests/test_lock.py)
HEARTBEAT = 1.0
LOADS: list[int] = []  # pids of the processes that built the model (one entry per build)


def counted_tiny_model() -> Any:
    """test_build's tiny model, counting in each process how often it is built."""
    import torch
    from test_build import tiny_model

    LOADS.append(os.getpid())
    torch.manual_seed(0)  # the same weights in every process
    return tiny_model()


#: what each forward of ``slow_counted_tiny_model`` sleeps: the lock test's build must hold its
#: lock well past the STALE_BEATS * HEARTBEAT it takes to go stale, however fast the rest became
SLOW_FORWARD_S = 1.0


def slow_counted_tiny_model() -> Any:
    """``counted_tiny_model`` whose every forward takes SLOW_FORWARD_S longer (same outputs). The
    sleep is a pre-hook on the first conv, so it survives the feature extractor's tracing."""
    model = counted_tiny_model()
    model[0].register_forward_pre_hook(lambda module, args: time.sleep(SLOW_FORWARD_S))
    return model


def loads_here() -> int:
    return LOADS.count(os.getpid())


@dataclass
class Snapshot:
    """What an uninterrupted build stored (read once): table, pixels, vectors, norms, indexes."""

    table: dict[str, list[Any]]
    pixels: np.ndarray
    vectors: dict[str, np.ndarray]
    norms: dict[str, np.ndarray]
    indexed: dict[str, tuple[int, int]]  # layer -> (ntotal, images_indexed)

    @classmethod
    def read(cls, url: str, options: dict[str, Any] | None, indexes: bool = True) -> Snapshot:
        from hoverlay.stores.index import PatchIndex

        r = open_store(url, storage_options=options)
        t = r.table()
        table = {c: list(t[c]) for c in ("source", "label", "hash", "status", "reason", "base_id", "transform")}
        indexed = {}
        if indexes:
            for layer in LAYERS:
                idx = PatchIndex.load(url, layer, storage_options=options)
                indexed[layer] = (idx.ntotal, idx.meta.images_indexed)
        return cls(table, r.pixels(slice(None)), {la: r.vectors(la, slice(None)) for la in LAYERS},
                   {la: r.norms(la, slice(None)) for la in LAYERS}, indexed)

    def assert_same(self, other: Snapshot) -> None:
        """This build's store equals ``other`` (the reference)."""
        assert len(self.table["hash"]) == len(other.table["hash"]) == N_IMAGES
        for col, values in other.table.items():
            assert self.table[col] == values, col
        np.testing.assert_array_equal(other.pixels, self.pixels)
        for layer in LAYERS:
            np.testing.assert_array_equal(other.vectors[layer], self.vectors[layer])
            np.testing.assert_array_equal(other.norms[layer], self.norms[layer])
            if self.indexed:  # this build's indexes were read
                assert self.indexed[layer] == other.indexed[layer], layer


class Cluster:
    """The module's ``dask scheduler`` and two ``dask worker`` processes, and the bucket's images."""

    def __init__(self, s3: Any, tmp: Any):
        self.s3, self.tmp = s3, tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []
        from s3cluster import free_port

        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": HERE}
        sched = self._start("scheduler", [os.path.join(BIN, "dask"), "scheduler", "--host", "127.0.0.1",
                                          "--port", str(port), "--no-dashboard"], env)
        for i in (1, 2):
            # cwd: an empty folder; the client's image folder does not exist anywhere. The
            # preloads import torch, torchvision (load_model's tracing check: 6 s of a loaded
            # machine) and the pipeline while the reference builds, not in the first partition
            wdir = tmp / f"worker{i}"
            wdir.mkdir()
            self._start(f"worker{i}", [os.path.join(BIN, "dask"), "worker", self.address, "--nthreads", "1",
                                       "--nworkers", "1", "--name", f"w{i}", "--no-dashboard",
                                       "--memory-limit", "0", "--local-directory", str(wdir),
                                       "--death-timeout", "60", "--preload", "hoverlay.pipeline.build",
                                       "--preload", "torchvision"],
                        env, cwd=str(wdir))
        local = tmp / "images"
        write_generated_images(str(local), N_IMAGES, seed=11)
        s3.fs.put(str(local / "gen"), "hoverlay/cluster-images/gen", recursive=True)
        for f in (local / "gen").iterdir():
            f.unlink()  # only the bucket has them now
        self.images = "s3://hoverlay/cluster-images"
        wait_port(port, sched, "dask scheduler")
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from distributed import Client

            self._client = Client(self.address, timeout="60s")
        return self._client

    def ready(self) -> None:
        """Both workers up (a killed one's nanny restarts it)."""
        self.client.wait_for_workers(2, timeout=120)

    def _start(self, name: str, cmd: list[str], env: dict[str, str], cwd: str | None = None) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed in close()
        self.logs.append(log)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd or str(self.tmp))
        self.procs.append(proc)
        return proc

    def args(self, store: str, *extra: str, scheduler: str | None = None,
             options: dict[str, Any] | None = None) -> list[str]:
        return ["build", "--images", self.images, "--store", store, "--storage-options",
                json.dumps(options or self.s3.options), "--scheduler", scheduler or self.address, *MODEL, *extra]

    def worker_pids(self) -> dict[str, int]:
        return dict(self.client.run(os.getpid))

    def processing_partition(self) -> str | None:
        """A worker's address that has a partition task assigned now, or None."""
        for addr, keys in self.client.processing().items():
            if any("process_partition" in str(k) for k in keys):
                return str(addr)
        return None

    def close(self) -> None:
        workers: list[int] = []
        if self._client is not None:
            with contextlib.suppress(Exception):
                workers = list(self.worker_pids().values())
            self._client.close()
        for pid in workers:  # the nannies' graceful close of their workers took ~10 s
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in self.logs:
            log.close()


@pytest.fixture(scope="module")
def cluster(s3_server, forker, tmp_path_factory):
    c = Cluster(s3_server, tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory) -> Snapshot:
    """An uninterrupted local threaded build of the same images (read from the bucket by URL)."""
    path = str(tmp_path_factory.mktemp("reference") / "reference.zarr")
    assert main(cluster.args(path, "-q", scheduler="threads")) == 0
    return Snapshot.read(path, None)


CONTENDER = """
import json, os, re, time
from hoverlay.stores import StoreLockedError
from hoverlay.stores.lock import StoreLock
import s3fs
url, options, stop = ARGS["url"], ARGS["options"], ARGS["stop"]
key = url.removeprefix("s3://") + "/.hoverlay.lock"
fs = s3fs.S3FileSystem(max_concurrency=1, **options)
while not os.path.exists(stop) and not fs.exists(key):  # the build has not locked the store yet
    time.sleep(0.1)
    fs.invalidate_cache(key)
refused, took_over, ages, errors = [], [], [], []
while not os.path.exists(stop):  # once a second, as a second build would be retried
    lock = StoreLock(url, storage_options=options)
    try:
        lock.acquire()
    except OSError as exc:  # moto, loaded, may answer 500 to a read racing an overwrite
        errors.append(str(exc))
    except StoreLockedError as exc:
        refused.append(time.time())
        ages += [float(a) for a in re.findall(r"last heartbeat (\\d+)s ago", str(exc))]
    else:  # the build released it (it ended), or this took over a live lock (a failure)
        if lock.took_over is not None:
            took_over.append(lock.took_over)
        lock.release()
        break
    time.sleep(1)
print(json.dumps({"refused": refused, "took_over": took_over, "ages": ages, "errors": errors}))
"""


def test_cluster_build_equals_the_local_build_loads_the_model_once_per_worker_and_holds_its_lock(
        cluster, reference, forker, tmp_path, monkeypatch, capsys):
    """The cluster build is bit-identical to the threaded one. Meanwhile another process polls
    its lock: the build's heartbeat (every HEARTBEAT s here) keeps it from ever being taken
    over, although the lock counts as stale after 4 missed heartbeats and the build is longer."""
    from hoverlay.stores.lock import HEARTBEAT_ENV, STALE_BEATS

    cluster.ready()
    assert all(n == 0 for n in cluster.client.run(loads_here).values())
    url = "s3://hoverlay/cluster.zarr"
    stop = tmp_path / "stop"
    contender = forker.spawn(code=CONTENDER, args={"url": url, "options": cluster.s3.options, "stop": str(stop)},
                             name="contender")
    monkeypatch.setenv(HEARTBEAT_ENV, str(HEARTBEAT))
    t0 = time.time()
    try:
        assert main(cluster.args(url, "-q", "--model", "python:test_cluster:slow_counted_tiny_model")) == 0
    finally:
        t1 = time.time()
        stop.touch()
    assert contender.wait(60) == 0, contender.lines()
    seen = json.loads(contender.lines()[-1])
    Snapshot.read(url, cluster.s3.options).assert_same(reference)
    table = open_store(url, storage_options=cluster.s3.options).table()
    assert all(s.startswith("s3://hoverlay/cluster-images/gen/") for s in table["source"])  # read by URL
    assert not any((cluster.tmp / "images" / "gen").iterdir())  # the client has no copy
    # 6 partitions and 6 hashes ran on two workers; each built the model exactly once
    assert sorted(cluster.client.run(loads_here).values()) == [1, 1]
    # the live lock: refused all along, for longer than it would take to go stale
    assert seen["took_over"] == []
    assert seen["refused"] and seen["refused"][-1] - seen["refused"][0] > STALE_BEATS * HEARTBEAT, (seen, t1 - t0)
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    print(f"{summary}\nlock refused {len(seen['refused'])}x over {seen['refused'][-1] - seen['refused'][0]:.1f}s of "
          f"a {t1 - t0:.1f}s build; last heartbeat at most {max(seen['ages'], default=0):.0f}s old")


def _kill_at(cluster: Any, forker: Any, url: str, when: str) -> dict[str, Any]:
    """Fork ``hoverlay build`` (a progress line per update) and SIGKILL it at ``when``."""
    child = forker.spawn(cluster.args(url, "--progress-interval", "0"), name=f"killed-{when.replace(' ', '-')}")
    if when == "first commit":
        deadline = time.monotonic() + 90
        while child.rc is None and time.monotonic() < deadline and cluster.s3.committed(url) == 0:
            time.sleep(0.1)  # a GET each: the second commit is seconds after the first
    else:
        marker = "hashing: " if when == "hashing" else ": adding to the index"
        child.wait_for_line(lambda ln: marker in ln)
    child.kill()
    rc = child.wait(30)
    assert rc == -signal.SIGKILL, f"the build ended before the kill ({when}): {child.lines()[-3:]}"
    return {"committed": cluster.s3.committed(url), "lines": child.lines()}


def test_client_killed_at_three_points_then_rerun_equals_uninterrupted(cluster, reference, forker):
    """One store, four runs: killed while hashing, killed after its first commit, killed while
    indexing; each next run resumes from what the killed one left, the last one finishes."""
    from hoverlay.pipeline.build import _layers_needing_index

    cluster.ready()
    url = "s3://hoverlay/killed.zarr"
    at = _kill_at(cluster, forker, url, "hashing")
    assert at["committed"] == 0 and not any(ln.startswith("embedding") for ln in at["lines"])
    # each run takes over the dead client's lock object (same host, process gone)
    at = _kill_at(cluster, forker, url, "first commit")
    assert 0 < at["committed"] < N_IMAGES
    at = _kill_at(cluster, forker, url, "index")
    assert at["committed"] == N_IMAGES and any(ln.startswith("embedding") for ln in at["lines"])
    assert _layers_needing_index(url, list(LAYERS), N_IMAGES, cluster.s3.options)  # killed mid-index
    assert main(cluster.args(url, "-q")) == 0
    Snapshot.read(url, cluster.s3.options).assert_same(reference)


def _build_in_thread(cluster: Any, url: str, *extra: str) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(main(cluster.args(url, "-q", *extra))), daemon=True)
    thread.start()
    return thread, result


def test_s3_paused_briefly_then_past_the_bound_then_a_rerun_with_a_worker_killed(cluster, reference, forker,
                                                                                capsys):
    """Requests bounded at 1 s connect/read here (``--storage-options`` config_kwargs; the
    defaults are 5/15 s): a 2 s pause is ridden out by retries; a pause past the bound (4 s of
    silence, then the requests in flight end: ~5 s) ends the build with one line and
    EXIT_ERROR. The rerun after the server resumed loses a worker (kill -9) while that runs a
    partition: Dask runs it again, and the store equals an uninterrupted build's. (One build
    for both faults: a build into moto costs ~10 s of this machine.)"""
    from hoverlay.stores.lock import RELEASE_WAIT
    from hoverlay.stores.urls import s3_config_defaults as config_defaults
    from hoverlay.stores.urls import s3_request_bound as request_bound

    cluster.ready()
    url = "s3://hoverlay/paused.zarr"
    fast = {"connect_timeout": 1, "read_timeout": 1}
    bound = request_bound({**config_defaults(), **fast})
    options = {**cluster.s3.options, "config_kwargs": fast}
    child = forker.spawn(cluster.args(url, "--progress-interval", "0", options=options), name="paused")
    assert child.wait_for_line(lambda ln: ln.startswith("embedding")) is not None, child.lines()
    with cluster.s3.paused():
        time.sleep(2)  # > read_timeout: requests time out and are retried
    deadline = time.monotonic() + 60
    while child.rc is None and cluster.s3.committed(url) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert child.rc is None, f"the build did not ride out a 2 s pause: {child.lines()[-3:]}"
    with cluster.s3.paused():  # until the build gives up
        t0 = time.monotonic()
        rc = child.wait(120)
        waited = time.monotonic() - t0
    lines = child.lines()
    assert rc == EXIT_ERROR and EXIT_CODES[rc], lines[-5:]
    assert not any("Traceback" in ln for ln in lines), lines
    last = lines[-1]
    assert last.startswith("hoverlay build: the S3 server at ") and "has not answered for" in last, last
    assert "the last commit is intact, rerun" in last
    # it retried (4 timeouts of silence), and gave up within the bound plus the lock's release
    # wait and the cluster's cancel (generous: a loaded machine)
    assert 4 < waited < bound + RELEASE_WAIT + 15, waited
    capsys.readouterr()
    print(f"paused past the bound: failed after {waited:.1f}s (bound {bound:.0f}s): {last}")
    # the rerun (default options), with a worker killed while it runs one of the partitions left
    before = cluster.worker_pids()
    thread, result = _build_in_thread(cluster, url)
    victim = None
    deadline = time.monotonic() + 90
    while victim is None and thread.is_alive() and time.monotonic() < deadline:
        victim = cluster.processing_partition()
        time.sleep(0.01)
    assert victim is not None, "no partition seen running"
    os.kill(before[victim], signal.SIGKILL)  # the worker process (its nanny starts a new one)
    thread.join(120)
    assert not thread.is_alive() and result == [0]  # Dask ran the victim's partition again
    Snapshot.read(url, cluster.s3.options).assert_same(reference)
    with pytest.raises(ProcessLookupError):
        os.kill(before[victim], 0)  # the victim really died


RACER = """
import json, time
from hoverlay.stores import StoreLockedError
from hoverlay.stores.lock import StoreLock
url, endpoint, t0, rounds, period = ARGS
held = []
for r in range(rounds):
    while time.time() < t0 + r * period:
        time.sleep(0.0005)
    lock = StoreLock(url, storage_options={"endpoint_url": endpoint})
    try:
        lock.acquire()
    except StoreLockedError:
        continue
    a = time.time()
    time.sleep(period / 2)
    held.append([r, a, time.time()])
    lock.release()
print(json.dumps(held))
"""


def test_two_processes_racing_for_the_s3_lock_never_both_hold_it(s3_server, forker):
    """10 rounds (the old exists-then-write lock let both win 11 of 20)."""
    rounds, period = 10, 0.4
    t0 = time.time() + 1  # forks start at once: nothing to import
    args = ["s3://hoverlay/raced.zarr", s3_server.endpoint, t0, rounds, period]
    racers = [forker.spawn(code=RACER, args=args, name=f"racer{i}") for i in range(2)]
    assert all(r.wait(60) == 0 for r in racers), [r.lines() for r in racers]
    held = [json.loads(r.lines()[-1]) for r in racers]
    winners = sorted([r for r, _, _ in held[0]] + [r for r, _, _ in held[1]])
    assert len(winners) == len(set(winners)), "a round where both processes held the lock"
    # liveness: a round may go to nobody when the last holder's release (an S3 request) ends after
    # the next round began, as on a loaded CI machine (6 of 10 there); at least half must be won
    assert len(winners) >= rounds // 2, winners
    spans = sorted((a, b) for h in held for _, a, b in h)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:], strict=False))  # never overlapping
