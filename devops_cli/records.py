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
from dataclasses import dataclass, field
from pathlib import Path

from devops_cli import reading
from devops_cli.dataset_info import DatasetEntry
from devops_cli.errors import DevopsError, first_line

MAX_PER_FILE = 3
STRUCTURED = ("history", "messages", "chosen", "rejected")  # roles whose CSV cells hold JSON


@dataclass
class Scan:
    """What one pass over a dataset's records found: problems (errors), warnings, and the counts the
    pre-launch checks weigh (records, identical preference pairs, KTO labels)."""

    errors: list[DevopsError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    records: int = 0
    pairs_same: int = 0
    pairs: int = 0
    kto: dict = field(default_factory=lambda: {True: 0, False: 0})
    seen_roles: set = field(default_factory=set)  # optional roles some record has


def problems(entry: DatasetEntry) -> list[DevopsError]:
    return scan(entry).errors


def scan(entry: DatasetEntry) -> Scan:
    """Every record of every local file of `entry`: one error per distinct problem (the first record
    that has it; how many more do), at most MAX_PER_FILE distinct problems per file; warnings and counts."""
    out = Scan()
    for path in entry.files:
        first: dict[str, str] = {}  # message -> where it was first seen
        repeats: dict[str, int] = {}
        other = 0
        errors: list[DevopsError] = []
        for where, message in _file_problems(entry, path, out):
            if message in first:
                repeats[message] += 1
            elif len(first) < MAX_PER_FILE:
                first[message], repeats[message] = where, 0
            else:
                other += 1
        for message, where in first.items():
            more = [f"{repeats[message]} more record(s) like it"] if repeats[message] else []
            errors.append(DevopsError(message, where, "; ".join(more) or None))
        if other and errors:
            errors[-1].hint = "; ".join(filter(None, [errors[-1].hint, f"{other} other problem(s) in {path.name}"]))
        out.errors += errors
    if not out.errors:
        _weigh(entry, out)
    return out


def _weigh(entry: DatasetEntry, s: Scan) -> None:
    """Degenerate data, counted: identical pairs, one-class KTO data, mapped columns no record has."""
    c = entry.columns
    where = str(entry.files[0]) if len(entry.files) == 1 else entry.where
    if entry.ranking and not entry.kto and s.pairs:
        if s.pairs_same == s.pairs:
            s.errors.append(DevopsError(
                f"chosen equals rejected in every record ({s.pairs}): there is no preference to learn", where,
                f"check the '{c['chosen']}' and '{c['rejected']}' columns"))
        elif s.pairs_same:
            s.warnings.append(f"{where}: chosen equals rejected in {s.pairs_same} of {s.pairs} records "
                              "(they teach nothing and dilute the rest)")
    if entry.kto and s.records:
        good, bad = s.kto[True], s.kto[False]
        if not good or not bad:
            kind = "desirable (kto_tag true)" if good else "undesirable (kto_tag false)"
            s.errors.append(DevopsError(f"all {good + bad} KTO records are {kind}: KTO weighs desirable against "
                                        "undesirable answers and needs some of each", where,
                                        "add the other kind, or train desirable answers alone with `devops-model sft`"))
    for role in sorted(entry.explicit - set(_needed(entry)) - s.seen_roles):
        if role in c and entry.loader != "parquet":
            s.warnings.append(f"{entry.where}: column '{c[role]}' ({role}) is mapped but no record has it: read as empty")


def _file_problems(entry: DatasetEntry, path: Path, s: Scan):
    try:
        reading.check_file(path, what="data file")
    except DevopsError as e:
        yield str(path), e.message
        return
    if path.stat().st_size == 0:
        yield str(path), "data file is empty — add examples"
        return
    if entry.loader == "parquet":
        yield from _parquet(entry, path)
        return
    seen = 0
    try:
        for where, record, problem in file_records(entry, path):
            seen += 1
            found = [problem] if problem else record_problems(entry, record)
            for message in found:
                yield where, message
            if not found:
                _count(entry, record, s)
    except (UnicodeDecodeError, reading.NotText) as e:
        yield str(path), reading.not_text(e, path)
        return
    except csv.Error as e:
        yield str(path), f"not a readable CSV file: {first_line(e)}"
        return
    except (OSError, EOFError, ValueError) as e:  # a damaged compressed file
        yield str(path), f"cannot read it: {first_line(e)}"
        return
    s.records += seen
    if not seen:
        yield str(path), "no records"


def _count(entry: DatasetEntry, record: dict, s: Scan) -> None:
    c = entry.columns
    s.seen_roles |= {role for role, col in c.items() if record.get(col) is not None}
    if entry.kto:
        s.kto[bool(record[c["kto_tag"]])] += 1
    elif entry.ranking:
        s.pairs += 1
        s.pairs_same += record[c["chosen"]] == record[c["rejected"]]


def file_records(entry: DatasetEntry, path: Path):
    """(where, record, problem) for every record of a local data file, by its loader: JSON (lines or an
    array), CSV (a header row; empty cells are absent values, JSON in history/messages cells), text (one
    record per line, as datasets' text loader splits them). Read by the one reading rule (reading.py)."""
    if entry.loader == "json":
        yield from json_records(path)
    elif entry.loader == "csv":
        yield from _csv_records(entry, path)
    elif entry.loader == "text":
        col = entry.columns.get("prompt", "text")
        with reading.open_text(path) as f:
            n = 0
            for line in f:
                for part in line.splitlines() or [""]:
                    n += 1
                    yield f"{path}:{n}", {col: part}, None


def json_records(path: Path):
    """(where, record, problem) for every record of a JSON-lines file (streamed) or a JSON array file
    (parsed whole): problem is None, or why the record (then None) could not be read. The one JSON
    reader of data files (training data and quantize's calibration files)."""
    with reading.open_text(path) as f:
        n, line = 0, ""
        for line in f:
            n += 1
            if line.strip():
                break
        if line.lstrip().startswith("["):
            try:
                records = json.loads(line + f.read())
            except json.JSONDecodeError as e:
                yield f"{path}:{e.lineno + n - 1}", None, f"invalid JSON: {e.msg}"
                return
            for i, record in enumerate(records if isinstance(records, list) else [records], 1):
                yield f"{path} (record {i})", record, None
            return
        if line.strip():
            yield _json_line(path, n, line)
        for k, line in enumerate(f, n + 1):
            if line.strip():
                yield _json_line(path, k, line)


def _json_line(path: Path, n: int, line: str):
    try:
        return f"{path}:{n}", json.loads(line), None
    except json.JSONDecodeError as e:
        return f"{path}:{n}", None, f"invalid JSON line: {e.msg} (column {e.colno}) — one JSON object per line"
    except RecursionError:
        return f"{path}:{n}", None, "JSON nested too deeply to read"


def _csv_records(entry: DatasetEntry, path: Path):
    structured = {entry.columns[r] for r in STRUCTURED if r in entry.columns}
    with reading.open_text(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for role in _needed(entry):
            if entry.columns[role] not in header:
                yield f"{path}:1", None, _missing(entry, role, header)
                return
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if None in record:  # more cells than the header has
                yield where, None, f"{len(header) + len(record[None])} cells, the header has {len(header)}"
                continue
            out = {}
            for key, value in record.items():
                if value is None or value == "":
                    value = None  # an empty cell (or a short row): an absent value
                elif key in structured and value.lstrip()[:1] in ("[", "{"):
                    try:
                        value = json.loads(value)
                    except json.JSONDecodeError:
                        pass  # stays a string: record_problems says what it should be
                out[key] = value
            yield where, out, None


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
    """The roles a record cannot do without. Optional ones (query, history, system), mapped or not, may
    be absent or null in any record, as LLaMA-Factory and datasets read them: empty."""
    if entry.ranking:
        return ["messages", "kto_tag"] if entry.kto else (
            ["prompt", "chosen", "rejected"] if entry.formatting == "alpaca" else ["messages", "chosen", "rejected"])
    return {"pt": ["prompt"], "alpaca": ["prompt", "response"], "sharegpt": ["messages"]}[entry.formatting]


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
