"""Strict, bounded JSON: what the API parses from request bodies and from JSON held in form fields.

Python's parser recurses once per nesting level (a body or a ``loras`` string nested a thousand deep
raises ``RecursionError``) and turns a few bytes of syntax into a Python object each (``[{},{},...]``
costs about 60 bytes of memory per 3 bytes of body). So the shape of the text is bounded before it is
parsed: at most :data:`MAX_DEPTH` levels of nesting and :data:`MAX_ITEMS` arrays, objects and items.
Counting is done on the bytes (C loops), with an exact scan, which skips strings, only when a rough count
is over a bound; neither recurses.

Then the text is parsed strictly: duplicate keys (which ``json`` resolves silently, last one wins),
``NaN``/``Infinity`` (not JSON at all), bytes that are not UTF-8 and integers too long to convert are
refused.
"""

from __future__ import annotations

import codecs
import json
import re
import secrets
from typing import Any

MAX_DEPTH = 32
"""Most levels of nesting (arrays and objects) in a request body or a JSON-valued field."""
MAX_ITEMS = 10_000
"""Most arrays, objects and items (counted as opening brackets plus separating commas) in one JSON text:
the Python objects a parse creates stay under a few MiB whatever the body's size."""

_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]')
"""Strings (skipped as one token each, escapes included) and the structural characters."""
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")


class JsonRefused(ValueError):
    """The text is not strict JSON (``code`` ``invalid_json``) or is over a bound (``json_too_complex``);
    ``param`` names the top-level field at fault, when there is one."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_json") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def _key_name(token: bytes) -> str | None:
    try:
        key = json.loads(token)
    except ValueError:
        return None
    return key[:40] if isinstance(key, str) else None


def check_shape(data: bytes | bytearray, what: str = "the request body") -> None:
    """Raise :class:`JsonRefused` when ``data`` nests deeper than :data:`MAX_DEPTH` or holds more than
    :data:`MAX_ITEMS` arrays, objects and items. Bytes inside strings do not count. Linear in the
    size, without recursion; malformed text is left for the parser to describe."""
    opens = data.count(b"[") + data.count(b"{")
    rough_items = opens + data.count(b",")  # brackets and commas inside strings counted too: an upper bound
    if opens <= MAX_DEPTH and rough_items <= MAX_ITEMS:
        return
    depth = items = 0
    key: str | None = None  # the top-level object's key whose value the scan is in
    top_object = expect_key = False
    for tokens, match in enumerate(_TOKENS.finditer(data), 1):
        char = data[match.start()]
        if char == 0x22:  # '"': a string, perhaps a key of the top-level object
            if depth == 1 and expect_key:
                key = _key_name(match.group())
            expect_key = False
        elif char in _OPEN:
            depth += 1
            items += 1
            if depth == 1:
                top_object = expect_key = char == 0x7B
            if depth > MAX_DEPTH:
                raise JsonRefused(f"{what} is nested more than {MAX_DEPTH} levels deep", key, "json_too_complex")
        elif char in _CLOSE:
            depth -= 1
        elif char == 0x2C:  # ','
            items += 1
            expect_key = depth == 1 and top_object
        if items > MAX_ITEMS or tokens > 4 * MAX_ITEMS:  # tokens: runs of strings with no separator between
            raise JsonRefused(f"{what} holds more than {MAX_ITEMS} JSON values (arrays, objects and items)",
                              key if depth > 1 else None, "json_too_complex")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise JsonRefused(f"duplicate key {key[:40]!r}", key[:40])
        obj[key] = value
    return obj


def _no_constants(name: str) -> Any:
    raise JsonRefused(f"{name} is not a JSON value (send a finite number)")


def loads_strict(data: bytes | bytearray) -> Any:
    """Parse a request body: UTF-8 only, bounded shape, strict values. Raises :class:`JsonRefused` whose
    message starts "the request body is not valid JSON" or names the bound.

    Long strings (data URLs) are lifted out first (:func:`_lift_long_strings`), so that no single step
    holds the interpreter for long, whatever the body's size: the parser then reads a small skeleton."""
    prefix = "the request body is not valid JSON: "
    if b"\x00" in data:  # never in JSON text; every other byte of ASCII text in UTF-16 or UTF-32
        raise JsonRefused(prefix + "it is not UTF-8 text (UTF-16 or UTF-32?)")
    skeleton, lifted, marker = _lift_long_strings(data) if len(data) > LIFT_BYTES else (data, [], "")
    check_shape(skeleton)
    try:
        # Decoded here, strictly: json.loads(bytes) would also take UTF-16 and UTF-32 bodies.
        text = skeleton.decode("utf-8")
        strings = [_decode_string(data, start, end) for start, end in lifted]
    except UnicodeDecodeError:
        raise JsonRefused(prefix + "it is not UTF-8 text") from None
    except ValueError:
        raise JsonRefused(prefix + "a string holds a control character (escape it)") from None
    del skeleton
    parsed = _loads(text, prefix)
    return _restore(parsed, marker, strings) if strings else parsed


