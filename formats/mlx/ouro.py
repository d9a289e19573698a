# Ouro looped language model for mlx-lm, shipped by ouro-quant in every MLX output.
#
# mlx-lm has no built-in Ouro architecture; it loads this file when config.json names it as
# "model_file" and the caller passes trust_remote_code=True. The forward pass follows the upstream
# modeling code (see formats/mlx.md in the ouro-quant repository):
#
#   h = embed(tokens)
#   for t in range(total_ut_steps):            # the same layers, looped
#       for i, layer in enumerate(layers):     # KV cache slot t * L + i
#           h = h + input_layernorm_2(attn(input_layernorm(h)))
#           h = h + post_attention_layernorm_2(mlp(post_attention_layernorm(h)))
#       h = norm(h)                            # after every loop; feeds the next loop
#       states[t], gates[t] = h, early_exit_gate(h)
#
# Exit distribution per token: lambda_t = sigmoid(gate_t), p_t = lambda_t * S_t with survival
# S_{t+1} = S_t * (1 - lambda_t), and the last step takes the remaining mass. The returned logits
# are those upstream returns: exit_at_step k if set; else the first loop whose CDF reaches
# early_exit_threshold (the last loop if none); else the p-weighted mix if use_weighted_exit;
# else the last loop.

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import (
    BaseModelArgs,
    create_attention_mask,
    scaled_dot_product_attention,
)
from mlx_lm.models.cache import KVCache


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    rms_norm_eps: float
    vocab_size: int
    rope_theta: float
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    rope_scaling: Optional[Dict[str, Any]] = None
    tie_word_embeddings: bool = False
    total_ut_steps: int = 4
    early_exit_threshold: Optional[float] = 1.0
    exit_at_step: Optional[int] = None
    use_weighted_exit: bool = False

    def __post_init__(self):
        if self.model_type != "ouro":
            raise ValueError(f"ouro.py runs model_type 'ouro', not {self.model_type!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_scaling is not None:
            raise ValueError("Ouro checkpoints use plain RoPE; rope_scaling is not supported")
        if self.total_ut_steps < 1:
            raise ValueError("total_ut_steps must be at least 1")
        if self.exit_at_step is not None and not 0 <= self.exit_at_step < self.total_ut_steps:
            raise ValueError(
                f"exit_at_step {self.exit_at_step} outside 0..{self.total_ut_steps - 1}"
            )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        dim = args.hidden_size
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        # "rotate_half" (first half / second half of each head): MLX's non-traditional RoPE.
        self.rope = nn.RoPE(self.head_dim, traditional=False, base=args.rope_theta)

    def __call__(self, x, mask=None, cache=None):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if cache is not None:
            q = self.rope(q, offset=cache.offset)
            k = self.rope(k, offset=cache.offset)
            k, v = cache.update_and_fetch(k, v)
        else:
            q = self.rope(q)
            k = self.rope(k)
        o = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Sandwich norms: every sublayer's input AND output are normed."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        eps = args.rms_norm_eps
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=eps)
        self.input_layernorm_2 = nn.RMSNorm(args.hidden_size, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=eps)
        self.post_attention_layernorm_2 = nn.RMSNorm(args.hidden_size, eps=eps)

    def __call__(self, x, mask=None, cache=None):
        h = x + self.input_layernorm_2(self.self_attn(self.input_layernorm(x), mask, cache))
        return h + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h)))


class OuroModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.early_exit_gate = nn.Linear(args.hidden_size, 1, bias=True)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        """Returns the per-loop states [T] x [B, L, hidden] and gate logits [T] x [B, L]."""
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        T, n = self.args.total_ut_steps, len(self.layers)
        if cache is None:
            cache = [None] * (T * n)
        # Every slot has seen the same tokens, so one mask serves all of them.
        mask = create_attention_mask(h, cache[0])
        states, gates = [], []
        for t in range(T):
            for i, layer in enumerate(self.layers):
                h = layer(h, mask, cache[t * n + i])
            h = self.norm(h)
            states.append(h)
            gates.append(self.early_exit_gate(h)[..., 0])
        return states, gates


def exit_pdf(gates):
    """Exit distribution [T, B, L] (float32) from the gate logits of each loop."""
    lam = [mx.sigmoid(g.astype(mx.float32)) for g in gates]
    survival = mx.ones_like(lam[0])
    pdf = []
    for t in range(len(gates) - 1):
        pdf.append(lam[t] * survival)
        survival = survival * (1.0 - lam[t])
    pdf.append(survival)
    return mx.stack(pdf, axis=0)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = OuroModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def head(self, h):
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def loop_outputs(self, inputs, cache=None, input_embeddings=None):
        """Every loop's logits [T] x [B, L, vocab] and the exit pdf [T, B, L]."""
        states, gates = self.model(inputs, cache, input_embeddings)
        return [self.head(s) for s in states], exit_pdf(gates)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        a = self.args
        states, gates = self.model(inputs, cache, input_embeddings)
        T = a.total_ut_steps
        if a.exit_at_step is not None:
            return self.head(states[a.exit_at_step])
        pdf = exit_pdf(gates)
        if a.early_exit_threshold is not None:
            reached = mx.cumsum(pdf, axis=0) >= a.early_exit_threshold
            first = mx.argmax(reached.astype(mx.int32), axis=0)
            step = mx.where(mx.any(reached, axis=0), first, T - 1)
            # Choosing the state before lm_head gives the same logits as choosing after it.
            stacked = mx.stack(states, axis=0)
            h = mx.take_along_axis(stacked, step[None, ..., None], axis=0)[0]
            return self.head(h)
        if a.use_weighted_exit:
            out = None
            for t in range(T):
                part = pdf[t][..., None] * self.head(states[t]).astype(mx.float32)
                out = part if out is None else out + part
            return out
        return self.head(states[-1])

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self) -> List[Any]:
        # One cache per (loop, layer), slot t * L + i, as upstream.
        return [KVCache() for _ in range(self.args.total_ut_steps * len(self.model.layers))]

    def sanitize(self, weights):
        # Drop only what is not a parameter of this model: precomputed rotary tables, and
        # lm_head when the embeddings are tied.
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights

    def quant_predicate(self, path, module):
        # Used by mlx_lm.convert: the exit gate (hidden + 1 parameters, one output) stays in float.
        return not path.endswith("early_exit_gate")
