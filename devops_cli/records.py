"""Every record of every local dataset file, checked before any worker starts: what the data pipeline
(data.py) will read from it, by the entry's formatting and columns. Files are streamed (a line at a
time for JSON lines, text and CSV), so a 10 GB corpus costs one read, not its size in memory; a JSON
array file is parsed whole, as the datasets library does too.

Problems come back as `file:line: what is wrong` (1-based lines; `file (record N)` in a JSON array),
all at once, at most MAX_PER_FILE per file.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from devops_cli.dataset_info import DatasetEntry
from devops_cli.errors import DevopsError, first_line

MAX_PER_FILE = 3


def problems(entry: DatasetEntry) -> list[DevopsError]:
    """One error per distinct problem (the first record that has it; how many more do), at most
    MAX_PER_FILE distinct problems per file."""
    out: list[DevopsError] = []
    for path in entry.files:
        first: dict[str, str] = {}  # message -> where it was first seen
        repeats: dict[str, int] = {}
        other = 0
        for where, message in _file_problems(entry, path):
            if message in first:
                repeats[message] += 1
            elif len(first) < MAX_PER_FILE:
                first[message], repeats[message] = where, 0
            else:
                other += 1
        for message, where in first.items():
            more = [f"{repeats[message]} more record(s) like it"] if repeats[message] else []
            out.append(DevopsError(message, where, "; ".join(more) or None))
        if other and out:
            out[-1].hint = "; ".join(filter(None, [out[-1].hint, f"{other} other problem(s) in {path.name}"]))
    return out


def _file_problems(entry: DatasetEntry, path: Path):
    if path.stat().st_size == 0:
        yield str(path), "data file is empty — add examples"
        return
    if entry.loader == "parquet":
        yield from _parquet(entry, path)
        return
    try:
        if entry.loader == "text":
            with open(path, encoding="utf-8") as f:
                for _ in f:
                    pass
        elif entry.loader == "csv":
            yield from _csv(entry, path)
        elif entry.loader == "json":
            yield from _json(entry, path)
    except UnicodeDecodeError as e:
        yield str(path), f"not UTF-8 text (byte {e.start} of a line cannot be decoded: a binary file?)"


def json_records(path: Path):
    """(where, record, problem) for every record of a JSON-lines file (streamed) or a JSON array file
    (parsed whole): problem is None, or why the record (then None) could not be read. The one JSON
    reader of data files (training data and quantize's calibration files)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                yield f"{path}:{e.lineno}", None, f"invalid JSON: {e.msg}"
                return
            for i, record in enumerate(records if isinstance(records, list) else [records], 1):
                yield f"{path} (record {i})", record, None
            return
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path}:{n}", json.loads(line), None
                except json.JSONDecodeError as e:
                    yield f"{path}:{n}", None, f"invalid JSON line: {e.msg} (column {e.colno}) — one JSON object per line"


def _json(entry: DatasetEntry, path: Path):
    seen = same = 0
    for where, record, problem in json_records(path):
        seen += 1
        found = [problem] if problem else record_problems(entry, record)
        for message in found:
            yield where, message
        if not found and entry.ranking and not entry.kto:
            same += record[entry.columns["chosen"]] == record[entry.columns["rejected"]]
    if not seen:
        yield str(path), "no records"
    elif same == seen:
        yield str(path), (f"chosen equals rejected in every record ({seen}): there is no preference to learn — "
                          f"check the '{entry.columns['chosen']}' and '{entry.columns['rejected']}' columns")


