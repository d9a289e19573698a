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
                let raw = encode(dt, &x);
                for (ri, row) in x.chunks_exact(cols).enumerate() {
                    let mut w = vec![0u32; wpr];
                    let (mut s, mut b) = (vec![0f32; gpr], vec![0f32; gpr]);
                    if dt == DType::BF16 {
                        // the converter's path for bf16 checkpoints: straight from the stored bytes
                        affine::quantize_row_bf16(&raw[ri * cols * 2..(ri + 1) * cols * 2], bits, gs, &mut w, &mut s, &mut b).unwrap();
                    } else {
                        affine::quantize_row(row, bits, gs, &mut w, &mut s, &mut b);
                    }
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
        let cases = [
            ("float", vec!["--bits", "16"]),
            ("q4g32", vec!["--bits", "4", "--group-size", "32"]),
            ("q8g64", vec!["--bits", "8"]),
            // per-module settings in config.json (v_proj of layer 2 at 6 bits, the rest at 3)
            ("mixed", vec!["--recipe", "mixed_3_6", "--group-size", "32"]),
        ];
        for (label, args) in cases {
            let out = d.path().join(label);
            convert(src.path(), &out, &args);
            let res = d.path().join(format!("{label}.mlx.safetensors"));
            oracle(&["logits".as_ref(), out.as_os_str(), csv(&tokens).as_ref(), res.as_os_str()]);
            let mlx = SafetensorsFile::open(&res).unwrap();
            let (steps, def) = ours(&out, &tokens);
            // the runner multiplied the stored codes (not a widened copy) and holds about the
            // files' size: every tensor at its stored width, plus the f32 norms and gate
            let m = source::load(&out, &Device::Cpu).unwrap().model;
            // (a matrix whose columns are not whole groups stays float, as mlx-lm leaves it)
            let kernels = m.kernels();
            assert!(kernels.keys().all(|k| k == "float at stored width" || k == "MLX affine at stored width"), "{name} {label}: {kernels:?}");
            assert_eq!(kernels.contains_key("MLX affine at stored width"), label != "float", "{name} {label}: {kernels:?}");
            let files: u64 = std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .map(|p| std::fs::metadata(p).unwrap().len())
                .sum();
            let ratio = m.weight_bytes as f64 / files as f64;
            assert!((0.9..1.1).contains(&ratio), "{name} {label}: {} bytes held for {files} bytes of files", m.weight_bytes);
            // 2e-4: fixtures/golden/README.md's bound for two correct f32 implementations of the
            // same model (upstream's own eager and sdpa paths differ by 4e-5; f64 numpy by 1.5e-4)
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

fn all_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn layout_is_what_mlx_lm_convert_writes() {
    let d = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-random");
    let out = d.path().join("Ouro-tiny-mixed_4_6");
    convert(&src, &out, &["--recipe", "mixed_4_6"]);
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let q = &cfg["quantization"];
    assert_eq!(q, &cfg["quantization_config"]);
    assert_eq!((q["bits"].as_u64(), q["group_size"].as_u64(), q["mode"].as_str()), (Some(4), Some(64), Some("affine")));
    assert_eq!(q["model.early_exit_gate"], serde_json::json!(false));
    // 2 layers: both get 6-bit v_proj/down_proj (i >= 7L/8 = 1, or i < L/8 = 0 is false for 0: (0-0)%3 != 2)
    assert_eq!(q["lm_head"], serde_json::json!({"group_size": 64, "bits": 6, "mode": "affine"}));
    assert_eq!(q["model.layers.1.mlp.down_proj"]["bits"], 6);
    assert!(q.get("model.layers.0.self_attn.q_proj").is_none(), "same as the top level: no entry");
    assert_eq!(cfg["model_file"], "ouro.py");
    assert_eq!(cfg["eos_token_id"], serde_json::json!([2, 0]));
    assert!(cfg.get("auto_map").is_none());
    let keys: Vec<&String> = cfg.as_object().unwrap().keys().collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "config keys sorted");
    // tokenizer files byte for byte, the model file, the card
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(std::fs::read(src.join(f)).unwrap(), std::fs::read(out.join(f)).unwrap(), "{f}");
    }
    assert_eq!(std::fs::read_to_string(out.join("ouro.py")).unwrap(), ouro_quant::mlx::OURO_PY);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.starts_with("---\nlibrary_name: mlx\n") && card.contains("base_model: ") && card.contains("mixed_4_6") && card.contains("group size 64"), "{card}");
    // the index: every tensor, sorted, sizes that add up, and mlx metadata in the file
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    let f = SafetensorsFile::open(out.join("model.safetensors")).unwrap();
    assert_eq!(f.header().metadata.get("format").map(String::as_str), Some("mlx"));
    let wm = index["weight_map"].as_object().unwrap();
    assert_eq!(wm.len(), f.tensors().len());
    let names: Vec<&String> = wm.keys().collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]));
    let total: usize = f.tensors().iter().map(|t| t.nbytes()).sum();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total as u64));
    assert_eq!(index["metadata"]["total_parameters"].as_u64(), Some(985_601));
    // quantized triples with the planned widths; norms and the gate in the source dtype
    let w = f.info("model.layers.1.mlp.down_proj.weight").unwrap();
    assert_eq!((w.dtype, w.shape.clone()), (DType::U32, vec![256, 256 * 6 / 32]));
    let w = f.info("model.layers.0.mlp.up_proj.weight").unwrap();
    assert_eq!(w.shape, vec![256, 256 * 4 / 32]);
    assert_eq!(f.info("model.layers.0.mlp.up_proj.scales").unwrap().dtype, DType::BF16);
    assert_eq!(f.info("model.early_exit_gate.weight").unwrap().dtype, DType::BF16);
    assert!(f.info("model.early_exit_gate.scales").is_none());
    assert!(f.info("model.norm.scales").is_none());
    // and stock mlx-lm loads it
    let v: serde_json::Value = serde_json::from_str(&oracle(&["load".as_ref(), out.as_os_str()])).unwrap();
    assert_eq!(v["tensors"].as_u64(), Some(f.tensors().len() as u64));
    assert_eq!(v["layers"], 2);
}

