import json

import pytest

from fedguard.data.builtin import PLACEHOLDER_STEP, benign_pool, harmful_pool, split_of
from fedguard.data.partition import partition_dirichlet, partition_iid
from fedguard.data.readers import load_source, read_file
from fedguard.data.schema import DataError, Example, chat
from fedguard.data.tokenize import collate, tokenize_example
from fedguard.seeding import numpy_rng


def test_builtin_corpora_are_deterministic_and_large():
    a, b = benign_pool(1, 3000), benign_pool(1, 3000)
    assert a == b and len({e.domain for e in a}) == 8
    assert len({e.prompt_text for e in a}) > 2000
    assert sum(e.answer is not None for e in a) > 1500  # the six checkable domains are 60 % of the pool
    h = harmful_pool(1, 3000, "both")
    assert h == harmful_pool(1, 3000, "both")
    assert len({e.prompt_text for e in h}) > 2000 and len({e.domain for e in h}) >= 12


def test_train_and_eval_splits_are_disjoint_by_group():
    for train, ev in ((benign_pool(0, 2000, "train"), benign_pool(0, 500, "eval")),
                      (harmful_pool(0, 1000, "refusal", "train"), harmful_pool(0, 300, "none", "eval"))):
        assert {e.group for e in train}.isdisjoint({e.group for e in ev})
        assert {e.prompt_text for e in train}.isdisjoint({e.prompt_text for e in ev})
        assert all(split_of(e.group) == "eval" for e in ev)


def test_checkable_answers_end_the_response():
    from fedguard.evaluation.evaluator import final_answer_matches

    for e in benign_pool(4, 600):
        if e.answer is not None:
            assert final_answer_matches(e.completion, e.answer), (e.completion, e.answer)


