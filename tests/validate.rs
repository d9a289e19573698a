//! `ouro-quant validate` end to end, on the trained fixture.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn fixture() -> PathBuf {
    fixtures().join("ouro-tiny-trained")
}

fn text() -> PathBuf {
    fixture().join("validation.txt")
}

/// Runs validate on the first 30 chunks of the fixture's validation text; returns (exit code, report
/// JSON, what it printed).
fn validate(candidate: &Path, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let d = tempfile::tempdir().unwrap();
    let args: Vec<&str> = ["--chunks", "30"].into_iter().chain(extra.iter().copied()).collect();
    let (code, v, out) = validate_on_fixture(&fixture(), candidate, &d.path().join("r.json"), &args);
    (code.unwrap_or(-1), v, out)
}

/// A copy of the fixture with noise of +-0.05 on every weight of one bf16 matrix (layer 1's
/// down_proj): enough to fail the float profile.
fn noisy_copy() -> tempfile::TempDir {
    let noisy = copy_checkpoint(&fixture());
    edit_weights(noisy.path(), |ts| {
        let t = ts.iter_mut().find(|t| t.spec.name == "model.layers.1.mlp.down_proj.weight").unwrap();
        for (i, b) in t.bytes.chunks_exact_mut(2).enumerate() {
            let v = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
            let noise = if i % 2 == 0 { 0.05 } else { -0.05 };
            b.copy_from_slice(&half::bf16::from_f32(v + noise).to_le_bytes());
        }
    });
    noisy
}

/// The first `n` items of the fixture's task file, written into `dir`.
fn first_tasks(dir: &Path, n: usize) -> PathBuf {
    let some: String = std::fs::read_to_string(fixture().join("tasks.jsonl")).unwrap().lines().take(n).map(|l| format!("{l}\n")).collect();
    let p = dir.join(format!("first{n}.jsonl"));
    std::fs::write(&p, some).unwrap();
    p
}

#[test]
fn the_reference_against_itself_is_perfect() {
    let (code, v, out) = validate(&fixture(), &[]);
    assert_eq!(code, 0, "{out}");
    let r = &v["report"];
    for m in std::iter::once(&r["default_mode"]).chain(r["per_loop"].as_array().unwrap()) {
        assert_eq!(m["ppl_ratio"], 1.0);
        assert_eq!(m["kl_mean"], 0.0);
        assert_eq!(m["kl_max"], 0.0);
        assert_eq!(m["same_top_token_pct"], 100.0);
        assert_eq!(m["same_top_decided_pct"], 100.0);
    }
    for e in r["exits"].as_array().unwrap() {
        assert_eq!(e["exit_agreement_pct"], 100.0);
        assert_eq!(e["exit_tv_distance"], 0.0);
        assert_eq!(e["histogram_reference"], e["histogram_candidate"]);
    }
    assert_eq!(v["profile"]["name"], "float");
    assert!(out.contains("PASS"), "{out}");
}

