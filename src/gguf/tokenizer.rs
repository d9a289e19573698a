//! The tokenizer as GGUF metadata (`tokenizer.ggml.*`, gpt2-style BPE), and back: a `tokenizers`
//! tokenizer rebuilt from that metadata when only a .gguf is given.
//!
//! llama.cpp splits text before BPE by the regexes its `tokenizer.ggml.pre` tag names, not by the
//! vocabulary; a wrong tag changes the ids of every number. The tag is chosen here the way llama.cpp's
//! converter chooses it, then by what the tokenizer does:
//!
//! 1. llama.cpp's rule: the HF tokenizer encodes [`CHECK_TEXT`] and the SHA-256 of the ids written as
//!    Python prints a list (`[1, 2, 3]`) is looked up among the hashes llama.cpp knows for the tags we
//!    support (the released Ouro tokenizer is SmolLM's and hashes to `smollm`).
//! 2. A tokenizer with its own vocabulary (our fixtures, a retrained one) hashes to nothing llama.cpp
//!    knows. Then the HF normalizer and pre-tokenizer split a set of probe texts (the check text,
//!    numbers, years, code, Unicode) and the tag whose pre-tokenizer splits every one identically is
//!    chosen. Two splits that agree on every piece give the same ids whatever the vocabulary.
//! 3. Anything else is refused, naming the pre-tokenizer: a silent guess would tokenize differently.
//!
//! | tag | llama.cpp's split | HF pre-tokenizer |
//! |---|---|---|
//! | `gpt-2` | GPT-2's regex | `ByteLevel(use_regex=true)` |
//! | `smollm` | `\p{N}`, then GPT-2's regex | `Sequence[Digits(individual_digits=true), ByteLevel]` |

use std::path::Path;

use serde_json::{Map, Value as Json};
use sha2::{Digest, Sha256};
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer as _};

use super::file::Value;
use crate::checkpoint::config::{ENDOFTEXT_ID, IM_END_ID, IM_START_ID};
use crate::error::{Error, Result};

/// llama.cpp token types.
pub const TOKEN_NORMAL: i32 = 1;
pub const TOKEN_CONTROL: i32 = 3;
pub const TOKEN_USER_DEFINED: i32 = 4;
pub const TOKEN_UNUSED: i32 = 5;

/// The text llama.cpp's converter (`get_vocab_base_pre` in `convert_hf_to_gguf.py`) encodes to
/// fingerprint a pre-tokenizer.
pub const CHECK_TEXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\u{1F680} (normal) \u{1F636}\u{200d}\u{1F32B}\u{FE0F} (multiple emojis concatenated) \u{2705} \u{1F999}\u{1F999} 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 \u{1780}\u{17B6}\u{1793}\u{17CB}\u{178F}\u{17C2}\u{1796}\u{17B7}\u{179F}\u{17C1}\u{179F}\u{17A2}\u{17B6}\u{1785}\u{1F601} ?\u{6211}\u{60F3}\u{5728}apple\u{5DE5}\u{4F5C}1314151\u{5929}\u{FF5E} ------======= \u{043D}\u{0435}\u{0449}\u{043E} \u{043D}\u{0430} \u{0411}\u{044A}\u{043B}\u{0433}\u{0430}\u{0440}\u{0441}\u{043A}\u{0438} ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// Texts besides [`CHECK_TEXT`] on which a tokenizer's split must equal the tag's.
const PROBE_TEXTS: &[&str] = &[
    "In 1942, 3.14159 of 1,000,000 items cost $12.50 (about 7%) on 2024-03-01 at 10:45.",
    "fn main() {\n    let x: u64 = 0x2A + 42;\n    println!(\"{x:>8}\");\n}\n\tif a<=b && c!=d { return; }",
    "naïve café – Zürich 東京 2024年 ١٢٣ ½ x² ⅷ — «quoted» ‘single’ emoji 👍🏽 done.",
    "  leading spaces\n\n\ntrailing   \r\n mixed\u{a0}nbsp\u{2003}em-space end ",
];

/// A pre-tokenizer a GGUF file can name and our reader can rebuild.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2's split: letters, numbers (runs of digits) and punctuation runs, each with one leading space.
    Gpt2,
    /// SmolLM's (and so Ouro's): every digit alone, then GPT-2's split.
    Smollm,
}

