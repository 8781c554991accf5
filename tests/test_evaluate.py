"""The evaluation CLI (facecrafter_jax.evaluation) end to end.

* Real analysers on real photos (skimage astronaut, a mirrored and rotated copies, a face-less coffee cup) with
  the real MediaPipe landmarker, a random stand-in ArcFace ONNX exported here and a random EmoNet checkpoint.
  Expected values come from an independent path: data_prep's ``FaceExtractor`` crops fed to onnxruntime
  directly and to the PyTorch EmoNet reference, MediaPipe detections read directly, formulas in NumPy.
* A fake backend with closed-form outputs (registered, and given as module:factory) checks the plumbing of
  every metric exactly and cheaply.
* Every input error is one line ``error: ...`` with exit status 2.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from facecrafter_jax import metrics as M
from facecrafter_jax.evaluation import analysers as ev_analysers
from facecrafter_jax.evaluation import cli as ev
from facecrafter_jax.evaluation.evaluate import METRIC_COLUMNS
from facecrafter_jax.evaluation.real import RealAnalysers
from facecrafter_jax.face.vocabulary import EMOTION_CLASSES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROP = 256  # resolution of the "generated" aligned crop


# ------------------------------------------------------------------------------------------ fixtures
def _save(img, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(img)).save(path)


def _samples_json(folder, files, identity, controls=None):
    """A samples.json with sample.py's layout (only the fields the evaluator reads, plus a few others)."""
    meta = {"tool": "sample.py", "identity": identity, "controls": controls or {},
            "settings": {"num_images": len(files), "seed": 0},
            "images": [{"file": f, "index": i, "seed": 0, "noise_index": i} for i, f in enumerate(files)]}
    (folder / "samples.json").write_text(json.dumps(meta, indent=2))


