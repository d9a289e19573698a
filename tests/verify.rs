//! `inspect --verify`: the checksums convert records in GGUF files and MLX directories catch damage
//! anywhere that matters (tensor data, GGUF metadata, padding, MLX files) and name what differs.

mod common;

use std::path::{Path, PathBuf};

use common::{bin, fixtures};
use ouro_quant::gguf::file::GgufFile;

fn convert(args: &[&str], out: &Path) {
    convert_from(&fixtures().join("golden/gqa_bf16"), args, out);
}

fn convert_from(model: &Path, args: &[&str], out: &Path) {
    let mut cmd = bin();
    cmd.arg("convert").arg(model).args(args).arg("-o").arg(out);
    cmd.assert().success();
}

/// (exit code, stdout, stderr) of `inspect --verify PATH`.
fn verify(path: &Path) -> (i32, String, String) {
    let o = bin().arg("inspect").arg("--verify").arg(path).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

fn gguf(ty: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m.gguf");
    convert(&["--type", ty], &p);
    (d, p)
}

#[test]
fn a_fresh_gguf_verifies_and_json_says_so() {
    let (_d, p) = gguf("Q4_K_M");
    let (code, out, err) = verify(&p);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("OK"), "{out}");
    let o = bin().args(["inspect", "--verify", "--json"]).arg(&p).output().unwrap();
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let n = GgufFile::open(&p).unwrap().header.tensors.len();
    assert_eq!(j["checked"], serde_json::json!(n + 1)); // header + every tensor
    assert_eq!(j["mismatches"], serde_json::json!([]));
}

#[test]
fn every_gguf_tensor_is_covered_and_the_damaged_one_is_named() {
    let (_d, p) = gguf("Q8_0");
    let f = GgufFile::open(&p).unwrap();
    let infos = f.header.tensors.clone();
    let start = f.header.data_start;
    drop(f);
    for t in &infos {
        // flip one byte in the middle of each tensor's data in turn
        let at = start + t.offset as usize + t.nbytes() / 2;
        flip(&p, at);
        let (code, out, _) = verify(&p);
        assert_eq!(code, 1, "{}: {out}", t.name);
        assert!(out.contains(&format!("MISMATCH tensor {}:", t.name)), "{}: {out}", t.name);
        assert_eq!(out.matches("MISMATCH").count(), 1, "{out}");
        flip(&p, at);
    }
    assert_eq!(verify(&p).0, 0);
}

#[test]
fn gguf_metadata_padding_and_trailing_bytes_are_covered() {
    // the trained fixture's Q4_0 token_embd (849 rows x 144 bytes) is followed by 16 bytes of padding
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m.gguf");
    convert_from(&fixtures().join("ouro-tiny-trained"), &["--type", "Q4_0"], &p);
    let f = GgufFile::open(&p).unwrap();
    let h = f.header.clone();
    drop(f);
    // a metadata value (the rope base, a float the reader accepts whatever its bits)
    let at = h.value_offset("ouro.rope.freq_base").unwrap();
    flip(&p, at);
    let (code, out, _) = verify(&p);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("MISMATCH header:"), "{out}");
    flip(&p, at);
    // a padding byte between two tensors
    let t = h.tensors.iter().find(|t| t.nbytes() % h.alignment != 0).expect("a padded tensor");
    let at = h.data_start + t.offset as usize + t.nbytes();
    flip(&p, at);
    let (code, out, _) = verify(&p);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("MISMATCH padding: non-zero padding"), "{out}");
    flip(&p, at);
    // bytes appended after the last tensor
    let mut b = std::fs::read(&p).unwrap();
    b.extend_from_slice(&[0u8; 32]);
    std::fs::write(&p, &b).unwrap();
    let (code, out, _) = verify(&p);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("32 bytes follow the last tensor"), "{out}");
}