/// How the tag of a converted tokenizer was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagRule {
    /// The check text's ids hash to a value llama.cpp's converter knows.
    Hash,
    /// The tokenizer's own split equals the tag's on every probe text.
    Split,
}

impl PreTokenizer {
    pub const ALL: [PreTokenizer; 2] = [PreTokenizer::Gpt2, PreTokenizer::Smollm];

    /// The `tokenizer.ggml.pre` value llama.cpp reads.
    pub fn tag(self) -> &'static str {
        match self {
            PreTokenizer::Gpt2 => "gpt-2",
            PreTokenizer::Smollm => "smollm",
        }
    }

    pub fn from_tag(tag: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.tag() == tag)
    }

    /// The check-text hashes llama.cpp's converter maps to this tag (its table, the entries of
    /// the tags we support).
    pub fn known_hashes(self) -> &'static [&'static str] {
        match self {
            // openai-community/gpt2, and a GPT-3-style Russian model with GPT-2's split.
            PreTokenizer::Gpt2 => &[
                "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454",
                "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4",
            ],
            // HuggingFaceTB/SmolLM-135M; SmolLM2 and Ouro share its tokenizer.
            PreTokenizer::Smollm => &["855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"],
        }
    }

    /// The HF `pre_tokenizer` that splits text as llama.cpp does under this tag.
    pub fn hf_json(self) -> Json {
        let byte_level = serde_json::json!({
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
        });
        match self {
            PreTokenizer::Gpt2 => byte_level,
            PreTokenizer::Smollm => serde_json::json!({
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]
            }),
        }
    }

    fn wrapper(self) -> tokenizers::pre_tokenizers::PreTokenizerWrapper {
        serde_json::from_value(self.hf_json()).expect("the built-in pre-tokenizers deserialize")
    }
}

/// llama.cpp's fingerprint of a tokenizer: SHA-256 of the ids of [`CHECK_TEXT`] (special tokens
/// added as `transformers`' `encode` adds them) printed as a Python list.
pub fn check_hash(tok: &tokenizers::Tokenizer) -> std::result::Result<String, String> {
    let enc = tok.encode(CHECK_TEXT, true).map_err(|e| e.to_string())?;
    let ids: Vec<String> = enc.get_ids().iter().map(u32::to_string).collect();
    let printed = format!("[{}]", ids.join(", "));
    Ok(Sha256::digest(printed.as_bytes()).iter().map(|b| format!("{b:02x}")).collect())
}

/// The pieces a tokenizer's normalizer and pre-tokenizer cut `text` into (before the vocabulary).
fn hf_split(tok: &tokenizers::Tokenizer, text: &str) -> std::result::Result<Vec<String>, String> {
    let mut pts = PreTokenizedString::from(text);
    if let Some(n) = tok.get_normalizer() {
        use tokenizers::Normalizer as _;
        pts.normalize(|s| n.normalize(s)).map_err(|e| e.to_string())?;
    }
    if let Some(p) = tok.get_pre_tokenizer() {
        p.pre_tokenize(&mut pts).map_err(|e| e.to_string())?;
    }
    Ok(pieces(&pts))
}

fn tag_split(pre: PreTokenizer, text: &str) -> Vec<String> {
    let mut pts = PreTokenizedString::from(text);
    pre.wrapper().pre_tokenize(&mut pts).expect("the built-in pre-tokenizers do not fail");
    pieces(&pts)
}

fn pieces(pts: &PreTokenizedString) -> Vec<String> {
    pts.get_splits(OffsetReferential::Normalized, OffsetType::Byte)
        .into_iter()
        .map(|(s, _, _)| s.to_string())
        .collect()
}

/// A short description of a tokenizer.json pre-tokenizer for messages: `Sequence[Digits, ByteLevel]`.
fn describe(j: &Json) -> String {
    match j {
        Json::Null => "none".into(),
        Json::Object(o) => {
            let ty = o.get("type").and_then(Json::as_str).unwrap_or("?");
            match o.get("pretokenizers").and_then(Json::as_array) {
                Some(list) => format!("{ty}[{}]", list.iter().map(describe).collect::<Vec<_>>().join(", ")),
                None => ty.to_string(),
            }
        }
        _ => "?".into(),
    }
}

