"""The runtime attached the diffusers way (dbcache_compile.runtime): a hook in the transformer's HookRegistry, one
cache state per cache context the pipeline enters, generations that start clean, and an optimized transformer that
still behaves like a diffusers model (hooks, dtype moves, gradient checkpointing, LoRA scale, other caches)."""

import pytest
import torch
from diffusers import FluxPipeline

import dbcache_compile as dbc
from cachedit_oracle import run_cache_dit
from conftest import generator
from dbcache_compile.testing import flux_inputs, qwen_inputs, tiny_flux_pipeline, tiny_qwen_pipeline

CONFIG = "F1B0_W2M0MC2_T0O1_R0.4"
NEVER = "F1B0_W0_R0"  # threshold 0: never caches, every block runs


def run(pipe, steps=8, seed=0, **overrides):
    return pipe(**dict(flux_inputs(), **overrides), num_inference_steps=steps, generator=generator(seed)).images


def true_cfg_inputs():
    """FluxPipeline with a negative prompt and true_cfg_scale > 1 calls the transformer twice per step, in the
    "cond" and "uncond" cache contexts."""
    negative = flux_inputs(seed=7)
    return dict(flux_inputs(), negative_prompt_embeds=negative["prompt_embeds"],
                negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"], true_cfg_scale=4.0)


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


def test_the_pipeline_keeps_its_class_and_the_hook_is_in_the_registry(flux, tmp_path):
    """optimize() keeps the pipeline's class and hooks into the transformer's HookRegistry, so a from_pipe()
    pipeline shares the cache and save_pretrained() still works."""
    dbc.optimize(flux, cache=CONFIG)
    try:
        assert type(flux) is FluxPipeline
        assert "dbcache_compile" in flux.transformer._diffusers_hook.hooks
        shared = FluxPipeline.from_pipe(flux)  # a second pipeline around the same optimized transformer
        run(shared)
        assert dbc.summary(flux).cached_steps
    finally:
        dbc.disable(flux)
    flux.transformer.save_pretrained(tmp_path / "t")
    assert (tmp_path / "t" / "config.json").is_file()


def test_flux_true_cfg_runs_one_state_per_cache_context_like_cache_dit(flux):
    """FLUX true CFG used to share one state between the two calls of a step (20 'steps' for 10, a wrong image):
    the branch is now the cache context the pipeline entered, and decisions and images match cache-dit run with
    separate CFG."""
    kwargs = dict(true_cfg_inputs(), num_inference_steps=10)
    dbc.optimize(flux, cache="F1B0_W2M0MC2_T0O1_R0.45")
    try:
        ours = flux(**kwargs, generator=generator()).images
        summary = dbc.summary(flux)
    finally:
        dbc.disable(flux)
    assert summary.separate_cfg and summary.num_steps == 10 and list(summary.branches) == ["cond", "uncond"]
    assert summary.cached_steps and summary.cfg_cached_steps
    images, cached, cfg_cached, diffs = run_cache_dit(flux, dbc.DBCacheConfig.from_string("F1B0_W2M0MC2_T0O1_R0.45"),
                                                      True, generator=generator(), **kwargs)
    assert summary.cached_steps == cached and summary.cfg_cached_steps == cfg_cached
    torch.testing.assert_close(ours, images, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prologue, lowerings", [(None, ("eager", "cond", "regional", "segments")),
                                                  (False, ("eager", "regional", "segments"))])
def test_summary_names_the_family_and_the_lowerings_it_can_run(flux, prologue, lowerings):
    """summary() says which family runs the model, whether its prologue runs whole steps, and which lowerings
    optimize(graph=...) accepts for it (cond needs the prologue)."""
    dbc.optimize(flux, cache=CONFIG, prologue=prologue)
    try:
        run(flux, steps=4)
        summary = dbc.summary(flux)
    finally:
        dbc.disable(flux)
    assert summary.lowerings == lowerings and summary.family == "flux" and summary.prologue == (prologue is None)
    assert f"family=flux{' (prologue)' if prologue is None else ''} (lowerings: {', '.join(lowerings)})" in str(summary)


def test_calls_outside_any_cache_context(flux):
    """A bare transformer (no pipeline contexts): one branch, or alternating cond/uncond with
    enable_separate_cfg=True, cache-dit's rule for callers that give no context."""
    transformer = flux.transformer
    kwargs = dict(encoder_hidden_states=torch.randn(1, 4, 32, generator=generator(2)),
                  pooled_projections=torch.randn(1, 32, generator=generator(3)), img_ids=torch.zeros(16, 3),
                  txt_ids=torch.zeros(4, 3), hidden_states=torch.randn(1, 16, 16, generator=generator(1)))
    for separate, steps in ((None, 6), (True, 3)):
        cfg = dbc.DBCacheConfig.from_string("F1B0_W1M0MC0_T0O1_R1.0", enable_separate_cfg=separate)
        dbc.optimize(transformer, cache=cfg)
        try:
            for i in range(6):
                transformer(timestep=torch.tensor([1.0 - i / 8]), return_dict=False, **kwargs)
            summary = dbc.summary(transformer)
            assert summary.num_steps == steps and summary.separate_cfg == bool(separate)
        finally:
            dbc.disable(transformer)


