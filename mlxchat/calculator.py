"""The calculator tool: what the model may compute between `<|python_start|>` and
`<|python_end|>`, and the engine hook that answers it.

Same reach as nanochat's `use_calculator`: arithmetic on numbers (`+ - * / //`, unary signs,
parentheses; commas in numbers are dropped first, so "1,000" is 1000; no `**`) and a string
literal's `.count(...)`. nanochat checks characters and then calls `eval`; here the
expression is parsed with `ast` and evaluated by our own walker that only knows those nodes,
so names, calls, attributes, subscripts, lambdas, comprehensions and dunders cannot run at
all: they are not refused by a pattern, they simply have no meaning.

Bounded work instead of SIGALRM: nanochat's alarm only works in the main thread, and the web
server generates in a worker thread. Without `**`, the largest value an expression of
`MAX_EXPRESSION_CHARS` characters can build has about that many digits (far below the 4300
digits where `str()` of an int gives up), and every operation
is on numbers (never `"a" * n`), so each step is cheap; the walker also checks a deadline
between nodes, which works in any thread.
"""

from __future__ import annotations

import ast
import operator
import time
from typing import Callable

from mlxchat.engine import Tool

MAX_EXPRESSION_CHARS = 1000
TIME_LIMIT_S = 1.0

_BINARY: dict[type, Callable] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}
_UNARY: dict[type, Callable] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _Refused(Exception):
    """The expression is outside what the calculator computes (or took too long)."""


def calculate(expression: str, time_limit_s: float = TIME_LIMIT_S) -> int | float | None:
    """The value of a calculator expression, or None when it is refused or fails (division by
    zero, overflow, too long, too slow), as nanochat's `use_calculator` returns None. The
    answer is always a number: a bare string literal is no calculation (nanochat refuses
    string expressions without `.count(`)."""
    if not isinstance(expression, str):
        return None
    expression = expression.replace(",", "").strip()
    if not expression or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(expression, mode="eval")
        return _Evaluator(time.monotonic() + time_limit_s).number(tree.body)
    except (_Refused, SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError, TypeError):
        return None


class _Evaluator:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def value(self, node: ast.AST):
        if time.monotonic() > self.deadline:
            raise _Refused("time limit")
        if isinstance(node, ast.Constant):
            if type(node.value) in (int, float, str):
                return node.value
            raise _Refused(f"constant {node.value!r}")
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](self.number(node.left), self.number(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](self.number(node.operand))
        if isinstance(node, ast.Call):
            return self.count(node)
        raise _Refused(type(node).__name__)

    def number(self, node: ast.AST) -> int | float:
        value = self.value(node)
        if type(value) not in (int, float):
            raise _Refused("arithmetic on a non-number")
        return value

    def count(self, node: ast.Call) -> int:
        """`"literal".count(sub)`, the one call there is (start/end bounds cannot be written:
        their commas are dropped with the number separators)."""
        func = node.func
        if not (isinstance(func, ast.Attribute) and func.attr == "count" and isinstance(func.value, ast.Constant)
                and isinstance(func.value.value, str)) or node.keywords or len(node.args) != 1:
            raise _Refused("only a string literal's .count(...) can be called")
        sub = self.value(node.args[0])
        if not isinstance(sub, str):
            raise _Refused(".count takes a string")
        return func.value.value.count(sub)


def calculator_tool(tokenizer) -> Tool:
    """The engine's `tool` hook for the calculator: when a row's last token is
    `<|python_end|>`, evaluate the text since the matching `<|python_start|>` and force
    `<|output_start|>`, the result's `str()`, `<|output_end|>` into that row (nothing when the
    calculator refuses, so the model carries on unanswered, as in nanochat)."""
    python_start = tokenizer.encode_special("<|python_start|>")
    python_end = tokenizer.encode_special("<|python_end|>")
    output_start = tokenizer.encode_special("<|output_start|>")
    output_end = tokenizer.encode_special("<|output_end|>")

    def tool(tokens: list[int]) -> list[int]:
        if not tokens or tokens[-1] != python_end:
            return []
        start = _last_index(tokens, python_start, len(tokens) - 1)
        if start is None or _last_index(tokens, python_end, len(tokens) - 1, stop=start) is not None:
            return []
        result = calculate(tokenizer.decode(tokens[start + 1 : -1]))
        if result is None:
            return []
        return [output_start, *tokenizer.encode(str(result)), output_end]

    return tool


def _last_index(tokens: list[int], token: int, end: int, stop: int = -1) -> int | None:
    """Index of the last `token` in tokens[stop+1:end], or None."""
    for i in range(end - 1, stop, -1):
        if tokens[i] == token:
            return i
    return None
