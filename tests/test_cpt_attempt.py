"""One CPT attempt (dapt_core/cpt.py) for real on a tiny Llama: a crash mid-attempt resumed on a fresh worker from
the store (S3, LoRA), and the torchrun / DDP launch path against a single process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dapt_core.cpt as cpt
from dapt.flows.training_data import training_data_flow
from dapt.tasks.cpt import CPT_CODE, _torchrun, base_eval_task
from dapt_core.config import load_config
from dapt_core.cpt import AttemptSpec, run_attempt
from dapt_core.journal import JournalEntry, JournalError, journal_text, read_journal
from dapt_core.store import open_store
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
    reference = base_eval_task.fn(data.tokenizer.model, data.pack, cfg.eval, cfg.store)
    return cfg, data, reference


def _spec(cfg, data, reference, prefix: str, **train_update) -> AttemptSpec:
    return AttemptSpec(
        start=data.tokenizer.model,
        pack=data.pack,
        train=cfg.train.model_copy(update=train_update),
        eval=cfg.eval.model_copy(update={"backend": "native"}),
        reference=reference,
        store=cfg.store,
        prefix=prefix,
        attempt=0,
        new_token_ids=data.tokenizer.new_token_ids,
        code_version=CPT_CODE,
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
    cfg, data, reference = _data(root, dirs, base, f"s3://{s3_bucket}/artifacts", train)
    assert data.tokenizer.new_tokens > 0

    monkeypatch.setenv("DAPT_CACHE_DIR", str(tmp_path / "cache-a"))
    whole = run_attempt(_spec(cfg, data, reference, "cpt/whole"), tmp_path / "work-a")
    assert [d.step for d in whole.decisions] == [10, 20]

    real_eval, calls = cpt.evaluate, []

    def dies_at_second_checkpoint(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("worker lost")
        return real_eval(*a, **kw)

    monkeypatch.setattr(cpt, "evaluate", dies_at_second_checkpoint)
    monkeypatch.setenv("DAPT_CACHE_DIR", str(tmp_path / "cache-b"))
    spec = _spec(cfg, data, reference, "cpt/crashed")
    with pytest.raises(RuntimeError, match="worker lost"):
        run_attempt(spec, tmp_path / "work-b")
    store = open_store(cfg.store)
    assert [e.step for e in read_journal(store, "cpt/crashed")] == [10]

    monkeypatch.setattr(cpt, "evaluate", real_eval)
    monkeypatch.setenv("DAPT_CACHE_DIR", str(tmp_path / "cache-c"))  # a fresh worker: nothing local
    resumed = run_attempt(spec, tmp_path / "work-c")
    assert [d.step for d in resumed.decisions] == [10, 20]
    assert resumed.decisions[0].metrics == whole.decisions[0].metrics
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
    assert resumed.best.metrics["domain/bits_per_byte"] < reference.metrics["domain/bits_per_byte"]


def test_torchrun_ddp_attempt_matches_one_process(prefect_harness, corpus, tmp_path):
    """nproc_per_node=2 launches the attempt with torchrun (gloo on CPU): 2 ranks x 4 sequences per micro-batch end
    at the weights of one process with 8, and rank 0 alone judges, uploads and promotes."""
    root, dirs, base = corpus
    train = "{lr: 1e-4, max_steps: 6, save_every: 3, batch_size: 8, report_to: []}"
    cfg, data, reference = _data(root, dirs, base, str(tmp_path / "store"), train)
    single = run_attempt(_spec(cfg, data, reference, "cpt/single"), tmp_path / "work-single")
    ddp_spec = _spec(cfg, data, reference, "cpt/ddp", batch_size=4, nproc_per_node=2)
    ddp = _torchrun(ddp_spec, tmp_path)
    assert [d.step for d in ddp.decisions] == [d.step for d in single.decisions] == [3, 6]
    a, b = _promoted_weights(cfg.store, single), _promoted_weights(cfg.store, ddp)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    for x, y in zip(single.decisions, ddp.decisions):
        assert x.metrics["domain/bits_per_byte"] == pytest.approx(y.metrics["domain/bits_per_byte"], rel=1e-4)


class RecordingObserver:
    """What an attempt told its observer."""

    def __init__(self):
        self.steps, self.evaluating_steps, self.decisions, self.done_with = [], [], [], []

    def step(self, progress):
        self.steps.append(progress)

    def evaluating(self, step):
        self.evaluating_steps.append(step)

    def judged(self, step, accepted, reasons, metrics):
        self.decisions.append((step, accepted, metrics))

    def done(self, description):
        self.done_with.append(description)


@pytest.mark.integration
def test_isolated_attempt_matches_in_process(prefect_harness, corpus, tmp_path):
    """train.isolate runs the attempt in a fresh `python -m dapt_core.cpt` child (bounded memory): the same decisions
    and promoted weights as in this process."""
    from dapt.tasks.cpt import _in_child

    root, dirs, base = corpus
    train = "{lr: 1e-4, max_steps: 4, save_every: 2, batch_size: 8, report_to: []}"
    cfg, data, reference = _data(root, dirs, base, str(tmp_path / "store"), train)
    here = run_attempt(_spec(cfg, data, reference, "cpt/here"), tmp_path / "work-here")
    (tmp_path / "child").mkdir()
    watch = RecordingObserver()
    child = _in_child(_spec(cfg, data, reference, "cpt/child", isolate=True, log_every=2), tmp_path / "child", watch)
    assert [d.step for d in child.decisions] == [d.step for d in here.decisions] == [2, 4]
    # The child's progress reached this process's observer (the CLI bar, the UI's artifacts), typed.
    assert [p.step for p in watch.steps] == [2, 4] and all(p.total_steps == 4 for p in watch.steps)
    assert watch.evaluating_steps == [2, 4]
    assert [(s, ok) for s, ok, _ in watch.decisions] == [(d.step, d.accepted) for d in child.decisions]
    assert watch.decisions[0][2] == pytest.approx(child.decisions[0].metrics, rel=1e-9)
    a, b = _promoted_weights(cfg.store, here), _promoted_weights(cfg.store, child)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    for x, y in zip(here.decisions, child.decisions):
        assert x.accepted == y.accepted and y.metrics == pytest.approx(x.metrics, rel=1e-6)


def test_ewc_attempt_estimates_its_fisher_on_the_general_sample(prefect_harness, corpus, tmp_path, monkeypatch):
    """train.ewc through the attempt: the Fisher comes from packing's general-only sample and the penalty is logged."""
    import dapt_core.ewc as ewc_mod
    import dapt_core.train as train_mod

    root, dirs, base = corpus
    train = (
        "{lr: 1e-4, max_steps: 4, save_every: 4, batch_size: 8, report_to: [], ewc: "
        "{enabled: true, lambda: 100.0, fisher_samples: 16}}"
    )
    cfg, data, reference = _data(root, dirs, base, str(tmp_path / "store"), train)
    assert data.pack.general_sample is not None
    seen, histories = [], []
    real_from_model, real_train = ewc_mod.EWC.from_model, train_mod.train
    monkeypatch.setattr(
        ewc_mod.EWC,
        "from_model",
        classmethod(
            lambda cls, m, samples, *a, **kw: seen.append(list(samples)) or real_from_model(m, samples, *a, **kw)
        ),
    )
    monkeypatch.setattr(train_mod, "train", lambda *a, **kw: histories.append(res := real_train(*a, **kw)) or res)
    result = run_attempt(_spec(cfg, data, reference, "cpt/ewc"), tmp_path / "work")
    assert result.decisions and len(seen) == 1 and seen[0]
    assert all(len(s) == SEQ for s in seen[0])
    assert histories[0].history[-1]["ewc"] > 0  # the penalty is active once the weights moved


