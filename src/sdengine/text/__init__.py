"""Tokenizers: CLIP BPE (shipped vocabulary) and BERT WordPiece (all-MiniLM-L6-v2)."""

from sdengine.text.bert_tokenizer import BertBatch, BertTokenizer, MiniLMFiles, find_minilm_files
from sdengine.text.clip_tokenizer import (
    BOS_TOKEN_ID,
    CHUNK_LENGTH,
    CONTEXT_LENGTH,
    EOS_TOKEN_ID,
    SD1_PAD_TOKEN_ID,
    SD2_PAD_TOKEN_ID,
    CLIPTokenizer,
    TokenChunk,
    chunk_tokens,
)

__all__ = [
    "BOS_TOKEN_ID",
    "CHUNK_LENGTH",
    "CONTEXT_LENGTH",
    "EOS_TOKEN_ID",
    "SD1_PAD_TOKEN_ID",
    "SD2_PAD_TOKEN_ID",
    "BertBatch",
    "BertTokenizer",
    "CLIPTokenizer",
    "MiniLMFiles",
    "TokenChunk",
    "chunk_tokens",
    "find_minilm_files",
]
