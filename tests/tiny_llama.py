"""Tiny random LLaMA models for fast tests: in memory, as a GGUF file, and as an HF folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ropekit.model import LlamaConfig, LlamaModel

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTE_ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())
TOKENS = SPECIALS + BYTE_ALPHABET  # 259 tokens: byte-level BPE without merges


def tiny_config(rope: dict | None = None, **changes) -> LlamaConfig:
    """A 2-layer GQA model (4 query heads, 2 KV heads, head_dim 16) over the 259-token byte vocabulary."""
    hf = dict(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
              rms_norm_eps=2.0**-16, tie_word_embeddings=False,  # exact in float32, as GGUF stores it
              rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0})
    hf.update(changes)
    return LlamaConfig.from_hf(hf)


def tiny_model(seed: int = 0, **changes) -> LlamaModel:
    """A random ``LlamaModel`` (weights ~ N(0, 0.1^2), norms ~ 1 +- 0.1), eval mode."""
    torch.manual_seed(seed)
    model = LlamaModel(tiny_config(**changes)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if name.endswith("layernorm.weight") or name == "norm.weight" else 0.0, 0.1)
    return model


def tiny_backend_tokenizer() -> Tokenizer:
    """Byte-level BPE over the tiny vocabulary (what the tokenizer.json of the HF folder holds)."""
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(TOKENS)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    return backend


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``: HF "half" rows -> interleaved rows."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


_GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def gguf_name(name: str) -> str:
    """Our parameter name -> llama.cpp's tensor name."""
    top = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    _, index, rest = name.split(".", 2)  # layers.{i}.{module}.weight
    module = rest.rsplit(".", 1)[0]
    return f"blk.{index}.{_GGUF_NAMES[module]}.weight"


def write_gguf(path: Path, model: LlamaModel, *, qtype: str = "F32", architecture: str = "llama",
               rope_scaling: dict | None = None, merges: list[str] | None = None) -> Path:
    """Write ``model`` as llama.cpp would: llama.* metadata, gpt2 tokenizer, permuted q/k, qtype matrices.
    ``merges``: BPE merges to store (llama.cpp refuses a gpt2 vocabulary without any)."""
    import gguf
    from gguf.quants import quantize

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope.rope_theta)
    writer.add_rope_dimension_count(cfg.rope.rotary_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    for key, value in (rope_scaling or {}).items():
        getattr(writer, f"add_rope_scaling_{key}")(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * len(BYTE_ALPHABET))
    writer.add_token_merges(merges or [])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                             "<|im_end|>\n{% endfor %}"
                             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    qt = gguf.GGMLQuantizationType[qtype]
    for name, tensor in model.state_dict().items():
        values = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            values = llama_cpp_permute(values, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            values = llama_cpp_permute(values, cfg.num_key_value_heads)
        if values.ndim == 2 and qtype != "F32":
            writer.add_tensor(gguf_name(name), quantize(values, qt), raw_dtype=qt)
        else:
            writer.add_tensor(gguf_name(name), values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_hf_folder(folder: Path, model: LlamaModel) -> Path:
    """Save ``model`` as a transformers checkpoint folder with a tokenizer.json; returns the folder."""

    folder.mkdir(parents=True, exist_ok=True)
    reference = to_transformers(model)
    reference.save_pretrained(folder)
    tiny_backend_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def to_transformers(model: LlamaModel):
    """A transformers ``LlamaForCausalLM`` with the same config and weights (the independent reference)."""
    import transformers

    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf())).eval()
    state = {(k if k.startswith("lm_head") else "model." + k): v for k, v in model.state_dict().items()}
    reference.load_state_dict(state, strict=True)
    return reference
