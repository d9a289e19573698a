//! The options no other test drives, each through the binary with an outcome that could be wrong:
//! sampling (`--temperature`, `--top-k`, `--top-p`, `--seed`), `--thinking`, `--kv-fill`,
//! validate's limit overrides, `--dry-run` of batch and of MLX conversion, `synth --force`.

mod common;

use common::*;

fn fixture() -> std::path::PathBuf {
    fixtures().join("ouro-tiny-trained")
}

/// `run --json` on the trained fixture: (generated tokens, prompt token count).
fn run(args: &[&str]) -> (Vec<u64>, u64) {
    let o = bin().arg("run").arg(fixture()).args(args).args(["--max-tokens", "24", "--json"]).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let toks = v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    (toks, v["stats"]["prompt_tokens"].as_u64().unwrap())
}

#[test]
fn sampling_options_change_what_is_generated_as_they_say() {
    let p = ["--prompt", "Q: Where was Tana Pisha born? A:"];
    let greedy = run(&p).0;
    let with = |extra: &[&str]| run(&[&p[..], extra].concat()).0;
    // one candidate token, or a nucleus no wider than the top token: greedy, whatever the heat
    assert_eq!(with(&["--temperature", "2", "--top-k", "1", "--seed", "5"]), greedy);
    assert_eq!(with(&["--temperature", "2", "--top-p", "0.000001", "--seed", "5"]), greedy);
    // hot sampling departs from greedy; the same seed repeats itself, another seed differs
    let a = with(&["--temperature", "3", "--seed", "1"]);
    assert_ne!(a, greedy, "sampling at temperature 3 gave the greedy text");
    assert_eq!(with(&["--temperature", "3", "--seed", "1"]), a);
    let others: Vec<Vec<u64>> = (2..5).map(|s| with(&["--temperature", "3", "--seed", &s.to_string()])).collect();
    assert!(others.iter().any(|o| *o != a), "seeds 1-4 all gave the same sample");
}