/// Chooses the `tokenizer.ggml.pre` tag for `tok` (loaded from `path`, whose JSON is `j`).
pub fn choose_pre(tok: &tokenizers::Tokenizer, j: &Json, path: &Path) -> Result<(PreTokenizer, TagRule)> {
    let hash = check_hash(tok).map_err(|e| Error::file(path, format!("cannot encode llama.cpp's check text: {e}")))?;
    if let Some(p) = PreTokenizer::ALL.into_iter().find(|p| p.known_hashes().contains(&hash.as_str())) {
        return Ok((p, TagRule::Hash));
    }
    let mut texts = vec![CHECK_TEXT];
    texts.extend_from_slice(PROBE_TEXTS);
    let mut first_miss = None;
    'tags: for pre in PreTokenizer::ALL {
        for t in &texts {
            let ours = hf_split(tok, t).map_err(|e| Error::file(path, format!("pre-tokenizing failed: {e}")))?;
            let theirs = tag_split(pre, t);
            if ours != theirs {
                if first_miss.is_none() {
                    let at = ours.iter().zip(&theirs).position(|(a, b)| a != b).unwrap_or(ours.len().min(theirs.len()));
                    first_miss = Some(format!(
                        "on {:?} it gives {:?} where `{}` gives {:?}",
                        t.chars().take(40).collect::<String>(),
                        ours.get(at..(at + 4).min(ours.len())).unwrap_or_default(),
                        pre.tag(),
                        theirs.get(at..(at + 4).min(theirs.len())).unwrap_or_default(),
                    ));
                }
                continue 'tags;
            }
        }
        return Ok((pre, TagRule::Split));
    }
    let normalizer = j.get("normalizer").map(describe).unwrap_or_else(|| "none".into());
    Err(Error::file(
        path,
        format!(
            "the pre-tokenizer {} (normalizer {normalizer}) splits text unlike every pre-tokenizer a GGUF file \
             can name here ({}); llama.cpp would tokenize such a file differently from this tokenizer, so it is \
             not converted: {}",
            describe(j.get("pre_tokenizer").unwrap_or(&Json::Null)),
            PreTokenizer::ALL.map(|p| p.tag()).join(", "),
            first_miss.unwrap_or_default()
        ),
    ))
}

/// Whether an added token's text marks it as a control token even when `special` is false (as
/// llama.cpp's converter decides: `<|...|>`, `<｜...｜>`, `<pad>`, `<mask>`, `<unused...>`).
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>") && t.len() >= 4)
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// The chat templates of a `tokenizer_config.json`: the default one and the named others (the
/// list form `[{"name": ..., "template": ...}]`, as llama.cpp's converter writes them).
pub fn chat_templates(cfg: Option<&Map<String, Json>>) -> (Option<String>, Vec<(String, String)>) {
    let Some(ct) = cfg.and_then(|c| c.get("chat_template")) else {
        return (None, vec![]);
    };
    match ct {
        Json::String(s) => (Some(s.clone()), vec![]),
        Json::Array(list) => {
            let mut default = None;
            let mut named = vec![];
            for e in list {
                if let (Some(n), Some(t)) = (e.get("name").and_then(Json::as_str), e.get("template").and_then(Json::as_str)) {
                    if n == "default" {
                        default = Some(t.to_string());
                    } else {
                        named.push((n.to_string(), t.to_string()));
                    }
                }
            }
            (default, named)
        }
        _ => (None, vec![]),
    }
}

/// Whether encoding adds a BOS / EOS token, decided as llama.cpp's converter decides it: a
/// `TemplateProcessing` post-processor that starts (ends) with a special token adds one, and
/// `tokenizer_config.json`'s `add_bos_token` / `add_eos_token`, where they are booleans, override.
/// Neither (the Ouro tokenizer's case) means false, which is what the HF tokenizer then does.
fn special_flags(j: &Json, config: Option<&Map<String, Json>>) -> (bool, bool) {
    let (mut bos, mut eos) = (false, false);
    if let Some(pp) = j.get("post_processor").filter(|p| !p.is_null()) {
        let list = pp.get("processors").and_then(Json::as_array).cloned().unwrap_or_else(|| vec![pp.clone()]);
        for p in list {
            if p.get("type").and_then(Json::as_str) != Some("TemplateProcessing") {
                continue;
            }
            if let Some(single) = p.get("single").and_then(Json::as_array).filter(|s| s.len() > 1) {
                bos |= single.first().is_some_and(|e| e.get("SpecialToken").is_some());
                eos |= single.last().is_some_and(|e| e.get("SpecialToken").is_some());
            }
        }
    }
    let flag = |key: &str| config.and_then(|c| c.get(key)).and_then(Json::as_bool);
    (flag("add_bos_token").unwrap_or(bos), flag("add_eos_token").unwrap_or(eos))
}

