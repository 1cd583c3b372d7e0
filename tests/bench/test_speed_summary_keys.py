"""The speed harness times mechanisms whose keys are summaries on the keys they really attend to."""
import functools

import pytest

import attnlab
from attnlab.bench import speed
from attnlab.mechanisms.local.aggregated import AggregatedAttention
from attnlab.mechanisms.local.twins import TwinsGlobalAttention

OPTIONS = speed.SpeedOptions(lengths=(256, 512), modes=("fwd",), heads=2, head_dim=8, threads=1)


def _config(name: str, n: int) -> dict:
    return next(c for c in speed.make_configs([attnlab.get(name)], OPTIONS) if c["n"] == n)


def _record_attend(monkeypatch, cls) -> list:  # type: ignore[no-untyped-def]
    """Patch cls.attend to note the shapes of q, k, v it is called with."""
    seen = []
    original = cls.attend

    @functools.wraps(original)
    def attend(self, q, k, v, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), kwargs.get("grid")))
        return original(self, q, k, v, **kwargs)

    monkeypatch.setattr(cls, "attend", attend)
    return seen


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_twins_gsa_attends_to_n_over_s2_summaries(monkeypatch, mode) -> None:  # type: ignore[no-untyped-def]
    seen = _record_attend(monkeypatch, TwinsGlobalAttention)
    config = {**_config("twins-gsa", 256), "mode": mode}
    # 16 × 16 tokens, s = 2: one summary per 2 × 2 cell, 8 × 8 = 64 keys (not 256: no N × N softmax)
    assert config["grid"] == [16, 16] and config["n_keys"] == 64
    speed.prepare_call(attnlab.get("twins-gsa"), config)()
    assert seen == [((1, 2, 256, 8), (1, 2, 64, 8), (1, 2, 64, 8), (16, 16))]  # flat queries with their grid


def test_aggregated_attends_to_its_tokens_and_p2_pooled_keys(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seen = _record_attend(monkeypatch, AggregatedAttention)
    config = _config("aggregated", 256)
    assert config["n_keys"] == 256 + 7 * 7  # the tokens (window keys) and the 7 × 7 pooled keys
    speed.prepare_call(attnlab.get("aggregated"), config)()
    assert seen == [((1, 2, 256, 8), (1, 2, 305, 8), (1, 2, 305, 8), (16, 16))]


def test_n_keys_only_for_summary_keys_and_a_refused_grid_is_unsupported() -> None:
    assert "n_keys" not in _config("softmax", 256)
    config = _config("twins-gsa", 529)  # 23 × 23 is no multiple of s = 2: the module refuses it
    assert config["grid"] == [23, 23] and config["n_keys"] is None
    status, metrics = speed.measure_config(config, budget_s=1.0, repeats=1)
    assert status == "unsupported" and "sr_ratio=2" in metrics["note"]


def test_a_config_whose_n_keys_disagrees_with_the_module_is_an_error() -> None:
    config = {**_config("twins-gsa", 256), "n_keys": 256}
    with pytest.raises(ValueError, match="n_keys 256.*64 keys"):
        speed.prepare_call(attnlab.get("twins-gsa"), config)
