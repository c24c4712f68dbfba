"""The movie-grouped validation split and the paired comparison of two recipes."""

from __future__ import annotations

import json
import random

import pytest

from sentiment.imdb import DatasetError, read_imdb, read_movie_ids
from tests.conftest import write_fake_imdb
from training import compare
from training.data import movie_grouped_split, random_split


@pytest.mark.parametrize("as_archive", [True, False])
def test_movie_ids_are_read_from_the_urls_files(tmp_path, as_archive) -> None:
    source = write_fake_imdb(tmp_path, n_per_class=6, as_archive=as_archive)
    movies = read_movie_ids(source, ("train",))
    keys = [r.key for r in read_imdb(source, ("train",), unsup=True)["train"]]
    assert set(keys) <= set(movies)  # every review, unsup included, has a movie
    assert movies["train/pos/0"] == movies["train/pos/2"] == movies["train/neg/1"] == "tt0001000"
    assert movies["train/pos/3"] == "tt0001001"


def test_missing_urls_files_fail_clearly(tmp_path) -> None:
    source = write_fake_imdb(tmp_path, as_archive=False)
    for path in (source / "aclImdb" / "train").glob("urls_*.txt"):
        path.unlink()
    with pytest.raises(DatasetError, match="urls"):
        read_movie_ids(source, ("train",))


def synthetic_reviews(n_movies: int = 300, seed: int = 0) -> tuple[list[str], dict[str, str]]:
    """Review keys with 1–30 reviews per movie (as in IMDB), movies shared across labels."""
    rng = random.Random(seed)
    keys, movie_of = [], {}
    counts = {"pos": 0, "neg": 0}
    for m in range(n_movies):
        for _ in range(rng.randint(1, 30)):
            polarity = rng.choice(["pos", "neg"])
            key = f"train/{polarity}/{counts[polarity]}"
            counts[polarity] += 1
            keys.append(key)
            movie_of[key] = f"tt{m:07d}"
    return keys, movie_of


def test_grouped_split_puts_no_movie_on_both_sides() -> None:
    keys, movie_of = synthetic_reviews()
    split = movie_grouped_split(keys, movie_of, 0.1, seed=13)
    train_movies = {movie_of[keys[i]] for i in split.train}
    val_movies = {movie_of[keys[i]] for i in split.validation}
    assert not train_movies & val_movies
    assert sorted(split.train + split.validation) == list(range(len(keys)))  # every review once
    assert 0.1 <= len(split.validation) / len(keys) < 0.1 + 30 / len(keys)  # whole movies: overshoot < one movie
    assert split.validation_movies == len(val_movies) and split.train_movies == len(train_movies)
    # Fixed by the seed; another seed holds out other movies.
    assert movie_grouped_split(keys, movie_of, 0.1, seed=13) == split
    assert movie_grouped_split(keys, movie_of, 0.1, seed=14).validation != split.validation


def test_random_split_leaks_movies_the_grouped_one_does_not() -> None:
    keys, movie_of = synthetic_reviews()
    leaky = random_split(len(keys), 0.1, seed=13)
    train_movies = {movie_of[keys[i]] for i in leaky.train}
    shared = sum(movie_of[keys[i]] in train_movies for i in leaky.validation)
    assert shared / len(leaky.validation) > 0.8  # why the grouped split exists


def test_grouped_split_of_the_fake_corpus_through_the_reader(tmp_path) -> None:
    source = write_fake_imdb(tmp_path)
    reviews = [r for r in read_imdb(source, ("train",))["train"] if r.label >= 0]
    movie_of = read_movie_ids(source, ("train",))
    split = movie_grouped_split([r.key for r in reviews], movie_of, 0.25, seed=13)
    val = {movie_of[reviews[i].key] for i in split.validation}
    assert val and not val & {movie_of[reviews[i].key] for i in split.train}
    assert {reviews[i].label for i in split.validation} == {0, 1}  # a movie has reviews of both labels


def test_mcnemar_exact_and_chi2() -> None:
    a = [True] * 80 + [True] * 10 + [False] * 10
    b = [True] * 80 + [False] * 10 + [False] * 10  # B loses exactly the 10 reviews only A gets right
    result = compare.mcnemar(a, b)
    assert (result["only_a_right"], result["only_b_right"]) == (10, 0)
    assert result["p_exact"] == pytest.approx(2 / 2**10)
    assert result["chi2"] == pytest.approx(8.1) and result["p_chi2"] == pytest.approx(0.004427, rel=1e-3)
    same = compare.mcnemar(a, a)
    assert same["p_exact"] == 1.0 and same["only_a_right"] == same["only_b_right"] == 0
    balanced = compare.mcnemar([True, False] * 20, [False, True] * 20)  # 20 vs 20 disagreements
    assert balanced["p_exact"] == pytest.approx(1.0)


def test_paired_bootstrap_interval() -> None:
    rng = random.Random(1)
    a = [rng.random() < 0.90 for _ in range(2000)]
    b = list(a)
    for i in range(0, 2000, 40):  # B fixes 50 of A's mistakes or keeps the rest
        b[i] = True
    boot = compare.paired_bootstrap(a, b, resamples=2000, seed=0)
    assert boot["low"] <= boot["difference"] <= boot["high"]
    assert boot["difference"] > 0 and boot["low"] > 0  # a consistent improvement: the interval excludes 0
    same = compare.paired_bootstrap(a, a, resamples=200)
    assert same["low"] == same["high"] == 0.0


def test_compare_cli_on_prediction_files(tmp_path, capsys) -> None:
    labels = {f"train/pos/{i}": i % 2 for i in range(200)}
    good = {k: (0.9 if y else 0.1) for k, y in labels.items()}
    worse = dict(good)
    for k in list(labels)[:30]:
        worse[k] = 1 - good[k]
    for name, probs in (("a", good), ("b", worse)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"split": {"kind": "movie"}, "labels": labels,
                                                           "probabilities": probs}))
    assert compare.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy_a"] == 1.0 and result["accuracy_b"] == 0.85
    assert result["mcnemar"]["only_a_right"] == 30 and result["verdict"] == "A is better"
