"""training.served_eval scores what a served model answers, reading its classes and positive class from the
handler's describe; refusals are counted, and another data set's classes give counts per class only."""

from pathlib import Path

from cxr.client import PredictionError
from training.served_eval import evaluate, markdown

SCORES = {"n1": 0.1, "n2": 0.4, "o1": 0.7, "o2": 0.3, "o3": 0.9}  # p(OPACITY) per film; "o3" is refused


class FakeServer:
    """Answers like the handler of a 2-class model with threshold 0.5, refusing film o3 (422)."""

    def predict(self, image: bytes, model: str) -> dict:
        name = image.decode()
        if name == "o3":
            raise PredictionError(422, "outside", {"error": "outside the model's population"})
        p = SCORES[name]
        return {"model": model, "version": "1.0", "label": "OPACITY" if p >= 0.5 else "NO_OPACITY",
                "probabilities": {"NO_OPACITY": 1 - p, "OPACITY": p}, "threshold": 0.5}

    def describe(self, model: str, version: str, customized: bool) -> list[dict]:
        assert (version, customized) == ("1.0", True)
        return [{"customizedMetadata": {"class_names": ["NO_OPACITY", "OPACITY"], "positive_class": "OPACITY"}}]


def films(root: Path, classes: dict[str, list[str]]) -> Path:
    """Files whose bytes are their names: the fake server reads them back."""
    for label, names in classes.items():
        (root / label).mkdir(parents=True)
        for name in names:
            (root / label / f"{name}.png").write_bytes(name.encode())
    return root


def test_answers_are_scored_and_refusals_counted(tmp_path):
    folder = films(tmp_path, {"NO_OPACITY": ["n1", "n2"], "OPACITY": ["o1", "o2", "o3"]})
    result = evaluate(FakeServer(), "adult", folder, threads=2)
    assert (result["films"], result["answered"]) == (5, 4)
    assert result["refused"] == {"422 outside the model's population": 1}
    assert result["labels_answered"] == {"NO_OPACITY": 3, "OPACITY": 1}
    report = result["report"]
    assert report["sensitivity"] == 0.5 and report["specificity"] == 1.0 and report["roc_auc"] == 0.75


def test_another_data_sets_classes_give_counts_only(tmp_path):
    folder = films(tmp_path, {"NORMAL": ["n1"], "PNEUMONIA": ["o1"]})
    result = evaluate(FakeServer(), "adult", folder, threads=1)
    assert result["answered"] == 2 and "report" not in result
    assert result["by_folder"] == {"NORMAL": {"NO_OPACITY": 1}, "PNEUMONIA": {"OPACITY": 1}}


def test_each_folder_says_what_came_back_for_it(tmp_path):
    folder = films(tmp_path, {"NO_OPACITY": ["n1", "n2"], "OPACITY": ["o1", "o2", "o3"]})
    result = evaluate(FakeServer(), "adult", folder, threads=2)
    assert result["by_folder"] == {"NO_OPACITY": {"NO_OPACITY": 2}, "OPACITY": {"OPACITY": 1, "NO_OPACITY": 1,
                                                                                 "refused": 1}}
    text = markdown("adult", folder, result)
    assert "| folder | films | NO_OPACITY | OPACITY | refused |" in text
    assert "| OPACITY | 3 | 1 | 1 | 1 |" in text and "| NO_OPACITY | 2 | 2 | 0 | 0 |" in text
