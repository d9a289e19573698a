//! Failures of the machine rather than of the input: a full disk.

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
        return;
    };
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
