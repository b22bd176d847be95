"""The JSON schema of results.json (JSON Schema 2020-12) and a validator for the subset it uses.

Lives here: SCHEMA_ID, SCHEMA (machine, versions, settings, figures, per rung its figures,
ratios, counters, retried runs and raw runs) and validate(), which agrees with jsonschema on it.
Must not: build documents (ladder.py does) or depend on jsonschema at run time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .counters import PHASE_FIELDS, PHASES
from .figures import FIGURE_KEYS

SCHEMA_ID = "udpbackend-bench/1"

_NUM_OR_NULL: dict[str, Any] = {"type": ["number", "null"]}
_PROBE: dict[str, Any] = {
    "type": "object",
    "required": ["offered_pps", "sent_pps", "received_pps", "loss"],
    "properties": {
        "offered_pps": _NUM_OR_NULL,  # null: unlimited (iperf3 -b 0)
        "sent_pps": {"type": "number", "minimum": 0},
        "received_pps": {"type": "number", "minimum": 0},
        "loss": {"type": "number", "minimum": 0},
        "settle_s": {"type": "number", "minimum": 0},  # waited for a quiet path first
    },
}
_UDP_SEARCH: dict[str, Any] = {
    "type": "object",
    "required": ["size", "pps", "loss", "sender_bound", "probes"],
    "properties": {
        "size": {"type": "integer", "minimum": 1},
        "pps": _NUM_OR_NULL,  # null: no probe stayed within LOSS_MAX
        "loss": _NUM_OR_NULL,
        "sender_bound": {"type": "boolean"},  # the unlimited sender passed: a lower bound
        "probes": {"type": "array", "items": _PROBE, "minItems": 1},
    },
}
_TCP: dict[str, Any] = {
    "type": "object",
    "required": ["bits_per_second", "retransmits", "bytes", "seconds"],
    "properties": {
        "bits_per_second": {"type": "number", "minimum": 0},
        "sent_bits_per_second": {"type": "number", "minimum": 0},
        "retransmits": {"type": "integer", "minimum": 0},
        "bytes": {"type": "integer", "minimum": 0},
        "seconds": {"type": "number", "minimum": 0},
        "streams": {"type": "integer", "minimum": 1},
    },
}
_PING: dict[str, Any] = {
    "type": "object",
    "required": ["sent", "received", "p50_ms", "p99_ms"],
    "properties": {
        "sent": {"type": "integer", "minimum": 0},
        "received": {"type": "integer", "minimum": 0},
        "p50_ms": _NUM_OR_NULL,
        "p99_ms": _NUM_OR_NULL,
        "avg_ms": _NUM_OR_NULL,
        "min_ms": _NUM_OR_NULL,
        "max_ms": _NUM_OR_NULL,
    },
}
_PHASE: dict[str, Any] = {
    "type": "object",
    "required": list(PHASE_FIELDS),
    "properties": {
        **{k: _NUM_OR_NULL for k in PHASE_FIELDS if k != "drops"},
        "drops": {"type": "object", "additionalProperties": {"type": "number"}},
        "syscalls": {"type": "object", "additionalProperties": {"type": "number"}},
    },
}
# An iperf3 run whose test never started (a set-up failure of the tool, not a measurement),
# run again once the path had drained; the figures come from the run that did start.
RETRY: dict[str, Any] = {
    "type": "object",
    "required": ["step", "run", "attempt", "reason", "drain", "drain_s"],
    "properties": {
        "step": {"enum": ["tcp1", "tcp4", "udp64", "udp1400"]},
        "run": {"type": "integer", "minimum": 1},
        "offered_pps": _NUM_OR_NULL,  # UDP: the probe's offered rate (null: unlimited)
        "attempt": {"type": "integer", "minimum": 1},  # 1: the first run failed
        "reason": {"type": "string"},  # iperf3's error
        "drain": {"enum": ["counters", "ping"]},  # daemons' counters at rest, or a settle
        "drain_s": {"type": "number", "minimum": 0},
    },
}
RUN: dict[str, Any] = {
    "type": "object",
    "required": ["tcp1", "tcp4", "ping_idle", "ping_loaded", "udp64", "udp1400", "cpu"],
    "properties": {
        "tcp1": _TCP,
        "tcp4": _TCP,
        "ping_idle": _PING,
        "ping_loaded": _PING,
        "udp64": _UDP_SEARCH,
        "udp1400": _UDP_SEARCH,
        "cpu": {
            "type": "object",
            "required": ["busy_s", "user_s", "system_s", "softirq_s", "bytes"],
            "properties": {
                "busy_s": {"type": "number", "minimum": 0},
                "user_s": {"type": "number", "minimum": 0},
                "system_s": {"type": "number", "minimum": 0},
                "softirq_s": {"type": "number", "minimum": 0},
                "daemon_s": _NUM_OR_NULL,
                "bytes": {"type": "integer", "minimum": 0},
            },
        },
        "counters": {
            "type": ["object", "null"],
            "required": ["tcp"],
            "properties": {"tcp": _PHASE, "idle": _PHASE},
        },
    },
}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "udpbackend bench results",
    "description": (
        "One invocation of `udpbackend bench`: the machine, the versions, the settings, and per "
        "rung the median figures, their ratios to kernel VXLAN measured in the same invocation "
        "(null when VXLAN was not run or a figure is missing), the daemon counters per traffic "
        "phase (median over runs), the iperf3 runs that never started and were run again "
        "(retries: a set-up failure of the tool, not a measurement) and every raw run."
    ),
    "type": "object",
    "required": [
        "schema",
        "date",
        "duration_s",
        "machine",
        "versions",
        "settings",
        "figures",
        "rungs",
        "explain",
    ],
    "properties": {
        "schema": {"enum": [SCHEMA_ID]},
        "date": {"type": "string"},
        "duration_s": {"type": "number", "minimum": 0},
        "machine": {
            "type": "object",
            "required": ["cores", "kernel", "cpu_model"],
            "properties": {
                "cores": {"type": "integer", "minimum": 1},
                "kernel": {"type": "string"},
                "cpu_model": {"type": "string"},
                "memory_gib": _NUM_OR_NULL,
                "arch": {"type": "string"},
            },
        },
        "versions": {
            "type": "object",
            "required": ["udpbackend", "python", "iperf3"],
            "additionalProperties": {"type": "string"},
        },
        "settings": {
            "type": "object",
            "required": [
                "quick",
                "runs",
                "tcp_seconds",
                "udp_seconds",
                "udp_probes",
                "udp_loss_max",
                "pings_idle",
                "ping_interval_s",
                "zerocopy",
                "underlay_mtu",
                "rungs",
            ],
            "properties": {
                "quick": {"type": "boolean"},
                "runs": {"type": "integer", "minimum": 1},
                "tcp_seconds": {"type": "integer", "minimum": 1},
                "udp_seconds": {"type": "integer", "minimum": 1},
                "udp_probes": {"type": "integer", "minimum": 1},
                "udp_loss_max": {"type": "number"},
                "udp_window": {"type": "string"},
                "pings_idle": {"type": "integer", "minimum": 1},
                "ping_interval_s": {"type": "number"},
                "zerocopy": {"type": "boolean"},
                "underlay_mtu": {"type": "integer"},
                "rungs": {"type": "array", "items": {"type": "string"}},
            },
        },
        "figures": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "label", "unit", "better"],
                "properties": {
                    "key": {"enum": list(FIGURE_KEYS)},
                    "label": {"type": "string"},
                    "unit": {"type": "string"},
                    "better": {"enum": ["higher", "lower"]},
                },
            },
        },
        "rungs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "name",
                    "label",
                    "kind",
                    "status",
                    "error",
                    "figures",
                    "ratios_vs_vxlan",
                    "counters",
                    "lower_bounds",
                    "runs",
                ],
                "properties": {
                    "name": {"type": "string"},
                    "label": {"type": "string"},
                    "kind": {"enum": ["kernel", "daemon"]},
                    "status": {"enum": ["ok", "error"]},
                    "error": {"type": ["string", "null"]},
                    "figures": {
                        "type": "object",
                        "required": list(FIGURE_KEYS),
                        "additionalProperties": False,
                        "properties": {k: _NUM_OR_NULL for k in FIGURE_KEYS},
                    },
                    "ratios_vs_vxlan": {
                        "type": "object",
                        "required": list(FIGURE_KEYS),
                        "additionalProperties": False,
                        "properties": {k: _NUM_OR_NULL for k in FIGURE_KEYS},
                    },
                    "counters": {
                        "type": ["object", "null"],
                        "properties": {p: _PHASE for p in PHASES},
                    },
                    "lower_bounds": {"type": "array", "items": {"enum": list(FIGURE_KEYS)}},
                    "retries": {"type": "array", "items": RETRY},
                    "runs": {"type": "array", "items": RUN},
                },
            },
        },
        "explain": {"type": "array", "items": {"type": "string"}},
        "notes": {"type": "array", "items": {"type": "string"}},
        "retries": {
            "type": "object",
            "required": ["count", "rungs", "reasons"],
            "properties": {
                "count": {"type": "integer", "minimum": 0},
                "rungs": {"type": "object", "additionalProperties": {"type": "integer"}},
                "reasons": {"type": "object", "additionalProperties": {"type": "integer"}},
            },
        },
    },
}

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "null": lambda v: v is None,
}


def validate(doc: Any, schema: dict[str, Any] = SCHEMA, path: str = "$") -> list[str]:
    """Problems of doc against the JSON-Schema subset SCHEMA uses (type, enum, required,
    properties, additionalProperties, items, minItems, minimum); [] means valid."""
    problems: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_TYPES[t](doc) for t in names):
            return [f"{path}: expected {'/'.join(names)}, got {type(doc).__name__}"]
    if "enum" in schema and doc not in schema["enum"]:
        problems.append(f"{path}: {doc!r} is not one of {schema['enum']}")
    if (
        "minimum" in schema
        and _TYPES["number"](doc)
        and not (isinstance(doc, float) and math.isnan(doc))
        and doc < schema["minimum"]
    ):
        problems.append(f"{path}: {doc} < minimum {schema['minimum']}")
    if isinstance(doc, dict):
        for key in schema.get("required", []):
            if key not in doc:
                problems.append(f"{path}: missing {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in doc.items():
            if key in props:
                problems += validate(value, props[key], f"{path}.{key}")
            elif extra is False:
                problems.append(f"{path}: unexpected {key!r}")
            elif isinstance(extra, dict):
                problems += validate(value, extra, f"{path}.{key}")
    if isinstance(doc, list):
        if len(doc) < schema.get("minItems", 0):
            problems.append(f"{path}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(doc):
                problems += validate(item, schema["items"], f"{path}[{i}]")
    return problems
