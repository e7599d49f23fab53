"""End an engine replica's calls whose caller died: Ray does not.

A streamed call to a model replica (prefill, decode, colocated generate) runs until its request
ends, whether or not anybody reads it. When the ingress replica that made it dies (killed, out
of memory, its node lost), Ray neither cancels the call nor fails its yields: the request
decodes to its max_tokens for nobody (measured: 6 requests of 1000 tokens were all still
decoding a minute after their ingress was killed), holding blocks and batch slots meanwhile.

So the ingress says who it is (`Caller`: a Serve replica is a named actor), and the replica
checks every CHECK_INTERVAL_S, while it has such calls, which of their callers Ray still has
(one GCS call for all of them), and cancels the calls of the others, as a client's disconnect
does: the request is aborted and its blocks freed. A call that ended can leave its caller
something to take: a prefill's published KV, which the ingress hands to a decode call next;
an ingress that dies first leaves it for nobody, and it is freed too (`if_dies`). A proxy's
death needs none of this: the ingress reads its request's messages from the proxy, and that
read fails at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# how long a dead caller's calls may go on: a GCS call (well under 1 ms) per interval, made
# only while the replica has calls to watch
CHECK_INTERVAL_S = 2.0


@dataclass(frozen=True)
class Caller:
    """Ingress -> engine replica: the named actor (a Serve replica) that made a call. By name
    alone: the runtime context's namespace is the job's, not the one the actor is named in
    (Serve's), and a Serve replica's name is unique (application, deployment, random id)."""

    name: str

    @staticmethod
    def current() -> Caller | None:
        """This process's actor, if it is a named one; None elsewhere (a driver, a test)."""
        try:
            import ray

            if not ray.is_initialized():
                return None
            name = ray.get_runtime_context().get_actor_name()
            return Caller(name) if name else None
        except Exception:  # not in a Ray worker
            return None


def live_named_actors() -> set[Caller]:
    """Every named actor Ray has now, in every namespace (a dead one is no longer listed)."""
    import ray

    return {Caller(a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)}


class CallerWatch:
    """The tasks that serve calls, by caller, and what ended calls left to their callers: the
    tasks of a caller that is no longer live are cancelled, and what it left is freed."""

    def __init__(
        self,
        live: Callable[[], set[Caller]] = live_named_actors,
        interval_s: float = CHECK_INTERVAL_S,
        on_orphaned: Callable[[int], None] | None = None,
    ) -> None:
        self._live = live  # blocking (a GCS call): run on a thread
        self.interval_s = interval_s
        self._on_orphaned = on_orphaned  # (calls cancelled now): a metric
        self.num_orphaned = 0  # calls cancelled because their caller died, in all
        self._calls: dict[Caller, set[asyncio.Task]] = {}
        self._left: list[_Left] = []  # if_dies's, oldest first
        self._checking: asyncio.Task | None = None

    @contextlib.contextmanager
    def watching(self, caller: Caller | None) -> Iterator[None]:
        """Within: the current task is cancelled if `caller` dies (None: not watched)."""
        task = asyncio.current_task()
        if caller is None or task is None:
            yield
            return
        self._calls.setdefault(caller, set()).add(task)
        self._start_checking()
        try:
            yield
        finally:
            tasks = self._calls.get(caller, set())
            tasks.discard(task)
            if not tasks:
                self._calls.pop(caller, None)

    def if_dies(self, caller: Caller | None, free: Callable[[], None]) -> None:
        """free() if `caller` is found dead within the next two check intervals: for what an
        ended call left it to take (a prefill's published KV, until its decode call imports
        it; freeing it after that must change nothing). `free` is kept that long: it must not
        hold what it frees (KVChannel.discarder)."""
        if caller is None:
            return
        until = asyncio.get_running_loop().time() + 2 * self.interval_s
        self._left.append(_Left(caller, free, until))
        self._start_checking()

    @property
    def num_watched(self) -> int:
        return sum(len(tasks) for tasks in self._calls.values()) + len(self._left)

    def _start_checking(self) -> None:
        if self._checking is None or self._checking.done():
            self._checking = asyncio.get_running_loop().create_task(self._check())

    async def _check(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self._forget_done()
            if not (self._calls or self._left):
                return  # nothing to watch: no more GCS calls until a call comes
            checked = asyncio.get_running_loop().time()  # what was left by now is checked
            try:
                live = await asyncio.to_thread(self._live)
            except Exception as e:  # Ray cannot say now: a caller not known dead is alive
                logger.warning("could not list the live callers: %r", e)
                continue
            for caller in [c for c in self._calls if c not in live]:
                tasks = [t for t in self._calls.pop(caller) if not t.done()]
                logger.warning("%s died: cancelling its %d calls", caller.name, len(tasks))
                for task in tasks:
                    task.cancel()
                self.num_orphaned += len(tasks)
                if tasks and self._on_orphaned is not None:
                    self._on_orphaned(len(tasks))
            self._free_left(live, checked)

    def _free_left(self, live: set[Caller], checked: float) -> None:
        kept = []
        for left in self._left:
            if left.caller not in live:
                logger.warning(
                    "%s died: freeing what a call left it, unless taken", left.caller.name
                )
                try:
                    left.free()
                except Exception:  # the others are freed still; this one waits for its TTL
                    logger.exception("freeing what %s left failed", left.caller.name)
            elif left.until > checked:
                kept.append(left)
        self._left = kept

    def _forget_done(self) -> None:
        """Tasks that ended with their generator not yet closed (it is, when collected)."""
        for caller, tasks in list(self._calls.items()):
            tasks.difference_update([t for t in tasks if t.done()])
            if not tasks:
                del self._calls[caller]


@dataclass(frozen=True)
class _Left:
    caller: Caller
    free: Callable[[], None]
    until: float  # checks after this one do not look for it
