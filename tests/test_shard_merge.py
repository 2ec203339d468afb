"""shard_merge: disjoint seeded shards; shard runs that train on their shard only; the merge math (the mean delta's
best rank-r approximation, conv layers included); the published file as the strict loader reads it; reuse."""
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from privlora.config import build_config
from privlora.data.halves import half_assignment, shard_assignment, shard_subset, train_subset
from privlora.errors import PrivloraError
from privlora.objectives.base import Objective
from privlora.objectives.shard_merge import ShardMergeObjective, delta, merge_layer, shard_config
from privlora.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(synthetic_images=40, n_member_aux=5, n_nonmember_aux=5, n_nonmember_test=10, resolution=32,
             train_batch_size=8, eval_samples=8, network_dim=4, network_alpha=4, unet_lr=1e-3, method="shard_merge")


# ---------------------------------------------------------------- the shards


def test_shards_are_disjoint_cover_the_train_role_are_balanced_and_seeded():
    examples = [f"img{i:02d}" for i in range(27)]
    shards = [train_subset(examples, shard_subset(j, 4, 5), seed=99) for j in range(1, 5)]
    assert sorted(len(s) for s in shards) == [6, 7, 7, 7]  # balanced within one
    assert sorted(sum(shards, [])) == examples  # every image in exactly one shard
    assert all(s == [e for e in examples if e in set(s)] for s in shards)  # the train role's order is kept
    assert shards == [train_subset(examples, shard_subset(j, 4, 5), seed=0) for j in range(1, 5)]  # not split_seed
    assert shard_assignment(27, 4, 5) == shard_assignment(27, 4, 5) != shard_assignment(27, 4, 6)
    assert sorted(shard_assignment(3, 3, 0)) == [0, 1, 2] and sorted(shard_assignment(2, 3, 0)) == [0, 1]
    for n in range(12):  # the halves are the shards of two under the split seed: distill_lora's are unchanged
        assert half_assignment(n, 3) == shard_assignment(n, 2, 3)
    assert train_subset(examples, "half_b", 3) == train_subset(examples, shard_subset(2, 2, 3), 0)


@pytest.mark.parametrize("subset", ["shard_0_of_4_seed_1", "shard_5_of_4_seed_1", "shard_1_of_1_seed_1",
                                    "shard_1_of_4"])
def test_a_bad_shard_name_is_refused(subset):
    with pytest.raises(PrivloraError, match=f"train_subset '{subset}' is not one of all, half_a, half_b or shard_"):
        build_config(None, {**SMALL, "method": "lora", "max_train_epochs": 1, "train_subset": subset})


def test_shard_runs_are_plain_lora_on_one_shard_with_a_kth_of_the_steps(tmp_path):
    cfg = build_config(None, {**SMALL, "output_dir": str(tmp_path), "max_train_steps": 10, "save_every_n_steps": 2,
                              "save_state": True, "shard_count": 3, "seed": 7})
    runs = ShardMergeObjective.prerequisites(cfg)
    assert [r.train_subset for r in runs] == [f"shard_{j}_of_3_seed_7" for j in (1, 2, 3)]
    assert [r.output_dir for r in runs] == [str(tmp_path / "shards" / r.train_subset) for r in runs]
    for r in runs:
        assert (r.method, r.method_settings.values(), r.save_format) == ("lora", {}, "kohya")
        assert (r.max_train_steps, r.save_every_n_steps, r.save_state, r.resume) == (math.ceil(10 / 3), None, False,
                                                                                    None)
        assert (r.seed, r.network_dim, r.unet_lr, r.split_seed) == (7, cfg.network_dim, cfg.unet_lr, cfg.split_seed)
    assert [r.output_name for r in runs] == ["shard_1", "shard_2", "shard_3"]
    by_epochs = build_config(None, {**SMALL, "output_dir": str(tmp_path), "max_train_epochs": 6, "shard_seed": 2})
    first = shard_config(by_epochs, 1)
    assert (first.max_train_epochs, first.max_train_steps, first.train_subset) == (6, None, "shard_1_of_4_seed_2")
    own = shard_config(build_config(None, {**SMALL, "output_dir": str(tmp_path), "max_train_steps": 10,
                                           "shard_epochs": 2}), 4)
    assert (own.max_train_epochs, own.max_train_steps) == (2, None)


@pytest.mark.parametrize("override, message", [
    ({"shard_count": 1}, "shard_count 1 must be ≥ 2"),
    ({"shard_merge": "mean"}, "shard_merge 'mean' is not one of delta_svd, factors"),
    ({"shard_epochs": 0}, "shard_epochs 0 must be ≥ 1"),
    ({"train_text_encoder": True}, "set train_text_encoder = false"),
    ({"train_subset": "half_a"}, 'set train_subset = "all"'),
    ({"canaries": 4}, "shard_merge does not support canaries"),
])
def test_bad_settings_are_one_line_errors(override, message):
    with pytest.raises(PrivloraError) as e:
        build_config(None, {**SMALL, "max_train_epochs": 1, **override})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_multi_process_launch_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PrivloraError, match="shard_merge runs in one process"):
        build_config(None, {**SMALL, "max_train_epochs": 1})


