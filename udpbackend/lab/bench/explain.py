"""The --explain text: paragraphs generated from this run's own figures and counters.

Walking the ladder: veth -> kernel VXLAN, kernel -> user space, then each daemon rung against
the one before it (which per-packet counters moved, and the mechanism that moved them), and
where the last rung stands against VXLAN. Must not: hold a canned number: all come from doc.
"""

from __future__ import annotations

from typing import Any

from .figures import ok_rung
from .report import fmt
from .rungs import RUNG_BY_NAME

# per-packet counters compared between two daemon rungs: (key, what, digits)
COMPARED = (
    ("syscalls_per_packet", "syscalls/packet", 2),
    ("daemon_cpu_us_per_packet", "us of daemon CPU/packet", 2),
    ("wakeups_per_packet", "wake-ups/packet", 3),
    ("mean_batch", "packets per pump round", 1),
    ("packets_per_send", "packets per send syscall", 1),
    ("packets_per_receive", "packets per receive syscall", 1),
    ("packets_per_tun_read", "packets per TUN read", 1),
    ("packets_per_tun_write", "packets per TUN write", 1),
)


def explain(doc: dict[str, Any]) -> list[str]:
    """Paragraphs generated from this run's own figures and counters, walking the ladder."""
    out: list[str] = []
    veth, vx = ok_rung(doc, "veth"), ok_rung(doc, "vxlan")
    if veth and vx:
        out.append(_veth_to_vxlan(veth, vx))
    daemon_ladder = [r for r in doc["rungs"] if r["kind"] == "daemon" and r["status"] == "ok"]
    daemon_ladder = [r for r in daemon_ladder if RUNG_BY_NAME[r["name"]].default]
    prev: dict[str, Any] | None = vx
    for r in daemon_ladder:
        if prev is vx or prev is None:
            out.append(_into_user_space(prev, r))
        else:
            out.append(_step(prev, r))
        prev = r
    if daemon_ladder and vx:
        out.append(_where_it_stands(daemon_ladder[-1], vx))
    base = ok_rung(doc, "flannel-proxy")
    for name in ("flannel-proxy", DEFAULT_RUNG):
        r = ok_rung(doc, name)
        if r and vx and _phase(r, "idle").get("packets"):
            out.append(_idle_round_trip(r, vx, base if name != "flannel-proxy" else None))
    return out


DEFAULT_RUNG = "multiqueue"  # the rung that runs udpbackend's default configuration


def _idle_round_trip(r: dict[str, Any], vx: dict[str, Any], base: dict[str, Any] | None) -> str:
    """Where an idle round trip's microseconds go, from the idle pings' own counters (four
    daemon packets per round trip: A out, B in, B out, A in), against VXLAN and, given
    `base` (flannel's proxy loop), against that."""
    c, f = _phase(r, "idle"), r["figures"]
    added = _diff_us(r, vx, "rtt_idle_p50_ms")
    text = (
        f"An idle round trip through {r['label']}: p50 {fmt(f['rtt_idle_p50_ms'], 3)} ms, "
        f"{'n/a' if added is None else f'{added:+.0f}'} us against kernel VXLAN, which "
        f"answers in softirq with no thread to wake. Per round trip the daemons woke "
        f"{fmt(_x4(c.get('wakeups_per_packet')), 1)} times, made "
        f"{fmt(_x4(c.get('syscalls_per_packet')), 1)} syscalls and used "
        f"{fmt(_x4(c.get('daemon_cpu_us_per_packet')), 0)} us of CPU (user time and the kernel "
        f"work inside those syscalls: a TUN write runs the receiving stack, a send the path "
        f"to the peer, work VXLAN does in softirq too)."
    )
    bc = _phase(base, "idle") if base else {}
    if base and bc.get("packets"):
        d_rtt = _diff_us(r, base, "rtt_idle_p50_ms")
        d_cpu = _delta4(c, bc, "daemon_cpu_us_per_packet")
        d_sys = _delta4(c, bc, "syscalls_per_packet")
        text += (
            f" Against flannel's proxy loop: "
            f"{'n/a' if d_rtt is None else f'{d_rtt:+.0f}'} us of RTT, "
            f"{'n/a' if d_cpu is None else f'{d_cpu:+.0f}'} us of daemon CPU and "
            f"{'n/a' if d_sys is None else f'{d_sys:+.1f}'} syscalls per round trip."
        )
    return text


