"""The README's "Use the losses in your own JAX code" snippet runs as written."""
import pathlib
import re

HEADING = "## Use the losses in your own JAX code"
README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _snippet() -> str:
    assert README.exists(), f"{README} is missing"
    text = "\n" + README.read_text(encoding="utf-8")
    start = text.find("\n" + HEADING + "\n")
    assert start >= 0, f"README.md has no section headed {HEADING!r}"
    section = text[start + 1 + len(HEADING) :]
    nxt = re.search(r"^## ", section, re.M)
    if nxt:
        section = section[: nxt.start()]
    m = re.search(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert m, f"the README section {HEADING!r} has no ```python code block"
    return m.group(1)


def test_readme_losses_snippet_runs():
    code = _snippet()
    assert "klq_jax.returns" in code and "klq_jax.losses" in code
    namespace = {"__name__": "__readme__"}
    exec(compile(code, str(README) + ":losses-snippet", "exec"), namespace)
    # the snippet computed a finite float32 loss and gradients of the right shapes
    import jax.numpy as jnp

    loss = namespace["loss"]
    assert loss.dtype == jnp.float32 and bool(jnp.isfinite(loss))
    assert namespace["g_values"].shape == namespace["values"].shape
