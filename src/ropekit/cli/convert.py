"""``ropekit convert`` (rope settings from one runtime's format into another's) and ``ropekit plan``
(parameters of every method family for a target length, optionally measured)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ropekit.cli.common import add_model, add_progress, add_threads, apply_threads

TARGET_CHOICES = ("hf", "hf-legacy", "gguf", "llama.cpp", "vllm", "all")


def add_parsers(subparsers) -> None:
    conv = subparsers.add_parser(
        "convert", help="translate rope settings between HF, GGUF, llama.cpp and vLLM; rewrite a GGUF's rope",
        description="Translate rope settings (a method on a model, an HF config.json, a GGUF file's "
                    "metadata or llama.cpp flags) into HF v5 / v4 JSON, GGUF metadata, llama.cpp flags or vLLM "
                    "overrides; with --to gguf --out, write a copy of the model's GGUF with the new rope.")
    add_model(conv)
    source = conv.add_mutually_exclusive_group()
    source.add_argument("--method", metavar="METHOD", help="a method, on the geometry of --model")
    source.add_argument("--hf-config", metavar="FILE", help="an HF config.json (v4 rope_scaling or v5 rope_parameters)")
    source.add_argument("--gguf", metavar="FILE", help="a GGUF file's rope metadata (and rope_freqs tensor)")
    source.add_argument("--llama-cpp", metavar="FLAGS",
                        help="llama.cpp flags, applied to --model's own rope (a single flag that starts with a "
                             "dash: --llama-cpp=--rope-scale=2)")
    conv.add_argument("--to", choices=TARGET_CHOICES, required=True, help="the target format")
    conv.add_argument("--arch", default=None, help="GGUF architecture of the keys (default: the model's, or llama)")
    conv.add_argument("--out", default=None, metavar="NEW.gguf",
                      help="with --to gguf: write a copy of --model (a .gguf) with the new rope settings")
    conv.set_defaults(func=run_convert)

    plan = subparsers.add_parser("plan", help="parameters of every method family for a target length",
                                 description="For each method family that can reach --target-length: the parameters "
                                             "from the model's geometry, what they change inside the trained window, "
                                             "and the settings for each runtime; --measure ranks them by perplexity.")
    add_model(plan)
    plan.add_argument("--target-length", type=int, required=True, metavar="N", help="tokens to reach")
    plan.add_argument("--measure", action="store_true",
                      help="measure each candidate: perplexity of one window of the default text")
    plan.add_argument("--budget-tokens", type=int, default=None, metavar="T",
                      help="with --measure: the window length, above the trained length (default: the target length)")
    plan.add_argument("--text", default=None, help="with --measure: a text file (default: Pride and Prejudice)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_threads(plan)
    add_progress(plan)
    plan.set_defaults(func=run_plan)


# ---- where the model's own rope comes from ------------------------------------------------------


def gguf_rope_inputs(path: Path) -> tuple[dict, dict, str]:
    """(metadata, rope factor tensors as float lists, architecture) of a GGUF file."""
    from ropekit.loading.gguf_file import open_gguf, read_metadata, rope_tensors

    reader = open_gguf(path)
    metadata = read_metadata(reader)
    return metadata, rope_tensors(reader), str(metadata.get("general.architecture", "llama"))


def model_rope(source: str):
    """(the model's own RopeConfig, its GGUF architecture or None, its path)."""
    from ropekit.loading import resolve_source
    from ropekit.rope import RopeConfig

    path = resolve_source(source)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        return RopeConfig.from_hf(_read_json(config)), None, path
    metadata, tensors, arch = gguf_rope_inputs(path)
    return RopeConfig.from_gguf(metadata, tensors), arch, path


def _read_json(path: Path) -> dict:
    """A model folder's config.json; ValueError naming the file for any parse failure or a non-object."""
    from ropekit.loading.checks import read_json_object

    return read_json_object(Path(path), MAX_CONFIG_JSON_BYTES)


MAX_CONFIG_JSON_BYTES = 16 << 20


# ---- convert ------------------------------------------------------------------------------------


def run_convert(args: argparse.Namespace) -> int:
    from ropekit.convert import Inexpressible, rewrite_gguf, spec_from_llama_cpp, spec_text, translate, translate_all
    from ropekit.method import parse_method
    from ropekit.rope import RopeConfig

    if args.out is not None and args.to != "gguf":
        raise ValueError("--out writes a GGUF file: use it with --to gguf")
    spec = parse_method(args.method) if args.method else None  # grammar errors before anything is read
    arch, path = None, None
    if args.hf_config:
        base = RopeConfig.from_hf(_read_json(Path(args.hf_config)))
    elif args.gguf:
        metadata, tensors, arch = gguf_rope_inputs(Path(args.gguf))
        base = RopeConfig.from_gguf(metadata, tensors)
    else:
        base, arch, path = model_rope(args.model)
    if args.llama_cpp is not None:
        spec = spec_from_llama_cpp(args.llama_cpp, base)
    spec = spec or parse_method(spec_text(base))
    arch = args.arch or arch or "llama"
    if args.to == "all":
        rows = translate_all(spec, base, arch)
        width = max(len(t) for t, _ in rows)
        print(f"spec {spec.text} on a model with head_dim {base.head_dim}, base {base.rope_theta:g}, trained "
              f"{base.original_max_position_embeddings}")
        for target, text in rows:
            print(f"{target:<{width}}  {text}")
        return 0
    try:
        result = translate(spec, base, args.to, arch)
    except Inexpressible as err:
        print(f"ropekit convert: cannot: {err}", file=sys.stderr)
        return 2
    if args.out is not None:
        if path is None or path.is_dir():
            raise ValueError("--out needs --model FILE.gguf: the file whose copy gets the new rope")
        written = rewrite_gguf(path, args.out, result.value)
        print(f"wrote {written} ({spec.text}); checked by reading it back", file=sys.stderr)
        return 0
    print(result.text)
    for note in result.notes:
        print(f"# {note}", file=sys.stderr)
    return 0


# ---- plan ---------------------------------------------------------------------------------------


def run_plan(args: argparse.Namespace) -> int:
    from ropekit.convert import plan_extension, translate_all

    if args.budget_tokens is not None and args.budget_tokens < 2:
        raise ValueError(f"--budget-tokens must be >= 2, got {args.budget_tokens}")
    apply_threads(args)
    base, arch, _ = model_rope(args.model)
    candidates = plan_extension(base, args.target_length)
    rows = [{"family": c.family, "method": c.method, "reach": c.reach, "in_window": c.in_window, "notes": c.notes,
             "settings": dict(translate_all(c.method, base, arch or "llama"))} for c in candidates]
    if args.measure:
        rows = measure(args, rows)
    if args.json:
        print(json.dumps({"model": str(args.model), "trained_length": base.original_max_position_embeddings,
                          "target_length": args.target_length, "candidates": rows}, indent=1))
        return 0
    print(f"{args.model}: trained length {base.original_max_position_embeddings}, head_dim {base.head_dim}, "
          f"base {base.rope_theta:g}; target {args.target_length} tokens "
          f"({args.target_length / base.original_max_position_embeddings:.3g}x)\n")
    for r in rows:
        measured = ""
        if "ppl_beyond" in r:
            measured = (f"  measured: ppl beyond {r['ppl_beyond']:.2f}, in window {r['ppl_in_window']:.2f} "
                        f"({r['seconds']:.0f} s)")
        print(f"{r['family']:<13} {r['method']}{measured}")
        print(f"{'':<13} inside the trained window: {r['in_window']}")
        for note in r["notes"]:
            print(f"{'':<13} note: {note}")
        for target, text in r["settings"].items():
            print(f"{'':<13} {target:<9} {text}")
        print()
    return 0


def measure(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """Perplexity of each candidate (and of the unscaled model) on one window; ranked best first."""
    from ropekit.convert.plan import rank
    from ropekit.eval.perplexity import evaluate_perplexity
    from ropekit.eval.runners import EngineRunner
    from ropekit.eval.text import encode_text, load_text
    from ropekit.loading import load_model
    from ropekit.progress import Progress

    model, tokenizer = load_model(args.model)
    runner = EngineRunner(model, tokenizer)
    length = args.budget_tokens or args.target_length
    if length <= runner.trained_length:
        raise ValueError(f"--budget-tokens must be above the trained length {runner.trained_length} (the ranking is "
                         f"by the perplexity beyond it), got {length}")
    tokens = encode_text(tokenizer, load_text(args.text))
    if tokens.numel() < length:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than the window of {length}")
    reference = {"family": "none", "method": "none", "reach": runner.trained_length,
                 "in_window": "the model's own rope", "notes": [], "settings": {}}
    measured = []
    for row in [reference, *rows]:
        runner.use(row["method"])
        with Progress(runner.num_layers, f"plan: ppl {row['method']} @ {length}", enabled=not args.no_progress,
                      unit="layers") as bar:
            metrics = evaluate_perplexity(runner, tokens, length, trained=runner.trained_length, progress=bar)
        measured.append({**row, **{k: metrics[k] for k in ("ppl", "ppl_in_window", "ppl_beyond", "seconds")}})
    return [measured[0], *rank(measured[1:])]
