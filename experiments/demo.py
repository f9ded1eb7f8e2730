"""The offline demo: ``python experiments/demo.py [--quick] [--out-dir DIR]``.

A thin wrapper around :func:`klq_jax.demo.main` (the same as ``python -m klq_jax.demo``).
"""

from klq_jax.demo import main

if __name__ == "__main__":
    main()
