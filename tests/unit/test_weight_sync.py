"""Engine-agnostic weight sync: bucketing, flat buffers, version and checksum checks, disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlrt_megatron.rollout.weight_sync import (
    WeightMismatch,
    WeightVersionMismatch,
    bucket_named_tensors,
    bucket_spec,
    check_weight_version,
    compare_checksums,
    compare_probes,
    flatten_bucket,
    param_probe,
    sample_param_names,
    tensor_checksum,
    tensor_nbytes,
    unflatten_bucket,
    write_hf_checkpoint,
)


def _stream(sizes, dtypes=None):
    dtypes = dtypes or [torch.float32] * len(sizes)
    for i, (n, dt) in enumerate(zip(sizes, dtypes, strict=True)):
        yield f"p{i}", torch.full((n,), float(i), dtype=dt)


@pytest.mark.parametrize("bucket_bytes", [1, 64, 100, 400, 4096])
def test_buckets_hold_every_tensor_once_in_order_within_bounds(bucket_bytes):
    sizes = [3, 10, 1, 50, 7, 7, 7, 25, 2, 100, 4]  # float32: 4 bytes each
    buckets = list(bucket_named_tensors(_stream(sizes), bucket_bytes))
    names = [n for b in buckets for n, _ in b]
    assert names == [f"p{i}" for i in range(len(sizes))]  # each once, order kept
    for b in buckets:
        total = sum(tensor_nbytes(t) for _, t in b)
        assert total <= bucket_bytes or len(b) == 1  # only an oversized tensor may exceed
    # greedy packing: no two neighbouring buckets could have been merged
    totals = [sum(tensor_nbytes(t) for _, t in b) for b in buckets]
    firsts = [tensor_nbytes(b[0][1]) for b in buckets]
    for i in range(len(buckets) - 1):
        assert totals[i] + firsts[i + 1] > bucket_bytes or totals[i] >= bucket_bytes


def test_bucket_counts_exact():
    sizes = [25, 25, 25, 25, 100, 10]  # bytes: 100,100,100,100,400,40
    buckets = list(bucket_named_tensors(_stream(sizes), 200))
    assert [[n for n, _ in b] for b in buckets] == [["p0", "p1"], ["p2", "p3"], ["p4"], ["p5"]]
    assert [len(b) for b in bucket_named_tensors(_stream(sizes), 10**9)] == [6]


def test_split_by_dtype_and_errors():
    stream = _stream([2, 2, 2, 2], [torch.float32, torch.float32, torch.bfloat16, torch.float32])
    buckets = list(bucket_named_tensors(stream, 1000, split_by_dtype=True))
    assert [[n for n, _ in b] for b in buckets] == [["p0", "p1"], ["p2"], ["p3"]]
    with pytest.raises(ValueError, match="appears twice"):
        list(bucket_named_tensors([("a", torch.ones(1)), ("a", torch.ones(1))], 10))
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(bucket_named_tensors([], 0))


def test_bucketing_streams_lazily():
    pulled = []

    def gen():
        for i in range(6):
            pulled.append(i)
            yield f"p{i}", torch.zeros(25)  # 100 bytes

    it = bucket_named_tensors(gen(), 200)
    assert [n for n, _ in next(it)] == ["p0", "p1"]
    assert pulled == [0, 1]  # never reads ahead of the bucket being filled


def test_flatten_round_trip_is_bit_exact_for_mixed_dtypes():
    g = torch.Generator().manual_seed(0)
    bucket = [
        ("w", torch.randn(3, 5, generator=g).to(torch.bfloat16)),
        ("n", torch.randn(7, generator=g)),
        ("h", torch.randn(2, 2, 2, generator=g).half()),
        ("i", torch.arange(5)),
        ("t", torch.randn(4, 6, generator=g).t()),  # non-contiguous
    ]
    flat, metas = flatten_bucket(bucket)
    raw = sum(tensor_nbytes(t) for _, t in bucket)
    assert flat.dtype == torch.uint8 and raw <= flat.numel() < raw + 16 * len(bucket)
    assert all(m.offset % 16 == 0 for m in metas)
    back = unflatten_bucket(flat, metas)
    for (n1, a), (n2, b) in zip(bucket, back, strict=True):
        assert n1 == n2 and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    spec = bucket_spec(bucket)
    assert spec["names"] == ["w", "n", "h", "i", "t"]
    assert spec["dtypes"] == ["bfloat16", "float32", "float16", "int64", "float32"]
    assert spec["shapes"] == [[3, 5], [7], [2, 2, 2], [5], [6, 4]]


def test_version_check():
    check_weight_version(3, "3", "server 0")
    with pytest.raises(WeightVersionMismatch, match="server 1 reports weight_version='2'.*3"):
        check_weight_version(3, "2", "server 1")
    with pytest.raises(WeightVersionMismatch, match="'default'"):
        check_weight_version(1, "default", "server 0")


def test_sample_names_deterministic_and_cover_ends():
    names = [f"n{i}" for i in range(20)]
    a = sample_param_names(names, 5, seed=1)
    assert a == sample_param_names(names, 5, seed=1) and len(a) == 5
    assert a[0] == "n0" and a[-1] == "n19" and a == sorted(a, key=names.index)
    assert sample_param_names(names, 50) == names and sample_param_names(names, 0) == []


def test_probe_and_checksum_detect_a_corrupted_tensor():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 6, generator=g).to(torch.bfloat16)
    probe = param_probe(w, 3)
    assert probe.shape == (3, 6) and probe.dtype == torch.float32
    assert compare_probes("w", probe, probe.tolist()) == 0.0
    bad = w.clone()
    bad[1, 2] += 0.5
    with pytest.raises(WeightMismatch, match=r"w differs.*max \|diff\|"):
        compare_probes("w", probe, param_probe(bad, 3).tolist())
    # a TP-sharded server returns only its first shard's columns: the prefix is compared
    assert compare_probes("w", probe, probe[:, :3].tolist()) == 0.0
    with pytest.raises(WeightMismatch, match="shape"):
        compare_probes("w", probe, probe[:2].tolist())
    nan = probe.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(WeightMismatch):
        compare_probes("w", probe, nan.tolist())

    c = tensor_checksum(w)
    compare_checksums("w", c, tensor_checksum(w.clone()))
    with pytest.raises(WeightMismatch, match="checksum"):
        compare_checksums("w", c, tensor_checksum(bad))
    swapped = w.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # same values, wrong place: the weighted sum catches it
    with pytest.raises(WeightMismatch, match="weighted_sum"):
        compare_checksums("w", c, tensor_checksum(swapped))


def test_write_hf_checkpoint_shards_and_index(tmp_path):
    from safetensors.torch import load_file

    template = tmp_path / "tmpl"
    template.mkdir()
    (template / "config.json").write_text("{}")
    (template / "tokenizer.json").write_text("{}")
    (template / "model-00001-of-00001.safetensors").write_text("x")
    named = [(f"layer{i}.weight", torch.full((64,), float(i))) for i in range(5)]  # 256 B each
    out = write_hf_checkpoint(iter(named), str(tmp_path / "ckpt"), template_dir=str(template),
                              shard_bytes=600)  # fmt: skip
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 256
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    loaded = {}
    for f in files:
        loaded.update(load_file(f"{out}/{f}"))
    assert sorted(loaded) == sorted(n for n, _ in named)
    assert all(torch.equal(loaded[n], t) for n, t in named)
    assert (tmp_path / "ckpt" / "tokenizer.json").exists()
    assert not (tmp_path / "ckpt.tmp").exists()


def test_probe_rounds_through_the_engine_dtype():
    """fp32 trainer weights vs a bf16 engine: compare after the same rounding, exactly."""
    w = torch.tensor([[1.0 + 2**-10, 3.0], [0.1, -7.25]])
    engine_side = w.to(torch.bfloat16).float()[:1].tolist()
    assert compare_probes("w", param_probe(w, 1, torch.bfloat16), engine_side) == 0.0
    with pytest.raises(WeightMismatch):
        compare_probes("w", param_probe(w, 1), engine_side)  # unrounded: 2**-10 apart
    ids = torch.arange(4)
    assert param_probe(ids, 2, torch.bfloat16).tolist() == [0.0, 1.0]  # ints are not cast


def test_logprob_agreement_check():
    from rlrt_megatron.rollout.weight_sync import check_logprob_agreement

    g = torch.Generator().manual_seed(0)
    train = -torch.rand(4, 6, generator=g) * 3
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2, 3:] = False
    close = train + 0.005 * torch.randn(4, 6, generator=g)
    out = check_logprob_agreement(train, close, mask)
    assert out["logprob_abs_diff_mean"] < 0.01 and out["logprob_abs_diff_max"] < 0.05
    stale = train.clone()
    stale[:, :2] += 2.0  # e.g. a layer the sync skipped
    with pytest.raises(WeightMismatch, match="mean \\|diff\\|"):
        check_logprob_agreement(train, stale, mask)
    junk = train.clone()
    junk[2, 3:] = 100.0  # masked positions are ignored
    assert check_logprob_agreement(train, junk, mask)["logprob_abs_diff_max"] == 0.0
    assert check_logprob_agreement(train, junk, torch.zeros_like(mask))["logprob_diff_mean"] == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(64, 8, generator=g).to(torch.bfloat16),  # 8-byte words
        lambda g: torch.randn(64, generator=g).to(torch.bfloat16)[
            1:7
        ],  # offset 2 bytes: words of 2
        lambda g: torch.tensor([True, False, True]),  # 3 bytes: words of 1
        lambda g: torch.zeros(0, 4),  # empty
        lambda g: torch.tensor(2.5),  # 0-d
    ],
)
def test_flatten_is_exact_for_every_word_size(make):
    g = torch.Generator().manual_seed(0)
    bucket = [("a", torch.randn(8, generator=g)), ("x", make(g)), ("b", torch.arange(6))]
    flat, metas = flatten_bucket(bucket)
    assert [m.offset for m in metas] == sorted(m.offset for m in metas)
    assert all(m.offset % 16 == 0 for m in metas)
    for (n1, a), (n2, b) in zip(bucket, unflatten_bucket(flat, metas), strict=True):
        assert n1 == n2 and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_weight_sync_benchmark_moves_the_bytes_it_reports(tmp_path):
    """benchmarks/weight_sync.py on CPU, tiny: every row's output is byte-checked inside."""
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "ws.json"
    cmd = [sys.executable, str(repo / "benchmarks" / "weight_sync.py"), "--device", "cpu",
           "--layers", "1", "--vocab", "512", "--repeats", "1", "--json", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(repo)})  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    result = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(result) == 1
    fields = dict(kv.split("=", 1) for kv in result[0].split()[1:])
    assert {"copy_gbps", "flatten_bucket_vs_copy", "flatten_load_vs_copy"} <= set(fields)
    data = json.loads(out.read_text())
    assert data["copies"]["flatten + load"] == 2 and data["bytes"] > 0
