"""Re-runs ggml's quantizer on the stored inputs of a golden vectors file and compares (or writes).

usage: ggml_vectors.py DRIVER VECTORS.safetensors VECTORS.json [--write OUT.safetensors]

For every `<dist>.<TYPE>` and `<dist>.<TYPE>.imatrix` tensor of the file (ggml's bytes), runs
DRIVER (quantize_vectors.c built against ggml) on `<dist>.input` with no importance vector or
with `<dist>.imatrix`, and compares the bytes. With --write, writes a new file with the same
tensors in the same order (the inputs copied, the blocks ggml produced now). Standard library only.
"""
import json
import os
import struct
import subprocess
import sys
import tempfile


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", None)
    tensors = {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in header.items()}
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    return tensors, order, meta


def write_safetensors(path, tensors, order, meta):
    header, offset = {}, 0
    if meta:
        header["__metadata__"] = meta
    for k in order:
        dtype, shape, b = tensors[k]
        header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "xb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for k in order:
            f.write(tensors[k][2])


def type_ids(spec):
    out = {}
    for name, t in spec["types"].items():
        out[name] = t.get("ggml_type", t.get("id"))
    return out


def main(argv):
    if len(argv) not in (3, 5):
        raise SystemExit(__doc__)
    driver, path, spec_path = argv[:3]
    out_path = argv[4] if len(argv) == 5 and argv[3] == "--write" else None
    tensors, order, meta = read_safetensors(path)
    spec = json.load(open(spec_path))
    ids = type_ids(spec)
    rows = spec["rows"]
    cols = spec.get("n_per_row", spec.get("cols"))
    same = differ = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in order:
            parts = name.split(".")
            dist, rest = parts[0], parts[1:]
            if rest in (["input"], ["imatrix"]):
                continue
            ty, with_imatrix = rest[0], rest[1:] == ["imatrix"]
            x = os.path.join(tmp, f"{dist}.input.f32")
            if not os.path.exists(x):
                open(x, "wb").write(tensors[f"{dist}.input"][2])
                open(os.path.join(tmp, f"{dist}.imatrix.f32"), "wb").write(tensors[f"{dist}.imatrix"][2])
            out = os.path.join(tmp, "out.bin")
            imatrix = os.path.join(tmp, f"{dist}.imatrix.f32") if with_imatrix else "-"
            subprocess.run([driver, str(ids[ty]), str(rows), str(cols), x, imatrix, out], check=True, stderr=subprocess.DEVNULL)
            got = open(out, "rb").read()
            if got == tensors[name][2]:
                same += 1
            else:
                differ += 1
                print(f"DIFFERS: {name}")
            tensors[name] = (tensors[name][0], tensors[name][1], got)
    print(f"{path}: {same} of {same + differ} block tensors reproduced byte for byte")
    if out_path:
        write_safetensors(out_path, tensors, order, meta)
        print(f"wrote {out_path}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
