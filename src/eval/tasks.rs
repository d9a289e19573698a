//! Answer-level validation: a task file of prompts with their answers, answered greedily by the
//! reference and the candidate through the same generator as `run`, at every fixed depth, in the
//! default mode and at each exit threshold. Perplexity says how close two models are; this says
//! whether they still give the same answers, and at which depth the answers come right.
//!
//! A task file is JSON Lines, one item per line:
//! `{"prompt": "...", "answer": "...", "chat": false, "match": "exact", "max_tokens": 32}`;
//! `chat` (default false) renders the prompt with the model's chat template, `thinking` (default
//! false) opens a thinking block after it, `match` is `exact` (the first line of the generated
//! text, trimmed, equals the answer, trimmed; the default), `contains` (the answer appears in the
//! generated text) or `regex` (the answer is a regular expression found in it), and `max_tokens`
//! bounds the generation (default [`DEFAULT_MAX_TOKENS`]). `kind` is a free label for people.

use std::path::Path;

use serde::Serialize;

use crate::model::generate::{self, GenerateOptions, Sampling};
use crate::model::{ExitMode, KvPolicy, OuroModel, SkipFill};

/// Tokens generated per item unless the item says otherwise.
pub const DEFAULT_MAX_TOKENS: usize = 32;

/// How a generated text is judged against an item's answer.
#[derive(Debug, Clone)]
pub enum Matching {
    Exact,
    Contains,
    Regex(regex::Regex),
}

/// One item of a task file.
#[derive(Debug, Clone)]
pub struct TaskItem {
    pub prompt: String,
    pub answer: String,
    pub chat: bool,
    pub thinking: bool,
    pub matching: Matching,
    pub max_tokens: usize,
}

impl TaskItem {
    /// The part of `generated` that is the answer: its first line, trimmed, for `exact` items
    /// (what follows is the model going on with the next line), else the whole text, trimmed.
    /// Two models agree on an item when these are equal.
    pub fn answer_of<'a>(&self, generated: &'a str) -> &'a str {
        match self.matching {
            Matching::Exact => generated.lines().next().unwrap_or("").trim(),
            _ => generated.trim(),
        }
    }

    /// Whether `generated` answers the item.
    pub fn correct(&self, generated: &str) -> bool {
        match &self.matching {
            Matching::Exact => self.answer_of(generated) == self.answer.trim(),
            Matching::Contains => generated.contains(&self.answer),
            Matching::Regex(re) => re.is_match(generated),
        }
    }
}

/// Reads a task file, refusing what it cannot honour with the file, line and key named.
pub fn read_tasks(path: &Path) -> anyhow::Result<Vec<TaskItem>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut items = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{at}: not JSON: {e}"))?;
        let o = v.as_object().ok_or_else(|| anyhow::anyhow!("{at}: an item is a JSON object"))?;
        for k in o.keys() {
            anyhow::ensure!(
                ["prompt", "answer", "chat", "thinking", "match", "max_tokens", "kind"].contains(&k.as_str()),
                "{at}: unknown key `{k}` (known: prompt, answer, chat, thinking, match, max_tokens, kind)"
            );
        }
        let string = |k: &str| -> anyhow::Result<String> {
            o.get(k)
                .and_then(|x| x.as_str())
                .map(str::to_string)
                .ok_or_else(|| anyhow::anyhow!("{at}: `{k}` missing or not a string"))
        };
        let flag = |k: &str| -> anyhow::Result<bool> {
            match o.get(k) {
                None => Ok(false),
                Some(x) => x.as_bool().ok_or_else(|| anyhow::anyhow!("{at}: `{k}` must be true or false")),
            }
        };
        let (prompt, answer) = (string("prompt")?, string("answer")?);
        anyhow::ensure!(!prompt.is_empty(), "{at}: `prompt` is empty");
        anyhow::ensure!(!answer.trim().is_empty(), "{at}: `answer` is empty");
        let matching = match o.get("match").map(|m| m.as_str()) {
            None | Some(Some("exact")) => Matching::Exact,
            Some(Some("contains")) => Matching::Contains,
            Some(Some("regex")) => Matching::Regex(regex::Regex::new(&answer).map_err(|e| anyhow::anyhow!("{at}: `answer` is not a regular expression: {e}"))?),
            Some(_) => anyhow::bail!("{at}: `match` must be \"exact\", \"contains\" or \"regex\", not {}", o["match"]),
        };
        let max_tokens = match o.get("max_tokens") {
            None => DEFAULT_MAX_TOKENS,
            Some(x) => match x.as_u64() {
                Some(n @ 1..=4096) => n as usize,
                _ => anyhow::bail!("{at}: `max_tokens` must be a whole number from 1 to 4096"),
            },
        };
        if let Some(k) = o.get("kind") {
            anyhow::ensure!(k.is_string(), "{at}: `kind` must be a string");
        }
        items.push(TaskItem { prompt, answer, chat: flag("chat")?, thinking: flag("thinking")?, matching, max_tokens });
    }
    anyhow::ensure!(!items.is_empty(), "{}: no items (one JSON object per line)", path.display());
    Ok(items)
}

