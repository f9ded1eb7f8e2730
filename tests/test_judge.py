"""LLM-as-a-judge: Jeffreys intervals against SciPy, answer parsing, an OpenAI-compatible HTTP
server on 127.0.0.1 (both orders, A/B mapped back, a malformed answer, an HTTP 500 retried, a
resumed judgement that sends nothing twice), and a local judge model (a verdict for every pair,
the same twice, log-probs equal to the PyTorch model's). Earlier outputs in --out-dir are replaced
only with --overwrite (refused before any request otherwise), never written through a link."""

import dataclasses
import hashlib
import http.server
import json
import os
import re
import threading

import pytest
from scipy.stats import beta

from experiments import judge as judge_cmd
from klq_jax import errors
from klq_jax import judge as J
from tests.helpers import fixtures, testing


@pytest.mark.parametrize("w,l", [(0, 0), (0, 1), (0, 32), (1, 0), (32, 0), (64, 0), (0, 64), (3, 7),
                                 (13, 19), (31, 33), (50, 14)])
@pytest.mark.parametrize("alpha", [0.2, 0.05])
def test_jeffreys_interval_matches_scipy(w, l, alpha):
    lo, hi = J.jeffreys_interval(w, l, alpha)
    ref = beta.ppf([alpha / 2, 1 - alpha / 2], 0.5 + w, 0.5 + l)
    assert abs(lo - ref[0]) <= 1e-9 and abs(hi - ref[1]) <= 1e-9, (lo, hi, ref)


def test_betainc_matches_scipy():
    from scipy.special import betainc

    for a, b in [(0.5, 0.5), (0.5, 40.5), (40.5, 0.5), (3.5, 7.5), (64.5, 60.5)]:
        for x in (1e-6, 0.01, 0.3, 0.5, 0.77, 0.999):
            assert abs(J.betainc(a, b, x) - betainc(a, b, x)) <= 1e-12


def test_parse_answer_and_order_mapping():
    assert J.parse_answer('{"Comparison": "A is shorter.", "Preferred": "A"}') == ("A", "A is shorter.")
    assert J.parse_answer('Sure!\n```json\n{"Comparison": "x", "Preferred": "Response B"}\n```') == ("B", "x")
    assert J.parse_answer('{"comparison": "same", "preferred": "equal"}')[0] == "tie"
    for bad in ("A", '{"Comparison": "x"}', '{"Preferred": "C"}', "[1, 2]", "", '{"Preferred": 1}'):
        assert J.parse_answer(bad)[0] is None, bad
    assert [J.winner(0, "A"), J.winner(0, "B"), J.winner(1, "A"), J.winner(1, "B")] == ["a", "b", "b", "a"]
    assert J.winner(1, "tie") == "tie" and J.winner(0, None) is None


# ----------------------------------------------------------------------------------- HTTP judge
class FakeJudgeServer:
    """An OpenAI-compatible /v1/chat/completions server: prefers the response containing "good";
    answers non-JSON text for a MALFORMED post, "Tie" for a TIE post, and an HTTP 500 the first
    time it sees each FLAKY request."""

    def __init__(self):
        self.log = []  # (sha256 of the body, HTTP status, first response, user text)
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                h = hashlib.sha256(raw).hexdigest()
                user = body["messages"][1]["content"]
                first, second = re.search(r"Response A:\n(.*)\n\nResponse B:\n(.*)$", user, re.S).groups()
                assert self.headers["Authorization"] == "Bearer test-key"
                assert self.path == "/v1/chat/completions"
                assert body["response_format"]["json_schema"]["schema"]["required"] == ["Comparison", "Preferred"]
                with server.lock:
                    seen = [s for hh, s, _, _ in server.log if hh == h]
                    status = 500 if "FLAKY" in user and not seen else 200
                    server.log.append((h, status, first, user))
                if status == 500:
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b'{"error": "overloaded"}')
                    return
                if "MALFORMED" in user:
                    content = "I think the first one is better."
                elif "TIE" in user:
                    content = json.dumps({"Comparison": "Both the same.", "Preferred": "Tie"})
                else:
                    pref = "A" if "good" in first else "B"
                    content = json.dumps({"Comparison": f"{pref} is good.", "Preferred": pref})
                out = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(out.encode())

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


