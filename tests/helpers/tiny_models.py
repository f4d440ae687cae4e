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
