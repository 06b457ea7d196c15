"""A renderer for the subset of Go's text/template that the Modelfile TEMPLATEs devops-model writes
use, so an export can check its TEMPLATE against the model's own chat template without ollama.

Semantics follow Go's text/template: `{{-` / `-}}` trim the white space (newlines too) beside them;
`if` / `else if` / `else` / `end`; `range $i, $v := X` (and `range X`, dot = the element);
`$v := X` declares and `$v = X` assigns to the innermost variable of that name; `$` is the data;
truth is Go's (false, 0, nil, "", empty list or map are false); the functions are Go's builtins
`eq ne lt le gt ge and or not len slice index`. Anything else is a TemplateError, so a TEMPLATE using
syntax outside the subset fails the check instead of rendering something ollama would not.
"""

from __future__ import annotations

import re

TOKEN = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
LEXEME = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+)|(?P<var>\$\w*)(?P<vfields>(?:\.\w+)*)'
                    r'|(?P<field>(?:\.\w+)+|\.)|(?P<word>[A-Za-z_]\w*)|(?P<op>:=|=|\(|\)|,))')  # fmt: skip


class TemplateError(ValueError):
    pass


def render(source: str, data) -> str:
    nodes, rest = _parse(_tokens(source), ())
    if rest:
        raise TemplateError(f"unexpected {{{{{rest[0][1]}}}}}")
    out: list[str] = []
    _exec(nodes, data, [{"$": data}], out)
    return "".join(out)