def test_a_never_caching_config_on_a_bare_transformer_equals_the_model(flux):
    """diffusers' own model tests call a bare transformer repeatedly with changing inputs (e.g. the deprecated 3-D
    ids) and no reset: with a config that can never hit, every call is exactly the model's own forward, and a
    change of input signature between calls is a new generation, never an error."""
    transformer = flux.transformer
    base = dict(hidden_states=torch.randn(1, 16, 16, generator=generator(1)),
                encoder_hidden_states=torch.randn(1, 4, 32, generator=generator(2)),
                pooled_projections=torch.randn(1, 32, generator=generator(3)), timestep=torch.tensor([0.7]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3), return_dict=False)
    calls = [base, dict(base, img_ids=torch.zeros(1, 16, 3), txt_ids=torch.zeros(1, 4, 3)),  # deprecated 3-D ids
             dict(base, timestep=torch.tensor([0.3])), base]
    with torch.no_grad():
        expected = [transformer(**kwargs)[0] for kwargs in calls]
        dbc.optimize(transformer, cache=NEVER)
        try:
            got = [transformer(**kwargs)[0] for kwargs in calls]
            assert dbc.summary(transformer).cached_steps == []
        finally:
            dbc.disable(transformer)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_one_call_pipeline_with_forced_separate_cfg_keeps_its_step_count(flux):
    """enable_separate_cfg=True on a pipeline with one call per step (FLUX without true CFG) counts 8 steps for 8
    and reports no separate CFG."""
    dbc.optimize(flux, cache=dbc.DBCacheConfig.from_string(CONFIG, enable_separate_cfg=True))
    try:
        run(flux, steps=8)
        assert dbc.summary(flux).num_steps == 8 and not dbc.summary(flux).separate_cfg
    finally:
        dbc.disable(flux)


@pytest.mark.parametrize("lowering", ["eager", "regional"])
def test_an_interrupted_generation_leaves_the_next_bit_identical_to_a_fresh_one(lowering):
    """An exception mid-generation skips the pipeline's end-of-call reset; the scheduler's step_index marks the next
    call as a new generation anyway (also with the compiled regional lowering and its emulated graphs)."""
    def optimized():
        pipe = tiny_flux_pipeline()
        if lowering == "eager":
            dbc.optimize(pipe, cache=CONFIG)
        else:
            dbc.optimize(pipe, cache=CONFIG, mode="default", graph="regional", compile_options={"backend": "eager"})
            dbc.runtime_of(pipe).use_segment_graphs(emulate=True)
        return pipe

    fresh = optimized()
    expected = run(fresh, steps=10)
    pipe = optimized()

    def boom(p, step, timestep, kwargs):
        if step == 4:
            raise RuntimeError("user callback failed")
        return kwargs

    with pytest.raises(RuntimeError, match="user callback failed"):
        run(pipe, steps=10, callback_on_step_end=boom)
    assert torch.equal(run(pipe, steps=10), expected)
    assert dbc.summary(pipe).cached_steps == dbc.summary(fresh).cached_steps


