//! `synth`: random-weight Ouro checkpoints in exactly the HF layout and names of the released models,
//! for tests and benchmarks without downloads.
//!
//! Deterministic for a seed whatever the thread count: every tensor is cut into fixed chunks, and
//! each chunk has its own generator seeded from (seed, tensor index, chunk index). Tensors stream to
//! disk chunk by chunk, so a full-size preset never holds more than a few chunks in memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::checkpoint::{expected_tensors, OuroConfig};
use crate::error::{Error, IoContext, Result};
use crate::output::PendingOutput;
use crate::stfile::{DType, TensorSpec, Writer};

/// Model shapes `synth` can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// 2 layers, hidden 256, intermediate 256, GQA (4 heads, 2 kv heads), vocab 384: about 1 M parameters.
    Tiny,
    /// The shapes of ByteDance/Ouro-1.4B (24 layers).
    #[value(name = "ouro-1.4b")]
    Ouro1_4b,
    /// The shapes of ByteDance/Ouro-2.6B (48 layers).
    #[value(name = "ouro-2.6b")]
    Ouro2_6b,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub preset: Preset,
    pub layers: Option<usize>,
    pub seed: u64,
    pub dtype: DType,
    pub shards: usize,
}

/// The config.json of a preset, with the keys the released checkpoints carry.
pub fn preset_config(preset: Preset, layers: Option<usize>) -> Value {
    let (vocab, hidden, inter, n_layers, heads, kv, max_pos) = match preset {
        Preset::Tiny => (384, 256, 256, 2, 4, 2, 2048),
        Preset::Ouro1_4b => (49152, 2048, 5632, 24, 16, 16, 65536),
        Preset::Ouro2_6b => (49152, 2048, 5632, 48, 16, 16, 65536),
    };
    let n_layers = layers.unwrap_or(n_layers);
    json!({
        "architectures": ["OuroForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_ouro.OuroConfig",
            "AutoModel": "modeling_ouro.OuroModel",
            "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"
        },
        "bos_token_id": 0,
        "eos_token_id": 0,
        "head_dim": hidden / heads,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "layer_types": vec!["full_attention"; n_layers],
        "max_position_embeddings": max_pos,
        "max_window_layers": n_layers,
        "model_type": "ouro",
        "num_attention_heads": heads,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": kv,
        "rms_norm_eps": 1e-6,
        "rope_scaling": null,
        "rope_theta": 1000000.0,
        "sliding_window": null,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "total_ut_steps": 4,
        "early_exit_threshold": 1.0,
        "transformers_version": "4.55.0",
        "use_cache": true,
        "use_sliding_window": false,
        "vocab_size": vocab
    })
}

/// The ChatML template of the Ouro (SmolLM2) tokenizer_config.json, without the default system turn.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Elements per independently seeded chunk.
const CHUNK: usize = 1 << 20;

/// SplitMix64: small, fast, and good enough for random weights and for sampling.
pub(crate) struct SplitMix(pub(crate) u64);
impl SplitMix {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// How a tensor's values are drawn: `mean + std * z`, z approximately standard normal.
#[derive(Clone, Copy)]
struct Dist {
    mean: f32,
    std: f32,
}

fn dist_for(name: &str) -> Dist {
    if name.ends_with("layernorm.weight") || name.ends_with("layernorm_2.weight") || name == "model.norm.weight" {
        Dist { mean: 1.0, std: 0.1 }
    } else if name == "model.early_exit_gate.bias" {
        Dist { mean: 0.0, std: 0.5 }
    } else {
        Dist { mean: 0.0, std: 0.02 }
    }
}

/// Fills one chunk's bytes. z is an Irwin-Hall sum of four 16-bit uniforms, rescaled to unit
/// variance: cheap and smooth, which is all random weights need.
fn fill_chunk(seed: u64, dist: Dist, dtype: DType, n: usize, out: &mut Vec<u8>) {
    let mut rng = SplitMix(seed);
    let scale = 3f32.sqrt() / 65536.0;
    out.clear();
    out.reserve(n * dtype.size());
    let mut i = 0;
    while i < n {
        let r = rng.next();
        let s = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
        let z = (s as f32 - 2.0 * 65535.5) * scale;
        let v = dist.mean + dist.std * z;
        match dtype {
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            _ => out.extend_from_slice(&v.to_le_bytes()),
        }
        i += 1;
    }
}

fn mix(a: u64, b: u64) -> u64 {
    SplitMix(a ^ b.wrapping_mul(0xD6E8_FEB8_6659_FD93)).next()
}

/// Writes a random checkpoint to `out` (a directory that must not exist unless `force`).
pub fn synth(opts: &SynthOptions, out: &Path, force: bool, progress: &dyn Fn(u64, u64)) -> Result<PathBuf> {
    if !matches!(opts.dtype, DType::BF16 | DType::F16 | DType::F32) {
        return Err(Error::Usage(format!("--dtype {} is not a weight dtype", opts.dtype)));
    }
    if opts.shards == 0 {
        return Err(Error::Usage("--shards must be at least 1".into()));
    }
    if opts.layers == Some(0) {
        return Err(Error::Usage("--layers must be at least 1".into()));
    }
    let mut cfg_json = preset_config(opts.preset, opts.layers);
    cfg_json["torch_dtype"] = json!(match opts.dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    });
    let cfg = OuroConfig::from_map(
        cfg_json.as_object().expect("object").clone(),
        Path::new("config.json"),
    )?;
    let pending = PendingOutput::dir(out, force)?;
    let dir = pending.path().to_path_buf();

