//! Failures of the machine rather than of the input: a full disk, a file-size limit, a kill.

mod common;

use std::path::Path;

use common::*;

/// A 300 KiB tmpfs (needs root, as CI runs; elsewhere the test says so and checks nothing).
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn new() -> Option<SmallDisk> {
        let d = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=300k", "tmpfs"])
            .arg(d.path())
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        ok.then_some(SmallDisk(d))
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0.path()).status();
    }
}

fn entries(p: &Path) -> Vec<String> {
    std::fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

#[test]
fn a_full_disk_gives_a_clear_error_and_leaves_nothing() {
    let Some(disk) = SmallDisk::new() else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root)");
        ouro_quant::test_report::note("NOT RUN here: convert onto a full disk (a small tmpfs needs root to mount; the RLIMIT_FSIZE test still fails writes mid-file)");
        return;
    };
    ouro_quant::test_report::note("ran: convert onto a full disk (a 300 KiB tmpfs)");
    let src = fixtures().join("tiny-random");
    let cases: [(&str, Vec<&str>); 3] = [
        ("x.gguf", vec!["--type", "Q8_0"]),
        ("x-8bit", vec!["--format", "mlx", "--bits", "8"]),
        ("x.F32.gguf", vec!["--type", "F32"]),
    ];
    for (name, args) in cases {
        let o = bin().arg("convert").arg(&src).args(&args).arg("-o").arg(disk.path().join(name)).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains("No space left on device"), "{name}: {err}");
        assert_eq!(err.matches("No space left").count(), 1, "said once: {err}");
        assert!(entries(disk.path()).is_empty(), "{name} left {:?}", entries(disk.path()));
    }
    // a batch into the full disk: the job fails, named, and nothing half-written stays
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m.toml");
    std::fs::write(
        &m,
        format!(
            "output_dir = \"{}\"\n[[sources]]\nname = \"t\"\npath = \"{}\"\n[[targets]]\nformat = \"gguf\"\ntype = \"Q8_0\"\n",
            disk.path().join("b").display(),
            src.display()
        ),
    )
    .unwrap();
    let o = bin().arg("batch").arg(&m).output().unwrap();
    assert_ne!(o.status.code(), Some(0));
    let left = entries(&disk.path().join("b"));
    assert!(!left.iter().any(|f| f.ends_with(".gguf") || f.contains(".ouro-quant-tmp")), "{left:?}");
}

/// The same failure without privileges: a file-size limit (`RLIMIT_FSIZE`, 300 KiB, with SIGXFSZ
/// ignored so that the write fails with EFBIG instead of killing the process) stops each
/// conversion mid-file; it must say so once, exit 2 and leave nothing behind.
#[cfg(target_os = "linux")]
#[test]
fn a_file_size_limit_gives_a_clear_error_and_leaves_nothing() {
    use std::os::unix::process::CommandExt;
    ouro_quant::test_report::note("ran: convert under a 300 KiB file-size limit (RLIMIT_FSIZE)");
    let src = fixtures().join("tiny-random");
    let d = tempfile::tempdir().unwrap();
    for (name, args) in [
        ("x.gguf", vec!["--type", "Q8_0"]),
        ("x-8bit", vec!["--format", "mlx", "--bits", "8"]),
        ("x.F32.gguf", vec!["--type", "F32"]),
    ] {
        let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("ouro-quant"));
        c.arg("convert").arg(&src).args(&args).arg("-o").arg(d.path().join(name));
        // Safety: only async-signal-safe calls between fork and exec.
        unsafe {
            c.pre_exec(|| {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let lim = libc::rlimit { rlim_cur: 300 << 10, rlim_max: 300 << 10 };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert_eq!(err.matches("File too large").count(), 1, "{name}: said once: {err}");
        assert!(entries(d.path()).is_empty(), "{name} left {:?}", entries(d.path()));
    }
}

#[test]
fn an_mlx_convert_killed_mid_write_leaves_no_directory_and_the_next_run_cleans_up() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("big");
    // one layer of the 2.6B shapes: ~500 MB of bf16
    bin().args(["synth", "--preset", "ouro-2.6b", "--layers", "1", "-o"]).arg(&src).assert().success();
    let out_dir = d.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let target = out_dir.join("big-8bit");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("ouro-quant"))
        .arg("convert")
        .arg(&src)
        .args(["--format", "mlx", "--bits", "8", "--json", "-o"])
        .arg(&target)
        .spawn()
        .unwrap();
    // wait until the temporary directory holds part of a shard, then SIGKILL
    let start = std::time::Instant::now();
    loop {
        let partial = entries(&out_dir).iter().filter(|n| n.starts_with(ouro_quant::output::TEMP_MARK)).any(|n| {
            std::fs::metadata(out_dir.join(n).join("model.safetensors")).map(|m| m.len() > 1 << 20).unwrap_or(false)
        });
        if partial || start.elapsed().as_secs() > 60 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap();
    assert!(!child.wait().unwrap().success(), "convert finished before it could be killed");
    assert!(!target.exists(), "a killed convert left a directory at the target");
    assert_eq!(entries(&out_dir).len(), 1, "the killed run's temporary directory: {:?}", entries(&out_dir));
    bin().arg("convert").arg(&src).args(["--format", "mlx", "--bits", "8", "-o"]).arg(&target).assert().success();
    assert_eq!(entries(&out_dir), vec!["big-8bit".to_string()]);
    assert!(target.join("ouro.py").is_file());
}
