"""A multiple-choice exam of the team's own, from its documents, in codefuse-devops-eval's layout.

One teacher request per chunk for ~1 question per 600 characters (at most 3): a question the chunk
answers, its answer, three distractors drawn from the same documents (the prompt lists the other sections' headings of the subject as material), an
explanation. An item is kept when the JSON parses, the four options are distinct and non-empty, the
answer is grounded in the chunk (as for `data qa`) and the question is no near-duplicate. The right
option's letter is drawn from a generator seeded by the question text, so letters spread evenly and a
rerun writes the same file.

Written as DevOps-Eval does (`eval/exam.py` reads it): DIR/{dev,test}/<Subject>.csv with
`id,question,A,B,C,D,answer,explanation`, the first 5 items of each subject in dev (the k-shot
exemplars), the rest in test, and DIR/categroy_mapping.json (sic, as upstream names it).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from pathlib import Path

from devops_cli.data.chunk import Chunk
from devops_cli.data.generate import write_atomic
from devops_cli.data.qa import Settings, Tally, fill, grounding, language, load_prompt
from devops_cli.data.teacher import NOT_ASKED, Teacher, parse_json

HEADER = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
DEV = 5


async def items_of(chunk: Chunk, topics: str, teacher: Teacher, settings: Settings, tally: Tally,
                   chars_per_item: int = 600, max_items: int = 3) -> list[dict]:
    lang = language(chunk.text) if settings.language == "auto" else settings.language
    n = max(1, min(max_items, round(len(chunk.text) / chars_per_item)))
    prompt = fill(load_prompt("exam", lang, settings.prompts_dir), title=chunk.title, heading=chunk.heading or "-",
                  text=chunk.text, topics=topics or "-", n=n)
    reply = await teacher.ask([{"role": "user", "content": prompt}])
    if reply.text is None:
        tally.reject(reply.error if reply.error == NOT_ASKED else "teacher failed")
        return []
    got = parse_json(reply.text)
    items = got.get("items") if got else None
    if not isinstance(items, list):
        tally.reject("not JSON")
        return []
    return [it for raw in items[:max_items] if (it := check_item(raw, chunk, settings, tally))]


def check_item(raw, chunk: Chunk, settings: Settings, tally: Tally) -> dict | None:
    """A checked item, its options shuffled; duplicates are dropped afterwards, in order (qa.drop_duplicates)."""
    raw = raw if isinstance(raw, dict) else {}
    q, a, wrong, why = raw.get("question"), raw.get("answer"), raw.get("distractors"), raw.get("explanation", "")
    if not (isinstance(q, str) and isinstance(a, str) and isinstance(wrong, list) and isinstance(why, str | type(None))):
        tally.reject("not JSON")
        return None
    tally.questions += 1
    options = [str(x).strip() for x in [a, *wrong[:3]]]
    if len(wrong) < 3 or not all(options) or len({o.lower() for o in options}) < 4 or not q.strip():
        tally.reject("bad options")
        return None
    if grounding(a, chunk.text) < settings.min_grounding:
        tally.reject("not grounded")
        return None
    rng = random.Random(int(hashlib.sha256(q.encode("utf-8")).hexdigest()[:16], 16))
    right = rng.randrange(4)
    distractors = options[1:]
    rng.shuffle(distractors)
    letters = distractors[:right] + [options[0]] + distractors[right:]
    return {"question": q.strip(), "options": letters, "answer": "ABCD"[right], "explanation": (why or "").strip(),
            "source": chunk.source}


def csv_text(items: list[dict]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(HEADER)
    for i, it in enumerate(items):
        w.writerow([i, it["question"], *it["options"], it["answer"], it["explanation"]])
    return out.getvalue()


def write_layout(folder: Path, subjects: dict[str, list[dict]]) -> dict:
    """{subject: items} -> dev/ and test/ CSVs + categroy_mapping.json in `folder`, each file written
    under a temporary name and renamed. Returns the mapping."""
    mapping = {}
    for split in ("dev", "test"):
        (folder / split).mkdir(parents=True, exist_ok=True)
    for name, items in subjects.items():
        file = f"{name}.csv"
        dev, test = items[:DEV], items[DEV:]
        write_atomic(folder / "dev" / file, csv_text(dev))
        write_atomic(folder / "test" / file, csv_text(test))
        mapping[file] = [name, name, {"dev": len(dev), "test": len(test)}, file]
    write_atomic(folder / "categroy_mapping.json", json.dumps(mapping, ensure_ascii=False, indent=1) + "\n")
    return mapping
