"""Edge-case inputs for the lattice i-quants, quantized by ggml itself: writes
fixtures/golden/ggml/vectors_iq_edge.{safetensors,json} in the layout of vectors_iq (tensors
`<dist>.input`, `<dist>.imatrix`, `<dist>.<TYPE>[.imatrix]`).

usage: iq_edge_vectors.py DRIVER OUT.safetensors OUT.json

DRIVER is quantize_vectors.c built against ggml 0.25.3 (scripts/golden/ggml-vectors.sh builds it
into target/golden-ggml/). The inputs are drawn here with Python's `random` (seed 25), so the
file is remade exactly: all-zero groups of 32, 16 and 8 in the middle of super-blocks (IQ3_S moves
the next groups' bytes after one), groups just below and above each type's zero threshold, values
from a five-value set (ties in IQ1's sort), one large negative value per 8 (sign parity and
IQ2_XXS's negative level), sparse rows, and an importance vector with exact zeros. Standard
library only.
"""
import json
import os
import random
import struct
import subprocess
import sys
import tempfile

ROWS, COLS = 8, 512
TYPES = {  # name: (ggml id, requires an importance vector, bytes per 256)
    "IQ3_XXS": (18, False, 98),
    "IQ3_S": (21, False, 110),
    "IQ2_XXS": (16, True, 66),
    "IQ2_XS": (17, True, 74),
    "IQ2_S": (22, False, 82),
    "IQ1_S": (19, True, 50),
    "IQ1_M": (29, False, 56),
}


def dists(rng):
    g = lambda s: rng.gauss(0.0, s)
    out = {}
    x = [g(0.02) for _ in range(ROWS * COLS)]
    for r in range(ROWS):
        base = r * COLS
        k = r % 8
        x[base + 32 * k: base + 32 * k + 32] = [0.0] * 32  # a zero group of 32 in block 0
        o = 256 + 16 * (2 * r + 1)
        x[base + o: base + o + 16] = [0.0] * 16  # a zero group of 16 in block 1
        o = 256 + 8 * (4 * r + 2) % 256
        x[base + o: base + o + 8] = [0.0] * 8
    out["zero_groups"] = x
    x = []
    for r in range(ROWS):
        for c in range(COLS):
            grp = (c // 16) % 8
            if grp == 0:
                x.append(g(1e-9))  # below IQ1_M's and IQ3_XXS's thresholds, above IQ1_S's
            elif grp == 1:
                x.append(g(5e-8))
            elif grp == 2:
                x.append(0.3)  # constant
            else:
                x.append(rng.choice([-0.03, -0.01, 0.0, 0.01, 0.03]))
    out["ties_and_tiny"] = x
    x = []
    for r in range(ROWS):
        for c in range(COLS):
            x.append(-0.5 - rng.random() if c % 8 == (r + c // 8) % 8 else abs(g(0.02)))
    out["one_negative"] = x
    out["sparse"] = [g(1.0) if rng.random() < 0.05 else 0.0 for _ in range(ROWS * COLS)]
    return out


def imatrix(rng, zeros):
    return [0.0 if zeros and rng.random() < 0.05 else rng.uniform(0.1, 2.0) for _ in range(COLS)]


def main(argv):
    if len(argv) != 3:
        raise SystemExit(__doc__)
    driver, out_st, out_json = argv
    rng = random.Random(25)
    tensors = []
    with tempfile.TemporaryDirectory() as tmp:
        for dist, x in dists(rng).items():
            q = imatrix(rng, zeros=dist == "sparse")
            xb, qb = struct.pack(f"<{len(x)}f", *x), struct.pack(f"<{len(q)}f", *q)
            tensors.append((f"{dist}.input", "F32", [ROWS, COLS], xb))
            tensors.append((f"{dist}.imatrix", "F32", [COLS], qb))
            xf, qf, of = (os.path.join(tmp, n) for n in ("x.f32", "q.f32", "o.bin"))
            open(xf, "wb").write(xb)
            open(qf, "wb").write(qb)
            for name, (tid, needs, bpb) in TYPES.items():
                for with_q in (False, True):
                    if needs and not with_q:
                        continue
                    subprocess.run([driver, str(tid), str(ROWS), str(COLS), xf, qf if with_q else "-", of], check=True, stderr=subprocess.DEVNULL)
                    b = open(of, "rb").read()
                    assert len(b) == ROWS * COLS // 256 * bpb
                    tensors.append((f"{dist}.{name}{'.imatrix' if with_q else ''}", "U8", [ROWS, len(b) // ROWS], b))
    header, offset = {}, 0
    for name, dtype, shape, b in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    blob = struct.pack("<Q", len(h)) + h + b"".join(t[3] for t in tensors)
    with open(out_st, "xb") as f:
        f.write(blob)
    import hashlib
    spec = {
        "rows": ROWS,
        "cols": COLS,
        "seed": 25,
        "library": "ggml 0.25.3",
        "generator": "scripts/golden/iq_edge_vectors.py",
        "types": {n: {"id": t[0], "requires_imatrix": t[1], "row_bytes": COLS // 256 * t[2]} for n, t in TYPES.items()},
        "tensors": {n: {"dtype": d.lower() if d == "U8" else "float32", "shape": s} for n, d, s, _ in tensors},
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    with open(out_json, "x") as f:
        json.dump(spec, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {out_st} ({len(tensors)} tensors) and {out_json}")


if __name__ == "__main__":
    main(sys.argv[1:])
