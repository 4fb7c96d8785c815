"""Render a model's jinja chat template with limits on work and size, as well as jinja's sandbox.

jinja2's ``ImmutableSandboxedEnvironment`` blocks escapes (private attributes, mutation) but not
resource use: two nested ``range(100000)`` loops run 10^10 iterations, ``"x" * 3000000000``
allocates 3 GB. Here every render has a budget:

- work: each loop iteration, call and operator counts one step (building a value one more per
  4096 characters or items, measuring one per 4 items);
  at most ``MAX_STEPS`` steps and ``MAX_SECONDS`` seconds;
- size: no string or list built by the template (operators, filters, methods, ``~``, blocks)
  may exceed ``max_size`` characters (items for lists), nor may the output; all it builds
  together may reach ``ALLOCATION_FACTOR * max_size``. ``max_size`` is ``MAX_SIZE`` plus four
  times the size of the messages rendered, so long conversations still render. Checks run
  before the allocation where the size can be known in advance (``*``, ``+``, padding
  widths, ``join``, ``replace``, ``indent``).

Loops and ``~`` are guarded by rewriting the parsed template (each ``for`` iterates through a
counting iterator, each ``~`` calls a checked join); operators through
``SandboxedEnvironment.call_binop``, calls through ``call``, filters by wrapping each one.
Any failure becomes a one-line ``ValueError`` naming the template's source.
"""

from __future__ import annotations

import functools
import math
import re
import string
import time
from collections.abc import Iterable, Iterator
from typing import Any

from ropekit.loading.gguf_header import printable

MAX_STEPS = 1_000_000
MAX_SECONDS = 10.0
MAX_SIZE = 1 << 20  # characters (or list items) of anything the template builds, and of its output
MAX_TEMPLATE_CHARS = 1 << 20
MAX_RANGE = 100_000  # items of one range()
MAX_INT_BITS = 1 << 16  # integers the template computes
ALLOCATION_FACTOR = 32  # everything built in one render, in units of the size limit

_LOOP, _CONCAT = "__ropekit_loop", "__ropekit_concat"


class ChatTemplateLimit(ValueError):
    """A chat template went past one of the render limits."""


def _size(value: Any, limit: int) -> tuple[int, int]:
    """``(size, nodes visited)``: characters of strings plus items of containers in ``value`` (nested),
    counted up to ``limit + 1``."""
    total, visits, stack = 0, 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        visits += 1
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, dict):
            total += 1 + len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 1 + len(item)
            stack.extend(item)
        else:
            total += 1
    return total, visits