LIFT_BYTES = 64 * 1024
"""Strings longer than this are taken out of a body before it is parsed (see :func:`_lift_long_strings`)."""
_MAX_ESCAPES = 64
"""Escapes a long string may hold and still be lifted (base64 has none; an encoder escaping "/" has many)."""
_DECODE_CHUNK = 4 * 1024 * 1024
_CONTROL = re.compile(rb"[\x00-\x1f]")


def _lift_long_strings(data: bytes | bytearray) -> tuple[bytes | bytearray, list[tuple[int, int]], str]:
    """(skeleton, lifted spans, marker): the body with each long string value replaced by a short
    placeholder (``marker`` and the span's index), and where those strings' bytes are in ``data``.

    Python's parser reads a string in one C call that holds the interpreter lock (a 64 MB data URL: a
    good part of a second, during which no other thread, the event loop included, runs). Found here with
    ``bytes.find`` (memchr) instead, a string costs a few milliseconds, and is decoded in 4 MiB steps
    afterwards. Only values are lifted (keys stay, so duplicates are still found), only strings with
    few escapes, and at most one per :data:`MAX_ITEMS` strings are looked at; anything else is left to
    the parser as it is."""
    marker = "\x00" + secrets.token_hex(8) + ":"  # NUL: never in a body (refused before), so never a client's
    pieces: list[bytes | bytearray] = []
    lifted: list[tuple[int, int]] = []
    copied = position = 0
    for _ in range(2 * MAX_ITEMS + 2):
        start = data.find(b'"', position)
        if start < 0:
            break
        # The end of the string: the next quote not escaped (an escape is a backslash and one character).
        cursor, end, escapes = start + 1, data.find(b'"', start + 1), 0
        while end >= 0 and escapes <= _MAX_ESCAPES:
            backslash = data.find(b"\\", cursor, end)
            if backslash < 0:
                break
            escapes += 1
            cursor = backslash + 2
            if cursor > end:  # that quote was escaped
                end = data.find(b'"', cursor)
        if end < 0 or escapes > _MAX_ESCAPES:
            break  # unterminated (the parser says so) or heavily escaped: the rest is parsed as it is
        position = end + 1
        follower = bytes(data[position:position + 64]).lstrip(b" \t\r\n")[:1]
        if end - start - 1 > LIFT_BYTES and not escapes and follower in (b",", b"}", b"]"):
            pieces += [data[copied:start], json.dumps(f"{marker}{len(lifted)}").encode()]
            lifted.append((start + 1, end))
            copied = position
    if not lifted:
        return data, [], marker
    pieces.append(data[copied:])
    return b"".join(pieces), lifted, marker


def _decode_string(data: bytes | bytearray, start: int, end: int) -> str:
    """``data[start:end]``, a string's UTF-8 bytes without escapes, as text: 4 MiB at a time (each step holds
    the interpreter lock briefly); ValueError for a raw control character, which JSON does not allow."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts = []
    with memoryview(data) as view:
        for offset in range(start, end, _DECODE_CHUNK):
            chunk = view[offset:min(end, offset + _DECODE_CHUNK)]
            if _CONTROL.search(chunk):
                raise ValueError("control character")
            parts.append(decoder.decode(chunk, final=offset + _DECODE_CHUNK >= end))
    return "".join(parts)


def _restore(value: Any, marker: str, strings: list[str]) -> Any:
    """Put the lifted strings back where their placeholders are (values only; bounded by MAX_ITEMS)."""
    if isinstance(value, str):
        return strings[int(value[len(marker):])] if value.startswith(marker) else value
    if isinstance(value, dict):
        return {key: _restore(item, marker, strings) for key, item in value.items()}
    if isinstance(value, list):
        return [_restore(item, marker, strings) for item in value]
    return value


def loads_field(text: str, field: str) -> Any:
    """Parse JSON held in a text field (``loras`` in a form): the same bounds and strictness. Raises
    :class:`JsonRefused` whose message and param name ``field``."""
    check_shape(text.encode("utf-8", "surrogatepass"), field)
    try:
        return _loads(text, "")
    except JsonRefused as exc:
        raise JsonRefused(exc.message, field, exc.code) from None


def _loads(text: str, prefix: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except JsonRefused as exc:
        raise JsonRefused(prefix + exc.message, exc.param, exc.code) from None
    except json.JSONDecodeError as exc:
        raise JsonRefused(f"{prefix}{exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:  # the shape check makes this unreachable; kept as a last line
        raise JsonRefused(f"{prefix}nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise JsonRefused(f"{prefix}{str(exc)[:120]}") from None
