"""arvision-shards: an image folder as WebDataset tar shards, for data=webdataset (datasets not on local disk).

    arvision-shards /data/imagenet /data/imagenet-shards                 # train/ and val/ → <out>/train, <out>/val
    arvision-shards /data/imagenet /data/imagenet-shards --shard-size 2000

Copy <out> to any store (object storage, a web server) and train with data=webdataset data.root=<its URL>.
The work is `arvision.data.streaming.write_shards`.
"""

from __future__ import annotations

import argparse

from arvision.cli.common import fail
from arvision.data import DatasetNotFound
from arvision.tokenizers.base import MissingExtra


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="arvision-shards", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="image folder: <root>/{train,val}/<class>/… or <root>/<class>/…")
    parser.add_argument("out", help="folder for <split>/shard-NNNNNN.tar and <split>/index.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    args = parser.parse_args(argv)
    from arvision.data.streaming import write_shards

    try:
        counts = write_shards(args.root, args.out, shard_size=args.shard_size)
    except (DatasetNotFound, MissingExtra, FileExistsError, ValueError) as err:
        fail(str(err))
    print(f"shards written in {args.out}; images per split: {counts}")


if __name__ == "__main__":
    main()
