"""Helpers of scripts/compare-llama.sh: read what llama.cpp's tools print and compare GGUF files.

usage:
  llama_compare.py mix-log MIX LOG          llama-quantize's log -> fixture rows (mix, tensor, shape, type)
  llama_compare.py same-tensors OURS THEIRS  per-tensor type and byte equality (needs gguf-py) -> JSON
  llama_compare.py ppl-log LOG               llama-perplexity's final estimate -> JSON {ppl, se}
  llama_compare.py kld-log LOG               llama-perplexity --kl-divergence -> JSON {kl_mean, same_top_pct}
  llama_compare.py bench-json FILE           llama-bench -o json -> JSON {prefill, decode} tok/s
  llama_compare.py self-test                 the parsers on lines in llama.cpp's formats

Nothing here runs llama.cpp; the shell script does, and passes the logs.
"""
import json
import re
import sys

# `[  12/ 267]  blk.0.ffn_down.weight - [ 5632,  2048,     1,     1], type =    f16, converting to q6_K .. size = ...`
# `[   3/ 267]  output_norm.weight - [ 2048,     1,     1,     1], type =    f32, size =    0.008 MB`
QUANT_LINE = re.compile(
    r"^\[\s*\d+/\s*\d+\]\s+(?P<name>\S+)\s+-\s+\[(?P<ne>[^\]]*)\],\s+type\s+=\s+(?P<src>\w+),"
    r"(?:\s+converting to (?P<dst>\w+))?"
)


def mix_rows(mix, lines):
    """One row per tensor llama-quantize reports: GGUF name, shape outermost first, the type written."""
    rows = []
    for line in lines:
        m = QUANT_LINE.match(line.strip())
        if not m:
            continue
        ne = [int(x) for x in m.group("ne").split(",") if x.strip()]
        while len(ne) > 1 and ne[-1] == 1:
            ne.pop()
        ty = (m.group("dst") or m.group("src")).upper()
        rows.append((mix, m.group("name"), ",".join(str(d) for d in reversed(ne)), ty))
    return rows


PPL_LINE = re.compile(r"Final estimate: PPL = (?P<ppl>[0-9.]+) \+/- (?P<se>[0-9.]+)")
KLD_LINE = re.compile(r"^Mean\s+KLD:\s+(?P<v>-?[0-9.]+)")
TOP_LINE = re.compile(r"^Same top p:\s+(?P<v>[0-9.]+)")


def ppl(lines):
    for line in lines:
        m = PPL_LINE.search(line)
        if m:
            return {"ppl": float(m.group("ppl")), "se": float(m.group("se"))}
    raise SystemExit("no `Final estimate: PPL = ...` line in the log")


def kld(lines):
    out = {}
    for line in lines:
        m = KLD_LINE.match(line.strip())
        if m:
            out["kl_mean"] = float(m.group("v"))
        m = TOP_LINE.match(line.strip())
        if m:
            out["same_top_pct"] = float(m.group("v"))
    if "kl_mean" not in out:
        raise SystemExit("no `Mean    KLD:` line in the log")
    return out


def bench(entries):
    """llama-bench's JSON: the prompt test (n_gen 0) and the generation test (n_prompt 0)."""
    out = {}
    for e in entries:
        if e.get("n_gen", 0) == 0:
            out["prefill"] = e["avg_ts"]
        elif e.get("n_prompt", 0) == 0:
            out["decode"] = e["avg_ts"]
    return out


def same_tensors(ours, theirs):
    from gguf import GGUFReader

    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    same_type = same_bytes = 0
    differ = []
    for name, t in a.items():
        u = b.get(name)
        if u is None:
            differ.append(f"{name}: missing in {theirs}")
            continue
        if t.tensor_type == u.tensor_type:
            same_type += 1
            if t.data.tobytes() == u.data.tobytes():
                same_bytes += 1
            else:
                differ.append(f"{name}: bytes")
        else:
            differ.append(f"{name}: {t.tensor_type.name} vs {u.tensor_type.name}")
    return {"tensors": len(a), "theirs": len(b), "same_type": same_type, "same_bytes": same_bytes, "differ": differ[:20]}


def self_test():
    log = [
        "[   1/ 267]                    token_embd.weight - [ 2048, 49152,     1,     1], type =    f16, converting to q4_K .. size =   192.00 MiB ->    54.00 MiB",
        "[   2/ 267]                   output_norm.weight - [ 2048,     1,     1,     1], type =    f32, size =    0.008 MB",
        "[  12/ 267]                blk.0.ffn_down.weight - [ 5632,  2048,     1,     1], type =    f16, converting to q6_K .. size =    22.00 MiB ->     9.02 MiB",
        "llama_model_quantize_impl: model size  =  2800.00 MB",
    ]
    assert mix_rows("Q4_K_M", log) == [
        ("Q4_K_M", "token_embd.weight", "49152,2048", "Q4_K"),
        ("Q4_K_M", "output_norm.weight", "2048", "F32"),
        ("Q4_K_M", "blk.0.ffn_down.weight", "2048,5632", "Q6_K"),
    ], mix_rows("Q4_K_M", log)
    assert ppl(["[1]1.9,[2]1.8,", "Final estimate: PPL = 1.8893 +/- 0.01234"]) == {"ppl": 1.8893, "se": 0.01234}
    assert kld(["Mean    KLD:   0.002556 ±   0.000120", "Same top p: 97.120 ± 0.185 %"]) == {"kl_mean": 0.002556, "same_top_pct": 97.12}
    assert bench([{"n_prompt": 128, "n_gen": 0, "avg_ts": 10.5}, {"n_prompt": 0, "n_gen": 32, "avg_ts": 5.5}]) == {"prefill": 10.5, "decode": 5.5}
    print("self-test: ok")


def main(argv):
    if not argv:
        raise SystemExit(__doc__)
    cmd, args = argv[0], argv[1:]
    if cmd == "mix-log":
        mix, log = args
        for row in mix_rows(mix, open(log, errors="replace")):
            print("\t".join(row))
    elif cmd == "same-tensors":
        print(json.dumps(same_tensors(*args)))
    elif cmd == "ppl-log":
        print(json.dumps(ppl(open(args[0], errors="replace"))))
    elif cmd == "kld-log":
        print(json.dumps(kld(open(args[0], errors="replace"))))
    elif cmd == "bench-json":
        print(json.dumps(bench(json.load(open(args[0])))))
    elif cmd == "self-test":
        self_test()
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
