"""Groups decoding together: one forward pass for the active policy and its canary (``lanes.py``,
``routing.py``), and a forward of its own for a model that cannot share one."""

from __future__ import annotations

import asyncio
import gc
import shutil
import threading
import weakref
from pathlib import Path

import pytest
import torch

from server.engines import lanes as lanes_module
from server.engines import routing as routing_module
from server.engines.base import SamplingParams
from server.engines.batch import PaddedBatch
from server.engines.groups import Group
from server.engines.lanes import Lanes, _runs_in_place
from server.engines.routing import RowRuns, _RowScaled, fusion_key, route, routed
from tests.server.test_engine_canary import ask, engine_on, rest, started_stream, until
from tests.server.test_transformers_engine import chat, greedy_reference, perturbed_checkpoint

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def shallower_checkpoint(src: Path, dst: Path) -> Path:
    """The model with one layer less: same vocabulary, another architecture."""
    shutil.copytree(src, dst)
    model = load(src)
    del model.model.layers[-1]
    model.config.num_hidden_layers -= 1
    model.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lanes")
    torch.manual_seed(2)
    return {"policy-1": perturbed_checkpoint(tiny_model_dir, root / "policy-1"),
            "policy-2": perturbed_checkpoint(tiny_model_dir, root / "policy-2"),
            "shallow": shallower_checkpoint(tiny_model_dir, root / "shallow")}


@torch.inference_mode()
def test_a_routed_model_gives_each_run_of_rows_its_own_models_logits(
        tiny_model_dir: Path, models: dict[str, Path]) -> None:
    parts = [load(tiny_model_dir), load(models["policy-1"]), load(models["policy-2"])]
    runs = RowRuns(len(parts), parts[0].device)
    model = routed(parts, runs)
    assert any(isinstance(m, _RowScaled) for m in model.modules())  # the norms differ too
    assert not any("_shadow" in name for name, _ in model.named_modules())  # no stray submodule
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16], [17, 18], [19, 20, 21, 22, 23]]
    for sizes in ([2, 1, 2], [3, 0, 2], [0, 5, 0]):
        runs.set(sizes)
        batch, logits = PaddedBatch.prefill(model, prompts, pad_id=0)
        alone, row = [], 0
        for part, size in zip(parts, sizes, strict=True):
            if size:
                alone.append(PaddedBatch.prefill(part, prompts[row:row + size], pad_id=0))
            row += size
        assert torch.allclose(logits, torch.cat([lg for _, lg in alone]), atol=1e-5)
        busy = [part for part, size in zip(parts, sizes, strict=True) if size]
        for _ in range(3):  # decode steps over the shared cache, each row on its own weights
            tokens = logits.argmax(-1, keepdim=True)  # (B, 1)
            batch.tokens, row = tokens, 0
            for own, _ in alone:
                own.tokens = tokens[row:row + own.size]
                row += own.size
            logits = batch.decode(model)
            own_logits = torch.cat([own.decode(part) for part, (own, _) in
                                    zip(busy, alone, strict=True)])
            assert torch.allclose(logits, own_logits, atol=1e-5)


def layers_perturbed(src: Path, dst: Path) -> Path:
    """The model with noise on its decoder layers' linear weights only, as a merged LoRA adapter
    on every linear layer changes them: embeddings, the tied output layer and norms stay."""
    shutil.copytree(src, dst)
    model = load(src)
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(torch.randn_like(module.weight) * 0.05)
    model.save_pretrained(dst)
    return dst


