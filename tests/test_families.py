"""Model families (dbcache_compile/families/, one record per file) on the tiny random-weight pipelines of the real
diffusers classes (tests/families/, one file per family): our cache takes the same decisions as cache-dit 1.5.3 per
cache chain (a family with two block lists makes two independent decisions per step, as cache-dit's two contexts
do), per CFG branch, and per transformer (Wan 2.2's transformer_2 counts its own steps); a forward input the cache
does not implement is refused by name; and the registry, the tiny pipelines, the graph records and the README table
cover each other. The compiled lowerings (regional, segments) of every family take these eager decisions:
tests/test_compiled.py."""

from pathlib import Path

import pytest
import torch

import dbcache_compile as dbc
from cachedit_oracle import cache_dit_contexts
from tests.families import CASES, CFG_COUNT, FAMILY_CASES, PARITY, check_layout, first_transformer_call

STEPS = 8


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


@pytest.mark.parametrize("case", list(PARITY))
def test_family_takes_cache_dits_decisions(case):
    """A user switching from cache-dit 1.5.3 gets the same cached steps per block list, CFG branch and transformer
    on every supported family with a tiny pipeline (HiDream included: its forward's per-block Llama-3 glue runs on
    hits too)."""
    case = PARITY[case]
    config = _config(case.threshold)
    pipe = case.builder()  # ours, then cache-dit on the same pipeline (disable() leaves it as it was)
    ours, summary, _ = _ours(pipe, case.inputs(), config)
    theirs = cache_dit_contexts(pipe, dbc.DBCacheConfig.from_string(config), num_inference_steps=STEPS,
                                generator=torch.Generator().manual_seed(0), **case.inputs())
    assert any(c["cached"] or c["cfg_cached"] for c in theirs), "the threshold must make cache-dit cache something"
    assert len(ours) == len(theirs)
    for mine, cd in zip(ours, theirs):
        assert mine["list"] in ("", cd["list"]), (mine["list"], cd["list"])
        assert mine["cached"] == cd["cached"], (cd["list"], mine, cd)
        assert mine["cfg_cached"] == cd["cfg_cached"], (cd["list"], mine, cd)
    assert summary.num_steps > 0


def _cache_dit_told(pipe, config: str, separate_cfg: bool, **call_kwargs) -> list[dict]:
    """cache-dit 1.5.3 with ``enable_separate_cfg`` set to the pipeline's real call pattern (instead of its default
    from the adapter / pipeline name): per cache context, in creation order."""
    import cache_dit

    cfg = dbc.DBCacheConfig.from_string(config)
    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
        Fn_compute_blocks=cfg.Fn_compute_blocks, Bn_compute_blocks=cfg.Bn_compute_blocks,
        residual_diff_threshold=cfg.residual_diff_threshold, max_warmup_steps=cfg.max_warmup_steps,
        max_continuous_cached_steps=cfg.max_continuous_cached_steps, enable_separate_cfg=separate_cfg))
    try:
        pipe(**call_kwargs)
        return [{"list": name.rsplit("_", 1)[0], "cached": list(ctx.cached_steps),
                 "cfg_cached": list(ctx.cfg_cached_steps or [])}
                for name, ctx in pipe._context_manager._cached_context_manager.items()]
    finally:
        cache_dit.disable_cache(pipe)


@pytest.mark.parametrize("case", list(CFG_COUNT))
def test_where_cache_dit_miscounts_cfg_calls_we_take_its_decisions_on_the_real_calls(case):
    """Where cache-dit 1.5.3's CFG counting is wrong (Wan / Qwen-Image-Edit / HunyuanVideo 1.5 / distilled
    HunyuanImage without CFG: one call per step read as cond+uncond pairs; HunyuanVideo true CFG and FLUX.2 [klein]
    base: two calls per step read as two steps), we do not copy its mistake: our cached steps per block list and
    branch are the ones cache-dit itself takes when told the real call pattern (enable_separate_cfg), i.e. each branch
    compares its residual with the same branch's previous step. README 'Models' names these cases."""
    case = CFG_COUNT[case]
    config, separate = _config(case.threshold), case.separate_cfg
    pipe = case.builder()
    ours, summary, _ = _ours(pipe, case.inputs(), config)
    theirs = _cache_dit_told(pipe, config, separate, num_inference_steps=STEPS,
                             generator=torch.Generator().manual_seed(0), **case.inputs())
    assert any(c["cached"] or c["cfg_cached"] for c in theirs), "the threshold must make cache-dit cache something"
    assert summary.separate_cfg == separate and summary.num_steps == STEPS
    assert [(c["cached"], c["cfg_cached"]) for c in ours] == [(c["cached"], c["cfg_cached"]) for c in theirs], \
        (ours, theirs)


