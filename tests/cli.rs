//! One tool: the commands describe what they are given, name outputs by one rule, and say what
//! their figures mean.

mod common;

use common::*;

#[test]
fn inspect_describes_our_mlx_directories_and_convert_says_it_is_already_converted() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("mx");
    bin().arg("convert").arg(fixtures().join("ouro-tiny-trained")).args(["--format", "mlx", "--bits", "8", "--group-size", "32", "-o"]).arg(&out).assert().success();
    let o = bin().args(["inspect", "--json"]).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["bits"].as_u64(), v["group_size"].as_u64()), (Some(8), Some(32)));
    assert_eq!(v["written_by_ouro_quant"], true);
    // sizes measured here, not taken from the report's own code
    let on_disk: u64 = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert_eq!(v["bytes_on_disk"].as_u64(), Some(on_disk));
    let weights = std::fs::metadata(out.join("model.safetensors")).unwrap().len() as f64;
    let bpw = v["bits_per_weight"].as_f64().unwrap();
    assert!((bpw - weights * 8.0 / v["parameters"].as_f64().unwrap()).abs() < 1e-9);
    // 8-bit codes plus a bf16 scale and bias per 32: 9 bits, a little more with the float norms
    assert!((9.0..9.6).contains(&bpw), "{bpw}");
    let text = bin().arg("inspect").arg(&out).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("8-bit affine, group size 32") && text.contains("written by     ouro-quant"), "{text}");
    // convert reads HF checkpoints: an MLX directory is named as one
    let o = bin().arg("convert").arg(&out).arg("-o").arg(d.path().join("x.gguf")).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is an MLX directory"));
}

#[test]
fn default_output_names_follow_the_folder_for_both_formats() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("My-Ouro");
    std::fs::create_dir(&m).unwrap();
    for e in std::fs::read_dir(fixtures().join("ouro-tiny-trained")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
    }
    // the fixture's config names another model in _name_or_path: the folder decides
    bin().current_dir(d.path()).args(["convert", "My-Ouro", "--type", "Q8_0"]).assert().success();
    bin().current_dir(d.path()).args(["convert", "My-Ouro", "--format", "mlx", "--bits", "8"]).assert().success();
    assert!(d.path().join("My-Ouro-Q8_0.gguf").is_file());
    assert!(d.path().join("My-Ouro-8bit").join("config.json").is_file());
}

#[test]
fn plan_names_what_it_planned_and_where_the_context_limit_comes_from() {
    let o = bin().args(["plan", "--preset", "ouro-1.4b", "--memory", "100000000000", "--ctx", "1024"]).output().unwrap();
    assert!(o.status.success());
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.starts_with("preset ouro-1.4b on "), "{t}");
    // 100 GB fits far more than 65,536 tokens: the limit shown is the model's
    assert!(t.contains("65536 (model)"), "{t}");
    let o = bin().args(["plan", "--preset", "ouro-1.4b", "--memory", "100000000000", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["model"], "preset ouro-1.4b");
    assert_eq!(v["max_position_embeddings"], 65536);
}

#[test]
fn the_model_layer_knows_no_validation_policy() {
    // data flows one way: read -> quantize -> write -> verify; the model does not import eval
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for dir in ["model", "gguf", "mlx", "checkpoint", "quant"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            let text = std::fs::read_to_string(&p).unwrap();
            for higher in ["crate::eval", "crate::batch"] {
                assert!(!text.contains(higher), "{} uses {higher}", p.display());
            }
        }
    }
}

