"""A stamped object described as pieces, and how to build it from parts (pure code, no I/O).

Pieces are the shape `builder.binfmt.tag.stamp_pieces` returns: an ordered list of
`("base", offset, length)` ranges of a base object and `("bytes", data)` literals.

`plan_parts` splits the output into S3 multipart parts so that as much as possible is
server-side copied (UploadPartCopy) and as little as possible is uploaded. The rules it meets:
every part except the last is at least `min_part` bytes (5 MiB on S3); a copied part is one
contiguous range of the base; a part that holds any literal byte must be uploaded whole, base
bytes included. A small change near the end (an EXE's certificate table) costs only the tail;
a change elsewhere costs one `min_part`-sized upload around it. The plan is the cheapest in
uploaded bytes among part boundaries at segment edges and at `min_part` steps from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence, Union

Piece = Union[tuple[Literal["base"], int, int], tuple[Literal["bytes"], bytes]]

MIB = 1024 * 1024
S3_MIN_PART = 5 * MIB
S3_MAX_PART = 5 * 1024 * MIB
S3_MAX_PARTS = 10_000
# Uploaded parts are built in memory; a long uploaded region is sent as several parts of this size.
UPLOAD_CHUNK = 16 * MIB


@dataclass(frozen=True)
class Segment:
    """Output bytes [start, end): a base range starting at `src`, or the literal `data`."""

    start: int
    end: int
    src: int | None = None
    data: bytes | None = None

    @property
    def is_base(self) -> bool:
        return self.data is None


@dataclass(frozen=True)
class Part:
    """One multipart part: output bytes [start, end), copied from base offset `src` or uploaded."""

    start: int
    end: int
    copy_from: int | None = None

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def is_copy(self) -> bool:
        return self.copy_from is not None


def segments(pieces: Iterable[Sequence], base_size: int) -> list[Segment]:
    """Validated, output-positioned segments; adjacent base ranges that are contiguous in the base merge."""
    out: list[Segment] = []
    pos = 0
    for piece in pieces:
        piece = tuple(piece)
        if len(piece) == 3 and piece[0] == "base":
            _, offset, length = piece
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, length)):
                raise ValueError("a base piece's offset and length must be integers")
            if offset < 0 or length < 0 or offset + length > base_size:
                raise ValueError(f"base piece ({offset}, {length}) falls outside the base ({base_size} bytes)")
            if length == 0:
                continue
            prev = out[-1] if out else None
            if prev is not None and prev.is_base and prev.src + (prev.end - prev.start) == offset:
                out[-1] = Segment(prev.start, pos + length, prev.src)
            else:
                out.append(Segment(pos, pos + length, offset))
            pos += length
        elif len(piece) == 2 and piece[0] == "bytes":
            data = piece[1]
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError("a bytes piece must hold bytes")
            data = bytes(data)
            if not data:
                continue
            prev = out[-1] if out else None
            if prev is not None and not prev.is_base:
                out[-1] = Segment(prev.start, pos + len(data), None, prev.data + data)
            else:
                out.append(Segment(pos, pos + len(data), None, data))
            pos += len(data)
        else:
            raise ValueError(f"unknown piece {piece[:1]!r}: expected ('base', offset, length) or ('bytes', data)")
    return out


def output_size(segs: Sequence[Segment]) -> int:
    return segs[-1].end if segs else 0


def literal_bytes(segs: Sequence[Segment]) -> int:
    return sum(s.end - s.start for s in segs if not s.is_base)


def plan_parts(segs: Sequence[Segment], min_part: int = S3_MIN_PART,
               max_copy: int = S3_MAX_PART, upload_chunk: int = UPLOAD_CHUNK) -> list[Part]:
    total = output_size(segs)
    if total == 0:
        return []
    # A base segment shorter than min_part that is not the last one can never be a copied part
    # of its own: treat it as changed, so the search only has long base runs to copy.
    long_runs = [s for i, s in enumerate(segs) if s.is_base and (s.end - s.start >= min_part or i == len(segs) - 1)]
    edges = {0, total}
    for run in long_runs:
        edges.update((run.start, run.end))
    points = set()
    for e in edges:
        for k in (-2, -1, 0, 1, 2):
            p = e + k * min_part
            if 0 <= p <= total:
                points.add(p)
    pts = sorted(points)
    n = len(pts)
    inf = float("inf")
    # best[i]: (uploaded bytes, parts) to build output [0, pts[i]); choice[i]: (j, copy_from or None).
    best: list[tuple[float, int]] = [(inf, 0)] * n
    choice: list[tuple[int, int | None]] = [(-1, None)] * n
    best[0] = (0, 0)
    for i in range(1, n):
        end = pts[i]
        last = end == total
        for j in range(i):
            if best[j][0] == inf:
                continue
            start = pts[j]
            if not last and end - start < min_part:
                continue
            copy_from = None
            for run in long_runs:
                if run.start <= start and end <= run.end:
                    copy_from = run.src + (start - run.start)
                    break
            cost = (best[j][0] + (0 if copy_from is not None else end - start), best[j][1] + 1)
            if cost < best[i]:
                best[i] = cost
                choice[i] = (j, copy_from)
    plan: list[Part] = []
    i = n - 1
    while i > 0:
        j, copy_from = choice[i]
        plan.append(Part(pts[j], pts[i], copy_from))
        i = j
    plan.reverse()
    return _split_long(plan, max_copy, upload_chunk, min_part)


def _split_long(plan: list[Part], max_copy: int, upload_chunk: int, min_part: int) -> list[Part]:
    out: list[Part] = []
    for part in plan:
        limit = max_copy if part.is_copy else max(upload_chunk, min_part)
        count = max(1, part.size // limit + (1 if part.size % limit else 0))
        if count == 1:
            out.append(part)
            continue
        # Equal shares: each is >= size/count >= limit/2 >= min_part (limit >= 2 * min_part).
        step = part.size // count
        for k in range(count):
            lo = part.start + k * step
            hi = part.end if k == count - 1 else lo + step
            src = None if part.copy_from is None else part.copy_from + (lo - part.start)
            out.append(Part(lo, hi, src))
    return out


def ranges(segs: Sequence[Segment], start: int, end: int) -> list[Segment]:
    """The segments (clipped) that make output bytes [start, end)."""
    out = []
    for s in segs:
        lo, hi = max(start, s.start), min(end, s.end)
        if lo >= hi:
            continue
        if s.is_base:
            out.append(Segment(lo, hi, s.src + (lo - s.start)))
        else:
            out.append(Segment(lo, hi, None, s.data[lo - s.start:hi - s.start]))
    return out
