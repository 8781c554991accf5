"""The toy study's arithmetic (facecrafter_jax/toy/ablation_report.py) against closed forms on synthetic cells:
paired differences with per-identity standard errors, the claim rows and their verdicts, the AD choice. (The
study end to end on a tiny pipeline: tests/test_toy_pipeline.py.)"""

import math

import numpy as np
import pytest

from facecrafter_jax.toy.ablation_report import CLAIMS, Cells, ad_choice, claim_rows


def _entry(per_identity: dict, se: float = 0.1) -> dict:
    metrics = {}
    for k, v in per_identity.items():
        metrics[k], metrics[f"{k}_se"] = float(np.mean(v)), se
    return {"metrics": metrics, "per_identity": {k: list(map(float, v)) for k, v in per_identity.items()}}


def _cells(values: dict, seeds=(0, 1, 2)) -> Cells:
    """values[(model, set)][metric] -> function(seed) -> per-identity array."""
    cells = {}
    for s in seeds:
        cells[s] = {}
        for (model, set_label), metrics in values.items():
            cells[s].setdefault(model, {"sets": {}})["sets"][set_label] = _entry({k: f(s) for k, f in metrics.items()})
    return Cells(cells)


def test_paired_difference_uses_the_per_identity_differences():
    rng = np.random.default_rng(0)
    shared = [rng.normal(1.0, 0.5, 32) for _ in range(3)]  # identity effects both sets share (same conditions)
    gain = [rng.normal(0.1, 0.02, 32) for _ in range(3)]
    cells = _cells({("joint", "ID-only"): {"expr_div": lambda s: shared[s] + gain[s]},
                    ("no_ad", "ID-only"): {"expr_div": lambda s: shared[s]}})
    d = cells.difference(("joint", "ID-only"), ("no_ad", "ID-only"), "expr_div")
    per_seed = np.array([g.mean() for g in gain])
    within = np.array([g.std(ddof=1) / math.sqrt(32) for g in gain])
    between = per_seed.var(ddof=1) / 3
    assert d.mean == pytest.approx(per_seed.mean())
    assert d.se == pytest.approx(math.sqrt(max(between, np.mean(within ** 2) / 3)))
    # the shared identity effects cancel: far tighter than the unpaired sqrt(se_a^2 + se_b^2) = 0.14 per seed
    assert d.se < 0.01
    v = cells.value("no_ad", "ID-only", "expr_div")
    means = np.array([x.mean() for x in shared])
    assert v.mean == pytest.approx(means.mean())
    assert v.se == pytest.approx(math.sqrt(max(means.var(ddof=1) / 3, 0.01 / 3)))  # cells' SE 0.1 as the floor
    # without per-identity values (FD): the conservative unpaired within-seed SE
    for s in cells.seeds:
        for m in ("joint", "no_ad"):
            e = cells.cells[s][m]["sets"]["ID-only"]
            e["metrics"]["fd_full"], e["metrics"]["fd_full_se"] = 1.0 + 0.01 * s + (m == "joint") * 0.05, 0.03
    fd = cells.difference(("joint", "ID-only"), ("no_ad", "ID-only"), "fd_full")
    assert fd.mean == pytest.approx(0.05) and fd.se == pytest.approx(math.sqrt(2 * 0.03 ** 2 / 3))


def test_claim_rows_and_verdicts_follow_the_numbers():
    k = np.arange(16) / 16.0
    base = {"pose_div_deg": lambda s: 8 + k + 0.1 * s, "expr_div": lambda s: 0.8 + k / 10, "emotion_entropy":
            lambda s: 1.0 + k / 10, "id_top1": lambda s: 0.6 + k / 10}
    joint_io = {"pose_div_deg": lambda s: 11 + k + 0.1 * s, "expr_div": lambda s: 0.8 + k / 10 + 0.001 * (s - 1),
                "emotion_entropy": lambda s: 0.7 + k / 10, "id_top1": lambda s: 0.6 + k / 10 + 0.005 * (s - 1)}
    ctl = {"pose_mae_deg": lambda s: 5 + k, "landmark_nme": lambda s: 0.05 + k / 100, "emotion_acc": lambda s: 0.3 + k / 10}
    cells = _cells({("base", "ID-only"): base, ("joint", "ID-only"): joint_io, ("joint", "ID+LMK"): ctl,
                    ("stage_a", "ID+LMK"): ctl})
    rows = {r.claim: r for r in claim_rows(cells, {}, identity_margin=0.05, parameter_percent=5.4)}
    # only the claims whose cells exist (no no_ad, stage b, ID+EMO, ID+LMK+EMO here), plus the parameter count
    want = [c for c, _, a, b, _ in CLAIMS if cells.has(*a) and cells.has(*b)]
    assert list(rows)[:-1] == want and len(want) == 6
    assert rows["1. ID-only: more diverse poses than Arc2Face"].result == "yes"  # +3 deg, identical spread
    assert rows["1. ID-only: more diverse poses than Arc2Face"].diff.mean == pytest.approx(3.0)
    assert rows["1. ID-only: more diverse emotions than Arc2Face"].result == "no"  # -0.3 bits: the opposite
    assert rows["1. ID-only: more diverse expressions than Arc2Face"].result == "inconclusive"  # +-0.001 around 0
    assert rows["1. ... at similar identity similarity"].result == "yes"  # within +-0.05 with +-2 SE
    assert rows["3. joint beats stage a on pose control"].result == "inconclusive"  # identical: z = 0
    p = rows["5. ~5% extra parameters (SD1.5 UNet, closed-form count)"]
    assert p.result == "yes" and p.diff.mean == pytest.approx(0.4)
    assert claim_rows(cells, {}, identity_margin=0.05, parameter_percent=7.0)[-1].result == "no"


