"""``python -m fusion.fingerprint PATH [--dtype D]``: print the model fingerprint a transmitter or receiver of
that checkpoint announces (docs/PROTOCOL.md section 1.1), so an implementation in another language can use it.

PATH is what ``--model`` takes: a ``.gguf`` file, a Hugging Face directory, or a named tiny model.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from bus.cli import OneLineParser

DTYPES = ("float32", "bfloat16", "float16")  # fusion.models.DTYPES: the fingerprint samples weights as loaded


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, load the checkpoint on the CPU, print its fingerprint."""
    p = OneLineParser(prog="python -m fusion.fingerprint", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a .gguf file, a Hugging Face checkpoint directory, or a tiny model name")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype the agent loads it in (float32)")
    args = p.parse_args(list(argv) if argv is not None else None)
    from bus.errors import FedRefineError  # torch and transformers load only after the flags are good
    from fusion.models import LanguageModel

    try:
        model = LanguageModel.load(args.model, device="cpu", dtype=args.dtype)
    except FedRefineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(model.fingerprint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
