"""dapt_core/sft.py on a tiny byte-level tokenizer and a tiny Llama: parsing, masks, shards, metrics, a real SFT run."""

from __future__ import annotations

import copy
import gzip
import json
import random
from pathlib import Path

import pytest
import torch

from dapt_core.config import SftConfig, TrainConfig
from dapt_core.sft import (
    Example,
    build_sft_shards,
    read_instructions,
    response_metrics,
    run_sft,
    split_examples,
    tokenize_example,
)
from dapt_core.train import PackedSequences, make_batch
from tests.tiny_model import byte_level_tokenizer, tiny_llama

EOS = "<|endoftext|>"
# Trim-blocks (transformers' Jinja setting) eats newlines after tags, hence the {{ '\n' }}.
TEMPLATE = (
    r"{% for m in messages %}{{ m['role'] + ':\n' + m['content'] }}"
    r"{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    r"{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
)


def repeat_task(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
        rows.append({"prompt": f"repeat: {word}", "response": word})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tok():
    texts = [f"{r['prompt']}\n{r['response']}" for r in repeat_task(200)] + ["user:\nassistant:\nsystem:\nbe brief"] * 5
    return byte_level_tokenizer(texts, 300)


@pytest.fixture
def chat_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = TEMPLATE
    return t


def targets(tokenizer, ids, mask) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask) if m])


def non_targets(tokenizer, ids, mask) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask) if not m])


# ------------------------------------------------------------------------------------------------------ reading
def test_read_instructions_both_formats_gzip_and_blank_lines(tmp_path):
    plain = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "repeat: abc", "response": "abc"}, "", "  "])
    chat = tmp_path / "b.jsonl.gz"
    conversation = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "repeat: abc"},
            {"role": "assistant", "content": "abc"},
        ]
    }
    chat.write_bytes(gzip.compress((json.dumps(conversation) + "\n").encode()))

    a, b = read_instructions([plain, chat])
    assert a == Example(context=(("user", "repeat: abc"),), response="abc")
    assert b.context == (("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "repeat: abc"))
    assert b.response == "abc" and b.messages()[-1] == {"role": "assistant", "content": "abc"}
    assert (a.origin, b.origin) == (f"{plain}:1", f"{chat}:1")
    # the id is the content: stable, equal for duplicates, different for different content
    assert a.id == Example(context=(("user", "repeat: abc"),), response="abc", origin="elsewhere:9").id
    assert len({a.id, b.id}) == 2 and len(a.id) == 64


ANSWER = {"role": "assistant", "content": "r"}


def test_read_instructions_trl_prompt_completion(tmp_path):
    """TRL's prompt-completion shape, as strings and as conversational lists, reads like prompt/response."""
    user, answer = {"role": "user", "content": "repeat: abc"}, {"role": "assistant", "content": "abc"}
    path = write_jsonl(
        tmp_path / "trl.jsonl",
        [
            {"prompt": "repeat: abc", "completion": "abc"},
            {"prompt": [{"role": "system", "content": "be brief"}, user], "completion": [answer]},
        ],
    )
    plain, chat = read_instructions([path])
    assert plain == Example(context=(("user", "repeat: abc"),), response="abc")
    assert chat.context == (("system", "be brief"), ("user", "repeat: abc")) and chat.response == "abc"


@pytest.mark.parametrize(
    "line, expected",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"text": "x"}, "{'prompt': ..., 'completion': ...} or {'messages': [...]}, got keys ['text']"),
        ({"prompt": "p", "completion": ""}, "'completion' must be a non-empty string"),
        ({"prompt": [{"role": "user", "content": "p"}], "completion": "r"}, "'completion' must be a list of"),
        (
            {"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "user", "content": "r"}]},
            "the last message must be",
        ),
        ({"prompt": "p", "response": ""}, "'response' must be a non-empty string"),
        ({"prompt": 3, "response": "r"}, "'prompt' must be a non-empty string"),
        ({"messages": [{"role": "assistant", "content": "r"}]}, "'messages' must be a list of at least 2 messages"),
        (
            {"messages": [{"role": "bot", "content": "p"}, ANSWER]},
            "messages[0].role must be one of system, user, assistant",
        ),
        ({"messages": [{"role": "user", "content": None}, ANSWER]}, "messages[0].content must be a string"),
        ({"messages": [ANSWER, {"role": "user", "content": "p"}]}, "the last message must be the assistant's response"),
        (
            {"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": " "}]},
            "messages[1].content (the response) must be a non-empty string",
        ),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path, line, expected):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "ok", "response": "ok"}, "", line])
    with pytest.raises(ValueError) as err:
        read_instructions([path])
    assert str(err.value).startswith(f"{path}:3: ") and expected in str(err.value)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(ValueError, match=r"sft.jsonl:2: not valid UTF-8"):
        read_instructions([path])


