"""grain input pipeline: epoch coverage, seeded order, per-process slices, orbax checkpoint/restore of the
iterator position (0 and 2 workers, simulated and real 2-process), device placement (1 and 8 devices)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from facecrafter_jax.data import pipeline as P
from facecrafter_jax.data import identities as I
from facecrafter_jax.data import records as R

RES = 64
N = 230  # shards of 100, 100, 30


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("records")
    with R.RecordWriter(d, resolution=RES, shard_size=100) as w:
        for i in range(N):
            w.write(R.synthetic_record(np.random.default_rng([7, i]), RES, image_id=f"img/{i:04d}.png"))
    return d


@pytest.fixture(scope="module")
def reference(dataset):
    return {r["image_id"]: r for r in R.iter_records(dataset)}


def _ids(batch):
    return [str(s) for s in np.asarray(batch["image_id"])]


def _take(pipe, n):
    return [next(pipe) for _ in range(n)]


def _assert_batches_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert sorted(g) == sorted(w)
        for k in w:
            np.testing.assert_array_equal(np.asarray(g[k]), np.asarray(w[k]), err_msg=k)


def test_one_epoch_every_record_once_and_contents(dataset, reference):
    pipe = P.make_pipeline(dataset, global_batch_size=23, seed=0, num_epochs=1, sharding=None)
    batches = list(pipe)
    assert len(batches) == N // 23
    ids = [i for b in batches for i in _ids(b)]
    assert sorted(ids) == sorted(reference)  # each exactly once
    b = batches[3]
    assert b["latent_moments"].shape == (23, 8, 8, 8) and b["latent_moments"].dtype == np.float16
    for j, image_id in enumerate(_ids(b)):
        for k in ("arcface", "landmarks", "head_pose", "emotion", "latent_moments"):
            np.testing.assert_array_equal(b[k][j], reference[image_id][k], err_msg=k)


def test_drop_remainder_and_multi_epoch(dataset, reference):
    pipe = P.make_pipeline(dataset, global_batch_size=32, seed=5, num_epochs=1, sharding=None)
    ids = [i for b in pipe for i in _ids(b)]
    assert len(ids) == (N // 32) * 32 and len(set(ids)) == len(ids)  # 6 records of the last batch dropped
    pipe = P.make_pipeline(dataset, global_batch_size=23, seed=5, num_epochs=2, sharding=None)
    ids = [i for b in pipe for i in _ids(b)]
    assert len(ids) == 2 * N
    assert sorted(ids[:N]) == sorted(reference) == sorted(ids[N:])
    assert ids[:N] != ids[N:]  # reshuffled per epoch


def test_order_depends_on_seed_only(dataset, reference):
    def order(seed, shuffle=True):
        return [i for b in P.make_pipeline(dataset, global_batch_size=46, seed=seed, num_epochs=1, shuffle=shuffle,
                                           sharding=None, fields=["image_id"]) for i in _ids(b)]

    a, a2, b = order(0), order(0), order(1)
    assert a == a2
    assert a != b and sorted(a) == sorted(b)
    assert order(0, shuffle=False) == R.read_image_ids(dataset)  # storage order without shuffle


def test_process_slices_disjoint_cover_and_interleave(dataset, reference):
    full = [i for b in P.make_pipeline(dataset, global_batch_size=46, seed=3, num_epochs=1, sharding=None,
                                       fields=["image_id"]) for i in _ids(b)]
    per = []
    for p in range(2):
        pipe = P.make_pipeline(dataset, global_batch_size=46, seed=3, num_epochs=1, sharding=None,
                               fields=["image_id"], process_index=p, process_count=2)
        batches = list(pipe)
        assert all(len(_ids(b)) == 23 for b in batches)
        per.append([i for b in batches for i in _ids(b)])
    assert not set(per[0]) & set(per[1])
    assert sorted(per[0] + per[1]) == sorted(reference)
    assert per[0] == full[0::2] and per[1] == full[1::2]


def _manager(path):
    return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=2))


@pytest.mark.parametrize("worker_count", [0, 2])
def test_checkpoint_restore_continues_identically(dataset, tmp_path, worker_count):
    kw = dict(global_batch_size=32, seed=11, fields=["image_id", "arcface", "latent_moments"])
    # Uninterrupted run (no workers): 12 batches of 32 span 1.7 epochs of 230 records.
    want = _take(P.make_pipeline(dataset, **kw), 12)
    with P.make_pipeline(dataset, worker_count=worker_count, **kw) as pipe:
        got = _take(pipe, 5)
        mngr = _manager(tmp_path / "ckpt")
        P.save_iterator_state(mngr, 5, pipe)
        got_more = _take(pipe, 2)  # the live iterator keeps going after the save
    _assert_batches_equal(got + got_more, want[:7])
    assert (tmp_path / "ckpt" / "5" / "data_iter" / "process_0-of-1.json").is_file()
    with P.make_pipeline(dataset, worker_count=worker_count, **kw) as fresh:
        P.restore_iterator_state(_manager(tmp_path / "ckpt"), None, fresh)
        _assert_batches_equal(_take(fresh, 7), want[5:12])


def test_checkpoint_inside_composite_with_train_state(dataset, tmp_path):
    kw = dict(global_batch_size=16, seed=2, fields=["image_id", "emotion"], sharding=None)
    want = _take(P.make_pipeline(dataset, **kw), 6)
    pipe = P.make_pipeline(dataset, **kw)
    _take(pipe, 4)
    state = {"w": np.arange(6.0, dtype=np.float32)}
    mngr = _manager(tmp_path / "ckpt")
    mngr.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data_iter=P.iterator_save_args(pipe)))
    mngr.wait_until_finished()
    fresh = P.make_pipeline(dataset, **kw)
    out = _manager(tmp_path / "ckpt").restore(4, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), data_iter=P.iterator_restore_args(fresh)))
    np.testing.assert_array_equal(out["state"]["w"], state["w"])
    _assert_batches_equal(_take(fresh, 2), want[4:6])


def test_checkpoint_restore_two_simulated_processes(dataset, tmp_path):
    def make(p):
        return P.make_pipeline(dataset, global_batch_size=20, seed=4, fields=["image_id", "head_pose"],
                               sharding=None, process_index=p, process_count=2)

    want = [_take(make(p), 9) for p in range(2)]
    pipes = [make(p) for p in range(2)]
    for p in pipes:
        _take(p, 4)
    mngr = _manager(tmp_path / "ckpt")
    mngr.save(4, args=ocp.args.Composite(**{f"data_p{p}": P.iterator_save_args(pipes[p]) for p in range(2)}))
    mngr.wait_until_finished()
    assert (tmp_path / "ckpt" / "4" / "data_p1" / "process_1-of-2.json").is_file()
    fresh = [make(p) for p in range(2)]
    _manager(tmp_path / "ckpt").restore(
        4, args=ocp.args.Composite(**{f"data_p{p}": P.iterator_restore_args(fresh[p]) for p in range(2)}))
    for p in range(2):
        _assert_batches_equal(_take(fresh[p], 5), want[p][4:9])
    seen = [set(i for b in want[p][:5] for i in _ids(b)) for p in range(2)]
    assert not seen[0] & seen[1]  # within the first epoch (5 x 10 < 115 per process) the slices are disjoint


def test_restore_into_different_pipeline_is_an_error(dataset):
    pipe = P.make_pipeline(dataset, global_batch_size=16, seed=0, sharding=None)
    _take(pipe, 2)
    other = P.make_pipeline(dataset, global_batch_size=16, seed=1, sharding=None)
    with pytest.raises(ValueError, match=r"different pipeline \(seed: saved 0, now 1\)"):
        other.set_state(pipe.get_state())


def test_argument_errors(dataset):
    with pytest.raises(ValueError, match="must be a positive multiple of process_count 2"):
        P.make_pipeline(dataset, global_batch_size=15, seed=0, process_index=0, process_count=2)
    with pytest.raises(R.RecordError, match=r"unknown field\(s\) \['pose'\]"):
        P.make_pipeline(dataset, global_batch_size=16, seed=0, fields=["pose"])
    with pytest.raises(ValueError, match=r"process_index 2 not in \[0, 2\)"):
        P.make_pipeline(dataset, global_batch_size=16, seed=0, process_index=2, process_count=2)


def test_device_put_one_device(dataset):
    host = _take(P.make_pipeline(dataset, global_batch_size=8, seed=9, sharding=None), 2)
    sharding = P.data_sharding()
    dev = _take(P.make_pipeline(dataset, global_batch_size=8, seed=9, sharding=sharding), 2)
    for h, d in zip(host, dev):
        assert isinstance(d["image_id"], np.ndarray)  # strings stay on the host
        for k in ("arcface", "landmarks", "latent_moments"):
            assert isinstance(d[k], jax.Array) and d[k].sharding == sharding
            assert d[k].dtype == h[k].dtype
            np.testing.assert_array_equal(np.asarray(d[k]), h[k])


_EIGHT_DEVICES = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from facecrafter_jax.data import pipeline as P
    assert jax.device_count() == 8
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    sharding = P.data_sharding(mesh, "data")
    h = next(P.make_pipeline(sys.argv[1], global_batch_size=16, seed=1, sharding=None))
    pipe = P.make_pipeline(sys.argv[1], global_batch_size=16, seed=1)  # default: 1-D mesh over all 8 devices
    pipe4x2 = P.make_pipeline(sys.argv[1], global_batch_size=16, seed=1, sharding=sharding)
    d, d2 = next(pipe), next(pipe4x2)
    x = d["latent_moments"]
    assert x.shape == (16, 8, 8, 8) and len(x.addressable_shards) == 8
    assert {s.data.shape for s in x.addressable_shards} == {(2, 8, 8, 8)}
    for s in x.addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data), h["latent_moments"][s.index])
    y = d2["landmarks"]
    assert y.sharding == sharding and {s.data.shape for s in y.addressable_shards} == {(4, 478, 3)}
    np.testing.assert_array_equal(np.asarray(y), h["landmarks"])
    print("OK8")
""")


