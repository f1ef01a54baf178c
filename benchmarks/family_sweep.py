"""Family sweep: run the architecture sweep of ``tests/test_families.py`` and write the support table.

Runs ``pytest tests/test_families.py -m slow`` (every architecture of timm's ViT modules at
``depth=2``; ``--quick``: the default sample instead), times it, and reads each architecture's timm
module, outcome and kinds from the JUnit XML report (properties the test records, so the list of
swept modules lives in the test only). Writes ``family_sweep.json`` and a Markdown table per timm
module: architectures, supported, unsupported (with the documented reason), failing, and the
backbone/embedding/block/attention kinds met, then the run's summary and the refused classes
(``learnable_memory.registry.UNSUPPORTED``). The full run puts that generated text between
``<!-- families:start -->`` and ``<!-- families:end -->`` in README.md; the prose around it is
written in the README.

    python benchmarks/family_sweep.py            # the full sweep; rewrites the README's table
    python benchmarks/family_sweep.py --quick    # the default sample; README left alone
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import common

from learnable_memory.registry import UNSUPPORTED, load_families

ROOT = common.REPO_ROOT
README = ROOT / "README.md"
START, END = "<!-- families:start -->", "<!-- families:end -->"
CASE = re.compile(r"^test_(?:every|sample)_architecture\[(.+)\]$")


def run_pytest(quick: bool, xml: Path) -> tuple[float, int, str]:
    """Run the sweep; return wall seconds, pytest's exit code and its last output line."""
    marker = "not slow" if quick else "slow"
    cmd = [sys.executable, "-m", "pytest", "tests/test_families.py", "-m", marker, "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}", "-o", "junit_family=xunit1"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode not in (0, 1):  # 1: some tests failed, which the table reports
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"pytest exited with {proc.returncode}")
    return seconds, proc.returncode, lines[-1] if lines else ""


def read_results(xml: Path) -> dict[str, dict]:
    """Architecture -> {module, kinds, status, seconds, error} from the JUnit report."""
    results = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        m = CASE.match(case.get("name", ""))
        if not m:
            continue
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        status = props.get("status", "failed")
        if failure is not None:
            status = "failed"
        results[m.group(1)] = {
            "module": props.get("module"),
            "kinds": sorted(filter(None, props.get("kinds", "").split(","))),
            "status": status,
            "seconds": float(case.get("time", 0.0)),
            "error": (failure.get("message", "") or "")[:500] if failure is not None else None,
        }
    return results


def summarize(results: dict[str, dict]) -> dict[str, dict]:
    """Per timm module (as the test recorded it), most architectures first: counts, refusal reasons,
    failing architectures and kinds."""
    counts = collections.Counter(r["module"] for r in results.values())
    table = {}
    for module in sorted(counts, key=lambda m: (-counts[m], m)):
        rows = {a: r for a, r in results.items() if r["module"] == module}
        kinds: dict[str, set[str]] = collections.defaultdict(set)
        for r in rows.values():
            for k in r["kinds"]:
                group, name = k.split(":", 1)
                kinds[group].add(name)
        reasons = collections.Counter(
            r["status"].removeprefix("unsupported: ") for r in rows.values() if r["status"].startswith("unsupported")
        )
        table[module] = {
            "architectures": len(rows),
            "supported": sum(r["status"] == "supported" for r in rows.values()),
            "unsupported": dict(reasons),
            "failed": sorted(a for a, r in rows.items() if r["status"] == "failed"),
            "kinds": {g: sorted(v) for g, v in sorted(kinds.items())},
            "seconds": round(sum(r["seconds"] for r in rows.values()), 1),
        }
    return table


def shown(kind: str, ambiguous: set[str], modules: set[str]) -> str:
    """``"beit.Block"`` -> ``"Block (beit)"`` when another module has a ``Block`` too, else ``"Block"``;
    classes defined outside the swept ``modules`` show as ``(timm.layers)``."""
    owner, name = kind.rsplit(".", 1)
    if name not in ambiguous:
        return name
    return f"{name} ({owner if owner in modules else 'timm.layers'})"