@torch.inference_mode()
def test_weight_modules_equal_in_every_model_are_not_routed(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(3)
    parts = [load(tiny_model_dir), load(layers_perturbed(tiny_model_dir, tmp_path / "lora"))]
    runs = RowRuns(len(parts), parts[0].device)
    model = routed(parts, runs)
    assert model.model.embed_tokens is parts[0].model.embed_tokens  # equal: runs over all rows
    assert model.lm_head is parts[0].lm_head and model.model.norm is parts[0].model.norm
    assert model.model.layers[0].self_attn.q_proj is not parts[0].model.layers[0].self_attn.q_proj
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    runs.set([2, 1])
    _, logits = PaddedBatch.prefill(model, prompts, pad_id=0)
    alone = torch.cat([PaddedBatch.prefill(parts[0], prompts[:2], pad_id=0)[1],
                       PaddedBatch.prefill(parts[1], prompts[2:], pad_id=0)[1]])
    assert torch.allclose(logits, alone, atol=1e-5)
    assert not torch.allclose(logits[2], PaddedBatch.prefill(parts[0], prompts[2:], pad_id=0)[1][0],
                              atol=1e-3)  # the canary's row is not on the base's weights


@torch.inference_mode()
def test_only_models_of_one_architecture_share_a_lane(
        tiny_model_dir: Path, models: dict[str, Path]) -> None:
    active, canary, shallow = (Group(load(p), v) for p, v in (
        (tiny_model_dir, "policy-0"), (models["policy-1"], "policy-1"), (models["shallow"], "s")))
    assert fusion_key(active.model) == fusion_key(canary.model) != fusion_key(shallow.model)
    lanes = Lanes()
    first = lanes.place(active)
    assert lanes.place(canary) is first and first.members == [active, canary]
    assert lanes.place(shallow) is not first
    assert lanes.place(canary) is first  # placed once
    lanes.prune([active, shallow])  # the canary was freed
    assert first.members == [active] and len(list(lanes)) == 2


class RouteCalls:
    """``routing.route``'s calls (patched where ``lanes.py`` and ``Probed`` call it): each one's
    thread and number of models; while ``released`` is clear, calls wait for it."""

    def __init__(self) -> None:
        self.threads: list[str] = []
        self.sizes: list[int] = []
        self.released = threading.Event()
        self.released.set()

    def __call__(self, models: list[torch.nn.Module]) -> object:
        self.threads.append(threading.current_thread().name)
        self.sizes.append(len(models))
        self.released.wait(timeout=30)
        return route(models)

    def clear(self) -> None:
        self.threads.clear()
        self.sizes.clear()


@pytest.fixture
def route_calls(monkeypatch: pytest.MonkeyPatch) -> RouteCalls:
    calls = RouteCalls()
    monkeypatch.setattr(lanes_module, "route", calls)
    monkeypatch.setattr(routing_module, "route", calls)
    return calls


def join_route_threads() -> None:
    """Wait for the lanes' rebuilds and probes on threads of their own (``flywheel-route``)."""
    for thread in threading.enumerate():
        if thread.name == "flywheel-route":
            thread.join(timeout=30)


@torch.inference_mode()
def test_a_probe_made_where_a_model_was_loaded_is_taken_when_its_lane_still_matches(
        tiny_model_dir: Path, models: dict[str, Path], route_calls: RouteCalls) -> None:
    """``Lanes.probe`` routes a new model beside each lane's members; placing its group takes
    that probe while the lane's members are the ones probed, and probes anew once they changed."""
    active, canary, third = (Group(load(p), v) for p, v in (
        (tiny_model_dir, "policy-0"), (models["policy-1"], "policy-1"),
        (models["policy-2"], "policy-2")))
    lanes = Lanes()
    lane = lanes.place(active)
    canary.probed, third.probed = (lanes.probe(g.model, []) for g in (canary, third))
    route_calls.clear()
    assert lanes.place(canary) is lane and route_calls.sizes == []  # probed beside [active]
    assert canary.probed is None  # taken: its routed models are the lane's or freed
    assert lanes.place(third) is lane and route_calls.sizes == [3]  # the lane changed
    assert lane.members == [active, canary, third]


@torch.inference_mode()
def test_after_a_member_leaves_the_routed_model_over_the_rest_is_built_off_the_decode_thread(
        tiny_model_dir: Path, models: dict[str, Path], route_calls: RouteCalls) -> None:
    """A canary drains beside the active version and a newer canary: until the routed model
    over the two left is built on a thread of its own, the one over all three serves, the
    drained one given no rows; every row stays on its own weights throughout."""
    groups = [Group(load(p), v) for p, v in ((tiny_model_dir, "policy-0"),
                                              (models["policy-1"], "policy-1"),
                                              (models["policy-2"], "policy-2"))]
    lanes = Lanes()
    lane = lanes.place(groups[0])
    for group in groups[1:]:
        lanes.place(group)
    old = lane.model_for([1, 1, 1])
    route_calls.clear()
    route_calls.released.clear()  # the rebuild is held until the old routed model served
    lanes.prune([groups[0], groups[2]])  # policy-1 drained and was freed
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    alone = torch.cat([PaddedBatch.prefill(g.model, [p], pad_id=0)[1]
                       for g, p in zip((groups[0], groups[2]), prompts, strict=True)])
    assert lane.model_for([1, 1]) is old  # the rebuild is held: the old one serves
    _, logits = PaddedBatch.prefill(old, prompts, pad_id=0)
    assert torch.allclose(logits, alone, atol=1e-5)
    route_calls.released.set()
    join_route_threads()
    new = lane.model_for([1, 1])
    assert new is not old and route_calls.threads == ["flywheel-route"]
    _, logits = PaddedBatch.prefill(new, prompts, pad_id=0)
    assert torch.allclose(logits, alone, atol=1e-5)


@torch.inference_mode()
def test_a_group_probed_beside_a_member_that_left_is_probed_again_off_the_decode_thread(
        tiny_model_dir: Path, models: dict[str, Path], route_calls: RouteCalls) -> None:
    """A newer canary probed beside the active version and the canary it replaces, which
    drains and is freed before the newer one's first request: probed again beside the active
    version alone, on a thread of its own, so placing it probes nothing."""
    active, old, new = (Group(load(p), v) for p, v in (
        (tiny_model_dir, "policy-0"), (models["policy-1"], "policy-1"),
        (models["policy-2"], "policy-2")))
    lanes = Lanes()
    lane = lanes.place(active)
    lanes.place(old)
    new.probed = lanes.probe(new.model, [])
    route_calls.clear()
    lanes.prune([active, new])  # the replaced canary drained and was freed
    join_route_threads()
    assert route_calls.threads and set(route_calls.threads) == {"flywheel-route"}
    route_calls.clear()
    assert lanes.place(new) is lane and lane.members == [active, new]
    assert route_calls.threads == []  # placed on the probe made again


def test_probes_beside_freed_models_are_forgotten(tiny_model_dir: Path,
                                                  models: dict[str, Path]) -> None:
    """A canary loaded but not yet placed (no request asked for it) holds its probes' routed
    models, and so the probed members' weights: a freed member's go with it."""
    active, canary = Group(load(tiny_model_dir), "policy-0"), Group(load(models["policy-1"]), "c")
    lanes = Lanes()
    lanes.place(active)
    canary.probed = lanes.probe(canary.model, [])
    freed = weakref.ref(active.model)
    lanes.prune([canary])  # the active version drained and was freed (``Groups.retire``)
    del active.model
    gc.collect()
    assert freed() is None
    assert lanes.place(canary).members == [canary]


@pytest.mark.slow
@pytest.mark.parametrize("served_before", [True, False])
async def test_a_canary_is_probed_where_it_is_loaded_not_between_decode_steps(
        tiny_model_dir: Path, models: dict[str, Path], route_calls: RouteCalls,
        served_before: bool) -> None:
    """Routing a canary beside the active policy is checked on every differing weight (a LoRA
    canary's deltas: seconds on a large model): done by ``set_canary``, never by the decode
    thread, whose every stream would wait meanwhile; also when the active policy has served
    nothing yet (no lane)."""
    threads = route_calls.threads
    eng = await engine_on(tiny_model_dir, ignore_eos=True)
    try:
        if served_before:
            await ask(eng, "Hello!", GREEDY, "warm", canary=False)  # the active policy's lane
        await eng.set_canary(str(models["policy-1"]), "policy-1")
        assert threads and "flywheel-decode" not in threads
        results = await asyncio.gather(*(ask(eng, "Hello!", GREEDY, f"r{i}", canary=i % 2 == 1)
                                         for i in range(4)))
        assert [r["versions"] for r in results] == [{"policy-0"}, {"policy-1"}] * 2
        assert "flywheel-decode" not in threads
        assert len(list(eng._core._scheduler._lanes)) == 1  # type: ignore[attr-defined]
    finally:
        await eng.stop()


@pytest.mark.slow
async def test_a_probe_that_fails_where_the_canary_loads_leaves_it_to_the_decode_thread(
        tiny_model_dir: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Lanes, model: torch.nn.Module, groups: list[Group]) -> None:
        raise RuntimeError("probe failed")

    monkeypatch.setattr(Lanes, "probe", broken)
    eng = await engine_on(tiny_model_dir, ignore_eos=True)
    try:
        await asyncio.wait_for(eng.set_canary(str(models["policy-1"]), "policy-1"), timeout=60)
        results = await asyncio.gather(*(ask(eng, "Hello!", GREEDY, f"r{i}", canary=i == 1)
                                         for i in range(2)))
        assert [r["versions"] for r in results] == [{"policy-0"}, {"policy-1"}]
        assert len(list(eng._core._scheduler._lanes)) == 1  # type: ignore[attr-defined]
    finally:
        await eng.stop()


@pytest.mark.slow
async def test_active_and_canary_decode_in_one_forward_pass_per_step(
        tiny_model_dir: Path, models: dict[str, Path]) -> None:
    eng = await engine_on(tiny_model_dir, ignore_eos=True)
    try:
        await eng.set_canary(str(models["policy-1"]), "policy-1")
        arms = [False] * 6 + [True]  # a small canary group beside a large active one
        params = SamplingParams(max_tokens=40, temperature=0.0)
        steps = eng.stats().extra["decode_steps"]
        results = await asyncio.gather(*(ask(eng, "Hello!", params, f"r{i}", canary)
                                         for i, canary in enumerate(arms)))
        steps = eng.stats().extra["decode_steps"] - steps
        for canary, result in zip(arms, results, strict=True):
            assert result["versions"] == {"policy-1" if canary else "policy-0"}
            assert len(result["ids"]) == params.max_tokens  # the small group is not starved
        model = eng.canary_model  # type: ignore[attr-defined]
        assert results[-1]["ids"] == greedy_reference(model, chat(eng, "Hello!"), 40, frozenset())
        # Every step decodes both groups: separate forwards would take two steps per token.
        assert steps < 1.5 * params.max_tokens
    finally:
        await eng.stop()


@pytest.mark.slow
@pytest.mark.parametrize("canary", ["policy-1", "shallow"])
async def test_joins_and_leaves_keep_every_row_on_its_own_weights(
        tiny_model_dir: Path, models: dict[str, Path], canary: str) -> None:
    """Requests of both arms join and finish at different steps (a join reorders the shared
    batch); a canary of another architecture decodes in a forward of its own."""
    eng = await engine_on(tiny_model_dir)
    try:
        await eng.set_canary(str(models[canary]), canary)
        questions = ["What is 7 plus 5?", "Hello!", "What is the capital of France?"]
        jobs = []
        for i in range(8):
            jobs.append(asyncio.ensure_future(ask(eng, questions[i % 3], GREEDY, f"r{i}",
                                                  canary=i % 3 == 1)))
            await asyncio.sleep(0.01 * (i % 2))
        results = await asyncio.gather(*jobs)
        for i, result in enumerate(results):
            arm = i % 3 == 1
            model = eng.canary_model if arm else eng.model  # type: ignore[attr-defined]
            assert result["versions"] == {canary if arm else "policy-0"}
            assert result["ids"] == greedy_reference(model, chat(eng, questions[i % 3]), 12,
                                                     eng.eos_token_ids)
    finally:
        await eng.stop()


@pytest.mark.parametrize(("sources", "old", "moves"), [
    ([[0, 1, 2, 3, 16], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]], 16, 1),  # a join
    ([[0, 2, 3], [4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15]], 16, 3),  # one leaves each member
    ([[0, 1, 5], [2, 6], [3, 4, 7]], 5, 3),  # three members, one joins each
    ([[1, 2, 3, 4, 5, 6, 7]], 8, 1),  # one member: the first row left
])
def test_runs_in_place_keep_members_together_and_move_few_rows(
        sources: list[list[int]], old: int, moves: int) -> None:
    placed = _runs_in_place(sources, old)
    start = 0
    for rows, want in zip(placed, sources, strict=True):
        assert sorted(rows) == sorted(want)  # each member's rows, in a run of its own
        for place, src in enumerate(rows, start):
            assert src >= old or src == place or src not in range(start, start + len(rows))
        start += len(rows)
    order = [src for rows in placed for src in rows]
    moved = [src for place, src in enumerate(order) if src < old and src != place]
    assert len(moved) == moves


