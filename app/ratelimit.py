"""Rate limiting (API.md §9) with Flask-Limiter, one Limiter per application.

- Every request of a client counts against ``ELEMTA_RATELIMIT_DEFAULT`` (600 per minute), one
  budget across all endpoints.
- ``POST /api/send-test``, ``POST /api/dkim/keys`` (key generation) and the bulk queue actions
  (``POST /api/queue/<type>/flush|retry|hold|release``) count against
  ``ELEMTA_RATELIMIT_STRICT`` (10 per minute) instead, one budget shared by those costly
  operations. They are recognised by path here, so the blueprints that
  define them need no limiter import.
- The client is the API key (its SHA-256, never the key) when a valid one is given, else the
  remote address. Behind proxies, ``ELEMTA_TRUSTED_PROXIES`` hops of X-Forwarded-For/-Proto are
  trusted (werkzeug ProxyFix); with 0 (the default) nothing a client sends can change it.
- Storage ``ELEMTA_RATELIMIT_STORAGE_URI``: ``memory://`` (per process) or ``redis://...``
  (shared by every worker and host). If the storage is unreachable requests are let through and
  the failure is logged: an outage of the limiter's Redis must not take the MTA's API down.
- The health probes and /metrics are exempt. Responses carry X-RateLimit-Limit/-Remaining/
  -Reset; a 429 carries Retry-After and the contract's RATE_LIMITED error body.

The Limiter lives in ``app.extensions["elemta_limiter"]``, never in a module global: two apps
(two tests) never share counters unless they share a storage URI and key prefix on purpose.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, request
from flask_limiter import Limit, Limiter, RateLimitExceeded, RequestLimit
from flask_limiter._limits import RuntimeLimit
from flask_limiter.constants import ConfigVars
from limits import RateLimitItem
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter
from werkzeug.middleware.proxy_fix import ProxyFix

from .auth.guard import client_identity

log = logging.getLogger("elemta.ratelimit")

EXEMPT_PATHS = frozenset({"/api/health", "/livez", "/readyz", "/metrics"})
# The dashboard's shell and static assets (a page load fetches a dozen files; its API calls
# are counted like any other client's).
EXEMPT_BLUEPRINTS = frozenset({"ui"})
# Storage keys remembered by (limit, prefix, client, scope); cleared when full.
KEY_CACHE_SIZE = 4096
STRICT_PATH = re.compile(
    r"^/api/(?:send-test|dkim/keys|queue/(?!message/)[^/]+/(?:flush|retry|hold|release))/?$")


class SweepingMemoryStorage(MemoryStorage):
    """``memory://`` without a thread per hit.

    limits' MemoryStorage starts a ``threading.Timer`` to expire counters whenever the previous
    one has finished, which under steady traffic means a new thread every few requests: that
    doubled the cost of a request in the API. Expired counters are already ignored when read;
    this sweeps the forgotten ones (clients that went away) inline, at most every few seconds.
    """

    STORAGE_SCHEME = ["elemta-memory"]
    SWEEP_INTERVAL = 10.0

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False,
                 **options: str) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self.timer.cancel()
        self.next_sweep = time.monotonic() + self.SWEEP_INTERVAL

    def _MemoryStorage__schedule_expiry(self) -> None:  # replaces the private timer start
        now = time.monotonic()
        if now >= self.next_sweep:
            self.next_sweep = now + self.SWEEP_INTERVAL
            # limits' private (name-mangled) method, which its types do not declare.
            self._MemoryStorage__expire_events()  # type: ignore[attr-defined]


def storage_uri_of(configured: str) -> str:
    if configured.strip().lower().startswith("memory://"):
        return "elemta-memory://"
    return configured


def is_exempt() -> bool:
    # Preflights do nothing and browsers send one per distinct request: do not count them.
    req = request._get_current_object()  # type: ignore[attr-defined]
    return (req.path in EXEMPT_PATHS or req.method == "OPTIONS"
            or req.blueprint in EXEMPT_BLUEPRINTS)


def request_identity() -> str:
    """What Flask-Limiter calls the request: its endpoint, and a name for requests without one.

    Flask-Limiter exempts requests without an endpoint (unknown routes, wrong methods); every
    request counts here (docs/SECURITY.md), so those get a name of their own.
    """
    return request.endpoint or "<unrouted>"


def is_strict() -> bool:
    req = request._get_current_object()  # type: ignore[attr-defined]
    return req.method == "POST" and bool(STRICT_PATH.match(req.path))


# Where the lean path keeps this request's decision: the WSGI environ, which lives exactly as
# long as the request and is reached without Flask-Limiter's per-request context.
DECISION = "elemta.ratelimit"


@dataclass(frozen=True)
class Decision:
    """What the lean check decided for this request: the budget's limit that answers for it
    (the breached one, else the smallest window), its storage key and arguments, what remains
    after this request's hit (None when the strategy gave no count), and whether it was the
    breach; every limit checked, in order, for ``current_limits``."""

    limit: RateLimitItem
    key: str
    args: list[str]
    remaining: int | None
    breached: bool
    checked: tuple[tuple[RateLimitItem, str, bool], ...]


# Flask-Limiter settings (read from app.config, so reachable as ELEMTA_RATELIMIT_...) that add
# limits, callbacks or fallbacks beyond the two budgets: with any of them set, Flask-Limiter's
# own resolution runs.
_GENERIC_ONLY = (
    ConfigVars.APPLICATION_LIMITS, ConfigVars.APPLICATION_LIMITS_PER_METHOD,
    ConfigVars.APPLICATION_LIMITS_EXEMPT_WHEN, ConfigVars.APPLICATION_LIMITS_DEDUCT_WHEN,
    ConfigVars.APPLICATION_LIMITS_COST, ConfigVars.DEFAULT_LIMITS_PER_METHOD,
    ConfigVars.DEFAULT_LIMITS_EXEMPT_WHEN, ConfigVars.DEFAULT_LIMITS_DEDUCT_WHEN,
    ConfigVars.DEFAULT_LIMITS_COST, ConfigVars.REQUEST_IDENTIFIER, ConfigVars.ON_BREACH,
    ConfigVars.FAIL_ON_FIRST_BREACH, ConfigVars.IN_MEMORY_FALLBACK,
    ConfigVars.IN_MEMORY_FALLBACK_ENABLED, ConfigVars.META_LIMITS, ConfigVars.ON_META_BREACH,
)


class BudgetLimiter(Limiter):
    """Flask-Limiter whose per-request check knows the project's two budgets in advance.

    Flask-Limiter resolves the applicable limits anew for every request (application, default,
    decorated, blueprint and meta limits, exemptions; each limit string parsed again), which
    was about a sixth of the CPU of ``/api/queue/stats``. Here exactly one budget applies to a
    counted request, chosen by ``is_strict``, so both are resolved once. What is counted is
    unchanged: the same storage and strategy, the same keys (prefix, client, scope), one hit
    per request, the same ``RequestLimit`` behind ``current_limit`` and the same
    ``RateLimitExceeded``. Anything configured beyond the two budgets (see ``_GENERIC_ONLY``,
    or a limit added with the decorators) sends every request through Flask-Limiter's own path.
    """

    def __init__(self, *args: object, key_prefix: str, **kwargs: object) -> None:
        # Everything else goes to Flask-Limiter as given; its typed keywords cannot be forwarded.
        super().__init__(*args, key_prefix=key_prefix, **kwargs)  # type: ignore[arg-type]
        self.prefix = key_prefix
        self.budgets: dict[str, list[RuntimeLimit]] = {}
        self.keys: dict[tuple[Any, ...], str] = {}
        self.lean = True

    def init_app(self, app: Flask) -> None:
        if any(name in app.config for name in _GENERIC_ONLY):
            self.lean = False
        super().init_app(app)
        if not self.enabled:
            return
        # The default limits, bound to this limiter by init_app, by scope ("default", "strict");
        # smallest window first, as Flask-Limiter orders them (it stops at the first breach).
        for lim in self.limit_manager.default_limits:
            self.budgets.setdefault(str(lim.scope), []).append(lim)
        for limits in self.budgets.values():
            limits.sort(key=lambda lim: lim.limit)
        self.skip_when_lean(app)

    # The decorators only note that the generic path is needed, then pass everything through:
    # Flask-Limiter's overloaded signatures cannot be forwarded through *args/**kwargs.
    def limit(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        self.lean = False
        return super().limit(*args, **kwargs)  # type: ignore[arg-type]

    def shared_limit(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        self.lean = False
        return super().shared_limit(*args, **kwargs)  # type: ignore[arg-type]

    def exempt(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        self.lean = False
        return super().exempt(*args, **kwargs)  # type: ignore[call-overload]

    def _hit(self, item: RateLimitItem, args: list[str], key: str) -> tuple[bool, int | None]:
        """One hit on ``item``: (within the limit, what remains after this very hit or None).

        With a fixed window the counter's increment is atomic and answers with the new count,
        so each of several concurrent requests learns its own position. Reading the window
        again afterwards (as ``RequestLimit.window`` does) gives concurrent requests the same
        later count, and X-RateLimit-Remaining repeated values. The other strategies have no
        such answer.
        """
        if not isinstance(self.limiter, FixedWindowRateLimiter):
            return self.limiter.hit(item, *args, cost=1), None
        count = self.limiter.storage.incr(key, item.get_expiry(), amount=1)
        return count <= item.amount, max(0, item.amount - count)

    def _key(self, item: RateLimitItem, args: list[str]) -> str:
        """``item.key_for(*args)``, remembered: a client sends many requests."""
        cache_key = (item, *args)
        found = self.keys.get(cache_key)
        if found is None:
            if len(self.keys) >= KEY_CACHE_SIZE:
                self.keys.clear()
            found = self.keys[cache_key] = item.key_for(*args)
        return found

    def _check_request_limit(self, callable_name: str | None = None,
                             in_middleware: bool = True) -> None:
        if not self.lean:
            super()._check_request_limit(callable_name, in_middleware)
            return
        if not (self.enabled and self.initialized):
            return
        # Flask-Limiter's exemptions (static files, the filter), but not its exemption of
        # requests without an endpoint: every request counts (docs/SECURITY.md), and a client
        # over its budget must not go on probing unknown routes or wrong methods.
        req = request._get_current_object()  # type: ignore[attr-defined]
        endpoint = req.endpoint
        if (endpoint and endpoint.rpartition(".")[2] == "static") or is_exempt():
            return
        scope = "strict" if is_strict() else "default"
        try:
            client = client_identity()
            if not client:
                log.error("Skipping rate limits: no client identity")
                return
            args = [self.prefix, client, scope] if self.prefix else [client, scope]
            checked: list[tuple[RateLimitItem, str, bool]] = []
            decision: Decision | None = None
            for lim in self.budgets[scope]:
                item = lim.limit
                key = self._key(item, args)
                within, remaining = self._hit(item, args, key)
                checked.append((item, key, not within))
                if decision is None or not within:  # the first, or the breach
                    decision = Decision(item, key, args, remaining, not within, ())
                if not within:
                    log.info("ratelimit %s (%s) exceeded at endpoint: %s", item, client,
                             scope)
                    break
            if decision is None:
                return
            decision = Decision(decision.limit, decision.key, args, decision.remaining,
                                decision.breached, tuple(checked))
            req.environ[DECISION] = decision
        except Exception:
            if not self._swallow_errors:
                raise
            log.exception("Failed to rate limit. Swallowing error")
            return
        if decision.breached:
            raise RateLimitExceeded(
                next(lim for lim in self.budgets[scope] if lim.limit is decision.limit))

    def decision(self) -> Decision | None:
        """The lean check's decision for this request (None: not counted, or the generic
        path decided)."""
        found: Decision | None = request.environ.get(DECISION)
        return found

    @property
    def current_limit(self) -> RequestLimit | None:
        decision = self.decision()
        if decision is None:
            return super().current_limit
        return RequestLimit(self, decision.limit, decision.args, decision.breached, True)

    @property
    def current_limits(self) -> list[RequestLimit]:
        decision = self.decision()
        if decision is None:
            return super().current_limits
        return [RequestLimit(self, item, decision.args, breached, True)
                for item, _key, breached in decision.checked]

    def skip_when_lean(self, app: Flask) -> None:
        """Flask-Limiter's own after-request (conditional deductions, its headers) and teardown
        (its per-request context) hooks do nothing for a request the lean path decided: they
        are skipped then, instead of making that context for them."""
        def guarded(hook: Any) -> Any:
            def run(*args: Any) -> Any:
                if self.lean and DECISION in request.environ:
                    return args[0] if args else None
                return hook(*args)
            return run

        ours = (Limiter._Limiter__inject_headers,  # type: ignore[attr-defined]
                Limiter._Limiter__release_context)  # type: ignore[attr-defined]
        for funcs in (app.after_request_funcs.get(None, []),
                      app.teardown_request_funcs.get(None, [])):
            for index, hook in enumerate(funcs):
                target = getattr(hook, "func", None) or getattr(hook, "__func__", None)
                if target in ours:
                    funcs[index] = guarded(hook)


def limiter_of(app: Flask) -> Limiter:
    return app.extensions["elemta_limiter"]


def init_ratelimit(app: Flask) -> Limiter:
    """ProxyFix, the Limiter with the default and strict budgets, and the response headers."""
    cfg = app.config
    hops = cfg["TRUSTED_PROXIES"]
    if hops:
        # Flask's documented way to wrap the WSGI app; its types declare wsgi_app a method.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=hops, x_proto=hops)

    # The limits, storage and strategy were checked at start (app/config.py).
    default_limit = cfg["RATELIMIT_DEFAULT"]
    strict_limit = cfg["RATELIMIT_STRICT"]
    default = Limit(default_limit, scope="default", shared=True, exempt_when=is_strict)
    strict = Limit(strict_limit, scope="strict", shared=True, exempt_when=lambda: not is_strict())
    limiter = BudgetLimiter(
        client_identity,
        default_limits=[default, strict],
        storage_uri=storage_uri_of(cfg["RATELIMIT_STORAGE_URI"]),
        strategy=cfg["RATELIMIT_STRATEGY"],
        key_prefix=cfg["RATELIMIT_KEY_PREFIX"],
        request_identifier=request_identity,
        # The headers are written below (flask-limiter would put Retry-After on every response).
        headers_enabled=False,
        swallow_errors=True,
    )
    limiter.request_filter(is_exempt)
    limiter.init_app(app)
    app.extensions["elemta_limiter"] = limiter

    @app.after_request
    def _rate_limit_headers(response: Response) -> Response:
        decision = request.environ.get(DECISION)
        try:
            if decision is not None:
                # The lean check's own count: only the window's end is read (what
                # ``RequestLimit.window`` reads with it), one storage call instead of two.
                amount = decision.limit.amount
                remaining = decision.remaining
                if remaining is None:
                    reset_time, remaining = limiter.limiter.get_window_stats(
                        decision.limit, *decision.args)
                else:
                    reset_time = limiter.limiter.storage.get_expiry(decision.key)
            else:
                current = limiter.current_limit
                if current is None:
                    return response
                amount = current.limit.amount
                reset_time, remaining = current.window
            headers = response.headers
            headers["X-RateLimit-Limit"] = str(amount)
            headers["X-RateLimit-Remaining"] = str(max(0, remaining))
            # Epoch seconds at which the window ends; Retry-After: whole seconds until then.
            headers["X-RateLimit-Reset"] = str(math.ceil(reset_time))
            if response.status_code == 429:
                headers["Retry-After"] = str(max(1, math.ceil(reset_time - time.time())))
        except Exception:  # the storage went away between the check and here
            log.warning("rate limit headers unavailable: storage error", exc_info=True)
        return response

    return limiter
