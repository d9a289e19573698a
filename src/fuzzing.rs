//! The properties the fuzz targets check, one function per untrusted input. Each takes arbitrary
//! bytes, must never panic on its own, and panics (a fuzzer finding) only when an invariant below
//! is broken. Called by the cargo-fuzz targets in `fuzz/` (millions of runs, see `fuzz/README.md`)
//! and by the short run in `tests/fuzz.rs` that CI does.

use std::path::Path;

use crate::checkpoint::{expected_tensors, is_plain_file_name, parse_shard_index, OuroConfig};
use crate::gguf::file::{header_bytes, parse_header as parse_gguf};
use crate::stfile::parse_header as parse_safetensors;

/// The safetensors header parser: a header that parses describes tensors that tile the data
/// section exactly, in order, each as long as its shape and dtype say.
pub fn safetensors_header(data: &[u8]) {
    let Ok(h) = parse_safetensors(data) else { return };
    assert!(h.data_start() <= data.len(), "data section starts past the end");
    let data_len = data.len() - h.data_start();
    let mut pos = 0;
    for t in &h.tensors {
        assert_eq!(t.begin, pos, "tensor `{}` does not start where the previous ended", t.name);
        assert_eq!(t.nbytes(), t.numel() * t.dtype.size(), "tensor `{}` size", t.name);
        pos = t.end;
    }
    assert_eq!(pos, data_len, "tensors do not cover the data section");
}

/// The GGUF reader: a header that parses is re-encoded by the writer into the same bytes (up to
/// the final alignment padding), and every tensor lies inside the file.
pub fn gguf_header(data: &[u8]) {
    let Ok(h) = parse_gguf(data) else { return };
    for t in &h.tensors {
        let end = h.data_start as u64 + t.offset + t.nbytes() as u64;
        assert!(end <= data.len() as u64, "tensor `{}` ends past the file", t.name);
    }
    let specs: Vec<_> = h.tensors.iter().map(|t| (t.name.clone(), t.shape.clone(), t.ggml_type)).collect();
    let (bytes, infos) = header_bytes(&h.kvs, &specs, h.alignment);
    assert_eq!(infos, h.tensors, "tensor offsets are not reproduced");
    assert_eq!(bytes.len(), h.data_start, "the re-encoded header has another length");
    let fixed = h.data_start.saturating_sub(h.alignment);
    assert!(bytes[..fixed] == data[..fixed], "the re-encoded header differs");
}

/// `config.json`: a config that parses has the invariants the model code relies on.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(c) = OuroConfig::from_json_str(text, Path::new("config.json")) else { return };
    assert!(c.hidden_size > 0 && c.vocab_size > 0 && c.num_hidden_layers > 0 && c.total_ut_steps > 0);
    assert_eq!(c.num_attention_heads % c.num_key_value_heads, 0);
    assert_eq!(c.head_dim % 2, 0);
    assert!(c.early_exit_threshold.is_none_or(|q| (0.0..=1.0).contains(&q)));
    assert!(c.early_exit_step.is_none_or(|k| k < c.total_ut_steps));
    assert!(c.rms_norm_eps.is_finite() && c.rope_theta.is_finite() && c.rope_theta > 0.0);
    // sizes derived from it do not overflow, and the closed form agrees with the tensor list
    let listed: u128 = expected_tensors(&c).iter().map(|t| t.shape.iter().map(|&d| d as u128).product::<u128>()).sum();
    assert_eq!(c.parameter_count() as u128, listed, "parameter count");
    let stops = c.stop_token_ids();
    assert!(stops.contains(&2) && stops.contains(&0));
}

/// `model.safetensors.index.json`: an index that parses names only plain files inside the
/// checkpoint directory, and at least one.
pub fn shard_index(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(map) = parse_shard_index(text, Path::new("model.safetensors.index.json")) else { return };
    assert!(!map.is_empty());
    let dir = Path::new("/ckpt");
    for shard in map.values() {
        assert!(is_plain_file_name(shard), "shard `{shard}`");
        assert_eq!(dir.join(shard).parent(), Some(dir), "shard `{shard}` escapes the directory");
    }
}
