"""How fast `resflow --help` and every `resflow COMMAND --help` answer (target: under 0.5 s).

    .venv/bin/python -m bench.cli_help            # 5 runs each; prints a table, writes bench/results/cli_help.json

Each run is a fresh process, as a person typing the command starts one: the interpreter,
the parser (which imports nothing heavy) and the help text.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = [[], ["ingest"], ["degrade"], ["split"], ["train"], ["evaluate"], ["restore"], ["models"],
            ["models", "list"], ["storage"], ["cluster"], ["up"], ["down"], ["status"], ["env"], ["deploy"],
            ["serve"], ["flow"]]


def seconds(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "resflow"), *argv, "--help"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(runs: int = 5) -> None:
    rows = []
    for argv in COMMANDS:
        times = [seconds(argv) for _ in range(runs)]
        rows.append({"command": " ".join(["resflow", *argv, "--help"]), "median_s": statistics.median(times),
                     "max_s": max(times)})
        print(f"{rows[-1]['command']:<34} median {rows[-1]['median_s']:.3f} s  max {rows[-1]['max_s']:.3f} s", flush=True)
    slowest = max(row["max_s"] for row in rows)
    print(f"slowest: {slowest:.3f} s (target < 0.5 s)")
    out = REPO / "bench" / "results" / "cli_help.json"
    out.write_text(json.dumps({"runs": runs, "rows": rows, "slowest_s": slowest}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
