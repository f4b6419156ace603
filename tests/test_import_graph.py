"""The package's import graph: no cycles, and each layer imports only the layers below it.

Counted: every import that runs, at module level or inside a function, plus the package `__init__` that importing
a submodule runs first. Not counted: imports under `if TYPE_CHECKING:`, which only name types for annotations.
"""

from __future__ import annotations

import grimp
import networkx as nx
import pytest

# Layers from the bottom up: a module may import modules of its own layer or below, never above. A module belongs
# to the longest prefix listed. Siblings in one layer (spec and lengths, bench and training) must not form a cycle.
LAYERS = [
    # foreseer.lora's root exports only LoRARequest: a new module under it starts here until it is placed.
    # foreseer.structured: the grammar libraries behind one protocol, for the sampler; it knows nothing above.
    ["foreseer.config", "foreseer.registry", "foreseer.outputs", "foreseer.sampling_params", "foreseer.extensions",
     "foreseer.lora", "foreseer.structured"],
    ["foreseer.attention"],
    # The layers apply LoRA in their forward pass: the forward-time pieces of foreseer.lora sit with them.
    ["foreseer.layers", "foreseer.lora.context", "foreseer.lora.ops", "foreseer.lora.backends",
     "foreseer.lora.triton_ops"],
    ["foreseer.models"],
    ["foreseer.core"],
    # Adapters, their memory and admission: above the block manager and the scheduler.
    ["foreseer.lora.adapter", "foreseer.lora.host_cache", "foreseer.lora.device_slots", "foreseer.lora.manager",
     "foreseer.lora.admission", "foreseer.lora.shipped"],
    ["foreseer.worker"],
    ["foreseer.spec", "foreseer.lengths"],
    ["foreseer.engine"],
    ["foreseer.llm", "foreseer.lengths.batching", "foreseer"],  # the Python API; batching drives an LLM
    ["foreseer.server"],
    ["foreseer.bench", "foreseer.training"],
    ["foreseer.cli"],
]
RANK = {prefix: rank for rank, layer in enumerate(LAYERS) for prefix in layer}
# What the bottom of the stack (the model code) must never reach, however indirectly.
MODEL_CODE = ("foreseer.models", "foreseer.layers", "foreseer.attention")
ABOVE_MODEL_CODE = ("foreseer.engine", "foreseer.core", "foreseer.spec", "foreseer.lengths", "foreseer.worker",
                    "foreseer.lora.manager", "foreseer.lora.host_cache", "foreseer.lora.device_slots",
                    "foreseer.lora.admission", "foreseer.lora.adapter", "foreseer.server",
                    "foreseer.llm", "foreseer.cli", "foreseer.bench", "foreseer.training")


def rank_of(module: str) -> int:
    prefix = max((p for p in RANK if module == p or module.startswith(p + ".")), key=len)
    return RANK[prefix]


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    imports = grimp.build_graph("foreseer", exclude_type_checking_imports=True, cache_dir=None)
    edges = nx.DiGraph()
    for module in imports.modules:
        edges.add_node(module)
        for imported in imports.find_modules_directly_imported_by(module):
            # Importing a.b.c runs a/__init__ and a/b/__init__ first; a module's own packages are already running.
            parts = imported.split(".")
            for end in range(1, len(parts) + 1):
                target = ".".join(parts[:end])
                if target != module and not module.startswith(target + "."):
                    edges.add_edge(module, target)
    return edges


def test_graph_covers_the_package(graph):
    assert {"foreseer.core.request", "foreseer.engine.engine", "foreseer.worker.model_runner",
            "foreseer.models.llama", "foreseer.training.train_medusa"} <= set(graph)
    assert graph.has_edge("foreseer.engine.engine", "foreseer.core.scheduler")


def test_no_import_cycles(graph):
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}; e.g. {nx.find_cycle(graph.subgraph(cycles[0]))}"


def test_every_module_has_a_layer(graph):
    for module in graph:
        assert any(module == p or module.startswith(p + ".") for p in RANK), f"{module} is in no layer"


def test_layers_import_only_downwards(graph):
    upward = [f"{a} -> {b}" for a, b in graph.edges if rank_of(b) > rank_of(a)]
    assert not upward, "imports of a higher layer:\n" + "\n".join(sorted(upward))


def test_model_code_never_reaches_the_engine(graph):
    for module in (m for m in graph if m.startswith(MODEL_CODE)):
        reached = nx.descendants(graph, module)
        bad = sorted(m for m in reached if m.startswith(ABOVE_MODEL_CODE))
        assert not bad, f"{module} imports (directly or not) {bad}"


def test_serving_path_never_imports_training_or_benchmarks(graph):
    for module in ("foreseer", "foreseer.server.app", "foreseer.engine.async_engine"):
        reached = nx.descendants(graph, module)
        assert not [m for m in reached if m.startswith(("foreseer.training", "foreseer.bench", "foreseer.cli"))]


def test_registries_name_real_plug_ins():
    """Each registered name imports the class it names, and the class answers to that name."""
    from foreseer.registry import ATTENTION_BACKENDS, DRAFT_PROPOSERS, SCHEDULING_POLICIES

    for registry in (SCHEDULING_POLICIES, DRAFT_PROPOSERS, ATTENTION_BACKENDS):
        for name in registry:
            assert registry[name].name == name
        with pytest.raises(KeyError, match=registry.kind):
            registry["no-such-plug-in"]