def markdown(table: dict[str, dict], seconds: float, summary_line: str, machine: dict, quick: bool) -> str:
    """The generated part of the README section: the table, the run that made it, the refusals.
    The prose around it lives in README.md."""
    load_families()
    command = "python -m pytest tests/test_families.py" + ("" if quick else " -m slow")
    headers = ["timm module", "architectures", "supported", "unsupported", "failing", "block kinds",
               "attention kinds", "backbone, embedding"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    total = collections.Counter()
    owners = collections.defaultdict(set)
    for t in table.values():
        for names in t["kinds"].values():
            for n in names:
                owners[n.rsplit(".", 1)[1]].add(n)
    ambiguous = {name for name, kinds in owners.items() if len(kinds) > 1}
    for module, t in table.items():
        k = {g: [shown(n, ambiguous, set(table)) for n in names] for g, names in t["kinds"].items()}
        unsupported = "; ".join(f"{n}: {reason}" for reason, n in t["unsupported"].items()) or "0"
        lines.append("| " + " | ".join([
            f"`{module}`", str(t["architectures"]), str(t["supported"]), unsupported,
            ", ".join(t["failed"]) or "0", ", ".join(k.get("block", [])), ", ".join(k.get("attention", [])) or "-",
            ", ".join(k.get("backbone", []) + k.get("embed", [])),
        ]) + " |")
        total.update(architectures=t["architectures"], supported=t["supported"],
                     unsupported=sum(t["unsupported"].values()), failed=len(t["failed"]))
    lines.append(f"| **all** | **{total['architectures']}** | **{total['supported']}** | "
                 f"**{total['unsupported']}** | **{total['failed']}** | | | |")
    refused = "Refused on purpose: nothing (`learnable_memory.registry.UNSUPPORTED` is empty)."
    if UNSUPPORTED:
        refused = ("Refused on purpose (`learnable_memory.registry.UNSUPPORTED`; wrapping raises "
                   "`UnsupportedModelError`, a `TypeError`, with the reason):\n\n"
                   + "\n".join(f"- `{key}`: {reason}" for key, reason in sorted(UNSUPPORTED.items())))
    return "\n".join([
        *lines,
        "",
        f"{'Default sample' if quick else 'Full sweep'} (`{command}`): {summary_line}, "
        f"{seconds / 60:.1f} min wall time on {machine['cores']} cores ({machine['cpu']}, load average "
        f"{machine['load_average'][0]:.1f} at the start), timm {machine['timm']}, torch {machine['torch']}.",
        "",
        refused,
    ])


def write_readme(section: str, readme: Path = README) -> None:
    """Replace the text between the markers (they must exist once each) with ``section``."""
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1:
        raise SystemExit(f"{readme} needs exactly one {START} and one {END}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    readme.write_text(f"{head}{START}\n{section}\n{END}{tail}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the default sample only; README left alone")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for family_sweep.json (default: benchmarks/, with --quick benchmarks/out/)")
    args = p.parse_args()
    if args.out is None:
        args.out = common.DEFAULT_OUT if args.quick else ROOT / "benchmarks"
    machine = common.machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "sweep.xml"
        seconds, code, last = run_pytest(args.quick, xml)
        results = read_results(xml)
    table = summarize(results)
    section = markdown(table, seconds, last.strip("= "), machine, args.quick)
    data = {
        "command": common.command_line(),
        "machine": machine,
        "selection": "sample" if args.quick else "all",
        "seconds": round(seconds, 1),
        "pytest": last.strip("= "),
        "pytest_exit_code": code,
        "modules": table,
        "architectures": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "family_sweep.json", data)
    print(section)
    if not args.quick:
        write_readme(section)
        print(f"\nwrote {README} and {args.out / 'family_sweep.json'}")


if __name__ == "__main__":
    main()
