"""Data sources: activation files (lazy chunks, errors naming the file), the shuffled stream
(deterministic, position-addressable, every row once per epoch) and synthetic features."""

import numpy as np
import pytest
import torch

from fastsae.training import ActivationFiles, ShuffledStream, SyntheticActivations, mean_max_cosine, save_activations
from fastsae.training.data import _ranges, open_source


def _rows(n, d, offset=0):
    # Row i is constant-free and identifiable: its first column holds i + offset.
    x = torch.randn(n, d)
    x[:, 0] = torch.arange(offset, offset + n, dtype=torch.float32)
    return x


def test_safetensors_file_is_read_in_chunks(tmp_path):
    x = _rows(1000, 7)
    path = save_activations(tmp_path / "acts.safetensors", x)
    src = ActivationFiles(path, chunk_rows=300)
    assert src.d_in == 7
    assert src.chunk_sizes == [300, 300, 300, 100]
    assert torch.equal(torch.cat([src.load_chunk(i) for i in range(4)]), x)
    assert torch.equal(open_source(src.describe()).load_chunk(3), x[900:])


def test_npy_is_memory_mapped_and_converted_to_float32(tmp_path, monkeypatch):
    x = _rows(500, 5).double().numpy()
    np.save(tmp_path / "acts.npy", x)
    modes = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: modes.append(k.get("mmap_mode")) or real_load(*a, **k))
    src = ActivationFiles(tmp_path / "acts.npy", chunk_rows=128)
    chunk = src.load_chunk(1)
    assert chunk.dtype == torch.float32 and chunk.shape == (128, 5)
    assert torch.equal(chunk, torch.from_numpy(x[128:256]).float())
    assert modes and all(m == "r" for m in modes)  # never loaded whole


def test_folder_of_mixed_shards_in_name_order(tmp_path):
    a, b = _rows(100, 4), _rows(50, 4, offset=100)
    save_activations(tmp_path / "shard_0.safetensors", a)
    np.save(tmp_path / "shard_1.npy", b.numpy())
    (tmp_path / "notes.txt").write_text("ignored")
    src = ActivationFiles(tmp_path, chunk_rows=64)
    assert src.chunk_sizes == [64, 36, 50]
    assert torch.equal(torch.cat([src.load_chunk(i) for i in range(3)]), torch.cat([a, b]))


