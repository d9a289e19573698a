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
        // calibration: a type that needs it, a weighting without it, a bad weighting, no text
        ("output_dir = \"o\"\n[[sources]]\nname = \"a\"\npath = \"x\"\n[[targets]]\nformat = \"gguf\"\ntype = \"Q2_K_S\"\n", "[calibration]"),
        ("output_dir = \"o\"\n[[sources]]\nname = \"a\"\npath = \"x\"\n[[targets]]\nformat = \"gguf\"\ntype = \"IQ2_M\"\n", "IQ2_M is only written with an importance matrix"),
        ("output_dir = \"o\"\n[[sources]]\nname = \"a\"\npath = \"x\"\n[[targets]]\nformat = \"gguf\"\ntype = \"Q4_K_M\"\nimatrix = \"loops\"\n", "targets[0].imatrix"),
        ("output_dir = \"o\"\n[calibration]\ntext = \"m.toml\"\n[[sources]]\nname = \"a\"\npath = \"x\"\n[[targets]]\nformat = \"gguf\"\nimatrix = \"exit:2\"\n", "exit:2"),
        ("output_dir = \"o\"\n[calibration]\ntext = \"m.toml\"\nweighting = \"all\"\n[[sources]]\nname = \"a\"\npath = \"x\"\n[[targets]]\nformat = \"gguf\"\n", "calibration.weighting"),
        ("output_dir = \"o\"\n[calibration]\ntext = \"nowhere.txt\"\n[[sources]]\nname = \"a\"\npath = \"x\"\n[[targets]]\nformat = \"gguf\"\n", "nowhere.txt"),
        // which tensors use the matrix: not without one, not both ways, only names of weights
        ("output_dir = \"o\"\n[[sources]]\nname = \"a\"\npath = \"x\"\n[[targets]]\nformat = \"gguf\"\ntype = \"Q3_K_M\"\nexclude_weights = [\"attn_k\"]\n", "targets[0].exclude_weights"),
        ("output_dir = \"o\"\n[calibration]\ntext = \"m.toml\"\n[[sources]]\nname = \"a\"\npath = \"x\"\n[[targets]]\nformat = \"gguf\"\ntype = \"Q8_0\"\ninclude_weights = [\"attn_k\"]\n", "targets[0].include_weights"),
        ("output_dir = \"o\"\n[calibration]\ntext = \"m.toml\"\n[[sources]]\nname = \"a\"\npath = \"x\"\n[[targets]]\nformat = \"gguf\"\ntype = \"Q3_K_M\"\nexclude_weights = [\"attn_k\"]\ninclude_weights = [\"ffn\"]\n", "cannot be used together"),
        ("output_dir = \"o\"\n[calibration]\ntext = \"m.toml\"\n[[sources]]\nname = \"a\"\npath = \"x\"\n[[targets]]\nformat = \"gguf\"\ntype = \"Q3_K_M\"\nexclude_weights = [\"k_proj\"]\n", "`k_proj` is in no decoder weight's GGUF name"),
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