def test_a_generation_that_fails_inside_its_first_step_leaves_the_next_one_clean():
    """A failure in step 0's second (uncond) call happens before any scheduler.step(), so step_index gives no
    signal; the scheduler's fresh timesteps tensor of the next call does. Without it the next generation carried on
    the failed one's cond state: 9 steps instead of 8 and another image."""
    kwargs = dict(true_cfg_inputs(), num_inference_steps=8)
    fresh = tiny_flux_pipeline()
    dbc.optimize(fresh, cache=CONFIG)
    expected = fresh(**kwargs, generator=generator()).images
    pipe = tiny_flux_pipeline()
    dbc.optimize(pipe, cache=CONFIG)
    calls = [0]

    def fail_on_the_second_call(module, args, kw):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("out of memory in the uncond call")

    handle = pipe.transformer.register_forward_pre_hook(fail_on_the_second_call, with_kwargs=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        pipe(**kwargs, generator=generator())
    handle.remove()
    assert torch.equal(pipe(**kwargs, generator=generator()).images, expected)
    ours, reference = dbc.summary(pipe), dbc.summary(fresh)
    assert (ours.num_steps, ours.cached_steps, ours.cfg_cached_steps) == (
        reference.num_steps, reference.cached_steps, reference.cfg_cached_steps) and reference.num_steps == 8


PATHS = ("pipeline", "bare transformer", "from_pipe, another scheduler")


def _interruption_case(path, lowering):
    """A fresh optimized pipeline for ``path``: what optimize() gets, and the pipeline that runs the generations."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    pipe = tiny_flux_pipeline()
    target = pipe.transformer if path == "bare transformer" else pipe
    if lowering == "eager":
        dbc.optimize(target, cache=CONFIG_T)
    else:
        dbc.optimize(target, cache=CONFIG_T, mode="default", graph="regional", compile_options={"backend": "eager"})
        dbc.runtime_of(target).use_segment_graphs(emulate=True)
    if path.startswith("from_pipe"):
        pipe = FluxPipeline.from_pipe(pipe, scheduler=FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
    return target, pipe


CONFIG_T = "F1B0_W2M0MC2_T1O2_R0.4"  # TaylorSeer order 2: the most state a failed generation can leave behind


@pytest.mark.parametrize("lowering", ["eager", "regional"])
@pytest.mark.parametrize("path", PATHS)
def test_any_interruption_on_any_path_leaves_the_next_generation_bit_identical(path, lowering):
    """The generation rule does not depend on which object was optimized: after a generation that raised (in a
    callback after step k, or inside the transformer in call c, after the cache buffers were updated and before the step was
    recorded), the next one is
    bit-identical to a generation on a freshly optimized pipeline, with the same cached steps, whether optimize()
    got the pipeline, its bare transformer (which the pipeline still drives), or the transformer runs in a
    from_pipe() pipeline with another scheduler (whose timesteps the pipeline watch never sees). Property test over
    seeded random failure points. Before the rule, the bare-transformer and from_pipe paths carried the dead
    generation's counters and residuals into the next one."""
    import random
    steps = 8
    target, fresh = _interruption_case(path, lowering)
    expected = run(fresh, steps=steps)
    cached = dbc.summary(target).cached_steps
    assert cached, "the case must cache something, or an interruption could not leave a residual behind"
    rng = random.Random(f"{path}/{lowering}")
    for trial in range(3):
        target, pipe = _interruption_case(path, lowering)
        if trial == 0 or (trial == 2 and rng.random() < 0.5):
            k = rng.randrange(steps - 1)

            def boom(p, step, timestep, kwargs, k=k):
                if step == k:
                    raise RuntimeError("user callback failed")
                return kwargs

            with pytest.raises(RuntimeError, match="user callback failed"):
                run(pipe, steps=steps, callback_on_step_end=boom)
        else:
            # the output norm runs after the middle blocks updated the cache buffers, before the step is recorded
            c, calls = rng.randrange(1, steps + 1), [0]
            block = pipe.transformer.norm_out

            def fail(module, args, kwargs, c=c):
                calls[0] += 1
                if calls[0] == c:
                    raise KeyboardInterrupt
            hook = block.register_forward_pre_hook(fail, with_kwargs=True)
            with pytest.raises(KeyboardInterrupt):
                run(pipe, steps=steps)
            hook.remove()
        assert torch.equal(run(pipe, steps=steps), expected)
        assert dbc.summary(target).cached_steps == cached and dbc.summary(target).num_steps == steps


def test_a_bare_transformer_in_its_own_loop_starts_a_generation_with_new_conditioning(flux):
    """A caller that drives the bare transformer itself gets a new generation whenever it passes new conditioning
    tensors (a new prompt), without dbc.reset(); the same tensors at every step continue the generation."""
    transformer = flux.transformer
    dbc.optimize(transformer, cache=CONFIG)
    try:
        def generation(seed):
            g = torch.Generator().manual_seed(seed)
            kw = dict(encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                      pooled_projections=torch.randn(1, 32, generator=g), txt_ids=torch.zeros(8, 3),
                      img_ids=torch.zeros(16, 3), return_dict=False)
            x = torch.randn(1, 16, 16, generator=g)
            for i in range(8):
                x = x - 0.1 * transformer(hidden_states=x, timestep=torch.full((1,), 1.0 - i / 8), **kw)[0]
            return x, dbc.summary(transformer).cached_steps

        first, cached = generation(0)
        assert cached and dbc.summary(transformer).num_steps == 8
        again, cached_again = generation(0)  # new tensors with the same values: a new generation, same result
        assert torch.equal(again, first) and cached_again == cached
    finally:
        dbc.disable(transformer)


def test_new_conditioning_at_every_step_warns_that_nothing_can_be_cached(flux):
    """A caller that builds new conditioning tensors at every call would restart the generation every call and never
    cache: that slow path is named in a warning, once."""
    import warnings
    transformer = flux.transformer
    dbc.optimize(transformer, cache=CONFIG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(6):
                transformer(hidden_states=torch.randn(1, 16, 16), timestep=torch.full((1,), 1.0 - i / 8),
                            encoder_hidden_states=torch.randn(1, 8, 32), pooled_projections=torch.randn(1, 32),
                            txt_ids=torch.zeros(8, 3), img_ids=torch.zeros(16, 3))
        messages = [str(w.message) for w in caught if "new conditioning tensors" in str(w.message)]
        assert len(messages) == 1 and "dbcache_compile.reset()" in messages[0]
        assert dbc.summary(transformer).num_steps == 1
    finally:
        dbc.disable(transformer)


def test_the_embeddings_and_first_blocks_run_once_per_forward_on_a_new_shape(flux):
    """Buffers are sized from the one real pass: forward hooks on the embedder and the first block fire once per
    transformer call, also on the first call at a new resolution (they used to fire twice)."""
    transformer = flux.transformer
    calls = {"embed": 0, "block0": 0, "forward": 0}
    handles = [transformer.x_embedder.register_forward_hook(lambda *a: calls.__setitem__("embed", calls["embed"] + 1)),
               transformer.transformer_blocks[0].register_forward_hook(
                   lambda *a: calls.__setitem__("block0", calls["block0"] + 1)),
               transformer.register_forward_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))]
    dbc.optimize(flux, cache=CONFIG)
    try:
        run(flux, steps=4)
        run(flux, steps=4, height=48, width=48)
    finally:
        dbc.disable(flux)
        for handle in handles:
            handle.remove()
    assert calls == {"embed": 8, "block0": 8, "forward": 8}


