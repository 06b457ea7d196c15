"""Several datasets in one run, in the proportions asked for (LLaMA-Factory's keys and meanings):

- mix_strategy: concat — one after another (the default; shuffling mixes them);
  interleave_under — sampled by interleave_probs until the first dataset runs out;
  interleave_over — sampled until the last one runs out, the others repeated.
- interleave_probs: "0.8,0.2" — one probability per dataset, in `dataset` order (default: equal turns).

Domain data alone makes a model forget what it knew (LLaMA-Factory #2611); mixing general text back
in is the usual remedy. Each example carries the index of its dataset (column `mix_source`) until it
is tokenized, so the run reports the proportions it really trained on, by tokens: in the data line
of the log and in metrics.json (data.mix). In memory that is every token of the built set; streaming,
every token read from the stream (by rank 0: all of them when rank 0 dispatches batches).
"""

from __future__ import annotations

from devops_cli.errors import DevopsError

SOURCE = "mix_source"


def probabilities(text: str | None, n: int, where: str) -> list[float] | None:
    """interleave_probs as floats (None: not set); DevopsError when it does not fit `n` datasets."""
    if text is None or str(text).strip() == "":
        return None
    try:
        probs = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise DevopsError(f"interleave_probs must be comma-separated numbers, got {text!r}", where,
                          "e.g. interleave_probs: 0.8,0.2") from None
    if len(probs) != n:
        raise DevopsError(f"interleave_probs has {len(probs)} value(s) for {n} dataset(s)", where,
                          "give one probability per name in `dataset`, in the same order")
    if any(p <= 0 for p in probs):
        raise DevopsError(f"interleave_probs must all be > 0, got {text!r}", where, "drop a dataset instead of giving it 0")
    if abs(sum(probs) - 1) > 1e-6:
        raise DevopsError(f"interleave_probs must sum to 1, got {sum(probs):g}", where,
                          f"e.g. {','.join(f'{p / sum(probs):.3g}' for p in probs)}")
    return probs


def combine(parts: list, names: list[str], strategy: str, probs_text: str | None, seed: int, where: str):
    """The datasets (all in memory, or all streams) as one, each example tagged with its dataset's index."""
    import datasets

    if len(parts) == 1:
        return parts[0]
    tagged = []
    for i, part in enumerate(parts):
        if isinstance(part, datasets.IterableDataset):
            tagged.append(part.map(lambda batch, i=i: {SOURCE: [i] * len(next(iter(batch.values())))}, batched=True))
        else:
            tagged.append(part.add_column(SOURCE, [i] * len(part)))
    if strategy == "concat":
        return datasets.concatenate_datasets(tagged)
    probs = probabilities(probs_text, len(parts), where)
    return datasets.interleave_datasets(tagged, probabilities=probs, seed=seed,
                                        stopping_strategy="first_exhausted" if strategy == "interleave_under" else "all_exhausted")


def count(mix: dict, names: list[str], sources, lengths) -> dict:
    """Add tokens per dataset to `mix` ({name: {"tokens", "share"}}) in place; shares recomputed."""
    for s, n in zip(sources, lengths):
        entry = mix.setdefault(names[int(s)], {"tokens": 0, "share": 0.0})
        entry["tokens"] += int(n)
    total = sum(e["tokens"] for e in mix.values()) or 1
    for e in mix.values():
        e["share"] = round(e["tokens"] / total, 4)
    return mix


def line(mix: dict) -> str:
    return "mix by tokens: " + ", ".join(f"{name} {e['share'] * 100:.1f}% ({e['tokens']:,})" for name, e in mix.items())
