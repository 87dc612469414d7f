import pytest
import torch

import dbcache_compile
from tools.graph_records import SCENARIO_CONFIG, SCENARIOS, measure, run_scenario

# Tiny models run fastest single-threaded, and a second process (CI runs alone, a developer may not) must not
# oversubscribe the cores.
torch.set_num_threads(1)

#: the files that take longest (minutes of CPU: AOTInductor exports, Inductor compiles, child processes), started
#: first so that the two xdist workers finish together (longest first); every other file keeps its place after them
SLOW_FIRST = ("test_export.py", "test_compiled.py", "test_bench.py", "test_context_parallel.py",
              "test_usercompile.py", "test_compile_cache.py", "test_runtime.py", "test_calibrate.py")


def pytest_configure(config):
    """With ``-n 2 --dist loadfile`` (the README's command) xdist would hand out files by their number of tests,
    which starts the many quick family tests first and the few slow export tests last; keep our order instead."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(scope="session", autouse=True)
def attention_cache(tmp_path_factory):
    """``attention="auto"`` measurements go to a file of this test session, not the user's ~/.cache (child
    processes inherit it)."""
    from dbcache_compile.attention import ENV_CACHE
    mp = pytest.MonkeyPatch()
    mp.setenv(ENV_CACHE, str(tmp_path_factory.mktemp("dbcache_cache") / "attention.json"))
    yield
    mp.undo()


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def compiled_run():
    runs = {}

    def get(scenario, lowering):
        if (scenario, lowering) not in runs:
            runs[scenario, lowering] = measure(scenario, lowering)
        return runs[scenario, lowering]

    return get


@pytest.fixture(scope="session")
def eager_run():
    runs = {}

    def get(scenario):
        if scenario not in runs:
            pipe, inputs = SCENARIOS[scenario]()
            dbcache_compile.optimize(pipe, cache=SCENARIO_CONFIG)
            runs[scenario] = run_scenario(pipe, inputs)
            dbcache_compile.disable(pipe)
        return runs[scenario]

    return get
