"""How the session's events reach Tk's loop, which alone touches widgets.

The session's worker thread writes a byte into a pipe that Tk watches
(Wakeup); Tk's loop then reads the queued events in bounded batches
(EventPump, take_events), so a flood of messages never freezes the window
and an idle window costs next to nothing."""

from __future__ import annotations

import os
import queue
import threading
import time
import tkinter as tk
from typing import Callable


# The worker's wakeups drive the reading of events, a few ms after the first
# one so that a stream of arrivals makes batches rather than one redraw per
# message; the slow poll is only a safety net. Under a backlog the window
# comes back as soon as Tk has redrawn and handled input.
WAKE_DELAY_MS = 10
SAFETY_POLL_MS = 1000
# Bounds on one tick, so input and redraws are never held up for long.
EVENTS_PER_TICK = 300
TICK_BUDGET_S = 0.02


def take_events(events: queue.Queue, limit: int, budget_s: float = TICK_BUDGET_S):
    """Events already queued, at most ``limit`` of them and for ``budget_s``."""
    deadline = time.monotonic() + budget_s
    for _ in range(limit):
        try:
            yield events.get_nowait()
        except queue.Empty:
            return
        if time.monotonic() > deadline:
            return



# --- waking Tk's loop from the session's thread -----------------------------------------


class Wakeup:
    """Wakes Tk's loop when a session's worker thread has queued events.

    The worker thread calls ``notify`` (the session's ``on_event``), which
    only writes a byte into a pipe; Tk watches the other end
    (``createfilehandler``) and calls ``handler`` from its own loop, in the
    main thread. Not ``event_generate`` from the worker: tkinter hands such a
    call over to the main thread and blocks the worker until Tk's
    ``mainloop`` runs it, and fails after a second when nobody is in
    ``mainloop``.
    """

    def __init__(self, root: tk.Misc):
        self._tk = root.tk
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        # notify never writes to a closed descriptor, whose number the
        # process may already have given to another file.
        self._lock = threading.Lock()
        self._open = True
        self.handler: Callable[[], None] | None = None
        self._tk.createfilehandler(self._read_fd, tk.READABLE, self._on_readable)

    def notify(self) -> None:
        """Safe from any thread; returns at once."""
        with self._lock:
            if self._open:
                try:
                    os.write(self._write_fd, b"\0")
                except BlockingIOError:
                    pass  # the pipe is full: Tk has a wakeup coming anyway

    def _on_readable(self, fd, mask) -> None:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        if self.handler is not None:
            self.handler()

    def close(self) -> None:
        with self._lock:
            if self._open:
                self._open = False
                self._tk.deletefilehandler(self._read_fd)
                os.close(self._read_fd)
                os.close(self._write_fd)
        # The session's thread may outlive the window and hold the last
        # reference to us: Tcl aborts if that thread frees the interpreter.
        self._tk = self.handler = None


class EventPump:
    """Calls ``read_batch`` from Tk's loop: soon after a wakeup, again at once
    (after a redraw) while ``events`` still holds a backlog, and at the
    latest every ``idle_ms()`` ms."""

    def __init__(self, root: tk.Misc, wakeup: Wakeup, events: queue.Queue,
                 read_batch: Callable[[], None], idle_ms: Callable[[], int] = lambda: SAFETY_POLL_MS):
        self.root, self.wakeup, self.events = root, wakeup, events
        self.read_batch, self.idle_ms = read_batch, idle_ms
        self._job = None
        self._due = False  # a batch is already on its way
        self.stopped = False
        wakeup.handler = self._on_wakeup
        self._on_wakeup()  # events may already be waiting

    def _on_wakeup(self) -> None:
        if not self._due and not self.stopped:
            self._cancel()
            self._due = True
            # A timer, not an idle handler: the redraw of the last batch (an
            # idle handler) and other timers get their turn between batches.
            self._job = self.root.after(WAKE_DELAY_MS, self._run)

    def _run(self) -> None:
        self._job, self._due = None, False
        try:
            self.read_batch()
        finally:  # a failing handler must not stop the reading
            if self.stopped:
                pass
            elif self.events.empty():
                self._job = self.root.after(self.idle_ms(), self._run)
            else:
                # A backlog: let Tk redraw and take input first (idle handlers
                # queued by the inserts run before this one), then come back.
                self._due = True
                self._job = self.root.after_idle(self._run_after_input)

    def _run_after_input(self) -> None:
        self._job = self.root.after(1, self._run)

    def _cancel(self) -> None:
        if self._job is not None:
            self.root.after_cancel(self._job)
            self._job = None

    def stop(self) -> None:
        self.stopped = True
        self._cancel()
        if self.wakeup.handler == self._on_wakeup:
            self.wakeup.handler = None

