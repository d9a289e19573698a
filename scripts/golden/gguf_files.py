"""The golden llama.cpp-layout GGUF files (fixtures/golden/gguf/), written with gguf-py alone.

usage: gguf_files.py CHECKPOINT_DIR F32|Q8_0 OUT.gguf [--compare GOLDEN.gguf]

An independent writer (llama.cpp's gguf package, none of ouro-quant's code): the `ouro` keys from
config.json (llama-style hyper-parameters, `ouro.num_loops`, `ouro.skip_loop_final_norm`, the exit
gate as `ouro.exit_gate.weight`/`.bias`), a gpt2-style tokenizer from tokenizer.json (pre-tokenizer
tag `smollm`, special tokens CONTROL, the vocabulary padded to vocab_size with `[PADn]` tokens of
type UNUSED; bos/eos/pad from config.json), and the tensors in llama.cpp's order and names with the
Q and K rows permuted for its rope, 2-D weights quantized by gguf-py (its Q8_0 is ggml's reference
quantizer), norms F32. With --compare, checks every key, value and tensor byte against a golden
file and the whole file's bytes. Needs `gguf` (PyPI 0.19.0) and numpy: target/oracle-venv has both.
"""
import hashlib
import json
import os
import struct
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize

LAYER = [
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("input_layernorm.weight", "attn_norm.weight"),
    ("input_layernorm_2.weight", "post_attention_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("post_attention_layernorm_2.weight", "post_ffw_norm.weight"),
]


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    out = {}
    for k, v in header.items():
        b = data[v["data_offsets"][0]:v["data_offsets"][1]]
        if v["dtype"] == "BF16":
            a = (np.frombuffer(b, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif v["dtype"] == "F32":
            a = np.frombuffer(b, dtype="<f4")
        else:
            raise SystemExit(f"{path}: tensor {k}: dtype {v['dtype']} not handled")
        out[k] = a.reshape(v["shape"]).copy()
    return out


def rope_permute(w, heads):
    """HF's half/half rotary layout -> llama.cpp's interleaved pairs, per head."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write(ckpt, kind, out):
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    tok = json.load(open(os.path.join(ckpt, "tokenizer.json")))
    w = read_safetensors(os.path.join(ckpt, "model.safetensors"))
    arch = "ouro"
    g = GGUFWriter(out, arch)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim", cfg["hidden_size"] // heads)
    g.add_context_length(cfg["max_position_embeddings"])
    g.add_embedding_length(cfg["hidden_size"])
    g.add_block_count(cfg["num_hidden_layers"])
    g.add_feed_forward_length(cfg["intermediate_size"])
    g.add_head_count(heads)
    g.add_head_count_kv(kv)
    g.add_key_length(hd)
    g.add_value_length(hd)
    g.add_rope_dimension_count(hd)
    g.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    g.add_rope_freq_base(cfg["rope_theta"])
    g.add_uint32(f"{arch}.num_loops", cfg["total_ut_steps"])
    g.add_bool(f"{arch}.skip_loop_final_norm", False)
    g.add_array(f"{arch}.exit_gate.weight", [float(x) for x in w["model.early_exit_gate.weight"].reshape(-1)])
    g.add_float32(f"{arch}.exit_gate.bias", float(w["model.early_exit_gate.bias"].reshape(-1)[0]))
    g.add_file_type(LlamaFileType.ALL_F32 if kind == "F32" else LlamaFileType.MOSTLY_Q8_0)

    vocab = {i: t for t, i in tok["model"]["vocab"].items()}
    special = {a["id"] for a in tok["added_tokens"] if a.get("special")}
    for a in tok["added_tokens"]:
        vocab[a["id"]] = a["content"]
    tokens, types = [], []
    for i in range(cfg["vocab_size"]):
        if i in vocab:
            tokens.append(vocab[i])
            types.append(TokenType.CONTROL if i in special else TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    g.add_tokenizer_model("gpt2")
    g.add_tokenizer_pre("smollm")
    g.add_token_list(tokens)
    g.add_token_types(types)
    g.add_token_merges(merges)
    g.add_bos_token_id(cfg["bos_token_id"])
    g.add_eos_token_id(cfg["eos_token_id"])
    g.add_pad_token_id(cfg["pad_token_id"])
    g.add_add_bos_token(False)

    def put(name, a):
        if a.ndim == 2 and kind == "Q8_0":
            g.add_tensor(name, quantize(a, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            g.add_tensor(name, a.astype(np.float32))

    put("token_embd.weight", w["model.embed_tokens.weight"])
    if not cfg.get("tie_word_embeddings"):
        put("output.weight", w["lm_head.weight"])
    put("output_norm.weight", w["model.norm.weight"])
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in LAYER:
            a = w[f"model.layers.{i}.{hf}"]
            if gg == "attn_q.weight":
                a = rope_permute(a, heads)
            elif gg == "attn_k.weight":
                a = rope_permute(a, kv)
            put(f"blk.{i}.{gg}", a)
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()


def compare(ours, golden):
    a, b = GGUFReader(ours), GGUFReader(golden)
    bad = []
    for k, f in b.fields.items():
        o = a.fields.get(k)
        if o is None or o.types != f.types or o.contents() != f.contents():
            bad.append(f"key {k}")
    bad += [f"extra key {k}" for k in a.fields if k not in b.fields]
    ta = {t.name: t for t in a.tensors}
    for t in b.tensors:
        u = ta.get(t.name)
        if u is None or u.tensor_type != t.tensor_type or list(u.shape) != list(t.shape) or u.data.tobytes() != t.data.tobytes():
            bad.append(f"tensor {t.name}")
    sha = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (ours, golden)]
    print(f"{golden}: {len(b.fields)} keys and {len(b.tensors)} tensors compared, {len(bad)} differ; "
          f"whole file {'identical' if sha[0] == sha[1] else 'differs'} (sha256 {sha[1][:16]}...)")
    for x in bad[:20]:
        print("  DIFFERS:", x)
    return not bad


def main(argv):
    if len(argv) not in (3, 5) or argv[1] not in ("F32", "Q8_0"):
        raise SystemExit(__doc__)
    if os.path.exists(argv[2]):
        raise SystemExit(f"{argv[2]} exists: give a new path")
    write(argv[0], argv[1], argv[2])
    if len(argv) == 5:
        sys.exit(0 if compare(argv[2], argv[4]) else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
