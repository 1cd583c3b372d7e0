"""`attnlab bench recall`: real (tiny) training into the store, causality, resume, unsupported mechanisms."""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import attnlab
from attnlab.bench import recall
from attnlab.bench.store import ResultStore, config_hash
from attnlab.core.module import Attention
from attnlab.core.reference import softmax_attention_reference
from attnlab.core.registry import Paper, Supports, register, remove

AGREED_CONFIG = {"mechanism", "params", "seq_len", "num_kv_pairs", "d_model", "vocab_size", "seed", "lr",
                 "max_epochs", "train_examples", "test_examples", "layers", "cell_seconds"}
AGREED_METRICS = {"accuracy", "best_accuracy", "epochs", "train_seconds", "converged", "stopped", "steps",
                  "step_budget", "load_1m"}
CAUSAL = [s.name for s in attnlab.list_mechanisms() if s.supports.causal and 1 in s.supports.grids]


def tiny(mechanism: str = "softmax", **over: object) -> dict:
    kw = {"seq_len": 16, "num_kv_pairs": 2, "d_model": 32, "vocab_size": 64, "seed": 0, "lr": 3e-3,
          "max_epochs": 2, "train_examples": 96, "test_examples": 32, **over}
    return recall.make_config(mechanism, recall.mechanism_params(attnlab.get(mechanism)), **kw)


@pytest.fixture
def store(tmp_path) -> ResultStore:
    return ResultStore(tmp_path / "r.sqlite")


def test_a_tiny_real_training_run_lands_in_the_store(store: ResultStore) -> None:
    config = tiny()
    threads = torch.get_num_threads()
    rows = recall.run_recall(store, [config], threads=1, quiet=True)
    assert torch.get_num_threads() == threads, "the caller's thread setting is restored"
    [result] = store.results("recall")
    assert result.config == config and set(config) == AGREED_CONFIG
    assert result.status == "ok" and rows == [{"config": config, "status": "ok", "metrics": result.metrics}]
    m = result.metrics
    assert AGREED_METRICS <= set(m)
    assert 0.0 <= m["accuracy"] <= 1.0 and m["accuracy"] <= m["best_accuracy"] <= 1.0
    assert 1 <= m["epochs"] <= 2 and len(m["history"]) == m["epochs"] and m["history"][-1] == pytest.approx(m["accuracy"], abs=1e-4)
    assert m["converged"] == (m["accuracy"] >= 0.99)
    assert m["step_budget"] == 2 * 2 and m["steps"] == 2 * m["epochs"]  # 96 examples: 2 batches of 64 an epoch
    assert m["stopped"] == ("converged" if m["converged"] else "step budget")
    assert m["train_seconds"] > 0
    assert result.env["torch"] == torch.__version__ and result.env["threads"] == 1


def test_training_is_reproducible_and_leaves_the_global_rng_alone(store: ResultStore) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = recall.train_recall(tiny(max_epochs=1), quiet=True)[1]
    after = torch.rand(1)
    b = recall.train_recall(tiny(max_epochs=1), quiet=True)[1]
    assert a["history"] == b["history"]
    assert torch.equal(before, after), "training must not consume the caller's random stream"


@pytest.mark.parametrize("name", CAUSAL)
def test_the_model_is_causal(name: str) -> None:
    torch.manual_seed(0)  # every causal sequence mechanism builds as a recall mixer: a build error fails here
    model = recall.RecallModel(name, recall.mechanism_params(attnlab.get(name)), vocab_size=40, seq_len=16, d_model=32)
    model.eval()
    tokens = torch.randint(0, 40, (2, 16))
    changed = tokens.clone()
    t = 9
    changed[:, t] = (changed[:, t] + 7) % 40
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.shape == (2, 16, 40)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-4, "the changed position itself sees its token"


def test_query_logits_are_the_logits_at_labelled_positions() -> None:
    torch.manual_seed(0)
    model = recall.RecallModel("softmax", {}, vocab_size=40, seq_len=16, d_model=32).eval()
    tokens = torch.randint(0, 40, (2, 16))
    labels = torch.full((2, 16), -100)
    labels[0, 5], labels[1, 3], labels[1, 12] = 7, 8, 9
    with torch.no_grad():
        full = model(tokens)
        logits, target = model.query_logits(tokens, labels)
    torch.testing.assert_close(logits, torch.stack([full[0, 5], full[1, 3], full[1, 12]]))
    assert target.tolist() == [7, 8, 9]


class _Bidirectional(Attention):
    """Planted: plain softmax attention with no causal mode."""

    def attend_fast(self, q, k, v, mask):  # noqa: ANN001, ANN201
        return softmax_attention_reference(q, k, v)[0].to(q.dtype)

    def attend_reference(self, q, k, v, mask):  # noqa: ANN001, ANN201
        return softmax_attention_reference(q, k, v)


