"""dapt_core.evaluate: local lm-eval tasks on a tiny model (offline), forgetting policy, rollback, report."""

from __future__ import annotations

import json
import math

import pytest

from dapt_core.config import DaptConfig, EvalConfig
from dapt_core.eval_report import write_report
from dapt_core.eval_tasks import write_tasks
from dapt_core.evaluate import BenchmarkSamples, EvalResult, evaluate
from dapt_core.forgetting import Decision, ForgettingPolicy, rollback_plan
from dapt_core.probes import build_probes
from tests.tiny_model import byte_level_tokenizer, tiny_llama

DOMAIN = [
    "The patient received tacrolimus after the renal transplant and the dose was adjusted weekly.",
    "Serum creatinine rose sharply, so the nephrologist reduced the immunosuppressant dosage.",
    "Biopsy of the graft showed acute cellular rejection treated with methylprednisolone.",
    "Trough levels guided every change of the calcineurin inhibitor during admission.",
]
GENERAL = [
    "The cat sat quietly on the warm windowsill watching small birds in the garden.",
    "Markets opened higher today as investors welcomed the latest employment figures.",
    "The old bridge across the river was repaired before the heavy winter storms.",
    "Children played football in the park until their parents called them for dinner.",
]


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory, offline):
    d = tmp_path_factory.mktemp("eval")
    files = {"domain": _jsonl(d / "domain.jsonl", DOMAIN), "general": _jsonl(d / "general.jsonl", GENERAL)}
    tok = byte_level_tokenizer(DOMAIN + GENERAL, 400)
    return d, files, tok


@pytest.fixture(scope="module")
def random_model(setup):
    _, _, tok = setup
    return tiny_llama(len(tok), seed=0)


@pytest.fixture(scope="module")
def random_result(setup, random_model):
    d, files, tok = setup
    return evaluate(random_model, tok, files, d / "w-random", EvalConfig(batch_size=4))


def test_write_tasks_generates_local_yaml(tmp_path):
    files = {"domain": _jsonl(tmp_path / "d.jsonl", DOMAIN)}
    names = write_tasks(files, tmp_path / "tasks", max_probes=3)
    assert names == {"domain": {"ppl": "dapt_ppl_domain", "probe": "dapt_probe_domain"}}
    ppl = (tmp_path / "tasks" / "dapt_ppl_domain.yaml").read_text()
    for needle in (
        "output_type: loglikelihood_rolling",
        "dataset_path: json",
        "test_split: test",
        "data_files:",
        'doc_to_target: "{{text}}"',
        "metric: bits_per_byte",
        "metric: word_perplexity",
        "metric: byte_perplexity",
    ):
        assert needle in ppl
    probe = (tmp_path / "tasks" / "dapt_probe_domain.yaml").read_text()
    assert "output_type: multiple_choice" in probe and "metric: acc" in probe
    assert len((tmp_path / "tasks" / "domain.probe.jsonl").read_text().splitlines()) == 3


def test_build_probes_true_word_and_distractors_from_corpus():
    probes = build_probes(DOMAIN + GENERAL, max_probes=50, n_choices=4, seed=1)
    assert probes == build_probes(DOMAIN + GENERAL, max_probes=50, n_choices=4, seed=1)  # deterministic
    assert len(probes) == len(DOMAIN + GENERAL)  # one sentence per document here
    corpus = " ".join(DOMAIN + GENERAL)
    for p in probes:
        assert len(p["choices"]) == 4 and len(set(c.lower() for c in p["choices"])) == 4
        target = p["choices"][p["label"]]
        assert (p["context"] + " " + target) in corpus
        assert all(c in corpus for c in p["choices"])


def test_lm_eval_bpb_matches_dapt_metrics(setup, random_model, random_result):
    """Same texts, same model: lm-eval's loglikelihood_rolling scores every token after the BOS/EOS prefix, exactly
    what dapt_core.metrics does, so for texts shorter than the context window the two agree to float rounding."""
    from dapt_core.metrics import bits_per_byte

    _, _, tok = setup
    r = random_result
    assert r.backend == "lm-eval"
    for split, texts in (("domain", DOMAIN), ("general", GENERAL)):
        ref = bits_per_byte(random_model, tok, texts)
        assert r.metrics[f"{split}/bits_per_byte"] == pytest.approx(ref, rel=1e-4)
        assert r.metrics[f"{split}/byte_perplexity"] == pytest.approx(2**ref, rel=1e-4)
        assert r.metrics[f"{split}/word_perplexity"] > r.metrics[f"{split}/byte_perplexity"]
        assert 0.0 <= r.metrics[f"{split}/probe_acc"] <= 1.0
        assert 0.0 <= r.metrics[f"{split}/probe_acc_norm"] <= 1.0
        assert r.metrics[f"{split}/probe_n"] == len(texts)