def test_hidream_refuses_compiled_lowerings_and_caches_exactly_on_identical_inputs():
    """HiDream (eager only): a compiled lowering is refused at optimize time with the reason, leaving the pipeline
    untouched; and a hit on a call with the same inputs as the previous compute step reproduces the uncached output
    exactly (the per-block Llama-3 concatenation and slicing the forward does between the skipped blocks is neither
    lost nor applied twice)."""
    pipe = CASES["hidream"].builder()
    with pytest.raises(ValueError, match=r"\(hidream\) cannot run graph='regional'.*moe_infer.*mode=None"):
        dbc.optimize(pipe, cache=_config(0.35), mode="default", graph="regional")
    with pytest.raises(ValueError, match="not optimized"):
        dbc.runtime_of(pipe)
    transformer = pipe.transformer
    g = torch.Generator().manual_seed(5)
    kwargs = dict(hidden_states=torch.randn(2, 4, 16, 16, generator=g), timesteps=torch.tensor([500.0, 500.0]),
                  encoder_hidden_states_t5=torch.randn(2, 8, 16, generator=g),
                  encoder_hidden_states_llama3=torch.randn(2, 2, 8, 16, generator=g),
                  pooled_embeds=torch.randn(2, 16, generator=g), return_dict=False)
    with torch.no_grad():
        reference = transformer(**kwargs)[0]
        dbc.optimize(transformer, cache="F1B0_W2M0MC2_T0O1_R1.0")  # every step after the warm-up is a hit
        try:
            outs = [transformer(**kwargs)[0] for _ in range(3)]
            summary = dbc.summary(transformer)
        finally:
            dbc.disable(transformer)
    assert summary.chains["double_stream_blocks"]["cached_steps"] == [2]
    assert summary.chains["single_stream_blocks"]["cached_steps"] == [2]
    for out in outs:
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_wan22_second_transformer_counts_its_own_steps():
    """Wan 2.2 A14B switches from transformer to transformer_2 at the boundary step: each has its own state and its
    own step count, so warm-up starts again after the switch and no stale residual of the first is read."""
    _, summary, _ = _ours(CASES["wan22"].builder(), CASES["wan22"].inputs(), _config(0.05))
    second = summary.transformers["transformer_2"]
    assert summary.num_steps + second.num_steps == STEPS
    assert second.cached_steps and min(second.cached_steps) >= 2  # its own warm-up (W2) after the switch


def test_unsupported_inputs_are_refused_by_name():
    """SD3's skip-layer guidance input (block indices to skip) is refused by name, not silently mixed with the
    cache's own skipping."""
    pipe = CASES["sd35"].builder()
    dbc.optimize(pipe, cache=_config(0.2))
    try:
        kwargs = dict(hidden_states=torch.randn(1, 4, 16, 16), encoder_hidden_states=torch.randn(1, 8, 32),
                      pooled_projections=torch.randn(1, 64), timestep=torch.tensor([500.0]), skip_layers=[1])
        with pytest.raises(NotImplementedError, match="skip_layers"):
            pipe.transformer(**kwargs)
    finally:
        dbc.disable(pipe)




def _residuals(transformer, hidden: torch.Tensor, count: int) -> list:
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return [torch.full((hidden.shape[0], hidden.shape[1], width), 0.1) for _ in range(count)]


@pytest.mark.parametrize("case, argument", [("chroma", "controlnet_block_samples"),
                                            ("chroma", "controlnet_single_block_samples"),
                                            ("bria", "controlnet_block_samples")])
def test_controlnet_residuals_are_refused_by_name_on_hook_driven_families(case, argument):
    """Chroma's and Bria's transformers take ControlNet residuals, but no ControlNet of diffusers 0.42.1 produces them
    (SD3's, Sana's and Z-Image's run with the cache: tests/test_index_added.py): a clear error naming the argument and
    that reason with the cache on; the same call runs with the cache off."""
    pipe = CASES[case].builder()
    kwargs = first_transformer_call(pipe, CASES[case].inputs())
    hidden = kwargs["hidden_states"]
    tokens = hidden if hidden.ndim == 3 else hidden.flatten(2).transpose(1, 2)[:, ::4]  # SD3: 2x2 patches
    kwargs[argument] = _residuals(pipe.transformer, tokens, 2)
    with torch.no_grad():
        pipe.transformer(**kwargs)  # a valid call without the cache
    dbc.optimize(pipe, cache=_config(0.2))
    try:
        with pytest.raises(NotImplementedError, match=f"`{argument}` .*no ControlNet model or pipeline of "
                                                      f"diffusers 0.42.1 produces them"), torch.no_grad():
            pipe.transformer(**kwargs)
    finally:
        dbc.disable(pipe)


