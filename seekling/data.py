"""Data: the user's files -> documents -> token shards -> packed batches; SFT samples -> padded batches.

    docs = read_documents(["notes.txt", "web.jsonl", "books.parquet"])
    write_shards((tok.encode(d) for d in docs), "data/shards", eos_id=tok.eos_token_id,
                 vocab_size=tok.vocab_size)
    train = BatchLoader(PackedDataset("data/shards", seq_len=256), batch_size=16)
    batch = next(train)            # {"input_ids": [16, 256], "labels": [16, 256]}

A shard is a flat numpy `.bin` of token ids (uint16 when the vocabulary fits, else uint32), every
document followed by the eos token; `index.json` lists the shards and is written last, so a folder
with an index is complete. `BatchLoader` is the one loader for pretraining and SFT: a seeded
permutation per epoch, rank r of w taking its slice of every global batch, and a cursor
(`state_dict()`) that resumes with exactly the next batch.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seekling.atomic import write_bytes

IGNORE_INDEX = -100  # labels the loss skips (prompt tokens, padding), as in Hugging Face
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


# --- the user's files -> documents ------------------------------------------------------------------


def read_documents(paths: str | Path | Sequence[str | Path], txt_mode: str = "paragraph") -> Iterator[str]:
    """Yield documents from .txt / .jsonl / .parquet files (or folders of them, recursively, sorted).

    `.txt`: one document per blank-line-separated paragraph (`txt_mode="paragraph"`) or per file
    (`"file"`); `.jsonl`: the `"text"` field of each line; `.parquet`: the `text` column.
    A bad file raises ValueError naming the file (and the line), never skipped silently.
    """
    if txt_mode not in ("paragraph", "file"):
        raise ValueError(f"txt_mode must be 'paragraph' or 'file', not {txt_mode!r}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.rglob("*")
                           if p.suffix in TEXT_SUFFIXES and not p.name.startswith("."))
            if not files:
                raise ValueError(f"{path}: folder has no {'/'.join(TEXT_SUFFIXES)} files")
        elif not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        else:
            files = [path]
        for file in files:
            n = 0
            for n, doc in enumerate(_read_file(file, txt_mode), 1):  # noqa: B007 (n counts documents)
                yield doc
            if n == 0:
                raise ValueError(f"{file}: empty file (no documents)")


def _read_file(path: Path, txt_mode: str) -> Iterator[str]:
    if path.suffix == ".txt":
        text = _read_text(path)
        docs = [text] if txt_mode == "file" else re.split(r"\n\s*\n", text)
        yield from (d.strip() for d in docs if d.strip())
    elif path.suffix == ".jsonl":
        for lineno, row in iter_jsonl(path, _read_text(path)):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f'{path}:{lineno}: no "text" string field')
            if row["text"].strip():
                yield row["text"]
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # optional dependency, only needed for parquet input
        except ImportError:
            raise ImportError(f"{path}: reading parquet needs pyarrow "
                              "(pip install 'seekling[parquet]')") from None
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no 'text' column (columns: {pf.schema_arrow.names})")
        row = 0
        for batch in pf.iter_batches(columns=["text"]):
            for value in batch.column(0).to_pylist():
                row += 1
                if not isinstance(value, str):
                    raise ValueError(f"{path}: row {row}: text is {type(value).__name__}, not a string")
                if value.strip():
                    yield value
    else:
        raise ValueError(f"{path}: unknown file type {path.suffix!r} "
                         f"(expected one of {', '.join(TEXT_SUFFIXES)})")


def iter_jsonl(path: str | Path, text: str | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSONL file; a bad line raises a
    ValueError naming the file and the line."""
    text = Path(path).read_text(encoding="utf-8") if text is None else text
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or remove that line") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None


# --- documents -> token shards ------------------------------------------------------------------------


def write_shards(
    token_docs: Iterable[list[int]], out_dir: str | Path, *, eos_id: int, vocab_size: int,
    shard_tokens: int = 1 << 24,
) -> dict:
    """Write tokenized documents as flat shards of `shard_tokens` tokens, each document followed by eos.

    Returns the index (also written to `out_dir/index.json`, last, atomically).
    """
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id={eos_id} is outside the vocabulary (size {vocab_size})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32
    shards: list[dict] = []
    pending: list[np.ndarray] = []
    n_pending = n_docs = 0

    def flush(n: int) -> None:
        nonlocal pending, n_pending
        flat = np.concatenate(pending)
        name = f"shard_{len(shards):05d}.bin"
        write_bytes(out / name, flat[:n].tobytes())
        shards.append({"file": name, "tokens": int(n)})
        pending, n_pending = [flat[n:]], len(flat) - n

    for doc in token_docs:
        ids = np.asarray(doc, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"document {n_docs}: token id out of range [0, {vocab_size})")
        pending.append(np.append(ids, eos_id).astype(dtype))
        n_pending += ids.size + 1
        n_docs += 1
        while n_pending >= shard_tokens:
            flush(shard_tokens)
    if n_pending:
        flush(n_pending)
    if n_docs == 0:
        raise ValueError("write_shards: no documents")
    index = {"dtype": np.dtype(dtype).name, "vocab_size": vocab_size, "eos_id": eos_id, "num_docs": n_docs,
             "num_tokens": sum(s["tokens"] for s in shards), "shards": shards}
    write_bytes(out / "index.json", json.dumps(index, indent=1).encode())
    return index


class PackedDataset:
    """Non-overlapping windows of `seq_len` tokens over the concatenated shards (memory-mapped).

    Windows run across document (and shard) boundaries: pretraining packs, and the eos between
    documents tells the model where one ends.
    """

    def __init__(self, directory: str | Path, seq_len: int):
        index_path = Path(directory) / "index.json"
        if not index_path.exists():
            raise FileNotFoundError(f"{index_path} not found: not a shard folder (or writing did not finish)")
        self.index = json.loads(index_path.read_text())
        self.seq_len = seq_len
        self.shards = [np.memmap(Path(directory) / s["file"], dtype=self.index["dtype"], mode="r")
                       for s in self.index["shards"]]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # global offset of each shard
        self.num_tokens = int(self.starts[-1])
        if len(self) == 0:
            raise ValueError(f"{directory}: {self.num_tokens} tokens, fewer than one window of {seq_len}")

    def __len__(self) -> int:
        return self.num_tokens // self.seq_len

    def __getitem__(self, i: int) -> np.ndarray:
        start, end = i * self.seq_len, (i + 1) * self.seq_len
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < end:  # a window may straddle shard boundaries
            take = min(end, int(self.starts[k + 1])) - start
            off = start - int(self.starts[k])
            parts.append(self.shards[k][off:off + take])
            start, k = start + take, k + 1
        return np.concatenate(parts).astype(np.int64)

    @staticmethod
    def collate(windows: list[np.ndarray]) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.stack(windows))
        return {"input_ids": ids, "labels": ids.clone()}


# --- SFT samples -> padded batches --------------------------------------------------------------------


class SFTDataset:
    """`(ids, loss_mask)` samples (from `tok.encode_sft`); batches are right-padded to the longest sample.

    labels = ids where the mask is 1, else -100 (prompt and padding are not trained on). Samples
    longer than `seq_len` are dropped (or truncated with `truncate=True`); `self.dropped` counts them.
    """

    def __init__(self, samples: Iterable[tuple[list[int], list[int]]], seq_len: int, pad_id: int,
                 truncate: bool = False):
        self.seq_len, self.pad_id = seq_len, pad_id
        self.samples: list[tuple[np.ndarray, np.ndarray]] = []
        self.dropped = total = 0
        for i, (ids, mask) in enumerate(samples):
            total += 1
            if len(ids) != len(mask):
                raise ValueError(f"SFT sample {i}: {len(ids)} ids but {len(mask)} loss-mask values")
            too_long = len(ids) > seq_len
            if too_long and not truncate:
                self.dropped += 1
                continue
            ids, mask = ids[:seq_len], mask[:seq_len]
            # labels[0] is never predicted (the model shifts), so a sample needs a masked token after it
            if not any(mask[1:]):
                if too_long:  # truncation cut off every answer token
                    self.dropped += 1
                    continue
                raise ValueError(f"SFT sample {i}: the loss mask selects no token to train on")
            self.samples.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)))
        if self.dropped:
            how = "truncation left no answer tokens" if truncate else f"longer than seq_len={seq_len}"
            print(f"SFT data: dropped {self.dropped} of {total} samples ({how})")
        if not self.samples:
            raise ValueError(f"SFT data: no usable samples (of {total})")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.samples[i]

    def collate(self, samples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in samples)
        input_ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, mask) in enumerate(samples):
            input_ids[row, :len(ids)] = torch.from_numpy(ids)
            labels[row, :len(ids)] = torch.from_numpy(np.where(mask, ids, IGNORE_INDEX))
        return {"input_ids": input_ids, "labels": labels}


# --- the loader ---------------------------------------------------------------------------------------


class BatchLoader:
    """Endless, deterministic batches over a dataset with `__len__`, `__getitem__` and `collate`.

    Epoch e visits the items in the order of a permutation seeded by (seed, e); global batch b of
    an epoch is items [b·B·w, (b+1)·B·w) of it and rank r takes the r-th slice of B, so w ranks
    with batch B see exactly what one process with batch B·w sees. The last incomplete global batch
    of an epoch is dropped. rank / world_size default to torchrun's RANK / WORLD_SIZE.
    """

    def __init__(self, dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int | None = None, world_size: int | None = None):
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        self.batches_per_epoch = len(dataset) // (batch_size * self.world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"dataset has {len(dataset)} items, fewer than one global batch "
                             f"({batch_size} x {self.world_size} ranks)")
        self.epoch, self.batch = 0, 0  # the cursor: the next batch to yield
        self._order = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"loader state has seed {state['seed']}, this loader {self.seed}")
        self.epoch, self.batch, self._order = state["epoch"], state["batch"], None

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch, self._order = self.epoch + 1, 0, None
        if self._order is None:
            n = len(self.dataset)
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle \
                else np.arange(n)
        start = (self.batch * self.world_size + self.rank) * self.batch_size
        items = [self.dataset[int(i)] for i in self._order[start:start + self.batch_size]]
        self.batch += 1
        return self.dataset.collate(items)
