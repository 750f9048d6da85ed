"""`carzero-fast` command line: one subcommand per module, each with its own `--help`."""

from __future__ import annotations

import importlib
import sys

# name: (what it does, "module:function" taking argv and returning an exit code)
COMMANDS = {
    "bench": ("time every backend side by side at CARZero dims", "carzero_fast.bench:main"),
    "convert": ("a CARZero checkpoint → our model directory", "carzero_fast.model:convert_main"),
    "score": ("zero-shot scores of images for a vocabulary → CSV", "carzero_fast.score:main"),
    "evaluate": ("AUROC / AUPRC of a scores CSV against labels", "carzero_fast.evaluate:main"),
    "align-prompts": (
        "reports or label phrases → CARZero prompts (reviewed CSV)",
        "carzero_fast.align_prompts:main",
    ),
    "ground": ("cross-attention map of a prompt over an X-ray → PNG", "carzero_fast.ground:main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: carzero-fast COMMAND [options]   (COMMAND --help for its options)\n\n"
              "commands:")  # fmt: skip
        for name, (what, _) in COMMANDS.items():
            print(f"  {name:10s} {what}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module, func = COMMANDS[argv[0]][1].split(":")
    return getattr(importlib.import_module(module), func)(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
