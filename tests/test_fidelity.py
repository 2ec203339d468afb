"""Issue #12 pieces that need no model: the evaluation subsets, the Hessian estimate, caption handling."""
from pathlib import Path

import pytest
import torch

from privlora.config import TrainConfig
from privlora.data.cache import RoleData
from privlora.data.readers import Example
from privlora.train_probes import probe_roles


def role(n, tag):
    examples = [Example(Path(f"/d/{tag}{i:03d}.png"), f"{tag} {i}") for i in range(n)]
    return RoleData(examples, resolution=8, latents=torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1))


def test_probe_subset_is_a_seeded_random_subset_not_the_first_in_path_order():
    roles = {"member_test": role(50, "m"), "nonmember_test": role(50, "n")}
    a = probe_roles(roles, TrainConfig(eval_samples=10, seed=1))
    b = probe_roles(roles, TrainConfig(eval_samples=10, seed=1))
    c = probe_roles(roles, TrainConfig(eval_samples=10, seed=2))
    picked = [e.path.name for e in a["member_test"].examples]
    assert picked == [e.path.name for e in b["member_test"].examples]  # seeded
    assert picked != [e.path.name for e in c["member_test"].examples]
    assert picked != [f"m{i:03d}.png" for i in range(10)] and len(set(picked)) == 10
    # latents travel with their examples
    sub = a["member_test"]
    assert [int(sub[i]["latents"].item()) for i in range(10)] == [int(p[1:4]) for p in picked]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hessian_top_eigenvalue_matches_the_exact_one_of_a_quadratic(seed):
    from privlora.hessian import top_eigenvalue

    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    eig = torch.tensor([5.0, 1.5, 1.0, 0.5, 0.2, -0.3, 0.1], dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T  # L(x, y) = ½ [x;y]ᵀ A [x;y] over two parameter tensors (3 + 4 entries)
    x = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def loss():
        z = torch.cat([x, y.flatten()])
        return 0.5 * z @ a @ z + (z ** 2).sum() * 0.0

    got = top_eigenvalue(loss, [x, y], iters=60, generator=torch.Generator().manual_seed(0))
    assert got == pytest.approx(torch.linalg.eigvalsh(a).max().item(), rel=1e-6)


def test_curves_plot_adds_a_hessian_panel_only_when_a_run_has_estimates():
    from privlora.benchplots import curves_png

    epochs = [{"epoch": e, "L_ada": 1.0 / e, "grad_norm": 0.5, "member_gap": 0.0} for e in (1, 2)]
    without = curves_png({"lora": {"epochs": epochs}})
    with_h = curves_png({"lora": {"epochs": epochs, "hessian": [{"step": 2, "hessian_top_eig": 3.0}]}})
    from PIL import Image
    import io
    assert Image.open(io.BytesIO(with_h)).width > Image.open(io.BytesIO(without)).width


# --- kohya caption handling ----------------------------------------------------------------------------------

from privlora.captions import shuffle_tags  # noqa: E402
from privlora.models.loading import encode_long, merge_windows, split_windows  # noqa: E402

B, E = 100, 101  # BOS / EOS (= pad, as in SD1's tokenizer)


def test_window_split_and_merge_by_hand():
    ids = torch.tensor([[B, 1, 2, 3, 4, 5, 6, E]])  # max_token_length of 2 windows × 3 tokens
    windows = split_windows(ids, 2, B, E, E)
    assert windows.tolist() == [[B, 1, 2, 3, E], [B, 4, 5, 6, E]]
    hidden = (10 * torch.arange(2).view(2, 1) + torch.arange(5)).float().unsqueeze(-1)  # window k, position p: 10k+p
    merged = merge_windows(hidden, 2)
    assert merged.squeeze(-1).tolist() == [[0, 1, 2, 3, 11, 12, 13, 14]]  # BOS₀, inner₀, inner₁, EOS₁


def test_window_split_with_a_pad_that_is_not_eos_follows_kohyas_sd2_rule():
    ids = torch.tensor([[B, 1, 2, E, 0, 0, 0, 0]])  # pad = 0
    assert split_windows(ids, 2, B, E, 0).tolist() == [[B, 1, 2, E, 0], [B, E, 0, 0, 0]]


def test_225_tokens_make_three_77_token_windows_and_227_positions():
    ids = torch.arange(2 * 227).view(2, 227)
    windows = split_windows(ids, 3, B, E, E)
    assert windows.shape == (6, 77)
    assert windows[1, 1:76].tolist() == list(range(76, 151))  # the second window: tokens 76..150 of the first row
    assert merge_windows(torch.randn(6, 77, 8), 3).shape == (2, 1 + 225 + 1, 8)


@pytest.fixture(scope="module")
def tiny():
    from privlora.models.loading import load_base

    base = load_base("tiny-sd")
    base.text_encoder.eval()
    return base


LONG = " ".join(["word1 tag"] * 6)  # 42 tokens in tiny-sd's small vocabulary: past its 30-token window


@torch.no_grad()
def test_long_caption_is_conditioned_beyond_the_truncation(tiny):
    from privlora.models.loading import encode_prompt

    a, b = LONG + " red cat", LONG + " blue dog"
    plain = encode_prompt(tiny, [a, b], clip_skip=2)
    long = encode_prompt(tiny, [a, b], clip_skip=2, max_token_length=225)
    assert long.shape == (2, 3 * 30 + 2, plain.shape[-1])  # tiny-sd: 30-token windows, 3 of them
    torch.testing.assert_close(plain[0], plain[1])  # truncation drops the tails …
    assert not torch.allclose(long[0], long[1])  # … the windows keep them


@torch.no_grad()
def test_short_caption_keeps_the_77_token_prefix_but_padding_windows_reach_the_unet(tiny):
    from privlora.models.loading import encode_prompt

    plain = encode_prompt(tiny, ["a small red cat"], clip_skip=2)
    long = encode_prompt(tiny, ["a small red cat"], clip_skip=2, max_token_length=225)
    torch.testing.assert_close(long[:, :31], plain[:, :31])  # BOS + the first window: the same computation
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    out_plain = tiny.unet(z, t, plain).sample
    out_long = tiny.unet(z, t, long).sample
    # The extra (padding) positions are keys of the cross-attention: kohya's scheme changes the UNet's view of
    # a short caption too (docs/fidelity.md).
    assert not torch.allclose(out_plain, out_long, atol=1e-4)


def test_shuffle_caption_keeps_the_first_tags_and_is_seeded():
    caption = "pikachu, yellow, mouse, cute, electric, small"
    g = torch.Generator().manual_seed(0)
    shuffled = [shuffle_tags(caption, 2, g) for _ in range(6)]
    assert all(s.startswith("pikachu, yellow, ") for s in shuffled)
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in shuffled)
    assert len(set(shuffled)) > 1
    g2 = torch.Generator().manual_seed(0)
    assert [shuffle_tags(caption, 2, g2) for _ in range(6)] == shuffled