POSTS = [("post zero", "good summary zero", "bad summary zero"),      # A wins in both orders
         ("FLAKY post one", "good summary one", "bad summary one"),   # A wins; first try gets HTTP 500
         ("post two", "bad summary two", "good summary two"),         # B wins
         ("MALFORMED post three", "good three", "bad three"),         # unparseable both times
         ("TIE post four", "good four", "bad four")]                  # a tie both times


def _write_run(d, responses, mode="greedy"):
    os.makedirs(d / "eval", exist_ok=True)
    with open(d / "eval" / "completions.jsonl", "w") as f:
        for i, (prompt, resp) in enumerate(responses):
            for m in ("sample", "greedy"):
                f.write(json.dumps({"mode": m, "index": i, "prompt": prompt,
                                    "response": resp if m == mode else "other " + resp,
                                    "score": 0.0, "kl": 0.0}) + "\n")
    with open(d / "config.json", "w") as f:
        json.dump({"task": {"kind": "tldr"}}, f)
    return str(d)


@pytest.fixture
def two_runs(tmp_path):
    a = _write_run(tmp_path / "run_a", [(p, ra) for p, ra, _ in POSTS])
    b = _write_run(tmp_path / "run_b", [(p, rb) for p, _, rb in POSTS])
    return a, b


def test_http_judge_both_orders_retries_malformed_and_resume(tmp_path, two_runs, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "test-key")
    server = FakeJudgeServer()
    delays = []
    try:
        def make(concurrency):
            return J.HTTPJudge(server.url, "judge-model", str(tmp_path / "cache"), api_key_env="TEST_JUDGE_KEY",
                               concurrency=concurrency, backoff_s=0.25, sleep=delays.append)

        a, b = two_runs
        cmd = judge_cmd.JudgeCommand(a=(a,), b=(b,), labels=("τ=0.05",), out_dir=str(tmp_path / "out"))

        # An interrupted judgement: the third answer raises (like Ctrl-C); unsent requests are
        # cancelled, the one in flight still completes and is cached.
        class Stop(KeyboardInterrupt):
            pass

        def interrupt(i, verdict, seen=[]):
            seen.append(i)
            if len(seen) == 3:
                raise Stop()

        with pytest.raises(Stop):
            judge_cmd.run(cmd, judge=make(1), on_result=interrupt)
        sent_first = len(server.log)
        assert 3 <= sent_first < 11  # 3 answered (+ the 500 retried), not all 10 queries

        (row,) = judge_cmd.run(cmd, judge=make(3))
        ok = [h for h, s, _, _ in server.log if s == 200]
        assert len(ok) == len(set(ok)) == 10  # every query answered exactly once across both runs
        flaky = [s for h, s, _, user in server.log if "FLAKY" in user]
        assert sorted(flaky) == [200, 200, 500, 500]  # each order got a 500 first and was retried
        assert delays == [0.25, 0.25]  # the back-off of those retries (no wall-clock wait in the test)
        # Both orders were sent for every post: run A's response shown first once, second once.
        for post, ra, rb in POSTS:
            firsts = sorted(first for _, s, first, user in server.log if s == 200 and post in user)
            assert firsts == sorted([ra, rb]), post
        assert row["a_first"] == dict(row["a_first"], wins=2, losses=1, ties=1, invalid=1, failed=0, total=5)
        assert row["b_first"] == dict(row["b_first"], wins=2, losses=1, ties=1, invalid=1, failed=0, total=5)
        assert row["pooled"] == dict(row["pooled"], wins=4, losses=2, ties=2, invalid=2, failed=0, total=10)
        lo, hi = beta.ppf([0.1, 0.9], 4.5, 2.5)
        assert abs(row["pooled"]["interval_low"] - lo) < 1e-9 and abs(row["pooled"]["interval_high"] - hi) < 1e-9
        records = [json.loads(x) for x in open(tmp_path / "out" / "judgements.jsonl")]
        by = {(r["index"], r["order"]): r for r in records}
        # "A"/"B" mapped back per order: post 0's run-A response is letter A in order 0, B in order 1.
        assert (by[0, 0]["choice"], by[0, 0]["winner"]) == ("A", "a")
        assert (by[0, 1]["choice"], by[0, 1]["winner"]) == ("B", "a")
        assert (by[2, 0]["winner"], by[2, 1]["winner"]) == ("b", "b")
        assert by[3, 0]["status"] == by[3, 1]["status"] == "invalid"
        assert by[3, 0]["raw"] == "I think the first one is better."
        table = (tmp_path / "out" / "judge.md").read_text()
        assert "| τ=0.05 | pooled | 4 | 2 | 2 | 2 | 0 | 0.667 |" in table
        assert open(tmp_path / "out" / "judge.png", "rb").read(4) == b"\x89PNG"

        # A third run (--overwrite: the second run's outputs are there) is answered from the cache alone.
        again = make(2)
        (row2,) = judge_cmd.run(dataclasses.replace(cmd, overwrite=True), judge=again)
        assert again.sent == 0 and row2["pooled"] == row["pooled"]
    finally:
        server.close()


