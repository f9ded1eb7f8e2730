"""``klq-convert``: convert GPT-NeoX, GPT-2, Llama and DistilBERT checkpoints between Hugging Face and klq_jax.

A thin command-line layer over :mod:`klq_jax.models.hf` (see there for the formats)::

    klq-convert hf-to-flax  HF_DIR  OUT_DIR  [--dtype bfloat16] [--value-head --seed 0]
    klq-convert flax-to-hf  OUR_DIR OUT_DIR  [--tokenizer DIR] [--max-shard-size 5GB] [--dtype float32]

(``python -m convert …`` from the repository root does the same.) Bad input exits with status 2 and
one message naming the file and what to do. SRC and DST must not overlap (DST is replaced whole,
never while SRC is inside it).
"""

from __future__ import annotations

import argparse
import sys
import warnings

DESCRIPTION = """\
Convert checkpoints between Hugging Face and klq_jax (Flax).

  hf-to-flax SRC DST   SRC: a local Hugging Face model directory (config.json + model.safetensors,
                       sharded model-*.safetensors + index, or pytorch_model*.bin), one of
                       {archs}.
                       DST: a klq_jax checkpoint (klq_config.json + params.safetensors; the
                       original config.json is kept as hf_config.json, tokenizer files are copied).
                       Load it with klq_jax.models.hf.load_flax(DST).

  flax-to-hf SRC DST   SRC: a klq_jax checkpoint. DST: config.json + model.safetensors (sharded
                       above --max-shard-size) + generation_config.json that
                       transformers.AutoModelForCausalLM (or, for a reward model,
                       AutoModelForSequenceClassification).from_pretrained(DST) loads.
                       A value head is written beside as value_head.safetensors.

Weights are read tensor by tensor; remote code is never run. Nothing is downloaded: pass local
directories (e.g. from `huggingface-cli download EleutherAI/pythia-1b-deduped --local-dir DIR`).
"""

EPILOG = """\
examples:
  klq-convert hf-to-flax ./pythia-1b-deduped ./ckpt/pythia-1b --dtype bfloat16 --value-head
  klq-convert flax-to-hf ./ckpt/policy ./policy-hf --tokenizer ./pythia-1b-deduped --max-shard-size 2GB
"""

_DTYPES = ("float32", "bfloat16", "float16")


def _archs_text() -> str:
    from klq_jax.models.hf import ARCHS

    return "; ".join(f"{a.model_type}: {', '.join(h.hf_arch for h in a.heads)}" for a in ARCHS.values())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klq-convert",
        description=DESCRIPTION.replace("{archs}", _archs_text()),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{hf-to-flax,flax-to-hf}")

    h2f = sub.add_parser(
        "hf-to-flax",
        help="Hugging Face model directory -> klq_jax checkpoint",
        description="Convert a local Hugging Face model directory to a klq_jax checkpoint.",
    )
    h2f.add_argument("src", metavar="SRC", help="Hugging Face model directory (with config.json)")
    h2f.add_argument("dst", metavar="DST", help="output klq_jax checkpoint directory")
    h2f.add_argument(
        "--dtype", choices=_DTYPES, default="float32",
        help="compute dtype recorded in the config (bfloat16 on accelerators; default float32)",
    )
    h2f.add_argument(
        "--param-dtype", choices=_DTYPES, default="float32",
        help="storage dtype of the parameters (default float32)",
    )
    h2f.add_argument(
        "--value-head", action="store_true",
        help="add a value head (from SRC/value_head.safetensors if present, else random from --seed)",
    )
    h2f.add_argument("--seed", type=int, default=0, help="PRNG seed of a new value head (default 0)")
    h2f.add_argument("--strict", action="store_true", help="fail on unexpected tensors instead of warning")
    h2f.add_argument("--overwrite", action="store_true", help="replace DST if it exists")

    f2h = sub.add_parser(
        "flax-to-hf",
        help="klq_jax checkpoint -> Hugging Face directory (transformers loads it)",
        description="Convert a klq_jax checkpoint to a Hugging Face model directory.",
    )
    f2h.add_argument("src", metavar="SRC", help="klq_jax checkpoint directory (klq_config.json + params.safetensors)")
    f2h.add_argument("dst", metavar="DST", help="output Hugging Face model directory")
    f2h.add_argument(
        "--tokenizer", metavar="DIR", default=None,
        help="copy tokenizer files from DIR (default: those kept in SRC, if any)",
    )
    f2h.add_argument(
        "--max-shard-size", default="5GB",
        help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB)",
    )
    f2h.add_argument(
        "--dtype", choices=_DTYPES, default=None,
        help="storage dtype of the written tensors (default: the checkpoint's param dtype)",
    )
    f2h.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return parser


def _hf_to_flax(args) -> str:
    import jax

    from klq_jax.models import hf

    hf.refuse_overlap(args.src, args.dst)
    config, _, params = hf.load_hf(
        args.src,
        dtype=args.dtype,
        param_dtype=args.param_dtype,
        value_head=args.value_head,
        key=jax.random.key(args.seed),
        strict=args.strict,
    )
    hf.save_flax(
        args.dst,
        config,
        params,
        hf_config=hf.read_hf_config(args.src),
        tokenizer_dir=args.src,
        overwrite=args.overwrite,
    )
    return f"wrote {args.dst}: {type(config).__name__} ({hf.arch_of_config(config).model_type})"


def _flax_to_hf(args) -> str:
    from pathlib import Path

    from klq_jax.models import hf

    hf.refuse_overlap(args.src, args.dst)
    config, _, params = hf.load_flax(args.src)
    tokenizer = args.tokenizer
    if tokenizer is None and any((Path(args.src) / n).is_file() for n in hf.TOKENIZER_FILES[:5]):
        tokenizer = args.src
    hf.save_hf(
        args.dst,
        config,
        params,
        tokenizer_dir=tokenizer,
        max_shard_size=args.max_shard_size,
        dtype=args.dtype,
        hf_config=hf.read_flax_hf_config(args.src),
        overwrite=args.overwrite,
    )
    return f"wrote {args.dst}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``klq-convert``; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from klq_jax.models.hf import ConversionError

    warnings.simplefilter("default")
    try:
        msg = _hf_to_flax(args) if args.command == "hf-to-flax" else _flax_to_hf(args)
    except ConversionError as e:
        print(f"klq-convert {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permissions, disk full, ...
        print(f"klq-convert {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
