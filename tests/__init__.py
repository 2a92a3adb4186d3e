"""The test suite: tests/<package>/ test one package each; tests/ itself holds the shared helpers and the
end-to-end tests (the shipped models, safety, the GPU check)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
DATA = ROOT / "tests" / "data"  # small images shipped for the tests (Set5)
