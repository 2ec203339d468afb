"""The SDXL (base) kohya-format LoRA module names in tests/fixtures/sdxl/ are re-derived from the SDXL configs
(meta-device models, no weights), and every name kohya sd-scripts writes is loaded — into the weight kohya means —
by ComfyUI's, A1111's and diffusers' naming rules (re-stated in tests/fixtures/sdxl/derive.py; README.md there
says where each was read). The diffusers rule is also checked against the installed diffusers' own conversion.
"""
import re
import types

import pytest

from tests.fixtures import SDXL_FIXTURES, load_sdxl_derive

FIXTURES = SDXL_FIXTURES
KOHYA_LISTS = ("kohya_sdxl_unet.txt", "kohya_sdxl_unet_conv.txt", "kohya_sdxl_te1.txt", "kohya_sdxl_te2.txt")
CLIENTS = ("comfyui", "a1111", "diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def derive():
    module = load_sdxl_derive()
    module.derive_all()  # builds the meta-device models once (about 10 s on the 2-core box)
    return module


@pytest.fixture(scope="module")
def derived(derive):
    return derive.derive_all()


def committed(fname: str) -> list[str]:
    return (FIXTURES / fname).read_text(encoding="utf-8").splitlines()


def kohya_names() -> list[str]:
    return [n for f in KOHYA_LISTS for n in committed(f)]


def resolver(derive, client):
    if client == "diffusers":  # diffusers resolves a whole file; kohya's default file: all four lists
        table = derive.diffusers_resolve_file(kohya_names())
        return table.get
    return {"comfyui": derive.comfyui_resolve, "a1111": derive.a1111_resolve}[client]


def lists_differ(derived_lists: dict[str, list[str]]) -> list[str]:
    return [f for f, names in derived_lists.items() if committed(f) != names]


def test_committed_lists_are_exactly_the_derived_ones(derived):
    assert set(derived) == {p.name for p in FIXTURES.glob("*.txt")}
    assert lists_differ(derived) == []
    for fname in derived:
        names = committed(fname)
        assert names == sorted(set(names)), f"{fname} is not sorted and unique"


def test_a_wrong_list_is_caught(derived):
    wrong = dict(derived)
    wrong["kohya_sdxl_unet.txt"] = sorted(derived["kohya_sdxl_unet.txt"][1:] + ["lora_unet_input_blocks_4_1_proj"])
    assert lists_differ(wrong) == ["kohya_sdxl_unet.txt"]


@pytest.mark.parametrize("client", CLIENTS)
def test_every_kohya_name_is_loaded_into_the_weight_kohya_means(derive, client):
    kohya = {**derive.kohya_targets(False), **derive.kohya_targets(True),
             **derive.kohya_te_targets("te1"), **derive.kohya_te_targets("te2")}
    assert set(kohya) == set(kohya_names())
    resolve = resolver(derive, client)
    dropped = sorted(n for n in kohya if resolve(n) is None)
    misplaced = sorted(n for n in kohya if resolve(n) not in (None, kohya[n]))
    assert dropped == [], f"{client} drops {len(dropped)} kohya names, e.g. {dropped[:5]}"
    assert misplaced == [], f"{client} loads {len(misplaced)} kohya names elsewhere, e.g. {misplaced[:5]}"
    assert set(kohya) <= set(committed(f"{client}_sdxl.txt"))


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("wrong", [
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_q_proj",  # a text-encoder suffix on a UNet block
    "lora_unet_input_blocks_4_1_transformer_blocks_2_attn1_to_q",  # input_blocks.4 has 2 transformer blocks
    "lora_unet_middle_block_1_transformer_blocks_10_ff_net_2",  # the middle block has 10
    "lora_te1_text_model_encoder_layers_12_mlp_fc1",  # CLIP-L has 12 layers
    "lora_te2_text_model_encoder_layers_32_self_attn_q_proj",  # bigG has 32
    "lora_te2_text_model_encoder_layers_0_self_attn_qkv_proj",  # bigG's fused in_proj has no LoRA name
])
def test_a_wrong_name_is_dropped_by_every_client(derive, client, wrong):
    if client == "diffusers":
        assert derive.diffusers_resolve_file(kohya_names() + [wrong])[wrong] is None
    else:
        assert resolver(derive, client)(wrong) is None
    assert wrong not in committed(f"{client}_sdxl.txt")


def test_sdxl_shape_counts():
    unet, conv = committed("kohya_sdxl_unet.txt"), committed("kohya_sdxl_unet_conv.txt")
    blocks = {re.sub(r"_(attn[12]|ff)_.*", "", n) for n in unet if "transformer_blocks" in n}
    spatial = {re.sub(r"_(proj_in|proj_out|transformer_blocks_.*)$", "", n) for n in unet}
    # transformer blocks: down level 1: 2 attentions x 2 blocks, level 2: 2 x 10; mid 1 x 10; up level 0: 3 x 10,
    # level 1: 3 x 2 (down level 0 and up level 2 have no attentions)
    assert len(blocks) == 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2 == 70
    assert len(spatial) == 2 + 2 + 1 + 3 + 3 == 11
    assert len(unet) == 70 * 10 + 11 * 2 == 722  # q, k, v, out.0 of attn1 and attn2, ff.net.0.proj, ff.net.2
    resblocks = {re.sub(r"_(in_layers_2|emb_layers_1|out_layers_3|skip_connection)$", "", n)
                 for n in conv if re.search(r"_(in_layers_2|emb_layers_1|out_layers_3|skip_connection)$", n)}
    assert len(resblocks) == 6 + 2 + 9 == 17
    assert sum(n.endswith("skip_connection") for n in conv) == 2 + 9  # channel-changing ResBlocks only
    assert [n for n in conv if n.endswith(("_op", "_conv"))] == [
        "lora_unet_input_blocks_3_0_op", "lora_unet_input_blocks_6_0_op",
        "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv"]
    assert len(conv) == 17 * 3 + 11 + 2 + 2 == 66
    for which, layers in (("te1", 12), ("te2", 32)):
        names = committed(f"kohya_sdxl_{which}.txt")
        found = {int(re.search(r"layers_(\d+)_", n)[1]) for n in names}
        assert found == set(range(layers))  # the last layer too, though SDXL conditions on the penultimate
        assert len(names) == layers * 6
        assert not any("text_projection" in n for n in names)
    assert not set(unet) & set(conv)


def test_what_each_client_maps_that_the_others_do_not():
    comfy, a1111, diffusers = (set(committed(f"{c}_sdxl.txt")) for c in CLIENTS)
    assert a1111 <= comfy and diffusers <= comfy
    single_prefix = {n for n in comfy if n.startswith("lora_te_")}
    assert len(single_prefix) == 72 and single_prefix <= diffusers  # CLIP-L under the SD1/SD2 prefix
    assert comfy - a1111 == single_prefix | {  # A1111 looks lora_te_ names up in SD1's layout only
        "lora_te1_text_projection", "lora_te2_text_projection",  # no such module in A1111's SDXL encoders
        "lora_unet_add_embedding_linear_1", "lora_unet_add_embedding_linear_2",  # no rename for add_embedding
        "lora_unet_up_blocks_0_upsamplers_0_conv",  # SD1 slot arithmetic: SDXL's up_blocks.0 has attentions
    }
    assert comfy - diffusers == {
        "lora_te1_text_projection",  # HF CLIPTextModel has none
        "lora_unet_add_embedding_linear_1", "lora_unet_add_embedding_linear_2",  # index stripped, names collide
    }


def test_diffusers_drops_sgm_names_in_a_file_that_mixes_spellings(derive):
    mixed = ["lora_unet_input_blocks_4_1_proj_in", "lora_unet_down_blocks_1_attentions_0_proj_out"]
    assert derive.diffusers_resolve_file(mixed) == {
        mixed[0]: None, mixed[1]: ("unet", "down_blocks.1.attentions.0.proj_out")}


def test_diffusers_rule_matches_the_installed_diffusers(derive):
    """The re-stated diffusers rule against diffusers' own SDXL conversion (lora_state_dict with a UNet config,
    then its PEFT renames), for every candidate name."""
    torch = pytest.importorskip("torch")
    try:
        from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin
        from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                                      convert_unet_state_dict_to_peft)
    except ImportError as e:  # private helpers: a later diffusers may move them
        pytest.skip(f"diffusers' conversion helpers moved: {e}")

    def loaded(names):
        sd = {}
        for i, n in enumerate(names, start=1):  # the down weight carries the name's index through the renames
            sd[f"{n}.lora_down.weight"] = torch.full((1, 1), float(i))
            sd[f"{n}.lora_up.weight"] = torch.full((1, 1), -1.0)
            sd[f"{n}.alpha"] = torch.tensor(1.0)
        converted, _ = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
            sd, unet_config=types.SimpleNamespace(layers_per_block=2))
        parts = {"unet": {}, "te1": {}, "te2": {}}
        for k, v in converted.items():
            part, _, rest = k.partition(".")
            parts[{"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}[part]][rest] = v
        parts["unet"] = convert_unet_state_dict_to_peft(parts["unet"])
        for which in ("te1", "te2"):
            if parts[which]:
                parts[which] = convert_state_dict_to_peft(convert_state_dict_to_diffusers(parts[which]))
        out = dict.fromkeys(names)
        for which, sd_part in parts.items():
            for k, v in sd_part.items():
                if ".lora_A" in k:
                    out[names[int(v.item()) - 1]] = (which, k.split(".lora_A")[0])
        return out

    modules = {"unet": set(derive.unet_layers()), "te1": set(derive.te_linears("te1")),
               "te2": set(derive.te_linears("te2"))}
    files = derive.diffusers_files()
    assert sorted(n for f in files for n in f) == sorted(derive.candidates())
    for names in files:
        theirs = {n: (t if t and t[1] in modules[t[0]] else None) for n, t in loaded(names).items()}
        ours = derive.diffusers_resolve_file(names)
        differ = sorted(n for n in names if theirs[n] != ours[n])
        assert differ == [], f"{len(differ)} names differ, e.g. {[(n, theirs[n], ours[n]) for n in differ[:3]]}"
