"""The read barrier: prove the cache reflects every commit that completed
before a request began.

A round sends ``pg_notify(<channel>, <token>)`` and waits for the token to
come back on the LISTEN connection. PostgreSQL delivers notifications in
commit order, so every change committed before the token was sent has been
received by then; the round then waits until the engine has *applied*
everything received up to the token (refetches included).

Rounds are shared: a caller joins the current round if its NOTIFY has not
been sent yet; once it has, the token may predate the caller's start, so the
caller gathers on the next round, which is sent as soon as the current one's
token is back (not once it is applied: a reload that holds one round's callers
up must not hold up the next round, whose callers may need other tables).
However many callers there are, at most one token is in flight: no stampede
onto the database.

DDL sends no notification, so a round may also run a ``check`` (the catalog
check: one query for every table), started once the round's callers are all
in -- its query then sees every DDL committed before any of them began -- and
concurrent with the NOTIFY. It returns a batch the round must also cover (the
reload a schema change started), so the round answers only once that batch is
applied too: a STRONG read or ``Sync`` never sees the shape before the DDL.

Anyone who can connect can LISTEN on the channel and NOTIFY it, so a token
must prove that it is ours: each is 128 random bits (never the next of a
sequence), and the listener accepts tokens only from its own backend.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from sidecar.errors import Unavailable

log = logging.getLogger(__name__)


def new_token() -> str:
    """An unguessable read-barrier token."""
    return secrets.token_urlsafe(16)


class _Round:
    def __init__(self, token: str) -> None:
        self.token = token
        self.sending = False  # once True, later callers cannot use this round
        self.token_at: int | None = None  # the engine's seq when the token arrived
        self.checked_at: int | None = None  # the batch the round's check asked to cover (0: none)
        self.received_at: int | None = None  # both known: every earlier commit and DDL is in a batch up to it
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.received: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # the token came back
        self.received.add_done_callback(lambda f: f.cancelled() or f.exception())

    def fail(self, error: BaseException) -> None:
        for future in (self.received, self.done):
            if not future.done():
                future.set_exception(error)


class Barrier:
    """Coalescing read barrier over ``send`` (a NOTIFY) and the listener's tokens."""

    def __init__(
        self,
        send: Callable[[str], Awaitable[None]],
        timeout: float = 30.0,
        check: Callable[[], Coroutine[Any, Any, int]] | None = None,
    ) -> None:
        self._send = send
        self._check = check  # run by each round: returns a batch the round must also cover
        self.timeout = timeout  # a round that takes longer than this fails (token lost?)
        self._applied = 0  # the engine's applied batch, as last told
        self._current: _Round | None = None  # sent, awaiting its token
        self._next: _Round | None = None  # gathering callers, sent when current's token is back
        self._landing: set[_Round] = set()  # token back, waiting until applied
        self._tasks: set[asyncio.Task[Any]] = set()
        self.rounds = 0

    @property
    def landing(self) -> int:
        """Rounds whose token is back, waiting until what came before it is applied."""
        return len(self._landing)

    async def wait(self, *, applied: bool = True) -> int | None:
        """Return once a round sent after this call began has completed (``applied``
        False: once its token came back, so every earlier commit was received); the
        engine's seq when the token came back, or the batch the round's check asked to
        cover if later (every earlier commit and DDL is in a batch up to it)."""
        round_ = self._current
        if round_ is None or round_.sending:  # (a round not sent yet is still good)
            round_ = self._next
            if round_ is None:
                round_ = self._next = _Round(new_token())
                if self._current is None:
                    self._launch()
        await asyncio.shield(round_.done if applied else round_.received)
        return round_.received_at

    def _launch(self) -> None:
        if self._current is not None:
            return  # one token in flight at a time
        round_, self._next = self._next, None
        if round_ is None:
            return
        self._current = round_
        self.rounds += 1
        task = asyncio.get_running_loop().create_task(self._run(round_), name=f"barrier {round_.token}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, round_: _Round) -> None:
        try:
            # One deadline for sending the NOTIFY and for its token to come back.
            async with asyncio.timeout(self.timeout):
                round_.sending = True
                # From here on no caller joins this round: a check started now sees what they must.
                check = self._start_check()
                await self._send(round_.token)
                # (shielded: a check must not stop half-way, between seeing a change and acting on it)
                self._covered(round_, 0 if check is None else await asyncio.shield(check))
                await asyncio.shield(round_.received)
                self._next_round(round_)
                await asyncio.shield(round_.done)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not round_.done.done():
                reason = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
                log.warning("read barrier round failed: %s", reason)
                round_.fail(Unavailable(f"read barrier failed: {reason}"))
        finally:
            self._landing.discard(round_)
            self._next_round(round_)

    def _next_round(self, round_: _Round) -> None:
        """``round_``'s token is back (or it failed): the next round may be sent."""
        if self._current is round_:
            self._current = None
        self._launch()

    def _start_check(self) -> asyncio.Task[int] | None:
        if self._check is None:
            return None
        task = asyncio.get_running_loop().create_task(self._check(), name="barrier check")
        self._tasks.add(task)  # (a round that timed out leaves it running: close() ends it)
        task.add_done_callback(self._check_done)
        return task

    def _check_done(self, task: asyncio.Task[int]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # (retrieved: the round reports it, if it still waits)

    def _covered(self, round_: _Round, batch: int) -> None:
        round_.checked_at = batch
        self._settle(round_)

    def _settle(self, round_: _Round) -> None:
        """Once the token is back and the check done: the round is received, and done once applied."""
        if round_.token_at is None or round_.checked_at is None or round_.received_at is not None:
            return
        round_.received_at = max(round_.token_at, round_.checked_at)
        if not round_.received.done():
            round_.received.set_result(None)
        self._landing.add(round_)
        self.applied(self._applied)

    async def close(self) -> None:
        """End the rounds in flight (shutdown)."""
        self.fail_all("the sidecar is shutting down")
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---------------------------------------------------------- engine side

    def token_received(self, token: str, seq: int) -> bool:
        """The listener saw ``token`` at batch ``seq``; True if it was ours."""
        round_ = self._current
        if round_ is None or round_.token != token:
            return False
        if round_.token_at is None:
            round_.token_at = seq
            self._settle(round_)
        return True

    def applied(self, applied: int) -> None:
        """The engine applied everything up to ``applied``."""
        self._applied = applied
        if self._landing:
            for round_ in [r for r in self._landing if r.received_at is not None and r.received_at <= applied]:
                self._landing.discard(round_)
                if not round_.done.done():
                    round_.done.set_result(None)

    def fail_all(self, reason: str) -> None:
        """The listener went down: tokens in flight will never arrive."""
        for round_ in (self._current, self._next, *self._landing):
            if round_ is not None:
                round_.fail(Unavailable(f"read barrier impossible: {reason}"))
        self._landing.clear()
        # Rounds after a reconnect must not queue behind a NOTIFY that may hang.
        self._current = None
        self._next = None
