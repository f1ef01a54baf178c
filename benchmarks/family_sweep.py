"""Family sweep: run the full architecture sweep of ``tests/test_families.py`` and write the support table.

Runs ``pytest tests/test_families.py -m slow`` (every architecture of timm's ViT modules at
``depth=2``; ``--quick``: the default sample instead), times it, reads each architecture's outcome
and kinds from the JUnit XML report (properties recorded by the test), and writes
``family_sweep.json`` and a Markdown table per timm module: architectures, supported, unsupported
(with the documented reason), failing, and the backbone/embedding/block/attention kinds met. The
full run also replaces the README section between ``<!-- families:start -->`` and
``<!-- families:end -->``.
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

ROOT = common.REPO_ROOT
README = ROOT / "README.md"
START, END = "<!-- families:start -->", "<!-- families:end -->"
MODULES = ("vision_transformer", "deit", "vision_transformer_hybrid", "eva", "beit", "naflexvit")
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
    """Per timm module: counts, refusal reasons, failing architectures and kinds."""
    table = {}
    for module in MODULES:
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


def shown(kind: str, ambiguous: set[str]) -> str:
    """``"beit.Block"`` -> ``"Block (beit)"`` when another module has a ``Block`` too, else ``"Block"``;
    classes of ``timm.layers`` show as ``(timm.layers)``."""
    owner, name = kind.rsplit(".", 1)
    if name not in ambiguous:
        return name
    return f"{name} ({owner if owner in MODULES else 'timm.layers'})"


def markdown(table: dict[str, dict], seconds: float, summary_line: str, machine: dict, quick: bool) -> str:
    """The README section (between the markers)."""
    common.add_repo_root_to_path()
    from learnable_memory.registry import UNSUPPORTED
    from tests.test_families import DEPTH2_KWARGS, SAMPLE

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
        k = {g: [shown(n, ambiguous) for n in names] for g, names in t["kinds"].items()}
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
    refused = (
        "\n".join(f"- `{key}`: {reason}" for key, reason in sorted(UNSUPPORTED.items()))
        if UNSUPPORTED else "No architecture or class is refused: `learnable_memory.families.UNSUPPORTED` is empty."
    )
    return "\n".join([
        "Every architecture that `timm.list_models(module=M)` lists for these modules, built with `depth=2` and",
        "random weights, is checked by `tests/test_families.py`: base output bit-identical after wrapping, two",
        "concatenated tasks equal to each task alone, a training step reaching only the new task's memory (every",
        "block), class token and head, and a `save_pretrained` / `load_adapters` round trip. The counts are",
        "written by `benchmarks/family_sweep.py` from that sweep, not by hand.",
        "",
        *lines,
        "",
        f"{'Default sample' if quick else 'Full sweep'} (`{command}`): {summary_line}, "
        f"{seconds / 60:.1f} min wall time on {machine['cores']} cores ({machine['cpu']}, load average "
        f"{machine['load_average'][0]:.1f} at the start), "
        f"timm {machine['timm']}, torch {machine['torch']}. The default test run checks a fixed sample of "
        f"{len(SAMPLE)} architectures, one per family and per backbone, embedding, block and attention kind "
        "(`SAMPLE` in `tests/test_families.py`); the slow sweep also fails if an architecture has a kind the "
        f"sample lacks. timm can not build {len(DEPTH2_KWARGS)} architectures at `depth=2` as registered "
        f"({', '.join(f'`{a}`' for a in sorted(DEPTH2_KWARGS))}: one `num_kv_heads` entry per block of the "
        "full depth); the sweep builds them with one full-attention and one grouped-query block.",
        "",
        "How each kind meets the memory (details in the docstrings of `learnable_memory/families/`):",
        "",
        "- `Block`: memory goes through `norm1` and the attention's key/value projection. `ResPostBlock`",
        "  (post-norm) applies nothing before attention, so memory enters the key/value projection as it is.",
        "  `ParallelThingsBlock`: through each parallel branch's own norm and key/value projection.",
        "- `ParallelScalingBlock`, `DiffParallelScalingBlock` (fused `in_proj` for MLP and q, k, v): memory goes",
        "  through `in_norm` and only the key/value rows of `in_proj`.",
        "- `DiffAttention` and `DiffParallelScalingBlock` (two softmaxes per head): new class tokens get the",
        "  Table 1 mask on both.",
        "- DeiT's `VisionTransformerDistilled`: the class and distillation tokens are both prefix tokens; the",
        "  base output stays timm's own head (the mean of both heads); new class tokens start from the class",
        "  token. Hybrid ViTs (`HybridEmbed`) take the image size they were built for unless built with",
        "  `dynamic_img_size=True`; other sizes get a `ValueError` saying how to fix them.",
        "- `Eva` (rotary embeddings, which skip new class tokens and memory as they skip prefix tokens), `Beit`",
        "  (relative position bias) and `NaFlexVit` (padding masks, variable length): see `families/eva.py`,",
        "  `families/beit.py` and `families/naflexvit.py`.",
        "- The original tokens always run the base model's own arithmetic, unmasked (fused attention where the",
        "  model uses it), so the base output is bit-identical.",
        "",
        "Refused on purpose (a `TypeError` naming the reason and what would lift it):",
        "",
        refused,
    ])


def write_readme(section: str) -> None:
    """Replace the text between the markers (they must exist once each) with ``section``."""
    text = README.read_text()
    if text.count(START) != 1 or text.count(END) != 1:
        raise SystemExit(f"README.md needs exactly one {START} and one {END}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    README.write_text(f"{head}{START}\n{section}\n{END}{tail}")


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
