"""Each signed-in user's error budget (``user_error_budget``): refusals in, suspensions out.

:class:`UserErrorBudgets` listens to the refusal path. A refusal of a connection
signed in as a user, in an app with a ``user_error_budget``, spends that refusal's
reputation weight (:data:`~bastion.security.reputation.DEFAULT_POINTS`, overridden
by ``[security.reputation] points``; a reason that weighs nothing spends nothing)
from the user's bucket: one bucket per app and user, asked of the node's
:class:`~bastion.security.limits.LimiterFactory`, so with Redis all the user's
connections on every node spend the same budget. When a refusal finds too little
left, the user is suspended (:meth:`~bastion.core.hub.Hub.suspend_user`): every
connection signed in as them is closed on every node (4009 ``user_suspended``)
and their sign-ins are refused for ``cooldown_seconds`` (4009
``signin_suspended``), audited once and counted by the deciding node. Nothing is
done to the address: the reputation of each refusal is scored as always, and a
suspension adds nothing to it.

Not from inside the listener: it runs inside the refusing connection's own refusal
(mid-message), so the suspension is scheduled for the loop's next turn, once per
user while one is pending.
"""

from __future__ import annotations

from bastion.config import ReputationSettings, UserErrorBudget
from bastion.security.limits import DEFAULT_MAX_KEYS, RateLimiter
from bastion.security.reputation import DEFAULT_POINTS
from bastion.server.context import ServerContext
from bastion.server.refusals import RefusalRecord

__all__ = ["UserErrorBudgets"]


class UserErrorBudgets:
    """The error budgets of the users of one node's apps.

    Args:
        ctx: the node's context (hub, limiter factory, loop, current settings).
    """

    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx
        #: app id → its budget settings and their bucket (rebuilt when they change).
        self._buckets: dict[str, tuple[UserErrorBudget, RateLimiter]] = {}
        self._weights_of: ReputationSettings | None = None
        self._weights: dict[str, float] = {}
        #: (app id, user id) with a suspension scheduled and not yet run.
        self._pending: set[tuple[str, str]] = set()

    def on_refusal(self, record: RefusalRecord) -> None:
        """Refusal-path listener: spend the weight of ``record`` from its user's budget."""
        user_id, app_id = record.user_id, record.app_id
        if user_id is None or app_id is None:
            return
        app = self._ctx.hub.apps_by_id.get(app_id)
        budget = app.settings.user_error_budget if app is not None else None
        if budget is None:
            return
        weight = self._weight(record.reason.value.slug)
        if weight <= 0 or (app_id, user_id) in self._pending:
            return
        bucket = self._bucket(app_id, budget)
        if bucket.take(f"{app_id}\n{user_id}", self._ctx.loop.time(), weight) > 0:
            self._pending.add((app_id, user_id))
            self._ctx.loop.call_soon(self._suspend, app_id, user_id)

    def _suspend(self, app_id: str, user_id: str) -> None:
        self._pending.discard((app_id, user_id))
        app = self._ctx.hub.apps_by_id.get(app_id)
        budget = app.settings.user_error_budget if app is not None else None
        if app is None or budget is None:
            return  # removed or switched off by a reload meanwhile
        self._ctx.hub.suspend_user(app, user_id, budget.cooldown_seconds)

    def _weight(self, slug: str) -> float:
        points = self._ctx.settings.security.reputation
        if points is not self._weights_of:  # the settings changed (a reload)
            self._weights_of = points
            self._weights = {**DEFAULT_POINTS, **points.points}
        return self._weights.get(slug, 0.0)

    def _bucket(self, app_id: str, budget: UserErrorBudget) -> RateLimiter:
        cached = self._buckets.get(app_id)
        if cached is None or cached[0] is not budget:
            limiter = self._ctx.limiters(
                "user_errors", budget.rate, budget.burst, DEFAULT_MAX_KEYS, self._ctx.loop.time
            )
            cached = self._buckets[app_id] = (budget, limiter)
        return cached[1]