def test_native_backend_agrees_with_lm_eval(setup, random_model, random_result):
    d, files, tok = setup
    native = evaluate(random_model, tok, files, d / "w-native", EvalConfig(batch_size=4, backend="native"))
    assert native.backend == "native"
    for k, v in random_result.metrics.items():
        assert native.metrics[k] == pytest.approx(v, rel=1e-4), k


def test_model_trained_on_probe_text_beats_random(setup, random_result):
    import torch

    d, files, tok = setup
    model = tiny_llama(len(tok), seed=0)
    ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in DOMAIN]
    width = max(map(len, ids))
    x = torch.tensor([i + [tok.eos_token_id] * (width - len(i)) for i in ids])
    labels = torch.tensor([i + [-100] * (width - len(i)) for i in ids])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(80):
        loss = model(input_ids=x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = evaluate(model, tok, {"domain": files["domain"]}, d / "w-trained", EvalConfig(batch_size=4))
    assert trained.metrics["domain/probe_acc"] > random_result.metrics["domain/probe_acc"]
    assert trained.metrics["domain/probe_acc"] >= 0.75
    assert trained.metrics["domain/bits_per_byte"] < random_result.metrics["domain/bits_per_byte"]


def _res(ppl=100.0, probe=0.5, dom=1.0):
    return EvalResult(metrics={"general/word_perplexity": ppl, "general/probe_acc": probe, "domain/bits_per_byte": dom})


@pytest.mark.parametrize(
    ("ppl", "probe", "accepted", "why"),
    [
        (114.9, 0.5, True, None),
        (115.1, 0.5, False, "general/word_perplexity up"),
        (100.0, 0.471, True, None),
        (100.0, 0.469, False, "general/probe_acc down 3.1 points"),
        (90.0, 0.6, True, None),
    ],
)
def test_policy_threshold_edges(ppl, probe, accepted, why, caplog):
    pol = ForgettingPolicy()
    with caplog.at_level("INFO", logger="dapt.forgetting"):
        dec = pol.judge(_res(), _res(ppl=ppl, probe=probe, dom=0.8), step=7)
    assert dec.accepted is accepted
    if why:
        assert any(why in r for r in dec.reasons)
    else:
        assert dec.reasons == []
    assert dec.numbers["general_ppl_increase"] == pytest.approx(ppl / 100 - 1)
    assert dec.numbers["drop_points general/probe_acc"] == pytest.approx((0.5 - probe) * 100)
    assert "step 7" in caplog.text and ("ACCEPTED" if accepted else "REJECTED") in caplog.text
    assert "general_ppl_increase" in caplog.text  # every decision logged with its numbers


def test_policy_rejects_missing_metric_and_reads_config():
    dec = ForgettingPolicy().judge(_res(), EvalResult(metrics={"domain/bits_per_byte": 0.9}))
    assert not dec.accepted and any("missing" in r for r in dec.reasons)
    cfg = DaptConfig(data={"domain": [{"name": "a", "paths": ["x"]}]}, eval={"max_general_ppl_increase": 0.1})
    pol = ForgettingPolicy.from_config(cfg.eval)
    assert pol.config.max_general_ppl_increase == 0.1 and pol.config.max_general_probe_drop == 3.0
    assert not pol.judge(_res(), _res(ppl=111.0)).accepted


def test_choose_best():
    acc = [(100, _res(dom=0.9)), (200, _res(dom=0.7)), (300, _res(dom=0.7)), (400, _res(dom=0.8))]
    assert ForgettingPolicy().choose_best(acc) == 200  # lowest domain bpb, earlier step on ties
    higher = EvalConfig(primary_metric="general/probe_acc", primary_higher_is_better=True)
    assert ForgettingPolicy.from_config(higher).choose_best([(1, _res(probe=0.4)), (2, _res(probe=0.6))]) == 2
    with pytest.raises(ValueError):
        ForgettingPolicy().choose_best([])


def test_rollback_plan_halves_lr_doubles_replay_capped():
    cfg = DaptConfig(
        data={"domain": [{"name": "a", "paths": ["x"]}]},
        train={"lr": 4e-5},
        mix={"general_fraction": 0.1},
        eval={"max_attempts": 4, "max_general_fraction": 0.3},
    )
    p1, p2, p3 = (rollback_plan(a, cfg) for a in range(3))
    assert (p1.attempt, p1.lr, p1.general_fraction) == (1, pytest.approx(2e-5), pytest.approx(0.2))
    assert (p2.attempt, p2.lr, p2.general_fraction) == (2, pytest.approx(1e-5), pytest.approx(0.3))  # capped
    assert (p3.lr, p3.general_fraction) == (pytest.approx(5e-6), pytest.approx(0.3))
    assert rollback_plan(3, cfg) is None  # 4 attempts used up
    zero = cfg.model_copy(update={"mix": cfg.mix.model_copy(update={"general_fraction": 0.0})})
    assert rollback_plan(0, zero).general_fraction == pytest.approx(0.1)  # from min_general_fraction 0.05, doubled


def test_report_files_and_png(tmp_path):
    pol = ForgettingPolicy()
    base = EvalResult(metrics={**_res().metrics, "general/bits_per_byte": 1.2})
    ckpts = []
    for step, ppl, dom in ((100, 105.0, 0.95), (200, 110.0, 0.85), (300, 120.0, 0.8)):
        r = EvalResult(metrics={**_res(ppl=ppl, dom=dom).metrics, "general/bits_per_byte": 1.2 * (ppl / 100) ** 0.1})
        ckpts.append((step, r, pol.judge(base, r, step=step)))
    assert [d.accepted for _, _, d in ckpts] == [True, True, False]
    best = pol.choose_best([(s, r) for s, r, d in ckpts if d.accepted])
    assert best == 200
    paths = write_report(base, ckpts, tmp_path / "rep", best_step=best, policy=pol)
    doc = json.loads(paths["json"].read_text())
    assert doc["best_step"] == 200 and [c["accepted"] for c in doc["checkpoints"]] == [True, True, False]
    assert doc["checkpoints"][2]["numbers"]["general_ppl_increase"] == pytest.approx(0.2)
    md = paths["md"].read_text()
    assert "step 200 (best)" in md and "REJECTED" in md and "| reference (original base) |" in md
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(paths["png"]) as im:
        im.verify()
        assert im.size[0] > 100 and im.size[1] > 100


def test_decision_is_plain_data():
    d = Decision(accepted=True, reasons=[], numbers={"x": 1.0})
    assert d.accepted and not math.isnan(d.numbers["x"])
    r = EvalResult(
        metrics={"a": 1.0}, notes=["n"], samples={"b": BenchmarkSamples(ids=[3, 7], acc=[1, 0], acc_norm=[0, 0])}
    )
    assert EvalResult.model_validate_json(r.model_dump_json()) == r


@pytest.mark.parametrize(
    "n,probe,accepted",
    [(20, 0.45, True), (20, 0.40, False), (200, 0.465, False), (200, 0.475, True)],
)
def test_one_probe_flip_is_not_forgetting(n, probe, accepted):
    """With 20 probes one flip is 5 points, over the 3-point limit: it must not reject on its own; two flips do.
    With 200 probes the 3-point limit applies as is."""
    base = _res()
    ckpt = _res(probe=probe)
    ckpt.metrics["general/probe_n"] = float(n)
    assert ForgettingPolicy().judge(base, ckpt).accepted is accepted


def _postprocessing_model(kind: str, vocab: int):
    """Tiny models whose forward post-processes the lm_head output: Gemma 2 soft-caps the logits, Granite divides
    them by `logits_scaling`. Strong settings, so that skipping the post-processing would change bpb a lot."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    if kind == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16, final_logit_softcapping=1.5))
    else:
        model = GraniteForCausalLM(GraniteConfig(**common, logits_scaling=8.0))
    with torch.no_grad():  # random init is near-uniform; larger weights make the post-processing matter
        model.get_output_embeddings().weight.mul_(20)
    return model.eval()


@pytest.mark.parametrize("kind", ["gemma2", "granite"])
def test_native_bpb_uses_the_models_own_logit_postprocessing(setup, kind):
    """dapt_core.metrics scores the logits of the model's forward: equal to lm-eval (HFLM calls the forward too),
    and far from what lm_head(decoder(x)) alone would give."""
    import torch

    from dapt_core.metrics import bits_per_byte

    d, files, tok = setup
    model = _postprocessing_model(kind, len(tok))
    lm_eval_bpb = evaluate(
        model, tok, files, d / f"w-{kind}", EvalConfig(batch_size=4, max_probes=0, backend="lm-eval")
    )
    for split, texts in (("domain", DOMAIN), ("general", GENERAL)):
        native = bits_per_byte(model, tok, texts, batch_size=3)
        assert native == pytest.approx(lm_eval_bpb.metrics[f"{split}/bits_per_byte"], rel=1e-4), split
        # the raw head output (no post-processing) gives a different number: the comparison above has teeth
        ids = [tok.eos_token_id] + tok(texts[0], add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            raw = model.get_output_embeddings()(model.get_decoder()(input_ids=x).last_hidden_state)[0, :-1]
            own = model(input_ids=x).logits[0, :-1]
        raw_nll = torch.nn.functional.cross_entropy(raw, x[0, 1:], reduction="sum")
        own_nll = torch.nn.functional.cross_entropy(own, x[0, 1:], reduction="sum")
        assert abs(float(raw_nll) - float(own_nll)) > 0.2 * float(own_nll)


def _hand_scores(model, tok, context: str, choices: list[str]) -> list[tuple[float, float]]:
    """(log-likelihood, per byte) of " " + choice after `context`, from the model's own forward pass."""
    import torch

    out = []
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    for c in choices:
        cont = tok(" " + c, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        ll = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
        out.append((ll, ll / len((" " + c).encode())))
    return out


def test_local_benchmark_accuracy_matches_a_hand_computation(setup, random_model):
    """A local benchmark file becomes an lm-eval multiple_choice task: per-item acc / acc_norm are exactly the argmax
    of the choices' log-likelihoods computed by hand, with the seeded subsample's item ids; the native scorer agrees."""
    from dapt_core.benchmarks import load_benchmark, subsample
    from dapt_core.config import BenchmarkConfig
    from dapt_core.eval_tasks import benchmark_prompt

    d, files, tok = setup
    words = [t.rstrip(".").split() for t in GENERAL + DOMAIN]
    rows = []
    for i, w in enumerate(words):  # the sentence's last three words against three other sentences' endings
        endings = [" ".join(words[(i + k) % len(words)][-3:]) for k in (1, 2, 3)]
        endings.insert(i % 4, " ".join(w[-3:]))
        rows.append(
            {
                "question": " ".join(w[:-3]),
                "options": "\n".join(f"{'ABCD'[j]}. {e}" for j, e in enumerate(endings)),
                "answer": "ABCD"[i % 4],
            }
        )
    path = d / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    b = BenchmarkConfig(name="mc", kind="general", path=str(path), choices_field="options", limit=6, seed=3)
    result = evaluate(
        random_model,
        tok,
        {"general": files["general"]},
        d / "w-mc",
        EvalConfig(max_probes=0, batch_size=4, benchmarks=[b]),
    )
    items = subsample(load_benchmark(b), 6, 3)
    hand_acc, hand_norm = [], []
    for it in items:
        scores = _hand_scores(random_model, tok, benchmark_prompt(it), it.choices)
        hand_acc.append(int(max(range(4), key=lambda j: scores[j][0]) == it.label))
        hand_norm.append(int(max(range(4), key=lambda j: scores[j][1]) == it.label))
    smp = result.samples["mc"]
    assert smp.ids == [it.id for it in items] and len(smp.ids) == 6
    assert (smp.acc, smp.acc_norm) == (hand_acc, hand_norm)
    assert result.metrics["bench/mc/acc"] == pytest.approx(sum(hand_acc) / 6)
    assert result.metrics["bench/mc/acc_norm"] == pytest.approx(sum(hand_norm) / 6)
    assert result.metrics["bench/mc/n"] == 6
    native = evaluate(
        random_model,
        tok,
        {"general": files["general"]},
        d / "w-mc-native",
        EvalConfig(max_probes=0, benchmarks=[b], backend="native"),
    )
    assert native.samples["mc"] == smp


def test_lm_eval_task_benchmark_is_subsampled_by_doc_id(setup, random_model):
    """`task:` benchmarks name an lm-eval task (here a local YAML task standing in for a hub one): the seeded subsample
    goes through lm-eval's `samples`, and item ids are lm-eval doc ids, so the per-item results pair up."""
    import random

    from dapt_core.config import BenchmarkConfig
    from dapt_core.eval_tasks import _mc_task_yaml

    d, files, tok = setup
    rows = [
        {"context": f"The {w} sat on the", "choices": ["mat", "sky", "idea"], "label": i % 3}
        for i, w in enumerate(["cat", "dog", "hen", "fox", "owl", "cow", "pig", "ram"])
    ]
    work = d / "w-named"
    (work / "lm_eval_tasks").mkdir(parents=True)
    data = d / "named.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (work / "lm_eval_tasks" / "my_mc.yaml").write_text(_mc_task_yaml("my_mc", data, d / "hf-cache"), encoding="utf-8")
    b = BenchmarkConfig(name="named", kind="general", task="my_mc", limit=5, seed=1)
    result = evaluate(
        random_model, tok, {"general": files["general"]}, work, EvalConfig(max_probes=0, batch_size=4, benchmarks=[b])
    )
    smp = result.samples["named"]
    assert smp.ids == sorted(random.Random(1).sample(range(8), 5))
    for i, ok in zip(smp.ids, smp.acc):
        scores = _hand_scores(random_model, tok, rows[i]["context"], rows[i]["choices"])
        assert ok == int(max(range(3), key=lambda j: scores[j][0]) == rows[i]["label"])


def _forward_rows(model) -> tuple[list[tuple[int, int]], object]:
    """Record (rows, length) of every forward call of `model`; returns the list and the hook handle."""
    shapes: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        shapes.append(tuple(ids.shape))

    return shapes, model.register_forward_pre_hook(record, with_kwargs=True)


def test_chunked_nll_equals_one_unchunked_pass(setup, random_model, monkeypatch):
    """The native NLL bounds memory (a few rows per forward, fp32 cross-entropy a few positions at a time): the sum must
    equal one cross-entropy over the whole batch's logits."""
    import torch

    from dapt_core import metrics

    _, _, tok = setup
    ids = [[tok.eos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in DOMAIN + GENERAL]
    width = max(map(len, ids))
    input_ids = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    with torch.no_grad():
        logits = random_model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        whole = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
    monkeypatch.setattr(metrics, "LOGITS_BUDGET", 4 * len(tok) * width * 3)  # three rows per forward call
    monkeypatch.setattr(metrics, "_NLL_CHUNK", 5)
    shapes, hook = _forward_rows(random_model)
    try:
        with torch.no_grad():
            chunked = metrics._summed_nll(random_model, input_ids, mask, labels)
    finally:
        hook.remove()
    assert [rows for rows, _ in shapes] == [3, 3, 2]  # 8 rows in calls of at most three
    assert chunked == pytest.approx(float(whole), rel=1e-5)


def test_lm_eval_batches_are_bounded_by_memory_and_score_the_same(setup, random_model, monkeypatch):
    """lm-eval log-softmaxes a whole batch's logits at once; dapt's HFLM caps the rows of each batch by the longest
    request's length, and the log-likelihoods stay lm-eval's own (equal to plain HFLM's)."""
    from lm_eval.models.huggingface import HFLM

    from dapt_core import metrics
    from dapt_core.evaluate import bounded_hflm

    _, _, tok = setup
    requests = []
    for t in DOMAIN + GENERAL:
        words = t.split()
        context = tok(" ".join(words[:-2]), add_special_tokens=False)["input_ids"]
        requests.append((None, context, tok(" " + " ".join(words[-2:]), add_special_tokens=False)["input_ids"]))
    longest = max(len(c) + len(x) for _, c, x in requests)
    plain = HFLM(
        pretrained=random_model, tokenizer=tok, batch_size=8, max_length=256, device="cpu", add_bos_token=False
    )
    expected = plain._loglikelihood_tokens(requests, disable_tqdm=True)
    monkeypatch.setattr(metrics, "LOGITS_BUDGET", 4 * len(tok) * longest * 2)  # two of the longest rows per call
    bounded = bounded_hflm(random_model, tok, batch_size=8, max_length=256)
    shapes, hook = _forward_rows(random_model)
    try:
        scored = bounded._loglikelihood_tokens(requests, disable_tqdm=True)
    finally:
        hook.remove()
    assert shapes and all(rows * length <= 2 * longest for rows, length in shapes)
    assert max(rows for rows, _ in shapes) >= 2  # still batches
    assert bounded.batch_size == 8  # restored after scoring
    assert [s[1] for s in scored] == [s[1] for s in expected]
    assert [s[0] for s in scored] == pytest.approx([s[0] for s in expected], rel=1e-5)


def test_lm_eval_draws_no_progress_bars(setup, random_model, capfd):
    """HFLM asks tqdm for bars explicitly (TQDM_DISABLE does not stop them): in a terminal each evaluation added a
    line per call. dapt's HFLM scores without them."""
    from lm_eval.api.instance import Instance

    from dapt_core.evaluate import bounded_hflm

    _, _, tok = setup
    lm = bounded_hflm(random_model, tok, batch_size=8, max_length=256)
    capfd.readouterr()
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(DOMAIN)]
    choices = [Instance("loglikelihood", {}, (t[:20], " " + t[20:30]), i) for i, t in enumerate(GENERAL)]
    assert len(lm.loglikelihood_rolling(rolling)) == len(DOMAIN) and len(lm.loglikelihood(choices)) == len(GENERAL)
    assert "it/s" not in capfd.readouterr().err
