"""Decoder for PostgreSQL's pgoutput logical replication protocol (versions 1 and 2).

`Decoder.decode(payload, lsn)` turns one XLogData payload into one message object. It keeps the
relation cache (Relation messages precede the first change to a table and follow every schema
change), so a column added while streaming is seen from its next Relation message on.

The format is PostgreSQL's "Logical Replication Message Formats" chapter. Values arrive in text
form; `convert` gives ints, floats, bools and JSON their Python types and keeps everything else as
the server's text (numeric stays text so no precision is lost), so that the snapshot path (COPY,
also text) yields exactly the same values.

A message type this decoder does not know stops the stream with `DecodeError` naming the LSN and
the bytes: skipping it could silently lose changes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from pgfresh.errors import DecodeError

PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)


_INT_OIDS = {20, 21, 23, 26}  # int8, int2, int4, oid
_FLOAT_OIDS = {700, 701}
_JSON_OIDS = {114, 3802}


def convert(type_oid: int, text: str | None):
    """Python value for a column's text form, identical for the stream and the snapshot."""
    if text is None:
        return None
    if type_oid in _INT_OIDS:
        return int(text)
    if type_oid == 16:
        return text == "t"
    if type_oid in _FLOAT_OIDS:
        f = float(text)
        return f if math.isfinite(f) else text
    if type_oid in _JSON_OIDS:
        return json.loads(text)
    return text


def _float(text: str):
    f = float(text)
    return f if math.isfinite(f) else text


def converter(type_oid: int):
    """The function `convert` applies for a type, or None when the text is kept as is."""
    if type_oid in _INT_OIDS:
        return int
    if type_oid == 16:
        return "t".__eq__
    if type_oid in _FLOAT_OIDS:
        return _float
    if type_oid in _JSON_OIDS:
        return json.loads
    return None


def pg_time(us: int) -> datetime:
    return PG_EPOCH + timedelta(microseconds=us)


@dataclass(slots=True)
class Relation:
    oid: int
    schema: str
    name: str
    replica_identity: str  # 'd' default (primary key), 'n' nothing, 'f' full, 'i' index
    columns: list[str]
    type_oids: list[int]
    key_columns: list[str]
    converters: list = None  # per column: None (keep text) or a function text -> value

    def __post_init__(self):
        self.converters = [converter(o) for o in self.type_oids]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(slots=True)
