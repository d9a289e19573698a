//! `config.json` of an Ouro checkpoint: the typed values this tool needs, the raw JSON object kept
//! whole (unknown keys included) for writers, and the known upstream faults as corrections.
//!
//! Never relies on the upstream config class defaults (they are Qwen2's): every value that changes
//! the model's shape or arithmetic must be present in the file.

use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Token ids the Ouro tokenizer reserves (SmolLM2's): a runner stops on both end tokens.
pub const ENDOFTEXT_ID: u32 = 0;
pub const IM_START_ID: u32 = 1;
pub const IM_END_ID: u32 = 2;

/// Largest size key accepted (a corrupt config must not make sizes overflow).
const MAX_DIM: usize = 1 << 31;
/// Most parameters a config may imply (a thousand times the largest Ouro).
const MAX_PARAMETERS: u128 = 1 << 42;
const MAX_LAYERS: usize = 4096;
const MAX_LOOPS: usize = 256;

/// The typed configuration of an Ouro model.
#[derive(Debug, Clone, Serialize)]
pub struct OuroConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Physical decoder layers (shared by every loop).
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Loops (recurrent steps) per token, T.
    pub total_ut_steps: usize,
    /// The CDF threshold of the default exit rule (`None` if the config sets none).
    pub early_exit_threshold: Option<f64>,
    /// A fixed exit step, if the config sets one.
    pub early_exit_step: Option<usize>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub torch_dtype: Option<String>,
    /// The whole object as read, unknown keys included, in file order.
    #[serde(skip)]
    pub raw: Map<String, Value>,
    /// Upstream faults found in this config, with the value writers use instead.
    pub corrections: Vec<Correction>,
}

/// A value in the config known to be wrong upstream, and what writers put instead.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Correction {
    pub key: String,
    pub found: Value,
    pub corrected: Value,
    pub why: String,
}

struct Reader<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::config(self.path, key, msg)
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }
    fn required(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| self.err(key, "required key is missing (Ouro configs always set it)"))
    }
    fn usize_of(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| self.err(key, format!("must be a non-negative integer, found {v}")))
    }
    fn positive(&self, key: &str) -> Result<usize> {
        let n = self.usize_of(key, self.required(key)?)?;
        if n == 0 {
            return Err(self.err(key, "must be positive, found 0"));
        }
        if n > MAX_DIM {
            return Err(self.err(key, format!("{n} is implausibly large (more than {MAX_DIM})")));
        }
        Ok(n)
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| self.usize_of(key, v)).transpose()
    }
    fn float(&self, key: &str) -> Result<f64> {
        let v = self.required(key)?;
        let x = v
            .as_f64()
            .ok_or_else(|| self.err(key, format!("must be a number, found {v}")))?;
        if !x.is_finite() || x <= 0.0 {
            return Err(self.err(key, format!("must be a positive finite number, found {x}")));
        }
        Ok(x)
    }
    fn opt_float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.err(key, format!("must be a finite number, found {v}"))),
        }
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("must be true or false, found {v}"))),
        }
    }
    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("must be a string, found {v}"))),
        }
    }
    /// A token id or a list of them.
    fn ids(&self, key: &str) -> Result<Vec<u32>> {
        let conv = |v: &Value| {
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| self.err(key, format!("must be a token id or a list of ids, found {v}")))
        };
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a.iter().map(conv).collect(),
            Some(v) => Ok(vec![conv(v)?]),
        }
    }
}

