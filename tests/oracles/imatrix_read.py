"""Reads an imatrix file the way llama.cpp's tools do, independently of ouro-quant, and prints JSON.

GGUF: with gguf-py's GGUFReader (the `gguf` package, llama.cpp's own reader): every key and every
tensor (name, shape as gguf-py reports it, type name, values).
.dat: parsed here from the layout of llama.cpp's `common_imatrix_load_legacy`: i32 entry count;
per entry i32 name length, name, i32 ncall, i32 nval, nval f32; then optionally i32 chunk count and
i32 length + dataset name.

usage: imatrix_read.py FILE
"""
import json
import struct
import sys

path = sys.argv[1]
with open(path, "rb") as f:
    head = f.read(4)

if head == b"GGUF":
    import gguf

    r = gguf.GGUFReader(path)
    keys = {}
    for k, field in r.fields.items():
        if k.startswith("GGUF."):
            continue
        keys[k] = {"value": field.contents(), "type": field.types[0].name}
    tensors = [
        {"name": t.name, "shape": [int(x) for x in t.shape], "type": t.tensor_type.name, "values": [float(v) for v in t.data.reshape(-1)]}
        for t in r.tensors
    ]
    print(json.dumps({"format": "gguf", "keys": keys, "tensors": tensors}))
else:
    b = open(path, "rb").read()
    at = 0

    def i32():
        global at
        (v,) = struct.unpack_from("<i", b, at)
        at += 4
        return v

    n = i32()
    entries = []
    for _ in range(n):
        ln = i32()
        name = b[at : at + ln].decode()
        at += ln
        ncall = i32()
        nval = i32()
        vals = list(struct.unpack_from("<%df" % nval, b, at))
        at += 4 * nval
        entries.append({"name": name, "ncall": ncall, "values": vals})
    chunks = i32() if at < len(b) else None
    dataset = None
    if at < len(b):
        ln = i32()
        dataset = b[at : at + ln].decode()
        at += ln
    assert at == len(b), "trailing bytes"
    print(json.dumps({"format": "dat", "entries": entries, "chunk_count": chunks, "dataset": dataset}))
