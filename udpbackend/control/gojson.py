"""Go's encoding/json as far as flannel's datastore inputs need it (case-insensitive
keys, last duplicate wins, Go type errors) and the one-line rendering of bad values.
Must not: know which document it decodes; every problem becomes one ConfigError.
"""

from __future__ import annotations

import json
import logging
from ipaddress import IPv4Address, IPv6Address

from ..errors import ConfigError

log = logging.getLogger(__name__)

UINT64 = (0, 2**64 - 1)
INT64 = (-(2**63), 2**63 - 1)


# ---------------------------------------------------------------------------------------------
# Go encoding/json, as far as flannel's inputs need it: object keys match field names
# case-insensitively (the last duplicate wins), unknown keys are ignored, a type mismatch is
# an error, null leaves plain fields alone.  Everything wrong becomes one ConfigError line.
# ---------------------------------------------------------------------------------------------


class _JsonObject:
    """A decoded JSON object that keeps its key order and duplicates (Go's last-wins)."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        self.pairs = pairs

    def fields(self) -> dict[str, object]:
        """Folded key -> value; a later duplicate (in any case) overrides an earlier one."""
        return {_fold(k): v for k, v in self.pairs}


def _fold(key: str) -> str:
    # Go matches with bytes.EqualFold (simple Unicode folding): the Kelvin sign folds to "k"
    # under lower(), the long s does not, so it is mapped by hand.
    return key.lower().replace("\u017f", "s")


def _reject_constant(name: str) -> object:
    raise ValueError(f"invalid literal {name}")  # NaN/Infinity: Python accepts them, Go not


def _decode_json(raw: bytes | str, what: str) -> object:
    if isinstance(raw, bytes | bytearray | memoryview):
        # Go replaces invalid UTF-8 inside strings with U+FFFD; outside strings it is a
        # syntax error either way.
        text = bytes(raw).decode("utf-8", errors="replace")
    elif isinstance(raw, str):
        text = raw
    else:
        raise ConfigError(f"{what}: expected JSON text, got {type(raw).__name__}")
    try:
        return json.loads(text, object_pairs_hook=_JsonObject, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digits limit, nesting
        raise ConfigError(f"{what}: invalid JSON: {_one_line(str(exc))}") from None


def _plain(value: object) -> object:
    """A decoded JSON value with _JsonObject turned into dict (for LeaseAttrs.extra)."""
    if isinstance(value, _JsonObject):
        return {k: _plain(v) for k, v in value.pairs}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _show(value: object) -> str:
    """A user-supplied value for an error message: quoted, escaped, one line, bounded."""
    if isinstance(value, str):
        return repr(value[:64]) + ("…" if len(value) > 64 else "")
    return _one_line(repr(value), 80)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number " + _one_line(repr(value), 40)
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_error(value: object, where: str, go_type: str) -> ConfigError:
    return ConfigError(f"json: cannot unmarshal {_kind(value)} into {where} of type {go_type}")


def _parse_ipv4_text(text: str) -> IPv4Address | None:
    """Go's net.ParseIP(s).To4(): dotted quad, or an IPv4-mapped IPv6 form; else None."""
    if "%" in text:  # a zone: Python's IPv6Address takes one, Go's ParseIP does not
        return None
    try:
        return IPv4Address(text)
    except ValueError:
        pass
    try:
        return IPv6Address(text).ipv4_mapped
    except ValueError:
        return None


def _split_cidr(text: str) -> tuple[str, int] | None:
    addr, sep, plen = text.partition("/")
    if not sep or not (plen.isascii() and plen.isdigit()) or len(plen) > 4:
        return None
    return addr, int(plen)


def _go_ipv4(fields: dict[str, object], name: str) -> IPv4Address | None:
    """An ip.IP4 field: absent -> None; anything but an IPv4 string (null too) -> error."""
    if name.lower() not in fields:
        return None
    value = fields[name.lower()]
    ip = _parse_ipv4_text(value) if isinstance(value, str) else None
    if ip is None:
        raise ConfigError(f"{name}: {_show(value)} is not an IPv4 address")
    return ip


def _go_ipv6(fields: dict[str, object], name: str) -> IPv6Address | None:
    """A *ip.IP6 field: absent or null -> None; else must be an IPv6 address string."""
    value = fields.get(name.lower())
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return IPv6Address(value)
        except ValueError:
            pass
    raise ConfigError(f"{name}: {_show(value)} is not an IPv6 address")


def _go_bool(fields: dict[str, object], name: str, default: bool) -> bool:
    value = fields.get(name.lower())
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(value, f"Go struct field Config.{name}", "bool")
    return value


def _go_int(
    fields: dict[str, object], name: str, default: int, where: str, go_type: str, lo: int, hi: int
) -> int:
    value = fields.get(name.lower())
    if value is None:
        return default
    if type(value) is not int or not lo <= value <= hi:
        raise _type_error(value, where, go_type)
    return value