# ---------------------------------------------------------------- the merge


def random_factors(k, rank, out, inner, seed, conv=False):
    g = torch.Generator().manual_seed(seed)
    down_shape = (rank, inner, 3, 3) if conv else (rank, inner)
    up_shape = (out, rank, 1, 1) if conv else (out, rank)
    downs = [torch.randn(down_shape, generator=g, dtype=torch.float64) for _ in range(k)]
    ups = [torch.randn(up_shape, generator=g, dtype=torch.float64) for _ in range(k)]
    return downs, ups


def mean_delta(downs, ups, scale):
    return sum(delta(d, u, scale) for d, u in zip(downs, ups)) / len(downs)


def best_rank(matrix, rank):
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank], s


@pytest.mark.parametrize("conv", [False, True])
def test_delta_svd_is_the_mean_delta_when_its_rank_allows(conv):
    downs, ups = random_factors(3, 4, 10, 6, seed=1, conv=conv)
    downs = [downs[0]] * 3  # one shared A: the mean delta is (mean B)·A, of rank ≤ 4
    down, up = merge_layer(downs, ups, 0.5, "delta_svd")
    assert (down.shape, up.shape) == (downs[0].shape, ups[0].shape)
    torch.testing.assert_close(delta(down, up, 0.5), mean_delta(downs, ups, 0.5), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("conv", [False, True])
def test_delta_svd_is_the_best_rank_r_approximation_of_the_mean_delta(conv):
    downs, ups = random_factors(4, 3, 12, 5, seed=2, conv=conv)  # the mean delta has rank 12 > 3
    down, up = merge_layer(downs, ups, 2.0, "delta_svd")
    target = mean_delta(downs, ups, 2.0)
    best, sigma = best_rank(target, 3)
    assert sigma[3] > 1e-3 * sigma[0]  # truly above rank 3: the truncation is visible
    merged = delta(down, up, 2.0)
    torch.testing.assert_close(merged, best, rtol=1e-9, atol=1e-9)
    error = (merged - target).pow(2).sum()  # Eckart–Young: the squared tail singular values, the least possible
    assert error.item() == pytest.approx(sigma[3:].pow(2).sum().item(), rel=1e-9)
    factors = delta(*merge_layer(downs, ups, 2.0, "factors"), 2.0)
    assert (factors - target).pow(2).sum() > error  # the cheap rule is no better, here worse


def test_a_conv_layers_merged_factors_act_as_the_merged_kernel():
    """The (out, in·3·3) reshape is the one peft applies: down conv then 1×1 up conv equals one conv whose kernel
    is the merged delta reshaped back."""
    downs, ups = random_factors(3, 2, 6, 4, seed=3, conv=True)
    down, up = merge_layer(downs, ups, 1.5, "delta_svd")
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    through_factors = 1.5 * torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, padding=1), up)
    kernel = delta(down, up, 1.5).reshape(6, 4, 3, 3)
    torch.testing.assert_close(through_factors, torch.nn.functional.conv2d(x, kernel, padding=1))


def test_a_layer_narrower_than_the_rank_keeps_its_mean_delta_exactly():
    downs, ups = random_factors(3, 4, 3, 2, seed=4)  # out 3, in 2: every delta has rank ≤ 2 < 4
    down, up = merge_layer(downs, ups, 1.0, "delta_svd")
    torch.testing.assert_close(delta(down, up, 1.0), mean_delta(downs, ups, 1.0), rtol=1e-10, atol=1e-10)


def test_factors_averages_each_factor_and_float32_stays_float32():
    downs, ups = random_factors(3, 2, 5, 4, seed=5)
    down, up = merge_layer(downs, ups, 1.0, "factors")
    torch.testing.assert_close(down, sum(downs) / 3)
    torch.testing.assert_close(up, sum(ups) / 3)
    down32, up32 = merge_layer([d.float() for d in downs], [u.float() for u in ups], 1.0, "delta_svd")
    assert down32.dtype == up32.dtype == torch.float32


# ---------------------------------------------------------------- end to end


def loaded_deltas(model, path):
    """Each LoRA module's delta as diffusers' loader (the project's strict ``load_lora_adapter``) puts it in."""
    from peft.tuners.lora import LoraLayer

    from privlora.audit import loaded_loras
    from privlora.models.loading import load_base
    from privlora.models.lora import kohya_key_of

    base = load_base(model)
    out = {}
    with loaded_loras(base, [path]) as (switch, adapters):
        unet = switch.pipe.unet
        for name, m in unet.named_modules():
            if isinstance(m, LoraLayer) and adapters[0] in m.lora_A:
                a, b = m.lora_A[adapters[0]].weight, m.lora_B[adapters[0]].weight
                out[kohya_key_of(unet, "lora_unet", name)] = delta(a.detach(), b.detach(), m.scaling[adapters[0]])
    return out