@pytest.mark.parametrize("graph", ["eager", "segments", "regional"])
def test_a_dtype_move_after_a_forward_gets_new_state(graph):
    """Buffers belong to the inputs' shapes, dtypes and devices: after .to(float64) the same shapes run with new
    buffers (and, compiled, new graphs), exactly like a transformer optimized after the move (CPU stand-in for a
    device move)."""
    pipe = tiny_flux_pipeline()
    inputs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in flux_inputs().items()}
    kwargs = {} if graph == "eager" else dict(mode="default", graph=graph, compile_options={"backend": "eager"})
    dbc.optimize(pipe, cache=CONFIG, **kwargs)
    try:
        run(pipe)
        pipe.to(torch.float64)
        moved = pipe(**inputs, num_inference_steps=8, generator=generator()).images
        moved_steps = dbc.summary(pipe).cached_steps
    finally:
        dbc.disable(pipe)
    dbc.optimize(pipe, cache=CONFIG)
    try:
        assert torch.equal(pipe(**inputs, num_inference_steps=8, generator=generator()).images, moved)
        assert dbc.summary(pipe).cached_steps == moved_steps
    finally:
        dbc.disable(pipe)


@pytest.fixture(scope="module")
def plain_and_cached_images():
    """The image of an unoptimized tiny FLUX and of the eager cache, 6 steps."""
    plain = run(tiny_flux_pipeline(), steps=6)
    pipe = tiny_flux_pipeline()
    dbc.optimize(pipe, cache=CONFIG)
    return plain, run(pipe, steps=6), dbc.summary(pipe).cached_steps


@pytest.mark.parametrize("graph", ["eager", "regional"])
@pytest.mark.parametrize("order", ["offload-then-optimize", "optimize-then-offload"])
def test_model_cpu_offload_keeps_the_cache_across_generations_and_disable(plain_and_cached_images, order, graph):
    """enable_model_cpu_offload() re-installs its accelerate hooks after every call around the forward it saw first:
    optimized after enabling it, the cache used to vanish from the second generation on (uncached image, stale
    summary). Both orders now cache every generation, and disable() gives back the plain model's image, with the
    offload still on. (CPU offload to the CPU here: the hooks are the same ones that move to a GPU.)"""
    plain, cached, cached_steps = plain_and_cached_images
    pipe = tiny_flux_pipeline()
    kwargs = {} if graph == "eager" else dict(mode="default", graph="regional", compile_options={"backend": "eager"})
    if order == "offload-then-optimize":
        pipe.enable_model_cpu_offload(device="cpu")
        dbc.optimize(pipe, cache=CONFIG, **kwargs)
    else:
        dbc.optimize(pipe, cache=CONFIG, **kwargs)
        pipe.enable_model_cpu_offload(device="cpu")
    try:
        for _ in range(2):
            dbc.reset(pipe)
            assert torch.equal(run(pipe, steps=6), cached) and dbc.summary(pipe).cached_steps == cached_steps
        with pytest.raises(ValueError, match="disable\\(pipe\\) on the pipeline"):
            dbc.disable(pipe.transformer)
    finally:
        dbc.disable(pipe)
    assert pipe._all_hooks and torch.equal(run(pipe, steps=6), plain) and torch.equal(run(pipe, steps=6), plain)


def test_sequential_cpu_offload_is_refused_before_and_after_optimize():
    """enable_sequential_cpu_offload() leaves the weights on the meta device and streams them per layer: refused at
    optimize, and at the next generation when enabled afterwards (it used to fail deep inside with a TypeError)."""
    pipe = tiny_flux_pipeline()
    pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="meta device at optimize.*enable_model_cpu_offload"):
        dbc.optimize(pipe, cache=CONFIG)
    pipe = tiny_flux_pipeline()
    dbc.optimize(pipe, cache=CONFIG)
    pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="meta device after optimize"):
        run(pipe, steps=2)