#[test]
fn thinking_adds_the_think_tag_to_the_chat_prompt() {
    let (_, plain) = run(&["--chat", "Where was Tana Pisha born?"]);
    let (_, thinking) = run(&["--chat", "Where was Tana Pisha born?", "--thinking"]);
    // "<think>\n" costs at least one token; the raw prompt is shorter than either chat prompt
    assert!(thinking > plain, "{thinking} vs {plain}");
    let (_, raw) = run(&["--prompt", "Where was Tana Pisha born?"]);
    assert!(raw < plain, "{raw} vs {plain}");
    // --thinking needs --chat
    let o = bin().arg("run").arg(fixture()).args(["--prompt", "x", "--thinking"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn kv_fill_changes_only_adaptive_exit() {
    let ppl = |fill: &str| -> serde_json::Value {
        let o = bin()
            .arg("perplexity")
            .arg(fixture())
            .args(["--text"])
            .arg(fixture().join("validation.txt"))
            .args(["--ctx", "128", "--chunks", "2", "--exit-threshold", "0.5", "--kv-fill", fill, "--json"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let (copy, mask, compute) = (ppl("copy"), ppl("mask"), ppl("compute"));
    assert_eq!(copy["kv_fill"], "copy");
    assert_eq!(mask["kv_fill"], "mask");
    assert_eq!(compute["kv_fill"], "compute");
    assert_eq!(copy["runs"][0]["ppl"], compute["runs"][0]["ppl"]);
    let late = |v: &serde_json::Value| v["runs"][1]["mean_caught_up_loops_per_token"].as_f64().unwrap();
    assert!(late(&compute) > 0.0 && late(&copy) == 0.0 && late(&mask) == 0.0);
    // all loops fill every slot themselves: the same numbers; with exit at 0.5 the skipped slots
    // hold the exit loop's K/V or nothing, and the perplexity moves
    assert_eq!(copy["runs"][0]["ppl"], mask["runs"][0]["ppl"]);
    let (c, m) = (copy["runs"][1]["ppl"].as_f64().unwrap(), mask["runs"][1]["ppl"].as_f64().unwrap());
    assert!((c - m).abs() > 1e-4 * c, "copy {c}, mask {m}");
}

#[test]
fn validate_limit_overrides_decide_the_verdict() {
    let d = tempfile::tempdir().unwrap();
    let gguf = d.path().join("t.gguf");
    bin().arg("convert").arg(fixture()).args(["--type", "Q8_0", "-o"]).arg(&gguf).assert().success();
    let validate = |extra: &[&str]| -> (Option<i32>, serde_json::Value) {
        let o = bin()
            .arg("validate")
            .arg("--reference")
            .arg(fixture())
            .arg("--candidate")
            .arg(&gguf)
            .arg("--text")
            .arg(fixture().join("validation.txt"))
            .args(["--ctx", "128", "--chunks", "4", "--json"])
            .args(extra)
            .output()
            .unwrap();
        (o.status.code(), serde_json::from_slice(&o.stdout).unwrap_or_default())
    };
    let (code, v) = validate(&[]);
    assert_eq!(code, Some(0), "{v}");
    let failed = |v: &serde_json::Value| -> Vec<String> {
        v["checks"].as_array().unwrap().iter().filter(|c| !c["pass"].as_bool().unwrap()).map(|c| c["name"].as_str().unwrap().to_string()).collect()
    };
    // each override tightened past what Q8_0 reaches fails exactly its own check
    for (flag, value, check) in [
        ("--max-ppl-ratio", "0.5", "ppl_ratio"),
        ("--min-same-top", "100.1", "same_top_decided_pct"),
        ("--min-exit-agreement", "100.1", "exit_agreement_pct"),
    ] {
        let (code, v) = validate(&[flag, value]);
        assert_eq!(code, Some(1), "{flag} {value}: {v}");
        let f = failed(&v);
        assert!(f.len() == 1 && f[0].starts_with(check), "{flag} {value}: failed {f:?}");
        assert!(v["profile"]["name"].as_str().unwrap().ends_with("(custom)"), "{}", v["profile"]);
    }
    // and loosened, a check the profile would fail passes
    let (code, _) = validate(&["--profile", "float", "--max-ppl-ratio", "2", "--min-same-top", "0", "--min-exit-agreement", "0"]);
    assert_eq!(code, Some(0));
}

/// Every file under `dir`, for "nothing was written" checks.
fn listing(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = walk(dir);
    v.sort();
    v
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flat_map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() { [vec![p.clone()], walk(&p)].concat() } else { vec![p] }
        })
        .collect()
}

#[test]
fn dry_runs_write_nothing_and_describe_the_real_run() {
    let d = tempfile::tempdir().unwrap();
    // MLX: the planned tensors are the ones the real conversion writes, at the same bytes
    let out = d.path().join("m4");
    let before = listing(d.path());
    let o = bin().current_dir(d.path()).arg("convert").arg(fixture()).args(["--format", "mlx", "--dry-run", "--json", "-o"]).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(listing(d.path()), before, "an MLX dry run wrote something");
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    bin().arg("convert").arg(fixture()).args(["--format", "mlx", "-o"]).arg(&out).assert().success();
    let written = ouro_quant::stfile::SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
    let data: u64 = written.tensors().iter().map(|t| (t.end - t.begin) as u64).sum();
    assert_eq!(plan["tensor_bytes"].as_u64().unwrap(), data);
    assert_eq!(plan["quantization"]["bits"], 4);

    // batch: the jobs listed are every source x target, and nothing is converted
    std::fs::write(
        d.path().join("m.toml"),
        format!(
            "output_dir = \"out\"\n[[sources]]\nname = \"a\"\npath = \"{0}\"\n[[sources]]\nname = \"b\"\npath = \"{0}\"\n[[targets]]\nformat = \"gguf\"\ntype = \"Q8_0\"\n[[targets]]\nformat = \"mlx\"\nbits = 8\n",
            fixture().display()
        ),
    )
    .unwrap();
    let before = listing(d.path());
    let o = bin().arg("batch").arg(d.path().join("m.toml")).args(["--dry-run", "--json"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(listing(d.path()), before, "a batch dry run wrote something");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut outputs: Vec<String> = v["jobs"].as_array().unwrap().iter().map(|j| j["output"].as_str().unwrap().to_string()).collect();
    outputs.sort();
    assert_eq!(outputs.len(), 4, "{outputs:?}");
    assert!(outputs.iter().filter(|o| o.starts_with("a-")).count() == 2 && outputs.iter().any(|o| o.ends_with(".gguf")), "{outputs:?}");
}

#[test]
fn synth_force_replaces_only_its_own_output() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("s");
    let synth = |seed: &str, force: bool| {
        let mut c = bin();
        c.arg("synth").args(["--preset", "tiny", "--seed", seed, "-o"]).arg(&out);
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    assert!(synth("1", false).status.success());
    let first = std::fs::read(out.join("model.safetensors")).unwrap();
    // without --force an existing output is refused and left as it was
    assert_eq!(synth("2", false).status.code(), Some(2));
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), first);
    // with it, the directory synth wrote is replaced (another seed, other bytes)
    assert!(synth("2", true).status.success());
    assert_ne!(std::fs::read(out.join("model.safetensors")).unwrap(), first);
    // a directory synth did not write is never replaced, --force or not
    let foreign = d.path().join("mine");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "keep").unwrap();
    let o = bin().arg("synth").args(["--preset", "tiny", "--force", "-o"]).arg(&foreign).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(std::fs::read_to_string(foreign.join("notes.txt")).unwrap(), "keep");
}