def test_ad_choice_takes_the_largest_gain_whose_control_holds():
    k = np.arange(16) / 16.0

    def model(expr_gain, pose_mae):
        return {("ID-only",): {"expr_div": lambda s: 1 + k + expr_gain + 0.001 * s},
                ("ID+LMK+EMO",): {"pose_mae_deg": lambda s: 5 + k + pose_mae, "emotion_acc": lambda s: 0.3 + k / 10}}

    specs = {"no_ad": model(0.0, 0.0), "joint": model(0.05, 0.0), "ad_weight_1": model(0.2, 3.0),  # control breaks
             "ad_map_overlap": model(0.1, 0.0)}
    cells = _cells({(m, s[0]): v for m, d in specs.items() for s, v in d.items()})
    variants = {"joint": {"group": "joint", "ad": {"reading": "orthogonality", "weight": 0.1}},
                "no_ad": {"group": "ad", "ad": {"reading": "orthogonality", "weight": 0.0}},
                "ad_weight_1": {"group": "ad", "ad": {"reading": "orthogonality", "weight": 1.0}},
                "ad_map_overlap": {"group": "ad", "ad": {"reading": "map_overlap", "weight": 0.1}}}
    choice = ad_choice(cells, variants)
    assert choice["chosen"] == "ad_map_overlap" and choice["significant"]
    by = {c["variant"]: c for c in choice["candidates"]}
    assert not by["ad_weight_1"]["control_ok"] and by["joint"]["control_ok"]
    assert by["ad_map_overlap"]["expr_div_gain"]["mean"] == pytest.approx(0.1)
    assert ad_choice(_cells({("joint", "ID-only"): {"expr_div": lambda s: k}}), variants) is None  # no no_ad cells
    # gains within the noise: the configured setting (joint) is kept, whichever gain is largest
    noisy = {"no_ad": model(0.0, 0.0), "joint": model(0.0, 0.0), "ad_map_overlap": model(0.0, 0.0),
             "ad_weight_1": model(0.0, 0.0)}
    cells = _cells({(m, s[0]): v for m, d in noisy.items() for s, v in d.items()})
    for s in cells.seeds:  # +-0.01 per seed on ad_map_overlap: mean gain 0.0033, far from significant
        e = cells.cells[s]["ad_map_overlap"]["sets"]["ID-only"]
        e["per_identity"]["expr_div"] = list(np.add(e["per_identity"]["expr_div"], 0.01 * (s - 1) + 0.0033))
        e["metrics"]["expr_div"] = float(np.mean(e["per_identity"]["expr_div"]))
    choice = ad_choice(cells, variants)
    assert choice["chosen"] == "joint" and not choice["significant"]


def test_study_configs_and_variants():
    """The CPU and accelerator study configs differ only in the toy pipeline they run; the variants are built
    around the configured stage c, and bad input names the key or variant."""
    from facecrafter_jax.toy.ablation import AblationConfig, load_ablation_config, study_variants
    from facecrafter_jax.train.config import ConfigError, load_config
    from facecrafter_jax.train.testing import REPO

    cpu = load_ablation_config(str(REPO / "configs/toy/ablation.yaml"))
    gpu = load_ablation_config(str(REPO / "configs/toy/ablation_gpu.yaml"))
    assert cpu.toy_config == "configs/toy/pipeline.yaml" and gpu.toy_config == "configs/toy/pipeline_gpu.yaml"
    assert {k: v for k, v in vars(cpu).items() if k != "toy_config"} == {k: v for k, v in vars(gpu).items()
                                                                          if k != "toy_config"}
    assert cpu.seeds >= 3 and len(cpu.ad_weights) >= 2  # >= 3 AD weights with 0 and the configured one
    joint = load_config(str(REPO / "configs/toy/stage_c_joint.yaml"), [])
    v = study_variants(joint, cpu)
    reading, weight = joint.loss.ad_reading, joint.loss.ad_weight
    assert v["joint"].overrides == () and v["joint"].ad == {"reading": reading, "weight": weight}
    assert v["no_ad"].overrides == ("loss.ad_weight=0",)
    from facecrafter_jax.losses import AD_LOSSES

    assert {n for n in v if n.startswith("ad_") and not n.startswith("ad_weight")} == {f"ad_{r}" for r in AD_LOSSES
                                                                                       if r != reading}
    assert len({w.ad["weight"] for w in v.values() if w.ad.get("reading") == reading}) >= 3
    assert v["switched_off"].absent == "switched_off" and "conditioning.absent=switched_off" in v["switched_off"].overrides
    assert v["other_photo"].overrides == ("data.other_photo_identity=0.5",)
    for name, var in v.items():  # every variant's overrides make a valid stage-c config
        load_config(str(REPO / "configs/toy/stage_c_joint.yaml"), list(var.overrides))
    assert list(study_variants(joint, AblationConfig(variants=("joint", "no_ad")))) == ["joint", "no_ad"]
    with pytest.raises(ValueError, match="nope"):
        study_variants(joint, AblationConfig(variants=("joint", "nope")))
    with pytest.raises(ValueError, match="must include 'joint'"):
        study_variants(joint, AblationConfig(variants=("no_ad",)))
    with pytest.raises(ConfigError, match="seeds"):
        AblationConfig(seeds=0)
    with pytest.raises(ConfigError, match="seedz"):
        load_ablation_config(str(REPO / "configs/toy/ablation.yaml"), ["seedz=2"])