def _delta4(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    x, y = a.get(key), b.get(key)
    return None if x is None or y is None else 4 * (x - y)


def _x4(x: float | None) -> float | None:
    return None if x is None else 4 * x


def _gb(r: dict[str, Any]) -> str:
    return f"{fmt(r['figures']['tcp1_gbps'], 2)} Gbit/s"


def _factor(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "n/a"
    return f"{a / b:.2f}x"


def _phase(r: dict[str, Any], phase: str) -> dict[str, Any]:
    """A rung's counters of one phase ("tcp", "udp64"); {} for a kernel rung."""
    return (r.get("counters") or {}).get(phase) or {}


def _diff_us(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    x, y = a["figures"].get(key), b["figures"].get(key)
    return None if x is None or y is None else (x - y) * 1000


def _veth_to_vxlan(veth: dict[str, Any], vx: dict[str, Any]) -> str:
    added = _diff_us(vx, veth, "rtt_idle_p50_ms")
    return (
        f"veth -> kernel VXLAN: encapsulating in the kernel keeps "
        f"{_factor(vx['figures']['tcp1_gbps'], veth['figures']['tcp1_gbps'])} of the ceiling's "
        f"TCP throughput ({_gb(veth)} -> {_gb(vx)}), changes idle RTT p50 by "
        f"{'n/a' if added is None else f'{added:+.0f}'} us and CPU per GB by "
        f"{_factor(vx['figures']['cpu_s_per_gb'], veth['figures']['cpu_s_per_gb'])}; no "
        f"packet leaves the kernel: 0 syscalls, 0 user/kernel copies, 0 wake-ups per packet."
    )


def _into_user_space(prev: dict[str, Any] | None, r: dict[str, Any]) -> str:
    """The first daemon rung, against kernel VXLAN (prev) or, without it, the kernel."""
    c, f = _phase(r, "tcp"), r["figures"]
    copies = c.get("user_kernel_copies_per_packet")
    return (
        f"{'kernel VXLAN' if prev else 'the kernel'} -> {r['label']}: every packet now "
        f"crosses user space twice (sender and receiver daemon): "
        f"{fmt(copies, 1)} user/kernel copies and {fmt(c.get('syscalls_per_packet'), 2)} "
        f"syscalls per packet (TCP), {fmt(c.get('daemon_cpu_us_per_packet'), 2)} us of "
        f"daemon CPU per packet, {fmt(c.get('wakeups_per_packet'), 3)} wake-ups per "
        f"packet; TCP {_gb(r)}"
        + (f", {_factor(f['tcp1_gbps'], prev['figures']['tcp1_gbps'])} of VXLAN" if prev else "")
        + "."
    )


def _step(prev: dict[str, Any], r: dict[str, Any]) -> str:
    """One daemon rung against the one before it: figures, moved counters, the mechanism."""
    pc, c = _phase(prev, "tcp"), _phase(r, "tcp")
    f = r["figures"]
    saved = []
    for key, what, digits in COMPARED:
        a, b = pc.get(key), c.get(key)
        if a is None or b is None or round(a, digits) == round(b, digits):
            continue
        saved.append(f"{what} {a:.{digits}f} -> {b:.{digits}f}")
    return (
        f"{prev['label']} -> {r['label']}: TCP {_gb(prev)} -> {_gb(r)} "
        f"({_factor(f['tcp1_gbps'], prev['figures']['tcp1_gbps'])}), UDP 64 B "
        f"{fmt(prev['figures']['udp64_kpps'], 0)} -> {fmt(f['udp64_kpps'], 0)} kpps. "
        + ("Per packet (TCP): " + "; ".join(saved) + ". " if saved else "")
        + _cause(prev, r)
    )


def _where_it_stands(best: dict[str, Any], vx: dict[str, Any]) -> str:
    bf, vf = best["figures"], vx["figures"]
    bc = _phase(best, "tcp")
    copies = bc.get("user_kernel_copies_per_packet")
    return (
        f"Where the last rung stands: {best['label']} moves "
        f"{_factor(bf['tcp1_gbps'], vf['tcp1_gbps'])} of kernel VXLAN's single-stream TCP "
        f"and {_factor(bf['udp64_kpps'], vf['udp64_kpps'])} of its 64 B packet rate, at "
        f"{_factor(bf['cpu_s_per_gb'], vf['cpu_s_per_gb'])} the CPU per GB; what is left is "
        f"the {fmt(copies, 1)} user/kernel copies per packet VXLAN never makes and the "
        f"{fmt(bc.get('syscalls_per_packet'), 2)} syscalls per packet that remain."
    )


# --- the mechanism of one step --------------------------------------------------------------


def _cause(prev: dict[str, Any], r: dict[str, Any]) -> str:
    """One sentence naming the mechanism of a step, from the counters that changed."""
    pc, c = _phase(prev, "tcp"), _phase(r, "tcp")
    if r["name"] == "multiqueue":
        return _queues(prev["figures"], r["figures"])
    if r["name"] == "multiqueue-rt":
        return _scheduling(prev["figures"], r["figures"])
    a_cpu, b_cpu = pc.get("daemon_cpu_us_per_packet"), c.get("daemon_cpu_us_per_packet")
    if prev["name"] == "python" and a_cpu is not None and b_cpu is not None:
        return (
            f"Same syscalls ({fmt(pc.get('syscalls_per_packet'), 2)} vs "
            f"{fmt(c.get('syscalls_per_packet'), 2)} per packet), so the "
            f"{a_cpu - b_cpu:.2f} us of daemon CPU saved per packet is the Python interpreter's "
            f"per-packet work (parsing, checksum, route lookup, bytes objects) moved into C."
        )
    if c.get("gso_sends") or c.get("gro_receives") or c.get("tso_reads"):
        return _offloads(c)
    a_sys, b_sys = pc.get("syscalls_per_packet"), c.get("syscalls_per_packet")
    if a_sys is not None and b_sys is not None and b_sys < a_sys:
        pu, u = _phase(prev, "udp64"), _phase(r, "udp64")
        return (
            f"Batching: one recvmmsg/sendmmsg moves {fmt(c.get('mean_batch'), 0)} packets per "
            f"round on average instead of one, saving {a_sys - b_sys:.2f} syscalls per packet; "
            f"at 64 B the mean batch is {fmt(u.get('mean_batch'), 1)} (was "
            f"{fmt(pu.get('mean_batch'), 1)})."
        )
    return "No counter moved much: the difference is within run-to-run noise."


def _queues(pf: dict[str, Any], f: dict[str, Any]) -> str:
    return (
        f"Multiple queues: each a TUN queue, an SO_REUSEPORT socket and a thread, flows "
        f"steered so that one stays on one queue; 4-stream TCP "
        f"{fmt(pf.get('tcp4_gbps'), 2)} -> {fmt(f.get('tcp4_gbps'), 2)} Gbit/s. Queues scale "
        f"with free cores: where the iperf3 ends, both daemons and the kernel's softirq "
        f"work share a few, extra queues compete with them."
    )


def _scheduling(pf: dict[str, Any], f: dict[str, Any]) -> str:
    return (
        f"Scheduling: the queue threads run SCHED_RR, so a packet that wakes one no longer "
        f"waits for a time slice behind the busy iperf3 ends; RTT under the TCP stream p50 "
        f"{fmt(pf.get('rtt_loaded_p50_ms'), 2)} -> {fmt(f.get('rtt_loaded_p50_ms'), 2)} "
        f"ms, p99 {fmt(pf.get('rtt_loaded_p99_ms'), 2)} -> "
        f"{fmt(f.get('rtt_loaded_p99_ms'), 2)} ms."
    )


def _offloads(c: dict[str, Any]) -> str:
    parts = []
    if c.get("tso_reads") or c.get("tun_gro_writes"):
        parts.append(
            f"TUN offloads: {int(c.get('tso_reads') or 0)} TUN reads were TCP super-packets "
            f"cut into MTU-sized packets in C ({fmt(c.get('packets_per_tun_read'), 1)} "
            f"packets per read) and {int(c.get('tun_gro_writes') or 0)} TUN writes merged "
            f"several segments ({fmt(c.get('packets_per_tun_write'), 1)} packets per write)"
        )
    if c.get("gso_sends") or c.get("gro_receives"):
        parts.append(
            f"UDP GSO/GRO: {int(c.get('gso_sends') or 0)} sends carried several datagrams "
            f"in one message and {int(c.get('gro_receives') or 0)} receives returned "
            f"several, so one syscall moves {fmt(c.get('packets_per_send'), 1)} packets out "
            f"and {fmt(c.get('packets_per_receive'), 1)} in"
        )
    return (
        "; ".join(parts) + " (median per run, TCP). The wire still carries one inner IPv4 "
        "packet per datagram: the kernel cuts and merges on each side of user space."
    )
