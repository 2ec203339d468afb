"""FID / KID: torchmetrics' Fréchet distance against a scipy reference, the tiny proxy, the missing-weights error."""
import importlib.util

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from privlora.cli import main
from privlora.errors import PrivloraError
from privlora.models.tiny import TINY_SD_PATH
from privlora.quality import (INCEPTION_WEIGHTS_NAME, INCEPTION_WEIGHTS_URL, PROXY_LABEL, frechet_distance,
                              kernel_distance, score)

pytestmark = pytest.mark.usefixtures("one_thread")


def features(n, d, seed, shift=0.0, mix=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x @ (torch.eye(d, dtype=torch.float64) + mix * torch.randn(d, d, generator=g, dtype=torch.float64)) + shift


def scipy_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = a.numpy(), b.numpy()
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def images(n, seed, brightness=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256 - 80, (n, 3, 32, 32), generator=g).to(torch.int16)
    x[:, :, 8:24, 8:24] += 60  # a bright square, so images have structure beyond noise
    return (x + brightness).clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- on features


@pytest.mark.parametrize("d,mix,shift", [(8, 0.3, 0.5), (32, 0.5, 0.0), (64, 0.2, 2.0)])
def test_frechet_distance_matches_scipy_reference(d, mix, shift):
    a, b = features(300, d, 0), features(200, d, 1, shift, mix)
    ours, ref = frechet_distance(a, b), scipy_fid(a, b)
    assert ours == pytest.approx(ref, rel=1e-3)


def test_distances_of_a_set_to_itself_and_to_shifted_sets():
    a = features(200, 16, 0)
    assert abs(frechet_distance(a, a)) < 1e-6
    assert frechet_distance(a, a) >= 0.0  # clamped: round-off never reports a negative distance
    fids = [frechet_distance(a, features(200, 16, 1, shift)) for shift in (0.0, 0.5, 1.0)]
    kids = [kernel_distance(a, features(200, 16, 1, shift), subsets=20, subset_size=100)[0]
            for shift in (0.0, 0.5, 1.0)]
    assert fids == sorted(fids) and fids[-1] > 10 * fids[0]
    assert kids == sorted(kids) and kids[-1] > 10 * abs(kids[0])


def test_kid_is_deterministic_for_a_seed_and_caps_the_subset_size():
    a, b = features(50, 8, 0), features(40, 8, 1, 0.3)
    assert kernel_distance(a, b, subsets=10, seed=3) == kernel_distance(a, b, subsets=10, seed=3)
    assert kernel_distance(a, b, subsets=10, subset_size=1000)[2] == 40


def test_too_few_samples_is_a_user_error():
    with pytest.raises(PrivloraError, match="at least 2 images"):
        frechet_distance(features(1, 4, 0), features(10, 4, 1))


# ---------------------------------------------------------------- tiny proxy on images


def test_tiny_proxy_scores_and_labels(model):
    real = images(48, 0)
    same = score(real, real, feature_extractor="tiny", feature_model=str(model), kid_subsets=10)
    near = score(real, images(48, 1, brightness=10), feature_extractor="tiny", feature_model=str(model), kid_subsets=10)
    far = score(real, images(48, 1, brightness=70), feature_extractor="tiny", feature_model=str(model), kid_subsets=10)
    assert same["label"] == PROXY_LABEL and "not comparable to Inception" in PROXY_LABEL
    assert not {"fid", "kid_mean"} & set(same)  # proxy numbers never sit under the Inception key names
    assert abs(same["fid_proxy_tiny"]) < 1e-6
    assert same["fid_proxy_tiny"] >= 0.0 and "round-off" in same["fid_note"]
    assert 0 < near["fid_proxy_tiny"] < far["fid_proxy_tiny"]
    assert near["kid_proxy_tiny_mean"] < far["kid_proxy_tiny_mean"]
    assert far["n_real"] == far["n_fake"] == 48 and len(far["feature_model_vae_sha256"]) == 64


def test_cli_quality_tiny_from_folders(model, tmp_path, capsys):
    import json

    for name, batch in (("real", images(12, 0)), ("fake", images(12, 1, brightness=40))):
        (tmp_path / name).mkdir()
        for i, img in enumerate(batch):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / name / f"{i:05d}.png")
    Image.new("RGB", (70, 70)).save(tmp_path / "fake" / "grid.png")  # a sample contact sheet is not a sample
    out = tmp_path / "q.json"
    args = ["quality", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
            "--feature_extractor", "tiny", "--feature_model", str(model), "--kid_subsets", "5", "--out", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result == json.loads(capsys.readouterr().out)
    assert result["fid_proxy_tiny"] > 0 and result["n_fake"] == 12 and result["label"] == PROXY_LABEL


# ---------------------------------------------------------------- Inception weights


def test_missing_inception_weights_is_clear_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "real").mkdir()
    out = tmp_path / "q.json"
    args = ["quality", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "real"), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("privlora: error:") and err.count("\n") == 1
    assert INCEPTION_WEIGHTS_NAME in err and INCEPTION_WEIGHTS_URL in err and "--inception_weights" in err
    assert not out.exists()

    assert main(args + ["--inception_weights", str(tmp_path / "nope.pth")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope.pth'}: Inception weights file not found" in err and INCEPTION_WEIGHTS_NAME in err
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_without_torch_fidelity_says_what_to_install(tmp_path):
    weights = tmp_path / INCEPTION_WEIGHTS_NAME
    weights.write_bytes(b"placeholder")
    with pytest.raises(PrivloraError, match="pip install torch-fidelity"):
        score(images(4, 0), images(4, 1), inception_weights=weights)


@pytest.mark.skipif(not (TINY_SD_PATH / "model_index.json").is_file(), reason="embedded tiny-sd not built")
def test_embedded_tiny_sd_samples_score_as_a_proxy(tmp_path):
    from privlora.sample import sample

    sample("tiny-sd", tmp_path / "s", prompt="a large red circle in the center on a white background", n=4, steps=4)
    result = score(images(8, 0), tmp_path / "s", metrics="fid", feature_extractor="tiny", kid_subsets=5)
    assert result["feature_model"] == "tiny-sd" and result["n_fake"] == 4 and result["fid_proxy_tiny"] > 0