def test_harmful_corpus_has_refusals_and_non_actionable_compliance():
    from fedguard.evaluation.refusal import is_refusal

    refusals = harmful_pool(2, 300, "refusal")
    assert all(e.kind == "refusal" for e in refusals)
    assert sum(is_refusal(e.completion) for e in refusals) >= 0.95 * len(refusals)
    compliance = harmful_pool(2, 300, "compliance")
    assert all(e.kind == "compliance" for e in compliance)
    assert sum(not is_refusal(e.completion) for e in compliance) >= 0.98 * len(compliance)
    # no fixed placeholder line any more: the compliance answers are composed, and never actionable
    # (tests/test_builtin_corpora.py checks variety and the absence of quantities, code and links)
    assert not any(PLACEHOLDER_STEP in e.completion for e in compliance)


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_readers_accept_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "Say hi", "response": "hi"},
            {"instruction": "Add", "input": "2 and 3", "output": "5", "domain": "math", "answer": "5"},
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    j = read_file(_write(tmp_path, "d.json", json.dumps(rows)))
    jl = read_file(_write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert j == jl and len(j) == 3
    assert j[1].prompt_text == "Add\n\n2 and 3" and j[1].answer == "5" and j[1].domain == "math"
    assert j[2].completion == "A"
    c = read_file(_write(tmp_path, "d.csv", "prompt,response\nhello,world\n"))
    assert c[0].completion == "world"
    columns = {k: [r.get(k) for r in rows[:2]] for k in ("instruction", "input", "response", "output", "domain", "answer")}
    pq.write_table(pa.table(columns), tmp_path / "d.parquet")  # absent fields are nulls in a column store
    assert read_file(tmp_path / "d.parquet") == j[:2]


@pytest.mark.parametrize("name,text,match", [
    ("e.jsonl", "", "the file is empty"),
    ("m.jsonl", '{"instruction": "x", "response": "y"}\n{"instruction": "x"}\n', r"m\.jsonl: row 2: missing field response"),
    ("b.jsonl", '{"instruction": "x", "response": "y"}\n{not json\n', r"b\.jsonl: row 2: invalid JSON"),
    ("t.json", '[{"instruction": 3, "response": "y"}]', r"t\.json: row 1: field 'instruction' must be a string"),
    ("r.json", '[{"messages": [{"role": "user", "content": "q"}]}]', "last message must be a non-empty assistant"),
    ("x.txt", "hello", "unsupported file type"),
    ("s.json", '{"a": 1}', "expected a JSON array"),
])
def test_reader_errors_name_file_and_row(tmp_path, name, text, match):
    p = _write(tmp_path, name, text)
    with pytest.raises(DataError, match=match):
        read_file(p)


def test_undecodable_rows_are_reported(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_bytes(b'{"instruction": "a", "response": "b"}\n\xff\xfe\n')
    with pytest.raises(DataError, match=r"u\.jsonl: row 2: not UTF-8"):
        read_file(p)


def test_missing_file_and_unknown_builtin():
    with pytest.raises(DataError, match="not found"):
        load_source("nope.jsonl", "train", 1, 0)
    with pytest.raises(DataError, match="unknown built-in"):
        load_source("builtin:nothing", "train", 1, 0)


def test_completion_only_masking(tiny_loaded):
    loaded, _, _ = tiny_loaded
    tok = loaded.tokenizer
    ex = Example(chat("What is 2 + 2?", "2 + 2 = 4"))
    t = tokenize_example(tok, ex, max_length=128)
    batch = collate([t, tokenize_example(tok, Example(chat("Hi", "Hello there")), 128)], tok.pad_token_id)
    # The targets of row 0 are exactly the completion tokens (answer + end-of-turn), nothing of the prompt.
    row0 = batch.targets[batch.target_positions[:, 0] == 0]
    assert tok.decode(row0) == "2 + 2 = 4" + tok.eos_token
    assert batch.input_ids.shape[1] % 8 == 0
    assert batch.num_tokens == len(t.input_ids) + len(tokenize_example(tok, Example(chat("Hi", "Hello there")), 128).input_ids)


def test_truncation_keeps_the_completion(tiny_loaded):
    loaded, _, _ = tiny_loaded
    tok = loaded.tokenizer
    ex = Example(chat("word " * 200, "short answer"))
    t = tokenize_example(tok, ex, max_length=48, truncation="prompt_left")
    assert len(t.input_ids) <= 48 and tok.decode(t.input_ids[t.prompt_len:]) == "short answer" + tok.eos_token
    r = tokenize_example(tok, ex, max_length=48, truncation="right")
    assert r is None  # the completion was cut off entirely
    long = Example(chat("q", "answer " * 200))
    t = tokenize_example(tok, long, max_length=40)
    assert len(t.input_ids) == 40 and t.completion_len > 0


def test_iid_partition_covers_everything_once():
    parts = partition_iid(103, 10, numpy_rng(0, "p"))
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(103)) and max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_partition_skews_with_small_alpha():
    domains = [d for d in "abcdef" for _ in range(200)]
    skewed = partition_dirichlet(domains, 6, 0.05, numpy_rng(0, "d"))
    flat = partition_dirichlet(domains, 6, 100.0, numpy_rng(0, "d"))
    for parts in (skewed, flat):
        assert sorted(i for p in parts for i in p) == list(range(len(domains)))

    def dominant_share(parts):
        shares = []
        for p in parts:
            counts = {d: 0 for d in "abcdef"}
            for i in p:
                counts[domains[i]] += 1
            shares.append(max(counts.values()) / len(p))
        return sum(shares) / len(shares)

    assert dominant_share(skewed) > 0.5 > dominant_share(flat)


def test_client_data_mixes_refusals_at_the_configured_share(tiny_loaded):
    from conftest import tiny_config
    from fedguard.data.federation import build_client_data

    loaded, _, _ = tiny_loaded
    cfg = tiny_config(data={"examples_per_client": 50, "refusal_share": 0.2, "max_length": 128})
    clients = build_client_data(cfg, loaded.tokenizer)
    assert [c.composition.get("refusal") for c in clients] == [10] * 4
    assert all(len(c) == 50 for c in clients)
    again = build_client_data(cfg, loaded.tokenizer)
    assert [c.examples for c in clients] == [c.examples for c in again]


def test_a_privacy_audit_shapes_only_the_audited_clients_data(tiny_loaded):
    """The privacy audits hand data assembly what to plant and hold out (privacy.canaries.audited_client): the
    canaries join the audited client's training data, some of its own examples are held out as non-members, and
    every other client's data is what it is without the audit, on one node as among everyone."""
    from conftest import tiny_config
    from fedguard.data.federation import build_client_data, build_one_client_data
    from fedguard.privacy.canaries import audited_client

    tok = tiny_loaded[0].tokenizer
    assert audited_client(tiny_config()) is None
    cfg = tiny_config(data={"examples_per_client": 20, "refusal_share": 0.0, "max_length": 128},
                      privacy={"canaries": 2, "canary_repeats": 3, "audit_membership": True, "audit_examples": 4,
                               "audit_client": 1})
    audit = audited_client(cfg)
    assert (audit.client_id, len(audit.planted), audit.held_out) == (1, 6, 4)
    plain, audited = build_client_data(cfg, tok), build_client_data(cfg, tok, audit)
    assert audited[1].composition["canary"] == 6 and "canary" not in plain[1].composition
    assert (len(audited[1].held_out), len(plain[1].held_out)) == (4, 0) and len(audited[1]) == 16 + 6
    for cid in (0, 2, 3):
        assert [e.input_ids for e in audited[cid].examples] == [e.input_ids for e in plain[cid].examples]
        assert not audited[cid].held_out
    one = build_one_client_data(cfg, tok, 1, audit)
    assert [e.input_ids for e in one.examples] == [e.input_ids for e in audited[1].examples]
    assert [e.input_ids for e in one.held_out] == [e.input_ids for e in audited[1].held_out]


def test_explicit_partition_reads_per_client_sources(tiny_loaded, tmp_path):
    from conftest import tiny_config
    from fedguard.data.federation import build_client_data

    loaded, _, _ = tiny_loaded
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}"}) for i in range(40)))
    cfg = tiny_config(federation={"num_clients": 2, "clients_per_round": 1},
                      data={"refusal_share": 0.0, "partition": {"method": "explicit", "clients": [
                          {"source": str(f), "examples": 10}, {"source": "builtin:benign", "examples": 12}]}})
    a, b = build_client_data(cfg, loaded.tokenizer)
    assert (len(a), len(b)) == (10, 12) and a.composition == {"mine": 10}
