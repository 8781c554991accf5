"""data_prep end to end on real photos with the real MediaPipe landmarker and random-weight stand-ins for
ArcFace (ONNX), EmoNet (official checkpoint layout) and the SD VAE (diffusers folder).

Hand-measured reference points of ``skimage.data.astronaut()`` (512x512), continuous pixel coordinates:
read by eye from a 10x nearest-neighbour zoom of the region x 180..260, y 80..160 with a 1 px grid
(pupils / eye-corner midpoints, tip of the nose, mouth corners). They only need to be right to a few
pixels: their job is to catch frame, flip and scale bugs.
"""

import sys

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
import skimage.data
import skimage.transform

from facecrafter_jax.face.align import ARCFACE_TEMPLATE_112, ffhq_template, umeyama, warp_affine
from facecrafter_jax.face.emotion import emonet_template
from facecrafter_jax.face.images import SkipImage, load_image
from facecrafter_jax.face.geometry import head_pose_from_matrix, rotation_from_pose
from data_prep.manifest import Manifest
from emonet_reference import random_checkpoint

ASTRONAUT_POINTS = np.array([[202.0, 101.0], [245.5, 103.0], [223.0, 127.0], [203.5, 140.0], [244.0, 141.0]])
RES = 64
EXPECTED_SKIPS = {
    "tiny.png": "too_small",
    "corrupt.jpg": "corrupt_image",
    "empty.png": "empty_file",
    "notes.jpg": "not_an_image",
    "coffee.png": "no_face",
}
FACE_IMAGES = ["astronaut.png", "astronaut_mirror.png", "exif_rotated.jpg", "gray.png", "rgba.png", "gray16.png",
               "palette.png", "two_faces.png"]