impl OuroConfig {
    /// Reads and checks `path` (a `config.json`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses config text; `path` is used in messages only.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = crate::json::parse(text).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(Error::file(path, "config.json must hold a JSON object"));
        };
        Self::from_map(map, path)
    }

    /// Checks a parsed config object.
    pub fn from_map(map: Map<String, Value>, path: &Path) -> Result<Self> {
        let r = Reader { path, map: &map };
        let model_type = r.opt_str("model_type")?;
        if model_type != Some("ouro") {
            let found = model_type.map_or("no model_type".to_string(), |m| format!("model_type \"{m}\""));
            return Err(r.err(
                "model_type",
                format!("{found}: this is not an Ouro checkpoint (expected model_type \"ouro\")"),
            ));
        }
        let act = r.opt_str("hidden_act")?;
        if act.is_some_and(|a| a != "silu") {
            return Err(r.err(
                "hidden_act",
                format!("\"{}\" is not supported (Ouro uses \"silu\")", act.unwrap_or_default()),
            ));
        }
        if let Some(scaling) = r.get("rope_scaling") {
            let kind = scaling
                .get("rope_type")
                .or_else(|| scaling.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("unknown");
            return Err(r.err(
                "rope_scaling",
                format!("rope scaling of type \"{kind}\" is not supported (released Ouro models use null)"),
            ));
        }
        if r.opt_bool("use_sliding_window")? == Some(true) {
            return Err(r.err(
                "use_sliding_window",
                "sliding-window attention is not supported (released Ouro models use full attention)",
            ));
        }
        if let Some(types) = r.get("layer_types") {
            let list = types
                .as_array()
                .ok_or_else(|| r.err("layer_types", "must be a list of strings"))?;
            if let Some(bad) = list.iter().find(|t| t.as_str() != Some("full_attention")) {
                return Err(r.err(
                    "layer_types",
                    format!("layer type {bad} is not supported (only \"full_attention\")"),
                ));
            }
        }

        let hidden_size = r.positive("hidden_size")?;
        let num_attention_heads = r.positive("num_attention_heads")?;
        let num_key_value_heads = r.positive("num_key_value_heads")?;
        let head_dim = match r.opt_usize("head_dim")? {
            Some(0) => return Err(r.err("head_dim", "must be positive, found 0")),
            Some(d) if d > MAX_DIM => return Err(r.err("head_dim", format!("{d} is implausibly large (more than {MAX_DIM})"))),
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(r.err(
                        "head_dim",
                        format!(
                            "absent, and hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(r.err("head_dim", format!("{head_dim} is odd; rotary embeddings need an even head_dim")));
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(r.err(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let total_ut_steps = r.positive("total_ut_steps")?;
        let early_exit_threshold = r.opt_float("early_exit_threshold")?;
        if let Some(q) = early_exit_threshold {
            if !(0.0..=1.0).contains(&q) {
                return Err(r.err("early_exit_threshold", format!("must lie in [0, 1], found {q}")));
            }
        }
        let early_exit_step = r.opt_usize("early_exit_step")?;
        if let Some(k) = early_exit_step {
            if k >= total_ut_steps {
                return Err(r.err(
                    "early_exit_step",
                    format!("{k} is not a loop index below total_ut_steps {total_ut_steps}"),
                ));
            }
        }
        let mut cfg = OuroConfig {
            vocab_size: r.positive("vocab_size")?,
            hidden_size,
            intermediate_size: r.positive("intermediate_size")?,
            num_hidden_layers: r.positive("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: r.positive("max_position_embeddings")?,
            rms_norm_eps: r.float("rms_norm_eps")?,
            rope_theta: r.float("rope_theta")?,
            total_ut_steps,
            early_exit_threshold,
            early_exit_step,
            tie_word_embeddings: r.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            bos_token_id: r.ids("bos_token_id")?.first().copied(),
            eos_token_ids: r.ids("eos_token_id")?,
            pad_token_id: r.ids("pad_token_id")?.first().copied(),
            torch_dtype: r.opt_str("torch_dtype")?.map(str::to_string),
            raw: Map::new(),
            corrections: vec![],
        };
        for (key, n, max) in [("num_hidden_layers", cfg.num_hidden_layers, MAX_LAYERS), ("total_ut_steps", cfg.total_ut_steps, MAX_LOOPS)] {
            if n > max {
                return Err(r.err(key, format!("{n} is implausibly large (more than {max})")));
            }
        }
        let params = cfg.parameter_count_u128();
        if params > MAX_PARAMETERS {
            return Err(r.err(
                "hidden_size",
                format!("the sizes imply {params} parameters, implausibly many (more than {MAX_PARAMETERS}): the config is corrupt"),
            ));
        }
        cfg.corrections = find_corrections(&cfg, &map);
        cfg.raw = map;
        Ok(cfg)
    }

    /// The end-of-generation ids a runner and every writer use: the config's, with `<|im_end|>` (2)
    /// and `<|endoftext|>` (0) always included.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut ids = vec![IM_END_ID, ENDOFTEXT_ID];
        for &id in &self.eos_token_ids {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// The raw config with the corrections applied, for writers.
    pub fn corrected_raw(&self) -> Map<String, Value> {
        let mut m = self.raw.clone();
        for c in &self.corrections {
            m.insert(c.key.clone(), c.corrected.clone());
        }
        m
    }

    /// KV-cache slots of the full per-(loop, layer) cache.
    pub fn kv_slots(&self) -> usize {
        self.total_ut_steps * self.num_hidden_layers
    }

    /// Parameters the config implies (the real models': 1,434,652,673 and 2,667,974,657).
    pub fn parameter_count(&self) -> u64 {
        self.parameter_count_u128() as u64
    }

    /// [`Self::parameter_count`] without overflow for any sizes (the sum of the shapes
    /// [`crate::checkpoint::expected_tensors`] lists; a test checks they agree).
    fn parameter_count_u128(&self) -> u128 {
        let [h, i, v, l] = [self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers].map(|x| x as u128);
        let q = self.num_attention_heads as u128 * self.head_dim as u128;
        let kv = self.num_key_value_heads as u128 * self.head_dim as u128;
        let per_layer = 2 * q * h + 2 * kv * h + 3 * i * h + 4 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + l * per_layer + h + h + 1 + head
    }
}

fn find_corrections(cfg: &OuroConfig, map: &Map<String, Value>) -> Vec<Correction> {
    let mut out = vec![];
    if !cfg.eos_token_ids.contains(&IM_END_ID) {
        out.push(Correction {
            key: "eos_token_id".into(),
            found: map.get("eos_token_id").cloned().unwrap_or(Value::Null),
            corrected: serde_json::json!([IM_END_ID, ENDOFTEXT_ID]),
            why: "upstream sets eos to <|endoftext|> (0) only, but a chat turn ends with <|im_end|> (2); generation must stop on both".into(),
        });
    }
    if cfg.bos_token_id == Some(ENDOFTEXT_ID) && cfg.pad_token_id == Some(ENDOFTEXT_ID) {
        out.push(Correction {
            key: "bos_token_id".into(),
            found: map.get("bos_token_id").cloned().unwrap_or(Value::Null),
            corrected: serde_json::json!(IM_START_ID),
            why: "upstream Thinking configs set bos, eos and pad all to 0; the tokenizer's bos is <|im_start|> (1)".into(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<OuroConfig> {
        OuroConfig::from_json_str(text, Path::new("config.json"))
    }

    const MIN: &str = r#"{"model_type":"ouro","vocab_size":320,"hidden_size":64,"intermediate_size":160,
        "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":2048,
        "rms_norm_eps":1e-6,"rope_theta":1e6,"total_ut_steps":4,"early_exit_threshold":1.0,"eos_token_id":0,
        "hidden_act":"silu","rope_scaling":null,"my_extra_key":[1,2]}"#;

    #[test]
    fn parses_and_keeps_unknown_keys() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.kv_slots(), 12);
        assert_eq!(c.raw["my_extra_key"], serde_json::json!([1, 2]));
        assert_eq!(c.corrections.len(), 1);
        assert_eq!(c.corrected_raw()["eos_token_id"], serde_json::json!([2, 0]));
        assert_eq!(c.stop_token_ids(), vec![2, 0]);
    }

    #[test]
    fn refusals_name_the_key() {
        let cases = [
            ("\"hidden_size\":64,", "", "hidden_size", "missing"),
            ("\"hidden_size\":64", "\"hidden_size\":\"64\"", "hidden_size", "integer"),
            ("\"hidden_act\":\"silu\"", "\"hidden_act\":\"gelu\"", "hidden_act", "gelu"),
            ("\"rope_scaling\":null", "\"rope_scaling\":{\"type\":\"yarn\",\"factor\":4}", "rope_scaling", "yarn"),
            ("\"model_type\":\"ouro\"", "\"model_type\":\"llama\"", "model_type", "not an Ouro"),
            ("\"num_key_value_heads\":2", "\"num_key_value_heads\":3", "num_key_value_heads", "divide"),
            ("\"rms_norm_eps\":1e-6", "\"rms_norm_eps\":-1", "rms_norm_eps", "positive"),
        ];
        for (from, to, key, word) in cases {
            assert!(MIN.contains(from), "{from}");
            let e = parse(&MIN.replacen(from, to, 1)).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")) && e.contains(word), "{e}");
        }
    }
}