def test_rollback_continues_from_the_best_accepted_checkpoint(prefect_harness, corpus, tmp_path, monkeypatch):
    """Attempt 0 is accepted at step 4 and rejected at step 8; attempt 1 continues from step 4 with its optimizer,
    schedule (at half the peak LR) and data position, on the sequences step 4 had not seen plus general replay for a
    raised share: no sequence trained before the best step is trained again, and the step budget stays 12."""
    import dapt_core.train as train_mod
    import dapt_core.train.data as train_data
    from dapt_core.continuation import better_rollback_point
    from dapt_core.forgetting import Decision, ForgettingPolicy
    from dapt_core.manifest import DirRef

    root, dirs, base = corpus
    train = "{lr: 1e-4, max_steps: 12, save_every: 4, batch_size: 4, warmup_ratio: 0.2, report_to: []}"
    cfg, data, reference = _data(root, dirs, base, str(tmp_path / "store"), train)
    n = len(train_mod.PackedSequences([open_store(cfg.store).local_path(r) for r in data.pack.train_shards]))
    assert n >= 12 * 4, "one epoch must cover the plan for this test"

    reject_at = {8}
    real_judge, real_make_batch, real_load_state, real_train = (
        ForgettingPolicy.judge,
        train_mod.make_batch,
        train_mod.load_state,
        train_mod.train,
    )

    def judge(self, base_result, result, step=None):
        decision = real_judge(self, base_result, result, step=step)
        return Decision(step not in reject_at, [] if step not in reject_at else ["told to reject"], decision.numbers)

    batches, loaded, results = [], [], []
    monkeypatch.setattr(ForgettingPolicy, "judge", judge)
    monkeypatch.setattr(
        train_data,
        "make_batch",
        lambda items, block: batches.append([i[0].tobytes() for i in items]) or real_make_batch(items, block),
    )
    monkeypatch.setattr(
        train_mod, "load_state", lambda path, **kw: loaded.append(Path(path)) or real_load_state(path, **kw)
    )
    monkeypatch.setattr(train_mod, "train", lambda *a, **kw: results.append(res := real_train(*a, **kw)) or res)

    first = run_attempt(_spec(cfg, data, reference, "cpt/first"), tmp_path / "work-first")
    assert [d.step for d in first.decisions] == [4, 8] and first.stopped_at == 8
    first_batches, batches[:] = list(batches), []
    reject_at.clear()

    point = better_rollback_point(None, first, data.tokenizer.model, cfg.eval)
    continuation = point.continuation(general_fraction=0.2)
    assert continuation.source == "attempt 0 step 4" and continuation.data_general_fraction == 0.05
    spec = _spec(cfg, data, reference, "cpt/second", lr=5e-5).model_copy(
        update={"attempt": 1, "continue_from": continuation}
    )
    second = run_attempt(spec, tmp_path / "work-second")

    counts = second.continuation
    print(
        f"attempt 0: {len(first_batches)} steps trained; attempt 1: {len(batches)} steps trained, continuing at step "
        f"{counts.resume_step} on {counts.unseen_sequences} unseen + {counts.replay_sequences} replay sequences"
    )
    assert (counts.resume_step, counts.total_steps) == (4, 12) and [d.step for d in second.decisions] == [8, 12]
    assert counts.unseen_sequences == n - 4 * 4
    assert counts.replay_sequences == round(counts.unseen_sequences * (0.2 - 0.05) / 0.8) > 0
    assert second.general_fraction == 0.2 and second.continued_from == "attempt 0 step 4"
    # The optimizer and scheduler state of step 4 were loaded, and the schedule continues at half its peak.
    resumed = {p.name for p in loaded if p.parent.name == "checkpoint-4"}
    assert {"optimizer.pt", "scheduler.pt", "rng.pt"} <= resumed
    before, after = results[0].history, results[1].history
    assert after[:4] == before[:4] and after[4]["step"] == 5
    assert after[4]["lr"] == pytest.approx(0.5 * before[4]["lr"], rel=1e-9)
    # Tokens: 8 more steps of 4 sequences (the budget of 12), none of the 16 sequences trained before step 4.
    assert len(batches) == 12 - 4 and all(len(b) == 4 for b in batches)
    trained_before_best = {s for b in first_batches[:4] for s in b}
    assert not trained_before_best & {s for b in batches for s in b}
    # The continuation data is stored with the attempt: a later rollback can continue from its checkpoints.
    assert [r.uri for r in second.trained_on] == [
        open_store(cfg.store).uri("cpt/second/continuation/train-00000.parquet")
    ]
    assert isinstance(second.checkpoints[0], DirRef)


