"""The waiting line: each user's jobs in the order they came, users served in turn, compatible jobs taken together.

A ``Ticket`` is a queued job; the ``Line`` holds the tickets no worker holds yet, and decides which go in the next
batch. What may start (pauses, draining) and when the order changed are the scheduler's to know.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from dataclasses import dataclass, field

from bot.engine.types import ImageSpec, RenderedImage, Settings
from bot.scheduler.batches import Frame, Rendering


@dataclass(eq=False, slots=True)
class Ticket:
    """A queued job: await ``result`` for its images; ``started`` is set when the GPU takes it."""

    job_id: int
    user_id: int
    guild_id: int | None
    specs: tuple[ImageSpec, ...]
    result: asyncio.Future[list[RenderedImage]]
    started: asyncio.Event = field(default_factory=asyncio.Event)
    step: int = 0
    total_steps: int = 0
    attempts: int = 0  # workers that died while holding it
    revision: str | None = None  # the model revision it asked for (a candidate); None: the production one
    renders: list[Rendering] = field(default_factory=lambda: list[Rendering]())  # per image, once rendered
    preview: Frame | None = None  # the newest frame of its first image while it renders; never stored
    new_preview: asyncio.Event = field(default_factory=asyncio.Event)  # set when ``preview`` changes

    def show(self, frame: Frame) -> None:
        """Keep a newer frame of the image forming (an older one is dropped) and wake whoever shows it."""
        if self.preview is None or frame.step >= self.preview.step:
            self.preview = frame
            self.new_preview.set()

    @property
    def settings(self) -> Settings:
        return self.specs[0].settings

    @property
    def work(self) -> int:
        """Pixel-steps this job costs the GPU, the unit its time estimates fall back on."""
        settings = self.settings
        return len(self.specs) * settings.width * settings.height * settings.steps


class Line:
    """The waiting tickets of every user, in turn order: the user served last moves to the back."""

    def __init__(self) -> None:
        # Users in turn order; each has a FIFO of tickets.
        self._users: collections.OrderedDict[int, collections.deque[Ticket]] = collections.OrderedDict()
        # Waiting tickets per revision they asked for, so a worker of a revision nobody waits for looks no further.
        self._revisions: collections.Counter[str | None] = collections.Counter()

    def __bool__(self) -> bool:
        return bool(self._users)

    def __len__(self) -> int:
        return sum(len(tickets) for tickets in self._users.values())

    def __iter__(self) -> Iterator[Ticket]:
        """Yield every waiting ticket, user by user."""
        for tickets in self._users.values():
            yield from tickets

    def waiting_for(self, revision: str | None) -> int:
        """Return how many waiting tickets asked for ``revision`` (None: the production one)."""
        return self._revisions[revision]

    def of(self, user_id: int) -> collections.deque[Ticket] | tuple[()]:
        """Return a user's waiting tickets, oldest first."""
        return self._users.get(user_id, ())

    def append(self, ticket: Ticket) -> None:
        self._users.setdefault(ticket.user_id, collections.deque()).append(ticket)
        self._revisions[ticket.revision] += 1

    def put_back(self, ticket: Ticket) -> None:
        """Put a ticket at the very front: first of its user's, and its user first in turn."""
        self._users.setdefault(ticket.user_id, collections.deque()).appendleft(ticket)
        self._users.move_to_end(ticket.user_id, last=False)
        self._revisions[ticket.revision] += 1

    def remove(self, job_id: int) -> Ticket | None:
        """Take a job's ticket out of the line; return it, or None when it does not wait here."""
        for user_id, tickets in self._users.items():
            for ticket in tickets:
                if ticket.job_id == job_id:
                    tickets.remove(ticket)
                    if not tickets:
                        del self._users[user_id]
                    self._revisions[ticket.revision] -= 1
                    return ticket
        return None

    def clear(self) -> None:
        self._users.clear()
        self._revisions.clear()

    def fair_order(self) -> Iterator[Ticket]:
        """Yield waiting tickets in the order they will be served: one per user per round, in turn order."""
        queues = [list(tickets) for tickets in self._users.values()]
        for depth in range(max((len(q) for q in queues), default=0)):
            for queue in queues:
                if depth < len(queue):
                    yield queue[depth]

    def take_batch(self, order: Iterator[Ticket], max_batch: int) -> list[Ticket]:
        """Take the next ticket in ``order`` (a fair order) and every later compatible ticket that fits beside it:
        the same settings, and the same revision (one worker's weights render the whole batch)."""
        first = next(order)
        batch = [first]
        images = len(first.specs)
        for ticket in order:
            if images >= max_batch:
                break
            if (
                images + len(ticket.specs) <= max_batch
                and ticket.settings == first.settings
                and ticket.revision == first.revision
            ):
                batch.append(ticket)
                images += len(ticket.specs)
        for ticket in batch:
            tickets = self._users[ticket.user_id]
            tickets.remove(ticket)
            if not tickets:
                del self._users[ticket.user_id]
            self._revisions[ticket.revision] -= 1
        # The first user has had their turn: to the back of the line.
        if first.user_id in self._users:
            self._users.move_to_end(first.user_id)
        return batch
