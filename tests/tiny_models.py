"""Small random-weight models and an offline character tokenizer for tests.

Built from a config in a second or two; the real architectures (Llama,
Qwen2), so the engines run the same code paths as on released models.
"""

from __future__ import annotations

import string

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>"]


def char_tokenizer():
    """A character-level fast tokenizer with a chat template; EOS = <|im_end|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = sorted(set(string.printable))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + characters)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(architecture: str = "llama", seed: int = 0, vocab_size: int | None = None, layers: int = 2):
    """A random-weight causal LM of a real architecture, float32, eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tokenizer = char_tokenizer()
    size = vocab_size or len(tokenizer)
    common = dict(
        vocab_size=size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    config = LlamaConfig(**common) if architecture == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    # Random weights make nearly uniform distributions; a larger output scale
    # gives peaked ones, so greedy decoding has clear winners and real stops.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.eval()
    return model, tokenizer