/// A way of reading answers out of a model.
#[derive(Debug, Clone)]
pub struct Mode {
    /// `loop 1` .. `loop T`, `default`, `q = 0.5`, ...
    pub label: String,
    /// A fixed depth: every token runs this many loops and is read out at the last.
    pub depth: Option<usize>,
    /// Adaptive exit at this threshold (loops really skipped).
    pub threshold: Option<f32>,
}

/// Every fixed depth `1..=loops`, the default mode, then adaptive exit at each threshold.
pub fn modes(loops: usize, thresholds: &[f32]) -> Vec<Mode> {
    let mut m: Vec<Mode> = (1..=loops).map(|d| Mode { label: format!("loop {d}"), depth: Some(d), threshold: None }).collect();
    m.push(Mode { label: "default".into(), depth: None, threshold: None });
    m.extend(thresholds.iter().map(|&q| Mode { label: format!("q = {q}"), depth: None, threshold: Some(q) }));
    m
}

/// What a model generated for every item in one mode.
#[derive(Debug, Clone)]
pub struct Answers {
    pub texts: Vec<String>,
    /// Mean loops computed per decoded token (those run late for earlier tokens included), per item.
    pub loops: Vec<f64>,
}

/// How the runner keeps its cache while answering.
#[derive(Debug, Clone, Copy)]
pub struct KvSettings {
    pub kv: KvPolicy,
    pub fill: SkipFill,
    pub dtype: candle_core::DType,
}

/// Greedy answers of `model` to every item in every mode. The model's depth is changed for the
/// fixed-depth modes and put back before returning.
#[allow(clippy::too_many_arguments)]
pub fn answer_all(
    model: &mut OuroModel,
    tok: &tokenizers::Tokenizer,
    chat_template: Option<&str>,
    items: &[TaskItem],
    modes: &[Mode],
    kv: KvSettings,
    progress: &dyn Fn(usize, usize),
) -> anyhow::Result<Vec<Answers>> {
    let loops = model.dims.loops;
    let prompts: Vec<Vec<u32>> = items
        .iter()
        .map(|it| {
            let text = if it.chat { generate::render_chat(chat_template, &it.prompt, it.thinking)? } else { it.prompt.clone() };
            Ok(tok.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing a task prompt: {e}"))?.get_ids().to_vec())
        })
        .collect::<anyhow::Result<_>>()?;
    let (total, mut done) = (modes.len() * items.len(), 0);
    let mut answer = |model: &mut OuroModel| -> anyhow::Result<Vec<Answers>> {
        let mut out = vec![];
        for m in modes {
            model.set_loops(m.depth.unwrap_or(loops))?;
            let mut a = Answers { texts: vec![], loops: vec![] };
            for (it, p) in items.iter().zip(&prompts) {
                let opts = GenerateOptions {
                    max_tokens: it.max_tokens,
                    sampling: Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 },
                    exit_threshold: m.threshold,
                    readout: m.depth.map(|d| ExitMode::Step(d - 1)),
                    kv: kv.kv,
                    kv_fill: kv.fill,
                    kv_dtype: kv.dtype,
                    stop_ids: model.config.stop_token_ids(),
                };
                let g = generate::generate(model, p, &opts, &mut |_| {})?;
                a.texts.push(tok.decode(&g.tokens, true).map_err(|e| anyhow::anyhow!("decoding an answer: {e}"))?);
                // the loops run late for earlier tokens (`--kv-fill compute`) are loops computed too
                a.loops.push(g.stats.mean_loops_per_token + g.stats.mean_caught_up_loops_per_token);
                done += 1;
                progress(done, total);
            }
            out.push(a);
        }
        Ok(out)
    };
    let out = answer(model);
    // the model's own depth back, whatever happened
    model.set_loops(loops)?;
    out
}

/// One mode's results for both models.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub mode: String,
    pub reference_correct: usize,
    pub candidate_correct: usize,
    pub reference_accuracy_pct: f64,
    pub candidate_accuracy_pct: f64,
    pub reference_mean_loops: f64,
    pub candidate_mean_loops: f64,
    /// Items both models answer identically ([`TaskItem::answer_of`]).
    pub answer_agreement_pct: f64,
}

/// One item's answers in the default mode (the report lists those that differ or fail).
#[derive(Debug, Clone, Serialize)]
pub struct ItemOutcome {
    pub prompt: String,
    pub answer: String,
    pub reference: String,
    pub candidate: String,
}

