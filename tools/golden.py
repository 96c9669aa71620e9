"""Rewrite the golden expectation files after an intended change: python tools/golden.py.

Review the diff of tests/golden/*.json before committing it: it is the behaviour change.
"""

import json
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(root))

from tcpguard.app.offline.golden import record  # noqa: E402
from tests.golden.cases import CASES  # noqa: E402

for name, (capture, rules, settings) in CASES.items():
    rec = record(root / capture, root / rules, settings())
    out = root / "tests" / "golden" / f"{name}.json"
    out.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {out.relative_to(root)}")
