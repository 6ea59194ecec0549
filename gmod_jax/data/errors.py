"""Bad-record errors and the accounting that decides when bad data stops a run.

Real instruction-tuning mixtures (LLaVA-665K) contain a few broken samples: missing or corrupt
images, malformed conversations, samples whose image block does not fit the context. One of
them must not kill a week-long run, but a wrong image folder (every sample bad) must fail fast
and say which records, so bad records are skipped while their share stays under a limit.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)


class BadRecord(ValueError):
    """A sample that cannot be turned into a training example (names the record or file)."""

    def __init__(self, record_id, reason: str):
        self.record_id = str(record_id)
        self.reason = reason
        super().__init__(f"bad record {self.record_id!r}: {reason}")


class TooManyBadRecords(RuntimeError):
    """The share of bad records exceeded the configured maximum."""


class BadRecordTracker:
    """Counts good and bad records and raises once the bad share exceeds `max_bad_fraction`.

    The share is measured against at least `1 / max_bad_fraction` records, so that the very
    first bad sample of a stream is tolerated (a share of 1/1 says nothing yet) while a source
    where most records are bad fails within the first few hundred samples. `total` (when the
    number of records is known up front, as when building a dataset) makes the check exact.
    """

    MAX_REMEMBERED = 20  # bad ids kept for error messages and checkpointed state

    def __init__(self, max_bad_fraction: float = 0.01, total: int | None = None, what: str = "records"):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        self.total = total
        self.what = what
        self.seen = 0
        self.bad = 0
        self.truncated = 0
        self.bad_examples: list[str] = []  # "id: reason", the most recent MAX_REMEMBERED

    def ok(self, truncated: bool = False) -> None:
        self.seen += 1
        self.truncated += int(bool(truncated))

    def record_bad(self, record_id, reason: str) -> None:
        self.seen += 1
        self.bad += 1
        self.bad_examples.append(f"{record_id}: {reason}")
        del self.bad_examples[: -self.MAX_REMEMBERED]
        # Individually for the first few, then a periodic summary: a corpus with 0.5% broken
        # samples would otherwise log thousands of lines per epoch.
        if self.bad <= self.MAX_REMEMBERED or self.bad % 1000 == 0:
            log.warning("skipping bad record %s: %s (%d bad %s of %d so far)", record_id, reason, self.bad,
                        self.what, self.seen)
        self.check()

    def check(self, final: bool = False) -> None:
        """Raise TooManyBadRecords if the bad share is already certain (or, at the end, is) too high."""
        if self.total is not None:
            denominator = self.total  # exact: known size of the whole source
        elif final:
            denominator = self.seen
        else:
            floor = math.ceil(1.0 / self.max_bad_fraction) if self.max_bad_fraction > 0 else 1
            denominator = max(self.seen, floor)
        if self.bad > self.max_bad_fraction * denominator:
            shown = "\n  ".join(self.bad_examples)
            raise TooManyBadRecords(
                f"{self.bad} bad {self.what} out of {self.seen} seen"
                f"{'' if self.total is None else f' (of {self.total} total)'} exceeds max_bad_fraction="
                f"{self.max_bad_fraction}; most recent:\n  {shown}")

    # Checkpointable state (JSON-friendly: the Grain iterator state is serialised as JSON).
    def get_state(self) -> dict:
        return {"seen": self.seen, "bad": self.bad, "truncated": self.truncated,
                "bad_examples": list(self.bad_examples)}

    def set_state(self, state: dict) -> None:
        self.seen = int(state["seen"])
        self.bad = int(state["bad"])
        self.truncated = int(state["truncated"])
        self.bad_examples = [str(s) for s in state["bad_examples"]]