class _Budget:
    """Steps, sizes and the total built by one render; raises ``ChatTemplateLimit`` past any of them.

    ``max_size``: characters (items) of any one value and of the output; everything the template
    builds together may reach ``ALLOCATION_FACTOR * max_size``.
    """

    def __init__(self, max_size: int):
        self.steps, self.allocated, self.start = 0, 0, time.monotonic()
        self.max_size, self.max_allocated = max_size, ALLOCATION_FACTOR * max_size

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_STEPS:
            raise ChatTemplateLimit(f"more than {MAX_STEPS} steps (loop iterations, calls, operations)")
        if self.steps & 1023 < n and time.monotonic() - self.start > MAX_SECONDS:
            raise ChatTemplateLimit(f"rendering took more than {MAX_SECONDS:g} s")

    def limit(self, size: int, what: str) -> None:
        if size > self.max_size:
            raise ChatTemplateLimit(f"{what} would have {size} characters or items (at most {self.max_size})")

    def room(self, size: int, what: str) -> None:
        """Refuse a value of ``size`` characters or items before it is built; count it as built."""
        self.limit(size, what)
        self.allocated += size
        if self.allocated > self.max_allocated:
            raise ChatTemplateLimit(f"the template built more than {self.max_allocated} characters or items in all")
        self.step(1 + size // 4096)

    def measure(self, value: Any) -> int:
        """The size of ``value`` (see ``_size``); walking it costs a step per 4 nodes."""
        size, visits = _size(value, self.max_size)
        self.step(visits // 4)
        return size

    def check(self, value: Any, what: str) -> Any:
        """``value`` if it is within the size limit (checked after it was built)."""
        if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
            self.room(self.measure(value), what)
        elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
            raise ChatTemplateLimit(f"{what} gave an integer of {value.bit_length()} bits (at most {MAX_INT_BITS})")
        return value

    def ints(self, args: Iterable[Any], what: str) -> None:
        """Numeric arguments (widths, counts) must not exceed the size limit."""
        for arg in args:
            if isinstance(arg, (int, float)) and not isinstance(arg, bool) and abs(arg) > self.max_size:
                raise ChatTemplateLimit(f"{what} argument {arg} is larger than {self.max_size}")

    def iterate(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            self.step()
            yield item


# ---------------------------------------------------------------- format strings


def _format_widths(fmt: str) -> list[int]:
    """The numbers in the ``{...:spec}`` fields of a ``str.format`` string (nested specs included)."""
    numbers, pending = [], [fmt]
    while pending:
        text = pending.pop()
        for _, field_name, spec, _ in string.Formatter().parse(text):
            if field_name is not None and spec:
                numbers.extend(int(n) for n in re.findall(r"\d+", spec))
                pending.append(spec)
    return numbers


_PERCENT = re.compile(r"%[#0\- +]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?[a-zA-Z%]")


def _percent_widths(fmt: str) -> list[int]:
    """Widths and precisions of a ``%`` format string (``*`` counts as unbounded)."""
    numbers = []
    for width, precision in _PERCENT.findall(fmt):
        for text in (width, precision):
            numbers.append(math.inf if text == "*" else int(text or 0))
    return numbers


def _check_widths(budget: _Budget, numbers: list[float], what: str) -> None:
    if numbers and max(numbers) > budget.max_size:
        raise ChatTemplateLimit(f"{what} has a field width above {budget.max_size}")


# ---------------------------------------------------------------- operators, filters, methods


def _check_binop(budget: _Budget, op: str, left: Any, right: Any) -> None:
    """Refuse ``left op right`` if its result would be too large (sizes known before computing it)."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    sized = (str, list, tuple)
    repeat = (left, right) if isinstance(left, sized) and is_int(right) else (right, left)
    if op == "*" and isinstance(repeat[0], sized) and is_int(repeat[1]):
        budget.room(budget.measure(repeat[0]) * max(repeat[1], 0), "'*' of a sequence")
    elif op == "*" and is_int(left) and is_int(right):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise ChatTemplateLimit(f"'*' would give an integer above {MAX_INT_BITS} bits")
    elif op == "**" and is_int(left) and is_int(right) and right > 0:
        if right * max(left.bit_length() - 1, 0) > MAX_INT_BITS or right > MAX_INT_BITS:
            raise ChatTemplateLimit(f"'**' would give an integer above {MAX_INT_BITS} bits")
    elif op == "+" and isinstance(left, sized) and isinstance(right, sized):
        budget.room(budget.measure(left) + budget.measure(right), "'+'")
    elif op == "%" and isinstance(left, str):
        _check_widths(budget, _percent_widths(left), "a '%' format")
        args = right if isinstance(right, tuple) else (right,)
        budget.room(len(left) + sum(budget.measure(a) for a in args), "a '%' format")


def _check_str_method(budget: _Budget, name: str, text: str, args: tuple, kwargs: dict) -> None:
    """Pre-checks for the ``str`` methods whose result can be much larger than their inputs
    (iterator arguments must have been made lists: see ``_materialize``)."""
    budget.ints([*args, *kwargs.values()], f"str.{name}()")
    if name == "join" and args and isinstance(args[0], (str, list, tuple, dict, set, frozenset)):
        budget.room(budget.measure(args[0]) + len(text) * len(args[0]), "str.join()")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        budget.room(len(text) + (text.count(args[0]) if args[0] else len(text) + 1) * len(args[1]), "str.replace()")
    elif name == "expandtabs":
        width = args[0] if args else kwargs.get("tabsize", 8)
        budget.room(len(text) + text.count("\t") * int(width), "str.expandtabs()")
    elif name in ("translate", "maketrans"):
        raise ChatTemplateLimit(f"str.{name}() is not available in chat templates")


_FILTER_CHECKS = {}


def _filter_check(name: str):
    def register(check):
        _FILTER_CHECKS[name] = check
        return check
    return register


def _materialize(budget: _Budget, value: Any) -> Any:
    """An iterator as a list (counted a step per item), so that checking its size does not consume it."""
    return list(budget.iterate(value)) if isinstance(value, Iterator) else value


@_filter_check("join")
def _join_filter(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> None:
    if isinstance(value, (str, list, tuple, dict, set, frozenset)):
        sep = args[0] if args else kwargs.get("d", "")
        budget.room(budget.measure(value) + len(str(sep)) * len(value), "the join filter")


@_filter_check("wordwrap")
def _wordwrap_filter(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> None:
    wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring")
    if isinstance(wrap, str):
        budget.room(len(str(value)) * (1 + len(wrap)), "the wordwrap filter")


@_filter_check("replace")
def _replace_filter(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> None:
    if isinstance(value, str) and len(args) >= 2:
        _check_str_method(budget, "replace", value, tuple(str(a) for a in args[:2]), {})


@_filter_check("format")
def _format_filter(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> None:
    if isinstance(value, str):
        _check_binop(budget, "%", value, tuple(args) or kwargs)


@_filter_check("indent")
def _indent_filter(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> None:
    width = args[0] if args else kwargs.get("width", 4)
    lines = str(value).count("\n") + 1
    budget.room(len(str(value)) + lines * (len(width) if isinstance(width, str) else int(width)), "the indent filter")


@_filter_check("tojson")
def _tojson_filter(budget: _Budget, value: Any, args: tuple, kwargs: dict) -> None:
    indent = args[0] if args else kwargs.get("indent")
    if isinstance(indent, int) and indent > 0:
        size = budget.measure(value)
        budget.room(size * 8 + size * indent * min(size, 64), "the tojson filter")


def _guarded_filter(budget: _Budget, name: str, func: Any) -> Any:
    """``func`` with its size arguments checked before the call and its result after."""
    check = _FILTER_CHECKS.get(name)

    @functools.wraps(func)  # keeps jinja's pass_context / pass_environment marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        offset = 1 if hasattr(func, "jinja_pass_arg") else 0
        if check is not None and len(args) > offset:
            args = (*args[:offset], _materialize(budget, args[offset]), *args[offset + 1:])
        value, rest = (args[offset] if len(args) > offset else None), args[offset + 1:]
        budget.step()
        budget.ints([*rest, *kwargs.values()], f"the {name} filter")
        if check is not None:
            check(budget, value, rest, kwargs)
        return budget.check(func(*args, **kwargs), f"the {name} filter")

    return guarded


# ---------------------------------------------------------------- the environment


def _environment(budget: _Budget):
    """A fresh sandboxed environment whose operators, calls, filters and ``range`` obey ``budget``."""
    from jinja2.exceptions import TemplateError
    from jinja2.runtime import Macro
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+", "%", "**"})  # also keeps them from being folded at compile time

        def call_binop(self, context, op, left, right):
            budget.step()
            _check_binop(budget, op, left, right)
            return budget.check(super().call_binop(context, op, left, right), f"'{op}'")

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            budget.step()
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):
                args = tuple(_materialize(budget, a) for a in args)
                _check_str_method(budget, getattr(__obj, "__name__", "?"), owner, args, kwargs)
            elif not isinstance(__obj, Macro) and not any(__obj is g for g in guards):
                budget.ints([*args, *kwargs.values()], f"{getattr(__obj, '__name__', 'a function')}()")
            return budget.check(super().call(__context, __obj, *args, **kwargs), "a call")

        def wrap_str_format(self, value):
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None

            def checked(*args, **kwargs):
                _check_widths(budget, _format_widths(value.__self__), "a str.format() string")
                budget.room(len(value.__self__) + budget.measure([args, kwargs]), "str.format()")
                return budget.check(wrapped(*args, **kwargs), "str.format()")

            checked.__name__ = value.__name__
            return checked

    def concat(pieces: Iterable[Any]) -> str:
        pieces = [str(p) for p in pieces]
        budget.room(sum(len(p) for p in pieces), "a block's output")
        return "".join(pieces)

    def tilde(*pieces: Any) -> str:
        return concat(pieces)

    def bounded_range(*args: int) -> range:
        items = range(*args)
        if len(items) > MAX_RANGE:
            raise ChatTemplateLimit(f"range{args} has {len(items)} items (at most {MAX_RANGE})")
        return items

    bounded_range.__name__ = "range"

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    iterate = budget.iterate
    guards = (iterate, tilde)
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.concat = concat
    env.filters = {name: _guarded_filter(budget, name, f) for name, f in env.filters.items()}
    env.globals.pop("lipsum", None)
    env.globals.update({"range": bounded_range, "raise_exception": raise_exception, _LOOP: iterate,
                        _CONCAT: tilde})
    return env


def _guard_tree(tree):
    """Rewrite a parsed template: every ``for`` iterates through the budget, every ``~`` is a checked join."""
    from jinja2 import nodes
    from jinja2.visitor import NodeTransformer

    class Guard(NodeTransformer):
        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = nodes.Call(nodes.Name(_LOOP, "load"), [node.iter], [], None, None, lineno=node.lineno)
            return node

        def visit_Concat(self, node):
            node = self.generic_visit(node)
            return nodes.Call(nodes.Name(_CONCAT, "load"), node.nodes, [], None, None, lineno=node.lineno)

    return Guard().visit(tree)


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    lineno = getattr(err, "lineno", None)
    return f"{text} (line {lineno})" if lineno else text


def render_bounded(template: str, variables: dict[str, Any], source: str = "chat template") -> str:
    """``template`` rendered with ``variables``, within the limits above.

    ValueError, one line naming ``source``, for a template that is not a string, too long, does not
    parse, fails while rendering (``raise_exception`` included) or goes past a limit.
    """
    if not isinstance(template, str):
        raise ValueError(f"{source} = {type(template).__name__}: a chat template must be a string")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"{source} = {len(template)} characters: at most {MAX_TEMPLATE_CHARS}")
    budget = _Budget(MAX_SIZE + 4 * _size(variables, 1 << 40)[0])
    try:
        env = _environment(budget)
        compiled = env.from_string(_guard_tree(env.parse(template)))
        out, length = [], 0
        for piece in compiled.generate(**variables):
            length += len(piece)
            budget.limit(length, "the output")
            out.append(piece)
        return "".join(out)
    except (Exception, RecursionError) as err:  # jinja's errors, and whatever the template's operations raise
        raise ValueError(printable(f"{source}: {type(err).__name__}: {_one_line(err)}", 1000)) from None

