"""Fault injection (issue 21; docs/reliability.md): every expected failure is one line ``error: ...``, exit status
2, no traceback, and nothing is lost (record counts, the checkpoint steps that exist, finite parameters in every
saved checkpoint). Training runs are subprocesses of ``train.py`` on configs/tiny_cpu.yaml sharing one persistent
compilation cache; the config / data cases run ``train.py``'s entry point in this process."""

import collections
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from facecrafter_jax.data import records as R
from facecrafter_jax.data.integrity import verify_dataset
from facecrafter_jax.train.checkpoint import load_trained_params
from facecrafter_jax.train.cli import main as train_main
from facecrafter_jax.train.testing import (REPO, free_port, session_cache_dir, start_train, train_command, train_env,
                                          wait_for_step)

CONFIG = REPO / "configs" / "tiny_cpu.yaml"
QUIET = ["logging.tensorboard=false", "logging.progress=false"]
KEYS = ("loss", "diffusion_loss", "ad_loss", "grad_norm", "lr", "timestep_mean")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return session_cache_dir(tmp_path_factory)  # shared with test_train_resume / test_train_distributed


def _one_error_line(text: str) -> str:
    """The single ``error: ...`` line of ``text``; fails if there is none, several, or a traceback."""
    assert "Traceback" not in text, text[-4000:]
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, text[-4000:]
    return lines[0]


def _train(args, cache, *, devices=1, timeout=600):
    return subprocess.run(train_command(CONFIG, [*args, *QUIET]), cwd=REPO, env=train_env(devices, cache),
                          capture_output=True, text=True, timeout=timeout)


def _write_records(d: Path, n=48, shard_size=16):
    rng = np.random.default_rng(0)
    with R.RecordWriter(d, resolution=64, shard_size=shard_size, latent_dtype="float32") as w:
        for i in range(n):
            w.write(R.synthetic_record(rng, 64, image_id=f"img/{i:04d}.png"))
    return d


def _steps(run_dir: Path) -> list[int]:
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _assert_finite_checkpoints(run_dir: Path, steps):
    for step in steps:
        for ema in (False, True):
            params, _ = load_trained_params(run_dir / "checkpoints" / str(step), prefer_ema=ema)
            assert params and all(np.all(np.isfinite(v)) for v in params.values()), (step, ema)


