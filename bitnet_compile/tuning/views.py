"""``bitnet-compile schedules ...``: the research views of the tuning records.

    list              every record: kernel, shape, threads, trials, default vs best, speedup
    show KEY          one record's trials (knobs, time, state, reason) and its best knobs
    compare           tuned vs default per kernel and shape, with the geometric mean
    plot KEY -o PNG   the tuning curve: every trial's time, the best so far, the default
    source KEY        the generated TIR, LLVM IR or assembly of a record's best (or default) knobs
    space [KERNEL]    a kernel's knob domains, constraints and the size of its valid space

KEY is a record key, or parts of one separated by "/" that pick a single record
("dot2_gemv/2560x2560", "f16_gemv").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .. import records
from ..errors import UserError

# ----------------------------------------------------------------------------- reading


def _all(target_key: str | None = None) -> list[tuple[Path, str, dict, dict]]:
    """(file, record key, record, target fingerprint) for every record."""
    found = []
    for path in records.all_files():
        if target_key and path.stem != target_key:
            continue
        data = records.read(path)
        found += [(path, key, rec, data["target"]) for key, rec in data["records"].items()]
    return found


def find(key: str) -> tuple[Path, str, dict, dict]:
    everything = _all()
    exact = [r for r in everything if r[1] == key]
    parts = key.split("/")
    matches = exact or [r for r in everything if all(part in f"{r[0].stem}/{r[1]}" for part in parts)]
    if not matches:
        raise UserError(f"no tuning record matches {key!r} in {records.records_dir()} (see: bitnet-compile schedules list)")
    if len(matches) > 1:
        listed = ", ".join(f"{p.stem}/{k}" for p, k, _, _ in matches[:8])
        raise UserError(f"{key!r} matches {len(matches)} records ({listed}{', ...' if len(matches) > 8 else ''}): be more specific")
    return matches[0]


# ----------------------------------------------------------------------------- formatting


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.1f}"


def _knobs(knobs: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in knobs.items())


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _default_seconds(rec: dict) -> float | None:
    return rec["default"].get("confirmed_seconds", rec["default"].get("seconds"))


def _failed(rec: dict) -> int:
    return sum(1 for t in rec["trials"] if t["state"] not in ("complete", "invalid", "duplicate"))


def list_view(target_key: str | None) -> str:
    rows = []
    for path, _key, rec, _ in _all(target_key):
        best = rec.get("best") or {}
        speed = f"{rec['speedup']:.2f}x" if "speedup" in rec else "-"
        rows.append([path.stem, rec["op"], f"{rec['n']}x{rec['k']}", str(rec["threads"]), f"{rec['measured']}/{rec['space']['valid_points']}",
                     str(_failed(rec)), _us(_default_seconds(rec)), _us(best.get("seconds")), speed, _knobs(best.get("knobs", {}))])  # fmt: skip
    if not rows:
        return f"no tuning records in {records.records_dir()}"
    return _table(
        ["target", "kernel", "N x K", "threads", "trials/space", "failed", "default us", "best us", "speedup", "best knobs"], rows
    )


def compare_view(target_key: str | None) -> str:
    rows, ratios = [], []
    for path, _, rec, _ in _all(target_key):
        if "speedup" not in rec:
            continue
        ratios.append(rec["speedup"])
        rows.append([path.stem, rec["op"], f"{rec['n']}x{rec['k']}", str(rec["threads"]), rec["timing"],
                     _knobs(rec["default"]["knobs"]), _us(_default_seconds(rec)), _knobs(rec["best"]["knobs"]), _us(rec["best"]["seconds"]), f"{rec['speedup']:.2f}x"])  # fmt: skip
    if not rows:
        return f"no tuned records with a default to compare in {records.records_dir()}"
    mean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    table = _table(
        ["target", "kernel", "N x K", "threads", "timing", "default knobs", "default us", "tuned knobs", "tuned us", "speedup"], rows
    )
    return f"{table}\n\ngeometric mean speedup over {len(ratios)} kernels: {mean:.3f}x"


def show_view(key: str) -> str:
    path, rkey, rec, fp = find(key)
    lines = [
        f"record {rkey} in {path}",
        f"target: {fp['cpu']}, LLVM {fp['mcpu']} ({fp['triple']}), {fp['cores']} cores",
        f"timing: {rec['timing']} ({'weights streamed from DRAM' if rec['timing'] == 'dram' else 'weights in cache'}), {rec['tokens']} token(s) per call, {rec['threads']} threads",
        f"space: {_knobs({k: '|'.join(map(str, v)) for k, v in rec['space']['knobs'].items()})}; "
        f"{rec['space']['valid_points']} valid points; constraints: {'; '.join(rec['space']['constraints']) or 'none'}",
        f"study: {rec['study']} (updated {rec.get('updated', '?')})",
        "",
    ]
    rows = [
        [
            str(t["number"]),
            t["state"],
            _knobs(t["knobs"]),
            _us(t.get("seconds")),
            str(t.get("duplicate_of", "")) and f"of #{t['duplicate_of']}",
            t.get("reason", "")[:90],
        ]
        for t in rec["trials"]
    ]
    lines.append(_table(["#", "state", "knobs", "us", "dup", "reason"], rows))
    if rec.get("confirmed"):
        lines += ["", "confirmation (interleaved rounds; a candidate replaces the default only by winning all rounds but one, by 2%):"]
        lines += [
            f"  {_knobs(c['knobs'])}: {_us(c['seconds'])} us (rounds {' / '.join(_us(r) for r in c.get('rounds', []))})"
            for c in sorted(rec["confirmed"], key=lambda c: c["seconds"])
        ]
    best = rec.get("best")
    if best:
        speed = f", {rec['speedup']:.2f}x over the default ({_knobs(rec['default']['knobs'])})" if "speedup" in rec else ""
        lines += ["", f"best: {_knobs(best['knobs'])}: {_us(best['seconds'])} us ({best['source']}){speed}"]
    return "\n".join(lines)


def plot(key: str, output: Path) -> Path:
    """Each measured trial's time in order, the running best, and the default as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path, rkey, rec, fp = find(key)
    measured = [t for t in rec["trials"] if t["state"] not in ("invalid", "duplicate")]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    xs = [i + 1 for i, t in enumerate(measured) if "seconds" in t]
    ys = [t["seconds"] * 1e6 for t in measured if "seconds" in t]
    ax.scatter(xs, ys, s=14, color="tab:blue", label="trial")
    failed = [i + 1 for i, t in enumerate(measured) if "seconds" not in t]
    if failed and ys:
        ax.scatter(failed, [max(ys)] * len(failed), marker="x", color="tab:red", label="failed")
    best, running = [], math.inf
    for t in measured:
        running = min(running, t.get("seconds", math.inf))
        best.append(running * 1e6)
    ax.step(range(1, len(best) + 1), best, where="post", color="tab:green", label="best so far")
    default = _default_seconds(rec)
    if default:
        ax.axhline(default * 1e6, color="gray", linestyle="--", label="default")
    ax.set_xlabel("measured trial")
    ax.set_ylabel("microseconds per call (median)")
    ax.set_title(f"{rec['op']} {rec['n']}x{rec['k']}, {rec['threads']} threads, {fp['mcpu']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output)
    except OSError as err:
        raise UserError(f"cannot write {output}: {err}") from None
    finally:
        plt.close(fig)
    return output


def source(key: str, form: str, default: bool) -> str:
    """The code of a record's kernel, generated now with its knobs (for the record's target)."""
    import tvm

    from ..ops import registry
    from ..target import parse_target

    path, rkey, rec, fp = find(key)
    template = registry.get_tunable(rec["op"])
    if template.version != rec["version"]:
        raise UserError(f"record {rkey} is for {rec['version']}, this compiler has {template.version}")
    spec = {
        "kind": "llvm",
        "mtriple": fp["triple"],
        "mcpu": fp["mcpu"],
        "mattr": [f"+{f}" for f in fp["features"]],
        "num-cores": fp["cores"],
    }
    target = parse_target(json.dumps(spec))
    knobs = rec["default"]["knobs"] if default or not rec.get("best") else rec["best"]["knobs"]
    shape, built = template.kernel_shape(rec["n"], rec["k"], knobs, target)
    name = f"{rec['op']}_n{rec['n']}_k{rec['k']}"
    func = template.build(name, shape, built, target)
    header = f"// {rkey} with {'default' if default else 'best'} knobs {_knobs(built)}\n"
    if form == "tir":
        return header + func.script()
    return header + tvm.compile(tvm.IRModule({name: func}), target=target.tvm_target()).mod.inspect_source(form)


def space_view(kernel: str | None, shape_text: str, threads: int, target_text: str) -> str:
    from .. import models
    from ..ops import registry
    from ..target import parse_target

    target = parse_target(target_text)
    lin = models.parse_shapes(shape_text)[0]
    lines = []
    for op in [kernel] if kernel else list(registry.tunable()):
        t = registry.get_tunable(op)
        names = t.names(lin.n, lin.k, target, threads)
        lines += [f"{t.op} ({t.version}, layout {t.layout}, timing {t.timing}, ISAs {', '.join(sorted(t.isas))})"]
        lines += [f"  {line}" for line in t.space.describe()]
        lines += [f"  valid points for {lin.n}x{lin.k} at {threads} threads on {target.isa}: {t.space.size(names)}", ""]
    return "\n".join(lines).rstrip()


def run(args: argparse.Namespace) -> int:
    if args.view == "list":
        print(list_view(args.target_key))
    elif args.view == "compare":
        print(compare_view(args.target_key))
    elif args.view == "show":
        print(show_view(args.key))
    elif args.view == "plot":
        print(f"wrote {plot(args.key, args.output)}", file=sys.stderr)
    elif args.view == "source":
        print(source(args.key, args.form, args.default))
    else:
        print(space_view(args.kernel, args.shape, args.threads, args.target))
    return 0