class Reference:
    """Independent expected values: data_prep's extractor + onnxruntime + the PyTorch EmoNet reference."""

    def __init__(self, landmarker, arcface, emonet_ref):
        import onnxruntime as ort

        from data_prep.extract import ExtractSettings, FaceExtractor
        from facecrafter_jax.face.landmarker import FaceLandmarker

        self.fx = FaceExtractor(landmarker, ExtractSettings(resolution=CROP, min_side=32))
        self.lmk = FaceLandmarker(landmarker)
        self.ort = ort.InferenceSession(arcface, providers=["CPUExecutionProvider"])
        self.emonet = emonet_ref
        self._extracted = {}

    def close(self):
        self.fx.close()
        self.lmk.close()

    def extract(self, path):
        key = str(path)
        if key not in self._extracted:
            r = self.fx(str(path.parent), path.name)
            assert r["status"] == "ok", r
            self._extracted[key] = r
        return self._extracted[key]

    def arcface(self, path):
        crop = self.extract(path)["arcface_crop"].astype(np.float32)
        x = ((crop - 127.5) / 127.5).transpose(2, 0, 1)[None]
        e = self.ort.run(None, {self.ort.get_inputs()[0].name: x})[0][0].astype(np.float64)
        return e / np.linalg.norm(e)

    def emotion(self, path):
        crop = self.extract(path)["emonet_crop"].astype(np.float32) / 255.0
        with torch.no_grad():
            out = self.emonet(torch.from_numpy(crop.transpose(2, 0, 1)[None]))
        probs = torch.softmax(out["expression"], -1)[0].numpy().astype(np.float64)
        return probs, float(np.clip(out["valence"][0], -1, 1)), float(np.clip(out["arousal"][0], -1, 1))

    def detect(self, path):
        """Largest face of the image as the landmarker returns it: (landmarks [478, 3], pose [3])."""
        from facecrafter_jax.face.geometry import head_pose_from_matrix
        from facecrafter_jax.face.landmarker import select_largest_face

        img = np.asarray(Image.open(path).convert("RGB"))
        faces = self.lmk.detect(img)
        f = faces[select_largest_face(faces, img.shape[1], img.shape[0])]
        return f.landmarks.astype(np.float64), head_pose_from_matrix(f.matrix).astype(np.float64)


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_models):
    from emonet_reference import random_checkpoint
    from test_data_prep import TinyArcFace

    base = tmp_path_factory.mktemp("evaluate")
    models = base / "models"
    models.mkdir()
    torch.manual_seed(0)
    arc = TinyArcFace().eval()
    torch.onnx.export(arc, (torch.zeros(2, 3, 112, 112),), str(models / "arcface.onnx"), input_names=["input.1"],
                      output_names=["embedding"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    emonet_ref = random_checkpoint(models / "emonet_8.pth", seed=3)
    paths = {"landmarker": str(shared_models / "face_landmarker.task"), "arcface": str(models / "arcface.onnx"),
             "emonet": str(models / "emonet_8.pth")}
    ref = Reference(paths["landmarker"], paths["arcface"], emonet_ref)

    a = skimage.data.astronaut()
    photos = base / "photos"
    _save(a, photos / "astronaut.png")
    astro_emb = ref.arcface(photos / "astronaut.png")
    astro_lmk, astro_pose = ref.detect(photos / "astronaut.png")
    sets = base / "sets"

    # set "astro": the photo itself, its mirror and a face-less image; every target given
    d = sets / "astro"
    _save(a, d / "0000.png")
    _save(a[:, ::-1], d / "0001.png")
    _save(skimage.data.coffee(), d / "0002.png")
    np.save(d / "target_lmk.npy", astro_lmk.astype(np.float32))
    np.save(d / "identity.npy", np.random.default_rng(0).normal(size=512).astype(np.float32))  # not used (auto)
    _samples_json(d, ["0000.png", "0001.png", "0002.png"],
                  {"source": "image", "path": str(photos / "astronaut.png"), "embedding_file": "identity.npy"},
                  {"landmarks": {"source": "npy", "path": "target_lmk.npy", "head_pose": astro_pose.tolist()},
                   "emotion": {"name": "happy", "index": 1, "valence": 0.5, "arousal": -0.2}})

    # set "mix": two ID-only identities (subfolders): rotated copies, and two identical images
    for sub, imgs in (("id1", [a, np.asarray(Image.fromarray(a).rotate(15, fillcolor=(255, 255, 255))),
                               np.asarray(Image.fromarray(a).rotate(-15, fillcolor=(255, 255, 255)))]),
                      ("id2", [a[:, ::-1], a[:, ::-1]])):
        files = []
        for i, img in enumerate(imgs):
            _save(img, sets / "mix" / sub / f"{i:04d}.png")
            _save(img, base / "reference" / f"{sub}_{i}.png")
            files.append(f"{i:04d}.png")
        np.save(sets / "mix" / sub / "identity.npy", astro_emb.astype(np.float32))
        _samples_json(sets / "mix" / sub, files, {"source": "embedding", "path": "elsewhere/missing.npy",
                                                  "embedding_file": "identity.npy"})

    # set "aligned": the FFHQ-style crop data_prep makes, landmark target taken from the photo
    crop = ref.extract(photos / "astronaut.png")
    _save(crop["image"], sets / "aligned" / "0000.png")
    np.save(sets / "aligned" / "identity.npy", astro_emb.astype(np.float32))
    _samples_json(sets / "aligned", ["0000.png"], {"source": "embedding", "embedding_file": "identity.npy"},
                  {"landmarks": {"source": "image", "path": str(photos / "astronaut.png")}})

    out = base / "report" / "report"
    argv = ["--samples", str(sets / "astro"), "--samples", str(sets / "mix"), "--samples", str(sets / "aligned"),
            "--arcface", paths["arcface"], "--landmarker", paths["landmarker"], "--emonet", paths["emonet"],
            "--reference", str(base / "reference"), "--batch-size", "4", "--out", str(out)]
    t0 = time.perf_counter()
    rc = ev.main(argv)
    print(f"evaluate CLI: {time.perf_counter() - t0:.1f} s")
    assert rc == 0
    report = json.loads((base / "report" / "report.json").read_text())
    md = (base / "report" / "report.md").read_text()
    yield {"base": base, "sets": sets, "photos": photos, "paths": paths, "ref": ref, "report": report, "md": md,
            "astro_emb": astro_emb, "astro_lmk": astro_lmk, "astro_pose": astro_pose, "crop": crop}
    ref.close()


def _set(report, name):
    return next(s for s in report["report"]["sets"] if s["name"] == name) if "report" in report else \
        next(s for s in report["sets"] if s["name"] == name)


# ------------------------------------------------------------------------------------------ real analysers
def test_report_structure(world):
    r = world["report"]
    assert r["tool"] == "facecrafter_jax.evaluation"
    assert [s["name"] for s in r["sets"]] == ["astro", "mix", "aligned"]
    assert r["analysers"]["backend"] == "real"
    assert set(r["analysers"]["capabilities"]) == {"identity", "landmarks", "emotion", "reference_landmarks"}
    for s in r["sets"]:
        assert set(s["metrics"]) <= set(METRIC_COLUMNS)
        assert len(s["images"]) == s["num_images"]
    astro = _set(r, "astro")
    assert astro["num_images"] == 3 and astro["no_face"] == 1 and astro["no_face_files"] == ["0002.png"]
    no_face = astro["images"][2]
    assert no_face["file"] == "0002.png" and no_face["face"] is False
    assert all(v is None for k, v in no_face.items() if k not in ("file", "face", "pose", "target_pose"))
    assert no_face["pose"] == [None, None, None]
    assert {"id_cos", "nme", "nme_expr", "pose_err", "pose_geo", "emo_acc", "val_mae", "aro_rmse"} <= set(astro["metrics"])
    assert not any(k.startswith("div_") for k in astro["metrics"])  # controlled set: no ID-only diversity
    mix = _set(r, "mix")
    assert mix["folders"] == [str(world["sets"] / "mix" / "id1"), str(world["sets"] / "mix" / "id2")]
    assert mix["no_face"] == 0 and mix["targets"]["id_only"] == 5
    assert {"div_pose", "div_roll", "div_expr", "div_emo_H", "div_val", "fd_arcface", "fd_emonet"} <= set(mix["metrics"])
    assert "nme" not in mix["metrics"] and "emo_acc" not in mix["metrics"]
    # markdown: a header row with every metric present, one row per set, '-' where not applicable
    lines = world["md"].splitlines()
    header = next(line for line in lines if line.startswith("| set |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[0] == "set" and set(cols[1:]) == set().union(*(s["metrics"] for s in r["sets"]))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in lines if line.startswith("| ") and not line.startswith("| set")}
    assert set(rows) == {"astro", "mix", "aligned"}
    assert rows["mix"][cols.index("nme") - 1] == "-" and rows["astro"][cols.index("div_pose") - 1] == "-"
    assert rows["astro"][cols.index("no_face") - 1] == "1"
    assert "no face in 1 of 3 images (0002.png)" in world["md"]
    for c in cols[1:]:
        assert f"- `{c}`:" in world["md"]  # legend


def test_astronaut_against_herself(world):
    ref, astro = world["ref"], _set(world["report"], "astro")
    img0, img1 = astro["images"][0], astro["images"][1]
    # the photo against its own embedding / landmarks / pose: exact
    assert img0["id_cos"] == pytest.approx(1.0, abs=1e-6)
    assert img0["nme"] == pytest.approx(0.0, abs=1e-6) and img0["nme_expr"] == pytest.approx(0.0, abs=1e-6)
    assert img0["pose_err"] == pytest.approx(0.0, abs=1e-3) and img0["pose_geo"] == pytest.approx(0.0, abs=1e-2)
    # the mirror: values from the independent path
    d = world["sets"] / "astro"
    e1 = ref.arcface(d / "0001.png")
    assert img1["id_cos"] == pytest.approx(float(e1 @ world["astro_emb"]), abs=1e-5)
    lm1, pose1 = ref.detect(d / "0001.png")
    t = world["astro_lmk"]
    iod = np.linalg.norm(t[33, :2] - t[263, :2])
    want_nme = np.linalg.norm(lm1[:, :2] - t[:, :2], axis=1).mean() / iod
    assert img1["nme"] == pytest.approx(want_nme, rel=1e-5) and want_nme > 0.05
    dp = np.abs((pose1 - world["astro_pose"] + 180) % 360 - 180)
    assert img1["pose_err"] == pytest.approx(dp.mean(), abs=1e-3)
    np.testing.assert_allclose(img1["pose"], pose1, atol=1e-4)
    m = astro["metrics"]
    assert m["id_cos"] == pytest.approx((1.0 + float(e1 @ world["astro_emb"])) / 2, abs=1e-5)
    assert m["nme"] == pytest.approx(want_nme / 2, rel=1e-5)
    assert m["yaw_err"] == pytest.approx(dp[0] / 2, abs=1e-3) and m["roll_err"] == pytest.approx(dp[2] / 2, abs=1e-3)
    # emotion against the PyTorch EmoNet reference on data_prep's crops (target: happy, v 0.5, a -0.2)
    emo = [ref.emotion(d / f) for f in ("0000.png", "0001.png")]
    for k, (p, v, a) in enumerate(emo):
        assert astro["images"][k]["emotion"] == EMOTION_CLASSES[int(np.argmax(p))]
        assert astro["images"][k]["valence"] == pytest.approx(v, abs=1e-4)
    assert m["emo_acc"] == pytest.approx(np.mean([np.argmax(p) == 1 for p, _, _ in emo]))
    assert m["val_mae"] == pytest.approx(np.mean([abs(v - 0.5) for _, v, _ in emo]), abs=1e-4)
    assert m["aro_rmse"] == pytest.approx(np.sqrt(np.mean([(a + 0.2) ** 2 for _, _, a in emo])), abs=1e-4)
    assert astro["details"]["identity"]["n"] == 2  # the coffee cup is left out, not counted as a miss


def test_id_only_diversity_and_frechet(world):
    ref, mix = world["ref"], _set(world["report"], "mix")
    sets = world["sets"] / "mix"
    poses = {sub: np.stack([ref.detect(sets / sub / f"{i:04d}.png")[1] for i in range(n)])
             for sub, n in (("id1", 3), ("id2", 2))}
    # in-plane rotations of +-15 deg show up as roll spread; the identical pair has none
    roll1 = poses["id1"][:, 2]
    assert roll1[1] - roll1[0] == pytest.approx(15.0, abs=3.0) and roll1[0] - roll1[2] == pytest.approx(15.0, abs=3.0)
    m = mix["metrics"]
    assert m["div_ids"] == 2
    assert m["div_roll"] == pytest.approx((roll1.std() + poses["id2"][:, 2].std()) / 2, abs=1e-3)
    assert m["div_yaw"] == pytest.approx((poses["id1"][:, 0].std() + 0.0) / 2, abs=1e-3)

    def rot(p):
        from facecrafter_jax.face.geometry import rotation_from_pose

        return rotation_from_pose(p)

    pair = [np.degrees(np.arccos(np.clip((np.trace(rot(poses["id1"][i]).T @ rot(poses["id1"][j])) - 1) / 2, -1, 1)))
            for i, j in ((0, 1), (0, 2), (1, 2))]
    assert m["div_pose"] == pytest.approx(np.mean(pair) / 2, abs=1e-2)
    emo1 = [ref.emotion(sets / "id1" / f"{i:04d}.png") for i in range(3)]
    classes = [int(np.argmax(p)) for p, _, _ in emo1]
    h1 = -sum(c / 3 * np.log2(c / 3) for c in np.bincount(classes) if c)
    assert m["div_emo_H"] == pytest.approx((h1 + 0.0) / 2, abs=1e-9)
    assert m["div_val"] == pytest.approx(np.std([v for _, v, _ in emo1]) / 2, abs=1e-4)
    assert mix["details"]["diversity"]["expression_pairwise_identities"] == 2
    assert m["div_expr"] > 0
    # identity: every image against the astronaut embedding
    want = [ref.arcface(sets / sub / f"{i:04d}.png") @ world["astro_emb"] for sub, n in (("id1", 3), ("id2", 2))
            for i in range(n)]
    assert m["id_cos"] == pytest.approx(np.mean(want), abs=1e-5)
    assert mix["images"][0]["id_cos"] == pytest.approx(1.0, abs=1e-6)
    # the reference folder holds the same 5 images: Fréchet distances ~0
    assert world["report"]["reference"]["images"] == 5
    assert abs(m["fd_arcface"]) < 1e-6 and abs(m["fd_emonet"]) < 1e-6
    assert _set(world["report"], "astro")["metrics"]["fd_arcface"] > 1e-3


def test_landmark_target_from_photo_uses_the_aligned_crop(world):
    ref = world["ref"]
    analysers = RealAnalysers(world["paths"]["landmarker"])
    try:
        photo = np.asarray(Image.open(world["photos"] / "astronaut.png").convert("RGB"))
        lm, pose = analysers.reference_landmarks(photo, CROP)
        # same landmarks as data_prep's records
        np.testing.assert_allclose(lm, world["crop"]["landmarks"], atol=1e-5)
        # the pose target is the pose the landmarker sees on data_prep's aligned crop (same warp at 256 px)
        _, crop_pose = ref.detect(world["sets"] / "aligned" / "0000.png")
        np.testing.assert_allclose(pose, crop_pose, atol=1e-4)
        # ... which differs from the photo's own pose (framing changes MediaPipe's perspective pose estimate)
        assert M.pose_errors(world["crop"]["head_pose"], pose)["geodesic"][0] > 3.0
        # at a smaller generated size the landmarks scale, the pose target does not change
        lm64, pose64 = analysers.reference_landmarks(photo, 64)
        np.testing.assert_allclose(lm64, lm, atol=1e-6)
        np.testing.assert_allclose(pose64, pose, atol=1e-6)
    finally:
        analysers.close()
    aligned = _set(world["report"], "aligned")
    img = aligned["images"][0]
    np.testing.assert_allclose(img["target_pose"], pose, atol=1e-4)
    assert img["pose_geo"] == pytest.approx(0.0, abs=1e-2)
    assert 0 < img["nme"] < 0.05  # transformed vs re-detected landmarks on the resampled crop
    print(f"aligned crop of the astronaut vs her transformed landmarks: NME {img['nme']:.4f}, "
          f"expression NME {img['nme_expr']:.4f}")


def test_help_and_cli_subprocess(world, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    h = subprocess.run([sys.executable, "-m", "facecrafter_jax.evaluation", "--help"], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=120)
    assert h.returncode == 0
    for flag in ("--samples", "--out", "--analysers", "--landmarker", "--arcface", "--emonet", "--analyser-option",
                 "--batch-size", "--id-target", "--id-threshold", "--reference", "samples.json", "controls.landmarks"):
        assert flag in h.stdout, flag
    e = subprocess.run([sys.executable, "-m", "facecrafter_jax.evaluation", "--samples", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "r")], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert e.returncode == 2 and e.stderr.count("\n") == 1 and e.stderr.startswith("error: --samples")
    assert "no such directory" in e.stderr


# ------------------------------------------------------------------------------------------ fake backend
BASE = np.random.default_rng(11).uniform(0.2, 0.8, size=(478, 3))
BASE[33, :2], BASE[263, :2] = (0.35, 0.45), (0.65, 0.45)
E0 = np.eye(512)[0]


class FakeAnalysers(ev_analysers.Analysers):
    """Closed-form outputs from the grey level g = mean pixel / 255 of a uniform image (g = 0: no face)."""

    name = "fake"
    capabilities = frozenset({"identity", "landmarks", "emotion"})

    @staticmethod
    def _g(images):
        return np.array([img.mean() / 255.0 for img in images])

    def identity(self, images):
        g = self._g(images)
        out = np.stack([np.cos(g * np.pi / 2), np.sin(g * np.pi / 2)], 1) @ np.eye(512)[:2]
        out[g == 0] = np.nan
        return out

    def landmarks(self, images):
        g = self._g(images)
        lm = np.repeat(BASE[None], len(g), 0)
        lm[:, :, 0] += 0.01 * g[:, None]
        pose = np.stack([10 * g, np.zeros_like(g), np.zeros_like(g)], 1)
        lm[g == 0], pose[g == 0] = np.nan, np.nan
        return lm, pose

    def emotion(self, images):
        g = self._g(images)
        probs = np.eye(8)[np.minimum((g * 8).astype(int), 7)]
        probs[g == 0] = np.nan
        v = np.where(g == 0, np.nan, g)
        return probs, v, -v


def build_fake(options):
    assert options["extra"] == {"k": "v"}
    return FakeAnalysers()


def _fake_set(root, levels, controls):
    root.mkdir(parents=True)
    files = []
    for i, g in enumerate(levels):
        _save(np.full((32, 32, 3), g, np.uint8), root / f"{i:04d}.png")
        files.append(f"{i:04d}.png")
    np.save(root / "identity.npy", E0.astype(np.float32))
    np.save(root / "lmk.npy", BASE)
    _samples_json(root, files, {"source": "embedding", "embedding_file": "identity.npy"}, controls)


@pytest.mark.parametrize("how", ["module", "registered"])
def test_fake_backend_closed_form(tmp_path, how):
    levels = [0, 64, 128, 255]
    _fake_set(tmp_path / "ctl", levels, {"landmarks": {"file": "lmk.npy", "head_pose": [0, 0, 0]},
                                          "emotion": {"index": 4, "valence": 0.0, "arousal": 0.0}})
    _fake_set(tmp_path / "free", [64, 128, 128, 0], None)
    if how == "registered":
        ev_analysers.register_backend("fake-test", build_fake, help="test")
        name = "fake-test"
    else:
        name = "test_evaluate:build_fake"
    rc = ev.main(["--samples", str(tmp_path / "ctl"), "--samples", str(tmp_path / "free"), "--analysers", name,
                  "--analyser-option", "k=v", "--id-threshold", "0.5", "--out", str(tmp_path / "rep.json"), "--quiet"])
    assert rc == 0
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert (tmp_path / "rep.md").exists()
    g = np.array(levels[1:]) / 255.0
    m = _set(rep, "ctl")["metrics"]
    assert m["no_face"] == 1 and m["images"] == 4
    cos = np.cos(g * np.pi / 2)
    assert m["id_cos"] == pytest.approx(cos.mean(), abs=1e-9)
    assert m["id_cos_std"] == pytest.approx(cos.std(), abs=1e-9)
    assert m["id_frac"] == pytest.approx(np.mean(cos > 0.5))
    assert m["nme"] == pytest.approx(np.mean(0.01 * g / 0.3), rel=1e-9)
    assert m["nme_expr"] == pytest.approx(0.0, abs=1e-9)  # a pure translation is not an expression change
    assert m["yaw_err"] == pytest.approx(np.mean(10 * g), rel=1e-9)
    assert m["pose_err"] == pytest.approx(np.mean(10 * g) / 3, rel=1e-9)
    assert m["pose_geo"] == pytest.approx(np.mean(10 * g), abs=1e-6)
    assert m["emo_acc"] == pytest.approx(np.mean(np.minimum((g * 8).astype(int), 7) == 4))
    assert m["val_mae"] == pytest.approx(g.mean(), rel=1e-9) and m["aro_rmse"] == pytest.approx(np.sqrt((g ** 2).mean()))
    f = _set(rep, "free")["metrics"]
    gf = np.array([64, 128, 128]) / 255.0
    assert f["div_ids"] == 1 and f["div_yaw"] == pytest.approx((10 * gf).std(), rel=1e-9)
    assert f["div_val"] == pytest.approx(gf.std(), rel=1e-9)
    classes = np.minimum((gf * 8).astype(int), 7)
    assert f["div_emo_H"] == pytest.approx(M.class_entropy(classes))
    assert f["div_expr"] == pytest.approx(0.0, abs=1e-9)
    assert "nme" not in f and "emo_acc" not in f


# ------------------------------------------------------------------------------------------ errors
def _error(capsys, argv):
    rc = ev.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_input_errors(tmp_path, capsys, shared_models):
    out = ["--out", str(tmp_path / "r")]
    lm = ["--landmarker", str(shared_models / "face_landmarker.task")]
    ok = tmp_path / "ok"
    _fake_set(ok, [64, 128], {"landmarks": {"file": "lmk.npy"}, "emotion": {"name": "happy"}})

    assert "no such directory" in _error(capsys, ["--samples", str(tmp_path / "missing")] + out + lm)
    (tmp_path / "empty").mkdir()
    assert "no samples.json" in _error(capsys, ["--samples", str(tmp_path / "empty")] + out + lm)
    assert "--out" in _error(capsys, ["--samples", str(ok)])  # required flag
    assert "unrecognized arguments" in _error(capsys, ["--samples", str(ok), "--bogus"] + out)
    assert "--landmarker is required" in _error(capsys, ["--samples", str(ok)] + out)
    assert "--landmarker" in _error(capsys, ["--samples", str(ok), "--landmarker", str(tmp_path / "x.task")] + out)
    assert "--arcface" in _error(capsys, ["--samples", str(ok), "--arcface", str(tmp_path / "a.onnx")] + out + lm)
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"not a model")
    assert "ArcFace" in _error(capsys, ["--samples", str(ok), "--arcface", str(bad_onnx)] + out + lm)
    bad_pth = tmp_path / "bad.pth"
    bad_pth.write_bytes(b"not a checkpoint")
    assert "--emonet" in _error(capsys, ["--samples", str(ok), "--emonet", str(bad_pth)] + out + lm)
    assert "unknown backend" in _error(capsys, ["--samples", str(ok), "--analysers", "nope"] + out)
    assert "cannot import" in _error(capsys, ["--samples", str(ok), "--analysers", "no_such_mod:f"] + out)
    assert "KEY=VALUE" in _error(capsys, ["--samples", str(ok), "--analyser-option", "x"] + out + lm)
    assert "unknown option" in _error(capsys, ["--samples", str(ok), "--analyser-option", "x=1"] + out + lm)
    assert "--batch-size" in _error(capsys, ["--samples", str(ok), "--batch-size", "0"] + out + lm)
    assert "--reference" in _error(capsys, ["--samples", str(ok), "--reference", str(tmp_path / "no")] + out + lm)

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(ok, d)
        meta = json.loads((d / "samples.json").read_text())
        edit(d, meta)
        (d / "samples.json").write_text(json.dumps(meta))
        return _error(capsys, ["--samples", str(d)] + out + lm)

    assert "0001.png: no such file" in broken("noimg", lambda d, m: (d / "0001.png").unlink())
    assert "expected [478, 3]" in broken("badlmk", lambda d, m: np.save(d / "lmk.npy", np.zeros((468, 3))))
    assert "NaN" in broken("nanlmk", lambda d, m: np.save(d / "lmk.npy", np.full((478, 3), np.nan)))
    assert "landmark target" in broken("nolmk", lambda d, m: (d / "lmk.npy").unlink())
    assert "expected [512]" in broken("bademb", lambda d, m: np.save(d / "identity.npy", np.zeros(128)))
    assert "unknown emotion" in broken("emo", lambda d, m: m["controls"].update(emotion={"name": "bored"}))
    assert "valence" in broken("va", lambda d, m: m["controls"].update(emotion={"valence": 3.0}))
    assert "head_pose" in broken("hp", lambda d, m: m["controls"]["landmarks"].update(head_pose=[1, 2]))
    assert "images" in broken("noimages", lambda d, m: m.update(images=[]))
    assert "identity" in broken("noid", lambda d, m: m.update(identity={"source": "embedding"}))
    d = tmp_path / "garbled"
    shutil.copytree(ok, d)
    (d / "samples.json").write_text("{not json")
    assert "cannot read" in _error(capsys, ["--samples", str(d)] + out + lm)
    assert not (tmp_path / "r.json").exists()  # nothing written on errors
