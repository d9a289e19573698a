//! The checkpoint reader, `inspect` and `synth` on good inputs: the golden upstream checkpoints, the
//! committed tiny fixture, the released configs and freshly synthesized checkpoints.

mod common;

use std::path::Path;

use common::{bin, fixtures};
use ouro_quant::checkpoint::{expected_tensors, Checkpoint, OuroConfig};

#[test]
fn released_configs_parse_with_the_released_parameter_counts() {
    let want = [
        ("ouro-1.4b", 1_434_652_673u64, 96),
        ("ouro-1.4b-thinking", 1_434_652_673, 96),
        ("ouro-2.6b", 2_667_974_657, 192),
        ("ouro-2.6b-thinking", 2_667_974_657, 192),
    ];
    for (name, params, slots) in want {
        let c = OuroConfig::from_file(fixtures().join("configs").join(format!("{name}.json"))).unwrap();
        assert_eq!(c.parameter_count(), params, "{name}");
        assert_eq!(c.kv_slots(), slots, "{name}");
        assert_eq!(c.head_dim, 128);
        // Every released config carries the eos fault; writers must stop on <|im_end|> too.
        let eos = c.corrections.iter().find(|x| x.key == "eos_token_id").expect("eos corrected");
        assert_eq!(eos.corrected, serde_json::json!([2, 0]));
        assert_eq!(
            c.corrections.iter().any(|x| x.key == "bos_token_id"),
            name.ends_with("thinking"),
            "{name}: bos fault only where pad is 0 too"
        );
        // unknown keys are kept for the writers
        assert!(c.raw.contains_key("auto_map"));
    }
}

#[test]
fn golden_checkpoints_open_with_every_tensor_checked() {
    for (name, dtype, kv) in [("mha_f32", "F32", 4), ("gqa_bf16", "BF16", 2)] {
        let ck = Checkpoint::open(fixtures().join("golden").join(name)).unwrap();
        assert_eq!(ck.dtype().name(), dtype);
        assert_eq!(ck.config.num_key_value_heads, kv);
        assert!(ck.extra_tensors.is_empty());
        let numel: u64 = ck.weights.iter().map(|t| t.info.numel() as u64).sum();
        assert_eq!(numel, ck.config.parameter_count());
        assert_eq!(ck.weights.iter().count(), expected_tensors(&ck.config).len());
        // values decode: the f32 golden's first embedding value equals its raw bytes
        let e = ck.tensor("model.embed_tokens.weight").unwrap();
        let v = e.to_f32();
        assert_eq!(v.len(), 320 * 64);
        assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|&x| x != 0.0));
    }
}

#[test]
fn inspect_prints_shapes_params_and_sizes() {
    let out = bin()
        .args(["inspect", "--json", "--tensors", "--scan"])
        .arg(fixtures().join("golden/gqa_bf16"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["layers"], 3);
    assert_eq!(r["loops"], 4);
    assert_eq!(r["kv_slots"], 12);
    assert_eq!(r["kv_heads"], 2);
    // 320*64*2 + 3*(64*64*2 + 32*64*2 + 160*64*3 + 4*64) + 64 + 65
    let params = 320 * 64 * 2 + 3 * (64 * 64 * 2 + 32 * 64 * 2 + 160 * 64 * 3 + 4 * 64) + 64 + 65;
    assert_eq!(r["parameters"], params);
    assert_eq!(r["tensors"].as_array().unwrap().len(), 3 * 11 + 5);
    assert_eq!(r["scan"]["bad"].as_array().unwrap().len(), 0);
    assert_eq!(r["scan"]["values_scanned"], params);
    let sizes = r["output_sizes"].as_array().unwrap();
    let size = |f: &str| sizes.iter().find(|s| s["format"] == f).unwrap()["bytes"].as_u64().unwrap();
    // F16: 2 bytes per 2-D weight, 4 per 1-D norm/bias; the gate [1, 64] stays F32
    // (the predicted size is the whole file: those tensor bytes, padding, and a header with the
    // tokenizer that is smaller than the tensors here; exactly the file convert writes)
    let one_d = (3 * 4 * 64 + 64 + 1) as u64;
    let d = tempfile::tempdir().unwrap();
    for (ty, tensors) in [("F16", (params as u64 - one_d - 64) * 2 + (one_d + 64) * 4), ("Q8_0", (params as u64 - one_d - 64) / 32 * 34 + (one_d + 64) * 4)] {
        let f = d.path().join(format!("{ty}.gguf"));
        bin().arg("convert").arg(fixtures().join("golden/gqa_bf16")).args(["--type", ty, "-o"]).arg(&f).assert().success();
        let written = std::fs::metadata(&f).unwrap().len();
        assert_eq!(size(&format!("GGUF {ty}")), written, "{ty}");
        assert!(written > tensors && written < tensors + 64 * 1024, "{ty}: {written} vs tensors {tensors}");
    }
    assert!(size("MLX 4-bit gs64") < size("MLX 8-bit gs64"));
}

#[test]
fn scan_reports_nan_and_inf_by_tensor_with_exit_1() {
    let d = common::copy_checkpoint(&fixtures().join("golden/mha_f32"));
    common::edit_weights(d.path(), |ts| {
        let t = ts.iter_mut().find(|t| t.spec.name == "model.layers.1.mlp.up_proj.weight").unwrap();
        t.bytes[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
        t.bytes[80..84].copy_from_slice(&f32::INFINITY.to_le_bytes());
    });
    let out = bin().arg("inspect").arg("--scan").arg(d.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("model.layers.1.mlp.up_proj.weight: 1 NaN, 1 Inf (first at flat index 10)"),
        "{s}"
    );
}

#[test]
fn committed_tiny_fixture_is_what_synth_makes() {
    // The fixture is reproducible from its documented command.
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("tiny");
    bin().args(["synth", "--preset", "tiny", "--seed", "0", "-o"]).arg(&out).assert().success();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(fixtures().join("tiny-random").join(f)).unwrap(),
            "{f}"
        );
    }
}