# ------------------------------------------------------------------------------------- the journal is verified
class _Payload:
    """What a writer of the store could plant in a checkpoint: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _journal(store, prefix: str) -> dict:
    return json.loads(store.read_key(f"{prefix}/journal.json"))


def test_poisoned_journal_and_rng_file_are_refused_and_run_no_code(prefect_harness, corpus, tmp_path):
    """A writer of the store plants a pickle payload as rng.pt of the attempt's first checkpoint and a journal saying
    the attempt crashed after it. Edited by hand (chain broken), pointing at a checkpoint elsewhere, or even re-chained
    correctly (the chain algorithm is public): the resume refuses with one clear error and the payload never runs."""
    root, dirs, base = corpus
    train = "{lr: 1e-4, max_steps: 4, save_every: 2, batch_size: 8, report_to: []}"
    cfg, data, reference = _data(root, dirs, base, str(tmp_path / "store"), train)
    spec = _spec(cfg, data, reference, "cpt/poisoned")
    run_attempt(spec, tmp_path / "work-honest")
    store = open_store(cfg.store)
    entries = read_journal(store, spec.prefix)
    assert [e.step for e in entries] == [2, 4]

    marker = tmp_path / "code-ran"
    checkpoint = Path(store.uri(f"{spec.prefix}/checkpoints/checkpoint-2"))
    torch.save({"torch": _Payload(marker)}, checkpoint / "rng.pt")
    rng = store.put_file(checkpoint / "rng.pt", f"{spec.prefix}/checkpoints/checkpoint-2/rng.pt")
    first = entries[0].model_copy(
        update={
            "checkpoint": entries[0].checkpoint.model_copy(
                update={"files": {**entries[0].checkpoint.files, "rng.pt": rng}}
            )
        }
    )
    journal_key = f"{spec.prefix}/journal.json"

    # 1. The journal edited by hand (the crash after step 2, the new rng.pt hash): the chain breaks.
    edited = _journal(store, spec.prefix)
    edited["entries"] = [{**first.model_dump(mode="json"), "chain": edited["entries"][0]["chain"]}]
    store.put_text(json.dumps(edited), journal_key)
    with pytest.raises(JournalError) as err:
        run_attempt(spec, tmp_path / "work-1")
    message = str(err.value)
    assert store.uri(journal_key) in message and "hash chain breaks at step 2" in message
    assert f"Delete {store.uri(spec.prefix)}" in message

    # 2. Re-chained, but its checkpoint is another attempt's (or any path on the worker): not this attempt's.
    elsewhere = first.model_copy(
        update={
            "checkpoint": first.checkpoint.model_copy(update={"uri": store.uri("cpt/other/checkpoints/checkpoint-2")})
        }
    )
    store.put_text(journal_text([elsewhere], spec.prefix), journal_key)
    with pytest.raises(JournalError, match="not this attempt's"):
        run_attempt(spec, tmp_path / "work-2")
    store.put_text(journal_text([first], "cpt/other"), journal_key)  # a journal copied from another attempt
    with pytest.raises(JournalError, match="belongs to attempt 'cpt/other'"):
        run_attempt(spec, tmp_path / "work-3")

    # 3. Re-chained correctly: the journal is accepted, but rng.pt is read as plain data only and refused.
    store.put_text(journal_text([first], spec.prefix), journal_key)
    with pytest.raises(ValueError, match="rng.pt: refused to load: it holds more than plain data"):
        run_attempt(spec, tmp_path / "work-4")
    assert not marker.exists()  # no payload ran, at any stage


def _checkpoint_entries(store, prefix: str, tmp_path: Path) -> list[JournalEntry]:
    entries = []
    for step in (2, 4):
        local = tmp_path / f"checkpoint-{step}"
        local.mkdir()
        (local / "model.safetensors").write_bytes(b"weights %d" % step)
        ref = store.put_dir(local, f"{prefix}/checkpoints/checkpoint-{step}")
        entries.append(
            JournalEntry(
                step=step,
                accepted=step == 2,
                reasons=[] if step == 2 else ["general ppl +20%"],
                numbers={"x": 0.1},
                metrics={"general/word_perplexity": 10.0 + step},
                backend="native",
                checkpoint=ref,
            )
        )
    return entries


def test_journal_round_trip_and_tampering(tmp_path):
    store = open_store(str(tmp_path / "store"))
    prefix = "cpt/abc"
    assert read_journal(store, prefix) == []
    rows = _checkpoint_entries(store, prefix, tmp_path)
    key = f"{prefix}/journal.json"
    store.put_text(journal_text(rows, prefix), key)
    assert [e.model_dump() for e in read_journal(store, prefix)] == [e.model_dump() for e in rows]

    def refused(doc, match: str) -> None:
        store.put_text(doc if isinstance(doc, str) else json.dumps(doc), key)
        with pytest.raises(JournalError, match=match):
            read_journal(store, prefix)

    good = json.loads(journal_text(rows, prefix))
    flipped = json.loads(json.dumps(good))
    flipped["entries"][1]["accepted"] = True  # a rejection turned into an acceptance
    refused(flipped, "hash chain breaks at step 4")
    refused({**good, "entries": good["entries"][::-1]}, "hash chain breaks at step 4")  # reordered
    refused({**good, "entries": good["entries"][1:]}, "hash chain breaks at step 4")  # first entry dropped
    refused(journal_text([rows[1], rows[0]], prefix), "step 2 follows step 4")
    refused(
        journal_text([rows[0].model_copy(update={"accepted": False}), rows[1]], prefix), "follows the rejected step 2"
    )
    refused([r.model_dump(mode="json") for r in rows], "not a dapt-cpt-journal/1 document")  # the old, unchained format
    refused("{not json", "not a dapt-cpt-journal/1 document")
    files = {"../../../etc/passwd": rows[0].checkpoint.files["model.safetensors"]}
    outside = rows[0].model_copy(update={"checkpoint": rows[0].checkpoint.model_copy(update={"files": files})})
    refused(journal_text([outside], prefix), "store key '../../../etc/passwd' refused")
