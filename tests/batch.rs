//! `ouro-quant batch` and `scripts/convert-ouro.sh` on the tiny fixtures.

mod common;

use std::path::Path;

use common::*;
use sha2::{Digest, Sha256};

fn outcomes(dir: &Path) -> Vec<serde_json::Value> {
    serde_json::from_slice::<serde_json::Value>(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap().as_array().unwrap().clone()
}

fn statuses(dir: &Path) -> Vec<String> {
    outcomes(dir).iter().map(|o| o["status"].as_str().unwrap().to_string()).collect()
}

/// Every line of SHA256SUMS matches the file's bytes, and every output file is listed.
fn check_sums(dir: &Path) -> usize {
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    let mut n = 0;
    for line in sums.lines() {
        let (h, f) = line.split_once("  ").unwrap();
        let got: String = Sha256::digest(std::fs::read(dir.join(f)).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(h, got, "{f}");
        n += 1;
    }
    n
}

#[test]
fn the_release_script_converts_the_fixtures_and_resumes() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/convert-ouro.sh");
    let bin_path = assert_cmd::cargo::cargo_bin("ouro-quant");
    let run = || {
        std::process::Command::new("bash")
            .arg(&script)
            .arg(&out)
            .arg(format!("tiny={}", fixtures().join("tiny-random").display()))
            .arg(format!("trained={}", fixtures().join("ouro-tiny-trained").display()))
            .env("OURO_QUANT", &bin_path)
            .output()
            .unwrap()
    };
    let o = run();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(statuses(&out), vec!["converted"; 12]);
    // names as llama.cpp and mlx-community users expect
    for n in ["trained-Q8_0.gguf", "trained-Q6_K.gguf", "trained-Q4_K_M.gguf", "trained-8bit", "trained-4bit", "trained-4bit-gs32"] {
        assert!(out.join(n).exists(), "{n}");
    }
    let files = check_sums(&out);
    assert!(files > 12, "{files} files listed");
    let before = std::fs::read(out.join("SHA256SUMS")).unwrap();
    let mtime = std::fs::metadata(out.join("tiny-Q8_0.gguf")).unwrap().modified().unwrap();
    let sizes = |dir: &Path| -> Vec<(String, u64)> {
        outcomes(dir).iter().map(|o| (o["output"].as_str().unwrap().to_string(), o["bytes"].as_u64().unwrap())).collect()
    };
    let converted_sizes = sizes(&out);
    // a GGUF output's size is the file's, measured here
    let q8 = converted_sizes.iter().find(|(n, _)| n == "tiny-Q8_0.gguf").unwrap().1;
    assert_eq!(q8, std::fs::metadata(out.join("tiny-Q8_0.gguf")).unwrap().len());
    // resume: everything skipped, nothing rewritten
    let o = run();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(statuses(&out), vec!["skipped"; 12]);
    // one size per output, measured the same way when converted and when skipped
    assert_eq!(sizes(&out), converted_sizes);
    assert_eq!(std::fs::read(out.join("SHA256SUMS")).unwrap(), before);
    assert_eq!(std::fs::metadata(out.join("tiny-Q8_0.gguf")).unwrap().modified().unwrap(), mtime);
    // a changed output is not trusted: refused, then redone with --force
    let p = out.join("tiny-4bit").join("config.json");
    let mut cfg = std::fs::read(&p).unwrap();
    cfg.push(b'\n');
    std::fs::write(&p, &cfg).unwrap();
    let o = bin().arg("batch").arg(out.join("ouro-all.toml")).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let failed: Vec<serde_json::Value> = outcomes(&out).into_iter().filter(|o| o["status"] == "failed").collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["output"], "tiny-4bit");
    assert!(failed[0]["error"].as_str().unwrap().contains("--force"));
    bin().arg("batch").arg(out.join("ouro-all.toml")).arg("--force").assert().success();
    assert_eq!(std::fs::read(out.join("SHA256SUMS")).unwrap(), before, "redone byte for byte");
}

