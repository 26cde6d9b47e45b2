#!/usr/bin/env bash
# Packed-results sweep for BENCHMARKS.md: QKV (2048x6144) keyless baseline, packed over n_i and
# over the packing key's decomposition, T = 16 layouts, and the planner's picks. Prints one JSON
# object per run, then a table with the Pareto front (server ms, bytes per token, key bytes).
#   bash crates/cli/scripts/bench-packed.sh [path/to/hybrid] > packed.jsonl
set -euo pipefail
HYBRID=${1:-target/release/hybrid}
RUNS=${RUNS:-5}
OUT=$(mktemp)
SHAPE=2048x6144
run() { "$HYBRID" bench fhe --shape "$SHAPE" --runs "$RUNS" --json "$@" | tail -1 | tee -a "$OUT"; }

run --results keyless
for n_i in 32 64 128 256 512; do run --results packed --n-i "$n_i"; done
for d in "11 4" "10 5" "8 6" "7 8"; do run --results packed --n-i 128 --decomposition $d; done
run --results packed --n-i 512 --decomposition 11 4
run --results keyless --tokens 16 --tokens-per-poly 16
for n_i in 64 32 16; do run --results packed --tokens 16 --tokens-per-poly 16 --n-i "$n_i"; done
run --results auto --preference bandwidth
run --results auto --preference latency
run --results auto --preference bandwidth --tokens 16 --tokens-per-poly 16
SHAPE=8192x2048
run --results keyless
run --results packed --n-i 512

python3 - "$OUT" >&2 <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def key(r): return (r["server_ms"] / r["tokens"], r["bytes_per_token"], r["key_upload_bytes"])
front = [r for r in rows if not any(
    all(a <= b for a, b in zip(key(o), key(r))) and key(o) != key(r) and o["tokens"] == r["tokens"] and o["shape"] == r["shape"]
    for o in rows)]
print("| shape | T | results | n_i/n_o/t_b | decomposition | bits in/out | server ms/token (product + pack) | x f32 | up KB/token | down KB/token | total KB/token | key MB | keygen ms | margin bits | exact | Pareto |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    l, p, t = r["layout"], r.get("packing") or {}, r["tokens"]
    dec = f'2^{p["base_log"]} x {p["levels"]}' if r["results"] == "packed" else "-"
    split = f' ({r["product_ms"]/t:.1f} + {r["pack_ms"]/t:.1f})' if r["results"] == "packed" else ""
    print(f'| {r["shape"]} | {t} | {r["results"]} | {l["n_i"]}/{l["n_o"]}/{l["t_b"]} | {dec} | {r["input_bits"]}/{r["output_bits"]} '
          f'| {r["server_ms"]/t:.1f}{split} | {r["server_over_f32"]:.1f} | {r["upload_bytes"]/t/1e3:.0f} '
          f'| {r["download_bytes"]/t/1e3:.0f} | {r["bytes_per_token"]/1e3:.0f} | {r["key_upload_bytes"]/1e6:.2f} '
          f'| {r["keygen_ms"]:.0f} | {r["model_margin_bits"]:.2f} | {r["exact"]} | {"yes" if r in front else ""} |')
PY
rm -f "$OUT"
