"""``klq judge``: LLM-as-a-judge win rates of run A over run B (paper §5.3, Fig. 3).

Reads the final validation completions of two runs (``<run>/eval/completions.jsonl``, written by
``klq train ... --eval-every N``; a run directory or the file itself) on the same prompts, shows
every pair to a judge in both orders and writes, under ``--out-dir``:

* ``judgements.jsonl``: every query (pair, order, the judge's choice mapped back to a run, its
  comparison, the raw answer, errors);
* ``judge.jsonl`` / ``judge.md``: per pair of runs, wins / losses / ties / unparseable / failed,
  the win rate of A over B and its Jeffreys interval, per order (A shown first, B shown first) and
  pooled;
* ``judge.png``: one bar per pair of runs (e.g. per τ) with the pooled win rate and its interval
  (paper Fig. 3).

Each is written atomically (a temp file renamed over it). A ``--out-dir`` already holding any of them
(an earlier judgement, or a user's own ``judge.md``) is refused before anything is judged, unless
``--overwrite`` lets the judge replace them (an output name that is a symbolic link is replaced, never
written through; other files stay). The request cache is kept either way: a rerun with
``--overwrite`` sends only the requests it does not hold (the failed ones).

Pairs: ``--a RUN_A1 RUN_A2 --b RUN_B1 RUN_B2`` (zipped), or ``--sweep DIR``: every KLQ run of a
sweep against the PPO run of the same grid point, labelled with its grid values.

Judges (``--judge.backend``): ``http``, an OpenAI-compatible endpoint (``--judge.base-url``,
``--judge.model``, the key in ``$OPENAI_API_KEY`` or ``--judge.api-key-env``; answers cached under
``--judge.cache-dir``, so rerunning an interrupted judgement sends only what is missing), or
``local``, a causal LM checkpoint loaded with klq_jax (``--judge.model PATH``). The judge prompt is
App. F's for the runs' task (``tldr`` or ``hh``), or ``--judge.prompt NAME`` / ``--judge.prompt-file``.

Example::

    export OPENAI_API_KEY=...
    klq judge --sweep runs/sweep-tldr --judge.model gpt-4o-mini --out-dir runs/judge-tldr
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Literal

from klq_jax import judge as J
from klq_jax.errors import ConfigError

__all__ = ["JudgeConfig", "JudgeCommand", "OUTPUTS", "check_out_dir", "load_completions", "make_pairs",
           "make_judge", "run", "main"]

# What a judgement writes in its out_dir (besides the request cache, which every rerun reuses).
OUTPUTS = ("judge.md", "judge.jsonl", "judgements.jsonl", "judge.png")


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """The judge.

    Attributes:
      backend: http (an OpenAI-compatible chat-completions endpoint) or local (a causal LM
        checkpoint loaded with klq_jax).
      base_url: the endpoint's base URL (http).
      model: the judge model: a model name (http; the paper used gpt-4o-mini) or a checkpoint
        directory / hub name (local).
      tokenizer: the local judge's tokenizer (default: the model's directory).
      api_key_env: environment variable with the API key (empty: send none).
      prompt: App. F's judge prompt to use, tldr or hh (default: the runs' task).
      prompt_file: a file with another judge prompt (overrides prompt).
      temperature: the judge's sampling temperature.
      max_tokens: the longest answer (http) / comparison (local).
      structured: ask the endpoint for JSON structured output.
      max_retries: retries after HTTP 429/5xx or a network error.
      backoff_s: first back-off delay in seconds (doubling per retry).
      concurrency: requests in flight at most.
      timeout_s: per-request timeout in seconds.
      cache_dir: where requests and raw answers are cached (default OUT_DIR/cache).
      seed: the local judge's sampling seed.
      batch_size: the local judge's batch size.
    """

    backend: Literal["http", "local"] = "http"
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    tokenizer: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    prompt: Literal["tldr", "hh"] | None = None
    prompt_file: str | None = None
    temperature: float = 0.0
    max_tokens: int = 256
    structured: bool = True
    max_retries: int = 5
    backoff_s: float = 1.0
    concurrency: int = 8
    timeout_s: float = 120.0
    cache_dir: str | None = None
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self):
        from klq_jax.config import SEED_LIMIT, range_problems

        p = [] if self.backend in ("http", "local") else [f"backend={self.backend!r} must be http or local"]
        if self.backend == "http" and not str(self.base_url).startswith(("http://", "https://")):
            p.append(f"base_url={self.base_url!r} must start with http:// or https://")
        p += _text_problems(("model", self.model, False), ("tokenizer", self.tokenizer, True),
                            ("prompt_file", self.prompt_file, True), ("cache_dir", self.cache_dir, True))
        if self.prompt is not None and self.prompt not in J.PROMPTS:
            p.append(f"prompt={self.prompt!r} must be one of {', '.join(J.PROMPTS)} (or --judge.prompt-file)")
        p += range_problems("temperature", self.temperature, 0)
        p += range_problems("max_tokens", self.max_tokens, 1, integer=True)
        p += range_problems("max_retries", self.max_retries, 0, integer=True)
        p += range_problems("backoff_s", self.backoff_s, 0)
        p += range_problems("concurrency", self.concurrency, 1, integer=True)
        p += range_problems("timeout_s", self.timeout_s, 0, low_open=True)
        p += range_problems("seed", self.seed, 0, SEED_LIMIT, integer=True, high_open=True)
        p += range_problems("batch_size", self.batch_size, 1, integer=True)
        if p:
            raise ConfigError("Invalid JudgeConfig: " + "; ".join(p))


def _text_problems(*fields: tuple[str, object, bool]) -> list[str]:
    """``(name, value, none_ok)`` fields that must be a non-blank string (or None if ``none_ok``)."""
    return [f"{name}={value!r} must be a non-empty string{' or None' if none_ok else ''}"
            for name, value, none_ok in fields
            if not (none_ok and value is None) and not (isinstance(value, str) and value.strip())]


@dataclasses.dataclass(frozen=True)
class JudgeCommand:
    """Win rates of run A over run B judged by an LLM, with Jeffreys intervals (paper Fig. 3).

    Attributes:
      a: run A of each pair: run directories or completions files.
      b: run B of each pair (as many as a).
      labels: a label per pair (default: the grid values of a sweep, else the run names).
      sweep: a sweep directory: every KLQ run against the PPO run of the same grid point.
      mode: which completions: greedy or sample (at the training temperature).
      num_prompts: prompts per pair (the first ones of the held-out set; the paper: 32).
      alpha: the Jeffreys interval's level (the paper: 0.2, an 80% interval).
      out_dir: where the judgements, table and plot go.
      overwrite: replace the outputs (judge.md, judge.jsonl, judgements.jsonl, judge.png) that an
        earlier judgement (or anyone) left in out_dir; without it such an out_dir is refused before
        anything is judged. Other files, and the request cache, are kept either way.
      judge: the judge.
    """

    a: tuple[str, ...] = ()
    b: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    sweep: str | None = None
    mode: Literal["greedy", "sample"] = "greedy"
    num_prompts: int = 32
    alpha: float = 0.2
    out_dir: str = "runs/judge"
    overwrite: bool = False
    judge: JudgeConfig = JudgeConfig()

    def __post_init__(self):
        from klq_jax.config import range_problems

        p = [] if self.mode in ("greedy", "sample") else [f"mode={self.mode!r} must be greedy or sample"]
        p += range_problems("num_prompts", self.num_prompts, 1, integer=True)
        p += range_problems("alpha", self.alpha, 0, 1, low_open=True, high_open=True,
                            note="0.2: an 80% interval")
        p += _text_problems(("out_dir", self.out_dir, False), ("sweep", self.sweep, True),
                            *((f"a[{i}]", x, False) for i, x in enumerate(self.a)),
                            *((f"b[{i}]", x, False) for i, x in enumerate(self.b)))
        if self.sweep is not None and (self.a or self.b or self.labels):
            p.append("sweep excludes a, b and labels (the sweep pairs and labels its runs itself)")
        elif len(self.a) != len(self.b):
            p.append(f"a has {len(self.a)} runs and b {len(self.b)}: give as many of each")
        elif self.labels and len(self.labels) != len(self.a):
            p.append(f"labels has {len(self.labels)} labels for {len(self.a)} pairs")
        if p:
            raise ConfigError("Invalid JudgeCommand: " + "; ".join(p))


def _completions_path(source: str) -> str:
    if os.path.isdir(source):
        return os.path.join(source, "eval", "completions.jsonl")
    return source


def load_completions(source: str, mode: str) -> dict[int, dict]:
    """``{index: completion}`` of one run's completions file (a run directory or the file)."""
    path = _completions_path(source)
    if not os.path.exists(path):
        raise J.JudgeError(f"{path} does not exist: train the run with --eval-every N (its final "
                           "validation writes eval/completions.jsonl), or pass the file itself.")
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                c = json.loads(line)
            except ValueError:
                raise J.JudgeError(f"{path}:{n} is not a JSON line.") from None
            if c.get("mode", mode) == mode:
                out[int(c["index"])] = c
    if not out:
        raise J.JudgeError(f"{path} has no completions of mode {mode!r} (use --mode greedy or sample).")
    return out


