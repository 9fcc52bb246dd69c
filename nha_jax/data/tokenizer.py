"""Tokenizers behind one small interface: byte-level (built in), Hugging Face tokenizer.json, SentencePiece .model.

Every tokenizer has `.vocab_size`, `.bos_id`, `.eos_id`, `.pad_id`, `.fingerprint` (a hash that changes whenever the
token ids could change), `encode(str) -> list[int]`,
`encode_batch(list[str]) -> list[np.ndarray]` (int32) and `decode(list[int]) -> str`. BOS/EOS are never added by
`encode`; `encode_documents` adds them per the data config so every caller (training, prepare_data, tests) agrees.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as tokens. Ids: 0 = pad, 1 = BOS, 2 = EOS, 3 + b for byte b; vocab_size 259 (stable forever)."""

    pad_id, bos_id, eos_id = 0, 1, 2
    _byte_offset = 3
    vocab_size = 256 + _byte_offset
    fingerprint = hashlib.sha256(b"nha-jax byte-level tokenizer v1: pad=0 bos=1 eos=2 byte=b+3").hexdigest()

    def encode_array(self, text: str) -> np.ndarray:
        """text -> int32 [n] token ids (one per UTF-8 byte)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self._byte_offset

    def encode(self, text: str) -> list[int]:
        """text -> list of n token ids (one per UTF-8 byte)."""
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts -> one int32 [n_i] array each."""
        return [self.encode_array(text) for text in texts]

    def decode(self, ids) -> str:
        """Token ids -> text; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        ids = np.asarray(ids, dtype=np.int64)
        byte_ids = ids[(ids >= self._byte_offset) & (ids < self.vocab_size)] - self._byte_offset
        return byte_ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _file_fingerprint(kind: str, path: Path) -> str:
    return hashlib.sha256(kind.encode() + b"\0" + path.read_bytes()).hexdigest()


class HuggingFaceTokenizer:
    """A `tokenizers` tokenizer.json. Special tokens are looked up by name (config or common defaults)."""

    _default_names = {
        "bos": ("<s>", "<|begin_of_text|>", "<|endoftext|>", "[CLS]", "<bos>"),
        "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "[SEP]", "<eos>"),
        "pad": ("<pad>", "[PAD]", "<|pad|>"),
    }

    def __init__(self, path: Path, *, bos_token: str = "", eos_token: str = "", pad_token: str = ""):
        try:
            import tokenizers
        except ImportError as error:
            raise ImportError(
                f"data.tokenizer={str(path)!r} needs the `tokenizers` package: pip install 'nha-jax[data]'"
            ) from error
        self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special_id("bos", bos_token, path)
        self.eos_id = self._special_id("eos", eos_token, path)
        pad = self._special_id("pad", pad_token, path, required=False)
        # Pad only ever sits where loss_mask is 0, so any id works when the vocabulary has no pad token.
        self.pad_id = self.eos_id if pad is None else pad
        self.fingerprint = _file_fingerprint("huggingface", path)

    def _special_id(self, role: str, name: str, path: Path, required: bool = True) -> int | None:
        candidates = (name,) if name else self._default_names[role]
        for candidate in candidates:
            token_id = self._tokenizer.token_to_id(candidate)
            if token_id is not None:
                return token_id
        if required:
            raise ValueError(
                f"tokenizer {path} has none of the {role.upper()} tokens {candidates}; "
                f"set data.{role}_token to the name of its {role.upper()} token"
            )
        return None

    def encode(self, text: str) -> list[int]:
        """text -> list of n token ids, no special tokens added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts -> one int32 [n_i] array each (tokenized in parallel by the Rust library)."""
        encodings = self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)  # no offsets: ~1.5x faster
        return [np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings]

    def decode(self, ids) -> str:
        """Token ids -> text (special tokens skipped)."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


class SentencePieceTokenizer:
    """A SentencePiece .model (e.g. the Llama-2 32k vocabulary); BOS/EOS/pad ids come from the model itself."""

    def __init__(self, path: Path):
        try:
            import sentencepiece
        except ImportError as error:
            raise ImportError(
                f"data.tokenizer={str(path)!r} needs the `sentencepiece` package: pip install 'nha-jax[data]'"
            ) from error
        self._processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._processor.get_piece_size()
        self.bos_id = self._processor.bos_id()
        self.eos_id = self._processor.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"SentencePiece model {path} has no BOS or EOS piece; train it with bos_id/eos_id >= 0")
        pad = self._processor.pad_id()
        # Llama-2's model has no pad piece; pad only sits where loss_mask is 0, so EOS serves.
        self.pad_id = self.eos_id if pad < 0 else pad
        self.fingerprint = _file_fingerprint("sentencepiece", path)

    def encode(self, text: str) -> list[int]:
        """text -> list of n token ids, no BOS/EOS."""
        return self._processor.encode(text)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts -> one int32 [n_i] array each."""
        return [np.asarray(ids, dtype=np.int32) for ids in self._processor.encode(texts)]

    def decode(self, ids) -> str:
        """Token ids -> text."""
        return self._processor.decode([int(i) for i in ids])


def build_tokenizer(data_cfg):
    """The tokenizer named by `data_cfg.tokenizer`: "byte", a path to tokenizer.json, or a path to a .model file."""
    spec = str(data_cfg.tokenizer)
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"data.tokenizer={spec!r}: no such file; use 'byte' or a path to a tokenizer.json or SentencePiece .model"
        )
    if path.suffix == ".json":
        return HuggingFaceTokenizer(
            path,
            bos_token=data_cfg.get("bos_token", ""),
            eos_token=data_cfg.get("eos_token", ""),
            pad_token=data_cfg.get("pad_token", ""),
        )
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise ValueError(
        f"data.tokenizer={spec!r}: unknown tokenizer file type {path.suffix!r}; expected .json (Hugging Face) or "
        ".model (SentencePiece)"
    )


def encode_documents(tokenizer, texts: list[str], *, add_bos: bool, add_eos: bool) -> list[np.ndarray]:
    """Documents -> int32 [n_i] ids each, BOS/EOS added as configured: the one place deciding a document's tokens."""
    bos = [tokenizer.bos_id] if add_bos else []
    eos = [tokenizer.eos_id] if add_eos else []
    return [np.concatenate([np.asarray(bos, np.int32), body, np.asarray(eos, np.int32)])
            for body in tokenizer.encode_batch(texts)]


def encode_document(tokenizer, text: str, *, add_bos: bool, add_eos: bool) -> np.ndarray:
    """One document -> int32 [n] ids, BOS/EOS added as configured (see encode_documents)."""
    return encode_documents(tokenizer, [text], add_bos=add_bos, add_eos=add_eos)[0]