#[test]
fn shards_above_the_limit_and_both_readers_follow_the_index() {
    let d = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-random");
    let one = d.path().join("one");
    let many = d.path().join("many");
    convert(&src, &one, &["--bits", "8"]);
    convert(&src, &many, &["--bits", "8", "--shard-bytes", "150000"]);
    let shards: Vec<String> = all_files(&many).into_iter().map(|(n, _)| n).filter(|n| n.ends_with(".safetensors")).collect();
    assert!(shards.len() >= 3, "{shards:?}");
    let n = shards.len();
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(s, &format!("model-{:05}-of-{:05}.safetensors", i + 1, n));
        assert!(std::fs::metadata(many.join(s)).unwrap().len() < 150_000 + 4096 || SafetensorsFile::open(many.join(s)).unwrap().tensors().len() == 1);
    }
    let tokens = [5u32, 17, 200, 3, 99, 42, 7];
    let (a, _) = ours(&one, &tokens);
    let (b, _) = ours(&many, &tokens);
    assert_eq!(a, b, "sharded and single-file outputs run identically");
    let v: serde_json::Value = serde_json::from_str(&oracle(&["load".as_ref(), many.as_os_str()])).unwrap();
    assert_eq!(v["class"], "Model");
}

#[test]
fn output_is_byte_identical_for_any_thread_count() {
    let d = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-random");
    let mut outs = vec![];
    for threads in ["1", "3"] {
        // same directory name (the card names it), different parents
        std::fs::create_dir(d.path().join(threads)).unwrap();
        let out = d.path().join(threads).join("Ouro-tiny-3bit-gs32");
        bin()
            .env("RAYON_NUM_THREADS", threads)
            .arg("convert")
            .arg(&src)
            .args(["--format", "mlx", "--bits", "3", "--group-size", "32", "-o"])
            .arg(&out)
            .assert()
            .success();
        outs.push(all_files(&out));
    }
    assert_eq!(outs[0].len(), outs[1].len());
    for (a, b) in outs[0].iter().zip(&outs[1]) {
        assert_eq!(a.0, b.0);
        assert!(a.1 == b.1, "{} differs between 1 and 3 threads", a.0);
    }
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

#[test]
fn bad_inputs_fail_cleanly_and_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let src = fixtures().join("tiny-random");
    let fail = |model: &Path, args: &[&str], want: &[&str]| {
        let o = bin().arg("convert").arg(model).args(["--format", "mlx"]).args(args).arg("-o").arg(&out).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        for w in want {
            assert!(err.contains(w), "{args:?}: `{w}` not in: {err}");
        }
        assert!(leftovers(d.path()).is_empty(), "{args:?} left {:?}", leftovers(d.path()));
    };
    fail(&src, &["--bits", "7"], &["--bits 7", "2, 3, 4, 5, 6 and 8"]);
    fail(&src, &["--group-size", "48"], &["--group-size 48", "32, 64 and 128"]);
    fail(&src, &["--recipe", "mixed_5_9"], &["--recipe mixed_5_9", "mixed_4_6"]);
    fail(&src, &["--recipe", "mixed_4_6", "--bits", "16"], &["--recipe", "--bits 16"]);
    // a NaN in a quantized tensor and in a float tensor: named, nothing left
    for name in ["model.layers.1.mlp.up_proj.weight", "model.layers.0.input_layernorm_2.weight"] {
        let bad = copy_checkpoint(&src);
        edit_weights(bad.path(), |ts| {
            let t = ts.iter_mut().find(|t| t.spec.name == name).unwrap();
            t.bytes[6..8].copy_from_slice(&half::bf16::NAN.to_bits().to_le_bytes());
        });
        fail(bad.path(), &["--bits", "4"], &[name, "non-finite"]);
    }
    // no tokenizer
    let bad = copy_checkpoint(&src);
    std::fs::remove_file(bad.path().join("tokenizer.json")).unwrap();
    fail(bad.path(), &["--bits", "4"], &["tokenizer.json"]);
    // an existing target is kept unless --force
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"x").unwrap();
    let o = bin().arg("convert").arg(&src).args(["--format", "mlx", "-o"]).arg(&out).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(leftovers(&out), vec!["keep"]);
    // a directory this tool did not write is never replaced, even with --force
    let o = bin().arg("convert").arg(&src).args(["--format", "mlx", "--force", "-o"]).arg(&out).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("did not write"));
    assert_eq!(leftovers(&out), vec!["keep"]);
    std::fs::remove_dir_all(&out).unwrap();
    convert(&src, &out, &[]);
    // our own MLX directory is replaced with --force
    std::fs::write(out.join("README.md"), b"edited").unwrap();
    convert(&src, &out, &["--force"]);
    assert!(out.join("ouro.py").is_file() && std::fs::read(out.join("README.md")).unwrap() != b"edited");
    assert_eq!(leftovers(d.path()), vec!["out"]);
}