@pytest.mark.parametrize("case, argument, value, match", [
    ("flux2", "kv_cache_mode", "extract", "`kv_cache_mode` .*the i-th cached K/V"),
    ("sana", "attention_kwargs", {"ip_adapter_image_embeds": [torch.zeros(1, 1, 16)]},
     "ip_adapter_image_embeds` .*on SD3, Chroma and FLUX.1"),
])
def test_kv_cache_and_ip_adapter_inputs_are_refused_by_name(case, argument, value, match):
    """FLUX.2's KV-cache mode (block i reads the i-th cached K/V) and IP-Adapter image embeddings on a transformer
    whose diffusers forward has no IP-Adapter path (Sana) are refused by name on a real call of the family's
    transformer. (SD3's and Chroma's run with the cache: tests/test_ip_adapter.py.)"""
    pipe = CASES[case].builder()
    kwargs = first_transformer_call(pipe, CASES[case].inputs())
    kwargs[argument] = value
    dbc.optimize(pipe, cache=_config(0.2))
    try:
        with pytest.raises(NotImplementedError, match=match), torch.no_grad():
            pipe.transformer(**kwargs)
    finally:
        dbc.disable(pipe)


def test_unsupported_family_error_lists_the_families_and_how_to_add_one():
    """optimize() on a model of no supported family (HunyuanDiT: its blocks are in no family and not in diffusers'
    registry) says so, lists every supported family with its transformer class, and points at the README's
    'Adding a model family'."""
    from diffusers import HunyuanDiT2DModel

    model = HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, sample_size=16, patch_size=2,
                              num_layers=2, cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=8,
                              text_len=4, text_len_t5=4)
    with pytest.raises(ValueError) as error:
        dbc.optimize(model, cache=_config(0.2))
    message = str(error.value)
    assert "does not support HunyuanDiT2DModel" in message
    for row in dbc.supported_models():
        assert f"{row['family']} ({row['transformer']})" in message
    assert "README 'Models' > 'Adding a model family'" in message
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "**Adding a model family.**" in readme.split("### Models")[1].split("\n## ")[0]


@pytest.mark.parametrize("case", ["hunyuan_video", "hunyuan_image"])
def test_block_ratio_counts_every_block_list(case):
    """summary().block_ratio with two block lists deciding on their own (and, for HunyuanImage, two CFG branches):
    equal to uncached blocks / executed blocks counted independently (a hook on each block's attention, which runs
    only when the block does), and the printed summary shows each list's own cached steps."""
    case = CASES[case]
    pipe = case.builder()
    transformer = pipe.transformer
    blocks = [block for name in ("transformer_blocks", "single_transformer_blocks")
              for block in getattr(transformer, name)]
    executed, calls = [], []
    handles = [block.attn.register_forward_hook(lambda *_: executed.append(1)) for block in blocks]
    handles.append(transformer.register_forward_hook(lambda *_: calls.append(1)))
    try:
        _, summary, _ = _ours(pipe, case.inputs(), _config(case.threshold))
    finally:
        for handle in handles:
            handle.remove()
    assert summary.block_ratio == pytest.approx(len(calls) * len(blocks) / len(executed))
    assert summary.block_ratio > 1
    text = str(summary)
    for name, chain in summary.chains.items():
        assert chain["num_blocks"] == len(getattr(transformer, name))
        line = "; ".join(f"{branch} cached {len(steps)} {steps}" for branch, steps in chain["branches"].items())
        assert f"    {name} ({chain['num_blocks']} blocks): {line}" in text
    assert "block lists, each with its own cache decision" in text and "\n  steps: 8, cached:" not in text


def test_supported_models_lists_the_families_and_their_lowerings():
    """supported_models() tells users which lowerings each family takes: every family segments and regional but
    Chroma (its groups cannot run whole: regional block by block) and HiDream (eager only); cond needs a prologue
    (FLUX.1, Qwen-Image)."""
    table = {row["family"]: row for row in dbc.supported_models()}
    assert [f for f, row in table.items() if row["prologue"]] == ["flux", "qwen-image"]
    compiled = {"eager", "segments", "regional"}
    special = {"flux": compiled | {"cond"}, "qwen-image": compiled | {"cond"}, "chroma": {"eager", "regional"},
               "wan-vace": {"eager", "regional"}, "wan-animate": {"eager", "regional"}, "hidream": {"eager"}}
    for family, row in table.items():
        assert set(row["lowerings"]) == special.get(family, compiled), family
        assert row["lowerings"][0] == "eager" and row["tested"], family
    assert table["hunyuan-video"]["chains"] == ["transformer_blocks", "single_transformer_blocks"]


