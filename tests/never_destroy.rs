//! No command destroys data: an output is never an input (by name, link or inode), never contains
//! or lies inside one, never replaces a foreign directory, a device, a FIFO or a link, and `--force`
//! replaces only a regular file or a directory this tool wrote. Two runs racing to one target: one
//! wins, the other says so. A signal removes what was being written.
//!
//! Each case hashes the whole test folder before and after: what existed must be byte-identical.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;

/// Every entry under `root` (not following links): regular files by content hash, others by kind.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, p: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let ft = e.file_type().unwrap();
            if ft.is_symlink() {
                out.insert(rel, format!("link -> {}", std::fs::read_link(&path).unwrap().display()));
            } else if ft.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &path, out);
            } else if ft.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                out.insert(rel, format!("file {:032x}", xxhash_rust::xxh3::xxh3_128(&bytes)));
            } else {
                out.insert(rel, "special".into());
            }
        }
    }
    walk(root, root, &mut out);
    out
}

/// A folder with the trained fixture at `m/`, a foreign non-empty folder, a text, a FIFO, a link to
/// an input, and a converted `x.gguf`.
fn scene() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    std::fs::create_dir(&m).unwrap();
    for e in std::fs::read_dir(fixtures().join("ouro-tiny-trained")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
    }
    std::fs::create_dir(d.path().join("foreign")).unwrap();
    std::fs::write(d.path().join("foreign/keep.txt"), "a user's file").unwrap();
    let text = std::fs::read_to_string(m.join("validation.txt")).unwrap();
    std::fs::write(d.path().join("text.txt"), &text[..6000]).unwrap();
    std::fs::write(d.path().join("tokens.txt"), "1,2,3").unwrap();
    let fifo = d.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    std::os::unix::fs::symlink(m.join("model.safetensors"), d.path().join("link")).unwrap();
    bin().current_dir(d.path()).args(["convert", "m", "--type", "Q8_0", "-o", "x.gguf"]).assert().success();
    d
}

fn run_in(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let o = bin().current_dir(dir).args(args).output().unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Runs a command that must be refused: exit 2, the message holds every needle, nothing changed
/// (and no temporary left).
fn refused(d: &Path, args: &[&str], needles: &[&str]) {
    let before = snapshot(d);
    let (code, err) = run_in(d, args);
    assert_eq!(code, Some(2), "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: {n:?} not in {err}");
    }
    assert_eq!(snapshot(d), before, "{args:?} changed the folder");
}

