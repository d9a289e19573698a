"""gguf-py's reading of the i-quants: its dequantization of every block tensor of a golden vectors
file, and its byte grids.

usage: iq_dequant.py VECTORS.safetensors OUTDIR

Writes OUTDIR/<tensor>.f32 (gguf.quants.dequantize of each `<dist>.<TYPE>[.imatrix]` tensor whose
type gguf-py knows, little-endian float32) and OUTDIR/grid.<TYPE>.f32 (the type's grid values,
point by point, as gguf-py builds them from its hex tables).
"""
import json
import os
import struct
import sys

import numpy as np
from gguf import GGMLQuantizationType, quants

src, out = sys.argv[1], sys.argv[2]
with open(src, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    data = f.read()
header.pop("__metadata__", None)
for name, info in header.items():
    parts = name.split(".")
    if len(parts) < 2 or not parts[1].startswith("IQ"):
        continue
    qtype = GGMLQuantizationType[parts[1]]
    a, b = info["data_offsets"]
    blocks = np.frombuffer(data[a:b], dtype=np.uint8).reshape(info["shape"])
    vals = quants.dequantize(blocks, qtype).astype("<f4")
    vals.tofile(os.path.join(out, name + ".f32"))
for t in ("IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S"):
    cls = getattr(quants, t)
    cls.init_grid()
    np.asarray(cls.grid, dtype="<f4").reshape(-1).tofile(os.path.join(out, f"grid.{t}.f32"))
