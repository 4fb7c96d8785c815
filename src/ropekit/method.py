"""Methods: one string names a rope type, an attention variant, or both (``--method`` on the CLI).

Grammar: ``PART[+PART]``, each ``PART`` being ``NAME[:key=value[,key=value...]]`` (values are
JSON where they parse: numbers, true/false, ``[lists]``). At most one rope part and one
attention part:

- rope types (``none``/``default``, ``linear``, ``ntk``, ``dynamic``, ``yarn``, ``dynamic_yarn``,
  ``longrope``, ``llama3``, ``proportional``): e.g. ``yarn:factor=2``.
- attention variants (``ropekit.attention.ATTENTION_VARIANTS``): ``self-extend:group=G,window=W``,
  ``graded-self-extend:windows=[W0,W1,...],groups=[G0,G1,...]`` (one group per band of distances),
  ``rerope:window=w[,logn=true]``, ``leaky-rerope:window=w,k=K[,logn=true]`` (all accept
  ``chunk=N``, queries per block), ``dca[:chunk=S,local=W]`` (Dual Chunk Attention: S the chunk size,
  W the local window, defaults from the trained length L: S = 3L/4, W = L/8; ``block=N`` queries
  per block). ``consistent`` (cache-consistent dynamic scaling: every cached
  key re-rotated with the current frequencies) joins a ``dynamic`` or ``dynamic_yarn`` rope part:
  ``dynamic:factor=2+consistent``; without it a dynamic type behaves as in transformers.

Examples: ``none``, ``dynamic:factor=2+consistent``, ``self-extend:group=8,window=1024``,
``yarn:factor=2+self-extend:group=4,window=1024``. A method without a rope part keeps the model's
own rope. Attention variants re-rotate keys on use, so with a dynamic rope type they are always
cache-consistent.

``parse_method`` checks the grammar, the names and every key's value and range at once, with
no model; the rope part is validated again against the model's geometry (head dim, base,
trained length) by ``Method.rope_config(base)`` once the model is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ropekit.attention.base import AttentionVariant
from ropekit.attention.registry import ATTENTION_VARIANTS, VariantParams
from ropekit.rope import ROPE_TYPES, RopeConfig, parse_part

DYNAMIC_TYPES = ("dynamic", "dynamic_yarn")


@dataclass(frozen=True)
class Method:
    """A parsed method: the rope part (HF ``rope_parameters`` with a canonical ``rope_type``, or None =
    keep the model's) and the attention part (a canonical variant name and its parameters, or None)."""

    text: str
    rope: dict[str, Any] | None = None
    attention: str | None = None
    attention_params: VariantParams | None = None

    @property
    def attention_name(self) -> str:
        """The attention part's name; ``"rope"`` for the model's plain rope attention."""
        return self.attention or "rope"

    def rope_config(self, base: RopeConfig) -> RopeConfig:
        """The rope of a model whose own rope is ``base``: ``base`` itself, or the spec's rope type with
        ``base``'s geometry (validated against it: ValueError naming the key)."""
        return base if self.rope is None else base.with_rope_type(self.rope)

    def variant(self) -> AttentionVariant | None:
        """A new instance of the attention variant, or None for plain rope attention."""
        if self.attention is None:
            return None
        return ATTENTION_VARIANTS[self.attention].build(self.attention_params)

    def __str__(self) -> str:
        return self.text


def _known_names() -> str:
    return f"rope types: {', '.join(ROPE_TYPES.known())}; attention variants: {', '.join(ATTENTION_VARIANTS.known())}"


def parse_method(method: str | Method) -> Method:
    """Parse a method string (see the module docstring); any problem raises a ValueError naming the part and key."""
    if isinstance(method, Method):
        return method
    if not isinstance(method, str) or not method.strip():
        raise ValueError(f"a method must be 'NAME[:key=value,...][+NAME...]', got {method!r}")
    rope: dict[str, Any] | None = None
    attention, attention_params = None, None
    for part in (p.strip() for p in method.split("+")):
        if not part:
            raise ValueError(f"method {method!r}: empty part around '+'")
        raw = parse_part(part)
        name = str(raw.pop("rope_type")).strip().lower()
        if name in ATTENTION_VARIANTS:
            if attention is not None:
                raise ValueError(f"method {method!r}: at most one attention variant")
            attention = ATTENTION_VARIANTS.resolve(name)
            attention_params = ATTENTION_VARIANTS[attention].params.parse(raw)
            continue
        if name not in ROPE_TYPES:
            raise ValueError(f"method {method!r}: unknown name {name!r}; {_known_names()}")
        if rope is not None:
            raise ValueError(f"method {method!r}: at most one rope type")
        rope_type = ROPE_TYPES.resolve(name)
        ROPE_TYPES[rope_type].params.check_keys(rope_type, raw, unknown="error")
        rope = {"rope_type": rope_type, **raw}
    if attention == "consistent" and rope is not None and rope["rope_type"] not in DYNAMIC_TYPES:
        raise ValueError(f"method {method!r}: consistent applies to {' / '.join(DYNAMIC_TYPES)} rope types only "
                         f"(the others do not change with the length), got {rope['rope_type']!r}")
    return Method(text=method.strip(), rope=rope, attention=attention, attention_params=attention_params)
