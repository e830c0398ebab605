"""A zip archive's central directory, read in one pass with no object per entry.

Python's `zipfile` makes a `ZipInfo` (date, extra fields, a dozen attributes) for every entry
before anything can be read: a torch file of 50,000 small tensors has 50,000 entries. This reader
keeps, per entry, only what locating and reading it needs, and makes the checks `zipfile` makes
(end record found, zip64 records honoured, central directory inside the archive, every record's
magic number, extra fields well formed) plus those torch's reader relies on (no name twice, local
headers where the directory says). Every failure is one `FormatError` line.

Where Python's zipfile and torch's reader (miniz) would read different entries from one file, the
archive is refused rather than read one way: torch looks names up ignoring ASCII case and compares
raw bytes (whatever the UTF-8 flag says), reads the directory at the offset the end record gives
(zipfile at the size before the end record), walks as many records as the end record counts
(zipfile as many as its size holds) and finds the zip64 record where the locator points (zipfile
just before the locator). So names are decoded as UTF-8 (torch's lookups are UTF-8 strings), two
names equal ignoring case are `twice`, and the end records must agree with each other.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import NamedTuple

from ..errors import FormatError

_EOCD = struct.Struct("<4s4H2LH")       # end of central directory: 22 bytes
_EOCD64_LOC = struct.Struct("<4sLQL")   # zip64 end-of-directory locator: 20 bytes, just before the end record
_EOCD64 = struct.Struct("<4sQ2H2L4Q")   # zip64 end of central directory: 56 bytes, just before the locator
# one central directory record (46 bytes), the fields read: signature, version needed, flags,
# method, CRC-32, compressed and uncompressed size, name, extra and comment lengths, local header offset
_CENTRAL = struct.Struct("<4s2xB1xHH4xLLLHHHH6xL")
_LOCAL = struct.Struct("<4s2B4HL2L2H")  # one local header: 30 bytes
_LOCAL_LENGTHS = struct.Struct("<4s22x2H")  # of a local header, what locating its data needs: magic, name and extra lengths
_MAX_COMMENT = 1 << 16
_MAX_EXTRACT_VERSION = 63  # as zipfile: newer features (and their version numbers) it cannot read
_U32 = 0xFFFF_FFFF
STORED, DEFLATED = 0, 8
_HEADER_SPAN = 16 << 20  # local headers this close together are read in one pread
# the central directory is read whole: a million tensors make about 110 MB of it; a lying end record
# must not make the reader allocate the size of a many-gigabyte file
MAX_CENTRAL_BYTES = 1 << 30


class Entry(NamedTuple):
    header_offset: int  # from the archive's start (after any bytes prepended to it)
    method: int
    flags: int
    crc: int
    compress_size: int
    file_size: int


MAX_NAME_BYTES = 512
_REFUSED_FLAGS = 0x1 | 0x40 | 0x2000  # encrypted, strongly encrypted, local header masked


def _check_record(src: str, raw: bytes, flags: int, method: int, csize: int, size: int, disk: int, offset: int,
                  length: int) -> None:
    """What torch's zip reader (miniz) checks of every central directory record when it opens an
    archive, whether or not the entry is ever read: a record it refuses makes torch refuse the
    file, so surgery refuses it too."""
    problem = ("is encrypted or masks its local header" if flags & _REFUSED_FLAGS else
               f"uses compression method {method}" if method not in (STORED, DEFLATED) else
               "is stored with a compressed size other than its size" if method == STORED and csize != size else
               "declares data but no compressed bytes" if size and not csize else
               "names another disk" if disk not in (0, 1) else
               "reaches past the end of the archive" if offset + 30 + csize > length else None)
    if problem:
        raise _corrupt(src, f"entry {raw[:60]!r} {problem}; torch refuses such an archive")


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _corrupt(src: str, why: str) -> FormatError:
    return FormatError(f"{src}: not a readable zip archive ({why}); the file may be truncated or corrupt")


class ZipIndex:
    """The entries of the zip archive at [base, base+length) of the open file ``fd``."""

    def __init__(self, fd: int, base: int, length: int, src: str):
        self.fd, self.base, self.length, self.src = fd, base, length, src
        start_dir, size_cd, count = self._end_record()
        self.names: list[str] = []
        self.entries: dict[str, Entry] = {}
        self.twice: list[str] = []
        self._folded: dict[bytes, str] = {}  # raw name, ASCII-lowercased (torch's lookup key) -> name
        self._directory(start_dir, size_cd, count)

    def find(self, name: str) -> str | None:
        """The entry torch's reader finds for ``name``: the same bytes ignoring ASCII case (miniz's
        lookup), or None. Unambiguous once `twice` is empty."""
        return self._folded.get(name.encode("utf-8", "surrogatepass").lower())

    def _pread(self, n: int, at: int) -> bytes:
        if at < 0 or at + n > self.length:
            raise _corrupt(self.src, "a record lies outside the archive")
        return os.pread(self.fd, n, self.base + at)

    def _end_record(self) -> tuple[int, int, int]:
        """Where the central directory starts, its size and entry count (zip64 records honoured);
        ``concat`` is how many bytes precede the archive (a self-extractor's stub)."""
        tail_len = min(self.length, _MAX_COMMENT + _EOCD.size)
        if tail_len < _EOCD.size:
            raise _corrupt(self.src, "too short for a zip")
        tail = self._pread(tail_len, self.length - tail_len)
        at = tail_len - _EOCD.size
        if not (tail[at:at + 4] == b"PK\x05\x06" and tail[-2:] == b"\0\0"):
            at = tail.rfind(b"PK\x05\x06")  # an archive comment follows the end record
            if at < 0 or at + _EOCD.size > tail_len:
                raise _corrupt(self.src, "no end of central directory record")
        _, disk, disk_cd, count_disk, count, size_cd, offset_cd, comment = _EOCD.unpack_from(tail, at)
        if at + _EOCD.size + comment != tail_len:
            # bytes after the declared comment may hold another end record: readers pick different ones
            raise _corrupt(self.src, "its end record's comment length does not reach the end of the file")
        eocd = self.length - tail_len + at
        concat = eocd - size_cd - offset_cd
        several = disk or disk_cd or count_disk != count  # (a zip64 record, if any, says instead)
        if eocd >= _EOCD64_LOC.size:
            loc = _EOCD64_LOC.unpack(self._pread(_EOCD64_LOC.size, eocd - _EOCD64_LOC.size))
            if loc[0] == b"PK\x06\x07":
                if loc[1] != 0 or loc[3] > 1:
                    raise _corrupt(self.src, "it spans several disks")
                at64 = eocd - _EOCD64_LOC.size - _EOCD64.size
                rec = _EOCD64.unpack(self._pread(_EOCD64.size, at64)) if at64 >= 0 else None
                if rec is None or rec[0] != b"PK\x06\x06" or rec[1] != _EOCD64.size - 12:
                    raise _corrupt(self.src, "its zip64 end record is missing or has a size zipfile does not read")
                several = rec[4] or rec[5] or rec[6] != rec[7]
                count, size_cd, offset_cd = rec[7], rec[8], rec[9]
                concat = at64 - size_cd - offset_cd
                # torch reads the zip64 record where the locator points, zipfile right before it (an
                # archive with bytes before it, concat, torch does not read at all: `torch_zip`)
                if concat == 0 and loc[2] != at64:
                    raise _corrupt(self.src, "its zip64 end record is not where its locator points")
        if several:
            raise _corrupt(self.src, "it spans several disks")
        # bytes before the archive (a self-extractor's stub), as zipfile counts them: the directory
        # ends where the end record (or zip64 end record) begins. torch counts none (`torch_zip`).
        self.concat = concat
        start_dir = offset_cd + concat
        if start_dir < 0 or size_cd > self.length or start_dir + size_cd > self.length:
            raise _corrupt(self.src, "bad offset for central directory")
        if size_cd > MAX_CENTRAL_BYTES:
            raise _corrupt(self.src, f"its central directory claims {size_cd} bytes, more than any checkpoint's "
                                     f"(limit {MAX_CENTRAL_BYTES})")
        return start_dir, size_cd, count

    def _directory(self, start_dir: int, size_cd: int, count: int) -> None:
        cd = self._pread(size_cd, start_dir)
        unpack, concat, length = _CENTRAL.unpack_from, self.concat, self.length
        raws: list[bytes] = []
        records: list[Entry] = []
        new, entry = tuple.__new__, Entry  # an Entry without its Python-level __new__: one per entry
        pos = 0
        try:
            while pos < size_cd:
                if pos + 46 > size_cd:
                    raise _corrupt(self.src, "truncated central directory")
                sig, version, flags, method, crc, csize, size, nlen, elen, clen, disk, offset = unpack(cd, pos)
                if sig != b"PK\x01\x02":
                    raise _corrupt(self.src, "bad magic number for central directory")
                if version > _MAX_EXTRACT_VERSION:
                    raise _corrupt(self.src, f"zip file version {version / 10:.1f}")
                end = pos + 46 + nlen
                if end + elen + clen > size_cd:
                    raise _corrupt(self.src, "truncated central directory")
                raw = cd[pos + 46:end]
                if b"\0" in raw or nlen >= MAX_NAME_BYTES:
                    # torch reads names as C strings in a buffer of 512 bytes: a NUL or a long name is cut short
                    raise _corrupt(self.src, f"entry name {raw[:60]!r} holds a NUL byte or is {MAX_NAME_BYTES} bytes "
                                             f"or longer; torch would read it cut short")
                raws.append(raw)
                if elen:
                    size, csize, offset = _zip64(cd[end:end + elen], size, csize, offset, self.src)
                if (flags & _REFUSED_FLAGS or method != STORED or csize != size or disk > 1
                        or offset + concat + 30 + csize > length):  # anything but a plain stored entry: worded there
                    _check_record(self.src, raw, flags, method, csize, size, disk, offset + concat, length)
                records.append(new(entry, (offset + concat, method, flags, crc, csize, size)))
                pos = end + elen + clen
            if len(raws) != count:
                # torch walks as many records as the end record counts, zipfile as many as fit its size
                raise _corrupt(self.src, f"its end record counts {count} entries, its central directory holds {len(raws)}")
        except FormatError:
            self._decoded(raws)  # a name read before the fault that is not UTF-8: named first, as it comes first
            raise
        self._index(raws, records)

    def _decoded(self, raws: list[bytes], joined: bytes | None = None) -> list[str]:
        """The names, decoded all at once: they hold no NUL byte (checked as they are read), so
        joined by NUL (``joined``, when the caller has it) they decode (or fail) as each would
        alone, and split back at NUL. The first name that is not UTF-8 is named."""
        try:  # torch compares raw bytes with UTF-8 strings, whatever the flag says
            return (b"\0".join(raws) if joined is None else joined).decode("utf-8").split("\0") if raws else []
        except UnicodeDecodeError:
            bad = next(raw for raw in raws if not _utf8(raw))
            raise _corrupt(self.src, f"entry name {bad[:60]!r} is not UTF-8") from None

    def _index(self, raws: list[bytes], records: list[Entry]) -> None:
        """Index the entries by name, and by name as torch looks them up (ASCII case ignored)."""
        joined = b"\0".join(raws)
        names = self._decoded(raws, joined)
        folded = joined.lower().split(b"\0") if raws else []
        self.names = names
        self._folded = dict(zip(folded, names))
        if len(self._folded) < len(names):  # names equal ignoring ASCII case: each one after the first
            seen: set[bytes] = set()
            self.twice = [name for f, name in zip(folded, names) if f in seen or seen.add(f)]
        self.entries = dict(zip(names, records))

    def data_offset(self, name: str) -> int:
        """Offset (from the archive's start) of a stored entry's first byte: after its local header."""
        e = self.entries[name]
        hdr = self._local(name, e)
        return e.header_offset + 30 + hdr[10] + hdr[11]

    def data_offsets(self, names: list[str], entries: list[Entry]) -> list[int]:
        """`data_offset` of each name (``entries``: their entries). Local headers are read a window
        of up to 16 MiB at a time in offset order (a file of 200,000 small tensors: a few preads,
        not 200,000); a header outside the archive goes through `data_offset`, which names the entry."""
        starts = [e.header_offset for e in entries]
        order = sorted(range(len(starts)), key=starts.__getitem__)  # torch writes them in order: a linear pass
        out = [0] * len(starts)
        unpack, length = _LOCAL_LENGTHS.unpack_from, self.length
        i = 0
        while i < len(order):
            lo = starts[order[i]]
            if lo < 0 or lo + 30 > length:
                out[order[i]] = self.data_offset(names[order[i]])  # raises, naming the entry
                i += 1
                continue
            last = min(lo + _HEADER_SPAN, length) - 30  # the last header start this window reads
            j = i + 1
            while j < len(order) and starts[order[j]] <= last:
                j += 1
            buf = self._pread(starts[order[j - 1]] + 30 - lo, lo)
            for k in order[i:j]:
                at = starts[k]
                sig, name_len, extra_len = unpack(buf, at - lo)
                if sig != b"PK\x03\x04":
                    raise FormatError(f"zip entry {names[k]!r} has a corrupt local header")
                out[k] = at + 30 + name_len + extra_len
            i = j
        return out

    def _local(self, name: str, e: Entry) -> tuple:
        if e.header_offset < 0:
            raise FormatError(f"zip entry {name!r} has a local header before the archive starts; the central "
                              f"directory is corrupt")
        raw = os.pread(self.fd, 30, self.base + e.header_offset) if e.header_offset + 30 <= self.length else b""
        if len(raw) != 30 or raw[:4] != b"PK\x03\x04":
            raise FormatError(f"zip entry {name!r} has a corrupt local header")
        return _LOCAL.unpack(raw)

    def read(self, name: str, max_ratio: int | None = None) -> bytes:
        """An entry's bytes (stored or deflated), checked against its sizes and CRC-32. The
        caller bounds the declared sizes first (`torch_zip._read_entry`); ``max_ratio`` bounds
        what the deflate stream itself inflates to, counted against the bytes it really uses."""
        e = self.entries[name]
        hdr = self._local(name, e)
        local_name = os.pread(self.fd, hdr[10], self.base + e.header_offset + 30) if hdr[10] else b""
        if local_name != name.encode("utf-8", "surrogatepass"):
            raise FormatError(f"zip entry {name!r} has another name in its local header")
        if e.flags & 0x20:
            raise FormatError(f"zip entry {name!r} holds compressed patched data, which torch cannot read either")
        start = e.header_offset + 30 + hdr[10] + hdr[11]
        if start + e.compress_size > self.length:
            raise FormatError(f"zip entry {name!r} runs past the end of the archive")
        raw = os.pread(self.fd, e.compress_size, self.base + start)
        if len(raw) != e.compress_size:
            raise FormatError(f"zip entry {name!r} is truncated")
        # `_check_record` admits only stored and deflated entries, none encrypted
        data = raw if e.method == STORED else _inflate(name, raw, e.file_size, max_ratio)
        if len(data) != e.file_size or zlib.crc32(data) != e.crc:
            raise FormatError(f"zip entry {name!r} does not match its declared size and CRC-32")
        return data


_STEP = 1 << 16  # deflated bytes fed at a time; each yields at most 16 steps of output


def _inflate(name: str, raw: bytes, size: int, max_ratio: int | None) -> bytes:
    """Inflate a raw deflate stream a step at a time: never more than ``size`` + 1 bytes out, and
    (with ``max_ratio``) never more than that many times the input the stream has consumed (plus
    1 MiB). A declared compressed size can pad a tiny bomb with junk after the stream's end; this
    counts the stream itself."""
    d = zlib.decompressobj(-15)
    out: list[bytes] = []
    produced = fed = 0
    pending = b""
    try:
        while not d.eof and produced <= size:
            if not pending:
                if fed >= len(raw):
                    break
                pending = raw[fed:fed + _STEP]
                fed += len(pending)
            piece = d.decompress(pending, min(16 * _STEP, size + 1 - produced))
            pending = d.unconsumed_tail
            out.append(piece)
            produced += len(piece)
            used = fed - len(pending) - len(d.unused_data)
            if max_ratio is not None and produced > max_ratio * used + (1 << 20):
                raise FormatError(f"zip entry {name!r} inflates {used} bytes of its deflate stream to more than "
                                  f"{produced}; refusing a zip bomb")
    except zlib.error as err:
        raise FormatError(f"zip entry {name!r} does not inflate ({err})") from None
    return b"".join(out)


def _zip64(extra: bytes, size: int, csize: int, offset: int, src: str) -> tuple[int, int, int]:
    """Sizes and offset, with those the zip64 extra field holds (as `zipfile` reads them); any
    extra field running past its block is corrupt."""
    pos, seen = 0, False
    while len(extra) - pos >= 4:
        tp, ln = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + ln > len(extra):
            raise _corrupt(src, f"corrupt extra field {tp:04x} (size={ln})")
        if tp == 0x0001:
            if seen:  # torch reads the first, zipfile every one in turn
                raise _corrupt(src, "an entry has two zip64 extra fields")
            seen = True
            data, at = extra[pos + 4:pos + 4 + ln], 0
            try:
                if size in (0xFFFF_FFFF_FFFF_FFFF, _U32):
                    size, = struct.unpack_from("<Q", data, at)
                    at += 8
                if csize == _U32:
                    csize, = struct.unpack_from("<Q", data, at)
                    at += 8
                if offset == _U32:
                    offset, = struct.unpack_from("<Q", data, at)
            except struct.error:
                raise _corrupt(src, "corrupt zip64 extra field") from None
        pos += 4 + ln
    return size, csize, offset


__all__ = ["ZipIndex", "Entry", "STORED", "DEFLATED"]
