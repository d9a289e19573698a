//! Every bad checkpoint input gets a clear error that names the file and the tensor or key, and a
//! non-zero exit (2) without a panic.

mod common;

use std::path::Path;

use common::{copy_checkpoint, edit_config, edit_weights, fixtures, inspect_err};
use ouro_quant::stfile::DType;

fn golden(name: &str) -> tempfile::TempDir {
    copy_checkpoint(&fixtures().join("golden").join(name))
}

/// Asserts `inspect` fails with exit 2 and a message holding every `needle`.
fn fails_with(dir: &Path, needles: &[&str]) {
    let (code, err) = inspect_err(dir);
    assert_eq!(code, 2, "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
}

fn weights_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

fn header_len(bytes: &[u8]) -> usize {
    u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

#[test]
fn truncated_in_header() {
    let d = golden("mha_f32");
    let b = weights_bytes(d.path());
    std::fs::write(d.path().join("model.safetensors"), &b[..8 + header_len(&b) / 2]).unwrap();
    fails_with(d.path(), &["model.safetensors", "header length", "truncated"]);
}

#[test]
fn truncated_in_data() {
    let d = golden("mha_f32");
    let b = weights_bytes(d.path());
    std::fs::write(d.path().join("model.safetensors"), &b[..b.len() - 1000]).unwrap();
    // The last tensor in data order is named, with the word truncated.
    fails_with(d.path(), &["model.safetensors", "tensor `", "file truncated"]);
}

#[test]
fn header_length_larger_than_file() {
    let d = golden("mha_f32");
    let mut b = weights_bytes(d.path());
    b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(d.path().join("model.safetensors"), &b).unwrap();
    fails_with(d.path(), &["model.safetensors", "header length 1099511627776 exceeds"]);
}

#[test]
fn empty_weights_file() {
    let d = golden("mha_f32");
    std::fs::write(d.path().join("model.safetensors"), b"").unwrap();
    fails_with(d.path(), &["model.safetensors", "0 bytes, too short"]);
}

#[test]
fn header_not_json() {
    let d = golden("mha_f32");
    let mut b = weights_bytes(d.path());
    let n = header_len(&b);
    for x in &mut b[8..8 + n] {
        *x = b'#';
    }
    std::fs::write(d.path().join("model.safetensors"), &b).unwrap();
    fails_with(d.path(), &["model.safetensors", "not valid JSON"]);
}

/// Rewrites the header JSON (keeping the data section) through `edit`.
fn edit_header(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let b = weights_bytes(dir);
    let n = header_len(&b);
    let mut h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    edit(h.as_object_mut().unwrap());
    let json = serde_json::to_vec(&h).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&b[8 + n..]);
    std::fs::write(dir.join("model.safetensors"), out).unwrap();
}

#[test]
fn overlapping_offsets() {
    let d = golden("mha_f32");
    edit_header(d.path(), |h| {
        // point the final norm 4 bytes into the tensor before it, same length
        let name = "model.norm.weight";
        let offs = h[name]["data_offsets"].as_array().unwrap().clone();
        let (s, e) = (offs[0].as_u64().unwrap(), offs[1].as_u64().unwrap());
        h[name]["data_offsets"] = serde_json::json!([s - 4, e - 4]);
    });
    fails_with(d.path(), &["model.safetensors", "overlap"]);
}

#[test]
fn out_of_range_offsets() {
    let d = golden("mha_f32");
    edit_header(d.path(), |h| {
        // the tensor that ends last now claims to reach beyond the file
        let last = h
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
            .map(|(k, _)| k.clone())
            .unwrap();
        let s = h[&last]["data_offsets"][0].as_u64().unwrap();
        h[&last]["data_offsets"] = serde_json::json!([s + 1_000_000, s + 1_000_000 + 256]);
    });
    fails_with(d.path(), &["model.safetensors", "data_offsets"]);
}

#[test]
fn offsets_disagreeing_with_shape() {
    let d = golden("mha_f32");
    edit_header(d.path(), |h| {
        h["model.norm.weight"]["shape"] = serde_json::json!([65]);
    });
    fails_with(d.path(), &["model.safetensors", "tensor `model.norm.weight`", "needs 260 bytes"]);
}

#[test]
fn unknown_dtype_in_header() {
    let d = golden("mha_f32");
    edit_header(d.path(), |h| {
        h["model.norm.weight"]["dtype"] = serde_json::json!("Q4_Z");
    });
    fails_with(d.path(), &["tensor `model.norm.weight`", "unknown dtype `Q4_Z`"]);
}

#[test]
fn dtype_not_allowed() {
    let d = golden("mha_f32");
    edit_weights(d.path(), |ts| {
        let t = ts.iter_mut().find(|t| t.spec.name == "model.layers.0.self_attn.q_proj.weight").unwrap();
        t.spec.dtype = DType::I32; // same 4-byte size, so the file itself stays well formed
    });
    fails_with(
        d.path(),
        &["model.safetensors", "tensor `model.layers.0.self_attn.q_proj.weight`", "dtype I32 is not supported"],
    );
}

#[test]
fn shape_disagrees_with_config() {
    let d = golden("mha_f32");
    edit_weights(d.path(), |ts| {
        let t = ts.iter_mut().find(|t| t.spec.name == "model.layers.2.mlp.up_proj.weight").unwrap();
        t.spec.shape = vec![64, 160]; // transposed
    });
    fails_with(
        d.path(),
        &["tensor `model.layers.2.mlp.up_proj.weight`", "shape [64, 160] disagrees with config.json", "[160, 64]"],
    );
}

#[test]
fn missing_tensor() {
    let d = golden("mha_f32");
    edit_weights(d.path(), |ts| ts.retain(|t| t.spec.name != "model.layers.1.input_layernorm_2.weight"));
    fails_with(d.path(), &["model.safetensors", "tensor `model.layers.1.input_layernorm_2.weight`", "missing"]);
}

#[test]
fn missing_config_key() {
    let d = golden("mha_f32");
    edit_config(d.path(), |c| {
        c.remove("total_ut_steps");
    });
    fails_with(d.path(), &["config.json", "key `total_ut_steps`", "missing"]);
}

#[test]
fn config_with_wrong_types() {
    for (key, value, word) in [
        ("hidden_size", serde_json::json!("64"), "integer"),
        ("rope_theta", serde_json::json!([1]), "number"),
        ("tie_word_embeddings", serde_json::json!("no"), "true or false"),
        ("num_hidden_layers", serde_json::json!(-3), "integer"),
        ("eos_token_id", serde_json::json!("two"), "token id"),
    ] {
        let d = golden("mha_f32");
        edit_config(d.path(), |c| {
            c.insert(key.into(), value.clone());
        });
        fails_with(d.path(), &["config.json", &format!("key `{key}`"), word]);
    }
}

#[test]
fn config_not_json() {
    let d = golden("mha_f32");
    std::fs::write(d.path().join("config.json"), "{\"model_type\": \"ouro\",").unwrap();
    fails_with(d.path(), &["config.json", "not valid JSON"]);
}

#[test]
fn unsupported_config_values_are_refused_by_name() {
    for (key, value, word) in [
        ("rope_scaling", serde_json::json!({"rope_type": "yarn", "factor": 4.0}), "\"yarn\" is not supported"),
        ("hidden_act", serde_json::json!("gelu"), "\"gelu\" is not supported"),
        ("use_sliding_window", serde_json::json!(true), "sliding-window"),
        ("layer_types", serde_json::json!(["sliding_attention", "full_attention", "full_attention"]), "sliding_attention"),
    ] {
        let d = golden("mha_f32");
        edit_config(d.path(), |c| {
            c.insert(key.into(), value.clone());
        });
        fails_with(d.path(), &["config.json", &format!("key `{key}`"), word]);
    }
}

/// Splits the golden weights into two shards with an index, then lets `edit` spoil the index.
fn sharded(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let d = golden("mha_f32");
    let p = d.path().join("model.safetensors");
    let ts = common::read_tensors(&p);
    std::fs::remove_file(&p).unwrap();
    let (a, b) = ts.split_at(ts.len() / 2);
    let mut map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let name = format!("model-0000{}-of-00002.safetensors", i + 1);
        let owned: Vec<common::RawTensor> = part
            .iter()
            .map(|t| common::RawTensor { spec: t.spec.clone(), bytes: t.bytes.clone() })
            .collect();
        common::write_tensors(&d.path().join(&name), &owned);
        for t in part.iter() {
            map.insert(t.spec.name.clone(), serde_json::json!(name));
        }
    }
    let mut idx = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    edit(&mut idx);
    std::fs::write(d.path().join("model.safetensors.index.json"), serde_json::to_string(&idx).unwrap()).unwrap();
    d
}

