"""fastest_in_turns: the ways take turns going first, and each keeps its fastest run."""

from foreseer.bench.turns import fastest_in_turns


def test_turns_rotate_and_the_fastest_run_counts():
    calls: list[str] = []
    times = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 6.0, 4.0])}

    def way(name: str):
        def run() -> tuple[str, float]:
            calls.append(name)
            return name, next(times[name])
        return run

    best = fastest_in_turns({"a": way("a"), "b": way("b")}, 3, lambda result: result[1])
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert best == {"a": ("a", 1.0), "b": ("b", 4.0)}