# ------------------------------------------------------------------------------------ config (in process)
def test_invalid_yaml_and_python_tags_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noptim:\n  lr: [1e-3\n")
    assert train_main(["--config", str(bad)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad) in line and "invalid YAML" in line and "line 4, column 1" in line
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"steps: !!python/object/apply:os.system ['touch {marker}']\n")
    assert train_main(["--config", str(evil)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "refused the YAML tag '!!python/object/apply:os.system'" in line and not marker.exists()
    assert train_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in _one_error_line(capsys.readouterr().err)
    with pytest.raises(Exception, match="invalid YAML"):  # --debug: the exception itself, with its traceback
        train_main(["--config", str(bad), "--debug"])


# ------------------------------------------------------------------------------------ data (in process)
@pytest.fixture
def records(tmp_path):
    return _write_records(tmp_path / "records")


def _data_args(tmp_path, data_dir, *extra):
    return ["--config", str(CONFIG), f"run_dir={tmp_path / 'run'}", f"data.dir={data_dir}", *extra]


def test_missing_data_dir(tmp_path, capsys):
    missing = tmp_path / "no_such_records"
    assert train_main(_data_args(tmp_path, missing)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"config key 'data.dir': {missing} does not exist" in line
    assert not missing.exists()  # never filled with synthetic records
    assert train_main(_data_args(tmp_path, missing, "data.synthetic=null")) == 2
    assert f"dataset folder {missing} does not exist" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("damage, needle", [
    ("delete", "shard-00001.array_record is missing (16 records)"),
    ("truncate", "shard-00001.array_record is truncated (131072 bytes, dataset.json says 262144)"),
    ("append", "shard-00001.array_record has changed size (262145 bytes, dataset.json says 262144)"),
])
def test_damaged_shard_is_named_before_training(tmp_path, capsys, records, damage, needle):
    shard = records / "shard-00001.array_record"
    if damage == "delete":
        shard.unlink()
    elif damage == "truncate":
        os.truncate(shard, shard.stat().st_size // 2)
    else:
        with open(shard, "ab") as f:
            f.write(b"\0")
    assert train_main(_data_args(tmp_path, records)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert needle in line and "Nothing was trained" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_changed_bytes_found_by_hashes_and_named_by_the_reader(tmp_path, capsys, records):
    """Same size, other bytes: ``data.verify=hashes`` names the shard before training; without it the reader
    names the shard and the record index when it reaches the damage (riegeli checks its chunk hashes)."""
    shard = records / "shard-00002.array_record"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    assert verify_dataset(records).ok  # sizes and counts still match
    assert train_main(_data_args(tmp_path, records, "data.verify=hashes")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "shard-00002.array_record has changed (its SHA-256 differs from dataset.json)" in line

    from facecrafter_jax.data import make_pipeline
    from facecrafter_jax.errors import DataError

    with make_pipeline(records, global_batch_size=8, seed=0, sharding=None, shuffle=False, num_epochs=1) as pipe:
        with pytest.raises(DataError, match=rf"record 13 of {shard} cannot be read \(RuntimeError: Corrupted Riegeli"):
            for _ in pipe:
                pass


def test_writer_adopts_a_shard_committed_before_a_kill(tmp_path):
    """A writer killed between committing a shard and rewriting dataset.json leaves an unlisted shard: named by
    verification, adopted (count, size, hash) by the next writer on the folder."""
    d = _write_records(tmp_path / "r", n=32)
    info = json.loads((d / R.INFO_FILE).read_text())
    for key in ("shards", "shard_files"):
        del info[key]["shard-00001.array_record"]
    (d / R.INFO_FILE).write_text(json.dumps(info))
    report = verify_dataset(d)
    assert [(p.shard, p.kind) for p in report.problems] == [("shard-00001.array_record", "unlisted")]
    with R.RecordWriter(d, resolution=64, latent_dtype="float32"):
        pass
    report = verify_dataset(d, hashes=True)
    assert report.ok and report.num_records == 32 and report.hashed


# ------------------------------------------------------------------------------------ untrusted files
def test_malicious_pickle_never_runs(tmp_path, capsys):
    """A real malicious ``.bin`` (unpickling it creates a file) given to facecrafter-convert: one line, no file."""
    import builtins

    import torch
    import yaml

    from facecrafter_jax.convert.cli import main as convert_main

    marker = tmp_path / "created_by_pickle"

    class Payload:
        def __reduce__(self):
            return builtins.open, (str(marker), "w")

    unet = tmp_path / "unet"
    unet.mkdir()
    torch.save({"conv_in.weight": torch.zeros(2), "x": Payload()}, unet / "diffusion_pytorch_model.bin")
    cfg = yaml.safe_load(CONFIG.read_text())["model"]["unet"]
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **cfg}))
    torch.load(unet / "diffusion_pytorch_model.bin", weights_only=False)  # the payload is real: an unsafe load ...
    assert marker.exists()  # ... runs it
    marker.unlink()
    assert convert_main(["from-diffusers", "--unet", str(unet), "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "refused to load this pickle: it would call io.open while loading" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ non-finite guard
def test_skip_if_nonfinite_keeps_the_old_state_bit_for_bit():
    import jax.numpy as jnp

    from facecrafter_jax.train.step import skip_if_nonfinite

    old = {"step": jnp.int32(3), "params": {"w": jnp.arange(4.0)}, "opt_state": ({"mu": jnp.ones(4)}, jnp.int32(3)),
           "ema": {"w": jnp.full(4, 0.5)}, "rng": jnp.zeros(2, jnp.uint32)}
    new = {"step": jnp.int32(4), "params": {"w": jnp.arange(4.0) + 0.1}, "opt_state": ({"mu": jnp.ones(4) * 2},
           jnp.int32(4)), "ema": {"w": jnp.full(4, 0.6)}, "rng": jnp.zeros(2, jnp.uint32)}
    for loss, gnorm in ((jnp.nan, 1.0), (1.0, jnp.inf), (-jnp.inf, jnp.nan)):
        kept, flag = skip_if_nonfinite(jnp.float32(loss), jnp.float32(gnorm), new, old)
        assert float(flag) == 1.0 and int(kept["step"]) == 4
        for k in ("params", "opt_state", "ema"):
            assert all(np.array_equal(a, b) for a, b in zip(*(jax_leaves(t[k]) for t in (kept, old))))
    kept, flag = skip_if_nonfinite(jnp.float32(0.5), jnp.float32(2.0), new, old)
    assert float(flag) == 0.0
    assert all(np.array_equal(a, b) for a, b in zip(jax_leaves(kept), jax_leaves(new)))


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_diverging_run_stops_and_never_saves_a_nonfinite_step(tmp_path, cache):
    run_dir = tmp_path / "diverge"
    r = _train([f"run_dir={run_dir}", "steps=40", "optim.lr=1e8", "optim.warmup_steps=0", "checkpoint.every=1",
                "checkpoint.keep_last=5", "checkpoint.keep_best=0", "optim.max_nonfinite_steps=3",
                "data.synthetic.num_records=16"], cache)
    assert r.returncode == 2, r.stderr[-3000:]
    line = _one_error_line(r.stderr)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    bad = [m["step"] for m in metrics if m["nonfinite"] == 1.0]
    assert bad and bad == list(range(bad[0], bad[0] + 4))  # 3 tolerated, the 4th stops the run
    assert f"training diverged: 4 steps in a row ({bad[0]}..{bad[-1]})" in line
    assert all(m["loss"] != "nan" for m in metrics if m["step"] < bad[0])
    steps = _steps(run_dir)
    assert steps and max(steps) < bad[0]  # no checkpoint at or after the first non-finite step
    assert steps == list(range(max(1, bad[0] - 5), bad[0]))  # ... and every finite step before it was kept
    _assert_finite_checkpoints(run_dir, steps)


# ------------------------------------------------------------------------------------ checkpoints
def _wait_for_checkpoint(proc, run_dir, step, timeout=300):
    t0 = time.monotonic()
    while not (run_dir / "checkpoints" / str(step) / "state").is_dir():
        assert proc.poll() is None, f"exited with {proc.returncode} before checkpoint {step}"
        assert time.monotonic() - t0 < timeout
        time.sleep(0.05)


def test_failed_save_keeps_earlier_checkpoints_then_fallback_and_changed_records(tmp_path, cache, capsys):
    """(1) The file system refuses the checkpoint files (RLIMIT_FSIZE set on the running process: writes fail
    with EFBIG, as on a full disk): one line naming the step and reason, the earlier steps intact.
    (2) Newest of them damaged (state removed) and a shard deleted: the restart says the records changed (not
    that the checkpoint is corrupt). (3) With data.on_change=restart it moves the damaged step aside, resumes
    from the previous one on the remaining records and finishes."""
    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", "steps=400", "checkpoint.every=1", "checkpoint.keep_last=3", "checkpoint.keep_best=0",
            "data.synthetic.num_records=24", "data.synthetic.shard_size=8"]
    log = tmp_path / "save.log"
    proc = start_train(CONFIG, [*args, *QUIET], cache_dir=cache, log_path=log)
    try:
        _wait_for_checkpoint(proc, run_dir, 3)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
        assert proc.wait(timeout=300) == 2, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    line = _one_error_line(log.read_text())
    kept = _steps(run_dir)
    assert "could not save checkpoint step" in line and "File too large" in line
    assert f"The earlier checkpoints are intact (steps {kept})" in line and len(kept) == 3
    _assert_finite_checkpoints(run_dir, kept)

    shutil.rmtree(run_dir / "checkpoints" / str(kept[-1]) / "state")
    (run_dir / "data" / "shard-00000.array_record").unlink()
    capsys.readouterr()
    assert train_main(["--config", str(CONFIG), *args, "steps=" + str(kept[-1] + 2)]) == 2  # fails before the model
    line = _one_error_line(capsys.readouterr().err)
    assert f"the records in {run_dir / 'data'} changed since the checkpoint at step {kept[-1]}" in line
    assert "shard-00000.array_record is missing (8 records)" in line and "The checkpoint is fine" in line
    assert "corrupt" not in line and _steps(run_dir) == kept  # nothing touched

    r = _train([*args, "steps=" + str(kept[-1] + 2), "data.on_change=restart"], cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoint step {kept[-1]} does not restore" in r.stdout
    assert f"records changed since step {kept[-2]}" in r.stdout and "restarts on the 16 records" in r.stdout
    assert f"resumed at step {kept[-2]}" in r.stdout and f"finished at step {kept[-1] + 2}" in r.stdout
    assert (run_dir / "damaged_checkpoints" / str(kept[-1]) / "meta").is_dir()  # moved aside, not deleted
    assert kept[-1] + 2 in _steps(run_dir)
    _assert_finite_checkpoints(run_dir, _steps(run_dir))


# ------------------------------------------------------------------------------------ multi-host
def _metric_lines(run_dir):
    by_step = collections.defaultdict(list)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            by_step[d["step"]].append(d)
    return by_step


def test_lost_peer_stops_the_survivor_then_both_resume_bit_identically(tmp_path, cache):
    """SIGKILL one process of a 2-process jax.distributed run (process 1, mid-run): the survivor's next
    collective fails, it exits 2 within seconds with one line (it does not hang); restarting both resumes from
    the last checkpoint and the re-run steps repeat the lost ones bit for bit."""
    run_dir = tmp_path / "mp"
    # synchronous saves: the checkpoint at step 4 is committed before step 5 runs, so the kill after step 5 finds
    # it on disk however slow the machine (an asynchronous save still in flight dies uncommitted with its peer)
    args = [f"run_dir={run_dir}", "steps=8", "checkpoint.every=4", "checkpoint.async_save=false", "mesh.data=2",
            "data.synthetic.num_records=16", "distributed.heartbeat_timeout_s=10", *QUIET]

    def launch(tag):
        port = free_port()
        return [start_train(CONFIG, [*args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                     "--process-id", str(i)], cache_dir=cache, log_path=tmp_path / f"{tag}{i}.log")
                for i in range(2)]

    procs = launch("first")
    try:
        wait_for_step(procs[0], run_dir, 5, timeout=400)  # past the checkpoint at 4: the kill loses steps
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=60)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert rc == 2 and waited < 30, (rc, waited)
    line = _one_error_line((tmp_path / "first0.log").read_text())
    assert "lost contact with another process of this 2-process run" in line and "restart all processes" in line
    before = _metric_lines(run_dir)
    killed_at = max(before)
    assert killed_at < 8 and _steps(run_dir)

    procs = launch("second")
    codes = [p.wait(timeout=400) for p in procs]
    assert codes == [0, 0], [(tmp_path / f"second{i}.log").read_text()[-2000:] for i in range(2)]
    assert "resumed at step" in (tmp_path / "second0.log").read_text()
    after = _metric_lines(run_dir)
    assert sorted(after) == list(range(1, 9))
    rerun = [s for s in after if len(after[s]) > 1]
    assert rerun  # the steps after the last checkpoint ran twice ...
    for s in rerun:  # ... with the same numbers, bit for bit
        first, again = after[s][0], after[s][-1]
        assert all(first[k] == again[k] for k in KEYS), (s, first, again)
    _assert_finite_checkpoints(run_dir, _steps(run_dir))


SUPERVISED = r"""
import os, signal, sys, time
from facecrafter_jax.train.supervise import supervise

def child():
    if sys.argv[1] == "abort":  # what the JAX runtime does when the coordination service reports a dead peer
        sys.stderr.write("step 1/3\r"); sys.stderr.flush()
        sys.stderr.write("[train] an ordinary line\n"); sys.stderr.flush()
        os.write(2, b"E0101 00:00:00.1 7 coordination_service_agent.cc:289] Polled an error from coordination service\n"
                    b"F0101 00:00:00.2 7 client.h:80] Terminating process because the JAX distributed service detected "
                    b"fatal errors. Task 1 heartbeat timeout\n*** Check failure stack trace: ***\n    @ 0x7f00 SendToLog\n")
        os.abort()
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))  # the trainer saves and leaves on SIGTERM
    print("ready", flush=True)
    time.sleep(60)
    return 1

sys.exit(supervise(child))
"""


def test_supervisor_turns_a_runtime_abort_into_one_line_and_forwards_sigterm(tmp_path):
    """The supervisor of multi-process runs (train/supervise.py) on a child that dies as the JAX runtime makes it
    die when a peer is lost (fatal log lines, then abort): output before passes through byte for byte, the report
    goes to a log file, one line replaces it; SIGTERM to the supervisor reaches the child."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", SUPERVISED, "abort"], cwd=REPO, env=env, capture_output=True, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.startswith("step 1/3\r[train] an ordinary line\n"), err
    line = _one_error_line(err)
    assert "lost contact with another process" in line and "process 1 sent no heartbeat" in line
    assert "Check failure" not in err and "client.h" not in err
    log = Path(line.split("runtime log: ")[1].rstrip(")"))
    assert b"Check failure stack trace" in log.read_bytes()
    log.unlink()
    p = subprocess.Popen([sys.executable, "-c", SUPERVISED, "wait"], cwd=REPO, env=env, stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"ready\n"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 7  # the child's own exit status


# ------------------------------------------------------------------------------------ data_prep killed
HARNESS = r'''
import sys, time, zlib
import numpy as np
import data_prep.run as R

class Extractor:  # stand-in for MediaPipe + alignment (tests/test_data_prep.py runs the real ones)
    def __init__(self, landmarker, settings):
        self.res = settings.resolution
    def __call__(self, root, image_id):
        if "bad" in image_id:
            return {"image_id": image_id, "status": "skipped", "reason": "no_face", "detail": "stand-in"}
        rng = np.random.default_rng(zlib.crc32(image_id.encode()))
        u8 = lambda *s: rng.integers(0, 255, s, dtype=np.uint8)
        return {"image_id": image_id, "status": "ok", "image": u8(self.res, self.res, 3), "arcface_crop": u8(112, 112, 3),
                "emonet_crop": u8(256, 256, 3), "landmarks": rng.random((478, 3), dtype=np.float32),
                "head_pose": np.zeros(3, np.float32), "meta": {"stand_in": True}}
    def close(self):
        pass

def load_models(arcface, emonet, vae, resolution, batch_size):  # stand-ins for ArcFace / EmoNet / VAE
    delay = float(sys.argv[1])
    def arc(x):
        time.sleep(delay)
        v = np.random.default_rng(len(x)).standard_normal((len(x), 512)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    def emo(x):
        return np.concatenate([np.full((len(x), 8), 0.125), np.zeros((len(x), 2))], 1).astype(np.float32)
    def lat(x):
        s = resolution // 8
        return np.concatenate([np.ones((len(x), s, s, 4)), -np.ones((len(x), s, s, 4))], -1).astype(np.float32)
    return arc, emo, lat

R.load_models, R.make_extractor = load_models, Extractor
from data_prep.__main__ import main
sys.exit(main(sys.argv[2:]))
'''


def test_data_prep_killed_mid_shard_then_rerun_completes(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    names = [f"img_{i:02d}.png" if i % 7 else f"bad_{i:02d}.png" for i in range(40)]
    for n in names:
        (images / n).write_bytes(b"stand-in")
    models = tmp_path / "models"
    models.mkdir()
    for f in ("face_landmarker.task", "arcface.onnx", "emonet_8.pth"):
        (models / f).write_bytes(b"")
    (models / "vae").mkdir()
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    out = tmp_path / "out"
    argv = ["run", "--images", str(images), "--out", str(out), "--landmarker", str(models / "face_landmarker.task"),
            "--arcface", str(models / "arcface.onnx"), "--emonet", str(models / "emonet_8.pth"), "--vae",
            str(models / "vae"), "--resolution", "64", "--workers", "0", "--batch-size", "2", "--shard-size", "3",
            "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(harness), "0.15", *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while not ((out / "shard-00002.array_record").exists() and any(out.glob("shard-*.array_record.tmp"))):
            assert proc.poll() is None and time.monotonic() - t0 < 120, "finished before the kill"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # while the fourth shard is being written
        assert proc.wait() == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines_before = (out / "manifest.jsonl").read_text().splitlines()
    assert 0 < len(lines_before) < len(names) and list(out.glob("shard-*.array_record.tmp"))  # killed mid-shard
    r = subprocess.run([sys.executable, str(harness), "0", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ids = [json.loads(line)["image_id"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert collections.Counter(ids) == collections.Counter(names)  # every image exactly once
    entries = {json.loads(line)["image_id"]: json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()}
    stored = [rec["image_id"] for rec in R.iter_records(out)]
    assert sorted(stored) == sorted(i for i, e in entries.items() if e["status"] == "ok")  # each ok image once
    assert len(stored) == len(set(stored)) == sum(not n.startswith("bad") for n in names)
    report = verify_dataset(out, hashes=True)
    assert report.ok and report.hashed and report.num_records == len(stored), report.problems
    assert not list(out.glob("*.tmp"))
