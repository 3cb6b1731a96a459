"""FSDP2 (`train.strategy: fsdp`) and multi-node launches under torchrun with gloo on CPU: 2 processes train the same
weights as 1 process with the same global batch, a SIGKILL between checkpoints resumes to the same final weights, and
two single-process "nodes" meeting at a c10d rendezvous on 127.0.0.1 match one node with 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dapt_core.config import TrainConfig
from dapt_core.cpt import run_attempt
from dapt_core.train import train
from dapt_core.train.distributed import torchrun_command
from tests.local_services import free_port
from tests.test_cpt_attempt import corpus  # noqa: F401  (the module-scoped fixture)
from tests.test_train import REPO, VOCAB, _cfg, mixed_shards
from tests.tiny_model import tiny_llama

pytestmark = pytest.mark.integration

WORKER = """
import os, sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
from pathlib import Path
from torch.optim.optimizer import register_optimizer_step_post_hook
from dapt_core.config import TrainConfig
from dapt_core.train import train
from tests.tiny_model import tiny_llama

hang_after, steps = int(os.environ.get("HANG_AFTER", "0")), [0]
def hang(opt, args, kwargs):  # the test SIGKILLs the launch while every rank sleeps here
    steps[0] += 1
    if hang_after and steps[0] == hang_after:
        if torch.distributed.get_rank() == 0:
            Path(os.environ["MARKER"]).write_text("x")
        time.sleep(600)