#[test]
fn outputs_that_would_destroy_data_are_refused() {
    let s = scene();
    let d = s.path();
    // 1. a foreign non-empty directory, with or without --force
    refused(d, &["convert", "m", "--type", "Q8_0", "-o", "foreign", "--force"], &["foreign", "did not write"]);
    refused(d, &["convert", "m", "--format", "mlx", "-o", "foreign", "--force"], &["foreign", "did not write"]);
    // 2. a device node and a FIFO
    refused(d, &["convert", "m", "--type", "Q8_0", "-o", "/dev/null", "--force"], &["/dev/null", "device"]);
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device_like());
    refused(d, &["convert", "m", "--type", "Q8_0", "-o", "fifo", "--force"], &["fifo", "FIFO"]);
    // 3. an output that is, contains or lies inside an input
    refused(d, &["convert", "m", "-o", "m/model.safetensors", "--force"], &["model.safetensors", "input"]);
    refused(d, &["convert", "m", "--format", "mlx", "-o", "m", "--force"], &["input"]);
    refused(d, &["convert", "m", "--type", "Q8_0", "-o", "m/new.gguf"], &["lies inside", "input"]);
    refused(d, &["convert", "m/", "--type", "Q8_0", "-o", ".", "--force"], &["no file name"]);
    refused(d, &["logits", "x.gguf", "--tokens", "1,2,3", "-o", "x.gguf", "--force"], &["x.gguf", "input"]);
    refused(d, &["logits", "m", "--tokens-file", "tokens.txt", "-o", "tokens.txt", "--force"], &["tokens.txt", "input"]);
    // through a symbolic link, and through a hard link
    refused(d, &["convert", "m", "--type", "Q8_0", "-o", "link", "--force"], &["link", "symbolic link"]);
    std::fs::hard_link(d.join("m/config.json"), d.join("hard")).unwrap();
    refused(d, &["convert", "m", "--type", "Q8_0", "-o", "hard", "--force"], &["hard", "input"]);
    // 4. validate's outputs: an input is never overwritten, with or without --force
    for out in ["--report", "--markdown", "--plot"] {
        let name = if out == "--plot" { "text.svg" } else { "text.txt" };
        if out == "--plot" {
            std::fs::copy(d.join("text.txt"), d.join("text.svg")).unwrap();
        }
        let base = ["validate", "--reference", "m", "--candidate", "x.gguf", "--text", name, "--ctx", "64", out, name];
        refused(d, &base, &[name, "input"]);
        let mut forced = base.to_vec();
        forced.push("--force");
        refused(d, &forced, &[name, "input"]);
    }
    // an existing file needs --force
    std::fs::write(d.join("old.json"), "{}").unwrap();
    refused(
        d,
        &["validate", "--reference", "m", "--candidate", "x.gguf", "--text", "text.txt", "--ctx", "64", "--report", "old.json"],
        &["old.json", "already exists"],
    );
    // 6. inputs and output locations are checked before any work
    refused(d, &["convert", "m", "--type", "Q8_0", "-o", "a.gguf", "--validate", "missing.txt"], &["missing.txt"]);
    refused(d, &["convert", "m", "--type", "Q8_0", "-o", "a.gguf", "--validate", "text.txt", "--validate-ctx", "2048"], &["text.txt", "chunk"]);
    refused(d, &["convert", "m", "--type", "Q8_0", "-o", "a.gguf", "--validate", "text.txt", "--validate-ctx", "4096"], &["--validate-ctx 4096", "2048"]);
    refused(
        d,
        &["validate", "--reference", "m", "--candidate", "x.gguf", "--text", "text.txt", "--ctx", "64", "--plot", "nowhere/p.png"],
        &["nowhere", "does not exist"],
    );
}

trait CharDevice {
    fn is_char_device_like(&self) -> bool;
}
impl CharDevice for std::fs::FileType {
    fn is_char_device_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_char_device()
    }
}

#[test]
fn batch_targets_cannot_hit_their_sources_or_escape() {
    let s = scene();
    let d = s.path();
    let manifest = |body: &str| std::fs::write(d.join("b.toml"), body).unwrap();
    // a target named like its own manifest, in output_dir "."
    manifest("output_dir = \".\"\n[[sources]]\nname = \"m\"\npath = \"m\"\n[[targets]]\nformat = \"gguf\"\ntype = \"Q8_0\"\nname = \"b.toml\"\n");
    refused(d, &["batch", "b.toml", "--force"], &["b.toml"]);
    // a target named like a source in output_dir "."
    manifest("output_dir = \".\"\n[[sources]]\nname = \"m\"\npath = \"m\"\n[[targets]]\nformat = \"mlx\"\nbits = 4\nname = \"m\"\n");
    refused(d, &["batch", "b.toml", "--force"], &["m"]);
    // escaping output_dir
    for name in ["../../escaped.gguf", "/tmp/abs.gguf", "sub/x.gguf"] {
        manifest(&format!("output_dir = \"out\"\n[[sources]]\nname = \"m\"\npath = \"m\"\n[[targets]]\nformat = \"gguf\"\ntype = \"Q8_0\"\nname = \"{name}\"\n"));
        refused(d, &["batch", "b.toml"], &["plain file name"]);
    }
    // two targets with one output
    manifest("output_dir = \"out\"\n[[sources]]\nname = \"m\"\npath = \"m\"\n[[targets]]\nformat = \"gguf\"\ntype = \"Q8_0\"\nname = \"same.gguf\"\n[[targets]]\nformat = \"gguf\"\ntype = \"Q4_0\"\nname = \"same.gguf\"\n");
    refused(d, &["batch", "b.toml", "--jobs", "2"], &["same.gguf", "two jobs"]);
}