def test_http_judge_counts_a_request_that_keeps_failing(tmp_path, monkeypatch):
    class AlwaysDown(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(503)
            self.end_headers()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AlwaysDown)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        j = J.HTTPJudge(f"http://127.0.0.1:{httpd.server_address[1]}", "m", str(tmp_path / "c"),
                        api_key_env="", max_retries=2, backoff_s=0.0, sleep=lambda s: None)
        records, summary = J.judge_pairs([J.Pair(0, "p", "x", "y")], j, "Judge.")
        assert summary["pooled"]["failed"] == 2 and summary["pooled"]["total"] == 2
        assert j.sent == 6 and all("HTTP 503" in r["error"] for r in records)
        assert not os.listdir(tmp_path / "c")  # failures are not cached: a rerun asks again
    finally:
        httpd.shutdown()
        httpd.server_close()
    with pytest.raises(J.JudgeError, match="NO_SUCH_KEY_VAR"):
        J.HTTPJudge("http://127.0.0.1:1", "m", str(tmp_path / "c"), api_key_env="NO_SUCH_KEY_VAR")


def test_klq_judge_fails_when_every_request_fails_and_warns_when_some_do(tmp_path, capsys):
    """Requests whose prompt holds DOWN always get HTTP 503: all failed -> one JudgeError line
    quoting the reason; some failed -> a one-line warning with the count and the first reason."""
    class PartlyDown(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if "DOWN" in body["messages"][1]["content"]:
                self.send_response(503)
                self.end_headers()
                return
            content = json.dumps({"Comparison": "A.", "Preferred": "A"})
            out = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})
            self.send_response(200)
            self.end_headers()
            self.wfile.write(out.encode())

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PartlyDown)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    judge = J.HTTPJudge(f"http://127.0.0.1:{httpd.server_address[1]}", "m", str(tmp_path / "c"),
                        api_key_env="", max_retries=1, backoff_s=0.0, sleep=lambda s: None)

    def judge_posts(name, posts):
        a = _write_run(tmp_path / name / "a", [(p, "x") for p in posts])
        b = _write_run(tmp_path / name / "b", [(p, "y") for p in posts])
        return judge_cmd.run(judge_cmd.JudgeCommand(a=(a,), b=(b,), out_dir=str(tmp_path / name / "out")), judge=judge)

    try:
        with pytest.raises(J.JudgeError, match=r"^Every judgement failed \(4 requests\), the first with: HTTP 503"
                                               r".*nothing was written"):
            judge_posts("all", ["DOWN one", "DOWN two"])
        assert not [n for n in judge_cmd.OUTPUTS if (tmp_path / "all" / "out" / n).exists()]
        capsys.readouterr()
        (row,) = judge_posts("some", ["DOWN one", "up two", "up three"])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert row["pooled"]["failed"] == 2 and row["pooled"]["total"] == 6
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and re.match(r"warning: 2 of 6 judgements failed .* the first with: HTTP 503", warnings[0])