@pytest.fixture
def bidirectional():
    name = "planted_bidirectional_recall"
    register(name=name, paper=Paper(None, "planted", 2024), family="A", cost="O(N²d)", exponent=2.0,
             supports=Supports(causal=False))(_Bidirectional)
    yield name
    remove(name)


def test_a_mechanism_without_causal_mode_is_unsupported(store: ResultStore, bidirectional: str) -> None:
    config = tiny(bidirectional)
    [row] = recall.run_recall(store, [config], quiet=True)
    assert row["status"] == "unsupported" and "causal" in row["metrics"]["note"]
    assert row["metrics"]["accuracy"] is None
    assert store.done("recall", config)


def test_resume_skips_a_finished_configuration(store: ResultStore, monkeypatch: pytest.MonkeyPatch) -> None:
    done, todo = tiny(max_epochs=1), tiny(max_epochs=1, seed=1)
    first = recall.run_recall(store, [done], quiet=True)
    trained = []
    real = recall.train_recall

    def spy(config, **kw):  # noqa: ANN001, ANN202
        trained.append(config)
        return real(config, **kw)

    monkeypatch.setattr(recall, "train_recall", spy)
    rows = recall.run_recall(store, [done, todo], quiet=True)
    assert trained == [todo], "only the configuration without a result is trained"
    assert rows[0] == first[0] and [r["config"] for r in rows] == [done, todo]
    assert store.count("recall") == 2


def test_time_budget_stops_training_with_a_note() -> None:
    status, m = recall.train_recall(tiny(max_epochs=50, train_examples=640), time_budget_s=1e-9, quiet=True)
    assert status == "ok" and m["epochs"] == 1 and "time budget" in m["note"] and not m["converged"]
    assert m["stopped"] == "time cap" and m["steps"] == 1 and m["step_budget"] == 50 * 10
    # the configuration's own cap is the default, and part of the configuration
    status, m = recall.train_recall(tiny(max_epochs=50, train_examples=640, cell_seconds=1e-9), quiet=True)
    assert m["stopped"] == "time cap" and m["steps"] == 1
    assert config_hash(tiny(cell_seconds=60.0)) != config_hash(tiny(cell_seconds=None))


def test_cosine_schedule_with_warmup() -> None:
    total, warmup = 100, 10
    f = [recall.cosine_with_warmup(s, total, warmup) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.5)  # half-way through the decay
    assert f[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert recall.cosine_with_warmup(100, total, warmup) == pytest.approx(0.0)


def test_default_grid_skips_cells_with_too_many_pairs() -> None:
    configs = recall.grid_configs(recall.GRIDS["default"], ["softmax"])
    cells = {(c["seq_len"], c["num_kv_pairs"]) for c in configs}
    expected = {(64, 4), (64, 8), (64, 16), (128, 4), (128, 8), (128, 16), (128, 32),
                (256, 4), (256, 8), (256, 16), (256, 32)}  # 4·kv <= L
    assert cells == expected
    assert {c["d_model"] for c in configs} == {64, 128} and len(configs) == 22
    assert all(c["vocab_size"] > c["seq_len"] for c in configs)


def test_zoology_grid_is_figure_2() -> None:
    configs = recall.grid_configs(recall.GRIDS["zoology"], ["softmax"])
    assert {(c["seq_len"], c["num_kv_pairs"]) for c in configs} == {(64, 4), (128, 8), (256, 16), (512, 64)}
    assert {c["d_model"] for c in configs} == {64, 128, 256, 512}
    np.testing.assert_allclose(sorted({c["lr"] for c in configs}), np.logspace(-4, -2, 4), rtol=1e-5)
    assert {c["vocab_size"] for c in configs} == {8192}
    assert {(c["train_examples"], c["test_examples"], c["max_epochs"], c["layers"]) for c in configs} == {(100_000, 3_000, 64, 2)}
    assert {c["seq_len"]: recall.batch_size(c) for c in configs} == {64: 512, 128: 512, 256: 256, 512: 128}


def test_panel_gives_every_causal_mechanism_the_same_budget_softmax_first() -> None:
    configs = recall.panel_configs()
    assert [c["mechanism"] for c in configs[:3]] == ["softmax", "sliding-window", "linear"]
    assert {c["mechanism"] for c in configs} == set(CAUSAL)
    budgets = {(c["seq_len"], c["num_kv_pairs"], c["d_model"], c["max_epochs"], c["train_examples"], c["cell_seconds"],
                c["lr"], c["seed"]) for c in configs}
    assert len(budgets) == 1, budgets
    assert "steps" in recall.budget_text(configs[0])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="num_kv_pairs=8.*seq_len=16"):
        tiny(num_kv_pairs=8)
    with pytest.raises(ValueError, match="d_model"):
        tiny(d_model=0)
    with pytest.raises(ValueError, match="lr"):
        tiny(lr=0.0)