# ------------------------------------------------------------------------------------------------------ masking
def test_mask_without_chat_template_is_response_and_eos(tok):
    ex = Example(context=(("user", "repeat: abc"),), response="abc")
    ids, mask = tokenize_example(ex, tok)
    assert len(ids) == len(mask)
    assert targets(tok, ids, mask) == "abc" + EOS
    assert non_targets(tok, ids, mask) == "repeat: abc\n"
    assert mask == sorted(mask)  # prompt first, then the response: one contiguous target span at the end
    assert ids[-1] == tok.eos_token_id


def test_mask_with_chat_template_token_prefix(chat_tok):
    ex = Example(context=(("system", "be brief"), ("user", "repeat: abc")), response="abc")
    ids, mask = tokenize_example(ex, chat_tok)
    assert chat_tok.decode(ids) == chat_tok.apply_chat_template(ex.messages(), tokenize=False)
    assert targets(chat_tok, ids, mask) == "abc" + EOS + "\n"  # everything the template renders after the prompt
    prompt = chat_tok.apply_chat_template(ex.messages(with_response=False), tokenize=False, add_generation_prompt=True)
    assert non_targets(chat_tok, ids, mask) == prompt


def test_mask_with_chat_template_falls_back_to_character_offsets(chat_tok):
    ex = Example(context=(("user", "repeat: abc"),), response="abc")
    # The generation prompt ends in a space that the response's first token (" a") absorbs: not a token prefix.
    chat_tok.chat_template = TEMPLATE.replace("'assistant:\\n'", "'assistant: '").replace(
        "':\\n' + m['content']", "': ' + m['content']"
    )
    prompt = chat_tok.apply_chat_template(ex.messages(with_response=False), tokenize=False, add_generation_prompt=True)
    prompt_ids = chat_tok(prompt, add_special_tokens=False)["input_ids"]
    ids, mask = tokenize_example(ex, chat_tok)
    assert ids[: len(prompt_ids)] != prompt_ids
    assert targets(chat_tok, ids, mask) == " abc" + EOS + "\n"
    assert non_targets(chat_tok, ids, mask) == "user: repeat: abc\nassistant:"
    # The full rendering does not start with the prompt rendering at all: the response is located in it.
    chat_tok.chat_template = TEMPLATE.replace("'assistant:\\n'", "'reply:\\n'")
    ids, mask = tokenize_example(ex, chat_tok)
    assert targets(chat_tok, ids, mask) == "abc" + EOS + "\n"
    # ... and a template that changes the response leaves nothing to find: a clear error, not a wrong mask
    chat_tok.chat_template = chat_tok.chat_template.replace("m['content']", "m['content'] | upper")
    with pytest.raises(ValueError, match="does not render the response verbatim"):
        tokenize_example(ex, chat_tok)


def test_eos_appended_when_the_template_ends_without_it(chat_tok):
    chat_tok.chat_template = TEMPLATE.replace("{{ eos_token }}", "")
    ids, mask = tokenize_example(Example(context=(("user", "repeat: abc"),), response="abc"), chat_tok)
    assert targets(chat_tok, ids, mask) == "abc\n" + EOS
    assert ids[-1] == chat_tok.eos_token_id and mask[-1] == 1


# ------------------------------------------------------------------------------------------------------- shards
def _examples(n: int, seed: int = 0) -> list[Example]:
    return [Example(context=(("user", r["prompt"]),), response=r["response"]) for r in repeat_task(n, seed)]


def _rows(shards):
    data = PackedSequences([Path(p) for p in shards])
    return [data[i] for i in range(len(data))]