# ---------------------------------------------------------------------------------- local judge
def test_local_judge_verdict_for_every_pair_and_deterministic(tmp_path, two_runs):
    import torch

    model_dir = tmp_path / "judge_model"
    tok = fixtures.make_tiny_tokenizer(model_dir)
    torch_model = testing.tiny_hf_gpt_neox(model_dir, vocab_size=len(tok), max_position_embeddings=512, seed=3)
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Which summary is better?")
    a, b = two_runs
    cfg = judge_cmd.JudgeConfig(backend="local", model=str(model_dir), prompt_file=str(prompt_file),
                                max_tokens=5, temperature=1.0, seed=0, batch_size=4)

    def judge_once(out):
        cmd = judge_cmd.JudgeCommand(a=(a,), b=(b,), num_prompts=3, out_dir=str(tmp_path / out), judge=cfg)
        judge_cmd.run(cmd, judge=judge_cmd.make_judge(cfg, cmd.out_dir))
        return [json.loads(x) for x in open(tmp_path / out / "judgements.jsonl")]

    first, second = judge_once("j1"), judge_once("j2")
    assert len(first) == 6 and all(r["winner"] in ("a", "b", "tie") and r["status"] != "invalid" for r in first)
    assert [(r["choice"], r["comparison"], r["extra"]) for r in first] == [
        (r["choice"], r["comparison"], r["extra"]) for r in second]
    # The verdict is the likelier choice token after the judge's own text, as PyTorch computes it.
    ida, idb = tok.encode("A"), tok.encode("B")
    for r in first:
        ids = torch.tensor([tok.encode(r["extra"]["judge_text"])])
        with torch.no_grad():
            logp = torch.log_softmax(torch_model(ids).logits[0, -1].double(), -1).numpy()
        assert abs(logp[ida[0]] - r["extra"]["logp_A"]) < 1e-4 and abs(logp[idb[0]] - r["extra"]["logp_B"]) < 1e-4
        assert r["choice"] == ("A" if logp[ida[0]] > logp[idb[0]] else "B")
    # A directory without tokenizer files (a model saved alone) is named, not read as an empty tokenizer.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "generation_config.json").write_text("{}")
    with pytest.raises(J.JudgeError, match=r"No tokenizer files in .*bare .*--judge.tokenizer DIR"):
        judge_cmd.make_judge(dataclasses.replace(cfg, tokenizer=str(bare)), str(tmp_path / "j4"))
    # max_tokens alone as long as the model's 512 positions: the error names max_new_tokens' bound.
    long_cfg = dataclasses.replace(cfg, max_tokens=512)
    cmd = judge_cmd.JudgeCommand(a=(a,), b=(b,), num_prompts=1, out_dir=str(tmp_path / "j3"), judge=long_cfg)
    with pytest.raises(errors.PromptTooLongError) as info:
        judge_cmd.run(cmd, judge=judge_cmd.make_judge(long_cfg, cmd.out_dir))
    width = int(re.match(r"Prompt length (\d+) ", str(info.value)).group(1))
    assert str(info.value).endswith(f"max_new_tokens must be <= {512 - width}.")


