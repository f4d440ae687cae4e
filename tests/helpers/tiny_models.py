"""Tiny Hugging Face models built offline (random weights) for the tests that read a transformer."""

import torch

# A word-level vocabulary (special tokens first) and three short documents over it, for the tests
# that run a tiny model on text (evals, transcoders' evals).
CODE_WORDS = ("[PAD] [UNK] [CLS] [SEP] [MASK] the a of to and is in it for def class return print import from with as "
              "if else while . , ( ) : = x y value list name ##s").split()
CODE_DOCS = ["the value of x is in the list . def name ( x ) : return x",
             "import list from the class , print the name of the value",
             "while x : if y : print ( x ) else : return the list of values"]


def write_corpus(folder, repeats: int = 6):
    """CODE_DOCS, `repeats` times, as one text file in `folder`; returns its path."""
    path = folder / "corpus.txt"
    path.write_text(" ".join(CODE_DOCS * repeats))
    return path


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