@pytest.mark.parametrize("packing", [False, True])
def test_rows_are_seq_len_with_documents_and_masks_matching_the_examples(tmp_path, tok, packing):
    seq_len = 32
    examples = _examples(30) + [Example(context=(("user", "repeat: " + "abcdefgh" * 4),), response="abcdefgh" * 4)]
    encoded = [tokenize_example(ex, tok) for ex in examples]
    assert len(encoded[-1][0]) > seq_len  # the long one is cut
    counts = build_sft_shards(examples, tok, seq_len, tmp_path, packing=packing, shard_sequences=4)
    rows = _rows(counts["shards"])
    assert len(counts["shards"]) == -(-len(rows) // 4) and counts["sequences"] == len(rows)
    assert (counts["examples"], counts["truncated"], counts["skipped"]) == (len(examples), 1, 0)
    if packing:
        assert len(rows) < len(examples)  # several examples per row
    else:
        assert len(rows) == len(examples)

    expected = [(ids[:seq_len], mask[:seq_len]) for ids, mask in encoded]
    pad = tok.eos_token_id  # the tokenizer has no pad token: eos pads
    k, total_mask = 0, 0
    for ids, docs, mask in rows:
        assert len(ids) == len(mask) == seq_len and int(docs.sum()) == seq_len
        total_mask += int(mask.sum())
        start = 0
        for length in docs.tolist():
            piece = (ids[start : start + length].tolist(), mask[start : start + length].astype(int).tolist())
            if k < len(expected) and piece == expected[k]:
                k += 1  # the next example, whole: never split across rows
            else:  # padding: the row's last document, never a target
                assert start + length == seq_len and set(piece[0]) == {pad} and not any(piece[1])
            start += length
    assert k == len(expected)
    assert counts["target_tokens"] == total_mask == sum(sum(m) for _, m in expected)
    assert counts["pad_tokens"] == len(rows) * seq_len - sum(len(i) for i, _ in expected)


def test_prompt_filling_seq_len_is_skipped_and_rebuild_removes_stale_shards(tmp_path, tok):
    long_prompt = Example(context=(("user", "repeat: " + "abcdefgh" * 6),), response="ab")
    counts = build_sft_shards(_examples(9) + [long_prompt], tok, 16, tmp_path, packing=False, shard_sequences=2)
    assert (counts["examples"], counts["skipped"], counts["sequences"], len(counts["shards"])) == (9, 1, 9, 5)
    counts = build_sft_shards(_examples(3), tok, 16, tmp_path, packing=False, shard_sequences=2)
    assert sorted(p.name for p in tmp_path.glob("train-*.parquet")) == ["train-00000.parquet", "train-00001.parquet"]
    with pytest.raises(ValueError, match="raise sft.seq_len"):
        build_sft_shards([long_prompt], tok, 16, tmp_path, packing=False)


def test_shard_bytes_are_deterministic(tmp_path, tok):
    a = build_sft_shards(_examples(40), tok, 32, tmp_path / "a", packing=True, shard_sequences=4)
    b = build_sft_shards(_examples(40), tok, 32, tmp_path / "b", packing=True, shard_sequences=4)
    assert len(a["shards"]) > 1
    assert [Path(p).read_bytes() for p in a["shards"]] == [Path(p).read_bytes() for p in b["shards"]]


@pytest.mark.parametrize("block_documents", [False, True])
def test_training_labels_are_the_responses_only(tmp_path, tok, block_documents):
    examples = _examples(12)
    counts = build_sft_shards(examples, tok, 32, tmp_path, packing=True)
    rows = _rows(counts["shards"])
    batch = make_batch(rows, block_documents)
    labelled = [tok.decode([t for t in row if t != -100]) for row in batch["labels"].tolist()]
    # each row's labels are its examples' responses and eos, in order, nothing of the prompts or the padding
    expected, k = [], 0
    for _, docs, mask in rows:
        n_examples = len(docs) - (1 if not mask[-1] else 0)
        expected.append("".join(ex.response + EOS for ex in examples[k : k + n_examples]))
        k += n_examples
    assert k == len(examples) and labelled == expected


# -------------------------------------------------------------------------------------------------------- split
def test_split_is_by_content_hash_capped_and_deterministic():
    examples = _examples(400)
    train, heldout = split_examples(examples, 0.1, 1000, seed=0)
    assert 20 <= len(heldout) <= 60 and len(train) + len(heldout) == len(examples)
    assert {e.id for e in heldout}.isdisjoint({e.id for e in train})  # duplicates land on one side
    assert split_examples(list(reversed(examples)), 0.1, 1000, seed=0)[1] == list(reversed(heldout))  # order-free
    assert split_examples(examples, 0.1, 1000, seed=1)[1] != heldout
    # max_heldout lowers the fraction to about 5/400, and chance never takes more than 5
    capped = [split_examples(examples, 0.1, 5, seed=s)[1] for s in range(20)]
    assert max(map(len, capped)) == 5 and 3 <= sum(map(len, capped)) / 20 <= 7
    assert set(capped[0]) <= set(heldout)
    assert split_examples(examples, 0.0, 5, seed=0) == (examples, [])


# ------------------------------------------------------------------------------------------------------ metrics
class Oracle(torch.nn.Module):
    """Predicts each next token by peeking at it (logit 0 elsewhere), except the tokens in `wrong`."""

    def __init__(self, vocab: int, wrong: set[int] = frozenset()):
        super().__init__()
        self.vocab, self.wrong = vocab, wrong
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, use_cache):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], 1)
        right = torch.tensor([[t not in self.wrong for t in row] for row in nxt.tolist()])
        logits.scatter_(2, nxt[..., None], torch.where(right, 20.0, -20.0)[..., None])
        return type("Out", (), {"logits": logits})


