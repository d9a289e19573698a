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
    assert_eq!(row("GGUF F16")["fits"], false);
    assert_eq!(row("GGUF F16")["max_ctx"], 0);
    assert_eq!(row("GGUF Q4_K_M")["fits"], true);
    // 1.5 MiB of f16 KV per token for 2.6B (spec section 3)
    assert_eq!(v["kv_bytes_per_token"], 1.5 * 1048576.0);
    assert_eq!(row("GGUF Q4_K_M")["kv_bytes"], 2048u64 * 1572864);
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
