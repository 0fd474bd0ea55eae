"""Dynamic batching with a stand-in model: who is batched with whom, and what every caller hears."""

from __future__ import annotations

import threading
import time

import pytest

from serving.model import Batcher, BatcherStopped, Prepared


class SlowModel:
    """Records each batch; the first batch blocks until released, so requests queue behind it."""

    def __init__(self, fail_on: str | None = None):
        self.batches: list[list[Prepared]] = []
        self.release = threading.Event()
        self.fail_on = fail_on

    def generate_batch(self, requests):
        self.batches.append(list(requests))
        if len(self.batches) == 1:
            assert self.release.wait(10)
        if self.fail_on and any(r.adapter == self.fail_on for r in requests):
            raise RuntimeError("out of memory")
        return [{"generated_text": f"{r.adapter}:{r.ids[0]}", "adapter": r.adapter} for r in requests]


def running_alone(model: SlowModel) -> None:
    """Wait until the first batch is in the model, where it stays until released: requests
    submitted from now on queue behind it."""
    deadline = time.monotonic() + 10
    while not model.batches:
        assert time.monotonic() < deadline, "the batcher never started the first batch"
        time.sleep(0.005)


def request(n: int, adapter: str = "default", temperature: float = 0.0, max_new_tokens: int = 8) -> Prepared:
    return Prepared((n,), max_new_tokens, temperature, 1.0, (), adapter)


def test_requests_queued_behind_a_busy_model_are_generated_together_up_to_the_batch_size():
    model = SlowModel()
    batcher = Batcher(model, max_batch_size=4, max_wait_ms=0)
    try:
        first = batcher.submit(request(0))
        running_alone(model)
        later = [batcher.submit(request(n)) for n in range(1, 7)]
        model.release.set()
        answers = [f.result(timeout=10) for f in [first, *later]]
    finally:
        batcher.close()
    assert [len(b) for b in model.batches] == [1, 4, 2]
    assert [a["generated_text"] for a in answers] == [f"default:{n}" for n in range(7)]
    assert [a["batch_size"] for a in answers] == [1, 4, 4, 4, 4, 2, 2]
    assert batcher.stats() == {"max_batch_size": 4, "batches": 3, "requests": 7}


def test_only_requests_of_one_adapter_and_sampling_setting_share_a_batch():
    model = SlowModel()
    batcher = Batcher(model, max_batch_size=8, max_wait_ms=0)
    try:
        first = batcher.submit(request(0))
        running_alone(model)
        mixed = [
            request(1),
            request(2, adapter="other"),
            request(3, temperature=0.7),
            request(4, max_new_tokens=64),  # a different length still shares the batch
            request(5, adapter="other"),
        ]
        futures = [batcher.submit(r) for r in mixed]
        model.release.set()
        answers = [f.result(timeout=10) for f in [first, *futures]]
    finally:
        batcher.close()
    assert [[r.ids[0] for r in b] for b in model.batches] == [[0], [1, 4], [2, 5], [3]]
    assert answers[2]["generated_text"] == "other:2"


def test_a_failing_batch_fails_each_of_its_callers_and_the_batcher_goes_on():
    model = SlowModel(fail_on="broken")
    batcher = Batcher(model, max_batch_size=8, max_wait_ms=0)
    try:
        first = batcher.submit(request(0))
        running_alone(model)
        broken = [batcher.submit(request(n, adapter="broken")) for n in (1, 2)]
        fine = batcher.submit(request(3))
        model.release.set()
        for future in broken:
            with pytest.raises(RuntimeError, match="out of memory"):
                future.result(timeout=10)
        assert fine.result(timeout=10)["generated_text"] == "default:3"
        assert first.result(timeout=10)["batch_size"] == 1
    finally:
        batcher.close()


def test_the_first_request_waits_at_most_max_wait_for_company():
    model = SlowModel()
    model.release.set()
    batcher = Batcher(model, max_batch_size=8, max_wait_ms=1000)  # ample for a loaded machine
    try:
        started = time.perf_counter()
        one = batcher.submit(request(0))
        time.sleep(0.05)
        two = batcher.submit(request(1))
        assert one.result(timeout=10)["batch_size"] == two.result(timeout=10)["batch_size"] == 2
        assert time.perf_counter() - started < 5
    finally:
        batcher.close()


@pytest.mark.parametrize(("size", "wait"), [(0, 5), (257, 5), (8, -1), (8, 5000)])
def test_bad_settings_are_refused(size, wait):
    with pytest.raises(ValueError, match="must be between"):
        Batcher(SlowModel(), max_batch_size=size, max_wait_ms=wait)


class QuickModel:
    max_context = 100

    def __init__(self):
        self.batches = []

    def generate_batch(self, requests):
        self.batches.append([r.ids[0] for r in requests])
        return [{"generated_text": str(r.ids[0])} for r in requests]


def test_a_request_after_close_is_refused_at_once_not_left_waiting():
    batcher = Batcher(QuickModel(), max_batch_size=2, max_wait_ms=0)
    batcher.close()
    assert not batcher.alive
    with pytest.raises(BatcherStopped):
        batcher.submit(request(1))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death
def test_requests_queued_when_the_thread_dies_are_failed_not_stranded():
    class Dying(SlowModel):
        def generate_batch(self, requests):
            super().generate_batch(requests)
            raise SystemExit("the thread dies")  # not an Exception: ends the batcher's thread

    model = Dying()
    batcher = Batcher(model, max_batch_size=1, max_wait_ms=0)
    first = batcher.submit(request(0))
    time.sleep(0.05)
    queued = [batcher.submit(request(n)) for n in (1, 2)]
    model.release.set()
    for future in queued:
        with pytest.raises(BatcherStopped):
            future.result(timeout=10)
    with pytest.raises(SystemExit):
        first.result(timeout=10)
    assert not batcher.alive
    with pytest.raises(BatcherStopped):
        batcher.submit(request(3))


def test_a_batch_never_asks_for_more_than_the_models_context():
    model = QuickModel()
    model.release = threading.Event()
    long_prompt = Prepared(tuple(range(90)), 8, 0.0, 1.0, (), "default")  # 98 tokens: fits alone
    wants_many = Prepared((7,), 50, 0.0, 1.0, (), "default")  # with the long prompt: 140 > 100
    batcher = Batcher(model, max_batch_size=8, max_wait_ms=200)
    try:
        futures = [batcher.submit(r) for r in (long_prompt, wants_many, request(5))]
        for future in futures:
            future.result(timeout=10)
    finally:
        batcher.close()
    assert model.batches == [[0, 5], [7]]