def test_gradient_checkpointing_runs_the_models_own_forward(flux):
    """With gradients on and checkpointing enabled (training, fine-tuning), the forward is the model's own: every
    block goes through the checkpoint function, the cache stays out of it."""
    pipe = tiny_flux_pipeline()
    transformer = pipe.transformer
    transformer.enable_gradient_checkpointing()
    through = []
    checkpoint = transformer._gradient_checkpointing_func
    transformer._gradient_checkpointing_func = lambda block, *a: through.append(block) or checkpoint(block, *a)
    dbc.optimize(transformer, cache=CONFIG)
    try:
        kwargs = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 4, 32),
                      pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
                      txt_ids=torch.zeros(4, 3), return_dict=False)
        out = transformer(**kwargs)[0]
        out.sum().backward()
        assert len(through) == 8
        with torch.no_grad():  # inference: the cache
            transformer(**kwargs)
        assert dbc.summary(transformer).num_steps == 1 and len(through) == 8
    finally:
        dbc.disable(transformer)


def test_regional_compiles_one_region_per_block_class_without_recompiles():
    """FLUX's double and single blocks each get their own compiled region: no recompile when the first single
    block runs, so recompile_limit=1 and fail_on_recompile hold (Dynamo's structure only: backend eager)."""
    pipe = tiny_flux_pipeline()
    dbc.optimize(pipe, cache=CONFIG, mode="default", graph="regional", compile_options={"backend": "eager"})
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            run(pipe, steps=4)
            with torch.compiler.set_stance("fail_on_recompile"):
                run(pipe, steps=4)
    finally:
        dbc.disable(pipe)


@pytest.mark.parametrize("graph", ["segments", "regional"])
def test_three_optimized_models_do_not_share_a_recompile_budget(graph):
    """Each optimized transformer compiles through its own code objects, so three models with four shapes each (12
    graphs per segment or block region; Dynamo's limit is 8 per function) never hit a limit another model used
    up: no call runs uncompiled."""
    pipes = [tiny_flux_pipeline(seed=i) for i in range(3)]
    for pipe in pipes:
        dbc.optimize(pipe, cache=CONFIG, mode="default", graph=graph, compile_options={"backend": "eager"})
    try:
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            for side in (32, 48, 64, 80):
                for pipe in pipes:
                    run(pipe, steps=2, height=side, width=side)  # 2 warm-up steps: head and miss compile
        assert not any(dbc.summary(pipe).compile_fallbacks for pipe in pipes)
    finally:
        for pipe in pipes:
            dbc.disable(pipe)


def test_a_spent_recompile_budget_runs_uncompiled_and_says_so():
    """A server sees shapes the budget did not foresee: when a compiled segment's recompile limit is reached, that
    call runs the segment uncompiled (warned once, counted in summary()) instead of failing the request, with the
    same image."""
    dbc.clear_compiled()  # the budget is per compiled function: start from functions with no graph yet
    pipe = tiny_flux_pipeline()
    dbc.optimize(pipe, cache=CONFIG)
    expected = run(pipe, steps=4, height=48, width=48)
    dbc.disable(pipe)
    dbc.optimize(pipe, cache=CONFIG, mode="default", graph="segments", compile_options={"backend": "eager"})
    try:
        with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False):
            run(pipe, steps=4)
            with pytest.warns(UserWarning, match="recompile limit"):
                image = run(pipe, steps=4, height=48, width=48)
        summary = dbc.summary(pipe)
        assert summary.compile_fallbacks.get("head") == 4 and "recompile limit reached" in str(summary)
        torch.testing.assert_close(image, expected, rtol=1e-5, atol=1e-5)
    finally:
        dbc.disable(pipe)


def test_torch_compile_around_an_eager_optimized_model_runs_the_fullgraph_form(flux):
    """torch.compile(fullgraph=True) around an eagerly optimized FLUX transformer traces the cache step's fullgraph form
    (torch.cond; tests/test_usercompile.py): a bare call gives the eager cache's output."""
    kwargs = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 4, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
                  txt_ids=torch.zeros(4, 3), return_dict=False)
    dbc.optimize(flux, cache=CONFIG)
    try:
        expected = flux.transformer(**kwargs)[0]
        dbc.reset(flux)
        out = torch.compile(flux.transformer, backend="eager", fullgraph=True)(**kwargs)[0]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    finally:
        dbc.disable(flux)
        torch._dynamo.reset()


@pytest.mark.parametrize("prologue", [None, False])
def test_compile_repeated_blocks_after_an_eager_optimize(prologue):
    """diffusers' compile_repeated_blocks after optimize(mode=None) gives the same image: with FLUX's prologue the
    blocks are plain modules; through the model's own forward (block hooks) the cache runs around each compiled block
    (usercompile.CompiledBlockCall; tests/test_usercompile.py for Wan and SD3)."""
    pipe = tiny_flux_pipeline()
    dbc.optimize(pipe, cache=CONFIG, prologue=prologue)
    expected = run(pipe, steps=6)
    pipe.transformer.compile_repeated_blocks(backend="eager", fullgraph=True)
    try:
        assert torch.equal(run(pipe, steps=6), expected) and dbc.summary(pipe).cached_steps
    finally:
        dbc.disable(pipe)
        torch._dynamo.reset()