def make_pairs(a: str, b: str, mode: str, num_prompts: int) -> list[J.Pair]:
    """The first ``num_prompts`` prompts both runs answered, checked to be the same prompts."""
    ca, cb = load_completions(a, mode), load_completions(b, mode)
    common = sorted(set(ca) & set(cb))[:num_prompts]
    if not common:
        raise J.JudgeError(f"{a} and {b} share no prompt index: they were not validated on the same prompts.")
    for i in common:
        if ca[i]["prompt"] != cb[i]["prompt"]:
            raise J.JudgeError(f"Prompt {i} differs between {a} and {b}: the two runs were validated on "
                               "different prompts (another dataset, split or eval_prompts).")
    if len(common) < num_prompts:
        print(f"note: {a} and {b} share {len(common)} prompts (fewer than --num-prompts {num_prompts}).")
    return [J.Pair(i, ca[i]["prompt"], ca[i]["response"], cb[i]["response"]) for i in common]


def _task_kind(source: str) -> str | None:
    d = source if os.path.isdir(source) else os.path.dirname(os.path.dirname(os.path.abspath(source)))
    try:
        with open(os.path.join(d, "config.json")) as f:
            return json.load(f).get("task", {}).get("kind")
    except (OSError, ValueError):
        return None


def instruction_for(cfg: JudgeConfig, run: str) -> str:
    """The judge prompt: ``prompt_file``, else App. F's for ``prompt`` or the run's task."""
    if cfg.prompt_file:
        try:
            with open(cfg.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise J.JudgeError(f"Cannot read --judge.prompt-file {cfg.prompt_file} "
                               f"({getattr(err, 'strerror', None) or err}); pass a text file with the "
                               "judge's instruction.") from None
        if not text.strip():
            raise J.JudgeError(f"--judge.prompt-file {cfg.prompt_file} is empty: write the judge's "
                               "instruction in it, or use App. F's with --judge.prompt tldr|hh.")
        return text
    name = cfg.prompt or _task_kind(run)
    if name not in J.PROMPTS:
        raise J.JudgeError(f"No App. F judge prompt for task {name!r}: pass --judge.prompt tldr|hh or "
                           "--judge.prompt-file FILE.")
    return J.PROMPTS[name]


def make_judge(cfg: JudgeConfig, out_dir: str):
    """The judge object of ``cfg`` (:class:`klq_jax.judge.HTTPJudge` or :class:`~klq_jax.judge.LocalJudge`)."""
    if cfg.backend == "http":
        from klq_jax.errors import RunDirError
        from klq_jax.models.hf.files import cannot_create

        cache = cfg.cache_dir or os.path.join(out_dir, "cache")
        try:
            return J.HTTPJudge(
                cfg.base_url, cfg.model, cache,
                api_key_env=cfg.api_key_env, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                structured=cfg.structured, max_retries=cfg.max_retries, backoff_s=cfg.backoff_s,
                concurrency=cfg.concurrency, timeout_s=cfg.timeout_s,
            )
        except OSError as err:  # the cache directory (made once the API key is found)
            if not cfg.cache_dir and not os.path.isdir(out_dir):  # the --out-dir itself failed
                raise cannot_create(out_dir, err, what="the judge's output directory", option="--out-dir",
                                    error=RunDirError) from err
            raise cannot_create(cache, err, what="the judge's request cache", error=RunDirError,
                                option="--judge.cache-dir" if cfg.cache_dir else "--out-dir") from err
    import jax
    from transformers import AutoTokenizer

    from klq_jax.models.hf.files import tokenizer_files_in
    from klq_jax.models.load import load_model, resolve_source

    tok_dir = resolve_source(cfg.tokenizer or cfg.model)
    if os.path.isdir(tok_dir) and not tokenizer_files_in(tok_dir):
        # transformers would build an empty tokenizer from the model's config alone
        raise J.JudgeError(
            f"No tokenizer files in {tok_dir} (the local judge's tokenizer): pass --judge.tokenizer DIR, a "
            "directory holding tokenizer.json / tokenizer_config.json.")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    _, graphdef, params = load_model(cfg.model, key=jax.random.key(cfg.seed))
    return J.LocalJudge(graphdef, params, tok, max_new_tokens=cfg.max_tokens,
                        temperature=max(cfg.temperature, 1e-6), seed=cfg.seed, batch_size=cfg.batch_size)


def _sweep_pairs(sweep_dir: str) -> list[tuple[str, str, str]]:
    path = os.path.join(sweep_dir, "sweep.jsonl")
    if not os.path.exists(path):
        raise J.JudgeError(f"{path} does not exist: run `klq sweep` with --algos klq ppo first.")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    by = {(r["algo"], r["setting"]): r for r in rows}
    pairs = [(os.path.join(sweep_dir, r["run"]), os.path.join(sweep_dir, by[("ppo", s)]["run"]), s)
             for (algo, s), r in by.items() if algo == "klq" and ("ppo", s) in by]
    if not pairs:
        raise J.JudgeError(f"{path} has no KLQ and PPO runs of the same grid point.")
    return pairs


def check_out_dir(out_dir: str, *, overwrite: bool = False, cache_dir: str | None = None) -> None:
    """Refuse an ``out_dir`` holding any of :data:`OUTPUTS` (a dangling link counts), unless
    ``overwrite``. ``cache_dir``: the request cache, named in the message (a rerun reuses it).

    Raises:
      RunDirError: ``out_dir`` is a file; RunExistsError: the outputs found named, and what to do.
    """
    from klq_jax.errors import RunDirError, RunExistsError

    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise RunDirError(f"--out-dir {out_dir} is not a directory; choose another --out-dir.")
    found = [n for n in OUTPUTS if os.path.lexists(os.path.join(out_dir, n))]
    if found and not overwrite:
        cache = cache_dir or os.path.join(out_dir, "cache")
        raise RunExistsError(
            f"{out_dir} already holds {', '.join(found)} (an earlier judgement, or your own files): pass "
            f"--overwrite to replace them (the request cache {cache} is kept, so a rerun sends only the "
            "requests it lacks), or choose another --out-dir.")


def _write_outputs(out_dir: str, files: dict[str, str], rows: list[dict]) -> None:
    """Write each of ``files`` (name: text), and ``judge.png`` from ``rows``, atomically: a temp
    file beside it renamed over it, so a crash leaves the old file or the new one, never half of
    one, and a name that is a symbolic link is replaced, not written through."""
    from klq_jax.train import run_dir

    from experiments import plots

    for name, text in files.items():
        run_dir.atomic_write(os.path.join(out_dir, name), text)
    tmp = os.path.join(out_dir, f"{run_dir.TMP_PREFIX}{os.getpid()}.judge.png")  # .png: the format
    try:
        plots.plot_win_rates(rows, tmp)
        os.replace(tmp, os.path.join(out_dir, "judge.png"))
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def run(cmd: JudgeCommand, *, judge=None, on_result=None) -> list[dict]:
    """Judge every pair; write the outputs (module docstring); return one summary row per pair.

    Everything that can be checked is checked before the judge is built, before any request and
    before ``cmd.out_dir`` (or the request cache) is created: the settings (when ``cmd`` is
    made), the runs and their completions, the judge prompts, the out_dir; then the judge (its API
    key, its model); a refusal leaves nothing behind.

    Raises:
      ConfigError: a setting out of range (when ``cmd`` is made); RunExistsError: ``cmd.out_dir``
      holds earlier outputs and ``cmd.overwrite`` is not set; RunDirError: ``cmd.out_dir`` is not
      a directory or cannot be created; JudgeError: the runs or the judge cannot be used.
    """
    from klq_jax.errors import RunDirError
    from klq_jax.models.hf.files import make_dir

    if cmd.sweep:
        triples = _sweep_pairs(cmd.sweep)
    else:
        if not cmd.a:
            raise J.JudgeError("Give the runs to compare: --a RUN ... --b RUN ... (as many of each), or --sweep DIR.")
        names = cmd.labels or tuple(f"{os.path.basename(os.path.normpath(x))} vs "
                                    f"{os.path.basename(os.path.normpath(y))}" for x, y in zip(cmd.a, cmd.b))
        triples = list(zip(cmd.a, cmd.b, names))
    work = [(a, b, label, make_pairs(a, b, cmd.mode, cmd.num_prompts), instruction_for(cmd.judge, a))
            for a, b, label in triples]
    check_out_dir(cmd.out_dir, overwrite=cmd.overwrite, cache_dir=cmd.judge.cache_dir)
    judge = judge if judge is not None else make_judge(cmd.judge, cmd.out_dir)
    make_dir(cmd.out_dir, what="the judge's output directory", option="--out-dir", error=RunDirError)
    rows, all_records = [], []
    for i, (a, b, label, pairs, instruction) in enumerate(work, 1):
        print(f"[{i}/{len(work)}] {label}: {len(pairs)} prompts x 2 orders", flush=True)
        records, summary = J.judge_pairs(pairs, judge, instruction, alpha=cmd.alpha, on_result=on_result)
        all_records.extend(dict(r, label=label, a=a, b=b) for r in records)
        rows.append({"label": label, "a": a, "b": b, "mode": cmd.mode, **summary})
    judgements = "".join(json.dumps(r) + "\n" for r in all_records)
    failed = [r for r in all_records if r["status"] == "failed"]
    if failed and len(failed) == len(all_records):  # nothing written: earlier outputs stay whole
        raise J.JudgeError(f"Every judgement failed ({len(failed)} requests), the first with: {failed[0]['error']}; "
                           f"nothing was written to {cmd.out_dir}: check the judge's --judge.base-url, the network "
                           "and the API key, then run the same command again.")
    if failed:
        print(f"warning: {len(failed)} of {len(all_records)} judgements failed (they count as 'failed'; a rerun "
              f"with --overwrite asks again only those), the first with: {failed[0]['error']}", file=sys.stderr)
    _write_outputs(cmd.out_dir, {"judgements.jsonl": judgements,
                                 "judge.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
                                 "judge.md": format_table(rows)}, rows)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown: per pair and order, the counts, the win rate of A over B and its interval."""
    if not rows:
        return ""
    level = round(100 * (1 - rows[0]["pooled"]["alpha"]))
    lines = [f"| pair | order | A wins | B wins | ties | unparseable | failed | win rate of A | {level}% Jeffreys interval |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        for key, name in (("a_first", "A shown first"), ("b_first", "B shown first"), ("pooled", "pooled")):
            s = r[key]
            lines.append(f"| {r['label']} | {name} | {s['wins']} | {s['losses']} | {s['ties']} | {s['invalid']} | "
                         f"{s['failed']} | {s['win_rate']:.3f} | [{s['interval_low']:.3f}, {s['interval_high']:.3f}] |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import tyro

    cmd = tyro.cli(JudgeCommand, args=list(sys.argv[1:] if argv is None else argv), prog="klq judge")
    rows = run(cmd)
    print(format_table(rows))
    print(f"wrote {cmd.out_dir}/judge.md, judge.jsonl, judgements.jsonl, judge.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