def _csv(entry: DatasetEntry, path: Path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for role in _needed(entry):
            if entry.columns[role] not in header:
                yield f"{path}:1", _missing(entry, role, header)
                return
        for record in reader:
            if None in record:  # more cells than the header has
                yield f"{path}:{reader.line_num}", f"{len(header) + len(record[None])} cells, the header has {len(header)}"


def _parquet(entry: DatasetEntry, path: Path):
    """Column names and types from the file's schema (no rows read)."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        yield str(path), f"not a readable parquet file: {first_line(e)}"
        return
    for role in _needed(entry):
        if entry.columns[role] not in schema.names:
            yield str(path), _missing(entry, role, schema.names)


def _needed(entry: DatasetEntry) -> list[str]:
    if entry.ranking:
        needed = ["messages", "kto_tag"] if entry.kto else (
            ["prompt", "chosen", "rejected"] if entry.formatting == "alpaca" else ["messages", "chosen", "rejected"])
    else:
        needed = {"pt": ["prompt"], "alpaca": ["prompt", "response"], "sharegpt": ["messages"]}[entry.formatting]
    return needed + [role for role in sorted(entry.explicit) if role not in needed]


def _missing(entry: DatasetEntry, role: str, present) -> str:
    col = entry.columns[role]
    return (f"column '{col}' ({role}) missing in dataset '{entry.name}'; columns are {', '.join(map(str, present))} "
            f'(map it in dataset_info.json: "columns": {{"{role}": "<column>"}})')


def record_problems(entry: DatasetEntry, record) -> list[str]:
    """What data.py could not read in one JSON record, by the entry's formatting."""
    if not isinstance(record, dict):
        return [f"a record must be a JSON object, got {_kind(record)}"]
    c = entry.columns
    out = []
    for role in _needed(entry):
        if c[role] not in record:
            out.append(_missing(entry, role, record))
    if out:
        return out
    if entry.formatting == "pt":
        return _string(record, c["prompt"], "prompt", required=True)
    if entry.ranking:
        return _ranking(entry, record)
    if entry.formatting == "sharegpt":
        return _messages(entry, record.get(c["messages"])) or _tool_use(entry, record)
    out += _string(record, c["prompt"], "prompt", required=False)
    out += _string(record, c["response"], "response", required=False)
    for role in ("query", "system"):
        if c[role] in record:
            out += _string(record, c[role], role, required=False)
    history = record.get(c["history"])
    if history is not None:
        if not isinstance(history, list):
            out.append(f"'{c['history']}' (history) must be a list of [question, answer] pairs, got {_kind(history)}")
        else:
            for i, pair in enumerate(history, 1):
                if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) or x is None for x in pair)):
                    out.append(f"'{c['history']}' (history) item {i} must be a [question, answer] pair of strings, "
                               f"got {json.dumps(pair, ensure_ascii=False)[:60]}")
                    break
    return out


def _ranking(entry: DatasetEntry, record: dict) -> list[str]:
    """Preference records: alpaca prompt/query + chosen/rejected strings; sharegpt messages ending
    with a user turn + chosen/rejected assistant messages; KTO: messages ending with the answer + a
    true/false kto_tag."""
    c, tags = entry.columns, entry.tags
    tool_roles = {tags["function_tag"], tags["observation_tag"], "tool", "function"}
    if entry.formatting == "sharegpt" and isinstance(record.get(c["messages"]), list) and any(
            isinstance(m, dict) and (m.get(tags["role_tag"]) in tool_roles or m.get("tool_calls"))
            for m in record[c["messages"]]):
        return [f"'{c['messages']}' (messages) holds tool calls or results: preference data of tool use is not "
                "supported (train tool use with sft)"]
    if entry.kto:
        out = _messages(entry, record.get(c["messages"]))
        messages = record.get(c["messages"])
        if not out and messages[-1].get(tags["role_tag"]) != tags["assistant_tag"]:
            out.append(f"'{c['messages']}' (messages) must end with the {tags['assistant_tag']} answer that kto_tag rates")
        if not isinstance(record.get(c["kto_tag"]), bool):
            out.append(f"'{c['kto_tag']}' (kto_tag) must be true or false, got {_kind(record.get(c['kto_tag']))}")
        return out
    if entry.formatting == "alpaca":
        out = []
        for role in ("prompt", "query", "system", "chosen", "rejected"):
            if c[role] in record:
                out += _string(record, c[role], role, required=role in ("chosen", "rejected"))
        return out
    out = _messages(entry, record.get(c["messages"]))
    messages = record.get(c["messages"])
    if not out and messages[-1].get(tags["role_tag"]) != tags["user_tag"]:
        out.append(f"'{c['messages']}' (messages) must end with the {tags['user_tag']} turn that chosen/rejected answer")
    for role in ("chosen", "rejected"):
        answer = record.get(c[role])
        if isinstance(answer, list) and len(answer) == 1:
            answer = answer[0]
        if not (isinstance(answer, dict) and answer.get(tags["role_tag"]) == tags["assistant_tag"]
                and isinstance(answer.get(tags["content_tag"]), str)):
            out.append(f"'{c[role]}' ({role}) must be one {tags['assistant_tag']} message "
                       f"{{\"{tags['role_tag']}\": \"{tags['assistant_tag']}\", \"{tags['content_tag']}\": \"...\"}}, "
                       f"got {json.dumps(answer, ensure_ascii=False)[:60]}")
    return out


