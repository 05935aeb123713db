"""Language-modelling data: tokenizers, the bundled byte-level corpora, prepared token shards.

- :mod:`.tokenizers`: one interface over byte, BPE, Hugging Face, SentencePiece and tiktoken
  tokenizers, chosen by a spec string;
- :mod:`.bundled`: :class:`TextDataModule`, the byte-level quickstart data (Wikipedia lead
  sections, Shakespeare or local text, tokenised in memory);
- :mod:`.prepare`: ``ancre prepare``: text sources -> tokenised shards + index + tokenizer + meta;
- :mod:`.shards`: :class:`TokenShardsDataModule`, streams prepared shards.
"""

from .bundled import PackedTokenDataset, TextDataModule
from .shards import TokenShardsDataModule
from .tokenizers import ByteTokenizer, Tokenizer, load_tokenizer, tokenizer_from_state, train_bpe

__all__ = ["ByteTokenizer", "PackedTokenDataset", "TextDataModule", "TokenShardsDataModule", "Tokenizer", "load_tokenizer", "tokenizer_from_state", "train_bpe"]