# ----------------------------------------------------------------------------------------------
# Lexing and parsing
# ----------------------------------------------------------------------------------------------
def _tokens(source: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with the trim markers applied to the texts beside them."""
    parts: list[list[str]] = []
    pos = 0
    trim_next = False
    for m in TOKEN.finditer(source):
        text = source[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        parts.append(["text", text])
        action = m.group(2).strip()
        if action.startswith("/*"):
            action = ""  # a comment
        parts.append(["action", action])
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = source[pos:]
    parts.append(["text", tail.lstrip(" \t\r\n") if trim_next else tail])
    return [(k, v) for k, v in parts if not (k == "text" and v == "") and not (k == "action" and v == "")]


def _parse(tokens, stop):
    """Nodes until an action whose first word is in `stop`; returns (nodes, remaining tokens)."""
    nodes = []
    while tokens:
        kind, value = tokens[0]
        if kind == "text":
            nodes.append(("text", value))
            tokens = tokens[1:]
            continue
        word = value.split(None, 1)[0]
        if word in stop:
            return nodes, tokens
        tokens = tokens[1:]
        if word == "if":
            branches = []
            cond = value[2:].strip()
            while True:
                body, tokens = _parse(tokens, ("else", "end"))
                branches.append((cond, body))
                if not tokens:
                    raise TemplateError("an {{if}} has no {{end}}")
                head = tokens[0][1]
                tokens = tokens[1:]
                if head == "end":
                    break
                if head.startswith("else if "):
                    cond = head[len("else if "):].strip()
                elif head == "else":
                    cond = None
                else:
                    raise TemplateError(f"unexpected {{{{{head}}}}}")
            nodes.append(("if", branches))
        elif word == "range":
            spec = value[5:].strip()
            names: list[str] = []
            m = re.match(r"^(\$\w+)\s*(?:,\s*(\$\w+)\s*)?:=\s*(.*)$", spec, re.S)
            if m:
                names = [n for n in (m.group(1), m.group(2)) if n]
                spec = m.group(3)
            body, tokens = _parse(tokens, ("end", "else"))
            if not tokens or tokens[0][1] != "end":
                raise TemplateError("a {{range}} has no {{end}} (range ... else is not in the subset)")
            tokens = tokens[1:]
            nodes.append(("range", names, spec, body))
        elif word in ("end", "else", "define", "template", "block", "with", "break", "continue"):
            raise TemplateError(f"{{{{{value}}}}} is not in the subset devops-model renders")
        else:
            m = re.match(r"^(\$\w+)\s*(:=|=)\s*(.*)$", value, re.S)
            if m:
                nodes.append(("set", m.group(1), m.group(2), m.group(3)))
            else:
                nodes.append(("print", value))
    return nodes, tokens


def _lex(expr: str) -> list[tuple[str, str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        if not expr[pos:].strip():
            break
        m = LEXEME.match(expr, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"cannot read '{expr[pos:]}'")
        kind = m.lastgroup if m.lastgroup != "vfields" else "var"
        if m.group("var") is not None:
            out.append(("var", m.group("var"), m.group("vfields") or ""))
        else:
            out.append((kind, m.group(kind), ""))
        pos = m.end()
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def truth(v) -> bool:
    if v is None or v is False:
        return False
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v != 0
    if isinstance(v, (str, list, tuple, dict)):
        return len(v) > 0
    return True


def _field(obj, name: str):
    if isinstance(obj, dict):
        if name not in obj:
            return None  # a missing map key is the zero value
        return obj[name]
    if not hasattr(obj, name):
        raise TemplateError(f"can't evaluate field {name} in {type(obj).__name__}")
    return getattr(obj, name)


def _lookup(scopes, name):
    for scope in reversed(scopes):
        if name in scope:
            return scope[name]
    raise TemplateError(f"undefined variable: {name}")


def _eq(a, *others):
    return any(a == b for b in others)


def _cmp(op):
    def f(a, b):
        if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
            raise TemplateError(f"incompatible types for comparison: {type(a).__name__} and {type(b).__name__}")
        return op(a, b)

    return f


def _and(*args):
    for a in args:
        if not truth(a):
            return a
    return args[-1]


def _or(*args):
    for a in args:
        if truth(a):
            return a
    return args[-1]


def _slice(x, *idx):
    if len(idx) == 1:
        return x[idx[0]:]
    if len(idx) == 2:
        return x[idx[0]:idx[1]]
    return x


def _index(x, *keys):
    for k in keys:
        if isinstance(x, dict):
            x = x.get(k)
        else:
            if not 0 <= k < len(x):
                raise TemplateError(f"index out of range: {k}")
            x = x[k]
    return x


FUNCS = {"eq": _eq, "ne": lambda a, b: a != b, "lt": _cmp(lambda a, b: a < b), "le": _cmp(lambda a, b: a <= b),
         "gt": _cmp(lambda a, b: a > b), "ge": _cmp(lambda a, b: a >= b), "and": _and, "or": _or,
         "not": lambda a: not truth(a), "len": len, "slice": _slice, "index": _index}  # fmt: skip


def _eval(expr: str, dot, scopes):
    value, rest = _command(_lex(expr), dot, scopes)
    if rest:
        raise TemplateError(f"unexpected '{rest[0][1]}' in '{expr}'")
    return value


def _command(lexemes, dot, scopes):
    """A command: a function applied to its operands, or one operand."""
    if lexemes and lexemes[0][0] == "word" and lexemes[0][1] in FUNCS:
        fn = FUNCS[lexemes[0][1]]
        args, rest = [], lexemes[1:]
        while rest and rest[0][1] != ")":
            arg, rest = _operand(rest, dot, scopes)
            args.append(arg)
        return fn(*args), rest
    return _operand(lexemes, dot, scopes)


def _operand(lexemes, dot, scopes):
    kind, text, fields = lexemes[0]
    rest = lexemes[1:]
    if kind == "op" and text == "(":
        value, rest = _command(rest, dot, scopes)
        if not rest or rest[0][1] != ")":
            raise TemplateError("unclosed (")
        rest = rest[1:]
        if rest and rest[0][0] == "field" and rest[0][1] != ".":  # (x).Field
            value = _fields(value, rest[0][1])
            rest = rest[1:]
        return value, rest
    if kind == "str":
        return _unquote(text), rest
    if kind == "num":
        return int(text), rest
    if kind == "var":
        return _fields(_lookup(scopes, text), fields), rest
    if kind == "field":
        return (dot if text == "." else _fields(dot, text)), rest
    if kind == "word" and text in ("true", "false", "nil"):
        return {"true": True, "false": False, "nil": None}[text], rest
    raise TemplateError(f"function '{text}' is not defined")


def _fields(value, chain: str):
    for name in [n for n in chain.split(".") if n]:
        value = _field(value, name)
    return value


def _unquote(text: str) -> str:
    escapes = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "r": "\r"}
    out, i = [], 1
    while i < len(text) - 1:
        c = text[i]
        if c == "\\":
            out.append(escapes.get(text[i + 1], text[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _print(v) -> str:
    if v is None:
        return "<no value>"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _exec(nodes, dot, scopes, out):
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "print":
            out.append(_print(_eval(node[1], dot, scopes)))
        elif kind == "set":
            _, name, op, expr = node
            value = _eval(expr, dot, scopes)
            if op == ":=":
                scopes[-1][name] = value
            else:
                for scope in reversed(scopes):
                    if name in scope:
                        scope[name] = value
                        break
                else:
                    raise TemplateError(f"undefined variable: {name}")
        elif kind == "if":
            for cond, body in node[1]:
                if cond is None or truth(_eval(cond, dot, scopes)):
                    _exec(body, dot, scopes + [{}], out)
                    break
        elif kind == "range":
            _, names, expr, body = node
            items = _eval(expr, dot, scopes)
            pairs = list(items.items()) if isinstance(items, dict) else list(enumerate(items or []))
            for key, item in pairs:
                scope = {}
                if len(names) == 1:
                    scope[names[0]] = item
                elif len(names) == 2:
                    scope[names[0]], scope[names[1]] = key, item
                _exec(body, item, scopes + [scope], out)