def test_shuffle_caption_turns_text_caching_off_or_refuses_it():
    assert not TrainConfig(shuffle_caption=True, max_train_steps=1, synthetic_images=9).validate().caches_text
    from privlora.errors import PrivloraError

    with pytest.raises(PrivloraError, match="shuffle_caption.*cannot be cached"):
        TrainConfig(shuffle_caption=True, cache_text_encoder_outputs=True, max_train_steps=1,
                    synthetic_images=9).validate("p.toml")
    with pytest.raises(PrivloraError, match="max_token_length 100"):
        TrainConfig(max_token_length=100, max_train_steps=1, synthetic_images=9).validate()


def test_encode_long_applies_clip_skip_per_window(tiny):
    with torch.no_grad():
        skip1 = encode_long(tiny, [LONG], 150, None)
        skip2 = encode_long(tiny, [LONG], 150, 2)
    assert skip1.shape == skip2.shape == (1, 62, skip1.shape[-1]) and not torch.allclose(skip1, skip2)


# --- the audit and sampling encode captions as the LoRA was trained ---------------------------------------

from privlora.captions import TextEncoding, text_encoding  # noqa: E402


def test_text_encoding_comes_from_the_flags_else_the_lora_metadata_else_one_window():
    trained = {"max_token_length": 225, "clip_skip": 2}
    assert text_encoding(trained, None, None, "a.safetensors") == TextEncoding(2, 225)
    assert text_encoding(trained, None, 75, "a.safetensors") == TextEncoding(2, None)  # 75 = one window
    assert text_encoding(trained, 1, 150, "a.safetensors") == TextEncoding(None, 150)
    assert text_encoding({}, None, None, "a.safetensors") == TextEncoding()
    expected = "clip_skip: LoRA metadata; max_token_length: --max_token_length"
    assert text_encoding(trained, None, 75, "a").origin == expected
    from privlora.errors import PrivloraError

    with pytest.raises(PrivloraError, match=r"^a.safetensors: its metadata says max_token_length 100"):
        text_encoding({"max_token_length": 100}, None, None, "a.safetensors")