def test_device_put_eight_fake_devices(dataset):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, str(dataset)], capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0 and "OK8" in proc.stdout, proc.stdout + proc.stderr


_TWO_PROCESSES = textwrap.dedent("""
    import json, os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    data, ckpt, port, pid, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=60)
    import orbax.checkpoint as ocp
    from facecrafter_jax.data import pipeline as P
    assert jax.process_count() == 2 and jax.device_count() == 2

    def make():
        return P.make_pipeline(data, global_batch_size=20, seed=6, fields=["image_id", "arcface"])

    def ids(b):
        return [str(s) for s in b["image_id"]]

    ref = make()
    want = [next(ref) for _ in range(8)]
    pipe = make()
    before = [next(pipe) for _ in range(3)]
    x = before[0]["arcface"]
    assert x.shape == (20, 512) and len(x.addressable_shards) == 1
    np.testing.assert_array_equal(np.asarray(x.addressable_shards[0].data), np.asarray(want[0]["arcface"].addressable_shards[0].data))
    mngr = ocp.CheckpointManager(ckpt)
    P.save_iterator_state(mngr, 3, pipe)
    mngr.close()
    fresh = make()
    mngr = ocp.CheckpointManager(ckpt)
    P.restore_iterator_state(mngr, 3, fresh)
    after = [next(fresh) for _ in range(5)]
    ok = all(ids(a) == ids(w) for a, w in zip(before + after, want))
    ok = ok and all(np.array_equal(np.asarray(a["arcface"].addressable_shards[0].data),
                                   np.asarray(w["arcface"].addressable_shards[0].data))
                    for a, w in zip(after, want[3:]))
    json.dump({"ok": bool(ok), "ids": [ids(w) for w in want]}, open(out, "w"))
    jax.distributed.shutdown()
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_real_two_process_checkpoint_restore(dataset, tmp_path):
    """Two jax.distributed CPU processes on localhost share one orbax checkpoint directory."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(dataset), str(tmp_path / "ckpt"), str(port),
                               str(p), str(tmp_path / f"out{p}.json")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for p in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(logs)[-6000:]
    res = [json.loads((tmp_path / f"out{p}.json").read_text()) for p in range(2)]
    assert res[0]["ok"] and res[1]["ok"]
    assert sorted((tmp_path / "ckpt" / "3" / "data_iter").glob("process_*.json")) == [
        tmp_path / "ckpt" / "3" / "data_iter" / f"process_{p}-of-2.json" for p in range(2)]
    # The two processes' first-epoch records are disjoint and each batch has 10 records per process.
    first = [set(i for b in r["ids"] for i in b) for r in res]  # 8 x 10 < 115 records: all in epoch 1
    assert all(len(b) == 10 for r in res for b in r["ids"])
    assert not first[0] & first[1]


# ------------------------------------------------------------------------------------------ identity from another photo
@pytest.fixture(scope="module")
def people(tmp_path_factory):
    """60 records: person k has k % 4 + 1 photos in folder p{k}/ (so some identities have a single photo)."""
    d = tmp_path_factory.mktemp("people")
    image_ids = [f"p{k:02d}/{j}.png" for k in range(24) for j in range(k % 4 + 1)]
    with R.RecordWriter(d, resolution=RES, shard_size=25) as w:
        for i, image_id in enumerate(image_ids):
            w.write(R.synthetic_record(np.random.default_rng([9, i]), RES, image_id=image_id))
    return d, {r["image_id"]: r["arcface"] for r in R.iter_records(d)}


def _sources(batches, arcface):
    """For every sample: (its image_id, the image_id whose arcface it carries)."""
    by_vec = {v.tobytes(): k for k, v in arcface.items()}
    return [(i, by_vec[np.asarray(b["arcface"][j]).tobytes()]) for b in batches for j, i in enumerate(_ids(b))]


def test_other_photo_draws_only_same_identity_and_is_deterministic(people):
    d, arcface = people
    kw = dict(global_batch_size=12, seed=3, num_epochs=3, sharding=None, fields=("image_id", "arcface"))
    pairs = _sources(list(P.make_pipeline(d, other_photo_identity=1.0, **kw)), arcface)
    again = _sources(list(P.make_pipeline(d, other_photo_identity=1.0, **kw)), arcface)
    assert pairs == again  # the same seed gives the same draws
    sizes = {}
    for i in arcface:
        sizes[os.path.dirname(i)] = sizes.get(os.path.dirname(i), 0) + 1
    for own, src in pairs:
        assert os.path.dirname(src) == os.path.dirname(own)  # only the same identity
        assert (src != own) == (sizes[os.path.dirname(own)] > 1)  # p = 1: another photo whenever there is one
    # independent of the process layout: two processes' slices give the same draws for the same positions
    split = [_sources(list(P.make_pipeline(d, other_photo_identity=1.0, process_index=p, process_count=2, **kw)),
                      arcface) for p in range(2)]
    assert sorted(split[0] + split[1]) == sorted(pairs)
    # p = 0.5: about half of the samples that could switch do (binomial, 5 sigma)
    half = _sources(list(P.make_pipeline(d, other_photo_identity=0.5, **kw)), arcface)
    can = [(o, s) for o, s in half if sizes[os.path.dirname(o)] > 1]
    frac = np.mean([o != s for o, s in can])
    assert abs(frac - 0.5) < 5 * np.sqrt(0.25 / len(can))
    # p = 0: every record keeps its own, and the order equals the plain pipeline's
    own = _sources(list(P.make_pipeline(d, **kw)), arcface)
    assert all(o == s for o, s in own) and [o for o, _ in own] == [o for o, _ in pairs]


def test_identity_labels_from_file_override_folders(people, tmp_path):
    d, arcface = people
    assert I.read_identity_labels(d)[:3] == ["p00", "p01", "p01"]
    ids = R.read_image_ids(d)
    I.write_identity_labels(d, {i: "everyone" for i in ids})
    try:
        assert set(I.read_identity_labels(d)) == {"everyone"}
        pairs = _sources(list(P.make_pipeline(d, other_photo_identity=1.0, global_batch_size=12, seed=1, num_epochs=1,
                                              sharding=None, fields=("image_id", "arcface"))), arcface)
        assert all(o != s for o, s in pairs) and len({os.path.dirname(s) for _, s in pairs}) > 1
        I.write_identity_labels(d, {i: "x" for i in ids[:-1]})
        with pytest.raises(R.RecordError, match="no identity for 1 record"):
            I.read_identity_labels(d)
    finally:
        (d / I.IDENTITIES_FILE).unlink()