def test_a_diffusers_cache_on_the_same_transformer_is_a_clear_error():
    """A diffusers cache (FirstBlockCache) on the same transformer is refused at optimize(), and at the next call
    when enabled afterwards."""
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = tiny_flux_pipeline()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(ValueError, match="diffusers cache enabled"):
        dbc.optimize(pipe, cache=CONFIG)
    pipe.transformer.disable_cache()
    dbc.optimize(pipe, cache=CONFIG)
    try:
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
        with pytest.raises(ValueError, match="two caches cannot share one forward"):
            run(pipe, steps=2)
        pipe.transformer.disable_cache()
    finally:
        dbc.disable(pipe)


@pytest.mark.parametrize("prologue", [None, False])
@pytest.mark.parametrize("apply", ["first_block_cache", "taylorseer_cache"])
def test_a_diffusers_cache_hook_applied_directly_after_optimize_is_refused(flux, prologue, apply):
    """diffusers' apply_first_block_cache / apply_taylorseer_cache set no `_cache_config`; after optimize they used to
    run silently beside (or under) DBCache. The next generation now refuses them, naming the hooks."""
    from diffusers.hooks import (FirstBlockCacheConfig, HookRegistry, TaylorSeerCacheConfig, apply_first_block_cache,
                                 apply_taylorseer_cache)

    dbc.optimize(flux, cache=CONFIG, prologue=prologue)
    try:
        if apply == "first_block_cache":
            apply_first_block_cache(flux.transformer, FirstBlockCacheConfig(threshold=0.2))
        else:
            apply_taylorseer_cache(flux.transformer, TaylorSeerCacheConfig(cache_interval=2))
        with pytest.raises(ValueError, match="carries diffusers hooks that replace a forward .*added after optimize"):
            run(flux, steps=2)
    finally:
        dbc.disable(flux)
        for module in flux.transformer.modules():  # take the foreign cache hooks off the shared pipeline
            registry = getattr(module, "_diffusers_hook", None)
            if isinstance(registry, HookRegistry):
                for name in list(registry.hooks):
                    registry.remove_hook(name, recurse=False)
    run(flux, steps=2)


@pytest.mark.parametrize("kind", ["layerwise_casting", "group_offloading"])
def test_module_hooks_work_eager_and_are_refused_compiled(kind):
    """diffusers' layerwise casting (bf16 storage, fp32 compute) and group offloading (block level) run under the
    eager cache with the plain model's images; a compiled lowering is refused at optimize time, naming the hooks."""
    def enable(p):
        if kind == "layerwise_casting":
            p.transformer.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
        else:
            p.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                               offload_type="block_level", num_blocks_per_group=1)

    pipe, reference_pipe = tiny_flux_pipeline(), tiny_flux_pipeline()
    for p in (pipe, reference_pipe):
        enable(p)
    with pytest.raises(ValueError, match=kind):
        dbc.optimize(pipe, cache=CONFIG, mode="default")
    dbc.optimize(pipe, cache=NEVER)
    try:
        assert torch.equal(run(pipe), run(reference_pipe))
    finally:
        dbc.disable(pipe)


def enable_module_hooks(pipe, kind):
    if kind == "layerwise_casting":
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    else:
        pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                              offload_type="block_level", num_blocks_per_group=1)


@pytest.mark.parametrize("kind", ["layerwise_casting", "group_offloading"])
@pytest.mark.parametrize("cache, graph, prologue", [(CONFIG, "segments", None), (CONFIG, "cond", None),
                                                    (CONFIG, "regional", False), (None, "regional", None),
                                                    (None, "auto", None)])
def test_module_hooks_added_after_a_compiled_optimize_are_a_named_error_at_the_next_generation(kind, cache, graph,
                                                                                               prologue):
    """Layerwise casting or group offloading enabled after a compiled optimize() (cached, through the model's own
    forward, or the uncached baseline) used to die inside Dynamo ("Attempted to use torch.nn.Parameter()
    constructor", "Skip inlining torch.compiler.disable()d function"); the next generation now refuses them by name
    before running."""
    pipe = tiny_flux_pipeline()
    dbc.optimize(pipe, cache=cache, mode="default", graph=graph, prologue=prologue,
                 compile_options={"backend": "eager"})
    try:
        run(pipe, steps=2)
        enable_module_hooks(pipe, kind)
        with pytest.raises(ValueError, match=f"{kind} hooks added after optimize"):
            run(pipe, steps=2)
    finally:
        dbc.disable(pipe)


