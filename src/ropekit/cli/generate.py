"""``ropekit generate`` (stream a continuation to stdout) and ``ropekit info`` (architecture and rope)."""

from __future__ import annotations

import argparse
import sys

from ropekit.cli.common import add_model, add_runtime, check_runtime

DEFAULT_MAX_NEW_TOKENS = 64


def add_parsers(subparsers) -> None:
    """Register the ``generate`` and ``info`` subcommands."""
    gen = subparsers.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    gen.add_argument("prompt", help="the text to continue (or the user message with --chat)")
    _add_model_args(gen)
    add_runtime(gen)
    gen.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None, metavar="K")
    gen.add_argument("--top-p", type=float, default=None, metavar="P")
    gen.add_argument("--seed", type=int, default=None, metavar="S")
    gen.add_argument("--method", default=None, metavar="METHOD",
                     help="context-extension method, as in 'ropekit eval': e.g. yarn:factor=2, "
                          "self-extend:group=4,window=1024, yarn:factor=2+self-extend:group=4,window=1024")
    gen.add_argument("--no-fast", action="store_true",
                     help="run decode steps as torch ops instead of the fused C++ decode kernels")
    gen.add_argument("--verbose", action="store_true", help="say on stderr which decode path runs")
    gen.set_defaults(func=run_generate)

    info = subparsers.add_parser("info", help="print a model's architecture and rope parameters")
    _add_model_args(info)
    add_runtime(info, backend=False)
    info.set_defaults(func=run_info)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    parser.add_argument("--rope", default=None, metavar="TYPE",
                        help="override the rope type (e.g. yarn, linear, ntk, dynamic, llama3) or a full "
                             "spec 'yarn:factor=2,beta_fast=32'")
    parser.add_argument("--factor", type=float, default=None, metavar="F", help="rope scaling factor")
    parser.add_argument("--original-max-position-embeddings", type=int, default=None, metavar="L",
                        help="trained context length the rope method extends from")


def rope_spec(args: argparse.Namespace) -> str | None:
    """The ``--rope/--factor/--original-max-position-embeddings`` options as one spec string (or None)."""
    if args.rope is None:
        if args.factor is not None or args.original_max_position_embeddings is not None:
            raise ValueError("--factor and --original-max-position-embeddings need --rope TYPE")
        return None
    extras = []
    if args.factor is not None:
        extras.append(f"factor={args.factor}")
    if args.original_max_position_embeddings is not None:
        extras.append(f"original_max_position_embeddings={args.original_max_position_embeddings}")
    if not extras:
        return args.rope
    return args.rope + (", " if ":" in args.rope else ":") + ",".join(extras)


def _load(args: argparse.Namespace):
    from ropekit.loading import load_model

    return load_model(args.model, rope=rope_spec(args), dtype=args.dtype, device=args.device)


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def run_generate(args: argparse.Namespace) -> int:
    from ropekit.method import parse_method

    spec = parse_method(args.method) if args.method else None  # bad specs fail before loading
    if spec is not None and args.rope is not None:
        raise ValueError("give either --method METHOD or --rope TYPE, not both")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    check_runtime(args)
    if args.backend == "transformers":
        return _generate_transformers(args, spec or (parse_method(rope_spec(args)) if args.rope else None))
    from ropekit.model.attention import patch
    from ropekit.model.generate import generate

    model, tokenizer = _load(args)
    if spec is not None:
        patch(model, spec)
    if args.verbose:
        path = "torch ops (--no-fast)" if args.no_fast else model.decode_path()
        print(f"ropekit generate: attention {model.attention.name}, rope {model.config.rope.describe()}; "
              f"decode steps: {path}", file=sys.stderr)
    generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             seed=args.seed, top_k=args.top_k, top_p=args.top_p, stream=_write, chat=args.chat,
             fast=not args.no_fast)
    sys.stdout.write("\n")
    return 0


def _generate_transformers(args: argparse.Namespace, spec) -> int:
    """The same generation in transformers (``ropekit.hf.patch`` for the spec), streamed the same way."""
    from ropekit.eval.runners import TransformersRunner, load_transformers
    from ropekit.loading import load_tokenizer, parse_device, parse_dtype
    from ropekit.model.generate import check_sampling

    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)  # before loading
    tokenizer = load_tokenizer(args.model)
    model = load_transformers(args.model, dtype=parse_dtype(args.dtype), device=parse_device(args.device))
    runner = TransformersRunner(model, tokenizer)
    if spec is not None:
        runner.use(spec)
    if args.verbose:
        print(f"ropekit generate: transformers {type(model).__name__}, attention implementation "
              f"{model.config._attn_implementation}, spec {spec or 'the model own'}", file=sys.stderr)
    runner.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                    top_k=args.top_k, top_p=args.top_p, stream=_write, chat=args.chat)
    sys.stdout.write("\n")
    return 0


def run_info(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args)
    cfg = model.config
    rope = cfg.rope
    n_params = sum(p.numel() for p in model.parameters())
    rows = [
        ("model", str(args.model)),
        ("parameters", f"{n_params / 1e6:.1f} M ({args.dtype}, {args.device})"),
        ("layers", cfg.num_hidden_layers),
        ("hidden size", cfg.hidden_size),
        ("heads (q / kv)", f"{cfg.num_attention_heads} / {cfg.num_key_value_heads}"),
        ("head dim", cfg.head_dim),
        ("mlp size", cfg.intermediate_size),
        ("vocab size", cfg.vocab_size),
        ("tied embeddings", cfg.tie_word_embeddings),
        ("trained context", cfg.max_position_embeddings),
        ("rope type", rope.rope_type),
        ("rope theta", rope.rope_theta),
        ("rotary dim", rope.rotary_dim),
        ("rope parameters", rope.describe()),
        ("attention factor", f"{model.rope.attention_factor:.6g}"),
        ("attention", model.attention.name),
        ("decode path", model.decode_path()),
        ("bos / eos", f"{tokenizer.bos_token_id} / {tokenizer.eos_token_id}"),
        ("chat template", "yes" if tokenizer.chat_template else "no"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0
