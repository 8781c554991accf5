"""The toy pipeline (``python train.py`` with no arguments) end to end at a tiny size: every stage runs,
writes its done record and its outputs (records, converted folders that load, report with every set, images);
running again skips every stage; an interrupted pipeline continues at the first unfinished stage; another
config in the same folder is an error naming the key. (The full-size run and its numbers: docs/results.md.)"""

import json
import shutil

import numpy as np
import pytest

from facecrafter_jax.toy.pipeline import STAGE_NAMES, ToyPipeline, load_pipeline_config
from facecrafter_jax.train.config import ConfigError
from facecrafter_jax.train.testing import REPO

TINY = ["base_images=96", "adapter_images=96", "test_images=32", "world.num_identities=6", "analysers.steps=6", "vae.steps=4",
        "vae.stats_images=64", "stages.base.steps=3", "stages.landmark.steps=2", "stages.emotion.steps=2",
        "stages.joint.steps=2", "evaluation.identities=3", "evaluation.per_identity=2", "evaluation.num_steps=2",
        "evaluation.batch_size=8", "evaluation.bootstrap=5", "evaluation.probe_images=8"]


def _cfg(out, *extra):
    return load_pipeline_config(str(REPO / "configs" / "toy" / "pipeline.yaml"), [f"out={out}", *TINY, *extra])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny pipeline, run in two goes (until records, then the rest): (out, done stages after the first go,
    log of the second go, results of the second go). Shared by the pipeline test and the study test."""
    out = tmp_path_factory.mktemp("tiny") / "toy"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # stage configs are repository paths
        p = ToyPipeline(_cfg(out), log=lambda line: None)
        p.run(until="records")
        first = [n for n in STAGE_NAMES if p.done(n)]
        logs = []
        results = ToyPipeline(_cfg(out), log=logs.append).run()  # a new process would do the same: continue
    return out, first, logs, results


def test_toy_pipeline_end_to_end_and_resume(tiny_run, monkeypatch):
    monkeypatch.chdir(REPO)
    out, first, logs, results = tiny_run
    assert first == ["render", "analysers", "vae", "records"]
    p = ToyPipeline(_cfg(out), log=logs.append)
    assert all(p.done(n) for n in STAGE_NAMES)
    assert sum("skipped" in line for line in logs) == 4

    # outputs
    from facecrafter_jax.data import records as R
    from facecrafter_jax.data.identities import read_identity_labels
    from facecrafter_jax.pretrained import read_manifest

    for split in ("base", "adapter"):
        info = R.read_dataset_info(out / "data" / "records" / split)
        assert info["num_records"] == 96 and info["latent_side"] == 16
        with np.load(out / "data" / f"{split}.npz") as z:  # the render stage's identities, in record order
            want = [f"id{int(k):04d}" for k in z["identity"]]
        assert read_identity_labels(out / "data" / "records" / split) == want
    assert set(read_manifest(str(out / "base_model"))["components"]) == {"unet", "text_encoder", "vae"}
    assert set(read_manifest(str(out / "facecrafter"))["components"]) == {"unet", "text_encoder", "vae", "adapters"}
    report = json.loads((out / "report.json").read_text())
    sets = [r["set"] for r in report["rows"]]
    assert sets[0].startswith("real renders") and "joint: ID+LMK+EMO" in sets and len(sets) == 11
    assert [r["table"] for r in report["rows"] if r["set"] == "joint: ID-only (null tokens)"] == ["id_only"]
    assert sets[2:4] == ["base: ID", "base: ID, its own celebrity photo per sample"]
    for r in report["rows"]:
        assert 0.0 <= r["id_top1"] <= 1.0 and 0.0 <= r["emotion_acc"] <= 1.0 and r["pose_mae_deg"] >= 0.0
        assert np.isfinite(r["fd_base"]) and np.isfinite(r["fd_full"]) and r["n"] == 6
        assert np.isfinite(r["pose_div_deg"]) and "id_top1_se" in r
        # every sample on its own photo: no one reference, so no copy metrics
        assert ("pose_copy" in r) == (r["set"] != "base: ID, its own celebrity photo per sample")
        assert r.get("pose_copy", 0.0) >= 0.0
    assert set(report["arcface_leakage"]) >= {"r2_yaw", "r2_expression", "emotion_acc"}
    assert set(report["split_statistics"]) == {"base", "adapter", "test", "test_base"}
    probe = report["control_probe"]
    assert set(probe) == {"stage a", "stage b", "joint"} and set(probe["joint"]) >= {"landmark", "emotion"}
    assert all(np.isfinite(g) for pr in probe.values() for c in ("landmark", "emotion") if c in pr for g in pr[c]["gain"])
    md = (out / "report.md").read_text()
    assert "## Control probe" in md and "| joint | emotion |" in md
    for s in sets:
        assert f"| {s} |" in md
    assert "## ID-only sampling" in md and "## Acceptance checks" in md
    for img in ("comparison.png", "id_only.png", "emotion_sweep.png", "pose_sweep.png"):
        assert (out / "images" / img).stat().st_size > 1000
    assert results["joint"]["result"]["steps"] == 2

    # everything done: a third run only skips
    logs.clear()
    ToyPipeline(_cfg(out), log=logs.append).run()
    assert sum("skipped" in line for line in logs) == len(STAGE_NAMES)

    # another config in the same folder
    with pytest.raises(ConfigError, match="stages.base.steps"):
        ToyPipeline(_cfg(out, "stages.base.steps=5"), log=logs.append).run()

    # the base-probe tool (docs/toy_world.md) on the pipeline's own base model, copied in: nothing is trained
    from facecrafter_jax.toy.base_probe import run_base_probe

    shutil.copytree(out / "base_model", out / "probes" / "own" / "model")
    row = run_base_probe(ToyPipeline(_cfg(out), log=logs.append), "own", identities=3, per_identity=2)
    for key in ("id_top1", "fd", "pose_div_deg", "pose_copy", "yaw_copy_slope", "emotion_copy"):
        assert np.isfinite(row[key][0]) and np.isfinite(row["real"][key][0]), key
    assert row["final_diffusion_loss"] is None  # not retrained
    assert json.loads((out / "probes" / "log.jsonl").read_text().splitlines()[-1])["name"] == "own"
    assert (out / "probes" / "own" / "grid.png").stat().st_size > 1000
    assert set(row["fd_parts"]) == {"all", "identity", "emotion", "pose"}
    assert row["fd_parts"]["all"] == pytest.approx(row["fd"][0], rel=1e-6)

    # --reference celebrity: the same targets, each identity conditioned on a celebrity-split photo instead
    from facecrafter_jax.toy.base_probe import probe_context
    from facecrafter_jax.toy.splits import sample_split

    p = ToyPipeline(_cfg(out), log=logs.append)
    seed = p.cfg.evaluation.seed
    full, celeb = probe_context(p, 3, 2, seed), probe_context(p, 3, 2, seed, "celebrity")
    ids = np.asarray(full.cond["identities"])
    ref = p.world.render(sample_split(p.world, p.split_of("base"), len(ids), 3800 + seed, p.celebrity, identity=ids))
    np.testing.assert_array_equal(celeb.cond["ref_images"], ref)
    np.testing.assert_allclose(celeb.cond["arcface"], np.repeat(p.arcface(ref), 2, axis=0), rtol=1e-6)
    np.testing.assert_array_equal(celeb.cond["images"], full.cond["images"])
    assert not np.allclose(celeb.cond["arcface"], full.cond["arcface"])
    assert len(celeb.cond["decoy_images"]) == len(full.cond["decoy_images"])
    row = run_base_probe(p, "own", identities=3, per_identity=2, reference="celebrity")
    assert row["reference"] == "celebrity" and np.isfinite(row["fd_parts"]["all"])
    assert (out / "probes" / "own" / "grid_celebrity.png").is_file()
    with pytest.raises(ValueError, match="reference"):
        probe_context(p, 3, 2, seed, "photo")
    # celebrity_each: every condition its own celebrity photo of its identity; no copy metrics
    each = probe_context(p, 3, 2, seed, "celebrity_each")
    who = np.asarray(full.cond["identity"])
    photos = p.world.render(sample_split(p.world, p.split_of("base"), len(who), 4100 + seed, p.celebrity, identity=who))
    np.testing.assert_allclose(each.cond["arcface"], p.arcface(photos), rtol=1e-6)
    np.testing.assert_array_equal(each.cond["ref_images"], photos[::2])
    row = run_base_probe(p, "own", identities=3, per_identity=2, reference="celebrity_each")
    assert "pose_copy" not in row and "emotion_copy" not in row and "pose_copy" not in row["real"]
    assert np.isfinite(row["id_top1"][0]) and np.isfinite(row["fd_parts"]["emotion"])


def test_vae_probe_on_the_tiny_pipeline(tiny_run, monkeypatch):
    """`python -m facecrafter_jax.toy vae-probe`: the pipeline's own VAE measured on the base-split renders of the
    conditioning identities (PSNR against NumPy on the same renders, FD ratio = FD(reconstructions) / FD(real));
    a trained variant carries its overrides, is saved and not retrained; bad keys are errors naming them."""
    from facecrafter_jax.pretrained import load_pretrained
    from facecrafter_jax.toy import measure as MS
    from facecrafter_jax.toy.splits import sample_split
    from facecrafter_jax.toy.vae_probe import main as probe_main, run_vae_probe
    from facecrafter_jax.toy.vae_training import reconstruct

    monkeypatch.chdir(REPO)
    out = tiny_run[0]
    p = ToyPipeline(_cfg(out), log=lambda line: None)
    own = run_vae_probe(p, "own", identities=3, per_identity=2)
    ev = p.cfg.evaluation
    cond = MS.make_conditions(p.world, p.arcface, 3, 2, ev.seed)
    real = p.world.render(sample_split(p.world, p.split_of("base"), 6, 3600 + ev.seed, p.celebrity,
                                       identity=cond["identity"]))
    recon = reconstruct(load_pretrained(str(out / "vae"), components=("vae",)).vae, real)
    mse = np.mean((real.astype(np.float64) - recon.astype(np.float64)) ** 2)
    assert own["psnr"] == pytest.approx(10 * np.log10(255.0 ** 2 / mse), rel=1e-9)
    assert own["samples"] == 6 and own["config"]["steps"] == 4 and own["train_s"] == 0.0
    assert own["fd_ratio"] == pytest.approx(own["recon"]["fd"] / own["real"]["fd"])
    assert 0.0 <= own["recon"]["id_top1"][0] <= 1.0 and np.isfinite(own["recon"]["fd"])

    row = run_vae_probe(p, "short", ["steps=2", "decoder_noise=0.25"], identities=3, per_identity=2)
    assert row["config"]["steps"] == 2 and row["config"]["decoder_noise"] == 0.25 and row["train_s"] > 0
    assert (out / "probes" / "vae_short" / "vae").is_dir()
    assert (out / "probes" / "vae_short" / "reconstructions.png").stat().st_size > 500
    again = run_vae_probe(p, "short", ["steps=2", "decoder_noise=0.25"], identities=3, per_identity=2)
    assert again["train_s"] == 0.0 and again["psnr"] == row["psnr"]  # loaded, not retrained
    lines = (out / "probes" / "vae_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["name"] for x in lines[-3:]] == ["own", "short", "short"]
    with pytest.raises(ConfigError, match="stepz"):
        run_vae_probe(p, "bad", ["stepz=3"])
    assert probe_main(["bad", "stepz=3", "--pipeline", f"out={out}", *[f"--pipeline={t}" for t in TINY]]) == 2


def test_study_on_the_tiny_pipeline(tiny_run, monkeypatch):
    """`python -m facecrafter_jax.toy ablation` at a tiny size: every cell, resumable per variant and seed, the
    claim table's numbers recomputed from the stored cells, verdicts that follow from them, plots."""
    from facecrafter_jax.toy import ablation as A
    from facecrafter_jax.toy.claims import Z_THRESHOLD

    monkeypatch.chdir(REPO)
    out = tiny_run[0]
    study = ["seeds=2", "variants=[joint]"]  # the AD comparisons' arithmetic: tests/test_toy_ablation.py
    logs = []
    cfg = A.load_ablation_config(str(REPO / "configs/toy/ablation.yaml"), study)
    res = A.run_study(ToyPipeline(_cfg(out), log=logs.append), cfg, docs=str(out / "docs"))
    root = out / "ablation"
    models = ["real", "base", "stage_a", "stage_b", "joint"]
    for s in (0, 1):
        for m in models:
            assert (root / "cells" / f"seed{s}" / f"{m}.json").is_file(), (s, m)
    assert sum("training stage c" in line for line in logs) == 2
    cells = {s: {m: json.loads((root / "cells" / f"seed{s}" / f"{m}.json").read_text()) for m in models} for s in (0, 1)}
    assert set(cells[0]["joint"]["sets"]) == {"ID-only", "ID+LMK", "ID+EMO", "ID+LMK+EMO"}
    e = cells[1]["joint"]["sets"]["ID+LMK+EMO"]
    for k in ("id_top1", "emotion_acc", "pose_mae_deg", "pose_div_deg", "expr_div", "emotion_entropy"):
        assert np.mean(e["per_identity"][k]) == pytest.approx(e["metrics"][k]), k  # 3 identities of 2 samples
        assert len(e["per_identity"][k]) == 3
    # a claim row recomputed from the cells by hand: paired per seed, SE = max(between, within) over seeds
    row = next(r for r in res["claims"] if r["claim"] == "1. ID-only: more diverse expressions than Arc2Face")
    a = [cells[s]["joint"]["sets"]["ID-only"] for s in (0, 1)]
    b = [cells[s]["base"]["sets"]["ID-only"] for s in (0, 1)]
    d = np.array([x["metrics"]["expr_div"] - y["metrics"]["expr_div"] for x, y in zip(a, b)])
    w = [np.std(np.subtract(x["per_identity"]["expr_div"], y["per_identity"]["expr_div"]), ddof=1) / np.sqrt(3)
         for x, y in zip(a, b)]
    se = np.sqrt(max(d.var(ddof=1) / 2, np.mean(np.square(w)) / 2))
    assert row["difference"]["mean"] == pytest.approx(d.mean()) and row["difference"]["se"] == pytest.approx(se)
    for r in res["claims"]:
        z, diff = r["z"], r["difference"]
        if r["direction"] and diff["se"] > 0:
            assert z == pytest.approx(r["direction"] * diff["mean"] / diff["se"])
        want = "yes" if z >= Z_THRESHOLD else "no" if z <= -Z_THRESHOLD else "inconclusive"
        assert r["reproduced"] == want, r["claim"]
    md = (root / "results.md").read_text()
    assert "| claim | metric | FaceCrafter (variant)" in md and "## Controls" in md
    assert "1. ID-only: more diverse expressions than Arc2Face" in md and "5. better emotion control" in md
    for name in ("diversity", "controls", "ad_tradeoff"):
        assert (root / f"ablation_{name}.png").stat().st_size > 1000
        assert (out / "docs" / "images" / f"ablation_{name}.png").is_file()
    assert not any(p.is_dir() for p in (root / "joint" / "seed0" / "run").iterdir())  # checkpoints dropped
    assert (root / "joint" / "seed0" / "model" / "adapters").is_dir()

    # resumable: a lost cell is measured again, nothing retrained; the tables are the same numbers
    (root / "cells" / "seed1" / "joint.json").unlink()
    logs.clear()
    res2 = A.run_study(ToyPipeline(_cfg(out), log=logs.append), cfg)
    assert not any("training stage c" in line for line in logs)
    assert sum("seed 1 joint: trained earlier" in line for line in logs) == 1
    assert sum("ID-only pose div" in line for line in logs) == 1  # only the lost cell was sampled again
    assert [r["difference"]["mean"] for r in res2["claims"]] == pytest.approx([r["difference"]["mean"]
                                                                              for r in res["claims"]])

    # errors name what is wrong
    with pytest.raises(ValueError, match="nope"):
        A.run_study(ToyPipeline(_cfg(out)), A.load_ablation_config(str(REPO / "configs/toy/ablation.yaml"),
                                                                     ["variants=[joint,nope]"]))
    assert A.main(["--config", str(REPO / "configs/toy/ablation.yaml"), "seeds=0"]) == 2
    assert A.main(["--config", str(REPO / "configs/toy/ablation.yaml"), "seedz=2"]) == 2


