"""Tiny Hugging Face models built offline (random weights) for the tests that read a transformer."""

import torch


def save_tiny_bert(folder, words, hidden_size: int = 24, num_hidden_layers: int = 3):
    """A BERT with a word-level vocabulary `words` (special tokens first), saved with its tokenizer
    into `folder`; seeded, so every call builds the same weights. Returns `folder`."""
    from transformers import BertConfig, BertModel, BertTokenizer

    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                        num_attention_heads=2, intermediate_size=48, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


def save_tiny_gpt2(folder, words, width: int = 24, n_layer: int = 2, activation: str = "gelu_new"):
    """A GPT-2 (random weights, seeded) with a word-level BERT tokenizer over `words`, saved into
    `folder`; `activation`: its MLP's ("relu" makes the MLP exactly a ReLU transcoder). Returns `folder`."""
    from transformers import BertTokenizer, GPT2Config, GPT2LMHeadModel

    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(words), n_embd=width, n_layer=n_layer, n_head=2, n_positions=64,
                        activation_function=activation)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder
