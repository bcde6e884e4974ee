import json

import numpy as np
import pytest
import torch

from seekling.data import IGNORE_INDEX, BatchLoader, PackedDataset, SFTDataset, read_documents, write_shards


def random_docs(n, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, size=rng.integers(1, 40)).tolist() for _ in range(n)]


def test_shards_round_trip_across_shards(tmp_path):
    docs = random_docs(50, 300)
    index = write_shards(iter(docs), tmp_path, eos_id=1, vocab_size=300, shard_tokens=97)
    stream = [t for d in docs for t in d + [1]]
    assert index["num_tokens"] == len(stream) and index["num_docs"] == 50
    assert len(index["shards"]) == -(-len(stream) // 97)
    assert json.loads((tmp_path / "index.json").read_text()) == index
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries
    on_disk = np.concatenate([np.fromfile(tmp_path / s["file"], dtype=np.uint16) for s in index["shards"]])
    assert on_disk.tolist() == stream

    ds = PackedDataset(tmp_path, seq_len=64)  # 64 does not divide 97: windows straddle shards
    assert len(ds) == len(stream) // 64
    for i in range(len(ds)):
        assert ds[i].tolist() == stream[i * 64:(i + 1) * 64]
    batch = PackedDataset.collate([ds[0], ds[1]])
    assert batch["input_ids"].dtype == torch.long and torch.equal(batch["input_ids"], batch["labels"])


def test_shards_dtype_and_errors(tmp_path):
    index = write_shards([[70000, 5]], tmp_path / "big", eos_id=0, vocab_size=70001)
    assert index["dtype"] == "uint32"
    assert PackedDataset(tmp_path / "big", 3)[0].tolist() == [70000, 5, 0]
    with pytest.raises(ValueError, match="out of range"):
        write_shards([[1, 2, 400]], tmp_path / "bad", eos_id=1, vocab_size=300)
    with pytest.raises(ValueError, match="no documents"):
        write_shards([], tmp_path / "empty", eos_id=1, vocab_size=300)
    with pytest.raises(FileNotFoundError, match="index.json"):
        PackedDataset(tmp_path / "nowhere", 8)
    with pytest.raises(ValueError, match="fewer than one window"):
        PackedDataset(tmp_path / "big", 8)


def test_loader_deterministic_resumable_and_sharded(tmp_path):
    write_shards(random_docs(80, 500), tmp_path, eos_id=1, vocab_size=500, shard_tokens=200)
    ds = PackedDataset(tmp_path, 16)
    loader = BatchLoader(ds, 4, seed=3, rank=0, world_size=1)
    first = [next(loader)["input_ids"] for _ in range(loader.batches_per_epoch + 3)]  # into epoch 2
    # one epoch visits every window exactly once, in a seeded order
    seen = torch.cat(first[:loader.batches_per_epoch])
    assert len({tuple(r) for r in seen.tolist()}) == loader.batches_per_epoch * 4

    # resume from a saved cursor continues with exactly the next batches (also across the epoch edge)
    for k in (2, loader.batches_per_epoch - 1):
        a = BatchLoader(ds, 4, seed=3, rank=0, world_size=1)
        for _ in range(k):
            next(a)
        state = json.loads(json.dumps(a.state_dict()))  # the cursor is a small JSON-able dict
        b = BatchLoader(ds, 4, seed=3, rank=0, world_size=1)
        b.load_state_dict(state)
        for j in range(k, k + 3):
            assert torch.equal(next(b)["input_ids"], first[j])
    with pytest.raises(ValueError, match="seed"):
        BatchLoader(ds, 4, seed=4).load_state_dict(state)

    # two ranks with batch 2 see disjoint halves of what one process with batch 4 sees
    r0, r1 = (BatchLoader(ds, 2, seed=3, rank=r, world_size=2) for r in (0, 1))
    for j in range(loader.batches_per_epoch + 2):
        assert torch.equal(torch.cat([next(r0)["input_ids"], next(r1)["input_ids"]]), first[j])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchLoader(ds, len(ds), world_size=2, rank=0)


def test_sft_padding_masks_and_overflow(capsys):
    samples = [([5, 6, 7, 8], [0, 0, 1, 1]), ([9, 10, 11], [0, 1, 1]),
               (list(range(2, 20)), [0] * 9 + [1] * 9)]
    ds = SFTDataset(samples, seq_len=8, pad_id=0)
    assert len(ds) == 2 and ds.dropped == 1
    assert "dropped 1 of 3" in capsys.readouterr().out
    batch = ds.collate([ds[0], ds[1]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    X = IGNORE_INDEX
    assert batch["labels"].tolist() == [[X, X, 7, 8], [X, 10, 11, X]]

    # truncation keeps the prefix; a sample whose answer is cut off entirely is dropped
    kept = SFTDataset(samples + [(list(range(2, 20)), [0] * 17 + [1])], seq_len=12, pad_id=0, truncate=True)
    assert len(kept) == 3 and kept.dropped == 1 and kept[2][0].tolist() == list(range(2, 14))

    with pytest.raises(ValueError, match="sample 0: 2 ids but 3"):
        SFTDataset([([1, 2], [0, 1, 1])], 8, 0)
    with pytest.raises(ValueError, match="selects no token"):
        SFTDataset([([1, 2, 3], [1, 0, 0])], 8, 0)


def test_sft_loader_batches_have_labels():
    samples = [([i, i + 1, i + 2], [0, 1, 1]) for i in range(10, 30)]
    batch = next(BatchLoader(SFTDataset(samples, 8, pad_id=0), 5, rank=0, world_size=1))
    assert batch["input_ids"].shape == (5, 3)
    assert (batch["labels"][:, 0] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][:, 1:], batch["input_ids"][:, 1:])


def test_read_documents_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nline two\n\n\n  second para  \n")
    (tmp_path / "b.jsonl").write_text('{"text": "json doc"}\n\n{"text": "another", "id": 3}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["pq one", "pq two"], "n": [1, 2]}), tmp_path / "c.parquet")
    assert list(read_documents(tmp_path / "a.txt")) == ["first para\nline two", "second para"]
    whole = ["first para\nline two\n\n\n  second para"]
    assert list(read_documents(tmp_path / "a.txt", txt_mode="file")) == whole
    assert list(read_documents([tmp_path / "b.jsonl", tmp_path / "c.parquet"])) == [
        "json doc", "another", "pq one", "pq two"]
    assert len(list(read_documents(tmp_path))) == 6  # a folder: its files, sorted


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"bad.jsonl:2: invalid JSON"),
    ("nofield.jsonl", '{"text": "ok"}\n\n{"body": "x"}\n', r'nofield.jsonl:3: no "text"'),
    ("notes.md", "hello", r"notes.md: unknown file type '.md'"),
    ("empty.txt", "\n\n  \n", r"empty.txt: empty file"),
    ("latin.txt", b"caf\xe9", r"latin.txt: not UTF-8"),
])
def test_read_documents_errors_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        list(read_documents(path))


def test_read_documents_missing_and_parquet_without_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(read_documents(tmp_path / "missing.txt"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"d.parquet: no 'text' column \(columns: \['body'\]\)"):
        list(read_documents(tmp_path / "d.parquet"))
