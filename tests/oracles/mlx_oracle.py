"""MLX as an external oracle for our MLX outputs (run with the venv that scripts/test.sh builds).

  mlx_oracle.py quantize IN.safetensors OUT.safetensors
      mx.quantize (CPU, affine) of every tensor of IN for every bits x group size; writes
      `<name>.b<bits>.g<gs>.{weight,scales,biases}`.
  mlx_oracle.py logits DIR TOKENS OUT.safetensors
      mlx_lm.load(DIR, trust_remote_code=True) with every float parameter widened to float32,
      then: per-loop logits and exit pdf (full sequence), the model's own output (full sequence),
      and the same output decoded with the KV cache (5 tokens prefilled, then one at a time).
  mlx_oracle.py generate DIR TOKENS N
      mlx_lm.stream_generate, greedy, float32 parameters: prints the generated ids as JSON.
  mlx_oracle.py load DIR
      mx.load of every safetensors file and mlx_lm.load: prints tensor count and model class.
"""

import glob
import json
import sys

import mlx.core as mx


def widen(model):
    from mlx.utils import tree_map

    def f(p):
        if isinstance(p, mx.array) and p.dtype in (mx.bfloat16, mx.float16):
            return p.astype(mx.float32)
        return p

    model.update(tree_map(f, model.parameters()))
    mx.eval(model.parameters())
    return model


def load(path):
    from mlx_lm import load as mlx_load

    model, tok = mlx_load(path, trust_remote_code=True)
    return widen(model), tok


def cmd_quantize(src, dst):
    out = {}
    for name, x in mx.load(src).items():
        for bits in (2, 3, 4, 5, 6, 8):
            for gs in (32, 64, 128):
                if x.shape[-1] % gs:
                    continue
                w, s, b = mx.quantize(x, group_size=gs, bits=bits)
                key = f"{name}.b{bits}.g{gs}"
                out[key + ".weight"] = w
                out[key + ".scales"] = s
                out[key + ".biases"] = b
    mx.save_safetensors(dst, out)


def cmd_logits(path, tokens, dst):
    model, _ = load(path)
    ids = [int(t) for t in tokens.split(",")]
    x = mx.array([ids])
    step_logits, pdf = model.loop_outputs(x)
    default = model(x)
    cache = model.make_cache()
    parts = [model(mx.array([ids[:5]]), cache=cache)]
    for t in ids[5:]:
        parts.append(model(mx.array([[t]]), cache=cache))
    decoded = mx.concatenate(parts, axis=1)
    out = {
        "step_logits": mx.stack([l[0] for l in step_logits], axis=0).astype(mx.float32),
        "exit_pdf": pdf[:, 0, :].astype(mx.float32),
        "logits_default": default[0].astype(mx.float32),
        "decode_logits_default": decoded[0].astype(mx.float32),
    }
    mx.save_safetensors(dst, out)


def cmd_generate(path, tokens, n):
    from mlx_lm import stream_generate

    model, tok = load(path)
    ids = [int(t) for t in tokens.split(",")]
    got = [r.token for r in stream_generate(model, tok, prompt=ids, max_tokens=int(n))]
    print(json.dumps(got))


def cmd_load(path):
    n = 0
    for f in sorted(glob.glob(f"{path}/*.safetensors")):
        n += len(mx.load(f))
    model, _ = load(path)
    print(json.dumps({"tensors": n, "class": type(model).__name__, "layers": len(model.layers)}))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"quantize": cmd_quantize, "logits": cmd_logits, "generate": cmd_generate, "load": cmd_load}[cmd](*args)
