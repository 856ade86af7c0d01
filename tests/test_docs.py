"""What the README states of a measured figure is what the page that measured it says: one truth."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def words(path: Path) -> str:
    """A Markdown file's text with its line breaks and runs of spaces as single spaces."""
    return " ".join(path.read_text().split())


def learning_check_gain(method: str) -> float:
    """The k-NN gain over the random backbone of `method`'s row in docs/fidelity.md's learning
    check table: | MAE (`recipes/mae_small.py`) | 880 steps | **91.1 %** (+35.4) | ..."""
    row = rf"^\| {method} \(`recipes/{method.lower()}_small\.py`[^|]*\| 880 steps \| "
    found = re.search(
        row + r"\*\*[\d.]+ %\*\* \(\+([\d.]+)\)", (ROOT / "docs" / "fidelity.md").read_text(), re.M
    )
    assert found, f"docs/fidelity.md: no learning check row for {method}"
    return float(found[1])


def test_readme_quotes_the_learning_checks_k_nn_gains():
    """docs/fidelity.md's learning check (the digits, against a random backbone) is where the
    k-NN gains are measured; the README's "Small datasets" rounds them (before: it said DINO
    gained "only 4" points, a superseded run, where the check measures +30.1)."""
    readme = words(ROOT / "README.md")
    said = re.search(r"MAE gains (\d+) points of k-NN accuracy in [^,]*, DINO (\d+) points", readme)
    assert said, "README § Small datasets: 'MAE gains N points of k-NN accuracy ..., DINO M points'"
    assert int(said[1]) == round(learning_check_gain("MAE"))  # 35.4
    assert int(said[2]) == round(learning_check_gain("DINO"))  # 30.1