#[test]
fn a_gguf_without_recorded_checksums_cannot_be_verified() {
    // the golden llama.cpp-layout file was not written by us
    let (code, _, err) = verify(&fixtures().join("golden/gguf/mha_f32.F32.gguf"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("mha_f32.F32.gguf") && err.contains("no recorded checksums"), "{err}");
}

#[test]
fn recorded_gguf_checksums_are_xxh3_of_the_tensor_bytes() {
    // computed here independently of the writer: XXH3-128 of each tensor's bytes
    let (_d, p) = gguf("Q6_K");
    let f = GgufFile::open(&p).unwrap();
    let rec = f.header.get("ouro_quant.checksum.tensors").unwrap().as_array().unwrap().to_vec();
    assert_eq!(rec.len(), f.header.tensors.len());
    for (t, r) in f.header.tensors.iter().zip(&rec) {
        let want = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(f.tensor_bytes(t)));
        assert_eq!(r.as_str(), Some(want.as_str()), "{}", t.name);
    }
}

fn mlx(args: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m-4bit");
    convert(&[&["--format", "mlx"], args].concat(), &p);
    (d, p)
}

#[test]
fn a_fresh_mlx_dir_verifies_and_an_edited_card_does_not_matter() {
    let (_d, p) = mlx(&["--bits", "4"]);
    assert_eq!(verify(&p).0, 0);
    std::fs::write(p.join("README.md"), "edited before upload\n").unwrap();
    let (code, out, err) = verify(&p);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn mlx_damage_is_named_by_file_and_traced_to_the_tensor() {
    let (_d, p) = mlx(&["--bits", "8"]);
    // a byte inside one tensor of the shard
    let f = ouro_quant::stfile::SafetensorsFile::open(p.join("model.safetensors")).unwrap();
    let t = f.info("model.layers.0.self_attn.q_proj.weight").unwrap().clone();
    let at = f.header().data_start() + t.begin + 5;
    drop(f);
    flip(&p.join("model.safetensors"), at);
    let (code, out, _) = verify(&p);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("MISMATCH file model.safetensors:"), "{out}");
    assert!(out.contains("MISMATCH tensor model.layers.0.self_attn.q_proj.weight:"), "{out}");
    flip(&p.join("model.safetensors"), at);
    assert_eq!(verify(&p).0, 0);
    // config, missing tokenizer, an extra weight file mlx_lm would load
    let cfg = std::fs::read_to_string(p.join("config.json")).unwrap();
    std::fs::write(p.join("config.json"), cfg.replace("\"rms_norm_eps\"", "\"rms_norm_eps\" ")).unwrap();
    std::fs::remove_file(p.join("tokenizer.json")).unwrap();
    std::fs::write(p.join("model-extra.safetensors"), b"x").unwrap();
    let (code, out, _) = verify(&p);
    assert_eq!(code, 1, "{out}");
    for want in [
        "MISMATCH file config.json: checksum",
        "MISMATCH file tokenizer.json: missing",
        "MISMATCH file model-extra.safetensors: not recorded",
    ] {
        assert!(out.contains(want), "{want:?} in {out}");
    }
}

#[test]
fn recorded_mlx_checksums_are_xxh3_of_the_files() {
    let (_d, p) = mlx(&["--bits", "4", "--group-size", "32"]);
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(p.join("model.safetensors.index.json")).unwrap()).unwrap();
    let files = index["metadata"]["ouro_quant"]["files"].as_object().unwrap();
    let mut names: Vec<&str> = files.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors", "ouro.py", "tokenizer.json"]);
    for (n, v) in files {
        let want = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&std::fs::read(p.join(n)).unwrap()));
        assert_eq!(v.as_str(), Some(want.as_str()), "{n}");
    }
    // an index without the record (a directory of another tool) cannot be verified
    let mut index = index;
    index["metadata"].as_object_mut().unwrap().remove("ouro_quant");
    std::fs::write(p.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let (code, _, err) = verify(&p);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no recorded checksums"), "{err}");
}