def command(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    recall.add_recall_arguments(parser)
    return parser.parse_args(argv)


def test_command_trains_and_prints_json(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                        bidirectional: str) -> None:
    small = replace(recall.GRIDS["default"], train_examples=64, test_examples=16, max_epochs=1)
    monkeypatch.setitem(recall.GRIDS, "default", small)
    db = tmp_path / "r.sqlite"
    args = command(["--mechanisms", f"softmax,{bidirectional}", "--seq-lens", "16", "--kv", "2,8", "--d-models", "32",
                    "--vocab", "64", "--json", "-", "--db", str(db), "--quiet"])
    assert recall.run_recall_command(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["config"]["mechanism"], r["status"]) for r in rows] == [("softmax", "ok"), (bidirectional, "unsupported")]
    assert all(r["config"]["num_kv_pairs"] == 2 for r in rows), "kv=8 > 16/4 is skipped"
    assert ResultStore(db).count("recall") == 2
    # again: nothing is trained, the same results come back, as a table this time
    monkeypatch.setattr(recall, "train_recall", lambda *a, **k: pytest.fail("trained a finished configuration"))
    args = command(["--mechanisms", f"softmax,{bidirectional}", "--seq-lens", "16", "--kv", "2", "--d-models", "32",
                    "--vocab", "64", "--db", str(db), "--quiet"])
    assert recall.run_recall_command(args) == 0
    table = capsys.readouterr().out
    assert "softmax" in table and "unsupported" in table


def test_command_refuses_an_invalid_setting(tmp_path) -> None:
    args = command(["--mechanisms", "softmax", "--seq-lens", "64", "--kv", "4", "--vocab", "64",
                    "--db", str(tmp_path / "r.sqlite"), "--quiet"])
    with pytest.raises(ValueError, match="vocab_size"):
        recall.run_recall_command(args)


def test_after_the_deadline_nothing_starts_but_unsupported_cells_are_recorded(store: ResultStore,
                                                                               bidirectional: str) -> None:
    trainable, refused = tiny(), tiny(bidirectional)
    rows = recall.run_recall(store, [trainable, refused], total_seconds=1e-9, quiet=True)
    assert [(r["config"]["mechanism"], r["status"]) for r in rows] == [(bidirectional, "unsupported")]
    assert not store.done("recall", trainable), "the next run trains it"


def test_rerun_replaces_a_result_only_when_the_new_one_is_recorded(store: ResultStore,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny(max_epochs=1)
    [first] = recall.run_recall(store, [config], quiet=True)

    def interrupted(config, **kw):  # noqa: ANN001, ANN202
        assert store.done("recall", config), "the old result is there while the new one trains"
        raise KeyboardInterrupt

    monkeypatch.setattr(recall, "train_recall", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recall.run_recall(store, [config], quiet=True, rerun=True)
    [kept] = store.results("recall")
    assert kept.metrics == first["metrics"]
    monkeypatch.setattr(recall, "train_recall", lambda config, **kw: ("ok", {**first["metrics"], "accuracy": 0.5}))
    [again] = recall.run_recall(store, [config], quiet=True, rerun=True)
    assert again["metrics"]["accuracy"] == 0.5 and store.count("recall") == 1


def test_pool_processes_train_the_same_results(tmp_path) -> None:
    configs = [tiny(max_epochs=1), tiny(max_epochs=1, seed=1), tiny(max_epochs=1, seed=2)]
    alone = recall.run_recall(ResultStore(tmp_path / "a.sqlite"), configs, quiet=True)
    pooled = recall.run_recall(ResultStore(tmp_path / "b.sqlite"), configs, quiet=True, workers=2)
    assert [r["config"] for r in pooled] == configs  # in the order asked, whatever finished first
    assert [r["metrics"]["history"] for r in pooled] == [r["metrics"]["history"] for r in alone]
    assert {r.env["recall_workers"] for r in ResultStore(tmp_path / "b.sqlite").results()} == {2}


def test_the_deadline_waits_for_the_minimum_count(store: ResultStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recall, "train_recall", lambda config, **kw: ("ok", {**recall.empty_metrics("spy"),
                                                                              "accuracy": 0.5}))
    configs = [tiny(seed=s) for s in range(4)]
    rows = recall.run_recall(store, configs, total_seconds=1e-9, quiet=True, at_least=2)
    assert [r["config"]["seed"] for r in rows] == [0, 1]  # two started past the deadline, then nothing
    rows = recall.run_recall(store, configs, total_seconds=1e-9, quiet=True, at_least=2)
    assert len(rows) == 2, "the two stored count: nothing more starts"
