//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ouro_quant::stfile::{SafetensorsFile, TensorSpec, Writer};

pub mod reference;

/// The repository's fixtures directory.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The `ouro-quant` binary under test, killed (and the test failed) if one command runs over 15
/// minutes: a hang then fails its test instead of holding CI until its own limit (a deadlock once
/// held CI for 90 minutes; the longest command here takes about a minute on 2 cores).
pub fn bin() -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("ouro-quant").expect("binary built");
    cmd.timeout(std::time::Duration::from_secs(900));
    cmd
}

/// The project's corpus report (`eval::corpus_report` at `--ctx 128`) of `model` (a checkpoint
/// directory, GGUF file or MLX directory) on the validation text of the trained `fixture` it was
/// made from, with the fixture's tokenizer where `model` carries none.
pub fn corpus_report_of(model: &Path, fixture: &Path) -> ouro_quant::eval::CorpusReport {
    let loaded = ouro_quant::model::source::load(model, &candle_core::Device::Cpu).unwrap();
    let tok = match loaded.tokenizer {
        Some(t) => t,
        None => tokenizers::Tokenizer::from_file(fixture.join("tokenizer.json")).unwrap(),
    };
    let text = std::fs::read_to_string(fixture.join("validation.txt")).unwrap();
    ouro_quant::eval::corpus_report(&loaded.model, &tok, &text, 128).unwrap()
}

/// A trained `fixture` loaded on the CPU, with its validation text's token ids (its own tokenizer).
pub fn load_with_validation_ids(fixture: &Path) -> (ouro_quant::model::source::LoadedModel, Vec<u32>) {
    let loaded = ouro_quant::model::source::load(fixture, &candle_core::Device::Cpu).unwrap();
    let text = std::fs::read_to_string(fixture.join("validation.txt")).unwrap();
    let ids = loaded.tokenizer.as_ref().unwrap().encode(text.as_str(), false).unwrap().get_ids().to_vec();
    (loaded, ids)
}

/// `ouro-quant validate --reference fixture --candidate candidate` on the fixture's validation
/// text at `--ctx 128`, writing its JSON report to `report`, with `extra` arguments after:
/// (exit status, the report's JSON or Null where none was written, what it printed).
pub fn validate_on_fixture(fixture: &Path, candidate: &Path, report: &Path, extra: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let o = bin()
        .arg("validate")
        .arg("--reference")
        .arg(fixture)
        .arg("--candidate")
        .arg(candidate)
        .arg("--text")
        .arg(fixture.join("validation.txt"))
        .args(["--ctx", "128", "--report"])
        .arg(report)
        .args(extra)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    let v = std::fs::read(report).ok().map(|b| serde_json::from_slice(&b).unwrap()).unwrap_or(serde_json::Value::Null);
    (o.status.code(), v, out)
}

/// Copies the files of a checkpoint directory (not recursive) into a new temp dir.
pub fn copy_checkpoint(src: &Path) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), d.path().join(e.file_name())).unwrap();
        }
    }
    d
}

/// A tensor to write: spec plus bytes.
pub struct RawTensor {
    pub spec: TensorSpec,
    pub bytes: Vec<u8>,
}

/// Reads every tensor of a safetensors file.
pub fn read_tensors(path: &Path) -> Vec<RawTensor> {
    let f = SafetensorsFile::open(path).unwrap();
    f.tensors()
        .iter()
        .map(|t| RawTensor {
            spec: TensorSpec {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            },
            bytes: f.bytes(&t.name).unwrap().to_vec(),
        })
        .collect()
}

/// Writes tensors as a safetensors file.
pub fn write_tensors(path: &Path, tensors: &[RawTensor]) {
    let specs = tensors.iter().map(|t| t.spec.clone()).collect();
    let mut w = Writer::new(path, specs, &BTreeMap::new()).unwrap();
    for t in tensors {
        w.write(&t.bytes).unwrap();
    }
    w.finish().unwrap();
}

/// Rewrites `dir/model.safetensors` through `edit`.
pub fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Vec<RawTensor>)) {
    let p = dir.join("model.safetensors");
    let mut ts = read_tensors(&p);
    edit(&mut ts);
    write_tensors(&p, &ts);
}

/// Edits `dir/config.json` as JSON.
pub fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Runs `inspect` on `dir` and returns (exit code, stderr).
pub fn inspect_err(dir: &Path) -> (i32, String) {
    let out = bin().arg("inspect").arg(dir).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A small importance matrix of `model` (a short calibration run on the trained fixture's
/// calibration text), written to `out`.
pub fn small_imatrix(model: &Path, out: &Path) {
    bin()
        .arg("imatrix")
        .arg(model)
        .arg("--text")
        .arg(fixtures().join("ouro-tiny-trained/calibration.txt"))
        .args(["--ctx", "32", "--chunks", "2", "-o"])
        .arg(out)
        .assert()
        .success();
}