register_optimizer_step_post_hook(hang)
train(tiny_llama({vocab}), [Path(p) for p in {shards!r}], TrainConfig.model_validate({cfg!r}), Path(sys.argv[1]))
"""


def worker_script(tmp_path: Path, shards: list[Path], cfg: TrainConfig) -> Path:
    script = tmp_path / f"worker-{time.monotonic_ns()}.py"
    script.write_text(
        WORKER.format(repo=str(REPO), vocab=VOCAB, shards=[str(s) for s in shards], cfg=cfg.model_dump(by_alias=True))
    )
    return script


def launch(script: Path, out_dir: Path, torchrun_args: list[str], env: dict | None = None) -> subprocess.Popen:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *torchrun_args, str(script), str(out_dir)],
        cwd=REPO,
        env={**clean, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def losses(checkpoint: Path) -> list[float]:
    return [h["loss"] for h in json.loads((checkpoint / "trainer_state.json").read_text())["history"]]


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=0, atol=atol, msg=name)


STEPS = 4


def fsdp_cfg(**kw) -> TrainConfig:
    base = {
        "batch_size": 4,
        "grad_accum": 2,
        "max_steps": STEPS,
        "save_every": 2,
        "block_cross_document_attention": True,
    }
    return _cfg(**{**base, "report_to": [], "strategy": "fsdp", **kw})


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_two_processes_train_the_weights_of_one(tmp_path, method):
    """Same global batch (1 x 8 vs 2 x 4 sequences per micro-batch): same losses and weights. Tolerance: the sharded
    reduce-scatter sums gradients in another order (~1e-7 relative); Adam turns that noise into at most ~lr-sized steps
    on coordinates whose gradient is ~0, so weights agree to 2e-5 after 4 steps at lr 1e-3 with warmup."""
    shards = mixed_shards(tmp_path / "d", n=24)
    extra = (
        {"method": method, "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
        if method == "lora"
        else {}
    )
    torch.set_num_threads(1)
    try:
        train(tiny_llama(VOCAB), shards, fsdp_cfg(batch_size=8, **extra), tmp_path / "one")
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    finish(
        launch(
            worker_script(tmp_path, shards, fsdp_cfg(**extra)), tmp_path / "two", ["--standalone", "--nproc_per_node=2"]
        )
    )
    one, two = tmp_path / "one" / f"checkpoint-{STEPS}", tmp_path / "two" / f"checkpoint-{STEPS}"
    assert (two / "optimizer").is_dir() and not (two / "optimizer.pt").exists()  # sharded AdamW state
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert_close_weights(weights(two), weights(one), atol=2e-5)
    if method == "full":  # consolidated: loads into a plain transformers model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(two)
        assert torch.equal(model.model.layers[1].mlp.up_proj.weight, weights(two)["model.layers.1.mlp.up_proj.weight"])


def test_fsdp_resumes_exactly_after_sigkill(tmp_path):
    """2 ranks SIGKILLed after step 3 (checkpoint-2 complete) resume from the sharded checkpoint to the weights of an
    uninterrupted 2-rank run."""
    shards = mixed_shards(tmp_path / "d", n=20)
    script = worker_script(tmp_path, shards, fsdp_cfg())
    marker = tmp_path / "hanging"
    killed = launch(
        script, tmp_path / "killed", ["--standalone", "--nproc_per_node=2"], {"HANG_AFTER": "3", "MARKER": str(marker)}
    )
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert killed.poll() is None, killed.stdout.read()[-4000:]
            assert time.time() < deadline
            time.sleep(0.2)
        os.killpg(killed.pid, signal.SIGKILL)  # torchrun and both ranks
        killed.wait(timeout=30)
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = launch(script, tmp_path / "killed", ["--standalone", "--nproc_per_node=2"])
    reference = launch(
        script, tmp_path / "reference", ["--standalone", "--nproc_per_node=2", f"--master_port={free_port()}"]
    )
    finish(resumed)
    finish(reference)
    end = f"checkpoint-{STEPS}"
    assert_close_weights(weights(tmp_path / "killed" / end), weights(tmp_path / "reference" / end), atol=0)
    assert losses(tmp_path / "killed" / end) == losses(tmp_path / "reference" / end)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_nodes_on_localhost_match_one_node_with_two_processes(tmp_path, strategy):
    """nnodes 2 x nproc 1, c10d rendezvous on 127.0.0.1 (the launch torchrun_command builds for each node)."""
    shards = mixed_shards(tmp_path / "d", n=24)
    cfg = fsdp_cfg(
        strategy=strategy, nproc_per_node=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}", rdzv_id="test"
    )
    script = worker_script(tmp_path, shards, cfg)
    nodes = []
    for node_rank in range(2):
        node = cfg.model_copy(update={"node_rank": node_rank})
        args = torchrun_command(node, [], 30)
        torchrun_args = args[args.index("torch.distributed.run") + 1 : args.index("-m", 3)]
        assert "--standalone" not in torchrun_args and f"--node_rank={node_rank}" in torchrun_args
        nodes.append(launch(script, tmp_path / "two-nodes", torchrun_args))
    finish(launch(script, tmp_path / "one-node", ["--standalone", "--nproc_per_node=2"]))
    for node in nodes:
        finish(node)
    end = f"checkpoint-{STEPS}"
    assert_close_weights(weights(tmp_path / "two-nodes" / end), weights(tmp_path / "one-node" / end), atol=0)
    assert losses(tmp_path / "two-nodes" / end) == losses(tmp_path / "one-node" / end)


def test_fsdp_attempt_judges_and_promotes_like_one_process(prefect_harness, corpus, tmp_path):  # noqa: F811
    """The CPT attempt under torchrun with train.strategy fsdp: rank 0 judges each checkpoint on its consolidated
    weights and promotes a plain HF directory, with the decisions and weights of one process."""
    from dapt.tasks.cpt import _torchrun
    from tests.test_cpt_attempt import _data, _promoted_weights, _spec

    root, dirs, base = corpus
    train_cfg = "{lr: 1e-4, max_steps: 4, save_every: 2, batch_size: 8, report_to: []}"
    cfg, data, reference = _data(root, dirs, base, str(tmp_path / "store"), train_cfg)
    single = run_attempt(_spec(cfg, data, reference, "cpt/single"), tmp_path / "work-single")
    fsdp = _torchrun(_spec(cfg, data, reference, "cpt/fsdp", batch_size=4, nproc_per_node=2, strategy="fsdp"), tmp_path)
    assert [d.step for d in fsdp.decisions] == [d.step for d in single.decisions] == [2, 4]
    a, b = _promoted_weights(cfg.store, single), _promoted_weights(cfg.store, fsdp)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    for x, y in zip(single.decisions, fsdp.decisions, strict=True):
        assert x.metrics["domain/bits_per_byte"] == pytest.approx(y.metrics["domain/bits_per_byte"], rel=1e-4)