fn synth(args: &[&str], out: &Path, threads: &str) {
    bin().env("RAYON_NUM_THREADS", threads)
        .arg("synth")
        .args(args)
        .arg("-o")
        .arg(out)
        .assert()
        .success();
}

#[test]
fn synth_is_deterministic_across_threads_and_shards_hold_the_same_tensors() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, c) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
    synth(&["--preset", "tiny", "--seed", "7", "--dtype", "f32"], &a, "1");
    synth(&["--preset", "tiny", "--seed", "7", "--dtype", "f32"], &b, "2");
    assert_eq!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap()
    );
    synth(&["--preset", "tiny", "--seed", "7", "--dtype", "f32", "--shards", "3"], &c, "2");
    assert!(c.join("model-00003-of-00003.safetensors").exists());
    let idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.join("model.safetensors.index.json")).unwrap()).unwrap();
    let (ca, cc) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&c).unwrap());
    assert_eq!(cc.weights.files().len(), 3);
    assert_eq!(idx["metadata"]["total_parameters"], ca.config.parameter_count());
    for t in ca.weights.iter() {
        assert_eq!(cc.weights.get(t.name()).unwrap().bytes, t.bytes, "{}", t.name());
    }
    // another seed gives other values
    let e = d.path().join("e");
    synth(&["--preset", "tiny", "--seed", "8", "--dtype", "f32"], &e, "2");
    assert_ne!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(e.join("model.safetensors")).unwrap()
    );
}

#[test]
fn synth_dtypes_round_to_the_same_weights() {
    let d = tempfile::tempdir().unwrap();
    let (f, b) = (d.path().join("f"), d.path().join("b"));
    synth(&["--preset", "tiny", "--seed", "3", "--dtype", "f32"], &f, "2");
    synth(&["--preset", "tiny", "--seed", "3", "--dtype", "bf16"], &b, "2");
    let (cf, cb) = (Checkpoint::open(&f).unwrap(), Checkpoint::open(&b).unwrap());
    for t in cf.weights.iter() {
        let vf = t.to_f32();
        let vb = cb.weights.get(t.name()).unwrap().to_f32();
        for (x, y) in vf.iter().zip(&vb) {
            assert_eq!(half::bf16::from_f32(*x).to_f32(), *y);
        }
    }
}

#[test]
fn synth_full_size_preset_has_the_released_names_and_shapes() {
    // One layer of the 2.6B preset: the same tensor names and shapes per layer as the release.
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("big");
    synth(&["--preset", "ouro-2.6b", "--layers", "1", "--seed", "1"], &out, "2");
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(ck.config.hidden_size, 2048);
    assert_eq!(ck.config.vocab_size, 49152);
    let emb = ck.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!(emb.shape(), &[49152, 2048]);
    assert_eq!(ck.tensor("model.layers.0.mlp.down_proj.weight").unwrap().shape(), &[2048, 5632]);
    assert_eq!(ck.tensor("model.early_exit_gate.weight").unwrap().shape(), &[1, 2048]);
    // 1,434,652,673 minus 23 of the 1.4B's 24 layers of 51,388,416 parameters
    assert_eq!(ck.config.parameter_count(), 1_434_652_673 - 23 * 51_388_416);
    let out = bin().arg("inspect").arg(&out).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("252,719,105"));
}
