"""Builders shared by the reward tests: a character tokenizer with the PRM
marker tokens, and tiny random-weight Qwen2 models built from a config."""

from __future__ import annotations

import string

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<extra_0>"]


def char_tokenizer(extra_words: tuple[str, ...] = ("ки",)):
    """Characters are tokens, so tokenizing pieces and tokenizing the whole
    text agree; the special tokens and ``extra_words`` are single tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = sorted(set(string.printable))
    vocab = {token: i for i, token in enumerate(SPECIALS + list(extra_words) + characters)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<extra_0>"],
    )
    tokenizer.add_tokens(list(extra_words))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _config(tokenizer, **overrides):
    from transformers import Qwen2Config

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return Qwen2Config(**settings)


def token_classifier(tokenizer, seed: int = 0):
    """A random Qwen2 token-classification model with 2 labels (a PRM head)."""
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(seed)
    model = AutoModelForTokenClassification.from_config(
        _config(tokenizer, num_labels=2), dtype=torch.float32, attn_implementation="sdpa"
    )
    with torch.no_grad():
        model.score.weight.mul_(20.0)  # spread the probabilities away from 1/2
    return model.eval()


def causal_lm(tokenizer, seed: int = 0, output_scale: float = 8.0):
    """A random Qwen2 causal LM, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        _config(tokenizer), dtype=torch.float32, attn_implementation="sdpa"
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(output_scale)
    return model.eval()
