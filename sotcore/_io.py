"""File input/output for untrusted files (private).

* :func:`atomic_write` -- a file is replaced whole or not at all (temporary
  file in the same directory, fsync, rename, fsync of the directory; the
  temporary file is removed on any failure).
* :func:`read_json` -- JSON with a size limit, a nesting-depth limit, no
  duplicate keys, optional NaN/Infinity, and format/version checks.
* :func:`read_npz` -- a ``.npz`` archive whose members' declared sizes (zip
  headers and ``.npy`` headers) are checked against a limit, against what
  the compressed bytes can hold and against expected shapes *before*
  anything is allocated; never unpickles.

Every failure caused by the file's content raises
:class:`~sotcore.exceptions.InvalidInputError` naming the file (and the
member or field); a missing file raises ``FileNotFoundError``.
"""
import contextlib
import hashlib
import json
import math
import os
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .exceptions import InvalidInputError

__all__ = ["atomic_write", "read_bytes", "read_json", "read_npz", "npz_bytes", "json_bytes",
           "check_int", "check_float", "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_ARRAY_BYTES",
           "MAX_NPZ_MEMBERS"]

#: Largest JSON file read (bytes).  ASSUMPTION: 64 MiB is far above any
#: population or model description written here (10,000 devices with
#: 1,024-point tables are ~20 MiB).  Decoding costs at most ~8x the file
#: size (one Python float per 4-byte number), so <= ~512 MiB.
MAX_JSON_BYTES = 64 << 20
#: Deepest nesting of JSON arrays/objects accepted (ours use <= 6).
MAX_JSON_DEPTH = 64
#: Largest array (bytes) a ``.npz`` member may declare.  ASSUMPTION: 1 GiB
#: covers the weights of any network this package trains on one machine.
MAX_ARRAY_BYTES = 1 << 30
#: Most members a ``.npz`` archive may hold.
MAX_NPZ_MEMBERS = 4096
#: Deflate cannot expand more than ~1032:1; anything claiming more lies.
_MAX_DEFLATE_RATIO = 1100
_NPY_ALLOWED_KINDS = "biufU"


def _fail(source, msg):
    return InvalidInputError(f"{source}: {msg}")


