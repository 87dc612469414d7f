"""Golden graph records of every model family (tests/families/, tools/graph_records.py): the tiny pipeline of each
case with a record compiles with ``regional`` and ``segments`` (Dynamo's graph structure) without graph breaks and
without recompiles after the first call, with the recorded graph count and hand-captured segment graphs (emulated on
CPU), hits the cache, and takes the eager runtime's decisions (cache-dit's: tests/test_families.py) with the eager
outputs. Compiling is what costs here (Dynamo traces every block of a segment): each case's pipeline and eager run
are shared by its lowerings."""

import json

import pytest
import torch

import dbcache_compile as dbc
from tests.families import CASES, case_family
from tools.graph_records import (FAMILY_CALLS, UPDATE_HINT, cached_steps, family_call, family_config,
                                 family_records, measure_family, record_path)

def _frames(output) -> torch.Tensor:
    """A pipeline call's images, or its video frames."""
    frames = getattr(output, "frames", None)
    return torch.as_tensor(output.images if frames is None else frames)


def _decisions(summary) -> dict:
    """Per transformer, chain and CFG branch: the cached steps; per transformer and chain: the residual diffs."""
    diffs = {}
    for prefix, one in [("", summary), *((f"{name}.", s) for name, s in summary.transformers.items())]:
        chains = one.chains or {"all blocks": {"residual_diffs": one.residual_diffs}}
        diffs.update({prefix + name: chain["residual_diffs"] for name, chain in chains.items()})
    return {"cached": cached_steps(summary), "diffs": diffs}


#: cases whose every call passes an index-added input of a family that otherwise runs whole groups (block by block)
INDEX_ADDED_CASES = {"sd3_controlnet"}


@pytest.fixture(scope="module")
def family_eager():
    """``case -> (pipeline, output, summary)``: one eager call with the record's config, the pipeline left
    unoptimized and shared with the compiled runs of the case."""
    runs = {}

    def get(case):
        if case not in runs:
            pipe = CASES[case].builder()
            dbc.optimize(pipe, cache=family_config(case))
            try:
                runs[case] = (pipe, family_call(pipe, case), dbc.summary(pipe))
            finally:
                dbc.disable(pipe)
        return runs[case]

    return get


@pytest.mark.parametrize("case, lowering", family_records())
def test_family_graph_structure_matches_golden_record_and_eager(family_eager, case, lowering):
    """Every family case with a record compiles (regional: its block regions; segments: its Fn group, each list's
    middle group and its Bn group, or a prologue family's whole steps) without graph breaks and without recompiles
    after the first call, with the recorded graph count and hand-captured segment graphs (emulated on CPU)
    (graphs/family-<case>-<lowering>.json), and the recorded run hits the cache: the compiled hit path is what the
    record vouches for, not only the compute path. Every call takes the eager runtime's decisions (cached steps per
    chain, CFG branch and transformer; residual diffs) and gives its outputs: the eager decisions are cache-dit's
    (tests/test_families.py), so every family that runs segments takes cache-dit's decisions compiled."""
    pipe, eager_output, eager_summary = family_eager(case)
    run = measure_family(case, lowering, pipe)
    record = run.record
    assert record["graph_breaks"] == 0 and record["recompiles_after_warmup"] == 0
    # captured by hand: each group segment (a family whose groups cannot run whole, Chroma, and calls with index-added
    # inputs, SD3 ControlNet, run block by block)
    block_by_block = case_family(case).ungroupable or case in INDEX_ADDED_CASES
    assert (record["segment_graphs"] > 0) == (not block_by_block), record
    assert any(steps for chain in record["cached_steps"].values() for steps in chain.values()), record
    golden = json.loads(record_path(f"family-{case}", lowering).read_text())
    assert record == golden, UPDATE_HINT.format(f"family-{case}-{lowering}")
    expected = _decisions(eager_summary)
    assert len(run.summaries) == len(run.images) == FAMILY_CALLS
    for summary, output in zip(run.summaries, run.images):
        assert summary.lowering == lowering
        decisions = _decisions(summary)
        assert decisions["cached"] == expected["cached"], (case, lowering, decisions, expected)
        for chain, diffs in expected["diffs"].items():
            assert decisions["diffs"][chain] == pytest.approx(diffs, rel=1e-4, abs=1e-6), chain
        torch.testing.assert_close(_frames(output), _frames(eager_output), rtol=1e-4, atol=1e-4)


def test_graph_records_tool_writes_where_told_and_names_unknown_records(tmp_path, capsys):
    """``python tools/graph_records.py --update --dir D --only NAME`` writes the same record as the checked-in one to
    D (the records' default folder is the repository's graphs/); an unknown record name is an error naming the
    known ones."""
    from pathlib import Path

    from tools.graph_records import RECORD_DIR, main

    assert RECORD_DIR == Path(__file__).resolve().parents[1] / "graphs"
    out = tmp_path / "records"
    assert main(["--update", "--dir", str(out), "--only", "family-sana-segments"]) == 0
    written = out / "family-sana-segments.json"
    assert [p.name for p in out.iterdir()] == [written.name] and str(written) in capsys.readouterr().out
    assert json.loads(written.read_text()) == json.loads((RECORD_DIR / written.name).read_text())
    with pytest.raises(SystemExit):
        main(["--only", "family-nonesuch"])
    assert "no record named family-nonesuch" in capsys.readouterr().err
