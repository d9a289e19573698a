//! MLX output: affine quantization against MLX's own `mx.quantize`, the directory layout against
//! stock mlx-lm (load, logits, greedy generation through our `ouro.py`), and our runner on it.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use common::*;
use ouro_quant::mlx::affine;
use ouro_quant::model::{source, KvPolicy, LoopOutputs};
use ouro_quant::stfile::{DType, SafetensorsFile, TensorSpec};

fn python() -> String {
    std::env::var("OURO_QUANT_PYTHON").unwrap_or_else(|_| {
        panic!("OURO_QUANT_PYTHON is not set: run scripts/test.sh, which installs mlx-lm into target/oracle-venv")
    })
}

/// Runs the MLX oracle script and returns its stdout.
fn oracle(args: &[&std::ffi::OsStr]) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oracles/mlx_oracle.py");
    let o = std::process::Command::new(python()).arg(script).args(args).output().unwrap();
    assert!(o.status.success(), "mlx oracle {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn f32s(f: &SafetensorsFile, name: &str) -> Vec<f32> {
    f.bytes(name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Test rows of 384 values (a multiple of 32, 64 and 128): random groups and the edge cases.
fn test_matrix() -> Vec<Vec<f32>> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    let n = 384;
    let mut rows = vec![];
    for k in 0..6 {
        let scale = [0.02, 1.0, 1e-4, 30.0, 0.5, 3.0][k];
        rows.push((0..n).map(|_| ((next() * 2.0 - 1.0) * scale) as f32).collect());
    }
    rows.push(vec![0.0; n]); // all zero
    rows.push(vec![0.37; n]); // constant
    rows.push(vec![-1.25; n]); // constant negative
    rows.push((0..n).map(|_| -(next() as f32) - 0.01).collect()); // all negative
    rows.push((0..n).map(|_| next() as f32 + 0.01).collect()); // all positive
    rows.push((0..n).map(|i| if i % 37 == 0 { 25.0 } else { (next() as f32 - 0.5) * 0.1 }).collect()); // outliers
    rows.push((0..n).map(|i| if i % 41 == 0 { -25.0 } else { (next() as f32 - 0.5) * 0.1 }).collect());
    rows.push((0..n).map(|i| (i % 16) as f32 * 0.5 - 3.75).collect()); // exact .5 steps: ties
    rows.push((0..n).map(|i| (i % 9) as f32 - 4.0).collect()); // symmetric integers
    rows.push((0..n).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect()); // |min| == |max|
    rows
}

fn encode(dtype: DType, v: &[f32]) -> Vec<u8> {
    let mut out = vec![];
    for &x in v {
        match dtype {
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes()),
            _ => out.extend_from_slice(&x.to_le_bytes()),
        }
    }
    out
}

fn decode(dtype: DType, b: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; b.len() / dtype.size()];
    ouro_quant::checkpoint::decode_f32(dtype, b, &mut out);
    out
}