#[test]
fn eight_bit_outputs_pass_and_damaged_ones_fail_naming_the_metric() {
    let d = tempfile::tempdir().unwrap();
    let q8 = d.path().join("q8.gguf");
    bin().arg("convert").arg(fixture()).args(["--type", "Q8_0", "-o"]).arg(&q8).assert().success();
    let m8 = d.path().join("m8");
    bin().arg("convert").arg(fixture()).args(["--format", "mlx", "--bits", "8", "-o"]).arg(&m8).assert().success();
    for c in [&q8, &m8] {
        let (code, v, out) = validate(c, &[]);
        assert_eq!(code, 0, "{}: {out}", c.display());
        assert_eq!(v["profile"]["name"], "8bit", "{}", c.display());
        assert_eq!(v["pass"], true);
    }
    // Q2_K everywhere: fails its own 3-bit profile's neighbour, the 8-bit profile, by name
    let q2 = d.path().join("q2.gguf");
    bin().arg("convert").arg(fixture()).args(["--type", "Q4_0", "--type-override", ".*=Q2_K", "-o"]).arg(&q2).assert().success();
    let (code, v, out) = validate(&q2, &["--profile", "8bit"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(v["pass"], false);
    assert!(out.contains("FAIL ppl_ratio (default mode)"), "{out}");
    // noise in one tensor of an HF copy: fails the float profile
    let noisy = noisy_copy();
    let (code, v, out) = validate(noisy.path(), &[]);
    assert_eq!(code, 1, "{out}");
    let failed: Vec<&str> = v["checks"].as_array().unwrap().iter().filter(|c| c["pass"] == false).map(|c| c["name"].as_str().unwrap()).collect();
    assert!(!failed.is_empty());
    for f in failed {
        assert!(out.contains(&format!("FAIL {f}")), "{f} not named in: {out}");
    }
}

/// The same-top check counts only the tokens the reference has decided (its top token at least
/// twice as likely as the runner-up), so near ties reordered by quantization pass; an error on
/// decided tokens still fails it by name. Here the output matrix's rows are rotated by one (the
/// vocabulary off by one, as a converter that misorders tokens would leave it).
#[test]
fn misordered_output_rows_fail_same_top_on_the_decided_tokens() {
    let bad = copy_checkpoint(&fixture());
    edit_weights(bad.path(), |ts| {
        let t = ts.iter_mut().find(|t| t.spec.name == "lm_head.weight").unwrap();
        let row = t.spec.nbytes() / t.spec.shape[0];
        t.bytes.rotate_left(row);
    });
    let (code, v, out) = validate(bad.path(), &["--profile", "4bit"]);
    assert_eq!(code, 1, "{out}");
    let d = &v["report"]["default_mode"];
    let check = v["checks"].as_array().unwrap().iter().find(|c| c["name"] == "same_top_decided_pct (default mode)").unwrap().clone();
    eprintln!("same top {} (decided {}%: {}%)", d["same_top_token_pct"], d["decided_tokens_pct"], d["same_top_decided_pct"]);
    assert_eq!((check["pass"].as_bool(), check["value"].as_f64()), (Some(false), d["same_top_decided_pct"].as_f64()), "{check}");
    assert!(check["value"].as_f64().unwrap() < 90.0, "{check}");
    assert!(out.contains("FAIL same_top_decided_pct (default mode)"), "{out}");
}

#[test]
fn a_stored_reference_gives_identical_numbers_and_is_refused_elsewhere() {
    let d = tempfile::tempdir().unwrap();
    let q4 = d.path().join("q4.gguf");
    bin().arg("convert").arg(fixture()).args(["--type", "Q4_K_M", "-o"]).arg(&q4).assert().success();
    let stored = d.path().join("ref.safetensors");
    let (c1, fresh, out) = validate(&q4, &["--save-reference", stored.to_str().unwrap()]);
    // Q4_K_M passes its 4-bit profile (docs/validation.md; the whole text below)
    assert_eq!(c1, 0, "{out}");
    assert!(stored.is_file());
    let (c2, reused, out) = validate(&q4, &["--reference-logits", stored.to_str().unwrap()]);
    assert_eq!(c1, c2, "{out}");
    let strip = |v: &serde_json::Value| {
        let mut r = v["report"].clone();
        for k in ["seconds_reference", "seconds_candidate", "tokens_per_s_reference", "tokens_per_s_candidate", "reference_stored"] {
            r.as_object_mut().unwrap().remove(k);
        }
        r
    };
    assert_eq!(strip(&fresh), strip(&reused));
    assert_eq!(reused["report"]["reference_stored"], true);
    // another text
    let other = d.path().join("other.txt");
    std::fs::write(&other, std::fs::read_to_string(text()).unwrap().replace("Sum:", "Sum :")).unwrap();
    let o = bin()
        .arg("validate")
        .arg("--reference")
        .arg(fixture())
        .arg("--candidate")
        .arg(&q4)
        .arg("--text")
        .arg(&other)
        .args(["--ctx", "128", "--chunks", "30", "--reference-logits"])
        .arg(&stored)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("another text"), "{}", String::from_utf8_lossy(&o.stderr));
    // another reference model
    let o = bin()
        .arg("validate")
        .arg("--reference")
        .arg(&q4)
        .arg("--candidate")
        .arg(&q4)
        .arg("--text")
        .arg(text())
        .args(["--ctx", "128", "--chunks", "30", "--reference-logits"])
        .arg(&stored)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("another model"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn outputs_for_model_cards_and_plots() {
    let d = tempfile::tempdir().unwrap();
    let md = d.path().join("v.md");
    let svg = d.path().join("v.svg");
    let (code, v, out) = validate(&fixture(), &["--markdown", md.to_str().unwrap(), "--plot", svg.to_str().unwrap(), "--thresholds", "0.7,0.9"]);
    assert_eq!(code, 0, "{out}");
    // 0.5 is always evaluated (the verdict uses it)
    let qs: Vec<f64> = v["report"]["exits"].as_array().unwrap().iter().map(|e| e["q"].as_f64().unwrap()).collect();
    assert_eq!(qs.len(), 3);
    assert!((qs[0] - 0.5).abs() < 1e-6);
    let md = std::fs::read_to_string(&md).unwrap();
    assert!(md.contains("| loop 4 |") && md.contains("| 0.9 |") && md.contains("pass against the float profile"), "{md}");
    let svg = std::fs::read_to_string(&svg).unwrap();
    // drawn by plotters: the verdict and profile in the title, a panel per q, perplexity and KL
    assert!(svg.contains("<svg") && svg.contains("PASS") && svg.contains("against the float profile"), "{svg:.400}");
    assert!(svg.contains("exit loop at q = 0.7") && svg.contains("perplexity, loops 1-4") && svg.contains("mean KL"));
    // perplexity values are written on the zoomed axis (three decimals)
    let ppl = v["report"]["per_loop"][3]["ppl_reference"].as_f64().unwrap();
    assert!(svg.contains(&format!("{ppl:.3}")), "loop 4 perplexity {ppl:.3} not written");
    // every bar group has its tick label on the x axis: loops 1-4 under each exit histogram,
    // "default" after them under perplexity, "loop k" under KL
    let texts: Vec<String> = regex::Regex::new(r"(?s)<text[^>]*>(.*?)</text>").unwrap().captures_iter(&svg).map(|c| c[1].trim().to_string()).collect();
    let runs = |want: &[&str]| texts.windows(want.len()).filter(|w| w.iter().zip(want).all(|(a, b)| a == b)).count();
    assert_eq!(runs(&["1", "2", "3", "4"]), 4, "loop ticks under the 3 exit panels and perplexity: {texts:?}");
    assert_eq!(runs(&["1", "2", "3", "4", "default"]), 1, "ticks under perplexity: {texts:?}");
    assert_eq!(runs(&["loop 1", "loop 2", "loop 3", "loop 4"]), 1, "ticks under KL: {texts:?}");

    // The PNG is the same picture at twice the size, and decodes
    let png = d.path().join("v.png");
    let (code, _, out) = validate(&fixture(), &["--plot", png.to_str().unwrap(), "--thresholds", "0.7,0.9"]);
    assert_eq!(code, 0, "{out}");
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut rd = dec.read_info().unwrap();
    let mut px = vec![0u8; rd.output_buffer_size().unwrap()];
    let info = rd.next_frame(&mut px).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let num = |re: &str| -> f64 { regex::Regex::new(re).unwrap().captures(&svg).unwrap()[1].parse().unwrap() };
    assert_eq!(info.width as f64, 2.0 * num(r#"<svg [^>]*width="([0-9.]+)""#));
    assert_eq!(info.height as f64, 2.0 * num(r#"<svg [^>]*height="([0-9.]+)""#));
    // 3 exit panels + perplexity + KL, 300 units each
    assert_eq!(info.width, 2 * 300 * 5);
    // both series are drawn: bars in the reference and the candidate colour, and dark text pixels
    let count = |rgb: [u8; 3]| px.chunks_exact(3).filter(|p| *p == rgb).count();
    assert!(count([0x44, 0x77, 0xaa]) > 5000 && count([0xee, 0x66, 0x77]) > 5000);
    assert!(px.chunks_exact(3).filter(|p| p.iter().all(|&c| c < 80)).count() > 2000, "no text drawn");
}

#[test]
fn bad_options_fail_before_any_work() {
    let cases: [(&[&str], &str); 3] = [
        (&["--profile", "9bit"], "--profile 9bit"),
        (&["--plot", "x.pdf"], "name the file .svg or .png"),
        (&["--thresholds", "1.5"], "must lie in [0, 1]"),
    ];
    for (args, want) in cases {
        let (code, _, out) = validate(&fixture(), args);
        assert_eq!(code, 2, "{args:?}: {out}");
        assert!(out.contains(want), "{args:?}: {out}");
    }
    for (args, want) in [(["--text", "/nonexistent/text.txt"], "/nonexistent/text.txt"), (["--ctx", "4"], "--ctx 4")] {
        let mut c = bin();
        c.arg("validate").arg("--reference").arg(fixture()).arg("--candidate").arg(fixture());
        if args[0] == "--ctx" {
            c.arg("--text").arg(text());
        }
        let o = c.args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&o.stderr).contains(want), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn convert_with_validate_puts_the_result_in_the_mlx_card() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("t-8bit");
    let o = bin()
        .arg("convert")
        .arg(fixture())
        .args(["--format", "mlx", "--bits", "8", "--validate-ctx", "128", "--validate"])
        .arg(text())
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.starts_with("---\nlibrary_name: mlx"), "{card}");
    assert!(card.contains("## Validation\n\n**Validation** by ouro-quant") && card.contains("pass against the 8bit profile"), "{card}");
    assert!(card.contains("| loop 4 |") && !card.contains("Not run at conversion time"), "{card}");
}

#[test]
fn convert_with_validate_writes_a_card_beside_the_gguf_and_its_verdict_is_the_exit_status() {
    let d = tempfile::tempdir().unwrap();
    let run = |ty: &str| {
        let out = d.path().join(format!("t-{ty}.gguf"));
        let o = bin()
            .arg("convert")
            .arg(fixture())
            .args(["--type", ty, "--validate-ctx", "128", "--validate"])
            .arg(text())
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        (o.status.code(), std::fs::read_to_string(d.path().join(format!("t-{ty}.md"))).unwrap(), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let (code, card, _) = run("Q8_0");
    assert_eq!(code, Some(0));
    assert!(card.starts_with("---\nbase_model: ") && card.contains("- gguf\n"), "{card}");
    assert!(card.contains("`--type Q8_0`") && card.contains("t-Q8_0.gguf"), "{card}");
    assert!(card.contains("## Validation\n\n**Validation** by ouro-quant") && card.contains("pass against the 8bit profile"), "{card}");
    // a damaged conversion: every matrix forced to Q2_K while the file type (and so the profile)
    // says Q8_0
    let out = d.path().join("t-bad.gguf");
    let o = bin()
        .arg("convert")
        .arg(fixture())
        .args(["--type", "Q8_0", "--type-override", "weight=Q2_K", "--validate-ctx", "128", "--validate"])
        .arg(text())
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let card = std::fs::read_to_string(d.path().join("t-bad.md")).unwrap();
    assert!(card.contains("FAIL against the 8bit profile"), "{card}");
    assert!(out.is_file(), "the file stays: the card says why it failed");
}

/// The verdicts docs/validation.md lists, on the whole validation text at `--ctx 128` as there:
/// each output passes the profile of its family, and the 4-bit ones use at most a tenth of their
/// ppl room (ratio <= 1.005) with exit agreement at q = 0.5 of at least 97%. (The 8-bit outputs
/// pass in `eight_bit_outputs_pass_and_damaged_ones_fail_naming_the_metric`, Q2_K fails there.)
#[test]
fn the_verdicts_the_docs_list_hold_on_the_whole_text() {
    let d = tempfile::tempdir().unwrap();
    // the i-quants with the weighting batch uses for them (docs/iquants.md)
    let im = d.path().join("exit.gguf");
    bin().arg("imatrix").arg(fixture()).arg("--text").arg(fixture().join("calibration.txt")).args(["--ctx", "128", "--weighting", "exit:0.5", "-o"]).arg(&im).assert().success();
    let im = im.to_str().unwrap();
    for (name, args, profile) in [
        ("iq3s.gguf", &["--type", "IQ3_S", "--imatrix", im][..], "3bit"),
        ("iq2m.gguf", &["--type", "IQ2_M", "--imatrix", im], "2bit"),
        ("iq1m.gguf", &["--type", "IQ1_M", "--imatrix", im], "1bit"),
        ("q6k.gguf", &["--type", "Q6_K"][..], "6bit"),
        ("q4km.gguf", &["--type", "Q4_K_M"], "4bit"),
        ("q40.gguf", &["--type", "Q4_0"], "4bit"),
        ("iq4xs.gguf", &["--type", "IQ4_XS"], "4bit"),
        ("mlx4-64", &["--format", "mlx", "--bits", "4"], "4bit"),
        ("mlx4-32", &["--format", "mlx", "--bits", "4", "--group-size", "32"], "4bit"),
    ] {
        let c = d.path().join(name);
        bin().arg("convert").arg(fixture()).args(args).arg("-o").arg(&c).assert().success();
        let rep = d.path().join(format!("{name}.json"));
        let (code, v, out) = validate_on_fixture(&fixture(), &c, &rep, &[]);
        let r = &v["report"];
        let (ratio, kl, top) = (
            r["default_mode"]["ppl_ratio"].as_f64().unwrap(),
            r["default_mode"]["kl_mean"].as_f64().unwrap(),
            r["default_mode"]["same_top_token_pct"].as_f64().unwrap(),
        );
        let agree: Vec<f64> = r["exits"].as_array().unwrap().iter().map(|e| e["exit_agreement_pct"].as_f64().unwrap()).collect();
        eprintln!("{name}: profile {}, ppl ratio {ratio:.4}, mean KL {kl:.5}, same top {top:.2}%, exit agreement {agree:.2?}", v["profile"]["name"]);
        assert_eq!(code, Some(0), "{name}: {out}");
        assert_eq!((v["profile"]["name"].as_str(), v["pass"].as_bool()), (Some(profile), Some(true)), "{name}");
        // measured (this fixture, ctx 128): 4-bit ppl ratios 0.9987 (Q4_K_M) to 1.0049 (MLX 4-bit,
        // group 64), exit agreement at q = 0.5 97.27% (Q4_0) to 98.71%; Q6_K 1.0004 and 99.45%
        // measured: IQ3_S 1.0036 / 95.86%, IQ2_M 1.0090 / 94.67%, IQ1_M 1.0302 / 86.86% (ppl
        // ratio / exit agreement at q = 0.5); a tenth of the 1bit profile's room is 1.06
        if profile == "1bit" || profile == "2bit" {
            assert!(ratio <= 1.06 && agree[0] >= 85.0, "{name}: ppl ratio {ratio}, exit agreement {}", agree[0]);
        }
        if profile == "4bit" {
            assert!(ratio <= 1.005, "{name}: ppl ratio {ratio}");
            assert!(agree[0] >= 97.0, "{name}: exit agreement at q = 0.5 {}", agree[0]);
        }
    }
}

/// A task file checked by hand: what the trained fixture answers (greedy, `run`) against the facts
/// its corpus states (validation.txt): Tana Pisha was born in Zivaife, Liro Kege in 1934, Veka
/// Kaibai works for Solu Works: right (exact, contains, regex); the fourth item's expected answer
/// is deliberately wrong (Papukai); on the last two the model errs (it says 9 for 1 + 4 + 3 and 42
/// for the larger of 15 and 29). So 3 of 6 at every depth.
const HAND_TASKS: &str = r#"{"prompt": "Q: Where was Tana Pisha born? A:", "answer": "Zivaife."}
{"prompt": "Q: When was Liro Kege born? A:", "answer": "1934", "match": "contains"}
{"prompt": "Q: Who employs Veka Kaibai? A:", "answer": "^ (Solu|Bilu) Works\\.", "match": "regex"}
{"prompt": "Q: Where was Tana Pisha born? A:", "answer": "Papukai.", "kind": "a wrong answer on purpose"}
{"prompt": "Sum: 1 + 4 + 3 =", "answer": "8."}
{"prompt": "Q: Which is larger, 15 or 29? A:", "answer": "29.", "max_tokens": 4}
"#;

#[test]
fn task_answers_are_scored_by_hand_checked_answers_and_compared() {
    let d = tempfile::tempdir().unwrap();
    let tasks = d.path().join("hand.jsonl");
    std::fs::write(&tasks, HAND_TASKS).unwrap();
    let t = tasks.to_str().unwrap();
    let (code, v, out) = validate(&fixture(), &["--tasks", t, "--exit-threshold", "0.5"]);
    assert_eq!(code, 0, "{out}");
    let r = &v["report"]["tasks"];
    assert_eq!(r["items"], 6);
    let modes: Vec<&str> = r["modes"].as_array().unwrap().iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["loop 1", "loop 2", "loop 3", "loop 4", "default", "q = 0.5"]);
    for (k, m) in r["modes"].as_array().unwrap().iter().enumerate() {
        assert_eq!(m["reference_correct"], 3, "{m}");
        assert_eq!(m["answer_agreement_pct"], 100.0, "self-comparison: {m}");
        if k < 4 {
            assert_eq!(m["reference_mean_loops"], (k + 1) as f64, "{m}");
        }
    }
    assert!(r["modes"][5]["reference_mean_loops"].as_f64().unwrap() < 2.0, "q = 0.5 exits early");
    assert!(v["checks"].as_array().unwrap().iter().any(|c| c["name"] == "answer_agreement_pct (default mode)" && c["pass"] == true));
    assert!(out.contains("hand.jsonl (6 items)"), "the table lists the tasks: {out}");

    // a noisy copy answers differently and fails the float profile's answer check by name
    let noisy = noisy_copy();
    let some = first_tasks(d.path(), 40);
    let (code, v, out) = validate(noisy.path(), &["--tasks", some.to_str().unwrap(), "--exit-threshold", "0.5"]);
    assert_eq!(code, 1, "{out}");
    let agree = v["report"]["tasks"]["modes"][4]["answer_agreement_pct"].as_f64().unwrap();
    eprintln!("noisy copy: answer agreement {agree}%");
    assert!(agree < 99.0, "{agree}");
    assert!(out.contains("FAIL answer_agreement_pct (default mode)"), "{out}");
    assert!(!v["report"]["tasks"]["disagreements"].as_array().unwrap().is_empty());

    // a bad task file is refused before any model runs, naming the line, and writes nothing
    let bad = d.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"a\", \"answer\": \"b\"}\n{\"prompt\": \"a\", \"answr\": \"b\"}\n").unwrap();
    let (code, v, out) = validate(&fixture(), &["--tasks", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(v.is_null(), "no report written");
    assert!(out.contains("bad.jsonl:2") && out.contains("answr"), "{out}");
}

/// The task file the trained fixture ships: an 8-bit conversion answers it like the original and
/// passes the 8-bit profile's answer check; the Markdown report carries the answers' table.
#[test]
fn an_eight_bit_conversion_answers_the_fixture_tasks_like_the_original() {
    let d = tempfile::tempdir().unwrap();
    let q8 = d.path().join("q8.gguf");
    bin().arg("convert").arg(fixture()).args(["--type", "Q8_0", "-o"]).arg(&q8).assert().success();
    let md = d.path().join("r.md");
    let (code, v, out) = validate(&q8, &["--tasks", fixture().join("tasks.jsonl").to_str().unwrap(), "--exit-threshold", "0.5", "--markdown", md.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let m = &v["report"]["tasks"]["modes"][4];
    eprintln!("Q8_0 on the fixture's tasks, default mode: {m}");
    // measured 99.2% (one item of 120 differs); the 8-bit limit is 97%
    assert!(m["answer_agreement_pct"].as_f64().unwrap() >= 97.0, "{m}");
    assert_eq!(v["report"]["tasks"]["items"], 120);
    let card = std::fs::read_to_string(&md).unwrap();
    assert!(card.contains("| loop 1 |") && card.contains("same answers"), "{card}");
    // an MLX candidate answers through its own tokenizer and chat template too (first 60 items;
    // measured 98.3% on all 120)
    let m8 = d.path().join("m8");
    bin().arg("convert").arg(fixture()).args(["--format", "mlx", "--bits", "8", "-o"]).arg(&m8).assert().success();
    let t60 = first_tasks(d.path(), 60);
    let (code, v, out) = validate(&m8, &["--tasks", t60.to_str().unwrap(), "--exit-threshold", "0.5"]);
    assert_eq!(code, 0, "{out}");
    let m = &v["report"]["tasks"]["modes"][4];
    assert_eq!(v["report"]["tasks"]["items"], 60);
    assert!(m["answer_agreement_pct"].as_f64().unwrap() >= 97.0, "MLX 8-bit: {m}");
}