/// With `[calibration]`, each target that uses importance data is quantized with a matrix computed
/// once per source and weighting (the weighting docs/calibration.md found best for its type unless
/// the target names one): the files are those `imatrix` + `convert --imatrix` make by hand, the
/// matrices are kept, listed in SHA256SUMS and reused on resume; Q8_0 and IQ4_NL get none.
#[test]
fn calibration_quantizes_each_target_with_its_weighting_and_resumes() {
    let d = tempfile::tempdir().unwrap();
    let trained = fixtures().join("ouro-tiny-trained");
    let cal = trained.join("calibration.txt");
    let m = d.path().join("m.toml");
    std::fs::write(
        &m,
        format!(
            "output_dir = \"o\"\n[calibration]\ntext = \"{}\"\nctx = 64\nchunks = 3\n[[sources]]\nname = \"t\"\npath = \"{}\"\n\
             [[targets]]\nformat = \"gguf\"\ntype = \"Q4_K_M\"\n\
             [[targets]]\nformat = \"gguf\"\ntype = \"IQ4_XS\"\n\
             [[targets]]\nformat = \"gguf\"\ntype = \"Q4_K_S\"\nimatrix = \"none\"\n\
             [[targets]]\nformat = \"gguf\"\ntype = \"Q3_K_M\"\nimatrix = \"exit:0.9\"\n\
             [[targets]]\nformat = \"gguf\"\ntype = \"Q8_0\"\n\
             [[targets]]\nformat = \"gguf\"\ntype = \"IQ4_NL\"\n\
             [[targets]]\nformat = \"mlx\"\nbits = 4\n\
             [[targets]]\nformat = \"mlx\"\nbits = 3\n",
            cal.display(),
            trained.display()
        ),
    )
    .unwrap();
    let o = bin().arg("batch").arg(&m).args(["--dry-run", "--json"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let weightings: Vec<(String, serde_json::Value)> =
        plan["jobs"].as_array().unwrap().iter().map(|j| (j["output"].as_str().unwrap().to_string(), j["imatrix"].clone())).collect();
    let want = [
        ("t-Q4_K_M.gguf", "exit:0.5"),
        ("t-IQ4_XS.gguf", "loops"),
        ("t-Q4_K_S.gguf", ""),
        ("t-Q3_K_M.gguf", "exit:0.9"),
        ("t-Q8_0.gguf", ""),
        ("t-IQ4_NL.gguf", ""),
        ("t-4bit", ""),
        ("t-3bit", "loops"),
    ];
    for ((out, w), (want_out, want_w)) in weightings.iter().zip(want) {
        assert_eq!(out, want_out);
        assert_eq!(w.as_str().unwrap_or(""), want_w, "{out}");
    }
    let o = bin().arg("batch").arg(&m).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = d.path().join("o");
    assert_eq!(statuses(&out), vec!["converted"; 8]);
    // one matrix per weighting, as `ouro-quant imatrix` computes it
    let mut names: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(".imatrix-")).collect();
    names.sort();
    assert_eq!(names, [".imatrix-t-exit_0.5.gguf", ".imatrix-t-exit_0.9.gguf", ".imatrix-t-loops.gguf"]);
    let by_hand = d.path().join("hand.gguf");
    bin().arg("imatrix").arg(&trained).arg("--text").arg(&cal).args(["--ctx", "64", "--chunks", "3", "--weighting", "exit:0.5", "-o"]).arg(&by_hand).assert().success();
    let (a, b) = (ouro_quant::imatrix::Imatrix::read(&by_hand).unwrap(), ouro_quant::imatrix::Imatrix::read(&out.join(".imatrix-t-exit_0.5.gguf")).unwrap());
    assert_eq!(a.entries, b.entries);
    // the outputs are what convert --imatrix writes with that matrix (byte for byte), and what
    // convert writes without one where the target gets none
    let im = out.join(".imatrix-t-exit_0.5.gguf");
    let hand = |args: &[&str], im: Option<&Path>, name: &str| -> std::path::PathBuf {
        let p = d.path().join(name);
        let mut c = bin();
        c.arg("convert").arg(&trained).args(args).arg("-o").arg(&p);
        if let Some(im) = im {
            c.arg("--imatrix").arg(im);
        }
        c.assert().success();
        p
    };
    let same = |a: &Path, b: &Path| std::fs::read(a).unwrap() == std::fs::read(b).unwrap();
    assert!(same(&hand(&["--type", "Q4_K_M"], Some(&im), "a.gguf"), &out.join("t-Q4_K_M.gguf")));
    assert!(same(&hand(&["--type", "IQ4_XS"], Some(&out.join(".imatrix-t-loops.gguf")), "b.gguf"), &out.join("t-IQ4_XS.gguf")));
    assert!(same(&hand(&["--type", "Q4_K_S"], None, "c.gguf"), &out.join("t-Q4_K_S.gguf")));
    assert!(same(&hand(&["--type", "IQ4_NL"], None, "e.gguf"), &out.join("t-IQ4_NL.gguf")));
    let mlx = hand(&["--format", "mlx", "--bits", "3"], Some(&out.join(".imatrix-t-loops.gguf")), "mlx");
    assert!(same(&mlx.join("model.safetensors"), &out.join("t-3bit/model.safetensors")));
    let mlx = hand(&["--format", "mlx", "--bits", "4"], None, "mlx4");
    assert!(same(&mlx.join("model.safetensors"), &out.join("t-4bit/model.safetensors")));
    let sums = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    assert!(sums.contains("  .imatrix-t-loops.gguf\n") && sums.contains("  .imatrix-t-exit_0.9.gguf\n"), "{sums}");
    check_sums(&out);
    // resume: nothing redone, the matrices not recomputed
    let mtime = std::fs::metadata(&im).unwrap().modified().unwrap();
    let o = bin().arg("batch").arg(&m).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(statuses(&out), vec!["skipped"; 8]);
    assert_eq!(std::fs::metadata(&im).unwrap().modified().unwrap(), mtime);
    // another calibration text changes the options of the jobs that use it: not trusted
    let other = d.path().join("other.txt");
    std::fs::write(&other, std::fs::read_to_string(&cal).unwrap().repeat(2)).unwrap();
    std::fs::write(&m, std::fs::read_to_string(&m).unwrap().replace(&cal.display().to_string(), &other.display().to_string())).unwrap();
    let o = bin().arg("batch").arg(&m).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let failed: Vec<String> = outcomes(&out).iter().filter(|o| o["status"] == "failed").map(|o| o["output"].as_str().unwrap().to_string()).collect();
    assert_eq!(failed, ["t-Q4_K_M.gguf", "t-IQ4_XS.gguf", "t-Q3_K_M.gguf", "t-3bit"]);
}

/// `scripts/convert-ouro.sh --calibration`: the K-quant outputs record the matrix they were
/// quantized with (llama-quantize's keys); Q8_0 and MLX 4-bit and 8-bit (no gain measured) none.
#[test]
fn the_release_script_calibrates_with_a_text() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let trained = fixtures().join("ouro-tiny-trained");
    let o = std::process::Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/convert-ouro.sh"))
        .arg(&out)
        .arg(format!("trained={}", trained.display()))
        .arg("--calibration")
        .arg(trained.join("calibration.txt"))
        .env("OURO_QUANT", assert_cmd::cargo::cargo_bin("ouro-quant"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let key = |f: &str| {
        let g = ouro_quant::gguf::file::GgufFile::open(out.join(f)).unwrap();
        g.header.get("quantize.imatrix.file").map(|v| format!("{v:?}"))
    };
    assert!(key("trained-Q4_K_M.gguf").is_some_and(|v| v.contains(".imatrix-trained-exit_0.5.gguf")));
    assert!(key("trained-Q6_K.gguf").is_some());
    assert!(key("trained-Q8_0.gguf").is_none());
    let index = |dir: &str| -> serde_json::Value { serde_json::from_slice(&std::fs::read(out.join(dir).join("model.safetensors.index.json")).unwrap()).unwrap() };
    for dir in ["trained-4bit", "trained-4bit-gs32", "trained-8bit"] {
        assert!(index(dir)["metadata"].get("quantize.imatrix.file").is_none(), "{dir}");
    }
    let sums = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    assert!(sums.contains("  .imatrix-trained-exit_0.5.gguf\n"), "{sums}");
}

/// A target's `exclude_weights` is `convert --exclude-weights`: the output is byte for byte what
/// `convert --imatrix M --exclude-weights attn_k` makes with the batch's matrix, its attn_k
/// tensors differ from those of the full matrix, and the recorded options name the key (so a
/// batch run without it does not trust the output on resume).
#[test]
fn a_target_can_leave_tensors_out_of_the_importance_matrix() {
    use ouro_quant::gguf::file::GgufFile;
    let d = tempfile::tempdir().unwrap();
    let trained = fixtures().join("ouro-tiny-trained");
    let cal = trained.join("calibration.txt");
    let m = d.path().join("m.toml");
    let manifest = |extra: &str| {
        format!(
            "output_dir = \"o\"\n[calibration]\ntext = \"{}\"\nctx = 64\nchunks = 3\n[[sources]]\nname = \"t\"\npath = \"{}\"\n\
             [[targets]]\nformat = \"gguf\"\ntype = \"Q3_K_M\"\n{extra}",
            cal.display(),
            trained.display()
        )
    };
    std::fs::write(&m, manifest("exclude_weights = [\"attn_k\"]\n")).unwrap();
    let o = bin().arg("batch").arg(&m).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = d.path().join("o");
    let im = out.join(".imatrix-t-exit_0.5.gguf");
    let hand = |extra: &[&str], name: &str| {
        let p = d.path().join(name);
        bin().arg("convert").arg(&trained).args(["--type", "Q3_K_M", "--imatrix"]).arg(&im).args(extra).arg("-o").arg(&p).assert().success();
        p
    };
    let got = out.join("t-Q3_K_M.gguf");
    let want = hand(&["--exclude-weights", "attn_k"], "h.gguf");
    assert!(std::fs::read(&got).unwrap() == std::fs::read(&want).unwrap(), "not what convert --exclude-weights attn_k writes");
    let all = GgufFile::open(hand(&[], "all.gguf")).unwrap();
    let g = GgufFile::open(&got).unwrap();
    let k = |f: &GgufFile| f.tensor_bytes(f.header.tensor("blk.0.attn_k.weight").unwrap()).to_vec();
    assert!(k(&g) != k(&all), "attn_k quantized with its importance although excluded");
    let opts = outcomes(&out)[0]["options"].as_str().unwrap().to_string();
    assert!(opts.ends_with("--exclude-weights attn_k"), "{opts}");
    // without the key the job's options differ: the existing output is not trusted
    std::fs::write(&m, manifest("")).unwrap();
    let o = bin().arg("batch").arg(&m).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
}
