"""Reads a GGUF file with llama.cpp's gguf-py (the oracle) and dumps what it sees.

usage: gguf_dump.py FILE OUTDIR

OUTDIR/meta.json: every key with its GGUF value type(s) and value (arrays: length and every item);
OUTDIR/tensors.json: name, ggml type, shape (gguf-py order), dequantized .f32 file;
OUTDIR/<i>.f32: gguf-py's dequantization of tensor i, little-endian float32, in row-major order.
"""
import json
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize

path, out = sys.argv[1], sys.argv[2]
r = GGUFReader(path)
meta = {}
for k, f in r.fields.items():
    types = [GGUFValueType(t).name for t in f.types]
    v = f.contents()
    if isinstance(v, list):
        meta[k] = {"types": types, "len": len(v), "all": v}
    else:
        meta[k] = {"types": types, "value": v}
tensors = []
for i, t in enumerate(r.tensors):
    x = dequantize(t.data, t.tensor_type).astype("<f4")
    x.tofile(f"{out}/{i}.f32")
    tensors.append({"name": t.name, "type": t.tensor_type.name, "shape": [int(d) for d in t.shape],
                    "n": int(x.size), "file": f"{i}.f32"})
json.dump(meta, open(f"{out}/meta.json", "w"))
json.dump(tensors, open(f"{out}/tensors.json", "w"))