def test_tiny_pipelines_are_collected_one_file_per_registered_family():
    """tests/families/ has exactly one file per family file of dbcache_compile/families/ (same module name), each
    naming its registered family: a family added without its tiny pipeline, or a file for no family, stops the suite
    at collection with the file to add or remove."""
    from dbcache_compile.families import families

    assert list(FAMILY_CASES) == [f.name for f in families()]
    check_layout({"wan": "wan"}, {"wan"})
    with pytest.raises(ImportError, match=r"without a test file.*kling \(dbcache_compile/families/kling.py: add "
                                          r"tests/families/kling.py\)"):
        check_layout({"wan": "wan", "kling": "kling"}, {"wan"})
    with pytest.raises(ImportError, match=r"name no registered family.*: kling.py"):
        check_layout({"wan": "wan"}, {"wan", "kling"})


def test_every_family_has_a_tiny_pipeline_a_parity_test_and_graph_records():
    """The registry, the tiny pipelines and the golden graph records cover each other: each case's pipeline is one
    its family lists (so the README's pipelines column is what the tests run) and its transformers belong to that
    family; each family marked tested has a case in the parity tests (Bria: its own test below, cache-dit crashes on
    it); each (family, compiled lowering other than cond) has a graph record (FLUX.1 / Qwen-Image: also their
    Inductor scenario records); and graphs/ holds no family record the suite does not check."""
    from dbcache_compile.families import families, family_for
    from dbcache_compile.lowerings import lowerings_for
    from tools.graph_records import FAMILY_LOWERINGS, LOWERINGS, RECORD_DIR, SCENARIO_CASES, family_records

    for name, case in CASES.items():
        pipe = case.builder()
        family = family_for(pipe.transformer)
        assert family.name == case.family, (name, family.name)
        assert type(pipe).__name__ in family.pipelines, (name, type(pipe).__name__, family.pipelines)
        second = getattr(pipe, "transformer_2", None)
        assert second is None or family_for(second).name == case.family
    # Bria: cache-dit crashes on it; Wan Animate: cache-dit refuses it (tests/test_index_added.py checks both
    # against the uncached pipeline)
    tested = {CASES[name].family for name in [*PARITY, *CFG_COUNT]} | {"bria", "wan-animate"}
    assert tested == {f.name for f in families() if f.tested}
    recorded = {(CASES[case].family, lowering) for case, lowering in family_records()}
    recorded |= {(CASES[case].family, lowering) for case in SCENARIO_CASES.values() for lowering in LOWERINGS}
    for family in families():
        for lowering in set(FAMILY_LOWERINGS) & set(lowerings_for(family)):
            assert (family.name, lowering) in recorded, (family.name, lowering)
    files = {p.name for p in RECORD_DIR.glob("family-*.json")}
    assert files == {f"family-{case}-{lowering}.json" for case, lowering in family_records()}


def test_bria_where_cache_dit_crashes_caches_and_never_caching_is_exact():
    """cache-dit 1.5.3 crashes on Bria (it reads the block outputs hidden-first; they are (encoder, hidden)): the
    family's own contract makes our cache run, cache steps, and equal the plain model when it never caches."""
    bria = CASES["bria"]
    pipe = bria.builder()
    plain = pipe(**bria.inputs(), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images
    _, summary, _ = _ours(pipe, bria.inputs(), "F1B0_W2M0MC2_T0O1_R0.9")
    assert any(chain["cached_steps"] for chain in summary.chains.values())
    _, never, images = _ours(pipe, bria.inputs(), "F1B0_W0_R0")
    assert not never.cached_steps and torch.equal(images.images, plain)


def test_readme_model_table_is_supported_models():
    """The README's model table is generated from supported_models() (`python tools/models_table.py --update`): a
    family added or changed in the registry is in the README."""
    from tools.models_table import README, readme_table, table

    assert readme_table(README.read_text()) == table(), "run `python tools/models_table.py --update`"
    rows = [line for line in table().splitlines()[2:]]
    assert [row.split("|")[1].strip() for row in rows] == [r["family"] for r in dbc.supported_models()]
