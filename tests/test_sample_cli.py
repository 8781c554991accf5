"""sample.py: end-to-end run on a tiny converted checkpoint, its outputs, and every input error."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from facecrafter_jax.convert.cli import main as convert_main
from facecrafter_jax.sampling import cli as sample
from tiny_models import tiny_clip, tiny_unet, tiny_vae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory, shared_models):
    """A tiny converted checkpoint whose text encoder is 512 wide (so it takes ArcFace vectors), inputs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_sampling.py: OpenMP busy-waiting on the shared 2-core machine
    d = tmp_path_factory.mktemp("sample_cli")
    tiny_unet(0, cross_attention_dim=512).save_pretrained(d / "torch" / "unet")
    tiny_clip(1, hidden_size=512, intermediate_size=128, num_attention_heads=4).save_pretrained(d / "torch" / "te")
    tiny_vae(2).save_pretrained(d / "torch" / "vae")
    assert convert_main(["from-diffusers", "--unet", str(d / "torch" / "unet"), "--text-encoder",
                         str(d / "torch" / "te"), "--vae", str(d / "torch" / "vae"), "--out", str(d / "ckpt")]) == 0

    emb = np.random.default_rng(0).standard_normal(512).astype(np.float32) * 3.0
    np.save(d / "id.npy", emb)
    Image.fromarray(skimage.data.coffee()).save(d / "coffee.png")
    Image.fromarray(skimage.data.astronaut()).save(d / "astronaut.png")
    (d / "notes.png").write_text("not an image\n")
    from test_data_prep import TinyArcFace

    torch.manual_seed(0)
    torch.onnx.export(TinyArcFace().eval(), (torch.zeros(2, 3, 112, 112),), str(d / "arcface.onnx"),
                      input_names=["input.1"], output_names=["embedding"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    # FaceCrafter checkpoints: the same base + random adapters (both controls, and landmark only)
    from flax import nnx

    from facecrafter_jax.models.facecrafter import FaceCrafter, FaceCrafterConfig
    from facecrafter_jax.pretrained import load_pretrained, save_pretrained
    from conftest import perturb_adapters
    from test_sampling_control import SMALL

    for name, controls in (("ckpt_fc", ("landmark", "emotion")), ("ckpt_lmk", ("landmark",))):
        m = load_pretrained(str(d / "ckpt"))
        fc = FaceCrafter(m.unet, FaceCrafterConfig(**{**SMALL.to_dict(), "controls": controls}), rngs=nnx.Rngs(1))
        perturb_adapters(fc, 2)
        save_pretrained(str(d / name), unet=fc.unet, text_encoder=m.text_encoder, vae=m.vae, adapters=fc)
    lmk = np.random.default_rng(1).uniform(0.2, 0.8, size=(478, 3)).astype(np.float32)
    np.save(d / "lm.npy", lmk)
    yield {"dir": d, "ckpt": str(d / "ckpt"), "emb": emb, "landmarker": str(shared_models / "face_landmarker.task"),
           "arcface": str(d / "arcface.onnx"), "ckpt_fc": str(d / "ckpt_fc"), "ckpt_lmk": str(d / "ckpt_lmk"),
           "lmk": lmk}
    torch.set_num_threads(threads)


def base_args(env, out, *extra):
    return ["--checkpoint", env["ckpt"], "--id-embedding", str(env["dir"] / "id.npy"), "--out", str(out),
            "--steps", "4", *extra]


def fc_args(env, out, *extra, ckpt=None):
    return ["--checkpoint", ckpt or env["ckpt_fc"], "--id-embedding", str(env["dir"] / "id.npy"), "--out", str(out),
            "--steps", "4", *extra]


@pytest.fixture(scope="module")
def run3(env):
    out = env["dir"] / "out3"
    assert sample.main(base_args(env, out, "--num-images", "3", "--batch-size", "2", "--seed", "5")) == 0
    return out


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--id-image", "--id-embedding", "--arcface", "--landmarker", "--num-images",
                 "--batch-size", "--steps", "--scheduler", "--scheduler-config", "--guidance-id", "--seed",
                 "--height", "--width", "--out", "--overwrite", "--dtype", "--landmarks-from", "--landmarks",
                 "--emotion", "--valence", "--arousal", "--guidance-control", "--landmark-scale", "--emotion-scale",
                 "--absent-controls"):
        assert flag in text, flag


def test_outputs_and_samples_json(env, run3):
    names = sorted(os.listdir(run3))
    assert names == ["0000.png", "0001.png", "0002.png", "grid.png", "identity.npy", "samples.json"]
    imgs = [np.asarray(Image.open(run3 / f"{i:04d}.png")) for i in range(3)]
    for im in imgs:
        assert im.shape == (32, 32, 3) and im.dtype == np.uint8  # UNet sample_size 16 x VAE factor 2
        assert im.std() > 5  # not blank
    assert np.abs(imgs[0].astype(int) - imgs[1].astype(int)).max() > 10  # different noise per image
    grid = np.asarray(Image.open(run3 / "grid.png"))
    assert grid.shape == (2 * 32 + 3 * 4, 2 * 32 + 3 * 4, 3)
    np.testing.assert_array_equal(grid[4:36, 40:72], imgs[1])  # row 0, column 1
    np.testing.assert_array_equal(grid[40:72, 4:36], imgs[2])
    ident = np.load(run3 / "identity.npy")
    np.testing.assert_allclose(ident, env["emb"] / np.linalg.norm(env["emb"]), rtol=1e-6)

    meta = json.loads((run3 / "samples.json").read_text())
    assert meta["checkpoint"] == os.path.abspath(env["ckpt"])
    assert meta["identity"]["source"] == "embedding"
    assert meta["identity"]["path"] == str(env["dir"] / "id.npy")
    s = meta["settings"]
    assert (s["num_images"], s["batch_size"], s["steps"], s["scheduler"], s["guidance_id"], s["seed"]) == (3, 2, 4, "dpm++2m", 3.0, 5)
    assert (s["height"], s["width"], s["dtype"]) == (32, 32, "float32")
    assert [r["file"] for r in meta["images"]] == ["0000.png", "0001.png", "0002.png"]
    assert [r["noise_index"] for r in meta["images"]] == [0, 1, 2]
    for k in ("jax", "flax", "numpy", "facecrafter_jax", "python"):
        assert meta["versions"][k]
    assert meta["controls"] == {}
    assert meta["argv"][:2] == ["--checkpoint", env["ckpt"]]


def test_images_equal_the_pipeline_and_do_not_depend_on_batch_size(env, run3):
    """The same run with one batch of 3 gives the same PNGs; both equal Arc2FacePipeline called directly."""
    from facecrafter_jax.pretrained import load_pretrained
    from facecrafter_jax.sampling import Arc2FacePipeline

    out = env["dir"] / "out3b"
    assert sample.main(base_args(env, out, "--num-images", "3", "--batch-size", "3", "--seed", "5")) == 0
    a = np.stack([np.asarray(Image.open(run3 / f"{i:04d}.png")) for i in range(3)]).astype(int)
    b = np.stack([np.asarray(Image.open(out / f"{i:04d}.png")) for i in range(3)]).astype(int)
    assert np.abs(a - b).max() <= 1  # float differences of a few ulp may flip a rounding
    m = load_pretrained(env["ckpt"])
    ref = Arc2FacePipeline(m.unet, m.text_encoder, m.vae)(np.broadcast_to(env["emb"], (3, 512)), num_steps=4,
                                                          seed=5).images.astype(int)
    assert np.abs(ref - b).max() <= 1


def test_id_image_embedding_is_data_prep_arcface_of_the_aligned_face(env):
    from facecrafter_jax.face.arcface import ArcFaceONNX
    from data_prep.extract import ExtractSettings, FaceExtractor

    emb, info = sample.embed_id_image(str(env["dir"] / "astronaut.png"), env["landmarker"], env["arcface"])
    assert info["num_faces"] == 1
    fx = FaceExtractor(env["landmarker"], ExtractSettings(resolution=64))
    try:
        rec = fx(str(env["dir"]), "astronaut.png")
    finally:
        fx.close()
    want = ArcFaceONNX(env["arcface"])(rec["arcface_crop"][None])[0]
    np.testing.assert_allclose(emb, want, atol=1e-6)
    assert abs(np.linalg.norm(emb) - 1.0) < 1e-5


# ------------------------------------------------------------------------------------------------
# Errors: one line on stderr, exit status 2, never reaching the models
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_models(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("model work started despite a bad input")

    monkeypatch.setattr(sample, "generate", fail)


def check_error(capsys, argv, match):
    rc = sample.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err, err
    assert match in err, err
    return err


def test_input_errors(env, tmp_path, capsys, no_models):
    d = env["dir"]
    out = str(tmp_path / "o")
    emb = ["--id-embedding", str(d / "id.npy")]
    np.save(tmp_path / "short.npy", np.ones(256, np.float32))
    np.save(tmp_path / "nan.npy", np.full(512, np.nan, np.float32))
    np.save(tmp_path / "lm_bad.npy", np.zeros((468, 3), np.float32))
    np.save(tmp_path / "lm.npy", np.full((478, 3), 0.5, np.float32))
    np.save(tmp_path / "lm3.npy", np.full((3, 478, 3), 0.5, np.float32))
    (tmp_path / "notckpt").mkdir()
    cases = [
        (["--checkpoint", str(tmp_path / "missing"), *emb, "--out", out], "no such directory"),
        (["--checkpoint", str(tmp_path / "notckpt"), *emb, "--out", out], "no facecrafter.json"),
        (["--checkpoint", env["ckpt"], "--id-embedding", str(tmp_path / "none.npy"), "--out", out], "no such file"),
        (["--checkpoint", env["ckpt"], "--id-embedding", str(tmp_path / "short.npy"), "--out", out], "shape [256]"),
        (["--checkpoint", env["ckpt"], "--id-embedding", str(tmp_path / "nan.npy"), "--out", out], "NaN"),
        (["--checkpoint", env["ckpt"], "--id-embedding", str(d / "coffee.png"), "--out", out], "cannot read as .npy"),
        (["--checkpoint", env["ckpt"], *emb], "required: --out"),
        (["--checkpoint", env["ckpt"], "--out", out], "one of the arguments --id-image --id-embedding is required"),
        (["--checkpoint", env["ckpt"], *emb, "--id-image", str(d / "coffee.png"), "--out", out], "not allowed with"),
        (["--checkpoint", env["ckpt"], "--id-image", str(d / "coffee.png"), "--out", out], "--arcface (needed by --id-image) is required"),
        (["--checkpoint", env["ckpt"], "--id-image", str(tmp_path / "none.png"), "--arcface", env["arcface"],
          "--landmarker", env["landmarker"], "--out", out], "no such file"),
        (["--checkpoint", env["ckpt"], "--id-image", str(d / "notes.png"), "--arcface", env["arcface"],
          "--landmarker", env["landmarker"], "--out", out], "not an image"),
        (["--checkpoint", env["ckpt"], "--id-image", str(d / "coffee.png"), "--arcface", env["arcface"],
          "--landmarker", env["landmarker"], "--out", out], "no face found"),
        (["--checkpoint", env["ckpt"], "--id-image", str(d / "astronaut.png"), "--arcface", env["arcface"],
          "--landmarker", env["arcface"], "--out", out], "--landmarker"),
        (["--checkpoint", env["ckpt"], "--id-image", str(d / "astronaut.png"), "--arcface", str(d / "id.npy"),
          "--landmarker", env["landmarker"], "--out", out], "--arcface: cannot open ArcFace ONNX model"),
        (base_args(env, out, "--emotion", "joy"), "--emotion 'joy': unknown; choose one of neutral, happy"),
        (base_args(env, out, "--valence", "1.5", "--arousal", "0"), "--valence 1.5: must be in [-1, 1]"),
        (base_args(env, out, "--valence", "0.2", "--arousal", "-1.01"), "--arousal -1.01: must be in [-1, 1]"),
        (base_args(env, out, "--valence", "0.2"), "--valence and --arousal go together"),
        (base_args(env, out, "--landmarks", str(tmp_path / "lm_bad.npy")), "shape [468, 3], expected [478, 3]"),
        (base_args(env, out, "--landmarks-from", str(tmp_path / "none.png")), "no such file"),
        (base_args(env, out, "--landmarks", str(tmp_path / "lm.npy")), "has no landmark module"),
        (base_args(env, out, "--emotion", "happy"), "has no emotion module"),
        (base_args(env, out, "--valence", "0.5", "--arousal", "0.5"), "has no emotion module"),
        (base_args(env, out, "--landmarks-from", str(d / "astronaut.png"), "--landmarker", env["landmarker"]),
         "has no landmark module"),
        (base_args(env, out, "--guidance-control", "2"), "--guidance-control needs a control"),
        (base_args(env, out, "--absent-controls", "tokens"), "--absent-controls: invalid choice"),
        (fc_args(env, out, "--landmark-scale", "0.5", "--emotion", "sad"), "--landmark-scale needs --landmarks"),
        (fc_args(env, out, "--emotion-scale", "0.5", "--landmarks", str(d / "lm.npy")), "--emotion-scale needs --emotion"),
        (fc_args(env, out, "--emotion", "sad", "--emotion-scale", "nan"), "--emotion-scale nan: must be a finite"),
        (fc_args(env, out, "--landmarks", str(tmp_path / "lm3.npy"), "--num-images", "2"),
         "shape [3, 478, 3], expected [478, 3] or [2, 478, 3]"),
        (fc_args(env, out, "--landmarks-from", str(d / "astronaut.png")), "--landmarks-from needs --landmarker"),
        (fc_args(env, out, "--landmarks-from", str(d / "coffee.png"), "--landmarker", env["landmarker"]),
         "--landmarks-from " + str(d / "coffee.png") + ": no face found"),
        (fc_args(env, out, "--landmarks-from", str(d / "notes.png"), "--landmarker", env["landmarker"]), "not an image"),
        (fc_args(env, out, "--emotion", "happy", ckpt=env["ckpt_lmk"]), "has no emotion module"),
        (fc_args(env, out, "--emotion", "joy"), "--emotion 'joy': unknown"),
        (base_args(env, out, "--height", "30"), "--height 30: must be a positive multiple of 4"),
        (base_args(env, out, "--num-images", "0"), "--num-images 0: must be >= 1"),
        (base_args(env, out, "--steps", "0"), "--steps 0"),
        (base_args(env, out, "--scheduler", "pndm"), "invalid choice: 'pndm'"),
        (base_args(env, out, "--bogus"), "unrecognized arguments: --bogus"),
    ]
    for argv, match in cases:
        check_error(capsys, argv, match)
    assert not os.path.exists(out)


def test_existing_output_needs_overwrite(env, run3, capsys, no_models):
    check_error(capsys, base_args(env, run3), "already holds samples.json (pass --overwrite")


def test_error_exit_in_a_real_process(env, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--checkpoint", env["ckpt"],
                        "--id-embedding", str(env["dir"] / "id.npy"), "--emotion", "joy", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: --emotion 'joy'")


# ------------------------------------------------------------------------------------------------
# FaceCrafter controls
# ------------------------------------------------------------------------------------------------
def test_controls_end_to_end(env, run3):
    """--landmarks NPY --emotion happy on a checkpoint with adapters: images equal FaceCrafterPipeline called
    directly with the same inputs, differ from the ID-only run, and samples.json records every control input."""
    from facecrafter_jax.pretrained import load_pretrained
    from facecrafter_jax.face.vocabulary import emotion_vector
    from facecrafter_jax.sampling import FaceCrafterPipeline

    out = env["dir"] / "out_fc"
    argv = fc_args(env, out, "--num-images", "2", "--batch-size", "2", "--seed", "5", "--landmarks",
                   str(env["dir"] / "lm.npy"), "--emotion", "happy", "--guidance-control", "2.0",
                   "--landmark-scale", "0.8")
    assert sample.main(argv) == 0
    names = sorted(os.listdir(out))
    assert names == ["0000.png", "0001.png", "grid.png", "identity.npy", "landmarks.npy", "samples.json"]
    imgs = np.stack([np.asarray(Image.open(out / f"{i:04d}.png")) for i in range(2)]).astype(int)
    np.testing.assert_array_equal(np.load(out / "landmarks.npy"), env["lmk"])

    m = load_pretrained(env["ckpt_fc"], components=("unet", "text_encoder", "vae", "adapters"))
    vec, _ = emotion_vector("happy")
    ref = FaceCrafterPipeline(m.adapters, m.text_encoder, m.vae)(
        np.broadcast_to(env["emb"], (2, 512)), landmarks=env["lmk"], emotion=vec, guidance_id=3.0,
        guidance_control=2.0, landmark_scale=0.8, num_steps=4, seed=5).images.astype(int)
    assert np.abs(ref - imgs).max() <= 1
    id_only = np.stack([np.asarray(Image.open(run3 / f"{i:04d}.png")) for i in range(2)]).astype(int)
    assert np.abs(id_only - imgs).max() > 10  # the controls change the images (same seed, same base weights)

    meta = json.loads((out / "samples.json").read_text())
    assert meta["model"] == "FaceCrafter (Arc2Face + adapters)"
    assert meta["checkpoint_controls"] == ["emotion", "landmark"]
    c = meta["controls"]
    assert c["landmarks"]["source"] == "npy" and c["landmarks"]["path"] == str(env["dir"] / "lm.npy")
    assert c["landmarks"]["file"] == "landmarks.npy" and c["landmarks"]["shape"] == [478, 3]
    e = c["emotion"]
    assert (e["name"], e["index"], e["class_from"]) == ("happy", 1, "name")
    np.testing.assert_allclose(e["vector"], vec, atol=1e-6)
    assert (e["valence"], e["arousal"]) == (float(vec[8]), float(vec[9]))
    assert c["scales"] == {"landmark": 0.8, "emotion": 1.0}
    s = meta["settings"]
    assert (s["guidance_id"], s["guidance_control"], s["guidance_control_used"], s["absent_controls"]) == (3.0, 2.0, 2.0, "null_tokens")
    assert s["null_branch"].startswith("empty prompt + control branches on their null tokens")

    # evaluate.py reads these targets (landmarks from the file written next to the images)
    from facecrafter_jax.sample_set import load_sample_set

    items = load_sample_set(str(out)).items
    assert [it.landmarks["path"] for it in items] == [str(out / "landmarks.npy")] * 2
    assert items[0].emotion == {"index": 1, "valence": float(vec[8]), "arousal": float(vec[9])}


def test_landmarks_from_image_are_data_prep_record_landmarks(env):
    from data_prep.extract import ExtractSettings, FaceExtractor

    lmk, info = sample.landmarks_from_image(str(env["dir"] / "astronaut.png"), env["landmarker"])
    fx = FaceExtractor(env["landmarker"], ExtractSettings(resolution=64))
    try:
        rec = fx(str(env["dir"]), "astronaut.png")
    finally:
        fx.close()
    assert lmk.shape == (478, 3) and info["num_faces"] == 1
    # records store landmarks normalised by the crop side, so they do not depend on the crop resolution
    np.testing.assert_allclose(lmk, rec["landmarks"], atol=1e-5)
    assert 0.2 < lmk[:, :2].mean() < 0.8


def test_per_image_landmarks_and_landmarks_from_photo(env):
    """[N, 478, 3] landmarks: image i uses row i (row 0 = the shared target of the end-to-end run gives its
    image 0); --landmarks-from runs data_prep's extraction and records the face and the array used."""
    d = env["dir"]
    other = np.random.default_rng(7).uniform(0.2, 0.8, size=(478, 3)).astype(np.float32)
    np.save(d / "lm2.npy", np.stack([env["lmk"], other]))
    out = d / "out_fc_rows"
    common = ["--num-images", "2", "--batch-size", "2", "--seed", "5", "--emotion", "happy", "--guidance-control",
              "2.0", "--landmark-scale", "0.8"]
    assert sample.main(fc_args(env, out, "--landmarks", str(d / "lm2.npy"), *common)) == 0
    shared = d / "out_fc"  # written by test_controls_end_to_end (same settings, one shared landmark target)
    if not (shared / "0000.png").exists():
        assert sample.main(fc_args(env, shared, "--landmarks", str(d / "lm.npy"), *common)) == 0
    a = [np.asarray(Image.open(out / f"{i:04d}.png")).astype(int) for i in range(2)]
    b = [np.asarray(Image.open(shared / f"{i:04d}.png")).astype(int) for i in range(2)]
    assert np.abs(a[0] - b[0]).max() <= 1
    assert np.abs(a[1] - b[1]).max() > 10
    meta = json.loads((out / "samples.json").read_text())
    assert meta["controls"]["landmarks"]["shape"] == [2, 478, 3] and "file" not in meta["controls"]["landmarks"]
    for i, row in enumerate((env["lmk"], other)):
        rec = meta["images"][i]["controls"]["landmarks"]
        assert rec["file"] == f"landmarks/{i:04d}.npy" and rec["row"] == i
        np.testing.assert_array_equal(np.load(out / rec["file"]), row)

    out2 = d / "out_fc_photo"
    assert sample.main(fc_args(env, out2, "--landmarks-from", str(d / "astronaut.png"), "--landmarker",
                               env["landmarker"], "--valence", "-0.65", "--arousal", "0.75", "--num-images", "1",
                               "--guidance-control", "0", "--absent-controls", "switched_off")) == 0
    meta = json.loads((out2 / "samples.json").read_text())
    lm = meta["controls"]["landmarks"]
    assert lm["source"] == "image" and lm["path"] == str(d / "astronaut.png") and lm["file"] == "landmarks.npy"
    assert lm["face"]["num_faces"] == 1 and lm["landmarker"] == env["landmarker"]
    want, _ = sample.landmarks_from_image(str(d / "astronaut.png"), env["landmarker"])
    np.testing.assert_array_equal(np.load(out2 / "landmarks.npy"), want)
    e = meta["controls"]["emotion"]
    assert e["class_from"] == "nearest valence/arousal" and (e["valence"], e["arousal"]) == (-0.65, 0.75)
    # g_ctl = 0 with absent controls off is the ID-only (Arc2Face) image: image 0 of the plain run (seed 0)
    assert meta["settings"]["null_branch"] == "empty prompt, control branches off"
    plain = d / "out_plain1"
    assert sample.main(base_args(env, plain, "--num-images", "1")) == 0
    assert np.abs(np.asarray(Image.open(out2 / "0000.png")).astype(int)
                  - np.asarray(Image.open(plain / "0000.png")).astype(int)).max() <= 1