/// What [`tokenizer_metadata`] decided, for the summary.
pub struct TokenizerInfo {
    pub pre: PreTokenizer,
    pub rule: TagRule,
}

/// Reads `tokenizer.json` (and the parsed `tokenizer_config.json`) and returns the
/// `tokenizer.ggml.*` keys: the vocabulary padded to `vocab_size` with `[PADn]` tokens of type
/// UNUSED, as llama.cpp's converter does, and the pre-tokenizer tag chosen by [`choose_pre`].
pub fn tokenizer_metadata(
    path: &Path,
    vocab_size: usize,
    config: Option<&Map<String, Json>>,
) -> Result<(Vec<(String, Value)>, TokenizerInfo)> {
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
    let mut put = |id: u64, tok: &str, ty: i32| -> Result<()> {
        let slot = usize::try_from(id).ok().and_then(|i| tokens.get_mut(i)).ok_or_else(|| {
            Error::file(
                path,
                format!(
                    "token {tok:?} has id {id}, outside the model's vocabulary of {vocab_size} (config.json \
                     `vocab_size`): the embedding has no row for it"
                ),
            )
        })?;
        if let Some((prev, _)) = slot {
            if prev != tok {
                return Err(Error::file(path, format!("id {id} is given to both {prev:?} and {tok:?}")));
            }
        }
        *slot = Some((tok.to_string(), ty));
        Ok(())
    };
    for (tok, id) in vocab {
        let id = id.as_u64().ok_or_else(|| Error::file(path, format!("vocab id of `{tok}` is not an integer")))?;
        put(id, tok, TOKEN_NORMAL)?;
    }
    if let Some(added) = j.get("added_tokens").and_then(Json::as_array) {
        for a in added {
            let (Some(id), Some(content)) = (a.get("id").and_then(Json::as_u64), a.get("content").and_then(Json::as_str))
            else {
                return Err(Error::file(path, "added_tokens entry without id or content"));
            };
            let special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
            let ty = if special || looks_special(content) { TOKEN_CONTROL } else { TOKEN_USER_DEFINED };
            put(id, content, ty)?;
        }
    }
    let tok = tokenizers::Tokenizer::from_bytes(text.as_bytes()).map_err(|e| Error::file(path, format!("not a valid tokenizer: {e}")))?;
    let (pre, rule) = choose_pre(&tok, &j, path)?;

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
                Json::Array(p) if p.len() == 2 && p.iter().all(Json::is_string) => Ok(format!(
                    "{} {}",
                    p[0].as_str().unwrap_or_default(),
                    p[1].as_str().unwrap_or_default()
                )),
                _ => Err(Error::file(path, "a merge is neither \"a b\" nor [a, b]")),
            })
            .collect::<Result<_>>()?,
    };
    let (add_bos, add_eos) = special_flags(&j, config);
    let mut kv = vec![
        ("tokenizer.ggml.model".to_string(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::Str(pre.tag().into())),
        ("tokenizer.ggml.tokens".to_string(), Value::strings(names)),
        ("tokenizer.ggml.token_type".to_string(), Value::i32s(types)),
        ("tokenizer.ggml.merges".to_string(), Value::strings(merges)),
        // The upstream configs say eos = 0; a chat turn ends with <|im_end|>. llama.cpp also treats
        // <|endoftext|> as end-of-generation by its text.
        ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(IM_START_ID)),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(IM_END_ID)),
        ("tokenizer.ggml.eot_token_id".to_string(), Value::U32(IM_END_ID)),
        ("tokenizer.ggml.padding_token_id".to_string(), Value::U32(ENDOFTEXT_ID)),
        ("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(add_bos)),
        ("tokenizer.ggml.add_eos_token".to_string(), Value::Bool(add_eos)),
    ];
    let (default, named) = chat_templates(config);
    if let Some(t) = default {
        kv.push(("tokenizer.chat_template".to_string(), Value::Str(t)));
    }
    if !named.is_empty() {
        kv.push(("tokenizer.chat_templates".to_string(), Value::strings(named.iter().map(|(n, _)| n.clone()))));
        for (n, t) in named {
            kv.push((format!("tokenizer.chat_template.{n}"), Value::Str(t)));
        }
    }
    Ok((kv, TokenizerInfo { pre, rule }))
}

