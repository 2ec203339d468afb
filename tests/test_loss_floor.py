"""The per-image loss floor on a memorising toy: members stop sinking below the non-members' loss level (within the
margin), while the mean loss still drops; plain training on the same toy memorises."""
import itertools

import pytest
import torch

from privlora.config import build_config, make_config
from privlora.errors import PrivloraError
from privlora.objectives import build_objective
from privlora.objectives.lora import LoraObjective
from privlora.objectives.loss_floor import LossFloorObjective

D, N = 16, 32


class MemorisingToy:
    """Image i is a vector x_i; the 'model' predicts it from a shared vector s (learns what all images share) plus,
    for a training image, its own memory m_i (which only training on i can learn). Loss map = squared error."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(2 * N, D, generator=g) + 2.0  # 0..N-1 members, N..2N-1 non-members
        self.shared = torch.nn.Parameter(torch.zeros(D))
        self.memory = torch.nn.Parameter(torch.zeros(N, D))
        self.num_train_timesteps = 1000
        self.t = torch.Generator().manual_seed(1)

    def loss_map(self, batch, timesteps=None, **_):
        i = batch["index"]
        pred = self.shared + torch.where((i < N)[:, None], self.memory[i.clamp(max=N - 1)], torch.zeros(D))
        err = (self.images[i] - pred) ** 2
        t = timesteps if timesteps is not None else torch.randint(0, 1000, (len(i),), generator=self.t)
        return err[:, None, :, None], t  # (B, 1, D, 1)

    def adaptation_loss(self, maps, t):
        return maps.mean()

    def mean_loss(self, indices):
        with torch.no_grad():
            return self.loss_map({"index": indices})[0].mean().item()


def batches(indices, size, seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        order = indices[torch.randperm(len(indices), generator=g)]
        for k in range(0, len(order) - size + 1, size):
            yield {"index": order[k:k + size]}


def trained(objective_for, steps=600):
    toy = MemorisingToy()
    members, nonmembers = torch.arange(N), torch.arange(N, 2 * N)
    aux = nonmembers[: N // 2]  # the second half is the held-out test
    objective = objective_for(batches(aux, 8, 3))
    opt = torch.optim.SGD([toy.shared, toy.memory], lr=0.5)
    start = toy.mean_loss(members)
    for batch in itertools.islice(batches(members, 8, 2), steps):
        opt.zero_grad()
        objective.lora_loss(batch, toy).loss.backward()
        opt.step()
    return toy, start


def leakage(toy) -> float:
    """AUC of the loss attack on the toy: members vs the held-out non-members (lower loss = member)."""
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        member = toy.loss_map({"index": torch.arange(N)})[0].flatten(1).mean(1)
        nonmember = toy.loss_map({"index": torch.arange(N + N // 2, 2 * N)})[0].flatten(1).mean(1)
    return float(roc_auc_score([1] * len(member) + [0] * len(nonmember), torch.cat([-member, -nonmember])))


def test_plain_training_memorises_the_toy():
    toy, start = trained(lambda aux: LoraObjective())
    member, nonmember = toy.mean_loss(torch.arange(N)), toy.mean_loss(torch.arange(N + N // 2, 2 * N))
    assert member < 0.1 * nonmember and leakage(toy) > 0.95  # the fixture really memorises


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_members_stay_within_the_margin_of_the_nonmembers_while_the_mean_loss_drops(margin):
    toy, start = trained(lambda aux: LossFloorObjective(aux, margin))
    member, nonmember = toy.mean_loss(torch.arange(N)), toy.mean_loss(torch.arange(N + N // 2, 2 * N))
    with torch.no_grad():
        spread = toy.loss_map({"index": torch.arange(N + N // 2, 2 * N)})[0].flatten(1).mean(1).std().item()
    assert member < 0.5 * start  # utility: the shared part is still learned
    # members end at the floor, non-members spread around it: the mean gap is the margin plus under half a spread
    assert nonmember - margin - 0.5 * spread <= member <= nonmember
    if margin == 0.0:
        assert leakage(toy) < 0.65  # against 1.0 for plain training of the same toy


def test_loss_floor_settings_are_checked_and_the_objective_builds_from_the_config():
    with pytest.raises(PrivloraError, match="loss_floor_margin -1.0 must be ≥ 0"):
        build_config(None, {"method": "loss_floor", "loss_floor_margin": -1, "synthetic_images": 9,
                            "max_train_steps": 1})
    with pytest.raises(PrivloraError, match="hessian_every_n_steps = 0"):
        build_config(None, {"method": "loss_floor", "hessian_every_n_steps": 5, "synthetic_images": 9,
                            "max_train_steps": 1})
    with pytest.raises(PrivloraError, match="min_snr_gamma"):
        build_config(None, {"method": "loss_floor", "min_snr_gamma": 5, "synthetic_images": 9, "max_train_steps": 1})
    obj = build_objective(make_config(method="loss_floor", loss_floor_margin=0.2), latent_channels=4,
                          nonmember_aux=batches(torch.arange(4), 2, 0))
    assert obj.margin == 0.2
    state = obj.state_dict()
    obj.level += 1.0
    obj.load_state_dict(state)
    assert torch.equal(obj.level, torch.zeros_like(obj.level))