def test_judge_pairs_klq_with_ppo_of_each_sweep_point(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "test-key")
    sweep_dir = tmp_path / "sweep"
    rows = []
    for algo in ("klq", "ppo"):
        for tau in (0.05, 0.5):
            run = f"{algo}-tau{tau!r}"
            # KLQ's responses are the good ones at τ=0.05 and the bad ones at τ=0.5.
            good = (algo == "klq") == (tau == 0.05)
            _write_run(sweep_dir / run, [(p, ("good " if good else "bad ") + p) for p, _, _ in POSTS[:3]])
            rows.append({"algo": algo, "tau": tau, "run": run, "setting": f"τ={tau:g}"})
    (sweep_dir / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    server = FakeJudgeServer()
    try:
        judge = J.HTTPJudge(server.url, "m", str(tmp_path / "cache"), api_key_env="TEST_JUDGE_KEY",
                            backoff_s=0.0, sleep=lambda s: None)
        out = judge_cmd.run(judge_cmd.JudgeCommand(sweep=str(sweep_dir), out_dir=str(tmp_path / "out")),
                            judge=judge)
    finally:
        server.close()
    assert [(r["label"], os.path.basename(r["a"]), os.path.basename(r["b"])) for r in out] == [
        ("τ=0.05", "klq-tau0.05", "ppo-tau0.05"), ("τ=0.5", "klq-tau0.5", "ppo-tau0.5")]
    assert [r["pooled"]["wins"] for r in out] == [6, 0] and [r["pooled"]["losses"] for r in out] == [0, 6]


# ------------------------------------------------------------------ earlier outputs in --out-dir
def _judge_cli(capsys, *args) -> tuple[int, list[str]]:
    """``klq judge ARGS`` in process: the exit status and the non-empty stderr lines."""
    from experiments import cli

    capsys.readouterr()
    rc = cli.run("judge", ["--no-compile-cache", *map(str, args)])
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_a_rerun_is_refused_before_any_request_unless_overwrite_which_replaces_only_the_outputs(
        tmp_path, two_runs, monkeypatch, capsys):
    monkeypatch.setenv("TEST_JUDGE_KEY", "test-key")
    a, b = two_runs
    out = tmp_path / "out"
    server = FakeJudgeServer()
    try:
        cfg = judge_cmd.JudgeConfig(base_url=server.url, model="m", api_key_env="TEST_JUDGE_KEY", backoff_s=0.0)
        cmd = judge_cmd.JudgeCommand(a=(a,), b=(b,), labels=("run-one",), out_dir=str(out), judge=cfg)
        judge_cmd.run(cmd)  # the judge of cfg: its cache is out/cache
        assert sorted(os.listdir(out)) == sorted([*judge_cmd.OUTPUTS, "cache"])
        sent, before = len(server.log), testing.snapshot(out)

        # Without --overwrite: refused, naming the four files, the flag and the cache it keeps.
        with pytest.raises(errors.RunExistsError) as info:
            judge_cmd.run(dataclasses.replace(cmd, labels=("run-two",)))
        msg = str(info.value)
        assert "\n" not in msg and all(n in msg for n in judge_cmd.OUTPUTS), msg
        assert "--overwrite" in msg and f"request cache {out / 'cache'} is kept" in msg and "--out-dir" in msg
        # The command line: one line, status 2, and still nothing sent or written.
        rc, err = _judge_cli(capsys, "--a", a, "--b", b, "--out-dir", out, "--judge.base-url", server.url,
                             "--judge.api-key-env", "TEST_JUDGE_KEY")
        assert rc == 2 and len(err) == 1 and err[0].startswith("klq judge: error: "), err
        assert "judge.md" in err[0] and "--overwrite" in err[0]
        assert len(server.log) == sent and testing.snapshot(out) == before  # byte for byte

        # --overwrite: the outputs are replaced (judge.md and judge.png were links: the links are
        # replaced, their targets untouched), a file of the user's stays, the cache answers it all.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "table.md").write_text("my table")
        (elsewhere / "fig.png").write_bytes(b"my figure")
        for name, target in (("judge.md", "table.md"), ("judge.png", "fig.png")):
            (out / name).unlink()
            (out / name).symlink_to(elsewhere / target)
        (out / "notes.txt").write_text("mine")
        outside = testing.snapshot(elsewhere)
        (row,) = judge_cmd.run(dataclasses.replace(cmd, labels=("run-two",), overwrite=True))
    finally:
        server.close()
    assert len(server.log) == sent  # every answer came from the kept cache
    assert testing.snapshot(elsewhere) == outside
    assert not (out / "judge.md").is_symlink() and not (out / "judge.png").is_symlink()
    table = (out / "judge.md").read_text()
    assert "| run-two | pooled |" in table and "run-one" not in table
    assert (out / "judge.png").read_bytes()[:4] == b"\x89PNG"
    assert [json.loads(x)["label"] for x in open(out / "judge.jsonl")] == ["run-two"] and row["label"] == "run-two"
    assert {json.loads(x)["label"] for x in open(out / "judgements.jsonl")} == {"run-two"}
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(out)) == sorted([*judge_cmd.OUTPUTS, "cache", "notes.txt"])  # no temp file left