#[test]
fn good_shards_open() {
    let d = sharded(|_| {});
    let (code, err) = inspect_err(d.path());
    assert_eq!(code, 0, "{err}");
}

#[test]
fn shard_index_names_a_missing_shard() {
    let d = sharded(|idx| {
        idx["weight_map"]["model.norm.weight"] = serde_json::json!("model-00003-of-00002.safetensors");
    });
    fails_with(
        d.path(),
        &["model.safetensors.index.json", "names shard `model-00003-of-00002.safetensors`, which does not exist"],
    );
}

#[test]
fn shard_index_path_outside_the_directory() {
    for bad in ["../x.safetensors", "/etc/passwd", "sub/../../x", "a\\..\\x"] {
        let d = sharded(|idx| {
            idx["weight_map"]["model.norm.weight"] = serde_json::json!(bad);
        });
        fails_with(
            d.path(),
            &["model.safetensors.index.json", "tensor `model.norm.weight`", "not a plain file name"],
        );
    }
}

#[test]
fn shard_index_points_to_the_wrong_shard() {
    let d = sharded(|idx| {
        idx["weight_map"]["model.norm.weight"] = serde_json::json!("model-00001-of-00002.safetensors");
    });
    fails_with(d.path(), &["tensor `model.norm.weight`", "index says shard `model-00001-of-00002.safetensors`"]);
}

