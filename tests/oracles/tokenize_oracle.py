"""Tokenizes texts three ways, none of them ouro-quant's code, for tests/tokenizer.rs.

usage: tokenize_oracle.py HF_DIR FILE.gguf TEXTS.json OUT.json

- "hf": `transformers`' fast tokenizer of HF_DIR/tokenizer.json (`encode(text,
  add_special_tokens=False)`). Loaded as `PreTrainedTokenizerFast(tokenizer_file=...)`, which keeps the
  file's pre-tokenizer: transformers 5's `AutoTokenizer` rebuilds a `GPT2Tokenizer`'s pre-tokenizer from
  the class (plain ByteLevel) and would drop SmolLM2's digit split, unlike the 4.x versions the
  released models and llama.cpp's hash table were made with.
- "llama": llama.cpp's tokenization of FILE.gguf written again from its description: the metadata
  read by gguf-py (tokens, token types, merges, `tokenizer.ggml.pre`); control and user-defined
  tokens matched in the text first (longest first, as `parse_special`), then the regexes the tag names
  in llama.cpp's `llama-vocab.cpp`, applied one after another (text a regex does not match stays a
  piece of its own), bytes mapped as GPT-2 does, and BPE by merge rank.
- "hash": llama.cpp's converter fingerprint of HF_DIR (`get_vocab_base_pre`): SHA-256 of
  `str(tokenizer.encode(chktxt))`.
- "hf_pre_matches": for each tag, whether the HF normalizer + pre-tokenizer split every text and the
  check text into the same pieces as that tag's regexes.
"""
import json
import sys
from hashlib import sha256

import regex
from gguf import GGUFReader
from transformers import PreTrainedTokenizerFast

CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````\"\"\"\"......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
REGEXES = {"gpt-2": [GPT2], "smollm": [r"\p{N}", GPT2]}


def regex_split(text, exprs):
    pieces = [text]
    for e in exprs:
        out = []
        for p in pieces:
            pos = 0
            for m in regex.finditer(e, p):
                if m.start() > pos:
                    out.append(p[pos:m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                pos = m.end()
            if pos < len(p):
                out.append(p[pos:])
        pieces = out
    return pieces


def byte_map():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTES = byte_map()


def bpe(word, ranks):
    parts = list(word)
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get((parts[i], parts[i + 1]))
            if r is not None and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def llama_tokenize(text, tokens, types, ranks, exprs):
    ids = {t: i for i, t in enumerate(tokens)}
    specials = sorted((t for t, ty in zip(tokens, types) if ty in (3, 4)), key=len, reverse=True)
    frags = [(text, False)]
    for s in specials:
        nxt = []
        for f, is_special in frags:
            if is_special or s not in f:
                nxt.append((f, is_special))
                continue
            parts = f.split(s)
            for k, p in enumerate(parts):
                if p:
                    nxt.append((p, False))
                if k + 1 < len(parts):
                    nxt.append((s, True))
        frags = nxt
    out = []
    for f, is_special in frags:
        if is_special:
            out.append(ids[f])
            continue
        for piece in regex_split(f, exprs):
            word = "".join(BYTES[b] for b in piece.encode("utf-8"))
            for t in bpe(word, ranks):
                out.append(ids[t])
    return out


def hf_pieces(tok, text):
    bt = tok.backend_tokenizer
    if bt.normalizer is not None:
        text = bt.normalizer.normalize_str(text)
    if bt.pre_tokenizer is None:
        return [text]
    return [p for p, _ in bt.pre_tokenizer.pre_tokenize_str(text)]


def main():
    hf_dir, gguf_path, texts_path, out_path = sys.argv[1:5]
    texts = json.load(open(texts_path, encoding="utf-8"))
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{hf_dir}/tokenizer.json")
    r = GGUFReader(gguf_path)
    field = lambda k: r.fields[k].contents() if k in r.fields else None
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    merges = field("tokenizer.ggml.merges")
    tag = field("tokenizer.ggml.pre")
    ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(merges)}
    result = {
        "tag": tag,
        "hf": [tok.encode(t, add_special_tokens=False) for t in texts],
        "llama": [llama_tokenize(t, tokens, types, ranks, REGEXES[tag]) for t in texts] if tag in REGEXES else None,
        "hash": sha256(str(tok.encode(CHKTXT)).encode()).hexdigest(),
        "hf_pre_matches": {
            name: all(
                ["".join(BYTES[b] for b in p.encode("utf-8")) for p in regex_split(t, exprs)] == hf_pieces(tok, t)
                for t in texts + [CHKTXT]
            )
            for name, exprs in REGEXES.items()
        },
    }
    json.dump(result, open(out_path, "w", encoding="utf-8"))


main()
