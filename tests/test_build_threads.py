"""The threaded build's tasks never wait on each other's forwards for things they already have."""

import threading

from hoverlay.pipeline.models import _TRACE_LOCK, load_model


def test_a_loaded_model_comes_back_while_another_thread_forwards():
    """A task asks for its model at every partition; while another task's forward holds the
    model lock shared, that must not wait (it did: the build's forwards ran one at a time)."""
    adapter = load_model()
    forwarding, done = threading.Event(), threading.Event()

    def forward() -> None:
        with _TRACE_LOCK.shared():
            forwarding.set()
            done.wait(30)

    got: list[object] = []
    other = threading.Thread(target=forward)
    other.start()
    try:
        assert forwarding.wait(10)
        asker = threading.Thread(target=lambda: got.append(load_model()))
        asker.start()
        asker.join(10)
        assert got == [adapter], "load_model waited for another thread's forward"
    finally:
        done.set()
        other.join(10)
    asker.join(10)


def test_another_model_is_still_loaded_under_the_lock():
    """Only the model asked for last skips the lock: any other is loaded (or taken from the
    cache) holding it, and then comes back without it."""
    first = load_model()
    other = load_model("torchvision:resnet18", "none")
    assert other is not first and other.spec == "torchvision:resnet18"
    assert load_model("torchvision:resnet18", "none") is other
    assert load_model() is first