class TinyArcFace(torch.nn.Module):
    """Random stand-in with ArcFace's signature: [N, 3, 112, 112] -> [N, 512]."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(16 * 7 * 7, 512)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.nn.functional.avg_pool2d(x, 4).flatten(1))


def _make_images(d):
    d.mkdir()
    a = skimage.data.astronaut()
    Image.fromarray(a).save(d / "astronaut.png")
    Image.fromarray(np.ascontiguousarray(a[:, ::-1])).save(d / "astronaut_mirror.png")
    # Stored rotated 90 deg counter-clockwise with EXIF orientation 6 ("rotate 90 CW to display").
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(a))).save(d / "exif_rotated.jpg", quality=95, exif=exif)
    Image.fromarray(a).convert("L").save(d / "gray.png")
    rgba = np.concatenate([a, np.full(a.shape[:2] + (1,), 255, np.uint8)], axis=2)
    rgba[:40, :40, 3] = 0
    Image.fromarray(rgba).save(d / "rgba.png")
    g16 = (np.asarray(Image.fromarray(a).convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(g16).save(d / "gray16.png")
    Image.fromarray(a).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(d / "palette.png")
    (d / "lfw").mkdir()
    lfw = skimage.data.lfw_subset()
    for i in range(3):
        g = Image.fromarray((lfw[i] * 255).astype(np.uint8)).resize((200, 200), Image.Resampling.BICUBIC)
        g.convert("RGB").save(d / "lfw" / f"lfw_{i}.png")
    Image.fromarray(a[:20, :20]).save(d / "tiny.png")
    Image.fromarray(a).save(d / "full.jpg", quality=90)
    data = (d / "full.jpg").read_bytes()
    (d / "corrupt.jpg").write_bytes(data[: len(data) // 3])
    (d / "full.jpg").unlink()
    (d / "empty.png").write_bytes(b"")
    (d / "notes.jpg").write_text("this is not an image\n")
    (d / "readme.txt").write_text("not an image extension: ignored\n")
    Image.fromarray(skimage.data.coffee()).save(d / "coffee.png")
    # Two faces: the astronaut's face (300 px) on the left, a smaller mirrored copy (200 px) on the right.
    face = a[40:280, 100:340]
    canvas = np.full((512, 512, 3), 180, np.uint8)
    canvas[100:400, 0:300] = np.asarray(Image.fromarray(face).resize((300, 300)))
    canvas[120:320, 312:512] = np.asarray(Image.fromarray(np.ascontiguousarray(face[:, ::-1])).resize((200, 200)))
    Image.fromarray(canvas).save(d / "two_faces.png")


def _make_models(d, shared_models):
    from diffusers import AutoencoderKL

    d.mkdir()
    torch.manual_seed(0)
    arc = TinyArcFace().eval()
    torch.onnx.export(arc, (torch.zeros(2, 3, 112, 112),), str(d / "arcface.onnx"), input_names=["input.1"],
                      output_names=["embedding"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    emonet_ref = random_checkpoint(d / "emonet_8.pth", seed=5)
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64),
                        layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=RES).eval()
    vae.save_pretrained(d / "vae")
    return {"landmarker": str(shared_models / "face_landmarker.task"), "arcface": str(d / "arcface.onnx"),
            "emonet": str(d / "emonet_8.pth"), "vae": str(d / "vae"), "emonet_ref": emonet_ref, "vae_ref": vae}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_models):
    """Builds inputs and models, then runs data_prep twice: first --limit 6 (workers=2), then the rest."""
    from data_prep.run import run

    base = tmp_path_factory.mktemp("dataprep")
    images = base / "images"
    _make_images(images)
    models = _make_models(base / "models", shared_models)
    out = base / "out"
    kw = dict(resolution=RES, batch_size=4, shard_size=3, progress=False)
    paths = {k: models[k] for k in ("landmarker", "arcface", "emonet", "vae")}
    first = run(str(images), str(out), workers=2, limit=6, **paths, **kw)
    manifest_after_first = Manifest(out / "manifest.jsonl").entries.copy()
    second = run(str(images), str(out), workers=1, **paths, **kw)
    return {"images": images, "out": out, "models": models, "first": first, "second": second,
            "manifest_after_first": manifest_after_first, "paths": paths, "kw": kw}


def _records(out):
    from facecrafter_jax.data.records import iter_records

    return {r["image_id"]: r for r in iter_records(out)}


def _manifest(out):
    return Manifest(out / "manifest.jsonl").entries


def _upright(path):
    with Image.open(path) as im:
        from PIL import ImageOps

        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def test_every_image_accounted_for(prepared):
    out = prepared["out"]
    man = _manifest(out)
    recs = _records(out)
    all_ids = sorted(os.path.relpath(os.path.join(dp, f), prepared["images"]).replace(os.sep, "/")
                     for dp, _, fs in os.walk(prepared["images"]) for f in fs)
    expected = [i for i in all_ids if i != "readme.txt"]  # not an image extension: not a candidate
    assert sorted(man) == expected
    for image_id, reason in EXPECTED_SKIPS.items():
        assert man[image_id]["status"] == "skipped" and man[image_id]["reason"] == reason, man[image_id]
    for image_id in FACE_IMAGES:
        assert man[image_id]["status"] == "ok", man[image_id]
    # upscaled 25 px LFW faces: detected or not, but always a sensible outcome
    for i in range(3):
        line = man[f"lfw/lfw_{i}.png"]
        assert line["status"] == "ok" or line["reason"] == "no_face", line
    assert {k for k, v in man.items() if v["status"] == "ok"} == set(recs)
    assert len(recs) >= len(FACE_IMAGES)
    for r in recs.values():
        assert r["landmarks"].shape == (478, 3) and r["latent_moments"].shape == (RES // 8, RES // 8, 8)
        np.testing.assert_allclose(np.linalg.norm(r["arcface"]), 1.0, atol=1e-4)
        assert abs(r["emotion"][:8].sum() - 1) < 1e-4 and np.all(np.abs(r["emotion"][8:]) <= 1)


def test_resume_skips_done_images(prepared):
    first, second = prepared["first"], prepared["second"]
    n = len(_manifest(prepared["out"]))
    assert first["to_process"] == 6 and len(prepared["manifest_after_first"]) == 6
    assert second["already_done"] == 6 and second["to_process"] == n - 6
    # the first run's lines are unchanged (not recomputed)
    man = _manifest(prepared["out"])
    for k, v in prepared["manifest_after_first"].items():
        assert man[k] == v
    # a third run has nothing to do
    from data_prep.run import run

    third = run(str(prepared["images"]), str(prepared["out"]), workers=0, **prepared["paths"], **prepared["kw"])
    assert third["to_process"] == 0 and third["ok"] == 0


def test_astronaut_landmarks_land_on_her_face(prepared):
    man, recs = _manifest(prepared["out"]), _records(prepared["out"])
    line = man["astronaut.png"]
    kps = np.array(line["kps5"])
    assert np.abs(kps - ASTRONAUT_POINTS).max() < 4.0, kps
    assert line["num_faces"] == 1 and line["width"] == 512
    # Stored landmarks are in the aligned crop: map them back with an independently estimated similarity.
    lm = recs["astronaut.png"]["landmarks"]
    tform = skimage.transform.SimilarityTransform.from_estimate(kps, ffhq_template(RES))
    back = tform.inverse(lm[:, :2] * RES)
    eyes = np.stack([back[[33, 133]].mean(0), back[[362, 263]].mean(0)])
    assert np.abs(eyes - ASTRONAUT_POINTS[:2]).max() < 4.0, eyes
    assert np.abs(back[4] - ASTRONAUT_POINTS[2]).max() < 4.0
    assert np.abs(back[[61, 291]] - ASTRONAUT_POINTS[3:]).max() < 4.0
    # In the crop, the eyes sit where the FFHQ-style template puts them (x, y in [0, 1]).
    crop_eyes = np.stack([lm[[33, 133], :2].mean(0), lm[[362, 263], :2].mean(0)])
    assert np.abs(crop_eyes - ffhq_template(1)[:2]).max() < 0.02
    assert np.all((lm[:, :2] > 0) & (lm[:, :2] < 1))


def test_exif_mirror_and_two_faces(prepared):
    man, recs = _manifest(prepared["out"]), _records(prepared["out"])
    base = np.array(man["astronaut.png"]["kps5"])
    np.testing.assert_allclose(np.array(man["exif_rotated.jpg"]["kps5"]), base, atol=2.0)
    for name in ("gray.png", "rgba.png", "gray16.png", "palette.png"):
        np.testing.assert_allclose(np.array(man[name]["kps5"]), base, atol=3.0, err_msg=name)
    np.testing.assert_allclose(recs["gray16.png"]["landmarks"], recs["gray.png"]["landmarks"], atol=1e-3)
    # Mirroring: x -> 512 - x with left/right swapped; yaw and roll change sign, pitch does not.
    mir = np.array(man["astronaut_mirror.png"]["kps5"])
    expect = base[[1, 0, 2, 4, 3]] * [-1, 1] + [512, 0]
    np.testing.assert_allclose(mir, expect, atol=3.0)
    p0, p1 = recs["astronaut.png"]["head_pose"], recs["astronaut_mirror.png"]["head_pose"]
    np.testing.assert_allclose(p1, p0 * [-1, 1, -1], atol=3.0)
    assert abs(p0[0]) < 15 and abs(p0[2]) < 15  # a near-frontal, upright face
    # Two faces: both found, the larger (left, 300 px) one is used.
    two = man["two_faces.png"]
    assert two["num_faces"] == 2 and two["face_selection"] == "largest"
    x0, y0, x1, y1 = two["face_box"]
    assert x1 < 300 and (x1 - x0) > 100


def test_arcface_matches_independent_onnxruntime(prepared):
    import onnxruntime as ort

    man, recs = _manifest(prepared["out"]), _records(prepared["out"])
    sess = ort.InferenceSession(prepared["models"]["arcface"], providers=["CPUExecutionProvider"])
    worst, margin = 1.0, []
    for image_id in ("astronaut.png", "exif_rotated.jpg", "two_faces.png", "gray16.png"):
        img = _upright(prepared["images"] / image_id)
        if image_id == "gray16.png":
            g = np.asarray(Image.open(prepared["images"] / image_id), np.float64) / 65535.0 * 255.0
            img = np.repeat(np.round(g)[:, :, None], 3, axis=2).astype(np.uint8)
        # skimage works in pixel-centre coordinates: continuous kps - 0.5, insightface template as is.
        kps = np.array(man[image_id]["kps5"]) - 0.5
        tform = skimage.transform.SimilarityTransform.from_estimate(kps, ARCFACE_TEMPLATE_112)
        crop = skimage.transform.warp(img, tform.inverse, output_shape=(112, 112), order=1, preserve_range=True)
        blob = ((crop - 127.5) / 127.5).astype(np.float32).transpose(2, 0, 1)[None]
        emb = sess.run(None, {"input.1": blob})[0][0]
        emb = emb / np.linalg.norm(emb)
        bgr = sess.run(None, {"input.1": np.ascontiguousarray(blob[:, ::-1])})[0][0]
        bgr = bgr / np.linalg.norm(bgr)
        stored = recs[image_id]["arcface"]
        worst = min(worst, float(stored @ emb))
        if image_id != "gray16.png":
            margin.append(1 - float(stored @ bgr))
        print(f"{image_id}: arcface max abs err {np.abs(stored - emb).max():.2e}, cos {float(stored @ emb):.6f}")
        assert np.abs(stored - emb).max() < 5e-3, (image_id, np.abs(stored - emb).max())
    assert worst > 0.9999, worst
    assert min(margin) > 1e-2  # the check can tell RGB from BGR (colour images)


def test_emotion_and_latents_match_references(prepared):
    man, recs = _manifest(prepared["out"]), _records(prepared["out"])
    ref, vae = prepared["models"]["emonet_ref"], prepared["models"]["vae_ref"]
    image_id = "astronaut.png"
    img = _upright(prepared["images"] / image_id)
    kps = np.array(man[image_id]["kps5"])
    emo_crop = warp_affine(img, umeyama(kps, emonet_template(0.75)), 256)
    with torch.no_grad():
        out = ref(torch.from_numpy(emo_crop.astype(np.float32) / 255.0).permute(2, 0, 1)[None])
    want = np.concatenate([torch.softmax(out["expression"], -1)[0].numpy(),
                           np.clip([out["valence"].item(), out["arousal"].item()], -1, 1)])
    got = recs[image_id]["emotion"]
    print(f"emotion max abs err {np.abs(got - want).max():.2e}")
    assert np.abs(got - want).max() < 2e-4, (got, want)

    crop = warp_affine(img, np.array(man[image_id]["crop_matrix"]), RES)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(crop.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]).latent_dist
    want = torch.cat([dist.mean, dist.logvar], 1)[0].permute(1, 2, 0).numpy()
    got = recs[image_id]["latent_moments"].astype(np.float32)
    print(f"latent moments max abs err {np.abs(got - want).max():.2e} (scale {np.abs(want).max():.2f})")
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max()), np.abs(got - want).max()  # fp16 storage


def test_inspect_cli(prepared):
    res = subprocess.run([sys.executable, "-m", "data_prep", "inspect", str(prepared["out"])],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    man = _manifest(prepared["out"])
    n_ok = sum(v["status"] == "ok" for v in man.values())
    assert summary["records"] == n_ok and summary["consistent"] is True
    assert summary["manifest"]["skipped"] == len(man) - n_ok
    for image_id, reason in EXPECTED_SKIPS.items():
        assert summary["manifest"]["skipped_by_reason"][reason] >= 1
    assert sum(summary["manifest"]["skipped_by_reason"].values()) == len(man) - n_ok
    assert summary["manifest"]["multi_face_images"] == 1
    assert summary["fields"]["landmarks"] == {"shape": [478, 3], "dtype": "float32"}
    assert summary["fields"]["latent_moments"]["shape"] == [RES // 8, RES // 8, 8]
    assert summary["fields"]["arcface"]["shape"] == [512] and summary["fields"]["emotion"]["shape"] == [10]
    from facecrafter_jax.data.records import list_shards

    assert summary["resolution"] == RES and summary["shards"] == len(list_shards(prepared["out"]))


def test_reconcile_after_lost_shard_and_lost_lines(prepared, tmp_path):
    """A shard lost with an interrupted run, and ok lines lost after a committed shard, are both repaired."""
    import shutil

    from data_prep.run import run
    from facecrafter_jax.data.records import list_shards, read_image_ids

    out = tmp_path / "out"
    shutil.copytree(prepared["out"], out)
    shards = list_shards(out)
    lost_ids = (out / shards[-1].name.replace(".array_record", ".ids.txt")).read_text().split()
    # 1) simulate the writer's view of a killed run: the last shard only exists as a .tmp file
    os.replace(shards[-1], str(shards[-1]) + ".tmp")
    os.remove(out / shards[-1].name.replace(".array_record", ".ids.txt"))
    info = json.loads((out / "dataset.json").read_text())
    del info["shards"][shards[-1].name]
    (out / "dataset.json").write_text(json.dumps(info))
    # 2) and a committed shard whose manifest lines never got written
    man = Manifest(out / "manifest.jsonl")
    first_ids = (out / shards[0].name.replace(".array_record", ".ids.txt")).read_text().split()
    for i in first_ids:
        del man.entries[i]
    man.rewrite()
    summary = run(str(prepared["images"]), str(out), workers=0, **prepared["paths"], **prepared["kw"])
    assert sorted(summary["reconciled"]["dropped_ok_without_record"]) == sorted(lost_ids)
    assert sorted(summary["reconciled"]["added_ok_for_record"]) == sorted(first_ids)
    assert summary["to_process"] == len(lost_ids) and summary["ok"] == len(lost_ids)
    final = Manifest(out / "manifest.jsonl")
    ids = read_image_ids(out)
    assert len(ids) == len(set(ids)) and final.ids("ok") == set(ids)
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_torn_manifest_line_is_dropped(tmp_path):
    p = tmp_path / "manifest.jsonl"
    p.write_text('{"image_id": "a.png", "status": "ok"}\n{"image_id": "b.png", "sta')
    m = Manifest(p)
    assert set(m.entries) == {"a.png"}
    assert p.read_text() == '{"image_id": "a.png", "status": "ok"}\n'
    p.write_text('{"image_id": "a.png", "status": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="malformed manifest line"):
        Manifest(p)


def test_image_loading_conversions(tmp_path):
    a = skimage.data.astronaut()
    g16 = (np.asarray(Image.fromarray(a).convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    got = load_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(got[..., 0], np.asarray(Image.fromarray(a).convert("L")))
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:40, :, 3] = 255  # top half opaque red, bottom half transparent -> white
    Image.fromarray(rgba).save(tmp_path / "a.png")
    got = load_image(tmp_path / "a.png")
    assert tuple(got[10, 10]) == (255, 0, 0) and tuple(got[70, 10]) == (255, 255, 255)
    with pytest.raises(SkipImage, match="too_small"):
        load_image(tmp_path / "a.png", min_side=100)
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    with pytest.raises(SkipImage) as e:
        load_image(tmp_path / "x.png")
    assert e.value.reason in ("corrupt_image", "not_an_image")


def test_umeyama_and_head_pose_closed_form():
    rng = np.random.default_rng(0)
    src = rng.random((5, 2)) * 100
    ang, s, t = 0.3, 1.7, np.array([5.0, -3.0])
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    dst = src @ (s * rot).T + t
    m = umeyama(src, dst)
    np.testing.assert_allclose(m[:2, :2], s * rot, atol=1e-10)
    np.testing.assert_allclose(m[:2, 2], t, atol=1e-9)
    for yaw, pitch, roll in [(20, -10, 5), (-35, 25, -12), (0, 0, 0), (60, 5, 30)]:
        r = rotation_from_pose([yaw, pitch, roll])
        mat = np.eye(4)
        mat[:3, :3] = 1.3 * r  # a uniform scale does not change the angles
        np.testing.assert_allclose(head_pose_from_matrix(mat), [yaw, pitch, roll], atol=1e-4)
        # mirror (x -> -x in the camera frame): yaw and roll flip, pitch stays
        f = np.diag([-1.0, 1.0, 1.0])
        np.testing.assert_allclose(head_pose_from_matrix(f @ r @ f), [-yaw, pitch, -roll], atol=1e-4)
    # yaw > 0 turns the face normal (+z) towards +x (image right)
    assert rotation_from_pose([30, 0, 0])[0, 2] > 0


def test_clear_errors_for_bad_models_and_paths(tmp_path, shared_models, capsys):
    from diffusers import AutoencoderKL

    from data_prep.__main__ import main
    from facecrafter_jax.face.arcface import ArcFaceONNX
    from data_prep.models import LatentModel

    (tmp_path / "imgs").mkdir()
    args = ["run", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"),
            "--landmarker", str(shared_models / "face_landmarker.task"), "--arcface", str(tmp_path / "missing.onnx"),
            "--emonet", str(tmp_path / "e.pth"), "--vae", str(tmp_path / "vae")]
    assert main(args) == 2  # one line, exit status 2 (facecrafter_jax.errors.run_cli)
    assert capsys.readouterr().err == f"error: --arcface: file not found: {tmp_path / 'missing.onnx'}\n"
    with pytest.raises(SystemExit):
        main(args + ["--batch-size", "0"])

    class Wrong(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 171)[:, :512]

    torch.onnx.export(Wrong(), (torch.zeros(1, 3, 64, 64),), str(tmp_path / "wrong.onnx"), input_names=["x"])
    with pytest.raises(ValueError, match=r"expected \[N, 3, 112, 112\]"):
        ArcFaceONNX(tmp_path / "wrong.onnx")

    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  block_out_channels=(32, 32, 32), layers_per_block=1, norm_num_groups=32).save_pretrained(tmp_path / "vae4")
    with pytest.raises(ValueError, match="downsamples by 4"):
        LatentModel(str(tmp_path / "vae4"), 64, 2)


def test_identity_csv(tmp_path):
    from data_prep.identities import read_identity_csv

    ids = ["a/1.jpg", "a/2.jpg", "b/x.png"]
    f = tmp_path / "ids.csv"
    f.write_text("path,identity\na/1.jpg,alice\n./a/2.jpg, alice\nb/x.png,bob\n")
    assert read_identity_csv(f, ids) == {"a/1.jpg": "alice", "a/2.jpg": "alice", "b/x.png": "bob"}
    with pytest.raises(ValueError, match="no identity for 1 image"):
        read_identity_csv(f, ids + ["c.jpg"])
    f.write_text("file,person\na/1.jpg,alice\n")
    with pytest.raises(ValueError, match="'identity' column"):
        read_identity_csv(f, ids[:1])
    f.write_text("image,identity\na/1.jpg,alice\na/1.jpg,bob\n")
    with pytest.raises(ValueError, match="two identities"):
        read_identity_csv(f, ids[:1])
