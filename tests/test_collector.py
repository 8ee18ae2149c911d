"""kdsr/collector.py: the cyclic collector paused around planning and
applying, and the daemon's state kept out of later collections."""

from __future__ import annotations

import gc

import pytest

from kdsr import collector, operations


def test_paused_stops_collection_inside_and_restores_it_after():
    assert gc.isenabled()
    with collector.paused():
        assert not gc.isenabled()
        with collector.paused():  # nested: the inner one leaves it paused
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_paused_restores_the_collector_after_an_error_and_keeps_it_off_if_it_was():
    with pytest.raises(RuntimeError), collector.paused():
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_settle_freezes_what_is_alive_and_a_second_settle_starts_over():
    try:
        collector.settle()
        frozen = gc.get_freeze_count()
        assert frozen > 0 and gc.isenabled()
        collector.settle()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_prepare_and_apply_run_with_the_collector_paused(example_path, monkeypatch, tmp_path):
    from kdsr.intent import load_intent
    from kdsr.kernel.fake import FakeKernel
    from kdsr.kernel.state import StateStore

    seen = []
    real_compile, real_apply = operations.compile_node, operations.apply_plan
    monkeypatch.setattr(
        operations, "compile_node", lambda *a, **k: seen.append(gc.isenabled()) or real_compile(*a, **k)
    )
    monkeypatch.setattr(operations, "apply_plan", lambda *a, **k: seen.append(gc.isenabled()) or real_apply(*a, **k))
    intent = load_intent(example_path)
    kernel = FakeKernel()
    store = StateStore(str(tmp_path / "state"))
    node = intent.load_balancers[0].name
    prepared = operations.prepare(intent, node, kernel, store, down=frozenset())
    operations.apply(prepared, kernel, store)
    assert seen == [False, False] and gc.isenabled()
