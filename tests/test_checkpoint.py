"""checkpoint.py: sharded safetensors read by hand, checked against safetensors' own loader on real files (one written
by a tiny transformers Qwen3 model with save_pretrained), zero-copy and copy-on-write, unit gathers, alignment of
several checkpoints, streaming with read-ahead, and a one-line CheckpointError for every bad input."""
import ctypes
import gc
import hashlib
import importlib.metadata
import json
import mmap
import os
import shutil
import struct
import sys
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lpt_kernels.checkpoint import streaming as ckmod  # the read-ahead lives there
from lpt_kernels.checkpoint import Alignment, Checkpoint, CheckpointError, TensorInfo, align, stream

# --------------------------------------------------------------------------------------------------------------
# helpers


def _reference(path):
    """{name: tensor} read by safetensors' own loader from every .safetensors file under path."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    out = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def _assert_matches_reference(ck, path):
    ref = _reference(path)
    assert sorted(ck.names) == sorted(ref) and len(ck) == len(ref)
    for n, r in ref.items():
        t = ck.tensor(n)
        info = ck.info(n)
        assert n in ck
        assert t.dtype == r.dtype == info.dtype, n
        assert tuple(t.shape) == tuple(r.shape) == info.shape, n
        assert info.end - info.start == r.numel() * r.element_size()
        assert torch.equal(t, r), n
    assert ck.nbytes == sum(r.numel() * r.element_size() for r in ref.values())


def _sha(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(8 << 20), b""):
            h.update(b)
    return h.hexdigest()


def _rss_anon_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    pytest.fail("no RssAnon in /proc/self/status")


def _mapping_of(ptr):
    """The path of the mapping holding address ptr ('' for anonymous memory), from /proc/self/maps."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5].strip() if len(parts) > 5 else ""
    pytest.fail(f"address {ptr:#x} is in no mapping")