def test_bad_files_name_the_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"other": torch.zeros(3, 4)}, str(tmp_path / "wrong_key.safetensors"))
    with pytest.raises(ValueError, match=r"wrong_key.safetensors.*'activations'.*other"):
        ActivationFiles(tmp_path / "wrong_key.safetensors")
    np.save(tmp_path / "flat.npy", np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError, match=r"flat.npy.*2-D.*\(10,\)"):
        ActivationFiles(tmp_path / "flat.npy")
    np.save(tmp_path / "ints.npy", np.zeros((4, 4), dtype=np.int32))
    with pytest.raises(ValueError, match=r"ints.npy.*floating"):
        ActivationFiles(tmp_path / "ints.npy")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"junk.safetensors"):
        ActivationFiles(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        ActivationFiles(tmp_path / "missing.npy")

    folder = tmp_path / "mixed"
    save_activations(folder / "a.safetensors", torch.zeros(5, 8))
    save_activations(folder / "b.safetensors", torch.zeros(5, 9))
    with pytest.raises(ValueError, match=r"b.safetensors: expected width 8.*got 9"):
        ActivationFiles(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .safetensors or .npy shards"):
        ActivationFiles(tmp_path / "empty")


def test_stream_visits_every_row_once_per_epoch_shuffled(tmp_path):
    n = 1000
    src = ActivationFiles(save_activations(tmp_path / "a.safetensors", _rows(n, 3)), chunk_rows=64)
    stream = ShuffledStream(src, seed=3, buffer_rows=200)
    epoch0 = stream.read(0, n)[:, 0].long()
    epoch1 = stream.read(n, n)[:, 0].long()
    assert sorted(epoch0.tolist()) == list(range(n)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, torch.arange(n)) and not torch.equal(epoch0, epoch1)
    # Rows are mixed across chunks, not just chunks reordered.
    assert (epoch0[:200] // 64).unique().numel() > 2


def test_stream_is_a_function_of_seed_and_position(tmp_path):
    src = ActivationFiles(save_activations(tmp_path / "a.safetensors", _rows(777, 3)), chunk_rows=50)
    a = ShuffledStream(src, seed=1, buffer_rows=120)
    whole = a.read(0, 2000)  # crosses epoch boundaries
    b = ShuffledStream(src, seed=1, buffer_rows=120)
    pieces = [b.read(p, 97) for p in range(1500, 2000, 97)]  # out of order, fresh stream
    assert torch.equal(torch.cat(pieces)[:500], whole[1500:2000])
    assert torch.equal(b.read(3, 10), whole[3:13])
    other = ShuffledStream(src, seed=2, buffer_rows=120).read(0, 777)
    assert not torch.equal(other, whole[:777])


def test_stream_reads_into_a_given_tensor_across_buffers_of_uneven_size(tmp_path):
    # Buffers share one reused memory: rows of a buffer are taken before the next one loads.
    src = ActivationFiles(save_activations(tmp_path / "a.safetensors", _rows(700, 3)), chunk_rows=64)
    stream = ShuffledStream(src, seed=5, buffer_rows=150)  # 3 buffers of ~190 rows, then one of ~60
    whole = stream.read(0, 1400)
    assert sorted(whole[:700, 0].long().tolist()) == list(range(700))
    out = torch.full((450, 3), float("nan"))
    assert stream.read(600, 450, out=out) is out
    assert torch.equal(out, whole[600:1050])


@pytest.mark.parametrize("stop", [1, 150, 451, 700, 1300])
def test_chunks_read_are_the_chunks_the_stream_loads(tmp_path, monkeypatch, stop):
    src = ActivationFiles(save_activations(tmp_path / "a.safetensors", _rows(700, 3)), chunk_rows=64)  # 11 chunks
    loaded = []
    original = ActivationFiles.load_chunk
    monkeypatch.setattr(ActivationFiles, "load_chunk", lambda self, index: loaded.append(index) or original(self, index))
    stream = ShuffledStream(src, seed=5, buffer_rows=150)
    for position in range(0, stop, 50):
        stream.read(position, min(50, stop - position))
    assert stream.chunks_read(stop) == sorted(set(loaded))
    assert (len(stream.chunks_read(stop)) == 11) == (stop >= 700)  # less than an epoch leaves some chunks unread
    with pytest.raises(ValueError, match="expected stop >= 0, got -1"):
        stream.chunks_read(-1)


def test_non_finite_values_are_counted_exactly():
    from fastsae.training.prefetch import count_non_finite

    x = torch.randn(64, 8)
    assert count_non_finite(x) == 0
    big = torch.full((4, 4), 3e38)  # finite values whose sum overflows: still none counted
    assert count_non_finite(big) == 0 and count_non_finite(-big) == 0
    x[3, 1], x[7, 2], x[9, 0], x[9, 5] = float("nan"), float("inf"), float("inf"), float("-inf")
    assert count_non_finite(x) == 4
    assert count_non_finite(torch.empty(0, 8)) == 0


def test_synthetic_source_is_reproducible_and_sparse():
    src = SyntheticActivations(d_in=16, n_features=64, l0=3, n_rows=5000, seed=4, chunk_rows=1000)
    again = SyntheticActivations(d_in=16, n_features=64, l0=3, n_rows=5000, seed=4, chunk_rows=1000)
    assert torch.equal(src.load_chunk(2), again.load_chunk(2))
    assert not torch.equal(src.load_chunk(2), src.load_chunk(3))
    assert torch.allclose(src.features.norm(dim=1), torch.ones(64))
    codes = src.sample_codes(20000, torch.Generator().manual_seed(0))
    assert abs((codes > 0).sum(1).float().mean().item() - 3) < 0.1
    assert open_source(src.describe()).features.equal(src.features)


def test_mean_max_cosine_scores_decoders():
    features = torch.nn.functional.normalize(torch.randn(10, 8), dim=1)
    perm = torch.randperm(10)
    decoder = torch.cat([features[perm] * 3.0, torch.randn(5, 8)])  # scaled, shuffled, extra rows
    assert mean_max_cosine(decoder, features) == pytest.approx(1.0, abs=1e-12)
    half = decoder.clone()
    half[:10][perm < 5] = -features[perm][perm < 5]  # half the features only found with the wrong sign
    assert mean_max_cosine(half[:10], features) < 0.8
    with pytest.raises(ValueError, match="W_dec"):
        mean_max_cosine(torch.zeros(4, 3), features)


def test_stream_rows_map_back_to_their_file_and_row(tmp_path):
    # Two shards of uneven size; each row's first column is its (shard, row) label.
    save_activations(tmp_path / "a.safetensors", _rows(700, 4, offset=0))
    np.save(tmp_path / "b.npy", _rows(530, 4, offset=10_000).numpy())
    src = ActivationFiles(tmp_path, chunk_rows=128)
    stream = ShuffledStream(src, seed=3, buffer_rows=300)
    per_epoch = stream.rows_per_epoch
    positions = list(range(0, per_epoch, 7)) + [per_epoch - 1, per_epoch, 2 * per_epoch + 11]
    for p in positions:
        label = int(stream.read(p, 1)[0, 0])
        path, row = src.row_origin(*stream.origin(p))
        assert (path, row) == ((str(tmp_path / "a.safetensors"), label) if label < 10_000
                               else (str(tmp_path / "b.npy"), label - 10_000)), p


def test_describe_rows_names_files_rows_and_stream_range(tmp_path):
    x = _rows(600, 3)
    np.save(tmp_path / "acts.npy", x.numpy())
    src = ActivationFiles(tmp_path / "acts.npy", chunk_rows=100)
    stream = ShuffledStream(src, seed=0, buffer_rows=200)
    batch = stream.read(250, 40)
    offsets = [0, 5, 6, 39]
    labels = sorted(int(batch[o, 0]) for o in offsets)
    text = stream.describe_rows(250, offsets)
    assert text == f"{tmp_path / 'acts.npy'} rows {_ranges(labels)} (stream rows 250..289)"
    assert _ranges([3, 7, 8, 9, 12]) == "3, 7..9, 12"
    assert _ranges(list(range(0, 40, 2)), limit=3) == "0, 2, 4 and 17 more"
