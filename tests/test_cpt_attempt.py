"""One CPT attempt (dapt_core/cpt.py) for real on a tiny Llama: a crash mid-attempt resumed on a fresh worker from
the store (S3, LoRA), and the torchrun / DDP launch path against a single process."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import dapt_core.cpt as cpt
from dapt_core.config import load_config
from dapt_core.cpt import AttemptSpec, run_attempt
from dapt_core.store import open_store
from flows.training_data import training_data_flow
from tasks.cpt import CPT_CODE, _torchrun, base_eval_task
from tests.corpus import write_config, write_corpus
from tests.tiny_model import pretrained_general_base

SEQ = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpt-attempt")
    return root, write_corpus(root, n_domain=30, n_general=20), pretrained_general_base(root, SEQ, steps=30)


def _data(root, dirs, base, store: str, train: str):
    run = root / store.replace("/", "_").replace(":", "")
    run.mkdir(exist_ok=True)
    extra = f"""model: {{base: "{base}"}}
tokenizer: {{min_frequency: 5, domain_vocab_size: 600}}
mix: {{general_fraction: 0.05, seq_len: {SEQ}, heldout_fraction: 0.1}}
train: {train}
eval: {{max_probes: 20, batch_size: 8}}
"""
    cfg = load_config(write_config(run, dirs, store=store, extra=extra))
    data = training_data_flow(cfg)
    base_metrics = base_eval_task.fn(data.tokenizer.model, data.pack, cfg.eval, cfg.store)
    return cfg, data, base_metrics


def _spec(cfg, data, base_metrics, prefix: str, **train_update) -> AttemptSpec:
    return AttemptSpec(
        start=data.tokenizer.model, pack=data.pack, train=cfg.train.model_copy(update=train_update), eval=cfg.eval,
        base_metrics=base_metrics, store=cfg.store, prefix=prefix, attempt=0, new_token_ids=data.tokenizer.new_token_ids,
        eval_backend="native", code_version=CPT_CODE,
    )


def _promoted_weights(store_uri: str, manifest) -> dict[str, torch.Tensor]:
    return load_file(str(open_store(store_uri).local_dir(manifest.promoted) / "model.safetensors"))


def test_killed_attempt_resumes_on_a_fresh_worker_from_s3(prefect_harness, corpus, s3_bucket, tmp_path, monkeypatch):
    """LoRA (+ the new tokens' rows, trained by default) with an S3 store. The attempt dies after its first checkpoint
    was judged and uploaded; run again with an empty S3 cache and work dir (another machine), it downloads that
    checkpoint, keeps its decision, resumes exactly, and promotes the same weights as an uninterrupted attempt."""
    root, dirs, base = corpus
    train = (
        "{method: lora, save_adapter: true, lora: {r: 8, alpha: 16}, lr: 2e-4, max_steps: 20, "
        "save_every: 10, batch_size: 8, report_to: [tensorboard]}"
    )
    monkeypatch.setenv("DAPT_CACHE_DIR", str(tmp_path / "cache-setup"))
    cfg, data, base_metrics = _data(root, dirs, base, f"s3://{s3_bucket}/artifacts", train)
    assert data.tokenizer.new_tokens > 0

    monkeypatch.setenv("DAPT_CACHE_DIR", str(tmp_path / "cache-a"))
    whole = run_attempt(_spec(cfg, data, base_metrics, "cpt/whole"), tmp_path / "work-a")
    assert [d["step"] for d in whole.decisions] == [10, 20]

    real_eval, calls = cpt.run_eval, []

    def dies_at_second_checkpoint(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("worker lost")
        return real_eval(*a, **kw)

    monkeypatch.setattr(cpt, "run_eval", dies_at_second_checkpoint)
    monkeypatch.setenv("DAPT_CACHE_DIR", str(tmp_path / "cache-b"))
    spec = _spec(cfg, data, base_metrics, "cpt/crashed")
    with pytest.raises(RuntimeError, match="worker lost"):
        run_attempt(spec, tmp_path / "work-b")
    store = open_store(cfg.store)
    journal = json.loads(store.read_key("cpt/crashed/journal.json"))
    assert [r["step"] for r in journal] == [10]

    monkeypatch.setattr(cpt, "run_eval", real_eval)
    monkeypatch.setenv("DAPT_CACHE_DIR", str(tmp_path / "cache-c"))  # a fresh worker: nothing local
    resumed = run_attempt(spec, tmp_path / "work-c")
    assert [d["step"] for d in resumed.decisions] == [10, 20]
    assert resumed.decisions[0]["metrics"] == whole.decisions[0]["metrics"]
    assert resumed.best_step == whole.best_step and resumed.promoted.uri.startswith(f"s3://{s3_bucket}/")
    a, b = _promoted_weights(cfg.store, whole), _promoted_weights(cfg.store, resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert resumed.tensorboard is not None and any("events.out.tfevents" in f for f in resumed.tensorboard.files)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(resumed.adapter.files)

    # The promoted model is a plain transformers model (LoRA merged) with the extended vocabulary, and it learned.
    from dapt_core.model import load_from_dir

    model, tokenizer = load_from_dir(store.local_dir(resumed.promoted))
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer) and not hasattr(model, "peft_config")
    start, _ = load_from_dir(store.local_dir(data.tokenizer.model))
    new_ids = data.tokenizer.new_token_ids
    assert new_ids and min(new_ids) >= len(tokenizer) - len(new_ids)
    emb, emb0 = model.get_input_embeddings().weight, start.get_input_embeddings().weight
    old = [i for i in range(emb.shape[0]) if i not in set(new_ids)]
    assert torch.equal(emb[old], emb0[old])  # only the new tokens' rows trained ...
    assert (emb[new_ids] - emb0[new_ids]).abs().amax(1).min() > 0  # ... and each of them did
    d = next(x for x in resumed.decisions if x["step"] == resumed.best_step)
    assert d["metrics"]["domain/bits_per_byte"] < base_metrics["domain/bits_per_byte"]


def test_torchrun_ddp_attempt_matches_one_process(prefect_harness, corpus, tmp_path):
    """nproc_per_node=2 launches the attempt with torchrun (gloo on CPU): 2 ranks x 4 sequences per micro-batch end
    at the weights of one process with 8, and rank 0 alone judges, uploads and promotes."""
    root, dirs, base = corpus
    train = "{lr: 1e-4, max_steps: 6, save_every: 3, batch_size: 8, report_to: []}"
    cfg, data, base_metrics = _data(root, dirs, base, str(tmp_path / "store"), train)
    single = run_attempt(_spec(cfg, data, base_metrics, "cpt/single"), tmp_path / "work-single")
    ddp_spec = _spec(cfg, data, base_metrics, "cpt/ddp", batch_size=4, nproc_per_node=2)
    ddp = _torchrun(ddp_spec, tmp_path, 2)
    assert [d["step"] for d in ddp.decisions] == [d["step"] for d in single.decisions] == [3, 6]
    a, b = _promoted_weights(cfg.store, single), _promoted_weights(cfg.store, ddp)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    for x, y in zip(single.decisions, ddp.decisions):
        assert x["metrics"]["domain/bits_per_byte"] == pytest.approx(y["metrics"]["domain/bits_per_byte"], rel=1e-4)


def test_ewc_attempt_estimates_its_fisher_on_the_general_sample(prefect_harness, corpus, tmp_path, monkeypatch):
    """train.ewc through the attempt: the Fisher comes from packing's general-only sample and the penalty is logged."""
    import dapt_core.ewc as ewc_mod
    import dapt_core.train as train_mod

    root, dirs, base = corpus
    train = "{lr: 1e-4, max_steps: 4, save_every: 4, batch_size: 8, report_to: [], ewc: {enabled: true, lambda: 100.0, fisher_samples: 16}}"
    cfg, data, base_metrics = _data(root, dirs, base, str(tmp_path / "store"), train)
    assert data.pack.general_sample is not None
    seen, histories = [], []
    real_from_model, real_train = ewc_mod.EWC.from_model, train_mod.train
    monkeypatch.setattr(ewc_mod.EWC, "from_model", classmethod(lambda cls, m, samples, *a, **kw: seen.append(list(samples)) or real_from_model(m, samples, *a, **kw)))
    monkeypatch.setattr(train_mod, "train", lambda *a, **kw: histories.append(res := real_train(*a, **kw)) or res)
    result = run_attempt(_spec(cfg, data, base_metrics, "cpt/ewc"), tmp_path / "work")
    assert result.decisions and len(seen) == 1 and seen[0]
    assert all(len(s) == SEQ for s in seen[0])
    assert histories[0].history[-1]["ewc"] > 0  # the penalty is active once the weights moved