def _raw_file(path, header, data=b"", hlen=None):
    """A safetensors file written by hand (for corrupt variants)."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if hlen is None else hlen))
        f.write(h)
        f.write(data)
    return str(path)


def _err(path_or_fn):
    with pytest.raises(CheckpointError) as ei:
        path_or_fn() if callable(path_or_fn) else Checkpoint(path_or_fn)
    msg = str(ei.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    return msg


def _mixed_tensors(gen):
    return {
        "w.bf16": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "w.f16": torch.randn(3, 9, generator=gen).to(torch.float16),
        "w.f32": torch.randn(11, 4, generator=gen),
        "w.f64": torch.randn(2, 3, 2, generator=gen, dtype=torch.float64),
        "i.i64": torch.randint(-2**40, 2**40, (6,), generator=gen),
        "i.i32": torch.randint(-2**30, 2**30, (2, 3), generator=gen, dtype=torch.int32),
        "i.i16": torch.randint(-2**14, 2**14, (5,), generator=gen, dtype=torch.int16),
        "i.i8": torch.randint(-100, 100, (3, 3), generator=gen, dtype=torch.int8),
        "i.u8": torch.randint(0, 255, (4,), generator=gen, dtype=torch.uint8),
        "b.bool": torch.rand(5, generator=gen) > 0.5,
        "empty": torch.zeros(0, 16, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.5),
    }


# --------------------------------------------------------------------------------------------------------------
# fixtures

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=128, tie_word_embeddings=True)


def _save_tiny_qwen3(out):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**TINY)).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="60KB")


@pytest.fixture(scope="session")
def tiny_qwen3(request, tmp_path_factory):
    """A bf16 Qwen3 saved by transformers' save_pretrained in 3 shards + index + config.json. Importing
    transformers costs ~15 s on the 2-core CI machine, so the saved directory is kept in pytest's cache (keyed by
    the transformers version and the config) and copied from there on later runs."""
    dst = tmp_path_factory.mktemp("tiny") / "qwen3"
    key = "lpt_ckpt_tiny_qwen3_" + hashlib.sha1(
        (importlib.metadata.version("transformers") + json.dumps(TINY, sort_keys=True)).encode()).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)
    src = None
    if cache is not None:
        cdir = cache.mkdir(key)
        if not (cdir / "done").exists():
            shutil.rmtree(cdir)
            _save_tiny_qwen3(str(cdir))
            (cdir / "done").write_text("ok")
        src = cdir
    if src is None:
        _save_tiny_qwen3(str(dst))
    else:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("done"))
    return str(dst)


@pytest.fixture
def single(tmp_path):
    gen = torch.Generator().manual_seed(3)
    ts = _mixed_tensors(gen)
    f = tmp_path / "weights.safetensors"
    save_file(ts, str(f), metadata={"format": "pt"})
    return str(f), ts


def _ckpt_dir(root, name, tensors, config=None):
    d = root / name
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return str(d)


# --------------------------------------------------------------------------------------------------------------
# reading


def test_tiny_qwen3_sharded_matches_safetensors(tiny_qwen3):
    with open(os.path.join(tiny_qwen3, "model.safetensors.index.json")) as fh:
        index = json.load(fh)["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) >= 3
    with Checkpoint(tiny_qwen3) as ck:
        assert ck.path == tiny_qwen3
        assert ck.files == [os.path.join(tiny_qwen3, s) for s in shards]
        assert ck.config["hidden_size"] == 64 and ck.config["intermediate_size"] == 128
        assert set(ck.names) == set(index)
        assert "lm_head.weight" not in ck  # tied
        for n in index:
            assert os.path.basename(ck.info(n).file) == index[n]
        # file order: shard order, then data offset
        keys = [(ck.files.index(ck.info(n).file), ck.info(n).start) for n in ck.names]
        assert keys == sorted(keys)
        _assert_matches_reference(ck, tiny_qwen3)
        up = ck.tensor("model.layers.1.mlp.up_proj.weight")
        assert up.dtype == torch.bfloat16 and tuple(up.shape) == (128, 64)
        info = ck.info("model.layers.1.mlp.up_proj.weight")
        assert isinstance(info, TensorInfo) and info.shape == (128, 64)
    # the index file itself may be given
    with Checkpoint(os.path.join(tiny_qwen3, "model.safetensors.index.json")) as ck2:
        assert ck2.config["num_key_value_heads"] == 2
        _assert_matches_reference(ck2, tiny_qwen3)


def test_single_file_every_dtype(single):
    f, ts = single
    with Checkpoint(f) as ck:
        assert ck.files == [f] and ck.config is None
        _assert_matches_reference(ck, f)
        assert ck.tensor("empty").shape == (0, 16) and ck.tensor("scalar").shape == ()
        assert ck.info("empty").end == ck.info("empty").start
        for n, t in ts.items():
            assert torch.equal(ck.tensor(n), t)


def test_directory_single_file_and_config(tmp_path):
    gen = torch.Generator().manual_seed(4)
    ts = {"a": torch.randn(4, 6, generator=gen).to(torch.bfloat16), "b": torch.randn(6, generator=gen)}
    d = _ckpt_dir(tmp_path, "ck", ts, config={"model_type": "qwen3", "hidden_size": 6})
    with Checkpoint(d) as ck:
        assert ck.files == [os.path.join(d, "model.safetensors")]
        assert ck.config == {"model_type": "qwen3", "hidden_size": 6}
        _assert_matches_reference(ck, d)
    # a single file inside an HF directory reads the config beside it
    with Checkpoint(os.path.join(d, "model.safetensors")) as ck:
        assert ck.config["hidden_size"] == 6
    # pathlib paths work too
    with Checkpoint(tmp_path / "ck") as ck:
        assert len(ck) == 2


def test_file_order_and_read_only_file(tmp_path):
    gen = torch.Generator().manual_seed(5)
    ts = {f"t{i}": torch.randn(3 + i, 4, generator=gen) for i in range(6)}
    f = tmp_path / "x.safetensors"
    save_file(ts, str(f))
    os.chmod(f, 0o444)
    with Checkpoint(str(f)) as ck:
        starts = [ck.info(n).start for n in ck.names]
        assert starts == sorted(starts)
        t = ck.tensor("t2")
        t += 1  # a read-only file still gives writable private views
        assert torch.equal(t, ts["t2"] + 1)
    with Checkpoint(str(f)) as ck:
        assert torch.equal(ck.tensor("t2"), ts["t2"])


def test_zero_copy_and_copy_on_write(tmp_path):
    f = str(tmp_path / "big.safetensors")
    rows, cols = 25 * 1024, 4096  # 200 MiB of bf16
    big = torch.full((rows, cols), 1.5, dtype=torch.bfloat16)
    big[7, 11] = -2.0
    save_file({"big": big, "small": torch.arange(10, dtype=torch.float32)}, f)
    del big
    gc.collect()
    digest = _sha(f)
    with Checkpoint(f) as ck:
        before = _rss_anon_kb()
        t = ck.tensor("big")
        assert tuple(t.shape) == (rows, cols)
        # touch every page: an int16 reduction reads all bytes without a float copy
        assert int(t.view(torch.int16).max()) == int(torch.tensor(1.5, dtype=torch.bfloat16).view(torch.int16))
        assert float(t[7, 11]) == -2.0
        r = ck.rows("big", 100, 200)
        assert r.data_ptr() == t.data_ptr() + 100 * cols * 2
        grown = (_rss_anon_kb() - before) >> 10
        assert grown < 32, f"reading a 200 MiB tensor grew anonymous memory by {grown} MiB: not zero-copy"
        # the views are the file's own mapping (a check that no allocator reuse can blur, unlike RSS)
        assert os.path.realpath(_mapping_of(t.data_ptr())) == os.path.realpath(f)
        assert os.path.realpath(_mapping_of(r.data_ptr())) == os.path.realpath(f)
        c = t.clone()
        assert _mapping_of(c.data_ptr()) != _mapping_of(t.data_ptr())
        del c
        # writes land in a private copy of the touched pages only
        t[0].fill_(7.0)
        t[rows - 1, :5] = 0
        assert float(ck.tensor("big")[0, 3]) == 7.0  # the same mapping: later views see the write
        assert (_rss_anon_kb() - before) >> 10 < 64
        del t, r
    assert _sha(f) == digest, "a write into a returned tensor reached the file"
    with Checkpoint(f) as ck:
        assert float(ck.tensor("big")[0, 3]) == 1.5


def test_tensor_outlives_close(single):
    f, ts = single
    ck = Checkpoint(f)
    t = ck.tensor("w.f32")
    ck.close()
    gc.collect()
    assert torch.equal(t, ts["w.f32"])  # the mapping stays until the last view goes
    msg = _err(lambda: ck.tensor("w.f32"))
    assert "closed" in msg
    del t
    gc.collect()


# --------------------------------------------------------------------------------------------------------------
# rows and gather


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_and_gather_equal_slicing(tmp_path, dtype):
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(14, 10, generator=gen).to(dtype)
    f = str(tmp_path / "w.safetensors")
    save_file({"w": w, "v": torch.randn(8, generator=gen)}, f)
    with Checkpoint(f) as ck:
        assert torch.equal(ck.rows("w", 3, 9), w[3:9])
        assert ck.rows("w", 5, 5).shape == (0, 10)
        assert torch.equal(ck.rows("w", 0, 14), w)
        for axis in (0, 1):
            for block in (1, 2):
                n_units = w.shape[axis] // block
                for units in ([n_units - 1, 0, 2, 2], torch.tensor([1, n_units - 2]), range(n_units), []):
                    got = ck.gather("w", units, axis=axis, block=block)
                    ids = [u * block + k for u in list(units) for k in range(block)]
                    want = w.index_select(axis, torch.tensor(ids, dtype=torch.int64))
                    assert got.dtype == dtype and got.shape == want.shape
                    assert torch.equal(got, want), (axis, block, units)
        # axis 0 of a 1-D tensor
        assert torch.equal(ck.gather("v", [7, 1]), ck.tensor("v")[[7, 1]])
        assert "out of range" in _err(lambda: ck.gather("w", [7], axis=0, block=2))
        assert "out of range" in _err(lambda: ck.gather("w", [-1], axis=1))
        assert "multiple of block" in _err(lambda: ck.gather("w", [0], axis=1, block=3))
        assert "axis" in _err(lambda: ck.gather("w", [0], axis=2))
        assert "axis" in _err(lambda: ck.gather("v", [0], axis=1))
        assert "integers" in _err(lambda: ck.gather("w", [0.5]))
        assert "out of range" in _err(lambda: ck.rows("w", 3, 15))
        assert "out of range" in _err(lambda: ck.rows("w", 4, 2))


def test_gather_tiny_model_units(tiny_qwen3):
    """MLP neuron j = gate/up row j and down column j; attention head h = q rows and o columns in blocks of head_dim."""
    ref = _reference(tiny_qwen3)
    with Checkpoint(tiny_qwen3) as ck:
        p = "model.layers.0."
        units = [5, 0, 127]
        assert torch.equal(ck.gather(p + "mlp.gate_proj.weight", units), ref[p + "mlp.gate_proj.weight"][units])
        assert torch.equal(ck.gather(p + "mlp.down_proj.weight", units, axis=1),
                           ref[p + "mlp.down_proj.weight"][:, units])
        q = ck.gather(p + "self_attn.q_proj.weight", [3, 1], axis=0, block=16)
        assert torch.equal(q, torch.cat([ref[p + "self_attn.q_proj.weight"][48:64],
                                         ref[p + "self_attn.q_proj.weight"][16:32]]))
        o = ck.gather(p + "self_attn.o_proj.weight", [2], axis=1, block=16)
        assert torch.equal(o, ref[p + "self_attn.o_proj.weight"][:, 32:48])


# --------------------------------------------------------------------------------------------------------------
# align


def _three(tmp_path, mutate=None, dtypes=None):
    gen = torch.Generator().manual_seed(8)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(8, 4, generator=gen) for i in range(4)}
    base["model.norm.weight"] = torch.randn(4, generator=gen)
    dirs = []
    for k in range(3):
        ts = {n: t + k for n, t in base.items()}
        if dtypes:
            ts = {n: t.to(dtypes[k]) for n, t in ts.items()}
        if mutate:
            ts = mutate(k, ts)
        dirs.append(_ckpt_dir(tmp_path, f"ckpt{k}", ts))
    return [Checkpoint(d) for d in dirs]


def test_align_identical(tmp_path):
    cks = _three(tmp_path)
    a = align(cks)
    assert isinstance(a, Alignment)
    assert a.names == cks[0].names and a.skipped == {} and a.mixed_dtypes == []
    assert align(cks[:1]).names == cks[0].names
    assert "no checkpoints" in _err(lambda: align([]))


def test_align_missing_names(tmp_path):
    def mutate(k, ts):
        if k == 2:
            del ts["model.layers.3.mlp.up_proj.weight"]
            ts["extra.weight"] = torch.zeros(2)
        return ts
    cks = _three(tmp_path, mutate)
    msg = _err(lambda: align(cks))
    assert msg.startswith("checkpoints differ: ")
    assert "'model.layers.3.mlp.up_proj.weight' missing from " + cks[2].path in msg
    assert "'extra.weight' missing from " + cks[0].path + ", " + cks[1].path in msg
    assert "use --intersect to analyse the 4 common tensors" in msg
    a = align(cks, intersect=True)
    assert a.names == [n for n in cks[0].names if n != "model.layers.3.mlp.up_proj.weight"]
    assert set(a.skipped) == {"model.layers.3.mlp.up_proj.weight", "extra.weight"}
    assert cks[2].path in a.skipped["model.layers.3.mlp.up_proj.weight"]


def test_align_lists_first_few_and_counts_the_rest(tmp_path):
    def mutate(k, ts):
        return {n + (f".v{k}" if "layers" in n else ""): t for n, t in ts.items()}
    cks = _three(tmp_path, mutate)
    msg = _err(lambda: align(cks))
    assert "(9 more)" in msg and "1 common tensors" in msg  # 12 names differ, 3 shown; only the norm is common


def test_align_shape_mismatch(tmp_path):
    def mutate(k, ts):
        if k == 1:
            ts["model.layers.1.mlp.up_proj.weight"] = torch.zeros(8, 5)
        return ts
    cks = _three(tmp_path, mutate)
    msg = _err(lambda: align(cks))
    assert ("'model.layers.1.mlp.up_proj.weight' shape (8, 4) in " + cks[0].path + " but (8, 5) in "
            + cks[1].path) in msg
    a = align(cks, intersect=True)
    assert list(a.skipped) == ["model.layers.1.mlp.up_proj.weight"] and len(a.names) == 4
    assert "shape" in a.skipped["model.layers.1.mlp.up_proj.weight"]


def test_align_mixed_float_dtypes_allowed(tmp_path):
    cks = _three(tmp_path, dtypes=[torch.bfloat16, torch.float32, torch.bfloat16])
    a = align(cks)
    assert a.names == cks[0].names and a.mixed_dtypes == cks[0].names and a.skipped == {}

    def mutate(k, ts):
        if k == 1:
            ts["ids"] = torch.arange(3, dtype=torch.int32)
        else:
            ts["ids"] = torch.arange(3, dtype=torch.int64)
        return ts
    for c in cks:
        c.close()
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    cks = _three(tmp_path, mutate)
    assert "'ids' dtype I64 in " in _err(lambda: align(cks))
    assert "ids" in align(cks, intersect=True).skipped


# --------------------------------------------------------------------------------------------------------------
# stream


def test_stream_yields_right_tensors_in_order(tiny_qwen3, tmp_path, monkeypatch):
    other = tmp_path / "other"
    shutil.copytree(tiny_qwen3, other)
    cks = [Checkpoint(tiny_qwen3), Checkpoint(str(other)), Checkpoint(tiny_qwen3)]
    names = list(reversed(cks[0].names))
    ranges = {}  # (file, start, end) -> position in names
    for k, n in enumerate(names):
        for c in cks:
            i = c.info(n)
            ranges[(i.file, i.start, i.end)] = k
    calls = []
    real = ckmod._advise

    def spy(fh, mm, start, end, advice, chunk, stop=None):
        if advice == mmap.MADV_WILLNEED:
            calls.append((fh.name, start, end))
        return real(fh, mm, start, end, advice, chunk, stop)
    monkeypatch.setattr(ckmod, "_advise", spy)
    monkeypatch.setattr(ckmod, "looks_cached", lambda fd, start, end: False)  # as if the cache were cold
    done, seen = [], []
    for k, (name, ts) in enumerate(stream(cks, names, prefetch_bytes=1 << 30, progress=done.append)):
        seen.append(name)
        assert len(ts) == 3
        for c, t in zip(cks, ts):
            assert torch.equal(t, c.tensor(name)) and t.dtype == torch.bfloat16
        if k + 1 < len(names):  # while tensor k is held, the next one of every checkpoint gets read ahead
            want = {(c.info(names[k + 1]).file, c.info(names[k + 1]).start, c.info(names[k + 1]).end)
                    for c in cks}
            deadline = time.time() + 5
            while not want <= set(calls) and time.time() < deadline:
                time.sleep(0.001)
            assert want <= set(calls), f"{names[k + 1]} not read ahead while {name} was held"
    assert seen == names
    assert sum(done) == 3 * cks[0].nbytes and len(done) == len(names)
    order = [ranges[c] for c in calls]  # only real tensor ranges, in stream order
    assert order == sorted(order)
    for c in cks:
        c.close()


def test_read_ahead_skips_a_warm_cache(tmp_path, monkeypatch):
    """The RWF_NOWAIT probe finds bytes just read cached; the read-ahead thread gives no advice for cached tensors
    and advises the tensors its probe finds missing."""
    ts = {f"t{i}": torch.randn(256, 256) for i in range(4)}  # 256 KiB each
    d = _ckpt_dir(tmp_path, "warm", ts)
    ck = Checkpoint(d)
    info = ck.info("t1")
    with open(info.file, "rb") as fh:
        fh.read()
        assert ckmod.looks_cached(fh.fileno(), info.start, info.end)
    calls = []
    real = ckmod._advise
    monkeypatch.setattr(ckmod, "_advise", lambda *a, **k: (calls.append(a[4]), real(*a, **k)))
    for name, _ in stream([ck], list(ck.names), prefetch_bytes=1 << 30):
        time.sleep(0.05)  # a consumer that computes: the read-ahead thread gets to run
    assert mmap.MADV_WILLNEED not in calls
    del _
    # A cold file: the probe cannot be made to miss reliably (on a miss, RWF_NOWAIT still starts the kernel's
    # read-ahead, which a fast disk can finish before the next probe), so a miss is simulated.
    monkeypatch.setattr(ckmod, "looks_cached", lambda *a, **k: False)
    calls.clear()
    for name, _ in stream([ck], list(ck.names), prefetch_bytes=1 << 30):
        time.sleep(0.05)  # a consumer that computes: the read-ahead thread gets to run
    assert mmap.MADV_WILLNEED in calls
    del _
    ck.close()


def test_read_ahead_thread_ends_on_a_warm_cache(tmp_path, monkeypatch):
    """On a warm cache the read-ahead thread probes every tensor once and ends while the consumer is still at the
    first tensor: later tensors cost the consumer no wake-up of it."""
    started = []
    real_start = ckmod._Prefetcher.start
    monkeypatch.setattr(ckmod._Prefetcher, "start", lambda self: (started.append(self), real_start(self)))
    ts = {f"t{i}": torch.randn(64, 64) for i in range(30)}
    ck = Checkpoint(_ckpt_dir(tmp_path, "warm", ts))
    with open(ck.info("t0").file, "rb") as fh:
        fh.read()
    it = stream([ck, ck], list(ck.names), prefetch_bytes=1)  # a budget smaller than a tensor: probing is free
    name, _ = next(it)
    assert len(started) == 1
    started[0].join(timeout=5)
    assert not started[0].is_alive(), "the read-ahead thread kept waiting on a warm cache"
    assert [name] + [n for n, _ in it] == list(ck.names)
    del _
    ck.close()


def test_read_ahead_window_counts_what_it_advises(tmp_path, monkeypatch):
    """A tensor larger than the room left in the window waits for the consumer (the window is never overshot), while
    the tensors before it are advised; cached ranges take nothing from it."""
    ts = {"a0": torch.zeros(16, 1024), "a1": torch.zeros(16, 1024), "a2": torch.zeros(2048, 1024),
          "a3": torch.zeros(16, 1024)}  # 64 KiB, 64 KiB, 8 MiB, 64 KiB
    ck = Checkpoint(_ckpt_dir(tmp_path, "ck", ts))
    names = list(ck.names)
    at = {ck.info(n).start: n for n in names}
    advised = []
    monkeypatch.setattr(ckmod, "looks_cached", lambda *a, **k: False)
    monkeypatch.setattr(ckmod, "_advise", lambda fh, mm, s, e, advice, chunk, stop=None:
                        advised.append(at[s]) if advice == mmap.MADV_WILLNEED else None)
    it = stream([ck], names, prefetch_bytes=192 << 10)  # room for three 64 KiB tensors
    held, _ = next(it)
    deadline = time.time() + 5
    while "a1" not in advised and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert held == "a0" and advised == ["a0", "a1"], advised
    rest = []
    for n, _ in it:  # a consumer that computes: the thread gets to run
        rest.append(n)
        time.sleep(0.05)
    assert rest == names[1:]
    assert advised[:3] == ["a0", "a1", "a2"]  # a2 once the consumer held a1: the next tensor always fits
    del _
    ck.close()


def test_read_ahead_cools_only_the_ranges_it_advised(tmp_path, monkeypatch):
    """MADV_COLD goes to the consumed ranges the thread read ahead, never to pages that were cached before the pass
    (a warm base beside cold later checkpoints, as in lpt diff)."""
    monkeypatch.setattr(mmap, "MADV_COLD", 20, raising=False)  # Linux's value; Python < 3.12 lacks the name
    cks = [Checkpoint(_ckpt_dir(tmp_path, name, {f"t{i}": torch.randn(64, 64) for i in range(4)}))
           for name in ("warm", "cold")]
    warm = os.path.realpath(cks[0].info("t0").file)
    monkeypatch.setattr(ckmod, "looks_cached",
                        lambda fd, s, e, samples=8: os.path.realpath(f"/proc/self/fd/{fd}") == warm)
    log = []
    monkeypatch.setattr(ckmod, "_advise", lambda fh, mm, s, e, advice, chunk, stop=None:
                        log.append((advice, os.path.realpath(fh.name) == warm)))
    for _ in stream(cks, list(cks[0].names), prefetch_bytes=1 << 30):
        time.sleep(0.05)
    assert (mmap.MADV_COLD, False) in log and (mmap.MADV_WILLNEED, False) in log
    assert not [a for a in log if a[1]], "advice on the warm checkpoint's ranges"
    for c in cks:
        c.close()


def test_stream_window_is_bounded(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(9)
    ts = {f"t{i:02d}": torch.randn(64, 64, generator=gen) for i in range(20)}  # 16 KiB each
    d = _ckpt_dir(tmp_path, "ck", ts)
    cks = [Checkpoint(d), Checkpoint(d)]
    names = cks[0].names
    start_of = {cks[0].info(n).start: k for k, n in enumerate(names)}
    issued = []
    real = ckmod._advise

    def spy(fh, mm, start, end, advice, chunk, stop=None):
        if advice == mmap.MADV_WILLNEED:
            issued.append(start_of[start])
        return real(fh, mm, start, end, advice, chunk, stop)
    monkeypatch.setattr(ckmod, "_advise", spy)
    monkeypatch.setattr(ckmod, "looks_cached", lambda *a, **k: False)  # as if the cache were cold
    budget = 3 * 2 * 16384  # three tensors of both checkpoints
    for k, (n, pair) in enumerate(stream(cks, names, prefetch_bytes=budget)):
        time.sleep(0.002)  # let the thread run ahead as far as it may
        ahead = max(issued) if issued else -1
        assert ahead <= k + 3, f"prefetched tensor {ahead} while consuming {k} with a 3-tensor window"
    assert issued == sorted(issued)
    assert set(issued) <= set(range(len(names)))
    # a window smaller than one tensor still prefetches the next one; 0 disables the thread
    for pb in (1, 0):
        got = [n for n, _ in stream(cks, names, prefetch_bytes=pb)]
        assert got == names
    for c in cks:
        c.close()


def test_stream_early_exit_stops_thread(single):
    f, ts = single
    with Checkpoint(f) as ck:
        before = threading.active_count()
        it = stream([ck, ck], ck.names)
        name, pair = next(it)
        assert torch.equal(pair[0], pair[1])
        it.close()
        deadline = time.time() + 5
        while threading.active_count() > before and time.time() < deadline:
            time.sleep(0.01)
        assert threading.active_count() == before
        assert "missing from" in _err(lambda: stream([ck], ["nope"]))
        assert "no checkpoints" in _err(lambda: stream([], []))


def _resident_fraction(mm, start, end):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    buf = (ctypes.c_char * len(mm)).from_buffer(mm)
    try:
        s = start - start % mmap.PAGESIZE
        npages = (end - s + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * npages)()
        assert libc.mincore(ctypes.addressof(buf) + s, end - s, vec) == 0
        return sum(v & 1 for v in vec) / npages
    finally:
        del buf


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore/fadvise residency checks are Linux-only")
def test_stream_readahead_really_reads_ahead(tmp_path):
    """Drop a file from the page cache, consume its first tensor, and see the next ones become resident before they
    are touched."""
    ts = {f"t{i}": torch.full((1024, 1024), float(i)) for i in range(6)}  # 4 MiB each
    f = str(tmp_path / "cold.safetensors")
    save_file(ts, f)
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    with Checkpoint(f) as ck:
        mm = ck._mapping(f)
        infos = [ck.info(f"t{i}") for i in range(6)]
        if _resident_fraction(mm, infos[3].start, infos[3].end) > 0.5:
            pytest.skip("this filesystem keeps the file cached (tmpfs?): cannot observe read-ahead")
        it = stream([ck], [f"t{i}" for i in range(6)], prefetch_bytes=12 << 20)
        name, (t0,) = next(it)
        deadline = time.time() + 3
        while time.time() < deadline and min(_resident_fraction(mm, i.start, i.end) for i in infos[1:4]) < 1:
            time.sleep(0.01)
        assert min(_resident_fraction(mm, i.start, i.end) for i in infos[1:4]) == 1.0
        assert float(t0[5, 5]) == 0.0
        it.close()


# --------------------------------------------------------------------------------------------------------------
# bad inputs


def test_missing_path(tmp_path):
    p = str(tmp_path / "nope")
    msg = _err(p)
    assert "no such checkpoint" in msg and p in msg


def test_directory_without_weights(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text("{}")
    msg = _err(str(d))
    assert "no safetensors weights" in msg and str(d) in msg
    (d / "pytorch_model.bin").write_bytes(b"x")
    assert "pytorch_model.bin" in _err(str(d))


def test_index_naming_missing_shard(tiny_qwen3, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(tiny_qwen3, d)
    victim = sorted(p for p in os.listdir(d) if p.endswith(".safetensors"))[1]
    os.remove(d / victim)
    msg = _err(str(d))
    assert victim in msg and "model.safetensors.index.json" in msg and "missing" in msg


def test_index_inconsistent_with_shards(tiny_qwen3, tmp_path):
    d = tmp_path / "bad_index"
    shutil.copytree(tiny_qwen3, d)
    ip = d / "model.safetensors.index.json"
    idx = json.loads(ip.read_text())
    wm = idx["weight_map"]
    wrong = sorted(set(wm.values()))
    n = "model.layers.0.mlp.gate_proj.weight"
    wm[n] = [s for s in wrong if s != wm[n]][0]
    ip.write_text(json.dumps(idx))
    msg = _err(str(d))
    assert n in msg and "does not hold it" in msg
    ip.write_text("{not json")
    assert "corrupt safetensors index" in _err(str(d))
    ip.write_text(json.dumps({"metadata": {}}))
    assert "weight_map" in _err(str(d))


def test_truncated_shard(single, tmp_path):
    f, _ = single
    g = str(tmp_path / "trunc.safetensors")
    shutil.copy(f, g)
    with open(g, "r+b") as fh:
        fh.truncate(os.path.getsize(g) - 10)
    msg = _err(g)
    assert "truncated shard" in msg and g in msg


def test_truncated_shard_in_directory(tiny_qwen3, tmp_path):
    d = tmp_path / "trunc"
    shutil.copytree(tiny_qwen3, d)
    victim = str(d / sorted(p for p in os.listdir(d) if p.endswith(".safetensors"))[-1])
    with open(victim, "r+b") as fh:
        fh.truncate(os.path.getsize(victim) // 2)
    msg = _err(str(d))
    assert "truncated shard" in msg and victim in msg


def test_corrupt_headers(tmp_path):
    good = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    data = bytes(16)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    assert "corrupt safetensors header" in _err(str(garbage))
    assert "header length" in _err(_raw_file(tmp_path / "absurd.safetensors", good, data, hlen=1 << 60))
    assert "invalid JSON" in _err(_raw_file(tmp_path / "json.safetensors", b"{\"a\": [1, 2", data))
    assert "not UTF-8" in _err(_raw_file(tmp_path / "utf.safetensors", b"\xff\xfe{}", data))
    assert "not an object" in _err(_raw_file(tmp_path / "list.safetensors", [1, 2], data))
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    assert "too short" in _err(str(short))
    bad_size = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}
    assert "needs 24 bytes" in _err(_raw_file(tmp_path / "size.safetensors", bad_size, data))
    overlap = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    msg = _err(_raw_file(tmp_path / "overlap.safetensors", overlap, data))
    assert "overlap" in msg and "'a'" in msg and "'b'" in msg
    beyond = {"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}
    assert "truncated shard" in _err(_raw_file(tmp_path / "beyond.safetensors", beyond, data))
    neg = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}
    assert "data_offsets" in _err(_raw_file(tmp_path / "neg.safetensors", neg, data))
    shp = {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}
    assert "invalid shape" in _err(_raw_file(tmp_path / "shape.safetensors", shp, data))
    # a header that parses is fine, including metadata and an unknown dtype (listed, not loadable)
    ok = dict(good, __metadata__={"format": "pt"}, odd={"dtype": "F4", "shape": [4], "data_offsets": [16, 18]})
    with Checkpoint(_raw_file(tmp_path / "ok.safetensors", ok, data + b"\0\0")) as ck:
        assert ck.names == ["a", "odd"] and torch.equal(ck.tensor("a"), torch.zeros(2, 2))
        assert ck.info("odd").dtype is None
        assert "dtype" in _err(lambda: ck.tensor("odd"))


def test_unknown_tensor_duplicate_and_bad_config(tmp_path, single):
    f, _ = single
    with Checkpoint(f) as ck:
        msg = _err(lambda: ck.info("model.nope"))
        assert "model.nope" in msg and f in msg
        assert "model.nope" in _err(lambda: ck.tensor("model.nope"))
    d = tmp_path / "dup"
    d.mkdir()
    save_file({"x": torch.zeros(2)}, str(d / "a.safetensors"))
    save_file({"x": torch.ones(2)}, str(d / "b.safetensors"))
    msg = _err(str(d))
    assert "'x' appears in both" in msg
    d2 = _ckpt_dir(tmp_path, "badcfg", {"x": torch.zeros(2)})
    (tmp_path / "badcfg" / "config.json").write_text("{oops")
    assert "config.json" in _err(d2)


def test_misaligned_tensor_is_copied(tmp_path):
    """A writer other than safetensors may leave a tensor at an offset that is not a multiple of its item size."""
    payload = b"\x07" + torch.arange(4, dtype=torch.float32).numpy().tobytes()
    hdr = {"u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
           "f": {"dtype": "F32", "shape": [4], "data_offsets": [1, 17]}}
    raw = json.dumps(hdr).encode()
    raw += b" " * (-len(raw) % 8)
    with Checkpoint(_raw_file(tmp_path / "mis.safetensors", raw, payload)) as ck:
        t = ck.tensor("f")
        assert torch.equal(t, torch.arange(4, dtype=torch.float32)) and t.data_ptr() % 4 == 0
        assert int(ck.tensor("u")[0]) == 7