class Begin:
    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(slots=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(slots=True)
class RowMessage:
    """Insert, Update or Delete. `new` / `old` are column->value dicts (old: key or full row)."""

    op: str  # 'insert' | 'update' | 'delete'
    relation: Relation
    new: dict | None
    old: dict | None
    xid: int | None  # set inside a streamed transaction (the subtransaction's xid)


@dataclass(slots=True)
class Truncate:
    relations: list[Relation]
    cascade: bool
    restart_identity: bool
    xid: int | None


@dataclass(slots=True)
class TypeMsg:
    oid: int
    schema: str
    name: str


@dataclass(slots=True)
class Origin:
    lsn: int
    name: str


@dataclass(slots=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes
    xid: int | None


@dataclass(slots=True)
class StreamStart:
    xid: int
    first: bool


@dataclass(slots=True)
class StreamStop:
    pass


@dataclass(slots=True)
class StreamCommit:
    xid: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(slots=True)
class StreamAbort:
    xid: int
    subxid: int


_u8 = struct.Struct("!B").unpack_from
_i16 = struct.Struct("!h").unpack_from
_i32 = struct.Struct("!i").unpack_from
_u32 = struct.Struct("!I").unpack_from
_u64 = struct.Struct("!Q").unpack_from
_i64 = struct.Struct("!q").unpack_from


class Decoder:
    """Stateful pgoutput decoder: one instance per replication connection."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}
        self.in_stream = False
        self.unchanged: list[str] = []  # columns the last new tuple left out as unchanged TOAST

    # -- primitives ------------------------------------------------------------------------------
    @staticmethod
    def _string(buf: bytes, pos: int) -> tuple[str, int]:
        end = buf.index(b"\x00", pos)
        return buf[pos:end].decode("utf-8"), end + 1

    def _tuple(self, buf: bytes, pos: int, rel: Relation) -> tuple[dict, int]:
        (ncols,) = _i16(buf, pos)
        pos += 2
        names, convs = rel.columns, rel.converters
        unchanged = self.unchanged = []
        if ncols > len(names):
            raise DecodeError(
                f"tuple for {rel.qualified} has {ncols} columns but its Relation message named {len(names)}"
            )
        row = {}
        for i in range(ncols):
            kind = buf[pos]
            pos += 1
            if kind == 0x74:  # 't' text
                (n,) = _i32(buf, pos)
                pos += 4
                text = buf[pos:pos + n].decode("utf-8")
                conv = convs[i]
                row[names[i]] = text if conv is None else conv(text)
                pos += n
            elif kind == 0x6E:  # 'n' null
                row[names[i]] = None
            elif kind == 0x75:  # 'u' unchanged TOASTed value: not sent, the row store has it
                unchanged.append(names[i])
            elif kind == 0x62:  # 'b' binary: only sent when asked for with binary=true, which we never do
                raise DecodeError(f"binary column value for {rel.qualified}.{names[i]}; pgfresh asks for text")
            else:
                raise DecodeError(f"unknown tuple column kind {kind!r} for {rel.qualified}.{names[i]}")
        return row, pos

    def _rel(self, relid: int) -> Relation:
        try:
            return self.relations[relid]
        except KeyError:
            raise DecodeError(f"change for relation oid {relid} before its Relation message") from None

    # -- messages --------------------------------------------------------------------------------
    def decode(self, buf: bytes, lsn: int = 0):
        """Decode one pgoutput message. Raises DecodeError (with LSN and bytes) on anything unknown."""
        try:
            return self._decode(buf)
        except DecodeError as exc:
            raise DecodeError(f"{exc} at LSN {format_lsn(lsn)}; message bytes: {bytes(buf[:64]).hex()}") from None
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(
                f"malformed pgoutput message ({exc}) at LSN {format_lsn(lsn)}; bytes: {bytes(buf[:64]).hex()}"
            ) from None

    def _xid(self, buf: bytes, pos: int) -> tuple[int | None, int]:
        if self.in_stream:
            return _u32(buf, pos)[0], pos + 4
        return None, pos

    def _decode(self, buf: bytes):
        tag = buf[0]
        if tag == 0x49:  # 'I' insert
            xid, pos = self._xid(buf, 1)
            rel = self._rel(_u32(buf, pos)[0])
            new, _ = self._tuple(buf, pos + 5, rel)  # skip relid and 'N'
            return RowMessage("insert", rel, new, None, xid)
        if tag == 0x55:  # 'U' update
            xid, pos = self._xid(buf, 1)
            rel = self._rel(_u32(buf, pos)[0])
            pos += 4
            old = None
            if buf[pos] in (0x4B, 0x4F):  # 'K' key / 'O' old full row
                old, pos = self._tuple(buf, pos + 1, rel)
            if buf[pos] != 0x4E:
                raise DecodeError(f"update for {rel.qualified} without new tuple")
            new, _ = self._tuple(buf, pos + 1, rel)
            return RowMessage("update", rel, new, old, xid)
        if tag == 0x44:  # 'D' delete
            xid, pos = self._xid(buf, 1)
            rel = self._rel(_u32(buf, pos)[0])
            old, _ = self._tuple(buf, pos + 5, rel)
            return RowMessage("delete", rel, None, old, xid)
        if tag == 0x42:  # 'B' begin
            return Begin(_u64(buf, 1)[0], pg_time(_i64(buf, 9)[0]), _u32(buf, 17)[0])
        if tag == 0x43:  # 'C' commit
            return Commit(_u64(buf, 2)[0], _u64(buf, 10)[0], pg_time(_i64(buf, 18)[0]))
        if tag == 0x52:  # 'R' relation
            xid, pos = self._xid(buf, 1)
            (relid,) = _u32(buf, pos)
            schema, pos = self._string(buf, pos + 4)
            name, pos = self._string(buf, pos)
            ident = chr(buf[pos])
            (ncols,) = _i16(buf, pos + 1)
            pos += 3
            cols, oids, keys = [], [], []
            for _ in range(ncols):
                flags = buf[pos]
                col, pos = self._string(buf, pos + 1)
                (oid,) = _u32(buf, pos)
                pos += 8  # type oid + typmod
                cols.append(col)
                oids.append(oid)
                if flags & 1:
                    keys.append(col)
            rel = Relation(relid, schema, name, ident, cols, oids, keys)
            self.relations[relid] = rel
            return rel
        if tag == 0x54:  # 'T' truncate
            xid, pos = self._xid(buf, 1)
            (n,) = _u32(buf, pos)
            opts = buf[pos + 4]
            pos += 5
            rels = [self._rel(_u32(buf, pos + 4 * i)[0]) for i in range(n)]
            return Truncate(rels, bool(opts & 1), bool(opts & 2), xid)
        if tag == 0x59:  # 'Y' type
            xid, pos = self._xid(buf, 1)
            (oid,) = _u32(buf, pos)
            schema, pos = self._string(buf, pos + 4)
            name, _ = self._string(buf, pos)
            return TypeMsg(oid, schema, name)
        if tag == 0x4F:  # 'O' origin
            name, _ = self._string(buf, 9)
            return Origin(_u64(buf, 1)[0], name)
        if tag == 0x4D:  # 'M' logical decoding message
            xid, pos = self._xid(buf, 1)
            flags = buf[pos]
            (mlsn,) = _u64(buf, pos + 1)
            prefix, pos = self._string(buf, pos + 9)
            (n,) = _i32(buf, pos)
            return LogicalMessage(bool(flags & 1), mlsn, prefix, bytes(buf[pos + 4:pos + 4 + n]), xid)
        if tag == 0x53:  # 'S' stream start
            self.in_stream = True
            return StreamStart(_u32(buf, 1)[0], buf[5] == 1)
        if tag == 0x45:  # 'E' stream stop
            self.in_stream = False
            return StreamStop()
        if tag == 0x63:  # 'c' stream commit
            return StreamCommit(_u32(buf, 1)[0], _u64(buf, 6)[0], _u64(buf, 14)[0], pg_time(_i64(buf, 22)[0]))
        if tag == 0x41:  # 'A' stream abort
            return StreamAbort(_u32(buf, 1)[0], _u32(buf, 5)[0])
        raise DecodeError(f"unknown pgoutput message type {chr(tag)!r}")


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)