/// For each writing command, every kind of output location, with and without --force: whatever
/// existed is unchanged unless it was this command's own earlier output and --force was given.
#[test]
fn every_writer_against_every_kind_of_target() {
    let s = scene();
    let d = s.path();
    // prior outputs of each command, to be replaced only with --force
    bin().current_dir(d).args(["convert", "m", "--format", "mlx", "--bits", "8", "-o", "prior-mlx"]).assert().success();
    bin().current_dir(d).args(["synth", "--preset", "tiny", "-o", "prior-synth"]).assert().success();
    std::fs::copy(d.join("x.gguf"), d.join("prior.gguf")).unwrap();
    // (name, arguments for an output, this tool's earlier outputs it may replace with --force)
    type Cmd = (&'static str, fn(&str) -> Vec<String>, &'static [&'static str]);
    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }
    let cmds: [Cmd; 5] = [
        ("convert-gguf", |o| v(&["convert", "m", "--type", "Q8_0", "-o", o]), &["prior.gguf", "x.gguf"]),
        ("convert-mlx", |o| v(&["convert", "m", "--format", "mlx", "--bits", "4", "-o", o]), &["prior-mlx"]),
        ("logits", |o| v(&["logits", "x.gguf", "--tokens", "1,2,3", "-o", o]), &["prior.gguf"]),
        ("validate", |o| v(&["validate", "--reference", "m", "--candidate", "x.gguf", "--text", "text.txt", "--ctx", "64", "--chunks", "1", "--report", o]), &["prior.gguf"]),
        ("synth", |o| v(&["synth", "--preset", "tiny", "-o", o]), &["prior-synth"]),
    ];
    let targets = ["m/model.safetensors", "m", "text.txt", "x.gguf", "foreign", "foreign/keep.txt", "/dev/null", "fifo", "link", "fresh"];
    for (name, args, priors) in cmds {
        for t in targets.iter().copied().chain(priors.iter().copied()) {
            for force in [false, true] {
                let before = snapshot(d);
                let mut a = args(t);
                if force {
                    a.push("--force".into());
                }
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                let (code, err) = run_in(d, &a);
                let after = snapshot(d);
                let replaced_prior = priors.contains(&t) && force;
                for (p, was) in &before {
                    let own = replaced_prior && p.starts_with(t);
                    if !own {
                        assert_eq!(after.get(p), Some(was), "{name} -o {t} force={force} changed {}: {err}", p.display());
                    }
                }
                if t == "fresh" {
                    assert!(code.is_some(), "{name}");
                    let _ = std::fs::remove_dir_all(d.join("fresh")).or_else(|_| std::fs::remove_file(d.join("fresh")));
                } else if !replaced_prior {
                    assert_eq!(code, Some(2), "{name} -o {t} force={force}: {err}");
                } else {
                    // validate may fail its verdict (exit 1) but writes its report
                    assert!(matches!(code, Some(0) | Some(1)), "{name} -o {t} force={force}: {err}");
                }
                assert!(!after.keys().any(|p| p.to_string_lossy().contains(ouro_quant::output::TEMP_MARK)), "{name} -o {t}: temporary left");
            }
        }
    }
}

#[test]
fn two_runs_racing_to_one_target_one_wins_the_other_says_so() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("big");
    bin().args(["synth", "--preset", "tiny", "--layers", "8", "-o"]).arg(&src).assert().success();
    let target = d.path().join("race.gguf");
    for _ in 0..3 {
        let spawn = || {
            std::process::Command::new(assert_cmd::cargo::cargo_bin("ouro-quant"))
                .arg("convert")
                .arg(&src)
                .args(["--type", "Q8_0", "--json", "-o"])
                .arg(&target)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn(), spawn());
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        let codes = [a.status.code(), b.status.code()];
        let ok = codes.iter().filter(|c| **c == Some(0)).count();
        assert_eq!(ok, 1, "exactly one run writes the target: {codes:?}");
        let loser = if a.status.success() { &b } else { &a };
        assert_eq!(loser.status.code(), Some(2));
        let err = String::from_utf8_lossy(&loser.stderr);
        assert!(err.contains("race.gguf") && (err.contains("appeared") || err.contains("already exists")), "{err}");
        bin().args(["inspect", "--verify"]).arg(&target).assert().success();
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        std::fs::remove_file(&target).unwrap();
    }
}

