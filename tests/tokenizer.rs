//! Tokenizer fidelity: a GGUF file we write tokenizes text exactly as the HF tokenizer it came from,
//! read by llama.cpp's rules and by our own GGUF reader, for each kind of tokenizer we convert.
//!
//! References (none of them our code): `transformers.AutoTokenizer` on the HF directory; a
//! re-implementation of llama.cpp's BPE tokenization driven by the GGUF metadata gguf-py reads
//! (`tests/oracles/tokenize_oracle.py`: the tag's regexes from `llama-vocab.cpp`, byte mapping, merge
//! ranks); and llama.cpp's converter fingerprint (SHA-256 of the check text's ids).

mod common;

use std::path::{Path, PathBuf};

use common::{bin, fixtures};
use ouro_quant::gguf::tokenizer::PreTokenizer;
use ouro_quant::synth::{train_tokenizer_styled, TokenizerStyle};

/// A copy of the trained fixture at `ROOT/model` (outputs go to `ROOT`, beside it).
fn fixture_copy() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let m = root.path().join("model");
    std::fs::create_dir(&m).unwrap();
    for e in std::fs::read_dir(fixtures().join("ouro-tiny-trained")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
    }
    (root, m)
}

fn python() -> String {
    std::env::var("OURO_QUANT_PYTHON").unwrap_or_else(|_| {
        panic!("OURO_QUANT_PYTHON is not set: run scripts/test.sh, which installs transformers and gguf-py into target/oracle-venv")
    })
}

