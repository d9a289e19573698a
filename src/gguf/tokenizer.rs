//! The tokenizer as GGUF metadata (`tokenizer.ggml.*`, gpt2-style BPE, pre-tokenizer `smollm`), and
//! back: a `tokenizers` tokenizer rebuilt from that metadata when only a .gguf is given.

use std::path::Path;

use serde_json::Value as Json;

use super::file::Value;
use crate::checkpoint::config::{ENDOFTEXT_ID, IM_END_ID, IM_START_ID};
use crate::error::{Error, Result};

/// llama.cpp token types.
pub const TOKEN_NORMAL: i32 = 1;
pub const TOKEN_CONTROL: i32 = 3;
pub const TOKEN_USER_DEFINED: i32 = 4;
pub const TOKEN_UNUSED: i32 = 5;

/// Reads `tokenizer.json` and returns the `tokenizer.ggml.*` keys, the vocabulary padded to
/// `vocab_size` with `[PADn]` tokens of type UNUSED as llama.cpp's converter does.
pub fn tokenizer_metadata(path: &Path, vocab_size: usize, chat_template: Option<&str>) -> Result<Vec<(String, Value)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let j: Json = serde_json::from_str(&text).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
    let model = j.get("model").ok_or_else(|| Error::file(path, "no `model`"))?;
    if model.get("type").and_then(Json::as_str) != Some("BPE") {
        return Err(Error::file(path, "only BPE tokenizers (Ouro's) can be written to GGUF"));
    }
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| Error::file(path, "BPE model has no `vocab` object"))?;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut put = |id: usize, tok: &str, ty: i32| -> Result<()> {
        if id >= tokens.len() {
            tokens.resize(id + 1, None);
        }
        tokens[id] = Some((tok.to_string(), ty));
        Ok(())
    };
    for (tok, id) in vocab {
        let id = id.as_u64().ok_or_else(|| Error::file(path, format!("vocab id of `{tok}` is not an integer")))?;
        put(id as usize, tok, TOKEN_NORMAL)?;
    }
    if let Some(added) = j.get("added_tokens").and_then(Json::as_array) {
        for a in added {
            let (Some(id), Some(content)) = (a.get("id").and_then(Json::as_u64), a.get("content").and_then(Json::as_str))
            else {
                return Err(Error::file(path, "added_tokens entry without id or content"));
            };
            let special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
            put(id as usize, content, if special { TOKEN_CONTROL } else { TOKEN_USER_DEFINED })?;
        }
    }
    let mut names = Vec::with_capacity(tokens.len());
    let mut types = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.into_iter().enumerate() {
        let (s, ty) = t.unwrap_or_else(|| (format!("[PAD{i}]"), TOKEN_UNUSED));
        names.push(s);
        types.push(ty);
    }
    let merges: Vec<String> = match model.get("merges").and_then(Json::as_array) {
        None => vec![],
        Some(list) => list
            .iter()
            .map(|m| match m {
                Json::String(s) => Ok(s.clone()),
                Json::Array(p) if p.len() == 2 => Ok(format!(
                    "{} {}",
                    p[0].as_str().unwrap_or_default(),
                    p[1].as_str().unwrap_or_default()
                )),
                _ => Err(Error::file(path, "a merge is neither \"a b\" nor [a, b]")),
            })
            .collect::<Result<_>>()?,
    };
    let mut kv = vec![
        ("tokenizer.ggml.model".to_string(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::Str("smollm".into())),
        ("tokenizer.ggml.tokens".to_string(), Value::strings(names)),
        ("tokenizer.ggml.token_type".to_string(), Value::i32s(types)),
        ("tokenizer.ggml.merges".to_string(), Value::strings(merges)),
        // The upstream configs say eos = 0; a chat turn ends with <|im_end|>. llama.cpp also treats
        // <|endoftext|> as end-of-generation by its text.
        ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(IM_START_ID)),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(IM_END_ID)),
        ("tokenizer.ggml.eot_token_id".to_string(), Value::U32(IM_END_ID)),
        ("tokenizer.ggml.padding_token_id".to_string(), Value::U32(ENDOFTEXT_ID)),
        ("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(false)),
    ];
    if let Some(t) = chat_template {
        kv.push(("tokenizer.chat_template".to_string(), Value::Str(t.to_string())));
    }
    Ok(kv)
}

/// Rebuilds a byte-level BPE tokenizer from GGUF metadata (tokens, types, merges).
pub fn tokenizer_from_metadata(get: &dyn Fn(&str) -> Option<Value>) -> anyhow::Result<tokenizers::Tokenizer> {
    let tokens: Vec<String> = get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()))
        .ok_or_else(|| anyhow::anyhow!("no tokenizer.ggml.tokens in the file"))?;
    let types: Vec<i32> = get("tokenizer.ggml.token_type")
        .and_then(|v| {
            v.as_array().map(|a| {
                a.iter()
                    .map(|x| match x {
                        Value::I32(t) => *t,
                        _ => TOKEN_NORMAL,
                    })
                    .collect()
            })
        })
        .unwrap_or_else(|| vec![TOKEN_NORMAL; tokens.len()]);
    let merges: Vec<Json> = get("tokenizer.ggml.merges")
        .and_then(|v| v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(|s| Json::String(s.into()))).collect()))
        .unwrap_or_default();
    let mut vocab = serde_json::Map::new();
    let mut added = vec![];
    for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
        match *ty {
            TOKEN_UNUSED => continue,
            TOKEN_CONTROL | TOKEN_USER_DEFINED => added.push(serde_json::json!({
                "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": *ty == TOKEN_CONTROL
            })),
            _ => {}
        }
        vocab.insert(t.clone(), Json::from(i));
    }
    let j = serde_json::json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&j)?)
        .map_err(|e| anyhow::anyhow!("rebuilding the tokenizer from GGUF metadata: {e}"))
}
