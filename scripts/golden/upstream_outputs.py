"""The upstream outputs of a golden checkpoint (fixtures/golden/{mha_f32,gqa_bf16}/expected.*).

usage: upstream_outputs.py CHECKPOINT_DIR UPSTREAM_CODE_DIR OUT_DIR [--compare EXPECTED.safetensors]

CHECKPOINT_DIR: config.json + model.safetensors (+ tokenizer.json), and its expected.safetensors,
whose `tokens` are reused (the checkpoints and tokens are data: the generators that drew them are
not kept; expected.json records their seeds). UPSTREAM_CODE_DIR: `configuration_ouro.py` and
`modeling_ouro.py` as published with ByteDance/Ouro-1.4B on Hugging Face. Needs torch (2.9.1 made
the stored files) and transformers 4.57.6. Runs upstream `OuroForCausalLM` in float32 with eager
attention and writes OUT_DIR/expected.safetensors and expected.json with every tensor the golden
README lists; --compare prints each tensor's largest difference from a stored file (a correct run
lands within ~1e-5; the stored ones came from torch 2.9.1+cu128 on CPU).

This machine has neither torch nor access to Hugging Face: the script follows the published code's
interface (`OuroModel.forward` returning the per-loop states and gate logits after `model.norm`, and
`OuroForCausalLM.forward`'s `exit_at_step`, `exit_threshold`, `use_weighted_exit`) and has not been
run in this repository; its first run is the check.
"""
import json
import os
import shutil
import sys
import tempfile

import torch
import transformers
from safetensors.torch import load_file, save_file


def main(argv):
    if len(argv) not in (3, 5):
        raise SystemExit(__doc__)
    ckpt, code, out = argv[:3]
    os.makedirs(out, exist_ok=False)
    tokens = load_file(os.path.join(ckpt, "expected.safetensors"))["tokens"].to(torch.long)
    with tempfile.TemporaryDirectory() as tmp:
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            if os.path.exists(os.path.join(ckpt, f)):
                shutil.copy(os.path.join(ckpt, f), tmp)
        for f in ("configuration_ouro.py", "modeling_ouro.py"):
            shutil.copy(os.path.join(code, f), tmp)
        cfg = json.load(open(os.path.join(tmp, "config.json")))
        cfg["auto_map"] = {"AutoConfig": "configuration_ouro.OuroConfig", "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"}
        json.dump(cfg, open(os.path.join(tmp, "config.json"), "w"))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, trust_remote_code=True, torch_dtype=torch.float32, attn_implementation="eager"
        ).eval()
    T = cfg["total_ut_steps"]
    ids = tokens.unsqueeze(0)
    prefill, thresholds = 5, [0.2, 0.5, 0.8, 0.95]
    res = {"tokens": tokens}
    with torch.no_grad():
        _, hidden, gates = model.model(input_ids=ids, use_cache=False)[:3]
        res["step_hidden"] = torch.stack([h[0] for h in hidden])
        res["step_logits"] = torch.stack([model.lm_head(h)[0] for h in hidden])
        res["gate_logits"] = torch.stack([g[0, :, 0] for g in gates])
        lam = torch.sigmoid(res["gate_logits"])
        pdf, rest = [], torch.ones_like(lam[0])
        for t in range(T):
            pdf.append(lam[t] * rest if t < T - 1 else rest)
            rest = rest * (1 - lam[t])
        res["exit_pdf"] = torch.stack(pdf)
        res["logits_default"] = model(input_ids=ids, use_cache=False).logits[0]
        for k in range(T):
            res[f"logits_exit_at_step_{k}"] = model(input_ids=ids, exit_at_step=k, use_cache=False).logits[0]
        for q in thresholds:
            res[f"logits_threshold_{q}"] = model(input_ids=ids, exit_threshold=q, use_cache=False).logits[0]
        saved = model.early_exit_threshold
        model.early_exit_threshold = None  # else the config's threshold decides before the weighting
        res["logits_weighted"] = model(input_ids=ids, use_weighted_exit=True, use_cache=False).logits[0]
        model.early_exit_threshold = saved
        # the per-(loop, layer) KV cache: prefill, then one token at a time
        o = model.model(input_ids=ids[:, :prefill], use_cache=True)
        cache, steps = o[0].past_key_values, [[model.lm_head(h)[0] for h in o[1]]]
        for i in range(prefill, ids.shape[1]):
            o = model.model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True)
            cache = o[0].past_key_values
            steps.append([model.lm_head(h)[0] for h in o[1]])
        res["decode_step_logits"] = torch.stack([torch.cat([s[t] for s in steps]) for t in range(T)])
        gen = model.generate(ids[:, :prefill], max_new_tokens=12, do_sample=False, use_cache=False)
        res["greedy_12"] = gen[0]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    res = {k: v.contiguous() if v.dtype == torch.long else v.float().contiguous() for k, v in res.items()}
    save_file(res, os.path.join(out, "expected.safetensors"))
    json.dump({
        "loss_weighted_labels_eq_tokens": loss,
        "produced_by": "upstream OuroForCausalLM (modeling_ouro.py), float32, eager attention",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "n": int(tokens.numel()), "prefill": prefill, "thresholds": thresholds,
        "tensors": {k: [str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in res.items()},
    }, open(os.path.join(out, "expected.json"), "w"), indent=1)
    if len(argv) == 5:
        want = load_file(argv[4])
        for k, v in want.items():
            if k not in res:
                print(f"{k}: not computed")
            elif v.dtype == torch.long:
                print(f"{k}: {'same' if torch.equal(v, res[k]) else 'DIFFERS'}")
            else:
                print(f"{k}: max abs diff {(v.float() - res[k]).abs().max().item():.3e}")


if __name__ == "__main__":
    main(sys.argv[1:])