/// Texts with numbers, years, code, Unicode and the chat template.
fn texts() -> Vec<String> {
    let mut t: Vec<String> = [
        "Q: When was Fapai Borai born? A: 1942.\nSum: 8 + 7 + 3 + 5 = 23.",
        "In 1942, 3.14159 of 1,000,000 items cost $12.50 on 2024-03-01; 007 agents and 10000000000 ants.",
        "fn main() {\n    let x: u64 = 0x2A + 42;\n    println!(\"{x:>8}\");\n}\n\tif a<=b && c!=d { return; }  ",
        "naïve café – Zürich 東京 2024年 ١٢٣ ½ x² — «quoted» ‘single’ 👍🏽  I've been 'told, WE'LL see.\n\n\n",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n42<|im_end|><|endoftext|>",
        "<think>\nstep 1: 19 + 23 = 42</think>The answer is 42.<|tool_call|>{\"n\": 3}<extra_special> done",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    t.push(std::fs::read_to_string(fixtures().join("ouro-tiny-trained/validation.txt")).unwrap()[..3000].to_string());
    t
}

/// Replaces `dir/tokenizer.json` with one trained on the fixture's text in `style`, optionally
/// with added tokens (non-special, special, and one that llama.cpp types as control by its text).
fn retokenize(dir: &Path, style: TokenizerStyle, added: bool) {
    let text = std::fs::read_to_string(fixtures().join("ouro-tiny-trained/validation.txt")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let tmp = tempfile::tempdir().unwrap();
    train_tokenizer_styled(tmp.path(), 700, &lines, style).unwrap();
    let mut tok = tokenizers::Tokenizer::from_file(tmp.path().join("tokenizer.json")).unwrap();
    if added {
        use tokenizers::AddedToken;
        tok.add_tokens([AddedToken::from("<think>", false), AddedToken::from("</think>", false), AddedToken::from("<|tool_call|>", false)]).unwrap();
        tok.add_special_tokens([AddedToken::from("<extra_special>", true)]).unwrap();
    }
    tok.save(dir.join("tokenizer.json"), true).unwrap();
}

struct Oracle {
    tag: String,
    hf: Vec<Vec<u32>>,
    llama: Vec<Vec<u32>>,
    hash: String,
    hf_pre_matches: serde_json::Map<String, serde_json::Value>,
}

fn oracle(dir: &Path, gguf: &Path, texts: &[String]) -> Oracle {
    let work = tempfile::tempdir().unwrap();
    let tp = work.path().join("texts.json");
    std::fs::write(&tp, serde_json::to_string(texts).unwrap()).unwrap();
    let out = work.path().join("out.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oracles/tokenize_oracle.py");
    let o = std::process::Command::new(python())
        .arg(&script)
        .arg(dir)
        .arg(gguf)
        .arg(&tp)
        .arg(&out)
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .unwrap();
    assert!(o.status.success(), "oracle failed: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let ids = |k: &str| -> Vec<Vec<u32>> { serde_json::from_value(v[k].clone()).unwrap_or_else(|e| panic!("{k}: {e}: {}", v[k])) };
    Oracle {
        tag: v["tag"].as_str().unwrap().to_string(),
        hf: ids("hf"),
        llama: ids("llama"),
        hash: v["hash"].as_str().unwrap().to_string(),
        hf_pre_matches: v["hf_pre_matches"].as_object().unwrap().clone(),
    }
}

/// Converts `dir` to a Q8_0 GGUF, checks the tag, and compares every tokenization.
fn check(dir: &Path, want: PreTokenizer) -> PathBuf {
    let out = dir.with_extension("gguf");
    bin().args(["convert"]).arg(dir).args(["--type", "Q8_0", "-o"]).arg(&out).assert().success();
    let texts = texts();
    let o = oracle(dir, &out, &texts);

    // The tag is the one llama.cpp's rule gives: its hash table where the hash is known, else the
    // one tag whose regexes split every text as the HF pre-tokenizer does.
    assert_eq!(o.tag, want.tag(), "{}", dir.display());
    match PreTokenizer::ALL.into_iter().find(|p| p.known_hashes().contains(&o.hash.as_str())) {
        Some(p) => assert_eq!(p, want),
        None => {
            let matching: Vec<&String> = o.hf_pre_matches.iter().filter(|(_, m)| m.as_bool() == Some(true)).map(|(k, _)| k).collect();
            assert_eq!(matching, [&want.tag().to_string()], "regex splits equal to HF's");
        }
    }

    let ours_hf = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let ours_gguf = ouro_quant::model::source::load_tokenizer(&out).unwrap();
    for (i, t) in texts.iter().enumerate() {
        let hf = &o.hf[i];
        assert_eq!(&o.llama[i], hf, "llama.cpp's tokenization of the GGUF differs from HF's on text {i}: {t:?}");
        let g = ours_gguf.encode(t.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(&g, hf, "our GGUF reader differs from HF on text {i}: {t:?}");
        let h = ours_hf.encode(t.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(&h, hf, "the tokenizers crate differs from transformers on text {i}");
    }
    // The texts do split differently under the two tags (so equality above means something).
    let digits = |p: PreTokenizer| p.hf_json();
    assert_ne!(digits(PreTokenizer::Gpt2), digits(PreTokenizer::Smollm));
    out
}

#[test]
fn plain_byte_level_fixture_is_gpt2() {
    let (_root, m) = fixture_copy();
    check(&m, PreTokenizer::Gpt2);
}

#[test]
fn smollm2_style_tokenizer_is_smollm() {
    let (_root, m) = fixture_copy();
    retokenize(&m, TokenizerStyle::SmolLm2, false);
    let gguf = check(&m, PreTokenizer::Smollm);
    // A year is one token under gpt-2's split of the fixture and four digits here.
    let tok = ouro_quant::model::source::load_tokenizer(&gguf).unwrap();
    assert_eq!(tok.encode(" 1942", false).unwrap().get_ids().len(), 5);
}

#[test]
fn added_tokens_keep_their_types_and_ids() {
    let (_root, m) = fixture_copy();
    retokenize(&m, TokenizerStyle::ByteLevel, true);
    let gguf = check(&m, PreTokenizer::Gpt2);
    // Types as llama.cpp's converter gives them: special or `<|...|>` -> control (3), other added
    // tokens -> user-defined (4), ids past the tokenizer up to vocab_size -> unused (5).
    let g = ouro_quant::gguf::file::GgufFile::open(&gguf).unwrap();
    let tokens: Vec<String> = g.header.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    let types: Vec<i32> = g
        .header
        .get("tokenizer.ggml.token_type")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| match v {
            ouro_quant::gguf::file::Value::I32(t) => *t,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(tokens.len(), 849);
    let ty = |s: &str| types[tokens.iter().position(|t| t == s).unwrap_or_else(|| panic!("{s} missing"))];
    assert_eq!(ty("<|im_start|>"), 3);
    assert_eq!(ty("<extra_special>"), 3);
    assert_eq!(ty("<|tool_call|>"), 3);
    assert_eq!(ty("<think>"), 4);
    assert_eq!(ty("</think>"), 4);
    assert_eq!(types[848], 5);
}

#[test]
fn synth_release_presets_have_smollm2s_tokenizer_and_tiny_plain_byte_level() {
    let tmp = tempfile::tempdir().unwrap();
    for (preset, want) in [("tiny", PreTokenizer::Gpt2), ("ouro-1.4b", PreTokenizer::Smollm)] {
        let out = tmp.path().join(preset);
        bin().args(["synth", "--preset", preset, "--layers", "1", "--dtype", "bf16", "-o"]).arg(&out).assert().success();
        let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer.json")).unwrap()).unwrap();
        assert_eq!(j["pre_tokenizer"], want.hf_json(), "{preset}");
        for (id, s) in [(0, "<|endoftext|>"), (1, "<|im_start|>"), (2, "<|im_end|>")] {
            assert_eq!(j["added_tokens"][id]["content"], s);
            assert_eq!(j["added_tokens"][id]["id"], id);
        }
        let cfg: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
        let vocab = if preset == "tiny" { 384 } else { 49152 };
        let (_, info) = ouro_quant::gguf::tokenizer::tokenizer_metadata(&out.join("tokenizer.json"), vocab, Some(&cfg)).unwrap();
        assert_eq!(info.pre, want, "{preset}");
    }
}

#[test]
fn a_pre_tokenizer_without_a_tag_is_refused_by_name() {
    let (root, m) = fixture_copy();
    let p = m.join("tokenizer.json");
    let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    // A Llama-3-style split (numbers in runs of up to three) has no tag we can write.
    j["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]});
    std::fs::write(&p, serde_json::to_string(&j).unwrap()).unwrap();
    let out = root.path().join("x.gguf");
    let o = bin().args(["convert"]).arg(&m).args(["--type", "Q8_0", "-o"]).arg(&out).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tokenizer.json") && err.contains("Sequence[Split, ByteLevel]") && err.contains("smollm"), "{err}");
    assert!(!out.exists());
}

#[test]
fn an_added_token_outside_the_vocabulary_is_refused() {
    let (root, m) = fixture_copy();
    let p = m.join("tokenizer.json");
    let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    j["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({
        "id": 5000, "content": "<late>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    std::fs::write(&p, serde_json::to_string(&j).unwrap()).unwrap();
    let out = root.path().join("x.gguf");
    let o = bin().args(["convert"]).arg(&m).args(["--type", "Q8_0", "-o"]).arg(&out).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("<late>") && err.contains("outside the model's vocabulary of 849"), "{err}");
    assert!(!out.exists());
}
