"""Per-step cost of plain LoRA vs SMP-LoRA (fused and reference pass structure) vs DP-LoRA, side by side.

    python benchmarks/step_bench.py                      # embedded tiny-sd on the CPU
    python benchmarks/step_bench.py --arch sd15 --batch_sizes 1 8 32 --mixed_precision bf16   # CUDA GPU

Each configuration runs in its own process (so CPU peak RSS is per configuration) and goes through the
real training components: Denoiser, the method's gradients / after_lora_step, AdamW. ``--arch sd15``
builds SD1.5-shaped UNet/CLIP with random weights (no download) and uses random 64×64 latents (512²).
Prints a table and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ARGS: argparse.Namespace = None  # type: ignore[assignment]  # set by main() before any use
VARIANTS = {  # name: (method, adv_step)
    "lora": ("lora", "fused"),
    "smp_fused": ("smp_lora", "fused"),
    "smp_reference": ("smp_lora", "reference"),
    "dp": ("dp_lora", "fused"),  # per-image gradients (torch.func), clipping, noise; micro-batches of 16
}


def sd15_base(device, dtype, train_te: bool):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from privlora.models import tiny
    from privlora.models.loading import BaseModel

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280))
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    tokenizer = None
    if train_te:
        import tempfile

        from privlora.data.synthetic import CAPTION_WORDS
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: scripts/ is build-time code
        from scripts.tokenizer_build import build_clip_tokenizer_files
        from transformers import CLIPTokenizer

        folder = tempfile.mkdtemp()
        build_clip_tokenizer_files(folder, CAPTION_WORDS)
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    sched = DDPMScheduler(**{k: v for k, v in tiny.scheduler_config().items() if k != "set_alpha_to_one"})
    base = BaseModel(unet=unet, vae=None, text_encoder=te, tokenizer=tokenizer, noise_scheduler=sched,
                     prediction_type="epsilon", name="sd15-random", sha256="", source_kind="random")
    return base, 64, 77


def tiny_base(device, dtype, train_te: bool):
    from privlora.models import tiny
    from privlora.models.loading import load_base

    base = load_base(ARGS.model)
    return base, tiny.RESOLUTION // 4, base.tokenizer.model_max_length


def run_one(args) -> dict:
    from privlora.config import make_config
    from privlora.denoiser import Denoiser
    from privlora.models.lora import LoraSpec, add_lora, text_encoder_lora_config, unet_lora_config
    from privlora.objectives import BuildContext, build_objective

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    base, hw, seq = (sd15_base if args.arch == "sd15" else tiny_base)(device, dtype, args.train_text_encoder)
    for m in (base.unet, base.text_encoder):
        m.to(device, dtype).requires_grad_(False)
    method, adv_step = VARIANTS[args.variant]
    spec = LoraSpec(args.rank, args.alpha)
    params = add_lora(base.unet, unet_lora_config(spec, base.unet))
    if args.train_text_encoder:
        params += add_lora(base.text_encoder, text_encoder_lora_config(spec))
    for p in params:
        p.data = p.data.float()
    if args.channels_last:  # what --channels_last does in training: the UNet's weights in NHWC
        base.unet.to(memory_format=torch.channels_last)
    if args.compile:
        base.unet = torch.compile(base.unet)

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        b = {"latents": torch.randn(args.batch_size, 4, hw, hw, generator=g)}
        if args.train_text_encoder:
            b["caption"] = ["a small red circle at the top left on a blue background"] * args.batch_size
        else:
            b["text_emb"] = torch.randn(args.batch_size, seq, base.text_encoder.config.hidden_size, generator=g)
        return b

    def stream(seed):
        while True:
            seed += 1
            yield batch(seed)

    cfg = make_config(dict(method=method, adv_step=adv_step, attacker_pool=min(64, hw), attacker_lr=1e-5,
                           dp_noise_multiplier=1.0), foreign="drop")  # each method takes its own keys
    context = BuildContext(4, stream(1000), stream(2000), num_train_images=max(1000, args.batch_size))
    objective = build_objective(cfg, latent_channels=4, context=context)
    for mod in objective.modules().values():
        mod.to(device)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else None
    den = Denoiser(base, device=device, generator=torch.Generator().manual_seed(0), autocast=autocast)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)

    def step(i):
        objective.gradients(batch(i), den, params, lambda loss: loss.backward())
        opt.step()
        opt.zero_grad(set_to_none=True)
        objective.after_lora_step(den)

    flops = None
    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step(-1)
        flops = counter.get_total_flops()
    for i in range(args.warmup):
        step(i)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    sync()
    sec = (time.perf_counter() - t0) / args.steps
    peak = (torch.cuda.max_memory_allocated() / 2**30 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"variant": args.variant, "batch_size": args.batch_size, "ms_per_step": sec * 1e3,
            "img_per_s": args.batch_size / sec, "peak_gib": peak,
            "peak_kind": "cuda_allocated" if cuda else "cpu_max_rss",
            "step_tflop": None if flops is None else flops / 1e12}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["tiny", "sd15"], default="tiny")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=None)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--train_text_encoder", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--model", default="tiny-sd", help="with --arch tiny: a diffusers folder of the same shape")
    p.add_argument("--peak_tflops", type=float, default=790.0, help="for MFU (default: measured H200 bf16 matmul)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--batch_size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--count_flops", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    global ARGS
    ARGS = args
    torch.set_num_threads(args.threads)
    sd15 = args.arch == "sd15"
    args.rank = args.rank or (64 if sd15 else 16)
    args.alpha = args.alpha or (32 if sd15 else 16)
    args.steps = args.steps or (20 if sd15 else 30)
    args.batch_sizes = args.batch_sizes or ([1, 8, 32] if sd15 else [16, 64])
    if args.variant:  # child process: one configuration
        print(json.dumps(run_one(args)))
        return

    rows = []
    for bs in args.batch_sizes:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--variant", variant, "--batch_size", str(bs)]
            cmd += sys.argv[1:] + (["--count_flops"] if sd15 and torch.cuda.is_available() else [])
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                rows.append({"variant": variant, "batch_size": bs, "error": res.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(format_row(rows[-1], rows, args.peak_tflops if sd15 else None), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "torch": torch.__version__,
              "arch": args.arch, "rank": args.rank, "mixed_precision": args.mixed_precision,
              "train_text_encoder": args.train_text_encoder, "compile": args.compile,
              "channels_last": args.channels_last, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


def format_row(row: dict, rows: list[dict], peak_tflops: float | None) -> str:
    if "error" in row:
        return f"{row['variant']:>14} bs {row['batch_size']:>3}  failed: {row['error']}"
    ref = next((r for r in rows if r["variant"] == "lora" and r["batch_size"] == row["batch_size"]
                and "error" not in r), None)
    ratio = f"{row['ms_per_step'] / ref['ms_per_step']:.2f}x lora" if ref else ""
    mem_ratio = f"{row['peak_gib'] / ref['peak_gib']:.2f}x mem" if ref else ""
    mfu = ""
    if peak_tflops and row.get("step_tflop"):
        mfu = f"MFU {row['step_tflop'] / (row['ms_per_step'] / 1e3) / peak_tflops:.1%}"
    return (f"{row['variant']:>14} bs {row['batch_size']:>3}  {row['ms_per_step']:9.1f} ms/step  "
            f"{row['img_per_s']:8.1f} img/s  peak {row['peak_gib']:6.2f} GiB ({row['peak_kind']})  {ratio}  "
            f"{mem_ratio}  {mfu}")


if __name__ == "__main__":
    main()
