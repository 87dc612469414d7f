"""Model families through the generic adapter (dbcache_compile.generic, dbcache_compile.families): on tiny
random-weight pipelines of the real diffusers classes (dbcache_compile.testing_families), our cache takes the same
decisions as cache-dit 1.5.3 per cache chain (a family with two block lists makes two independent decisions per
step, as cache-dit's two contexts do), per CFG branch, and per transformer (Wan 2.2's transformer_2 counts its own
steps); compiled (regional) without graph breaks or recompiles; and a forward input the cache does not implement is
refused by name."""

import pytest
import torch

import dbcache_compile as dbc
import dbcache_compile.testing_families as tf
from cachedit_oracle import cache_dit_contexts

STEPS = 8
# family -> (builder, inputs, threshold that makes cache-dit cache on the tiny model: docs/families.md section 5.1)
CASES = {name: (*tf.FAMILIES[name], threshold) for name, threshold in tf.THRESHOLDS.items()}


def _config(threshold: float) -> str:
    return f"F1B0_W2M0MC2_T0O1_R{threshold}"


def _ours(pipe, inputs: dict, config: str, **optimize_kwargs) -> list[dict]:
    """Our decisions per chain (per transformer for Wan 2.2), in cache-dit's context order."""
    dbc.optimize(pipe, cache=config, **optimize_kwargs)
    try:
        images = pipe(**inputs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
        summary = dbc.summary(pipe)
    finally:
        dbc.disable(pipe)
    contexts = []
    for s in [summary, *summary.transformers.values()]:
        chains = s.chains or {"": {"cached_steps": s.cached_steps, "cfg_cached_steps": s.cfg_cached_steps}}
        for name, chain in chains.items():
            contexts.append({"list": name, "cached": chain["cached_steps"], "cfg_cached": chain["cfg_cached_steps"]})
    return contexts, summary, images


@pytest.mark.parametrize("family", list(CASES))
def test_family_takes_cache_dits_decisions(family):
    builder, make_inputs, threshold = CASES[family]
    config = _config(threshold)
    ours, summary, _ = _ours(builder(), make_inputs(), config)
    theirs = cache_dit_contexts(builder(), dbc.DBCacheConfig.from_string(config), num_inference_steps=STEPS,
                                generator=torch.Generator().manual_seed(0), **make_inputs())
    assert any(c["cached"] or c["cfg_cached"] for c in theirs), "the threshold must make cache-dit cache something"
    assert len(ours) == len(theirs)
    for mine, cd in zip(ours, theirs):
        assert mine["list"] in ("", cd["list"]), (mine["list"], cd["list"])
        assert mine["cached"] == cd["cached"], (family, cd["list"], mine, cd)
        assert mine["cfg_cached"] == cd["cfg_cached"], (family, cd["list"], mine, cd)
    assert summary.num_steps > 0


def test_wan22_second_transformer_counts_its_own_steps():
    """Wan 2.2 A14B switches from transformer to transformer_2 at the boundary step: each has its own state and its
    own step count, so warm-up starts again after the switch and no stale residual of the first is read."""
    _, summary, _ = _ours(tf.tiny_wan22_pipeline(), tf.wan_inputs(), _config(0.05))
    second = summary.transformers["transformer_2"]
    assert summary.num_steps + second.num_steps == STEPS
    assert second.cached_steps and min(second.cached_steps) >= 2  # its own warm-up (W2) after the switch


@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "sd35", "flux2"])
def test_family_compiles_regionally_without_breaks_or_recompiles(family):
    from torch._dynamo.utils import counters

    builder, make_inputs, threshold = CASES[family]
    pipe = builder()
    eager, eager_summary, eager_images = _ours(pipe, make_inputs(), _config(threshold))
    torch._dynamo.reset()
    counters.clear()
    dbc.optimize(pipe, cache=_config(threshold), mode="default", graph="regional", compile_options={"backend": "eager"})
    try:
        first = pipe(**make_inputs(), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
        with torch.compiler.set_stance("fail_on_recompile"):
            pipe(**make_inputs(), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
        summary = dbc.summary(pipe)
    finally:
        dbc.disable(pipe)
    assert summary.lowering == "regional" and sum(counters["graph_break"].values()) == 0
    assert summary.cached_steps == eager_summary.cached_steps
    for name, chain in eager_summary.chains.items():
        assert summary.chains[name]["cached_steps"] == chain["cached_steps"]
        assert summary.chains[name]["residual_diffs"] == pytest.approx(chain["residual_diffs"], rel=1e-5)
    out, ref = (getattr(first, "frames", None), getattr(eager_images, "frames", None))
    if out is None:
        out, ref = first.images, eager_images.images
    torch.testing.assert_close(torch.as_tensor(out), torch.as_tensor(ref), rtol=1e-4, atol=1e-4)


def test_unsupported_inputs_are_refused_by_name():
    pipe = tf.tiny_sd35_pipeline()
    dbc.optimize(pipe, cache=_config(0.2))
    try:
        kwargs = dict(hidden_states=torch.randn(1, 4, 16, 16), encoder_hidden_states=torch.randn(1, 8, 32),
                      pooled_projections=torch.randn(1, 64), timestep=torch.tensor([500.0]), skip_layers=[1])
        with pytest.raises(NotImplementedError, match="skip_layers"):
            pipe.transformer(**kwargs)
    finally:
        dbc.disable(pipe)


def test_supported_models_lists_the_families_and_their_lowerings():
    table = {row["family"]: row for row in dbc.supported_models()}
    assert table["flux"]["lowerings"] == ["eager", "segments", "regional", "cond"]
    assert table["wan"]["lowerings"] == ["eager", "regional"] and table["wan"]["tested"]
    assert table["hunyuan-video"]["chains"] == ["transformer_blocks", "single_transformer_blocks"]


def test_bria_where_cache_dit_crashes_caches_and_never_caching_is_exact():
    """cache-dit 1.5.3 crashes on Bria (it reads the block outputs hidden-first; they are (encoder, hidden)): the
    family's own contract makes our cache run, cache steps, and equal the plain model when it never caches."""
    pipe = tf.tiny_bria_pipeline()
    plain = pipe(**tf.bria_inputs(), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images
    _, summary, _ = _ours(pipe, tf.bria_inputs(), "F1B0_W2M0MC2_T0O1_R0.9")
    assert any(chain["cached_steps"] for chain in summary.chains.values())
    _, never, images = _ours(pipe, tf.bria_inputs(), "F1B0_W0_R0")
    assert not never.cached_steps and torch.equal(images.images, plain)


def test_readme_model_table_is_supported_models():
    """The README's model table is generated from supported_models(): a family added or changed in one is in the
    other."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("<!-- supported_models table: generated from dbcache_compile.supported_models() -->\n")[1]
    rows = [line for line in table.split("<!-- end of table -->")[0].splitlines() if line.startswith("| ")][1:]
    families = [row.split("|")[1].strip() for row in rows]
    assert families == [r["family"] for r in dbc.supported_models()]
    for row, model in zip(rows, dbc.supported_models()):
        assert f"`{model['transformer']}`" in row and ("yes" if model["tested"] else "no") in row.split("|")[-2]
