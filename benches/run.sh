#!/usr/bin/env bash
# Every benchmark in one run, one summary table and one JSON file.
#
#   benches/run.sh                    all benchmarks (SQLite; cluster needs Postgres)
#   DATABASE_URL=postgres://... benches/run.sh     the same on Postgres, cluster included
#   benches/run.sh --bench protocol   any `cargo bench` arguments narrow the run
#
# Working copies go to tmpfs (/dev/shm) unless BENCH_WORKSPACE_DIR says
# otherwise. Each benchmark prints its own table and writes
# $BENCH_RESULTS_DIR/<bench>.json (default target/bench-results); this script
# merges them, with the machine's description, into bench-results.json
# (or $BENCH_JSON) and prints every ratio next to its target.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export BENCH_RESULTS_DIR="${BENCH_RESULTS_DIR:-$root/target/bench-results}"
json_out="${BENCH_JSON:-$root/bench-results.json}"
if [[ -z "${BENCH_WORKSPACE_DIR:-}" && -d /dev/shm ]]; then
    export BENCH_WORKSPACE_DIR="/dev/shm/branchd-bench-$$"
fi
rm -rf "$BENCH_RESULTS_DIR"
mkdir -p "$BENCH_RESULTS_DIR"
trap 'rm -rf "${BENCH_WORKSPACE_DIR:-/nonexistent-branchd-bench}"' EXIT

# Bench targets only (not the library's unit tests), unless told otherwise.
if [[ $# -eq 0 ]]; then
    set -- --benches
fi
(cd "$root" && cargo bench --locked "$@")

python3 - "$BENCH_RESULTS_DIR" "$json_out" <<'PY'
import json, os, platform, subprocess, sys, time
results_dir, out = sys.argv[1], sys.argv[2]
benches = []
for name in sorted(os.listdir(results_dir)):
    if name.endswith(".json"):
        with open(os.path.join(results_dir, name)) as f:
            benches.append(json.load(f))
def meminfo():
    try:
        with open("/proc/meminfo") as f:
            return f.readline().split(":")[1].strip()
    except OSError:
        return "unknown"
def rustc():
    try:
        return subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
url = os.environ.get("DATABASE_URL", "")
summary = {
    "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "machine": {
        "cpus": os.cpu_count(),
        "memory": meminfo(),
        "system": platform.platform(),
        "rustc": rustc(),
    },
    "backend": "postgres" if url.startswith("postgres") else "sqlite",
    "workspace_dir": os.environ.get("BENCH_WORKSPACE_DIR", ""),
    "benches": benches,
}
with open(out, "w") as f:
    json.dump(summary, f, indent=2)
print()
print(f"branchd benchmarks, {summary['when']}, {summary['machine']['cpus']} cpus, {summary['backend']}")
print(f"| {'bench':<10} | {'measure':<44} | {'value':>12} | {'target':>10} | {'met':<4} |")
print(f"|{'-'*12}|{'-'*46}|{'-'*14}|{'-'*12}|{'-'*6}|")
for bench in benches:
    for entry in bench["results"]:
        if entry["kind"] == "ratio":
            met = {True: "yes", False: "NO", None: ""}[entry.get("met")]
            print(f"| {bench['bench']:<10} | {entry['name']:<44} | {entry['value']:>12.2f} | {entry.get('target') or '':>10} | {met:<4} |")
        elif entry["kind"] == "timing":
            print(f"| {bench['bench']:<10} | {entry['scenario'] + ' (median)':<44} | {entry['median_us']/1000:>9.3f} ms | {'':>10} | {'':<4} |")
print(f"\nfull results: {out}")
PY