#[test]
fn a_failing_target_does_not_stop_the_others_and_validation_is_summarised() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m.toml");
    // a second source whose weights are damaged: its jobs fail, the good source's go on
    let bad = common::copy_checkpoint(&fixtures().join("golden/gqa_bf16"));
    let w = bad.path().join("model.safetensors");
    let b = std::fs::read(&w).unwrap();
    std::fs::write(&w, &b[..b.len() - 64]).unwrap();
    std::fs::write(
        &m,
        format!(
            "output_dir = \"o\"\n[validate]\ntext = \"{}\"\nctx = 128\nchunks = 20\n[[sources]]\nname = \"t\"\npath = \"{}\"\n\
             [[sources]]\nname = \"u\"\npath = \"{}\"\n\
             [[targets]]\nformat = \"gguf\"\ntype = \"Q8_0\"\nvalidate = true\n\
             [[targets]]\nformat = \"mlx\"\nbits = 8\nvalidate = true\n\
             [[targets]]\nformat = \"gguf\"\ntype = \"Q4_K_M\"\nname = \"custom-{{name}}.gguf\"\n",
            fixtures().join("ouro-tiny-trained/validation.txt").display(),
            fixtures().join("ouro-tiny-trained").display(),
            bad.path().display()
        ),
    )
    .unwrap();
    let o = bin().arg("batch").arg(&m).args(["--jobs", "2"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let out = d.path().join("o");
    let all = outcomes(&out);
    let by = |n: &str| all.iter().find(|o| o["output"] == n).unwrap_or_else(|| panic!("{n} in {all:?}")).clone();
    for n in ["u-Q8_0.gguf", "u-8bit", "custom-u.gguf"] {
        assert_eq!(by(n)["status"], "failed");
        assert!(by(n)["error"].as_str().unwrap().contains("truncated"), "{}", by(n));
        assert!(!out.join(n).exists());
    }
    for n in ["t-Q8_0.gguf", "t-8bit"] {
        let o = by(n);
        assert_eq!(o["status"], "converted", "{o}");
        assert_eq!(o["validation_pass"], true, "{o}");
        // measured (ctx 128, 20 chunks): ppl ratio 0.99957 / 1.00034, mean KL 8.6e-5 / 6.8e-5,
        // exit agreement 99.7% / 100% (GGUF Q8_0 / MLX 8-bit); bounds about twice the distance
        let (r, kl, agree) = (o["ppl_ratio"].as_f64().unwrap(), o["kl_mean"].as_f64().unwrap(), o["exit_agreement_pct"].as_f64().unwrap());
        assert!((r - 1.0).abs() < 1e-3, "{n}: ppl ratio {r}");
        assert!(kl < 2e-4, "{n}: mean KL {kl}");
        assert!(agree >= 99.0, "{n}: exit agreement {agree}%");
    }
    assert_eq!(by("custom-t.gguf")["status"], "converted");
    // validated outputs carry the summary in their model cards, and the GGUF card is checksummed
    let card = std::fs::read_to_string(out.join("t-Q8_0.md")).unwrap();
    assert!(card.contains("## Validation") && card.contains("pass against the 8bit profile"), "{card}");
    let card = std::fs::read_to_string(out.join("t-8bit/README.md")).unwrap();
    assert!(card.contains("| loop 4 |") && card.contains("pass against the 8bit profile"), "{card}");
    assert!(!out.join("custom-t.md").exists(), "not validated, no card");
    assert!(std::fs::read_to_string(out.join("SHA256SUMS")).unwrap().contains("  t-Q8_0.md\n"));
    check_sums(&out);
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(md.contains("| t-Q8_0.gguf | t |") && md.contains("failed"), "{md}");
}

#[test]
fn bad_manifests_are_named() {
    let d = tempfile::tempdir().unwrap();
    let cases = [
        ("output_dir = \"o\"\n[[sources]]\nname = \"a\"\npath = \"x\"\n", "[[targets]]"),
        ("output_dir = \"o\"\nbogus = 1\n", "bogus"),
        ("output_dir = \"o\"\n[[sources]]\nname = \"a\"\npath = \"x\"\n[[targets]]\nformat = \"gguf\"\nvalidate = true\n", "[validate]"),
        ("output_dir = \"o\"\n[[sources]]\nname = \"a\"\npath = \"x\"\n[[targets]]\nformat = \"mlx\"\nbits = 7\n", "targets[0]"),
        ("output_dir = \"o\"\n[[sources]]\nname = \"a\"\npath = \"x\"\n[[targets]]\nformat = \"gguf\"\ntype = \"Q9\"\n", "Q9"),
    ];
    for (text, want) in cases {
        let m = d.path().join("m.toml");
        std::fs::write(&m, text).unwrap();
        let o = bin().arg("batch").arg(&m).output().unwrap();
        assert_eq!(o.status.code(), Some(2));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want) && e.contains("m.toml"), "{want}: {e}");
    }
}