#[test]
fn affine_quantization_is_bit_exact_with_mx_quantize() {
    let d = tempfile::tempdir().unwrap();
    let rows = test_matrix();
    let cols = rows[0].len();
    let dtypes = [DType::F32, DType::F16, DType::BF16];
    let tensors: Vec<RawTensor> = dtypes
        .iter()
        .map(|&dt| RawTensor {
            spec: TensorSpec { name: format!("x_{}", dt.name()), dtype: dt, shape: vec![rows.len(), cols] },
            bytes: encode(dt, &rows.concat()),
        })
        .collect();
    let input = d.path().join("in.safetensors");
    let output = d.path().join("out.safetensors");
    write_tensors(&input, &tensors);
    oracle(&["quantize".as_ref(), input.as_os_str(), output.as_os_str()]);
    let want = SafetensorsFile::open(&output).unwrap();
    let mut cases = 0;
    for &dt in &dtypes {
        // the values MLX saw, widened exactly to f32
        let x = decode(dt, &encode(dt, &rows.concat()));
        for bits in affine::BITS {
            for gs in affine::GROUP_SIZES {
                let key = format!("x_{}.b{bits}.g{gs}", dt.name());
                let (wpr, gpr) = (cols * bits as usize / 32, cols / gs);
                let mut words = vec![];
                let mut scales = vec![];
                let mut biases = vec![];
                for row in x.chunks_exact(cols) {
                    let mut w = vec![0u32; wpr];
                    let (mut s, mut b) = (vec![0f32; gpr], vec![0f32; gpr]);
                    affine::quantize_row(row, bits, gs, &mut w, &mut s, &mut b);
                    words.extend(w.iter().flat_map(|v| v.to_le_bytes()));
                    scales.extend(encode(dt, &s));
                    biases.extend(encode(dt, &b));
                }
                let info = want.info(&format!("{key}.weight")).unwrap();
                assert_eq!(info.dtype, DType::U32, "{key}");
                assert_eq!(info.shape, vec![rows.len(), wpr], "{key}");
                let mw = want.bytes(&format!("{key}.weight")).unwrap();
                if let Some(i) = (0..mw.len() / 4).find(|&i| mw[4 * i..4 * i + 4] != words[4 * i..4 * i + 4]) {
                    panic!("{key}: packed word {i} (row {}) differs: mlx {:08x?} ours {:08x?}", i / wpr, &mw[4 * i..4 * i + 4], &words[4 * i..4 * i + 4]);
                }
                for (what, ours) in [("scales", &scales), ("biases", &biases)] {
                    let t = want.info(&format!("{key}.{what}")).unwrap();
                    assert_eq!(t.dtype, dt, "{key}.{what} dtype");
                    let m = want.bytes(&format!("{key}.{what}")).unwrap();
                    if m != ours.as_slice() {
                        let (a, b) = (decode(dt, m), decode(dt, ours));
                        let g = a.iter().zip(&b).position(|(p, q)| p.to_bits() != q.to_bits()).unwrap();
                        panic!("{key}.{what}: group {g} (row {}) mlx {} ours {}", g / gpr, a[g], b[g]);
                    }
                }
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 3 * 6 * 3);
}

fn convert(model: &Path, out: &Path, args: &[&str]) {
    bin().arg("convert").arg(model).args(["--format", "mlx"]).args(args).arg("-o").arg(out).assert().success();
}

fn golden(name: &str) -> PathBuf {
    fixtures().join("golden").join(name)
}

fn golden_tokens(name: &str) -> Vec<u32> {
    let f = SafetensorsFile::open(golden(name).join("expected.safetensors")).unwrap();
    f.bytes("tokens").unwrap().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect()
}

fn csv(ids: &[u32]) -> String {
    ids.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",")
}

/// Our runner's per-loop logits and default logits on `path`.
fn ours(path: &Path, tokens: &[u32]) -> (Vec<Vec<f32>>, Vec<f32>) {
    let m = source::load(path, &Device::Cpu).unwrap().model;
    let lo = LoopOutputs::new(&m, &m.forward_full(tokens, KvPolicy::Full).unwrap()).unwrap();
    let def = lo.logits(m.default_mode());
    (lo.step_logits, def)
}

/// A golden checkpoint with a tokenizer_config.json beside it (mlx-lm needs one to load the tokenizer).
fn golden_with_tokenizer_config(name: &str) -> tempfile::TempDir {
    let d = copy_checkpoint(&golden(name));
    std::fs::remove_file(d.path().join("expected.safetensors")).unwrap();
    std::fs::remove_file(d.path().join("expected.json")).unwrap();
    std::fs::copy(fixtures().join("tiny-random/tokenizer_config.json"), d.path().join("tokenizer_config.json")).unwrap();
    d
}

#[test]
fn mlx_lm_runs_our_unquantized_and_quantized_outputs_like_upstream_and_our_runner() {
    for name in ["mha_f32", "gqa_bf16"] {
        let src = golden_with_tokenizer_config(name);
        let tokens = golden_tokens(name);
        let exp = SafetensorsFile::open(golden(name).join("expected.safetensors")).unwrap();
        let d = tempfile::tempdir().unwrap();
        for (label, args) in [("float", vec!["--bits", "16"]), ("q4g32", vec!["--bits", "4", "--group-size", "32"]), ("q8g64", vec!["--bits", "8"])] {
            let out = d.path().join(label);
            convert(src.path(), &out, &args);
            let res = d.path().join(format!("{label}.mlx.safetensors"));
            oracle(&["logits".as_ref(), out.as_os_str(), csv(&tokens).as_ref(), res.as_os_str()]);
            let mlx = SafetensorsFile::open(&res).unwrap();
            let (steps, def) = ours(&out, &tokens);
            let mlx_steps = f32s(&mlx, "step_logits");
            let per = mlx_steps.len() / steps.len();
            for (t, s) in steps.iter().enumerate() {
                let dd = max_diff(&mlx_steps[t * per..(t + 1) * per], s);
                assert!(dd < 2e-4, "{name} {label}: loop {t} logits mlx vs our runner differ by {dd}");
            }
            assert!(max_diff(&f32s(&mlx, "logits_default"), &def) < 2e-4, "{name} {label}: default logits");
            // the KV-cache path of ouro.py equals its full-sequence path
            let dec = max_diff(&f32s(&mlx, "decode_logits_default"), &f32s(&mlx, "logits_default"));
            assert!(dec < 1e-4, "{name} {label}: mlx decode with cache vs full sequence differ by {dec}");
            if label == "float" {
                // unquantized: mlx-lm through ouro.py reproduces the upstream PyTorch outputs
                for key in ["step_logits", "exit_pdf", "logits_default"] {
                    let dd = max_diff(&f32s(&mlx, key), &f32s(&exp, key));
                    assert!(dd < 2e-4, "{name}: mlx {key} vs upstream differ by {dd}");
                }
            }
        }
    }
}

#[test]
fn mlx_lm_generates_the_same_greedy_tokens_as_our_runner() {
    let d = tempfile::tempdir().unwrap();
    let prompt = [72u32, 101, 108, 108, 111, 32, 119];
    for (label, args) in [("bf16", vec!["--bits", "16"]), ("q4", vec!["--bits", "4"])] {
        let out = d.path().join(label);
        convert(&fixtures().join("tiny-random"), &out, &args);
        let mlx: Vec<u32> = serde_json::from_str(&oracle(&["generate".as_ref(), out.as_os_str(), csv(&prompt).as_ref(), "12".as_ref()])).unwrap();
        let run = bin()
            .arg("run")
            .arg(&out)
            .args(["--prompt-tokens", &csv(&prompt), "--max-tokens", "12", "--json"])
            .output()
            .unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let v: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        let ours: Vec<u32> = v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        // mlx-lm yields the stop token it stopped on; our runner stops before it.
        let mut mlx = mlx;
        if mlx.last().is_some_and(|t| [0, 2].contains(t)) {
            mlx.pop();
        }
        assert!(mlx.len() >= 4, "{label}: too short to compare: {mlx:?}");
        assert_eq!(ours, mlx, "{label}: greedy tokens of our runner vs mlx_lm.stream_generate");
    }
}