# -- writing ----------------------------------------------------------------------------
def atomic_write(path, data):
    """Replace ``path`` by ``data`` (bytes) atomically and durably.

    The bytes go to a temporary file in the same directory, which is fsynced
    and renamed over ``path``; the directory is then fsynced so the rename
    survives a power cut.  On any failure (disk full, a signal) the
    temporary file is removed and ``path`` keeps its previous content.

    Returns
    -------
    Path
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(directory):
    """fsync a directory (makes renames and new names durable; no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def json_bytes(obj):
    """Strict JSON (no NaN/Infinity) as UTF-8 bytes."""
    return json.dumps(obj, allow_nan=False, sort_keys=True).encode("utf-8")


def npz_bytes(arrays):
    """An uncompressed ``.npz`` archive of ``arrays`` (a dict name -> array), as bytes."""
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# -- reading ----------------------------------------------------------------------------
def read_bytes(path, *, max_bytes, what="file"):
    """The bytes of ``path``, refusing files larger than ``max_bytes``."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            # In pieces: read(n) would allocate n bytes up front, whatever the file holds.
            parts, size = [], 0
            while size <= max_bytes:
                part = fh.read(min(1 << 20, max_bytes + 1 - size))
                if not part:
                    break
                parts.append(part)
                size += len(part)
            data = b"".join(parts)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise _fail(path, f"is a directory, not a {what}") from None
    except OSError as exc:
        raise _fail(path, f"cannot read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise _fail(path, f"{what} is larger than the limit of {max_bytes} bytes")
    return data


def _json_depth(obj, limit):
    """Nesting depth of decoded JSON, iteratively (never recurses), stopping past ``limit``."""
    stack, deepest = [(obj, 1)], 0
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                break
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def parse_json(data, source, *, allow_nan=False, max_depth=MAX_JSON_DEPTH):
    """Parse JSON bytes/str from an untrusted source (see :func:`read_json`)."""
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(source, "not a text (UTF-8 JSON) file") from None

    def constant(name):
        if not allow_nan:
            raise ValueError(f"{name} is not allowed")
        return float(name)

    def number(s):
        v = float(s)
        if not math.isfinite(v):
            raise ValueError(f"number {s[:20]} overflows")
        return v
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=constant,
                         parse_float=number)
    except json.JSONDecodeError as exc:
        raise _fail(source, f"not valid JSON ({exc.msg} at line {exc.lineno}, column "
                    f"{exc.colno}); the file may be truncated") from None
    except RecursionError:      # the C decoder guards its recursion itself
        raise _fail(source, f"JSON nested too deep (limit {max_depth})") from None
    except ValueError as exc:   # huge integers, duplicate keys, NaN
        raise _fail(source, f"invalid JSON ({exc})") from None
    if _json_depth(obj, max_depth) > max_depth:
        raise _fail(source, f"JSON nested too deep (limit {max_depth})")
    return obj


def read_json(path, *, fmt=None, version=None, what="file", max_bytes=MAX_JSON_BYTES,
              allow_nan=False):
    """Read an untrusted JSON file.

    Parameters
    ----------
    fmt : str or None
        Required value of the top-level ``"format"`` field.
    version : int or None
        Newest ``"version"`` this reader understands (must be an int >= 1).
    what : str
        What the file is, for messages ("population file").

    Returns
    -------
    object (a dict when ``fmt`` is given)
    """
    path = Path(path)
    d = parse_json(read_bytes(path, max_bytes=max_bytes, what=what), path, allow_nan=allow_nan)
    if fmt is not None:
        check_format(d, path, fmt, version, what)
    return d


def check_format(d, source, fmt, version, what="file"):
    """Check the ``format`` and ``version`` fields of a decoded file; return the version."""
    if not isinstance(d, dict):
        raise _fail(source, f"not a {what} (expected a JSON object, got {type(d).__name__})")
    if d.get("format") != fmt:
        raise _fail(source, f"not a {what} (format is {str(d.get('format'))[:40]!r}, "
                    f"expected {fmt!r})")
    v = d.get("version")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _fail(source, f"missing or invalid format version {str(v)[:20]!r}")
    if version is not None and v > version:
        raise _fail(source, f"format version {v} is newer than this sotcore reads "
                    f"(<= {version}); upgrade sotcore")
    return v


def check_int(v, source, field, low=None, high=None):
    """``v`` as an int (JSON integers only: no bool, no float, no string) in [low, high]."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise _fail(source, f"field {field!r} must be an integer, got {str(v)[:40]!r}")
    v = int(v)
    if (low is not None and v < low) or (high is not None and v > high):
        raise _fail(source, f"field {field!r} must be in [{low}, {high}], got {str(v)[:40]}")
    return v


def check_float(v, source, field, low=None, high=None, low_open=False, finite=True):
    """``v`` as a float (a JSON number) in the given range."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise _fail(source, f"field {field!r} must be a number, got {str(v)[:40]!r}")
    try:
        v = float(v)
    except OverflowError:
        raise _fail(source, f"field {field!r} is too large") from None
    if finite and not math.isfinite(v):
        raise _fail(source, f"field {field!r} must be finite, got {v}")
    if low is not None and (v <= low if low_open else v < low):
        raise _fail(source, f"field {field!r} must be {'>' if low_open else '>='} {low}, "
                    f"got {v}")
    if high is not None and v > high:
        raise _fail(source, f"field {field!r} must be <= {high}, got {v}")
    return v


def _npy_header(fh, source, name):
    """(shape, dtype, header length) of a ``.npy`` stream, without reading its data."""
    fmt = np.lib.format
    try:
        major, minor = fmt.read_magic(fh)
        if (major, minor) == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh, max_header_size=10000)
        elif major in (2, 3):
            shape, fortran, dtype = fmt.read_array_header_2_0(fh, max_header_size=10000)
        else:
            raise ValueError(f"unsupported .npy version {major}.{minor}")
    except (ValueError, SyntaxError, TypeError, KeyError, EOFError, OSError, MemoryError,
            RecursionError, zipfile.BadZipFile, zlib.error) as exc:
        raise _fail(source, f"member {name!r} is not a valid .npy array ({exc})") from None
    if dtype.hasobject or dtype.kind not in _NPY_ALLOWED_KINDS or dtype.fields is not None \
            or dtype.subdtype is not None:
        raise _fail(source, f"member {name!r} has dtype {dtype}, which is not allowed "
                    "(numeric or text arrays only; no objects/pickle)")
    if fortran and len(shape) > 1:
        raise _fail(source, f"member {name!r} is Fortran-ordered (not written by sotcore)")
    return tuple(int(s) for s in shape), dtype


def read_npz(path, *, expected=None, required=None, members=None, max_bytes=MAX_ARRAY_BYTES,
             what="file"):
    """Read the arrays of an untrusted ``.npz`` archive with bounded memory.

    Before any array is allocated, each member's declared uncompressed size
    (zip header) must be <= ``max_bytes`` and plausible for its compressed
    size, and its ``.npy`` header (shape x itemsize) must match that size
    and ``expected``.  Peak memory is the sum of the arrays returned (each
    <= ``max_bytes``) plus one member's bytes.

    Parameters
    ----------
    path : path-like, or bytes (the archive itself)
    expected : callable ``(name, shape, dtype) -> None`` or None
        Called with each member's declared header before its data are read;
        raises InvalidInputError to refuse it (e.g. a shape that does not
        match the layer sizes).
    required : iterable of str, optional
        Member names (without ``.npy``) that must be present.
    members : iterable of str, optional
        Read only these members (the others are checked for a valid name
        but not read).

    Returns
    -------
    dict name -> ndarray (read-write, native byte order)
    """
    import io
    if isinstance(path, (bytes, bytearray)):
        source, fobj = what, io.BytesIO(path)
    else:
        source = Path(path)
        try:
            fobj = open(source, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"{what} not found: {source}") from None
        except OSError as exc:
            raise _fail(source, f"cannot read ({exc.strerror or exc})") from None
    out = {}
    try:
        with fobj:
            try:
                zf = zipfile.ZipFile(fobj)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
                    struct.error) as exc:
                raise _fail(source, f"unreadable {what} (not an .npz archive: {exc}); "
                            f"truncated or not a {what}") from None
            with zf:
                infos = zf.infolist()
                if len(infos) > MAX_NPZ_MEMBERS:
                    raise _fail(source, f"archive has {len(infos)} members (limit "
                                f"{MAX_NPZ_MEMBERS})")
                names = [i.filename for i in infos]
                if len(set(names)) != len(names):
                    raise _fail(source, "archive has repeated member names")
                for info in sorted(infos, key=lambda i: i.filename[:-4]):
                    name = info.filename[:-4] if info.filename.endswith(".npy") else None
                    if name is None:
                        raise _fail(source, f"unexpected member {info.filename[:60]!r}")
                    if members is None or name in members:
                        out[name] = _read_member(zf, info, name, source, expected, max_bytes)
    except InvalidInputError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
            NotImplementedError, RuntimeError, zlib.error, struct.error) as exc:
        raise _fail(source, f"unreadable {what} (corrupt .npz archive, {type(exc).__name__}: "
                    f"{exc}); truncated or not a {what}") from None
    missing = sorted(set(required or ()) - set(out))
    if missing:
        raise _fail(source, f"missing array(s) {', '.join(missing[:5])}")
    return out


def _read_member(zf, info, name, source, expected, max_bytes):
    if info.flag_bits & 0x1:
        raise _fail(source, f"member {name!r} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _fail(source, f"member {name!r} uses an unsupported compression")
    size = info.file_size
    if size > max_bytes + 4096:
        raise _fail(source, f"member {name!r} declares {size} bytes (limit {max_bytes})")
    limit = info.compress_size * (1 if info.compress_type == zipfile.ZIP_STORED
                                  else _MAX_DEFLATE_RATIO) + 1024
    if size > limit:
        raise _fail(source, f"member {name!r} declares {size} bytes, more than its "
                    f"{info.compress_size} compressed bytes can hold")
    with zf.open(info) as fh:
        shape, dtype = _npy_header(fh, source, name)
        header_len = fh.tell()
        nbytes = math.prod(shape) * dtype.itemsize    # Python ints: no overflow
        if nbytes > max_bytes:
            raise _fail(source, f"member {name!r} declares shape {shape} ({nbytes} bytes, "
                        f"limit {max_bytes})")
        if header_len + nbytes != size:
            raise _fail(source, f"member {name!r}: header shape {shape} needs {nbytes} bytes "
                        f"but the member holds {size - header_len}")
        if expected is not None:
            expected(name, shape, dtype)
        raw = fh.read(nbytes)
        if len(raw) != nbytes:
            raise _fail(source, f"member {name!r} is truncated")
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def array_digest(arrays):
    """SHA-256 (hex) over named arrays: names, shapes, dtypes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode() + b"\0" + str(tuple(int(s) for s in a.shape)).encode()
                 + a.dtype.str.encode())
        h.update(a.tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def exclusive_lock(lock_path, busy_message):
    """Hold an exclusive, non-blocking ``flock`` on ``lock_path`` while inside.

    Raises InvalidInputError(``busy_message``) if another process or thread holds
    it.  The lock dies with its process, so a killed run never leaves it stuck.
    """
    import fcntl
    fh = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InvalidInputError(busy_message) from None
        yield
    finally:
        fh.close()
