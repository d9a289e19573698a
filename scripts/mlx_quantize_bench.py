"""mx.quantize (MLX CPU) on the tensors ouro-quant quantizes for an MLX output, for the benchmark in
scripts/bench-mlx.sh. Prints JSON: seconds spent loading, quantizing (mx.eval of each result) and
peak RSS.

  python scripts/mlx_quantize_bench.py MODEL_DIR BITS GROUP_SIZE
"""

import json
import resource
import sys
import time

import mlx.core as mx


def main(model, bits, gs):
    bits, gs = int(bits), int(gs)
    quantized = ("embed_tokens", "_proj", "lm_head")
    t0 = time.perf_counter()
    weights = mx.load(f"{model}/model.safetensors")
    t_load = time.perf_counter() - t0
    n = 0
    t_quant = 0.0
    for name in sorted(weights):
        w = weights[name]
        if w.ndim != 2 or not any(k in name for k in quantized) or w.shape[-1] % gs:
            continue
        t = time.perf_counter()
        q = mx.quantize(w, group_size=gs, bits=bits)
        mx.eval(*q)
        t_quant += time.perf_counter() - t
        n += w.size
        del q
        weights[name] = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"tool": "mx.quantize", "bits": bits, "group_size": gs, "parameters": n,
                      "load_s": t_load, "quantize_s": t_quant, "peak_rss_bytes": peak}))


if __name__ == "__main__":
    main(*sys.argv[1:])