#[test]
fn readme_is_a_landing_page_whose_links_resolve() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.len() < 9000, "README.md is {} bytes: detail belongs in docs/", readme.len());
    // the Rust version it states is Cargo.toml's
    let cargo = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let rv = cargo.lines().find_map(|l| l.strip_prefix("rust-version = \"")).unwrap().trim_end_matches('"');
    assert!(readme.contains(&format!("Rust {rv} or newer")), "README states another Rust version than {rv}");
    assert!(readme.contains("cargo install --path .") && readme.contains("scripts/test.sh"));
    let mut pages = vec![root.join("README.md")];
    for dir in ["docs", "formats"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "md") {
                pages.push(p);
            }
        }
    }
    let mut checked = 0;
    for page in pages {
        let text = std::fs::read_to_string(&page).unwrap();
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = rest[..end].split('#').next().unwrap();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") || target.contains(' ') {
                continue;
            }
            let resolved = page.parent().unwrap().join(target);
            assert!(resolved.exists(), "{}: link to {target} does not resolve", page.display());
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} links checked");
}

#[test]
fn predicted_gguf_sizes_are_the_written_sizes_for_every_type() {
    let d = tempfile::tempdir().unwrap();
    let src = fixtures().join("ouro-tiny-trained");
    let inspected: serde_json::Value = serde_json::from_slice(&bin().args(["inspect", "--json"]).arg(&src).output().unwrap().stdout).unwrap();
    let mut inspect_rows = 0;
    for ty in ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q4_0", "IQ4_NL"] {
        let out = d.path().join(format!("{ty}.gguf"));
        let plan: serde_json::Value =
            serde_json::from_slice(&bin().arg("convert").arg(&src).args(["--type", ty, "--dry-run", "--json"]).output().unwrap().stdout).unwrap();
        bin().arg("convert").arg(&src).args(["--type", ty, "-o"]).arg(&out).assert().success();
        let written = std::fs::metadata(&out).unwrap().len();
        assert_eq!(plan["file_bytes"].as_u64(), Some(written), "{ty}: --dry-run");
        if let Some(row) = inspected["output_sizes"].as_array().unwrap().iter().find(|r| r["format"] == format!("GGUF {ty}")) {
            assert_eq!(row["bytes"].as_u64(), Some(written), "{ty}: inspect");
            inspect_rows += 1;
        }
    }
    assert_eq!(inspect_rows, 3, "inspect predicts F16, Q8_0 and Q4_K_M");
}

#[test]
fn every_json_result_names_its_schema() {
    let d = tempfile::tempdir().unwrap();
    let fx = fixtures().join("ouro-tiny-trained");
    let fx = fx.to_str().unwrap();
    let gguf = d.path().join("x.gguf");
    let g = gguf.to_str().unwrap();
    let l = d.path().join("l.safetensors");
    let s = d.path().join("s");
    let text = format!("{fx}/validation.txt");
    let runs: Vec<(Vec<&str>, &str)> = vec![
        (vec!["convert", fx, "-o", g, "--json"], "ouro-quant-convert-1"),
        (vec!["convert", fx, "--dry-run", "--json"], "ouro-quant-convert-plan-1"),
        (vec!["inspect", fx, "--json"], "ouro-quant-inspect-1"),
        (vec!["inspect", g, "--json"], "ouro-quant-inspect-gguf-1"),
        (vec!["inspect", "--verify", g, "--json"], "ouro-quant-verify-1"),
        (vec!["run", g, "--prompt-tokens", "5,6", "--max-tokens", "2", "--json"], "ouro-quant-run-1"),
        (vec!["perplexity", g, "--text", &text, "--chunks", "1", "--json"], "ouro-quant-perplexity-1"),
        (vec!["validate", "--reference", fx, "--candidate", g, "--text", &text, "--ctx", "64", "--chunks", "1", "--json"], "ouro-quant-validate-1"),
        (vec!["plan", "--preset", "tiny", "--memory", "1000000000", "--json"], "ouro-quant-plan-1"),
        (vec!["logits", g, "--tokens", "1,2", "-o", l.to_str().unwrap(), "--json"], "ouro-quant-logits-1"),
        (vec!["synth", "--preset", "tiny", "-o", s.to_str().unwrap(), "--json"], "ouro-quant-synth-1"),
    ];
    for (args, schema) in runs {
        let o = bin().args(&args).output().unwrap();
        assert!(matches!(o.status.code(), Some(0) | Some(1)), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert_eq!(v["schema"], schema, "{args:?}");
    }
}