@torch.no_grad()
def test_an_audit_target_encodes_a_long_caption_in_225_token_windows(tiny):
    from privlora.attacks import Batch, Query, Target
    from privlora.models.loading import encode_text

    caption = LONG + " red cat"
    encodings = {n: TextEncoding(2, n) for n in (None, 225)}
    targets = {n: Target(n, tiny.unet, tiny.noise_scheduler, lambda c, e=e: encode_text(tiny, c, e))
               for n, e in encodings.items()}
    plain, long = targets[None].embed([caption]), targets[225].embed([caption])
    assert plain.shape == (1, 32, plain.shape[-1]) and long.shape == (1, 3 * 30 + 2, plain.shape[-1])
    torch.testing.assert_close(long[:, :31], plain[:, :31])  # BOS + the first window: the same computation
    batch = Batch(["k"], [Path("/x.png")], ["member_test"], [caption],
                  torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)))
    maps = {n: t.loss_maps(batch, [Query(500)]) for n, t in targets.items()}
    assert not torch.allclose(maps[None], maps[225])  # the tail of the caption reaches the UNet


# --- issue 24's last fidelity corrections (docs/fidelity.md rows 5, 11, 15) ---------------------------------------

from privlora.captions import SHUFFLED, CaptionShuffler, shuffled_once  # noqa: E402
from privlora.objectives.adversarial import repeat_batch  # noqa: E402


class _ShufflingDenoiser:
    def __init__(self):
        self.caption_shuffle = CaptionShuffler(keep_tokens=0, seed=3)


def test_the_reference_steps_two_copies_share_one_caption_shuffle():
    captions = ["a, b, c, d, e, f, g", "h, i, j, k, l, m"]
    den = _ShufflingDenoiser()
    doubled = repeat_batch(shuffled_once({"caption": captions, "latents": torch.zeros(2, 1)}, den), 2)
    assert doubled["caption"][:2] == doubled["caption"][2:]  # L_ada's copy and L_adv's copy: the same shuffle
    assert doubled["caption"][:2] != captions and sorted(doubled["caption"][0].split(", ")) == sorted(
        captions[0].split(", "))
    assert doubled[SHUFFLED] == [True] * 4  # the denoiser will not shuffle them a second time
    assert shuffled_once(doubled, den) is doubled
    # shuffling each copy on its own (the old behaviour) would have differed for these captions and this seed
    independent = _ShufflingDenoiser().caption_shuffle(captions * 2)
    assert independent[:2] != independent[2:]


def test_the_denoiser_leaves_already_shuffled_captions_alone(monkeypatch):
    from privlora import denoiser as denoiser_module
    from privlora.models import loading

    seen = []
    monkeypatch.setattr(loading, "encode_prompt", lambda base, caps, **kw: seen.append(caps) or torch.zeros(1))
    den = denoiser_module.Denoiser(type("Base", (), {"unet": None})(), device="cpu", generator=torch.Generator())
    den.caption_shuffle = CaptionShuffler(keep_tokens=0, seed=3)
    den.text({"caption": ["a, b, c, d, e, f"], SHUFFLED: [True]})
    den.text({"caption": ["a, b, c, d, e, f"]})
    assert seen[0] == ["a, b, c, d, e, f"] and seen[1] != seen[0]


def test_the_attackers_own_step_runs_under_the_runs_autocast():
    from privlora.models.attacker_net import LossMapAttacker
    from privlora.objectives.attacker import attacker_update

    torch.manual_seed(0)
    net = LossMapAttacker(4, 4)
    dtypes = []
    linear = next(m for m in net.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    maps = torch.rand(8, 4, 4, 4)
    attacker_update(net, opt, maps[:4], maps[4:], 1)
    attacker_update(net, opt, maps[:4], maps[4:], 1,
                    autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert dtypes == [torch.float32, torch.bfloat16]
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in net.parameters())  # weights stay fp32


def test_a_best_attacker_is_kept_only_above_chance():
    from tests.fixtures import small_smp_objective

    obj = small_smp_objective()
    saved = [obj.best_snapshot({"attacker_test_acc_fresh": acc, "step": i})
             for i, acc in enumerate((0.45, 0.5, 0.5625, 0.55, 0.6))]
    assert [None if s is None else float(s["privlora_attacker_test_acc_fresh"]) for s in saved] == \
        [None, None, 0.5625, None, 0.6]
    again = small_smp_objective()
    again.load_state_dict(obj.state_dict())  # a resumed run keeps the best so far
    assert again.best_snapshot({"attacker_test_acc_fresh": 0.58, "step": 9}) is None