def test_response_metrics_score_exactly_the_response_tokens(tok):
    examples = [
        Example(context=(("user", "repeat: abc"),), response="abc"),
        Example(context=(("user", "repeat: xyz"),), response="xyz"),
    ]
    oracle = Oracle(len(tok)).train()
    perfect = response_metrics(oracle, tok, examples, seq_len=64, batch_size=1)
    assert perfect["sft/response_token_acc"] == 1.0 and perfect["sft/exact_match"] == 1.0
    assert perfect["sft/response_loss"] == pytest.approx(0.0, abs=1e-6) and oracle.training  # mode restored
    # wrong only where the next token is 'y': once in the second response, also in its prompt (not scored)
    y = tok("y", add_special_tokens=False)["input_ids"]
    assert tok("xyz", add_special_tokens=False)["input_ids"] == tok("x")["input_ids"] + y + tok("z")["input_ids"]
    scored = response_metrics(Oracle(len(tok), set(y)), tok, examples, seq_len=64, batch_size=2)
    n_targets = sum(sum(tokenize_example(ex, tok)[1]) for ex in examples)
    assert scored["sft/response_token_acc"] == pytest.approx(1 - 1 / n_targets)
    assert scored["sft/exact_match"] == 0.5
    assert scored["sft/response_loss"] > perfect["sft/response_loss"] + 20 / n_targets


# ------------------------------------------------------------------------------------------------------ the run
def _sft_cfg(path: Path, **train) -> SftConfig:
    # constant LR, no clipping: learn fast in few steps
    base = dict(lr=1e-3, min_lr_ratio=1.0, warmup_ratio=0.05, weight_decay=0.0, grad_clip=None, batch_size=8, seed=0)
    base.update(save_every=10**6, report_to=[])
    base.update(train)
    return SftConfig(
        data=[str(path)],
        seq_len=32,
        packing=True,
        heldout_fraction=0.1,
        max_heldout=32,
        train=TrainConfig(block_cross_document_attention=True, **base),
    )


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a busy 2-core machine the threads spin against each
    other (measured: 17 s instead of 2.7 s for 60 steps of the run below)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sft_run_lowers_heldout_response_loss(tmp_path, tok, one_thread):
    data = write_jsonl(tmp_path / "sft.jsonl", repeat_task(300))
    result = run_sft(tiny_llama(len(tok)), tok, _sft_cfg(data, max_steps=150), tmp_path / "out")
    assert 10 <= len(result.heldout) <= 32 and result.counts["examples"] == 300 - len(result.heldout)
    assert result.train.step == 150
    before, after = result.before, result.after
    assert before["sft/response_loss"] > 4.0  # about ln(vocab): an untrained model
    assert after["sft/response_loss"] < 0.5 * before["sft/response_loss"]
    assert after["sft/response_token_acc"] > before["sft/response_token_acc"] + 0.3


def test_sft_run_lora_merges_and_resumes(tmp_path, tok, one_thread):
    from peft import PeftModel

    data = write_jsonl(tmp_path / "sft.jsonl", repeat_task(40))
    cfg = _sft_cfg(data, method="lora", max_steps=2, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    seen = []
    first = run_sft(
        tiny_llama(len(tok)),
        tok,
        cfg,
        tmp_path / "out",
        on_checkpoint=lambda step, path: seen.append((step, path.name)),
    )
    assert not isinstance(first.model, PeftModel) and seen == [(2, "checkpoint-2")]
    assert first.after != first.before  # the merged adapters changed the model
    assert (
        first.after.keys() == first.before.keys() == {"sft/response_loss", "sft/response_token_acc", "sft/exact_match"}
    )
    again = run_sft(tiny_llama(len(tok)), tok, cfg, tmp_path / "out")  # same shards rebuilt: resumes at the end
    assert again.train.resumed_from.name == "checkpoint-2" and again.train.history == first.train.history
    assert again.after == pytest.approx(first.after)
