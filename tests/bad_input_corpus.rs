//! The bad-input corpus: every kind of input the tool reads (HF checkpoints, shard indexes,
//! configs, tokenizers, GGUF files, MLX directories, texts, stored references, manifests, device
//! profiles, token lists, options), damaged one way each. Every case runs the real binary and
//! asserts the exit status 2, the substance of the message (the file, the tensor or key, what is
//! wrong), no panic, that nothing was left in the output directory (no output, no temp file), and
//! that every input is byte-identical afterwards.

mod common;

use std::path::{Path, PathBuf};

use common::{bin, copy_checkpoint, edit_config, edit_weights, fixtures};

/// A case: builds its input under `input` (a copy of the golden `gqa_bf16` checkpoint is at
/// `input/m`), then runs `args`, where `{in}` is the input directory and `{out}` the (empty)
/// output directory.
struct Case {
    name: &'static str,
    setup: fn(&Path),
    args: &'static [&'static str],
    needles: &'static [&'static str],
}

fn weights(d: &Path) -> PathBuf {
    d.join("m/model.safetensors")
}

fn rewrite(p: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(p).unwrap();
    f(&mut b);
    std::fs::write(p, b).unwrap();
}

fn header_len(b: &[u8]) -> usize {
    u64::from_le_bytes(b[..8].try_into().unwrap()) as usize
}

fn edit_header(d: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    rewrite(&weights(d), |b| {
        let n = header_len(b);
        let mut h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
        edit(h.as_object_mut().unwrap());
        let mut j = serde_json::to_vec(&h).unwrap();
        j.resize(n.max(j.len()), b' ');
        let data = b[8 + n..].to_vec();
        b.clear();
        b.extend_from_slice(&(j.len() as u64).to_le_bytes());
        b.extend_from_slice(&j);
        b.extend_from_slice(&data);
    });
}

fn set_value(d: &Path, tensor: &str, v: f32) {
    edit_weights(&d.join("m"), |ts| {
        let t = ts.iter_mut().find(|t| t.spec.name == tensor).unwrap();
        let es = t.spec.dtype.size();
        let bits: Vec<u8> = match es {
            2 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
            _ => v.to_le_bytes().to_vec(),
        };
        t.bytes[es * 3..es * 4].copy_from_slice(&bits);
    });
}

fn convert(d: &Path, args: &[&str], out: &str) {
    bin().arg("convert").arg(d.join("m")).args(args).arg("-o").arg(d.join(out)).assert().success();
}

fn gguf(d: &Path) {
    convert(d, &["--type", "Q8_0"], "m.gguf");
}

fn mlx(d: &Path) {
    convert(d, &["--format", "mlx", "--bits", "4"], "m-4bit");
}

fn text(d: &Path) {
    let words = "the loop thinks and the gate decides when it has thought enough ";
    std::fs::write(d.join("t.txt"), words.repeat(40)).unwrap();
}

fn noop(_: &Path) {}

fn extra_tensor(d: &Path, name: &str, dtype: &str) {
    edit_weights(&d.join("m"), |ts| {
        ts.push(common::RawTensor {
            spec: ouro_quant::stfile::TensorSpec { name: name.to_string(), dtype: ouro_quant::stfile::DType::parse(dtype).unwrap(), shape: vec![4] },
            bytes: vec![0; 4],
        })
    });
}

fn shard_replaced(d: &Path, make: fn(&Path)) {
    let p = weights(d);
    std::fs::remove_file(&p).unwrap();
    make(&p);
}

