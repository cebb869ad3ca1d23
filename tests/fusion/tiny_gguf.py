"""Write a tiny random Llama model as a GGUF file with the ``gguf`` package (the tests' stand-in for a real one).

llama.cpp stores Q and K projections with their rotary halves interleaved; transformers undoes that when it
reads a GGUF, so the writer applies the same permutation and the converted model equals the original.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from fusion.models import LanguageModel

_LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaving of the rotary halves of each head's rows."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_tiny_gguf(model: LanguageModel, path: Path, chat_template: str | None = None) -> Path:
    """Write a Llama-architecture ``LanguageModel`` (e.g. ``tiny-llama``) and its byte-level tokenizer as GGUF."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(model.head_dim)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    tok = model.tokenizer
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    specials = set(tok.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    writer.add_token_scores([0.0] * len(vocab))  # no merges: transformers derives them from scores (none here)
    writer.add_token_merges([])
    writer.add_bos_token_id(tok.eos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
    state = {k: v.detach().float().numpy() for k, v in model.model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, name in _LAYER_TENSORS.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if name == "attn_q":
                w = _permute(w, cfg.num_attention_heads)
            elif name == "attn_k":
                w = _permute(w, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def same_logits(a: LanguageModel, b: LanguageModel, text: str) -> bool:
    """Whether two models give the same next-token logits for ``text`` (up to float noise)."""
    la = a.prefill(text).logits
    lb = b.prefill(text).logits
    return bool(torch.allclose(la, lb, atol=1e-4, rtol=1e-4))


def tiny_kit_spec(root: Path):
    """A real-kit spec on two tiny GGUF models written under ``root`` (two devices each; a few steps): the real
    kit's build and benchmarks in seconds. Call it with ``FEDREFINE_HOME`` set where the conversions may go."""
    from fusion.models import LanguageModel
    from ops.real.kit import RealSpec
    from ops.real.world import NotesSpec

    a = LanguageModel.load("tiny-llama")
    b = LanguageModel.load("tiny-llama")
    b.model.model.norm.weight.data.mul_(2.0)  # another model, another fingerprint
    models = {"m1": str(write_tiny_gguf(a, root / "m1.gguf")), "m2": str(write_tiny_gguf(b, root / "m2.gguf"))}
    return RealSpec(
        notes=NotesSpec(num_entities=40),
        devices={"a1": "m1", "a2": "m1", "b1": "m2", "b2": "m2"},
        models=models,
        train_questions=16,
        steps=2,
        batch_size=4,
        gate_steps=2,
        held_out=4,
    )