/// The task section of a validation report.
#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    pub file: String,
    pub items: usize,
    pub modes: Vec<ModeResult>,
    /// Default-mode items the two models answer differently (at most 20), with their full texts.
    pub disagreements: Vec<ItemOutcome>,
}

impl TaskReport {
    pub fn new(file: &str, items: &[TaskItem], modes: &[Mode], reference: &[Answers], candidate: &[Answers]) -> TaskReport {
        let n = items.len();
        let pct = |k: usize| 100.0 * k as f64 / n as f64;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let rows = modes
            .iter()
            .zip(reference.iter().zip(candidate))
            .map(|(m, (r, c))| {
                let rc = items.iter().zip(&r.texts).filter(|(it, t)| it.correct(t)).count();
                let cc = items.iter().zip(&c.texts).filter(|(it, t)| it.correct(t)).count();
                let same = items.iter().zip(r.texts.iter().zip(&c.texts)).filter(|(it, (a, b))| it.answer_of(a) == it.answer_of(b)).count();
                ModeResult {
                    mode: m.label.clone(),
                    reference_correct: rc,
                    candidate_correct: cc,
                    reference_accuracy_pct: pct(rc),
                    candidate_accuracy_pct: pct(cc),
                    reference_mean_loops: mean(&r.loops),
                    candidate_mean_loops: mean(&c.loops),
                    answer_agreement_pct: pct(same),
                }
            })
            .collect();
        let d = modes.iter().position(|m| m.label == "default").expect("a default mode");
        let disagreements = items
            .iter()
            .zip(reference[d].texts.iter().zip(&candidate[d].texts))
            .filter(|(it, (a, b))| it.answer_of(a) != it.answer_of(b))
            .take(20)
            .map(|(it, (a, b))| ItemOutcome { prompt: it.prompt.clone(), answer: it.answer.clone(), reference: a.clone(), candidate: b.clone() })
            .collect();
        TaskReport { file: file.to_string(), items: n, modes: rows, disagreements }
    }

    /// The default mode's row.
    pub fn default_mode(&self) -> &ModeResult {
        self.modes.iter().find(|m| m.mode == "default").expect("a default mode")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(answer: &str, matching: Matching) -> TaskItem {
        TaskItem { prompt: "p".into(), answer: answer.into(), chat: false, thinking: false, matching, max_tokens: 8 }
    }

    #[test]
    fn matching_rules() {
        let e = item("Zivaife.", Matching::Exact);
        assert!(e.correct(" Zivaife.\nQ: next"));
        assert!(!e.correct(" Zivaife"));
        assert!(!e.correct("\nZivaife."));
        let c = item("1942", Matching::Contains);
        assert!(c.correct("born in 1942."));
        assert!(!c.correct("born in 1943."));
        let r = item(r"^\s*19\d\d\.", Matching::Regex(regex::Regex::new(r"^\s*19\d\d\.").unwrap()));
        assert!(r.correct(" 1942."));
        assert!(!r.correct(" 2042."));
    }

    #[test]
    fn bad_task_files_are_refused_naming_line_and_key() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            ("{\"prompt\": \"a\"}\n", "2: `answer`"),
            ("{\"prompt\": \"a\", \"answer\": \"b\", \"anwser\": 1}\n", "unknown key `anwser`"),
            ("{\"prompt\": \"a\", \"answer\": \"(\", \"match\": \"regex\"}\n", "not a regular expression"),
            ("{\"prompt\": \"a\", \"answer\": \"b\", \"match\": \"fuzzy\"}\n", "`match` must be"),
            ("{\"prompt\": \"a\", \"answer\": \"b\", \"max_tokens\": 0}\n", "`max_tokens`"),
            ("{\"prompt\": \"a\", \"answer\": \"b\", \"chat\": \"yes\"}\n", "`chat` must be"),
            ("[1, 2]\n", "JSON object"),
            ("not json\n", "not JSON"),
            ("\n\n", "no items"),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let p = d.path().join(format!("t{i}.jsonl"));
            let body = if want.starts_with("2:") { format!("{{\"prompt\": \"x\", \"answer\": \"y\"}}\n{text}") } else { text.to_string() };
            std::fs::write(&p, body).unwrap();
            let e = read_tasks(&p).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(&p.display().to_string()), "{text:?}: {e}");
        }
        let ok = d.path().join("ok.jsonl");
        std::fs::write(&ok, "{\"prompt\": \"a\", \"answer\": \"b\", \"chat\": true, \"match\": \"contains\", \"max_tokens\": 5, \"kind\": \"k\"}\n").unwrap();
        let items = read_tasks(&ok).unwrap();
        assert_eq!((items.len(), items[0].chat, items[0].max_tokens), (1, true, 5));
        assert!(matches!(items[0].matching, Matching::Contains));
    }
}