@pytest.mark.slow
async def test_an_ended_canary_leaves_its_lane_and_its_weights_are_freed(
        tiny_model_dir: Path, models: dict[str, Path]) -> None:
    eng = await engine_on(tiny_model_dir, ignore_eos=True)
    long, short = (SamplingParams(max_tokens=n, temperature=0.0) for n in (300, 20))
    try:
        await eng.set_canary(str(models["policy-2"]), "policy-2")
        weights = weakref.ref(eng.canary_model)  # type: ignore[attr-defined]
        first, active = await started_stream(eng, long, "a")  # the active group joins first
        on_canary = await started_stream(eng, short, "c", canary=True)
        await eng.end_canary()
        assert {d.policy_version for d in await rest(*on_canary)} == {"policy-2"}
        await until(lambda: eng.stats().extra["policy_versions"] == ["policy-0"])
        deltas = [first] + [d async for d in active]  # its lane lost a member meanwhile
        assert sum(len(d.token_ids) for d in deltas) == long.max_tokens
        assert {d.policy_version for d in deltas} == {"policy-0"}
        after = await ask(eng, "Hello!", GREEDY, "after", canary=True)
        assert after["versions"] == {"policy-0"}
        gc.collect()
        assert weights() is None
    finally:
        await eng.stop()