def _string(record: dict, col: str, role: str, required: bool) -> list[str]:
    value = record.get(col)
    if isinstance(value, str) or (value is None and not required):
        return []
    return [f"'{col}' ({role}) must be a string, got {_kind(value)}"]


def _messages(entry: DatasetEntry, messages) -> list[str]:
    col, tags = entry.columns["messages"], entry.tags
    if not isinstance(messages, list) or not messages:
        return [f"'{col}' (messages) must be a non-empty list of messages, got {_kind(messages)}"]
    roles = {tags["user_tag"], tags["assistant_tag"], tags["system_tag"], tags["function_tag"], tags["observation_tag"],
             "tool", "function"}
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            return [f"'{col}' message {i} must be an object with '{tags['role_tag']}' and '{tags['content_tag']}', got {_kind(m)}"]
        if m.get(tags["role_tag"]) not in roles:
            return [f"'{col}' message {i}: unknown {tags['role_tag']} {m.get(tags['role_tag'])!r} (expected one of "
                    f"{', '.join(sorted(roles))}; set \"tags\" in dataset_info.json for other names)"]
        content = m.get(tags["content_tag"])
        if not (isinstance(content, str) or content is None):
            return [f"'{col}' message {i}: '{tags['content_tag']}' must be a string, got {_kind(content)}"]
    return []


def _tool_use(entry: DatasetEntry, record: dict) -> list[str]:
    """A sharegpt record's tools and calls: the tools column is OpenAI tools (or LLaMA-Factory's bare
    functions, a JSON string of them too); each call (a function_tag turn, an assistant message's
    tool_calls, or its function_call in OpenAI's older form that ToolLearning uses) has JSON-object arguments
    and names a tool the record defines; a tool result (observation, tool or function role) follows a call."""
    from devops_cli import tools as tool_rules

    c, tags = entry.columns, entry.tags
    out = []
    try:
        known = tool_rules.names(tool_rules.normalize_tools(record.get(c["tools"])))
    except ValueError as e:
        return [f"'{c['tools']}' (tools): {e}"]
    after_call = False
    for i, m in enumerate(record[c["messages"]], 1):
        role = m.get(tags["role_tag"])
        calls = m.get(tags["content_tag"]) if role == tags["function_tag"] else (
            m.get("tool_calls") or m.get("function_call") if role == tags["assistant_tag"] else None)
        if role in (tags["observation_tag"], "tool", "function"):
            if not after_call:
                out.append(f"'{c['messages']}' message {i}: a tool result ({role}) that follows no tool call")
            continue
        after_call = bool(calls)
        if not calls:
            if role == tags["function_tag"]:
                out.append(f"'{c['messages']}' message {i}: an empty {role} turn (expected the JSON of a call)")
            continue
        try:
            found = tool_rules.data_calls(calls)
        except ValueError as e:
            out.append(f"'{c['messages']}' message {i}: {e}")
            continue
        defined = ", ".join(known) or f"the record has no '{c['tools']}' column"
        for call in found:
            if call["name"] not in known:
                out.append(f"'{c['messages']}' message {i}: a call to '{call['name']}', which is not among the "
                           f"record's tools ({defined})")
    return out


def _kind(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
             float: "a number", type(None): "null"}  # fmt: skip
    return names.get(type(value), type(value).__name__)
