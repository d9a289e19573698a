//! Where the model's weights come from. Each source hands the model dense or quantized matrices
//! by HF tensor name; the model code does not know which.

use candle_core::quantized::QMatMul;
use candle_core::{Device, Tensor};

use crate::checkpoint::{Checkpoint, OuroConfig};

/// A provider of Ouro weights by HF name.
pub trait WeightSource {
    fn config(&self) -> &OuroConfig;
    /// A projection `[out, in]` ready for `x @ W^T`, and the bytes it occupies.
    fn linear(&self, hf_name: &str, device: &Device) -> anyhow::Result<(QMatMul, u64)>;
    /// A vector (norm gain, gate weight or bias) as f32.
    fn vector(&self, hf_name: &str, device: &Device) -> anyhow::Result<Tensor>;
    /// The token embedding `[vocab, hidden]` as f32.
    fn embedding(&self, device: &Device) -> anyhow::Result<Tensor>;
}

/// Weights of an HF checkpoint, widened to f32 (exact for BF16 and F16).
pub struct HfSource {
    pub checkpoint: Checkpoint,
}

impl HfSource {
    fn f32_tensor(&self, name: &str, device: &Device) -> anyhow::Result<Tensor> {
        let t = self.checkpoint.tensor(name)?;
        Ok(Tensor::from_vec(t.to_f32(), t.shape(), device)?)
    }
}

impl WeightSource for HfSource {
    fn config(&self) -> &OuroConfig {
        &self.checkpoint.config
    }
    fn linear(&self, hf_name: &str, device: &Device) -> anyhow::Result<(QMatMul, u64)> {
        let w = self.f32_tensor(hf_name, device)?;
        let bytes = (w.elem_count() * 4) as u64;
        Ok((QMatMul::Tensor(w), bytes))
    }
    fn vector(&self, hf_name: &str, device: &Device) -> anyhow::Result<Tensor> {
        Ok(self.f32_tensor(hf_name, device)?.flatten_all()?)
    }
    fn embedding(&self, device: &Device) -> anyhow::Result<Tensor> {
        self.f32_tensor("model.embed_tokens.weight", device)
    }
}

/// A model ready to run with what generation needs besides the weights.
pub struct LoadedModel {
    pub model: super::OuroModel,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    pub chat_template: Option<String>,
    /// What was loaded, for messages.
    pub description: String,
}

/// Loads a model from an HF checkpoint directory.
pub fn load(path: &std::path::Path, device: &Device) -> anyhow::Result<LoadedModel> {
    if path.is_dir() && path.join("config.json").is_file() {
        let checkpoint = Checkpoint::open(path)?;
        let tokenizer = match &checkpoint.tokenizer.tokenizer_json {
            Some(_) => Some(checkpoint.tokenizer.load()?),
            None => None,
        };
        let chat_template = checkpoint.tokenizer.chat_template().map(str::to_string);
        let description = format!("HF checkpoint {} ({})", path.display(), checkpoint.dtype());
        let src = HfSource { checkpoint };
        let model = super::OuroModel::load(&src, device)?;
        return Ok(LoadedModel {
            model,
            tokenizer,
            chat_template,
            description,
        });
    }
    anyhow::bail!(
        "{}: not an HF Ouro checkpoint directory (config.json missing); GGUF and MLX model sources are not readable by this build yet",
        path.display()
    )
}
