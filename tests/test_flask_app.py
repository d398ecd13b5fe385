"""app/__init__.py ElemtaFlask: Flask's per-call coroutine check remembered, nothing else."""

from __future__ import annotations

import pytest

from app import ElemtaFlask


def test_sync_functions_are_returned_as_they_are_and_remembered(app) -> None:
    assert isinstance(app, ElemtaFlask)

    def hook() -> None:
        return None

    assert app.ensure_sync(hook) is hook
    assert hook in app._known_sync
    assert app.ensure_sync(hook) is hook
    # Every registered hook and view, after a request.
    app.test_client().get("/api/queue/stats")
    for funcs in app.before_request_funcs.values():
        assert all(f in app._known_sync for f in funcs)


def test_coroutine_functions_still_go_through_flask(app, monkeypatch) -> None:
    async def view() -> str:
        return "x"

    calls = []
    monkeypatch.setattr(app, "async_to_sync", lambda func: calls.append(func) or func)
    app.ensure_sync(view)
    app.ensure_sync(view)
    assert calls == [view, view]  # wrapped on every call, as Flask does; never remembered
    assert view not in app._known_sync


def test_the_memory_is_bounded(app, monkeypatch) -> None:
    monkeypatch.setattr(ElemtaFlask, "SYNC_CACHE_SIZE", len(app._known_sync) + 2)
    made = [lambda: None for _ in range(5)]
    for func in made:
        assert app.ensure_sync(func) is func
    assert len(app._known_sync) == ElemtaFlask.SYNC_CACHE_SIZE


@pytest.mark.parametrize("func", [{}.get, print])
def test_builtins_and_bound_methods_pass(app, func) -> None:
    assert app.ensure_sync(func) is func