/// Starts `args`, waits until a temporary output of at least 1 MiB appears in `dir`, sends `sig`.
fn interrupt(args: &[&std::ffi::OsStr], dir: &Path, sig: i32) -> Option<i32> {
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("ouro-quant"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let big = |p: &Path| -> bool {
        let m = std::fs::metadata(p).unwrap();
        if m.is_dir() {
            std::fs::read_dir(p).map(|r| r.flatten().any(|e| e.metadata().map(|m| m.len() > 1 << 20).unwrap_or(false))).unwrap_or(false)
        } else {
            m.len() > 1 << 20
        }
    };
    loop {
        let found = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(ouro_quant::output::TEMP_MARK) && big(&e.path()));
        if found || start.elapsed().as_secs() > 120 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    unsafe { libc::kill(child.id() as i32, sig) };
    child.wait().unwrap().code()
}

#[test]
fn sigint_and_sigterm_leave_no_file_behind() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("big");
    // one layer of the 2.6B shapes: ~500 MB of bf16
    bin().args(["synth", "--preset", "ouro-2.6b", "--layers", "1", "-o"]).arg(&src).assert().success();
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let manifest = d.path().join("b.toml");
    std::fs::write(
        &manifest,
        format!("output_dir = \"{}\"\n[[sources]]\nname = \"big\"\npath = \"{}\"\n[[targets]]\nformat = \"gguf\"\ntype = \"Q8_0\"\n", out.display(), src.display()),
    )
    .unwrap();
    let os = |s: &str| std::ffi::OsString::from(s);
    let gguf = vec![os("convert"), src.clone().into(), os("--type"), os("Q8_0"), os("-o"), out.join("x.gguf").into()];
    let mlx = vec![os("convert"), src.clone().into(), os("--format"), os("mlx"), os("--bits"), os("8"), os("-o"), out.join("x-mlx").into()];
    let batch = vec![os("batch"), manifest.clone().into()];
    for (what, args) in [("gguf", &gguf), ("mlx", &mlx), ("batch", &batch)] {
        for (sig, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
            let before: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
            let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
            let got = interrupt(&args, &out, sig);
            assert_eq!(got, Some(code), "{what} signal {sig}");
            let left: Vec<_> = std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| !before.contains(n))
                .filter(|n| n.to_string_lossy().contains(ouro_quant::output::TEMP_MARK) || n.to_string_lossy().starts_with('x'))
                .collect();
            assert!(left.is_empty(), "{what} signal {sig} left {left:?}");
        }
    }
}

#[test]
fn temporaries_of_dead_processes_are_swept_whatever_their_target() {
    let s = scene();
    let d = s.path();
    // pid 2147483632 does not run; one for another target name, one old-style name, one directory
    for n in ["2147483632-0-other.gguf", "2147483632-elsewhere.gguf"] {
        std::fs::write(d.join(format!("{}{n}", ouro_quant::output::TEMP_MARK)), "junk").unwrap();
    }
    std::fs::create_dir(d.join(format!("{}2147483632-3-old-mlx", ouro_quant::output::TEMP_MARK))).unwrap();
    bin().current_dir(d).args(["convert", "m", "--type", "Q8_0", "-o", "new.gguf"]).assert().success();
    let left: Vec<String> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!left.iter().any(|n| n.contains(ouro_quant::output::TEMP_MARK)), "{left:?}");
}