@pytest.mark.parametrize("kind", ["layerwise_casting", "group_offloading"])
def test_module_hooks_added_after_an_eager_optimize_still_run(kind):
    """The eager cache runs layerwise casting and group offloading added after optimize(), with the images of the
    plain model carrying the same hooks (a never-caching config)."""
    pipe, reference_pipe = tiny_flux_pipeline(), tiny_flux_pipeline()
    dbc.optimize(pipe, cache=NEVER)
    try:
        run(pipe, steps=2)
        for p in (pipe, reference_pipe):
            enable_module_hooks(p, kind)
        assert torch.equal(run(pipe), run(reference_pipe))
    finally:
        dbc.disable(pipe)


def test_lora_scale_is_applied_like_the_models_own_forward():
    """joint_attention_kwargs={"scale": s} scales PEFT LoRA layers in diffusers' forward; the cached forward used
    to ignore it (scale 0 gave the scale-1 image). With a never-caching config the images equal the plain model's
    at every scale."""
    pytest.importorskip("peft", reason="LoRA needs the peft package (pip install -e '.[test]')")
    from peft import LoraConfig

    pipe = tiny_flux_pipeline()
    torch.manual_seed(0)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    plain = {s: run(pipe, steps=4, joint_attention_kwargs={"scale": s}) for s in (0.0, 1.0)}
    assert not torch.equal(plain[0.0], plain[1.0]), "the LoRA must change the image for this test to mean anything"
    dbc.optimize(pipe, cache=NEVER)
    try:
        for s, image in plain.items():
            assert torch.equal(run(pipe, steps=4, joint_attention_kwargs={"scale": s}), image)
    finally:
        dbc.disable(pipe)


def test_refused_arguments_are_clear_and_leave_the_model_untouched(flux):
    """Refused optimize() arguments (cond with quantization, non-dict compile_options, cuDNN attention on CPU,
    graph without mode) leave weights and hooks untouched."""
    params = {k: v.clone() for k, v in flux.transformer.state_dict().items()}
    with pytest.raises(NotImplementedError, match="cond.*quantized"):
        dbc.optimize(flux, cache=CONFIG, mode="default", graph="cond", quantize="int8")
    with pytest.raises(TypeError, match="compile_options must be a dict"):
        dbc.optimize(flux, cache=CONFIG, mode="default", compile_options="dynamic")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        dbc.optimize(flux, cache=CONFIG, attention="_native_cudnn")
    with pytest.raises(ValueError, match="needs a compile mode"):
        dbc.optimize(flux, cache=CONFIG, graph="cond")
    assert all(torch.equal(v, params[k]) for k, v in flux.transformer.state_dict().items())
    registry = getattr(flux.transformer, "_diffusers_hook", None)  # none at all on a never-optimized model
    assert registry is None or "dbcache_compile" not in registry.hooks


def test_disable_on_the_transformer_of_an_optimized_pipeline(flux):
    """disable(pipe.transformer) undoes an optimized pipeline: its class stays and its images are unoptimized."""
    before = run(flux)
    dbc.optimize(flux, cache=CONFIG)
    run(flux)
    dbc.disable(flux.transformer)
    assert type(flux) is FluxPipeline and torch.equal(run(flux), before)


def test_fused_projections_leave_no_attribute_behind(flux):
    """optimize(fuse_qkv=True) then disable() leaves the attention's fused_projections attribute as it found it."""
    attn = flux.transformer.transformer_blocks[0].attn
    had = "fused_projections" in vars(attn)
    dbc.optimize(flux, cache=CONFIG, fuse_qkv=True)
    dbc.disable(flux)
    assert ("fused_projections" in vars(attn)) == had


