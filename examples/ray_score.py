"""Score a Parquet or CSV file of reviews on a Ray cluster, one SentimentPredictor per CPU.

    ray start --head                        # on the head node; on every other: ray start --address=HEAD:6379
    python examples/ray_score.py reviews.parquet scored/ --actors 8

Every node needs this package (pip install -e ".[ray]") and the model artifacts at the same path.
The output is a folder of Parquet files, one per block, in no particular order (each row keeps its
id). docs/bulk.md, "On a cluster: Ray Data", shows this program; tests/test_bulk_ray.py runs it.
"""

from __future__ import annotations

import argparse

import ray

from app.bulk import SentimentPredictor


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("input")                      # a .parquet or .csv file (or a folder of them) with a text column
    p.add_argument("output")                     # a folder for the scored Parquet files
    p.add_argument("--address", default="auto")  # the cluster `ray start` set up
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--artifacts")                # the same path on every node (default: the shipped model)
    p.add_argument("--text-column", default="text")
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()

    ray.init(address=args.address)
    read = ray.data.read_csv if args.input.endswith(".csv") else ray.data.read_parquet
    reviews = read(args.input)
    scored = reviews.map_batches(
        SentimentPredictor,  # a class: each actor loads the model once, then scores batch after batch
        fn_constructor_kwargs={"artifacts_dir": args.artifacts, "text_column": args.text_column},
        concurrency=args.actors,
        num_cpus=1,
        batch_size=args.batch_size,
        batch_format="numpy",
    )
    scored.drop_columns([args.text_column]).write_parquet(args.output)


if __name__ == "__main__":
    main()