    let cfg_text = serde_json::to_string_pretty(&cfg_json).expect("json") + "\n";
    std::fs::write(dir.join("config.json"), cfg_text).at(dir.join("config.json"))?;
    write_tokenizer(&dir, cfg.vocab_size, opts.preset)?;

    // Tensors sorted by name, as the reference writer orders tensors of one dtype.
    let mut specs: Vec<TensorSpec> = expected_tensors(&cfg)
        .into_iter()
        .map(|e| TensorSpec {
            name: e.name,
            dtype: opts.dtype,
            shape: e.shape,
        })
        .collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    if opts.shards > specs.len() {
        return Err(Error::Usage(format!(
            "--shards {}: this model has {} tensors, and a shard holds at least one",
            opts.shards,
            specs.len()
        )));
    }
    let total: u64 = specs.iter().map(|s| s.nbytes() as u64).sum();
    let shards = split_shards(&specs, opts.shards);
    let n_shards = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut done = 0u64;
    let threads = rayon::current_num_threads().max(1);
    for (si, shard) in shards.iter().enumerate() {
        let fname = if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, n_shards)
        };
        let path = dir.join(&fname);
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        // Lets `--force` recognise the directory as ours (output::is_our_directory).
        meta.insert(crate::output::SYNTH_MARK.to_string(), opts.seed.to_string());
        let mut w = Writer::new(&path, shard.clone(), &meta)?;
        for spec in shard {
            weight_map.insert(spec.name.clone(), fname.clone());
            let ti = specs.iter().position(|s| s.name == spec.name).expect("spec") as u64;
            let dist = dist_for(&spec.name);
            let numel: usize = spec.shape.iter().product();
            let chunks = numel.div_ceil(CHUNK);
            // A few chunks per thread at a time: bounded memory, byte-identical order.
            for batch in (0..chunks).collect::<Vec<_>>().chunks(threads * 2) {
                let bufs: Vec<Vec<u8>> = batch
                    .par_iter()
                    .map(|&c| {
                        let n = CHUNK.min(numel - c * CHUNK);
                        let mut buf = Vec::new();
                        fill_chunk(mix(mix(opts.seed, ti), c as u64), dist, opts.dtype, n, &mut buf);
                        buf
                    })
                    .collect();
                for b in &bufs {
                    w.write(b)?;
                    done += b.len() as u64;
                }
                progress(done, total);
            }
        }
        w.finish()?;
    }
    if n_shards > 1 {
        let params: u64 = specs.iter().map(|s| s.shape.iter().product::<usize>() as u64).sum();
        let index = json!({
            "metadata": {"total_size": total, "total_parameters": params},
            "weight_map": weight_map,
        });
        let p = dir.join("model.safetensors.index.json");
        std::fs::write(&p, serde_json::to_string_pretty(&index).expect("json") + "\n").at(&p)?;
    }
    // Verify what was written before it becomes visible.
    crate::checkpoint::Checkpoint::open(&dir)?;
    pending.commit()
}

/// Cuts the tensor list into `n` runs of roughly equal bytes (fewer if there are fewer tensors).
fn split_shards(specs: &[TensorSpec], n: usize) -> Vec<Vec<TensorSpec>> {
    let total: usize = specs.iter().map(|s| s.nbytes()).sum();
    let per = total.div_ceil(n.max(1)).max(1);
    let mut out: Vec<Vec<TensorSpec>> = vec![vec![]];
    let mut acc = 0usize;
    for s in specs {
        if acc >= per && out.len() < n {
            out.push(vec![]);
            acc = 0;
        }
        acc += s.nbytes();
        out.last_mut().expect("non-empty").push(s.clone());
    }
    out
}

/// Text the synthetic tokenizer is trained on (our own words).
const TOKENIZER_TEXT: &str = "\
A looped language model runs the same stack of layers several times for every token. \
After each pass it asks a small gate whether it has thought enough; if so, it stops and speaks. \
The first pass reads the words, the second relates them, the third and fourth check the answer. \
Numbers such as 12, 345 and 6789 are counted, added, compared and written out again. \
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. \
She was born in 1987 in Lisbon and works as an engineer at a company that builds bridges. \
He moved to Oslo in 2003, studied music, and now teaches the piano to children on Saturdays. \
Question: who is older, the engineer or the teacher? Answer: the teacher, born two years earlier. \
To convert a model, read its weights, quantize each matrix in blocks, write the file, and verify it. \
Memory is precious on a small machine: eight bits per weight halves it, four bits quarters it. \
<|im_start|>user\nWhat is two plus three?<|im_end|>\n<|im_start|>assistant\nTwo plus three is five.<|im_end|>\n";