def test_a_users_own_judge_md_is_refused_and_left_alone(tmp_path, two_runs, capsys):
    a, b = two_runs
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "judge.md").write_text("# my notes on judges\n")
    # A base URL nothing listens on and no API key: the refusal comes before any judge is made.
    args = ["--a", a, "--b", b, "--out-dir", notes, "--judge.base-url", "http://127.0.0.1:1/v1",
            "--judge.api-key-env", "NO_SUCH_KEY_VAR"]
    rc, err = _judge_cli(capsys, *args)
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"klq judge: error: {notes} already holds judge.md "), err
    assert "pass --overwrite to replace them" in err[0] and "or choose another --out-dir" in err[0]
    assert os.listdir(notes) == ["judge.md"] and (notes / "judge.md").read_text() == "# my notes on judges\n"
    # A dangling link under an output's name counts as there too.
    (notes / "judge.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(errors.RunExistsError, match=r"already holds judge.md, judge.png \("):
        judge_cmd.check_out_dir(str(notes))
    judge_cmd.check_out_dir(str(notes), overwrite=True)
    judge_cmd.check_out_dir(str(tmp_path / "new"))  # a new directory: nothing in the way


def test_bad_settings_are_refused_before_any_request_and_leave_nothing(tmp_path, two_runs, monkeypatch, capsys):
    """newcomer 3 #4/#5: --alpha was checked only after every request had been sent (and cache/ was
    left behind), --num-prompts 0 was blamed on the runs, an empty --judge.prompt-file judged with an
    empty instruction, and an unwritable --out-dir gave a bare [Errno N]."""
    monkeypatch.setenv("TEST_JUDGE_KEY", "test-key")
    a, b = two_runs
    empty = tmp_path / "empty_prompt.txt"
    empty.write_text(" \n\t\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = tmp_path / "out"
    server = FakeJudgeServer()
    try:
        base = ["--a", a, "--b", b, "--judge.base-url", server.url, "--judge.api-key-env", "TEST_JUDGE_KEY"]
        for extra, where in [
            (["--alpha", "1.5"], "Invalid JudgeCommand: alpha=1.5 must be in (0, 1)"),
            (["--alpha", "0"], "alpha=0.0 must be in (0, 1)"),
            (["--num-prompts", "0"], "Invalid JudgeCommand: num_prompts=0 must be an integer >= 1"),
            (["--judge.max-tokens", "0", "--judge.concurrency", "0"],
             "Invalid JudgeConfig: max_tokens=0 must be an integer >= 1; concurrency=0 must be an integer >= 1"),
            (["--judge.timeout-s", "0"], "timeout_s=0.0 must be a finite number > 0"),
            (["--judge.prompt-file", empty], f"--judge.prompt-file {empty} is empty"),
            (["--judge.prompt-file", tmp_path / "missing.txt"], "Cannot read --judge.prompt-file"),
            (["--judge.api-key-env", "NO_SUCH_KEY_VAR"], "$NO_SUCH_KEY_VAR, which is not set"),
        ]:
            rc, err = _judge_cli(capsys, *base, "--out-dir", out, *extra)
            assert rc == 2 and len(err) == 1 and err[0].startswith("klq judge: error: ") and where in err[0], (extra, err)
            assert not os.path.lexists(out), extra  # neither the out dir nor its cache/
        with pytest.raises(errors.ConfigError, match="labels has 2 labels for 1 pairs"):
            judge_cmd.JudgeCommand(a=(a,), b=(b,), labels=("x", "y"))
        with pytest.raises(errors.ConfigError, match="sweep excludes a, b and labels"):
            judge_cmd.JudgeCommand(a=(a,), b=(b,), sweep=str(tmp_path))
        # A file as --out-dir, a read-only location (the cache, or with another cache the out dir):
        # one line naming the path the user gave and what to do; no request sent.
        ro = tmp_path / "ro"
        ro.mkdir()
        (tmp_path / "cachefile").mkdir()
        (tmp_path / "cachefile" / "cache").write_text("mine")
        cases = [([], tmp_path / "cachefile",
                  f"Cannot create the judge's request cache {tmp_path / 'cachefile' / 'cache'} (FileExistsError"),
                 ([], afile, f"--out-dir {afile} is not a directory; choose another --out-dir."),
                 ([], ro / "j", f"Cannot create the judge's output directory {ro / 'j'} ("),
                 (["--judge.cache-dir", tmp_path / "c"], ro / "j",
                  f"Cannot create the judge's output directory {ro / 'j'} (")]
        for extra, where, expected in cases:
            with testing.read_only(ro):
                rc, err = _judge_cli(capsys, *base, "--out-dir", where, *extra)
            assert rc == 2 and len(err) == 1 and expected in err[0] and "choose a" in err[0], err
            assert "Errno" not in err[0] and os.listdir(ro) == [], err
        assert server.log == []
    finally:
        server.close()