#[test]
fn runner_refuses_a_damaged_mlx_directory_naming_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("m");
    convert(&fixtures().join("tiny-random"), &out, &["--bits", "4"]);
    let p = out.join("model.safetensors");
    let mut ts = read_tensors(&p);
    ts.retain(|t| t.spec.name != "model.layers.0.self_attn.k_proj.biases");
    write_tensors(&p, &ts);
    let run = || {
        let o = bin().arg("run").arg(&out).args(["--prompt-tokens", "1,2,3", "--max-tokens", "2"]).output().unwrap();
        assert_eq!(o.status.code(), Some(2));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // the index still lists it
    let err = run();
    assert!(err.contains("model.layers.0.self_attn.k_proj.biases") && err.contains("absent from shard"), "{err}");
    // removed from the index too: the quantized module is incomplete
    let ip = out.join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&ip).unwrap()).unwrap();
    index["weight_map"].as_object_mut().unwrap().remove("model.layers.0.self_attn.k_proj.biases");
    std::fs::write(&ip, serde_json::to_vec(&index).unwrap()).unwrap();
    let err = run();
    assert!(err.contains("model.layers.0.self_attn.k_proj.biases") && err.contains("missing"), "{err}");
}

/// `--imatrix` with MLX: each group's scale and bias minimise the importance-weighted error, so
/// every weight with an entry has a lower weighted error than mx.quantize's min/max parameters
/// (and those without one are mx.quantize's bytes); stock mlx-lm loads the directory unchanged
/// and computes what our runner computes; the index and card record the matrix; a matrix of
/// another model is refused naming the tensor, leaving nothing.
#[test]
fn importance_weighted_mlx_lowers_the_weighted_error_and_mlx_lm_runs_it() {
    let trained = fixtures().join("ouro-tiny-trained");
    let d = tempfile::tempdir().unwrap();
    let im = d.path().join("imatrix.gguf");
    let imatrix = |model: &Path, out: &Path| {
        bin()
            .arg("imatrix")
            .arg(model)
            .arg("--text")
            .arg(trained.join("calibration.txt"))
            .args(["--ctx", "64", "--chunks", "3", "--weighting", "exit:0.5", "-o"])
            .arg(out)
            .assert()
            .success();
    };
    imatrix(&trained, &im);
    let matrix = ouro_quant::imatrix::Imatrix::read(&im).unwrap();
    let ck = ouro_quant::checkpoint::Checkpoint::open(&trained).unwrap();
    for bits in ["4", "3"] {
        let (plain, weighted) = (d.path().join(format!("plain{bits}")), d.path().join(format!("weighted{bits}")));
        convert(&trained, &plain, &["--bits", bits]);
        convert(&trained, &weighted, &["--bits", bits, "--imatrix", im.to_str().unwrap()]);
        let (p, w) = (
            SafetensorsFile::open(plain.join("model.safetensors")).unwrap(),
            SafetensorsFile::open(weighted.join("model.safetensors")).unwrap(),
        );
        let bits: u32 = bits.parse().unwrap();
        let (mut with, mut without) = (0, 0);
        for e in ouro_quant::checkpoint::expected_tensors(&ck.config) {
            let module = e.name.strip_suffix(".weight").unwrap_or(&e.name);
            if p.bytes(&format!("{module}.scales")).is_none() {
                assert_eq!(p.bytes(&e.name), w.bytes(&e.name), "{}: a float tensor changed", e.name);
                continue;
            }
            let gguf = ouro_quant::gguf::arch::gguf_name(&ck.config, &e.name).unwrap();
            let Some(imp) = matrix.weights(&gguf) else {
                for part in ["weight", "scales", "biases"] {
                    let n = format!("{module}.{part}");
                    assert_eq!(p.bytes(&n), w.bytes(&n), "{n}: no importance entry, yet not mx.quantize's bytes");
                }
                without += 1;
                continue;
            };
            let x = ck.tensor(&e.name).unwrap().to_f32();
            let cols = e.shape[1];
            let err = |f: &SafetensorsFile| -> f64 {
                let words: Vec<u32> = f.bytes(&e.name).unwrap().chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect();
                let s = decode(DType::BF16, f.bytes(&format!("{module}.scales")).unwrap());
                let b = decode(DType::BF16, f.bytes(&format!("{module}.biases")).unwrap());
                let (wpr, gpr) = (cols * bits as usize / 32, cols / 64);
                let mut row = vec![0f32; cols];
                let mut total = 0.0;
                for r in 0..e.shape[0] {
                    affine::dequantize_row(&words[r * wpr..(r + 1) * wpr], &s[r * gpr..(r + 1) * gpr], &b[r * gpr..(r + 1) * gpr], bits, 64, &mut row);
                    total += (0..cols).map(|j| imp[j] as f64 * ((x[r * cols + j] - row[j]) as f64).powi(2)).sum::<f64>();
                }
                total
            };
            let (ep, ew) = (err(&p), err(&w));
            assert!(ew < ep * 0.95, "{} at {bits} bits: weighted error {ew} not below min/max's {ep}", e.name);
            with += 1;
        }
        // the 14 decoder projections have entries; the embedding (a lookup) and lm_head (llama-imatrix
        // collects `output` only with --process-output) have none
        assert_eq!((with, without), (14, 2), "the 14 projections weighted, the embedding and lm_head not");
        // stock mlx-lm loads it and computes what our runner computes on the stored codes
        let tokens: Vec<u32> = (0..24).map(|i| 3 + (i * 7) % 200).collect();
        let res = d.path().join(format!("w{bits}.mlx.safetensors"));
        oracle(&["logits".as_ref(), weighted.as_os_str(), csv(&tokens).as_ref(), res.as_os_str()]);
        let mlx = SafetensorsFile::open(&res).unwrap();
        let (steps, _) = ours(&weighted, &tokens);
        let mlx_steps = f32s(&mlx, "step_logits");
        let per = mlx_steps.len() / steps.len();
        for (t, s) in steps.iter().enumerate() {
            let dd = max_diff(&mlx_steps[t * per..(t + 1) * per], s);
            assert!(dd < 2e-4, "{bits} bits: loop {t} logits mlx vs our runner differ by {dd}");
        }
        let index: serde_json::Value = serde_json::from_slice(&std::fs::read(weighted.join("model.safetensors.index.json")).unwrap()).unwrap();
        let m = &index["metadata"];
        assert_eq!(m["quantize.imatrix.file"], im.display().to_string());
        assert_eq!(m["quantize.imatrix.weighting"], "exit:0.5");
        assert_eq!(m["quantize.imatrix.tensors"], 14);
        let card = std::fs::read_to_string(weighted.join("README.md")).unwrap();
        assert!(card.contains("importance-weighted") && card.contains("imatrix.gguf"), "{card}");
    }
    // a matrix of another model (tiny-random: FFN 256, the fixture's 512): named, nothing left
    let other = d.path().join("other.gguf");
    imatrix(&fixtures().join("tiny-random"), &other);
    let out = d.path().join("refused");
    let o = bin().arg("convert").arg(&trained).args(["--format", "mlx", "--imatrix"]).arg(&other).arg("-o").arg(&out).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("other.gguf") && e.contains("ffn_down") && e.contains("another model"), "{e}");
    assert!(!out.exists());
}