#[test]
fn run_stops_at_the_models_context_whatever_max_tokens_says() {
    // A context of 64 positions: a billion max-tokens must neither size the KV cache (an abort
    // before) nor run past the context; the stop is named.
    let m = copy_checkpoint(&fixtures().join("tiny-random"));
    edit_config(m.path(), |c| {
        c.insert("max_position_embeddings".into(), 64.into());
    });
    let o = bin().arg("run").arg(m.path()).args(["--prompt-tokens", "5,6,7", "--max-tokens", "1000000000", "--temperature", "0", "--json"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let stopped = v["stats"]["stopped_by"].as_str().unwrap();
    if stopped.starts_with("stop token") {
        // greedy decoding of this random model met a stop token first: nothing to check past it
        assert!(v["stats"]["generated_tokens"].as_u64().unwrap() < 62);
    } else {
        assert_eq!(stopped, "context limit (64)");
        // 3 prompt tokens + 61 generated fill the 64 positions; the last one generated is not fed back
        assert_eq!(v["stats"]["generated_tokens"].as_u64(), Some(62));
    }
    // a prompt longer than the context is refused, both numbers named
    let ids = vec!["5"; 65].join(",");
    let o = bin().arg("run").arg(m.path()).args(["--prompt-tokens", &ids, "--max-tokens", "1"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("65") && e.contains("64"), "{e}");
}

#[test]
fn convert_names_the_tensors_it_ignores() {
    let m = copy_checkpoint(&fixtures().join("tiny-random"));
    edit_weights(m.path(), |ts| {
        ts.push(RawTensor {
            spec: ouro_quant::stfile::TensorSpec { name: "lm_head.extra_bias".into(), dtype: ouro_quant::stfile::DType::F32, shape: vec![4] },
            bytes: vec![0; 16],
        })
    });
    let out = tempfile::tempdir().unwrap();
    let o = bin().arg("convert").arg(m.path()).arg("-o").arg(out.path().join("x.gguf")).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("note") && e.contains("lm_head.extra_bias") && e.contains("ignored"), "{e}");
}

#[test]
fn a_card_beside_the_file_that_is_not_ours_stops_convert_before_it_starts() {
    let s = scene();
    let d = s.path();
    std::fs::write(d.join("y.md"), "my notes").unwrap();
    refused(d, &["convert", "m", "--type", "Q8_0", "-o", "y.gguf", "--validate", "text.txt", "--validate-ctx", "128"], &["y.md", "did not write"]);
    // our own card is replaced by a later validation
    let (code, err) = run_in(d, &["convert", "m", "--type", "Q8_0", "-o", "z.gguf", "--validate", "text.txt", "--validate-ctx", "128"]);
    assert!(matches!(code, Some(0) | Some(1)), "{err}");
    let card = std::fs::read_to_string(d.join("z.md")).unwrap();
    assert!(card.contains("quantized_by: ouro-quant"));
    std::fs::remove_file(d.join("z.gguf")).unwrap();
    let (code, err) = run_in(d, &["convert", "m", "--type", "Q8_0", "-o", "z.gguf", "--validate", "text.txt", "--validate-ctx", "128"]);
    assert!(matches!(code, Some(0) | Some(1)), "{err}");
}

/// `--validate` without `-o`: the default output name gets the card, and its card location is
/// checked before the conversion starts, as with `-o` (MLX used to convert, then refuse).
#[test]
fn validate_without_an_output_name_uses_the_default_one() {
    let s = scene();
    let d = s.path();
    std::fs::write(d.join("m-Q8_0.md"), "my notes").unwrap();
    refused(d, &["convert", "m", "--type", "Q8_0", "--validate", "text.txt", "--validate-ctx", "128"], &["m-Q8_0.md", "did not write"]);
    assert!(!d.join("m-Q8_0.gguf").exists());
    let (code, err) = run_in(d, &["convert", "m", "--format", "mlx", "--bits", "8", "--validate", "text.txt", "--validate-ctx", "128"]);
    assert_eq!(code, Some(0), "{err}");
    let out: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()).filter(|p| p.join("config.json").exists() && p.file_name().unwrap() != "m").collect();
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(out[0].file_name().unwrap().to_str().unwrap().starts_with("m-"), "{out:?}");
    let card = std::fs::read_to_string(out[0].join("README.md")).unwrap();
    assert!(card.contains("## Validation") && card.contains("against the 8bit profile"), "{card}");
}

#[test]
fn off_a_terminal_long_work_prints_plain_progress_lines() {
    // stderr is a pipe here, as in CI or under nohup: no bar, plain lines with done/total, rate, ETA
    let d = tempfile::tempdir().unwrap();
    let o = bin()
        .env("OURO_QUANT_PROGRESS_SECS", "0")
        .arg("convert")
        .arg(fixtures().join("ouro-tiny-trained"))
        .arg("-o")
        .arg(d.path().join("x.gguf"))
        .output()
        .unwrap();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("convert: ")).collect();
    assert!(lines.len() >= 3, "{err}");
    assert!(lines.iter().all(|l| l.contains(" / ") && l.contains("%)") && l.contains("/s, ETA ")), "{err}");
    assert!(!err.contains('\r') && !err.contains('\u{1b}'), "no terminal control off a terminal");
    // at the default interval a sub-second job prints none
    let o = bin().arg("convert").arg(fixtures().join("ouro-tiny-trained")).arg("-o").arg(d.path().join("y.gguf")).output().unwrap();
    assert!(!String::from_utf8_lossy(&o.stderr).contains("convert: "));
}
