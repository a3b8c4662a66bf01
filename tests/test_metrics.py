import math

import numpy as np
import pytest

from pipeline.evaluate import accuracy, pearson, summarize, write_leaderboard_file


def test_accuracy_by_hand():
    assert accuracy([0, 1, 2, 3], [0, 1, 0, 3]) == pytest.approx(0.75)


def test_pearson_by_hand():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 9.0]
    mx, my = np.mean(x), np.mean(y)
    num = sum((a - mx) * (b - my) for a, b in zip(x, y))
    den = math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert pearson(x, y) == pytest.approx(num / den)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0  # constant prediction


def test_avg_is_plain_mean_and_leaderboard_separate():
    out = summarize({"sst_acc": 0.5, "para_acc": 0.7, "sts_corr": 0.4})
    assert out["avg"] == pytest.approx((0.5 + 0.7 + 0.4) / 3)
    assert out["leaderboard_avg"] == pytest.approx((0.5 + 0.7 + (0.4 + 1) / 2) / 3)
    # the paper's Table 2 baseline row: avg 0.452 from 0.495, 0.5, 0.360
    assert summarize({"sst_acc": 0.495, "para_acc": 0.5, "sts_corr": 0.360})["avg"] == pytest.approx(0.4517, abs=1e-4)


def test_leaderboard_file_format(tmp_path):
    path = tmp_path / "sst-dev-output.csv"
    write_leaderboard_file(path, "sst", ["a1", "b2"], np.array([3.0, 0.0]))
    # the CS224N leaderboard's exact bytes: `id \t <Header> \n`, then `<id> , <prediction> \n`
    assert path.read_bytes() == b"id \t Predicted_Sentiment \na1 , 3 \nb2 , 0 \n"
    write_leaderboard_file(tmp_path / "para.csv", "para", ["p"], np.array([1.0]))
    assert (tmp_path / "para.csv").read_bytes() == b"id \t Predicted_Is_Paraphrase \np , 1 \n"
    write_leaderboard_file(tmp_path / "sts.csv", "sts", ["x", "y"], np.array([2.25, 0.123456]))
    assert (tmp_path / "sts.csv").read_bytes() == b"id \t Predicted_Similiary \nx , 2.2500 \ny , 0.1235 \n"