#[test]
fn empty_directory() {
    let d = tempfile::tempdir().unwrap();
    fails_with(d.path(), &["directory is empty"]);
}

#[test]
fn not_a_directory() {
    let d = tempfile::tempdir().unwrap();
    fails_with(&d.path().join("nothing-here"), &["nothing-here", "not a directory"]);
}

#[test]
fn no_weights() {
    let d = golden("mha_f32");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    fails_with(d.path(), &["neither model.safetensors nor model.safetensors.index.json"]);
}

#[test]
fn a_llama_checkpoint_is_not_ouro() {
    let d = golden("mha_f32");
    edit_config(d.path(), |c| {
        c.insert("model_type".into(), serde_json::json!("llama"));
        c.insert("architectures".into(), serde_json::json!(["LlamaForCausalLM"]));
        c.remove("total_ut_steps");
    });
    fails_with(d.path(), &["config.json", "model_type \"llama\"", "not an Ouro checkpoint"]);
}

#[test]
fn broken_tokenizer_json() {
    let d = golden("mha_f32");
    std::fs::write(d.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    fails_with(d.path(), &["tokenizer.json", "not a valid tokenizer"]);
}

#[test]
fn synth_refuses_to_overwrite_and_leaves_no_partial_output() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x");
    std::fs::create_dir(&out).unwrap();
    let r = common::bin().args(["synth", "--preset", "tiny", "-o"]).arg(&out).output().unwrap();
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("already exists"));
    let r = common::bin()
        .args(["synth", "--preset", "tiny", "--shards", "0", "-o"])
        .arg(d.path().join("y"))
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    // only the pre-existing directory is there: no temp dir, no partial output
    let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("x")]);
}
