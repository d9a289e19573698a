//! `ouro-quant plan`: its numbers against what `run` measures on the same model, and its CLI.

mod common;

use common::*;

fn json(args: &[&str]) -> serde_json::Value {
    let o = bin().args(args).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn plan_agrees_with_what_run_measures() {
    let d = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-random");
    // the low-bit i-quants are made with an importance matrix (plan sizes them so)
    let im = d.path().join("im.gguf");
    small_imatrix(&src, &im);
    for (ty, label) in [("Q8_0", "GGUF Q8_0"), ("Q4_K_M", "GGUF Q4_K_M"), ("F16", "GGUF F16"), ("IQ4_XS", "GGUF IQ4_XS"), ("IQ3_S", "GGUF IQ3_S"), ("IQ2_M", "GGUF IQ2_M"), ("IQ1_M", "GGUF IQ1_M")] {
        let f = d.path().join(format!("t.{ty}.gguf"));
        let mut c = bin();
        c.arg("convert").arg(&src).args(["--type", ty, "-o"]).arg(&f);
        if matches!(ty, "IQ2_M" | "IQ1_M") {
            c.arg("--imatrix").arg(&im);
        }
        c.assert().success();
        let fs = f.to_str().unwrap();
        // each storage named, and neither named: run and plan share one default
        for (kv, dtype) in [("full", None), ("shared-last", None), ("full", Some("f32")), ("shared-last", Some("f16"))] {
            let dt: Vec<&str> = dtype.map(|d| vec!["--kv-dtype", d]).unwrap_or_default();
            // 7 prompt tokens + 9 generated: the cache holds every token that was fed in
            let run = json(&[&["run", fs, "--prompt-tokens", "5,6,7,8,9,10,11", "--max-tokens", "9", "--kv", kv, "--json"][..], &dt].concat());
            let s = &run["stats"];
            let cached = s["prompt_tokens"].as_u64().unwrap() + s["generated_tokens"].as_u64().unwrap() - 1;
            let ctx = cached.to_string();
            let plan = json(&[&["plan", fs, "--memory", "1000000000", "--ctx", &ctx, "--kv", kv, "--json"][..], &dt].concat());
            let row = plan["formats"].as_array().unwrap().iter().find(|r| r["format"] == label).unwrap();
            assert_eq!(row["weight_bytes"], s["weight_bytes"], "{label}: planned vs measured weights");
            assert_eq!(row["kv_bytes"], s["kv_bytes"], "{label} {kv} {dtype:?}: planned vs measured KV bytes after {cached} tokens");
        }
    }
}

#[test]
fn devices_answer_will_it_fit() {
    // Ouro-2.6B on bluefin: 5.1 GiB free; F16 weights alone (4.97 GiB) + runtime do not fit
    let v = json(&["plan", "--preset", "ouro-2.6b", "--device", "bluefin", "--ctx", "2048", "--json"]);
    let rows = v["formats"].as_array().unwrap();
    let row = |f: &str| rows.iter().find(|r| r["format"] == f).unwrap().clone();
    assert_eq!(v["kind"], "cuda");
    assert_eq!(row("GGUF F16")["fits"], false);
    assert_eq!(row("GGUF F16")["max_ctx"], 0);
    // Q4_K_M: 3 GiB of KV at 2,048 tokens besides the weights and the CUDA runtime leave it just
    // short; half the context fits
    assert_eq!(row("GGUF Q4_K_M")["fits"], false);
    let max = row("GGUF Q4_K_M")["max_ctx"].as_u64().unwrap();
    assert!((1024..2048).contains(&max), "{max}");
    // 1.5 MiB of f16 KV per token for 2.6B (spec section 3)
    assert_eq!(v["kv_bytes_per_token"], 1.5 * 1048576.0);
    assert_eq!(row("GGUF Q4_K_M")["kv_bytes"], 2048u64 * 1572864);
    // the same budget as CPU memory: the embedding counts, the CUDA runtime does not
    let free = 12884901888u64 - 7400000000;
    let cpu = json(&["plan", "--preset", "ouro-2.6b", "--memory", &free.to_string(), "--ctx", "2048", "--json"]);
    assert_eq!(cpu["kind"], "cpu");
    let crow = |f: &str| cpu["formats"].as_array().unwrap().iter().find(|r| r["format"] == f).unwrap().clone();
    let w = |r: &serde_json::Value| r["weight_bytes"].as_u64().unwrap();
    // 2.6B: embedding 49152 x 2048, Q4_K in a Q4_K_M file (144 bytes per 256 values)
    let embd = 49152u64 * 2048 / 256 * 144;
    // on CUDA: the same blocks less the embedding, plus candle's padding (at most 16 Q8_0 blocks,
    // 544 bytes, per matrix: 48 layers x 7 and the output)
    let extra = w(&row("GGUF Q4_K_M")) as i64 - (w(&crow("GGUF Q4_K_M")) - embd) as i64;
    assert!(extra > 0 && extra <= (48 * 7 + 1) * 544, "{extra}");
    // F16 is widened to f32 on CUDA: twice its matrices' bytes (the f32 vectors stay)
    let (f16_embd, vectors) = (49152u64 * 2048 * 2, ((4 * 48 + 2) * 2048 + 1) * 4);
    assert_eq!(w(&row("GGUF F16")), 2 * (w(&crow("GGUF F16")) - f16_embd - vectors) + vectors);
    assert!(w(&row("GGUF IQ4_XS")) > w(&row("GGUF Q8_0")));
    assert!(w(&crow("GGUF IQ4_XS")) < w(&crow("GGUF Q4_K_M")));
    assert_eq!(row("GGUF Q4_K_M")["overhead_bytes"].as_u64().unwrap() + (256 << 20), crow("GGUF Q4_K_M")["overhead_bytes"].as_u64().unwrap() + (512 << 20));
    // a user profile file extends the shipped ones
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("devices.toml");
    std::fs::write(&p, "[big]\ndescription = \"a big box\"\nmemory = 100000000000\n").unwrap();
    let v = json(&["plan", "--preset", "ouro-2.6b", "--device", "big", "--devices", p.to_str().unwrap(), "--json"]);
    assert!(v["formats"].as_array().unwrap().iter().all(|r| r["fits"] == true));
    // unknown device: named, with the known ones
    let o = bin().args(["plan", "--preset", "ouro-1.4b", "--device", "nope"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("--device nope") && e.contains("bluefin"), "{e}");
}

/// The formats a footprint test loads, made from `src` into `dir`.
fn made_formats(src: &std::path::Path, dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![src.to_path_buf()];
    for ty in ["Q8_0", "Q4_K_M", "Q4_1", "IQ4_NL", "IQ4_XS", "F16", "IQ3_S"] {
        let f = dir.join(format!("m.{ty}.gguf"));
        bin().arg("convert").arg(src).args(["--type", ty, "-o"]).arg(&f).assert().success();
        out.push(f);
    }
    for bits in [Some("4"), Some("8"), None] {
        let o = dir.join(format!("mlx-{}", bits.unwrap_or("float")));
        let mut c = bin();
        c.arg("convert").arg(src).args(["--format", "mlx", "-o"]).arg(&o);
        if let Some(b) = bits {
            c.args(["--bits", b]);
        }
        c.assert().success();
        out.push(o);
    }
    out
}

/// What `run --max-memory` and `plan` count before loading (the placement rule applied to a
/// file's headers) is what the loader then holds, for every kind of weight, tied or not.
#[test]
fn the_footprint_counted_before_loading_is_what_the_loader_holds() {
    use ouro_quant::model::placement::Target;
    use ouro_quant::model::source;
    let d = tempfile::tempdir().unwrap();
    let tied = copy_checkpoint(&fixtures().join("tiny-random"));
    edit_config(tied.path(), |c| {
        c.insert("tie_word_embeddings".into(), true.into());
    });
    edit_weights(tied.path(), |t| t.retain(|t| t.spec.name != "lm_head.weight"));
    let mut models = made_formats(&fixtures().join("tiny-random"), d.path());
    let td = d.path().join("tied");
    std::fs::create_dir(&td).unwrap();
    models.extend(made_formats(tied.path(), &td));
    for m in &models {
        let fp = source::footprint(m, Target::Cpu).unwrap();
        let loaded = source::load(m, &candle_core::Device::Cpu).unwrap();
        assert_eq!(fp.weights.counted(Target::Cpu), loaded.model.weight_bytes, "{}", m.display());
        assert_eq!(fp.config.tie_word_embeddings, loaded.model.config.tie_word_embeddings);
    }
}

/// On CUDA the footprint follows docs/runner.md's table, recomputed here from `inspect`'s tensor
/// list: candle's block types as stored plus 512 values of padding, IQ4_NL as Q8_0, F32 as stored,
/// every other type widened to f32; the GGUF embedding in host memory; the exit gate (file metadata) in f32.
#[test]
fn the_cuda_footprint_follows_the_documented_rule() {
    use ouro_quant::model::placement::Target;
    use ouro_quant::model::source;
    let d = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-random");
    for ty in ["Q4_K_M", "Q8_0", "IQ4_NL", "F16", "Q4_1"] {
        let f = d.path().join(format!("m.{ty}.gguf"));
        bin().arg("convert").arg(&src).args(["--type", ty, "-o"]).arg(&f).assert().success();
        let v = json(&["inspect", f.to_str().unwrap(), "--tensors", "--json"]);
        let (mut device, mut host) = (0u64, 0u64);
        for t in v["tensor_table"].as_array().unwrap() {
            let bytes = t["bytes"].as_u64().unwrap();
            let numel: u64 = t["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).product();
            // (values per block, bytes per block) of the types candle multiplies on CUDA
            let block = match t["dtype"].as_str().unwrap() {
                "Q4_0" => Some((32, 18)),
                "Q4_1" => Some((32, 20)),
                "Q5_0" => Some((32, 22)),
                "Q5_1" => Some((32, 24)),
                "Q8_0" => Some((32, 34)),
                "Q2_K" => Some((256, 84)),
                "Q3_K" => Some((256, 110)),
                "Q4_K" => Some((256, 144)),
                "Q5_K" => Some((256, 176)),
                "Q6_K" => Some((256, 210)),
                _ => None,
            };
            if t["name"] == "token_embd.weight" {
                host += bytes;
            } else if t["dtype"] == "IQ4_NL" {
                // rewritten as Q8_0: 34 bytes per 32 values, and Q8_0's padding
                device += numel / 32 * 34 + 16 * 34;
            } else if t["dtype"] == "F32" {
                device += bytes;
            } else if let Some((values, size)) = block {
                device += bytes + 512 / values * size;
            } else {
                device += numel * 4;
            }
        }
        device += (v["hidden_size"].as_u64().unwrap() + 1) * 4;
        let fp = source::footprint(&f, Target::Cuda).unwrap();
        assert_eq!((fp.weights.device, fp.weights.host), (device, host), "{ty}");
        assert_eq!(fp.weights.counted(Target::Cuda), device);
        assert_eq!(fp.weights.counted(Target::Metal), device + host);
    }
}

#[test]
fn max_memory_takes_sizes_and_counts_scratch() {
    let m = fixtures().join("tiny-random");
    let run = |budget: &str| bin().arg("run").arg(&m).args(["--prompt-tokens", "1,2,3", "--max-tokens", "4", "--max-memory", budget]).output().unwrap();
    assert_eq!(run("1G").status.code(), Some(0));
    assert_eq!(run("0.5GiB").status.code(), Some(0));
    let o = run("10KiB");
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("--max-memory 10240") && e.contains("of scratch for a 3-token prefill"), "{e}");
    let o = run("4.6X");
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown unit `X`"));
}

/// Where our kernels do not run (`OURO_QUANT_KERNELS=candle` stands for a CPU without them), the
/// loader widens IQ4_XS to f32, and plan counts it so.
#[test]
fn plan_counts_the_widened_copy_where_our_kernels_do_not_run() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("t.IQ4_XS.gguf");
    bin().arg("convert").arg(fixtures().join("tiny-random")).args(["--type", "IQ4_XS", "-o"]).arg(&f).assert().success();
    let weights = |kernels: &str| {
        let o = bin().env("OURO_QUANT_KERNELS", kernels).arg("run").arg(&f).args(["--prompt-tokens", "5,6", "--max-tokens", "2", "--json"]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let run: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let o = bin().env("OURO_QUANT_KERNELS", kernels).arg("plan").arg(&f).args(["--memory", "1G", "--json"]).output().unwrap();
        let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let row = plan["formats"].as_array().unwrap().iter().find(|r| r["format"] == "GGUF IQ4_XS").unwrap().clone();
        assert_eq!(row["weight_bytes"], run["stats"]["weight_bytes"], "kernels `{kernels}`");
        run["stats"]["weight_bytes"].as_u64().unwrap()
    };
    let widened = weights("candle");
    if ouro_quant::model::qkernel::selected().is_some() {
        assert!(widened > 3 * weights(""), "the widened copy is several times the blocks");
    }
}