/// Trains a byte-level BPE on [`TOKENIZER_TEXT`] with the Ouro special tokens at ids 0, 1, 2, and
/// writes `tokenizer.json` and `tokenizer_config.json`. The released presets get the structure of
/// the released tokenizer (SmolLM2's: digits split one by one, then byte-level), `tiny` plain
/// byte-level, so that both pre-tokenizers a GGUF file can name are exercised.
fn write_tokenizer(dir: &Path, vocab_size: usize, preset: Preset) -> Result<()> {
    let lines: Vec<&str> = TOKENIZER_TEXT.split(". ").collect();
    let style = match preset {
        Preset::Tiny => TokenizerStyle::ByteLevel,
        Preset::Ouro1_4b | Preset::Ouro2_6b => TokenizerStyle::SmolLm2,
    };
    train_tokenizer_styled(dir, vocab_size.min(3 + 256 + 400), &lines, style)
}

/// The pre-tokenizer structure of a trained tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerStyle {
    /// `ByteLevel` with GPT-2's split (llama.cpp's `gpt-2`).
    ByteLevel,
    /// SmolLM2's, as the released Ouro checkpoints have it: `Sequence[Digits(individual_digits),
    /// ByteLevel]` with a `ByteLevel` post-processor (llama.cpp's `smollm`).
    SmolLm2,
}

/// Trains a byte-level BPE of `vocab_size` tokens on `lines` with the Ouro special tokens
/// (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>` at ids 0, 1, 2), and writes `tokenizer.json` and a
/// `tokenizer_config.json` with the ChatML template into `dir`.
pub fn train_tokenizer(dir: &Path, vocab_size: usize, lines: &[&str]) -> Result<()> {
    train_tokenizer_styled(dir, vocab_size, lines, TokenizerStyle::ByteLevel)
}

/// [`train_tokenizer`] with the given pre-tokenizer structure.
pub fn train_tokenizer_styled(dir: &Path, vocab_size: usize, lines: &[&str], style: TokenizerStyle) -> Result<()> {
    use tokenizers::decoders::DecoderWrapper;
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::{ModelWrapper, TrainerWrapper};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::normalizers::NormalizerWrapper;
    use tokenizers::pre_tokenizers::PreTokenizerWrapper;
    use tokenizers::processors::PostProcessorWrapper;
    use tokenizers::{AddedToken, Tokenizer, TokenizerImpl};

    let specials: Vec<AddedToken> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    let target = vocab_size;
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(target)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tok: TokenizerImpl<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > =
        TokenizerImpl::new(ModelWrapper::BPE(BPE::default()));
    match style {
        TokenizerStyle::ByteLevel => {
            tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
        TokenizerStyle::SmolLm2 => {
            use tokenizers::pre_tokenizers::digits::Digits;
            use tokenizers::pre_tokenizers::sequence::Sequence;
            tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ]))));
            tok.with_post_processor(Some(ByteLevel::new(true, false, true)));
        }
    }
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    let p = dir.join("tokenizer.json");
    tok.train(&mut trainer, lines.iter())
        .map_err(|e| Error::file(&p, format!("training the synthetic tokenizer failed: {e}")))?;
    let tok: Tokenizer = tok.into();
    tok.save(&p, true)
        .map_err(|e| Error::file(&p, format!("cannot write tokenizer: {e}")))?;

    let tc = json!({
        "add_prefix_space": false,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 65536,
        "tokenizer_class": "GPT2Tokenizer",
        "clean_up_tokenization_spaces": false,
        "chat_template": CHATML_TEMPLATE,
    });
    let p = dir.join("tokenizer_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&tc).expect("json") + "\n").at(&p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_parameter_counts() {
        let p = |preset| {
            OuroConfig::from_map(
                preset_config(preset, None).as_object().unwrap().clone(),
                Path::new("config.json"),
            )
            .unwrap()
            .parameter_count()
        };
        assert_eq!(p(Preset::Ouro1_4b), 1_434_652_673);
        assert_eq!(p(Preset::Ouro2_6b), 2_667_974_657);
    }

    #[test]
    fn chunks_are_thread_independent_and_roughly_normal() {
        let mut a = vec![];
        fill_chunk(42, Dist { mean: 0.0, std: 1.0 }, DType::F32, 100_000, &mut a);
        let v: Vec<f32> = a.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((var - 1.0).abs() < 0.03, "{var}");
    }
}
