"""Which transactions a database snapshot saw, from ``pg_current_snapshot()``'s text
(``xmin:xmax:xip,...``, 64-bit transaction ids), asked with the 32-bit id a change
stream gives (pgoutput's Begin). A reload that records its snapshot can then tell which
of the changes the stream brings later are in the rows it read already."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SNAPSHOT = re.compile(r"([0-9]{1,20}):([0-9]{1,20}):([0-9,]{0,100000})")
_WRAP = 1 << 32


@dataclass(frozen=True)
class Visibility:
    xmin: int
    xmax: int
    running: frozenset[int]  # in progress when the snapshot was taken (not seen)

    @classmethod
    def parse(cls, text: str) -> Visibility:
        match = _SNAPSHOT.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"not a snapshot: {text[:60]!r}")
        xmin, xmax = int(match[1]), int(match[2])
        running = frozenset(int(x) for x in match[3].split(",") if x)
        if not xmin <= xmax or any(not xmin <= x < xmax for x in running):
            raise ValueError(f"not a consistent snapshot: {text[:60]!r}")
        return cls(xmin, xmax, running)

    def saw(self, xid: int) -> bool:
        """Whether the snapshot saw transaction ``xid`` (32-bit, as pgoutput sends it) --
        for a transaction that committed: it committed before the snapshot was taken."""
        # 32-bit ids compare circularly, as PostgreSQL compares them: within 2^31 after
        # xmax is after it (not seen), within 2^31 before it is that far before.
        ahead = (xid - self.xmax) % _WRAP
        if ahead < _WRAP // 2:
            return False
        full = self.xmax - (_WRAP - ahead)
        if full < self.xmin:
            return True
        return full < self.xmax and full not in self.running
