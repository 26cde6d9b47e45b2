"""The BLAS baseline of `hybrid bench fhe`: times numpy's f32 matrix product (OpenBLAS in the
wheels on PyPI, with kernels chosen for the CPU at run time) on the bench's own data.

Usage: python3 blas_matmul.py TOKENS D_IN D_OUT RUNS < x.i8 w.i8
stdin: the TOKENS x D_IN activations, then the D_OUT x D_IN weights, as signed bytes (row-major).
stdout: one JSON object {"ms": median, "library": "..."}. The thread count comes from the
environment (OPENBLAS_NUM_THREADS), which the bench sets to its own.
"""

import json
import sys
import time

import numpy as np


def blas_name():
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"numpy {np.__version__}, {blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # older numpy: no dict mode
        return f"numpy {np.__version__}"


def main():
    tokens, d_in, d_out, runs = (int(v) for v in sys.argv[1:5])
    data = sys.stdin.buffer.read()
    if len(data) != (tokens + d_out) * d_in:
        sys.exit(f"expected {(tokens + d_out) * d_in} bytes on stdin, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.int8)
    x = raw[: tokens * d_in].reshape(tokens, d_in).astype(np.float32)
    # W^T, d_in x d_out, contiguous: the same (tokens x d_in) * (d_in x d_out) product as candle's.
    wt = np.ascontiguousarray(raw[tokens * d_in :].reshape(d_out, d_in).T.astype(np.float32))
    y = x @ wt  # warm-up
    times = []
    for _ in range(max(runs, 1)):
        t = time.perf_counter()
        y = x @ wt
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    assert y.shape == (tokens, d_out)
    print(json.dumps({"ms": times[len(times) // 2], "library": blas_name()}))


main()
