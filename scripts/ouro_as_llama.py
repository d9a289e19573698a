#!/usr/bin/env python3
"""Writes a stock-llama.cpp stand-in for an Ouro GGUF file, for speed comparisons only.

    ouro_as_llama.py OURO.gguf OUT.gguf

Stock llama.cpp has no `ouro` architecture, but one token of an Ouro model at full depth does the
work of a `llama` model whose blocks are the Ouro stack repeated once per loop: the same matrix
products on the same bytes, a KV slot per (loop, layer), one output projection. This writes that
model: architecture `llama`, block_count = layers x loops, block `loop * layers + i` holding a
copy of Ouro block `i`'s bytes (ggml's reader wants each tensor's data right after the previous
one's, so the blocks cannot share one copy: the file is about `loops` times the blocks' size, and
each token reads that many bytes from memory, as Ouro re-reads its one copy `loops` times, which
no cache holds). What the stand-in leaves out is arithmetic too small to time: Ouro's two
sandwich norms per block, the per-loop final norm and the exit gate (vectors of `hidden` values
per token). Its outputs are meaningless (no sandwich norms); only its speed is of use.

Needs gguf-py (the `gguf` package; scripts/test.sh installs it in target/oracle-venv).
"""
import os
import struct
import sys

from gguf import GGUFReader, GGUFValueType

# Ouro keys with a llama equivalent; the Ouro-only ones (loops, exit gate, ...) are dropped
RENAME = {
    "ouro.context_length": "llama.context_length",
    "ouro.embedding_length": "llama.embedding_length",
    "ouro.feed_forward_length": "llama.feed_forward_length",
    "ouro.attention.head_count": "llama.attention.head_count",
    "ouro.attention.head_count_kv": "llama.attention.head_count_kv",
    "ouro.attention.key_length": "llama.attention.key_length",
    "ouro.attention.value_length": "llama.attention.value_length",
    "ouro.rope.dimension_count": "llama.rope.dimension_count",
    "ouro.attention.layer_norm_rms_epsilon": "llama.attention.layer_norm_rms_epsilon",
    "ouro.rope.freq_base": "llama.rope.freq_base",
}
# the tensors of a llama block; Ouro's post_attention_norm / post_ffw_norm have no place there
LLAMA_BLOCK = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def kv_raw(field, key=None):
    """The field's bytes as the file holds them, under `key` if given."""
    parts = [bytes(p.tobytes()) for p in field.parts]
    if key is None:
        return b"".join(parts)
    # parts: key length, key bytes, value type, value parts
    return gguf_string(key) + b"".join(parts[2:])


def kv_u32(key, v):
    return gguf_string(key) + struct.pack("<I", GGUFValueType.UINT32) + struct.pack("<I", v)


def kv_str(key, v):
    return gguf_string(key) + struct.pack("<I", GGUFValueType.STRING) + gguf_string(v)


def main(src, dst):
    if os.path.exists(dst):
        sys.exit(f"{dst} exists: give a new path (this script never overwrites a file)")
    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    if arch != "ouro":
        sys.exit(f"{src}: architecture {arch!r}, not ouro")
    layers = int(r.fields["ouro.block_count"].contents())
    loops = int(r.fields["ouro.num_loops"].contents())
    align = int(r.fields["general.alignment"].contents()) if "general.alignment" in r.fields else 32

    kvs = [kv_str("general.architecture", "llama"), kv_u32("llama.block_count", layers * loops)]
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key.startswith("ouro_quant."):
            continue
        if key.startswith("ouro."):
            if key in RENAME:
                kvs.append(kv_raw(field, RENAME[key]))
            continue
        kvs.append(kv_raw(field))

    # (name, source tensor) in the order the data is laid out
    entries = []
    for t in r.tensors:
        if not t.name.startswith("blk."):
            entries.append((t.name, t))
            continue
        _, i, kind, _ = t.name.split(".", 3)
        if kind not in LLAMA_BLOCK:
            continue
        for loop in range(loops):
            entries.append((f"blk.{loop * layers + int(i)}.{kind}.weight", t))
    entries.sort(key=lambda e: (e[0].startswith("blk."), int(e[0].split(".")[1]) if e[0].startswith("blk.") else 0))

    infos, offset = [], 0
    for name, t in entries:
        dims = [int(d) for d in t.shape]  # gguf-py lists ne[0] first, as the file does
        infos.append(gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", int(t.tensor_type), offset))
        offset += int(t.n_bytes) + (-int(t.n_bytes) % align)

    header = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    header += b"\0" * (-len(header) % align)
    tmp = dst + ".partial"
    with open(src, "rb") as fin, open(tmp, "xb") as fout:  # fails rather than reuse a foreign file
        try:
            fout.write(header)
            for _, t in entries:
                fin.seek(int(t.data_offset))
                n = int(t.n_bytes)
                fout.write(fin.read(n))
                fout.write(b"\0" * (-n % align))
            fout.flush()
            os.link(tmp, dst)  # fails rather than replace a file that appeared meanwhile
        finally:
            os.unlink(tmp)  # ours: made by the open above
    print(f"{dst}: llama, {layers} x {loops} = {layers * loops} blocks, {len(infos)} tensors")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
