"""Figures and where they go: docs/PERFORMANCE.md (one table per benchmark) and
raw JSON in bench/results/.

Each benchmark owns one marked section of PERFORMANCE.md, so running a subset
(`python -m bench status`) rewrites those sections and keeps the others. A
hand-written analysis between `<!-- analysis -->` and `<!-- /analysis -->` is
kept as it is, at the end.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .harness import ROOT

DOC = ROOT / "docs" / "PERFORMANCE.md"
RESULTS = ROOT / "bench" / "results"


@dataclass
class Row:
    """One figure, and what it is judged against."""

    measure: str
    value: float | None
    unit: str
    target: str = ""                  # e.g. "≥ 500/s (Slurm, tuned)"
    ratio: float | None = None        # value / reference
    ratio_of: str = ""                # what the ratio is taken of, e.g. "target"
    met: bool | None = None           # None: informational, no target


@dataclass
class Outcome:
    """What one benchmark run produced."""

    name: str
    title: str
    command: str
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)
    started_at: str = ""
    seconds: float = 0.0
    machine: dict = field(default_factory=dict)


def write_json(outcome: Outcome) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = outcome.started_at.replace(":", "").replace("-", "")
    path = RESULTS / f"{outcome.name}-{stamp}.json"
    path.write_text(json.dumps(asdict(outcome), indent=2) + "\n")
    return path


def update_doc(outcomes: list[Outcome], order: list[str], intro: str) -> Path:
    """Rewrite the sections of `outcomes` in PERFORMANCE.md; keep the other sections."""
    text = DOC.read_text() if DOC.exists() else ""
    existing = _sections(text)
    analysis = re.search(r"<!-- analysis -->.*?<!-- /analysis -->\n?", text, re.S)
    for outcome in outcomes:
        existing[outcome.name] = render(outcome)
    body = [intro.rstrip() + "\n"]
    for name in order + sorted(set(existing) - set(order)):
        if name in existing:
            body.append(f"<!-- bench:{name} -->\n{existing[name].strip()}\n<!-- /bench:{name} -->\n")
    if analysis:
        body.append(analysis.group(0))
    DOC.write_text("\n".join(body))
    return DOC


def _sections(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(
        r"<!-- bench:([\w-]+) -->\n(.*?)<!-- /bench:\1 -->", text, re.S)}


def render(o: Outcome) -> str:
    m = o.machine
    lines = [
        f"## {o.title}",
        "",
        f"`{o.command}` — {o.started_at}, {o.seconds:.0f} s — {m.get('nproc')} × {m.get('cpu_model')},"
        f" {m.get('ram_gib')} GiB RAM, Python {m.get('python')}, commit {m.get('commit')},"
        f" load average {' → '.join(str(x) for x in m.get('loadavg', []))}",
        "",
        "| Measure | Figure | Target / anchor | Ratio | Met |",
        "|---|---:|---|---:|:---:|",
    ]
    for r in o.rows:
        ratio = f"{r.ratio:.2f}× {r.ratio_of}".strip() if r.ratio is not None else ""
        met = {True: "yes", False: "**no**", None: ""}[r.met]
        lines.append(f"| {r.measure} | {_fmt(r.value)} {r.unit} | {r.target} | {ratio} | {met} |")
    if o.notes:
        lines.append("")
        lines.extend(f"- {n}" for n in o.notes)
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, int) or (isinstance(v, float) and v >= 100):
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
