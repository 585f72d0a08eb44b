"""Indexed dataset builder round trip, the token stream, and the three kinds of batches."""

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from paths import TINY_CONFIGS
from dist_memopt.train.batches import BatchMaker, t5_lengths
from dist_memopt.train.config import load_config
from dist_memopt.train.data import ByteTokenizer, TokenStream, build_indexed_dataset, stdlib_files
from dist_memopt.train import build_dataset

DOCS = [b"def f(x):\n    return x + 1\n", "ünïcode – text\n".encode(), b"", b"a" * 1000]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("ds") / "docs"
    build_indexed_dataset(DOCS, prefix)
    return prefix


def test_builder_round_trips_every_document(prefix):
    dataset = IndexedDataset(str(prefix))
    tok = ByteTokenizer()
    assert len(dataset) == len(DOCS)
    for i, doc in enumerate(DOCS):
        tokens = dataset[i]
        assert tokens.dtype == np.uint16 and tokens[-1] == tok.eod
        assert bytes(tokens[:-1].astype(np.uint8)) == doc
    assert list(dataset.document_indices) == list(range(len(DOCS) + 1))


def test_build_dataset_command(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("first document")
    (corpus / "sub" / "b.txt").write_text("second")
    (corpus / "skip.bin").write_bytes(b"\x00")
    assert build_dataset.main(["--input", str(corpus), "--glob", "*.txt", "--output-prefix", str(tmp_path / "out")]) == 0
    assert "2 documents" in capsys.readouterr().out
    stream = TokenStream(tmp_path / "out")
    assert ByteTokenizer().decode(stream.read(0, stream.num_tokens)) == "first documentsecond"
    with pytest.raises(SystemExit):
        build_dataset.main(["--input", str(tmp_path / "nothing"), "--output-prefix", str(tmp_path / "x")])


def test_token_stream_reads_across_documents(prefix):
    stream = TokenStream(prefix)
    everything = np.concatenate([np.append(np.frombuffer(d, np.uint8), ByteTokenizer.eod) for d in DOCS])
    assert stream.num_tokens == len(everything)
    for position, length in [(0, 5), (20, 40), (len(everything) - 7, 7), (0, len(everything))]:
        assert np.array_equal(stream.read(position, length), everything[position : position + length])
    with pytest.raises(IndexError):
        stream.read(len(everything) - 2, 3)


def test_stdlib_corpus_is_deterministic_and_capped():
    files = stdlib_files(200_000)
    assert files == stdlib_files(200_000) and files
    assert sum(f.stat().st_size for f in files) <= 200_000
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    files = stdlib_files(300_000)
    prefix = tmp_path_factory.mktemp("stdlib") / "stdlib"
    build_indexed_dataset((f.read_bytes() for f in files), prefix)
    return TokenStream(prefix)


def _maker(stream, model, rank=0, world_size=1, **overrides):
    sets = [f"{k}={v}" for k, v in overrides.items()]
    return BatchMaker(stream, load_config(TINY_CONFIGS / f"{model}.yaml", sets), rank, world_size)


def test_gpt_batches_are_shifted_windows(stream):
    batch = _maker(stream, "gpt2").make(3, 0)
    assert batch["tokens"].shape == (4, 128)
    assert (batch["tokens"][:, 1:] == batch["labels"][:, :-1]).all()
    assert batch["attention_mask"].shape == (1, 1, 128, 128) and batch["attention_mask"][0, 0, 0, 1]


def test_bert_batches_mask_fifteen_percent(stream):
    batch = _maker(stream, "bert").make(0, 0)
    tok = ByteTokenizer()
    assert (batch["tokens"][:, 0] == tok.cls).all() and (batch["tokens"][:, -1] == tok.sep).all()
    masked = batch["loss_mask"].bool()
    assert (masked.sum(1) == round(0.15 * 126)).all()
    assert not masked[:, 0].any() and not masked[:, -1].any()
    unmasked_same = (batch["tokens"] == batch["labels"]) | masked
    assert unmasked_same.all()
    assert (batch["tokens"][masked] == tok.mask).float().mean() > 0.6


def test_t5_span_corruption_reconstructs_the_text(stream):
    maker = _maker(stream, "t5")
    tok = maker.tokenizer
    lengths = t5_lengths(128, 0.15, 3.0)
    batch = maker.make(2, 0)
    assert batch["encoder_tokens"].shape == (4, 128) and batch["labels"].shape == (4, 32)
    for row, sample in enumerate(maker.samples(2, 0)):
        enc, labels = batch["encoder_tokens"][row].tolist(), batch["labels"][row].tolist()
        assert (batch["decoder_tokens"][row, 1:] == batch["labels"][row, :-1]).all()
        assert int(batch["loss_mask"][row].sum()) == lengths.target
        spans, current = {}, None
        for t in labels[: lengths.target - 1]:
            if t >= tok.sentinel(0):
                current = t
                spans[current] = []
            else:
                spans[current].append(t)
        rebuilt = []
        for t in enc[:-1]:
            rebuilt.extend(spans[t] if t >= tok.sentinel(0) else [t])
        assert rebuilt == maker._window(sample).tolist()
        assert len(spans) == lengths.spans


@pytest.mark.parametrize("model", ["gpt2", "bert", "t5"])
def test_global_batches_do_not_depend_on_the_number_of_ranks(stream, model):
    """Two ranks together see exactly the samples one rank sees (resume and scaling need this)."""
    single = _maker(stream, model, **{"train.global_batch_size": 8})
    one = [single.make(5, m) for m in range(2)]
    two = [_maker(stream, model, rank=r, world_size=2, **{"train.global_batch_size": 8}).make(5, 0) for r in range(2)]
    for key in one[0]:
        if one[0][key].dim() and one[0][key].shape[0] == 4:
            assert all((a[key] == b[key]).all() for a, b in zip(one, two)), key
    again = _maker(stream, model).make(5, 0)
    assert all((again[k] == single.make(5, 0)[k]).all() for k in again)
