"""The host's memory and spool space as budgets that requests are admitted against.

Memory: the budget is ``SEG_MEMORY_BUDGET`` or else the cgroup's memory limit (a container's
``--memory``), less what the process holds once its models are loaded. Each request's cost is
estimated before its image is decoded (:func:`service.segmentation.memory.request_memory`); at most
``workers`` requests run at once, so what must fit is the sum of the ``workers`` largest costs
admitted. A request that could not fit even alone is refused for good (413), one that cannot fit
beside those already admitted is refused for now (503).

Spool: uploads are spooled to the temporary directory before the route sees them. The budget is
``SEG_SPOOL_BUDGET`` or else the directory's free space; each upload reserves its declared
``Content-Length`` (or, chunked, what has arrived) before it is read, so that the disk filling up
is a 503 for the uploads that do not fit instead of a parse error for all of them.

Framework-free: the HTTP layer turns the exceptions below into answers.
"""

from __future__ import annotations

import heapq
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from service.core.config import Settings

MIB = 1 << 20
# A cgroup "limit" this large (or "max") means no limit.
_UNLIMITED = 1 << 60


def _procfs_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux; None elsewhere)."""
    kib = _procfs_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory since start or :func:`reset_peak_rss`."""
    kib = _procfs_status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Start a new peak measurement (``/proc/self/clear_refs``); False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cgroup_limit_files() -> list[Path]:
    """Where this process's memory limit may be, most specific first (cgroup v2 and v1)."""
    root = Path("/sys/fs/cgroup")
    candidates: list[Path] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if hierarchy == "0" and controllers == "":
            candidates += [root / rel / "memory.max", root / "memory.max"]
        elif "memory" in controllers.split(","):
            candidates += [
                root / "memory" / rel / "memory.limit_in_bytes",
                root / "memory" / "memory.limit_in_bytes",
            ]
    return candidates


def cgroup_memory_limit() -> int | None:
    """The memory limit of this process's cgroup in bytes (a container's ``--memory``), or
    None when there is none."""
    for path in _cgroup_limit_files():
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return None if value >= _UNLIMITED else value
    return None


def mib(n: int) -> str:
    """``n`` bytes in MiB for messages: ``1,234 MiB``."""
    return f"{n / MIB:,.0f} MiB"


class OverBudgetError(Exception):
    """The request can never fit the budget: it needs more than the whole budget offers."""

    def __init__(self, needed: int, capacity: int) -> None:
        super().__init__(f"needs {mib(needed)}, at most {mib(capacity)} available")
        self.needed = needed
        self.capacity = capacity


class BudgetBusyError(Exception):
    """The request fits the budget, but not beside what is already admitted: retry later."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"needs {mib(needed)}, {mib(free)} free now")
        self.needed = needed
        self.free = free


@dataclass
class Reservation:
    """A request's share of a budget; :meth:`release` gives it back (once, however often
    called)."""

    budget: MemoryBudget | SpoolBudget
    nbytes: int
    received: int = 0  # spool only: bytes of the body that have arrived
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        """Give the reservation back."""
        if not self._released:
            self._released = True
            self.budget._release(self)


class MemoryBudget:
    """Memory for requests: ``total`` bytes less the process's ``baseline`` (its RSS with the
    models loaded), shared by at most ``workers`` requests running at once."""

    def __init__(self, total: int, baseline: int, workers: int, source: str) -> None:
        self.total = total
        self.baseline = baseline
        self.capacity = max(total - baseline, 0)
        self.workers = workers
        self.source = source  # where the total came from, for messages
        self._costs: list[Reservation] = []
        self._lock = threading.Lock()

    def hold(self, nbytes: int) -> None:
        """The process now holds ``nbytes`` more for good (a model loaded on demand): that much
        less for requests."""
        with self._lock:
            self.baseline += max(nbytes, 0)
            self.capacity = max(self.total - self.baseline, 0)

    @property
    def reserved(self) -> int:
        """What the admitted requests could hold at once: their ``workers`` largest costs."""
        with self._lock:
            return self._peak([r.nbytes for r in self._costs])

    def _peak(self, costs: list[int]) -> int:
        return sum(heapq.nlargest(self.workers, costs))

    def admit(self, cost: int) -> Reservation:
        """Reserve ``cost`` bytes, or raise :class:`OverBudgetError` (never fits) or
        :class:`BudgetBusyError` (not beside the requests admitted now)."""
        if cost > self.capacity:
            raise OverBudgetError(cost, self.capacity)
        with self._lock:
            costs = [r.nbytes for r in self._costs]
            if self._peak([*costs, cost]) > self.capacity:
                raise BudgetBusyError(cost, self.capacity - self._peak(costs))
            reservation = Reservation(self, cost)
            self._costs.append(reservation)
        return reservation

    def _release(self, reservation: Reservation) -> None:
        with self._lock:
            self._costs.remove(reservation)


class SpoolBudget:
    """Space for spooled uploads in ``directory``: ``total`` bytes when given, else the
    directory's free space less what admitted uploads have yet to write."""

    def __init__(self, directory: Path, total: int | None = None) -> None:
        self.directory = directory
        self.total = total
        self._uploads: list[Reservation] = []
        self._lock = threading.Lock()

    def _capacity_and_free(self) -> tuple[int, int]:
        """(the most one upload could ever have, what is free for a new one now)."""
        if self.total is not None:
            held = sum(r.nbytes for r in self._uploads)
            return self.total, self.total - held
        usage = shutil.disk_usage(self.directory)
        pending = sum(max(r.nbytes - r.received, 0) for r in self._uploads)
        return usage.total, usage.free - pending

    def admit(self, nbytes: int) -> Reservation:
        """Reserve ``nbytes`` for an upload, or raise :class:`OverBudgetError` /
        :class:`BudgetBusyError`."""
        with self._lock:
            capacity, free = self._capacity_and_free()
            if nbytes > capacity:
                raise OverBudgetError(nbytes, capacity)
            if nbytes > free:
                raise BudgetBusyError(nbytes, max(free, 0))
            reservation = Reservation(self, nbytes)
            self._uploads.append(reservation)
        return reservation

    def track(self, reservation: Reservation, received: int) -> None:
        """The upload has ``received`` bytes so far; a body longer than it declared (or of
        unknown length) reserves what it outgrew, or raises like :meth:`admit`."""
        with self._lock:
            reservation.received = received
            extra = received - reservation.nbytes
            if extra <= 0:
                return
            capacity, free = self._capacity_and_free()
            if received > capacity:
                raise OverBudgetError(received, capacity)
            if extra > free:
                raise BudgetBusyError(extra, max(free, 0))
            reservation.nbytes = received

    def _release(self, reservation: Reservation) -> None:
        with self._lock:
            self._uploads.remove(reservation)

    @property
    def in_use(self) -> int:
        """Bytes reserved by uploads in progress."""
        with self._lock:
            return sum(r.nbytes for r in self._uploads)


def spool_directory() -> Path:
    """Where uploads are spooled: Python's temporary directory (``TMPDIR``)."""
    return Path(tempfile.gettempdir())


def memory_budget_from(settings: Settings) -> tuple[int | None, str]:
    """The process's memory budget and where it comes from: ``SEG_MEMORY_BUDGET``, else the
    cgroup limit (a container's ``--memory``), else none."""
    if settings.memory_budget is not None:
        return int(settings.memory_budget), "SEG_MEMORY_BUDGET"
    return cgroup_memory_limit(), "the memory limit of its cgroup (container)"