def test_pipeline_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="'evaluation.per_identity'"):
        _cfg(tmp_path, "evaluation.per_identity=1")
    with pytest.raises(ConfigError, match="stages.joint.stepz"):
        _cfg(tmp_path, "stages.joint.stepz=1")
    with pytest.raises(ValueError, match="unknown stage"):
        ToyPipeline(_cfg(tmp_path)).run(until="nope")


def test_gpu_profile_is_the_cpu_pipeline_at_ten_times():
    """configs/toy/pipeline_gpu.yaml: ~10x the steps, renders and samples per set of the CPU defaults, nothing
    else changed (same world, splits, models, sampler)."""
    from facecrafter_jax.toy.pipeline import load_pipeline_config

    cpu = load_pipeline_config(str(REPO / "configs/toy/pipeline.yaml"))
    gpu = load_pipeline_config(str(REPO / "configs/toy/pipeline_gpu.yaml"))
    for name in ("base", "landmark", "emotion", "joint"):
        c, g = getattr(cpu.stages, name), getattr(gpu.stages, name)
        assert g.config == c.config and g.steps == 10 * c.steps, name
    assert gpu.base_images == 10 * cpu.base_images and gpu.adapter_images == 10 * cpu.adapter_images
    assert gpu.analysers["steps"] == 10 * cpu.analysers["steps"] and gpu.vae["steps"] == 10 * cpu.vae["steps"]
    assert {k: v for k, v in gpu.vae.items() if k != "steps"} == {k: v for k, v in cpu.vae.items() if k != "steps"}
    assert {k: v for k, v in gpu.analysers.items() if k != "steps"} == {k: v for k, v in cpu.analysers.items()
                                                                         if k != "steps"}
    ev_c, ev_g = cpu.evaluation, gpu.evaluation
    assert ev_g.identities * ev_g.per_identity == 10 * ev_c.identities * ev_c.per_identity >= 2560
    for k in ("num_steps", "scheduler", "guidance_id", "guidance_control", "seed"):
        assert getattr(ev_g, k) == getattr(ev_c, k), k
    assert (gpu.world, gpu.base_split, gpu.celebrity, gpu.seed) == (cpu.world, cpu.base_split, cpu.celebrity, cpu.seed)


