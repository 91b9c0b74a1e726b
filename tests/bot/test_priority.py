"""Acks first (bot.priority): job threads wait while an ack is in flight, never for long."""

from __future__ import annotations

import threading

from bot.priority import AckFirst


def on_job_thread(fn) -> threading.Thread:
    thread = threading.Thread(target=fn, name="tunebot-job_test", daemon=True)
    thread.start()
    return thread


def test_a_job_thread_waits_until_the_ack_in_flight_is_answered():
    acks = AckFirst(quiet_seconds=0.0, most_seconds=60.0)
    passed = threading.Event()
    order: list[str] = []
    with acks.ack():
        assert acks.acks_in_flight == 1
        on_job_thread(lambda: (acks.step_aside(), order.append("job"), passed.set()))
        assert not passed.wait(0.3)  # held: the ack is still being answered
        order.append("ack answered")
    assert passed.wait(30)
    assert order == ["ack answered", "job"] and acks.acks_in_flight == 0


def test_a_steady_stream_of_acks_slows_a_job_down_but_never_stops_it():
    acks = AckFirst(quiet_seconds=0.0, most_seconds=0.05)
    passed = threading.Event()
    with acks.ack():  # never answered while the job waits
        on_job_thread(lambda: (acks.step_aside(), passed.set()))
        assert passed.wait(30)


def test_acks_and_other_threads_never_wait():
    acks = AckFirst(quiet_seconds=0.0, most_seconds=60.0)
    with acks.ack(), acks.ack():
        acks.step_aside()  # the main thread, as an ack's own thread would be
        assert acks.acks_in_flight == 2
    assert acks.acks_in_flight == 0


def test_an_ack_that_raises_is_still_counted_out():
    acks = AckFirst()
    try:
        with acks.ack():
            raise ValueError("the listener failed")
    except ValueError:
        pass
    assert acks.acks_in_flight == 0