const CASES: &[Case] = &[
    // --- HF checkpoint: safetensors ---
    Case { name: "truncated header", setup: |d| rewrite(&weights(d), |b| { let n = header_len(b); b.truncate(8 + n / 2) }), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["model.safetensors", "truncated"] },
    Case { name: "truncated data", setup: |d| rewrite(&weights(d), |b| { let n = b.len(); b.truncate(n - 100) }), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["model.safetensors", "tensor `", "truncated"] },
    Case { name: "header length beyond file", setup: |d| rewrite(&weights(d), |b| b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes())), args: &["convert", "{in}/m", "--format", "mlx", "-o", "{out}/o"], needles: &["model.safetensors", "header length 1099511627776 exceeds"] },
    Case { name: "empty weights file", setup: |d| std::fs::write(weights(d), b"").unwrap(), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["model.safetensors", "too short"] },
    Case { name: "header not JSON", setup: |d| rewrite(&weights(d), |b| b[8] = b'!'), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["model.safetensors", "JSON"] },
    Case { name: "overlapping offsets", setup: |d| edit_header(d, |h| { h.get_mut("model.norm.weight").unwrap()["data_offsets"][0] = serde_json::json!(0); }), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["model.safetensors", "model.norm.weight"] },
    Case { name: "unknown dtype", setup: |d| edit_header(d, |h| { h.get_mut("model.norm.weight").unwrap()["dtype"] = serde_json::json!("Q9"); }), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["model.safetensors", "model.norm.weight", "Q9"] },
    Case { name: "integer dtype", setup: |d| edit_header(d, |h| { let t = h.get_mut("model.norm.weight").unwrap(); let s = t["shape"][0].as_u64().unwrap(); t["dtype"] = serde_json::json!("I16"); t["shape"] = serde_json::json!([s]); }), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["model.norm.weight", "I16"] },
    Case { name: "shape disagrees with config", setup: |d| edit_config(&d.join("m"), |c| { c.insert("intermediate_size".into(), serde_json::json!(96)); }), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["mlp", "shape", "config.json"] },
    Case { name: "missing tensor", setup: |d| edit_weights(&d.join("m"), |ts| ts.retain(|t| t.spec.name != "model.layers.1.mlp.up_proj.weight")), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["model.layers.1.mlp.up_proj.weight", "missing"] },
    Case { name: "a layer beyond num_hidden_layers", setup: |d| edit_weights(&d.join("m"), |ts| { let mut t = common::RawTensor { spec: ts[0].spec.clone(), bytes: ts[0].bytes.clone() }; t.spec.name = "model.layers.9.extra.weight".into(); ts.push(t) }), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["model.layers.9.extra.weight"] },
    Case { name: "NaN in a weight (GGUF)", setup: |d| set_value(d, "model.layers.0.self_attn.k_proj.weight", f32::NAN), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["model.layers.0.self_attn.k_proj.weight", "non-finite"] },
    Case { name: "infinity in a weight (MLX)", setup: |d| set_value(d, "model.layers.1.mlp.down_proj.weight", f32::INFINITY), args: &["convert", "{in}/m", "--format", "mlx", "-o", "{out}/o"], needles: &["model.layers.1.mlp.down_proj.weight", "non-finite"] },
    Case { name: "NaN in a norm (MLX keeps it float)", setup: |d| set_value(d, "model.norm.weight", f32::NAN), args: &["convert", "{in}/m", "--format", "mlx", "--bits", "8", "-o", "{out}/o"], needles: &["model.norm.weight", "non-finite"] },
    Case { name: "extra tensor of an unsupported dtype", setup: |d| extra_tensor(d, "extra.counts", "I8"), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["extra.counts", "I8"] },
    Case { name: "tensor name with control characters, escaped", setup: |d| extra_tensor(d, "evil\u{1b}[2J\nname", "I8"), args: &["inspect", "{in}/m"], needles: &["evil\\u{1b}[2J\\u{a}name"] },
    Case { name: "shard is a symlink loop", setup: |d| shard_replaced(d, |p| std::os::unix::fs::symlink("model.safetensors", p).unwrap()), args: &["inspect", "{in}/m"], needles: &["model.safetensors", "symbolic link"] },
    Case { name: "shard is a directory", setup: |d| shard_replaced(d, |p| std::fs::create_dir(p).unwrap()), args: &["inspect", "{in}/m"], needles: &["model.safetensors", "directory"] },
    Case { name: "shard is a FIFO", setup: |d| shard_replaced(d, |p| { let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap(); assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0); }), args: &["inspect", "{in}/m"], needles: &["model.safetensors", "not a regular file"] },
    Case { name: "shard is /dev/zero", setup: |d| shard_replaced(d, |p| std::os::unix::fs::symlink("/dev/zero", p).unwrap()), args: &["inspect", "{in}/m"], needles: &["model.safetensors", "not a regular file"] },
    Case { name: "safetensors header names a tensor twice", setup: |d| rewrite(&weights(d), |b| {
        // the header's first key written again before the closing brace, same offsets
        let n = header_len(b);
        let text = String::from_utf8(b[8..8 + n].to_vec()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let (k, val) = v.as_object().unwrap().iter().find(|(k, _)| *k != "__metadata__").map(|(k, v)| (k.clone(), v.clone())).unwrap();
        let body = text.trim_end().strip_suffix('}').unwrap().to_string();
        let j = format!("{body},{}:{}}}", serde_json::to_string(&k).unwrap(), val);
        let data = b[8 + n..].to_vec();
        b.clear();
        b.extend_from_slice(&(j.len() as u64).to_le_bytes());
        b.extend_from_slice(j.as_bytes());
        b.extend_from_slice(&data);
    }), args: &["inspect", "{in}/m"], needles: &["model.safetensors", "given twice"] },
    Case { name: "convert: a GGUF option with --format mlx", setup: noop, args: &["convert", "{in}/m", "--format", "mlx", "--type", "Q4_K_M", "-o", "{out}/o"], needles: &["--type", "GGUF", "--format gguf"] },
    Case { name: "convert: an MLX option for GGUF", setup: noop, args: &["convert", "{in}/m", "--bits", "2", "--group-size", "32", "-o", "{out}/o.gguf"], needles: &["--bits", "MLX", "--format mlx"] },
    Case { name: "convert: a type override that matches nothing", setup: noop, args: &["convert", "{in}/m", "--type-override", "attn_vv=Q8_0", "-o", "{out}/o.gguf"], needles: &["attn_vv", "matches no tensor"] },
    Case { name: "convert: a type override that would quantize a norm", setup: noop, args: &["convert", "{in}/m", "--type-override", "attn_norm=Q4_K", "-o", "{out}/o.gguf"], needles: &["attn_norm", "stay F32"] },
    // --- config.json ---
    Case { name: "config with a key given twice", setup: |d| { let p = d.join("m/config.json"); let t = std::fs::read_to_string(&p).unwrap(); std::fs::write(&p, t.replacen('{', "{\"num_hidden_layers\": 99,", 1)).unwrap(); }, args: &["inspect", "{in}/m"], needles: &["config.json", "num_hidden_layers", "given twice"] },
    Case { name: "config missing a key", setup: |d| edit_config(&d.join("m"), |c| { c.remove("num_attention_heads"); }), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["config.json", "num_attention_heads"] },
    Case { name: "config wrong type", setup: |d| edit_config(&d.join("m"), |c| { c.insert("hidden_size".into(), serde_json::json!("64")); }), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["config.json", "hidden_size"] },
    Case { name: "config not JSON", setup: |d| std::fs::write(d.join("m/config.json"), "{ model_type: ouro").unwrap(), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["config.json", "JSON"] },
    Case { name: "rope scaling", setup: |d| edit_config(&d.join("m"), |c| { c.insert("rope_scaling".into(), serde_json::json!({"rope_type": "yarn", "factor": 4.0})); }), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["rope_scaling", "yarn", "not supported"] },
    Case { name: "sliding window", setup: |d| edit_config(&d.join("m"), |c| { c.insert("use_sliding_window".into(), serde_json::json!(true)); }), args: &["convert", "{in}/m", "--format", "mlx", "-o", "{out}/o"], needles: &["use_sliding_window", "not supported"] },
    Case { name: "not an Ouro model", setup: |d| edit_config(&d.join("m"), |c| { c.insert("model_type".into(), serde_json::json!("llama")); }), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["config.json", "not an Ouro checkpoint"] },
    Case { name: "implausible sizes", setup: |d| edit_config(&d.join("m"), |c| { c.insert("vocab_size".into(), serde_json::json!(1u64 << 40)); }), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["vocab_size", "implausibly large"] },
    Case { name: "threshold outside [0, 1]", setup: |d| edit_config(&d.join("m"), |c| { c.insert("early_exit_threshold".into(), serde_json::json!(1.5)); }), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["early_exit_threshold", "[0, 1]"] },
    // --- shards and directory ---
    Case { name: "index names a missing shard", setup: |d| { std::fs::rename(weights(d), d.join("m/model-00001-of-00001.safetensors")).unwrap(); std::fs::write(d.join("m/model.safetensors.index.json"), r#"{"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}"#).unwrap(); }, args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["model.safetensors.index.json", "model-00002-of-00002.safetensors", "does not exist"] },
    Case { name: "index path escapes the directory", setup: |d| std::fs::write(d.join("m/model.safetensors.index.json"), r#"{"weight_map": {"model.norm.weight": "../../etc/passwd"}}"#).unwrap(), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["model.norm.weight", "not a plain file name"] },
    Case { name: "index not JSON", setup: |d| std::fs::write(d.join("m/model.safetensors.index.json"), "weight_map").unwrap(), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["model.safetensors.index.json", "JSON"] },
    Case { name: "no weights", setup: |d| std::fs::remove_file(weights(d)).unwrap(), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["no weights"] },
    Case { name: "model path does not exist", setup: noop, args: &["convert", "{in}/nothing", "-o", "{out}/o.gguf"], needles: &["nothing"] },
    // --- tokenizer ---
    Case { name: "tokenizer.json broken", setup: |d| std::fs::write(d.join("m/tokenizer.json"), "{").unwrap(), args: &["convert", "{in}/m", "-o", "{out}/o.gguf"], needles: &["tokenizer.json"] },
    Case { name: "no tokenizer for MLX", setup: |d| std::fs::remove_file(d.join("m/tokenizer.json")).unwrap(), args: &["convert", "{in}/m", "--format", "mlx", "-o", "{out}/o"], needles: &["no tokenizer.json"] },
    // --- convert options ---
    Case { name: "unknown GGUF type", setup: noop, args: &["convert", "{in}/m", "--type", "Q9_K", "-o", "{out}/o.gguf"], needles: &["Q9_K"] },
    Case { name: "type override with a bad regex", setup: noop, args: &["convert", "{in}/m", "--type-override", "attn_(v=Q8_0", "-o", "{out}/o.gguf"], needles: &["attn_(v"] },
    Case { name: "type override with an unknown type", setup: noop, args: &["convert", "{in}/m", "--type-override", "attn_v=Q7_7", "-o", "{out}/o.gguf"], needles: &["Q7_7"] },
    Case { name: "MLX bits not supported", setup: noop, args: &["convert", "{in}/m", "--format", "mlx", "--bits", "7", "-o", "{out}/o"], needles: &["bits", "7"] },
    Case { name: "MLX group size not supported", setup: noop, args: &["convert", "{in}/m", "--format", "mlx", "--group-size", "48", "-o", "{out}/o"], needles: &["48"] },
    Case { name: "MLX unknown recipe", setup: noop, args: &["convert", "{in}/m", "--format", "mlx", "--recipe", "mixed_5_7", "-o", "{out}/o"], needles: &["mixed_5_7"] },
    Case { name: "output directory missing", setup: noop, args: &["convert", "{in}/m", "-o", "{out}/no/such/dir/o.gguf"], needles: &["output directory does not exist"] },
    // --- GGUF input ---
    Case { name: "GGUF truncated", setup: |d| { gguf(d); rewrite(&d.join("m.gguf"), |b| { let n = b.len(); b.truncate(n / 2) }) }, args: &["logits", "{in}/m.gguf", "--tokens", "1,2,3", "-o", "{out}/l.safetensors"], needles: &["m.gguf", "truncated"] },
    Case { name: "GGUF bad magic", setup: |d| { gguf(d); rewrite(&d.join("m.gguf"), |b| b[..4].copy_from_slice(b"GGML")) }, args: &["run", "{in}/m.gguf", "--prompt-tokens", "1,2", "--max-tokens", "2"], needles: &["m.gguf", "not a GGUF file"] },
    Case { name: "GGUF version 2", setup: |d| { gguf(d); rewrite(&d.join("m.gguf"), |b| b[4..8].copy_from_slice(&2u32.to_le_bytes())) }, args: &["run", "{in}/m.gguf", "--prompt-tokens", "1,2", "--max-tokens", "2"], needles: &["m.gguf", "version 2"] },
    Case { name: "GGUF of another architecture", setup: |d| { gguf(d); rewrite(&d.join("m.gguf"), |b| { let p = b.windows(4).position(|w| w == b"ouro").unwrap(); b[p..p + 4].copy_from_slice(b"oura") }) }, args: &["logits", "{in}/m.gguf", "--tokens", "1,2", "-o", "{out}/l.safetensors"], needles: &["m.gguf", "oura"] },
    // --- MLX input ---
    Case { name: "MLX shard missing", setup: |d| { mlx(d); std::fs::remove_file(d.join("m-4bit/model.safetensors")).unwrap() }, args: &["logits", "{in}/m-4bit", "--tokens", "1,2", "-o", "{out}/l.safetensors"], needles: &["m-4bit", "model.safetensors"] },
    Case { name: "MLX config with impossible bits", setup: |d| { mlx(d); let p = d.join("m-4bit/config.json"); let s = std::fs::read_to_string(&p).unwrap(); std::fs::write(&p, s.replace("\"bits\": 4", "\"bits\": 7")).unwrap() }, args: &["run", "{in}/m-4bit", "--prompt-tokens", "1,2", "--max-tokens", "2"], needles: &["m-4bit", "bits"] },
    // --- validate ---
    Case { name: "validate: text file missing", setup: |d| gguf(d), args: &["validate", "--reference", "{in}/m", "--candidate", "{in}/m.gguf", "--text", "{in}/missing.txt", "--report", "{out}/r.json", "--markdown", "{out}/r.md"], needles: &["missing.txt"] },
    Case { name: "validate: text too short for one chunk", setup: |d| { gguf(d); std::fs::write(d.join("t.txt"), "a few words").unwrap() }, args: &["validate", "--reference", "{in}/m", "--candidate", "{in}/m.gguf", "--text", "{in}/t.txt", "--ctx", "64", "--report", "{out}/r.json"], needles: &["t.txt", "tokens"] },
    Case { name: "validate: stored reference of another text", setup: |d| { gguf(d); text(d); bin().arg("validate").arg("--reference").arg(d.join("m")).arg("--candidate").arg(d.join("m.gguf")).arg("--text").arg(d.join("t.txt")).args(["--ctx", "32", "--save-reference"]).arg(d.join("ref.bin")).output().unwrap(); assert!(d.join("ref.bin").is_file()); std::fs::write(d.join("t.txt"), "another text ".repeat(200)).unwrap() }, args: &["validate", "--reference", "{in}/m", "--candidate", "{in}/m.gguf", "--text", "{in}/t.txt", "--ctx", "32", "--reference-logits", "{in}/ref.bin", "--report", "{out}/r.json"], needles: &["ref.bin", "text"] },
    Case { name: "validate: unknown profile", setup: |d| { gguf(d); text(d) }, args: &["validate", "--reference", "{in}/m", "--candidate", "{in}/m.gguf", "--text", "{in}/t.txt", "--profile", "5bit-ish", "--report", "{out}/r.json"], needles: &["5bit-ish"] },
    Case { name: "validate: candidate of another model", setup: |d| { text(d); bin().arg("convert").arg(fixtures().join("golden/mha_f32")).args(["--type", "Q8_0", "-o"]).arg(d.join("other.gguf")).assert().success(); }, args: &["validate", "--reference", "{in}/m", "--candidate", "{in}/other.gguf", "--text", "{in}/t.txt", "--ctx", "32", "--report", "{out}/r.json"], needles: &["other.gguf"] },
    // --- run ---
    Case { name: "run: memory budget too small", setup: noop, args: &["run", "{in}/m", "--prompt-tokens", "1,2", "--max-tokens", "8", "--max-memory", "1000"], needles: &["--max-memory", "1000"] },
    Case { name: "run: exit threshold above 1", setup: noop, args: &["run", "{in}/m", "--prompt-tokens", "1,2", "--exit-threshold", "1.5"], needles: &["exit-threshold", "1.5"] },
    Case { name: "perplexity: exit threshold above 1", setup: text, args: &["perplexity", "{in}/m", "--text", "{in}/t.txt", "--exit-threshold", "0.5,1.5"], needles: &["exit-threshold", "1.5"] },
    Case { name: "perplexity: text shorter than one chunk", setup: |d| std::fs::write(d.join("t.txt"), "short").unwrap(), args: &["perplexity", "{in}/m", "--text", "{in}/t.txt", "--ctx", "64"], needles: &["t.txt", "fewer than one chunk"] },
    Case { name: "perplexity: text missing", setup: noop, args: &["perplexity", "{in}/m", "--text", "{in}/none.txt"], needles: &["none.txt"] },
    Case { name: "run: KV dtype the runner cannot hold", setup: noop, args: &["run", "{in}/m", "--prompt-tokens", "1,2", "--kv-dtype", "q8_0"], needles: &["q8_0", "--kv-dtype", "f32, f16"] },
    Case { name: "run: token id beyond the vocabulary", setup: noop, args: &["run", "{in}/m", "--prompt-tokens", "1,99999", "--max-tokens", "2"], needles: &["99999", "vocab"] },
    Case { name: "run: temperature NaN", setup: noop, args: &["run", "{in}/m", "--prompt-tokens", "1,2", "--temperature", "NaN"], needles: &["--temperature", "NaN"] },
    Case { name: "run: temperature infinite", setup: noop, args: &["run", "{in}/m", "--prompt-tokens", "1,2", "--temperature", "inf"], needles: &["--temperature", "inf"] },
    Case { name: "run: temperature negative", setup: noop, args: &["run", "{in}/m", "--prompt-tokens", "1,2", "--temperature=-1"], needles: &["--temperature", "-1"] },
    Case { name: "perplexity: context beyond the model's", setup: text, args: &["perplexity", "{in}/m", "--text", "{in}/t.txt", "--ctx", "4096"], needles: &["--ctx 4096", "2048"] },
    Case { name: "perplexity: no chunks", setup: text, args: &["perplexity", "{in}/m", "--text", "{in}/t.txt", "--ctx", "16", "--chunks", "0"], needles: &["--chunks 0"] },
    Case { name: "validate: context beyond the model's", setup: text, args: &["validate", "--reference", "{in}/m", "--candidate", "{in}/m", "--text", "{in}/t.txt", "--ctx", "4096"], needles: &["--ctx 4096", "2048"] },
    // --- logits ---
    Case { name: "logits: more tokens than the context", setup: |d| std::fs::write(d.join("many.txt"), vec!["1"; 2049].join(",")).unwrap(), args: &["logits", "{in}/m", "--tokens-file", "{in}/many.txt", "-o", "{out}/l.safetensors"], needles: &["2049", "2048"] },
    Case { name: "logits: token list not numbers", setup: noop, args: &["logits", "{in}/m", "--tokens", "1,two,3", "-o", "{out}/l.safetensors"], needles: &["two"] },
    Case { name: "logits: tokens file missing", setup: noop, args: &["logits", "{in}/m", "--tokens-file", "{in}/none.txt", "-o", "{out}/l.safetensors"], needles: &["none.txt"] },
    // --- plan ---
    Case { name: "plan: unknown device", setup: noop, args: &["plan", "--preset", "ouro-1.4b", "--device", "toaster"], needles: &["toaster"] },
    Case { name: "plan: device profiles not TOML", setup: |d| std::fs::write(d.join("dev.toml"), "[bluefin\nmemory = ").unwrap(), args: &["plan", "--preset", "ouro-1.4b", "--device", "bluefin", "--devices", "{in}/dev.toml"], needles: &["dev.toml"] },
    Case { name: "plan: absurd context", setup: noop, args: &["plan", "--preset", "ouro-1.4b", "--device", "bluefin", "--ctx", "100000000000000"], needles: &["--ctx 100000000000000", "65536"] },
    Case { name: "synth: more shards than tensors", setup: noop, args: &["synth", "--preset", "tiny", "--shards", "1000", "-o", "{out}/s"], needles: &["--shards 1000", "tensors"] },
    // --- batch ---
    Case { name: "batch: no job at a time", setup: |d| std::fs::write(d.join("b.toml"), format!("output_dir = \"{}\"\n[[sources]]\nname = \"m\"\npath = \"{}\"\n[[targets]]\nformat = \"gguf\"\ntype = \"Q8_0\"\n", d.join("../out").display(), d.join("m").display())).unwrap(), args: &["batch", "{in}/b.toml", "--jobs", "0"], needles: &["--jobs"] },
    Case { name: "batch: manifest not TOML", setup: |d| std::fs::write(d.join("b.toml"), "[[source]\n").unwrap(), args: &["batch", "{in}/b.toml"], needles: &["b.toml"] },
    Case { name: "batch: unknown target format", setup: |d| std::fs::write(d.join("b.toml"), format!("output_dir = \"{}\"\n[[sources]]\nname = \"m\"\npath = \"{}\"\n[[targets]]\nformat = \"onnx\"\n", d.join("../out").display(), d.join("m").display())).unwrap(), args: &["batch", "{in}/b.toml"], needles: &["b.toml", "onnx"] },
];

/// Every entry under `dir` with what it holds: a regular file's content hash, a link's target,
/// `dir` or `special` (links are not followed, FIFOs and devices not read), so that a changed byte
/// of any input shows.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = walk(dir)
        .into_iter()
        .map(|p| {
            let name = p.strip_prefix(dir).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                "dir".into()
            } else if m.is_file() {
                format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&std::fs::read(&p).unwrap()))
            } else {
                "special".into()
            };
            format!("{name} {what}")
        })
        .collect();
    v.sort();
    v
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn every_bad_input_fails_cleanly_and_leaves_nothing() {
    assert!(CASES.len() >= 40, "{} cases", CASES.len());
    let mut failures = vec![];
    for c in CASES {
        let root = tempfile::tempdir().unwrap();
        let input = root.path().join("in");
        let out = root.path().join("out");
        std::fs::create_dir(&input).unwrap();
        std::fs::create_dir(&out).unwrap();
        let src = copy_checkpoint(&fixtures().join("golden/gqa_bf16"));
        std::fs::rename(src.path(), input.join("m")).unwrap();
        (c.setup)(&input);
        let inputs_before = listing(&input);
        let args: Vec<String> = c
            .args
            .iter()
            .map(|a| a.replace("{in}", &input.display().to_string()).replace("{out}", &out.display().to_string()))
            .collect();
        let o = bin().args(&args).current_dir(&out).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let mut why = vec![];
        if o.status.code() != Some(2) {
            why.push(format!("exit {:?}", o.status.code()));
        }
        if err.contains("panicked") {
            why.push("panic".into());
        }
        for n in c.needles {
            if !err.contains(n) {
                why.push(format!("no {n:?} in the message"));
            }
        }
        let left = listing(&out);
        if !left.is_empty() {
            why.push(format!("left in the output directory: {left:?}"));
        }
        // nothing written beside the inputs either (temp files, partial outputs)
        let after = listing(&input);
        if after != inputs_before {
            why.push(format!("an input changed or appeared: {:?}", after.iter().filter(|p| !inputs_before.contains(p)).collect::<Vec<_>>()));
        }
        if !why.is_empty() {
            failures.push(format!("{}: {} -- stderr: {}", c.name, why.join("; "), err.trim()));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), CASES.len(), failures.join("\n"));
}