def expected_deltas(shard_files):
    """The best rank-r approximation of the shards' mean delta, per layer, from the files alone (full SVD)."""
    shards = [load_file(str(f)) for f in shard_files]
    out = {}
    for key in (k[:-len(".lora_down.weight")] for k in shards[0] if k.endswith(".lora_down.weight")):
        rank = shards[0][f"{key}.lora_down.weight"].shape[0]
        scale = float(shards[0][f"{key}.alpha"]) / rank
        mean = sum(delta(s[f"{key}.lora_down.weight"], s[f"{key}.lora_up.weight"], scale) for s in shards) / len(shards)
        out[key] = best_rank(mean, rank)[0]
    return out


@pytest.mark.slow  # ~10 s on the 2-core box: one shard run, then the others and the merge
def test_the_published_lora_is_the_merge_of_shard_runs_that_each_trained_on_their_shard_only(model, tmp_path,
                                                                                           monkeypatch):
    seen: list[tuple[str, list[str]]] = []
    make_loader = Objective.make_loader

    def spy(self, data, batch_size, generator):  # what each run's training batches are drawn from
        seen.append((self.name, [e.path.name for e in data.examples]))
        return make_loader(self, data, batch_size, generator)
    monkeypatch.setattr(Objective, "make_loader", spy)
    out = tmp_path / "r"
    cfg = build_config(None, {**SMALL, "pretrained_model_name_or_path": model, "output_dir": str(out),
                              "max_train_epochs": 1, "shard_count": 3, "conv_dim": 2, "conv_alpha": 1})
    runs = ShardMergeObjective.prerequisites(cfg)
    files = [out / "shards" / r.train_subset / f"shard_{j}.safetensors" for j, r in enumerate(runs, 1)]
    train(runs[0])  # as if the process died after the first shard run finished
    first = files[0].stat().st_mtime_ns
    path = train(cfg)
    assert files[0].stat().st_mtime_ns == first  # the finished shard run was reused, not retrained
    assert [name for name, _ in seen] == ["lora", "lora", "lora", "shard_merge"]

    # each shard run trained on its own shard of the train role, and on nothing else
    whole = seen[-1][1]
    assert len(whole) == 25 and sorted(len(s) for _, s in seen[:3]) == [8, 8, 9]
    shards = [train_subset(whole, r.train_subset, cfg.split_seed) for r in runs]
    assert [s for _, s in seen[:3]] == shards and sorted(sum(shards, [])) == sorted(whole)

    # the published file: an ordinary LoRA of the run's layout, loaded strictly, whose deltas are the merge
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["lora.safetensors"]
    assert load_file(str(path)).keys() == load_file(str(files[0])).keys()
    expected, loaded = expected_deltas(files), loaded_deltas(model, path)
    assert loaded.keys() == expected.keys() and any("resnets_0_conv1" in k for k in loaded)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key].double(), value, rtol=1e-4, atol=1e-6 * value.abs().max().item())
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    steps = []
    for file in files:
        with safe_open(str(file), "pt") as f:
            steps.append(int(f.metadata()["ss_steps"]))
    assert (meta["privlora_method"], meta["privlora_shard_count"], meta["privlora_shard_merge"]) == \
        ("shard_merge", "3", "delta_svd")
    assert meta["privlora_shard_seed"] == str(cfg.seed) and "split_seed" not in meta["privlora_hyperparameters"]
    assert meta["ss_steps"] == str(sum(steps)) == "4" and json.loads(meta["privlora_shard_steps"]) == steps
    history = json.loads((out / "history.json").read_text())["epochs"]
    assert [(h["epoch"], h["step"]) for h in history] == [(0, 0)]  # evaluated once, no training step after the merge


def test_a_resume_with_other_settings_is_refused_before_any_shard_run_trains(tmp_path, monkeypatch):
    from privlora.train import run_prerequisites
    from privlora.train_state import resume_settings

    calls: list[str] = []
    monkeypatch.setattr("privlora.train.train", lambda cfg: calls.append(cfg.output_name))
    saved = build_config(None, {**SMALL, "output_dir": str(tmp_path), "max_train_epochs": 1})
    state = tmp_path / "state-step000000"
    state.mkdir()
    torch.save({"config": resume_settings(saved)}, state / "state.pt")
    torch.save({}, state / "rank0.pt")
    changed = build_config(None, {**SMALL, "output_dir": str(tmp_path), "max_train_epochs": 1, "shard_count": 8,
                                  "resume": str(state)})
    with pytest.raises(PrivloraError, match="saved with different shard_count"):
        run_prerequisites(changed)
    assert calls == []
