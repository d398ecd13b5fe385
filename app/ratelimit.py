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

from flask import Flask, Response, g, request
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
    return (request.path in EXEMPT_PATHS or request.method == "OPTIONS"
            or request.blueprint in EXEMPT_BLUEPRINTS)


def request_identity() -> str:
    """What Flask-Limiter calls the request: its endpoint, and a name for requests without one.

    Flask-Limiter exempts requests without an endpoint (unknown routes, wrong methods); every
    request counts here (docs/SECURITY.md), so those get a name of their own.
    """
    return request.endpoint or "<unrouted>"


def is_strict() -> bool:
    return request.method == "POST" and bool(STRICT_PATH.match(request.path))


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

    def _hit(self, item: RateLimitItem, args: list[str], key: str | None = None) -> bool:
        """One hit on ``item``; with a fixed window, also what remains after this very hit.

        The counter's increment is atomic and answers with the new count, so each of several
        concurrent requests learns its own position. Reading the window again afterwards (as
        ``RequestLimit.window`` does) gives concurrent requests the same later count, and
        X-RateLimit-Remaining repeated values. The other strategies have no such answer.
        """
        if not isinstance(self.limiter, FixedWindowRateLimiter):
            return self.limiter.hit(item, *args, cost=1)
        key = key or item.key_for(*args)
        count = self.limiter.storage.incr(key, item.get_expiry(), amount=1)
        remaining = g.setdefault("ratelimit_remaining", {})
        remaining[key] = max(0, item.amount - count)
        return count <= item.amount

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
        endpoint = request.endpoint
        if (endpoint and endpoint.rpartition(".")[2] == "static") or is_exempt():
            return
        scope = "strict" if is_strict() else "default"
        try:
            client = client_identity()
            if not client:
                log.error("Skipping rate limits: no client identity")
                return
            args = [self.prefix, client, scope] if self.prefix else [client, scope]
            checked: list[RequestLimit] = []
            breached: RuntimeLimit | None = None
            for lim in self.budgets[scope]:
                checked.append(RequestLimit(self, lim.limit, args, False, True))
                if not self._hit(lim.limit, args, checked[-1].key):
                    log.info("ratelimit %s (%s) exceeded at endpoint: %s", lim.limit, client,
                             scope)
                    checked[-1].breached = True
                    breached = lim
                    break
            context = self.context
            context.view_rate_limit = checked[-1] if breached else checked[0]
            context.view_rate_limits = checked
        except Exception:
            if not self._swallow_errors:
                raise
            log.exception("Failed to rate limit. Swallowing error")
            return
        if breached is not None:
            raise RateLimitExceeded(breached)


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
        current = limiter.current_limit
        if current is None:
            return response
        try:
            # This request's own count where the hit gave one (BudgetLimiter._hit): then only
            # the window's end is read (what ``current.window`` reads with it), one storage
            # call instead of two.
            key = current.key
            remaining = g.get("ratelimit_remaining", {}).get(key)
            if remaining is None:
                reset_time, remaining = current.window
            else:
                reset_time = limiter.limiter.storage.get_expiry(key)
            response.headers["X-RateLimit-Limit"] = str(current.limit.amount)
            response.headers["X-RateLimit-Remaining"] = str(max(0, remaining))
            # Epoch seconds at which the window ends; Retry-After: whole seconds until then.
            response.headers["X-RateLimit-Reset"] = str(math.ceil(reset_time))
            if response.status_code == 429:
                response.headers["Retry-After"] = str(max(1, math.ceil(reset_time - time.time())))
        except Exception:  # the storage went away between the check and here
            log.warning("rate limit headers unavailable: storage error", exc_info=True)
        return response

    return limiter