/// `OURO_QUANT_MLX_ACTS=int8`: 4-bit MLX matrices multiply int8 activations in decode. `run` says
/// so (and says the float path without it); on the trained fixture the perplexities of the
/// token-by-token passes (the adaptive-exit rows: decode) stay within 1% of the float path's
/// (measured: within 0.3%), and the greedy answer to a recall question is the same.
#[test]
fn int8_activations_are_asked_for_reported_and_close_to_the_float_path() {
    let d = tempfile::tempdir().unwrap();
    let src = fixtures().join("ouro-tiny-trained");
    let out = d.path().join("m4");
    convert(&src, &out, &["--bits", "4"]);
    let json = |env: Option<&str>, args: &[&str]| -> serde_json::Value {
        let mut c = bin();
        if let Some(e) = env {
            c.env("OURO_QUANT_MLX_ACTS", e);
        } else {
            c.env_remove("OURO_QUANT_MLX_ACTS");
        }
        let o = c.args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let m = out.to_str().unwrap();
    let text = src.join("validation.txt");
    let ppl = |env| {
        let v = json(env, &["perplexity", m, "--text", text.to_str().unwrap(), "--ctx", "128", "--chunks", "4", "--json"]);
        v["runs"].as_array().unwrap().iter().map(|r| r["ppl"].as_f64().unwrap()).collect::<Vec<f64>>()
    };
    let (float, int8) = (ppl(None), ppl(Some("int8")));
    assert_ne!(float, int8, "the integer path did not run");
    assert!(!float.is_empty() && float.len() == int8.len());
    for (i, (a, b)) in float.iter().zip(&int8).enumerate() {
        assert!((b / a - 1.0).abs() < 0.01, "run {i}: int8 ppl {b} vs float {a}");
    }
    let run = |env| json(env, &["run", m, "--prompt", "Q: Where was Kaidi Shipi born? A:", "--max-tokens", "3", "--json"]);
    let (a, b) = (run(None), run(Some("int8")));
    assert_eq!(a["tokens"], b["tokens"]);
    let kernels = |v: &serde_json::Value| v["stats"]["kernels"].as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(kernels(&a), vec!["MLX affine at stored width".to_string()]);
    assert_eq!(kernels(&b), vec!["MLX affine 4-bit, int8 activations (OURO_QUANT_MLX_ACTS=int8)".to_string()]);
}