/// Rebuilds a byte-level BPE tokenizer from GGUF metadata (tokens, types, merges, and the
/// pre-tokenizer `tokenizer.ggml.pre` names), so that a GGUF file tokenizes as llama.cpp reads it.
pub fn tokenizer_from_metadata(get: &dyn Fn(&str) -> Option<Value>) -> anyhow::Result<tokenizers::Tokenizer> {
    match get("tokenizer.ggml.model").as_ref().and_then(Value::as_str) {
        Some("gpt2") => {}
        Some(other) => anyhow::bail!("tokenizer.ggml.model is {other:?}: only \"gpt2\" (byte-level BPE) tokenizers are read"),
        None => anyhow::bail!("no tokenizer.ggml.model in the file"),
    }
    let pre = match get("tokenizer.ggml.pre").as_ref().and_then(Value::as_str) {
        Some(tag) => PreTokenizer::from_tag(tag).ok_or_else(|| {
            anyhow::anyhow!(
                "tokenizer.ggml.pre is {tag:?}, a pre-tokenizer this reader cannot rebuild (it knows {}): \
                 text would be split unlike llama.cpp splits it",
                PreTokenizer::ALL.map(|p| p.tag()).join(", ")
            )
        })?,
        None => anyhow::bail!("no tokenizer.ggml.pre in the file: llama.cpp would fall back to its default split, which this reader does not rebuild"),
    };
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
    anyhow::ensure!(
        types.len() == tokens.len(),
        "tokenizer.ggml.token_type has {} entries for {} tokens",
        types.len(),
        tokens.len()
    );
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
        "pre_tokenizer": pre.hf_json(),
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&j)?)
        .map_err(|e| anyhow::anyhow!("rebuilding the tokenizer from GGUF metadata: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_split_digits_as_llama_cpp_regexes_do() {
        // llama.cpp's `smollm` cuts every \p{N} alone before GPT-2's regex; `gpt-2` keeps digit runs.
        assert_eq!(tag_split(PreTokenizer::Gpt2, "in 1942"), ["in", "Ġ1942"]);
        assert_eq!(tag_split(PreTokenizer::Smollm, "in 1942"), ["in", "Ġ", "1", "9", "4", "2"]);
        assert_eq!(PreTokenizer::from_tag("smollm"), Some(PreTokenizer::Smollm));
        assert_eq!(PreTokenizer::from_tag("llama-bpe"), None);
    }

    #[test]
    fn bos_and_eos_flags_as_llama_cpps_converter_reads_them() {
        let tmpl = serde_json::json!({"post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]}});
        assert_eq!(special_flags(&tmpl, None), (true, false));
        let no = serde_json::json!({"add_bos_token": false}).as_object().cloned();
        assert_eq!(special_flags(&tmpl, no.as_ref()), (false, false));
        let yes = serde_json::json!({"add_eos_token": true}).as_object().cloned();
        assert_eq!(special_flags(&serde_json::json!({"post_processor": null}), yes.as_ref()), (false, true));
    }

    #[test]
    fn the_reader_refuses_tags_it_cannot_rebuild() {
        for (tag, needle) in [(Some("llama-bpe"), "llama-bpe"), (None, "no tokenizer.ggml.pre")] {
            let get = |k: &str| match k {
                "tokenizer.ggml.model" => Some(Value::Str("gpt2".into())),
                "tokenizer.ggml.pre" => tag.map(|t| Value::Str(t.into())),
                "tokenizer.ggml.tokens" => Some(Value::strings(["a", "b"].map(String::from))),
                _ => None,
            };
            let e = tokenizer_from_metadata(&get).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn control_tokens_by_their_text() {
        assert!(looks_special("<|im_start|>"));
        assert!(looks_special("<unused3>"));
        assert!(!looks_special("<think>"));
        assert!(!looks_special("<|"));
    }
}
