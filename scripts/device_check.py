#!/usr/bin/env python3
"""The runner on one device against the CPU and against upstream: what scripts/device-check.sh
runs. Python's standard library only (the lent GPU machine is bare of our tools; its python3 is
enough), the ouro-quant binary given, and the committed fixtures.

Prints a Markdown table per part and writes the same as JSON (--json-out):
  1. golden checkpoints: `logits --device D` against upstream PyTorch's expected.safetensors
     (the CPU tolerances of tests/model_golden.rs: 1e-4 on hidden states and logits, 1e-5 on the
     exit pdf);
  2. the trained fixture as GGUF Q8_0, Q4_K_M, IQ4_NL and MLX 4-bit: `perplexity` on D and on the
     CPU (all loops, and adaptive exit at q = 0.5; equal within 1e-3 relative) and `run`'s greedy
     tokens (the same 32);
  3. synth ouro-1.4b (generated here) as Q4_K_M and Q8_0: prefill and decode tok/s with all loops
     and at q = 0.5 (the adaptive exit's speed-up), and the peak memory of the run (GPU memory of
     the process from nvidia-smi on CUDA, VmHWM on the CPU) beside what `plan` counts for it.
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")


def read_safetensors(path):
    """name -> (dtype, shape, values as a tuple) for F32 and I64 tensors."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        raw = data[a:b]
        fmt = {"F32": "f", "I64": "q"}.get(t["dtype"])
        if fmt is None:
            continue
        out[name] = (t["dtype"], t["shape"], struct.unpack("<%d%s" % (len(raw) // struct.calcsize(fmt), fmt), raw))
    return out


def max_diff(a, b):
    if len(a) != len(b):
        return float("inf")
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


class Runner:
    def __init__(self, binary, device, work, log):
        self.bin, self.device, self.work, self.log = binary, device, work, log

    def __call__(self, *args, device=None, peak=False):
        """Runs the binary; returns (stdout, seconds, peak bytes or None). Fails loudly."""
        cmd = [self.bin] + [str(a) for a in args]
        if device:
            cmd += ["--device", device]
        print("$ " + " ".join(cmd), file=self.log, flush=True)
        t0 = time.time()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler = PeakSampler(p.pid, device or "cpu") if peak else None
        out, err = p.communicate()
        secs = time.time() - t0
        high = sampler.stop() if sampler else None
        print(err[-4000:], file=self.log, flush=True)
        if p.returncode != 0:
            raise RuntimeError("%s exited %d: %s" % (" ".join(cmd), p.returncode, err.strip()[-2000:]))
        return out, secs, high


class PeakSampler:
    """Highest memory of a process: its GPU memory (nvidia-smi) on CUDA, VmHWM on the CPU."""

    def __init__(self, pid, device):
        self.pid, self.device, self.high, self.done = pid, device, 0, False
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()

    def sample(self):
        if self.device == "cuda":
            q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True)
            for line in q.stdout.splitlines():
                parts = [x.strip() for x in line.split(",")]
                if len(parts) == 2 and parts[0] == str(self.pid) and parts[1].isdigit():
                    self.high = max(self.high, int(parts[1]) << 20)
        else:
            try:
                for line in open("/proc/%d/status" % self.pid):
                    if line.startswith("VmHWM:"):
                        self.high = max(self.high, int(line.split()[1]) << 10)
            except OSError:
                pass

    def loop(self):
        while not self.done:
            self.sample()
            time.sleep(0.2)

    def stop(self):
        self.done = True
        self.t.join()
        return self.high


def golden(run, device):
    rows = []
    for name in ["mha_f32", "gqa_bf16"]:
        d = os.path.join(FIX, "golden", name)
        exp = read_safetensors(os.path.join(d, "expected.safetensors"))
        tokens = ",".join(str(t) for t in exp["tokens"][2])
        out = os.path.join(run.work, "golden-%s-%s.safetensors" % (name, device))
        run("logits", d, "--tokens", tokens, "-o", out, "--force", device=device)
        got = read_safetensors(out)
        row = {"checkpoint": name, "device": device}
        ok = True
        for key, tol in [("step_hidden", 1e-4), ("step_logits", 1e-4), ("gate_logits", 1e-4), ("exit_pdf", 1e-5)]:
            diff = max_diff(got[key][2], exp[key][2])
            row[key] = diff
            ok = ok and diff < tol
        row["pass"] = ok
        rows.append(row)
    return rows


def trained(run, device, prompt):
    src = os.path.join(FIX, "ouro-tiny-trained")
    text = os.path.join(src, "validation.txt")
    rows = []
    for label, args in [("GGUF Q8_0", ["--type", "Q8_0"]), ("GGUF Q4_K_M", ["--type", "Q4_K_M"]), ("GGUF IQ4_NL", ["--type", "IQ4_NL"]),
                        ("MLX 4-bit", ["--format", "mlx", "--bits", "4"])]:
        out = os.path.join(run.work, "trained-" + label.replace(" ", "-"))
        if label.startswith("GGUF"):
            out += ".gguf"
        if not os.path.exists(out):
            run("convert", src, *args, "-o", out)
        res = {}
        for dev in sorted({device, "cpu"}):
            p = json.loads(run("perplexity", out, "--text", text, "--ctx", "128", "--chunks", "8", "--exit-threshold", "0.5", "--json", device=dev)[0])
            g = json.loads(run("run", out, "--prompt-tokens", prompt, "--max-tokens", "32", "--json", device=dev)[0])
            res[dev] = {"ppl_all": p["runs"][0]["ppl"], "ppl_batched": p["batched"]["ppl"], "ppl_q05": p["runs"][1]["ppl"], "tokens": g["tokens"]}
        d, c = res[device], res["cpu"]
        rel = max(abs(d[k] / c[k] - 1.0) for k in ["ppl_all", "ppl_batched", "ppl_q05"])
        same = d["tokens"] == c["tokens"]
        rows.append({"model": label, "device": device, "ppl_all_loops": d["ppl_all"], "ppl_all_loops_cpu": c["ppl_all"], "ppl_q05": d["ppl_q05"],
                     "ppl_q05_cpu": c["ppl_q05"], "max_rel_diff": rel, "same_greedy_tokens": same, "pass": rel <= 1e-3 and same})
    return rows


def synth(run, device, preset, prompt):
    ck = os.path.join(run.work, "synth-" + preset)
    if not os.path.exists(ck):
        run("synth", "--preset", preset, "-o", ck)
    rows = []
    for ty in ["Q4_K_M", "Q8_0"]:
        f = os.path.join(run.work, "synth-%s-%s.gguf" % (preset, ty))
        if not os.path.exists(f):
            run("convert", ck, "--type", ty, "-o", f)
        speeds = {}
        for q in [None, 0.5]:
            extra = [] if q is None else ["--exit-threshold", str(q)]
            out, secs, high = run("run", f, "--prompt-tokens", prompt, "--max-tokens", "64", "--json", *extra, device=device, peak=True)
            s = json.loads(out)["stats"]
            speeds[q] = (s, high)
        s, high = speeds[None]
        sq, _ = speeds[0.5]
        # what plan counts for this run (192 tokens of context, the default f16 KV), to hold
        # against the measured peak: the check of its runtime estimate
        plan = json.loads(run("plan", f, "--memory", "1T", "--kind", device, "--ctx", "192", "--json")[0])
        row = next(r for r in plan["formats"] if r["format"] == "GGUF " + ty)
        rows.append({"model": "%s %s" % (preset, ty), "device": device, "prefill_tok_s": s["prefill_tokens_per_s"], "decode_tok_s": s["decode_tokens_per_s"],
                     "decode_tok_s_q05": sq["decode_tokens_per_s"], "loops_per_token_q05": sq["mean_loops_per_token"],
                     "exit_speedup": sq["decode_tokens_per_s"] / max(s["decode_tokens_per_s"], 1e-9), "peak_bytes": high,
                     "weight_bytes": s["weight_bytes"], "planned_bytes": row["total_bytes"], "kernels": s.get("kernels")})
    return rows


def table(rows, cols):
    def fmt(v):
        if isinstance(v, float):
            return "%.3g" % v if (abs(v) < 1e-2 and v != 0) else "%.4f" % v if abs(v) < 100 else "%.1f" % v
        if isinstance(v, bool):
            return "yes" if v else "NO"
        return str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def machine(device):
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and "cpu" not in info:
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and "flags" not in info:
                have = set(line.split(":", 1)[1].split())
                info["flags"] = " ".join(f for f in ["avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni"] if f in have)
    except OSError:
        pass
    info["cores"] = os.cpu_count()
    if device == "cuda":
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"], capture_output=True, text=True)
        info["gpu"] = q.stdout.strip()
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "metal"])
    ap.add_argument("--work", required=True, help="folder for converted models and outputs")
    ap.add_argument("--preset", default="ouro-1.4b", help="synth preset of part 3")
    ap.add_argument("--parts", default="golden,trained,synth")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    log = open(os.path.join(a.work, "device-check.log"), "a")
    run = Runner(a.bin, a.device, a.work, log)
    parts = a.parts.split(",")
    info = machine(a.device)
    version = subprocess.run([a.bin, "--version"], capture_output=True, text=True).stdout.strip()
    print("# device check: %s on %s, %s" % (version, a.device, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
    print("machine: %s" % json.dumps(info))
    prompt = ",".join(str(100 + 7 * i) for i in range(128))
    report = {"device": a.device, "machine": info, "version": version}
    failed = False
    if "golden" in parts:
        report["golden"] = rows = golden(run, a.device)
        print("\n## golden checkpoints: logits against upstream PyTorch (tolerance 1e-4, exit pdf 1e-5)\n")
        print(table(rows, ["checkpoint", "device", "step_hidden", "step_logits", "gate_logits", "exit_pdf", "pass"]))
        failed |= not all(r["pass"] for r in rows)
    if "trained" in parts:
        report["trained"] = rows = trained(run, a.device, ",".join(str(10 + 7 * i) for i in range(16)))
        print("\n## trained fixture: perplexity (8 chunks of 128) on %s and on the CPU, greedy tokens (32)\n" % a.device)
        print(table(rows, ["model", "device", "ppl_all_loops", "ppl_all_loops_cpu", "ppl_q05", "ppl_q05_cpu", "max_rel_diff", "same_greedy_tokens", "pass"]))
        failed |= not all(r["pass"] for r in rows)
    if "synth" in parts:
        report["synth"] = rows = synth(run, a.device, a.preset, prompt)
        for r in rows:
            r["peak_mib"] = round(r["peak_bytes"] / 2**20) if r["peak_bytes"] else None
            r["weight_mib"] = round(r["weight_bytes"] / 2**20)
            r["planned_mib"] = round(r["planned_bytes"] / 2**20)
        print("\n## synth %s: 128-token prompt, 64 new tokens\n" % a.preset)
        print(table(rows, ["model", "device", "prefill_tok_s", "decode_tok_s", "decode_tok_s_q05", "loops_per_token_q05", "exit_speedup", "weight_mib", "planned_mib", "peak_mib"]))
        print("\npeak: %s" % ("GPU memory of the process (nvidia-smi, sampled every 0.2 s)" if a.device == "cuda" else "the process's peak resident memory (VmHWM)"))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