# ------------------------------------------------------------------------------------------------ own forward + hooks
@pytest.mark.parametrize("config", ["F1B0_W2M0MC3_T0O1_R0.35", "F2B1_W3I2M0MC2_T1O2_R0.4"])
def test_flux_through_its_own_forward_takes_cache_dits_decisions(flux, config):
    """The model's own forward with the middle blocks skipped through block hooks (prologue=False): the same cached
    steps and diffs as cache-dit on FLUX, images within float32 rounding (the residual is kept per block list, so
    sums run in another order)."""
    kwargs = dict(flux_inputs(), num_inference_steps=12)
    dbc.optimize(flux, cache=config, prologue=False)
    try:
        ours = flux(**kwargs, generator=generator()).images
        summary = dbc.summary(flux)
    finally:
        dbc.disable(flux)
    assert summary.family == "flux" and not summary.prologue and 0 < len(summary.cached_steps) < 12
    images, cached, _, diffs = run_cache_dit(flux, dbc.DBCacheConfig.from_string(config), False,
                                             generator=generator(), **kwargs)
    assert summary.cached_steps == cached
    assert summary.residual_diffs == pytest.approx(diffs, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(ours, images, rtol=1e-5, atol=1e-5)
    assert not any(hasattr(b, "_diffusers_hook") for b in flux.transformer.transformer_blocks)


@pytest.mark.parametrize("graph", ["regional", "segments"])
def test_qwen_image_through_its_own_forward_with_true_cfg_compiled(graph):
    """prologue=False on Qwen-Image with true CFG: its own forward with block hooks, each group compiled (regional:
    per block class; segments: the group whole), without graph breaks, takes the prologue driver's decisions and
    images."""
    pipe = tiny_qwen_pipeline()
    call = lambda: pipe(**qwen_inputs(cfg=True), num_inference_steps=8, generator=generator()).images  # noqa: E731
    dbc.optimize(pipe, cache="F1B0_W2M0MC2_T0O1_R0.35")
    whole, whole_summary = call(), dbc.summary(pipe)
    dbc.disable(pipe)
    from torch._dynamo.utils import counters
    counters.clear()
    dbc.optimize(pipe, cache="F1B0_W2M0MC2_T0O1_R0.35", mode="default", graph=graph, prologue=False,
                 compile_options={"backend": "eager"})
    try:
        hooked = call()
        summary = dbc.summary(pipe)
        assert summary.lowering == graph and summary.family == "qwen-image" and not summary.prologue
        assert summary.cached_steps == whole_summary.cached_steps and summary.cfg_cached_steps
        assert summary.cfg_cached_steps == whole_summary.cfg_cached_steps
        torch.testing.assert_close(hooked, whole, rtol=1e-5, atol=1e-5)
        assert sum(counters["graph_break"].values()) == 0
    finally:
        dbc.disable(pipe)


def test_a_model_in_no_family_says_what_is_supported():
    """optimize() on a model no family supports raises ValueError listing what is supported."""
    with pytest.raises(ValueError, match="TransformerBlockRegistry"):
        dbc.optimize(torch.nn.Sequential(torch.nn.Linear(2, 2)), cache=CONFIG)


def test_reconfigure_swaps_thresholds_without_recompiling():
    """Another threshold / warm-up / limit with the same block split and TaylorSeer order: the next generation uses
    it, exactly like a pipeline optimized with it, and no graph is compiled again (what calibrate() relies on)."""
    from torch._dynamo.utils import counters

    pipe = tiny_flux_pipeline()
    dbc.optimize(pipe, cache="F1B0_W2M0MC3_T0O1_R0.3")
    expected, expected_steps = run(pipe), dbc.summary(pipe).cached_steps
    dbc.disable(pipe)
    torch._dynamo.reset()
    counters.clear()
    dbc.optimize(pipe, cache="F1B0_W4M0MC1_T0O1_R0.05", mode="default", graph="regional",
                 compile_options={"backend": "eager"})
    try:
        run(pipe)
        graphs = counters["stats"]["unique_graphs"]
        dbc.runtime_of(pipe).reconfigure("F1B0_W2M0MC3_T0O1_R0.3")
        torch.testing.assert_close(run(pipe), expected, rtol=1e-5, atol=1e-5)
        assert dbc.summary(pipe).cached_steps == expected_steps and expected_steps
        assert counters["stats"]["unique_graphs"] == graphs
        with pytest.raises(ValueError, match="keeps the block split"):
            dbc.runtime_of(pipe).reconfigure("F2B0_W2_R0.3")
    finally:
        dbc.disable(pipe)


def test_disable_releases_what_the_runtime_compiled():
    """A notebook sweep or a server re-optimizes the same model many times: each disable() drops Dynamo's entries
    of the code objects its runtime compiled and the guard finalizers torch leaves on the model's modules (each kept
    a whole compile's state alive: +8.8 MiB per cycle on the tiny FLUX, bench/results/soak-cpu-2026-11-26)."""
    import gc
    import weakref

    pipe = tiny_flux_pipeline()

    def cycle():
        dbc.optimize(pipe, cache=CONFIG, mode="default", graph="segments", compile_options={"backend": "eager"})
        run(pipe, steps=4)
        dbc.disable(pipe)
        gc.collect()

    cycle()
    finalizers = len(weakref.finalize._registry)
    for _ in range(3):
        cycle()
    assert len(weakref.finalize._registry) - finalizers < 10  # it was ~240 per cycle before


def test_qwen_image_compiles_leave_no_fake_tensor_world_behind():
    """Qwen-Image's rotary embedding slices module tensors; traced inside the compiled head, the slices were fake
    views whose fake base torch keeps alive from C++, with its whole FakeTensorMode, after disable(): ~11k objects
    per optimize/generate/disable cycle. The RoPE is now an eager input, so static-shape cycles leave nothing."""
    import gc

    from torch._subclasses.fake_tensor import FakeTensorMode

    pipe = tiny_qwen_pipeline()

    def cycle():
        dbc.optimize(pipe, cache=CONFIG, mode="default", graph="segments", compile_options={"backend": "eager"})
        pipe(**qwen_inputs(), num_inference_steps=3, generator=generator())
        dbc.disable(pipe)
        gc.collect()

    def fake_modes():
        return sum(isinstance(o, FakeTensorMode) for o in gc.get_objects())

    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        cycle()
        before = fake_modes()
        cycle()
        cycle()
    assert fake_modes() == before