def test_stage_table_prints_step_counts_as_integers(tmp_path):
    """The report's stage table: a stage's wall / CPU seconds, and the VAE's info with integers as written
    (10000 steps, not 1e+04) and floats to 4 significant digits; the total sums the stages."""
    from facecrafter_jax.toy.report import _stage_table

    p = ToyPipeline(_cfg(tmp_path / "run"))
    p._mark_done("render", 38.0, {}, cpu_seconds=65.0)
    p._mark_done("vae", 356.2, {"info": {"steps": 10000, "psnr": 29.60354, "scaling_factor": 0.0055664,
                                          "history": [1.0, 0.5]}}, cpu_seconds=638.0)
    table = _stage_table(p, evaluate_seconds=152.0)
    assert "| vae | 356 | 638 |" in table
    assert "steps 10000, psnr 29.6, scaling_factor 0.005566 |" in table
    assert "| evaluate | 152 | | | up to writing this report |" in table
    assert "**546** (9.1 min) | 703 |" in table


def test_acceptance_checks_fd_ratios():
    """The report's two FD checks divide the base's FD against fresh base-split renders by the real base-split
    renders' FD: the one-photo row (the issue's protocol) and the own-photo row (image quality), each against 1.3;
    without the own-photo row (an older report) only the first is listed."""
    from facecrafter_jax.toy.report import BASE_OWN, REAL_BASE, REAL_TARGETS, acceptance_checks

    def row(**kw):
        base = {"id_top1": 0.9, "id_top1_se": 0.04, "pose_div_deg": 6.0, "pose_div_deg_se": 0.2, "expr_div": 0.8,
                "expr_div_se": 0.02, "yaw_copy_slope": 0.3, "yaw_copy_slope_se": 0.1, "expr_copy": 0.9,
                "expr_copy_se": 0.02, "emotion_acc": 0.1, "pose_mae_deg": 9.0, "fd_base": 0.4}
        return {**base, **kw}

    by = {REAL_TARGETS: row(pose_div_deg=25.0, expr_div=1.1), REAL_BASE: row(fd_base=0.16),
          "base: ID": row(fd_base=0.42), BASE_OWN: row(fd_base=0.2),
          "joint: ID+LMK": row(pose_mae_deg=4.8), "joint: ID+EMO": row(emotion_acc=0.43)}
    fd = [(m, ok) for name, m, bar, ok in acceptance_checks(by) if "FD" in name]
    assert fd == [(f"{0.42 / 0.16:.2f}", False), (f"{0.2 / 0.16:.2f}", True)]
    assert len(acceptance_checks(by)) == 9
    del by[BASE_OWN]
    assert [m for name, m, _, _ in acceptance_checks(by) if "FD" in name] == [f"{0.42 / 0.16:.2f}"]
